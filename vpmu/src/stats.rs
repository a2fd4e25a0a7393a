//! Counters of one device (or, merged, of a whole VM).

use std::ops::{Add, AddAssign};

/// Why a sample or an interrupt was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum DropReason {
    /// Sample: the unit was disabled (En = 0) when it arrived.
    UnitDisabled,
    /// Sample: the unit still held a sample (Val = 1); no new sample latches then.
    ValSet,
    /// Sample: produced for an earlier arming of the unit (its epoch is not current).
    StaleEpoch,
    /// Sample: another sample of the same arming was already waiting in the inbox.
    InboxFull,
    /// Interrupt: the extended LVT entry was masked.
    LvtMasked,
    /// Interrupt: the LVT message type (SMI, ExtINT, reserved) or vector (< 16) is not one
    /// the device delivers.
    Undeliverable,
    /// Interrupt: on the re-check before injection no unit still held a latched sample.
    NothingLatched,
}

/// Counters, all monotonic. `Copy`; merge per-vCPU values with `+`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Stats {
    /// Guest reads of device MSRs (including faulting ones).
    pub msr_reads: u64,
    /// Guest writes of device MSRs (including faulting ones).
    pub msr_writes: u64,
    /// MSR accesses answered with #GP.
    pub faults: u64,
    /// Samples latched into a unit (Val 0 → 1).
    pub samples_latched: u64,
    /// Latched samples whose interrupt was taken by the embedder.
    pub samples_delivered: u64,
    /// Interrupt requests raised (at most one per Val 0 → 1 transition).
    pub interrupts_requested: u64,
    /// Interrupts handed to the embedder by [`crate::Vpmu::take_interrupt`].
    pub interrupts_taken: u64,
    /// Samples dropped: unit disabled.
    pub dropped_unit_disabled: u64,
    /// Samples dropped: Val still set.
    pub dropped_val_set: u64,
    /// Samples dropped: stale epoch (an earlier arming of the unit).
    pub dropped_stale_epoch: u64,
    /// Samples dropped: the inbox already held one for the unit.
    pub dropped_inbox_full: u64,
    /// Interrupts not raised or withdrawn: LVT masked.
    pub dropped_lvt_masked: u64,
    /// Interrupts not raised: message type or vector not deliverable.
    pub dropped_undeliverable: u64,
    /// Interrupts withdrawn at the re-check: nothing latched any more.
    pub dropped_nothing_latched: u64,
    /// CTL reads that returned Val = 1 not latched by the device (always 0 under
    /// [`crate::Policy::Protect`]).
    pub stale_val_reads: u64,
    /// CTL writes carrying Val = 1 with En = 0: a stop path (Linux `perf_ibs_stop`)
    /// writing back the CTL of a latched sample, the state the race starts from
    /// ([device model §4](crate::device_model)). Counted under both policies;
    /// [`crate::Policy::Protect`] stores them with Val = 0.
    pub val_written_back: u64,
    /// Guest IBS races detected ([device model §5.9](crate::device_model)).
    pub races_detected: u64,
    /// Samples forced by the race-reproduction hook ([`crate::Vpmu::force_sample`]).
    pub forced_samples: u64,
}

impl Stats {
    /// Count one drop.
    pub fn record_drop(&mut self, reason: DropReason) {
        *self.drop_counter(reason) += 1;
    }

    /// The counter of `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::UnitDisabled => self.dropped_unit_disabled,
            DropReason::ValSet => self.dropped_val_set,
            DropReason::StaleEpoch => self.dropped_stale_epoch,
            DropReason::InboxFull => self.dropped_inbox_full,
            DropReason::LvtMasked => self.dropped_lvt_masked,
            DropReason::Undeliverable => self.dropped_undeliverable,
            DropReason::NothingLatched => self.dropped_nothing_latched,
        }
    }

    fn drop_counter(&mut self, reason: DropReason) -> &mut u64 {
        match reason {
            DropReason::UnitDisabled => &mut self.dropped_unit_disabled,
            DropReason::ValSet => &mut self.dropped_val_set,
            DropReason::StaleEpoch => &mut self.dropped_stale_epoch,
            DropReason::InboxFull => &mut self.dropped_inbox_full,
            DropReason::LvtMasked => &mut self.dropped_lvt_masked,
            DropReason::Undeliverable => &mut self.dropped_undeliverable,
            DropReason::NothingLatched => &mut self.dropped_nothing_latched,
        }
    }

    /// Add `other` into `self` (saturating).
    pub fn merge(&mut self, other: &Stats) {
        let Stats {
            msr_reads,
            msr_writes,
            faults,
            samples_latched,
            samples_delivered,
            interrupts_requested,
            interrupts_taken,
            dropped_unit_disabled,
            dropped_val_set,
            dropped_stale_epoch,
            dropped_inbox_full,
            dropped_lvt_masked,
            dropped_undeliverable,
            dropped_nothing_latched,
            stale_val_reads,
            val_written_back,
            races_detected,
            forced_samples,
        } = *other;
        let pairs = [
            (&mut self.msr_reads, msr_reads),
            (&mut self.msr_writes, msr_writes),
            (&mut self.faults, faults),
            (&mut self.samples_latched, samples_latched),
            (&mut self.samples_delivered, samples_delivered),
            (&mut self.interrupts_requested, interrupts_requested),
            (&mut self.interrupts_taken, interrupts_taken),
            (&mut self.dropped_unit_disabled, dropped_unit_disabled),
            (&mut self.dropped_val_set, dropped_val_set),
            (&mut self.dropped_stale_epoch, dropped_stale_epoch),
            (&mut self.dropped_inbox_full, dropped_inbox_full),
            (&mut self.dropped_lvt_masked, dropped_lvt_masked),
            (&mut self.dropped_undeliverable, dropped_undeliverable),
            (&mut self.dropped_nothing_latched, dropped_nothing_latched),
            (&mut self.stale_val_reads, stale_val_reads),
            (&mut self.val_written_back, val_written_back),
            (&mut self.races_detected, races_detected),
            (&mut self.forced_samples, forced_samples),
        ];
        for (mine, theirs) in pairs {
            *mine = mine.saturating_add(theirs);
        }
    }
}

impl AddAssign for Stats {
    fn add_assign(&mut self, other: Stats) {
        self.merge(&other);
    }
}

impl Add for Stats {
    type Output = Stats;
    fn add(mut self, other: Stats) -> Stats {
        self.merge(&other);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_every_field() {
        let reasons = [
            DropReason::UnitDisabled,
            DropReason::ValSet,
            DropReason::StaleEpoch,
            DropReason::InboxFull,
            DropReason::LvtMasked,
            DropReason::Undeliverable,
            DropReason::NothingLatched,
        ];
        let mut a = Stats {
            msr_reads: 1,
            races_detected: 2,
            ..Stats::default()
        };
        for r in reasons {
            a.record_drop(r);
        }
        let b = a + a;
        assert_eq!(b.msr_reads, 2);
        assert_eq!(b.races_detected, 4);
        for r in reasons {
            assert_eq!(b.dropped(r), 2, "{r:?}");
        }
        let mut c = Stats {
            faults: u64::MAX,
            ..Stats::default()
        };
        c += b;
        c += b;
        assert_eq!(c.faults, u64::MAX);
    }
}
