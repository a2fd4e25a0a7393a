//! The memory operand of a 64-bit-mode instruction: legacy prefixes, REX, ModRM, SIB and
//! displacement (Intel SDM vol. 2A §2.1-2.2 "Instruction Format", "IA-32e Mode"; AMD APM
//! vol. 3 §1.2-1.4), and the linear address it names.

/// Segment used for the access (SDM vol. 2A §2.1.1: 64/65 select FS/GS; CS/DS/ES/SS
/// overrides are ignored in 64-bit mode, where those bases are 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// DS or ES: base 0.
    Data,
    /// SS (default with RSP or RBP as base): base 0, but faults are #SS rather than #GP.
    Stack,
    /// FS override: FS.base.
    Fs,
    /// GS override: GS.base.
    Gs,
}

/// A decoded memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// Base register number (0 = RAX ... 15 = R15), if any.
    pub base: Option<u8>,
    /// Index register and scale shift (0-3), if any.
    pub index: Option<(u8, u8)>,
    /// Displacement, sign-extended.
    pub disp: i32,
    /// RIP-relative: the displacement is from the next instruction.
    pub rip_relative: bool,
    /// Address-size prefix 67: the address is computed in 32 bits.
    pub addr32: bool,
    /// The segment the access goes through.
    pub segment: Segment,
}

/// An instruction of the form `[prefixes] [REX] 0F op ModRM ...` with a memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The second opcode byte (after 0F).
    pub opcode: u8,
    /// ModRM.reg, the opcode extension of group instructions (without REX.R).
    pub reg: u8,
    /// REX.W is set.
    pub rex_w: bool,
    /// The memory operand.
    pub mem: MemOperand,
    /// Total length in bytes.
    pub len: u8,
}

/// Decodes a two-byte-opcode (`0F xx`) instruction whose ModRM names memory. `None` for
/// anything else: a register operand (mod = 3), LOCK/66/F2/F3 prefixes (which change or
/// forbid the instructions ibsvm completes: their encodings are "NP"), or truncated bytes.
pub fn decode_0f_mem(insn: &[u8]) -> Option<Decoded> {
    let mut pos = 0;
    let mut segment = None;
    let mut addr32 = false;
    // Legacy prefixes (SDM vol. 2A §2.1.1), then at most one REX right before the opcode.
    loop {
        match *insn.get(pos)? {
            0x64 => segment = Some(Segment::Fs),
            0x65 => segment = Some(Segment::Gs),
            0x26 | 0x2e | 0x36 | 0x3e => {}
            0x67 => addr32 = true,
            _ => break,
        }
        pos += 1;
    }
    let rex = match *insn.get(pos)? {
        b @ 0x40..=0x4f => {
            pos += 1;
            b
        }
        _ => 0,
    };
    let (rex_w, rex_x, rex_b) = (rex & 8 != 0, (rex & 2) << 2, (rex & 1) << 3);
    if *insn.get(pos)? != 0x0f {
        return None;
    }
    let opcode = *insn.get(pos + 1)?;
    let modrm = *insn.get(pos + 2)?;
    pos += 3;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 {
        return None;
    }
    let mut base = Some(rm | rex_b);
    let mut index = None;
    let mut rip_relative = false;
    let mut disp_len = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = *insn.get(pos)?;
        pos += 1;
        let (scale, idx, sib_base) = (sib >> 6, ((sib >> 3) & 7) | rex_x, sib & 7);
        // Index 100b without REX.X means none (SDM vol. 2A Table 2-3).
        if idx != 4 {
            index = Some((idx, scale));
        }
        // Base 101b with mod 00: no base, disp32.
        if sib_base == 5 && md == 0 {
            base = None;
            disp_len = 4;
        } else {
            base = Some(sib_base | rex_b);
        }
    } else if rm == 5 && md == 0 {
        // RIP-relative in 64-bit mode (SDM vol. 2A §2.2.1.6).
        base = None;
        rip_relative = true;
        disp_len = 4;
    }
    let disp = match disp_len {
        1 => i32::from(*insn.get(pos)? as i8),
        4 => i32::from_le_bytes(insn.get(pos..pos + 4)?.try_into().ok()?),
        _ => 0,
    };
    pos += disp_len;
    let stack_base = matches!(base, Some(4 | 5));
    Some(Decoded {
        opcode,
        reg,
        rex_w,
        mem: MemOperand {
            base,
            index,
            disp,
            rip_relative,
            addr32,
            segment: segment.unwrap_or(if stack_base {
                Segment::Stack
            } else {
                Segment::Data
            }),
        },
        len: u8::try_from(pos).ok()?,
    })
}

impl MemOperand {
    /// The effective address (before the segment base), given the general registers in
    /// encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15) and the RIP of the
    /// next instruction.
    pub fn effective(&self, gprs: &[u64; 16], next_rip: u64) -> u64 {
        let mut ea = i64::from(self.disp) as u64;
        if self.rip_relative {
            ea = ea.wrapping_add(next_rip);
        }
        if let Some(b) = self.base {
            ea = ea.wrapping_add(gprs[usize::from(b)]);
        }
        if let Some((i, scale)) = self.index {
            ea = ea.wrapping_add(gprs[usize::from(i)] << scale);
        }
        if self.addr32 {
            ea &= 0xffff_ffff;
        }
        ea
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gprs() -> [u64; 16] {
        std::array::from_fn(|i| 0x1000 * (i as u64 + 1))
    }

    #[test]
    fn linux_xsave_forms() {
        // xsave64 (%rdi), xrstor64 (%rdi): what Linux's XSTATE_XSAVE/XRSTOR emit.
        let d = decode_0f_mem(&[0x48, 0x0f, 0xae, 0x27]).unwrap();
        assert_eq!((d.opcode, d.reg, d.rex_w, d.len), (0xae, 4, true, 4));
        assert_eq!(d.mem.effective(&gprs(), 0), 0x8000);
        assert_eq!(d.mem.segment, Segment::Data);
        let d = decode_0f_mem(&[0x48, 0x0f, 0xae, 0x2f, 0x90]).unwrap();
        assert_eq!((d.reg, d.len), (5, 4));
    }

    #[test]
    fn sib_disp_and_rex_extensions() {
        // xsave 0x10(%r12,%r9,4): REX.WXB, ModRM mod 01 rm 100, SIB scale 2 index 001 base 100.
        let d = decode_0f_mem(&[0x4b, 0x0f, 0xae, 0x64, 0x8c, 0x10]).unwrap();
        assert_eq!(d.mem.base, Some(12));
        assert_eq!(d.mem.index, Some((9, 2)));
        assert_eq!(d.len, 6);
        assert_eq!(d.mem.effective(&gprs(), 0), 0xd000 + 0xa000 * 4 + 0x10);
        // xsave -0x40(%rsp): SS by default, disp8 negative.
        let d = decode_0f_mem(&[0x0f, 0xae, 0x64, 0x24, 0xc0]).unwrap();
        assert_eq!(
            (d.mem.base, d.mem.index, d.mem.disp),
            (Some(4), None, -0x40)
        );
        assert_eq!(d.mem.segment, Segment::Stack);
        // xsave 0x12345678 (no base, no index: SIB base 101 with mod 00), disp32.
        let d = decode_0f_mem(&[0x0f, 0xae, 0x24, 0x25, 0x78, 0x56, 0x34, 0x12]).unwrap();
        assert_eq!((d.mem.base, d.mem.index, d.len), (None, None, 8));
        assert_eq!(d.mem.effective(&gprs(), 0), 0x1234_5678);
        // xsave 0x100(%rbp) with mod 10 disp32: SS.
        let d = decode_0f_mem(&[0x0f, 0xae, 0xa5, 0, 1, 0, 0]).unwrap();
        assert_eq!(
            (d.mem.segment, d.mem.effective(&gprs(), 0)),
            (Segment::Stack, 0x6100)
        );
    }

    #[test]
    fn rip_relative_segments_and_address_size() {
        // xsave 0x20(%rip), 6 bytes long.
        let d = decode_0f_mem(&[0x0f, 0xae, 0x25, 0x20, 0, 0, 0]).unwrap();
        assert!(d.mem.rip_relative);
        assert_eq!(
            d.mem.effective(&gprs(), 0xffff_ffff_8100_0007),
            0xffff_ffff_8100_0027
        );
        // %gs:(%rax), and 67: the address wraps at 4 GiB.
        let d = decode_0f_mem(&[0x65, 0x0f, 0xae, 0x20]).unwrap();
        assert_eq!((d.mem.segment, d.len), (Segment::Gs, 4));
        let d = decode_0f_mem(&[0x67, 0x0f, 0xae, 0xa0, 0xff, 0xff, 0xff, 0xff]).unwrap();
        let mut regs = gprs();
        regs[0] = 0x1_0000_0010;
        assert_eq!(d.mem.effective(&regs, 0), 0xf);
    }

    #[test]
    fn not_memory_forms() {
        for insn in [
            &[0x0f, 0xae, 0xe8][..],      // lfence: mod 3
            &[0x66, 0x0f, 0xae, 0x27],    // 66 prefix
            &[0xf3, 0x0f, 0xae, 0x27],    // F3: ptwrite, not xsave
            &[0xf0, 0x0f, 0xae, 0x27],    // LOCK
            &[0x48, 0x0f, 0xae],          // truncated
            &[0x0f, 0xae, 0x24],          // SIB missing
            &[0x0f, 0xae, 0x25, 0x20, 0], // disp32 truncated
            &[0x48, 0x48],
            &[],
        ] {
            assert_eq!(decode_0f_mem(insn), None, "{insn:02x?}");
        }
    }
}
