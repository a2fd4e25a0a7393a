//! A sample source that works on any host: the VMM samples the vCPU itself
//! ([device model §6](crate::device_model)).
//!
//! **Scale.** The guest's period is MaxCnt × 16 events (fetches, ops or cycles); the source
//! turns it into guest run time as `events × ns_per_op` nanoseconds (default 1 ns per event,
//! i.e. a 1 GHz one-op-per-cycle machine), never less than `min_interval_ns` (default 10 µs,
//! so a guest asking for tiny periods cannot make the VMM kick its vCPU more often than
//! that). Fetch RandEn subtracts a random 0–15 from the period (the manual randomises the
//! counter's low 4 bits); the op counter starts from the CurCnt the guest wrote.
//!
//! **Contents.** At a sample point the embedder passes the guest RIP it read (e.g. from KVM
//! `sync_regs`). Fetch: LINADDR = RIP, Comp = 1, nothing else (PhyAddrValid = 0, no latency,
//! no miss bits). Op: OP_RIP = RIP, CurCnt's low 7 bits random (as real parts preload them),
//! DATA/DATA2/DATA3/DC_LINADDR/BR_TARGET all 0 — so RipInvalid = 0, LdOp = StOp = 0 and
//! DcLinAddrValid = 0: fields the VMM cannot know stay zero with their valid bits clear.
//!
//! **Determinism.** All randomness comes from a SplitMix64 generator seeded by
//! [`SyntheticConfig::seed`], so the same seed and the same calls give the same samples.

use crate::msr::{FETCH_COMP, OP_CUR_CNT_SHIFT};
use crate::source::{Arm, Epoch, FetchSample, OpSample, Sample, SamplePoint, SampleSource};
use crate::unit::UnitKind;

/// Settings of the synthetic source.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SyntheticConfig {
    /// Seed of the generator.
    pub seed: u64,
    /// Guest nanoseconds per counted event; finite and > 0.
    pub ns_per_op: f64,
    /// Shortest interval between arming and sample, in guest nanoseconds.
    pub min_interval_ns: u64,
}

impl Default for SyntheticConfig {
    fn default() -> SyntheticConfig {
        SyntheticConfig {
            seed: 0x0001_B5C0_FFEE,
            ns_per_op: 1.0,
            min_interval_ns: 10_000,
        }
    }
}

/// Invalid synthetic-source settings.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum SyntheticError {
    /// `ns_per_op` is not a finite positive number.
    #[error("synthetic IBS source: ns_per_op {0} must be finite and greater than 0")]
    NsPerOp(f64),
}

/// SplitMix64 (Steele, Lea, Flood: "Fast splittable pseudorandom number generators", 2014).
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Armed {
    epoch: Epoch,
    deadline_ns: u64,
}

/// The synthetic [`SampleSource`].
#[derive(Clone, Debug)]
pub struct SyntheticSource {
    config: SyntheticConfig,
    rng: SplitMix64,
    /// Latest guest time seen at a sample point; armings count from here.
    now_ns: u64,
    armed: [Option<Armed>; 2],
}

impl SyntheticSource {
    /// A source with validated settings.
    pub fn new(config: SyntheticConfig) -> Result<SyntheticSource, SyntheticError> {
        if !(config.ns_per_op.is_finite() && config.ns_per_op > 0.0) {
            return Err(SyntheticError::NsPerOp(config.ns_per_op));
        }
        Ok(SyntheticSource::unchecked(config))
    }

    fn unchecked(config: SyntheticConfig) -> SyntheticSource {
        SyntheticSource {
            config,
            rng: SplitMix64(config.seed),
            now_ns: 0,
            armed: [None; 2],
        }
    }

    /// The settings.
    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    /// Guest nanoseconds for a period of `events` (see the module docs for the scale).
    pub fn interval_ns(&self, events: u64) -> u64 {
        // `as` saturates for out-of-range floats; ns_per_op is finite and positive.
        let ns = (events as f64 * self.config.ns_per_op) as u64;
        ns.max(self.config.min_interval_ns)
    }
}

impl Default for SyntheticSource {
    /// The source with [`SyntheticConfig::default`] settings.
    fn default() -> SyntheticSource {
        SyntheticSource::unchecked(SyntheticConfig::default())
    }
}

impl SampleSource for SyntheticSource {
    fn arm(&mut self, arm: &Arm) {
        let mut events = arm.max_count.saturating_sub(arm.start_count);
        if arm.rand_en {
            events = events.saturating_sub(self.rng.next() & 0xF);
        }
        let deadline_ns = self.now_ns.saturating_add(self.interval_ns(events.max(1)));
        self.armed[arm.unit.index()] = Some(Armed {
            epoch: arm.epoch,
            deadline_ns,
        });
    }

    fn disarm(&mut self, unit: UnitKind) {
        self.armed[unit.index()] = None;
    }

    fn next_deadline(&self) -> Option<u64> {
        self.armed.iter().flatten().map(|a| a.deadline_ns).min()
    }

    fn set_guest_time(&mut self, guest_ns: u64) {
        self.now_ns = self.now_ns.max(guest_ns);
    }

    fn expire(&mut self, unit: UnitKind) -> bool {
        let now = self.now_ns;
        self.armed[unit.index()]
            .as_mut()
            .map(|a| a.deadline_ns = a.deadline_ns.min(now))
            .is_some()
    }

    fn poll(&mut self, at: &SamplePoint) -> Option<Sample> {
        self.set_guest_time(at.guest_ns);
        let unit = UnitKind::ALL
            .into_iter()
            .find(|u| self.armed[u.index()].is_some_and(|a| a.deadline_ns <= self.now_ns))?;
        let armed = self.armed[unit.index()].take()?;
        Some(match unit {
            UnitKind::Fetch => Sample::fetch(
                armed.epoch,
                FetchSample {
                    status: FETCH_COMP,
                    linaddr: at.rip,
                    ctl_ext: 0,
                },
            ),
            UnitKind::Op => Sample::op(
                armed.epoch,
                OpSample {
                    status: (self.rng.next() & 0x7F) << OP_CUR_CNT_SHIFT,
                    rip: at.rip,
                    ..OpSample::default()
                },
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SampleRegs;

    fn arm(unit: UnitKind, epoch: u64, max_count: u64, rand_en: bool) -> Arm {
        Arm {
            unit,
            epoch: Epoch(epoch),
            ctl: 0,
            max_count,
            start_count: 0,
            rand_en,
        }
    }

    #[test]
    fn periods_start_at_the_arming_time() {
        let mut s = SyntheticSource::default();
        s.set_guest_time(5_000_000);
        s.arm(&arm(UnitKind::Op, 1, 100_000, false));
        assert_eq!(s.next_deadline(), Some(5_100_000), "not from time 0");
        // Time never runs backwards.
        s.set_guest_time(1);
        s.arm(&arm(UnitKind::Op, 2, 100_000, false));
        assert_eq!(s.next_deadline(), Some(5_100_000));
    }

    #[test]
    fn rejects_bad_scale() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let cfg = SyntheticConfig {
                ns_per_op: bad,
                ..SyntheticConfig::default()
            };
            assert!(SyntheticSource::new(cfg).is_err());
        }
    }

    #[test]
    fn interval_scale_and_floor() {
        let s = SyntheticSource::new(SyntheticConfig {
            ns_per_op: 2.5,
            min_interval_ns: 1000,
            seed: 1,
        })
        .unwrap();
        assert_eq!(s.interval_ns(0x10), 1000);
        assert_eq!(s.interval_ns(0x10_000), 163_840);
        assert_eq!(s.interval_ns(u64::MAX), u64::MAX);
    }

    #[test]
    fn one_sample_per_arm_at_deadline_with_real_rip() {
        let mut s = SyntheticSource::default();
        s.arm(&arm(UnitKind::Op, 5, 100_000, false));
        assert_eq!(s.next_deadline(), Some(100_000));
        let early = SamplePoint {
            rip: 1,
            guest_ns: 99_999,
        };
        assert_eq!(s.poll(&early), None);
        let at = SamplePoint {
            rip: 0xFFFF_FFFF_8100_0000,
            guest_ns: 100_000,
        };
        let sample = s.poll(&at).expect("due");
        assert_eq!(sample.epoch(), Epoch(5));
        let SampleRegs::Op(op) = *sample.regs() else {
            panic!("op sample expected")
        };
        assert_eq!(op.rip, at.rip);
        assert_eq!(op.status & !(0x7F << 32), 0);
        assert_eq!((op.data, op.data2, op.data3, op.dc_linaddr), (0, 0, 0, 0));
        assert_eq!(s.poll(&at), None, "one sample per arming");
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn expire_ends_the_period_now() {
        let mut s = SyntheticSource::default();
        assert!(!s.expire(UnitKind::Op), "not armed");
        s.set_guest_time(1_000);
        s.arm(&arm(UnitKind::Op, 1, 1_000_000, false));
        s.set_guest_time(2_000);
        assert!(s.expire(UnitKind::Op));
        assert_eq!(s.next_deadline(), Some(2_000));
        let at = SamplePoint {
            rip: 0x42,
            guest_ns: 2_000,
        };
        let sample = s.poll(&at).expect("due at once");
        assert_eq!((sample.unit(), sample.epoch()), (UnitKind::Op, Epoch(1)));
        assert!(!s.expire(UnitKind::Op), "one sample per arming");
        assert!(!s.expire(UnitKind::Fetch));
    }

    #[test]
    fn deterministic_under_seed() {
        let run = |seed| {
            let mut s = SyntheticSource::new(SyntheticConfig {
                seed,
                ns_per_op: 1.0,
                min_interval_ns: 0,
            })
            .unwrap();
            let mut out = Vec::new();
            for i in 0..20u64 {
                s.arm(&arm(UnitKind::Fetch, i + 1, 0x100, true));
                s.arm(&arm(UnitKind::Op, i + 1, 0x100, false));
                let t = s.next_deadline().unwrap();
                out.push(t);
                while let Some(x) = s.poll(&SamplePoint {
                    rip: i,
                    guest_ns: t,
                }) {
                    out.push(x.registers().0);
                }
            }
            out
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // RandEn shortens the fetch period by 0..=15 events.
        let mut s = SyntheticSource::new(SyntheticConfig {
            min_interval_ns: 0,
            ..SyntheticConfig::default()
        })
        .unwrap();
        for _ in 0..50 {
            s.disarm(UnitKind::Fetch);
            s.arm(&arm(UnitKind::Fetch, 1, 0x100, true));
            let d = s.next_deadline().unwrap();
            assert!((0x100 - 15..=0x100).contains(&d), "{d}");
        }
    }

    #[test]
    fn fetch_sample_contents_and_disarm() {
        let mut s = SyntheticSource::default();
        s.arm(&arm(UnitKind::Fetch, 2, 0x10, false));
        s.disarm(UnitKind::Fetch);
        let at = SamplePoint {
            rip: 0x1234,
            guest_ns: 1 << 40,
        };
        assert_eq!(s.poll(&at), None);
        s.arm(&arm(UnitKind::Fetch, 3, 0x10, false));
        assert_eq!(s.next_deadline(), Some((1 << 40) + 10_000));
        let at2 = SamplePoint {
            rip: 0x1234,
            guest_ns: (1 << 40) + 10_000,
        };
        let f = s.poll(&at2).unwrap();
        assert_eq!(
            *f.regs(),
            SampleRegs::Fetch(FetchSample {
                status: FETCH_COMP,
                linaddr: 0x1234,
                ctl_ext: 0
            })
        );
    }
}
