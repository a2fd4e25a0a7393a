//! The hand-off point between sampler threads and the vCPU thread.
//!
//! One lock guards, per unit, the current epoch, whether the unit accepts samples, and at most
//! one pending sample. The vCPU thread opens a unit (new epoch, pending sample dropped)
//! before it arms the source, closes it when the unit stops counting, and drains it at sample
//! points; a sampler thread delivers. Every operation is a single critical section, so the
//! start path and the delivery path are linearizable against each other: a delivery either
//! happens entirely before an `open` (and its sample is dropped by it) or entirely after (and
//! its old epoch is rejected).

use std::sync::{Arc, Mutex, MutexGuard};

use super::{Epoch, Sample};
use crate::stats::{DropReason, Stats};
use crate::unit::UnitKind;

#[derive(Debug)]
struct Slot {
    epoch: Epoch,
    /// Why samples of the current epoch are refused; `None` while the unit is counting.
    closed: Option<DropReason>,
    pending: Option<Sample>,
}

impl Default for Slot {
    /// A unit that was never armed: closed.
    fn default() -> Slot {
        Slot {
            epoch: Epoch::NONE,
            closed: Some(DropReason::UnitDisabled),
            pending: None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    last_epoch: Epoch,
    slots: [Slot; 2],
    drops: Stats,
}

/// The device's end of the inbox.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    state: Arc<Mutex<State>>,
}

/// A cloneable, `Send + Sync` handle through which another thread (e.g. a host perf reader)
/// delivers samples to one device. Get it from [`crate::Vpmu::sink`].
#[derive(Clone, Debug)]
pub struct SampleSink {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the slots inconsistent (every update is a
    // plain field store), so a poisoned lock is still usable.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SampleSink {
    /// Deliver a sample. It is kept only if its epoch is the unit's current arming, the unit
    /// is counting, and no other sample of that arming is waiting; otherwise it is dropped,
    /// counted, and the reason returned.
    pub fn deliver(&self, sample: Sample) -> Result<(), DropReason> {
        let mut st = lock(&self.state);
        let slot = &st.slots[sample.unit().index()];
        let verdict = if sample.epoch() != slot.epoch {
            Err(DropReason::StaleEpoch)
        } else if let Some(reason) = slot.closed {
            Err(reason)
        } else if slot.pending.is_some() {
            Err(DropReason::InboxFull)
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => st.slots[sample.unit().index()].pending = Some(sample),
            Err(reason) => st.drops.record_drop(reason),
        }
        verdict
    }
}

impl Inbox {
    /// A sink for other threads.
    pub(crate) fn sink(&self) -> SampleSink {
        SampleSink {
            state: Arc::clone(&self.state),
        }
    }

    /// Start a new arming of `unit`: new epoch, pending sample of the old one dropped.
    pub(crate) fn open(&self, unit: UnitKind) -> Epoch {
        let mut st = lock(&self.state);
        let epoch = st.last_epoch.next();
        st.last_epoch = epoch;
        let slot = &mut st.slots[unit.index()];
        let dropped = slot.pending.take().is_some();
        slot.epoch = epoch;
        slot.closed = None;
        if dropped {
            st.drops.record_drop(DropReason::StaleEpoch);
        }
        epoch
    }

    /// `unit` stopped counting: refuse its samples (with `reason`) and drop a pending one.
    pub(crate) fn close(&self, unit: UnitKind, reason: DropReason) {
        let mut st = lock(&self.state);
        let slot = &mut st.slots[unit.index()];
        let dropped = slot.pending.take().is_some();
        slot.closed = Some(reason);
        if dropped {
            st.drops.record_drop(reason);
        }
    }

    /// Take the pending samples of both units.
    pub(crate) fn drain(&self) -> [Option<Sample>; 2] {
        let mut st = lock(&self.state);
        let [fetch, op] = &mut st.slots;
        [fetch.pending.take(), op.pending.take()]
    }

    /// Drops counted inside the inbox.
    pub(crate) fn drops(&self) -> Stats {
        lock(&self.state).drops
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::OpSample;

    fn op(epoch: Epoch) -> Sample {
        Sample::op(epoch, OpSample::default())
    }

    #[test]
    fn accepts_only_current_open_epoch_once() {
        let inbox = Inbox::default();
        let sink = inbox.sink();
        assert_eq!(sink.deliver(op(Epoch::NONE)), Err(DropReason::UnitDisabled));
        let e1 = inbox.open(UnitKind::Op);
        assert_eq!(sink.deliver(op(e1)), Ok(()));
        assert_eq!(sink.deliver(op(e1)), Err(DropReason::InboxFull));
        let e2 = inbox.open(UnitKind::Op); // drops the pending e1 sample
        assert_eq!(inbox.drain(), [None, None]);
        assert_eq!(sink.deliver(op(e1)), Err(DropReason::StaleEpoch));
        assert_eq!(sink.deliver(op(e2)), Ok(()));
        inbox.close(UnitKind::Op, DropReason::UnitDisabled);
        assert_eq!(sink.deliver(op(e2)), Err(DropReason::UnitDisabled));
        let d = inbox.drops();
        assert_eq!(d.dropped_stale_epoch, 2);
        assert_eq!(d.dropped_inbox_full, 1);
        assert_eq!(d.dropped_unit_disabled, 3); // never armed, pending dropped by close, closed
        let e3 = inbox.open(UnitKind::Op);
        sink.deliver(op(e3)).unwrap();
        assert_eq!(inbox.drain(), [None, Some(op(e3))]);
    }

    #[test]
    fn sink_is_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<SampleSink>();
    }
}
