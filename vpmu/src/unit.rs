//! The two IBS sampling units (fetch and op), one generic implementation.
//!
//! A unit is a CTL register (MaxCnt, En, Val and status bits) plus data registers. The
//! per-unit differences — bit positions, which bits a write may set for the advertised caps,
//! which data MSRs exist — are tables on [`UnitKind`]; the behaviour belongs to the private
//! `Unit` alone.

use std::fmt;

use crate::caps::Caps;
use crate::msr::*;
use crate::source::{Epoch, Sample};
use crate::stats::DropReason;

/// Which sampling unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum UnitKind {
    /// Instruction fetch sampling (IBS_FETCH_CTL 0xC0011030).
    Fetch,
    /// Op (micro-op) sampling (IBS_OP_CTL 0xC0011033).
    Op,
}

/// Largest number of data registers of a unit (the op unit's seven).
pub const DATA_REGS: usize = 7;

/// Fetch data registers in slot order ([device model §1](crate::device_model)).
const FETCH_DATA: &[u32] = &[IBS_FETCH_LINADDR, IBS_FETCH_PHYSADDR, IBS_FETCH_CTL_EXT];
/// Op data registers in slot order ([device model §1](crate::device_model)).
const OP_DATA: &[u32] = &[
    IBS_OP_RIP,
    IBS_OP_DATA,
    IBS_OP_DATA2,
    IBS_OP_DATA3,
    IBS_DC_LINADDR,
    IBS_DC_PHYSADDR,
    IBS_BR_TARGET,
];

/// Where a data MSR lives and which bits a write may set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DataReg {
    pub(crate) unit: UnitKind,
    pub(crate) slot: usize,
    /// Bits a write may set without #GP.
    pub(crate) writable: u64,
    /// Writable bits that are ignored and read as zero (physical addresses and their valid
    /// bits, [device model §5.4](crate::device_model)).
    pub(crate) ignored: u64,
}

impl UnitKind {
    /// Both units, fetch first.
    pub const ALL: [UnitKind; 2] = [UnitKind::Fetch, UnitKind::Op];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The unit's CTL MSR.
    pub fn ctl_msr(self) -> u32 {
        match self {
            UnitKind::Fetch => IBS_FETCH_CTL,
            UnitKind::Op => IBS_OP_CTL,
        }
    }

    /// The unit's data MSRs in the slot order of [`crate::UnitState::data`] (whether or not
    /// the advertised caps make them exist).
    pub fn data_msrs(self) -> &'static [u32] {
        match self {
            UnitKind::Fetch => FETCH_DATA,
            UnitKind::Op => OP_DATA,
        }
    }

    /// CTL En bit.
    pub(crate) fn en(self) -> u64 {
        match self {
            UnitKind::Fetch => FETCH_EN,
            UnitKind::Op => OP_EN,
        }
    }

    /// CTL Val bit.
    pub(crate) fn val(self) -> u64 {
        match self {
            UnitKind::Fetch => FETCH_VAL,
            UnitKind::Op => OP_VAL,
        }
    }

    /// CTL bits that configure sampling and survive a latch unchanged.
    fn config_bits(self) -> u64 {
        match self {
            UnitKind::Fetch => FETCH_MAX_CNT | FETCH_RAND_EN | FETCH_L3_MISS_ONLY | FETCH_EN,
            UnitKind::Op => OP_MAX_CNT | OP_L3_MISS_ONLY | OP_EN | OP_CNT_CTL | OP_MAX_CNT_EXT,
        }
    }

    /// CTL status bits a latched sample may set for `caps`.
    fn status_bits(self, caps: Caps) -> u64 {
        match self {
            UnitKind::Fetch => {
                let zen4 = if caps.has(Caps::ZEN4) {
                    FETCH_ZEN4_STATUS
                } else {
                    0
                };
                FETCH_LAT | FETCH_COMP | FETCH_IC_MISS | FETCH_TLB_INFO | FETCH_L2_MISS | zen4
            }
            UnitKind::Op if caps.has(Caps::RDWROPCNT) => OP_CUR_CNT_RAND,
            UnitKind::Op => 0,
        }
    }

    /// CTL bits a guest write may set for `caps`; any other bit is reserved (#GP).
    pub(crate) fn ctl_writable(self, caps: Caps) -> u64 {
        let when = |cap: u32, bits: u64| if caps.has(cap) { bits } else { 0 };
        match self {
            UnitKind::Fetch => {
                FETCH_MAX_CNT
                    | FETCH_CNT
                    | FETCH_EN
                    | FETCH_VAL
                    | FETCH_PHY_ADDR_VALID
                    | FETCH_RAND_EN
                    | self.status_bits(caps)
                    | when(Caps::ZEN4, FETCH_L3_MISS_ONLY)
            }
            UnitKind::Op => {
                OP_MAX_CNT
                    | OP_EN
                    | OP_VAL
                    | when(Caps::ZEN4, OP_L3_MISS_ONLY)
                    | when(Caps::OPCNT, OP_CNT_CTL)
                    | when(Caps::OPCNTEXT, OP_MAX_CNT_EXT)
                    | when(Caps::RDWROPCNT, OP_CUR_CNT)
                    | when(Caps::RDWROPCNT | Caps::OPCNTEXT, OP_CUR_CNT_EXT)
            }
        }
    }

    /// CTL bits a write may set but that are ignored and read as zero.
    pub(crate) fn ctl_ignored(self) -> u64 {
        match self {
            UnitKind::Fetch => FETCH_PHY_ADDR_VALID,
            UnitKind::Op => 0,
        }
    }

    /// The sampling period MaxCnt × 16 programmed in `ctl`
    /// ([device model §1](crate::device_model)).
    pub(crate) fn max_count(self, ctl: u64, caps: Caps) -> u64 {
        let max_cnt = match self {
            UnitKind::Fetch => ctl & FETCH_MAX_CNT,
            UnitKind::Op if caps.has(Caps::OPCNTEXT) => {
                (ctl & OP_MAX_CNT) | ((ctl & OP_MAX_CNT_EXT) >> OP_MAX_CNT_EXT_SHIFT << 16)
            }
            UnitKind::Op => ctl & OP_MAX_CNT,
        };
        max_cnt << 4
    }

    /// The counter's start value: IbsOpCurCnt as written (op with RDWROPCNT), else 0.
    pub(crate) fn start_count(self, ctl: u64) -> u64 {
        match self {
            UnitKind::Fetch => 0,
            UnitKind::Op => (ctl & (OP_CUR_CNT | OP_CUR_CNT_EXT)) >> OP_CUR_CNT_SHIFT,
        }
    }

    /// The data register at MSR `index` if it belongs to this device and exists for `caps`.
    pub(crate) fn data_reg(index: u32, caps: Caps) -> Option<DataReg> {
        let (unit, slot) = UnitKind::ALL.iter().find_map(|&unit| {
            let slot = unit.data_msrs().iter().position(|&m| m == index)?;
            Some((unit, slot))
        })?;
        let (writable, ignored) = match index {
            IBS_FETCH_LINADDR | IBS_OP_RIP | IBS_DC_LINADDR => (u64::MAX, 0),
            IBS_BR_TARGET if caps.has(Caps::BRNTRGT) => (u64::MAX, 0),
            IBS_FETCH_CTL_EXT if caps.has(Caps::FETCHCTLEXTD) => (FETCH_CTL_EXT_VALID, 0),
            IBS_FETCH_PHYSADDR | IBS_DC_PHYSADDR => (u64::MAX, u64::MAX),
            IBS_OP_DATA => {
                let fuse = if caps.has(Caps::OPBRNFUSE) {
                    OP_DATA_BRN_FUSE
                } else {
                    0
                };
                let valid = OP_DATA_LATENCIES
                    | OP_DATA_BRANCH
                    | OP_DATA_RIP_INVALID
                    | OP_DATA_MICROCODE
                    | fuse;
                (valid, 0)
            }
            IBS_OP_DATA2 => (OP_DATA2_VALID, 0),
            IBS_OP_DATA3 => (OP_DATA3_VALID, OP_DATA3_DC_PHY_ADDR_VALID),
            _ => return None,
        };
        Some(DataReg {
            unit,
            slot,
            writable,
            ignored,
        })
    }
}

impl fmt::Display for UnitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnitKind::Fetch => "fetch",
            UnitKind::Op => "op",
        })
    }
}

/// How a CTL write changed the unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CtlChange {
    /// The unit was counting (En = 1, Val = 0) before the write.
    pub(crate) was_counting: bool,
    /// The write released a held interrupt (see [`Unit::irq_held`]).
    pub(crate) released_irq: bool,
}

/// One sampling unit's registers and latch state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unit {
    pub(crate) kind: UnitKind,
    pub(crate) ctl: u64,
    pub(crate) data: [u64; DATA_REGS],
    /// Val is set and the device set it by latching a sample; cleared by any CTL write.
    pub(crate) latched: bool,
    /// The interrupt for the latched sample was taken by the embedder.
    pub(crate) notified: bool,
    /// The latched sample's interrupt is held until the next CTL write (a sample forced with
    /// [`crate::device::ForcedIrq::AfterCtlWrite`]).
    pub(crate) irq_held: bool,
    /// The current arming of the unit; samples of any other epoch are stale.
    pub(crate) epoch: Epoch,
    /// The last CTL access was a read that presented a Val the device had not latched.
    pub(crate) stale_read: Option<u64>,
}

impl Unit {
    pub(crate) fn new(kind: UnitKind) -> Unit {
        Unit {
            kind,
            ctl: 0,
            data: [0; DATA_REGS],
            latched: false,
            notified: false,
            irq_held: false,
            epoch: Epoch::NONE,
            stale_read: None,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.ctl & self.kind.en() != 0
    }

    pub(crate) fn val(&self) -> bool {
        self.ctl & self.kind.val() != 0
    }

    /// En = 1 and Val = 0: the unit is looking for a sample.
    pub(crate) fn counting(&self) -> bool {
        self.enabled() && !self.val()
    }

    /// Why a sample for this unit would be refused while it is not counting.
    pub(crate) fn idle_reason(&self) -> DropReason {
        if self.enabled() {
            DropReason::ValSet
        } else {
            DropReason::UnitDisabled
        }
    }

    /// Read CTL; also returns whether this read presents a stale Val (Val = 1 not latched by
    /// the device), and remembers that for race detection.
    pub(crate) fn read_ctl(&mut self) -> (u64, bool) {
        let stale = self.val() && !self.latched;
        self.stale_read = stale.then_some(self.ctl);
        (self.ctl, stale)
    }

    /// Store a validated guest CTL value (`stored` already had Val handled by the policy and
    /// ignored bits removed).
    pub(crate) fn write_ctl(&mut self, stored: u64) -> CtlChange {
        let change = CtlChange {
            was_counting: self.counting(),
            released_irq: self.irq_held,
        };
        self.ctl = stored;
        self.latched = false;
        self.notified = false;
        self.irq_held = false;
        self.stale_read = None;
        change
    }

    /// Latch `sample` if it belongs to the current arming and the unit is counting.
    pub(crate) fn latch(&mut self, sample: &Sample, caps: Caps) -> Result<(), DropReason> {
        if sample.epoch() != self.epoch {
            return Err(DropReason::StaleEpoch);
        }
        if !self.enabled() {
            return Err(DropReason::UnitDisabled);
        }
        if self.val() {
            return Err(DropReason::ValSet);
        }
        let kind = self.kind;
        let (status, data) = sample.registers();
        let mut ctl = (self.ctl & kind.config_bits())
            | (status & kind.status_bits(caps))
            | kind.en()
            | kind.val();
        if kind == UnitKind::Fetch {
            // The fetch counter reached MaxCnt: Linux derives the elapsed count from
            // IbsFetchCnt (ibs.c get_ibs_fetch_count) and emits a sample only if it
            // covers the period.
            ctl |= (self.ctl & FETCH_MAX_CNT) << FETCH_CNT_SHIFT;
        }
        self.ctl = ctl;
        for (slot, (&msr, value)) in kind.data_msrs().iter().zip(data).enumerate() {
            self.data[slot] = match UnitKind::data_reg(msr, caps) {
                Some(reg) => value & reg.writable & !reg.ignored,
                None => 0,
            };
        }
        self.latched = true;
        self.notified = false;
        self.irq_held = false;
        self.stale_read = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_masks_follow_caps() {
        let old = Caps::PROFILE_OLD;
        let zen4 = Caps::PROFILE_ZEN4;
        // OLD = AVAIL|FETCHSAM|OPSAM|RDWROPCNT|OPCNT: no MaxCnt ext, no L3MissOnly.
        let w = UnitKind::Op.ctl_writable(old);
        assert_eq!(w & OP_MAX_CNT_EXT, 0);
        assert_eq!(w & OP_L3_MISS_ONLY, 0);
        assert_eq!(w & OP_CUR_CNT_EXT, 0);
        assert_eq!(w & (OP_CNT_CTL | OP_CUR_CNT), OP_CNT_CTL | OP_CUR_CNT);
        let w4 = UnitKind::Op.ctl_writable(zen4);
        assert_eq!(w4, 0x07FF_FFFF_0000_0000 | 0x07FF_FFFF);
        assert_eq!(w4 & bits(63, 59), 0, "load latency never writable");
        let only = Caps::new(0x7).unwrap();
        assert_eq!(UnitKind::Op.ctl_writable(only), OP_MAX_CNT | OP_EN | OP_VAL);
        // IBS_OP_DATA: latencies, branch bits, RipInvalid, Microcode; BrnFuse with OPBRNFUSE.
        let op_data = OP_DATA_LATENCIES | OP_DATA_BRANCH | OP_DATA_RIP_INVALID | OP_DATA_MICROCODE;
        let reg = |caps| UnitKind::data_reg(IBS_OP_DATA, caps).unwrap();
        assert_eq!((reg(old).writable, reg(old).ignored), (op_data, 0));
        assert_eq!(reg(zen4).writable, op_data | OP_DATA_BRN_FUSE);
        assert_eq!(
            (UnitKind::Fetch.to_string(), UnitKind::Op.to_string()),
            ("fetch".into(), "op".into())
        );
        // Fetch: every field through L2Miss (bit 58); Zen 4 adds L3MissOnly, OcMiss, L3Miss.
        assert_eq!(UnitKind::Fetch.ctl_writable(old), bits(58, 0));
        assert_eq!(UnitKind::Fetch.ctl_writable(zen4), bits(61, 0));
    }

    #[test]
    fn max_count() {
        let ext = 0x7F << 20 | 0xFFFF;
        assert_eq!(
            UnitKind::Op.max_count(ext, Caps::PROFILE_ZEN2),
            0x7F_FFFF << 4
        );
        assert_eq!(UnitKind::Op.max_count(ext, Caps::PROFILE_OLD), 0xFFFF << 4);
        assert_eq!(UnitKind::Fetch.max_count(0x10, Caps::PROFILE_OLD), 0x100);
        assert_eq!(UnitKind::Op.start_count(0x45 << 32), 0x45);
    }

    #[test]
    fn data_regs_follow_caps() {
        assert!(UnitKind::data_reg(IBS_BR_TARGET, Caps::PROFILE_OLD).is_none());
        assert_eq!(
            UnitKind::data_reg(IBS_BR_TARGET, Caps::PROFILE_ZEN2).map(|r| (r.unit, r.slot)),
            Some((UnitKind::Op, 6))
        );
        assert!(UnitKind::data_reg(IBS_FETCH_CTL_EXT, Caps::PROFILE_OLD).is_none());
        assert!(UnitKind::data_reg(IBS_FETCH_CTL_EXT, Caps::PROFILE_ZEN3).is_some());
        assert!(UnitKind::data_reg(IBS_OP_DATA4, Caps::PROFILE_ZEN4).is_none());
        assert!(UnitKind::data_reg(IBS_OP_CTL, Caps::PROFILE_ZEN4).is_none());
        let d3 = UnitKind::data_reg(IBS_OP_DATA3, Caps::PROFILE_OLD).unwrap();
        assert_eq!(d3.writable & bits(12, 9), 0);
        assert_eq!(d3.ignored, OP_DATA3_DC_PHY_ADDR_VALID);
        let fuse = |c| UnitKind::data_reg(IBS_OP_DATA, c).unwrap().writable & OP_DATA_BRN_FUSE;
        assert_eq!(fuse(Caps::PROFILE_OLD), 0);
        assert_ne!(fuse(Caps::PROFILE_ZEN2), 0);
    }
}
