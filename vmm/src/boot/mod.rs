//! Boot: everything written into guest memory before the first vCPU runs, in order —
//! kernel, initramfs, command line, zero page with e820, MP table, GDT and page tables.

pub(crate) mod cpu;
pub(crate) mod image_check;
pub mod kernel;
pub(crate) mod mptable;
pub(crate) mod zero_page;

use std::path::PathBuf;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{CMDLINE, CMDLINE_MAX, MMIO_HOLE_START};
pub use kernel::LoadedKernel;

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Command line given by the user (`None`: the default for the kernel's kind).
    pub cmdline: Option<String>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPU count.
    pub cpus: u8,
}

/// Errors preparing guest memory for boot.
#[derive(Debug, Error)]
pub enum BootError {
    /// Kernel or initrd loading.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    /// The command line is too long or has a NUL.
    #[error("kernel command line is {len} bytes; the limit is {max} (with what ibsvm appends)", max = CMDLINE_MAX - 1)]
    CmdlineTooLong {
        /// Its length.
        len: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Writing the command line failed.
    #[error("cannot write the command line at {CMDLINE:#x}: {0}")]
    CmdlineWrite(vm_memory::GuestMemoryError),
    /// Zero page.
    #[error(transparent)]
    ZeroPage(#[from] zero_page::ZeroPageError),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// GDT / page tables.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuSetupError),
}

/// Loads the kernel (first, so callers can decide on command-line additions from what it is).
pub fn load_kernel(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<LoadedKernel, BootError> {
    Ok(kernel::load_kernel(
        mem,
        &spec.kernel,
        low_ram_end(spec.memory_mib),
    )?)
}

fn low_ram_end(memory_mib: u64) -> u64 {
    (memory_mib << 20).min(MMIO_HOLE_START)
}

/// Writes everything else the kernel needs, with `cmdline` as the final command line.
pub fn write_boot_data(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<(), BootError> {
    let initrd = match &spec.initrd {
        Some(path) => Some(kernel::load_initrd(
            mem,
            path,
            kernel.end,
            low_ram_end(spec.memory_mib),
        )?),
        None => None,
    };
    let len = write_cmdline(mem, cmdline)?;
    let params = zero_page::build(kernel, len, initrd, spec.memory_mib)?;
    zero_page::write(mem, &params)?;
    mptable::write(mem, spec.cpus)?;
    cpu::write_boot_tables(mem)?;
    Ok(())
}

/// Checks a command line and returns its size with the NUL.
pub fn check_cmdline(cmdline: &str) -> Result<usize, BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let len = cmdline.len() + 1;
    if len > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong { len: cmdline.len() });
    }
    Ok(len)
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let len = check_cmdline(cmdline)?;
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE))
        .map_err(BootError::CmdlineWrite)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_limits() {
        assert_eq!(check_cmdline("console=ttyS0").unwrap(), 14);
        assert!(check_cmdline(&"x".repeat(CMDLINE_MAX - 1)).is_ok());
        assert!(matches!(
            check_cmdline(&"x".repeat(CMDLINE_MAX)),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(check_cmdline("a\0b"), Err(BootError::CmdlineNul)));
    }
}
