//! Linux's two AMD IBS PMUs as a program sees them: their sysfs entries, the event
//! attr the checks open them with, and the raw sample payloads
//! (arch/x86/events/amd/ibs.c `perf_ibs_handle_irq`).

use std::fmt::Write as _;

use crate::perf::{
    PerfEventAttr, ATTR_FLAG_DISABLED, PERF_ATTR_SIZE_VER7, PERF_SAMPLE_IP, PERF_SAMPLE_RAW,
    PERF_SAMPLE_TID,
};
use crate::ring::{u32_at, u64_at};

/// Where the kernel lists its PMUs.
pub const SYSFS_PMUS: &str = "/sys/bus/event_source/devices";

// ---- IBS capability bits, CPUID Fn8000_001B EAX (arch/x86/include/asm/perf_event.h) ----

/// IBS_CAPS_BRNTRGT.
pub const CAPS_BRNTRGT: u32 = 1 << 5;
/// IBS_CAPS_OPCNTEXT.
pub const CAPS_OPCNTEXT: u32 = 1 << 6;
/// IBS_CAPS_RIPINVALIDCHK.
pub const CAPS_RIPINVALIDCHK: u32 = 1 << 7;
/// IBS_CAPS_FETCHCTLEXTD.
pub const CAPS_FETCHCTLEXTD: u32 = 1 << 9;
/// IBS_CAPS_OPDATA4.
pub const CAPS_OPDATA4: u32 = 1 << 10;

// ---- register bits (arch/x86/include/asm/perf_event.h; amd-ibs.h for the unions) ----

/// IBS_OP_MAX_CNT.
pub const OP_MAX_CNT: u64 = 0xffff;
/// IBS_OP_MAX_CNT_EXT_MASK.
pub const OP_MAX_CNT_EXT: u64 = 0x7f << 20;
/// IBS_OP_ENABLE.
pub const OP_EN: u64 = 1 << 17;
/// IBS_OP_VAL.
pub const OP_VAL: u64 = 1 << 18;
/// IBS_RIP_INVALID (IBS_OP_DATA).
pub const OP_DATA_RIP_INVALID: u64 = 1 << 38;
/// `union ibs_op_data3`: dc_phy_addr_valid.
pub const OP_DATA3_DC_PHY_ADDR_VALID: u64 = 1 << 18;
/// IBS_FETCH_MAX_CNT.
pub const FETCH_MAX_CNT: u64 = 0xffff;
/// IBS_FETCH_ENABLE.
pub const FETCH_EN: u64 = 1 << 48;
/// IBS_FETCH_VAL.
pub const FETCH_VAL: u64 = 1 << 49;
/// `union ibs_fetch_ctl`: phy_addr_valid.
pub const FETCH_PHY_ADDR_VALID: u64 = 1 << 52;

/// The smallest `sample_period` Linux 6.1's `perf_ibs_init` takes for either unit: the
/// low 4 bits must be 0 (they are not part of MaxCnt), and 0 is refused.
pub const MIN_PERIOD_6_1: u64 = 0x10;

/// The perf type number of PMU `pmu` (`ibs_op`, `ibs_fetch`).
pub fn pmu_type(pmu: &str) -> Result<u32, String> {
    let dir = format!("{SYSFS_PMUS}/{pmu}");
    if std::fs::metadata(&dir).is_err() {
        return Err(format!("{dir} missing"));
    }
    let path = format!("{dir}/type");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{path}: not a number: {:?}", text.trim()))
}

/// `format: a=config:19, ...; caps: b=1` for one PMU (informational).
pub fn pmu_attributes(pmu: &str) -> String {
    let mut out = String::new();
    for sub in ["format", "caps"] {
        let dir = format!("{SYSFS_PMUS}/{pmu}/{sub}");
        let mut items = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let val = std::fs::read_to_string(e.path())
                        .map(|v| v.trim().to_string())
                        .unwrap_or_else(|e| format!("<{e}>"));
                    items.push(format!("{name}={val}"));
                }
            }
            Err(_) => items.push("(absent)".into()),
        }
        items.sort();
        if items.is_empty() {
            items.push("(none)".into());
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        let _ = write!(out, "{sub}: {}", items.join(", "));
    }
    out
}

/// An IBS event of PMU type `pmu_type` with a fixed `period`, sampling IP, TID and the
/// raw registers, opened disabled.
pub fn attr(pmu_type: u32, period: u64) -> PerfEventAttr {
    PerfEventAttr {
        type_: pmu_type,
        size: PERF_ATTR_SIZE_VER7,
        // Op: cycles mode (CntCtl = 0); fetch: no RandEn. MaxCnt comes from the period.
        config: 0,
        sample_period: period,
        sample_type: PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_RAW,
        // disabled only: Linux 6.1 IBS sets PERF_PMU_CAP_NO_EXCLUDE, so any exclude_*
        // bit is EINVAL; freq = 0 (a fixed period).
        flags: ATTR_FLAG_DISABLED,
        ..Default::default()
    }
}

/// The raw payload of an ibs_op sample (Linux perf_ibs_handle_irq): u32 ibs_caps,
/// then IBS_OP_CTL, OP_RIP, OP_DATA, OP_DATA2, OP_DATA3, DC_LINADDR, DC_PHYSADDR
/// [, BR_TARGET if caps BRNTRGT] [, OP_DATA4 if caps OPDATA4].
#[derive(Clone, Debug, PartialEq)]
pub struct OpRaw {
    pub caps: u32,
    pub ctl: u64,
    pub rip: u64,
    pub data: u64,
    pub data2: u64,
    pub data3: u64,
    pub dc_linaddr: u64,
    pub dc_physaddr: u64,
    pub br_target: Option<u64>,
    pub op_data4: Option<u64>,
}

/// The raw payload of an ibs_fetch sample: u32 ibs_caps, then IBS_FETCH_CTL,
/// FETCH_LINADDR, FETCH_PHYSADDR [, FETCH_CTL_EXT if caps FETCHCTLEXTD].
#[derive(Clone, Debug, PartialEq)]
pub struct FetchRaw {
    pub caps: u32,
    pub ctl: u64,
    pub linaddr: u64,
    pub physaddr: u64,
    pub ctl_ext: Option<u64>,
}

/// The caps word a raw payload starts with.
pub fn raw_caps(raw: &[u8]) -> Option<u32> {
    (raw.len() >= 4).then(|| u32_at(raw, 0))
}

/// Checks the raw size for `regs` registers after the caps word and returns them.
/// The kernel's raw size is exactly 4 + 8 * regs (the record is then 8-aligned).
fn raw_regs(raw: &[u8], regs: usize, caps: u32) -> Result<Vec<u64>, String> {
    let want = 4 + 8 * regs;
    if raw.len() != want {
        return Err(format!(
            "raw size {} bytes, want {want} (caps {caps:#x}: u32 + {regs} registers)",
            raw.len()
        ));
    }
    Ok((0..regs).map(|i| u64_at(raw, 4 + 8 * i)).collect())
}

/// Decodes an ibs_op raw payload.
pub fn decode_op_raw(raw: &[u8]) -> Result<OpRaw, String> {
    let caps = raw_caps(raw).ok_or_else(|| format!("raw size {} < 4", raw.len()))?;
    let br = caps & CAPS_BRNTRGT != 0;
    let d4 = caps & CAPS_OPDATA4 != 0;
    let r = raw_regs(raw, 7 + br as usize + d4 as usize, caps)?;
    Ok(OpRaw {
        caps,
        ctl: r[0],
        rip: r[1],
        data: r[2],
        data2: r[3],
        data3: r[4],
        dc_linaddr: r[5],
        dc_physaddr: r[6],
        br_target: br.then(|| r[7]),
        op_data4: d4.then(|| r[7 + br as usize]),
    })
}

/// Decodes an ibs_fetch raw payload.
pub fn decode_fetch_raw(raw: &[u8]) -> Result<FetchRaw, String> {
    let caps = raw_caps(raw).ok_or_else(|| format!("raw size {} < 4", raw.len()))?;
    let ext = caps & CAPS_FETCHCTLEXTD != 0;
    let r = raw_regs(raw, 3 + ext as usize, caps)?;
    Ok(FetchRaw {
        caps,
        ctl: r[0],
        linaddr: r[1],
        physaddr: r[2],
        ctl_ext: ext.then(|| r[3]),
    })
}

/// IBS_OP_CTL's MaxCnt, with the extension bits if caps has OPCNTEXT.
pub fn op_max_cnt(o: &OpRaw) -> u64 {
    let mut m = o.ctl & OP_MAX_CNT;
    if o.caps & CAPS_OPCNTEXT != 0 {
        m |= ((o.ctl & OP_MAX_CNT_EXT) >> 20) << 16;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{raw_payload, OP_REGS_7};

    #[test]
    fn op_raw_layouts() {
        // caps 0x1f: no BR_TARGET, no OPDATA4: 7 registers.
        let o = decode_op_raw(&raw_payload(0x1f, &OP_REGS_7)).unwrap();
        assert_eq!(o.caps, 0x1f);
        assert_eq!(o.rip, 0x5555_0000_1234);
        assert_eq!((o.br_target, o.op_data4), (None, None));
        // caps 0x3ff: BR_TARGET (bit 5): 8 registers, the 8th is BR_TARGET.
        let mut regs = OP_REGS_7.to_vec();
        regs.push(0xbeef);
        let o = decode_op_raw(&raw_payload(0x3ff, &regs)).unwrap();
        assert_eq!((o.br_target, o.op_data4), (Some(0xbeef), None));
        // caps with OPDATA4 only and with both.
        let o = decode_op_raw(&raw_payload(0x41f, &regs)).unwrap();
        assert_eq!((o.br_target, o.op_data4), (None, Some(0xbeef)));
        regs.push(0xd4);
        let o = decode_op_raw(&raw_payload(0x7ff, &regs)).unwrap();
        assert_eq!((o.br_target, o.op_data4), (Some(0xbeef), Some(0xd4)));
        // Size must match the caps: 8 registers with caps 0x1f, 7 with 0x3ff.
        let e = decode_op_raw(&raw_payload(0x1f, &regs[..8])).unwrap_err();
        assert!(e.contains("raw size 68 bytes, want 60"), "{e}");
        let e = decode_op_raw(&raw_payload(0x3ff, &OP_REGS_7)).unwrap_err();
        assert!(e.contains("want 68"), "{e}");
        assert!(decode_op_raw(&[1, 2]).is_err());
    }

    #[test]
    fn op_max_count_extension() {
        let mut o = decode_op_raw(&raw_payload(0x1f, &OP_REGS_7)).unwrap();
        assert_eq!(op_max_cnt(&o), 0x1000);
        o.ctl = (o.ctl & !OP_MAX_CNT) | (1 << 20);
        assert_eq!(op_max_cnt(&o), 0, "extension bits ignored without OPCNTEXT");
        o.caps |= CAPS_OPCNTEXT;
        assert_eq!(op_max_cnt(&o), 0x10000);
    }

    #[test]
    fn fetch_raw_layouts() {
        let ctl = FETCH_EN | FETCH_VAL | 0x100;
        let f = decode_fetch_raw(&raw_payload(0x1f, &[ctl, 0x401000, 0])).unwrap();
        assert_eq!(
            (f.ctl, f.linaddr, f.physaddr, f.ctl_ext),
            (ctl, 0x401000, 0, None)
        );
        let f = decode_fetch_raw(&raw_payload(0x3ff, &[ctl, 0x401000, 0, 0x77])).unwrap();
        assert_eq!(f.ctl_ext, Some(0x77));
        assert!(decode_fetch_raw(&raw_payload(0x3ff, &[ctl, 0x401000, 0])).is_err());
    }

    #[test]
    fn attr_is_disabled_without_exclude_bits() {
        let a = attr(11, 0x10000);
        assert_eq!((a.type_, a.size, a.sample_period), (11, 128, 0x10000));
        assert_eq!(a.flags, 1, "disabled only, no exclude_* bits");
        assert_eq!(a.sample_type, 0b100_0000_0011, "IP | TID | RAW");
    }
}
