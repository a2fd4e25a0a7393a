//! [`HostPerfSource`]: guest IBS samples taken by the host's IBS, through perf.
//!
//! **Threads.** The device calls [`SampleSource::arm`] / [`SampleSource::disarm`] on the vCPU
//! thread; events are opened there, lazily, at the first arming of each unit and config
//! variant, with `pid` 0 and `cpu` -1 so they follow that thread (and count while it is in
//! `KVM_RUN`). The first arming also starts one reader thread per source, which waits on the
//! events' descriptors, reads their rings, delivers through the device's
//! [`crate::SampleSink`] and then calls the embedder's [`Waker`] (e.g. a signal that kicks
//! the vCPU out of `KVM_RUN`; the vCPU thread then calls [`crate::Vpmu::poll_inbox`]).
//!
//! **Lock.** One mutex guards the events, their rings and the armings
//! ([`super::units`]): the vCPU thread holds it for an arm or a disarm, the reader for one
//! pass over the rings. The reader takes the device's inbox lock inside it (to deliver); the
//! vCPU thread never holds the inbox lock while calling the source, so there is no cycle.
//!
//! **Clear-before-start** and **no reopen on WRMSR**: see [`super::units`].
//!
//! **Shutdown.** Dropping the source stops and joins the reader thread, so the waker is
//! never called after the source is gone — an embedder may therefore let the waker signal
//! the thread that owns the source.

use std::sync::{Arc, Mutex};

use super::attr::IbsEventConfig;
use super::backend::EventOpener;
use super::detect::HostPerfError;
use super::reader::{lock, ReaderThread, Waker};
use super::units::{HostUnits, SourceCounters};
use super::HostPerfStats;
use crate::caps::Caps;
use crate::source::{Arm, Sample, SamplePoint, SampleSink, SampleSource};
use crate::unit::UnitKind;

/// Counters of a [`HostPerfSource`], for `--stats`-style reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostSourceStats {
    /// The rings' counters, all events summed: guest samples decoded, host-mode samples
    /// dropped, decode errors, losses, throttling, bytes discarded at starts.
    pub rings: HostPerfStats,
    /// The source's own counters.
    pub source: SourceCounters,
}

/// A [`SampleSource`] backed by the host's IBS (see the module docs). Generic over the
/// [`EventOpener`]: [`super::IbsOpener`] on AMD hosts; tests use software events and fakes.
pub struct HostPerfSource<O: EventOpener> {
    // Declared first so that it is dropped first: the reader thread stops and is joined
    // before anything else of the source goes away.
    reader: Option<ReaderThread>,
    units: Arc<Mutex<HostUnits<O::Event, O::Ring>>>,
    opener: O,
    guest_caps: Caps,
    waker: Waker,
}

impl<O: EventOpener> HostPerfSource<O> {
    /// A source for a device advertising `guest_caps` (the caps of its
    /// [`crate::VpmuConfig`]). Nothing is opened until the guest arms a unit; connect it
    /// to the device ([`HostPerfSource::connect`]) before that.
    pub fn new(opener: O, guest_caps: Caps, waker: Waker) -> HostPerfSource<O> {
        HostPerfSource {
            reader: None,
            units: Arc::new(Mutex::new(HostUnits::default())),
            opener,
            guest_caps,
            waker,
        }
    }

    /// Deliver samples to `sink`, the [`crate::Vpmu::sink`] of the device that owns this
    /// source. An arming before this is refused ([`HostPerfError::NotConnected`]).
    pub fn connect(&mut self, sink: SampleSink) {
        lock(&self.units).connect(sink);
    }

    /// The counters.
    pub fn stats(&self) -> HostSourceStats {
        let (rings, source) = lock(&self.units).stats();
        HostSourceStats { rings, source }
    }

    /// The latest error since the last call (opening an event, an ioctl, a malformed ring,
    /// the reader thread), for the embedder's log. The guest sees no samples from a unit
    /// whose arming failed; [`SourceCounters::errors`] counts them all.
    pub fn take_error(&mut self) -> Option<HostPerfError> {
        lock(&self.units).take_error()
    }

    fn try_arm(&mut self, arm: &Arm) -> Result<(), HostPerfError> {
        let config =
            IbsEventConfig::from_guest(arm.unit, arm.ctl, self.guest_caps, self.opener.host_caps());
        let reader = match &mut self.reader {
            Some(reader) => reader,
            None => self.reader.insert(ReaderThread::spawn(
                Arc::clone(&self.units),
                Arc::clone(&self.waker),
            )?),
        };
        let opened = lock(&self.units).arm(&mut self.opener, &config, arm.epoch)?;
        if opened {
            reader.wake();
        }
        Ok(())
    }

    /// One reader pass on the calling thread, as the reader thread makes after a wake-up.
    #[cfg(test)]
    pub(crate) fn read_now(&self) -> usize {
        super::reader::read_and_wake(&self.units, &self.waker)
    }
}

impl<O: EventOpener> SampleSource for HostPerfSource<O> {
    fn arm(&mut self, arm: &Arm) {
        if let Err(e) = self.try_arm(arm) {
            lock(&self.units).record(e);
        }
    }

    fn disarm(&mut self, unit: UnitKind) {
        let mut units = lock(&self.units);
        if let Err(e) = units.disarm(unit) {
            units.record(e);
        }
    }

    /// Samples arrive through the sink: no sample points needed.
    fn next_deadline(&self) -> Option<u64> {
        None
    }

    fn poll(&mut self, _at: &SamplePoint) -> Option<Sample> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msr::{IBS_OP_CTL, OP_CNT_CTL, OP_EN, OP_VAL};
    use crate::source::host_perf::fake::{CpuClockOpener, FakeOpener, GUEST_KERNEL};
    use crate::{Interrupt, NoGuestContext, Vpmu, VpmuConfig};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    const EILVT0: u32 = 0x850;
    const IBS_OP_RIP: u32 = 0xC001_1034;

    fn counting_waker() -> (Waker, Arc<AtomicUsize>) {
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = Arc::clone(&wakes);
        (
            Arc::new(move || {
                w.fetch_add(1, Ordering::SeqCst);
            }),
            wakes,
        )
    }

    /// A device with a connected host source and its NMI route unmasked.
    fn device<O: EventOpener>(opener: O, waker: Waker) -> Vpmu<HostPerfSource<O>> {
        let config = VpmuConfig::default();
        let mut v = Vpmu::new(config, HostPerfSource::new(opener, config.caps, waker));
        let sink = v.sink();
        v.source_mut().connect(sink);
        v.wrmsr(EILVT0, 0x400, &NoGuestContext).unwrap();
        v
    }

    fn write_op_ctl<O: EventOpener>(v: &mut Vpmu<HostPerfSource<O>>, ctl: u64) {
        v.wrmsr(IBS_OP_CTL, ctl, &NoGuestContext).unwrap();
    }

    #[test]
    fn a_guest_sample_reaches_the_guest_through_the_device() {
        let opener = FakeOpener::default();
        let (waker, wakes) = counting_waker();
        let mut v = device(opener.clone(), waker);
        write_op_ctl(&mut v, 0x1000 | OP_EN);
        opener
            .ring(UnitKind::Op, 0)
            .push_op(GUEST_KERNEL, 0x40_1000);
        assert_eq!(v.source().read_now(), 1);
        assert_eq!(wakes.load(Ordering::SeqCst), 1, "the vCPU is woken");
        assert!(v.poll_inbox().interrupt_pending);
        assert_eq!(v.take_interrupt(), Some(Interrupt::Nmi));
        assert_eq!(v.rdmsr(IBS_OP_RIP), Ok(0x40_1000));
        let ctl = v.rdmsr(IBS_OP_CTL).unwrap();
        assert_eq!(ctl & (OP_EN | OP_VAL), OP_EN | OP_VAL);
        // Latching a sample stops the unit: the device disarmed the source → DISABLE.
        let log = opener.log.take();
        assert!(log.last().unwrap().starts_with("disable op/0x0"), "{log:?}");
        assert_eq!(v.source().stats().source.delivered, 1);
    }

    #[test]
    fn clear_before_start_through_the_device() {
        let opener = FakeOpener::default();
        let (waker, wakes) = counting_waker();
        let mut v = device(opener.clone(), waker);
        write_op_ctl(&mut v, 0x1000 | OP_EN);
        let ring = opener.ring(UnitKind::Op, 0);
        // A sample of this enable period is still in the ring when the guest stops the unit
        // and starts it again.
        ring.push_op(GUEST_KERNEL, 0x40_1000);
        write_op_ctl(&mut v, 0x1000);
        write_op_ctl(&mut v, 0x1000 | OP_EN);
        assert_eq!(v.source().read_now(), 0);
        assert!(
            !v.poll_inbox().interrupt_pending,
            "no sample of the earlier period is presented"
        );
        assert_eq!(wakes.load(Ordering::SeqCst), 0);
        assert!(v.source().stats().rings.discarded_bytes > 0);
        // The new period's sample is.
        ring.push_op(GUEST_KERNEL, 0x40_2000);
        assert_eq!(v.source().read_now(), 1);
        assert!(v.poll_inbox().interrupt_pending);
        assert_eq!(v.rdmsr(IBS_OP_RIP), Ok(0x40_2000));
        assert_eq!(v.stats().samples_latched, 1);
    }

    #[test]
    fn arming_an_unconnected_source_is_an_error_not_a_panic() {
        let (waker, _) = counting_waker();
        let config = VpmuConfig::default();
        let mut v = Vpmu::new(
            config,
            HostPerfSource::new(FakeOpener::default(), config.caps, waker),
        );
        write_op_ctl(&mut v, 0x1000 | OP_EN);
        let err = v.source_mut().take_error().unwrap();
        assert!(matches!(err, HostPerfError::NotConnected), "{err}");
        assert_eq!(v.source().stats().source.errors, 1);
    }

    /// This thread's CPU time in ns (`/proc/thread-self/schedstat`, first field).
    fn thread_cpu_ns() -> u64 {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        s.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Burn CPU on this thread until `done` holds (or 20 s pass); returns the CPU ns used.
    fn spin_until(mut done: impl FnMut() -> bool) -> u64 {
        let (start, cpu) = (Instant::now(), thread_cpu_ns());
        let mut x = 0u64;
        while !done() {
            for i in 0..20_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(start.elapsed() < Duration::from_secs(20), "timed out");
        }
        thread_cpu_ns() - cpu
    }

    fn host_samples<O: EventOpener>(v: &Vpmu<HostPerfSource<O>>) -> u64 {
        v.source().stats().rings.host_samples_dropped
    }

    /// The whole life of a source with real software events (cpu-clock, period in ns) on
    /// this thread: lazy open, the reader thread woken by perf, host-mode samples dropped
    /// and counted, PERIOD without reopening, DISABLE on disarm, variants switched.
    #[test]
    fn cpu_clock_source_lifecycle() {
        let (waker, wakes) = counting_waker();
        let mut v = device(CpuClockOpener::new(1), waker);
        assert_eq!(v.source().stats().source.events_opened, 0, "opened lazily");
        // MaxCnt 0x1000: a period of 0x10000 ns of this thread's CPU time.
        write_op_ctl(&mut v, 0x1000 | OP_EN);
        assert_eq!(v.source().stats().source.events_opened, 1);
        let fast_cpu = spin_until(|| host_samples(&v) >= 40);
        let fast = host_samples(&v);
        // Restart with MaxCnt 0xFFFF (~1 ms): the same event, a new period.
        write_op_ctl(&mut v, 0);
        write_op_ctl(&mut v, 0xFFFF | OP_EN);
        let base = host_samples(&v);
        let slow_cpu = spin_until(|| host_samples(&v) >= base + 8);
        let slow = host_samples(&v) - base;
        assert_eq!(v.source().stats().source.events_opened, 1, "no reopen");
        let (fast_ns, slow_ns) = (fast_cpu / fast, slow_cpu / slow);
        assert!(
            slow_ns > 4 * fast_ns,
            "PERIOD not applied: {fast_ns} ns then {slow_ns} ns per sample"
        );
        // Disarmed: no more samples.
        write_op_ctl(&mut v, 0);
        std::thread::sleep(Duration::from_millis(20));
        let stopped = host_samples(&v);
        spin_until({
            let t = Instant::now();
            move || t.elapsed() > Duration::from_millis(30)
        });
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(host_samples(&v), stopped, "a disarmed event still sampled");
        // CntCtl is another variant: one more event, then back without reopening.
        write_op_ctl(&mut v, 0x1000 | OP_CNT_CTL | OP_EN);
        write_op_ctl(&mut v, 0x1000 | OP_EN);
        let s = v.source().stats();
        assert_eq!(s.source.events_opened, 2);
        assert_eq!((s.rings.guest_samples, s.source.delivered), (0, 0));
        assert_eq!(
            wakes.load(Ordering::SeqCst),
            0,
            "host-mode samples wake nobody"
        );
        assert!(!v.poll_inbox().interrupt_pending);
        assert_eq!(s.source.errors, 0, "{:?}", v.source_mut().take_error());
        drop(v); // stops and joins the reader thread
    }

    /// Burn `ns` of this thread's CPU time.
    fn spin_cpu(ns: u64) {
        let start = thread_cpu_ns();
        spin_until(|| thread_cpu_ns() - start >= ns);
    }

    /// Clear-before-start with a real ring: records of an enable period that the reader did
    /// not get to are discarded when the unit starts again, and never read. The reader is
    /// woken only once, when the event is opened (not per sample: `wakeup_events` is huge,
    /// and ~20 records stay far below the half-full mark at which perf wakes readers
    /// anyway); a trial in which that one wake-up came late and read the records is
    /// repeated.
    #[test]
    fn cpu_clock_records_of_an_earlier_period_are_discarded() {
        let (waker, _) = counting_waker();
        let mut v = device(CpuClockOpener::new(1_000_000), waker);
        write_op_ctl(&mut v, 0xFFFF | OP_EN); // opens the event: ~1 ms periods
        write_op_ctl(&mut v, 0);
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..5 {
            let before = v.source().stats().rings;
            write_op_ctl(&mut v, 0xFFFF | OP_EN);
            spin_cpu(20_000_000);
            write_op_ctl(&mut v, 0);
            let stopped = v.source().stats().rings;
            write_op_ctl(&mut v, 0xFFFF | OP_EN); // discards the unread records
            write_op_ctl(&mut v, 0);
            v.source().read_now();
            let after = v.source().stats().rings;
            if stopped.host_samples_dropped != before.host_samples_dropped {
                continue; // the reader's late wake-up read them: no records to discard
            }
            assert!(
                after.discarded_bytes >= before.discarded_bytes + 10 * 48,
                "{before:?} {after:?}"
            );
            assert_eq!(
                after.host_samples_dropped, stopped.host_samples_dropped,
                "a discarded record was read"
            );
            return;
        }
        panic!("the reader read the records in every trial");
    }
}
