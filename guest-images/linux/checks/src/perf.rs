//! The `perf_event_open` system call and what goes with it: the ABI constants and
//! `struct perf_event_attr` of include/uapi/linux/perf_event.h, opening an event,
//! the enable/disable ioctls, and the sysctl that lifts perf's interrupt-time limit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// ---- include/uapi/linux/perf_event.h ----

/// `enum perf_type_id`: PERF_TYPE_SOFTWARE.
pub const PERF_TYPE_SOFTWARE: u32 = 1;
/// `enum perf_event_sample_format`: PERF_SAMPLE_IP.
pub const PERF_SAMPLE_IP: u64 = 1 << 0;
/// PERF_SAMPLE_TID.
pub const PERF_SAMPLE_TID: u64 = 1 << 1;
/// PERF_SAMPLE_RAW.
pub const PERF_SAMPLE_RAW: u64 = 1 << 10;
/// PERF_ATTR_SIZE_VER7 (up to `sig_data`, Linux 5.13+).
pub const PERF_ATTR_SIZE_VER7: u32 = 128;
/// Bit 0 of the attr's bit-field word: `disabled`.
pub const ATTR_FLAG_DISABLED: u64 = 1 << 0;
/// Bit 5 of the bit-field word: `exclude_kernel`.
pub const ATTR_FLAG_EXCLUDE_KERNEL: u64 = 1 << 5;
/// PERF_FLAG_FD_CLOEXEC (`perf_event_open` flags).
pub const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// PERF_EVENT_IOC_ENABLE = `_IO('$', 0)`.
pub const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// PERF_EVENT_IOC_DISABLE = `_IO('$', 1)`.
pub const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;

/// `struct perf_event_attr` up to `sig_data` (PERF_ATTR_SIZE_VER7, Linux 5.13+).
/// The bit-field word (`disabled`, `inherit`, ... ) is `flags`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PerfEventAttr {
    pub type_: u32,
    pub size: u32,
    pub config: u64,
    pub sample_period: u64,
    pub sample_type: u64,
    pub read_format: u64,
    pub flags: u64,
    pub wakeup_events: u32,
    pub bp_type: u32,
    pub config1: u64,
    pub config2: u64,
    pub branch_sample_type: u64,
    pub sample_regs_user: u64,
    pub sample_stack_user: u32,
    pub clockid: i32,
    pub sample_regs_intr: u64,
    pub aux_watermark: u32,
    pub sample_max_stack: u16,
    pub reserved_2: u16,
    pub aux_sample_size: u32,
    pub reserved_3: u32,
    pub sig_data: u64,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == PERF_ATTR_SIZE_VER7 as usize);

/// `perf_event_open(attr, pid, cpu, group_fd = -1, PERF_FLAG_FD_CLOEXEC)`.
pub fn open(attr: &PerfEventAttr, pid: libc::pid_t, cpu: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: attr points to a valid, fully initialised perf_event_attr whose size
    // field matches its size; group_fd -1; the kernel only reads it (it may write
    // `size` back on E2BIG, which the struct has room for).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr as *const PerfEventAttr,
            pid,
            cpu,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// What a `perf_event_open` error usually means; `mode` is `"per-task"` or `"cpu"`.
pub fn errno_hint(e: &std::io::Error, mode: &str) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EINVAL) if mode == "per-task" => {
            " (Linux before 6.2 has CPU-wide IBS events only: IBS_CHECK_MODE=cpu)"
        }
        Some(libc::EINVAL) => " (attr rejected: period, config or exclude bits)",
        Some(libc::ENOENT) => " (no such PMU type)",
        Some(libc::EACCES) | Some(libc::EPERM) => " (CPU-wide events need root or CAP_PERFMON)",
        Some(libc::ENODEV) | Some(libc::EOPNOTSUPP) => " (PMU does not support this event)",
        _ => "",
    }
}

/// An argument-less perf ioctl (`req`, named `what` in the error).
pub fn ioctl(fd: &OwnedFd, req: libc::c_ulong, what: &str) -> Result<(), String> {
    // SAFETY: ENABLE/DISABLE take an integer argument (0: this event only).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, 0 as libc::c_ulong) };
    if r != 0 {
        return Err(format!("ioctl {what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// PERF_EVENT_IOC_ENABLE.
pub fn enable(fd: &OwnedFd) -> Result<(), String> {
    ioctl(fd, PERF_EVENT_IOC_ENABLE, "PERF_EVENT_IOC_ENABLE")
}

/// PERF_EVENT_IOC_DISABLE.
pub fn disable(fd: &OwnedFd) -> Result<(), String> {
    ioctl(fd, PERF_EVENT_IOC_DISABLE, "PERF_EVENT_IOC_DISABLE")
}

/// Sets `kernel.perf_cpu_time_max_percent` to 0, which turns off perf's
/// interrupt-time limit (Documentation/admin-guide/sysctl/kernel.rst).
///
/// Every guest kernel instruction is emulated on some hosts (an NMI handler then
/// takes milliseconds): with the limit, perf lowers the sample rate and throttles an
/// event within a few samples.
pub fn lift_interrupt_time_limit() -> std::io::Result<()> {
    std::fs::write("/proc/sys/kernel/perf_cpu_time_max_percent", "0\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layout() {
        let a = PerfEventAttr::default();
        assert_eq!(std::mem::size_of_val(&a), 128);
        let p = &a as *const PerfEventAttr as usize;
        assert_eq!(&a.flags as *const u64 as usize - p, 40);
        assert_eq!(&a.config1 as *const u64 as usize - p, 56);
        assert_eq!(&a.sample_regs_intr as *const u64 as usize - p, 96);
        assert_eq!(&a.sig_data as *const u64 as usize - p, 120);
    }

    /// The ioctl numbers are `_IO('$', n)`: type byte 0x24 in bits 8..16, no size,
    /// no direction (include/uapi/asm-generic/ioctl.h).
    #[test]
    fn ioctl_numbers() {
        assert_eq!(PERF_EVENT_IOC_ENABLE, (b'$' as libc::c_ulong) << 8);
        assert_eq!(PERF_EVENT_IOC_DISABLE, ((b'$' as libc::c_ulong) << 8) | 1);
    }
}
