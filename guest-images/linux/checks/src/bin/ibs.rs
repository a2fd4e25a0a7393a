//! `ibs`: does the guest kernel drive ibsvm's virtual AMD IBS PMU correctly?
//!
//! 1. `pmu`: `/sys/bus/event_source/devices/ibs_op` and `ibs_fetch` exist (their
//!    `type`); their `format/` and `caps/` files are printed as info.
//! 2. `ibs_op` sampling through `perf_event_open` (cycles mode, `sample_period`
//!    0x10000, IP + TID + RAW) while a known busy loop runs: enough samples, most of
//!    them in the loop, every raw IBS_OP_CTL with En and Val, MaxCnt set, IBS_OP_RIP
//!    equal to the sample IP (the guest kernel's decoding: Linux takes the IP from it),
//!    IBS_DC_PHYSADDR zero; lost records counted. Then `op-threads`:
//!    a second thread on the same CPU runs another loop, and no sample may put one
//!    thread's RIP on the other (a device presenting a stale RIP would).
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
//! then cpu), `IBS_CHECK_MIN_SAMPLES` (30). Exit status 0 only if every result passed.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use ibsvm_guest_checks::cpu::pin_to_current_cpu;
use ibsvm_guest_checks::ibs_pmu::{
    self, decode_fetch_raw, decode_op_raw, op_max_cnt, pmu_attributes, pmu_type, raw_caps,
    FetchRaw, OpRaw, CAPS_RIPINVALIDCHK, FETCH_EN, FETCH_MAX_CNT, FETCH_PHY_ADDR_VALID, FETCH_VAL,
    OP_DATA3_DC_PHY_ADDR_VALID, OP_DATA_RIP_INVALID, OP_EN, OP_VAL,
};
use ibsvm_guest_checks::klog::{self, clip, lines_with, none_of};
use ibsvm_guest_checks::options;
use ibsvm_guest_checks::perf::{self, PerfEventAttr};
use ibsvm_guest_checks::ring::{Records, Ring, Sample};
use ibsvm_guest_checks::Check;

/// Samples of this thread's user code that must fall in the busy loop, in percent. Not
/// more: the loop is where the thread spends nearly all of its *instructions*, but samples
/// follow the vCPU's run time, and on a host that emulates guest kernel code (docs/host-kvm.md)
/// the first touch of a new page costs the vCPU a lot of it with the RIP still at the
/// touching user instruction: in loaded runs up to 15% of the samples sat at the entries
/// of memset/memmove and in malloc, called by the ring drain between chunks. 75% of a
/// 4 KiB window still shows that the samples track the thread (its text is over 1 MiB).
const IN_LOOP_PERCENT: f64 = 75.0;
/// Fetch samples the short fetch run must bring (~40 come on a CPL0-emulating host, ~170
/// on a nested SVM one, at the default period and time).
const FETCH_MIN_SAMPLES: usize = 5;
/// The busy loop's body is assumed to lie within this many bytes of its entry.
const LOOP_RANGE: u64 = 4096;
/// Ring buffer data pages (plus one metadata page).
const DATA_PAGES: usize = 8;

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
        match klog::read() {
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

    // Emulated NMI handlers are slow: see perf::lift_interrupt_time_limit.
    match perf::lift_interrupt_time_limit() {
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
    let op_attr = ibs_pmu::attr(op_type, opts.op_period);
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
    c.run("op-threads", || {
        // Twice the op run: the two threads share the CPU.
        let (run, tid_b) = sample_two_threads(&op_attr, 2.0 * opts.op_seconds)?;
        let (a, b) = thread_loop_ranges();
        threads_result(run.samples(), (a, run.tid), (b, tid_b))
    });

    // 3. ibs_fetch sampling.
    let fetch_attr = ibs_pmu::attr(fetch_type, opts.fetch_period);
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
        let o = options::Options::from_args(&[
            "IBS_CHECK_PERIOD",
            "IBS_CHECK_SECONDS",
            "IBS_CHECK_FETCH_PERIOD",
            "IBS_CHECK_FETCH_SECONDS",
            "IBS_CHECK_MODE",
            "IBS_CHECK_MIN_SAMPLES",
        ])?;
        let mode = match o.get("IBS_CHECK_MODE").as_deref().map(str::trim) {
            None | Some("cpu") => Mode::Cpu,
            Some("task") => Mode::Task,
            Some("auto") => Mode::Auto,
            Some(m) => return Err(format!("IBS_CHECK_MODE={m:?}: want cpu, task or auto")),
        };
        let min_samples = o.number("IBS_CHECK_MIN_SAMPLES", 30, 1..=100_000)? as usize;
        Ok(Options {
            // The op unit's minimum period in newer kernels is 0x90; 6.1 takes 0x10.
            op_period: o.period("IBS_CHECK_PERIOD", 0x10000, 0x90)?,
            op_seconds: o.seconds("IBS_CHECK_SECONDS", 0.5, 0.01..=10.0)?,
            fetch_period: o.period("IBS_CHECK_FETCH_PERIOD", 0x10000, 0x10)?,
            fetch_seconds: o.seconds("IBS_CHECK_FETCH_SECONDS", 0.2, 0.01..=10.0)?,
            mode,
            min_samples,
        })
    }
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

/// The second thread's loop of `op-threads`: the same work with other constants, so that
/// the linker keeps it apart from [`busy_loop`].
#[inline(never)]
fn busy_loop_b(iters: u64, seed: u64) -> u64 {
    let mut x = seed;
    for _ in 0..iters {
        x = std::hint::black_box(
            x.wrapping_mul(2_862_933_555_777_941_757)
                .wrapping_add(3_037_000_493),
        );
    }
    x
}

/// The address ranges of the two loops of `op-threads`: from each function's entry, as far
/// as [`THREAD_LOOP_RANGE`] bytes but never into the other function.
fn thread_loop_ranges() -> ((u64, u64), (u64, u64)) {
    let entry = |f: fn(u64, u64) -> u64| f as usize as u64;
    let (a, b) = (entry(busy_loop), entry(busy_loop_b));
    let len = THREAD_LOOP_RANGE.min(a.abs_diff(b));
    ((a, a + len), (b, b + len))
}

/// Bytes from a loop function's entry that hold its loop, for `op-threads` (both loops are
/// a few instructions).
const THREAD_LOOP_RANGE: u64 = 128;

// ---- opening the events ----

/// Opens the event as `mode` says; returns the fd and a description of the mode.
fn open_for_mode(attr: &PerfEventAttr, mode: Mode) -> Result<(OwnedFd, String), String> {
    if mode != Mode::Cpu {
        match perf::open(attr, 0, -1) {
            Ok(fd) => return Ok((fd, "per-task".into())),
            Err(e) if mode == Mode::Auto && e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => {
                return Err(format!(
                    "perf_event_open type {} per-task: {e}{}",
                    attr.type_,
                    perf::errno_hint(&e, "per-task")
                ))
            }
        }
    }
    let cpu = pin_to_current_cpu()?;
    match perf::open(attr, -1, cpu) {
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
            perf::errno_hint(&e, "cpu")
        )),
    }
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
    let ring = Ring::map(&fd, DATA_PAGES)?;
    let mut recs = Records::default();
    let mut parse_error = None;
    let target = Duration::from_secs_f64(seconds);
    let chunk_target = Duration::from_millis(10);
    let mut chunk: u64 = MIN_CHUNK;
    let mut iterations = 0u64;
    let mut acc = 0x1234_5678u64;
    perf::enable(&fd)?;
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
    perf::disable(&fd)?;
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

/// `op-threads`: a second thread on this CPU runs [`busy_loop_b`] while this one samples
/// [`busy_loop`] CPU-wide, so that the scheduler switches between them while samples are
/// taken. Returns the run and the second thread's TID.
fn sample_two_threads(attr: &PerfEventAttr, seconds: f64) -> Result<(Run, u32), String> {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let tid = Arc::new(AtomicU32::new(0));
    // The thread inherits this thread's CPU affinity (pinned by main).
    let other = std::thread::spawn({
        let (stop, tid) = (Arc::clone(&stop), Arc::clone(&tid));
        move || {
            // SAFETY: no arguments.
            tid.store(
                unsafe { libc::syscall(libc::SYS_gettid) } as u32,
                Ordering::Release,
            );
            let mut acc = 0x9e37_79b9u64;
            while !stop.load(Ordering::Relaxed) {
                acc = busy_loop_b(MIN_CHUNK, acc);
            }
            std::hint::black_box(acc);
        }
    });
    while tid.load(Ordering::Acquire) == 0 {
        std::thread::yield_now();
    }
    let run = sample(attr, true, Mode::Cpu, seconds);
    stop.store(true, Ordering::Relaxed);
    other
        .join()
        .map_err(|_| "the second thread panicked".to_string())?;
    Ok((run?, tid.load(Ordering::Acquire)))
}

/// Every sample whose RIP lies in one thread's loop must be attributed (by the guest kernel,
/// from the task its NMI interrupted) to that thread: a device presenting a RIP from before
/// a context switch, such as the previous sample's, puts one thread's RIP on the other.
/// One such sample is tolerated: an interrupt the device had to defer (the guest was in an
/// NMI handler) can in principle arrive after a switch. At least three samples in each
/// loop, so that both ran sampled.
fn threads_result(
    samples: &[Sample],
    (a, tid_a): ((u64, u64), u32),
    (b, tid_b): ((u64, u64), u32),
) -> Result<String, String> {
    let within = |ip: u64, r: (u64, u64)| ip >= r.0 && ip < r.1;
    let (mut in_a, mut in_b) = (0usize, 0usize);
    let mut crossed = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        if within(s.ip, a) && s.tid == tid_a {
            in_a += 1;
        } else if within(s.ip, b) && s.tid == tid_b {
            in_b += 1;
        } else if within(s.ip, a) || within(s.ip, b) {
            crossed.push((i, s));
        }
    }
    if let (true, Some((i, s))) = (crossed.len() > MAX_CROSSED, crossed.first()) {
        return Err(format!(
            "{} samples carry a RIP of the other thread's loop; sample {i}: tid {}, ip {:#x} (thread {tid_a} loops at {:#x}, thread {tid_b} at {:#x})",
            crossed.len(),
            s.tid,
            s.ip,
            a.0,
            b.0
        ));
    }
    if in_a < 3 || in_b < 3 {
        return Err(format!(
            "too few samples to tell: {in_a} in thread {tid_a}'s loop, {in_b} in thread {tid_b}'s (want >= 3 each) of {}",
            samples.len()
        ));
    }
    Ok(format!(
        "{} samples: {in_a} in thread {tid_a}'s loop, {in_b} in thread {tid_b}'s, {} on the other thread (at most {MAX_CROSSED})",
        samples.len(),
        crossed.len()
    ))
}

/// Samples `op-threads` tolerates on the other thread's loop (see [`threads_result`]).
const MAX_CROSSED: usize = 1;

// ---- raw IBS payloads ----

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
/// because RipInvalid was set (caps RIPINVALIDCHK): `Ok(true)` then. This checks the
/// guest kernel's decoding of the raw record (Linux takes the sample IP from IBS_OP_RIP),
/// not the device: a wrong IBS_OP_RIP passes it. Where the device's RIPs land is judged by
/// `in-loop` and `op-threads`.
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
        // The ring drains between chunks: a device that floods it, or a drain that falls
        // behind, loses more than a tenth.
        if r.lost * 10 > total as u64 + r.lost {
            return Err(format!(
                "{d}: more than 10% of {} samples lost",
                total as u64 + r.lost
            ));
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
    if good < FETCH_MIN_SAMPLES || good < decoded.len() {
        let first_bad = decoded
            .iter()
            .find(|f| !fetch_ctl_ok(f))
            .map(|f| format!(" (first bad FETCH_CTL {:#x})", f.ctl))
            .unwrap_or_default();
        return Err(format!(
            "{d}: want >= {FETCH_MIN_SAMPLES} samples, all valid{first_bad}"
        ));
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

/// The caps value of `perf: AMD IBS detected (0x%08x)`.
fn detected_caps(line: &str) -> Option<u32> {
    let rest =
        &line[line.find("perf: AMD IBS detected (0x")? + "perf: AMD IBS detected (0x".len()..];
    let hex = &rest[..rest.find(')')?];
    u32::from_str_radix(hex, 16).ok()
}

fn log_results(c: &mut Check, sample_caps: Option<u32>) {
    let log = klog::read();
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

    fn at(ip: u64, tid: u32) -> Sample {
        Sample {
            ip,
            pid: 1,
            tid,
            misc: 0,
            raw: Vec::new(),
        }
    }

    #[test]
    fn threads_keep_their_own_rips() {
        let (a, b) = (((0x1000, 0x1080), 10), ((0x2000, 0x2080), 11));
        let mut s: Vec<Sample> = (0..4)
            .flat_map(|i| [at(0x1000 + i, 10), at(0x2000 + i, 11)])
            .collect();
        s.push(at(0xffff_ffff_8100_0000, 10)); // kernel: not judged
        s.push(at(0x5000, 11)); // elsewhere in thread 11: not judged
        assert!(threads_result(&s, a, b).is_ok());
        // The previous sample's RIP after a switch: thread 11 at thread 10's loop. One is
        // tolerated (a deferred interrupt), two are not.
        s.push(at(0x1004, 11));
        assert!(threads_result(&s, a, b)
            .unwrap()
            .contains("1 on the other thread"));
        s.push(at(0x2004, 10));
        let e = threads_result(&s, a, b).unwrap_err();
        assert!(e.contains("2 samples carry"), "{e}");
        // Too few to tell.
        let e = threads_result(&s[..3], a, b).unwrap_err();
        assert!(e.contains("too few"), "{e}");
    }
    use ibsvm_guest_checks::fixtures::{raw_payload, OP_REGS_7};
    use ibsvm_guest_checks::ibs_pmu::{CAPS_OPCNTEXT, OP_MAX_CNT};
    use ibsvm_guest_checks::perf::{
        ATTR_FLAG_DISABLED, ATTR_FLAG_EXCLUDE_KERNEL, PERF_ATTR_SIZE_VER7, PERF_SAMPLE_IP,
        PERF_SAMPLE_TID, PERF_TYPE_SOFTWARE,
    };

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
    fn fetch_checks() {
        let ctl = FETCH_EN | FETCH_VAL | 0x100;
        let f = decode_fetch_raw(&raw_payload(0x1f, &[ctl, 0x401000, 0])).unwrap();
        assert!(fetch_ctl_ok(&f));
        assert_eq!(fetch_phys_problem(&f), None);
        let f = decode_fetch_raw(&raw_payload(0x1f, &[FETCH_VAL | 0x100, 1, 0])).unwrap();
        assert!(!fetch_ctl_ok(&f));
        let f = decode_fetch_raw(&raw_payload(0x1f, &[ctl | FETCH_PHY_ADDR_VALID, 1, 0])).unwrap();
        assert!(fetch_phys_problem(&f).is_some());
        let f = decode_fetch_raw(&raw_payload(0x1f, &[ctl, 1, 0xdead000])).unwrap();
        assert!(fetch_phys_problem(&f).is_some());
    }

    #[test]
    fn detected_caps_line() {
        assert_eq!(
            detected_caps("[    0.5] perf: AMD IBS detected (0x000003ff)"),
            Some(0x3ff)
        );
        assert_eq!(detected_caps("perf: AMD IBS detected (0x"), None);
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

        // Too few samples, mostly outside the loop, and 2 of 7 lost (the fixture's LOST).
        let few: Vec<Sample> = (0..5).map(|i| good(0x50_0000 + i)).collect();
        let mut c = Check::new("ibs-test");
        op_results(&mut c, &fake_run(few), range, 10);
        assert_eq!(c.counts(), (4, 3));

        // Fetch: at least FETCH_MIN_SAMPLES, every one valid; PHYSADDR must be 0.
        let fetch = |ctl: u64, lin: u64, phys: u64| Sample {
            ip: lin,
            pid: 100,
            tid: 100,
            misc: 2,
            raw: raw_payload(0x3ff, &[ctl, lin, phys, 0]),
        };
        let ok = FETCH_EN | FETCH_VAL | 0x1000;
        let valid: Vec<Sample> = (0..FETCH_MIN_SAMPLES as u64)
            .map(|i| fetch(ok, 0x40_1000 + 4 * i, 0))
            .collect();
        let (dec, _) = fetch_samples_result(&fake_run(valid.clone()), range).unwrap();
        assert!(fetch_physaddr_result(&dec).is_ok());
        let mut one_invalid = valid.clone();
        one_invalid[0] = fetch(FETCH_EN | 0x1000, 0x40_1000, 0);
        assert!(fetch_samples_result(&fake_run(one_invalid), range).is_err());
        let too_few = valid[1..].to_vec();
        assert!(fetch_samples_result(&fake_run(too_few), range).is_err());
        let mut with_phys = valid;
        with_phys[0] = fetch(ok, 0x40_1000, 0x9000);
        let (dec, _) = fetch_samples_result(&fake_run(with_phys), range).unwrap();
        assert!(fetch_physaddr_result(&dec).is_err());
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
