//! Reading guest virtual memory by walking the guest's 4-level page tables (Intel SDM
//! vol. 3A §4.5; AMD APM vol. 2 §5.3), for the rare paths that need it (instruction bytes
//! of an emulation failure).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates `va` through the page tables at `cr3`; `None` if unmapped.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    // Levels: PML4 (bits 47:39), PDPT (38:30; 1 GiB pages), PD (29:21; 2 MiB), PT (20:12).
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        let leaf = shift == 12 || (level > 0 && entry & PAGE_SIZE_BIT != 0);
        if leaf {
            let offset_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !offset_mask) | (va & offset_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
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
        // Map VA 0xffff_8000_0000_1000 → PA 0x30_0000 through 4 KiB tables at 0x20_0000.
        let va: u64 = 0xffff_8000_0000_1000;
        let (pdpt, pd, pt) = (0x20_1000u64, 0x20_2000u64, 0x20_3000u64);
        mem.write_obj(pdpt | 3, GuestAddress(PML4 + ((va >> 39) & 0x1ff) * 8))
            .unwrap();
        mem.write_obj(pd | 3, GuestAddress(pdpt + ((va >> 30) & 0x1ff) * 8))
            .unwrap();
        mem.write_obj(pt | 3, GuestAddress(pd + ((va >> 21) & 0x1ff) * 8))
            .unwrap();
        mem.write_obj(
            0x30_0000u64 | 3,
            GuestAddress(pt + ((va >> 12) & 0x1ff) * 8),
        )
        .unwrap();
        mem.write_slice(&[0xcc, 0x90], GuestAddress(0x30_0ffe))
            .unwrap();
        assert_eq!(translate(&mem, PML4, va + 0xffe), Some(0x30_0ffe));
        let mut buf = [0u8; 4];
        // The next page is unmapped: the read stops after two bytes.
        assert_eq!(read_virt(&mem, PML4, va + 0xffe, &mut buf), 2);
        assert_eq!(&buf[..2], &[0xcc, 0x90]);
    }
}
