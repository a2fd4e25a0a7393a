//! What a [`super::HostPerfSource`] needs from the host, as two traits, and their real
//! implementation on Linux's IBS PMUs.
//!
//! - [`EventOpener`] opens one disabled event (and maps its ring) for an
//!   [`IbsEventConfig`] on the calling thread. [`IbsOpener`] opens `ibs_fetch` / `ibs_op`
//!   events; tests open software (cpu-clock) events with real ioctls and real rings, or
//!   fakes with rings in plain memory.
//! - [`PerfControl`] is what the source does to an open event afterwards: the ENABLE,
//!   DISABLE and PERIOD ioctls, and the descriptor its reader thread polls.

use std::os::fd::RawFd;

use super::attr::IbsEventConfig;
use super::detect::{pmu_name, HostIbs, HostPerfError};
use super::event::{MmapRing, PerfEvent};
use super::ring::RingMemory;
use crate::unit::UnitKind;

/// Data pages of each event's ring (8 KiB with 4 KiB pages, 12 KiB mapped with the
/// metadata page): an IBS op record is about 120 bytes and the source needs one sample per
/// arming, so this holds ~65 records of slack between reader wake-ups before the kernel
/// counts losses, while a VM's rings stay small against the per-user locked-memory limit
/// for perf rings (`perf_event_mlock_kb`, 516 KiB by default).
pub const RING_DATA_PAGES: usize = 2;

/// The ioctls the source issues on an open event.
pub trait PerfControl: Send {
    /// `PERF_EVENT_IOC_ENABLE`.
    fn enable(&self) -> Result<(), HostPerfError>;
    /// `PERF_EVENT_IOC_DISABLE`. Synchronous: once it returns, the event writes no more
    /// records (the kernel stops it on the CPU it runs on before the ioctl returns).
    fn disable(&self) -> Result<(), HostPerfError>;
    /// `PERF_EVENT_IOC_PERIOD`. Also restarts the period count from zero
    /// (`kernel/events/core.c`, `__perf_event_period` clears `period_left`).
    fn set_period(&self, period: u64) -> Result<(), HostPerfError>;
    /// The descriptor that polls readable when the ring has new records to wake up for
    /// (`wakeup_events`), or `None` when there is nothing to wait on (a test double).
    fn wakeup_fd(&self) -> Option<RawFd>;
}

impl PerfControl for PerfEvent {
    fn enable(&self) -> Result<(), HostPerfError> {
        PerfEvent::enable(self)
    }
    fn disable(&self) -> Result<(), HostPerfError> {
        PerfEvent::disable(self)
    }
    fn set_period(&self, period: u64) -> Result<(), HostPerfError> {
        PerfEvent::set_period(self, period)
    }
    fn wakeup_fd(&self) -> Option<RawFd> {
        Some(self.raw_fd())
    }
}

/// Opens the events of a source, always on the vCPU thread that arms it.
pub trait EventOpener: Send {
    /// The event handle.
    type Event: PerfControl + 'static;
    /// Its ring.
    type Ring: RingMemory + Send + 'static;
    /// The host's IBS caps word that guest CTLs are translated against
    /// ([`IbsEventConfig::from_guest`]).
    fn host_caps(&self) -> u32;
    /// Open a **disabled** event for `config` that follows the calling thread, and map its
    /// ring.
    fn open(&mut self, config: &IbsEventConfig)
        -> Result<(Self::Event, Self::Ring), HostPerfError>;
}

/// Opens `ibs_fetch` / `ibs_op` events for the calling thread (`pid` 0, `cpu` -1: the
/// event follows the thread from CPU to CPU, and counts while it is inside `KVM_RUN`).
#[derive(Clone, Copy, Debug)]
pub struct IbsOpener {
    host: HostIbs,
}

impl IbsOpener {
    /// An opener for the host's IBS PMUs.
    pub fn new(host: HostIbs) -> IbsOpener {
        IbsOpener { host }
    }

    /// Open, map and close one disabled event per unit on the calling thread, the way a
    /// vCPU will: at start-up, this turns "not allowed" and "not supported by this kernel"
    /// into an error before any guest runs. EACCES/EPERM → [`HostPerfError::Permission`]
    /// (names `perf_event_paranoid` and CAP_PERFMON); EINVAL/EOPNOTSUPP →
    /// [`HostPerfError::PerThread`] (per-thread IBS events need Linux 6.2); a ring that
    /// cannot be mapped → [`HostPerfError::Mmap`].
    pub fn probe(&self) -> Result<(), HostPerfError> {
        let mut opener = *self;
        for unit in UnitKind::ALL {
            // The smallest CTL a guest could write; the period does not matter here.
            let config =
                IbsEventConfig::from_guest(unit, 0, crate::Caps::default(), self.host.caps);
            match opener.open(&config) {
                Ok(opened) => drop(opened),
                Err(HostPerfError::Open { what, source })
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                    ) =>
                {
                    return Err(HostPerfError::PerThread { what, source })
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl EventOpener for IbsOpener {
    type Event = PerfEvent;
    type Ring = MmapRing;

    fn host_caps(&self) -> u32 {
        self.host.caps
    }

    fn open(&mut self, config: &IbsEventConfig) -> Result<(PerfEvent, MmapRing), HostPerfError> {
        let event = PerfEvent::open(
            &config.attr(self.host.pmu_type(config.unit)),
            0,
            -1,
            pmu_name(config.unit),
        )?;
        let ring = event.map_ring(RING_DATA_PAGES)?;
        Ok((event, ring))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::host_perf::attr::PERF_TYPE_SOFTWARE;
    use crate::source::host_perf::detect::IbsPmus;

    /// An "IBS" whose PMU types are the software PMU: its config 0 is cpu-clock, so the
    /// real open path (attributes, ioctls, mmap) runs on this machine without IBS.
    fn software_as_ibs() -> HostIbs {
        HostIbs {
            pmus: IbsPmus {
                fetch: PERF_TYPE_SOFTWARE,
                op: PERF_TYPE_SOFTWARE,
            },
            caps: 0x7,
        }
    }

    #[test]
    fn probe_and_open_run_the_real_path() {
        let mut opener = IbsOpener::new(software_as_ibs());
        opener.probe().expect("a software event opens per thread");
        assert_eq!(opener.host_caps(), 0x7);
        let config = IbsEventConfig::from_guest(UnitKind::Op, 0x1000, crate::Caps::default(), 0x7);
        let (event, ring) = opener.open(&config).unwrap();
        assert!(event.wakeup_fd().is_some());
        assert!(ring.data_size() >= RING_DATA_PAGES * 4096);
        PerfControl::set_period(&event, 0x20000).unwrap();
        PerfControl::enable(&event).unwrap();
        PerfControl::disable(&event).unwrap();
    }

    /// Set in the child process the next test starts as an unprivileged user.
    const UNPRIVILEGED_CHILD: &str = "VPMU_TEST_UNPRIVILEGED_CHILD";

    /// A real EACCES: with `perf_event_paranoid` >= 2 an unprivileged process may not open
    /// an event that includes the kernel, which every IBS event does. Run as root (as on our
    /// machines), the test re-runs itself as `nobody` for that.
    #[test]
    fn an_unprivileged_probe_gets_the_permission_message() {
        use crate::source::host_perf::detect::{read_paranoid, PERF_EVENT_PARANOID};
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::process::CommandExt;
        let paranoid = read_paranoid(std::path::Path::new(PERF_EVENT_PARANOID));
        if paranoid.map_or(true, |p| p < 2) {
            eprintln!("perf_event_paranoid {paranoid:?} lets everyone profile the kernel: skipped");
            return;
        }
        let euid = std::fs::metadata("/proc/self").unwrap().uid();
        if euid != 0 || std::env::var_os(UNPRIVILEGED_CHILD).is_some() {
            let err = IbsOpener::new(software_as_ibs()).probe().unwrap_err();
            assert!(
                matches!(err, HostPerfError::Permission { paranoid: Some(p), .. } if p >= 2),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("perf_event_paranoid") && msg.contains("CAP_PERFMON"),
                "{msg}"
            );
            return;
        }
        let name =
            "source::host_perf::backend::tests::an_unprivileged_probe_gets_the_permission_message";
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads", "1"])
            .env(UNPRIVILEGED_CHILD, "1")
            .uid(65534)
            .gid(65534)
            .output();
        let out = match child {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("`nobody` cannot run this test binary ({e}): skipped");
                return;
            }
            Err(e) => panic!("running the test as nobody: {e}"),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "as nobody: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn probe_classifies_a_refused_pmu() {
        // A PMU type no kernel has: ENOENT, which is neither permission nor per-thread.
        let opener = IbsOpener::new(HostIbs {
            pmus: IbsPmus {
                fetch: 0x7FFF_FFF0,
                op: 0x7FFF_FFF0,
            },
            caps: 0x7,
        });
        let err = opener.probe().unwrap_err();
        assert!(matches!(err, HostPerfError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("ibs_fetch"), "{err}");
        // EINVAL from the kernel, for real: the breakpoint PMU (`PERF_TYPE_BREAKPOINT` = 5,
        // include/uapi/linux/perf_event.h) refuses an attribute with no breakpoint type.
        let opener = IbsOpener::new(HostIbs {
            pmus: IbsPmus { fetch: 5, op: 5 },
            caps: 0x7,
        });
        let err = opener.probe().unwrap_err();
        assert!(matches!(err, HostPerfError::PerThread { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("Linux 6.2") && msg.contains("per-thread"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }
}
