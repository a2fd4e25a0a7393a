//! How many times KVM left the guest during each `KVM_RUN`, counting the exits it handles
//! itself (local APIC and timer MSRs, nested page faults, interrupt windows, …) that never
//! reach ibsvm: the vCPU's `exits` counter in KVM's binary statistics.
//!
//! The synthetic IBS clock charges those exits' host work to nobody (see
//! `crate::ibs::guest_clock`); where exits are expensive (a nested host) a guest kernel's
//! timer tick alone would otherwise look like a long stretch of guest execution.
//!
//! The file layout is KVM's API (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD",
//! Linux 5.14+): a `kvm_stats_header` at offset 0; `num_desc` descriptors at
//! `desc_offset`, each a `kvm_stats_desc` followed by its `name_size`-byte name; the
//! values (`u64` each) at `data_offset` plus each descriptor's `offset`.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    kvm_stats_desc, kvm_stats_header, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_MASK,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

// KVMIO is 0xAE (include/uapi/linux/kvm.h: `#define KVM_GET_STATS_FD _IO(KVMIO, 0xce)`).
ioctl_io_nr!(KVM_GET_STATS_FD, 0xAE, 0xce);

/// The per-vCPU counter of every exit from the guest (arch/x86/kvm/x86.c,
/// `kvm_vcpu_stats_desc`: `STATS_DESC_COUNTER(VCPU, exits)`).
const EXITS: &str = "exits";

/// Why the exit counter is not available.
#[derive(Debug, Error)]
pub enum KvmExitsError {
    #[error("KVM_GET_STATS_FD: {0}")]
    Open(#[source] io::Error),
    #[error("reading KVM's vCPU statistics: {0}")]
    Read(#[source] io::Error),
    #[error("KVM's vCPU statistics have no cumulative `{EXITS}` counter")]
    NoExitsCounter,
}

/// A vCPU's KVM exit counter, read after each run.
#[derive(Debug)]
pub struct KvmExits {
    stats: File,
    /// Where the counter's value lies in `stats`.
    at: u64,
    last: u64,
}

impl KvmExits {
    /// Finds the `exits` counter of `vcpu`.
    pub fn open(vcpu: &VcpuFd) -> Result<Self, KvmExitsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file descriptor or
        // -1; `vcpu` is a valid vCPU fd for the duration of the call.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(KvmExitsError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by the kernel, is open, and nothing else owns it.
        let stats = unsafe { File::from_raw_fd(fd) };
        let at = find_counter(&stats, EXITS)?.ok_or(KvmExitsError::NoExitsCounter)?;
        let mut exits = Self { stats, at, last: 0 };
        exits.last = exits.read()?;
        Ok(exits)
    }

    fn read(&self) -> Result<u64, KvmExitsError> {
        let mut value = [0u8; 8];
        self.stats
            .read_exact_at(&mut value, self.at)
            .map_err(KvmExitsError::Read)?;
        Ok(u64::from_ne_bytes(value))
    }

    /// Exits since the last call (or since [`KvmExits::open`]).
    pub fn since_last(&mut self) -> Result<u64, KvmExitsError> {
        let now = self.read()?;
        let delta = now.wrapping_sub(self.last);
        self.last = now;
        Ok(delta)
    }
}

/// Reads a plain-old-data KVM struct at `offset`.
fn read_struct<T: Default>(file: &File, offset: u64) -> Result<T, KvmExitsError> {
    let mut value = T::default();
    // SAFETY: `T` is one of KVM's `repr(C)` integer-only structs, valid for any bytes; the
    // slice covers exactly `value`, which outlives it.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut((&mut value as *mut T).cast::<u8>(), size_of::<T>())
    };
    file.read_exact_at(bytes, offset)
        .map_err(KvmExitsError::Read)?;
    Ok(value)
}

/// The file offset of the value of the cumulative, single-valued counter `name`.
fn find_counter(stats: &File, name: &str) -> Result<Option<u64>, KvmExitsError> {
    let header: kvm_stats_header = read_struct(stats, 0)?;
    let desc_len = size_of::<kvm_stats_desc>() as u64 + u64::from(header.name_size);
    let mut name_buf = vec![0u8; header.name_size as usize];
    for i in 0..u64::from(header.num_desc) {
        let at = u64::from(header.desc_offset) + i * desc_len;
        let desc: kvm_stats_desc = read_struct(stats, at)?;
        stats
            .read_exact_at(&mut name_buf, at + size_of::<kvm_stats_desc>() as u64)
            .map_err(KvmExitsError::Read)?;
        let len = name_buf
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_buf.len());
        if &name_buf[..len] == name.as_bytes()
            && desc.flags & KVM_STATS_TYPE_MASK == KVM_STATS_TYPE_CUMULATIVE
            && desc.size == 1
        {
            return Ok(Some(u64::from(header.data_offset) + u64::from(desc.offset)));
        }
    }
    Ok(None)
}
