//! Guest physical memory map used by ibsvm.
//!
//! Everything below 1 MiB follows the conventions of the Linux/x86 boot
//! protocol (Documentation/arch/x86/boot.rst) and the Intel MultiProcessor
//! Specification 1.4 (MP table in the last KiB of base memory).

/// GDT the vCPU starts with (4 descriptors).
pub const BOOT_GDT: u64 = 0x500;
/// Empty IDT the vCPU starts with.
pub const BOOT_IDT: u64 = 0x520;
/// Linux `struct boot_params` ("zero page"); RSI points here at entry.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer (grows down, below the zero page).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page-map level 4 of the boot identity map.
pub const PML4: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPT: u64 = 0xa000;
/// Page directory of the boot identity map (512 × 2 MiB = 1 GiB).
pub const PD: u64 = 0xb000;
/// Kernel command line (NUL-terminated).
pub const CMDLINE: u64 = 0x20000;
/// Largest command line we accept, NUL included (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the EBDA, where the MP table lives (MP spec 1.4 §4: last KiB of base memory).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional memory; 0xA0000–0xFFFFF is the VGA/BIOS hole.
pub const EBDA_END: u64 = 0xa0000;
/// Where kernels are loaded (Linux CONFIG_PHYSICAL_START default is higher; the
/// boot protocol's minimum is 1 MiB).
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (the LAPIC at 0xFEE00000 and IOAPIC at 0xFEC00000 live in it).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole; RAM above the hole continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// KVM's TSS area (three pages) for `KVM_SET_TSS_ADDRESS`, inside the MMIO hole.
pub const KVM_TSS: u64 = 0xfffb_d000;
/// Local APIC base (Intel SDM vol. 3 §10.4.1, default IA32_APIC_BASE).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// I/O APIC base (MP spec default).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
