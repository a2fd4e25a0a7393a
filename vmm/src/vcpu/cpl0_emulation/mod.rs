//! Support for hosts whose KVM **emulates guest CPL0 code** (a paravirtual, page-table-based
//! backend such as `kvm_pvm`, found on some cloud development machines) instead of running
//! it on SVM/VMX hardware. Guest CPL3 code runs natively there; CPL0 code runs in KVM's
//! instruction emulator, which rejects some instructions and does not enter CPL0 on
//! `SYSCALL`. The rest of ibsvm is a plain KVM VMM; this layer is what such a host adds:
//!
//! - [`host`]: telling the host kinds apart, and the kernel parameters a Linux guest needs;
//! - [`completion`]: the instructions the emulator rejects that ibsvm completes itself;
//! - [`syscall_bridge`]: guest system calls routed into the kernel's entry.
//!
//! Active when [`host::HostKvm::detect`] finds such a host (`--cpl0-quirks auto`, the
//! default), or always with `--cpl0-quirks on`; `off` leaves it out. docs/host-kvm.md
//! describes the host.

pub mod completion;
pub mod host;
pub mod syscall_bridge;
