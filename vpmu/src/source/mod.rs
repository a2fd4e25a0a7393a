//! Where samples come from: the [`SampleSource`] trait, the sample types, and the
//! cross-thread [`SampleSink`].
//!
//! Every sample carries the [`Epoch`] of the unit arming it was produced for. The device
//! starts a new epoch each time a unit starts counting (clear-before-start,
//! [device model §5.7](crate::device_model)) and rejects samples of any other epoch, so a
//! sample that a backend buffered, or that a sampler thread is delivering at the very moment
//! the guest restarts the unit, is never presented after the restart.

#[cfg(all(feature = "host-perf", target_os = "linux"))]
pub mod host_perf;
mod inbox;
pub mod synthetic;

pub(crate) use inbox::Inbox;
pub use inbox::SampleSink;

use crate::unit::{UnitKind, DATA_REGS};

/// The generation of one arming of a unit. Only the device creates epochs; a source gets the
/// current one from [`Arm::epoch`] and stamps it on the samples it produces for that arming.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(u64);

impl Epoch {
    /// The epoch of a unit that was never armed (the default); no sample carries it.
    pub(crate) const NONE: Epoch = Epoch(0);

    /// The epoch following `self`.
    pub(crate) fn next(self) -> Epoch {
        Epoch(self.0.wrapping_add(1).max(1))
    }

    /// An arbitrary epoch, for tests that forge stale or future samples.
    #[cfg(test)]
    pub(crate) fn from_raw(raw: u64) -> Epoch {
        Epoch(raw)
    }

    /// The raw generation number, for logs.
    pub fn raw(self) -> u64 {
        self.0
    }
}

/// A unit was armed: it counts from now on and wants one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arm {
    /// The unit.
    pub unit: UnitKind,
    /// The arming's epoch; stamp it on the sample.
    pub epoch: Epoch,
    /// The CTL value as stored (config bits the guest chose: MaxCnt, RandEn, CntCtl, …).
    pub ctl: u64,
    /// The programmed period MaxCnt × 16, in the unit's events (fetches or ops/cycles).
    pub max_count: u64,
    /// The counter's start value (IbsOpCurCnt as written; 0 for fetch).
    pub start_count: u64,
    /// Fetch RandEn: the low 4 bits of the period are to be randomised.
    pub rand_en: bool,
}

/// Where the vCPU is at a sample point, as the embedder read it (e.g. from KVM `sync_regs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SamplePoint {
    /// Guest RIP.
    pub rip: u64,
    /// Elapsed guest run time of this vCPU in nanoseconds (monotonic).
    pub guest_ns: u64,
}

/// Registers of a fetch sample. Bits a source cannot know must be 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchSample {
    /// IBS_FETCH_CTL status bits: latency \[47:32\], Comp, IcMiss, TLB bits, L2Miss (and the
    /// Zen 4 status bits if advertised). MaxCnt/Cnt/En/Val/PhyAddrValid are set by the device.
    pub status: u64,
    /// IBS_FETCH_LINADDR.
    pub linaddr: u64,
    /// IBS_FETCH_CTL_EXT (used only when caps FETCHCTLEXTD is advertised).
    pub ctl_ext: u64,
}

/// Registers of an op sample. Bits a source cannot know must be 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpSample {
    /// IBS_OP_CTL status bits: the random low 7 bits of CurCnt \[38:32\] (kept only with caps
    /// RDWROPCNT). Everything else in CTL is set by the device.
    pub status: u64,
    /// IBS_OP_RIP.
    pub rip: u64,
    /// IBS_OP_DATA.
    pub data: u64,
    /// IBS_OP_DATA2.
    pub data2: u64,
    /// IBS_OP_DATA3 (DcPhyAddrValid is always cleared by the device).
    pub data3: u64,
    /// IBS_DC_LINADDR.
    pub dc_linaddr: u64,
    /// IBS_BR_TARGET (used only when caps BRNTRGT is advertised).
    pub br_target: u64,
}

/// The registers of a sample of either unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleRegs {
    /// A fetch sample.
    Fetch(FetchSample),
    /// An op sample.
    Op(OpSample),
}

/// One sample for one arming of one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    epoch: Epoch,
    regs: SampleRegs,
}

impl Sample {
    /// A fetch sample for the arming `epoch`.
    pub fn fetch(epoch: Epoch, regs: FetchSample) -> Sample {
        Sample {
            epoch,
            regs: SampleRegs::Fetch(regs),
        }
    }

    /// An op sample for the arming `epoch`.
    pub fn op(epoch: Epoch, regs: OpSample) -> Sample {
        Sample {
            epoch,
            regs: SampleRegs::Op(regs),
        }
    }

    /// The unit it belongs to.
    pub fn unit(&self) -> UnitKind {
        match self.regs {
            SampleRegs::Fetch(_) => UnitKind::Fetch,
            SampleRegs::Op(_) => UnitKind::Op,
        }
    }

    /// The arming it was produced for.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The registers.
    pub fn regs(&self) -> &SampleRegs {
        &self.regs
    }

    /// CTL status bits and data registers in the slot order of [`UnitKind::data_msrs`]
    /// (PHYSADDR slots are 0).
    pub(crate) fn registers(&self) -> (u64, [u64; DATA_REGS]) {
        match self.regs {
            SampleRegs::Fetch(f) => (f.status, [f.linaddr, 0, f.ctl_ext, 0, 0, 0, 0]),
            SampleRegs::Op(o) => (
                o.status,
                [
                    o.rip,
                    o.data,
                    o.data2,
                    o.data3,
                    o.dc_linaddr,
                    0,
                    o.br_target,
                ],
            ),
        }
    }
}

/// A producer of samples, driven by the device on the vCPU thread.
///
/// A source produces at most one sample per [`SampleSource::arm`]. Samples made on the vCPU
/// thread are returned from [`SampleSource::poll`]; a source whose samples arrive on another
/// thread (e.g. a host perf reader) passes them to a [`SampleSink`] instead, stamped with
/// the epoch of the arming they belong to.
pub trait SampleSource {
    /// A unit started counting. Called after the device dropped every sample of earlier
    /// armings, so anything stamped with an older epoch is already rejected.
    fn arm(&mut self, arm: &Arm);
    /// The unit stopped counting (disabled, or it latched a sample).
    fn disarm(&mut self, unit: UnitKind);
    /// Guest time (ns, same clock as [`SamplePoint::guest_ns`]) at which the source wants
    /// the next sample point; the embedder should interrupt the vCPU then.
    fn next_deadline(&self) -> Option<u64>;
    /// A sample point: return a sample that is due, if any (the device calls this until it
    /// returns `None`, a few times at most).
    fn poll(&mut self, at: &SamplePoint) -> Option<Sample>;
    /// The vCPU's guest run time is now `guest_ns` (same clock as [`SamplePoint::guest_ns`]).
    /// The device forwards [`crate::Vpmu::set_guest_time`] here before an MSR access, so a
    /// source that measures periods in guest time starts them at the arming write, not at
    /// the last sample point. Sources on other clocks ignore it.
    fn set_guest_time(&mut self, guest_ns: u64) {
        let _ = guest_ns;
    }
    /// Test hook behind [`crate::Vpmu::force_sample`]: end the armed `unit`'s period now, so
    /// that the next [`SampleSource::poll`] returns its sample. Returns false when the unit
    /// is not armed or the source cannot do it (a hardware source samples when the hardware
    /// does); that is the default.
    fn expire(&mut self, unit: UnitKind) -> bool {
        let _ = unit;
        false
    }
}

/// Lets a VMM pick the source at run time: `Vpmu<Box<dyn SampleSource + Send>>`.
impl<T: SampleSource + ?Sized> SampleSource for Box<T> {
    fn arm(&mut self, arm: &Arm) {
        (**self).arm(arm);
    }
    fn disarm(&mut self, unit: UnitKind) {
        (**self).disarm(unit);
    }
    fn next_deadline(&self) -> Option<u64> {
        (**self).next_deadline()
    }
    fn poll(&mut self, at: &SamplePoint) -> Option<Sample> {
        (**self).poll(at)
    }
    fn set_guest_time(&mut self, guest_ns: u64) {
        (**self).set_guest_time(guest_ns);
    }
    fn expire(&mut self, unit: UnitKind) -> bool {
        (**self).expire(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_source_drives_a_device() {
        use crate::msr::{IBS_OP_CTL, OP_EN};
        let source: Box<dyn SampleSource + Send> = Box::new(synthetic::SyntheticSource::default());
        let mut v = crate::Vpmu::new(crate::VpmuConfig::default(), source);
        v.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN, &crate::NoGuestContext)
            .unwrap();
        let t = v.next_deadline().unwrap();
        v.sample_point(SamplePoint {
            rip: 1,
            guest_ns: t,
        });
        assert_eq!(v.stats().samples_latched, 1);
    }

    #[test]
    fn epochs_advance_and_skip_none() {
        assert_eq!(Epoch::NONE.next(), Epoch(1));
        assert_eq!(Epoch(u64::MAX).next(), Epoch(1));
        assert_eq!(Epoch(7).raw(), 7);
    }

    #[test]
    fn sample_registers() {
        let s = Sample::op(
            Epoch(3),
            OpSample {
                rip: 1,
                br_target: 7,
                ..Default::default()
            },
        );
        assert_eq!(s.unit(), UnitKind::Op);
        assert_eq!(s.epoch(), Epoch(3));
        assert_eq!(s.registers().1, [1, 0, 0, 0, 0, 0, 7]);
        let f = Sample::fetch(
            Epoch(4),
            FetchSample {
                linaddr: 9,
                ..Default::default()
            },
        );
        assert_eq!(f.unit(), UnitKind::Fetch);
        assert_eq!(f.registers().1[0], 9);
        assert!(matches!(f.regs(), SampleRegs::Fetch(_)));
    }
}
