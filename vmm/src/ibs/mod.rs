//! The virtual IBS PMU in ibsvm: choosing a sample source, and the per-vCPU glue between
//! KVM exits and the `vpmu` device (MSRs, sample points, NMI injection, statistics).

pub mod test_port;
pub mod vcpu;

use std::path::Path;

use thiserror::Error;
use vpmu::{Caps, Policy, RaceCheck};

/// `--ibs`: where guest IBS samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// Where the kernel lists perf PMUs.
pub const PMU_SYSFS: &str = "/sys/bus/event_source/devices";

/// Errors choosing the IBS source.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IbsSelectError {
    /// `--ibs host` on a host without IBS.
    #[error("--ibs host: this host has no IBS PMU (no {0}/ibs_op); use --ibs synthetic (or auto)")]
    NoHostIbs(String),
    /// `--ibs host` on a host with IBS: this build samples synthetically only.
    #[error("--ibs host: the host has an IBS PMU, but this ibsvm build has no host-IBS sample source yet; use --ibs synthetic")]
    HostSourceUnavailable,
}

/// Whether the host exposes an IBS op PMU under `sysfs` (normally [`PMU_SYSFS`]).
pub fn host_has_ibs(sysfs: &Path) -> bool {
    sysfs.join("ibs_op/type").exists()
}

/// Picks the backend for `mode`, given whether the host has IBS. Returns the backend and,
/// for `auto`, the line to log.
pub fn select(
    mode: IbsMode,
    host_ibs: bool,
) -> Result<(IbsBackend, Option<&'static str>), IbsSelectError> {
    match (mode, host_ibs) {
        (IbsMode::Off, _) => Ok((IbsBackend::Off, None)),
        (IbsMode::Synthetic, _) => Ok((IbsBackend::Synthetic, None)),
        (IbsMode::Auto, false) => Ok((IbsBackend::Synthetic, Some("the host has no IBS PMU: guest IBS samples are synthetic"))),
        (IbsMode::Auto, true) => Ok((
            IbsBackend::Synthetic,
            Some("the host has an IBS PMU, but this build has no host-IBS source: guest IBS samples are synthetic"),
        )),
        (IbsMode::Host, false) => Err(IbsSelectError::NoHostIbs(PMU_SYSFS.into())),
        (IbsMode::Host, true) => Err(IbsSelectError::HostSourceUnavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection() {
        assert_eq!(select(IbsMode::Off, true).unwrap().0, IbsBackend::Off);
        assert_eq!(
            select(IbsMode::Synthetic, false).unwrap(),
            (IbsBackend::Synthetic, None)
        );
        let (b, note) = select(IbsMode::Auto, false).unwrap();
        assert_eq!(b, IbsBackend::Synthetic);
        assert!(note.unwrap().contains("synthetic"));
        assert_eq!(
            select(IbsMode::Host, false).unwrap_err(),
            IbsSelectError::NoHostIbs(PMU_SYSFS.into())
        );
        assert!(select(IbsMode::Host, false)
            .unwrap_err()
            .to_string()
            .contains("ibs_op"));
    }

    #[test]
    fn host_detection_reads_sysfs() {
        let dir = std::env::temp_dir().join(format!("ibsvm-pmu-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("ibs_op")).unwrap();
        assert!(!host_has_ibs(&dir));
        std::fs::write(dir.join("ibs_op/type"), "11\n").unwrap();
        assert!(host_has_ibs(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
