//! XSAVE and XRSTOR (standard form) on byte images: the guest's XSAVE area, and the
//! vCPU's extended state in the standard-format buffer of `KVM_GET_XSAVE`/`KVM_SET_XSAVE`
//! (Documentation/virt/kvm/api.rst "KVM_GET_XSAVE": the XSAVE layout, non-compacted).
//!
//! Layout and rules: Intel SDM vol. 1 ch. 13, "Managing State Using the XSAVE Feature
//! Set" — §13.4 the area (legacy region, header, extended region at the offsets CPUID
//! Fn0000_000D.i EBX gives), §13.5.1/13.5.2 x87 and SSE state in the legacy region
//! (64-bit format: the REX.W forms Linux uses), §13.6 initial configurations, §13.7 XSAVE,
//! §13.8.1 standard-form XRSTOR.

use kvm_bindings::kvm_cpuid_entry2;

/// Legacy region: x87 control/status/tag/opcode/pointers (bytes 0-23) and ST0-ST7/MM0-MM7
/// (32-159) are state component 0; XMM0-XMM15 (160-415) component 1; MXCSR and
/// MXCSR_MASK (24-31) go with components 1 and 2 (§13.5.2, §13.7).
const X87_CONTROL: std::ops::Range<usize> = 0..24;
const MXCSR: std::ops::Range<usize> = 24..28;
const MXCSR_MASK: std::ops::Range<usize> = 28..32;
const MXCSR_AND_MASK: std::ops::Range<usize> = 24..32;
const X87_REGISTERS: std::ops::Range<usize> = 32..160;
const XMM_REGISTERS: std::ops::Range<usize> = 160..416;
/// The XSAVE header (§13.4.2): XSTATE_BV (bytes 0-7), XCOMP_BV (8-15), reserved.
const HEADER: usize = 512;
const XSTATE_BV: std::ops::Range<usize> = HEADER..HEADER + 8;
/// Header bytes 23:8 (XCOMP_BV and the next 8): must be zero for the standard form of
/// XRSTOR when XSAVEC is not enumerated (§13.8.1; ibsvm hides XSAVEC).
const HEADER_MUST_BE_ZERO: std::ops::Range<usize> = HEADER + 8..HEADER + 24;
/// The smallest area: legacy region and header.
pub const MIN_AREA: usize = HEADER + 64;
/// XSAVE areas are 64-byte aligned (§13.4).
pub const AREA_ALIGN: u64 = 64;
/// FCW after FNINIT and in the x87 initial configuration (§13.6); the rest of the x87
/// control bytes and registers are 0 (FTW 0 in the abridged 8-bit form: all empty).
const FCW_INIT: u16 = 0x037f;
/// MXCSR_MASK when a processor stores 0 there: the default mask (SDM vol. 1 §11.6.6).
const MXCSR_MASK_DEFAULT: u32 = 0xffbf;
/// Components 0 (x87), 1 (SSE) and 2 (AVX) in XCR0 / RFBM / XSTATE_BV (§13.3).
const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const AVX: u64 = 1 << 2;

/// Where the extended state components (i >= 2) live in a standard-format area.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// (component, offset, size), from CPUID Fn0000_000D.i EBX and EAX.
    extended: Vec<(u8, usize, usize)>,
}

impl Layout {
    /// The layout a vCPU's CPUID table gives its guest: every component 2..=62 that leaf
    /// 0xD sub-leaf 0 offers (EDX:EAX) and whose sub-leaf places it inside the 4 KiB
    /// `KVM_GET_XSAVE` buffer.
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let leaf = |index| crate::cpuid::find(entries, 0xd, index);
        let offered = leaf(0).map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
        let extended = (2..63u8)
            .filter(|i| offered & (1 << i) != 0)
            .filter_map(|i| {
                let e = leaf(u32::from(i))?;
                let (offset, size) = (e.ebx as usize, e.eax as usize);
                (offset >= MIN_AREA && offset + size <= KVM_XSAVE_BYTES)
                    .then_some((i, offset, size))
            })
            .collect();
        Self { extended }
    }

    /// The components this layout can place, as a bitmap (x87 and SSE always).
    #[cfg(test)]
    fn components(&self) -> u64 {
        self.extended
            .iter()
            .fold(X87 | SSE, |m, &(i, _, _)| m | (1 << i))
    }

    /// Bytes an XSAVE/XRSTOR with `rfbm` touches, from the start of the area.
    pub fn area_len(&self, rfbm: u64) -> usize {
        self.selected(rfbm)
            .map(|(_, offset, size)| offset + size)
            .fold(MIN_AREA, usize::max)
    }

    fn selected(&self, rfbm: u64) -> impl Iterator<Item = (u8, usize, usize)> + '_ {
        self.extended
            .iter()
            .copied()
            .filter(move |&(i, _, _)| rfbm & (1 << i) != 0)
    }
}

/// Size of the `KVM_GET_XSAVE` buffer (`struct kvm_xsave`).
pub const KVM_XSAVE_BYTES: usize = 4096;

/// Why an XRSTOR raises #GP(0) (SDM vol. 1 §13.8, vol. 2B "XRSTOR" exceptions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XrstorFault {
    /// XSTATE_BV sets a bit that XCR0 does not.
    XstateBvOutsideXcr0,
    /// Header bytes 23:8 are not zero (a compacted area, or garbage).
    HeaderReserved,
    /// The MXCSR image sets a bit outside MXCSR_MASK.
    MxcsrReserved,
}

fn u64_at(buf: &[u8], r: std::ops::Range<usize>) -> u64 {
    u64::from_le_bytes(buf[r].try_into().expect("8-byte field"))
}

fn u32_at(buf: &[u8], r: std::ops::Range<usize>) -> u32 {
    u32::from_le_bytes(buf[r].try_into().expect("4-byte field"))
}

/// XSAVE: stores the components in `rfbm` (= EDX:EAX & XCR0) from `state` into `area`
/// (its first `layout.area_len(rfbm)` bytes, as read from the guest; the caller writes
/// them back). XSTATE_BV[i] becomes XINUSE[i] — the vCPU's own XSTATE_BV — for i in
/// RFBM and keeps its value elsewhere; no other header byte is written (§13.7).
pub fn xsave(state: &[u8; KVM_XSAVE_BYTES], area: &mut [u8], rfbm: u64, layout: &Layout) {
    let copy =
        |area: &mut [u8], r: std::ops::Range<usize>| area[r.clone()].copy_from_slice(&state[r]);
    if rfbm & X87 != 0 {
        copy(area, X87_CONTROL);
        copy(area, X87_REGISTERS);
    }
    if rfbm & SSE != 0 {
        copy(area, XMM_REGISTERS);
    }
    if rfbm & (SSE | AVX) != 0 {
        copy(area, MXCSR_AND_MASK);
    }
    for (_, offset, size) in layout.selected(rfbm) {
        copy(area, offset..offset + size);
    }
    let in_use = u64_at(state, XSTATE_BV);
    let bv = (u64_at(area, XSTATE_BV) & !rfbm) | (in_use & rfbm);
    area[XSTATE_BV].copy_from_slice(&bv.to_le_bytes());
}

/// XRSTOR, standard form: loads the components in `rfbm` (= EDX:EAX & XCR0) into `state`
/// from `area` (its first `layout.area_len(rfbm)` bytes) — component i from memory if
/// XSTATE_BV[i] is set, else its initial configuration — and MXCSR from memory if RFBM
/// selects SSE or AVX (§13.8.1). Checks first, so a fault leaves `state` untouched.
pub fn xrstor(
    state: &mut [u8; KVM_XSAVE_BYTES],
    area: &[u8],
    rfbm: u64,
    xcr0: u64,
    layout: &Layout,
) -> Result<(), XrstorFault> {
    let bv = u64_at(area, XSTATE_BV);
    if bv & !xcr0 != 0 {
        return Err(XrstorFault::XstateBvOutsideXcr0);
    }
    if area[HEADER_MUST_BE_ZERO].iter().any(|&b| b != 0) {
        return Err(XrstorFault::HeaderReserved);
    }
    let loads_mxcsr = rfbm & (SSE | AVX) != 0;
    if loads_mxcsr {
        let mask = match u32_at(state, MXCSR_MASK) {
            0 => MXCSR_MASK_DEFAULT,
            m => m,
        };
        if u32_at(area, MXCSR) & !mask != 0 {
            return Err(XrstorFault::MxcsrReserved);
        }
    }
    // Component bytes from memory, or zero (their initial value, but for FCW).
    let load = |state: &mut [u8], r: std::ops::Range<usize>, from_memory: bool| {
        if from_memory {
            state[r.clone()].copy_from_slice(&area[r]);
        } else {
            state[r].fill(0);
        }
    };
    if rfbm & X87 != 0 {
        load(state, X87_CONTROL, bv & X87 != 0);
        load(state, X87_REGISTERS, bv & X87 != 0);
        if bv & X87 == 0 {
            state[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        }
    }
    if rfbm & SSE != 0 {
        load(state, XMM_REGISTERS, bv & SSE != 0);
    }
    if loads_mxcsr {
        load(state, MXCSR, true);
    }
    // Every extended component ibsvm can place (AVX, MPX, AVX-512, PKRU) initializes to 0.
    for (i, offset, size) in layout.selected(rfbm) {
        load(state, offset..offset + size, bv & (1 << i) != 0);
    }
    let new_bv = (u64_at(state, XSTATE_BV) & !rfbm) | (bv & rfbm);
    state[XSTATE_BV].copy_from_slice(&new_bv.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const YMM: usize = 576;

    fn layout() -> Layout {
        Layout {
            extended: vec![(2, YMM, 256)],
        }
    }

    /// A vCPU state with every byte numbered, XSTATE_BV = x87|SSE|AVX, header clean, a
    /// valid MXCSR and mask.
    fn state() -> [u8; KVM_XSAVE_BYTES] {
        let mut s: [u8; KVM_XSAVE_BYTES] = std::array::from_fn(|i| (i % 251) as u8 | 1);
        s[MXCSR].copy_from_slice(&0x1f80u32.to_le_bytes());
        s[MXCSR_MASK].copy_from_slice(&0x2ffffu32.to_le_bytes());
        s[HEADER..HEADER + 64].fill(0);
        s[XSTATE_BV].copy_from_slice(&7u64.to_le_bytes());
        s
    }

    #[test]
    fn layout_from_cpuid_keeps_offered_components_that_fit() {
        let leaf = |index, eax, ebx, edx| kvm_cpuid_entry2 {
            function: 0xd,
            index,
            eax,
            ebx,
            edx,
            ..Default::default()
        };
        // Offered: x87, SSE, AVX, opmask (5); component 6 is in sub-leaf 0 but would not
        // fit in 4 KiB; component 7 is not offered.
        let entries = [
            leaf(0, 0x67, 0, 0),
            leaf(2, 256, 576, 0),
            leaf(5, 64, 1088, 0),
            leaf(6, 512, 4000, 0),
            leaf(7, 1024, 1664, 0),
        ];
        let l = Layout::from_cpuid(&entries);
        assert_eq!(l.extended, vec![(2, 576, 256), (5, 1088, 64)]);
        assert_eq!(l.components(), 0x27);
        assert_eq!(l.area_len(0x3), MIN_AREA);
        assert_eq!(l.area_len(0x7), 832);
        assert_eq!(l.area_len(0x27), 1152);
    }

    #[test]
    fn xsave_writes_the_selected_components_and_their_xstate_bv() {
        let s = state();
        let mut area = vec![0xeeu8; 832];
        area[XSTATE_BV].copy_from_slice(&0x8u64.to_le_bytes());
        xsave(&s, &mut area, 0x7, &layout());
        assert_eq!(&area[..416], &s[..416], "legacy region");
        assert_eq!(&area[416..512], &[0xee; 96][..], "reserved bytes untouched");
        assert_eq!(u64_at(&area, XSTATE_BV), 0xf, "bit 3 kept, 0-2 = XINUSE");
        assert_eq!(
            &area[HEADER + 8..YMM],
            &[0xee; 56][..],
            "rest of the header untouched"
        );
        assert_eq!(&area[YMM..], &s[YMM..832]);

        // RFBM = AVX only: the YMM halves and MXCSR, nothing of x87/XMM.
        let mut area = vec![0u8; 832];
        xsave(&s, &mut area, AVX, &layout());
        assert_eq!(&area[MXCSR_AND_MASK], &s[MXCSR_AND_MASK]);
        assert!(area[X87_CONTROL]
            .iter()
            .chain(&area[XMM_REGISTERS])
            .all(|&b| b == 0));
        assert_eq!(u64_at(&area, XSTATE_BV), AVX);
        assert_eq!(&area[YMM..], &s[YMM..832]);
    }

    #[test]
    fn xrstor_loads_or_initializes_each_component() {
        let mut area = vec![0u8; 832];
        xsave(&state(), &mut area, 0x7, &layout());
        area[YMM] = 0x42;
        area[XMM_REGISTERS.start] = 0x43;
        // Restore into a state that differs everywhere.
        let mut s = [0x99u8; KVM_XSAVE_BYTES];
        s[MXCSR_MASK].copy_from_slice(&0xffffu32.to_le_bytes());
        s[XSTATE_BV].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(xrstor(&mut s, &area, 0x7, 0x7, &layout()), Ok(()));
        assert_eq!(&s[..MXCSR_MASK.start], &area[..MXCSR_MASK.start]);
        assert_eq!(u32_at(&s, MXCSR_MASK), 0xffff, "MXCSR_MASK is not state");
        assert_eq!(&s[MXCSR_MASK.end..416], &area[MXCSR_MASK.end..416]);
        assert_eq!(&s[YMM..832], &area[YMM..]);
        assert_eq!(u64_at(&s, XSTATE_BV), 0x7);
        assert_eq!(s[416], 0x99, "reserved legacy bytes are not state");

        // XSTATE_BV = SSE: x87 and AVX to their initial configuration, XMM and MXCSR loaded.
        area[XSTATE_BV].copy_from_slice(&SSE.to_le_bytes());
        area[MXCSR].copy_from_slice(&0x1f81u32.to_le_bytes());
        assert_eq!(xrstor(&mut s, &area, 0x7, 0x7, &layout()), Ok(()));
        assert_eq!(&s[0..2], &[0x7f, 0x03], "FCW 0x37f");
        assert!(s[2..24].iter().chain(&s[X87_REGISTERS]).all(|&b| b == 0));
        assert_eq!(u32_at(&s, MXCSR), 0x1f81);
        assert_eq!(s[XMM_REGISTERS.start], 0x43);
        assert!(s[YMM..832].iter().all(|&b| b == 0));
        assert_eq!(u64_at(&s, XSTATE_BV), SSE);

        // RFBM without AVX leaves the YMM halves alone, whatever XSTATE_BV says.
        s[YMM] = 0x77;
        area[XSTATE_BV].copy_from_slice(&0x7u64.to_le_bytes());
        assert_eq!(xrstor(&mut s, &area, 0x3, 0x7, &layout()), Ok(()));
        assert_eq!(s[YMM], 0x77);
        assert_eq!(u64_at(&s, XSTATE_BV), 0x3, "bit 2 as it was (clear)");
    }

    #[test]
    fn xrstor_faults_leave_the_state_alone() {
        let mut area = vec![0u8; 832];
        xsave(&state(), &mut area, 0x7, &layout());
        // (byte, value that makes it bad, the fault).
        let cases = [
            (HEADER, 0x8, XrstorFault::XstateBvOutsideXcr0),
            (HEADER + 15, 0x80, XrstorFault::HeaderReserved),
            (MXCSR.start + 2, 0x04, XrstorFault::MxcsrReserved),
        ];
        for (at, value, fault) in cases {
            let mut bad = area.clone();
            bad[at] |= value;
            let mut s = state();
            let before = s;
            assert_eq!(xrstor(&mut s, &bad, 0x7, 0x7, &layout()), Err(fault));
            assert_eq!(s, before, "{fault:?}");
        }
        // MXCSR is not checked (nor loaded) when RFBM selects neither SSE nor AVX.
        let mut bad = area.clone();
        bad[MXCSR.start + 2] = 0x04;
        assert_eq!(xrstor(&mut state(), &bad, X87, 0x7, &layout()), Ok(()));
        // A zero MXCSR_MASK means the default mask 0xffbf: DAZ (bit 6) is reserved.
        let mut s = state();
        s[MXCSR_MASK].fill(0);
        let mut daz = area.clone();
        daz[MXCSR].copy_from_slice(&0x1fc0u32.to_le_bytes());
        assert_eq!(
            xrstor(&mut s, &daz, 0x7, 0x7, &layout()),
            Err(XrstorFault::MxcsrReserved)
        );
    }
}
