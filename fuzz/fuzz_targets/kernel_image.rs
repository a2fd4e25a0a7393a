//! Any bytes as `--kernel`: ibsvm's loader (format detection, the header and layout checks,
//! then linux-loader) must answer with a kernel inside guest RAM above 1 MiB, or an error;
//! never a panic, never a write outside guest memory.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ibsvm::boot::kernel::load_kernel;
use ibsvm::layout::HIGH_MEMORY;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM of the fuzzed VM: small, so that "past RAM" cases are reached.
const RAM: u64 = 64 << 20;

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory")
    })
}

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("ibsvm-fuzz-kernel-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(scratch(), data).expect("scratch file");
    if let Ok(kernel) = load_kernel(memory(), scratch(), RAM) {
        assert!(kernel.entry >= HIGH_MEMORY, "entry {:#x}", kernel.entry);
        assert!(kernel.end <= RAM, "end {:#x}", kernel.end);
    }
});
