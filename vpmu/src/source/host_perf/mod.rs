//! Building blocks of a host-IBS sample source: guest IBS backed by the host's IBS through
//! `perf_event_open(2)` on AMD hosts ([device model §6](crate::device_model)).
//!
//! **Why here, behind the `host-perf` feature.** The pieces are independent of KVM and of
//! any VMM: an embedder on an AMD host can reuse them with its own vCPU threads, so they
//! belong next to the [`crate::SampleSource`] trait they serve rather than inside one VMM.
//! But they need `libc` and `unsafe` system calls (perf_event_open, ioctl, mmap), which the
//! device model does not: by default vpmu stays dependency-free (beyond `thiserror`),
//! KVM-free and `unsafe`-free, and only `--features host-perf` compiles this module (Linux
//! only). The `unsafe` code is confined to [`event`].
//!
//! **Pieces.**
//! - [`HostPerfSource`]: the [`crate::SampleSource`] (module `source`): events opened lazily
//!   on the vCPU thread, one reader thread per source, delivery through
//!   [`crate::SampleSink`], the embedder's [`Waker`]. Its locking, clear-before-start and
//!   config-variant cache are described in the private module `units`.
//! - [`backend`]: the [`EventOpener`] / [`PerfControl`] traits the source is generic over,
//!   and [`IbsOpener`] (real `ibs_fetch` / `ibs_op` events; [`IbsOpener::probe`] checks at
//!   start-up that the kernel lets this process open them per thread).
//! - [`mod@detect`]: the IBS PMU types and caps from sysfs ([`HostIbs`], directory as a
//!   parameter) and [`HostPerfError`], whose messages say what is missing and what to use
//!   instead (no `ibs_op` PMU → the synthetic source; EACCES/EPERM → `perf_event_paranoid` /
//!   CAP_PERFMON; EINVAL on a per-thread event → Linux 6.2).
//! - [`attr`]: [`IbsEventConfig`] derives the host event from the guest's CTL (period
//!   MaxCnt × 16, CntCtl / RandEn / L3MissOnly only when guest and host caps allow) and
//!   builds the `perf_event_attr` (VER7 layout, [`PerfEventAttr`]).
//! - [`event`]: [`PerfEvent`] (open, ENABLE / DISABLE / RESET / PERIOD, close on drop), its
//!   mmapped ring [`MmapRing`], and `poll(2)` for the reader.
//! - [`ring`]: [`RingReader`] over any [`RingMemory`]: records with wrap-around,
//!   SAMPLE / LOST / THROTTLE / UNTHROTTLE, guest- vs host-mode samples by cpumode, and
//!   [`RingReader::discard_all`] for clear-before-start.
//! - [`raw`]: decoding of the IBS `PERF_SAMPLE_RAW` payload into [`crate::FetchSample`] /
//!   [`crate::OpSample`], physical addresses scrubbed.
//! - [`IbsReader`]: ring + guest-mode filter + decoding, with [`HostPerfStats`].
//!
//! **Guest vs host samples.** The IBS PMU cannot exclude the host (`exclude_guest` /
//! `exclude_host` → EINVAL), so samples taken while the vCPU thread ran host code (KVM, the
//! VMM) arrive too. The kernel marks samples taken in guest mode with cpumode
//! `PERF_RECORD_MISC_GUEST_KERNEL` / `GUEST_USER`; everything else is dropped and counted.

pub mod attr;
pub mod backend;
pub mod detect;
pub mod event;
#[cfg(test)]
mod fake;
pub mod raw;
mod reader;
pub mod ring;
mod source;
mod units;

pub use attr::{IbsEventConfig, PerfEventAttr};
pub use backend::{EventOpener, IbsOpener, PerfControl};
pub use detect::{detect, pmu_type, HostIbs, HostPerfError, IbsPmus, EVENT_SOURCE_DEVICES};
pub use event::{MmapRing, PerfEvent};
pub use raw::{decode, RawError, RawIbs};
pub use reader::Waker;
pub use ring::{CpuMode, Record, RingError, RingMemory, RingReader, RingStats, SampleRecord};
pub use source::{HostPerfSource, HostSourceStats};
pub use units::SourceCounters;

use std::ops::{Add, AddAssign};

use crate::unit::UnitKind;

/// Counters of the host-perf path of one unit (merge with `+`), for `--stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostPerfStats {
    /// Guest-mode samples decoded and passed on.
    pub guest_samples: u64,
    /// Host-mode samples dropped.
    pub host_samples_dropped: u64,
    /// Guest-mode samples whose raw payload was malformed (dropped).
    pub decode_errors: u64,
    /// Samples the kernel lost (`PERF_RECORD_LOST`).
    pub lost: u64,
    /// Times the kernel throttled the event (`PERF_RECORD_THROTTLE`).
    pub throttles: u64,
    /// Times it resumed (`PERF_RECORD_UNTHROTTLE`).
    pub unthrottles: u64,
    /// Bytes of earlier enable periods discarded at a start.
    pub discarded_bytes: u64,
    /// Malformed rings (skipped to the head).
    pub corrupt: u64,
}

impl Add for HostPerfStats {
    type Output = HostPerfStats;
    fn add(self, o: HostPerfStats) -> HostPerfStats {
        HostPerfStats {
            guest_samples: self.guest_samples + o.guest_samples,
            host_samples_dropped: self.host_samples_dropped + o.host_samples_dropped,
            decode_errors: self.decode_errors + o.decode_errors,
            lost: self.lost + o.lost,
            throttles: self.throttles + o.throttles,
            unthrottles: self.unthrottles + o.unthrottles,
            discarded_bytes: self.discarded_bytes + o.discarded_bytes,
            corrupt: self.corrupt + o.corrupt,
        }
    }
}

impl AddAssign for HostPerfStats {
    fn add_assign(&mut self, o: HostPerfStats) {
        *self = *self + o;
    }
}

/// The ring of one IBS unit's event: yields decoded guest-mode samples only.
#[derive(Debug)]
pub struct IbsReader<M> {
    ring: RingReader<M>,
    unit: UnitKind,
    decoded: u64,
    decode_errors: u64,
    last_error: Option<RawError>,
}

impl<M: RingMemory> IbsReader<M> {
    /// A reader of `mem`, the ring of an event made by [`IbsEventConfig::attr`] for `unit`.
    pub fn new(mem: M, unit: UnitKind) -> Result<IbsReader<M>, RingError> {
        Ok(IbsReader {
            ring: RingReader::new(mem, attr::IBS_SAMPLE_TYPE)?,
            unit,
            decoded: 0,
            decode_errors: 0,
            last_error: None,
        })
    }

    /// Drop everything buffered (call while the event is disabled, before enabling it for a
    /// new arming).
    pub fn discard_all(&mut self) -> u64 {
        self.ring.discard_all()
    }

    /// Hand each guest-mode sample, decoded, to `f`; host-mode samples, losses and throttling
    /// are counted. Returns the number of samples passed to `f`.
    pub fn read(&mut self, mut f: impl FnMut(RawIbs)) -> Result<usize, RingError> {
        let unit = self.unit;
        let mut passed = 0;
        let mut errors = 0;
        let mut last = None;
        self.ring.read(|rec| {
            let Record::Sample(s) = rec else { return };
            if !s.mode().is_guest() {
                return;
            }
            match decode(unit, s.raw.unwrap_or(&[])) {
                Ok(d) => {
                    passed += 1;
                    f(d);
                }
                Err(e) => {
                    errors += 1;
                    last = Some(e);
                }
            }
        })?;
        self.decoded += passed as u64;
        self.decode_errors += errors;
        self.last_error = last.or(self.last_error);
        Ok(passed)
    }

    /// The unit whose samples the ring holds.
    pub fn unit(&self) -> UnitKind {
        self.unit
    }

    /// The most recent decoding error, for a log line.
    pub fn last_error(&self) -> Option<RawError> {
        self.last_error
    }

    /// The counters.
    pub fn stats(&self) -> HostPerfStats {
        let r = self.ring.stats();
        HostPerfStats {
            guest_samples: self.decoded,
            host_samples_dropped: r.host_samples,
            decode_errors: self.decode_errors,
            lost: r.lost,
            throttles: r.throttles,
            unthrottles: r.unthrottles,
            discarded_bytes: r.discarded_bytes,
            corrupt: r.corrupt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ring::{VecRing, PERF_RECORD_LOST, PERF_RECORD_SAMPLE, PERF_RECORD_THROTTLE};
    use super::*;
    use crate::source::{OpSample, SampleRegs};

    fn ibs_sample(ip: u64, raw: &[u8]) -> Vec<u8> {
        let mut b = ip.to_le_bytes().to_vec();
        b.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0]);
        b.extend_from_slice(&99u64.to_le_bytes());
        b.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        b.extend_from_slice(raw);
        b
    }

    fn op_raw(caps: u32, rip: u64) -> Vec<u8> {
        let mut v = caps.to_le_bytes().to_vec();
        let n = raw::register_count(UnitKind::Op, caps);
        for i in 0..n as u64 {
            let r = match i {
                1 => rip,
                4 => 1 << 18, // DcPhyAddrValid
                6 => 0xDEAD_B000,
                _ => 0,
            };
            v.extend_from_slice(&r.to_le_bytes());
        }
        v
    }

    #[test]
    fn only_guest_samples_come_out_decoded() {
        let mut ring = VecRing::new(4096, 4000);
        ring.push(
            PERF_RECORD_SAMPLE,
            4,
            &ibs_sample(1, &op_raw(0x3FF, 0x1000)),
        ); // guest
        ring.push(
            PERF_RECORD_SAMPLE,
            1,
            &ibs_sample(2, &op_raw(0x3FF, 0x2000)),
        ); // host
        ring.push(
            PERF_RECORD_SAMPLE,
            5,
            &ibs_sample(3, &op_raw(0x3FF, 0x3000)),
        ); // guest
        ring.push(
            PERF_RECORD_SAMPLE,
            5,
            &ibs_sample(4, &op_raw(0x3FF, 0)[..20]),
        ); // bad
        ring.push(PERF_RECORD_LOST, 0, &[[0; 8], 3u64.to_le_bytes()].concat());
        ring.push(PERF_RECORD_THROTTLE, 0, &[0; 24]);
        let mut r = IbsReader::new(&mut ring, UnitKind::Op).unwrap();
        let mut rips = Vec::new();
        assert_eq!(
            r.read(|d| {
                let SampleRegs::Op(OpSample { rip, data3, .. }) = d.regs else {
                    panic!()
                };
                assert_eq!(data3, 0, "DcPhyAddrValid scrubbed");
                rips.push(rip);
            }),
            Ok(2)
        );
        assert_eq!(rips, [0x1000, 0x3000]);
        let s = r.stats();
        assert_eq!(s.guest_samples, 2);
        assert_eq!(s.host_samples_dropped, 1);
        assert_eq!(s.decode_errors, 1);
        assert!(matches!(
            r.last_error(),
            Some(RawError::Truncated { got: 20, .. })
        ));
        assert_eq!((s.lost, s.throttles), (3, 1));
        assert_eq!((s + s).lost, 6);
    }

    #[test]
    fn clear_before_start_drops_earlier_records() {
        let mut ring = VecRing::new(1024, 0);
        ring.push(PERF_RECORD_SAMPLE, 4, &ibs_sample(1, &op_raw(0x1F, 0x1000)));
        let mut r = IbsReader::new(&mut ring, UnitKind::Op).unwrap();
        assert!(r.discard_all() > 0);
        assert_eq!(r.read(|_| panic!("stale sample")), Ok(0));
        assert_eq!(r.stats().guest_samples, 0);
        assert!(r.stats().discarded_bytes > 0);
    }
}
