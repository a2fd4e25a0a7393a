//! vCPUs: their initial state and the thread loop that runs them.

pub mod context;
pub mod cpl0_emulation;
pub mod cpu_clock;
pub mod exit;
pub mod guest_walk;
pub mod halt;
pub mod kvm_exits;
pub mod profile;
pub mod timer;

use kvm_bindings::{
    kvm_msr_entry, kvm_sregs, CpuId, Msrs, KVM_INTERNAL_ERROR_EMULATION, KVM_MP_STATE_HALTED,
};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::boot::cpu;
use crate::devices::{NoVcpuDevices, VcpuDevices};
use crate::ibs::vcpu::{ExitState, VcpuIbs};
use crate::kick;
use crate::stats::Counters;
use crate::stop::GuestStop;
use crate::x86::{msr, rflags};
use context::VcpuContext;
use cpl0_emulation::completion::xsave_area::Layout;
use cpl0_emulation::completion::xstate::XstateError;
use cpl0_emulation::syscall_bridge::SyscallBridge;
use cpu_clock::thread_cpu_time;
use exit::{dispatch, DispatchPolicy, Exit, Kick, Outcome};
use halt::VcpuActivity;
use kvm_exits::{KvmExits, KvmExitsError};
use profile::GuestProfiler;
use timer::KickTimer;
use vpmu::Interrupt;

/// Local APIC register offsets and LVT delivery modes (Intel SDM vol. 3A §10.5.1).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0b100 << 8;
const APIC_MODE_EXTINT: u32 = 0b111 << 8;
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES (include/uapi/linux/kvm.h).
const EMULATION_FLAG_INSN_BYTES: u64 = 1;

/// Errors setting up or running a vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed: {source}")]
    Ioctl {
        /// vCPU index.
        id: u8,
        /// Which ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// The guest's IDT gate for #PF could not be read through its page tables.
    #[error("vCPU {id}: cannot read the guest's #PF gate at {va:#x}")]
    PfGateUnreadable {
        /// vCPU index.
        id: u8,
        /// Guest virtual address of the gate.
        va: u64,
    },
    /// The #PF exception frame on the guest stack could not be read.
    #[error("vCPU {id}: cannot read the #PF frame at {rsp:#x}")]
    PfFrameUnreadable {
        /// vCPU index.
        id: u8,
        /// The guest's RSP.
        rsp: u64,
    },
    /// A debug exit ibsvm did not ask for.
    #[error("vCPU {id}: debug exit at {pc:#x}, not at the #PF trap")]
    StrayDebugExit {
        /// vCPU index.
        id: u8,
        /// Where.
        pc: u64,
    },
    /// Another vCPU thread panicked while holding a lock this one needs.
    #[error("vCPU {id}: the {what} lock is poisoned (another vCPU thread panicked)")]
    Poisoned {
        /// vCPU index.
        id: u8,
        /// Which lock.
        what: &'static str,
    },
    /// The vCPU's kick timer could not be created or armed.
    #[error("vCPU {id}: sample timer: {source}")]
    Timer {
        /// vCPU index.
        id: u8,
        /// The error.
        source: std::io::Error,
    },
    /// Completing an instruction failed on ibsvm's side.
    #[error("vCPU {id}: {insn} at {rip:#x}: {source}")]
    Completion {
        /// vCPU index.
        id: u8,
        /// Which instruction (its counter name).
        insn: &'static str,
        /// Where.
        rip: u64,
        /// What failed.
        source: XstateError,
    },
    /// Building an MSR list for KVM_SET_MSRS failed.
    #[error("vCPU {id}: cannot build an MSR list for KVM_SET_MSRS")]
    MsrList {
        /// vCPU index.
        id: u8,
    },
    /// KVM's exit counter could not be read.
    #[error("vCPU {id}: {source}")]
    KvmExits {
        /// vCPU index.
        id: u8,
        /// What failed.
        source: KvmExitsError,
    },
}

/// One vCPU and what its thread needs.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    mem: GuestMemoryMmap,
    policy: DispatchPolicy,
    ibs: Option<VcpuIbs>,
    profiler: Option<GuestProfiler>,
    bridge: SyscallBridge,
    counters: Counters,
    /// CPU time (ns) this thread spent inside KVM_RUN in all (see [`cpu_clock`]).
    run_ns: u64,
    /// A kick ended the last KVM_RUN (the timer, or another thread), not the guest's own
    /// instruction.
    kicked: bool,
    /// KVM's exit counter, for the IBS clock; opened on the vCPU thread.
    kvm_exits: Option<KvmExits>,
    /// Stops the vCPU at IBS sample points and profiler ticks; created on the vCPU thread.
    timer: Option<KickTimer>,
    /// What the timer was armed for at the last entry (wall ns), if it was.
    armed_ns: Option<u64>,
    /// The last [`halt::HaltWatch`] round this vCPU reported in.
    halt_round: u64,
    /// Where the guest's CPUID places each XSAVE component (for completed XSAVE/XRSTOR).
    xsave_layout: Layout,
}

/// What a vCPU thread hands back when the VM ends.
#[derive(Debug, Default)]
pub struct VcpuReport {
    /// Exit counters.
    pub counters: Counters,
    /// `--guest-profile` RIP samples.
    pub profile: Vec<u64>,
}

impl Vcpu {
    /// Wraps a created vCPU.
    pub fn new(
        fd: VcpuFd,
        id: u8,
        mem: GuestMemoryMmap,
        policy: DispatchPolicy,
        ibs: Option<VcpuIbs>,
        profiler: Option<GuestProfiler>,
    ) -> Self {
        Self {
            fd,
            id,
            mem,
            policy,
            ibs,
            profiler,
            bridge: SyscallBridge::default(),
            counters: Counters::default(),
            run_ns: 0,
            kicked: false,
            kvm_exits: None,
            timer: None,
            armed_ns: None,
            halt_round: 0,
            xsave_layout: Layout::default(),
        }
    }

    /// The guest TSC frequency KVM gives this vCPU, in kHz.
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd
            .get_tsc_khz()
            .map_err(self.ioctl_err("KVM_GET_TSC_KHZ"))
    }

    fn ioctl_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Ioctl { id, what, source }
    }

    /// CPUID, local APIC LINT wiring, and for the boot vCPU the 64-bit entry state.
    pub fn configure(&mut self, cpuid: &CpuId, entry: Option<u64>) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.ioctl_err("KVM_SET_CPUID2"))?;
        self.xsave_layout = Layout::from_cpuid(cpuid.as_slice());
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.ioctl_err("KVM_GET_LAPIC"))?;
        for (offset, mode) in [
            (APIC_LVT_LINT0, APIC_MODE_EXTINT),
            (APIC_LVT_LINT1, APIC_MODE_NMI),
        ] {
            let reg = &mut lapic.regs[offset..offset + 4];
            let old = u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
            let new = (old & !0x700) | mode;
            for (dst, src) in reg.iter_mut().zip(new.to_le_bytes()) {
                *dst = src as libc::c_char;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.ioctl_err("KVM_SET_LAPIC"))?;
        let hwcr = Msrs::from_entries(&[kvm_msr_entry {
            index: msr::K7_HWCR,
            data: msr::HWCR_TSC_FREQ_SEL,
            ..Default::default()
        }])
        .map_err(|_| VcpuError::MsrList { id: self.id })?;
        if self
            .fd
            .set_msrs(&hwcr)
            .map_err(self.ioctl_err("KVM_SET_MSRS"))?
            != 1
        {
            log::debug!("vCPU {}: KVM refused HWCR.TscFreqSel", self.id);
        }
        if let Some(entry) = entry {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(self.ioctl_err("KVM_GET_SREGS"))?;
            self.fd
                .set_sregs(&cpu::long_mode_sregs(sregs))
                .map_err(self.ioctl_err("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&cpu::entry_regs(entry))
                .map_err(self.ioctl_err("KVM_SET_REGS"))?;
            self.fd
                .set_fpu(&cpu::reset_fpu())
                .map_err(self.ioctl_err("KVM_SET_FPU"))?;
        }
        // Have KVM copy the general registers into kvm_run on every exit (RIP for crash
        // reports and completions without a KVM_GET_REGS).
        self.fd.set_sync_valid_reg(SyncReg::Register);
        // And the event state: whether the guest is inside an NMI handler (NMIs masked).
        self.fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        if self.ibs.is_some() {
            // And the segment registers: the CPL, for the IBS clock.
            self.fd.set_sync_valid_reg(SyncReg::SystemRegister);
        }
        Ok(())
    }

    /// Makes sure the vCPU leaves KVM_RUN by the next IBS deadline or profiler tick.
    fn arm_timer(&mut self) -> std::io::Result<()> {
        let ibs = self.ibs.as_ref().and_then(VcpuIbs::deadline_in);
        let profile = self.profiler.as_ref().map(|p| p.due_in(self.run_ns));
        self.armed_ns = ibs.into_iter().chain(profile).min();
        match self.armed_ns {
            Some(ns) => {
                let timer = match &mut self.timer {
                    Some(t) => t,
                    None => self.timer.insert(KickTimer::for_this_thread()?),
                };
                timer.arm_in(ns)
            }
            None => self.timer.as_mut().map_or(Ok(()), KickTimer::disarm),
        }
    }

    /// Runs the vCPU until the VM stops.
    pub fn run(mut self, context: &VcpuContext) -> VcpuReport {
        kick::publish(self.fd.get_kvm_run());
        if self.ibs.is_some() {
            self.kvm_exits = KvmExits::open(&self.fd)
                .inspect_err(|e| {
                    log::warn!(
                        "vCPU {}: {e}: the IBS clock counts the exits KVM handles itself as guest time",
                        self.id
                    )
                })
                .ok();
        }
        while !context.stopping() {
            if let Err(source) = self.arm_timer() {
                context.fail(VcpuError::Timer {
                    id: self.id,
                    source,
                });
                break;
            }
            match self.step(context) {
                Ok(Outcome::Resume) => {}
                Ok(Outcome::Complete(c)) => {
                    if let Err(e) = self.complete(c) {
                        context.fail(e);
                    }
                }
                Ok(Outcome::SyscallMsr { index, value }) => {
                    if let Err(e) = self.syscall_msr(context, index, value) {
                        context.fail(e);
                    }
                }
                Ok(Outcome::BridgeTrap { pc }) => {
                    if let Err(e) = self.bridge_trap(pc) {
                        context.fail(e);
                    }
                }
                Ok(Outcome::Stop(stop)) => context.stop(self.locate(stop)),
                Err(e) => context.fail(e),
            }
            if let Err(e) = self.watch_halt(context) {
                context.fail(e);
            }
            if let Err(e) = self.after_exit(context) {
                context.fail(e);
            }
        }
        kick::withdraw();
        if let Some(ibs) = &self.ibs {
            ibs.add_counters(&mut self.counters);
        }
        VcpuReport {
            counters: self.counters,
            profile: self
                .profiler
                .map(GuestProfiler::into_samples)
                .unwrap_or_default(),
        }
    }

    /// Work between exits: the profiler's sample; for virtual IBS, report races, take due
    /// samples, inject the NMI.
    fn after_exit(&mut self, context: &VcpuContext) -> Result<(), VcpuError> {
        if let Some(profiler) = self.profiler.as_mut().filter(|_| self.kicked) {
            profiler.after_exit(self.run_ns, self.fd.sync_regs().regs.rip);
        }
        let Some(ibs) = &mut self.ibs else {
            return Ok(());
        };
        if let Some(race) = ibs.take_race().filter(|race| race.fatal) {
            context.stop(GuestStop::IbsRace {
                vcpu: self.id,
                report: race.to_string(),
            });
        }
        let sync = self.fd.sync_regs();
        let nmi = sync.events.nmi;
        let nmi_blocked = nmi.masked != 0 || nmi.pending != 0 || nmi.injected != 0;
        let exit = ExitState {
            rip: sync.regs.rip,
            nmi_blocked,
            kicked: self.kicked,
            // CPL = CS.RPL in long mode (SDM vol. 3A §5.5).
            user_mode: sync.sregs.cs.selector & 3 == 3,
        };
        let Some(irq) = ibs.after_exit(exit) else {
            return Ok(());
        };
        match irq {
            Interrupt::Nmi => self.fd.nmi().map_err(|source| VcpuError::Ioctl {
                id: self.id,
                what: "KVM_NMI",
                source,
            })?,
            Interrupt::Fixed { vector } => {
                context
                    .send_fixed_interrupt(self.id, vector)
                    .map_err(|source| VcpuError::Ioctl {
                        id: self.id,
                        what: "KVM_SIGNAL_MSI",
                        source,
                    })?
            }
        }
        ibs.injected(irq);
        Ok(())
    }

    /// Tells the VM's [`halt::HaltWatch`] what this exit showed: any exit but a kick means the
    /// vCPU runs; at the first kick of a check round, whether it is halted for good.
    fn watch_halt(&mut self, context: &VcpuContext) -> Result<(), VcpuError> {
        let watch = context.halt_watch();
        let id = usize::from(self.id);
        if !self.kicked {
            watch.running(id);
            return Ok(());
        }
        let round = watch.round();
        if round == self.halt_round {
            return Ok(());
        }
        self.halt_round = round;
        let activity = self.activity()?;
        if watch.report(id, activity) {
            context.stop(GuestStop::Halted);
        }
        Ok(())
    }

    /// Whether the vCPU sits in HLT with interrupts disabled and nothing to wake it.
    fn activity(&self) -> Result<VcpuActivity, VcpuError> {
        let sync = self.fd.sync_regs();
        let nmi = sync.events.nmi;
        let nmi_coming = nmi.pending != 0
            || nmi.injected != 0
            || self.ibs.as_ref().is_some_and(VcpuIbs::interrupt_pending);
        if sync.regs.rflags & rflags::IF != 0 || nmi_coming {
            return Ok(VcpuActivity::Running);
        }
        let mp = self
            .fd
            .get_mp_state()
            .map_err(self.ioctl_err("KVM_GET_MP_STATE"))?;
        Ok(if mp.mp_state == KVM_MP_STATE_HALTED {
            VcpuActivity::HaltedForGood
        } else {
            VcpuActivity::Running
        })
    }

    /// Fills in which vCPU and where for a crash.
    fn locate(&self, stop: GuestStop) -> GuestStop {
        match stop {
            GuestStop::Crash { kind, .. } => GuestStop::Crash {
                vcpu: self.id,
                rip: self.rip(),
                kind,
                code: self.code_at_rip(),
            },
            other => other,
        }
    }

    fn rip(&self) -> u64 {
        self.fd.sync_regs().regs.rip
    }

    /// One KVM_RUN and its dispatch.
    fn step(&mut self, context: &VcpuContext) -> Result<Outcome, VcpuError> {
        /// Exits whose dispatch needs more vCPU state than the exit carries.
        enum Deferred {
            Shutdown,
            InternalError,
        }
        let pio = context.devices();
        let policy = self.policy;
        let started = thread_cpu_time();
        let result = self.fd.run();
        let ran = (thread_cpu_time() - started).as_nanos() as u64;
        self.run_ns += ran;
        let exits = match &mut self.kvm_exits {
            Some(exits) => exits.since_last().map_err(|source| VcpuError::KvmExits {
                id: self.id,
                source,
            })?,
            None => 0,
        };
        // All but the exit that ended the run (none if a kick stopped it before entry).
        let kvm_exits = exits.saturating_sub(1);
        self.counters.add("kvm.handled_exits", kvm_exits);
        let kick = match &result {
            Ok(VcpuExit::Intr) => Some(Kick::FromGuest),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Some(Kick::BeforeEntry)
            }
            _ => None,
        };
        // A run the kick timer ended lasted, for the guest, until the timer fired: what
        // follows is the host delivering the signal and leaving the guest.
        let ns = match kick {
            Some(_) => ran.min(self.armed_ns.unwrap_or(u64::MAX)),
            None => ran,
        };
        self.kicked = kick.is_some();
        if let Some(ibs) = &mut self.ibs {
            ibs.ran(ns, kick.is_some(), kvm_exits);
        }
        let ran = match result {
            Ok(VcpuExit::IoIn(port, data)) => Ok(Exit::IoIn { port, data }),
            Ok(VcpuExit::IoOut(port, data)) => Ok(Exit::IoOut { port, data }),
            Ok(VcpuExit::MmioRead(_, data)) => Ok(Exit::MmioRead { data }),
            Ok(VcpuExit::MmioWrite(..)) => Ok(Exit::MmioWrite),
            Ok(VcpuExit::X86Rdmsr(m)) => Ok(Exit::RdMsr {
                index: m.index,
                data: m.data,
                error: m.error,
            }),
            Ok(VcpuExit::X86Wrmsr(m)) => Ok(Exit::WrMsr {
                index: m.index,
                value: m.data,
                error: m.error,
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Ok(Exit::SystemEvent(kind)),
            Ok(VcpuExit::FailEntry(reason, _)) => Ok(Exit::FailEntry(reason)),
            Ok(VcpuExit::Hlt) => Ok(Exit::Hlt),
            Ok(VcpuExit::Debug(d)) => Ok(Exit::Debug {
                pc: d.pc,
                dr6: d.dr6,
            }),
            Ok(VcpuExit::Intr) => Ok(Exit::Kicked(Kick::FromGuest)),
            Ok(VcpuExit::Shutdown) => Err(Deferred::Shutdown),
            Ok(VcpuExit::InternalError) => Err(Deferred::InternalError),
            Ok(other) => Ok(Exit::Other(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(Exit::Kicked(Kick::BeforeEntry))
            }
            Err(source) => {
                return Err(VcpuError::Ioctl {
                    id: self.id,
                    what: "KVM_RUN",
                    source,
                })
            }
        };
        let exit = match ran {
            Ok(exit) => exit,
            Err(Deferred::Shutdown) => {
                let sregs = self.sregs()?;
                let idt_limit =
                    (!cpu::is_reset_state(&sregs, self.rip())).then_some(sregs.idt.limit);
                Exit::Shutdown { idt_limit }
            }
            Err(Deferred::InternalError) => {
                let rip = self.rip();
                if self.bridge.planted_at(rip) {
                    self.counters.bump("exit.bridge_trap");
                    return Ok(Outcome::BridgeTrap { pc: rip });
                }
                let (suberror, insn) = self.internal_error();
                Exit::InternalError {
                    suberror,
                    insn,
                    rip,
                }
            }
        };
        let counter = exit.counter();
        let local: &mut dyn VcpuDevices = match &mut self.ibs {
            Some(ibs) => ibs,
            None => &mut NoVcpuDevices,
        };
        let outcome = dispatch(exit, pio, local, policy);
        if kick == Some(Kick::BeforeEntry) {
            self.fd.set_kvm_immediate_exit(0);
        }
        self.counters.bump(counter);
        Ok(outcome)
    }

    /// The suberror of a KVM_EXIT_INTERNAL_ERROR and, for emulation failures, the
    /// instruction bytes (from the exit if KVM supplied them, else from guest memory).
    fn internal_error(&mut self) -> (u32, Vec<u8>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` and
        // `emulation_failure` members of the union are the ones KVM wrote.
        let (suberror, failure) = unsafe {
            (
                run.__bindgen_anon_1.internal.suberror,
                run.__bindgen_anon_1.emulation_failure,
            )
        };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return (suberror, Vec::new());
        }
        if failure.flags & EMULATION_FLAG_INSN_BYTES != 0 {
            // SAFETY: KVM sets the flag only when it filled insn_size/insn_bytes.
            let bytes = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
            let n = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
            if n > 0 {
                return (suberror, bytes.insn_bytes[..n].to_vec());
            }
        }
        (suberror, self.code_at_rip())
    }

    /// Up to 15 bytes (the longest x86 instruction) at the guest's RIP, through its page
    /// tables; fewer if they are not mapped.
    fn code_at_rip(&self) -> Vec<u8> {
        let mut code = [0u8; 15];
        let n = match self.fd.get_sregs() {
            Ok(sregs) => guest_walk::read_virt(&self.mem, sregs.cr3, self.rip(), &mut code),
            Err(_) => 0,
        };
        code[..n].to_vec()
    }

    fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs().map_err(self.ioctl_err("KVM_GET_SREGS"))
    }
}
