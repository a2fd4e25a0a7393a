//! Any sequence of guest MSR accesses and VMM calls on a vpmu device (synthetic source):
//! the guarantees of vpmu/README.md's threat model must hold after every step.
//!
//! - no panic;
//! - a faulting WRMSR changes nothing (the saved state before and after are equal);
//! - PHYSADDR registers read 0;
//! - only NMIs and fixed vectors >= 16 are handed out for injection;
//! - `Protect`: no stale Val is ever presented (`stale_val_reads` stays 0);
//! - the saved state restores, into a fresh device, to the same state.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vpmu::msr::{IBS_DC_PHYSADDR, IBS_FETCH_PHYSADDR};
use vpmu::source::SamplePoint;
use vpmu::{
    Caps, Interrupt, NoGuestContext, Policy, RaceCheck, SyntheticConfig, SyntheticSource, Vpmu,
    VpmuConfig, EXT_APIC_MSRS, IBS_MSR_RANGE,
};

/// Reads little-endian integers off the fuzzer's bytes (zeros once they run out).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, i| v | (u64::from(self.u8()) << (8 * i)))
    }
    /// A device MSR most of the time, any index now and then.
    fn msr(&mut self) -> u32 {
        let pick = self.u8();
        let ibs: Vec<u32> = IBS_MSR_RANGE.collect();
        match pick % 8 {
            0 => self.u64() as u32,
            1 => EXT_APIC_MSRS[usize::from(self.u8()) % EXT_APIC_MSRS.len()],
            _ => ibs[usize::from(self.u8()) % ibs.len()],
        }
    }
}

fn device(config: VpmuConfig) -> Vpmu<SyntheticSource> {
    let source = SyntheticSource::new(SyntheticConfig::default()).expect("default config");
    Vpmu::new(config, source)
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let caps = [Caps::PROFILE_OLD, Caps::PROFILE_ZEN3, Caps::PROFILE_ZEN4][usize::from(b.u8()) % 3];
    let policy = if b.u8() & 1 == 0 {
        Policy::Protect
    } else {
        Policy::Faithful
    };
    let race_check = [RaceCheck::Off, RaceCheck::Warn, RaceCheck::Fail][usize::from(b.u8()) % 3];
    let config = VpmuConfig {
        caps,
        policy,
        race_check,
    };
    let mut dev = device(config);
    let mut guest_ns = 0u64;
    while !b.0.is_empty() {
        match b.u8() % 8 {
            0 => {
                let index = b.msr();
                if let Ok(value) = dev.rdmsr(index) {
                    if index == IBS_FETCH_PHYSADDR || index == IBS_DC_PHYSADDR {
                        assert_eq!(value, 0, "PHYSADDR {index:#x} read {value:#x}");
                    }
                }
            }
            1 | 2 => {
                let (index, value) = (b.msr(), b.u64());
                let before = dev.save_state();
                if dev.wrmsr(index, value, &NoGuestContext).is_err() {
                    assert_eq!(
                        dev.save_state(),
                        before,
                        "a faulting WRMSR {index:#x} changed state"
                    );
                }
            }
            3 => {
                guest_ns += b.u64() % 2_000_000;
                dev.set_guest_time(guest_ns);
                dev.sample_point(SamplePoint {
                    rip: b.u64(),
                    guest_ns,
                });
            }
            4 => {
                if let Some(irq) = dev.take_interrupt() {
                    if let Interrupt::Fixed { vector } = irq {
                        assert!(vector >= 16, "fixed vector {vector}");
                    }
                    dev.nmi_injected();
                }
            }
            5 => dev.nmi_returned(),
            6 => {
                let _ = dev.take_race();
            }
            _ => {
                let state = dev.save_state();
                let mut fresh = device(config);
                fresh.restore_state(&state).expect("a saved state restores");
                assert_eq!(fresh.save_state(), state, "restore changed the state");
            }
        }
        if policy == Policy::Protect {
            assert_eq!(
                dev.stats().stale_val_reads,
                0,
                "protect presented a stale Val"
            );
        }
    }
});
