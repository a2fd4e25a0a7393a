//! The x86 architectural constants ibsvm uses, in one place, each with its source: the
//! Intel SDM (Intel 64 and IA-32 Architectures Software Developer's Manual) and the AMD
//! APM (AMD64 Architecture Programmer's Manual).

pub mod msr;

/// CR0 bits (SDM vol. 3A §2.5).
pub mod cr0 {
    /// Bit 0 PE: protected mode.
    pub const PE: u64 = 1 << 0;
    /// Bit 3 TS: task switched, #NM on x87/SSE/XSAVE use.
    pub const TS: u64 = 1 << 3;
    /// Bit 4 ET: extension type, reads as 1.
    pub const ET: u64 = 1 << 4;
    /// Bit 16 WP: supervisor writes honour read-only pages.
    pub const WP: u64 = 1 << 16;
    /// Bit 31 PG: paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits (SDM vol. 3A §2.5).
pub mod cr4 {
    /// Bit 5 PAE: physical address extension (required for long mode).
    pub const PAE: u64 = 1 << 5;
    /// Bit 12 LA57: 5-level paging.
    pub const LA57: u64 = 1 << 12;
    /// Bit 18 OSXSAVE: XSAVE and XGETBV/XSETBV enabled.
    pub const OSXSAVE: u64 = 1 << 18;
    /// Bit 21 SMAP: supervisor-mode access prevention.
    pub const SMAP: u64 = 1 << 21;
}

/// EFER bits (AMD APM vol. 2 §3.1.7; SDM vol. 3A §2.2.1).
pub mod efer {
    /// Bit 8 LME: long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Bit 10 LMA: long mode active.
    pub const LMA: u64 = 1 << 10;
}

/// RFLAGS bits (SDM vol. 1 §3.4.3).
pub mod rflags {
    /// Bit 1: reserved, reads as 1.
    pub const FIXED: u64 = 1 << 1;
    /// Bit 9 IF: maskable interrupts enabled.
    pub const IF: u64 = 1 << 9;
    /// Bit 10 DF: string direction, cleared by `cld`.
    pub const DF: u64 = 1 << 10;
    /// Bit 16 RF: resume flag (instruction breakpoints suppressed for one instruction).
    pub const RF: u64 = 1 << 16;
    /// Bit 18 AC: with SMAP, supervisor accesses to user pages are allowed (SDM vol. 3A
    /// §4.6.1).
    pub const AC: u64 = 1 << 18;
}

/// Paging-structure entry bits (SDM vol. 3A tables 4-15 to 4-20).
pub mod paging {
    /// Bit 0 P: present.
    pub const PRESENT: u64 = 1 << 0;
    /// Bit 1 R/W: writable.
    pub const WRITABLE: u64 = 1 << 1;
    /// Bit 2 U/S: user accessible.
    pub const USER: u64 = 1 << 2;
    /// Bit 5 A: accessed.
    pub const ACCESSED: u64 = 1 << 5;
    /// Bit 6 D: dirty.
    pub const DIRTY: u64 = 1 << 6;
    /// Bit 7 PS: the entry maps a large page (2 MiB in a PDE, 1 GiB in a PDPTE).
    pub const PAGE_SIZE: u64 = 1 << 7;
    /// Bits 51:12: the physical address of the next table or the page.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
}

/// #PF error code bits (SDM vol. 3A §4.7).
pub mod pf_error {
    /// Bit 0 P: a protection violation, not a non-present entry.
    pub const PRESENT: u32 = 1 << 0;
    /// Bit 1 W/R: a write.
    pub const WRITE: u32 = 1 << 1;
    /// Bit 2 U/S: at CPL 3.
    pub const USER: u32 = 1 << 2;
}

/// Exception vectors (SDM vol. 3A §6.3.1, table 6-1).
pub mod vector {
    /// #PF, page fault.
    pub const PF: u8 = 14;
}

/// Extended control registers read by XGETBV (SDM vol. 1 §13.3, vol. 2C "XGETBV").
pub mod xcr {
    /// XCR0: the enabled state components.
    pub const XCR0: u32 = 0;
    /// XCR1: XCR0 AND XINUSE, where CPUID offers XGETBV1.
    pub const XCR1: u32 = 1;
}
