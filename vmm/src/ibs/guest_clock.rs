//! The synthetic sampler's clock: how much the guest itself executed, estimated from the
//! CPU time the vCPU thread spends in each `KVM_RUN`.
//!
//! A run's CPU time is the guest's execution plus the host's work for the exit that ends
//! it (and for the entry): the world switch, KVM's exit handling, the return to ibsvm.
//! Real IBS counts only the guest's ops. Where exits are expensive against a period (a
//! nested or emulated host: 60–400 µs of CPU time per exit, against a 524 µs period of the
//! test kernel's demo) an unadjusted clock expires periods inside the guest's own IBS MSR
//! accesses, so samples pile up right after the WRMSR in its NMI handler, and NMIs follow
//! each other.
//!
//! Two kinds of exits end a run, and their overhead biases samples differently:
//! - a **kick** (ibsvm's timer, a signal) stops the guest wherever it happens to be:
//!   charging its overhead to the guest clock only shortens periods, it does not move
//!   samples. It counts in full. (Its overhead cannot be told from the guest work it
//!   interrupts: when the vCPU leaves only at the timer's kicks, every kick run carries a
//!   whole period.) Except the first kick after a guest-caused exit: a timer that fires
//!   while KVM is still entering the guest stops it where that exit left it, and a sample
//!   taken there would land on the instruction after the guest's own MSR write (say)
//!   whenever an entry happens to take long. That run counts beyond the dead zone too,
//!   so the sample waits for the next kick, which counts in full.
//! - an exit the **guest's own instruction** caused (MSR, port I/O, MMIO) always ends at
//!   that instruction, and a kick that retries an interrupt deferred by the guest's NMI
//!   handler ends in that handler: any overhead charged there lands samples there. Such a run counts
//!   only the part of its time beyond what such exits cost on this host (a high quantile
//!   of recent ones): a dead zone that the host's noise stays inside. Guest work shorter
//!   than that dead zone before such an exit is not counted — the price of never counting
//!   the host's work as the guest's.
//!
//! A run also holds the exits KVM handled itself without returning to ibsvm (the guest
//! kernel's local APIC and timer MSR writes, nested page faults, interrupt windows; KVM's
//! own per-vCPU count tells how many, see `crate::vcpu::kvm_exits`). Each is as expensive
//! as a guest-caused exit, and a guest kernel's timer tick makes several: each is charged
//! what such an exit typically costs (the median of recent ones). (A run the kick
//! timer ended is passed in only up to the timer's expiry: the signal's delivery and the
//! exit after it are the host's.)
//!
//! On hosts whose KVM emulates guest CPL0 code, runs that entered or left at CPL0 count
//! `1/cpl0_divisor` of what remains (see [`GuestClock::account`]).

/// How many recent runs of each kind the cost estimates look at.
const WINDOW: usize = 256;
/// The quantile of recent guest-caused exits' run times taken as their cost: the dead zone.
const GUEST_EXIT_QUANTILE: f64 = 0.95;
/// The quantile taken as what one exit typically costs (charged per exit KVM handled).
const TYPICAL_QUANTILE: f64 = 0.5;
/// How often (in runs of one kind) an estimate is recomputed from its window.
const REESTIMATE_EVERY: u32 = 32;

/// What exits cost on this host, from recent runs that ended at a guest-caused exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExitCost {
    /// A high quantile: the dead zone.
    dead_zone: u64,
    /// The median: one exit's typical cost.
    typical: u64,
}

/// Recent run times of guest-caused exits and quantiles of them.
#[derive(Debug, Clone, Default)]
struct CostWindow {
    recent: Vec<u64>,
    next: usize,
    since_estimate: u32,
    estimate: Option<ExitCost>,
}

impl CostWindow {
    /// Records a run of `ns` and returns the dead zone to subtract from it (one that
    /// includes `ns` whenever the window is re-estimated, as at the first run).
    fn record(&mut self, ns: u64) -> u64 {
        if self.recent.len() < WINDOW {
            self.recent.push(ns);
        } else {
            self.recent[self.next] = ns;
            self.next = (self.next + 1) % WINDOW;
        }
        self.since_estimate += 1;
        // Every run while the window fills, then every REESTIMATE_EVERY runs.
        if self.recent.len() < WINDOW / 4 || self.since_estimate >= REESTIMATE_EVERY {
            self.since_estimate = 0;
            let mut sorted = self.recent.clone();
            sorted.sort_unstable();
            let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
            self.estimate = Some(ExitCost {
                dead_zone: at(GUEST_EXIT_QUANTILE),
                typical: at(TYPICAL_QUANTILE),
            });
        }
        self.estimate.map_or(ns, |e| e.dead_zone)
    }
}

/// How a run ended, for [`GuestClock::account`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The vCPU was kicked (timer, signal): stopped wherever the guest was.
    Kick,
    /// The guest's own instruction exited (MSR, port I/O, MMIO, …), or a kick aimed at a
    /// point the guest chose (its NMI handler).
    GuestExit,
}

/// Guest nanoseconds of execution, as the synthetic sampler counts them.
#[derive(Debug, Clone)]
pub struct GuestClock {
    guest_ns: u64,
    cpl0_divisor: u64,
    guest_exit: CostWindow,
    /// The last run ended at a guest-caused exit: the next one began with an entry to
    /// where the guest had left off.
    resumed_after_guest_exit: bool,
}

impl GuestClock {
    /// A clock at 0; `cpl0_divisor` is 1 where KVM runs CPL0 code natively.
    pub fn new(cpl0_divisor: u64) -> Self {
        Self {
            guest_ns: 0,
            cpl0_divisor: cpl0_divisor.max(1),
            guest_exit: CostWindow::default(),
            resumed_after_guest_exit: false,
        }
    }

    /// The guest time so far.
    pub fn now(&self) -> u64 {
        self.guest_ns
    }

    /// What an exit the guest's own instruction caused costs on this host, as estimated
    /// so far (the dead zone; 0 before the first such exit): the CPU time of a run that
    /// did next to nothing in the guest.
    pub fn exit_cost(&self) -> u64 {
        self.guest_exit.estimate.map_or(0, |e| e.dead_zone)
    }

    /// What one exit typically costs on this host (0 before the first guest-caused exit).
    fn typical_exit_cost(&self) -> u64 {
        self.guest_exit.estimate.map_or(0, |e| e.typical)
    }

    /// The divisor for emulated CPL0 time (1 on hosts that run CPL0 natively).
    pub fn cpl0_divisor(&self) -> u64 {
        self.cpl0_divisor
    }

    /// Adds one `KVM_RUN` of `ns` CPU nanoseconds that ended as `end`, during which KVM
    /// handled `kvm_exits` exits itself; `native` says whether the vCPU was at CPL3 when it
    /// entered and when it left.
    ///
    /// Where KVM emulates CPL0 code (~0.5 µs an instruction instead of a fraction of a
    /// nanosecond), time spent in the kernel would otherwise buy thousands of times its
    /// share of samples, and a period the guest's NMI handler re-arms would expire inside
    /// that handler; such runs count `1/cpl0_divisor` of their time.
    pub fn account(&mut self, ns: u64, end: RunEnd, native: bool, kvm_exits: u64) {
        let ns = ns.saturating_sub(kvm_exits.saturating_mul(self.typical_exit_cost()));
        let cost = match end {
            RunEnd::Kick if self.resumed_after_guest_exit => self.exit_cost(),
            RunEnd::Kick => 0,
            RunEnd::GuestExit => self.guest_exit.record(ns),
        };
        self.resumed_after_guest_exit = end == RunEnd::GuestExit;
        let guest = ns.saturating_sub(cost);
        self.guest_ns += if native {
            guest
        } else {
            guest / self.cpl0_divisor
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_window_is_re_estimated_every_32_runs_and_forgets_old_ones() {
        let mut w = CostWindow::default();
        for _ in 0..WINDOW {
            assert_eq!(w.record(10), 10);
        }
        // Estimated last at run 255: twenty expensive runs do not move it yet...
        for _ in 0..20 {
            assert_eq!(w.record(1000), 10);
        }
        // ...the 32nd since does (32 of 256 runs now cost 1000: above the 95th percentile).
        for _ in 20..31 {
            w.record(1000);
        }
        assert_eq!(w.record(1000), 1000);
        // A whole window of cheap runs replaces them all.
        for _ in 0..WINDOW {
            w.record(10);
        }
        assert_eq!(w.estimate.map(|e| (e.dead_zone, e.typical)), Some((10, 10)));
    }

    /// A deterministic spread of exit costs around `mean` (±60 %), as on a nested host.
    fn noisy(mean: u64, i: u64) -> u64 {
        let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40; // 0..2^24
        mean * 4 / 10 + mean * 12 / 10 * x / (1 << 24)
    }

    /// A clock that has seen 1000 guest-caused exits of noisy(`mean`) each.
    fn after_guest_exits(mean: u64) -> GuestClock {
        let mut clock = GuestClock::new(1);
        for i in 0..1000 {
            clock.account(noisy(mean, i), RunEnd::GuestExit, true, 0);
        }
        clock
    }

    #[test]
    fn exits_the_guest_caused_charge_almost_nothing() {
        let mut clock = GuestClock::new(1);
        for i in 0..10_000 {
            clock.account(noisy(150_000, i), RunEnd::GuestExit, true, 0);
        }
        // 10 000 exits of 60-240 µs: 1.5 s of host time; at most the 5 % above the dead
        // zone leaks, by less than the spread each.
        assert!(clock.now() < 10_000 * 150_000 / 100, "{} ns", clock.now());
    }

    #[test]
    fn kicks_count_in_full() {
        let mut clock = after_guest_exits(150_000);
        // The first kick follows a guest-caused exit: it counts beyond the dead zone.
        let before = clock.now();
        clock.account(524_288, RunEnd::Kick, true, 0);
        let first = clock.now() - before;
        let dead_zone = clock.exit_cost();
        assert_eq!(first, 524_288 - dead_zone);
        let before = clock.now();
        for _ in 0..10 {
            clock.account(524_288, RunEnd::Kick, true, 0);
        }
        assert_eq!(clock.now() - before, 10 * 524_288);
    }

    #[test]
    fn a_kick_during_the_entry_after_a_guest_exit_counts_nothing() {
        let mut clock = after_guest_exits(150_000);
        // The timer fired at the dead zone's edge, before the guest ran: no guest time,
        // so no sample there. The next kick's run is all the guest's.
        let before = clock.now();
        clock.account(clock.exit_cost(), RunEnd::Kick, true, 0);
        assert_eq!(clock.now(), before);
        clock.account(65_536, RunEnd::Kick, true, 0);
        assert_eq!(clock.now(), before + 65_536);
    }

    #[test]
    fn guest_work_before_an_exit_counts_beyond_the_dead_zone() {
        let mut clock = after_guest_exits(100_000);
        let before = clock.now();
        clock.account(5_000_000, RunEnd::GuestExit, true, 0);
        let counted = clock.now() - before;
        assert!(
            (4_800_000..5_000_000).contains(&counted),
            "{counted} ns of 5 ms counted"
        );
    }

    #[test]
    fn the_exit_cost_is_the_dead_zone() {
        assert_eq!(GuestClock::new(1).exit_cost(), 0, "nothing measured yet");
        let clock = after_guest_exits(100_000);
        // noisy(100 µs) spreads over 40-160 µs: its p95 is about 154 µs.
        assert!(
            (145_000..=160_000).contains(&clock.exit_cost()),
            "{}",
            clock.exit_cost()
        );
    }

    #[test]
    fn exits_kvm_handled_itself_are_charged_their_typical_cost() {
        let mut clock = after_guest_exits(150_000);
        let typical = clock.typical_exit_cost();
        // noisy(150 µs) spreads over 60-240 µs: its median is about 150 µs.
        assert!((140_000..=160_000).contains(&typical), "{typical}");
        // 1 ms of guest work and a timer tick of four exits KVM handled: the guest's 1 ms.
        clock.account(65_536, RunEnd::Kick, true, 0);
        let before = clock.now();
        clock.account(1_000_000 + 4 * typical, RunEnd::Kick, true, 4);
        assert_eq!(clock.now() - before, 1_000_000);
    }

    #[test]
    fn emulated_kernel_time_counts_less() {
        let mut clock = GuestClock::new(1000);
        clock.account(3_000_000, RunEnd::Kick, false, 0);
        assert_eq!(clock.now(), 3_000);
        clock.account(65_536, RunEnd::Kick, true, 0);
        assert_eq!(clock.now(), 3_000 + 65_536);
    }
}
