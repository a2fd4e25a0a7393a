//! Exit counters, per vCPU and for the whole VM (`--stats`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Counts of exits (and other events) by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters(BTreeMap<&'static str, u64>);

impl Counters {
    /// Adds one to `name`.
    pub fn bump(&mut self, name: &'static str) {
        self.add(name, 1);
    }

    /// Adds `n` to `name`.
    pub fn add(&mut self, name: &'static str, n: u64) {
        *self.0.entry(name).or_default() += n;
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Counters) {
        for (k, v) in &other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }

    /// The count for `name`.
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// Sum of all counts whose name starts with `prefix`.
    pub fn total(&self, prefix: &str) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }
}

/// What `--stats` prints when the VM ends.
#[derive(Debug, Clone)]
pub struct RunStats {
    /// Exits by reason, all vCPUs.
    pub exits: Counters,
    /// Wall time from start-up to the end of the VM.
    pub wall: Duration,
    /// The guest's TSC rate (KVM_GET_TSC_KHZ), to turn guest TSC readings into time.
    pub guest_tsc_khz: u32,
}

impl fmt::Display for RunStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ibsvm stats: wall time {:.3} s", self.wall.as_secs_f64())?;
        writeln!(f, "ibsvm stats: guest tsc_khz {}", self.guest_tsc_khz)?;
        writeln!(f, "ibsvm stats: exits total {}", self.exits.total("exit."))?;
        for (name, count) in &self.exits.0 {
            writeln!(f, "ibsvm stats: {name} {count}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_and_totals() {
        let mut a = Counters::default();
        a.bump("exit.io_out");
        a.bump("exit.io_out");
        let mut b = Counters::default();
        b.bump("exit.io_in");
        b.bump("completed.int3");
        a.merge(&b);
        assert_eq!(a.get("exit.io_out"), 2);
        assert_eq!(a.total("exit."), 3);
        let s = RunStats {
            exits: a,
            wall: Duration::from_millis(1500),
            guest_tsc_khz: 2_300_000,
        }
        .to_string();
        assert!(s.contains("wall time 1.500 s"));
        assert!(s.contains("guest tsc_khz 2300000"));
        assert!(s.contains("exits total 3"));
        assert!(s.contains("completed.int3 1"));
    }
}
