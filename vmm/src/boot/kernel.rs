//! Loading a kernel image (ELF vmlinux or bzImage) and an initramfs into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::image_check::{self, BzImageSizes, ImageFault};
use crate::layout::{HIGH_MEMORY, MMIO_HOLE_START};

/// What kind of kernel image a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// An ELF64 executable (a Linux `vmlinux` or a small test kernel).
    Elf,
    /// A Linux bzImage (boot protocol ≥ 2.00, "HdrS" at offset 0x202).
    BzImage,
}

/// Errors loading the kernel or the initramfs; each names the file.
#[derive(Debug, Error)]
pub enum KernelError {
    /// The file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A FIFO, socket, device or directory: its size is unknown and reading it may block.
    #[error("{what} {path}: not a regular file ({kind}); give a file")]
    NotRegularFile {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The image's headers describe something that cannot be loaded or entered.
    #[error("{path}: {fault}")]
    BadImage {
        /// The file.
        path: PathBuf,
        /// The field at fault, and why.
        fault: ImageFault,
    },
    /// Neither an ELF nor a bzImage.
    #[error("{0}: not a kernel image (neither ELF nor bzImage)")]
    UnknownFormat(PathBuf),
    /// An ELF file that is not a little-endian x86-64 executable.
    #[error("{path}: unsupported ELF: {why}")]
    UnsupportedElf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A bzImage that cannot be entered through the 64-bit boot protocol.
    #[error("{path}: bzImage cannot be booted: {why}")]
    UnsupportedBzImage {
        /// The file.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
    /// linux-loader rejected the image (truncated, bad headers, does not fit in RAM).
    #[error("{path}: cannot load {format:?} image: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Its format.
        format: ImageFormat,
        /// What linux-loader said.
        source: linux_loader::loader::Error,
    },
    /// The kernel would overlap the boot structures below 1 MiB or end past RAM.
    #[error("{path}: kernel occupies {start:#x}..{end:#x}, outside guest RAM 0x100000..{ram_end:#x} (try a larger --memory)")]
    KernelOutsideRam {
        /// The file.
        path: PathBuf,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel (ends at {kernel_end:#x}, RAM ends at {ram_end:#x}); use a larger --memory")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// End of the kernel image.
        kernel_end: u64,
        /// End of the RAM usable for the initrd.
        ram_end: u64,
    },
    /// Writing the initramfs into guest memory failed.
    #[error("cannot copy initrd {path} into guest memory: {source}")]
    InitrdCopy {
        /// The file.
        path: PathBuf,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
}

/// A kernel in guest memory, ready to be entered.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Guest-physical 64-bit entry point.
    pub entry: u64,
    /// One past the last byte the kernel occupies.
    pub end: u64,
    /// The bzImage setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
    /// Whether the image is a Linux kernel (bzImage, or an ELF carrying Linux/Xen notes).
    pub is_linux: bool,
}

/// The initramfs in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest-physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Opens the `what` file at `path` for reading, refusing anything but a regular file.
///
/// Opened non-blocking, so a FIFO with no writer is refused instead of blocking `open`
/// (fifo(7)); O_NONBLOCK does not change reads of a regular file.
fn open_regular(what: &'static str, path: &Path) -> Result<File, KernelError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err(what, path))?;
    let kind = file.metadata().map_err(io_err(what, path))?.file_type();
    let not = |kind| {
        Err(KernelError::NotRegularFile {
            what,
            path: path.to_owned(),
            kind,
        })
    };
    match kind {
        k if k.is_file() => Ok(file),
        k if k.is_dir() => not("a directory"),
        k if k.is_fifo() => not("a FIFO or pipe"),
        k if k.is_char_device() => not("a character device"),
        k if k.is_block_device() => not("a block device"),
        k if k.is_socket() => not("a socket"),
        _ => not("not a file"),
    }
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> KernelError + 'a {
    move |source| KernelError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Recognises the format from the first bytes of the file.
pub fn detect_format(head: &[u8]) -> Option<ImageFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(ImageFormat::Elf);
    }
    // Linux boot protocol: "HdrS" magic at offset 0x202 (Documentation/arch/x86/boot.rst).
    if head.get(0x202..0x206) == Some(b"HdrS") {
        return Some(ImageFormat::BzImage);
    }
    None
}

/// Owners of the ELF notes every x86 vmlinux carries (include/linux/elfnote.h: "Linux"
/// for the build salt, "Xen" for the PVH entry point).
const LINUX_NOTE_OWNERS: [&[u8]; 2] = [b"Linux", b"Xen"];

/// Whether any PT_NOTE segment of the ELF file holds a note owned by "Linux" or "Xen".
fn elf_has_linux_notes<F: Read + Seek>(file: &mut F, head: &[u8]) -> std::io::Result<bool> {
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]) as u64;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let (phoff, phentsize, phnum) = (u64_at(head, 32), u16_at(54), u16_at(56));
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * phentsize))?;
        file.read_exact(&mut ph)?;
        // Elf64_Phdr: p_type at 0 (PT_NOTE = 4), p_offset at 8, p_filesz at 32.
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != 4 {
            continue;
        }
        let size = u64_at(&ph, 32).min(1 << 20);
        let mut notes = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(u64_at(&ph, 8)))?;
        file.read_exact(&mut notes)?;
        if note_owners(&notes).any(|owner| LINUX_NOTE_OWNERS.contains(&owner)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The owner names of the notes in a PT_NOTE segment (Elf64_Nhdr: namesz, descsz, type,
/// then name and desc, each padded to 4 bytes).
fn note_owners(mut notes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let word = |o: usize| {
            notes
                .get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let (namesz, descsz) = (word(0)?, word(4)?);
        let name = notes.get(12..12 + namesz)?;
        let next = 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        notes = notes.get(next..).unwrap_or(&[]);
        Some(name.strip_suffix(b"\0").unwrap_or(name))
    })
}

/// ELF header checks linux-loader does not make: 64-bit, little-endian, x86-64, executable.
fn check_elf_header(path: &Path, head: &[u8]) -> Result<(), KernelError> {
    let bad = |why| {
        Err(KernelError::UnsupportedElf {
            path: path.to_owned(),
            why,
        })
    };
    if head.len() < 64 {
        return bad("truncated ELF header");
    }
    if head[4] != 2 {
        return bad("not a 64-bit ELF (EI_CLASS != ELFCLASS64)");
    }
    if head[5] != 1 {
        return bad("not little-endian (EI_DATA != ELFDATA2LSB)");
    }
    if u16::from_le_bytes([head[16], head[17]]) != 2 {
        return bad("not an executable (e_type != ET_EXEC)");
    }
    if u16::from_le_bytes([head[18], head[19]]) != 62 {
        return bad("not an x86-64 ELF (e_machine != EM_X86_64)");
    }
    Ok(())
}

/// Checks the bzImage can be entered in long mode (boot protocol 2.12+: xloadflags XLF_KERNEL_64).
fn check_bzimage_header(path: &Path, hdr: &setup_header) -> Result<(), KernelError> {
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < 0x020c {
        return Err(KernelError::UnsupportedBzImage {
            path: path.to_owned(),
            why: format!("boot protocol {version:#06x} is older than 2.12 (no 64-bit entry)"),
        });
    }
    // xloadflags bit 0 XLF_KERNEL_64: the kernel has the legacy 64-bit entry at +0x200.
    if xloadflags & 1 == 0 {
        return Err(KernelError::UnsupportedBzImage {
            path: path.to_owned(),
            why: "xloadflags lacks XLF_KERNEL_64 (no 64-bit entry point)".into(),
        });
    }
    Ok(())
}

/// Loads the kernel at `path` into `mem`, whose low RAM ends at `ram_end`.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    ram_end: u64,
) -> Result<LoadedKernel, KernelError> {
    let mut file = open_regular("kernel", path)?;
    let mut head = Vec::with_capacity(4096);
    (&mut file)
        .take(4096)
        .read_to_end(&mut head)
        .map_err(io_err("kernel", path))?;
    let format = detect_format(&head).ok_or_else(|| KernelError::UnknownFormat(path.to_owned()))?;
    let load_err = |source| KernelError::Load {
        path: path.to_owned(),
        format,
        source,
    };
    file.seek(SeekFrom::Start(0))
        .map_err(io_err("kernel", path))?;
    let file_len = file.metadata().map_err(io_err("kernel", path))?.len();
    let bad_image = |fault| KernelError::BadImage {
        path: path.to_owned(),
        fault,
    };
    let loaded = match format {
        ImageFormat::Elf => {
            check_elf_header(path, &head)?;
            let header = image_check::elf_header(&head).map_err(bad_image)?;
            let (at, len) =
                image_check::program_headers_span(&header, file_len).map_err(bad_image)?;
            let mut table = vec![0u8; len];
            file.read_exact_at(&mut table, at)
                .map_err(io_err("kernel", path))?;
            image_check::check_elf_segments(&header, &table, file_len, HIGH_MEMORY, ram_end)
                .map_err(bad_image)?;
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY)))
                .map_err(load_err)?;
            LoadedKernel {
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
                is_linux: elf_has_linux_notes(&mut file, &head).map_err(io_err("kernel", path))?,
            }
        }
        ImageFormat::BzImage => {
            // Boot protocol offsets (boot.rst): setup_sects 0x1f1, syssize 0x1f4,
            // init_size 0x260; `head` holds the first 4 KiB (detect_format saw "HdrS").
            let u32_at = |at: usize| {
                head.get(at..at + 4)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            };
            let sizes = BzImageSizes {
                setup_sects: head.get(0x1f1).copied().unwrap_or(0),
                syssize: u32_at(0x1f4),
                init_size: u32_at(0x260),
            };
            image_check::check_bzimage_sizes(sizes, file_len).map_err(bad_image)?;
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY)))
                .map_err(load_err)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| KernelError::UnsupportedBzImage {
                    path: path.to_owned(),
                    why: "no setup header".into(),
                })?;
            check_bzimage_header(path, &hdr)?;
            // The 64-bit entry is 0x200 past the protected-mode code (boot.rst "64-bit boot
            // protocol"); the kernel needs init_size bytes from its load address before it
            // reads the memory map (boot.rst, "init_size"): nothing else may go there.
            let init_end = r.kernel_load.0 + u64::from(hdr.init_size);
            LoadedKernel {
                entry: r.kernel_load.0 + 0x200,
                end: r.kernel_end.max(init_end),
                setup_header: Some(hdr),
                is_linux: true,
            }
        }
    };
    if loaded.end > ram_end || loaded.entry < HIGH_MEMORY {
        return Err(KernelError::KernelOutsideRam {
            path: path.to_owned(),
            start: loaded.entry,
            end: loaded.end,
            ram_end,
        });
    }
    Ok(loaded)
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible below `ram_end`
/// (and below the 32-bit MMIO hole), never overlapping the kernel.
pub fn initrd_placement(size: u64, kernel_end: u64, ram_end: u64) -> Option<u64> {
    let top = ram_end.min(MMIO_HOLE_START);
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= kernel_end.next_multiple_of(0x1000)).then_some(addr)
}

/// Copies the initramfs at `path` into guest memory above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    ram_end: u64,
) -> Result<LoadedInitrd, KernelError> {
    let mut file = open_regular("initrd", path)?;
    let size = file.metadata().map_err(io_err("initrd", path))?.len();
    let addr =
        initrd_placement(size, kernel_end, ram_end).ok_or_else(|| KernelError::InitrdTooLarge {
            path: path.to_owned(),
            size,
            kernel_end,
            ram_end,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| KernelError::InitrdCopy {
            path: path.to_owned(),
            source,
        })?;
    debug_assert!(mem.address_in_range(GuestAddress(addr + size.saturating_sub(1))));
    Ok(LoadedInitrd { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_opened() {
        let dir = std::env::temp_dir().join(format!("ibsvm-kernel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path `c`, which lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, kind) in [
            (fifo.as_path(), "a FIFO or pipe"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.as_path(), "a directory"),
        ] {
            match open_regular("initrd", path) {
                Err(KernelError::NotRegularFile { kind: k, .. }) => assert_eq!(k, kind),
                other => panic!("{path:?}: {other:?}"),
            }
        }
        let file = dir.join("file");
        std::fs::write(&file, b"data").unwrap();
        assert!(open_regular("kernel", &file).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn formats_are_recognised_by_magic() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(ImageFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(ImageFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_format(b""), None);
    }

    #[test]
    fn elf_header_checks_name_the_problem() {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 1;
        let e = check_elf_header(Path::new("k"), &h)
            .unwrap_err()
            .to_string();
        assert!(e.contains("64-bit"), "{e}");
        h[4] = 2;
        h[5] = 1;
        h[16] = 2;
        h[18] = 3; // EM_386
        let e = check_elf_header(Path::new("k"), &h)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x86-64"), "{e}");
        h[18] = 62;
        assert!(check_elf_header(Path::new("k"), &h).is_ok());
        assert!(check_elf_header(Path::new("k"), &h[..40]).is_err());
    }

    #[test]
    fn old_bzimages_are_refused() {
        let mut hdr = setup_header {
            version: 0x020b,
            xloadflags: 1,
            ..Default::default()
        };
        assert!(check_bzimage_header(Path::new("bz"), &hdr).is_err());
        hdr.version = 0x020f;
        hdr.xloadflags = 0;
        assert!(check_bzimage_header(Path::new("bz"), &hdr).is_err());
        hdr.xloadflags = 1;
        assert!(check_bzimage_header(Path::new("bz"), &hdr).is_ok());
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let ram = 256 << 20;
        assert_eq!(initrd_placement(0x1800, 0x20_0000, ram), Some(ram - 0x2000));
        assert_eq!(initrd_placement(ram, 0x20_0000, ram), None);
        // Never above the MMIO hole, even with lots of RAM.
        let big = 8u64 << 30;
        assert_eq!(
            initrd_placement(0x1000, 0x20_0000, big),
            Some(MMIO_HOLE_START - 0x1000)
        );
    }

    fn note(owner: &[u8], desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(owner.len() as u32 + 1).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&18u32.to_le_bytes());
        n.extend_from_slice(owner);
        n.push(0);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn note_owners_are_walked() {
        let mut notes = note(b"GNU", &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen", &[0; 8]));
        let owners: Vec<_> = note_owners(&notes).collect();
        assert_eq!(owners, vec![&b"GNU"[..], &b"Xen"[..]]);
        // Truncated notes end the walk instead of reading past the end.
        assert_eq!(note_owners(&notes[..10]).count(), 0);
    }
}
