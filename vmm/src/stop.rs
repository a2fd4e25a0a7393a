//! Why a VM stopped, and the exit status `ibsvm` reports for it.

use std::fmt;

/// Exit status when the guest crashed (unexpected triple fault, an instruction the
/// emulator rejects and ibsvm cannot complete, a failed VM entry).
pub const EXIT_GUEST_CRASH: u8 = 120;
/// Exit status when `--ibs-race-check fail` caught the guest kernel in the IBS race.
pub const EXIT_IBS_RACE: u8 = 121;
/// Exit status when ibsvm itself failed (bad input, KVM errors).
pub const EXIT_VMM_ERROR: u8 = 1;
// Usage errors exit with status 2, clap's.

/// How a guest crashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashKind {
    /// KVM_EXIT_SHUTDOWN with a valid IDT: a triple fault nobody asked for.
    TripleFault,
    /// KVM_EXIT_SHUTDOWN after KVM reset the vCPU (AMD SVM): deliberate or not is unknown.
    TripleFaultStateLost,
    /// The instruction emulator failed on an instruction ibsvm cannot complete.
    EmulationFailure {
        /// The instruction bytes (empty if unknown).
        insn: Vec<u8>,
    },
    /// KVM reported an internal error other than an emulation failure.
    InternalError {
        /// KVM_INTERNAL_ERROR_* suberror.
        suberror: u32,
    },
    /// VM entry failed.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// An exit reason ibsvm does not handle.
    UnhandledExit(String),
}

impl fmt::Display for CrashKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TripleFault => write!(f, "triple fault"),
            Self::TripleFaultStateLost => write!(
                f,
                "triple fault (this host's KVM resets the vCPU at a shutdown, as on AMD SVM: \
                 the RIP and code below are the reset state, and whether the IDT was empty \
                 (a deliberate reset) is unknown)"
            ),
            Self::EmulationFailure { insn } if insn.is_empty() => {
                write!(
                    f,
                    "instruction emulation failed (instruction bytes unknown)"
                )
            }
            Self::EmulationFailure { insn } => {
                write!(f, "instruction emulation failed on bytes")?;
                insn.iter().try_for_each(|b| write!(f, " {b:02x}"))
            }
            Self::InternalError { suberror } => {
                write!(f, "KVM internal error, suberror {suberror}")
            }
            Self::FailEntry { reason } => write!(f, "VM entry failed, hardware reason {reason:#x}"),
            Self::UnhandledExit(what) => write!(f, "unhandled exit: {what}"),
        }
    }
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest wrote `status` to the test-exit port.
    TestExit(u8),
    /// The guest asked for a reset (i8042, a deliberate triple fault, KVM system event).
    Reset(&'static str),
    /// The guest powered off.
    PowerOff,
    /// Every vCPU halted with interrupts disabled, where nothing can wake it: Linux's halt,
    /// and its power-off on a machine without ACPI (see `crate::vcpu::halt`).
    Halted,
    /// `--ibs-race-check fail`: the guest kernel hit the stale-Val IBS race.
    IbsRace {
        /// Which vCPU.
        vcpu: u8,
        /// The device's report.
        report: String,
    },
    /// ibsvm got SIGINT or SIGTERM: the VM was stopped from outside.
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// The guest crashed.
    Crash {
        /// Which vCPU.
        vcpu: u8,
        /// Guest RIP at the time.
        rip: u64,
        /// What happened.
        kind: CrashKind,
        /// The bytes at RIP (up to 15, empty if unreadable).
        code: Vec<u8>,
    },
}

impl GuestStop {
    /// The process exit status for this stop.
    pub fn exit_status(&self) -> u8 {
        match self {
            Self::TestExit(status) => *status,
            Self::Reset(_) | Self::PowerOff | Self::Halted => 0,
            Self::Crash { .. } => EXIT_GUEST_CRASH,
            Self::IbsRace { .. } => EXIT_IBS_RACE,
            // The shell's convention for a command ended by a signal.
            Self::Interrupted { signal } => 128u8.wrapping_add(*signal as u8),
        }
    }
}

impl fmt::Display for GuestStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TestExit(s) => write!(f, "guest wrote {s} to the test-exit port"),
            Self::Reset(how) => write!(f, "guest reset ({how})"),
            Self::PowerOff => write!(f, "guest powered off"),
            Self::Halted => write!(
                f,
                "guest halted every vCPU with interrupts disabled (a halt, or a power-off on this VM without ACPI)"
            ),
            Self::IbsRace { vcpu, report } => write!(f, "vCPU {vcpu}: {report}"),
            Self::Interrupted { signal } => write!(
                f,
                "stopped by {}",
                match *signal {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    _ => "a signal",
                }
            ),
            Self::Crash {
                vcpu,
                rip,
                kind,
                code,
            } => {
                write!(f, "guest crashed on vCPU {vcpu} at RIP {rip:#x}: {kind}")?;
                if !code.is_empty() && !matches!(kind, CrashKind::EmulationFailure { .. }) {
                    write!(f, "; code at RIP:")?;
                    code.iter().try_for_each(|b| write!(f, " {b:02x}"))?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(GuestStop::TestExit(7).exit_status(), 7);
        assert_eq!(GuestStop::Reset("i8042").exit_status(), 0);
        assert_eq!(GuestStop::PowerOff.exit_status(), 0);
        assert_eq!(GuestStop::Halted.exit_status(), 0);
        let crash = GuestStop::Crash {
            vcpu: 1,
            rip: 0x1000,
            kind: CrashKind::EmulationFailure {
                insn: vec![0x0f, 0xb8],
            },
            code: vec![0x0f, 0xb8, 0xc0],
        };
        assert_eq!(crash.exit_status(), EXIT_GUEST_CRASH);
        assert_eq!(
            crash.to_string(),
            "guest crashed on vCPU 1 at RIP 0x1000: instruction emulation failed on bytes 0f b8"
        );
        let triple = GuestStop::Crash {
            vcpu: 0,
            rip: 0x2000,
            kind: CrashKind::TripleFault,
            code: vec![0x48, 0x8b, 0x00],
        };
        assert_eq!(
            triple.to_string(),
            "guest crashed on vCPU 0 at RIP 0x2000: triple fault; code at RIP: 48 8b 00"
        );
    }
}
