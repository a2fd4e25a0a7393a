//! A VM: KVM objects, guest memory, devices and vCPU threads, from start-up to the end.

use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_X86_USER_SPACE_MSR,
    KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, BootSpec};
use crate::cpuid::{self, CpuidPolicy};
use crate::devices::serial::{self, StdinForwarder, COM1_IRQ};
use crate::devices::PioDevices;
use crate::ibs::vcpu::VcpuIbs;
use crate::ibs::{self, IbsBackend, IbsSelectError, IbsSettings};
use crate::kick;
use crate::layout::KVM_TSS;
use crate::memory::{self, MemoryError};
use crate::stats::{Counters, RunStats};
use crate::stop::GuestStop;
use crate::vcpu::context::{VcpuContext, VmEnd};
use crate::vcpu::cpl0_emulation::host::{HostKvm, CPL0_EMULATION_LINUX_PARAMS};
use crate::vcpu::exit::DispatchPolicy;
use crate::vcpu::halt;
use crate::vcpu::profile::GuestProfiler;
use crate::vcpu::{Vcpu, VcpuError, VcpuReport};
use crate::x86::msr;
use vpmu::IBS_MSR_RANGE;

/// Capabilities ibsvm cannot run without, and why.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel interrupt controllers"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "serial interrupts"),
    (Cap::UserNmi, "NMI injection"),
    (Cap::VcpuEvents, "completing int3"),
    (Cap::ImmediateExit, "kicking vCPUs"),
    (Cap::SyncRegs, "reading RIP on exits"),
    (Cap::X86UserSpaceMsr, "MSR emulation in userspace"),
];

/// The kernel command line a Linux kernel gets without `--cmdline`: the console on COM1,
/// no PCI and no ACPI (the VM has neither: CPUs and I/O APIC come from an MP table), reboot
/// through the i8042 (which ends the VM) and no hanging on a panic.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 pci=off acpi=off reboot=k panic=-1";

/// `--linux-tsc-scale auto` on a CPL0-emulating host: an emulated 250 Hz tick costs about a
/// tick period of wall time, so the guest would spend its CPU on ticks.
pub const AUTO_TSC_SCALE_CPL0_EMULATION: u32 = 10;

/// `--linux-tsc-scale`: a factor, or chosen from the host and the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscScale {
    /// 10 on CPL0-emulating hosts for a Linux kernel, else 1.
    Auto,
    /// This factor (1 = off).
    Fixed(u32),
}

/// When to apply what a guest needs on a host whose KVM emulates CPL0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuirkMode {
    /// Detect the host.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// Everything `ibsvm run` was asked to do.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// What to boot.
    pub boot: BootSpec,
    /// CPL0-emulation measures.
    pub quirks: QuirkMode,
    /// The virtual IBS PMU.
    pub ibs: IbsSettings,
    /// `--guest-profile`: where to write the guest RIP samples.
    pub guest_profile: Option<PathBuf>,
    /// `--linux-tsc-scale`: tell a Linux guest its TSC runs this many times faster.
    pub linux_tsc_scale: TscScale,
    /// `--null-msr`: an MSR answered with no device (benchmark baseline).
    pub null_msr: Option<u32>,
}

/// `--guest-profile` samples each vCPU's RIP every millisecond of its run time.
pub const PROFILE_INTERVAL_NS: u64 = 1_000_000;

/// Writes the profile: a header, then one `vcpu rip` line (hexadecimal RIP) per sample.
fn write_profile(file: &std::fs::File, profiles: &[Vec<u64>]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(file);
    writeln!(
        out,
        "# ibsvm guest profile: vcpu rip, one sample per {} us of vCPU run time",
        PROFILE_INTERVAL_NS / 1000
    )?;
    for (vcpu, samples) in profiles.iter().enumerate() {
        for rip in samples {
            writeln!(out, "{vcpu} {rip:016x}")?;
        }
    }
    out.flush()
}

/// Errors before or while running the VM (not guest behaviour: that is a [`GuestStop`]).
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    /// A capability ibsvm needs is missing.
    #[error("host KVM lacks {cap:?}, needed for {why}")]
    MissingCap {
        /// The capability.
        cap: Cap,
        /// What it is needed for.
        why: &'static str,
    },
    /// A VM-level ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Host resources (eventfds, threads, epoll).
    #[error("{what}: {source}")]
    Host {
        /// What was being set up.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The vCPU's CPUID table does not fit KVM's limit.
    #[error("vCPU {id}: the CPUID table has {entries} entries, more than KVM takes")]
    CpuidTooLarge {
        /// vCPU index.
        id: u8,
        /// Entries in the table.
        entries: usize,
    },
    /// A vCPU thread panicked (its message was printed when it did).
    #[error("vCPU {id}: its thread panicked")]
    VcpuPanicked {
        /// vCPU index.
        id: usize,
    },
    /// The main thread's event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// The IBS source cannot be used.
    #[error(transparent)]
    Ibs(#[from] IbsSelectError),
    /// Bad synthetic-source settings.
    #[error(transparent)]
    Synthetic(#[from] vpmu::SyntheticError),
    /// Creating or writing the `--guest-profile` file failed.
    #[error("cannot write the guest profile {path}: {source}")]
    Profile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `--cpus` out of range.
    #[error("--cpus {0}: must be 1..={max}", max = boot::mptable::MAX_CPUS)]
    CpuCount(u8),
}

fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Host { what, source }
}

fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// Wakes the event loop when a vCPU ends the VM.
struct WakeOnStop(EventFd);

impl MutEventSubscriber for WakeOnStop {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the stop eventfd: {e}");
        }
    }
}

/// The result of a VM run.
#[derive(Debug)]
pub struct RunReport {
    /// Why the guest stopped.
    pub stop: GuestStop,
    /// Exit counts and timing.
    pub stats: RunStats,
}

/// A VM ready to run.
pub struct Vm {
    _kvm: Kvm,
    /// `--guest-profile`: created before the guest runs, so that a path that cannot be
    /// written is an error up front, not after the whole run.
    guest_profile: Option<(PathBuf, std::fs::File)>,
    context: Arc<VcpuContext>,
    vcpus: Vec<Vcpu>,
    started: Instant,
    guest_tsc_khz: u32,
}

/// The command line the guest gets: the user's, plus what a CPL0-emulating host needs for a
/// Linux kernel (only parameters not already given). Returns it and what was added.
pub fn guest_cmdline(user: &str, linux_on_cpl0_emulation: bool) -> (String, Vec<&'static str>) {
    let mut cmdline = user.trim().to_owned();
    let mut added = Vec::new();
    if linux_on_cpl0_emulation {
        for (param, _) in CPL0_EMULATION_LINUX_PARAMS {
            let key = param.split('=').next().unwrap_or(param);
            let present = cmdline
                .split_whitespace()
                .any(|w| w.split('=').next() == Some(key));
            if !present {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(param);
                added.push(*param);
            }
        }
    }
    (cmdline, added)
}

/// Sends the MSRs ibsvm emulates to userspace; everything else stays with KVM.
/// - the IBS range C001_1030..C001_103F, read and write, when the guest has IBS;
/// - guest writes of LSTAR and SFMASK, for the syscall bridge;
/// - the `--null-msr`, read and write.
fn install_msr_filter(
    kvm: &Kvm,
    vm: &VmFd,
    ibs: bool,
    syscall_bridge: bool,
    null_msr: Option<u32>,
) -> Result<(), VmError> {
    if !ibs && !syscall_bridge && null_msr.is_none() {
        return Ok(());
    }
    if !kvm.check_extension(Cap::X86MsrFilter) {
        return Err(VmError::MissingCap {
            cap: Cap::X86MsrFilter,
            why: "emulating MSRs in userspace",
        });
    }
    // One bit per MSR: 1 = KVM handles it, 0 = exit to userspace.
    let ibs_bitmap = [0u8; 2];
    // From C000_0082: LSTAR exits, CSTAR (C000_0083) stays with KVM, SFMASK exits.
    let syscall_bitmap = [0b010u8];
    debug_assert_eq!(msr::SFMASK, msr::LSTAR + 2);
    let ibs_count = IBS_MSR_RANGE.end() - IBS_MSR_RANGE.start() + 1;
    let mut ranges = Vec::new();
    if ibs {
        let flags = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
        ranges.push(MsrFilterRange {
            flags,
            base: *IBS_MSR_RANGE.start(),
            msr_count: ibs_count,
            bitmap: &ibs_bitmap,
        });
    }
    if syscall_bridge {
        let flags = MsrFilterRangeFlags::WRITE;
        ranges.push(MsrFilterRange {
            flags,
            base: msr::LSTAR,
            msr_count: 3,
            bitmap: &syscall_bitmap,
        });
    }
    let null_bitmap = [0u8];
    if let Some(base) = null_msr {
        let flags = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
        ranges.push(MsrFilterRange {
            flags,
            base,
            msr_count: 1,
            bitmap: &null_bitmap,
        });
    }
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(ioctl_err("KVM_X86_SET_MSR_FILTER"))
}

impl Vm {
    /// Creates the VM, loads the guest and prepares the vCPUs.
    pub fn build(config: &VmConfig) -> Result<Self, VmError> {
        let started = Instant::now();
        let spec = &config.boot;
        if spec.cpus == 0 || spec.cpus > boot::mptable::MAX_CPUS {
            return Err(VmError::CpuCount(spec.cpus));
        }
        let guest_profile = config
            .guest_profile
            .as_ref()
            .map(|path| {
                std::fs::File::create(path)
                    .map(|file| (path.clone(), file))
                    .map_err(|source| VmError::Profile {
                        path: path.clone(),
                        source,
                    })
            })
            .transpose()?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, why) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(VmError::MissingCap { cap: *cap, why });
            }
        }
        let host = HostKvm::detect();
        let emulated_cpl0 = match config.quirks {
            QuirkMode::Auto => host.emulates_cpl0,
            QuirkMode::On => true,
            QuirkMode::Off => false,
        };

        let mem = memory::create(spec.memory_mib)?;
        let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS as usize)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;
        for (slot, region) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live anonymous mapping owned by `mem`, which the vCPUs
            // keep (by clone) for as long as the VM exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        // MSR accesses KVM would refuse (#GP) come to userspace: the x2APIC extended LVT
        // registers arrive this way (reason INVAL), and vCPUs answer the rest with #GP.
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(
            KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER,
        );
        vm.enable_cap(&cap)
            .map_err(ioctl_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        let (ibs_backend, ibs_note) = ibs::select(config.ibs.mode, || {
            ibs::detect_host(Path::new(ibs::EVENT_SOURCE_DEVICES))
        })?;
        if let Some(note) = ibs_note {
            log::info!("{note}");
        }
        let ibs_on = ibs_backend != IbsBackend::Off;
        if ibs_on
            && config.ibs.race_check != vpmu::RaceCheck::Off
            && config.ibs.policy == vpmu::Policy::Protect
        {
            log::info!("--ibs-race-check under --ibs-policy protect: the race cannot happen, so the check verifies the protection and should stay silent (--ibs-policy faithful reproduces it)");
        }
        install_msr_filter(&kvm, &vm, ibs_on, emulated_cpl0, config.null_msr)?;

        let kernel = boot::load_kernel(&mem, spec)?;

        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("serial irq eventfd"))?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(ioctl_err("KVM_IRQFD(COM1)"))?;
        let console = serial::console(irq).map_err(host_err("serial console"))?;
        let context = Arc::new(
            VcpuContext::new(vm, PioDevices::new(console), usize::from(spec.cpus))
                .map_err(host_err("stop eventfd"))?,
        );

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        let policy = DispatchPolicy {
            complete_instructions: emulated_cpl0,
            syscall_bridge: emulated_cpl0,
            null_msr: config.null_msr,
        };
        let mut vcpus = Vec::with_capacity(spec.cpus.into());
        for id in 0..spec.cpus {
            let fd = context
                .vm()
                .create_vcpu(id.into())
                .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
            let mut entries = supported.as_slice().to_vec();
            let topology = CpuidPolicy {
                apic_id: id,
                cpus: spec.cpus,
                hide_cx16: emulated_cpl0,
            };
            cpuid::normalize(&mut entries, topology);
            let (entries, family_model) =
                cpuid::with_ibs(&entries, ibs_on.then_some(config.ibs.caps));
            if let (0, Some((before, after))) = (id, family_model) {
                log::info!("CPUID {before} takes a Linux IBS erratum path: the guest sees {after}");
            }
            let cpuid = CpuId::from_entries(&entries).map_err(|_| VmError::CpuidTooLarge {
                id,
                entries: entries.len(),
            })?;
            let ibs = if ibs_on {
                Some(VcpuIbs::for_backend(
                    &config.ibs,
                    &ibs_backend,
                    id,
                    emulated_cpl0,
                )?)
            } else {
                None
            };
            let profiler = config
                .guest_profile
                .as_ref()
                .map(|_| GuestProfiler::new(PROFILE_INTERVAL_NS));
            let mut vcpu = Vcpu::new(fd, id, mem.clone(), policy, ibs, profiler);
            vcpu.configure(&cpuid, (id == 0).then_some(kernel.entry))?;
            vcpus.push(vcpu);
        }
        let user_cmdline = match (&spec.cmdline, kernel.is_linux) {
            (Some(cmdline), _) => cmdline.as_str(),
            (None, true) => {
                log::info!("no --cmdline: the Linux kernel gets \"{DEFAULT_LINUX_CMDLINE}\"");
                DEFAULT_LINUX_CMDLINE
            }
            (None, false) => "",
        };
        let (cmdline, added) = guest_cmdline(user_cmdline, emulated_cpl0 && kernel.is_linux);
        if emulated_cpl0 {
            let why = match config.quirks {
                QuirkMode::Auto => host.evidence.as_str(),
                _ => "--cpl0-quirks on",
            };
            let params = if added.is_empty() {
                String::new()
            } else {
                format!("; appended to the kernel command line: {}", added.join(" "))
            };
            log::info!("host KVM emulates guest CPL0 ({why}): hiding CPUID CX16, completing int3/fwait/fences/xgetbv/xsave/xrstor and routing system calls in ibsvm{params}");
        }
        let guest_tsc_khz = vcpus[0].tsc_khz()?;
        let tsc_scale = match config.linux_tsc_scale {
            TscScale::Fixed(scale) => scale,
            TscScale::Auto if emulated_cpl0 => AUTO_TSC_SCALE_CPL0_EMULATION,
            TscScale::Auto => 1,
        };
        let cmdline = match (tsc_scale, kernel.is_linux) {
            (scale @ 2.., true) => {
                let param = format!(
                    "tsc_early_khz={}",
                    u64::from(guest_tsc_khz) * u64::from(scale)
                );
                let why = match config.linux_tsc_scale {
                    TscScale::Auto => "auto: an emulated tick costs about a tick period; --linux-tsc-scale 1 turns it off",
                    TscScale::Fixed(_) => "as asked",
                };
                log::info!("--linux-tsc-scale {scale} ({why}): appended {param} (guest timers fire {scale}x later in wall time)");
                format!("{cmdline} {param}")
            }
            _ => cmdline,
        };
        boot::write_boot_data(&mem, spec, &kernel, &cmdline)?;
        Ok(Self {
            _kvm: kvm,
            guest_profile,
            context,
            vcpus,
            started,
            guest_tsc_khz,
        })
    }

    /// Runs the guest to its end.
    pub fn run(self) -> Result<RunReport, VmError> {
        kick::install_handler().map_err(|e| VmError::Host {
            what: "kick signal handler",
            source: e.into(),
        })?;
        let mut events =
            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().map_err(|e| {
                VmError::Host {
                    what: "event manager",
                    source: std::io::Error::other(format!("{e:?}")),
                }
            })?;
        let wake = self.context.wake_fd().map_err(host_err("stop eventfd"))?;
        events.add_subscriber(Arc::new(Mutex::new(WakeOnStop(wake))));
        // SIGINT and SIGTERM stop the VM the normal way, so that --stats and the profile
        // are still written; a second one ends ibsvm at once (a VM that does not stop).
        let interrupted = Arc::new(AtomicUsize::new(0));
        let once = Arc::new(AtomicBool::new(false));
        for signal in [libc::SIGINT, libc::SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, once.clone())
                .and_then(|_| signal_hook::flag::register(signal, once.clone()))
                .and_then(|_| {
                    signal_hook::flag::register_usize(signal, interrupted.clone(), signal as usize)
                })
                .map_err(host_err("SIGINT/SIGTERM handler"))?;
        }
        let stdin = StdinForwarder::new(self.context.devices().serial().clone())
            .map_err(host_err("stdin forwarding"))?;
        events.add_subscriber(Arc::new(Mutex::new(stdin)));

        // A failure of the main thread's own; the vCPUs report theirs through the context.
        let mut failure = None;
        let mut threads: Vec<JoinHandle<VcpuReport>> = Vec::new();
        for (id, vcpu) in self.vcpus.into_iter().enumerate() {
            let context = self.context.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu.run(&context))
                .map_err(host_err("spawning a vCPU thread"));
            match handle {
                Ok(h) => threads.push(h),
                Err(e) => {
                    failure = Some(e);
                    self.context.request_stop();
                    break;
                }
            }
        }
        let mut last_round = Instant::now();
        let interval = halt::CHECK_INTERVAL;
        while !self.context.stopping() {
            // A signal also cuts the event loop's wait short (EINTR).
            match interrupted.load(Ordering::Relaxed) {
                0 => {}
                signal => self.context.stop(GuestStop::Interrupted {
                    signal: signal as i32,
                }),
            }
            if let Err(e) = events.run_with_timeout(interval.as_millis() as i32) {
                failure.get_or_insert(VmError::EventLoop(e));
                self.context.request_stop();
            }
            if last_round.elapsed() >= interval {
                last_round = Instant::now();
                for id in self.context.halt_watch().next_round() {
                    if let Some(t) = threads.get(id) {
                        kick::kick(t.as_pthread_t());
                    }
                }
            }
        }
        for t in &threads {
            kick::kick(t.as_pthread_t());
        }
        let mut exits = Counters::default();
        let mut profiles = Vec::new();
        for (id, t) in threads.into_iter().enumerate() {
            match t.join() {
                Ok(report) => {
                    exits.merge(&report.counters);
                    profiles.push(report.profile);
                }
                Err(_) => {
                    failure.get_or_insert(VmError::VcpuPanicked { id });
                }
            }
        }
        serial::flush_console(self.context.devices().serial());
        if let Some((path, file)) = &self.guest_profile {
            write_profile(file, &profiles).map_err(|source| VmError::Profile {
                path: path.clone(),
                source,
            })?;
        }
        let stats = RunStats {
            exits,
            wall: self.started.elapsed(),
            guest_tsc_khz: self.guest_tsc_khz,
        };
        if let Some(error) = failure {
            return Err(error);
        }
        // The loop above ran until `stopping`: without a failure of its own, a vCPU ended
        // the VM and said how.
        match self.context.take_end() {
            Some(VmEnd::Guest(stop)) => Ok(RunReport { stop, stats }),
            Some(VmEnd::Failed(error)) => Err(error.into()),
            None => unreachable!("the VM stopped without an end or a failure"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_params_are_appended_once() {
        let (c, added) = guest_cmdline("console=ttyS0", true);
        assert!(c.starts_with("console=ttyS0 clearcpuid=151,"));
        assert_eq!(added.len(), CPL0_EMULATION_LINUX_PARAMS.len());
        let (c2, added2) = guest_cmdline(&c, true);
        assert_eq!(c2, c);
        assert!(added2.is_empty());
        // A user's own value wins.
        let (c3, added3) = guest_cmdline("clearcpuid=1 rodata=on", true);
        assert!(c3.starts_with("clearcpuid=1 rodata=on "), "{c3}");
        assert!(!added3
            .iter()
            .any(|p| p.starts_with("clearcpuid=") || p.starts_with("rodata=")));
        assert_eq!(added3.len(), CPL0_EMULATION_LINUX_PARAMS.len() - 2);
    }

    #[test]
    fn nothing_is_appended_elsewhere() {
        assert_eq!(
            guest_cmdline(" test=smoke ", false),
            ("test=smoke".to_owned(), vec![])
        );
    }
}
