//! One vCPU's virtual IBS: the `vpmu` device, its sample source, and the guest run-time
//! clock the synthetic source samples on (the vCPU loop stops the vCPU at the device's
//! deadlines; a host source's samples arrive through the device's inbox instead).

use vpmu::{
    is_vpmu_msr, Interrupt, NoGuestContext, RaceEvent, SamplePoint, SyntheticConfig,
    SyntheticError, SyntheticSource, Vpmu, VpmuConfig,
};

use super::guest_clock::{GuestClock, RunEnd};
use super::source::IbsSource;
use super::test_port::{self, Command};
use super::{IbsBackend, IbsSettings};
use crate::devices::VcpuDevices;
use crate::stats::Counters;

/// Per-vCPU seed spread (the 64-bit golden ratio, as in SplitMix64).
const SEED_STRIDE: u64 = 0x9e37_79b9_7f4a_7c15;

/// What the vCPU loop knows about the exit just handled (see [`VcpuIbs::after_exit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitState {
    /// Guest RIP.
    pub rip: u64,
    /// The guest is in an NMI handler, or an NMI is pending or being injected.
    pub nmi_blocked: bool,
    /// The exit was a kick (a timer or another thread stopped the vCPU), not caused by the
    /// guest's own instruction.
    pub kicked: bool,
    /// The vCPU was at CPL3 when it exited (so it enters there again).
    pub user_mode: bool,
}

/// A KVM_RUN not yet counted on the guest clock (see [`VcpuIbs::ran`]).
#[derive(Debug, Clone, Copy)]
struct PendingRun {
    ns: u64,
    kicked: bool,
    kvm_exits: u64,
}

/// The IBS state of one vCPU.
pub struct VcpuIbs {
    dev: Vpmu<IbsSource>,
    /// The vCPU, for log lines.
    id: u8,
    /// The vCPU was at CPL3 at the last exit, so it enters there.
    user_mode: bool,
    /// The run that just ended, until it is counted.
    pending_run: Option<PendingRun>,
    /// The guest's own execution time: the synthetic source's clock.
    clock: GuestClock,
    /// The device's NMI was injected and the guest has not yet unmasked NMIs.
    nmi_in_service: bool,
    /// The device's interrupt waits for the guest to leave its NMI handler.
    irq_deferred: bool,
    /// Races taken with [`VcpuIbs::take_race`].
    races_seen: u64,
    nmis_injected: u64,
    fixed_injected: u64,
    /// How many wall nanoseconds the kick timer allows per guest nanosecond still due when
    /// the vCPU enters at CPL0 (see [`VcpuIbs::deadline_in`]): 1 to the clock's CPL0 divisor,
    /// and the source deadline it was worked out for.
    cpl0_timer_stretch: u64,
    stretch_deadline: Option<u64>,
    /// A test-port command written by the exit being handled, run in [`VcpuIbs::after_exit`]
    /// (where the RIP is known).
    test_command: Option<Command>,
    /// Test-port commands carried out, per command, and refused.
    test_commands: [u64; 2],
    test_refused: u64,
}

/// Races logged per vCPU (see [`VcpuIbs::take_race`]).
const RACES_LOGGED: u64 = 5;

/// How soon the vCPU is stopped again to retry a deferred interrupt (see
/// [`VcpuIbs::after_exit`]), in nanoseconds: a few emulated instructions, about the length of
/// an NMI handler's tail on a CPL0-emulating host.
const DEFERRED_IRQ_RETRY_NS: u64 = 20_000;

/// How much slower a CPL0-emulating host's KVM runs emulated CPL0 code than native code,
/// roughly (measured on one: ~1.8 M emulated instructions/s against native ~0.2 ns per
/// loop iteration): the divisor [`GuestClock::account`] applies there.
pub const CPL0_EMULATION_SLOWDOWN: u64 = 1000;

impl VcpuIbs {
    /// The device for vCPU `id` with the synthetic source; `emulated_cpl0` when the host's
    /// KVM emulates CPL0 code.
    #[cfg(test)]
    pub fn new(
        settings: &IbsSettings,
        id: u8,
        emulated_cpl0: bool,
    ) -> Result<Self, SyntheticError> {
        Self::for_backend(settings, &IbsBackend::Synthetic, id, emulated_cpl0)
    }

    /// The device for vCPU `id` with the source `backend` selected (not
    /// [`IbsBackend::Off`]: that is no device at all; it gets the synthetic source).
    pub fn for_backend(
        settings: &IbsSettings,
        backend: &IbsBackend,
        id: u8,
        emulated_cpl0: bool,
    ) -> Result<Self, SyntheticError> {
        let source = match backend {
            IbsBackend::Host(host) => IbsSource::host(*host, settings.caps),
            IbsBackend::Synthetic | IbsBackend::Off => {
                IbsSource::Synthetic(SyntheticSource::new(SyntheticConfig {
                    seed: settings.seed ^ SEED_STRIDE.wrapping_mul(u64::from(id) + 1),
                    ns_per_op: settings.ns_per_op,
                    ..SyntheticConfig::default()
                })?)
            }
        };
        let config = VpmuConfig {
            caps: settings.caps,
            policy: settings.policy,
            race_check: settings.race_check,
        };
        let mut dev = Vpmu::new(config, source);
        let sink = dev.sink();
        dev.source_mut().connect(sink);
        Ok(Self {
            dev,
            id,
            user_mode: false,
            pending_run: None,
            clock: GuestClock::new(if emulated_cpl0 {
                CPL0_EMULATION_SLOWDOWN
            } else {
                1
            }),
            nmi_in_service: false,
            irq_deferred: false,
            races_seen: 0,
            nmis_injected: 0,
            fixed_injected: 0,
            cpl0_timer_stretch: 1,
            stretch_deadline: None,
            test_command: None,
            test_commands: [0; 2],
            test_refused: 0,
        })
    }

    /// How long (wall ns) the vCPU may run before it is stopped, as it enters in the mode of
    /// its last exit (user mode, CPL3, or the kernel): the source's next deadline, or soon
    /// if an interrupt was deferred.
    ///
    /// The deadline is in guest nanoseconds, which a run entered at CPL0 accrues at only
    /// `1/divisor` of its time (see [`GuestClock::account`]). Arming the timer for
    /// that run at the guest time still due would kick a vCPU that stays in emulated kernel
    /// code about `divisor` times per period; arming it at `divisor` times that
    /// would sample a user loop the kernel returns to (an NMI handler's IRET, no exit in
    /// between) that much too late. So the wall time allowed per guest nanosecond starts at
    /// 1 for each new deadline and doubles at each kick that finds the vCPU still in the
    /// kernel with the deadline not reached, up to the divisor (about log2(divisor) kicks
    /// per period instead of `divisor`); it falls back to 1 at the first exit in user mode.
    ///
    /// Never sooner than an exit costs on this host ([`GuestClock::exit_cost`]): a timer
    /// that fires sooner mostly stops the guest while KVM is still entering it, where the
    /// last exit left it, and the clock counts such a run after a guest-caused exit as no
    /// guest time (so that no sample lands on the instruction after the guest's own IBS
    /// WRMSR, say): an exit for nothing.
    pub fn deadline_in(&self) -> Option<u64> {
        let retry = self.irq_deferred.then_some(DEFERRED_IRQ_RETRY_NS);
        let stretch = if self.user_mode {
            1
        } else {
            self.cpl0_timer_stretch
        };
        self.dev
            .next_deadline()
            .map(|d| d.saturating_sub(self.clock.now()).saturating_mul(stretch))
            .into_iter()
            .chain(retry)
            .min()
            .map(|ns| ns.max(self.clock.exit_cost()))
    }

    /// A KVM_RUN just ended, before its exit is dispatched: `ns` of guest CPU time (a kicked
    /// run only until the timer fired), whether a kick ended it, and how many exits KVM
    /// handled itself during it. It is counted on the guest clock before anything in this
    /// exit uses the clock: at an IBS MSR write (a period the write starts must not include
    /// the run that led up to the write), else in [`VcpuIbs::after_exit`].
    pub fn ran(&mut self, ns: u64, kicked: bool, kvm_exits: u64) {
        self.pending_run = Some(PendingRun {
            ns,
            kicked,
            kvm_exits,
        });
    }

    /// Counts the pending run, the vCPU having left it in user mode or not, and notes the
    /// mode it enters next.
    fn settle_run(&mut self, user_mode: bool) {
        if let Some(run) = self.pending_run.take() {
            let native = self.user_mode && user_mode;
            self.account_run(run.ns, run.kicked, native, run.kvm_exits);
        }
        self.user_mode = user_mode;
    }

    /// Adds one KVM_RUN of `ns` CPU nanoseconds to the guest clock; `kicked` says whether
    /// it ended with a kick, `native` whether the vCPU was at CPL3 when it entered and when
    /// it left, `kvm_exits` how many exits KVM handled itself during it (see
    /// [`GuestClock::account`]).
    ///
    /// A kick that retried a deferred interrupt is aimed at the guest's NMI handler, not
    /// at wherever the guest happened to be: its run counts like one the guest's own
    /// instruction ended.
    fn account_run(&mut self, ns: u64, kicked: bool, native: bool, kvm_exits: u64) {
        let end = if kicked && !self.irq_deferred {
            RunEnd::Kick
        } else {
            RunEnd::GuestExit
        };
        self.clock.account(ns, end, native, kvm_exits);
    }

    /// After an exit: count the run on the guest clock, note an NMI return, take a sample
    /// if one is due, and return the interrupt to inject now, if any.
    ///
    /// Samples are taken only at kicks ([`ExitState::kicked`]): a kick stops the vCPU
    /// wherever it happens to be, so sample RIPs fall where the guest spends its time, as
    /// with hardware IBS. An exit the guest's own instruction caused (an MSR access, port
    /// I/O, a page fault reaching ibsvm) would pin every sample due by then on that
    /// instruction — e.g. on the allocator's first touch of a new page in a sampled
    /// program. A due sample waits for the kick, which the timer sends at once.
    ///
    /// [`ExitState::nmi_blocked`]: no interrupt is taken: an NMI injected now would only be
    /// delivered after the handler's IRET, by which time the handler may well have consumed
    /// the sample it is for, and the guest would see an NMI that no unit claims. The
    /// request stays pending and is re-checked at an exit after the handler (the vCPU is
    /// stopped again soon).
    pub fn after_exit(&mut self, exit: ExitState) -> Option<Interrupt> {
        let ExitState {
            rip,
            nmi_blocked,
            kicked,
            user_mode,
        } = exit;
        self.settle_run(user_mode);
        let deadline = self.dev.next_deadline();
        let now = self.clock.now();
        let reached = deadline.is_some_and(|d| now >= d);
        self.cpl0_timer_stretch = if user_mode || deadline != self.stretch_deadline {
            1
        } else if kicked && !reached {
            (self.cpl0_timer_stretch * 2).min(self.clock.cpl0_divisor())
        } else {
            self.cpl0_timer_stretch
        };
        self.stretch_deadline = deadline;
        if self.nmi_in_service && !nmi_blocked {
            self.nmi_in_service = false;
            self.dev.nmi_returned();
        }
        if let Some(command) = self.test_command.take() {
            self.run_test_command(command, rip);
        }
        // Again: a test-port command may have re-armed a unit.
        if kicked && self.dev.next_deadline().is_some_and(|d| now >= d) {
            self.dev.sample_point(SamplePoint { rip, guest_ns: now });
        }
        // Samples a host source's reader delivered (it kicked this vCPU to get here).
        self.dev.poll_inbox();
        if let Some(e) = self.dev.source_mut().take_error() {
            log::warn!("{e}");
        }
        self.irq_deferred = nmi_blocked && self.dev.interrupt_pending();
        if self.irq_deferred || !self.dev.interrupt_pending() {
            return None;
        }
        self.dev.take_interrupt()
    }

    /// Carries out a test-port command (see [`test_port`]).
    fn run_test_command(&mut self, command: Command, rip: u64) {
        let at = SamplePoint {
            rip,
            guest_ns: self.clock.now(),
        };
        match self.dev.force_sample(command.unit(), at, command.irq()) {
            Ok(()) => self.test_commands[command as usize] += 1,
            Err(e) => self.refuse_test_command(format_args!("{command:?}: {e}")),
        }
    }

    fn refuse_test_command(&mut self, why: std::fmt::Arguments<'_>) {
        if self.test_refused == 0 {
            log::warn!(
                "IBS test port {:#x}: ignored {why} (reported once)",
                test_port::IBS_TEST_PORT
            );
        }
        self.test_refused += 1;
    }

    /// The device wants an interrupt injected (now or once the guest's NMI handler ends).
    pub fn interrupt_pending(&self) -> bool {
        self.dev.interrupt_pending()
    }

    /// The embedder injected `irq`.
    pub fn injected(&mut self, irq: Interrupt) {
        match irq {
            Interrupt::Nmi => {
                self.nmis_injected += 1;
                self.nmi_in_service = true;
                self.dev.nmi_injected();
            }
            Interrupt::Fixed { .. } => self.fixed_injected += 1,
        }
    }

    /// A race the device saw since the last call (the caller ends the VM if it is fatal).
    /// The first [`RACES_LOGGED`] of this vCPU are logged here, later ones only counted
    /// (`ibs.races_detected`), since a kernel that hits the race in a loop would flood the
    /// log.
    pub fn take_race(&mut self) -> Option<RaceEvent> {
        let race = self.dev.take_race()?;
        self.races_seen += 1;
        if self.races_seen <= RACES_LOGGED {
            log::warn!("vCPU {}: {race}", self.id);
        }
        if self.races_seen == RACES_LOGGED {
            log::warn!(
                "vCPU {}: further IBS races are only counted (ibs.races_detected in --stats)",
                self.id
            );
        }
        Some(race)
    }

    /// Adds this vCPU's IBS counters to `counters`.
    pub fn add_counters(&self, counters: &mut Counters) {
        let s = self.dev.stats();
        for (name, value) in [
            ("ibs.msr_exits", s.msr_reads + s.msr_writes),
            ("ibs.msr_faults", s.faults),
            ("ibs.samples_latched", s.samples_latched),
            ("ibs.samples_delivered", s.samples_delivered),
            ("ibs.nmis_injected", self.nmis_injected),
            ("ibs.fixed_interrupts_injected", self.fixed_injected),
            ("ibs.dropped.unit_disabled", s.dropped_unit_disabled),
            ("ibs.dropped.val_set", s.dropped_val_set),
            ("ibs.dropped.stale_epoch", s.dropped_stale_epoch),
            ("ibs.dropped.inbox_full", s.dropped_inbox_full),
            ("ibs.dropped.lvt_masked", s.dropped_lvt_masked),
            ("ibs.dropped.undeliverable", s.dropped_undeliverable),
            ("ibs.dropped.nothing_latched", s.dropped_nothing_latched),
            ("ibs.stale_val_reads", s.stale_val_reads),
            ("ibs.val_written_back", s.val_written_back),
            ("ibs.races_detected", s.races_detected),
            (
                Command::FetchNmi.counter(),
                self.test_commands[Command::FetchNmi as usize],
            ),
            (
                Command::OpSampleNmiLate.counter(),
                self.test_commands[Command::OpSampleNmiLate as usize],
            ),
            ("ibs.test_port.refused", self.test_refused),
        ] {
            counters.add(name, value);
        }
        self.dev.source().add_counters(counters);
    }
}

impl VcpuDevices for VcpuIbs {
    fn rdmsr(&mut self, index: u32) -> Option<Result<u64, ()>> {
        is_vpmu_msr(index).then(|| self.dev.rdmsr(index).map_err(|e| log::debug!("{e}")))
    }

    fn wrmsr(&mut self, index: u32, value: u64) -> Option<Result<(), ()>> {
        if !is_vpmu_msr(index) {
            return None;
        }
        // A period this write starts runs from now, the run up to the write counted first
        // (WRMSR is a CPL0 instruction); a host source's kicks come here.
        self.settle_run(false);
        self.dev.set_guest_time(self.clock.now());
        self.dev.source().on_vcpu_thread();
        // In-NMI evidence for race detection is the device's own NMI still in service.
        Some(
            self.dev
                .wrmsr(index, value, &NoGuestContext)
                .map_err(|e| log::debug!("{e}")),
        )
    }

    fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        if port != test_port::IBS_TEST_PORT {
            return false;
        }
        data.fill(test_port::PORT_ID);
        true
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) -> bool {
        if port != test_port::IBS_TEST_PORT {
            return false;
        }
        match data {
            [byte] => match Command::from_byte(*byte) {
                Some(command) => self.test_command = Some(command),
                None => self.refuse_test_command(format_args!("unknown command byte {byte:#x}")),
            },
            _ => self.refuse_test_command(format_args!("a {}-byte write", data.len())),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Linux's op-unit sequence (vpmu/DEVICE.md §3), driven through the embedder glue.
    const IBS_OP_CTL: u32 = 0xc001_1033;
    const EILVT0: u32 = 0x850;
    const OP_EN: u64 = 1 << 17;
    const OP_VAL: u64 = 1 << 18;

    /// A kick exit at `rip`, in user mode.
    fn kick(rip: u64, nmi_blocked: bool) -> ExitState {
        ExitState {
            rip,
            nmi_blocked,
            kicked: true,
            user_mode: true,
        }
    }

    /// `exit`, after a run of `ns` guest nanoseconds.
    fn after(ns: u64, exit: ExitState) -> (u64, ExitState) {
        (ns, exit)
    }

    /// One KVM_RUN as the vCPU loop reports it: the run, then the exit.
    trait Step {
        fn step(&mut self, run: (u64, ExitState)) -> Option<Interrupt>;
    }

    impl Step for VcpuIbs {
        fn step(&mut self, (ns, exit): (u64, ExitState)) -> Option<Interrupt> {
            self.ran(ns, exit.kicked, 0);
            self.after_exit(exit)
        }
    }

    /// A kick exit at `rip` in kernel mode.
    fn kernel_kick(rip: u64) -> ExitState {
        ExitState {
            user_mode: false,
            ..kick(rip, false)
        }
    }

    #[test]
    fn a_sample_becomes_one_nmi() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        assert_eq!(ibs.rdmsr(EILVT0), Some(Ok(0x10000)), "EILVT resets masked");
        assert_eq!(
            ibs.wrmsr(EILVT0, 0x400),
            Some(Ok(())),
            "unmasked, NMI message type"
        );
        assert_eq!(ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN), Some(Ok(())));
        assert_eq!(
            ibs.after_exit(kick(0x40_1000, false)),
            None,
            "no time has passed"
        );
        assert_eq!(
            ibs.step(after(10_000_000, kick(0x40_1000, false))),
            Some(Interrupt::Nmi)
        );
        ibs.injected(Interrupt::Nmi);
        assert_eq!(
            ibs.after_exit(kick(0x40_1000, true)),
            None,
            "one NMI per sample"
        );
        let ctl = ibs.rdmsr(IBS_OP_CTL).unwrap().unwrap();
        assert_eq!(ctl & (OP_EN | OP_VAL), OP_EN | OP_VAL);
        assert_eq!(
            ibs.rdmsr(0xc001_1034),
            Some(Ok(0x40_1000)),
            "OP_RIP is the guest RIP"
        );
        let mut c = Counters::default();
        ibs.add_counters(&mut c);
        assert_eq!(
            (c.get("ibs.samples_latched"), c.get("ibs.nmis_injected")),
            (1, 1)
        );
        // EILVT0 read and write, OP_CTL write and read, OP_RIP read.
        assert_eq!(c.get("ibs.msr_exits"), 5);
    }

    /// Runs `ibs` until its op unit latches, the NMI is injected and the handler reads CTL.
    fn latch_op(ibs: &mut VcpuIbs) -> u64 {
        assert_eq!(
            ibs.step(after(10_000_000, kick(0x40_1000, false))),
            Some(Interrupt::Nmi)
        );
        assert!(!ibs.interrupt_pending(), "taken");
        ibs.injected(Interrupt::Nmi);
        ibs.rdmsr(IBS_OP_CTL).unwrap().unwrap()
    }

    /// A vCPU's IBS with the faithful policy and race warnings, its EILVT set up as Linux does.
    fn faithful_with_race_warnings() -> VcpuIbs {
        let settings = IbsSettings {
            policy: vpmu::Policy::Faithful,
            race_check: vpmu::RaceCheck::Warn,
            ..IbsSettings::default()
        };
        let mut ibs = VcpuIbs::new(&settings, 0, false).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        ibs
    }

    #[test]
    fn every_race_is_taken_once_and_counted() {
        let mut ibs = faithful_with_race_warnings();
        for n in 1..=RACES_LOGGED + 2 {
            ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
            let ctl = latch_op(&mut ibs);
            // The handler returns; stop writes the latched CTL back (Val kept, unpatched).
            ibs.after_exit(kick(0x40_1000, false));
            ibs.wrmsr(IBS_OP_CTL, ctl & !OP_EN);
            // Another NMI of the device's (here a second op period): its handler reads the
            // stale Val and enables from NMI context.
            ibs.dev.nmi_injected();
            assert_eq!(ibs.rdmsr(IBS_OP_CTL).unwrap().unwrap() & OP_VAL, OP_VAL);
            ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
            let race = ibs.take_race().expect("the race");
            assert!(!race.fatal);
            assert_eq!(ibs.races_seen, n);
            assert_eq!(ibs.take_race(), None);
            ibs.after_exit(kick(0x40_1000, false));
            ibs.wrmsr(IBS_OP_CTL, 0);
        }
    }

    /// The device's NMI is in service from its injection until an exit shows NMIs unblocked
    /// again: a stale enable inside the handler is the race, one after it is not.
    #[test]
    fn the_device_nmi_lasts_until_nmis_are_unblocked() {
        let mut ibs = faithful_with_race_warnings();
        let stale_enable = |ibs: &mut VcpuIbs, ctl: u64| {
            ibs.wrmsr(IBS_OP_CTL, ctl & !OP_EN);
            assert_eq!(ibs.rdmsr(IBS_OP_CTL).unwrap().unwrap() & OP_VAL, OP_VAL);
            ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        };
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        let ctl = latch_op(&mut ibs);
        ibs.after_exit(kick(0x10, false));
        stale_enable(&mut ibs, ctl);
        assert!(ibs.take_race().is_none(), "after the handler");
        let ctl = latch_op(&mut ibs);
        ibs.after_exit(kick(0x10, true));
        stale_enable(&mut ibs, ctl);
        assert!(ibs.take_race().is_some(), "inside the handler");
    }

    #[test]
    fn each_vcpu_samples_with_its_own_seed_and_the_given_scale() {
        let first = |settings: &IbsSettings, id| {
            let mut ibs = VcpuIbs::new(settings, id, false).unwrap();
            ibs.wrmsr(EILVT0, 0x400);
            // Fetch with RandEn: the seed picks the period's low bits.
            let fetch_ctl = 0xc001_1030;
            let mut periods = Vec::new();
            for _ in 0..8 {
                ibs.wrmsr(fetch_ctl, 0x1000 | 1 << 48 | 1 << 57);
                periods.push(ibs.deadline_in());
                ibs.wrmsr(fetch_ctl, 0);
            }
            periods
        };
        let settings = IbsSettings::default();
        assert_eq!(first(&settings, 0), first(&settings, 0), "deterministic");
        assert_ne!(first(&settings, 0), first(&settings, 1), "vCPUs differ");
        let reseeded = IbsSettings {
            seed: settings.seed + 1,
            ..settings
        };
        assert_ne!(
            first(&settings, 0),
            first(&reseeded, 0),
            "--ibs-seed counts"
        );
        let slower = IbsSettings {
            ns_per_op: 2.0,
            ..settings
        };
        let mut ibs = VcpuIbs::new(&slower, 0, false).unwrap();
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        assert_eq!(ibs.deadline_in(), Some(2 * 0x10000), "--ibs-scale counts");
    }

    #[test]
    fn injected_interrupts_are_counted() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        for _ in 0..2 {
            ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
            latch_op(&mut ibs);
            ibs.after_exit(kick(0x40_1000, false));
        }
        ibs.injected(Interrupt::Fixed { vector: 0x40 });
        let mut c = Counters::default();
        ibs.add_counters(&mut c);
        assert_eq!(
            (
                c.get("ibs.nmis_injected"),
                c.get("ibs.fixed_interrupts_injected")
            ),
            (2, 1)
        );
    }

    #[test]
    fn no_interrupt_is_taken_inside_an_nmi_handler() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        // The sample latches at an exit inside some NMI handler: not injected there.
        assert_eq!(ibs.step(after(10_000_000, kick(0x10, true))), None);
        assert_eq!(
            ibs.deadline_in(),
            Some(DEFERRED_IRQ_RETRY_NS),
            "retried soon"
        );
        // Handler gone: the request is re-checked and taken.
        assert_eq!(ibs.after_exit(kick(0x20, false)), Some(Interrupt::Nmi));
        ibs.injected(Interrupt::Nmi);
        assert_eq!(ibs.deadline_in(), None);
        // Again, but this time the handler consumes the sample first (a re-enable):
        // nothing is injected for it afterwards.
        ibs.after_exit(kick(0x20, true));
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        assert_eq!(ibs.step(after(10_000_000, kick(0x30, true))), None);
        let ctl = ibs.rdmsr(IBS_OP_CTL).unwrap().unwrap();
        ibs.wrmsr(IBS_OP_CTL, (ctl & !OP_VAL) & !OP_EN);
        assert_eq!(
            ibs.after_exit(kick(0x40, false)),
            None,
            "nothing latched any more"
        );
        let mut c = Counters::default();
        ibs.add_counters(&mut c);
        assert_eq!(c.get("ibs.dropped.nothing_latched"), 1);
    }

    #[test]
    fn samples_wait_for_a_kick() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        // Guest-caused exits of 100 ns each set the dead zone, then one after 10 ms of
        // guest time (say a page fault at 0x50) finds the sample due: none taken there.
        let own = |ns| {
            let exit = ExitState {
                kicked: false,
                ..kick(0x50, false)
            };
            after(ns, exit)
        };
        for _ in 0..30 {
            assert_eq!(ibs.step(own(100)), None);
        }
        assert_eq!(ibs.step(own(10_000_000)), None);
        assert_eq!(
            ibs.deadline_in(),
            Some(100),
            "kick as soon as an exit allows"
        );
        assert_eq!(ibs.after_exit(kick(0x60, false)), Some(Interrupt::Nmi));
        assert_eq!(ibs.rdmsr(0xc001_1034), Some(Ok(0x60)));
    }

    /// The run that ends at the guest's enabling WRMSR is counted before the write: on a
    /// host where that run can be long (the guest ran, then its kernel enabled IBS), it
    /// must not count towards the new period and put a sample on the instruction after
    /// the write.
    #[test]
    fn the_run_up_to_an_enabling_write_is_not_in_its_period() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        let own = ExitState {
            kicked: false,
            ..kick(0x70, false)
        };
        // Cheap guest-caused exits set a small dead zone.
        for _ in 0..30 {
            ibs.step(after(100, own));
        }
        // 50 ms of guest execution end at the enabling WRMSR.
        ibs.ran(50_000_000, false, 0);
        assert_eq!(ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN), Some(Ok(())));
        assert_eq!(ibs.after_exit(own), None);
        assert_eq!(
            ibs.deadline_in(),
            Some(0x10000),
            "the whole period is still due"
        );
    }

    #[test]
    fn a_kick_is_never_armed_sooner_than_an_exit_costs() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        // Guest-caused exits of 150 µs each (a nested host): no guest time.
        for _ in 0..10 {
            let exit = ExitState {
                kicked: false,
                ..kick(0x70, false)
            };
            ibs.step(after(150_000, exit));
        }
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        // 65.5 µs of the period remain, but the timer waits for the guest to run.
        assert_eq!(ibs.deadline_in(), Some(150_000));
    }

    #[test]
    fn periods_start_at_the_enabling_write() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        // 50 ms of guest time pass before the guest enables a 65 536-op (65.5 µs) period.
        ibs.step(after(50_000_000, kick(0x1000, false)));
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        assert_eq!(
            ibs.after_exit(kick(0x1234, false)),
            None,
            "no sample at the enabling write"
        );
        assert_eq!(
            ibs.step(after(65_536, kick(0x40_2000, false))),
            Some(Interrupt::Nmi)
        );
        assert_eq!(ibs.rdmsr(0xc001_1034), Some(Ok(0x40_2000)));
    }

    #[test]
    fn emulated_kernel_time_counts_less() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, true).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        // 3 ms in an emulated NMI handler: 3 µs of the 65.5 µs period.
        assert_eq!(
            ibs.step(after(3_000_000, kernel_kick(0xffff_ffff_8100_0000))),
            None
        );
        // Back in user mode (a run that ends there is not all native)...
        assert_eq!(ibs.after_exit(kick(0x40_1ff0, false)), None);
        // ...then the loop itself, native.
        assert_eq!(
            ibs.step(after(65_536, kick(0x40_2000, false))),
            Some(Interrupt::Nmi)
        );
        assert_eq!(
            ibs.rdmsr(0xc001_1034),
            Some(Ok(0x40_2000)),
            "the sample is in user code"
        );
    }

    #[test]
    fn the_kick_timer_stretches_while_the_vcpu_stays_in_the_kernel() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, true).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        // MaxCnt 0x1000: 65 536 ops, 65.5 µs of guest time.
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        let period = 65_536;
        ibs.after_exit(kick(0x40_1000, false));
        assert_eq!(
            ibs.deadline_in(),
            Some(period),
            "user mode: guest ns are wall ns"
        );
        let kernel_exit = ExitState {
            kicked: false,
            ..kernel_kick(0xffff_ffff_8100_0000)
        };
        ibs.after_exit(kernel_exit);
        assert_eq!(
            ibs.deadline_in(),
            Some(period),
            "first kernel run: no stretch yet"
        );
        // The vCPU stays in emulated kernel code: each kick doubles the wall time allowed,
        // so the period ends after about log2(1000) kicks, not 1000.
        let mut kicks = 0;
        loop {
            let wall = ibs.deadline_in().unwrap();
            kicks += 1;
            if ibs
                .step(after(wall, kernel_kick(0xffff_ffff_8100_0000)))
                .is_some()
            {
                break;
            }
            assert!(kicks < 20, "{kicks} kicks and no sample");
        }
        assert!((9..=12).contains(&kicks), "{kicks} kicks for one period");
        ibs.injected(Interrupt::Nmi);
        // The handler re-arms; a new period starts with no stretch, so a user loop the
        // handler returns to is sampled on time.
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        ibs.after_exit(ExitState {
            kicked: false,
            ..kernel_kick(0xffff_ffff_8100_0040)
        });
        assert_eq!(ibs.deadline_in(), Some(period));
        ibs.after_exit(kernel_kick(0xffff_ffff_8100_0080));
        assert_eq!(ibs.deadline_in(), Some(period * 2));
        // The first exit in user mode resets the stretch: never stretched there, and back
        // in the kernel it starts again from 1.
        ibs.after_exit(kick(0x40_2000, true));
        assert_eq!(
            ibs.deadline_in(),
            Some(period),
            "in user mode, never stretched"
        );
        ibs.after_exit(kernel_exit);
        assert_eq!(ibs.deadline_in(), Some(period));
    }

    #[test]
    fn the_test_port_forces_samples() {
        const FETCH_CTL: u32 = 0xc001_1030;
        const FETCH_EN: u64 = 1 << 48;
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        let mut id = [0u8];
        assert!(ibs.pio_read(test_port::IBS_TEST_PORT, &mut id));
        assert_eq!(id, [test_port::PORT_ID]);
        assert!(!ibs.pio_write(0xf4, &[1]), "not ours");
        ibs.wrmsr(EILVT0, 0x400);
        // Nothing counts yet: refused.
        assert!(ibs.pio_write(test_port::IBS_TEST_PORT, &[1]));
        assert_eq!(ibs.after_exit(kick(0x10, false)), None);
        ibs.wrmsr(FETCH_CTL, 0x1000 | FETCH_EN);
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        // Fetch: the NMI comes at once, no guest time having passed.
        assert!(ibs.pio_write(test_port::IBS_TEST_PORT, &[1]));
        assert_eq!(ibs.after_exit(kick(0x20, false)), Some(Interrupt::Nmi));
        ibs.injected(Interrupt::Nmi);
        assert_eq!(ibs.after_exit(kick(0x20, false)), None, "NMI returned");
        // Op, late: latched now, the NMI only after the next op CTL write (re-checked then).
        assert!(ibs.pio_write(test_port::IBS_TEST_PORT, &[2]));
        assert_eq!(ibs.after_exit(kick(0x30, false)), None);
        let ctl = ibs.rdmsr(IBS_OP_CTL).unwrap().unwrap();
        assert_eq!(ctl & (OP_EN | OP_VAL), OP_EN | OP_VAL);
        assert!(
            ibs.pio_write(test_port::IBS_TEST_PORT, &[9]),
            "unknown byte"
        );
        assert!(
            ibs.pio_write(test_port::IBS_TEST_PORT, &[1, 1]),
            "two bytes"
        );
        let mut c = Counters::default();
        ibs.add_counters(&mut c);
        assert_eq!(
            (
                c.get("ibs.test_port.fetch_nmi"),
                c.get("ibs.test_port.op_sample_nmi_late"),
                c.get("ibs.test_port.refused")
            ),
            (1, 1, 3)
        );
    }

    #[test]
    fn other_msrs_are_not_ours() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 1, false).unwrap();
        assert_eq!(ibs.rdmsr(0x10), None);
        assert_eq!(ibs.wrmsr(0xc000_0082, 1), None);
        assert_eq!(
            ibs.rdmsr(0xc001_103d),
            Some(Err(())),
            "OPDATA4 is never advertised: #GP"
        );
    }
}
