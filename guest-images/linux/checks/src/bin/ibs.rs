//! `ibs`: does the guest kernel drive ibsvm's virtual AMD IBS PMU correctly?
//!
//! 1. `pmu`: `/sys/bus/event_source/devices/ibs_op` and `ibs_fetch` exist (their
//!    `type`); their `format/` and `caps/` files are printed as info.
//! 2. `ibs_op` sampling through `perf_event_open` (cycles mode, `sample_period`
//!    0x10000, IP + TID + RAW) while a known busy loop runs: enough samples, most of
//!    them in the loop, every raw IBS_OP_CTL with En and Val, MaxCnt set, IBS_OP_RIP
//!    equal to the sample IP, IBS_DC_PHYSADDR zero; lost records counted.
//! 3. `ibs_fetch` briefly: at least one sample with FETCH_CTL En and Val, and
//!    IBS_FETCH_PHYSADDR zero in all.
//! 4. The kernel log (read last, so it covers the sampling): `perf: AMD IBS detected`
//!    present; no `NMI received for unknown reason`, `[Firmware Bug]` or
//!    `unchecked MSR access`.
//!
//! Linux 6.1 (the guest's kernel) registers both IBS PMUs with
//! `task_ctx_nr = perf_invalid_context` and `PERF_PMU_CAP_NO_EXCLUDE`: per-task events
//! fail with EINVAL and so does any `exclude_*` bit. So by default the events are
//! CPU-wide on the CPU this process is pinned to (needs root, which /init is);
//! samples of other tasks or of the kernel are counted separately.
//!
//! Bounded: about 0.5 s of op sampling plus 0.2 s of fetch sampling, under a hundred
//! system calls (each runs emulated kernel code in the guest). Options, as
//! environment variables or `KEY=VALUE` arguments: `IBS_CHECK_PERIOD` (op period,
//! default 0x10000), `IBS_CHECK_SECONDS` (0.5), `IBS_CHECK_FETCH_PERIOD` (0x10000),
//! `IBS_CHECK_FETCH_SECONDS` (0.2), `IBS_CHECK_MODE` (`cpu`, `task` or `auto` = task
//! then cpu), `IBS_CHECK_MIN_SAMPLES` (10). Exit status 0 only if every result passed.

use std::ffi::CString;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ibsvm_guest_checks::Check;

const SYSFS_PMUS: &str = "/sys/bus/event_source/devices";
/// Samples of this thread's user code that must fall in the busy loop, in percent. Not
/// more: the loop is where the thread spends nearly all of its *instructions*, but samples
/// follow the vCPU's run time, and on a host that emulates guest kernel code (host-kvm.md)
/// the first touch of a new page costs the vCPU a lot of it with the RIP still at the
/// touching user instruction: in loaded runs up to 15% of the samples sat at the entries
/// of memset/memmove and in malloc, called by the ring drain between chunks. 75% of a
/// 4 KiB window still shows that the samples track the thread (its text is over 1 MiB).
const IN_LOOP_PERCENT: f64 = 75.0;
/// The busy loop's body is assumed to lie within this many bytes of its entry.
const LOOP_RANGE: u64 = 4096;
/// Ring buffer data pages (plus one metadata page).
const DATA_PAGES: usize = 8;
const PAGE: usize = 4096;
/// Longest line of the kernel log printed.
const MAX_LINE: usize = 200;

// ---- perf ABI (include/uapi/linux/perf_event.h) ----

#[cfg(test)]
const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_SAMPLE_IP: u64 = 1 << 0;
const PERF_SAMPLE_TID: u64 = 1 << 1;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const PERF_ATTR_SIZE_VER7: u32 = 128;
const ATTR_FLAG_DISABLED: u64 = 1 << 0;
#[cfg(test)]
const ATTR_FLAG_EXCLUDE_KERNEL: u64 = 1 << 5;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_THROTTLE: u32 = 5;
const PERF_RECORD_UNTHROTTLE: u32 = 6;
const PERF_RECORD_SAMPLE: u32 = 9;
/// `struct perf_event_mmap_page`: offsets of data_head, data_tail, data_offset,
/// data_size.
const MMAP_DATA_HEAD: usize = 1024;
const MMAP_DATA_TAIL: usize = 1032;
const MMAP_DATA_OFFSET: usize = 1040;
const MMAP_DATA_SIZE: usize = 1048;

/// `struct perf_event_attr` up to `sig_data` (PERF_ATTR_SIZE_VER7, Linux 5.13+).
/// The bit-field word (`disabled`, `inherit`, ... ) is `flags`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == PERF_ATTR_SIZE_VER7 as usize);

// ---- IBS register bits (arch/x86/include/asm/perf_event.h, amd-ibs.h) ----

const CAPS_BRNTRGT: u32 = 1 << 5;
const CAPS_OPCNTEXT: u32 = 1 << 6;
const CAPS_RIPINVALIDCHK: u32 = 1 << 7;
const CAPS_FETCHCTLEXTD: u32 = 1 << 9;
const CAPS_OPDATA4: u32 = 1 << 10;
const OP_MAX_CNT: u64 = 0xffff;
const OP_MAX_CNT_EXT: u64 = 0x7f << 20;
const OP_EN: u64 = 1 << 17;
const OP_VAL: u64 = 1 << 18;
const OP_DATA_RIP_INVALID: u64 = 1 << 38;
const OP_DATA3_DC_PHY_ADDR_VALID: u64 = 1 << 18;
const FETCH_MAX_CNT: u64 = 0xffff;
const FETCH_EN: u64 = 1 << 48;
const FETCH_VAL: u64 = 1 << 49;
const FETCH_PHY_ADDR_VALID: u64 = 1 << 52;

fn main() {
    let mut c = Check::new("ibs");
    let opts = match Options::from_env_and_args() {
        Ok(o) => o,
        Err(e) => {
            c.run("options", || Err(e));
            c.finish();
        }
    };
    c.info(format_args!(
        "options: op period {:#x} for {} s, fetch period {:#x} for {} s, mode {}, min samples {}",
        opts.op_period,
        opts.op_seconds,
        opts.fetch_period,
        opts.fetch_seconds,
        opts.mode.name(),
        opts.min_samples
    ));

    // 1. The PMUs.
    let mut types = None;
    c.run("pmu", || {
        let op = pmu_type("ibs_op")?;
        let fetch = pmu_type("ibs_fetch")?;
        types = Some((op, fetch));
        Ok(format!("ibs_op type {op}, ibs_fetch type {fetch}"))
    });
    let Some((op_type, fetch_type)) = types else {
        // No IBS PMU: say what the kernel log says about IBS, then stop.
        match read_kernel_log() {
            Ok(lines) => {
                let rel: Vec<&String> = lines
                    .iter()
                    .filter(|l| l.contains("IBS") || l.contains("[Firmware Bug]"))
                    .collect();
                if rel.is_empty() {
                    c.info("kernel log: no line mentions IBS");
                }
                for l in rel.iter().take(5) {
                    c.info(format_args!("kernel log: {}", clip(l)));
                }
            }
            Err(e) => c.info(format_args!("kernel log unreadable: {e}")),
        }
        c.finish();
    };
    for pmu in ["ibs_op", "ibs_fetch"] {
        c.info(format_args!("{pmu} {}", pmu_attributes(pmu)));
    }

    // Every guest kernel instruction is emulated on some hosts (an NMI handler then takes
    // milliseconds): without this, perf's interrupt-time limit lowers the sample rate and
    // throttles the event within a few samples. 0 disables that limit
    // (Documentation/admin-guide/sysctl/kernel.rst, perf_cpu_time_max_percent).
    match std::fs::write("/proc/sys/kernel/perf_cpu_time_max_percent", "0\n") {
        Ok(()) => c.info("set kernel.perf_cpu_time_max_percent=0"),
        Err(e) => c.info(format_args!(
            "kernel.perf_cpu_time_max_percent unchanged: {e}"
        )),
    }

    // 2. ibs_op sampling.
    let loop_range = loop_range();
    c.info(format_args!(
        "busy loop at {:#x}..{:#x}",
        loop_range.0, loop_range.1
    ));
    let op_attr = ibs_attr(op_type, opts.op_period);
    let mut op_run = None;
    c.run("op-open", || {
        let run = sample(&op_attr, true, opts.mode, opts.op_seconds)?;
        let d = format!(
            "{}, config 0, sample_period {:#x}, sample_type IP|TID|RAW; ran {} ms, {} loop iterations",
            run.mode,
            opts.op_period,
            run.elapsed.as_millis(),
            run.iterations
        );
        op_run = Some(run);
        Ok(d)
    });
    if let Some(run) = &op_run {
        op_results(&mut c, run, loop_range, opts.min_samples);
    }
    let op_caps = op_run
        .as_ref()
        .and_then(|r| r.samples().first())
        .and_then(|s| raw_caps(&s.raw));

    // 3. ibs_fetch sampling.
    let fetch_attr = ibs_attr(fetch_type, opts.fetch_period);
    let mut fetch_decoded = None;
    c.run("fetch-samples", || {
        let run = sample(&fetch_attr, true, opts.mode, opts.fetch_seconds)?;
        let (decoded, d) = fetch_samples_result(&run, loop_range)?;
        fetch_decoded = Some(decoded);
        Ok(d)
    });
    if let Some(decoded) = &fetch_decoded {
        c.run("fetch-physaddr", || fetch_physaddr_result(decoded));
    }

    // 4. The kernel log, read last so that it covers the sampling above.
    log_results(&mut c, op_caps);
    c.finish();
}

// ---- options ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// CPU-wide on the CPU this process is pinned to (works on every kernel).
    Cpu,
    /// Per-task (`pid = 0, cpu = -1`): Linux 6.2 and later only.
    Task,
    /// Per-task, then CPU-wide if that gives EINVAL.
    Auto,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Cpu => "cpu",
            Mode::Task => "task",
            Mode::Auto => "auto",
        }
    }
}

struct Options {
    op_period: u64,
    op_seconds: f64,
    fetch_period: u64,
    fetch_seconds: f64,
    mode: Mode,
    min_samples: usize,
}

impl Options {
    fn from_env_and_args() -> Result<Self, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let get = |key: &str| -> Option<String> {
            let prefix = format!("{key}=");
            args.iter()
                .rev()
                .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
                .or_else(|| std::env::var(key).ok())
        };
        for a in &args {
            let known = [
                "IBS_CHECK_PERIOD=",
                "IBS_CHECK_SECONDS=",
                "IBS_CHECK_FETCH_PERIOD=",
                "IBS_CHECK_FETCH_SECONDS=",
                "IBS_CHECK_MODE=",
                "IBS_CHECK_MIN_SAMPLES=",
            ];
            if !known.iter().any(|k| a.starts_with(k)) {
                return Err(format!("unknown argument {a:?} (want KEY=VALUE, KEY one of IBS_CHECK_PERIOD, IBS_CHECK_SECONDS, IBS_CHECK_FETCH_PERIOD, IBS_CHECK_FETCH_SECONDS, IBS_CHECK_MODE, IBS_CHECK_MIN_SAMPLES)"));
            }
        }
        let period = |key: &str, default: u64, min: u64| -> Result<u64, String> {
            match get(key) {
                None => Ok(default),
                Some(v) => {
                    let p = parse_u64(&v).ok_or_else(|| format!("{key}={v:?}: not a number"))?;
                    if p < min || !p.is_multiple_of(16) || p > 0x7fff_fff0 {
                        return Err(format!(
                            "{key}={v:?}: want a multiple of 16 in {min:#x}..=0x7ffffff0"
                        ));
                    }
                    Ok(p)
                }
            }
        };
        let seconds = |key: &str, default: f64| -> Result<f64, String> {
            match get(key) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<f64>() {
                    Ok(s) if (0.01..=10.0).contains(&s) => Ok(s),
                    _ => Err(format!("{key}={v:?}: want seconds in 0.01..=10")),
                },
            }
        };
        let mode = match get("IBS_CHECK_MODE").as_deref().map(str::trim) {
            None | Some("cpu") => Mode::Cpu,
            Some("task") => Mode::Task,
            Some("auto") => Mode::Auto,
            Some(m) => return Err(format!("IBS_CHECK_MODE={m:?}: want cpu, task or auto")),
        };
        let min_samples = match get("IBS_CHECK_MIN_SAMPLES") {
            None => 10,
            Some(v) => match parse_u64(&v) {
                Some(n) if (1..=100_000).contains(&n) => n as usize,
                _ => return Err(format!("IBS_CHECK_MIN_SAMPLES={v:?}: want 1..=100000")),
            },
        };
        Ok(Options {
            // The op unit's minimum period in newer kernels is 0x90; 6.1 takes 0x10.
            op_period: period("IBS_CHECK_PERIOD", 0x10000, 0x90)?,
            op_seconds: seconds("IBS_CHECK_SECONDS", 0.5)?,
            fetch_period: period("IBS_CHECK_FETCH_PERIOD", 0x10000, 0x10)?,
            fetch_seconds: seconds("IBS_CHECK_FETCH_SECONDS", 0.2)?,
            mode,
            min_samples,
        })
    }
}

/// Parses `0x...` hex or decimal.
fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

// ---- sysfs ----

fn pmu_type(pmu: &str) -> Result<u32, String> {
    let dir = format!("{SYSFS_PMUS}/{pmu}");
    if std::fs::metadata(&dir).is_err() {
        return Err(format!("{dir} missing"));
    }
    let path = format!("{dir}/type");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{path}: not a number: {:?}", text.trim()))
}

/// `format: a=config:19, ...; caps: b=1` for one PMU (informational).
fn pmu_attributes(pmu: &str) -> String {
    let mut out = String::new();
    for sub in ["format", "caps"] {
        let dir = format!("{SYSFS_PMUS}/{pmu}/{sub}");
        let mut items = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let val = std::fs::read_to_string(e.path())
                        .map(|v| v.trim().to_string())
                        .unwrap_or_else(|e| format!("<{e}>"));
                    items.push(format!("{name}={val}"));
                }
            }
            Err(_) => items.push("(absent)".into()),
        }
        items.sort();
        if items.is_empty() {
            items.push("(none)".into());
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        let _ = write!(out, "{sub}: {}", items.join(", "));
    }
    out
}

// ---- the busy loop ----

/// A long dependent chain of integer operations: nearly all of its time is spent in
/// the few instructions of its loop, within `LOOP_RANGE` bytes of its entry.
#[inline(never)]
fn busy_loop(iters: u64, seed: u64) -> u64 {
    let mut x = seed;
    for _ in 0..iters {
        x = std::hint::black_box(
            x.wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407),
        );
    }
    x
}

fn loop_range() -> (u64, u64) {
    let f: fn(u64, u64) -> u64 = busy_loop;
    let a = f as usize as u64;
    (a, a + LOOP_RANGE)
}

// ---- perf_event_open, ring buffer ----

fn ibs_attr(pmu_type: u32, period: u64) -> PerfEventAttr {
    PerfEventAttr {
        type_: pmu_type,
        size: PERF_ATTR_SIZE_VER7,
        // Op: cycles mode (CntCtl = 0); fetch: no RandEn. MaxCnt comes from the period.
        config: 0,
        sample_period: period,
        sample_type: PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_RAW,
        // disabled only: Linux 6.1 IBS sets PERF_PMU_CAP_NO_EXCLUDE, so any exclude_*
        // bit is EINVAL; freq = 0 (a fixed period).
        flags: ATTR_FLAG_DISABLED,
        ..Default::default()
    }
}

fn perf_event_open(
    attr: &PerfEventAttr,
    pid: libc::pid_t,
    cpu: libc::c_int,
) -> Result<OwnedFd, std::io::Error> {
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

fn errno_hint(e: &std::io::Error, mode: &str) -> &'static str {
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

/// Opens the event as `mode` says; returns the fd and a description of the mode.
fn open_for_mode(attr: &PerfEventAttr, mode: Mode) -> Result<(OwnedFd, String), String> {
    if mode != Mode::Cpu {
        match perf_event_open(attr, 0, -1) {
            Ok(fd) => return Ok((fd, "per-task".into())),
            Err(e) if mode == Mode::Auto && e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => {
                return Err(format!(
                    "perf_event_open type {} per-task: {e}{}",
                    attr.type_,
                    errno_hint(&e, "per-task")
                ))
            }
        }
    }
    let cpu = pin_to_current_cpu()?;
    match perf_event_open(attr, -1, cpu) {
        Ok(fd) => Ok((
            fd,
            format!(
                "cpu-wide on cpu {cpu}{}",
                if mode == Mode::Auto {
                    " (per-task EINVAL)"
                } else {
                    ""
                }
            ),
        )),
        Err(e) => Err(format!(
            "perf_event_open type {} cpu {cpu}: {e}{}",
            attr.type_,
            errno_hint(&e, "cpu")
        )),
    }
}

/// Pins this thread to the CPU it runs on and returns that CPU.
fn pin_to_current_cpu() -> Result<libc::c_int, String> {
    // SAFETY: no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu < 0 {
        return Err(format!("sched_getcpu: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: cpu_set_t is plain data (all-zero is empty); CPU_SET writes inside it;
    // sched_setaffinity reads size_of::<cpu_set_t>() bytes from it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "sched_setaffinity(cpu {cpu}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(cpu)
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, what: &str) -> Result<(), String> {
    // SAFETY: ENABLE/DISABLE take an integer argument (0: this event only).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, 0 as libc::c_ulong) };
    if r != 0 {
        return Err(format!("ioctl {what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The event's mmap'ed ring buffer: metadata page plus 2^n data pages.
struct Ring {
    base: *mut u8,
    len: usize,
    data: *const u8,
    size: u64,
}

impl Ring {
    fn map(fd: &OwnedFd) -> Result<Ring, String> {
        let len = (1 + DATA_PAGES) * PAGE;
        // SAFETY: a new shared mapping of the perf fd; nothing else uses that range.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "mmap {} pages: {}",
                1 + DATA_PAGES,
                std::io::Error::last_os_error()
            ));
        }
        let base = base as *mut u8;
        let mut ring = Ring {
            base,
            len,
            data: base,
            size: 0,
        };
        // data_offset/data_size are set by Linux 4.1+; fall back to the classic layout.
        let off = ring.meta(MMAP_DATA_OFFSET).load(Ordering::Relaxed) as usize;
        let size = ring.meta(MMAP_DATA_SIZE).load(Ordering::Relaxed) as usize;
        let (off, size) = if off == 0 || size == 0 {
            (PAGE, DATA_PAGES * PAGE)
        } else {
            (off, size)
        };
        if off + size > len || !size.is_power_of_two() {
            return Err(format!(
                "ring buffer layout: data_offset {off}, data_size {size}, mapping {len}"
            ));
        }
        // SAFETY: off < len, checked above.
        ring.data = unsafe { base.add(off) };
        ring.size = size as u64;
        Ok(ring)
    }

    fn meta(&self, off: usize) -> &AtomicU64 {
        // SAFETY: off is one of the 8-aligned u64 fields of the metadata page, which
        // stays mapped while self lives; the kernel updates them concurrently, hence
        // atomic accesses.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    /// Takes everything the kernel has written since the last call and parses it.
    fn drain(&self, has_raw: bool, out: &mut Records) -> Result<(), String> {
        // Acquire: the records up to data_head are visible after this load.
        let head = self.meta(MMAP_DATA_HEAD).load(Ordering::Acquire);
        let tail = self.meta(MMAP_DATA_TAIL).load(Ordering::Relaxed);
        if head == tail {
            return Ok(());
        }
        // SAFETY: data points to size mapped bytes; linearize reads only [tail, head)
        // modulo size, which the kernel does not touch until data_tail moves past it.
        let bytes = unsafe { linearize(self.data, self.size, tail, head) }?;
        // Release: our reads of the records happen before the kernel may reuse them.
        self.meta(MMAP_DATA_TAIL).store(head, Ordering::Release);
        parse_records(&bytes, has_raw, out)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in map().
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Copies the ring bytes from `tail` to `head` (free-running offsets) out of a ring
/// of `size` bytes (a power of two) at `data`, unwrapping the wrap-around.
///
/// # Safety
/// `data` must be valid for reads of `size` bytes.
unsafe fn linearize(data: *const u8, size: u64, tail: u64, head: u64) -> Result<Vec<u8>, String> {
    let n = head.wrapping_sub(tail);
    if n > size {
        return Err(format!(
            "ring overrun: data_head {head:#x} - data_tail {tail:#x} > size {size:#x}"
        ));
    }
    let mut v = vec![0u8; n as usize];
    let start = (tail % size) as usize;
    let first = (n as usize).min(size as usize - start);
    std::ptr::copy_nonoverlapping(data.add(start), v.as_mut_ptr(), first);
    std::ptr::copy_nonoverlapping(data, v.as_mut_ptr().add(first), n as usize - first);
    Ok(v)
}

#[derive(Clone, Debug, PartialEq)]
struct Sample {
    ip: u64,
    pid: u32,
    tid: u32,
    misc: u16,
    raw: Vec<u8>,
}

#[derive(Default, Debug)]
struct Records {
    samples: Vec<Sample>,
    lost_records: u64,
    lost: u64,
    throttle: u64,
    unthrottle: u64,
    other: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Parses perf records laid out one after another (no wrap-around; see
/// `linearize`). Samples are expected with sample_type IP | TID [| RAW].
fn parse_records(b: &[u8], has_raw: bool, out: &mut Records) -> Result<(), String> {
    let mut off = 0usize;
    while off < b.len() {
        let left = b.len() - off;
        if left < 8 {
            return Err(format!(
                "truncated record header at +{off}: {left} bytes left"
            ));
        }
        let ty = u32_at(b, off);
        let misc = u16_at(b, off + 4);
        let size = u16_at(b, off + 6) as usize;
        if size < 8 || !size.is_multiple_of(8) {
            return Err(format!("record at +{off} (type {ty}): bad size {size}"));
        }
        if size > left {
            return Err(format!(
                "truncated record at +{off} (type {ty}): size {size}, {left} bytes left"
            ));
        }
        let r = &b[off..off + size];
        match ty {
            PERF_RECORD_SAMPLE => {
                let min = if has_raw { 28 } else { 24 };
                if size < min {
                    return Err(format!("sample at +{off}: size {size} < {min}"));
                }
                let raw = if has_raw {
                    let rs = u32_at(r, 24) as usize;
                    if 28 + rs > size {
                        return Err(format!(
                            "sample at +{off}: raw size {rs} overruns record size {size}"
                        ));
                    }
                    r[28..28 + rs].to_vec()
                } else {
                    Vec::new()
                };
                out.samples.push(Sample {
                    ip: u64_at(r, 8),
                    pid: u32_at(r, 16),
                    tid: u32_at(r, 20),
                    misc,
                    raw,
                });
            }
            PERF_RECORD_LOST => {
                if size < 24 {
                    return Err(format!("lost record at +{off}: size {size} < 24"));
                }
                out.lost_records += 1;
                out.lost += u64_at(r, 16);
            }
            PERF_RECORD_THROTTLE => out.throttle += 1,
            PERF_RECORD_UNTHROTTLE => out.unthrottle += 1,
            _ => out.other += 1,
        }
        off += size;
    }
    Ok(())
}

/// One sampling run.
struct Run {
    mode: String,
    recs: Records,
    /// A ring-buffer parse error (the samples before it are kept).
    parse_error: Option<String>,
    elapsed: Duration,
    iterations: u64,
    pid: u32,
    tid: u32,
}

impl Run {
    fn samples(&self) -> &[Sample] {
        &self.recs.samples
    }
}

/// Busy-loop iterations between two ring drains, at least: about 0.1 ms of native CPL3
/// time. Chunks shrink towards this when wall time per chunk is long — on a host that
/// emulates guest kernel code, each sample's NMI takes milliseconds — but a smaller chunk
/// would make the drain's own code (allocation, copying) a visible part of this thread's
/// user time, and of its samples: with 1000-iteration chunks a sixth of the samples landed
/// in malloc/free instead of the loop.
const MIN_CHUNK: u64 = 100_000;

/// Opens the event, runs the busy loop for `seconds` with the event enabled
/// (draining the ring buffer between chunks, which costs no system call), disables
/// it and collects the records.
fn sample(attr: &PerfEventAttr, has_raw: bool, mode: Mode, seconds: f64) -> Result<Run, String> {
    let (fd, mode) = open_for_mode(attr, mode)?;
    let ring = Ring::map(&fd)?;
    let mut recs = Records::default();
    let mut parse_error = None;
    let target = Duration::from_secs_f64(seconds);
    let chunk_target = Duration::from_millis(10);
    let mut chunk: u64 = MIN_CHUNK;
    let mut iterations = 0u64;
    let mut acc = 0x1234_5678u64;
    ioctl(&fd, PERF_EVENT_IOC_ENABLE, "PERF_EVENT_IOC_ENABLE")?;
    let start = Instant::now();
    let mut last = start;
    // The chunk count bound only matters if the clock stands still.
    for _ in 0..100_000 {
        acc = busy_loop(chunk, acc);
        iterations += chunk;
        if parse_error.is_none() {
            if let Err(e) = ring.drain(has_raw, &mut recs) {
                parse_error = Some(e);
            }
        }
        let now = Instant::now();
        let dt = now - last;
        last = now;
        if now - start >= target {
            break;
        }
        if dt < chunk_target / 2 && chunk < 1 << 30 {
            chunk *= 2;
        } else if dt > chunk_target * 2 && chunk > MIN_CHUNK {
            chunk /= 2;
        }
    }
    let elapsed = start.elapsed();
    std::hint::black_box(acc);
    ioctl(&fd, PERF_EVENT_IOC_DISABLE, "PERF_EVENT_IOC_DISABLE")?;
    if parse_error.is_none() {
        if let Err(e) = ring.drain(has_raw, &mut recs) {
            parse_error = Some(e);
        }
    }
    drop(ring);
    drop(fd);
    // SAFETY: no arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    Ok(Run {
        mode,
        recs,
        parse_error,
        elapsed,
        iterations,
        pid: std::process::id(),
        tid,
    })
}

// ---- raw IBS payloads ----

/// The raw payload of an ibs_op sample (Linux perf_ibs_handle_irq): u32 ibs_caps,
/// then IBS_OP_CTL, OP_RIP, OP_DATA, OP_DATA2, OP_DATA3, DC_LINADDR, DC_PHYSADDR
/// [, BR_TARGET if caps BRNTRGT] [, OP_DATA4 if caps OPDATA4].
#[derive(Clone, Debug, PartialEq)]
struct OpRaw {
    caps: u32,
    ctl: u64,
    rip: u64,
    data: u64,
    data2: u64,
    data3: u64,
    dc_linaddr: u64,
    dc_physaddr: u64,
    br_target: Option<u64>,
    op_data4: Option<u64>,
}

/// The raw payload of an ibs_fetch sample: u32 ibs_caps, then IBS_FETCH_CTL,
/// FETCH_LINADDR, FETCH_PHYSADDR [, FETCH_CTL_EXT if caps FETCHCTLEXTD].
#[derive(Clone, Debug, PartialEq)]
struct FetchRaw {
    caps: u32,
    ctl: u64,
    linaddr: u64,
    physaddr: u64,
    ctl_ext: Option<u64>,
}

fn raw_caps(raw: &[u8]) -> Option<u32> {
    (raw.len() >= 4).then(|| u32_at(raw, 0))
}

/// Checks the raw size for `regs` registers after the caps word and returns them.
/// The kernel's raw size is exactly 4 + 8 * regs (the record is then 8-aligned).
fn raw_regs(raw: &[u8], regs: usize, caps: u32) -> Result<Vec<u64>, String> {
    let want = 4 + 8 * regs;
    if raw.len() != want {
        return Err(format!(
            "raw size {} bytes, want {want} (caps {caps:#x}: u32 + {regs} registers)",
            raw.len()
        ));
    }
    Ok((0..regs).map(|i| u64_at(raw, 4 + 8 * i)).collect())
}

fn decode_op_raw(raw: &[u8]) -> Result<OpRaw, String> {
    let caps = raw_caps(raw).ok_or_else(|| format!("raw size {} < 4", raw.len()))?;
    let br = caps & CAPS_BRNTRGT != 0;
    let d4 = caps & CAPS_OPDATA4 != 0;
    let r = raw_regs(raw, 7 + br as usize + d4 as usize, caps)?;
    Ok(OpRaw {
        caps,
        ctl: r[0],
        rip: r[1],
        data: r[2],
        data2: r[3],
        data3: r[4],
        dc_linaddr: r[5],
        dc_physaddr: r[6],
        br_target: br.then(|| r[7]),
        op_data4: d4.then(|| r[7 + br as usize]),
    })
}

fn decode_fetch_raw(raw: &[u8]) -> Result<FetchRaw, String> {
    let caps = raw_caps(raw).ok_or_else(|| format!("raw size {} < 4", raw.len()))?;
    let ext = caps & CAPS_FETCHCTLEXTD != 0;
    let r = raw_regs(raw, 3 + ext as usize, caps)?;
    Ok(FetchRaw {
        caps,
        ctl: r[0],
        linaddr: r[1],
        physaddr: r[2],
        ctl_ext: ext.then(|| r[3]),
    })
}

fn op_max_cnt(o: &OpRaw) -> u64 {
    let mut m = o.ctl & OP_MAX_CNT;
    if o.caps & CAPS_OPCNTEXT != 0 {
        m |= ((o.ctl & OP_MAX_CNT_EXT) >> 20) << 16;
    }
    m
}

/// En and Val set and MaxCnt nonzero.
fn op_ctl_problem(o: &OpRaw) -> Option<String> {
    let en = o.ctl & OP_EN != 0;
    let val = o.ctl & OP_VAL != 0;
    if en && val && op_max_cnt(o) != 0 {
        return None;
    }
    Some(format!(
        "IBS_OP_CTL {:#x}: En {}, Val {}, MaxCnt {:#x}",
        o.ctl,
        en as u8,
        val as u8,
        op_max_cnt(o)
    ))
}

/// IBS_OP_RIP must be the sample IP, unless the kernel used the interrupted IP
/// because RipInvalid was set (caps RIPINVALIDCHK): `Ok(true)` then.
fn op_rip_check(ip: u64, o: &OpRaw) -> Result<bool, String> {
    if o.caps & CAPS_RIPINVALIDCHK != 0 && o.data & OP_DATA_RIP_INVALID != 0 {
        return Ok(true);
    }
    if o.rip != ip {
        return Err(format!("IBS_OP_RIP {:#x} != sample ip {ip:#x}", o.rip));
    }
    Ok(false)
}

fn op_phys_problem(o: &OpRaw) -> Option<String> {
    if o.dc_physaddr == 0 && o.data3 & OP_DATA3_DC_PHY_ADDR_VALID == 0 {
        return None;
    }
    Some(format!(
        "IBS_DC_PHYSADDR {:#x}, OP_DATA3 {:#x} (DcPhyAddrValid {})",
        o.dc_physaddr,
        o.data3,
        (o.data3 & OP_DATA3_DC_PHY_ADDR_VALID != 0) as u8
    ))
}

fn fetch_ctl_ok(f: &FetchRaw) -> bool {
    f.ctl & FETCH_EN != 0 && f.ctl & FETCH_VAL != 0 && f.ctl & FETCH_MAX_CNT != 0
}

fn fetch_phys_problem(f: &FetchRaw) -> Option<String> {
    if f.physaddr == 0 && f.ctl & FETCH_PHY_ADDR_VALID == 0 {
        return None;
    }
    Some(format!(
        "IBS_FETCH_PHYSADDR {:#x}, FETCH_CTL {:#x} (PhyAddrValid {})",
        f.physaddr,
        f.ctl,
        (f.ctl & FETCH_PHY_ADDR_VALID != 0) as u8
    ))
}

// ---- results ----

fn is_user(ip: u64) -> bool {
    ip < 0x0000_8000_0000_0000
}

fn percent(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        100.0 * n as f64 / d as f64
    }
}

fn op_results(c: &mut Check, run: &Run, range: (u64, u64), min_samples: usize) {
    let s = run.samples();
    let in_loop = |ip: u64| ip >= range.0 && ip < range.1;
    let total = s.len();
    let m = s.iter().filter(|x| in_loop(x.ip)).count();
    let first_ip = s.first().map(|x| x.ip).unwrap_or(0);
    let r = &run.recs;

    c.run("samples", || {
        let d = format!(
            "{total} total, {m} in loop ({:.1}%), first ip {first_ip:#x}, lost {}",
            percent(m, total),
            r.lost
        );
        if let Some(e) = &run.parse_error {
            return Err(format!("{d}; ring buffer: {e}"));
        }
        if total < min_samples {
            return Err(format!("{d}: fewer than {min_samples} samples"));
        }
        Ok(d)
    });

    c.run("in-loop", || {
        let own: Vec<&Sample> = s
            .iter()
            .filter(|x| x.pid == run.pid && x.tid == run.tid)
            .collect();
        let own_user: Vec<&&Sample> = own.iter().filter(|x| is_user(x.ip)).collect();
        let own_kernel = own.len() - own_user.len();
        let others = total - own.len();
        let hits = own_user.iter().filter(|x| in_loop(x.ip)).count();
        let p = percent(hits, own_user.len());
        let outside: Vec<String> = own_user
            .iter()
            .filter(|x| !in_loop(x.ip))
            .take(3)
            .map(|x| format!("{:#x}", x.ip))
            .collect();
        let d = format!(
            "{hits} of {} user samples of this thread in {:#x}..{:#x} ({p:.1}%); {own_kernel} kernel, {others} of other tasks{}",
            own_user.len(),
            range.0,
            range.1,
            if outside.is_empty() {
                String::new()
            } else {
                format!("; outside e.g. {}", outside.join(" "))
            }
        );
        if own_user.is_empty() || p < IN_LOOP_PERCENT {
            return Err(format!("{d}: want >= {IN_LOOP_PERCENT}%"));
        }
        Ok(d)
    });

    // Decode every raw payload once.
    let decoded: Vec<(u64, Result<OpRaw, String>)> =
        s.iter().map(|x| (x.ip, decode_op_raw(&x.raw))).collect();
    let ok: Vec<(u64, &OpRaw)> = decoded
        .iter()
        .filter_map(|(ip, d)| d.as_ref().ok().map(|o| (*ip, o)))
        .collect();

    c.run("raw", || {
        if let Some((i, (_, Err(e)))) = decoded.iter().enumerate().find(|(_, (_, d))| d.is_err())
        {
            let bad = decoded.iter().filter(|(_, d)| d.is_err()).count();
            return Err(format!("{bad} of {total} samples undecodable; sample {i}: {e}"));
        }
        let Some((_, o)) = ok.first() else {
            return Err("no samples".into());
        };
        if let Some((_, x)) = ok.iter().find(|(_, x)| x.caps != o.caps) {
            return Err(format!("caps changed between samples: {:#x} vs {:#x}", o.caps, x.caps));
        }
        Ok(format!(
            "{total} raw payloads, caps {:#x}, {} registers (BR_TARGET {}, OP_DATA4 {}), first MaxCnt {:#x}, OP_DATA {:#x}, OP_DATA3 {:#x}",
            o.caps,
            7 + o.br_target.is_some() as u32 + o.op_data4.is_some() as u32,
            if o.br_target.is_some() { "yes" } else { "no" },
            if o.op_data4.is_some() { "yes" } else { "no" },
            op_max_cnt(o),
            o.data,
            o.data3
        ))
    });

    c.run("ctl", || {
        if ok.is_empty() {
            return Err("no decodable samples".into());
        }
        let bad: Vec<(usize, String)> = ok
            .iter()
            .enumerate()
            .filter_map(|(i, (_, o))| op_ctl_problem(o).map(|p| (i, p)))
            .collect();
        if let Some((i, p)) = bad.first() {
            return Err(format!(
                "{} of {} samples bad; sample {i}: {p}",
                bad.len(),
                ok.len()
            ));
        }
        Ok(format!(
            "all {} samples have IBS_OP_CTL En=1 Val=1 MaxCnt!=0 (first {:#x})",
            ok.len(),
            ok[0].1.ctl
        ))
    });

    c.run("op-rip", || {
        if ok.is_empty() {
            return Err("no decodable samples".into());
        }
        let mut invalid = 0;
        let mut bad = Vec::new();
        for (i, (ip, o)) in ok.iter().enumerate() {
            match op_rip_check(*ip, o) {
                Ok(true) => invalid += 1,
                Ok(false) => {}
                Err(e) => bad.push((i, e)),
            }
        }
        if let Some((i, e)) = bad.first() {
            return Err(format!(
                "{} of {} samples; sample {i}: {e}",
                bad.len(),
                ok.len()
            ));
        }
        Ok(format!(
            "IBS_OP_RIP == sample ip in all {} samples ({invalid} with RipInvalid skipped)",
            ok.len() - invalid
        ))
    });

    c.run("physaddr", || {
        if ok.is_empty() {
            return Err("no decodable samples".into());
        }
        let bad: Vec<(usize, String)> = ok
            .iter()
            .enumerate()
            .filter_map(|(i, (_, o))| op_phys_problem(o).map(|p| (i, p)))
            .collect();
        if let Some((i, p)) = bad.first() {
            return Err(format!(
                "{} of {} samples; sample {i}: {p}",
                bad.len(),
                ok.len()
            ));
        }
        Ok(format!(
            "IBS_DC_PHYSADDR 0 and DcPhyAddrValid 0 in all {} samples",
            ok.len()
        ))
    });

    c.run("lost", || {
        let d = format!(
            "{} samples lost in {} LOST records; {} throttle, {} unthrottle, {} other records",
            r.lost, r.lost_records, r.throttle, r.unthrottle, r.other
        );
        if total == 0 && r.lost > 0 {
            return Err(format!("{d}: every sample was lost"));
        }
        Ok(d)
    });
}

fn fetch_samples_result(run: &Run, range: (u64, u64)) -> Result<(Vec<FetchRaw>, String), String> {
    let s = run.samples();
    let mut decoded = Vec::new();
    for (i, x) in s.iter().enumerate() {
        let f = decode_fetch_raw(&x.raw).map_err(|e| format!("sample {i}: {e}"))?;
        if f.linaddr != x.ip {
            return Err(format!(
                "sample {i}: IBS_FETCH_LINADDR {:#x} != sample ip {:#x}",
                f.linaddr, x.ip
            ));
        }
        decoded.push(f);
    }
    let good = decoded.iter().filter(|f| fetch_ctl_ok(f)).count();
    let in_loop = s
        .iter()
        .filter(|x| x.ip >= range.0 && x.ip < range.1)
        .count();
    let d = format!(
        "{}, {} samples, {good} with FETCH_CTL En=1 Val=1 MaxCnt!=0, {in_loop} in loop ({:.1}%), caps {}, lost {}, {} throttle; ran {} ms",
        run.mode,
        s.len(),
        percent(in_loop, s.len()),
        decoded
            .first()
            .map(|f| format!("{:#x}", f.caps))
            .unwrap_or_else(|| "?".into()),
        run.recs.lost,
        run.recs.throttle,
        run.elapsed.as_millis()
    );
    if let Some(e) = &run.parse_error {
        return Err(format!("{d}; ring buffer: {e}"));
    }
    if good == 0 {
        let first = decoded
            .first()
            .map(|f| format!(" (first FETCH_CTL {:#x})", f.ctl))
            .unwrap_or_default();
        return Err(format!("{d}: want >= 1 valid sample{first}"));
    }
    Ok((decoded, d))
}

fn fetch_physaddr_result(decoded: &[FetchRaw]) -> Result<String, String> {
    let bad: Vec<(usize, String)> = decoded
        .iter()
        .enumerate()
        .filter_map(|(i, f)| fetch_phys_problem(f).map(|p| (i, p)))
        .collect();
    if let Some((i, p)) = bad.first() {
        return Err(format!(
            "{} of {} samples; sample {i}: {p}",
            bad.len(),
            decoded.len()
        ));
    }
    Ok(format!(
        "IBS_FETCH_PHYSADDR 0 and PhyAddrValid 0 in all {} samples",
        decoded.len()
    ))
}

// ---- kernel log ----

/// The kernel log as lines: `klogctl(SYSLOG_ACTION_READ_ALL)` (two system calls),
/// else a non-blocking read of `/dev/kmsg` (one system call per record, bounded).
fn read_kernel_log() -> Result<Vec<String>, String> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER ignores the buffer arguments.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let klog_err = if size > 0 {
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf has room for `size` bytes.
        let n = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), size) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(String::from_utf8_lossy(&buf)
                .lines()
                .map(strip_klog_prefix)
                .collect());
        }
        std::io::Error::last_os_error()
    } else {
        std::io::Error::last_os_error()
    };
    read_dev_kmsg().map_err(|e| format!("klogctl: {klog_err}; /dev/kmsg: {e}"))
}

/// `<6>[    1.000000] text` -> `[    1.000000] text`.
fn strip_klog_prefix(l: &str) -> String {
    if let Some(rest) = l.strip_prefix('<') {
        if let Some(end) = rest.find('>') {
            if rest[..end].bytes().all(|b| b.is_ascii_digit()) {
                return rest[end + 1..].to_string();
            }
        }
    }
    l.to_string()
}

fn read_dev_kmsg() -> Result<Vec<String>, String> {
    let path = CString::new("/dev/kmsg").unwrap();
    // SAFETY: path is NUL-terminated.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 8192];
    for _ in 0..20_000 {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => break,
                Some(libc::EPIPE) => continue, // overwritten records: go on
                _ => return Err(e.to_string()),
            }
        }
        if n == 0 {
            break;
        }
        // "prio,seq,usec,flags;text\n[ KEY=value\n...]"
        let rec = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
        if let Some(first) = rec.lines().next() {
            lines.push(first.split_once(';').map_or(first, |(_, t)| t).to_string());
        }
    }
    Ok(lines)
}

/// The caps value of `perf: AMD IBS detected (0x%08x)`.
fn detected_caps(line: &str) -> Option<u32> {
    let rest =
        &line[line.find("perf: AMD IBS detected (0x")? + "perf: AMD IBS detected (0x".len()..];
    let hex = &rest[..rest.find(')')?];
    u32::from_str_radix(hex, 16).ok()
}

fn clip(l: &str) -> String {
    let t = l.trim();
    if t.chars().count() <= MAX_LINE {
        return t.to_string();
    }
    let mut s: String = t.chars().take(MAX_LINE).collect();
    s.push_str("...");
    s
}

fn lines_with<'a>(lines: &'a [String], pat: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.contains(pat)).collect()
}

fn none_of(lines: &[String], pat: &str) -> Result<String, String> {
    let hits = lines_with(lines, pat);
    if hits.is_empty() {
        return Ok(format!("no {pat:?} in {} log lines", lines.len()));
    }
    let shown: Vec<String> = hits.iter().take(3).map(|l| clip(l)).collect();
    Err(format!(
        "{} lines with {pat:?}: {}",
        hits.len(),
        shown.join(" | ")
    ))
}

fn log_results(c: &mut Check, sample_caps: Option<u32>) {
    let log = read_kernel_log();
    let lines = match &log {
        Ok(l) => l.as_slice(),
        Err(e) => {
            for what in [
                "log-detected",
                "log-unknown-nmi",
                "log-firmware-bug",
                "log-unchecked-msr",
            ] {
                c.run(what, || Err(format!("cannot read the kernel log: {e}")));
            }
            return;
        }
    };
    for l in lines_with(lines, "LVT offset").iter().take(2) {
        c.info(format_args!("kernel log: {}", clip(l)));
    }
    let slow = lines_with(lines, "perf: interrupt took too long");
    if let Some(last) = slow.last() {
        c.info(format_args!(
            "kernel log: {} x 'interrupt took too long', last: {}",
            slow.len(),
            clip(last)
        ));
    }
    c.run("log-detected", || {
        let Some(line) = lines
            .iter()
            .find(|l| l.contains("perf: AMD IBS detected (0x"))
        else {
            return Err(format!(
                "no \"perf: AMD IBS detected (0x\" in {} log lines",
                lines.len()
            ));
        };
        let caps = detected_caps(line);
        let d = format!(
            "caps {} ({})",
            caps.map_or("?".into(), |v| format!("{v:#x}")),
            clip(line)
        );
        match (caps, sample_caps) {
            (Some(a), Some(b)) if a != b => {
                Err(format!("{d}: but the raw samples carry caps {b:#x}"))
            }
            (None, _) => Err(format!("{d}: caps unparsable")),
            _ => Ok(d),
        }
    });
    c.run("log-unknown-nmi", || {
        none_of(lines, "NMI received for unknown reason")
    });
    c.run("log-firmware-bug", || none_of(lines, "[Firmware Bug]"));
    c.run("log-unchecked-msr", || {
        none_of(lines, "unchecked MSR access")
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ty: u32, misc: u16, body: &[u8]) -> Vec<u8> {
        let size = 8 + body.len();
        assert_eq!(size % 8, 0, "test record body must keep 8-byte alignment");
        let mut v = Vec::new();
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(&misc.to_le_bytes());
        v.extend_from_slice(&(size as u16).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    /// A sample record as the kernel writes it for IP | TID | RAW.
    fn sample_record(ip: u64, pid: u32, tid: u32, raw: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&ip.to_le_bytes());
        b.extend_from_slice(&pid.to_le_bytes());
        b.extend_from_slice(&tid.to_le_bytes());
        b.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        b.extend_from_slice(raw);
        while (8 + b.len()) % 8 != 0 {
            b.push(0);
        }
        record(PERF_RECORD_SAMPLE, 2, &b)
    }

    fn lost_record(id: u64, lost: u64) -> Vec<u8> {
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&lost.to_le_bytes());
        record(PERF_RECORD_LOST, 0, &b)
    }

    fn throttle_record(ty: u32) -> Vec<u8> {
        record(ty, 0, &[0u8; 24])
    }

    fn raw_payload(caps: u32, regs: &[u64]) -> Vec<u8> {
        let mut v = caps.to_le_bytes().to_vec();
        for r in regs {
            v.extend_from_slice(&r.to_le_bytes());
        }
        v
    }

    /// Writes `bytes` into a ring of `size` bytes starting at free-running offset
    /// `tail`, wrapping; returns the ring and head.
    fn ring_with(size: usize, tail: u64, bytes: &[u8]) -> (Vec<u8>, u64) {
        let mut ring = vec![0xAAu8; size];
        for (i, b) in bytes.iter().enumerate() {
            ring[(tail.wrapping_add(i as u64) % size as u64) as usize] = *b;
        }
        (ring, tail.wrapping_add(bytes.len() as u64))
    }

    const OP_REGS_7: [u64; 7] = [
        OP_VAL | OP_EN | 0x1000, // CTL
        0x5555_0000_1234,        // RIP
        0,                       // DATA
        0,                       // DATA2
        0,                       // DATA3
        0,                       // DC_LINADDR
        0,                       // DC_PHYSADDR
    ];

    #[test]
    fn parse_sample_lost_throttle() {
        let raw = raw_payload(0x1f, &OP_REGS_7);
        let mut bytes = sample_record(0x5555_0000_1234, 7, 8, &raw);
        bytes.extend(lost_record(1, 42));
        bytes.extend(throttle_record(PERF_RECORD_THROTTLE));
        bytes.extend(throttle_record(PERF_RECORD_UNTHROTTLE));
        bytes.extend(record(3, 0, &[0u8; 8])); // PERF_RECORD_COMM-ish: "other"
        let mut r = Records::default();
        parse_records(&bytes, true, &mut r).unwrap();
        assert_eq!(r.samples.len(), 1);
        assert_eq!(
            r.samples[0],
            Sample {
                ip: 0x5555_0000_1234,
                pid: 7,
                tid: 8,
                misc: 2,
                raw: raw.clone()
            }
        );
        assert_eq!((r.lost_records, r.lost), (1, 42));
        assert_eq!((r.throttle, r.unthrottle, r.other), (1, 1, 1));
        // The raw record is 4 + 4 + 7*8 = 64 bytes: no padding; sample = 8+16+64 = 88.
        assert_eq!(sample_record(0, 0, 0, &raw).len(), 88);
    }

    #[test]
    fn wrap_around() {
        let raw = raw_payload(
            0x3ff,
            &[OP_VAL | OP_EN | 1, 0x401000, 0, 0, 0, 0, 0, 0x401234],
        );
        let mut bytes = sample_record(0x401000, 1, 1, &raw);
        bytes.extend(sample_record(0x401008, 1, 1, &raw));
        bytes.extend(lost_record(9, 3));
        // 256-byte ring, free-running tail far past several wraps, records straddle.
        for tail in [0u64, 100 * 256 + 200, 256 * 7 + 8, u64::MAX - 50] {
            let (ring, head) = ring_with(256, tail, &bytes);
            let lin = unsafe { linearize(ring.as_ptr(), 256, tail, head) }.unwrap();
            assert_eq!(lin, bytes, "tail {tail}");
            let mut r = Records::default();
            parse_records(&lin, true, &mut r).unwrap();
            assert_eq!(r.samples.len(), 2);
            assert_eq!(r.samples[1].ip, 0x401008);
            assert_eq!(r.lost, 3);
            let o = decode_op_raw(&r.samples[0].raw).unwrap();
            assert_eq!(o.br_target, Some(0x401234));
        }
    }

    #[test]
    fn overrun_is_an_error() {
        let ring = [0u8; 64];
        let e = unsafe { linearize(ring.as_ptr(), 64, 0, 65) }.unwrap_err();
        assert!(e.contains("overrun"), "{e}");
        assert!(unsafe { linearize(ring.as_ptr(), 64, 10, 10) }
            .unwrap()
            .is_empty());
    }

    #[test]
    fn truncated_records() {
        let raw = raw_payload(0x1f, &OP_REGS_7);
        let full = sample_record(1, 1, 1, &raw);
        let mut r = Records::default();
        // Record cut short of its header size.
        let e = parse_records(&full[..48], true, &mut r).unwrap_err();
        assert!(e.contains("truncated record at +0"), "{e}");
        // Only part of a header.
        let mut two = full.clone();
        two.extend_from_slice(&[9, 0, 0, 0]);
        let mut r = Records::default();
        let e = parse_records(&two, true, &mut r).unwrap_err();
        assert!(e.contains("truncated record header at +88"), "{e}");
        assert_eq!(r.samples.len(), 1, "the samples before the error are kept");
        // A size of zero would loop forever: rejected.
        let e = parse_records(
            &record(9, 0, &[])[..4].repeat(2),
            true,
            &mut Records::default(),
        )
        .unwrap_err();
        assert!(e.contains("bad size 0"), "{e}");
        // Raw size overrunning the record.
        let mut bad = full.clone();
        bad[24..28].copy_from_slice(&1000u32.to_le_bytes());
        let e = parse_records(&bad, true, &mut Records::default()).unwrap_err();
        assert!(e.contains("raw size 1000 overruns"), "{e}");
    }

    #[test]
    fn samples_without_raw() {
        let mut b = Vec::new();
        b.extend_from_slice(&0x1234u64.to_le_bytes());
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&6u32.to_le_bytes());
        let rec = record(PERF_RECORD_SAMPLE, 2, &b);
        let mut r = Records::default();
        parse_records(&rec, false, &mut r).unwrap();
        assert_eq!(
            (r.samples[0].ip, r.samples[0].pid, r.samples[0].tid),
            (0x1234, 5, 6)
        );
        assert!(r.samples[0].raw.is_empty());
    }

    #[test]
    fn op_raw_layouts() {
        // caps 0x1f: no BR_TARGET, no OPDATA4: 7 registers.
        let o = decode_op_raw(&raw_payload(0x1f, &OP_REGS_7)).unwrap();
        assert_eq!(o.caps, 0x1f);
        assert_eq!(o.rip, 0x5555_0000_1234);
        assert_eq!((o.br_target, o.op_data4), (None, None));
        // caps 0x3ff: BR_TARGET (bit 5): 8 registers, the 8th is BR_TARGET.
        let mut regs = OP_REGS_7.to_vec();
        regs.push(0xbeef);
        let o = decode_op_raw(&raw_payload(0x3ff, &regs)).unwrap();
        assert_eq!((o.br_target, o.op_data4), (Some(0xbeef), None));
        // caps with OPDATA4 only and with both.
        let o = decode_op_raw(&raw_payload(0x41f, &regs)).unwrap();
        assert_eq!((o.br_target, o.op_data4), (None, Some(0xbeef)));
        regs.push(0xd4);
        let o = decode_op_raw(&raw_payload(0x7ff, &regs)).unwrap();
        assert_eq!((o.br_target, o.op_data4), (Some(0xbeef), Some(0xd4)));
        // Size must match the caps: 8 registers with caps 0x1f, 7 with 0x3ff.
        let e = decode_op_raw(&raw_payload(0x1f, &regs[..8])).unwrap_err();
        assert!(e.contains("raw size 68 bytes, want 60"), "{e}");
        let e = decode_op_raw(&raw_payload(0x3ff, &OP_REGS_7)).unwrap_err();
        assert!(e.contains("want 68"), "{e}");
        assert!(decode_op_raw(&[1, 2]).is_err());
    }

    #[test]
    fn op_checks() {
        let good = decode_op_raw(&raw_payload(0x1f, &OP_REGS_7)).unwrap();
        assert_eq!(op_ctl_problem(&good), None);
        assert_eq!(op_rip_check(0x5555_0000_1234, &good), Ok(false));
        assert!(op_rip_check(0x5555_0000_1235, &good).is_err());
        assert_eq!(op_phys_problem(&good), None);

        let mut no_val = good.clone();
        no_val.ctl &= !OP_VAL;
        assert!(op_ctl_problem(&no_val).unwrap().contains("Val 0"));
        let mut no_en = good.clone();
        no_en.ctl &= !OP_EN;
        assert!(op_ctl_problem(&no_en).unwrap().contains("En 0"));
        let mut no_max = good.clone();
        no_max.ctl &= !OP_MAX_CNT;
        assert!(op_ctl_problem(&no_max).is_some());
        // MaxCnt only in the extension bits counts with OPCNTEXT.
        no_max.ctl |= 1 << 20;
        assert!(op_ctl_problem(&no_max).is_some());
        no_max.caps |= CAPS_OPCNTEXT;
        assert_eq!(op_ctl_problem(&no_max), None);
        assert_eq!(op_max_cnt(&no_max), 0x10000);

        let mut phys = good.clone();
        phys.dc_physaddr = 0x1000;
        assert!(op_phys_problem(&phys).is_some());
        let mut phys_valid = good.clone();
        phys_valid.data3 |= OP_DATA3_DC_PHY_ADDR_VALID;
        assert!(op_phys_problem(&phys_valid).is_some());

        // RipInvalid is honoured only with caps RIPINVALIDCHK.
        let mut inv = good.clone();
        inv.data |= OP_DATA_RIP_INVALID;
        assert!(op_rip_check(1, &inv).is_err());
        inv.caps |= CAPS_RIPINVALIDCHK;
        assert_eq!(op_rip_check(1, &inv), Ok(true));
    }

    #[test]
    fn fetch_raw_layouts() {
        let ctl = FETCH_EN | FETCH_VAL | 0x100;
        let f = decode_fetch_raw(&raw_payload(0x1f, &[ctl, 0x401000, 0])).unwrap();
        assert_eq!(
            (f.ctl, f.linaddr, f.physaddr, f.ctl_ext),
            (ctl, 0x401000, 0, None)
        );
        assert!(fetch_ctl_ok(&f));
        assert_eq!(fetch_phys_problem(&f), None);
        let f = decode_fetch_raw(&raw_payload(0x3ff, &[ctl, 0x401000, 0, 0x77])).unwrap();
        assert_eq!(f.ctl_ext, Some(0x77));
        assert!(decode_fetch_raw(&raw_payload(0x3ff, &[ctl, 0x401000, 0])).is_err());
        let f = decode_fetch_raw(&raw_payload(0x1f, &[FETCH_VAL | 0x100, 1, 0])).unwrap();
        assert!(!fetch_ctl_ok(&f));
        let f = decode_fetch_raw(&raw_payload(0x1f, &[ctl | FETCH_PHY_ADDR_VALID, 1, 0])).unwrap();
        assert!(fetch_phys_problem(&f).is_some());
        let f = decode_fetch_raw(&raw_payload(0x1f, &[ctl, 1, 0xdead000])).unwrap();
        assert!(fetch_phys_problem(&f).is_some());
    }

    #[test]
    fn kernel_log_helpers() {
        assert_eq!(
            strip_klog_prefix("<6>[    0.512000] perf: AMD IBS detected (0x000003ff)"),
            "[    0.512000] perf: AMD IBS detected (0x000003ff)"
        );
        assert_eq!(strip_klog_prefix("<x>y"), "<x>y");
        assert_eq!(
            detected_caps("[    0.5] perf: AMD IBS detected (0x000003ff)"),
            Some(0x3ff)
        );
        assert_eq!(detected_caps("perf: AMD IBS detected (0x"), None);
        let lines = vec![
            "[ 1.0] Uhhuh. NMI received for unknown reason 3c on CPU 0.".to_string(),
            "[ 1.1] fine".to_string(),
        ];
        assert!(none_of(&lines, "NMI received for unknown reason")
            .unwrap_err()
            .contains("1 lines"));
        assert!(none_of(&lines, "[Firmware Bug]").is_ok());
    }

    #[test]
    fn options_parse() {
        assert_eq!(parse_u64("0x10000"), Some(0x10000));
        assert_eq!(parse_u64(" 65536 "), Some(65536));
        assert_eq!(parse_u64("zz"), None);
    }

    #[test]
    fn attr_layout() {
        let a = ibs_attr(11, 0x10000);
        assert_eq!(std::mem::size_of_val(&a), 128);
        let p = &a as *const PerfEventAttr as usize;
        assert_eq!(&a.flags as *const u64 as usize - p, 40);
        assert_eq!(&a.config1 as *const u64 as usize - p, 56);
        assert_eq!(&a.sample_regs_intr as *const u64 as usize - p, 96);
        assert_eq!(&a.sig_data as *const u64 as usize - p, 120);
        assert_eq!(a.flags, 1, "disabled only, no exclude_* bits");
    }

    fn fake_run(samples: Vec<Sample>) -> Run {
        Run {
            mode: "cpu-wide on cpu 0".into(),
            recs: Records {
                samples,
                lost_records: 1,
                lost: 2,
                throttle: 3,
                unthrottle: 3,
                other: 0,
            },
            parse_error: None,
            elapsed: Duration::from_millis(500),
            iterations: 1,
            pid: 100,
            tid: 100,
        }
    }

    /// The result functions over fixture runs: all pass on good samples; each bad
    /// property fails its own result.
    #[test]
    fn results_over_fixtures() {
        let range = (0x40_1000, 0x40_2000);
        let good = |ip: u64| {
            let mut regs = OP_REGS_7;
            regs[1] = ip;
            Sample {
                ip,
                pid: 100,
                tid: 100,
                misc: 2,
                raw: raw_payload(0x1f, &regs),
            }
        };
        let mut samples: Vec<Sample> = (0..20).map(|i| good(0x40_1010 + i)).collect();
        samples.push(good(0x40_5000)); // user, outside the loop: 20 of 21 = 95%
        let mut kernel = good(0xffff_ffff_8100_0000);
        kernel.pid = 0;
        kernel.tid = 0;
        samples.push(kernel);
        let mut c = Check::new("ibs-test");
        op_results(&mut c, &fake_run(samples.clone()), range, 10);
        assert_eq!(c.counts(), (7, 0));

        // Val clear, RIP mismatch, PHYSADDR set: exactly ctl, op-rip, physaddr fail.
        let mut bad = samples.clone();
        let mut regs = OP_REGS_7;
        regs[0] = OP_EN | 0x1000;
        regs[1] = 0x40_1100;
        regs[6] = 0x1234_5000;
        bad[0] = Sample {
            ip: 0x40_1108,
            raw: raw_payload(0x1f, &regs),
            ..bad[0].clone()
        };
        let mut c = Check::new("ibs-test");
        op_results(&mut c, &fake_run(bad), range, 10);
        assert_eq!(c.counts(), (4, 3));

        // Too few samples, mostly outside the loop.
        let few: Vec<Sample> = (0..5).map(|i| good(0x50_0000 + i)).collect();
        let mut c = Check::new("ibs-test");
        op_results(&mut c, &fake_run(few), range, 10);
        assert_eq!(c.counts(), (5, 2));

        // Fetch: one valid sample suffices; PHYSADDR must be 0.
        let fetch = |ctl: u64, lin: u64, phys: u64| Sample {
            ip: lin,
            pid: 100,
            tid: 100,
            misc: 2,
            raw: raw_payload(0x3ff, &[ctl, lin, phys, 0]),
        };
        let ok = FETCH_EN | FETCH_VAL | 0x1000;
        let run = fake_run(vec![
            fetch(FETCH_EN | 0x1000, 0x40_1000, 0),
            fetch(ok, 0x40_1004, 0),
        ]);
        let (dec, _) = fetch_samples_result(&run, range).unwrap();
        assert!(fetch_physaddr_result(&dec).is_ok());
        let run = fake_run(vec![fetch(FETCH_EN | 0x1000, 0x40_1000, 0)]);
        assert!(fetch_samples_result(&run, range).is_err());
        let run = fake_run(vec![fetch(ok, 0x40_1000, 0x9000)]);
        let (dec, _) = fetch_samples_result(&run, range).unwrap();
        assert!(fetch_physaddr_result(&dec).is_err());
    }

    #[test]
    fn kernel_log_readable() {
        match read_kernel_log() {
            Ok(lines) => assert!(!lines.is_empty()),
            Err(e) => eprintln!("kernel_log_readable skipped: {e}"),
        }
    }

    fn cpu_clock_attr() -> PerfEventAttr {
        PerfEventAttr {
            type_: PERF_TYPE_SOFTWARE,
            size: PERF_ATTR_SIZE_VER7,
            config: 0, // PERF_COUNT_SW_CPU_CLOCK
            sample_period: 100_000,
            sample_type: PERF_SAMPLE_IP | PERF_SAMPLE_TID,
            flags: ATTR_FLAG_DISABLED | ATTR_FLAG_EXCLUDE_KERNEL,
            ..Default::default()
        }
    }

    /// CPU-wide on the pinned CPU (the mode used for IBS on Linux 6.1): samples of
    /// other tasks may appear, most must be ours and in the loop.
    #[test]
    fn live_cpu_clock_cpu_wide() {
        let run = match sample(&cpu_clock_attr(), false, Mode::Cpu, 0.2) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("live_cpu_clock_cpu_wide skipped: {e}");
                return;
            }
        };
        assert_eq!(run.parse_error, None);
        let s = run.samples();
        let range = loop_range();
        let own = s.iter().filter(|x| x.tid == run.tid).count();
        let hits = s
            .iter()
            .filter(|x| x.ip >= range.0 && x.ip < range.1)
            .count();
        eprintln!(
            "live_cpu_clock_cpu_wide ({}): {} samples, {own} own, {hits} in loop",
            run.mode,
            s.len()
        );
        assert!(run.mode.starts_with("cpu-wide on cpu "));
        assert!(s.len() >= 50 && percent(hits, s.len()) >= 50.0);
    }

    /// The sampling machinery end to end with a software event (no IBS needed):
    /// cpu-clock samples of this thread, per-task, user only. Skipped where
    /// perf_event_open is not permitted.
    #[test]
    fn live_cpu_clock() {
        let run = match sample(&cpu_clock_attr(), false, Mode::Task, 0.3) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("live_cpu_clock skipped: {e}");
                return;
            }
        };
        assert_eq!(run.parse_error, None);
        let s = run.samples();
        let range = loop_range();
        let hits = s
            .iter()
            .filter(|x| x.ip >= range.0 && x.ip < range.1)
            .count();
        eprintln!(
            "live_cpu_clock: {} samples, {hits} in loop, lost {}, {} ms",
            s.len(),
            run.recs.lost,
            run.elapsed.as_millis()
        );
        assert!(s.len() >= 100, "{} samples", s.len());
        assert!(s.iter().all(|x| x.pid == run.pid && x.tid == run.tid));
        assert!(percent(hits, s.len()) >= 90.0, "{hits} of {}", s.len());
    }
}
