//! Checks of a kernel image's layout before anything is loaded: what linux-loader takes on
//! trust (segment sizes and places, the bzImage's payload) would otherwise end as a guest
//! that crashes minutes later, or runs zeroed RAM.
//!
//! ELF: the program headers (System V gABI, "Program Header"; goblin parses them).
//! bzImage: the setup header (Documentation/arch/x86/boot.rst, "The Real-Mode Kernel
//! Header").

use std::fmt;

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::program_header::{ProgramHeader, PF_X, PT_LOAD};
use goblin::elf64::header::Header;

/// What is wrong with an image: the field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFault {
    /// The header field or segment at fault.
    pub field: String,
    /// What is wrong with it.
    pub why: String,
}

impl fmt::Display for ImageFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.why)
    }
}

fn fault(field: impl Into<String>, why: impl Into<String>) -> ImageFault {
    ImageFault {
        field: field.into(),
        why: why.into(),
    }
}

/// The ELF header of a 64-bit little-endian image, from its first bytes.
pub fn elf_header(head: &[u8]) -> Result<Header, ImageFault> {
    Header::parse(head).map_err(|e| fault("ELF header", e.to_string()))
}

/// Where the program header table of a file of `file_len` bytes lies in it: (offset,
/// length in bytes), checked to be 64-bit program headers inside the file (so that no
/// header field can make ibsvm read, or allocate, more than the file holds).
pub fn program_headers_span(header: &Header, file_len: u64) -> Result<(u64, usize), ImageFault> {
    let entry = ProgramHeader::size(Ctx::new(Container::Big, Endian::Little));
    if usize::from(header.e_phentsize) != entry {
        return Err(fault(
            "e_phentsize",
            format!(
                "{} is not the size of a 64-bit program header",
                header.e_phentsize
            ),
        ));
    }
    let len = usize::from(header.e_phnum) * entry;
    match header.e_phoff.checked_add(len as u64) {
        Some(end) if end <= file_len => Ok((header.e_phoff, len)),
        _ => Err(fault(
            "e_phoff",
            format!(
                "the program header table ({len:#x} bytes at {:#x}) runs past the end of the file ({file_len:#x} bytes)",
                header.e_phoff
            ),
        )),
    }
}

/// Checks the loadable segments whose 64-bit program header table is `table` (read from
/// the file at [`program_headers_span`]) against a file of `file_len` bytes and guest RAM
/// `[ram_start, ram_end)`: each PT_LOAD's bytes in the file, `p_filesz <= p_memsz`, its
/// memory inside RAM and over no other, and the entry point in an executable one.
pub fn check_elf_segments(
    header: &Header,
    table: &[u8],
    file_len: u64,
    ram_start: u64,
    ram_end: u64,
) -> Result<(), ImageFault> {
    let ctx = Ctx::new(Container::Big, Endian::Little);
    let phdrs = ProgramHeader::parse(table, 0, usize::from(header.e_phnum), ctx)
        .map_err(|e| fault("program header table", e.to_string()))?;
    let loads: Vec<(usize, &ProgramHeader)> = phdrs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.p_type == PT_LOAD)
        .collect();
    if loads.is_empty() {
        return Err(fault(
            "program headers",
            "no PT_LOAD segment: nothing to load",
        ));
    }
    let mut spans: Vec<(u64, u64, usize)> = Vec::with_capacity(loads.len());
    for &(i, p) in &loads {
        let name = format!("program header {i} (PT_LOAD)");
        if p.p_filesz > p.p_memsz {
            return Err(fault(
                name,
                format!("p_filesz {:#x} > p_memsz {:#x}", p.p_filesz, p.p_memsz),
            ));
        }
        let file_end = p.p_offset.checked_add(p.p_filesz);
        if file_end.map_or(true, |end| end > file_len) {
            return Err(fault(
                name,
                format!(
                    "file bytes {:#x}+{:#x} run past the end of the file ({file_len:#x} bytes): truncated?",
                    p.p_offset, p.p_filesz
                ),
            ));
        }
        let start = p.p_paddr;
        let end = start.checked_add(p.p_memsz);
        match end {
            Some(end) if start >= ram_start && end <= ram_end => spans.push((start, end, i)),
            _ if start < ram_start => {
                return Err(fault(
                    name,
                    format!("p_paddr {start:#x} is below {ram_start:#x}, over the boot structures"),
                ))
            }
            _ => {
                return Err(fault(
                    name,
                    format!(
                    "p_paddr {start:#x}+{:#x} is outside guest RAM {ram_start:#x}..{ram_end:#x} \
                         (try a larger --memory)",
                    p.p_memsz
                ),
                ))
            }
        }
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, a_end, a), (b_start, _, b)) = (pair[0], pair[1]);
        if b_start < a_end {
            return Err(fault(
                format!("program headers {a} and {b}"),
                "PT_LOAD segments overlap in memory",
            ));
        }
    }
    let entry = header.e_entry;
    let in_code = loads
        .iter()
        .any(|(_, p)| p.p_flags & PF_X != 0 && (p.p_paddr..p.p_paddr + p.p_memsz).contains(&entry));
    if !in_code {
        return Err(fault(
            "e_entry",
            format!("{entry:#x} is in no executable PT_LOAD segment"),
        ));
    }
    Ok(())
}

/// Boot protocol fields of a bzImage that say how big it is.
#[derive(Debug, Clone, Copy)]
pub struct BzImageSizes {
    /// `setup_sects` (0 means 4, boot.rst).
    pub setup_sects: u8,
    /// `syssize`: the protected-mode code, in 16-byte paragraphs.
    pub syssize: u32,
    /// `init_size`: the memory the kernel needs from its load address.
    pub init_size: u32,
}

/// Checks that a bzImage of `file_len` bytes holds the setup sectors and the
/// protected-mode payload its header announces, and that it needs some memory to run.
pub fn check_bzimage_sizes(sizes: BzImageSizes, file_len: u64) -> Result<(), ImageFault> {
    let setup_sects = match sizes.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let payload_start = (setup_sects + 1) * 512;
    let payload_len = u64::from(sizes.syssize) * 16;
    if sizes.syssize == 0 {
        return Err(fault("syssize", "0: the image has no protected-mode code"));
    }
    if payload_start + payload_len > file_len {
        return Err(fault(
            "syssize",
            format!(
                "the header announces {payload_len:#x} bytes of protected-mode code after \
                 {payload_start:#x} bytes of setup, but the file has {file_len:#x} bytes: truncated?"
            ),
        ));
    }
    if u64::from(sizes.init_size) < payload_len {
        return Err(fault(
            "init_size",
            format!(
                "{:#x} is smaller than the protected-mode code ({payload_len:#x})",
                sizes.init_size
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A PT_LOAD: (p_flags, p_offset, p_paddr, p_filesz, p_memsz).
    type Load = (u32, u64, u64, u64, u64);

    /// A minimal ELF64 header and program header table with `segments` and `entry`.
    fn elf(entry: u64, segments: &[Load]) -> (Header, Vec<u8>) {
        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = 2; // ELFCLASS64
        head[5] = 1; // ELFDATA2LSB
        head[6] = 1; // EV_CURRENT
        head[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        head[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        head[20..24].copy_from_slice(&1u32.to_le_bytes());
        head[24..32].copy_from_slice(&entry.to_le_bytes());
        head[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        head[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        head[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        head[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut table = Vec::new();
        for &(flags, offset, paddr, filesz, memsz) in segments {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
            ph[4..8].copy_from_slice(&flags.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
            ph[24..32].copy_from_slice(&paddr.to_le_bytes());
            ph[32..40].copy_from_slice(&filesz.to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            table.extend_from_slice(&ph);
        }
        (elf_header(&head).unwrap(), table)
    }

    fn check(entry: u64, segments: &[Load]) -> Result<(), ImageFault> {
        let (h, t) = elf(entry, segments);
        let (_, len) = program_headers_span(&h, 0x10000)?;
        check_elf_segments(&h, &t[..len], 0x10000, MIB, 256 * MIB)
    }

    #[test]
    fn the_program_header_table_must_lie_in_the_file() {
        let (mut h, _) = elf(MIB, &[(RX, 0x1000, MIB, 0x100, 0x100)]);
        assert_eq!(program_headers_span(&h, 0x10000), Ok((64, 56)));
        h.e_phnum = u16::MAX; // 3.5 MiB of headers in a 64 KiB file
        assert_eq!(
            program_headers_span(&h, 0x10000).unwrap_err().field,
            "e_phoff"
        );
        h.e_phoff = u64::MAX;
        h.e_phnum = 1;
        assert_eq!(
            program_headers_span(&h, 0x10000).unwrap_err().field,
            "e_phoff"
        );
        h.e_phentsize = u16::MAX;
        assert_eq!(
            program_headers_span(&h, 0x10000).unwrap_err().field,
            "e_phentsize"
        );
    }

    const RX: u32 = 5; // PF_R | PF_X
    const RW: u32 = 6; // PF_R | PF_W

    #[test]
    fn a_sound_elf_passes() {
        check(
            MIB,
            &[
                (RX, 0x1000, MIB, 0x1000, 0x1000),
                (RW, 0x2000, 2 * MIB, 0x100, 0x8000),
            ],
        )
        .unwrap();
    }

    #[test]
    fn each_elf_fault_names_its_field() {
        let cases: &[(&str, u64, &[Load])] = &[
            ("program headers", MIB, &[]),
            (
                "program header 0",
                MIB,
                &[(RX, 0x1000, MIB, 0x2000, 0x1000)],
            ), // filesz > memsz
            (
                "program header 0",
                MIB,
                &[(RX, 0xf000, MIB, 0x2000, 0x2000)],
            ), // past EOF
            (
                "program header 0",
                0x7000,
                &[(RX, 0x1000, 0x7000, 0x100, 0x100)],
            ), // boot area
            (
                "program header 0",
                MIB,
                &[(RX, 0x1000, MIB, 0x100, 512 * MIB)],
            ), // past RAM
            (
                "program header 0",
                MIB,
                &[(RX, 0x1000, MIB, 0x100, u64::MAX)],
            ), // wraps
            (
                "program headers 0 and 1",
                MIB,
                &[
                    (RX, 0x1000, MIB, 0x100, 0x2000),
                    (RW, 0x2000, MIB + 0x1000, 0x100, 0x100),
                ],
            ),
            ("e_entry", 64 * MIB, &[(RX, 0x1000, MIB, 0x100, 0x100)]), // outside
            ("e_entry", MIB, &[(RW, 0x1000, MIB, 0x100, 0x100)]),      // not executable
        ];
        for (field, entry, segments) in cases {
            let err = check(*entry, segments).unwrap_err();
            assert!(err.field.starts_with(field), "{segments:x?}: {err}");
        }
    }

    #[test]
    fn bzimage_sizes_are_checked_against_the_file() {
        let sizes = BzImageSizes {
            setup_sects: 0,
            syssize: 0x100,
            init_size: 0x10000,
        };
        // 5 sectors of setup (0 means 4) and 0x1000 bytes of code.
        check_bzimage_sizes(sizes, 5 * 512 + 0x1000).unwrap();
        let no_code = BzImageSizes {
            syssize: 0,
            ..sizes
        };
        let small = BzImageSizes {
            init_size: 0x10,
            ..sizes
        };
        for (what, sizes, file_len, field) in [
            ("truncated", sizes, 5 * 512 + 0x800, "syssize"),
            ("setup only", sizes, 1024, "syssize"),
            ("no code", no_code, 1 << 20, "syssize"),
            ("init_size < code", small, 1 << 20, "init_size"),
        ] {
            let err = check_bzimage_sizes(sizes, file_len).unwrap_err();
            assert_eq!(err.field, field, "{what}: {err}");
        }
    }
}
