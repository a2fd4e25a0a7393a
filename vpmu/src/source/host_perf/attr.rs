//! `perf_event_attr` for a host IBS event, derived from the guest's CTL.
//!
//! Rules of Linux's IBS PMU (`arch/x86/events/amd/ibs.c`, `perf_ibs_init` and the PMU init):
//! - `config` may only hold the PMU's config bits: fetch RandEn\[57\] (always) and
//!   L3MissOnly\[59\] (host caps ZEN4); op CntCtl\[19\] (host caps OPCNT) and L3MissOnly\[16\]
//!   (host caps ZEN4). MaxCnt must *not* be in `config` when `sample_period` is set.
//! - `sample_period` must have its low 4 bits clear (the hardware counts in units of 16).
//! - `exclude_host`, `exclude_guest`, `exclude_idle` → EINVAL; `exclude_user/kernel/hv`
//!   → EINVAL unless the software filter (`config2` bit 0) is requested. So none is set and
//!   guest-mode samples are told apart by the record's cpumode instead (see `ring`).
//!
//! A guest bit is passed on only if both the guest's advertised caps and the host's caps have
//! it; one that cannot be honoured is reported in [`IbsEventConfig::dropped`] (the host then
//! samples without that filter/mode; the guest still sees its CTL as written).
//!
//! The period is MaxCnt × 16 (op MaxCnt with its OPCNTEXT bits \[26:20\] when the guest
//! advertises OPCNTEXT), clamped to Linux's own minimums (fetch 0x10, op 0x90,
//! [device model §1](crate::device_model)) and to the host's maximum (MaxCnt's width on the
//! host: 16 bits, or 23 for op with host OPCNTEXT).
//! The guest's CurCnt start value cannot be given to perf and is ignored. Only the period
//! changes between armings with the same config ([`IbsEventConfig::same_event`]): that is a
//! PERIOD ioctl, not a reopen.

use crate::caps::Caps;
use crate::msr::{
    FETCH_L3_MISS_ONLY, FETCH_MAX_CNT, FETCH_RAND_EN, OP_CNT_CTL, OP_L3_MISS_ONLY, OP_MAX_CNT,
    OP_MAX_CNT_EXT, OP_MAX_CNT_EXT_SHIFT,
};
use crate::unit::UnitKind;

/// `PERF_ATTR_SIZE_VER7` (Linux `include/uapi/linux/perf_event.h`): the struct below.
pub const PERF_ATTR_SIZE_VER7: u32 = 128;

/// `PERF_TYPE_SOFTWARE`.
pub const PERF_TYPE_SOFTWARE: u32 = 1;
/// `PERF_COUNT_SW_CPU_CLOCK` (config of a software event).
pub const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;

/// `PERF_SAMPLE_IP`.
pub const PERF_SAMPLE_IP: u64 = 1 << 0;
/// `PERF_SAMPLE_TID`.
pub const PERF_SAMPLE_TID: u64 = 1 << 1;
/// `PERF_SAMPLE_TIME`.
pub const PERF_SAMPLE_TIME: u64 = 1 << 2;
/// `PERF_SAMPLE_ID`.
pub const PERF_SAMPLE_ID: u64 = 1 << 6;
/// `PERF_SAMPLE_CPU`.
pub const PERF_SAMPLE_CPU: u64 = 1 << 7;
/// `PERF_SAMPLE_PERIOD`.
pub const PERF_SAMPLE_PERIOD: u64 = 1 << 8;
/// `PERF_SAMPLE_RAW`.
pub const PERF_SAMPLE_RAW: u64 = 1 << 10;

/// The sample fields a host IBS event asks for.
pub const IBS_SAMPLE_TYPE: u64 =
    PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_RAW;

/// `perf_event_attr` flag bit `disabled`.
pub const ATTR_DISABLED: u64 = 1 << 0;
/// `exclude_user`.
pub const ATTR_EXCLUDE_USER: u64 = 1 << 4;
/// `exclude_kernel`.
pub const ATTR_EXCLUDE_KERNEL: u64 = 1 << 5;
/// `exclude_hv`.
pub const ATTR_EXCLUDE_HV: u64 = 1 << 6;
/// `exclude_idle`.
pub const ATTR_EXCLUDE_IDLE: u64 = 1 << 7;
/// `exclude_host`.
pub const ATTR_EXCLUDE_HOST: u64 = 1 << 19;
/// `exclude_guest`.
pub const ATTR_EXCLUDE_GUEST: u64 = 1 << 20;
/// Every `exclude_*` flag the IBS PMU refuses.
pub const ATTR_EXCLUDE_ANY: u64 = ATTR_EXCLUDE_USER
    | ATTR_EXCLUDE_KERNEL
    | ATTR_EXCLUDE_HV
    | ATTR_EXCLUDE_IDLE
    | ATTR_EXCLUDE_HOST
    | ATTR_EXCLUDE_GUEST;

/// Linux's minimum fetch period ([device model §1](crate::device_model)).
pub const MIN_FETCH_PERIOD: u64 = 0x10;
/// Linux's minimum op period ([device model §1](crate::device_model)).
pub const MIN_OP_PERIOD: u64 = 0x90;

/// `struct perf_event_attr` up to `sig_data` (`PERF_ATTR_SIZE_VER7`, 128 bytes). The kernel
/// accepts any published size; later fields read as zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerfEventAttr {
    /// PMU type (`PERF_TYPE_*` or a dynamic PMU's sysfs `type`).
    pub type_: u32,
    /// Size of this struct: [`PERF_ATTR_SIZE_VER7`].
    pub size: u32,
    /// PMU-specific configuration.
    pub config: u64,
    /// `sample_period` (or `sample_freq` with the `freq` flag).
    pub sample_period: u64,
    /// `PERF_SAMPLE_*` bits.
    pub sample_type: u64,
    /// `PERF_FORMAT_*` bits.
    pub read_format: u64,
    /// The bitfield word: `disabled`, `inherit`, …, `exclude_*` ([`ATTR_DISABLED`] etc.).
    pub flags: u64,
    /// `wakeup_events` (or `wakeup_watermark`).
    pub wakeup_events: u32,
    /// `bp_type`.
    pub bp_type: u32,
    /// `config1` / `bp_addr`.
    pub config1: u64,
    /// `config2` / `bp_len`.
    pub config2: u64,
    /// `branch_sample_type`.
    pub branch_sample_type: u64,
    /// `sample_regs_user`.
    pub sample_regs_user: u64,
    /// `sample_stack_user`.
    pub sample_stack_user: u32,
    /// `clockid`.
    pub clockid: i32,
    /// `sample_regs_intr`.
    pub sample_regs_intr: u64,
    /// `aux_watermark`.
    pub aux_watermark: u32,
    /// `sample_max_stack`.
    pub sample_max_stack: u16,
    /// `__reserved_2`.
    pub reserved_2: u16,
    /// `aux_sample_size`.
    pub aux_sample_size: u32,
    /// `__reserved_3`.
    pub reserved_3: u32,
    /// `sig_data`.
    pub sig_data: u64,
}

impl PerfEventAttr {
    /// A zeroed attribute with `size` filled in.
    pub fn new(type_: u32, config: u64) -> PerfEventAttr {
        PerfEventAttr {
            type_,
            size: PERF_ATTR_SIZE_VER7,
            config,
            ..PerfEventAttr::default()
        }
    }
}

/// What a host IBS event for one arming looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IbsEventConfig {
    /// The unit.
    pub unit: UnitKind,
    /// The IBS PMU `config` (RandEn / CntCtl / L3MissOnly only).
    pub config: u64,
    /// `sample_period`: a multiple of 16.
    pub period: u64,
    /// Guest CTL config bits that were set but could not be honoured on this host.
    pub dropped: u64,
}

fn period_bounds(unit: UnitKind, host_caps: u32) -> (u64, u64) {
    match unit {
        UnitKind::Fetch => (MIN_FETCH_PERIOD, FETCH_MAX_CNT << 4),
        UnitKind::Op if host_caps & Caps::OPCNTEXT != 0 => {
            (MIN_OP_PERIOD, (OP_MAX_CNT | (OP_MAX_CNT_EXT >> 4)) << 4)
        }
        UnitKind::Op => (MIN_OP_PERIOD, OP_MAX_CNT << 4),
    }
}

impl IbsEventConfig {
    /// The event for the guest's `ctl` of `unit`, given the caps the guest sees and the
    /// host's caps word.
    pub fn from_guest(unit: UnitKind, ctl: u64, guest: Caps, host_caps: u32) -> IbsEventConfig {
        let both = |bit: u32| guest.has(bit) && host_caps & bit != 0;
        let (wanted, allowed, max_cnt) = match unit {
            UnitKind::Fetch => {
                let mut allowed = FETCH_RAND_EN;
                if both(Caps::ZEN4) {
                    allowed |= FETCH_L3_MISS_ONLY;
                }
                (
                    ctl & (FETCH_RAND_EN | FETCH_L3_MISS_ONLY),
                    allowed,
                    ctl & FETCH_MAX_CNT,
                )
            }
            UnitKind::Op => {
                let mut allowed = 0;
                if both(Caps::OPCNT) {
                    allowed |= OP_CNT_CTL;
                }
                if both(Caps::ZEN4) {
                    allowed |= OP_L3_MISS_ONLY;
                }
                let mut max_cnt = ctl & OP_MAX_CNT;
                if guest.has(Caps::OPCNTEXT) {
                    max_cnt |= ((ctl & OP_MAX_CNT_EXT) >> OP_MAX_CNT_EXT_SHIFT) << 16;
                }
                (ctl & (OP_CNT_CTL | OP_L3_MISS_ONLY), allowed, max_cnt)
            }
        };
        let (min, max) = period_bounds(unit, host_caps);
        IbsEventConfig {
            unit,
            config: wanted & allowed,
            period: (max_cnt << 4).clamp(min, max),
            dropped: wanted & !allowed,
        }
    }

    /// True when `other` is the same perf event up to its period, so switching between them
    /// is a PERIOD ioctl rather than a new `perf_event_open`.
    pub fn same_event(&self, other: &IbsEventConfig) -> bool {
        self.unit == other.unit && self.config == other.config
    }

    /// The attribute for the IBS PMU of type `pmu_type` (from sysfs): created disabled,
    /// sampling IP, TID, TIME and RAW, one wakeup per sample, no `exclude_*` bit.
    pub fn attr(&self, pmu_type: u32) -> PerfEventAttr {
        PerfEventAttr {
            sample_period: self.period,
            sample_type: IBS_SAMPLE_TYPE,
            flags: ATTR_DISABLED,
            wakeup_events: 1,
            ..PerfEventAttr::new(pmu_type, self.config)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn attr_layout_is_ver7() {
        assert_eq!(size_of::<PerfEventAttr>(), PERF_ATTR_SIZE_VER7 as usize);
        assert_eq!(offset_of!(PerfEventAttr, config), 8);
        assert_eq!(offset_of!(PerfEventAttr, sample_period), 16);
        assert_eq!(offset_of!(PerfEventAttr, sample_type), 24);
        assert_eq!(offset_of!(PerfEventAttr, flags), 40);
        assert_eq!(offset_of!(PerfEventAttr, wakeup_events), 48);
        assert_eq!(offset_of!(PerfEventAttr, config1), 56);
        assert_eq!(offset_of!(PerfEventAttr, config2), 64); // end of VER0 (64)
        assert_eq!(offset_of!(PerfEventAttr, branch_sample_type), 72); // VER1 72
        assert_eq!(offset_of!(PerfEventAttr, sample_regs_user), 80); // VER2 80
        assert_eq!(offset_of!(PerfEventAttr, clockid), 92);
        assert_eq!(offset_of!(PerfEventAttr, sample_regs_intr), 96); // VER3 96
        assert_eq!(offset_of!(PerfEventAttr, aux_watermark), 104); // VER4 104
        assert_eq!(offset_of!(PerfEventAttr, aux_sample_size), 112); // VER5 112
        assert_eq!(offset_of!(PerfEventAttr, sig_data), 120); // VER6 120
        assert_eq!(PerfEventAttr::new(1, 0).size, 128);
    }

    const ZEN3: u32 = 0x3FF;
    const ZEN4: u32 = 0xBFF;
    const OLD: u32 = 0x1F;
    const NO_OPCNT: u32 = 0x7;

    fn caps(raw: u32) -> Caps {
        Caps::new(raw).unwrap()
    }

    #[test]
    fn fetch_ctl_combinations() {
        for guest in [OLD, ZEN3, ZEN4] {
            for host in [NO_OPCNT, OLD, ZEN3, ZEN4] {
                for rand in [false, true] {
                    for l3 in [false, true] {
                        let ctl = 0x1000
                            | if rand { FETCH_RAND_EN } else { 0 }
                            | if l3 { FETCH_L3_MISS_ONLY } else { 0 };
                        let c = IbsEventConfig::from_guest(UnitKind::Fetch, ctl, caps(guest), host);
                        let l3_ok = l3 && guest & Caps::ZEN4 != 0 && host & Caps::ZEN4 != 0;
                        let want = if rand { FETCH_RAND_EN } else { 0 }
                            | if l3_ok { FETCH_L3_MISS_ONLY } else { 0 };
                        assert_eq!(c.config, want, "guest {guest:#x} host {host:#x} {ctl:#x}");
                        assert_eq!(c.dropped, if l3 && !l3_ok { FETCH_L3_MISS_ONLY } else { 0 });
                        assert_eq!(c.period, 0x10000);
                        let a = c.attr(11);
                        assert_eq!((a.type_, a.config, a.sample_period), (11, want, 0x10000));
                        assert_eq!(a.config & FETCH_MAX_CNT, 0, "MaxCnt never in config");
                    }
                }
            }
        }
    }

    #[test]
    fn op_ctl_combinations() {
        for guest in [OLD, ZEN3, ZEN4] {
            for host in [NO_OPCNT, OLD, ZEN3, ZEN4] {
                for cnt in [false, true] {
                    for l3 in [false, true] {
                        let ctl = 0x0100
                            | if cnt { OP_CNT_CTL } else { 0 }
                            | if l3 { OP_L3_MISS_ONLY } else { 0 };
                        let c = IbsEventConfig::from_guest(UnitKind::Op, ctl, caps(guest), host);
                        let both = |b: u32| guest & b != 0 && host & b != 0;
                        let want = if cnt && both(Caps::OPCNT) {
                            OP_CNT_CTL
                        } else {
                            0
                        } | if l3 && both(Caps::ZEN4) {
                            OP_L3_MISS_ONLY
                        } else {
                            0
                        };
                        assert_eq!(c.config, want, "guest {guest:#x} host {host:#x} {ctl:#x}");
                        assert_eq!(c.dropped, (ctl & (OP_CNT_CTL | OP_L3_MISS_ONLY)) & !want);
                        assert_eq!(c.period, 0x1000);
                        assert_eq!(c.attr(12).config & OP_MAX_CNT, 0);
                    }
                }
            }
        }
    }

    #[test]
    fn op_periods_with_opcntext() {
        let ctl = (0x05 << OP_MAX_CNT_EXT_SHIFT) | 0x0010;
        // Guest and host have OPCNTEXT: MaxCnt = 0x5_0010.
        let c = IbsEventConfig::from_guest(UnitKind::Op, ctl, caps(ZEN3), ZEN3);
        assert_eq!(c.period, 0x5_0010 << 4);
        // Host without OPCNTEXT: clamped to its 16-bit MaxCnt.
        let c = IbsEventConfig::from_guest(UnitKind::Op, ctl, caps(ZEN3), OLD);
        assert_eq!(c.period, 0xFFFF0);
        // Guest without OPCNTEXT never has the bits (the device #GPs them); ignored anyway.
        let c = IbsEventConfig::from_guest(UnitKind::Op, ctl, caps(OLD), ZEN3);
        assert_eq!(c.period, 0x100);
        // Largest op period.
        let max = OP_MAX_CNT | OP_MAX_CNT_EXT;
        let c = IbsEventConfig::from_guest(UnitKind::Op, max, caps(ZEN4), ZEN4);
        assert_eq!(c.period, 0x7F_FFFF << 4);
    }

    #[test]
    fn periods_clamped_to_linux_minimums_and_multiple_of_16() {
        for max_cnt in [0u64, 1, 8, 9, 10, 0xFFFF] {
            let f = IbsEventConfig::from_guest(UnitKind::Fetch, max_cnt, caps(ZEN3), ZEN3);
            let o = IbsEventConfig::from_guest(UnitKind::Op, max_cnt, caps(ZEN3), ZEN3);
            assert_eq!(f.period, (max_cnt << 4).max(0x10));
            assert_eq!(o.period, (max_cnt << 4).max(0x90));
            assert_eq!((f.period & 0xF, o.period & 0xF), (0, 0));
        }
    }

    #[test]
    fn attr_flags_and_sample_type() {
        let c = IbsEventConfig::from_guest(UnitKind::Op, 0x1000 | OP_CNT_CTL, caps(ZEN3), ZEN3);
        let a = c.attr(9);
        assert_eq!(a.flags, ATTR_DISABLED);
        assert_eq!(
            a.flags & ATTR_EXCLUDE_ANY,
            0,
            "the IBS PMU refuses exclude_*"
        );
        assert_eq!(a.sample_type, IBS_SAMPLE_TYPE);
        assert_ne!(a.sample_type & PERF_SAMPLE_RAW, 0);
        assert_eq!((a.config1, a.config2, a.branch_sample_type), (0, 0, 0));
        assert_eq!(a.size, PERF_ATTR_SIZE_VER7);
    }

    #[test]
    fn same_event_ignores_the_period_only() {
        let g = caps(ZEN3);
        let a = IbsEventConfig::from_guest(UnitKind::Op, 0x1000, g, ZEN3);
        let b = IbsEventConfig::from_guest(UnitKind::Op, 0x2000, g, ZEN3);
        let c = IbsEventConfig::from_guest(UnitKind::Op, 0x1000 | OP_CNT_CTL, g, ZEN3);
        let f = IbsEventConfig::from_guest(UnitKind::Fetch, 0x1000, g, ZEN3);
        assert!(a.same_event(&b) && a.period != b.period);
        assert!(!a.same_event(&c) && !a.same_event(&f));
    }
}
