//! MSR indices and register bit layouts of AMD IBS and the AMD extended APIC.
//!
//! Every constant names its source. "msr-index.h" is Linux
//! `arch/x86/include/asm/msr-index.h`, "perf_event.h" is Linux
//! `arch/x86/include/asm/perf_event.h`, "amd-ibs.h" is Linux
//! `arch/x86/include/asm/amd-ibs.h` (the bitfield unions; `asm/amd/ibs.h` in newer trees),
//! "apicdef.h" is Linux `arch/x86/include/asm/apicdef.h`, and "DEVICE.md §n" or "device model
//! §n" is a section of this crate's `DEVICE.md`, the [device model](crate::device_model).

use std::ops::RangeInclusive;

// ---------------------------------------------------------------------------------------------
// MSR indices (msr-index.h MSR_AMD64_IBS*, DEVICE.md §1)
// ---------------------------------------------------------------------------------------------

/// IBS fetch control and status (msr-index.h `MSR_AMD64_IBSFETCHCTL`).
pub const IBS_FETCH_CTL: u32 = 0xC001_1030;
/// Sampled fetch linear address (msr-index.h `MSR_AMD64_IBSFETCHLINAD`).
pub const IBS_FETCH_LINADDR: u32 = 0xC001_1031;
/// Sampled fetch physical address (msr-index.h `MSR_AMD64_IBSFETCHPHYSAD`); reads 0 here.
pub const IBS_FETCH_PHYSADDR: u32 = 0xC001_1032;
/// IBS op control and status (msr-index.h `MSR_AMD64_IBSOPCTL`).
pub const IBS_OP_CTL: u32 = 0xC001_1033;
/// Sampled op RIP (msr-index.h `MSR_AMD64_IBSOPRIP`).
pub const IBS_OP_RIP: u32 = 0xC001_1034;
/// Op data: branch and retire information (msr-index.h `MSR_AMD64_IBSOPDATA`).
pub const IBS_OP_DATA: u32 = 0xC001_1035;
/// Op data 2: northbridge data source (msr-index.h `MSR_AMD64_IBSOPDATA2`).
pub const IBS_OP_DATA2: u32 = 0xC001_1036;
/// Op data 3: load/store information (msr-index.h `MSR_AMD64_IBSOPDATA3`).
pub const IBS_OP_DATA3: u32 = 0xC001_1037;
/// Data cache linear address (msr-index.h `MSR_AMD64_IBSDCLINAD`).
pub const IBS_DC_LINADDR: u32 = 0xC001_1038;
/// Data cache physical address (msr-index.h `MSR_AMD64_IBSDCPHYSAD`); reads 0 here.
pub const IBS_DC_PHYSADDR: u32 = 0xC001_1039;
/// IBS control: LVT offset of the IBS interrupt (msr-index.h `MSR_AMD64_IBSCTL`).
pub const IBS_CTL: u32 = 0xC001_103A;
/// Branch target address (msr-index.h `MSR_AMD64_IBSBRTARGET`), present with caps BRNTRGT.
pub const IBS_BR_TARGET: u32 = 0xC001_103B;
/// Fetch extended control (msr-index.h `MSR_AMD64_ICIBSEXTDCTL`), present with caps FETCHCTLEXTD.
pub const IBS_FETCH_CTL_EXT: u32 = 0xC001_103C;
/// Op data 4 (msr-index.h `MSR_AMD64_IBSOPDATA4`); never advertised
/// ([device model §7](crate::device_model)), always #GP.
pub const IBS_OP_DATA4: u32 = 0xC001_103D;
/// Op control 2 of parts with caps DIS ([device model §1](crate::device_model)); never
/// advertised, always #GP.
pub const IBS_OP_CTL2: u32 = 0xC001_103E;
/// Fetch control 2 of parts with caps DIS ([device model §1](crate::device_model)); never
/// advertised, always #GP.
pub const IBS_FETCH_CTL2: u32 = 0xC001_103F;

/// The whole IBS MSR block a VMM should route to the device (its MSR filter range).
pub const IBS_MSR_RANGE: RangeInclusive<u32> = IBS_FETCH_CTL..=IBS_FETCH_CTL2;

// ---------------------------------------------------------------------------------------------
// AMD extended APIC registers in x2APIC MSR form. The xAPIC offsets are apicdef.h `APIC_EFEAT`
// 0x400, `APIC_ECTRL` 0x410 and `APIC_EILVTn(n)` 0x500 + 0x10 * n; the x2APIC MSR of an xAPIC
// register at offset `o` is 0x800 + (o >> 4) (Intel SDM vol. 3 §11.12.1.2, x2APIC register map).
// ---------------------------------------------------------------------------------------------

/// Extended APIC feature register (xAPIC offset 0x400, apicdef.h `APIC_EFEAT`).
pub const X2APIC_EFEAT: u32 = 0x840;
/// Extended APIC control register (xAPIC offset 0x410, apicdef.h `APIC_ECTRL`).
pub const X2APIC_ECTRL: u32 = 0x841;
/// Extended interrupt LVT entry 0 (xAPIC offset 0x500, apicdef.h `APIC_EILVTn(0)`).
pub const X2APIC_EILVT0: u32 = 0x850;
/// Number of extended LVT entries the device implements
/// ([device model §5.2](crate::device_model)).
pub const EILVT_COUNT: usize = 4;
/// The extended-LVT MSRs, EILVT0..=EILVT3.
pub const X2APIC_EILVT_RANGE: RangeInclusive<u32> = X2APIC_EILVT0..=X2APIC_EILVT0 + 3;

/// Every x2APIC MSR the device handles. KVM does not know them, so they reach the VMM as
/// unhandled-MSR (`KVM_MSR_EXIT_REASON_INVAL`) exits.
pub const EXT_APIC_MSRS: [u32; 6] = [
    X2APIC_EFEAT,
    X2APIC_ECTRL,
    X2APIC_EILVT0,
    X2APIC_EILVT0 + 1,
    X2APIC_EILVT0 + 2,
    X2APIC_EILVT0 + 3,
];

/// True for an MSR of the IBS block (0xC0011030..=0xC001103F).
pub fn is_ibs_msr(index: u32) -> bool {
    IBS_MSR_RANGE.contains(&index)
}

/// True for one of the AMD extended APIC MSRs in x2APIC form (0x840, 0x841, 0x850..=0x853).
pub fn is_ext_apic_msr(index: u32) -> bool {
    index == X2APIC_EFEAT || index == X2APIC_ECTRL || X2APIC_EILVT_RANGE.contains(&index)
}

/// True for every MSR the device answers (IBS block or extended APIC); the VMM routes these
/// to [`crate::Vpmu::rdmsr`] / [`crate::Vpmu::wrmsr`].
pub fn is_vpmu_msr(index: u32) -> bool {
    is_ibs_msr(index) || is_ext_apic_msr(index)
}

/// The name of a device MSR, for messages ("IBS_OP_CTL", "EILVT2", …).
pub fn msr_name(index: u32) -> Option<&'static str> {
    Some(match index {
        IBS_FETCH_CTL => "IBS_FETCH_CTL",
        IBS_FETCH_LINADDR => "IBS_FETCH_LINADDR",
        IBS_FETCH_PHYSADDR => "IBS_FETCH_PHYSADDR",
        IBS_OP_CTL => "IBS_OP_CTL",
        IBS_OP_RIP => "IBS_OP_RIP",
        IBS_OP_DATA => "IBS_OP_DATA",
        IBS_OP_DATA2 => "IBS_OP_DATA2",
        IBS_OP_DATA3 => "IBS_OP_DATA3",
        IBS_DC_LINADDR => "IBS_DC_LINADDR",
        IBS_DC_PHYSADDR => "IBS_DC_PHYSADDR",
        IBS_CTL => "IBS_CTL",
        IBS_BR_TARGET => "IBS_BR_TARGET",
        IBS_FETCH_CTL_EXT => "IBS_FETCH_CTL_EXT",
        IBS_OP_DATA4 => "IBS_OP_DATA4",
        IBS_OP_CTL2 => "IBS_OP_CTL2",
        IBS_FETCH_CTL2 => "IBS_FETCH_CTL2",
        X2APIC_EFEAT => "EFEAT",
        X2APIC_ECTRL => "ECTRL",
        0x850 => "EILVT0",
        0x851 => "EILVT1",
        0x852 => "EILVT2",
        0x853 => "EILVT3",
        _ => return None,
    })
}

/// Bit `n` of a 64-bit register.
pub(crate) const fn bit(n: u32) -> u64 {
    1 << n
}

/// Bits `lo..=hi` of a 64-bit register.
pub(crate) const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & !(bit(lo) - 1)
}

// ---------------------------------------------------------------------------------------------
// IBS_FETCH_CTL (amd-ibs.h `union ibs_fetch_ctl`, perf_event.h IBS_FETCH_*, DEVICE.md §1)
// ---------------------------------------------------------------------------------------------

/// IBS_FETCH_CTL\[15:0\] IbsFetchMaxCnt, period / 16 (perf_event.h `IBS_FETCH_MAX_CNT`).
pub const FETCH_MAX_CNT: u64 = bits(15, 0);
/// IBS_FETCH_CTL\[31:16\] IbsFetchCnt (perf_event.h `IBS_FETCH_CNT`).
pub const FETCH_CNT: u64 = bits(31, 16);
/// Shift of IbsFetchCnt.
pub const FETCH_CNT_SHIFT: u32 = 16;
/// IBS_FETCH_CTL\[47:32\] IbsFetchLat (amd-ibs.h `fetch_lat`).
pub const FETCH_LAT: u64 = bits(47, 32);
/// IBS_FETCH_CTL\[48\] IbsFetchEn (perf_event.h `IBS_FETCH_ENABLE`).
pub const FETCH_EN: u64 = bit(48);
/// IBS_FETCH_CTL\[49\] IbsFetchVal (perf_event.h `IBS_FETCH_VAL`).
pub const FETCH_VAL: u64 = bit(49);
/// IBS_FETCH_CTL\[50\] IbsFetchComp (amd-ibs.h `fetch_comp`).
pub const FETCH_COMP: u64 = bit(50);
/// IBS_FETCH_CTL\[51\] IbsIcMiss (amd-ibs.h `ic_miss`).
pub const FETCH_IC_MISS: u64 = bit(51);
/// IBS_FETCH_CTL\[52\] IbsPhyAddrValid (amd-ibs.h `phy_addr_valid`): read-as-zero, write-ignored.
pub const FETCH_PHY_ADDR_VALID: u64 = bit(52);
/// IBS_FETCH_CTL\[56:53\] L1TlbPgSz, L1TlbMiss, L2TlbMiss (amd-ibs.h `l1tlb_pgsz`..`l2tlb_miss`).
pub const FETCH_TLB_INFO: u64 = bits(56, 53);
/// IBS_FETCH_CTL\[57\] IbsRandEn (perf_event.h `IBS_FETCH_RAND_EN`).
pub const FETCH_RAND_EN: u64 = bit(57);
/// IBS_FETCH_CTL\[58\] IbsL2Miss (amd-ibs.h `fetch_l2_miss`).
pub const FETCH_L2_MISS: u64 = bit(58);
/// IBS_FETCH_CTL\[59\] IbsL3MissOnly, Zen 4 (perf_event.h `IBS_FETCH_L3MISSONLY`).
pub const FETCH_L3_MISS_ONLY: u64 = bit(59);
/// IBS_FETCH_CTL\[61:60\] IbsOpCacheMiss, IbsL3Miss (amd-ibs.h `fetch_oc_miss`, `fetch_l3_miss`).
/// They arrived with the Zen 4 extensions; this device accepts them only with caps ZEN4.
pub const FETCH_ZEN4_STATUS: u64 = bits(61, 60);
// IBS_FETCH_CTL[63:62] reserved (amd-ibs.h `reserved:2`).

// ---------------------------------------------------------------------------------------------
// IBS_OP_CTL (amd-ibs.h `union ibs_op_ctl`, perf_event.h IBS_OP_*, DEVICE.md §1)
// ---------------------------------------------------------------------------------------------

/// IBS_OP_CTL\[15:0\] IbsOpMaxCnt\[15:0\], period / 16 (perf_event.h `IBS_OP_MAX_CNT`).
pub const OP_MAX_CNT: u64 = bits(15, 0);
/// IBS_OP_CTL\[16\] IbsOpL3MissOnly, Zen 4 (perf_event.h `IBS_OP_L3MISSONLY`).
pub const OP_L3_MISS_ONLY: u64 = bit(16);
/// IBS_OP_CTL\[17\] IbsOpEn (perf_event.h `IBS_OP_ENABLE`).
pub const OP_EN: u64 = bit(17);
/// IBS_OP_CTL\[18\] IbsOpVal (perf_event.h `IBS_OP_VAL`).
pub const OP_VAL: u64 = bit(18);
/// IBS_OP_CTL\[19\] IbsOpCntCtl: 0 counts cycles, 1 counts dispatched ops
/// (perf_event.h `IBS_OP_CNT_CTL`).
pub const OP_CNT_CTL: u64 = bit(19);
/// IBS_OP_CTL\[26:20\] IbsOpMaxCnt\[22:16\], with caps OPCNTEXT
/// (perf_event.h `IBS_OP_MAX_CNT_EXT_MASK`).
pub const OP_MAX_CNT_EXT: u64 = bits(26, 20);
/// Shift of IbsOpMaxCnt\[22:16\] in the register.
pub const OP_MAX_CNT_EXT_SHIFT: u32 = 20;
// IBS_OP_CTL[31:27] reserved (amd-ibs.h `reserved0:5`).
/// IBS_OP_CTL\[51:32\] IbsOpCurCnt\[19:0\], with caps RDWROPCNT
/// (perf_event.h `IBS_OP_CUR_CNT | IBS_OP_CUR_CNT_RAND`).
pub const OP_CUR_CNT: u64 = bits(51, 32);
/// IBS_OP_CTL\[58:52\] IbsOpCurCnt\[26:20\], with caps RDWROPCNT and OPCNTEXT
/// (perf_event.h `IBS_OP_CUR_CNT_EXT_MASK`).
pub const OP_CUR_CNT_EXT: u64 = bits(58, 52);
/// IBS_OP_CTL\[38:32\] the low 7 bits of IbsOpCurCnt, random on real parts
/// (perf_event.h `IBS_OP_CUR_CNT_RAND`).
pub const OP_CUR_CNT_RAND: u64 = bits(38, 32);
/// Shift of IbsOpCurCnt.
pub const OP_CUR_CNT_SHIFT: u32 = 32;
// IBS_OP_CTL[63:59] load-latency filter, caps OPLDLAT (perf_event.h `IBS_OP_LDLAT_EN`,
// `IBS_OP_LDLAT_THRSH`): not modelled, so reserved here.

// ---------------------------------------------------------------------------------------------
// Op data registers (amd-ibs.h `union ibs_op_data`, `ibs_op_data2`, `ibs_op_data3`)
// ---------------------------------------------------------------------------------------------

/// IBS_OP_DATA\[31:0\] CompToRetCtr and TagToRetCtr
/// (amd-ibs.h `comp_to_ret_ctr`, `tag_to_ret_ctr`).
pub const OP_DATA_LATENCIES: u64 = bits(31, 0);
/// IBS_OP_DATA\[37:34\] Return, BrnTaken, BrnMisp, BrnRet (amd-ibs.h `op_return`..`op_brn_ret`).
pub const OP_DATA_BRANCH: u64 = bits(37, 34);
/// IBS_OP_DATA\[38\] IbsRipInvalid (perf_event.h `IBS_RIP_INVALID`).
pub const OP_DATA_RIP_INVALID: u64 = bit(38);
/// IBS_OP_DATA\[39\] IbsOpBrnFuse, with caps OPBRNFUSE (amd-ibs.h `op_brn_fuse`).
pub const OP_DATA_BRN_FUSE: u64 = bit(39);
/// IBS_OP_DATA\[40\] IbsOpMicrocode (amd-ibs.h `op_microcode`).
pub const OP_DATA_MICROCODE: u64 = bit(40);
// IBS_OP_DATA[33:32] and [63:41] reserved (amd-ibs.h `reserved1`, `reserved2`).

/// IBS_OP_DATA2 valid bits: \[2:0\] DataSrcLo, \[4\] RmtNode, \[5\] CacheHitSt, \[7:6\] DataSrcHi;
/// bit 3 and \[63:8\] reserved (amd-ibs.h `union ibs_op_data2`).
pub const OP_DATA2_VALID: u64 = bits(2, 0) | bits(7, 4);

/// IBS_OP_DATA3\[0\] IbsLdOp (amd-ibs.h `ld_op`).
pub const OP_DATA3_LD_OP: u64 = bit(0);
/// IBS_OP_DATA3\[1\] IbsStOp (amd-ibs.h `st_op`).
pub const OP_DATA3_ST_OP: u64 = bit(1);
/// IBS_OP_DATA3\[17\] IbsDcLinAddrValid (amd-ibs.h `dc_lin_addr_valid`).
pub const OP_DATA3_DC_LIN_ADDR_VALID: u64 = bit(17);
/// IBS_OP_DATA3\[18\] IbsDcPhyAddrValid (amd-ibs.h `dc_phy_addr_valid`): read-as-zero,
/// write-ignored.
pub const OP_DATA3_DC_PHY_ADDR_VALID: u64 = bit(18);
/// IBS_OP_DATA3 valid bits: all but \[12:9\] (amd-ibs.h `reserved:4`).
pub const OP_DATA3_VALID: u64 = !bits(12, 9);

/// IBS_FETCH_CTL_EXT\[15:0\] IbsItlbRefillLat; \[63:16\] reserved (amd-ibs.h `ic_ibs_extd_ctl`).
pub const FETCH_CTL_EXT_VALID: u64 = bits(15, 0);

// ---------------------------------------------------------------------------------------------
// IBS_CTL (perf_event.h `IBSCTL_LVT_OFFSET_*`, DEVICE.md §3)
// ---------------------------------------------------------------------------------------------

/// IBS_CTL\[8\] LvtOffsetVal (perf_event.h `IBSCTL_LVT_OFFSET_VALID`).
pub const IBS_CTL_LVT_OFFSET_VALID: u64 = bit(8);
/// IBS_CTL\[3:0\] LvtOffset (perf_event.h `IBSCTL_LVT_OFFSET_MASK`).
pub const IBS_CTL_LVT_OFFSET_MASK: u64 = bits(3, 0);
/// The extended LVT entry this device routes the IBS interrupt through
/// ([device model §5.1](crate::device_model): 0 is fine).
pub const IBS_LVT_OFFSET: usize = 0;

// ---------------------------------------------------------------------------------------------
// Extended APIC registers (AMD APM vol. 2 §16.4.5 "Extended Interrupts"; DEVICE.md §3, §5.2)
// ---------------------------------------------------------------------------------------------

/// EFEAT\[23:16\] XLC, the extended LVT count: 4 entries; IER, SEOI and 8-bit APIC-ID features
/// (\[2:0\]) are not offered ([device model §5.2](crate::device_model): EFEAT reads 0x00040000).
pub const EFEAT_VALUE: u32 = (EILVT_COUNT as u32) << 16;
/// ECTRL bits a guest may set. Bits \[2:0\] (IERN, SEOIEn, 8-bit ID) enable the features EFEAT
/// \[2:0\] offers; none is offered, so only 0 is a legal value (other bits are reserved).
pub const ECTRL_VALID: u32 = 0;

/// EILVT\[7:0\] vector (APM vol. 2 §16.4.5; Linux apic.c `setup_APIC_eilvt` builds
/// `(mask << 16) | (msg_type << 8) | vector`).
pub const EILVT_VECTOR: u32 = 0xFF;
/// EILVT\[10:8\] message type: 0 fixed, 2 SMI, 4 NMI, 7 ExtINT (APM vol. 2 §16.4.5).
pub const EILVT_MSG_TYPE: u32 = 0x700;
/// Shift of the message type.
pub const EILVT_MSG_TYPE_SHIFT: u32 = 8;
/// Message type 0: fixed interrupt with the entry's vector (apicdef.h `APIC_EILVT_MSG_FIX`).
pub const EILVT_MSG_FIXED: u32 = 0;
/// Message type 4: NMI (apicdef.h `APIC_EILVT_MSG_NMI`).
pub const EILVT_MSG_NMI: u32 = 4;
/// EILVT\[12\] delivery status, read-only: always reads 0 here (delivery is immediate) and writes
/// of it are ignored, as for every read-only LVT bit.
pub const EILVT_DELIVERY_STATUS: u32 = 1 << 12;
/// EILVT\[16\] mask (apicdef.h `APIC_EILVT_MASKED`).
pub const EILVT_MASKED: u32 = 1 << 16;
/// EILVT bits a write may set; everything else is reserved and a write of it is #GP.
pub const EILVT_WRITABLE: u32 = EILVT_VECTOR | EILVT_MSG_TYPE | EILVT_MASKED;
/// EILVT reset value: masked, vector 0, fixed ([device model §3](crate::device_model): Linux
/// requires the first read masked).
pub const EILVT_RESET: u32 = EILVT_MASKED;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_helpers() {
        assert_eq!(bits(15, 0), 0xFFFF);
        assert_eq!(bits(63, 0), u64::MAX);
        assert_eq!(bits(63, 63), 1 << 63);
        assert_eq!(OP_CUR_CNT | OP_CUR_CNT_EXT, 0x07FF_FFFF << 32);
        assert_eq!(OP_CUR_CNT_RAND, 0x7F << 32);
        assert_eq!(OP_MAX_CNT_EXT, 0x7F << 20);
        assert_eq!(EFEAT_VALUE, 0x0004_0000);
        assert_eq!(EILVT_RESET, 0x0001_0000);
        assert_eq!(OP_DATA2_VALID, 0xF7);
    }

    #[test]
    fn routing() {
        assert!(is_vpmu_msr(0xC001_1030) && is_vpmu_msr(0xC001_103F));
        assert!(!is_vpmu_msr(0xC001_102F) && !is_vpmu_msr(0xC001_1040));
        for m in [0x840, 0x841, 0x850, 0x851, 0x852, 0x853] {
            assert!(is_ext_apic_msr(m) && is_vpmu_msr(m));
        }
        for m in [0x83F, 0x842, 0x84F, 0x854] {
            assert!(!is_vpmu_msr(m));
        }
    }
}
