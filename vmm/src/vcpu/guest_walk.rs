//! Guest virtual memory through the guest's 4-level page tables (Intel SDM vol. 3A §4.5;
//! AMD APM vol. 2 §5.3), for the rare paths that need it: instruction bytes of an
//! emulation failure, and the memory operand of an instruction ibsvm completes, with the
//! access rights and accessed/dirty updates of §4.6 and §4.8.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

use crate::x86::{paging, pf_error};

/// A completed walk: the physical address, where each entry used lives, and the access
/// rights the entries grant together (§4.6.1: R/W and U/S must be set at every level).
struct Walk {
    pa: u64,
    entries: [u64; 4],
    levels: usize,
    writable: bool,
    user: bool,
}

/// Walks `va` through the tables at `cr3`; `None` if an entry is not present or not RAM.
fn walk(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<Walk> {
    let mut table = cr3 & paging::ADDR_MASK;
    let mut w = Walk {
        pa: 0,
        entries: [0; 4],
        levels: 0,
        writable: true,
        user: true,
    };
    // Levels: PML4 (bits 47:39), PDPT (38:30; 1 GiB pages), PD (29:21; 2 MiB), PT (20:12).
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let at = table + ((va >> shift) & 0x1ff) * 8;
        let entry: u64 = mem.read_obj(GuestAddress(at)).ok()?;
        if entry & paging::PRESENT == 0 {
            return None;
        }
        w.entries[level] = at;
        w.levels = level + 1;
        w.writable &= entry & paging::WRITABLE != 0;
        w.user &= entry & paging::USER != 0;
        let leaf = shift == 12 || (level > 0 && entry & paging::PAGE_SIZE != 0);
        if leaf {
            let offset_mask = (1u64 << shift) - 1;
            w.pa = (entry & paging::ADDR_MASK & !offset_mask) | (va & offset_mask);
            return Some(w);
        }
        table = entry & paging::ADDR_MASK;
    }
    None
}

/// Translates `va` through the page tables at `cr3`; `None` if unmapped.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    walk(mem, cr3, va).map(|w| w.pa)
}

/// What the paging rules of a data access depend on.
#[derive(Debug, Clone, Copy)]
pub struct DataAccess {
    /// CR3.
    pub cr3: u64,
    /// The access is a write.
    pub write: bool,
    /// The access is made at CPL 3.
    pub user: bool,
    /// CR0.WP: supervisor writes honour read-only pages (§4.6.1).
    pub write_protect: bool,
    /// SMAP applies: CR4.SMAP = 1 and RFLAGS.AC = 0 (supervisor accesses to user pages
    /// fault; §4.6.1).
    pub smap: bool,
}

/// Translates `va` for `access`, as the processor would: `Err(error_code)` is the #PF it
/// raises. On success the accessed flags of the entries used are set, and for a write the
/// dirty flag of the leaf (§4.8). Protection keys and reserved-bit checks are not
/// modelled (ibsvm's guests have neither CR4.PKE nor reserved bits in their tables).
pub fn translate_access(mem: &GuestMemoryMmap, va: u64, access: DataAccess) -> Result<u64, u32> {
    let user_bit = if access.user { pf_error::USER } else { 0 };
    let write_bit = if access.write { pf_error::WRITE } else { 0 };
    let w = walk(mem, access.cr3, va).ok_or(user_bit | write_bit)?;
    let denied = if access.user {
        !w.user || (access.write && !w.writable)
    } else {
        (w.user && access.smap) || (access.write && access.write_protect && !w.writable)
    };
    if denied {
        return Err(pf_error::PRESENT | user_bit | write_bit);
    }
    for (level, &at) in w.entries[..w.levels].iter().enumerate() {
        let leaf = level + 1 == w.levels;
        let bits = paging::ACCESSED
            | if leaf && access.write {
                paging::DIRTY
            } else {
                0
            };
        set_entry_bits(mem, at, bits);
    }
    Ok(w.pa)
}

/// ORs `bits` into the paging entry at `gpa` atomically, as the processor's locked update
/// of the accessed and dirty flags (§4.8): other vCPUs may be using the same tables.
fn set_entry_bits(mem: &GuestMemoryMmap, gpa: u64, bits: u64) {
    // walk() just read this 8-byte-aligned entry from RAM, so neither lookup can fail.
    let Ok(slice) = mem.get_slice(GuestAddress(gpa), 8) else {
        return;
    };
    if let Ok(entry) = slice.get_atomic_ref::<AtomicU64>(0) {
        if entry.load(Ordering::Relaxed) & bits != bits {
            entry.fetch_or(bits, Ordering::SeqCst);
        }
    }
}

/// Reads up to `buf.len()` bytes at `va`, stopping at the first unmapped byte; returns how many.
pub fn read_virt(mem: &GuestMemoryMmap, cr3: u64, va: u64, buf: &mut [u8]) -> usize {
    for (i, byte) in buf.iter_mut().enumerate() {
        let Some(pa) = translate(mem, cr3, va.wrapping_add(i as u64)) else {
            return i;
        };
        let Ok(b) = mem.read_obj::<u8>(GuestAddress(pa)) else {
            return i;
        };
        *byte = b;
    }
    buf.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PML4;

    #[test]
    fn walks_the_boot_identity_map_and_a_4k_mapping() {
        let mem = crate::memory::create(64).unwrap();
        crate::boot::cpu::write_boot_tables(&mem).unwrap();
        assert_eq!(translate(&mem, PML4, 0x123_4567), Some(0x123_4567));
        assert_eq!(translate(&mem, PML4, 1 << 30), None, "beyond the 1 GiB map");
        // Map VA 0xffff_8000_0000_1000 → PA 0x30_0000 through 4 KiB tables.
        let va: u64 = 0xffff_8000_0000_1000;
        map_4k(&mem, va, 0x30_0000, paging::PRESENT | paging::WRITABLE);
        mem.write_slice(&[0xcc, 0x90], GuestAddress(0x30_0ffe))
            .unwrap();
        assert_eq!(translate(&mem, PML4, va + 0xffe), Some(0x30_0ffe));
        let mut buf = [0u8; 4];
        // The next page is unmapped: the read stops after two bytes.
        assert_eq!(read_virt(&mem, PML4, va + 0xffe, &mut buf), 2);
        assert_eq!(&buf[..2], &[0xcc, 0x90]);
    }

    /// Maps `va` to `pa` through fresh 4 KiB tables at 0x20_0000 with leaf flags `leaf`
    /// (the upper levels present, writable, user); returns the leaf entry's address.
    fn map_4k(mem: &GuestMemoryMmap, va: u64, pa: u64, leaf: u64) -> u64 {
        let (pdpt, pd, pt) = (0x20_1000u64, 0x20_2000u64, 0x20_3000u64);
        let table_flags = paging::PRESENT | paging::WRITABLE | paging::USER;
        for (table, next, shift) in [(PML4, pdpt, 39), (pdpt, pd, 30), (pd, pt, 21)] {
            let at = table + ((va >> shift) & 0x1ff) * 8;
            mem.write_obj(next | table_flags, GuestAddress(at)).unwrap();
        }
        let at = pt + ((va >> 12) & 0x1ff) * 8;
        mem.write_obj(pa | leaf, GuestAddress(at)).unwrap();
        at
    }

    #[test]
    fn data_accesses_follow_the_protection_rules_and_set_accessed_dirty() {
        let mem = crate::memory::create(64).unwrap();
        crate::boot::cpu::write_boot_tables(&mem).unwrap();
        let va: u64 = 0xffff_8000_0000_1000;
        let kernel = DataAccess {
            cr3: PML4,
            write: false,
            user: false,
            write_protect: true,
            smap: false,
        };
        let write = DataAccess {
            write: true,
            ..kernel
        };
        // Not present: the error code says only what the access was.
        assert_eq!(translate_access(&mem, va, write), Err(pf_error::WRITE));
        assert_eq!(
            translate_access(
                &mem,
                va,
                DataAccess {
                    user: true,
                    ..kernel
                }
            ),
            Err(pf_error::USER)
        );

        // Read-only supervisor page: reads pass; writes fault with WP, pass without.
        let leaf = map_4k(&mem, va, 0x30_0000, paging::PRESENT);
        assert_eq!(translate_access(&mem, va + 8, kernel), Ok(0x30_0008));
        assert_eq!(
            translate_access(&mem, va, write),
            Err(pf_error::PRESENT | pf_error::WRITE)
        );
        let no_wp = DataAccess {
            write_protect: false,
            ..write
        };
        assert_eq!(translate_access(&mem, va, no_wp), Ok(0x30_0000));
        // CPL 3 may not touch a supervisor page.
        let user = DataAccess {
            user: true,
            ..kernel
        };
        assert_eq!(
            translate_access(&mem, va, user),
            Err(pf_error::PRESENT | pf_error::USER)
        );

        // A writable user page: SMAP stops supervisor reads; a user write sets A and D.
        map_4k(
            &mem,
            va,
            0x30_0000,
            paging::PRESENT | paging::WRITABLE | paging::USER,
        );
        let smap = DataAccess {
            smap: true,
            ..kernel
        };
        assert_eq!(translate_access(&mem, va, smap), Err(pf_error::PRESENT));
        let entry = |at| mem.read_obj::<u64>(GuestAddress(at)).unwrap();
        assert_eq!(entry(leaf) & (paging::ACCESSED | paging::DIRTY), 0);
        assert_eq!(translate_access(&mem, va, user), Ok(0x30_0000));
        assert_eq!(
            entry(leaf) & (paging::ACCESSED | paging::DIRTY),
            paging::ACCESSED,
            "a read sets A only"
        );
        let user_write = DataAccess {
            write: true,
            ..user
        };
        assert_eq!(translate_access(&mem, va, user_write), Ok(0x30_0000));
        assert_eq!(
            entry(leaf) & (paging::ACCESSED | paging::DIRTY),
            paging::ACCESSED | paging::DIRTY
        );
        let pml4e = PML4 + ((va >> 39) & 0x1ff) * 8;
        assert_eq!(
            entry(pml4e) & (paging::ACCESSED | paging::DIRTY),
            paging::ACCESSED,
            "D is for leaves"
        );
    }
}
