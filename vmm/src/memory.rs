//! Guest RAM: allocation and the regions it is split into around the 32-bit MMIO hole.

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Smallest guest we build (room for the boot structures and a tiny kernel).
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest we build; the boot identity map and e820 handling are tested to here.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;

/// Errors creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The requested size is outside what ibsvm supports.
    #[error("--memory {0} MiB is out of range ({MIN_MEMORY_MIB}..={MAX_MEMORY_MIB})")]
    OutOfRange(u64),
    /// The host refused the mapping.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Mmap {
        /// Requested size.
        mib: u64,
        /// What mmap said.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest RAM regions (start, length) for `mib` MiB: below the MMIO hole, then above 4 GiB.
pub fn ram_regions(mib: u64) -> Vec<(GuestAddress, usize)> {
    let size = mib << 20;
    let below = size.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), below as usize)];
    if size > below {
        regions.push((GuestAddress(MMIO_HOLE_END), (size - below) as usize));
    }
    regions
}

/// Allocates `mib` MiB of anonymous guest memory.
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(MemoryError::OutOfRange(mib));
    }
    GuestMemoryMmap::from_ranges(&ram_regions(mib))
        .map_err(|source| MemoryError::Mmap { mib, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(256), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_regions(4096);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(MMIO_HOLE_END),
                (4096usize << 20) - MMIO_HOLE_START as usize
            )
        );
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        assert!(matches!(create(1), Err(MemoryError::OutOfRange(1))));
        assert!(matches!(
            create(MAX_MEMORY_MIB + 1),
            Err(MemoryError::OutOfRange(_))
        ));
    }
}
