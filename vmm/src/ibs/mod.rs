//! The virtual IBS PMU in ibsvm: choosing a sample source, and the per-vCPU glue between
//! KVM exits and the `vpmu` device (MSRs, sample points, NMI injection, statistics).

pub mod guest_clock;
pub mod source;
pub mod test_port;
pub mod vcpu;

use std::path::Path;

use thiserror::Error;
use vpmu::source::host_perf::{HostIbs, HostPerfError, IbsOpener};
use vpmu::{Caps, Policy, RaceCheck};

pub use vpmu::source::host_perf::EVENT_SOURCE_DEVICES;

/// `--ibs`: where guest IBS samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IbsMode {
    /// Host IBS when the host has it, else synthetic.
    Auto,
    /// No IBS: the guest sees neither the CPUID bits nor the MSRs (#GP).
    Off,
    /// Samples taken by ibsvm itself from the running vCPU (any host).
    Synthetic,
    /// The host's IBS through perf_event_open (AMD hosts with an `ibs_op` PMU).
    Host,
}

/// Everything the command line says about IBS.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IbsSettings {
    /// Source selection.
    pub mode: IbsMode,
    /// Advertised capabilities.
    pub caps: Caps,
    /// Val ownership.
    pub policy: Policy,
    /// Race detection.
    pub race_check: RaceCheck,
    /// Seed of the synthetic source.
    pub seed: u64,
    /// Synthetic scale: guest nanoseconds per counted op/cycle.
    pub ns_per_op: f64,
}

impl Default for IbsSettings {
    fn default() -> Self {
        let synthetic = vpmu::SyntheticConfig::default();
        Self {
            mode: IbsMode::Auto,
            caps: Caps::PROFILE_ZEN3,
            policy: Policy::Protect,
            race_check: RaceCheck::Off,
            seed: synthetic.seed,
            ns_per_op: synthetic.ns_per_op,
        }
    }
}

/// The source actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IbsBackend {
    /// No IBS.
    Off,
    /// The synthetic source.
    Synthetic,
    /// The host's IBS, through perf.
    Host(HostIbs),
}

/// Errors choosing the IBS source.
#[derive(Debug, Error)]
pub enum IbsSelectError {
    /// `--ibs host` on a host whose IBS this process cannot use (the message says why:
    /// no `ibs_op` PMU, permission, kernel too old for per-thread IBS events).
    #[error("--ibs host: {0}; use --ibs synthetic (or auto) instead")]
    Host(#[source] HostPerfError),
}

/// The host's IBS under `sysfs` (normally [`EVENT_SOURCE_DEVICES`]), checked by opening (and
/// closing) one disabled event per unit on this thread the way each vCPU will: permission
/// problems and kernels without per-thread IBS events show up here, at start-up.
pub fn detect_host(sysfs: &Path) -> Result<HostIbs, HostPerfError> {
    let host = HostIbs::detect(sysfs)?;
    IbsOpener::new(host).probe()?;
    Ok(host)
}

/// Picks the backend for `mode`; `detect` finds the host's IBS (e.g. [`detect_host`]) and is
/// asked only for `host` and `auto`. Returns the backend and the line to log about it.
pub fn select(
    mode: IbsMode,
    detect: impl FnOnce() -> Result<HostIbs, HostPerfError>,
) -> Result<(IbsBackend, Option<String>), IbsSelectError> {
    let using_host = |host: &HostIbs| {
        format!(
            "guest IBS samples come from the host's IBS (PMU types ibs_fetch {}, ibs_op {}, \
             caps {:#x})",
            host.pmus.fetch, host.pmus.op, host.caps
        )
    };
    match mode {
        IbsMode::Off => Ok((IbsBackend::Off, None)),
        IbsMode::Synthetic => Ok((IbsBackend::Synthetic, None)),
        IbsMode::Host => {
            let host = detect().map_err(IbsSelectError::Host)?;
            Ok((IbsBackend::Host(host), Some(using_host(&host))))
        }
        IbsMode::Auto => Ok(match detect() {
            Ok(host) => (IbsBackend::Host(host), Some(using_host(&host))),
            Err(e) => (
                IbsBackend::Synthetic,
                Some(format!("--ibs auto: guest IBS samples are synthetic ({e})")),
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpmu::source::host_perf::IbsPmus;

    /// A sysfs tree under the temporary directory, removed on drop.
    struct FakeSysfs(std::path::PathBuf);

    impl FakeSysfs {
        fn new(name: &str) -> FakeSysfs {
            let dir = std::env::temp_dir().join(format!("ibsvm-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            FakeSysfs(dir)
        }
        fn pmu(&self, name: &str, ty: u32) {
            std::fs::create_dir_all(self.0.join(name)).unwrap();
            std::fs::write(self.0.join(name).join("type"), format!("{ty}\n")).unwrap();
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn unreachable_detect() -> Result<HostIbs, HostPerfError> {
        panic!("off and synthetic must not look at the host")
    }

    #[test]
    fn off_and_synthetic_never_probe_the_host() {
        assert_eq!(
            select(IbsMode::Off, unreachable_detect).unwrap().0,
            IbsBackend::Off
        );
        let (b, note) = select(IbsMode::Synthetic, unreachable_detect).unwrap();
        assert_eq!((b, note), (IbsBackend::Synthetic, None));
    }

    #[test]
    fn without_an_ibs_pmu_host_fails_and_auto_falls_back() {
        let sysfs = FakeSysfs::new("no-ibs");
        sysfs.pmu("software", 1);
        let err = select(IbsMode::Host, || detect_host(&sysfs.0)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("--ibs host: "), "{msg}");
        assert!(
            msg.contains("ibs_op") && msg.contains("--ibs synthetic"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
        let (b, note) = select(IbsMode::Auto, || detect_host(&sysfs.0)).unwrap();
        assert_eq!(b, IbsBackend::Synthetic);
        let note = note.unwrap();
        assert!(
            note.contains("synthetic") && note.contains("ibs_op"),
            "{note}"
        );
        assert!(!note.contains('\n'));
    }

    #[test]
    fn a_usable_host_pmu_is_selected_by_host_and_auto() {
        // The software PMU standing in for IBS: the probe really opens (cpu-clock) events.
        let sysfs = FakeSysfs::new("soft-ibs");
        sysfs.pmu("ibs_op", 1);
        sysfs.pmu("ibs_fetch", 1);
        for mode in [IbsMode::Host, IbsMode::Auto] {
            let (b, note) = select(mode, || detect_host(&sysfs.0)).unwrap();
            let IbsBackend::Host(host) = b else {
                panic!("{mode:?} chose {b:?}")
            };
            assert_eq!(host.pmus, IbsPmus { fetch: 1, op: 1 });
            assert!(note.unwrap().contains("host's IBS"));
        }
    }

    #[test]
    fn permission_and_kernel_problems_have_their_own_messages() {
        let denied = || {
            Err(HostPerfError::from_open_error(
                "ibs_op",
                std::io::Error::from_raw_os_error(libc::EACCES),
            ))
        };
        let msg = select(IbsMode::Host, denied).unwrap_err().to_string();
        assert!(
            msg.contains("perf_event_paranoid") && msg.contains("CAP_PERFMON"),
            "{msg}"
        );
        let (b, note) = select(IbsMode::Auto, denied).unwrap();
        assert_eq!(b, IbsBackend::Synthetic);
        assert!(note.unwrap().contains("CAP_PERFMON"));
        // A kernel that refuses per-thread IBS events (the breakpoint PMU refuses the probe's
        // attribute with EINVAL, as a pre-6.2 kernel refuses a per-thread IBS event).
        let sysfs = FakeSysfs::new("einval-ibs");
        sysfs.pmu("ibs_op", 5);
        sysfs.pmu("ibs_fetch", 5);
        let msg = select(IbsMode::Host, || detect_host(&sysfs.0))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("Linux 6.2"), "{msg}");
    }

    #[test]
    fn this_host_has_no_ibs_pmu() {
        // Our development machines have no hardware PMU; skip where IBS does exist.
        let sysfs = Path::new(EVENT_SOURCE_DEVICES);
        if sysfs.join("ibs_op").exists() {
            return;
        }
        let msg = select(IbsMode::Host, || detect_host(sysfs))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("/sys/bus/event_source/devices/ibs_op"),
            "{msg}"
        );
    }
}
