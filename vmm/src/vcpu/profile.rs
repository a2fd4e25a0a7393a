//! A sampling profiler of the guest: the RIP of a vCPU every interval of its run time
//! (`--guest-profile`), for finding where a guest spends its time — on a CPL0-emulating
//! host, mostly in emulated kernel code.

/// RIP samples of one vCPU.
#[derive(Debug, Clone)]
pub struct GuestProfiler {
    interval_ns: u64,
    next_ns: u64,
    samples: Vec<u64>,
}

impl GuestProfiler {
    /// Samples every `interval_ns` of run time (at least 1 µs).
    pub fn new(interval_ns: u64) -> Self {
        let interval_ns = interval_ns.max(1_000);
        Self {
            interval_ns,
            next_ns: interval_ns,
            samples: Vec::new(),
        }
    }

    /// Run time until the next sample is due, given the vCPU's run time `run_ns`.
    pub fn due_in(&self, run_ns: u64) -> u64 {
        self.next_ns.saturating_sub(run_ns)
    }

    /// After a kick at `rip`: records a sample if one is due. Call it at kicks only: an exit
    /// the guest's own instruction caused would pin the sample on that instruction.
    pub fn after_exit(&mut self, run_ns: u64, rip: u64) {
        if run_ns >= self.next_ns {
            self.samples.push(rip);
            self.next_ns = run_ns + self.interval_ns;
        }
    }

    /// The samples, oldest first.
    pub fn into_samples(self) -> Vec<u64> {
        self.samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sample_per_interval() {
        let mut p = GuestProfiler::new(1_000_000);
        assert_eq!(p.due_in(0), 1_000_000);
        p.after_exit(500_000, 0x10);
        assert_eq!(p.due_in(500_000), 500_000);
        p.after_exit(1_200_000, 0x20);
        p.after_exit(1_300_000, 0x30);
        assert_eq!(p.due_in(1_300_000), 900_000);
        p.after_exit(2_200_000, 0x40);
        assert_eq!(p.into_samples(), vec![0x20, 0x40]);
        assert_eq!(GuestProfiler::new(1).due_in(0), 1_000, "floor of 1 µs");
    }
}
