//! Finding the host's IBS PMUs, and the errors of the host-perf path with messages a user can
//! act on.
//!
//! Linux registers `ibs_fetch` and `ibs_op` under `/sys/bus/event_source/devices` on AMD
//! hosts with IBS; their `type` file holds the PMU type for `perf_event_attr.type`. The
//! directory is a parameter so tests can point it at a temporary tree.

use std::io;
use std::path::{Path, PathBuf};

use crate::caps::Caps;
use crate::unit::UnitKind;

/// Where Linux lists its PMUs.
pub const EVENT_SOURCE_DEVICES: &str = "/sys/bus/event_source/devices";
/// The sysctl that gates unprivileged perf use.
pub const PERF_EVENT_PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";
/// The op-sampling PMU.
pub const IBS_OP_PMU: &str = "ibs_op";
/// The fetch-sampling PMU.
pub const IBS_FETCH_PMU: &str = "ibs_fetch";

/// `format/cnt_ctl` under `ibs_op`: shown only when the host has caps OPCNT
/// (`arch/x86/events/amd/ibs.c`, `cnt_ctl_is_visible`).
pub const OP_CNT_CTL_FORMAT: &str = "ibs_op/format/cnt_ctl";
/// `caps/zen4_ibs_extensions` under `ibs_op`: shown only when the host has caps ZEN4
/// (`ibs.c`, `zen4_ibs_extensions_is_visible`; Linux 5.19, commit 838de1d843fc). The same
/// condition shows the `l3missonly` format bits of both PMUs.
pub const OP_ZEN4_CAPS: &str = "ibs_op/caps/zen4_ibs_extensions";

/// An error of the host-perf path.
#[derive(Debug, thiserror::Error)]
pub enum HostPerfError {
    /// The host has no such PMU: not an AMD host with IBS, or IBS hidden from this kernel.
    #[error(
        "host IBS unavailable: no `{pmu}` PMU ({} does not exist; not an AMD host with IBS, or \
         the kernel does not expose it)",
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
    /// The kernel refused an IBS event that follows one thread (`pid` 0, `cpu` -1): before
    /// Linux 6.2 (commit 30093056f7b2, "perf/amd/ibs: Make IBS a core pmu") IBS events
    /// could only be opened per CPU, which cannot follow a vCPU thread.
    #[error(
        "host IBS: the kernel refused a per-thread {what} event ({source}); per-thread IBS \
         events need Linux 6.2 or later"
    )]
    PerThread {
        /// The event.
        what: String,
        /// EINVAL or EOPNOTSUPP.
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
    /// A perf ring of an opened event cannot be read.
    #[error("host IBS: {what}: {source}")]
    Ring {
        /// The event.
        what: String,
        /// Why.
        source: super::ring::RingError,
    },
    /// The source was armed before [`crate::source::host_perf::HostPerfSource::connect`]
    /// handed it the device's sample sink.
    #[error("host IBS: the source was armed before it was connected to a device's sample sink")]
    NotConnected,
    /// The reader thread could not be started or could not wait for samples.
    #[error("host IBS: reader thread: {what}: {source}")]
    Reader {
        /// What failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
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

/// What the host offers for host-IBS sampling: both PMU types and the part of its IBS caps
/// word that decides which event configurations the kernel accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostIbs {
    /// The PMU types.
    pub pmus: IbsPmus,
    /// A caps word (CPUID Fn8000_001B EAX layout) with AVAIL, FETCHSAM and OPSAM, plus OPCNT
    /// and ZEN4 as sysfs shows them ([`OP_CNT_CTL_FORMAT`], [`OP_ZEN4_CAPS`]). Other bits
    /// (OPCNTEXT among them) are not visible in sysfs and stay clear: op periods beyond
    /// MaxCnt's 16 bits are then clamped to 0xFFFF0 even on hosts that have OPCNTEXT.
    pub caps: u32,
}

impl HostIbs {
    /// The host's IBS under `devices` (normally [`EVENT_SOURCE_DEVICES`]).
    pub fn detect(devices: &Path) -> Result<HostIbs, HostPerfError> {
        let pmus = detect(devices)?;
        let mut caps = Caps::AVAIL | Caps::FETCHSAM | Caps::OPSAM;
        if devices.join(OP_CNT_CTL_FORMAT).exists() {
            caps |= Caps::OPCNT;
        }
        if devices.join(OP_ZEN4_CAPS).exists() {
            caps |= Caps::ZEN4;
        }
        Ok(HostIbs { pmus, caps })
    }

    /// The PMU type of `unit`.
    pub fn pmu_type(&self, unit: UnitKind) -> u32 {
        match unit {
            UnitKind::Fetch => self.pmus.fetch,
            UnitKind::Op => self.pmus.op,
        }
    }
}

/// The sysfs name of the PMU of `unit`.
pub fn pmu_name(unit: UnitKind) -> &'static str {
    match unit {
        UnitKind::Fetch => IBS_FETCH_PMU,
        UnitKind::Op => IBS_OP_PMU,
    }
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
        assert!(msg.contains("not an AMD host with IBS"), "{msg}");
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
    fn host_caps_follow_the_sysfs_attributes() {
        let t = TempDir::new();
        t.pmu("ibs_op", Some("11\n"));
        t.pmu("ibs_fetch", Some("10\n"));
        let base = Caps::AVAIL | Caps::FETCHSAM | Caps::OPSAM;
        let h = HostIbs::detect(&t.0).unwrap();
        assert_eq!(h.caps, base);
        assert_eq!(
            (h.pmu_type(UnitKind::Fetch), h.pmu_type(UnitKind::Op)),
            (10, 11)
        );
        std::fs::create_dir_all(t.0.join("ibs_op/format")).unwrap();
        std::fs::write(t.0.join(OP_CNT_CTL_FORMAT), "config:19\n").unwrap();
        assert_eq!(HostIbs::detect(&t.0).unwrap().caps, base | Caps::OPCNT);
        std::fs::create_dir_all(t.0.join("ibs_op/caps")).unwrap();
        std::fs::write(t.0.join(OP_ZEN4_CAPS), "1\n").unwrap();
        assert_eq!(
            HostIbs::detect(&t.0).unwrap().caps,
            base | Caps::OPCNT | Caps::ZEN4
        );
        assert_eq!(pmu_name(UnitKind::Op), "ibs_op");
        assert_eq!(pmu_name(UnitKind::Fetch), "ibs_fetch");
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
