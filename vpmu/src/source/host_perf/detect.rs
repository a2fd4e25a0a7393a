//! Finding the host's IBS PMUs, and the errors of the host-perf path with messages a user can
//! act on.
//!
//! Linux registers `ibs_fetch` and `ibs_op` under `/sys/bus/event_source/devices` on AMD
//! hosts with IBS; their `type` file holds the PMU type for `perf_event_attr.type`. The
//! directory is a parameter so tests can point it at a temporary tree.

use std::io;
use std::path::{Path, PathBuf};

/// Where Linux lists its PMUs.
pub const EVENT_SOURCE_DEVICES: &str = "/sys/bus/event_source/devices";
/// The sysctl that gates unprivileged perf use.
pub const PERF_EVENT_PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";
/// The op-sampling PMU.
pub const IBS_OP_PMU: &str = "ibs_op";
/// The fetch-sampling PMU.
pub const IBS_FETCH_PMU: &str = "ibs_fetch";

/// An error of the host-perf path.
#[derive(Debug, thiserror::Error)]
pub enum HostPerfError {
    /// The host has no such PMU: not an AMD host with IBS, or IBS hidden from this kernel.
    #[error(
        "host IBS unavailable: no `{pmu}` PMU ({} does not exist; not an AMD host with IBS, or \
         the kernel does not expose it); use the synthetic IBS source instead (--ibs synthetic)",
        path.display()
    )]
    NoPmu {
        /// The PMU name.
        pmu: &'static str,
        /// The directory that is missing.
        path: PathBuf,
    },
    /// The PMU's `type` file could not be read or parsed.
    #[error("host IBS: cannot read the PMU type from {}: {detail}", path.display())]
    PmuType {
        /// The `type` file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// `perf_event_open` was refused for lack of privilege.
    #[error(
        "host IBS: perf_event_open({what}) not permitted ({source}): IBS samples the kernel too, \
         so it needs {PERF_EVENT_PARANOID} <= 1 (it is {}) or CAP_PERFMON (or CAP_SYS_ADMIN) \
         for the VMM",
        paranoid.map_or_else(|| "unreadable".to_string(), |p| p.to_string())
    )]
    Permission {
        /// The event.
        what: String,
        /// The `perf_event_paranoid` value read at the time, if readable.
        paranoid: Option<i32>,
        /// EACCES or EPERM.
        source: io::Error,
    },
    /// `perf_event_open` failed otherwise.
    #[error("host IBS: perf_event_open({what}) failed: {source}")]
    Open {
        /// The event.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// Mapping the ring failed.
    #[error("host IBS: cannot map the perf ring of {what}: {detail}")]
    Mmap {
        /// The event.
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// A perf ioctl failed.
    #[error("host IBS: {name} on {what} failed: {source}")]
    Ioctl {
        /// The event.
        what: String,
        /// The ioctl.
        name: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl HostPerfError {
    /// Classify a `perf_event_open` failure of `what`: EACCES/EPERM are permission problems
    /// (with the current `perf_event_paranoid`), anything else an open error.
    pub fn from_open_error(what: &str, err: io::Error) -> HostPerfError {
        match err.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => HostPerfError::Permission {
                what: what.to_string(),
                paranoid: read_paranoid(Path::new(PERF_EVENT_PARANOID)),
                source: err,
            },
            _ => HostPerfError::Open {
                what: what.to_string(),
                source: err,
            },
        }
    }
}

/// The value of a `perf_event_paranoid` file, if it can be read.
pub fn read_paranoid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The PMU type of `pmu` under `devices` (normally [`EVENT_SOURCE_DEVICES`]).
pub fn pmu_type(devices: &Path, pmu: &'static str) -> Result<u32, HostPerfError> {
    let dir = devices.join(pmu);
    if !dir.is_dir() {
        return Err(HostPerfError::NoPmu { pmu, path: dir });
    }
    let path = dir.join("type");
    let text = std::fs::read_to_string(&path).map_err(|e| HostPerfError::PmuType {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    text.trim().parse().map_err(|_| HostPerfError::PmuType {
        path,
        detail: format!("{:?} is not a PMU type number", text.trim()),
    })
}

/// The PMU types of the host's IBS units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IbsPmus {
    /// `ibs_fetch` type.
    pub fetch: u32,
    /// `ibs_op` type.
    pub op: u32,
}

/// Find both IBS PMUs under `devices` (normally [`EVENT_SOURCE_DEVICES`]); `ibs_op` is
/// checked first, so a host without IBS is reported by that name.
pub fn detect(devices: &Path) -> Result<IbsPmus, HostPerfError> {
    let op = pmu_type(devices, IBS_OP_PMU)?;
    let fetch = pmu_type(devices, IBS_FETCH_PMU)?;
    Ok(IbsPmus { fetch, op })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "vpmu-detect-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn pmu(&self, name: &str, ty: Option<&str>) {
            let d = self.0.join(name);
            std::fs::create_dir_all(&d).unwrap();
            if let Some(t) = ty {
                std::fs::write(d.join("type"), t).unwrap();
            }
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn this_host_has_no_ibs() {
        // The development machines have no hardware PMU; skip where IBS does exist.
        if Path::new(EVENT_SOURCE_DEVICES).join(IBS_OP_PMU).exists() {
            return;
        }
        let err = detect(Path::new(EVENT_SOURCE_DEVICES)).unwrap_err();
        assert!(matches!(err, HostPerfError::NoPmu { pmu: "ibs_op", .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("/sys/bus/event_source/devices/ibs_op"),
            "{msg}"
        );
        assert!(msg.contains("synthetic"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        // The software PMU is there, through the same lookup.
        assert_eq!(
            pmu_type(Path::new(EVENT_SOURCE_DEVICES), "software").unwrap(),
            1
        );
    }

    #[test]
    fn temp_sysfs_trees() {
        let t = TempDir::new();
        let err = detect(&t.0).unwrap_err();
        assert!(
            matches!(err, HostPerfError::NoPmu { pmu: "ibs_op", ref path } if *path == t.0.join("ibs_op"))
        );
        t.pmu("ibs_op", Some("11\n"));
        let err = detect(&t.0).unwrap_err();
        assert!(
            matches!(
                err,
                HostPerfError::NoPmu {
                    pmu: "ibs_fetch",
                    ..
                }
            ),
            "{err}"
        );
        t.pmu("ibs_fetch", Some("10\n"));
        assert_eq!(detect(&t.0).unwrap(), IbsPmus { fetch: 10, op: 11 });
        t.pmu("ibs_fetch", Some("ten"));
        let err = detect(&t.0).unwrap_err();
        assert!(matches!(err, HostPerfError::PmuType { .. }));
        assert!(err.to_string().contains("ibs_fetch/type"), "{err}");
        let t2 = TempDir::new();
        t2.pmu("ibs_op", None);
        assert!(matches!(detect(&t2.0), Err(HostPerfError::PmuType { .. })));
    }

    #[test]
    fn permission_errors_name_paranoid_and_cap_perfmon() {
        for errno in [libc::EACCES, libc::EPERM] {
            let err = HostPerfError::from_open_error("ibs_op", io::Error::from_raw_os_error(errno));
            assert!(matches!(err, HostPerfError::Permission { .. }));
            let msg = err.to_string();
            for want in [
                "/proc/sys/kernel/perf_event_paranoid",
                "CAP_PERFMON",
                "ibs_op",
            ] {
                assert!(msg.contains(want), "{msg}");
            }
            assert!(!msg.contains('\n'));
        }
        let err =
            HostPerfError::from_open_error("ibs_op", io::Error::from_raw_os_error(libc::EINVAL));
        assert!(matches!(err, HostPerfError::Open { .. }));
        // The paranoid value is reported as read (this host has the file).
        let p = read_paranoid(Path::new(PERF_EVENT_PARANOID));
        assert!(p.is_some());
        let t = TempDir::new();
        std::fs::write(t.0.join("p"), "2\n").unwrap();
        assert_eq!(read_paranoid(&t.0.join("p")), Some(2));
        assert_eq!(read_paranoid(&t.0.join("missing")), None);
    }
}
