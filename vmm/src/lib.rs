//! ibsvm: a small KVM virtual machine monitor whose guests get a virtual AMD IBS PMU.
//!
//! The binary (`src/main.rs`) is a thin shell around [`cli`] and [`vm`]; the library exists
//! for it, the integration tests ([`stop`], [`host`]) and the fuzz targets ([`boot::kernel`],
//! [`layout`], [`cli`]), and keeps everything else crate-private, so that the compiler
//! finds dead code. Module map (`cargo doc --document-private-items` for all of it):
//! - `boot`: kernel/initrd loading and checks, zero page, MP table, boot page tables;
//! - `vcpu`: vCPU set-up and the exit loop (`vcpu::exit` is the pure dispatch);
//! - `devices`: COM1, i8042, the test-exit port;
//! - `ibs`: the virtual IBS PMU (`vpmu`) wired to KVM exits, timers and NMIs;
//! - `cpuid`, `x86` (architectural constants), [`host`]: what the guest sees of the CPU and what this host needs;
//! - [`vm`]: wiring it together.

pub mod boot;
pub mod cli;
pub(crate) mod cpuid;
pub(crate) mod devices;
pub(crate) mod ibs;
pub(crate) mod kick;
pub mod layout;
pub mod logger;
pub(crate) mod memory;
pub(crate) mod stats;
pub mod stop;
pub(crate) mod vcpu;
pub use vcpu::cpl0_emulation::host;
pub mod vm;
pub(crate) mod x86;
