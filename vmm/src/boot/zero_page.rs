//! The Linux `struct boot_params` ("zero page") and its e820 memory map
//! (Documentation/arch/x86/boot.rst and zero-page.rst).

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel::{LoadedInitrd, LoadedKernel};
use crate::layout::{
    CMDLINE, EBDA_END, HIGH_MEMORY, MMIO_HOLE_END, MMIO_HOLE_START, MPTABLE_START, ZERO_PAGE,
};

/// e820 type 1: usable RAM (ACPI spec, "Address Range Types").
pub const E820_RAM: u32 = 1;
/// e820 type 2: reserved.
pub const E820_RESERVED: u32 = 2;

/// Boot-sector signature expected in `hdr.boot_flag` (boot.rst).
const BOOT_FLAG: u16 = 0xaa55;
/// "HdrS", the setup-header magic (boot.rst).
const HDR_MAGIC: u32 = 0x5372_6448;
/// Boot protocol version we implement.
const BOOT_PROTOCOL: u16 = 0x020f;
/// `type_of_loader` 0xFF: "undefined" boot loader (boot.rst).
const LOADER_UNDEFINED: u8 = 0xff;
/// loadflags bit 0 LOADED_HIGH: protected-mode code is at 0x100000.
const LOADED_HIGH: u8 = 1;
/// loadflags bit 7 CAN_USE_HEAP.
const CAN_USE_HEAP: u8 = 0x80;

/// Errors writing the zero page.
#[derive(Debug, Error)]
pub enum ZeroPageError {
    /// More e820 entries than the zero page holds.
    #[error("e820 map has {0} entries, the zero page holds 128")]
    TooManyE820(usize),
    /// Writing to guest memory failed.
    #[error("cannot write the zero page at {ZERO_PAGE:#x}: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// The e820 map for the RAM regions of `mem_mib` MiB: base memory below the EBDA, the
/// EBDA (MP table) reserved, and RAM from 1 MiB around the 32-bit MMIO hole.
pub fn e820_map(mem_mib: u64) -> Vec<boot_e820_entry> {
    let size = mem_mib << 20;
    let entry = |addr: u64, end: u64, kind: u32| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, MPTABLE_START, E820_RAM),
        entry(MPTABLE_START, EBDA_END, E820_RESERVED),
        entry(HIGH_MEMORY, size.min(MMIO_HOLE_START), E820_RAM),
    ];
    if size > MMIO_HOLE_START {
        map.push(entry(
            MMIO_HOLE_END,
            MMIO_HOLE_END + size - MMIO_HOLE_START,
            E820_RAM,
        ));
    }
    map
}

/// Builds the zero page for `kernel`, the command line of `cmdline_len` bytes (NUL included)
/// at [`CMDLINE`], an optional initrd, and `mem_mib` MiB of RAM.
pub fn build(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
    mem_mib: u64,
) -> Result<boot_params, ZeroPageError> {
    let mut params = boot_params {
        hdr: kernel.setup_header.unwrap_or(setup_header {
            boot_flag: BOOT_FLAG,
            header: HDR_MAGIC,
            version: BOOT_PROTOCOL,
            kernel_alignment: 0x0100_0000,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    // heap_end_ptr is relative to the real-mode code; 0xfe00 is the customary value (boot.rst).
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    let map = e820_map(mem_mib);
    if map.len() > params.e820_table.len() {
        return Err(ZeroPageError::TooManyE820(map.len()));
    }
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page to [`ZERO_PAGE`].
pub fn write(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), ZeroPageError> {
    let bytes = pod_bytes(params);
    mem.write_slice(bytes, GuestAddress(ZERO_PAGE))
        .map_err(ZeroPageError::Write)
}

fn pod_bytes(params: &boot_params) -> &[u8] {
    // SAFETY: boot_params is a #[repr(C, packed)] bindgen struct of integers and arrays of
    // integers: every byte is initialised and any byte pattern is valid to read.
    unsafe {
        std::slice::from_raw_parts(
            (params as *const boot_params).cast::<u8>(),
            std::mem::size_of::<boot_params>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            entry: 0x100000,
            end: 0x200000,
            setup_header: None,
            is_linux: false,
        }
    }

    #[test]
    fn layout_matches_the_boot_protocol() {
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
        let p = build(&elf_kernel(), 10, None, 256).unwrap();
        let b = pod_bytes(&p);
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        assert_eq!(b[0x1e8], 3, "e820_entries");
        assert_eq!(u16::from_le_bytes([b[0x1fe], b[0x1ff]]), BOOT_FLAG);
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(b[0x210], LOADER_UNDEFINED);
        assert_eq!(
            u32::from_le_bytes(b[0x228..0x22c].try_into().unwrap()),
            CMDLINE as u32
        );
        assert_eq!(
            u32::from_le_bytes(b[0x238..0x23c].try_into().unwrap()),
            10,
            "cmdline_size"
        );
        // First e820 entry at 0x2d0: addr 0, size = MPTABLE_START, type RAM.
        assert_eq!(
            u64::from_le_bytes(b[0x2d8..0x2e0].try_into().unwrap()),
            MPTABLE_START
        );
        assert_eq!(
            u32::from_le_bytes(b[0x2e0..0x2e4].try_into().unwrap()),
            E820_RAM
        );
    }

    #[test]
    fn initrd_is_recorded_in_both_halves() {
        let initrd = LoadedInitrd {
            addr: 0x0fff_0000,
            size: 0x1234,
        };
        let p = build(&elf_kernel(), 1, Some(initrd), 256).unwrap();
        let (img, size, ext) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size, p.ext_ramdisk_image);
        assert_eq!((img, size, ext), (0x0fff_0000, 0x1234, 0));
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_mp_table() {
        let m = e820_map(256);
        assert_eq!(m.len(), 3);
        let (a, s, t) = (m[1].addr, m[1].size, m[1].r#type);
        assert_eq!(
            (a, s, t),
            (MPTABLE_START, EBDA_END - MPTABLE_START, E820_RESERVED)
        );
        let (a, s) = (m[2].addr, m[2].size);
        assert_eq!((a, a + s), (HIGH_MEMORY, 256 << 20));
        let big = e820_map(4096);
        let ram: u64 = big
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4096 << 20) - (HIGH_MEMORY - MPTABLE_START));
        let (a, s) = (big[3].addr, big[3].size);
        assert_eq!(
            (a, a + s),
            (
                MMIO_HOLE_END,
                MMIO_HOLE_END + (4096 << 20) - MMIO_HOLE_START
            )
        );
    }

    #[test]
    fn bzimage_header_is_kept() {
        let hdr = setup_header {
            version: 0x020f,
            setup_sects: 27,
            header: HDR_MAGIC,
            ..Default::default()
        };
        let k = LoadedKernel {
            setup_header: Some(hdr),
            ..elf_kernel()
        };
        let p = build(&k, 1, None, 256).unwrap();
        assert_eq!(p.hdr.setup_sects, 27);
        assert_eq!(p.hdr.type_of_loader, LOADER_UNDEFINED);
    }
}
