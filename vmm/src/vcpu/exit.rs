//! Exit dispatch: a function from one vCPU exit to what the vCPU loop does next.
//!
//! Kept free of KVM file descriptors so that it can be tested with fabricated exits.

use super::cpl0_emulation::completion::{completion_for, Completion};
use crate::devices::{PortIo, VcpuDevices};
use crate::stop::{CrashKind, GuestStop};
use crate::x86::msr;

/// KVM_SYSTEM_EVENT_SHUTDOWN / RESET (include/uapi/linux/kvm.h).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
/// KVM_INTERNAL_ERROR_EMULATION.
pub const INTERNAL_ERROR_EMULATION: u32 = 1;

/// One vCPU exit, in the terms dispatch needs.
#[derive(Debug)]
pub enum Exit<'a> {
    /// Port input.
    IoIn {
        /// Port.
        port: u16,
        /// Bytes to fill.
        data: &'a mut [u8],
    },
    /// Port output.
    IoOut {
        /// Port.
        port: u16,
        /// Bytes written.
        data: &'a [u8],
    },
    /// MMIO read of an address no device claims.
    MmioRead {
        /// Bytes to fill.
        data: &'a mut [u8],
    },
    /// MMIO write of an address no device claims.
    MmioWrite,
    /// RDMSR sent to userspace (filter, unknown or invalid).
    RdMsr {
        /// MSR index.
        index: u32,
        /// Value to return.
        data: &'a mut u64,
        /// Set to 1 to inject #GP.
        error: &'a mut u8,
    },
    /// WRMSR sent to userspace.
    WrMsr {
        /// MSR index.
        index: u32,
        /// Value written.
        value: u64,
        /// Set to 1 to inject #GP.
        error: &'a mut u8,
    },
    /// Triple fault (KVM_EXIT_SHUTDOWN); `idt_limit` is the guest IDTR limit at the time,
    /// `None` where KVM reset the vCPU before reporting it (AMD SVM: the VMCB is undefined
    /// after a shutdown intercept, so `shutdown_interception` in arch/x86/kvm/svm/svm.c
    /// INITs the vCPU), so the faulting state is lost.
    Shutdown {
        /// IDTR limit.
        idt_limit: Option<u16>,
    },
    /// KVM_EXIT_SYSTEM_EVENT.
    SystemEvent(u32),
    /// KVM_EXIT_INTERNAL_ERROR; for emulation failures, the instruction bytes.
    InternalError {
        /// Suberror.
        suberror: u32,
        /// Instruction bytes, if known.
        insn: Vec<u8>,
        /// Where they are.
        rip: u64,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry(u64),
    /// KVM_EXIT_DEBUG: a guest-debug breakpoint or single step.
    Debug {
        /// Guest RIP.
        pc: u64,
        /// DR6 at the exit.
        dr6: u64,
    },
    /// The vCPU was kicked out of the guest.
    Kicked(Kick),
    /// HLT (only without an in-kernel LAPIC; harmless to resume).
    Hlt,
    /// Anything else.
    Other(String),
}

/// How a kick ended a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// KVM_RUN failed with EINTR (or EAGAIN): the signal came before the guest ran, or
    /// `immediate_exit` was set.
    BeforeEntry,
    /// KVM_EXIT_INTR: the signal took the vCPU out of the guest.
    FromGuest,
}

impl Exit<'_> {
    /// The `--stats` counter of this exit.
    pub fn counter(&self) -> &'static str {
        match self {
            Exit::IoIn { .. } => "exit.io_in",
            Exit::IoOut { .. } => "exit.io_out",
            Exit::MmioRead { .. } | Exit::MmioWrite => "exit.mmio",
            Exit::RdMsr { .. } => "exit.rdmsr",
            Exit::WrMsr { .. } => "exit.wrmsr",
            Exit::Shutdown { .. } => "exit.shutdown",
            Exit::SystemEvent(_) => "exit.system_event",
            Exit::InternalError { .. } => "exit.internal_error",
            Exit::FailEntry(_) => "exit.fail_entry",
            Exit::Debug { .. } => "exit.debug",
            Exit::Kicked(Kick::BeforeEntry) => "exit.kick",
            Exit::Kicked(Kick::FromGuest) => "exit.intr",
            Exit::Hlt => "exit.hlt",
            Exit::Other(_) => "exit.other",
        }
    }
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Re-enter the guest.
    Resume,
    /// Complete the instruction the emulator rejected, then re-enter.
    Complete(Completion),
    /// The guest wrote LSTAR or SFMASK: write it through and update the syscall bridge.
    SyscallMsr {
        /// MSR index.
        index: u32,
        /// Value.
        value: u64,
    },
    /// The syscall bridge's #PF trap fired (breakpoint, single step, or planted int3).
    BridgeTrap {
        /// Guest RIP.
        pc: u64,
    },
    /// The VM is over; `Crash` stops carry vCPU 0, RIP 0 and no code until the loop fills
    /// them in.
    Stop(GuestStop),
}

/// The measures for CPL0-emulating hosts that dispatch applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchPolicy {
    /// Complete int3, fwait and fences (see [`completion_for`]).
    pub complete_instructions: bool,
    /// Route system calls (see [`super::cpl0_emulation::syscall_bridge`]): LSTAR/SFMASK writes and debug
    /// exits belong to the bridge.
    pub syscall_bridge: bool,
    /// `--null-msr`: an MSR trapped to userspace and answered with no device at all (reads
    /// 0, writes ignored), the baseline of MSR-exit benchmarks.
    pub null_msr: Option<u32>,
}

fn crash(kind: CrashKind) -> Outcome {
    Outcome::Stop(GuestStop::Crash {
        vcpu: 0,
        rip: 0,
        kind,
        code: Vec::new(),
    })
}

/// Decides what to do about one exit.
pub fn dispatch(
    exit: Exit<'_>,
    pio: &dyn PortIo,
    local: &mut dyn VcpuDevices,
    policy: DispatchPolicy,
) -> Outcome {
    match exit {
        Exit::IoIn { port, data } => {
            if !local.pio_read(port, data) {
                pio.pio_read(port, data);
            }
            Outcome::Resume
        }
        Exit::IoOut { port, data } => {
            if local.pio_write(port, data) {
                return Outcome::Resume;
            }
            pio.pio_write(port, data)
                .map_or(Outcome::Resume, Outcome::Stop)
        }
        Exit::MmioRead { data, .. } => {
            // Nothing is mapped there: reads float high, as on a PC bus.
            data.fill(0xff);
            Outcome::Resume
        }
        Exit::MmioWrite | Exit::Kicked(_) | Exit::Hlt => Outcome::Resume,
        Exit::RdMsr { index, data, .. } if Some(index) == policy.null_msr => {
            *data = 0;
            Outcome::Resume
        }
        Exit::WrMsr { index, .. } if Some(index) == policy.null_msr => Outcome::Resume,
        Exit::RdMsr { index, data, error } => {
            match local.rdmsr(index) {
                Some(Ok(value)) => *data = value,
                Some(Err(())) | None => *error = 1,
            }
            Outcome::Resume
        }
        Exit::WrMsr {
            index: index @ (msr::LSTAR | msr::SFMASK),
            value,
            ..
        } if policy.syscall_bridge => Outcome::SyscallMsr { index, value },
        Exit::Debug { pc, .. } if policy.syscall_bridge => Outcome::BridgeTrap { pc },
        Exit::Debug { pc, dr6 } => crash(CrashKind::UnhandledExit(format!(
            "debug exit at {pc:#x}, DR6 {dr6:#x}"
        ))),
        Exit::WrMsr {
            index,
            value,
            error,
        } => {
            if !matches!(local.wrmsr(index, value), Some(Ok(()))) {
                *error = 1;
            }
            Outcome::Resume
        }
        // A triple fault with an empty IDT is how Linux (reboot=t) and boot loaders reset on
        // purpose; with a usable IDT it is a crash.
        Exit::Shutdown { idt_limit: Some(0) } => {
            Outcome::Stop(GuestStop::Reset("triple fault with an empty IDT"))
        }
        Exit::Shutdown { idt_limit: Some(_) } => crash(CrashKind::TripleFault),
        // Deliberate or not cannot be told: a crash, so that a failure is never reported
        // as success.
        Exit::Shutdown { idt_limit: None } => crash(CrashKind::TripleFaultStateLost),
        Exit::SystemEvent(SYSTEM_EVENT_SHUTDOWN) => Outcome::Stop(GuestStop::PowerOff),
        Exit::SystemEvent(SYSTEM_EVENT_RESET) => {
            Outcome::Stop(GuestStop::Reset("KVM system event"))
        }
        Exit::SystemEvent(other) => {
            crash(CrashKind::UnhandledExit(format!("system event {other}")))
        }
        Exit::InternalError {
            suberror: INTERNAL_ERROR_EMULATION,
            insn,
            rip,
        } => match completion_for(&insn, rip).filter(|_| policy.complete_instructions) {
            Some(c) => Outcome::Complete(c),
            None => crash(CrashKind::EmulationFailure { insn }),
        },
        Exit::InternalError { suberror, .. } => crash(CrashKind::InternalError { suberror }),
        Exit::FailEntry(reason) => crash(CrashKind::FailEntry { reason }),
        Exit::Other(what) => crash(CrashKind::UnhandledExit(what)),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[derive(Default)]
    struct FakePio {
        writes: RefCell<Vec<(u16, Vec<u8>)>>,
    }

    impl PortIo for FakePio {
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            data.fill(port as u8);
        }
        fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestStop> {
            self.writes.borrow_mut().push((port, data.to_vec()));
            (port == 0xf4).then(|| GuestStop::TestExit(data[0]))
        }
    }

    /// Owns MSR 0x10 (reads 42, writes of odd values fault) and port 0xf5 (reads 0x1b,
    /// takes writes); nothing else.
    struct FakeVcpuDevices;

    impl VcpuDevices for FakeVcpuDevices {
        fn rdmsr(&mut self, index: u32) -> Option<Result<u64, ()>> {
            (index == 0x10).then_some(Ok(42))
        }
        fn wrmsr(&mut self, index: u32, value: u64) -> Option<Result<(), ()>> {
            (index == 0x10).then_some(if value % 2 == 0 { Ok(()) } else { Err(()) })
        }
        fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
            if port != 0xf5 {
                return false;
            }
            data.fill(0x1b);
            true
        }
        fn pio_write(&mut self, port: u16, _: &[u8]) -> bool {
            port == 0xf5
        }
    }

    const QUIRKS: DispatchPolicy = DispatchPolicy {
        complete_instructions: true,
        syscall_bridge: true,
        null_msr: None,
    };
    const NORMAL: DispatchPolicy = DispatchPolicy {
        complete_instructions: false,
        syscall_bridge: false,
        null_msr: None,
    };

    fn run(exit: Exit<'_>, policy: DispatchPolicy) -> Outcome {
        dispatch(exit, &FakePio::default(), &mut FakeVcpuDevices, policy)
    }

    #[test]
    fn port_io_goes_to_the_devices() {
        let pio = FakePio::default();
        let mut data = [0u8; 2];
        assert_eq!(
            dispatch(
                Exit::IoIn {
                    port: 0x3f8,
                    data: &mut data
                },
                &pio,
                &mut FakeVcpuDevices,
                NORMAL
            ),
            Outcome::Resume
        );
        assert_eq!(data, [0xf8, 0xf8]);
        let out = dispatch(
            Exit::IoOut {
                port: 0xf4,
                data: &[3],
            },
            &pio,
            &mut FakeVcpuDevices,
            NORMAL,
        );
        assert_eq!(out, Outcome::Stop(GuestStop::TestExit(3)));
        assert_eq!(pio.writes.borrow().as_slice(), &[(0xf4, vec![3])]);
    }

    #[test]
    fn the_vcpus_own_ports_come_first() {
        let pio = FakePio::default();
        let mut data = [0u8];
        let exit = Exit::IoIn {
            port: 0xf5,
            data: &mut data,
        };
        assert_eq!(
            dispatch(exit, &pio, &mut FakeVcpuDevices, NORMAL),
            Outcome::Resume
        );
        assert_eq!(data, [0x1b]);
        let exit = Exit::IoOut {
            port: 0xf5,
            data: &[1],
        };
        assert_eq!(
            dispatch(exit, &pio, &mut FakeVcpuDevices, NORMAL),
            Outcome::Resume
        );
        assert!(
            pio.writes.borrow().is_empty(),
            "not seen by the VM's devices"
        );
    }

    #[test]
    fn unclaimed_mmio_reads_all_ones() {
        let mut data = [0u8; 4];
        assert_eq!(
            run(Exit::MmioRead { data: &mut data }, NORMAL),
            Outcome::Resume
        );
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn msrs_nobody_owns_get_gp() {
        let (mut data, mut error) = (0, 0);
        run(
            Exit::RdMsr {
                index: 0x10,
                data: &mut data,
                error: &mut error,
            },
            NORMAL,
        );
        assert_eq!((data, error), (42, 0));
        run(
            Exit::RdMsr {
                index: 0xc0de,
                data: &mut data,
                error: &mut error,
            },
            NORMAL,
        );
        assert_eq!(error, 1);
        let mut error = 0;
        run(
            Exit::WrMsr {
                index: 0x10,
                value: 2,
                error: &mut error,
            },
            NORMAL,
        );
        assert_eq!(error, 0);
        run(
            Exit::WrMsr {
                index: 0x10,
                value: 3,
                error: &mut error,
            },
            NORMAL,
        );
        assert_eq!(error, 1, "the owner's fault becomes #GP");
        let mut error = 0;
        run(
            Exit::WrMsr {
                index: 0x11,
                value: 2,
                error: &mut error,
            },
            NORMAL,
        );
        assert_eq!(error, 1);
    }

    #[test]
    fn the_null_msr_reads_zero_without_a_device() {
        let policy = DispatchPolicy {
            null_msr: Some(0xc001_1ff0),
            ..NORMAL
        };
        let (mut data, mut error) = (7, 0);
        let exit = Exit::RdMsr {
            index: 0xc001_1ff0,
            data: &mut data,
            error: &mut error,
        };
        assert_eq!(run(exit, policy), Outcome::Resume);
        assert_eq!((data, error), (0, 0));
        let exit = Exit::WrMsr {
            index: 0xc001_1ff0,
            value: 5,
            error: &mut error,
        };
        assert_eq!(run(exit, policy), Outcome::Resume);
        assert_eq!(error, 0);
        let exit = Exit::RdMsr {
            index: 0xc001_1ff1,
            data: &mut data,
            error: &mut error,
        };
        run(exit, policy);
        assert_eq!(error, 1, "only that MSR");
    }

    #[test]
    fn triple_faults_are_resets_only_with_an_empty_idt() {
        assert_eq!(
            run(Exit::Shutdown { idt_limit: Some(0) }, NORMAL),
            Outcome::Stop(GuestStop::Reset("triple fault with an empty IDT"))
        );
        assert!(matches!(
            run(
                Exit::Shutdown {
                    idt_limit: Some(0xfff)
                },
                NORMAL
            ),
            Outcome::Stop(GuestStop::Crash {
                kind: CrashKind::TripleFault,
                ..
            })
        ));
        assert!(matches!(
            run(Exit::Shutdown { idt_limit: None }, NORMAL),
            Outcome::Stop(GuestStop::Crash {
                kind: CrashKind::TripleFaultStateLost,
                ..
            })
        ));
    }

    #[test]
    fn system_events() {
        assert_eq!(
            run(Exit::SystemEvent(SYSTEM_EVENT_SHUTDOWN), NORMAL),
            Outcome::Stop(GuestStop::PowerOff)
        );
        assert!(matches!(
            run(Exit::SystemEvent(SYSTEM_EVENT_RESET), NORMAL),
            Outcome::Stop(GuestStop::Reset(_))
        ));
        assert!(matches!(
            run(Exit::SystemEvent(9), NORMAL),
            Outcome::Stop(GuestStop::Crash { .. })
        ));
    }

    #[test]
    fn emulation_failures_complete_only_with_quirks() {
        let int3 = || Exit::InternalError {
            suberror: INTERNAL_ERROR_EMULATION,
            insn: vec![0xcc],
            rip: 0x1000,
        };
        assert_eq!(run(int3(), QUIRKS), Outcome::Complete(Completion::Int3));
        assert!(matches!(
            run(int3(), NORMAL),
            Outcome::Stop(GuestStop::Crash { .. })
        ));
        let popcnt = Exit::InternalError {
            suberror: INTERNAL_ERROR_EMULATION,
            insn: vec![0xf3, 0x0f, 0xb8, 0xc0],
            rip: 0x1000,
        };
        match run(popcnt, QUIRKS) {
            Outcome::Stop(GuestStop::Crash {
                kind: CrashKind::EmulationFailure { insn },
                ..
            }) => {
                assert_eq!(insn, vec![0xf3, 0x0f, 0xb8, 0xc0])
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run(
                Exit::InternalError {
                    suberror: 3,
                    insn: vec![],
                    rip: 0x1000,
                },
                QUIRKS
            ),
            Outcome::Stop(GuestStop::Crash {
                kind: CrashKind::InternalError { suberror: 3 },
                ..
            })
        ));
    }

    #[test]
    fn syscall_msrs_and_debug_exits_go_to_the_bridge() {
        let mut error = 0;
        let lstar = Exit::WrMsr {
            index: msr::LSTAR,
            value: 0xffff_ffff_8160_0080,
            error: &mut error,
        };
        assert_eq!(
            run(lstar, QUIRKS),
            Outcome::SyscallMsr {
                index: msr::LSTAR,
                value: 0xffff_ffff_8160_0080
            }
        );
        // Without the bridge nobody filters LSTAR; if a write came anyway it would be #GP.
        run(
            Exit::WrMsr {
                index: msr::LSTAR,
                value: 1,
                error: &mut error,
            },
            NORMAL,
        );
        assert_eq!(error, 1);
        assert_eq!(
            run(Exit::Debug { pc: 0x1000, dr6: 1 }, QUIRKS),
            Outcome::BridgeTrap { pc: 0x1000 }
        );
        assert!(matches!(
            run(Exit::Debug { pc: 0x1000, dr6: 1 }, NORMAL),
            Outcome::Stop(GuestStop::Crash { .. })
        ));
    }

    #[test]
    fn kicks_and_halts_resume() {
        assert_eq!(run(Exit::Kicked(Kick::FromGuest), NORMAL), Outcome::Resume);
        assert_eq!(run(Exit::Hlt, NORMAL), Outcome::Resume);
        assert!(matches!(
            run(Exit::FailEntry(7), NORMAL),
            Outcome::Stop(GuestStop::Crash {
                kind: CrashKind::FailEntry { reason: 7 },
                ..
            })
        ));
        assert!(matches!(
            run(Exit::Other("KVM_EXIT_TPR_ACCESS".into()), NORMAL),
            Outcome::Stop(GuestStop::Crash { .. })
        ));
    }
}
