//! Test doubles for the host-perf source: an [`EventOpener`] whose events log their ioctls
//! and whose rings are plain memory the test writes records into, and builders of the
//! records a host IBS event would produce.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use super::attr::{
    IbsEventConfig, PerfEventAttr, ATTR_DISABLED, IBS_SAMPLE_TYPE, PERF_COUNT_SW_CPU_CLOCK,
    PERF_TYPE_SOFTWARE,
};
use super::backend::{EventOpener, PerfControl, RING_DATA_PAGES};
use super::detect::HostPerfError;
use super::event::{MmapRing, PerfEvent};
use super::raw;
use super::ring::{RingMemory, VecRing, PERF_RECORD_SAMPLE};
use crate::unit::UnitKind;

/// `PERF_RECORD_MISC_GUEST_KERNEL`.
pub const GUEST_KERNEL: u16 = 4;
/// `PERF_RECORD_MISC_KERNEL` (host).
pub const HOST_KERNEL: u16 = 1;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("test double lock")
}

/// The raw payload of an op sample with `caps`: OP_RIP = `rip`, DC_PHYSADDR set (to check
/// it is scrubbed), everything else 0.
pub fn op_raw(caps: u32, rip: u64) -> Vec<u8> {
    let mut v = caps.to_le_bytes().to_vec();
    for i in 0..raw::register_count(UnitKind::Op, caps) {
        let r = match i {
            1 => rip,
            6 => 0xDEAD_B000,
            _ => 0,
        };
        v.extend_from_slice(&r.to_le_bytes());
    }
    v
}

/// The body of a `PERF_RECORD_SAMPLE` of [`super::attr::IBS_SAMPLE_TYPE`] (IP, TID, TIME,
/// RAW) carrying `raw`.
pub fn sample_body(ip: u64, raw: &[u8]) -> Vec<u8> {
    let mut b = ip.to_le_bytes().to_vec();
    b.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0]); // pid, tid
    b.extend_from_slice(&99u64.to_le_bytes()); // time
    b.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    b.extend_from_slice(raw);
    b
}

/// One ring the test and the source share.
#[derive(Clone, Debug)]
pub struct SharedRing(Arc<Mutex<VecRing>>);

impl SharedRing {
    fn new() -> SharedRing {
        SharedRing(Arc::new(Mutex::new(VecRing::new(4096, 0))))
    }

    /// Append an op sample taken in `misc` mode with OP_RIP = `rip`.
    pub fn push_op(&self, misc: u16, rip: u64) {
        let body = sample_body(rip, &op_raw(0x3FF, rip));
        lock(&self.0).push(PERF_RECORD_SAMPLE, misc, &body);
    }

    /// Append any record.
    pub fn push(&self, kind: u32, misc: u16, body: &[u8]) {
        lock(&self.0).push(kind, misc, body);
    }

    /// Bytes written and not yet released by a reader.
    pub fn unread(&self) -> u64 {
        let r = lock(&self.0);
        r.load_head() - r.load_tail()
    }
}

impl RingMemory for SharedRing {
    fn data_size(&self) -> usize {
        lock(&self.0).data_size()
    }
    fn load_head(&self) -> u64 {
        lock(&self.0).load_head()
    }
    fn load_tail(&self) -> u64 {
        lock(&self.0).load_tail()
    }
    fn store_tail(&self, tail: u64) {
        lock(&self.0).store_tail(tail);
    }
    fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        lock(&self.0).copy_out(offset, dst);
    }
}

/// What happened to the fake events, in order, e.g. `"enable op/0x80000 unread=0"`.
#[derive(Clone, Debug, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, line: String) {
        lock(&self.0).push(line);
    }

    /// Take the lines logged so far.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.0))
    }
}

/// A fake event: logs each ioctl with the ring's unread bytes at that moment.
#[derive(Debug)]
pub struct FakeEvent {
    name: String,
    ring: SharedRing,
    log: Log,
}

impl FakeEvent {
    fn note(&self, what: &str) -> Result<(), HostPerfError> {
        self.log.push(format!(
            "{what} {} unread={}",
            self.name,
            self.ring.unread()
        ));
        Ok(())
    }
}

impl PerfControl for FakeEvent {
    fn enable(&self) -> Result<(), HostPerfError> {
        self.note("enable")
    }
    fn disable(&self) -> Result<(), HostPerfError> {
        self.note("disable")
    }
    fn set_period(&self, period: u64) -> Result<(), HostPerfError> {
        self.note(&format!("period={period:#x}"))
    }
    fn wakeup_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Opens fake events, named `unit/config`, and keeps their rings for the test.
#[derive(Clone, Debug, Default)]
pub struct FakeOpener {
    /// The ioctl log of every event.
    pub log: Log,
    rings: Arc<Mutex<Vec<(String, SharedRing)>>>,
    fail_config: Option<u64>,
}

fn name(unit: UnitKind, config: u64) -> String {
    format!("{unit}/{config:#x}")
}

impl FakeOpener {
    /// An opener whose opens of `config` fail (EMFILE).
    pub fn failing(config: u64) -> FakeOpener {
        FakeOpener {
            fail_config: Some(config),
            ..FakeOpener::default()
        }
    }

    /// The ring of the event opened for `unit` and `config`.
    pub fn ring(&self, unit: UnitKind, config: u64) -> SharedRing {
        let want = name(unit, config);
        lock(&self.rings)
            .iter()
            .find(|(n, _)| *n == want)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("no event {want} was opened"))
    }
}

impl EventOpener for FakeOpener {
    type Event = FakeEvent;
    type Ring = SharedRing;

    fn host_caps(&self) -> u32 {
        0xBFF
    }

    fn open(&mut self, config: &IbsEventConfig) -> Result<(FakeEvent, SharedRing), HostPerfError> {
        let n = name(config.unit, config.config);
        if self.fail_config == Some(config.config) {
            return Err(HostPerfError::Open {
                what: n,
                source: std::io::Error::from_raw_os_error(libc::EMFILE),
            });
        }
        self.log.push(format!("open {n}"));
        let ring = SharedRing::new();
        lock(&self.rings).push((n.clone(), ring.clone()));
        let event = FakeEvent {
            name: n,
            ring: ring.clone(),
            log: self.log.clone(),
        };
        Ok((event, ring))
    }
}

/// Opens real software events (cpu-clock of the calling thread, the period in ns of its CPU
/// time) with the IBS sample layout: real ioctls, a real ring and real wake-ups, whose
/// samples are all host-mode (so dropped and counted by the source).
#[derive(Clone, Copy, Debug)]
pub struct CpuClockOpener {
    wakeup_events: u32,
}

impl CpuClockOpener {
    /// Poll wake-ups every `wakeup_events` samples (at most `i32::MAX`: the kernel keeps it
    /// in an `int`).
    pub fn new(wakeup_events: u32) -> CpuClockOpener {
        CpuClockOpener { wakeup_events }
    }
}

impl EventOpener for CpuClockOpener {
    type Event = PerfEvent;
    type Ring = MmapRing;

    fn host_caps(&self) -> u32 {
        0x3FF
    }

    fn open(&mut self, config: &IbsEventConfig) -> Result<(PerfEvent, MmapRing), HostPerfError> {
        let attr = PerfEventAttr {
            sample_period: config.period,
            sample_type: IBS_SAMPLE_TYPE,
            flags: ATTR_DISABLED,
            wakeup_events: self.wakeup_events,
            ..PerfEventAttr::new(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK)
        };
        let event = PerfEvent::open(&attr, 0, -1, "cpu-clock")?;
        let ring = event.map_ring(RING_DATA_PAGES)?;
        Ok((event, ring))
    }
}
