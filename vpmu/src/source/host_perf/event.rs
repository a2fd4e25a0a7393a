//! A perf event file descriptor and its mmapped ring: `perf_event_open(2)`, the
//! ENABLE / DISABLE / RESET / PERIOD ioctls, `mmap`, and close/unmap on drop.
//!
//! The only `unsafe` code of the crate lives here (system calls and the shared ring memory),
//! hence the module-level allow; every block states why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use super::attr::PerfEventAttr;
use super::detect::HostPerfError;
use super::ring::RingMemory;

/// `PERF_EVENT_IOC_ENABLE` = `_IO('$', 0)`.
const IOC_ENABLE: u64 = 0x2400;
/// `PERF_EVENT_IOC_DISABLE` = `_IO('$', 1)`.
const IOC_DISABLE: u64 = 0x2401;
/// `PERF_EVENT_IOC_RESET` = `_IO('$', 3)`.
const IOC_RESET: u64 = 0x2403;
/// `PERF_EVENT_IOC_PERIOD` = `_IOW('$', 4, __u64)` (x86 / generic ioctl encoding).
const IOC_PERIOD: u64 = 0x4008_2404;

/// `perf_event_open` flag `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

/// Offsets in `struct perf_event_mmap_page` (perf_event.h; the 1024-byte header then the ring
/// control words).
const MMAP_DATA_HEAD: usize = 1024;
const MMAP_DATA_TAIL: usize = 1032;
const MMAP_DATA_OFFSET: usize = 1040;
const MMAP_DATA_SIZE: usize = 1048;

/// One open perf event. Closed on drop.
#[derive(Debug)]
pub struct PerfEvent {
    fd: OwnedFd,
    what: String,
}

impl PerfEvent {
    /// `perf_event_open(attr, pid, cpu, group_fd = -1, PERF_FLAG_FD_CLOEXEC)`. `pid` 0 and
    /// `cpu` -1 is "the calling thread, on any CPU". `what` names the event in errors.
    /// EACCES/EPERM become [`HostPerfError::Permission`].
    pub fn open(
        attr: &PerfEventAttr,
        pid: i32,
        cpu: i32,
        what: &str,
    ) -> Result<PerfEvent, HostPerfError> {
        // SAFETY: perf_event_open reads `attr.size` (128) bytes from a valid, initialised
        // `PerfEventAttr` that outlives the call; the other arguments are plain integers.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr as *const PerfEventAttr,
                pid as libc::c_long,
                cpu as libc::c_long,
                -1 as libc::c_long,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if ret < 0 {
            return Err(HostPerfError::from_open_error(
                what,
                io::Error::last_os_error(),
            ));
        }
        let raw = RawFd::try_from(ret).map_err(|_| HostPerfError::Open {
            what: what.to_string(),
            source: io::Error::other("descriptor out of range"),
        })?;
        // SAFETY: the syscall succeeded, so `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(PerfEvent {
            fd,
            what: what.to_string(),
        })
    }

    fn ioctl(
        &self,
        name: &'static str,
        request: u64,
        arg: libc::c_ulong,
    ) -> Result<(), HostPerfError> {
        // SAFETY: `fd` is an open perf event; the requests used here take either no argument
        // or (PERIOD) a pointer to a u64 that the caller keeps alive for the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg) };
        if ret < 0 {
            return Err(HostPerfError::Ioctl {
                what: self.what.clone(),
                name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `PERF_EVENT_IOC_ENABLE`: start counting.
    pub fn enable(&self) -> Result<(), HostPerfError> {
        self.ioctl("PERF_EVENT_IOC_ENABLE", IOC_ENABLE, 0)
    }

    /// `PERF_EVENT_IOC_DISABLE`: stop counting.
    pub fn disable(&self) -> Result<(), HostPerfError> {
        self.ioctl("PERF_EVENT_IOC_DISABLE", IOC_DISABLE, 0)
    }

    /// `PERF_EVENT_IOC_RESET`: zero the event count.
    pub fn reset(&self) -> Result<(), HostPerfError> {
        self.ioctl("PERF_EVENT_IOC_RESET", IOC_RESET, 0)
    }

    /// `PERF_EVENT_IOC_PERIOD`: new sample period (takes effect at the next period).
    pub fn set_period(&self, period: u64) -> Result<(), HostPerfError> {
        let value = period;
        self.ioctl(
            "PERF_EVENT_IOC_PERIOD",
            IOC_PERIOD,
            &value as *const u64 as libc::c_ulong,
        )
    }

    /// The descriptor (e.g. to `poll(2)` for wakeups).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Map the ring: one metadata page plus `data_pages` (a power of two) data pages.
    pub fn map_ring(&self, data_pages: usize) -> Result<MmapRing, HostPerfError> {
        let mmap_err = |detail: String| HostPerfError::Mmap {
            what: self.what.clone(),
            detail,
        };
        if !data_pages.is_power_of_two() {
            return Err(mmap_err(format!(
                "{data_pages} data pages is not a power of two"
            )));
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).map_err(|_| mmap_err("no page size".into()))?;
        let len = page
            .checked_mul(data_pages + 1)
            .ok_or_else(|| mmap_err("ring size overflows".into()))?;
        // SAFETY: a fresh shared mapping of the perf fd chosen by the kernel (addr NULL); it
        // does not alias any Rust object. The result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // EPERM here is the locked-memory limit for perf rings (kernel/events/core.c,
            // perf_mmap: perf_event_mlock_kb per user, beyond it RLIMIT_MEMLOCK, unless
            // CAP_IPC_LOCK).
            let hint = if err.raw_os_error() == Some(libc::EPERM) {
                " (over the perf ring memory limit: raise /proc/sys/kernel/perf_event_mlock_kb \
                 or give the VMM CAP_IPC_LOCK)"
            } else {
                ""
            };
            return Err(mmap_err(format!("{err}{hint}")));
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| mmap_err("NULL mapping".into()))?;
        let mut ring = MmapRing {
            base,
            len,
            data_offset: page,
            data_size: len - page,
        };
        // Kernels since 4.1 publish the data area's place; older ones use page 1 onwards.
        let (off, size) = (
            ring.load_meta(MMAP_DATA_OFFSET),
            ring.load_meta(MMAP_DATA_SIZE),
        );
        if size != 0 {
            let (off, size) = (off as usize, size as usize);
            if !off.checked_add(size).is_some_and(|end| end <= len) || !size.is_power_of_two() {
                return Err(mmap_err(format!(
                    "bad data area {off:#x}+{size:#x} in {len:#x}"
                )));
            }
            ring.data_offset = off;
            ring.data_size = size;
        }
        Ok(ring)
    }
}

/// Wait until at least one of `fds` is readable (or hung up, or in error), with no timeout,
/// and return which ones are, in the order given. EINTR is returned as an error of kind
/// `Interrupted` for the caller to retry. Used by the host-perf reader thread on perf event
/// descriptors (readable after `wakeup_events` samples) and on its own wake-up socket.
///
/// A descriptor that was closed in the meantime is reported by the kernel as POLLNVAL
/// (counted as ready), never touched otherwise.
pub fn wait_readable(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let count = libc::nfds_t::try_from(polled.len())
        .map_err(|_| io::Error::other("too many descriptors to poll"))?;
    // SAFETY: `polled` is a live, initialised array of `count` pollfd structs that the
    // kernel may write (revents) during the call and that nothing else references; -1 means
    // no timeout.
    let ret = unsafe { libc::poll(polled.as_mut_ptr(), count, -1) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(polled.iter().map(|p| p.revents != 0).collect())
}

/// The mmapped ring of a [`PerfEvent`]; unmapped on drop. Implements [`RingMemory`] for a
/// [`super::ring::RingReader`]. It must not outlive its usefulness, but the mapping stays
/// valid even after the event's fd is closed (the kernel keeps the buffer alive).
#[derive(Debug)]
pub struct MmapRing {
    base: NonNull<u8>,
    len: usize,
    data_offset: usize,
    data_size: usize,
}

// SAFETY: the mapping is process-wide memory owned by this value alone; the kernel is the
// only other writer and every access goes through atomics or raw copies of the settled area.
unsafe impl Send for MmapRing {}

impl MmapRing {
    fn control(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset + 8 <= self.len && offset % 8 == 0);
        // SAFETY: `offset` is one of the 8-byte-aligned u64 fields in the first (metadata)
        // page of a live mapping of at least two pages; the kernel accesses it concurrently,
        // which is why it is only ever used as an atomic. The reference cannot outlive `self`,
        // which owns the mapping.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn load_meta(&self, offset: usize) -> u64 {
        self.control(offset).load(Ordering::Acquire)
    }

    /// Length of the whole mapping in bytes.
    pub fn mapped_len(&self) -> usize {
        self.len
    }
}

impl RingMemory for MmapRing {
    fn data_size(&self) -> usize {
        self.data_size
    }

    fn load_head(&self) -> u64 {
        self.control(MMAP_DATA_HEAD).load(Ordering::Acquire)
    }

    fn load_tail(&self) -> u64 {
        self.control(MMAP_DATA_TAIL).load(Ordering::Relaxed)
    }

    fn store_tail(&self, tail: u64) {
        self.control(MMAP_DATA_TAIL).store(tail, Ordering::Release);
    }

    fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset
            .checked_add(dst.len())
            .is_some_and(|end| end <= self.data_size));
        // SAFETY: the source range lies inside the data area of the live mapping (checked
        // above); the trait contract says it is between tail and head, which the kernel does
        // not write until the tail moves past it (ordered by the acquire load of the head).
        // `dst` is a distinct Rust buffer, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(self.data_offset + offset),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
    }
}

impl Drop for MmapRing {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping created in `map_ring`, unmapped once;
        // no reference into it survives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::host_perf::attr::{
        ATTR_DISABLED, PERF_COUNT_SW_CPU_CLOCK, PERF_SAMPLE_IP, PERF_SAMPLE_PERIOD,
        PERF_SAMPLE_RAW, PERF_SAMPLE_TID, PERF_SAMPLE_TIME, PERF_TYPE_SOFTWARE,
    };
    use crate::source::host_perf::ring::{Record, RingReader};
    use std::time::{Duration, Instant};

    const SAMPLE_TYPE: u64 =
        PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_PERIOD | PERF_SAMPLE_RAW;

    fn cpu_clock(period_ns: u64) -> PerfEventAttr {
        PerfEventAttr {
            sample_period: period_ns,
            sample_type: SAMPLE_TYPE,
            flags: ATTR_DISABLED,
            wakeup_events: 1,
            ..PerfEventAttr::new(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK)
        }
    }

    /// Spin on this thread until the ring has at least `bytes` unread bytes (or 20 s pass).
    fn spin_until(reader: &RingReader<MmapRing>, bytes: u64) {
        let start = Instant::now();
        let mut x = 0u64;
        while reader.memory().load_head() - reader.memory().load_tail() < bytes {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no samples from cpu-clock"
            );
        }
    }

    /// Timestamps of the samples read now (all must be host mode: this is a software event).
    fn read_times(reader: &mut RingReader<MmapRing>) -> Vec<u64> {
        let mut times = Vec::new();
        reader
            .read(|rec| {
                if let Record::Sample(s) = rec {
                    assert!(
                        !s.mode().is_guest(),
                        "cpu-clock samples are host mode: {s:?}"
                    );
                    assert_eq!(
                        s.raw,
                        Some(&[0u8; 4][..]),
                        "software events: empty raw field"
                    );
                    times.push(s.time.unwrap());
                }
            })
            .unwrap();
        times
    }

    fn min_gap(times: &[u64]) -> u64 {
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The whole lifecycle with a real software event (cpu-clock) on the calling thread:
    /// open disabled, mmap, ENABLE, samples, DISABLE, PERIOD, discard_all, RESET, close.
    #[test]
    fn cpu_clock_lifecycle() {
        let ev = PerfEvent::open(&cpu_clock(200_000), 0, -1, "cpu-clock").expect("perf_event_open");
        let fd = ev.raw_fd();
        let link = format!("/proc/self/fd/{fd}");
        assert!(std::fs::read_link(&link)
            .unwrap()
            .to_string_lossy()
            .contains("perf_event"));
        let ring = ev.map_ring(8).unwrap();
        assert!(ring.data_size().is_power_of_two() && ring.data_size() >= 8 * 4096);
        let mut reader = RingReader::new(ring, SAMPLE_TYPE).unwrap();

        // Created disabled: nothing arrives.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(reader.read(|_| {}), Ok(0));

        // Enabled: samples every 200 µs of CPU time, all host mode.
        ev.enable().unwrap();
        spin_until(&reader, 20 * 48);
        ev.disable().unwrap();
        let fast = read_times(&mut reader);
        assert!(fast.len() >= 20, "{}", fast.len());
        assert_eq!(reader.stats().host_samples, fast.len() as u64);
        assert_eq!(reader.stats().guest_samples, 0);

        // Disabled: no more samples.
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = std::hint::black_box(x ^ i);
        }
        assert_eq!(reader.read(|_| {}), Ok(0), "disabled event still sampled");

        // PERIOD ioctl: 10 ms. The gap between consecutive samples can only grow under load,
        // so the minimum gap shows the period.
        ev.set_period(10_000_000).unwrap();
        ev.reset().unwrap();
        ev.enable().unwrap();
        spin_until(&reader, 4 * 48);
        ev.disable().unwrap();
        let slow = read_times(&mut reader);
        assert!(slow.len() >= 4);
        assert!(min_gap(&slow) >= 9_000_000, "period not applied: {slow:?}");
        assert!(min_gap(&fast) < 9_000_000, "fast period: {fast:?}");

        // Clear-before-start: records of an enable period left in the ring are discarded.
        ev.set_period(200_000).unwrap();
        ev.enable().unwrap();
        spin_until(&reader, 48);
        ev.disable().unwrap();
        assert!(reader.discard_all() > 0);
        assert_eq!(reader.read(|_| panic!("discarded record seen")), Ok(0));

        // Close: the descriptor goes away with the event; the ring mapping stays readable.
        drop(ev);
        let now = std::fs::read_link(&link).map(|p| p.to_string_lossy().into_owned());
        assert!(
            !now.is_ok_and(|p| p.contains("perf_event")),
            "fd {fd} still open"
        );
        assert_eq!(reader.read(|_| {}), Ok(0));
        drop(reader);
    }

    #[test]
    fn bad_period_ioctl_and_mmap_are_errors() {
        let ev = PerfEvent::open(&cpu_clock(1_000_000), 0, -1, "cpu-clock").unwrap();
        assert!(matches!(ev.map_ring(3), Err(HostPerfError::Mmap { .. })));
        // A zero period is refused by the kernel (EINVAL).
        let err = ev.set_period(0).unwrap_err();
        assert!(err.to_string().contains("PERF_EVENT_IOC_PERIOD"), "{err}");
    }

    #[test]
    fn wait_readable_reports_ready_descriptors() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        let (mut a, b) = UnixStream::pair().unwrap();
        let (_c, d) = UnixStream::pair().unwrap();
        a.write_all(&[1]).unwrap();
        let ready = wait_readable(&[d.as_raw_fd(), b.as_raw_fd()]).unwrap();
        assert_eq!(ready, [false, true]);
        // A hung-up peer counts as ready (the reader thread's shutdown signal).
        drop(a);
        let ready = wait_readable(&[b.as_raw_fd()]).unwrap();
        assert_eq!(ready, [true]);
    }

    #[test]
    fn open_errors_name_the_event() {
        // PMU type that does not exist → ENOENT, not a permission problem.
        let attr = PerfEventAttr::new(0x7FFF_FFF0, 0);
        let err = PerfEvent::open(&attr, 0, -1, "ibs_op").unwrap_err();
        assert!(matches!(err, HostPerfError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("ibs_op"), "{err}");
    }
}
