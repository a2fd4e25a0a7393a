//! # vpmu — a virtual AMD IBS PMU
//!
//! A per-vCPU model of AMD Instruction-Based Sampling (fetch and op sampling units, their
//! MSRs, the IBS capability CPUID leaf, and the AMD extended-APIC LVT entries that route the
//! IBS interrupt), embeddable by any VMM. It knows nothing about KVM: the embedder passes MSR
//! indices and values, CPUID entries, sample points (guest RIP and run time), and injects the
//! [`Interrupt`]s the device hands back. See `README.md` for the embedding glue and the threat
//! model, and [`device_model`] (the crate's `DEVICE.md`) for the behaviour it implements:
//! comments cite its sections as "DEVICE.md §n".
//!
//! A typical vCPU loop:
//! 1. [`patch_cpuid`] (or [`hide_ibs`]) on the CPUID table, [`Vpmu::new`] per vCPU;
//! 2. MSR exits for [`is_vpmu_msr`] indices → [`Vpmu::rdmsr`] / [`Vpmu::wrmsr`], `Err` → #GP
//!    ([`Vpmu::set_guest_time`] first, so that periods start at the write);
//! 3. stop the vCPU by [`Vpmu::next_deadline`] and call [`Vpmu::sample_point`];
//! 4. before re-entering the guest, [`Vpmu::take_interrupt`] and inject it
//!    ([`Vpmu::nmi_injected`] after an NMI);
//! 5. after MSR writes, [`Vpmu::take_race`]; any time, [`Vpmu::stats`];
//! 6. snapshots with [`Vpmu::save_state`] / [`Vpmu::restore_state`].

#![deny(missing_docs)]
// No unsafe code, except in the `host-perf` feature's perf-event module (syscall, ioctl,
// mmap), which opts in with its own `#![allow(unsafe_code)]` and documents every block.
#![deny(unsafe_code)]

pub mod apic;
pub mod caps;
pub mod cpuid;
pub mod device;
#[doc = include_str!("../DEVICE.md")]
pub mod device_model {}
pub mod msr;
pub mod policy;
pub mod source;
pub mod state;
pub mod stats;
pub mod unit;

pub use apic::{ApicError, Interrupt};
pub use caps::{CapBit, Caps, CapsError};
pub use cpuid::{hide_ibs, patch_cpuid, CpuidEntry, CpuidPatch, FamilyModel};
pub use device::{ForceError, ForcedIrq, Latched, MsrError, Vpmu, VpmuConfig};
pub use msr::{is_ext_apic_msr, is_ibs_msr, is_vpmu_msr, EXT_APIC_MSRS, IBS_MSR_RANGE};
pub use policy::{GuestContext, NmiEvidence, NoGuestContext, Policy, RaceCheck, RaceEvent};
pub use source::synthetic::{SyntheticConfig, SyntheticError, SyntheticSource};
pub use source::{
    Arm, Epoch, FetchSample, OpSample, Sample, SamplePoint, SampleRegs, SampleSink, SampleSource,
};
pub use state::{StateError, UnitState, VpmuState};
pub use stats::{DropReason, Stats};
pub use unit::UnitKind;
