//! Device tests: Linux's access sequences, faults, policy, race detection, clear-before-start
//! (including an exhaustive interleaving check against a delivering thread), snapshots, and
//! property tests over random guest input.

use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;
use crate::msr::*;
use crate::source::{Epoch, OpSample};
use crate::{FetchSample, NoGuestContext, SyntheticConfig};

const NO: &NoGuestContext = &NoGuestContext;
/// Linux's op enable write for a 0x10000 period: MaxCnt 0x1000 | En.
const OP_START: u64 = 0x1000 | OP_EN;
const FETCH_START: u64 = 0x1000 | FETCH_EN;

fn cfg(policy: Policy, race_check: RaceCheck) -> VpmuConfig {
    VpmuConfig {
        caps: Caps::PROFILE_ZEN3,
        policy,
        race_check,
    }
}

fn synthetic(config: VpmuConfig) -> Vpmu {
    let source = SyntheticSource::new(SyntheticConfig {
        seed: 42,
        ns_per_op: 1.0,
        min_interval_ns: 0,
    })
    .unwrap();
    Vpmu::new(config, source)
}

/// Linux's EILVT setup (DEVICE.md §3): read masked, reserve, unmask as NMI.
fn linux_init<S: SampleSource>(v: &mut Vpmu<S>) {
    assert_eq!(v.rdmsr(IBS_CTL), Ok(0x100));
    assert_eq!(v.rdmsr(0x850), Ok(0x0001_0000));
    v.wrmsr(0x850, 0x0001_0400, NO).unwrap();
    v.wrmsr(0x850, 0x0000_0400, NO).unwrap();
}

/// Run guest time forward to the next deadline and take the interrupt.
fn run_to_sample<S: SampleSource>(v: &mut Vpmu<S>, rip: u64) -> Option<Interrupt> {
    let t = v.next_deadline()?;
    v.sample_point(SamplePoint { rip, guest_ns: t });
    v.take_interrupt()
}

#[test]
fn linux_op_sampling_cycle_protect() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    // perf_ibs_start (patched): CTL = 0, then config | MaxCnt | En.
    v.wrmsr(IBS_OP_CTL, 0, NO).unwrap();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    assert_eq!(v.next_deadline(), Some(0x10000));
    assert!(
        !v.sample_point(SamplePoint {
            rip: 1,
            guest_ns: 0xFFFF
        })
        .interrupt_pending
    );
    assert_eq!(v.take_interrupt(), None);
    assert_eq!(
        run_to_sample(&mut v, 0xFFFF_FFFF_8100_1234),
        Some(Interrupt::Nmi)
    );
    v.nmi_injected();
    // NMI handler: CTL shows En, Val, MaxCnt; data coherent.
    let ctl = v.rdmsr(IBS_OP_CTL).unwrap();
    assert_eq!(ctl & (OP_EN | OP_VAL | OP_MAX_CNT), OP_START | OP_VAL);
    assert_eq!(ctl & !(OP_EN | OP_VAL | OP_MAX_CNT | OP_CUR_CNT_RAND), 0);
    assert_eq!(v.rdmsr(IBS_OP_RIP), Ok(0xFFFF_FFFF_8100_1234));
    assert_eq!(v.rdmsr(IBS_OP_DATA), Ok(0), "RipInvalid clear");
    assert_eq!(
        v.rdmsr(IBS_OP_DATA3),
        Ok(0),
        "LdOp/StOp/DcLinAddrValid clear"
    );
    assert_eq!(v.rdmsr(IBS_DC_PHYSADDR), Ok(0));
    assert_eq!(v.rdmsr(IBS_BR_TARGET), Ok(0));
    // No second interrupt for the same sample.
    assert!(
        !v.sample_point(SamplePoint {
            rip: 2,
            guest_ns: 1 << 30
        })
        .interrupt_pending
    );
    assert_eq!(v.take_interrupt(), None);
    // Re-arm from the handler keeps CurCnt's random low bits.
    v.wrmsr(IBS_OP_CTL, OP_START | (ctl & OP_CUR_CNT_RAND), NO)
        .unwrap();
    v.nmi_returned();
    assert!(v.next_deadline().is_some());
    // perf_ibs_stop: read, write back without En (Val as read).
    assert_eq!(run_to_sample(&mut v, 5), Some(Interrupt::Nmi));
    let ctl = v.rdmsr(IBS_OP_CTL).unwrap();
    v.wrmsr(IBS_OP_CTL, ctl & !OP_EN & !OP_MAX_CNT, NO).unwrap();
    assert_eq!(
        v.rdmsr(IBS_OP_CTL).unwrap() & OP_VAL,
        0,
        "Protect stores Val=0"
    );
    assert_eq!(v.next_deadline(), None);
    let s = v.stats();
    assert_eq!(s.samples_latched, 2);
    assert_eq!(s.samples_delivered, 2);
    assert_eq!((s.interrupts_requested, s.interrupts_taken), (2, 2));
    assert_eq!(s.stale_val_reads, 0);
    assert_eq!(s.faults, 0);
    // The stop's write carried Val; the start's CTL = 0 and the re-arms did not.
    assert_eq!(s.val_written_back, 1);
}

/// `Latched` tells "a sample latched now" from "an interrupt is pending": an interrupt that
/// waits (the guest is in an NMI handler) stays pending at later points that latch nothing.
#[test]
fn a_pending_interrupt_is_not_a_new_sample() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    let due = v.next_deadline().unwrap();
    let at = |guest_ns| SamplePoint { rip: 9, guest_ns };
    assert_eq!(v.sample_point(at(due - 1)), Latched::default());
    let first = Latched {
        samples: 1,
        interrupt_pending: true,
    };
    assert_eq!(v.sample_point(at(due)), first);
    let waiting = Latched {
        samples: 0,
        interrupt_pending: true,
    };
    assert_eq!(v.sample_point(at(due + 1)), waiting);
    assert_eq!(v.poll_inbox(), waiting);
    assert_eq!(v.take_interrupt(), Some(Interrupt::Nmi));
    assert_eq!(v.poll_inbox(), Latched::default());
}

#[test]
fn fetch_sample_reports_count_and_linaddr() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    v.wrmsr(IBS_FETCH_CTL, FETCH_START | FETCH_RAND_EN, NO)
        .unwrap();
    let d = v.next_deadline().unwrap();
    assert!((0x10000 - 15..=0x10000).contains(&d));
    assert_eq!(run_to_sample(&mut v, 0x40_1000), Some(Interrupt::Nmi));
    let ctl = v.rdmsr(IBS_FETCH_CTL).unwrap();
    // Cnt == MaxCnt, so Linux's get_ibs_fetch_count covers the period.
    assert_eq!((ctl & FETCH_CNT) >> 16, 0x1000);
    assert_eq!(
        ctl & (FETCH_EN | FETCH_VAL | FETCH_RAND_EN | FETCH_MAX_CNT),
        FETCH_START | FETCH_VAL | FETCH_RAND_EN
    );
    assert_eq!(ctl & FETCH_PHY_ADDR_VALID, 0);
    assert_eq!(v.rdmsr(IBS_FETCH_LINADDR), Ok(0x40_1000));
    assert_eq!(v.rdmsr(IBS_FETCH_PHYSADDR), Ok(0));
    assert_eq!(v.rdmsr(IBS_FETCH_CTL_EXT), Ok(0));
    // The stop path's write-back of everything it read must not fault.
    v.wrmsr(IBS_FETCH_CTL, ctl & !FETCH_EN & !FETCH_MAX_CNT, NO)
        .unwrap();
}

#[test]
fn op_curcnt_random_bits_follow_caps() {
    for (caps, expect_rand) in [(Caps::PROFILE_ZEN3, true), (Caps::new(0x7).unwrap(), false)] {
        let mut seen = 0;
        let mut v = synthetic(VpmuConfig {
            caps,
            ..VpmuConfig::default()
        });
        linux_init(&mut v);
        for _ in 0..16 {
            v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
            run_to_sample(&mut v, 1).unwrap();
            seen |= v.rdmsr(IBS_OP_CTL).unwrap() & OP_CUR_CNT_RAND;
        }
        assert_eq!(seen != 0, expect_rand, "caps {caps}");
    }
}

#[test]
fn op_max_cnt_ext_scales_period() {
    let mut v = synthetic(VpmuConfig::default());
    v.wrmsr(IBS_OP_CTL, (0x3 << 20) | 0x10 | OP_EN, NO).unwrap();
    assert_eq!(v.next_deadline(), Some(((0x3 << 16) | 0x10) << 4));
    v.wrmsr(IBS_OP_CTL, (0x40 << 32) | 0x10 | OP_EN, NO)
        .unwrap();
    assert_eq!(
        v.next_deadline(),
        Some(0x100 - 0x40),
        "counter starts at CurCnt"
    );
}

#[test]
fn faults_are_gp_and_change_nothing() {
    let mut v = synthetic(VpmuConfig {
        caps: Caps::PROFILE_OLD,
        ..VpmuConfig::default()
    });
    let before = v.save_state();
    let cases: &[(u32, u64)] = &[
        (IBS_OP_CTL, OP_MAX_CNT_EXT),  // needs OPCNTEXT
        (IBS_OP_CTL, OP_L3_MISS_ONLY), // needs ZEN4
        (IBS_OP_CTL, 1 << 63),         // load latency: never
        (IBS_OP_CTL, 1 << 27),         // reserved
        (IBS_FETCH_CTL, 1 << 62),      // reserved
        (IBS_FETCH_CTL, FETCH_L3_MISS_ONLY),
        (IBS_OP_DATA, 1 << 33),
        (IBS_OP_DATA, OP_DATA_BRN_FUSE), // needs OPBRNFUSE
        (IBS_OP_DATA2, 1 << 3),
        (IBS_OP_DATA3, 1 << 9),
        (0x850, 1 << 20),
    ];
    for &(index, value) in cases {
        let e = v.wrmsr(index, value, NO).unwrap_err();
        assert!(
            matches!(
                e,
                MsrError::Reserved { .. } | MsrError::Apic(ApicError::Reserved { .. })
            ),
            "{index:#x} {value:#x}: {e}"
        );
        assert!(e.to_string().contains(&format!("{index:#x}")), "{e}");
        if let MsrError::Reserved { name, .. } = e {
            assert_eq!(Some(name), msr_name(index));
            assert!(e.to_string().contains(&format!("({name})")), "{e}");
        }
    }
    for index in [
        IBS_BR_TARGET,
        IBS_FETCH_CTL_EXT,
        IBS_OP_DATA4,
        IBS_OP_CTL2,
        IBS_FETCH_CTL2,
    ] {
        assert!(matches!(
            v.rdmsr(index),
            Err(MsrError::NotAdvertised { .. })
        ));
        assert!(matches!(
            v.wrmsr(index, 0, NO),
            Err(MsrError::NotAdvertised { .. })
        ));
    }
    assert_eq!(
        v.wrmsr(IBS_CTL, 0x100, NO),
        Err(MsrError::ReadOnly { index: IBS_CTL })
    );
    assert_eq!(v.rdmsr(0x10), Err(MsrError::NotVpmu { index: 0x10 }));
    assert_eq!(v.save_state(), before);
    let s = v.stats();
    assert_eq!(s.faults, cases.len() as u64 + 10 + 2);
    assert_eq!(
        (s.msr_reads, s.msr_writes),
        (5 + 1, cases.len() as u64 + 5 + 1)
    );
    // OLD has RDWROPCNT and OPCNT: CurCnt and CntCtl are legal.
    v.wrmsr(IBS_OP_CTL, OP_CNT_CTL | (5 << 32), NO).unwrap();
    // With Zen 4 caps the extensions are legal too.
    let mut z = synthetic(VpmuConfig {
        caps: Caps::PROFILE_ZEN4,
        ..VpmuConfig::default()
    });
    z.wrmsr(
        IBS_OP_CTL,
        OP_MAX_CNT_EXT | OP_L3_MISS_ONLY | OP_CUR_CNT_EXT,
        NO,
    )
    .unwrap();
    z.wrmsr(IBS_FETCH_CTL, FETCH_L3_MISS_ONLY, NO).unwrap();
    z.wrmsr(IBS_BR_TARGET, u64::MAX, NO).unwrap();
    z.wrmsr(IBS_FETCH_CTL_EXT, 0xFFFF, NO).unwrap();
    assert!(z.wrmsr(IBS_FETCH_CTL_EXT, 0x1_0000, NO).is_err());
}

#[test]
fn physical_addresses_never_exposed() {
    let mut v = synthetic(VpmuConfig::default());
    for index in [IBS_FETCH_PHYSADDR, IBS_DC_PHYSADDR] {
        v.wrmsr(index, 0x1234_5000, NO).unwrap();
        assert_eq!(v.rdmsr(index), Ok(0));
    }
    v.wrmsr(IBS_FETCH_CTL, FETCH_PHY_ADDR_VALID, NO).unwrap();
    assert_eq!(v.rdmsr(IBS_FETCH_CTL), Ok(0));
    v.wrmsr(IBS_OP_DATA3, OP_DATA3_DC_PHY_ADDR_VALID | 1, NO)
        .unwrap();
    assert_eq!(v.rdmsr(IBS_OP_DATA3), Ok(1));
    // A source claiming physical addresses is sanitised too.
    let sink = v.sink();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    let epoch = v.units[UnitKind::Op.index()].epoch;
    sink.deliver(Sample::op(
        epoch,
        OpSample {
            data3: u64::MAX,
            ..OpSample::default()
        },
    ))
    .unwrap();
    v.poll_inbox();
    assert_eq!(
        v.rdmsr(IBS_OP_DATA3).unwrap() & OP_DATA3_DC_PHY_ADDR_VALID,
        0
    );
    assert_eq!(v.rdmsr(IBS_OP_DATA3).unwrap() & bits(12, 9), 0);
}

#[test]
fn interrupt_routing_and_recheck() {
    let mut v = synthetic(VpmuConfig::default());
    // LVT masked (reset value): the sample latches, no interrupt.
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    assert_eq!(run_to_sample(&mut v, 1), None);
    assert_eq!(v.rdmsr(IBS_OP_CTL).unwrap() & OP_VAL, OP_VAL);
    assert_eq!(v.stats().dropped_lvt_masked, 1);
    // Fixed vector.
    v.wrmsr(0x850, 0xF0, NO).unwrap();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    assert_eq!(
        run_to_sample(&mut v, 1),
        Some(Interrupt::Fixed { vector: 0xF0 })
    );
    // Masked between request and injection: withdrawn.
    v.wrmsr(0x850, 0x400, NO).unwrap();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    let t = v.next_deadline().unwrap();
    assert!(
        v.sample_point(SamplePoint {
            rip: 1,
            guest_ns: t
        })
        .interrupt_pending
    );
    v.wrmsr(0x850, 0x10400, NO).unwrap();
    assert_eq!(v.take_interrupt(), None);
    assert_eq!(v.stats().dropped_lvt_masked, 2);
    // Unit stopped between request and injection: nothing latched, nothing injected.
    v.wrmsr(0x850, 0x400, NO).unwrap();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    let t = v.next_deadline().unwrap();
    assert!(
        v.sample_point(SamplePoint {
            rip: 1,
            guest_ns: t
        })
        .interrupt_pending
    );
    v.wrmsr(IBS_OP_CTL, 0, NO).unwrap();
    assert_eq!(v.take_interrupt(), None);
    assert_eq!(v.stats().dropped_nothing_latched, 1);
    // Undeliverable message type (SMI).
    v.wrmsr(0x850, 0x200, NO).unwrap();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    assert_eq!(run_to_sample(&mut v, 1), None);
    assert_eq!(v.stats().dropped_undeliverable, 1);
}

#[test]
fn both_units_share_one_interrupt() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    v.wrmsr(IBS_FETCH_CTL, FETCH_START, NO).unwrap();
    let t = v.next_deadline().unwrap();
    assert!(
        v.sample_point(SamplePoint {
            rip: 9,
            guest_ns: t
        })
        .interrupt_pending
    );
    assert_eq!(v.take_interrupt(), Some(Interrupt::Nmi));
    assert_eq!(v.take_interrupt(), None);
    let s = v.stats();
    assert_eq!((s.samples_latched, s.samples_delivered), (2, 2));
    assert_eq!((s.interrupts_requested, s.interrupts_taken), (1, 1));
}

/// The Linux race (DEVICE.md §4) on an unpatched guest: op stop writes back {Val=1, En=0}; the
/// start path sets STARTED; an NMI (here: the fetch unit's) arrives before the enable write;
/// the handler reads op CTL, sees the stale Val and enables op from NMI context.
fn race_sequence(v: &mut Vpmu, ctx: &dyn GuestContext, report_nmi: bool) {
    linux_init(v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    v.wrmsr(IBS_FETCH_CTL, FETCH_START | 0xF000, NO).unwrap(); // longer fetch period
    assert_eq!(run_to_sample(v, 1), Some(Interrupt::Nmi));
    // Stop (not from the handler): read, write back without En, Val as read.
    let ctl = v.rdmsr(IBS_OP_CTL).unwrap();
    assert_eq!(ctl & OP_VAL, OP_VAL);
    v.wrmsr(IBS_OP_CTL, ctl & !OP_EN & !OP_MAX_CNT, NO).unwrap();
    // Fetch latches: NMI.
    let t = v.next_deadline().unwrap();
    v.sample_point(SamplePoint {
        rip: 2,
        guest_ns: t,
    });
    assert_eq!(v.take_interrupt(), Some(Interrupt::Nmi));
    if report_nmi {
        v.nmi_injected();
    }
    // Handler, op unit (STARTED already set by the interrupted start path).
    let stale = v.rdmsr(IBS_OP_CTL).unwrap();
    if stale & OP_VAL != 0 {
        let _ = v.rdmsr(IBS_OP_RIP).unwrap();
        v.wrmsr(IBS_OP_CTL, OP_START, ctx).unwrap();
    }
    v.nmi_returned();
    // The start path's own enable write.
    v.wrmsr(IBS_OP_CTL, OP_START, ctx).unwrap();
}

#[test]
fn race_detected_in_faithful_mode() {
    let mut v = synthetic(cfg(Policy::Faithful, RaceCheck::Fail));
    race_sequence(&mut v, NO, true);
    let s = v.stats();
    assert_eq!(s.val_written_back, 1, "stop wrote the latched CTL back");
    assert_eq!(s.stale_val_reads, 1);
    assert_eq!(s.races_detected, 1);
    let race = v.take_race().expect("race reported");
    assert_eq!(race.unit, UnitKind::Op);
    assert_eq!(race.evidence, NmiEvidence::DeviceNmi);
    assert!(race.fatal);
    assert_eq!(race.stale_ctl & (OP_VAL | OP_EN), OP_VAL);
    assert!(race.to_string().contains("1b044ff3c17e"));
    assert_eq!(v.take_race(), None);

    // Evidence from the embedder's context instead of the device's own NMI.
    let mut v = synthetic(cfg(Policy::Faithful, RaceCheck::Warn));
    race_sequence(&mut v, &|| true, false);
    let race = v.take_race().unwrap();
    assert_eq!(
        (race.evidence, race.fatal),
        (NmiEvidence::GuestContext, false)
    );

    // Not in an NMI: a stale read alone is no race.
    let mut v = synthetic(cfg(Policy::Faithful, RaceCheck::Warn));
    race_sequence(&mut v, NO, false);
    assert_eq!(v.stats().stale_val_reads, 1);
    assert_eq!(v.take_race(), None);

    let mut v = synthetic(cfg(Policy::Faithful, RaceCheck::Off));
    race_sequence(&mut v, NO, true);
    assert_eq!((v.take_race(), v.stats().races_detected), (None, 0));
}

#[test]
fn a_handler_write_that_does_not_enable_is_no_race() {
    let mut v = synthetic(cfg(Policy::Faithful, RaceCheck::Fail));
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    assert_eq!(run_to_sample(&mut v, 1), Some(Interrupt::Nmi));
    let ctl = v.rdmsr(IBS_OP_CTL).unwrap();
    v.wrmsr(IBS_OP_CTL, ctl & !OP_EN & !OP_MAX_CNT, NO).unwrap();
    // In an NMI handler the guest reads the stale Val, then writes CTL without En.
    let in_nmi = &|| true;
    assert_eq!(v.rdmsr(IBS_OP_CTL).unwrap() & OP_VAL, OP_VAL);
    v.wrmsr(IBS_OP_CTL, 0, in_nmi).unwrap();
    assert_eq!((v.take_race(), v.stats().races_detected), (None, 0));
}

#[test]
fn fetch_rand_en_randomizes_the_fetch_period() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    let mut fetch_periods = std::collections::BTreeSet::new();
    for round in 0..16u64 {
        v.set_guest_time(round << 20);
        v.wrmsr(IBS_FETCH_CTL, FETCH_START | FETCH_RAND_EN, NO)
            .unwrap();
        let period = v.next_deadline().unwrap() - (round << 20);
        assert!((0x10000 - 15..=0x10000).contains(&period), "{period:#x}");
        fetch_periods.insert(period);
        v.wrmsr(IBS_FETCH_CTL, 0, NO).unwrap();
    }
    assert!(fetch_periods.len() > 1, "RandEn changed nothing");
}

#[test]
fn a_period_starts_at_the_guest_time_of_its_enabling_write() {
    let config = cfg(Policy::Faithful, RaceCheck::Warn);
    let mut v = synthetic(config);
    assert_eq!(v.config(), &config);
    linux_init(&mut v);
    v.set_guest_time(5_000_000);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    assert_eq!(v.next_deadline(), Some(5_000_000 + 0x10000));
}

#[test]
fn protect_defuses_the_race() {
    for check in [RaceCheck::Warn, RaceCheck::Fail] {
        let mut v = synthetic(cfg(Policy::Protect, check));
        race_sequence(&mut v, &|| true, true);
        let s = v.stats();
        assert_eq!(s.val_written_back, 1, "counted, but stored as Val = 0");
        assert_eq!((s.stale_val_reads, s.races_detected), (0, 0));
        assert_eq!(v.take_race(), None);
    }
}

/// The race test kernel's sequence through the hooks (guest-images/testkernel race test):
/// the stop path's sample is forced with its NMI held until the write-back, and the start
/// window's NMI is a forced fetch sample. Returns the op CTL the handler read in the window.
fn forced_race_sequence(v: &mut Vpmu, prefix: bool) -> u64 {
    linux_init(v);
    let at = |guest_ns| SamplePoint { rip: 7, guest_ns };
    v.wrmsr(IBS_FETCH_CTL, FETCH_START, NO).unwrap();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    // Stop: the sample lands before the read; its NMI comes after the write-back.
    v.force_sample(UnitKind::Op, at(1), ForcedIrq::AfterCtlWrite)
        .unwrap();
    assert!(!v.interrupt_pending(), "held until the write");
    let ctl = v.rdmsr(IBS_OP_CTL).unwrap();
    assert_eq!(ctl & (OP_EN | OP_VAL), OP_EN | OP_VAL);
    v.wrmsr(IBS_OP_CTL, ctl & !OP_EN, NO).unwrap();
    // Released, re-checked: the write consumed the sample, so nothing is injected.
    assert_eq!(v.take_interrupt(), None);
    assert_eq!(v.stats().dropped_nothing_latched, 1);
    // Start.
    if !prefix {
        v.wrmsr(IBS_OP_CTL, 0, NO).unwrap();
    }
    // STARTED is set; the window's NMI: a real fetch sample.
    v.force_sample(UnitKind::Fetch, at(2), ForcedIrq::Now)
        .unwrap();
    assert_eq!(v.take_interrupt(), Some(Interrupt::Nmi));
    v.nmi_injected();
    let fetch = v.rdmsr(IBS_FETCH_CTL).unwrap();
    assert_ne!(fetch & FETCH_VAL, 0, "the NMI is the fetch unit's");
    let op = v.rdmsr(IBS_OP_CTL).unwrap();
    if op & OP_VAL != 0 {
        v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap(); // the accidental enable
    }
    v.nmi_returned();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    op
}

#[test]
fn forced_samples_reproduce_the_race_only_for_prefix_faithful() {
    for (policy, prefix, race) in [
        (Policy::Faithful, true, true),
        (Policy::Faithful, false, false),
        (Policy::Protect, true, false),
        (Policy::Protect, false, false),
    ] {
        let mut v = synthetic(cfg(policy, RaceCheck::Warn));
        let op = forced_race_sequence(&mut v, prefix);
        let s = v.stats();
        let what = format!("{policy:?} prefix={prefix}");
        assert_eq!(
            op & OP_VAL != 0,
            race,
            "{what}: op CTL {op:#x} in the window"
        );
        assert_eq!(s.races_detected, u64::from(race), "{what}");
        assert_eq!(s.stale_val_reads, u64::from(race), "{what}");
        assert_eq!(s.forced_samples, 2, "{what}");
    }
}

#[test]
fn forced_samples_need_a_counting_unit_and_a_willing_source() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    let at = SamplePoint {
        rip: 1,
        guest_ns: 0,
    };
    assert_eq!(
        v.force_sample(UnitKind::Op, at, ForcedIrq::Now),
        Err(ForceError::NotCounting(UnitKind::Op))
    );
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    v.force_sample(UnitKind::Op, at, ForcedIrq::Now).unwrap();
    assert_eq!(v.take_interrupt(), Some(Interrupt::Nmi));
    assert_eq!(
        v.force_sample(UnitKind::Op, at, ForcedIrq::Now),
        Err(ForceError::NotCounting(UnitKind::Op)),
        "Val = 1 and signalled: no second sample"
    );

    let mut v = Vpmu::new(VpmuConfig::default(), ThreadSource::default());
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    assert_eq!(
        v.force_sample(UnitKind::Op, at, ForcedIrq::Now),
        Err(ForceError::Unsupported(UnitKind::Op))
    );
    assert_eq!(v.stats().forced_samples, 0);
}

/// Every configuration bit the caps allow survives a latch unchanged (Linux re-arms from
/// the CTL it read, `perf_ibs_handle_irq`).
#[test]
fn configuration_bits_survive_a_latch() {
    let mut v = synthetic(VpmuConfig {
        caps: Caps::PROFILE_ZEN4,
        ..VpmuConfig::default()
    });
    linux_init(&mut v);
    let at = SamplePoint {
        rip: 0x30,
        guest_ns: 0,
    };
    for (unit, ctl_msr, config) in [
        (
            UnitKind::Op,
            IBS_OP_CTL,
            OP_MAX_CNT | OP_MAX_CNT_EXT | OP_L3_MISS_ONLY | OP_EN | OP_CNT_CTL,
        ),
        (
            UnitKind::Fetch,
            IBS_FETCH_CTL,
            FETCH_MAX_CNT | FETCH_RAND_EN | FETCH_L3_MISS_ONLY | FETCH_EN,
        ),
    ] {
        v.wrmsr(ctl_msr, config, NO).unwrap();
        v.force_sample(unit, at, ForcedIrq::Now).unwrap();
        let ctl = v.rdmsr(ctl_msr).unwrap();
        assert_eq!(ctl & config, config, "{unit}: {ctl:#x}");
        assert_ne!(ctl & unit.val(), 0, "{unit}: {ctl:#x}");
    }
}

#[test]
fn a_forced_sample_reuses_one_latched_but_not_yet_signalled() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    let due = v.next_deadline().unwrap();
    assert!(
        v.sample_point(SamplePoint {
            rip: 0x10,
            guest_ns: due
        })
        .interrupt_pending
    );
    let later = SamplePoint {
        rip: 0x20,
        guest_ns: due + 1,
    };
    v.force_sample(UnitKind::Op, later, ForcedIrq::AfterCtlWrite)
        .unwrap();
    assert_eq!(
        v.rdmsr(IBS_OP_RIP),
        Ok(0x10),
        "the period's own sample serves"
    );
    let s = v.stats();
    assert_eq!((s.forced_samples, s.samples_latched), (1, 1));
}

#[test]
fn an_nmi_that_returned_is_no_evidence() {
    let mut v = synthetic(cfg(Policy::Faithful, RaceCheck::Warn));
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    assert_eq!(run_to_sample(&mut v, 1), Some(Interrupt::Nmi));
    v.nmi_injected();
    let ctl = v.rdmsr(IBS_OP_CTL).unwrap();
    v.nmi_returned();
    // Stop writes the latched CTL back; later, outside any NMI, the start path reads the
    // stale Val and enables: unpatched, but not the race.
    v.wrmsr(IBS_OP_CTL, ctl & !OP_EN & !OP_MAX_CNT, NO).unwrap();
    assert_eq!(v.rdmsr(IBS_OP_CTL).unwrap() & OP_VAL, OP_VAL);
    v.wrmsr(IBS_OP_CTL, OP_START, &|| false).unwrap();
    assert_eq!(v.stats().stale_val_reads, 1);
    assert_eq!((v.take_race(), v.stats().races_detected), (None, 0));
}

#[test]
fn a_sample_that_latched_on_its_own_serves_a_late_force() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    // The period runs out naturally; its interrupt is not taken yet.
    let t = v.next_deadline().unwrap();
    assert!(
        v.sample_point(SamplePoint {
            rip: 9,
            guest_ns: t
        })
        .interrupt_pending
    );
    v.force_sample(
        UnitKind::Op,
        SamplePoint {
            rip: 10,
            guest_ns: t,
        },
        ForcedIrq::AfterCtlWrite,
    )
    .unwrap();
    assert_eq!(v.take_interrupt(), None, "held now");
    assert_eq!(v.rdmsr(IBS_OP_RIP), Ok(9), "the natural sample");
    let ctl = v.rdmsr(IBS_OP_CTL).unwrap();
    assert_eq!(ctl & (OP_EN | OP_VAL), OP_EN | OP_VAL);
    v.wrmsr(IBS_OP_CTL, ctl & !OP_EN, NO).unwrap();
    assert_eq!(v.take_interrupt(), None, "released and consumed");
    assert_eq!(v.stats().samples_latched, 1);
}

#[test]
fn a_held_interrupt_does_not_ride_along_with_another_units() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    v.wrmsr(IBS_FETCH_CTL, FETCH_START, NO).unwrap();
    let at = SamplePoint {
        rip: 1,
        guest_ns: 0,
    };
    v.force_sample(UnitKind::Op, at, ForcedIrq::AfterCtlWrite)
        .unwrap();
    v.force_sample(UnitKind::Fetch, at, ForcedIrq::Now).unwrap();
    assert_eq!(v.take_interrupt(), Some(Interrupt::Nmi));
    assert_eq!(v.stats().samples_delivered, 1, "only the fetch sample");
    // A snapshot keeps the held interrupt.
    let state = v.save_state();
    assert!(state.op.irq_held && !state.fetch.irq_held);
    let mut w = synthetic(VpmuConfig::default());
    w.restore_state(&state).unwrap();
    assert_eq!(w.save_state(), state);
    let mut bad = state;
    bad.fetch.irq_held = true;
    assert_eq!(
        w.restore_state(&bad),
        Err(StateError::HeldIrqWithoutLatch {
            unit: UnitKind::Fetch
        })
    );
    // The guest's write releases it; the re-check then finds the op sample consumed.
    v.wrmsr(IBS_OP_CTL, 0, NO).unwrap();
    assert!(v.interrupt_pending());
    assert_eq!(v.take_interrupt(), None);
}

#[test]
fn guest_context_is_queried_lazily() {
    use std::cell::Cell;
    let asked = Cell::new(0);
    let ctx = || {
        asked.set(asked.get() + 1);
        true
    };
    let mut v = synthetic(cfg(Policy::Faithful, RaceCheck::Warn));
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, &ctx).unwrap();
    run_to_sample(&mut v, 1);
    let ctl = v.rdmsr(IBS_OP_CTL).unwrap();
    v.wrmsr(IBS_OP_CTL, ctl, &ctx).unwrap();
    assert_eq!(asked.get(), 0, "no stale read, no question");
}

/// A source whose samples come from another thread: it publishes, for each arming, the
/// epoch and its own count of armings (the "period" the test tags samples with, independent
/// of the device's epochs).
#[derive(Clone, Default)]
struct ThreadSource {
    armed: Arc<Mutex<Armings>>,
}

/// Per unit the current (epoch, period), and the number of armings so far.
type Armings = ([Option<(Epoch, u64)>; 2], u64);

impl SampleSource for ThreadSource {
    fn arm(&mut self, arm: &Arm) {
        let mut st = self.armed.lock().unwrap();
        st.1 += 1;
        st.0[arm.unit.index()] = Some((arm.epoch, st.1));
    }
    fn disarm(&mut self, unit: UnitKind) {
        self.armed.lock().unwrap().0[unit.index()] = None;
    }
    fn next_deadline(&self) -> Option<u64> {
        None
    }
    fn poll(&mut self, _: &SamplePoint) -> Option<Sample> {
        None
    }
}

impl ThreadSource {
    /// The epoch and period of the unit's current arming.
    fn armed(&self, unit: UnitKind) -> Option<(Epoch, u64)> {
        self.armed.lock().unwrap().0[unit.index()]
    }

    fn epoch(&self, unit: UnitKind) -> Option<Epoch> {
        self.armed(unit).map(|(e, _)| e)
    }
}

/// An op sample for `epoch`, tagged with `period` in OP_RIP.
fn tagged(epoch: Epoch, period: u64) -> Sample {
    Sample::op(
        epoch,
        OpSample {
            rip: period,
            ..OpSample::default()
        },
    )
}

#[test]
fn sink_samples_latch_only_for_the_current_arming() {
    let source = ThreadSource::default();
    let mut v = Vpmu::new(VpmuConfig::default(), source.clone());
    linux_init(&mut v);
    let sink = v.sink();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    let e1 = source.epoch(UnitKind::Op).unwrap();
    sink.deliver(tagged(e1, e1.raw())).unwrap();
    // The guest restarts before the vCPU thread drained it: the sample is dropped.
    v.wrmsr(IBS_OP_CTL, 0, NO).unwrap();
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    let e2 = source.epoch(UnitKind::Op).unwrap();
    assert_ne!(e1, e2);
    assert_eq!(
        sink.deliver(tagged(e1, e1.raw())),
        Err(DropReason::StaleEpoch)
    );
    assert!(!v.poll_inbox().interrupt_pending);
    sink.deliver(tagged(e2, e2.raw())).unwrap();
    assert_eq!(
        sink.deliver(tagged(e2, e2.raw())),
        Err(DropReason::InboxFull)
    );
    assert!(v.poll_inbox().interrupt_pending);
    assert_eq!(v.rdmsr(IBS_OP_RIP), Ok(e2.raw()));
    assert_eq!(source.epoch(UnitKind::Op), None, "disarmed once latched");
    assert_eq!(sink.deliver(tagged(e2, e2.raw())), Err(DropReason::ValSet));
    let s = v.stats();
    assert_eq!((s.dropped_unit_disabled, s.dropped_stale_epoch), (1, 1));
    assert_eq!((s.dropped_inbox_full, s.dropped_val_set), (1, 1));
}

/// One step of the vCPU thread in the interleaving model.
#[derive(Clone, Copy, Debug)]
enum VcpuStep {
    Start,
    /// The guest's stop write; `keep_val` writes back Val as read (unpatched stop path).
    Stop {
        keep_val: bool,
    },
    /// Drain the inbox and take an interrupt, then check the invariants.
    PollAndCheck,
}

/// One step of the sampler thread: read the published epoch, or deliver a sample for the
/// epoch read last (a sampler can be preempted between the two).
#[derive(Clone, Copy, Debug)]
enum SamplerStep {
    ReadEpoch,
    Deliver,
}

struct Model {
    v: Vpmu<ThreadSource>,
    source: ThreadSource,
    sink: SampleSink,
    /// Period of the latest arming the vCPU thread made.
    current: Option<u64>,
    sampler_arming: Option<(Epoch, u64)>,
}

impl Model {
    fn new(policy: Policy) -> Model {
        let source = ThreadSource::default();
        let mut v = Vpmu::new(cfg(policy, RaceCheck::Warn), source.clone());
        linux_init(&mut v);
        let sink = v.sink();
        Model {
            v,
            source,
            sink,
            current: None,
            sampler_arming: None,
        }
    }

    fn vcpu(&mut self, step: VcpuStep) {
        match step {
            VcpuStep::Start => {
                self.v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
                self.current = self.source.armed(UnitKind::Op).map(|(_, period)| period);
            }
            VcpuStep::Stop { keep_val } => {
                let ctl = self.v.rdmsr(IBS_OP_CTL).unwrap();
                let val = if keep_val { ctl & OP_VAL } else { 0 };
                self.v.wrmsr(IBS_OP_CTL, val, NO).unwrap();
            }
            VcpuStep::PollAndCheck => {
                self.v.poll_inbox();
                let irq = self.v.take_interrupt();
                let unit = &self.v.units[UnitKind::Op.index()];
                if irq.is_some() {
                    assert!(unit.latched, "interrupt without a latched sample");
                }
                if unit.latched {
                    // The latched sample belongs to the latest arming, never an earlier one.
                    let rip = unit.data[0];
                    assert_eq!(Some(rip), self.current, "stale sample presented");
                }
            }
        }
    }

    fn sampler(&mut self, step: SamplerStep) {
        match step {
            SamplerStep::ReadEpoch => self.sampler_arming = self.source.armed(UnitKind::Op),
            SamplerStep::Deliver => {
                let (epoch, period) = self.sampler_arming.unwrap_or((Epoch::NONE, 0));
                let _ = self.sink.deliver(tagged(epoch, period));
            }
        }
    }
}

/// Every interleaving of `a` and `b` as a sequence of `true` (take from `a`) / `false`.
fn interleavings(a: usize, b: usize) -> Vec<Vec<bool>> {
    if a == 0 || b == 0 {
        return vec![[vec![true; a], vec![false; b]].concat()];
    }
    let mut out = Vec::new();
    for (first, rest) in [
        (true, interleavings(a - 1, b)),
        (false, interleavings(a, b - 1)),
    ] {
        for mut tail in rest {
            tail.insert(0, first);
            out.push(tail);
        }
    }
    out
}

/// Exhaustive interleaving check of "start vs deliver from another thread" (DEVICE.md §5.7).
/// Inbox operations are single critical sections, so interleaving whole device operations
/// covers every execution. Checked: no sample of an earlier arming is ever presented after a
/// start, and no interrupt is handed out without a latched sample.
#[test]
fn start_vs_deliver_all_interleavings() {
    use SamplerStep::*;
    use VcpuStep::*;
    let sampler = [ReadEpoch, Deliver, Deliver, ReadEpoch, Deliver];
    let mut runs = 0;
    for policy in [Policy::Protect, Policy::Faithful] {
        for keep_val in [false, true] {
            let vcpu = [
                Start,
                PollAndCheck,
                Stop { keep_val },
                Start,
                PollAndCheck,
                Start,
                PollAndCheck,
            ];
            for order in interleavings(vcpu.len(), sampler.len()) {
                let mut m = Model::new(policy);
                let (mut i, mut j) = (0, 0);
                for take_vcpu in order {
                    if take_vcpu {
                        m.vcpu(vcpu[i]);
                        i += 1;
                    } else {
                        m.sampler(sampler[j]);
                        j += 1;
                    }
                }
                m.vcpu(PollAndCheck);
                let s = m.v.stats();
                assert!(s.interrupts_taken <= s.samples_latched);
                if policy == Policy::Protect {
                    assert_eq!(s.stale_val_reads, 0);
                }
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 4 * 792); // C(12, 5) interleavings per configuration
}

/// The same property with real threads: a sampler hammers the sink with whatever epoch is
/// published while the vCPU thread restarts the unit and drains.
/// The vCPU thread restarts the op unit while a sampler thread delivers for whatever arming
/// it last saw and, each time it sees a new arming, once more for the one before (a sampler
/// preempted across a restart). Only the current arming's samples may latch, and samples
/// must keep latching (liveness): the guest re-arms until 500 have, within 20 s.
#[test]
fn start_vs_deliver_threads() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    const WANTED: u64 = 500;
    let source = ThreadSource::default();
    let mut v = Vpmu::new(VpmuConfig::default(), source.clone());
    linux_init(&mut v);
    let sink = v.sink();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (source, stop) = (source.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let (mut delivered, mut stale_sent, mut stale_accepted) = (0u64, 0u64, 0u64);
            let mut last: Option<(Epoch, u64)> = None;
            while !stop.load(Ordering::Relaxed) {
                if let Some((e, tag)) = source.armed(UnitKind::Op) {
                    if let Some((old, old_tag)) = last.filter(|(old, _)| *old != e) {
                        stale_sent += 1;
                        stale_accepted += u64::from(sink.deliver(tagged(old, old_tag)).is_ok());
                    }
                    last = Some((e, tag));
                    delivered += u64::from(sink.deliver(tagged(e, tag)).is_ok());
                }
                std::thread::yield_now();
            }
            (delivered, stale_sent, stale_accepted)
        })
    };
    let (mut latched, mut rounds) = (0u64, 0u64);
    let give_up = Instant::now() + Duration::from_secs(20);
    while latched < WANTED && Instant::now() < give_up {
        rounds += 1;
        v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
        if rounds % 3 == 0 {
            v.wrmsr(IBS_OP_CTL, 0, NO).unwrap();
            v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
        }
        let (_, current) = source.armed(UnitKind::Op).unwrap();
        // Give the sampler a chance at this arming and at the stale one.
        std::thread::yield_now();
        v.poll_inbox();
        let irq = v.take_interrupt();
        let unit = &v.units[UnitKind::Op.index()];
        assert!(irq.is_none() || unit.latched);
        if unit.latched {
            latched += 1;
            assert_eq!(
                unit.data[0], current,
                "round {rounds}: a stale arming's sample"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (delivered, stale_sent, stale_accepted) = sampler.join().unwrap();
    assert!(
        latched >= WANTED,
        "only {latched} samples latched in {rounds} rounds"
    );
    assert!(latched <= delivered);
    assert!(stale_sent > 0, "the sampler never saw a restart");
    assert_eq!(stale_accepted, 0, "{stale_sent} stale deliveries");
}

#[test]
fn synthetic_sequence_is_deterministic() {
    let run = || {
        let mut v = synthetic(VpmuConfig::default());
        linux_init(&mut v);
        let mut log = Vec::new();
        v.wrmsr(IBS_OP_CTL, 0x100 | OP_EN, NO).unwrap();
        v.wrmsr(IBS_FETCH_CTL, 0x80 | FETCH_EN | FETCH_RAND_EN, NO)
            .unwrap();
        for step in 0..50u64 {
            let Some(t) = v.next_deadline() else { break };
            if v.sample_point(SamplePoint {
                rip: 0x1000 + step,
                guest_ns: t,
            })
            .interrupt_pending
            {
                v.take_interrupt().unwrap();
            }
            for (unit, ctl_msr, rearm) in [
                (
                    UnitKind::Fetch,
                    IBS_FETCH_CTL,
                    0x80 | FETCH_EN | FETCH_RAND_EN,
                ),
                (UnitKind::Op, IBS_OP_CTL, 0x100 | OP_EN),
            ] {
                let ctl = v.rdmsr(ctl_msr).unwrap();
                if ctl & unit.val() != 0 {
                    let data = v.rdmsr(unit.data_msrs()[0]).unwrap();
                    log.push((t, unit, ctl, data));
                    v.wrmsr(ctl_msr, rearm, NO).unwrap();
                }
            }
        }
        log
    };
    let a = run();
    assert_eq!(a, run());
    assert!(a.len() >= 50);
    // First samples at exactly the documented scale: op 0x100 × 16 ns; fetch 0x80 × 16 ns
    // less RandEn's 0..=15.
    assert!(a.iter().any(|&(t, u, ..)| u == UnitKind::Op && t == 0x1000));
    assert!(a[0].1 == UnitKind::Fetch && (0x800 - 15..=0x800).contains(&a[0].0));
}

/// The snapshot and configuration survive a trip through a self-describing format (JSON),
/// and a caps word the device refuses is refused on the way in too.
#[cfg(feature = "serde")]
#[test]
fn serde_roundtrip_of_state_and_config() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    run_to_sample(&mut v, 0x77).unwrap();
    let state = v.save_state();
    let json = serde_json::to_string(&state).unwrap();
    let back: VpmuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    let mut w = synthetic(VpmuConfig::default());
    w.restore_state(&back).unwrap();
    assert_eq!(w.rdmsr(IBS_OP_RIP), Ok(0x77));

    let config = VpmuConfig::default();
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(serde_json::from_str::<VpmuConfig>(&json).unwrap(), config);
    // Caps travel as their u32 word and are validated like IbsCaps::new (OPDATA4, bit 10).
    let opdata4 = json.replace(
        &format!("\"caps\":{}", u32::from(config.caps)),
        &format!("\"caps\":{}", u32::from(config.caps) | 1 << 10),
    );
    assert_ne!(opdata4, json, "caps field not found in {json}");
    assert!(serde_json::from_str::<VpmuConfig>(&opdata4).is_err());
}

#[test]
fn save_restore_roundtrip_and_validation() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    run_to_sample(&mut v, 0x77).unwrap();
    v.wrmsr(IBS_FETCH_CTL, FETCH_START, NO).unwrap();
    let state = v.save_state();
    assert!(state.op.latched && state.op.notified);
    let mut w = synthetic(VpmuConfig::default());
    w.restore_state(&state).unwrap();
    assert_eq!(w.save_state(), state);
    assert_eq!(w.rdmsr(IBS_OP_RIP), Ok(0x77));
    assert!(w.next_deadline().is_some(), "counting fetch unit re-armed");
    assert_eq!(w.take_interrupt(), None);

    let mut bad = |f: &dyn Fn(&mut VpmuState)| {
        let mut s = state;
        f(&mut s);
        let before = w.save_state();
        let e = w.restore_state(&s).unwrap_err();
        assert_eq!(w.save_state(), before, "{e}");
        e
    };
    assert!(matches!(
        bad(&|s| s.caps = 0xBFF),
        StateError::CapsMismatch { .. }
    ));
    assert!(matches!(
        bad(&|s| s.op.ctl |= 1 << 30),
        StateError::Reserved { .. }
    ));
    assert!(matches!(
        bad(&|s| s.fetch.ctl |= FETCH_PHY_ADDR_VALID),
        StateError::Reserved { .. }
    ));
    assert!(matches!(
        bad(&|s| s.op.data[5] = 1),
        StateError::Reserved { .. }
    ));
    assert!(matches!(
        bad(&|s| s.fetch.data[4] = 1),
        StateError::UnusedSlot { .. }
    ));
    assert!(matches!(
        bad(&|s| s.fetch.latched = true),
        StateError::LatchedWithoutVal { .. }
    ));
    assert!(matches!(
        bad(&|s| s.fetch.notified = true),
        StateError::NotifiedWithoutLatch { .. }
    ));
    assert!(matches!(
        bad(&|s| s.op.latched = false),
        StateError::NotifiedWithoutLatch { .. }
    ));
    assert!(matches!(
        bad(&|s| {
            s.op.latched = false;
            s.op.notified = false;
        }),
        StateError::StaleValUnderProtect { .. }
    ));
    // Physical addresses are writable but ignored: a snapshot cannot hold one.
    assert!(matches!(
        bad(&|s| s.fetch.data[1] = 0x1000),
        StateError::Reserved {
            index: IBS_FETCH_PHYSADDR,
            invalid: 0x1000,
            ..
        }
    ));
    assert!(matches!(
        bad(&|s| s.op.data[3] = OP_DATA3_DC_PHY_ADDR_VALID),
        StateError::Reserved {
            index: IBS_OP_DATA3,
            ..
        }
    ));
    // EILVT1's delivery status (bit 12) is read-only.
    assert!(matches!(
        bad(&|s| s.eilvt[1] |= 1 << 12),
        StateError::Apic(ApicError::Reserved {
            index: 0x851,
            reserved: 0x1000,
            ..
        })
    ));
    assert!(matches!(bad(&|s| s.ectrl = 1), StateError::Apic(_)));
    // A guest-written Val is a legal state under Faithful.
    let mut f = synthetic(cfg(Policy::Faithful, RaceCheck::Warn));
    let mut s = state;
    s.op.latched = false;
    s.op.notified = false;
    f.restore_state(&s).unwrap();
}

#[test]
fn reset_returns_to_power_on() {
    let mut v = synthetic(VpmuConfig::default());
    linux_init(&mut v);
    v.wrmsr(IBS_OP_CTL, OP_START, NO).unwrap();
    run_to_sample(&mut v, 3).unwrap();
    v.wrmsr(IBS_FETCH_CTL, FETCH_START, NO).unwrap();
    v.reset();
    assert_eq!(
        v.save_state(),
        synthetic(VpmuConfig::default()).save_state()
    );
    assert_eq!(v.next_deadline(), None);
    assert_eq!(v.rdmsr(0x850), Ok(0x0001_0000));
    assert_eq!(v.stats().samples_latched, 1, "counters survive reset");
}

// ------------------------------------------------------------------------------------------
// Property tests: random guest and embedder input never panics and keeps the invariants.
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Rd(u32),
    Wr(u32, u64),
    Point(u64, u64),
    Take,
    NmiIn,
    NmiOut,
    Deliver(bool, u64, u64),
    SaveRestore,
    Reset,
}

fn index() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0xC001_1030u32..=0xC001_103F,
        2 => prop::sample::select(vec![0x840u32, 0x841, 0x850, 0x851, 0x852, 0x853]),
        1 => any::<u32>(),
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => any::<u64>(),
        2 => (0u64..0x40).prop_map(|m| m | OP_EN),
        2 => (0u64..0x40).prop_map(|m| m | FETCH_EN),
        1 => (0u64..0x40).prop_map(|m| m | OP_EN | OP_VAL),
        1 => (0u64..0x40).prop_map(|m| m | FETCH_EN | FETCH_VAL | FETCH_RAND_EN),
        1 => prop::sample::select(vec![0u64, 0x400, 0x10400, 0xF0, OP_VAL, FETCH_VAL]),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => index().prop_map(Op::Rd),
        6 => (index(), value()).prop_map(|(i, v)| Op::Wr(i, v)),
        3 => (any::<u64>(), 0u64..2000).prop_map(|(r, t)| Op::Point(r, t)),
        2 => Just(Op::Take),
        1 => Just(Op::NmiIn),
        1 => Just(Op::NmiOut),
        2 => (any::<bool>(), any::<u64>(), 0u64..3).prop_map(|(f, r, e)| Op::Deliver(f, r, e)),
        1 => Just(Op::SaveRestore),
        1 => Just(Op::Reset),
    ]
}

fn check_invariants(v: &mut Vpmu, policy: Policy) {
    for unit in &v.units {
        let en_val = unit.kind.en() | unit.kind.val();
        if unit.latched {
            assert_eq!(unit.ctl & en_val, en_val, "latched without En and Val");
        }
        assert!(!unit.notified || unit.latched);
        if policy == Policy::Protect {
            assert!(unit.ctl & unit.kind.val() == 0 || unit.latched);
        }
    }
    for index in [IBS_FETCH_PHYSADDR, IBS_DC_PHYSADDR] {
        assert_eq!(v.rdmsr(index), Ok(0));
    }
    let fetch = v.units[UnitKind::Fetch.index()].ctl;
    assert_eq!(fetch & FETCH_PHY_ADDR_VALID, 0);
    assert_eq!(
        v.units[UnitKind::Op.index()].data[3] & OP_DATA3_DC_PHY_ADDR_VALID,
        0
    );
    let s = v.stats();
    assert!(s.interrupts_taken <= s.interrupts_requested);
    assert!(s.samples_delivered <= s.samples_latched);
    if policy == Policy::Protect {
        assert_eq!((s.stale_val_reads, s.races_detected), (0, 0));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_invariants(
        faithful in any::<bool>(),
        caps in prop::sample::select(vec![0x7u32, 0x1F, 0x3FF, 0xBFF]),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let policy = if faithful { Policy::Faithful } else { Policy::Protect };
        let caps = Caps::new(caps).unwrap();
        let config = VpmuConfig { caps, policy, race_check: RaceCheck::Fail };
        let mut v = synthetic(config);
        let sink = v.sink();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Rd(i) => { let _ = v.rdmsr(i); }
                Op::Wr(i, x) => { let _ = v.wrmsr(i, x, &|| faithful); }
                Op::Point(rip, dt) => {
                    now += dt;
                    v.sample_point(SamplePoint { rip, guest_ns: now });
                }
                Op::Take => {
                    if v.take_interrupt().is_some() {
                        prop_assert!(v.units.iter().any(|u| u.latched));
                    }
                }
                Op::NmiIn => v.nmi_injected(),
                Op::NmiOut => v.nmi_returned(),
                Op::Deliver(fetch, rip, back) => {
                    let kind = if fetch { UnitKind::Fetch } else { UnitKind::Op };
                    let cur = v.units[kind.index()].epoch.raw();
                    let epoch = Epoch::from_raw(cur.saturating_sub(back));
                    let sample = if fetch {
                        let regs = FetchSample { status: rip, linaddr: rip, ctl_ext: rip };
                        Sample::fetch(epoch, regs)
                    } else {
                        let regs = OpSample {
                            status: rip,
                            rip,
                            data: rip,
                            data2: rip,
                            data3: rip,
                            dc_linaddr: rip,
                            br_target: rip,
                        };
                        Sample::op(epoch, regs)
                    };
                    let _ = sink.deliver(sample);
                    v.poll_inbox();
                }
                Op::SaveRestore => {
                    let s = v.save_state();
                    prop_assert_eq!(v.restore_state(&s), Ok(()));
                    prop_assert_eq!(v.save_state(), s);
                }
                Op::Reset => v.reset(),
            }
            check_invariants(&mut v, policy);
        }
    }

    #[test]
    fn any_msr_access_is_total(
        index in any::<u32>(),
        value in any::<u64>(),
        caps in prop::sample::select(vec![0x7u32, 0x1F, 0x3FF, 0xBFF]),
    ) {
        let caps = Caps::new(caps).unwrap();
        let mut v = synthetic(VpmuConfig { caps, ..VpmuConfig::default() });
        let r = v.rdmsr(index);
        let w = v.wrmsr(index, value, NO);
        prop_assert_eq!(r.is_err() as u64 + w.is_err() as u64, v.stats().faults);
        if !crate::is_vpmu_msr(index) {
            prop_assert_eq!(w, Err(MsrError::NotVpmu { index }));
        }
    }

    #[test]
    fn caps_parse_never_panics(text in ".{0,12}", raw in any::<u32>()) {
        let _ = text.parse::<Caps>();
        if let Ok(c) = Caps::new(raw) {
            prop_assert_eq!(c.bits() & 0x7, 0x7);
            prop_assert_eq!(c.bits() & (1 << 10), 0);
        }
    }
}
