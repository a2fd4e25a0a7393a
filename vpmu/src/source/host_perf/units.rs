//! The events of one host-perf source and the state of its armings, behind the one lock the
//! vCPU thread (arm, disarm) and the reader thread (read) share.
//!
//! **Event cache.** Per unit, one perf event is opened per *config variant* — the
//! RandEn / CntCtl / L3MissOnly bits the host event carries ([`IbsEventConfig::config`]),
//! at most four per unit — the first time the guest arms the unit with that variant, on the
//! vCPU thread. Each stays open for the life of the source. A later arming with the same
//! variant only changes the period (PERF_EVENT_IOC_PERIOD); one with another variant
//! DISABLEs the current event and ENABLEs the other one. So the guest's WRMSR path never
//! reopens an event, and opens at most eight in a VM's life per vCPU. Invariant: at most one
//! event per unit is enabled, and only while the unit is armed ([`Armed::variant`]).
//!
//! **Clear-before-start.** [`HostUnits::arm`] runs entirely under the lock, in this order:
//! DISABLE the unit's enabled event (a synchronous ioctl: the kernel writes no record for it
//! after it returns), pick the variant (opening it if new), drop everything in its ring
//! ([`IbsReader::discard_all`]), record the new arming's epoch, PERIOD, ENABLE. The reader
//! stamps samples with the epoch recorded for the ring's event under the same lock. So a
//! record of an earlier enable period is either read (and stamped with the earlier epoch,
//! which the device already rejects: it opened the new epoch before calling `arm`) before
//! the arming takes the lock, or discarded by it; it can never carry the new epoch.
//!
//! **One sample per arming.** The device latches one sample per arming and then disarms the
//! unit, but the host event keeps sampling until the vCPU thread gets there. The reader
//! delivers the first guest-mode sample of an arming and counts the rest as unclaimed, so
//! the device's inbox does not see a stream of surplus samples.

use std::os::fd::RawFd;

use super::attr::IbsEventConfig;
use super::backend::{EventOpener, PerfControl};
use super::detect::{pmu_name, HostPerfError};
use super::{HostPerfStats, IbsReader};
use crate::source::{Epoch, Sample, SampleRegs, SampleSink};
use crate::unit::UnitKind;

/// Counters of a source beyond those of its rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceCounters {
    /// Samples handed to the device (the first guest-mode sample of an arming).
    pub delivered: u64,
    /// Samples the device's sink refused (the arming had already ended there).
    pub rejected: u64,
    /// Guest-mode samples no arming was waiting for: after the arming's sample, or read
    /// from an event that was no longer armed.
    pub unclaimed: u64,
    /// Perf events opened (one per unit and config variant used).
    pub events_opened: u64,
    /// Armings with no event behind them (the variant's open had failed before).
    pub unbacked_armings: u64,
    /// Armings whose guest CTL asked for a filter or mode the host cannot honour (the host
    /// samples without it).
    pub config_bits_dropped: u64,
    /// Errors (open, ioctl, ring, reader); the latest is kept for the embedder's log.
    pub errors: u64,
}

/// One open event for one config variant of a unit.
#[derive(Debug)]
struct Variant<E, R> {
    /// The config it was opened for (later periods are set by PERIOD, never by reopening).
    config: IbsEventConfig,
    event: E,
    reader: IbsReader<R>,
}

/// The current arming of a unit.
#[derive(Clone, Copy, Debug)]
struct Armed {
    epoch: Epoch,
    /// Index of the enabled variant.
    variant: usize,
    /// Its sample was already delivered.
    delivered: bool,
}

#[derive(Debug)]
struct UnitEvents<E, R> {
    variants: Vec<Variant<E, R>>,
    armed: Option<Armed>,
    /// Variants whose open failed: not retried on the guest's WRMSR path.
    failed: Vec<IbsEventConfig>,
}

impl<E, R> Default for UnitEvents<E, R> {
    fn default() -> Self {
        UnitEvents {
            variants: Vec::new(),
            armed: None,
            failed: Vec::new(),
        }
    }
}

/// The shared state of a source (see the module docs).
#[derive(Debug)]
pub(crate) struct HostUnits<E, R> {
    units: [UnitEvents<E, R>; 2],
    sink: Option<SampleSink>,
    counters: SourceCounters,
    error: Option<HostPerfError>,
}

impl<E, R> Default for HostUnits<E, R> {
    fn default() -> Self {
        HostUnits {
            units: [UnitEvents::default(), UnitEvents::default()],
            sink: None,
            counters: SourceCounters::default(),
            error: None,
        }
    }
}

fn stamp(epoch: Epoch, regs: SampleRegs) -> Sample {
    match regs {
        SampleRegs::Fetch(f) => Sample::fetch(epoch, f),
        SampleRegs::Op(o) => Sample::op(epoch, o),
    }
}

impl<E: PerfControl, R: super::RingMemory> HostUnits<E, R> {
    /// Where samples go from now on.
    pub(crate) fn connect(&mut self, sink: SampleSink) {
        self.sink = Some(sink);
    }

    /// Keep `error` for the embedder and count it.
    pub(crate) fn record(&mut self, error: HostPerfError) {
        self.counters.errors += 1;
        self.error = Some(error);
    }

    /// The latest error since the last call.
    pub(crate) fn take_error(&mut self) -> Option<HostPerfError> {
        self.error.take()
    }

    /// Arm `config.unit` for the arming `epoch` (clear-before-start, see the module docs).
    /// Returns whether a new event was opened (its descriptor is then new to the reader).
    pub(crate) fn arm<O>(
        &mut self,
        opener: &mut O,
        config: &IbsEventConfig,
        epoch: Epoch,
    ) -> Result<bool, HostPerfError>
    where
        O: EventOpener<Event = E, Ring = R>,
    {
        if self.sink.is_none() {
            return Err(HostPerfError::NotConnected);
        }
        if config.dropped != 0 {
            self.counters.config_bits_dropped += 1;
        }
        let unit = &mut self.units[config.unit.index()];
        // 1. DISABLE: the only enabled event of the unit is the armed one.
        if let Some(previous) = unit.armed.take() {
            unit.variants[previous.variant].event.disable()?;
        }
        // 2. The variant's event, opened once.
        let cached = unit
            .variants
            .iter()
            .position(|v| v.config.same_event(config));
        let (index, opened) = match cached {
            Some(index) => (index, false),
            None if unit.failed.iter().any(|f| f.same_event(config)) => {
                self.counters.unbacked_armings += 1;
                return Ok(false);
            }
            None => {
                let opened = opener.open(config).and_then(|(event, ring)| {
                    let reader = IbsReader::new(ring, config.unit).map_err(|source| {
                        HostPerfError::Ring {
                            what: pmu_name(config.unit).to_string(),
                            source,
                        }
                    })?;
                    Ok(Variant {
                        config: *config,
                        event,
                        reader,
                    })
                });
                match opened {
                    Ok(variant) => unit.variants.push(variant),
                    Err(e) => {
                        unit.failed.push(*config);
                        return Err(e);
                    }
                }
                self.counters.events_opened += 1;
                (unit.variants.len() - 1, true)
            }
        };
        let variant = &mut unit.variants[index];
        // 3. Drop what earlier enable periods left in the ring.
        variant.reader.discard_all();
        // 4. The new arming.
        unit.armed = Some(Armed {
            epoch,
            variant: index,
            delivered: false,
        });
        // 5. PERIOD (restarts the count), 6. ENABLE.
        let started = variant
            .event
            .set_period(config.period)
            .and_then(|()| variant.event.enable());
        if let Err(e) = started {
            unit.armed = None;
            return Err(e);
        }
        Ok(opened)
    }

    /// `unit` stopped counting: DISABLE its event.
    pub(crate) fn disarm(&mut self, unit: UnitKind) -> Result<(), HostPerfError> {
        let unit = &mut self.units[unit.index()];
        match unit.armed.take() {
            Some(armed) => unit.variants[armed.variant].event.disable(),
            None => Ok(()),
        }
    }

    /// The descriptors the reader waits on.
    pub(crate) fn wakeup_fds(&self) -> Vec<RawFd> {
        self.units
            .iter()
            .flat_map(|u| &u.variants)
            .filter_map(|v| v.event.wakeup_fd())
            .collect()
    }

    /// Read every ring: deliver the first guest-mode sample of each arming, stamped with its
    /// epoch; count the rest. Returns the number of samples the sink accepted.
    pub(crate) fn read(&mut self) -> usize {
        let HostUnits {
            units,
            sink,
            counters,
            error,
        } = self;
        let mut accepted = 0;
        for unit in units.iter_mut() {
            let UnitEvents {
                variants, armed, ..
            } = unit;
            for (index, variant) in variants.iter_mut().enumerate() {
                let result = variant.reader.read(|raw| match armed.as_mut() {
                    Some(a) if a.variant == index && !a.delivered => {
                        a.delivered = true;
                        let delivered = sink
                            .as_ref()
                            .map(|s| s.deliver(stamp(a.epoch, raw.regs)).is_ok());
                        match delivered {
                            Some(true) => {
                                counters.delivered += 1;
                                accepted += 1;
                            }
                            Some(false) => counters.rejected += 1,
                            None => counters.unclaimed += 1,
                        }
                    }
                    _ => counters.unclaimed += 1,
                });
                if let Err(source) = result {
                    counters.errors += 1;
                    *error = Some(HostPerfError::Ring {
                        what: pmu_name(variant.reader.unit()).to_string(),
                        source,
                    });
                }
            }
        }
        accepted
    }

    /// The rings' counters, all events summed, and the source's own.
    pub(crate) fn stats(&self) -> (HostPerfStats, SourceCounters) {
        let rings = self
            .units
            .iter()
            .flat_map(|u| &u.variants)
            .map(|v| v.reader.stats())
            .fold(HostPerfStats::default(), |a, b| a + b);
        (rings, self.counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::Caps;
    use crate::msr::OP_CNT_CTL;
    use crate::source::host_perf::fake::{FakeEvent, SharedRing};
    use crate::source::host_perf::fake::{FakeOpener, GUEST_KERNEL, HOST_KERNEL};
    use crate::source::host_perf::ring::PERF_RECORD_LOST;
    use crate::source::{Inbox, OpSample};

    type Units = HostUnits<FakeEvent, SharedRing>;

    fn op(ctl: u64) -> IbsEventConfig {
        IbsEventConfig::from_guest(UnitKind::Op, ctl, Caps::PROFILE_ZEN4, 0xBFF)
    }

    fn connected(inbox: &Inbox) -> Units {
        let mut units = Units::default();
        units.connect(inbox.sink());
        units
    }

    fn op_rip(sample: Option<Sample>) -> Option<(Epoch, u64)> {
        sample.map(|s| match s.regs() {
            SampleRegs::Op(OpSample { rip, .. }) => (s.epoch(), *rip),
            SampleRegs::Fetch(_) => panic!("fetch sample from the op unit"),
        })
    }

    #[test]
    fn arming_stamps_the_first_guest_sample_with_its_epoch() {
        let inbox = Inbox::default();
        let mut units = connected(&inbox);
        let mut opener = FakeOpener::default();
        let e1 = inbox.open(UnitKind::Op);
        assert!(units.arm(&mut opener, &op(0x1000), e1).unwrap());
        let ring = opener.ring(UnitKind::Op, 0);
        ring.push_op(HOST_KERNEL, 0xFFFF_FFFF_8100_0000); // KVM ran: dropped
        ring.push_op(GUEST_KERNEL, 0x40_1000);
        ring.push_op(GUEST_KERNEL, 0x40_2000); // surplus
        ring.push(PERF_RECORD_LOST, 0, &[[0; 8], 5u64.to_le_bytes()].concat());
        assert_eq!(units.read(), 1);
        let [fetch, op_sample] = inbox.drain();
        assert_eq!(fetch, None);
        assert_eq!(op_rip(op_sample), Some((e1, 0x40_1000)));
        let (rings, counters) = units.stats();
        assert_eq!(rings.host_samples_dropped, 1);
        assert_eq!(rings.guest_samples, 2);
        assert_eq!(rings.lost, 5);
        assert_eq!((counters.delivered, counters.unclaimed), (1, 1));
        assert_eq!(
            opener.log.take(),
            [
                "open op/0x0",
                "period=0x10000 op/0x0 unread=0",
                "enable op/0x0 unread=0"
            ]
        );
    }

    #[test]
    fn clear_before_start_discards_records_of_the_earlier_enable_period() {
        let inbox = Inbox::default();
        let mut units = connected(&inbox);
        let mut opener = FakeOpener::default();
        let e1 = inbox.open(UnitKind::Op);
        units.arm(&mut opener, &op(0x1000), e1).unwrap();
        let ring = opener.ring(UnitKind::Op, 0);
        // A sample of the first enable period, not read before the guest stops the unit…
        ring.push_op(GUEST_KERNEL, 0x40_1000);
        units.disarm(UnitKind::Op).unwrap();
        // …and starts it again: the device opens a new epoch, then arms the source.
        let e2 = inbox.open(UnitKind::Op);
        assert!(!units.arm(&mut opener, &op(0x2000), e2).unwrap());
        assert_eq!(units.read(), 0, "the earlier period's record was discarded");
        assert_eq!(inbox.drain(), [None, None]);
        assert!(units.stats().0.discarded_bytes > 0);
        assert_eq!(units.stats().0.guest_samples, 0);
        // The ring was empty when the event was enabled again, with the new period.
        let log = opener.log.take();
        assert_eq!(
            log[3..],
            [
                "disable op/0x0 unread=104", // one 104-byte record
                "period=0x20000 op/0x0 unread=0",
                "enable op/0x0 unread=0"
            ]
        );
        // A sample of the new period carries the new epoch.
        ring.push_op(GUEST_KERNEL, 0x40_2000);
        assert_eq!(units.read(), 1);
        assert_eq!(op_rip(inbox.drain()[1]), Some((e2, 0x40_2000)));
    }

    #[test]
    fn a_late_sample_of_a_disarmed_unit_is_unclaimed() {
        let inbox = Inbox::default();
        let mut units = connected(&inbox);
        let mut opener = FakeOpener::default();
        units
            .arm(&mut opener, &op(0x1000), inbox.open(UnitKind::Op))
            .unwrap();
        units.disarm(UnitKind::Op).unwrap();
        opener.ring(UnitKind::Op, 0).push_op(GUEST_KERNEL, 1);
        assert_eq!(units.read(), 0);
        assert_eq!(units.stats().1.unclaimed, 1);
        // Disarming twice (the device stops a unit it latched, then the guest disables it)
        // issues one DISABLE.
        units.disarm(UnitKind::Op).unwrap();
        let log = opener.log.take();
        assert_eq!(log.iter().filter(|l| l.starts_with("disable")).count(), 1);
    }

    #[test]
    fn config_variants_are_opened_once_and_switched_by_enable_disable() {
        let inbox = Inbox::default();
        let mut units = connected(&inbox);
        let mut opener = FakeOpener::default();
        let plain = op(0x1000);
        let cnt_ctl = op(0x1000 | OP_CNT_CTL);
        assert!(units
            .arm(&mut opener, &plain, inbox.open(UnitKind::Op))
            .unwrap());
        assert!(units
            .arm(&mut opener, &cnt_ctl, inbox.open(UnitKind::Op))
            .unwrap());
        assert!(!units
            .arm(&mut opener, &plain, inbox.open(UnitKind::Op))
            .unwrap());
        assert!(!units
            .arm(&mut opener, &cnt_ctl, inbox.open(UnitKind::Op))
            .unwrap());
        let log = opener.log.take();
        let opens: Vec<_> = log.iter().filter(|l| l.starts_with("open")).collect();
        assert_eq!(opens, ["open op/0x0", "open op/0x80000"]);
        // Each switch disables the enabled variant before enabling the other.
        let switches: Vec<_> = log
            .iter()
            .filter(|l| l.starts_with("enable") || l.starts_with("disable"))
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            switches,
            [
                "enable op/0x0",
                "disable op/0x0",
                "enable op/0x80000",
                "disable op/0x80000",
                "enable op/0x0",
                "disable op/0x0",
                "enable op/0x80000"
            ]
        );
        assert_eq!(units.stats().1.events_opened, 2);
        assert_eq!(
            units.wakeup_fds(),
            [] as [RawFd; 0],
            "fakes have no descriptors"
        );
    }

    #[test]
    fn a_failed_open_is_reported_once_and_not_retried() {
        let inbox = Inbox::default();
        let mut units = connected(&inbox);
        let mut opener = FakeOpener::failing(OP_CNT_CTL);
        let cnt_ctl = op(0x1000 | OP_CNT_CTL);
        let err = units
            .arm(&mut opener, &cnt_ctl, inbox.open(UnitKind::Op))
            .unwrap_err();
        assert!(err.to_string().contains("op/0x80000"), "{err}");
        assert!(!units
            .arm(&mut opener, &cnt_ctl, inbox.open(UnitKind::Op))
            .unwrap());
        assert_eq!(units.stats().1.unbacked_armings, 1);
        // Other variants still work.
        assert!(units
            .arm(&mut opener, &op(0x1000), inbox.open(UnitKind::Op))
            .unwrap());
        assert_eq!(opener.log.take()[0], "open op/0x0");
    }

    #[test]
    fn unconnected_sources_refuse_to_arm_and_dropped_bits_are_counted() {
        let inbox = Inbox::default();
        let mut units = Units::default();
        let mut opener = FakeOpener::default();
        let e = inbox.open(UnitKind::Op);
        assert!(matches!(
            units.arm(&mut opener, &op(0x1000), e),
            Err(HostPerfError::NotConnected)
        ));
        units.record(HostPerfError::NotConnected);
        assert!(matches!(
            units.take_error(),
            Some(HostPerfError::NotConnected)
        ));
        assert!(units.take_error().is_none());
        assert_eq!(units.stats().1.errors, 1);
        units.connect(inbox.sink());
        // L3MissOnly from a guest on a host without ZEN4.
        let c = IbsEventConfig::from_guest(
            UnitKind::Op,
            0x1000 | crate::msr::OP_L3_MISS_ONLY,
            Caps::PROFILE_ZEN4,
            0x3FF,
        );
        units.arm(&mut opener, &c, e).unwrap();
        assert_eq!(units.stats().1.config_bits_dropped, 1);
    }
}
