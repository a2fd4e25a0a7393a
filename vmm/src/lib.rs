//! ibsvm: a small KVM virtual machine monitor whose guests get a virtual AMD IBS PMU.
//!
//! The binary (`src/main.rs`) is a thin shell around [`cli`] and [`vm`]. Module map:
//! - [`boot`]: kernel/initrd loading, zero page, MP table, boot page tables;
//! - [`vcpu`]: vCPU set-up and the exit loop ([`vcpu::exit`] is the pure dispatch);
//! - [`devices`]: COM1, i8042, the test-exit port;
//! - [`ibs`]: the virtual IBS PMU (`vpmu`) wired to KVM exits, timers and NMIs;
//! - [`cpuid`], [`host`]: what the guest sees of the CPU and what this host needs;
//! - [`vm`]: wiring it together.

pub mod boot;
pub mod cli;
pub mod cpuid;
pub mod devices;
pub mod host;
pub mod ibs;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod msr;
pub mod stats;
pub mod stop;
pub mod vcpu;
pub mod vm;
