//! The boot vCPU's initial state: GDT, identity page tables, long mode, registers.
//!
//! Bit positions: Intel SDM vol. 3A §2.5 (CR0/CR4), §3.4.5 (segment descriptors), §4.5
//! (4-level paging); AMD APM vol. 2 §3.1.7 (EFER).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_GDT, BOOT_IDT, BOOT_STACK, PD, PDPT, PML4, ZERO_PAGE};
use crate::x86::{cr0, cr4, efer, paging};

/// Page-table entry bits of the boot identity map: present, writable.
const PTE_PRESENT_RW: u64 = paging::PRESENT | paging::WRITABLE;

/// Selector of the 64-bit code segment in the boot GDT.
pub const BOOT_CS: u16 = 0x08;
/// Selector of the flat data segment in the boot GDT.
pub const BOOT_DS: u16 = 0x10;
/// Selector of the TSS in the boot GDT.
pub const BOOT_TSS: u16 = 0x18;

/// Errors writing the boot CPU structures.
#[derive(Debug, Error)]
pub enum CpuSetupError {
    /// Writing the GDT, IDT or page tables failed.
    #[error("cannot write the boot {what} at {addr:#x}: {source}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
}

/// A GDT descriptor from its flags (bits 55:52 and 47:40 packed as 0xF0FF), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (L=1, P, DPL0, execute/read), flat data, 32-bit TSS stub.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The `kvm_segment` a GDT descriptor describes, loaded through `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = bit(55);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: if bit(47) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), CpuSetupError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| CpuSetupError::Write { what, addr, source })
}

/// Writes the boot GDT, an empty IDT and the 1 GiB identity map (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuSetupError> {
    for (i, entry) in GDT.iter().enumerate() {
        write(mem, "GDT", BOOT_GDT + 8 * i as u64, *entry)?;
    }
    write(mem, "IDT", BOOT_IDT, 0u64)?;
    write(mem, "PML4", PML4, PDPT | PTE_PRESENT_RW)?;
    write(mem, "PDPT", PDPT, PD | PTE_PRESENT_RW)?;
    for i in 0..512u64 {
        write(
            mem,
            "page directory",
            PD + 8 * i,
            (i << 21) | PTE_PRESENT_RW | paging::PAGE_SIZE,
        )?;
    }
    Ok(())
}

/// Special registers for 64-bit entry, starting from KVM's reset values in `sregs`.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(GDT[1], BOOT_CS);
    let data = segment_from_gdt(GDT[2], BOOT_DS);
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment_from_gdt(GDT[3], BOOT_TSS);
    sregs.cr3 = PML4;
    sregs.cr4 |= cr4::PAE;
    sregs.cr0 |= cr0::PE | cr0::ET | cr0::PG;
    sregs.efer |= efer::LME | efer::LMA;
    sregs
}

/// General registers at the 64-bit entry point: RSI = zero page (Linux 64-bit boot protocol).
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        rflags: 0x2, // bit 1 is reserved and always 1
        ..Default::default()
    }
}

/// x87/SSE state at reset: FCW 0x37F (all exceptions masked), MXCSR 0x1F80.
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Whether `sregs` and `rip` are the state after RESET or INIT (SDM vol. 3A §9.1.4,
/// Table 9-1: CS selector 0xF000, base 0xFFFF0000, RIP 0xFFF0), the state KVM leaves an
/// AMD vCPU in after a shutdown.
pub fn is_reset_state(sregs: &kvm_sregs, rip: u64) -> bool {
    sregs.cs.selector == 0xf000 && sregs.cs.base == 0xffff_0000 && rip == 0xfff0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_as_expected() {
        // Well-known encodings: 64-bit kernel code and flat data.
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(GDT[1], BOOT_CS);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.s, cs.type_, cs.dpl),
            (1, 0, 1, 1, 0xb, 0)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[2], BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn long_mode_is_enabled() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (cr0::PE | cr0::PG), cr0::PE | cr0::PG);
        assert_eq!(s.cr4 & cr4::PAE, cr4::PAE);
        assert_eq!(s.efer & (efer::LME | efer::LMA), efer::LME | efer::LMA);
        assert_eq!(s.cr3, PML4);
        assert_eq!(s.cs.selector, BOOT_CS);
        let r = entry_regs(0x1000000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x1000000, ZERO_PAGE, 2));
    }

    #[test]
    fn identity_map_covers_one_gib() {
        let mem = crate::memory::create(64).unwrap();
        write_boot_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD + 8 * 511)).unwrap();
        assert_eq!(pde & !0xfff, 511 << 21);
        assert_eq!(
            pde & (paging::PAGE_SIZE | PTE_PRESENT_RW),
            paging::PAGE_SIZE | PTE_PRESENT_RW
        );
        let pml4: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT);
    }
}
