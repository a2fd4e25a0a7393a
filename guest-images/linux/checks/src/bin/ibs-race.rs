//! `ibs-race`: a stock, unpatched Linux in the stale-IbsOpVal window, for real.
//!
//! Debian's 6.1.192 kernel lacks upstream fix 1b044ff3c17e: its `perf_ibs_start` sets
//! STARTED and then writes the enable, with no clearing write first, while
//! `perf_ibs_stop` writes back what it read, Val included. If a sample was latched
//! when the unit was stopped, and an NMI (here: the other IBS unit's) lands between
//! "set STARTED" and the enable write of the next start, the NMI handler takes the
//! stale Val for a sample and enables the unit from NMI context
//! (arch/x86/events/amd/ibs.c `perf_ibs_handle_irq`). This program does what it takes
//! to open that window as often as possible, and reports what the kernel does:
//!
//! 1. `pmu`: the types of `ibs_op` and `ibs_fetch`.
//! 2. `open`: pins itself to the CPU it runs on, lifts perf's interrupt-time limit
//!    (`kernel.perf_cpu_time_max_percent=0`; emulated NMI handlers are slow), opens
//!    `ibs_fetch` and `ibs_op`, both CPU-wide on that CPU (Linux 6.1 has no per-task
//!    IBS events), disabled, with IP | TID | RAW samples into a ring buffer each. The
//!    period of both is by default the smallest Linux 6.1 takes, 0x10: the most NMIs
//!    from the other unit, and the most op samples for a stop to write back.
//! 3. `toggle`: enables fetch, then toggles op with PERF_EVENT_IOC_ENABLE and
//!    PERF_EVENT_IOC_DISABLE (each ioctl runs `perf_ibs_start` or `perf_ibs_stop` on
//!    this CPU) for a bounded time, then disables fetch. Counts the toggles and this
//!    CPU's NMIs (`/proc/interrupts` `NMI:`, every NMI) and PMIs (`PMI:`, NMIs a perf
//!    handler claimed) meanwhile. `fetch-sampled`: fetch delivered samples (else no
//!    NMI came and nothing was tested).
//! 4. `stale-samples`: no sample of either unit carries a CTL with Val = 1 but En = 0.
//!    The device latches samples only while En = 1, so such a CTL was written back by
//!    `perf_ibs_stop` and read by an NMI handler that then emitted it and re-enabled
//!    the unit: the kernel caught in the window.
//! 5. `quiet`: with both events disabled, busy-loops in user mode (where ibsvm's
//!    synthetic sampler counts guest time at full rate) and counts NMIs on this CPU.
//!    Nothing is enabled, and the guest runs `nowatchdog` with no other NMI source
//!    (no PMU but IBS, no NMI IPIs unless the kernel dumps backtraces, which
//!    `log-warnings` would show), so any NMI means a unit left running behind
//!    perf's back: must be 0. `late-records`: neither ring gets a record (sample,
//!    throttle) after the final disable.
//! 6. Kernel log lines new since the start: `log-unknown-nmi` (none of
//!    `NMI received for unknown reason`, `Dazed and confused`), `log-warnings` (none of
//!    `WARNING:`, `BUG:`, `Oops`); lines about slow NMI handlers, perf's interrupt
//!    time and IBS are printed as info.
//!
//! One line `ibs-race: info result KEY=VALUE ...` carries the numbers (toggles,
//! samples, stale samples, lost, throttle records, NMIs and PMIs while toggling and
//! in the quiet period, matching log lines); the host side (`make race-linux`,
//! guest-images/linux/race_report.py) reads it next to ibsvm's `ibs.races_detected`.
//! Under `--ibs-policy protect` (ibsvm's default) the stale state cannot exist and
//! every result must pass; under `--ibs-policy faithful` a FAIL of `stale-samples`,
//! `quiet` or the log results is a finding about the guest kernel, not a bug here.
//!
//! Options, as environment variables (the kernel passes `KEY=VALUE` boot parameters to
//! init's environment) or `KEY=VALUE` arguments: `IBS_RACE_SECONDS` (how long to toggle,
//! default 3), `IBS_RACE_TOGGLES` (at most this many toggles, default 1000000),
//! `IBS_RACE_FETCH_PERIOD` and `IBS_RACE_OP_PERIOD` (default and minimum 0x10),
//! `IBS_RACE_QUIET_SECONDS` (0.3). The time bound is checked after every toggle, so a
//! toggle that an NMI storm stretches overruns it. Every ioctl is a system call whose
//! kernel code ibsvm's host may emulate: guest-images/linux/README.md has the measured
//! rates.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use ibsvm_guest_checks::cpu::pin_to_current_cpu;
use ibsvm_guest_checks::ibs_pmu::{
    self, decode_fetch_raw, decode_op_raw, pmu_type, FETCH_EN, FETCH_VAL, MIN_PERIOD_6_1, OP_EN,
    OP_VAL,
};
use ibsvm_guest_checks::interrupts::Interrupts;
use ibsvm_guest_checks::klog::{self, clip, lines_with, none_of_any};
use ibsvm_guest_checks::options;
use ibsvm_guest_checks::perf;
use ibsvm_guest_checks::ring::{Records, Ring, Sample};
use ibsvm_guest_checks::Check;

/// Ring buffer data pages (plus one metadata page) per event.
const DATA_PAGES: usize = 16;
/// The rings are drained every this many toggles (draining costs no system call).
const DRAIN_EVERY: u64 = 8;
/// Fewer toggles than this test nothing.
const MIN_TOGGLES: u64 = 10;
/// Default period of both units: the smallest Linux 6.1 takes. Where KVM emulates guest
/// kernel code the NMI handlers are slow, but the toggle loop still runs at about 100
/// toggles a second (guest-images/linux/README.md, "ibs-race").
const DEFAULT_PERIOD: u64 = MIN_PERIOD_6_1;
/// Kernel-log lines that fail the check, by result.
const UNKNOWN_NMI: [&str; 2] = ["NMI received for unknown reason", "Dazed and confused"];
const WARNINGS: [&str; 3] = ["WARNING:", "BUG:", "Oops"];
/// Kernel-log lines counted and shown, but not failed on: NMI handlers slower than
/// 1 ms (arch/x86/kernel/nmi.c `nmi_check_duration`) and perf lowering its sample
/// rate (kernel/events/core.c `perf_sample_event_took`); both are expected where NMI
/// handlers are emulated.
const SLOW_NMI: &str = "took too long to run";
const TOOK_TOO_LONG: &str = "perf: interrupt took too long";

fn main() {
    let mut c = Check::new("ibs-race");
    let opts = match Options::from_env_and_args() {
        Ok(o) => o,
        Err(e) => {
            c.run("options", || Err(e));
            c.finish();
        }
    };
    c.info(format_args!(
        "options: toggle for {} s or {} toggles, fetch period {:#x}, op period {:#x}, quiet {} s",
        opts.seconds, opts.max_toggles, opts.fetch_period, opts.op_period, opts.quiet_seconds
    ));

    let mut types = None;
    c.run("pmu", || {
        let op = pmu_type("ibs_op")?;
        let fetch = pmu_type("ibs_fetch")?;
        types = Some((op, fetch));
        Ok(format!("ibs_op type {op}, ibs_fetch type {fetch}"))
    });
    let Some((op_type, fetch_type)) = types else {
        c.finish();
    };

    let log_before = klog::read().unwrap_or_else(|e| {
        c.info(format_args!("kernel log unreadable at the start: {e}"));
        Vec::new()
    });

    let mut events = None;
    c.run("open", || {
        let cpu = pin_to_current_cpu()?;
        let limit = match perf::lift_interrupt_time_limit() {
            Ok(()) => "kernel.perf_cpu_time_max_percent=0".to_string(),
            Err(e) => format!("kernel.perf_cpu_time_max_percent unchanged: {e}"),
        };
        let fetch = Event::open("ibs_fetch", fetch_type, opts.fetch_period, cpu)?;
        let op = Event::open("ibs_op", op_type, opts.op_period, cpu)?;
        events = Some((cpu, fetch, op));
        Ok(format!(
            "ibs_fetch period {:#x}, ibs_op period {:#x}, CPU-wide on cpu {cpu}, disabled; {limit}",
            opts.fetch_period, opts.op_period
        ))
    });
    let Some((cpu, mut fetch, mut op)) = events else {
        c.finish();
    };

    let mut toggled = None;
    c.run("toggle", || {
        let t = toggle(&mut fetch, &mut op, cpu, &opts)?;
        let d = t.describe();
        let enough = t.toggles >= MIN_TOGGLES;
        toggled = Some(t);
        if !enough {
            return Err(format!("{d}: want >= {MIN_TOGGLES} toggles"));
        }
        Ok(d)
    });
    let Some(toggled) = toggled else {
        c.finish();
    };
    let fetch_n = fetch.records.samples.len();
    c.run("fetch-sampled", || {
        let d = format!(
            "{fetch_n} fetch samples, {} op samples; on cpu {cpu} {} NMIs, {} PMIs while toggling",
            op.records.samples.len(),
            toggled.nmi,
            toggled.pmi
        );
        if let Some(e) = fetch.parse_error.as_ref().or(op.parse_error.as_ref()) {
            return Err(format!("{d}; ring buffer: {e}"));
        }
        if fetch_n == 0 {
            return Err(format!("{d}: no fetch sample, so no NMI was tested"));
        }
        Ok(d)
    });
    let fetch_stale = stale_samples(&fetch.records.samples, Unit::Fetch);
    let op_stale = stale_samples(&op.records.samples, Unit::Op);
    c.run("stale-samples", || stale_result(&fetch_stale, &op_stale));

    let mut quiet = None;
    c.run("quiet", || {
        let q = quiet_period(&mut fetch, &mut op, cpu, opts.quiet_seconds)?;
        let d = q.describe(cpu);
        let nmi = q.nmi;
        quiet = Some(q);
        if nmi != 0 {
            return Err(format!(
                "{d}: an NMI while no IBS event is enabled means a unit was left running"
            ));
        }
        Ok(d)
    });
    // Without a quiet period (its failure is reported) the rings were not read after it.
    if let Some(late) = quiet.as_ref().map(|q| q.late_records) {
        c.run("late-records", || {
            let d = format!(
                "{late} records in the rings after the final disable (fetch {}, op {})",
                fetch.after_disable.total(),
                op.after_disable.total()
            );
            if late != 0 {
                return Err(d);
            }
            Ok(d)
        });
    }

    let log = match klog::read() {
        Ok(after) => Ok(klog::new_lines(&log_before, &after).to_vec()),
        Err(e) => Err(e),
    };
    let findings = log.as_ref().map(|l| LogFindings::of(l)).ok();
    log_results(&mut c, &log);

    let result = ResultLine {
        toggled: &toggled,
        fetch: &fetch.records,
        op: &op.records,
        fetch_stale: fetch_stale.len(),
        op_stale: op_stale.len(),
        quiet: quiet.as_ref(),
        log: findings.as_ref(),
    };
    c.info(format_args!("result {}", result.render()));
    c.finish();
}

// ---- options ----

struct Options {
    seconds: f64,
    max_toggles: u64,
    fetch_period: u64,
    op_period: u64,
    quiet_seconds: f64,
}

impl Options {
    fn from_env_and_args() -> Result<Self, String> {
        let o = options::Options::from_args(&[
            "IBS_RACE_SECONDS",
            "IBS_RACE_TOGGLES",
            "IBS_RACE_FETCH_PERIOD",
            "IBS_RACE_OP_PERIOD",
            "IBS_RACE_QUIET_SECONDS",
        ])?;
        Ok(Options {
            seconds: o.seconds("IBS_RACE_SECONDS", 3.0, 0.01..=600.0)?,
            max_toggles: o.number("IBS_RACE_TOGGLES", 1_000_000, 1..=1_000_000_000)?,
            fetch_period: o.period("IBS_RACE_FETCH_PERIOD", DEFAULT_PERIOD, MIN_PERIOD_6_1)?,
            op_period: o.period("IBS_RACE_OP_PERIOD", DEFAULT_PERIOD, MIN_PERIOD_6_1)?,
            quiet_seconds: o.seconds("IBS_RACE_QUIET_SECONDS", 0.3, 0.01..=10.0)?,
        })
    }
}

// ---- the events ----

/// One IBS event, its ring, and what the ring held.
struct Event {
    name: &'static str,
    fd: OwnedFd,
    ring: Ring,
    /// Records up to the final disable.
    records: Records,
    /// Records that arrived after it.
    after_disable: Records,
    /// The first ring-buffer parse error.
    parse_error: Option<String>,
}

impl Event {
    fn open(name: &'static str, pmu_type: u32, period: u64, cpu: i32) -> Result<Event, String> {
        let fd = perf::open(&ibs_pmu::attr(pmu_type, period), -1, cpu).map_err(|e| {
            format!(
                "perf_event_open {name} (type {pmu_type}) period {period:#x} cpu {cpu}: {e}{}",
                perf::errno_hint(&e, "cpu")
            )
        })?;
        let ring = Ring::map(&fd, DATA_PAGES).map_err(|e| format!("{name}: {e}"))?;
        Ok(Event {
            name,
            fd,
            ring,
            records: Records::default(),
            after_disable: Records::default(),
            parse_error: None,
        })
    }

    fn enable(&self) -> Result<(), String> {
        perf::enable(&self.fd).map_err(|e| format!("{}: {e}", self.name))
    }

    fn disable(&self) -> Result<(), String> {
        perf::disable(&self.fd).map_err(|e| format!("{}: {e}", self.name))
    }

    /// Moves what the ring holds into `records` (or `after_disable`).
    fn drain(&mut self, after_disable: bool) {
        if self.parse_error.is_some() {
            return;
        }
        let out = if after_disable {
            &mut self.after_disable
        } else {
            &mut self.records
        };
        if let Err(e) = self.ring.drain(true, out) {
            self.parse_error = Some(format!("{}: {e}", self.name));
        }
    }
}

// ---- toggling ----

/// What the toggle phase did.
struct Toggled {
    toggles: u64,
    elapsed: Duration,
    /// The longest enable/disable pair (an NMI storm shows here).
    longest: Duration,
    /// NMIs and PMIs on the pinned CPU from just before fetch was enabled to just
    /// after it was disabled.
    nmi: u64,
    pmi: u64,
}

impl Toggled {
    fn describe(&self) -> String {
        let ms = self.elapsed.as_secs_f64() * 1000.0;
        format!(
            "{} ibs_op enable/disable pairs in {ms:.0} ms ({:.0}/s, {:.0} us each, longest {} us) with ibs_fetch enabled",
            self.toggles,
            per_second(self.toggles, self.elapsed),
            if self.toggles == 0 { 0.0 } else { ms * 1000.0 / self.toggles as f64 },
            self.longest.as_micros()
        )
    }
}

fn per_second(n: u64, t: Duration) -> f64 {
    let s = t.as_secs_f64();
    if s == 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

/// The count of row `row` on `cpu`, or an error naming what is missing.
fn irq_count(i: &Interrupts, row: &str, cpu: i32) -> Result<u64, String> {
    i.count(row, cpu as u32)
        .ok_or_else(|| format!("/proc/interrupts has no {row} count for cpu {cpu}"))
}

/// Enables fetch, toggles op until the time or the toggle budget is spent, disables
/// fetch. Both rings are drained along the way.
fn toggle(fetch: &mut Event, op: &mut Event, cpu: i32, opts: &Options) -> Result<Toggled, String> {
    let before = Interrupts::read()?;
    fetch.enable()?;
    let budget = Duration::from_secs_f64(opts.seconds);
    let start = Instant::now();
    let mut toggles = 0u64;
    let mut longest = Duration::ZERO;
    let mut failure = None;
    while toggles < opts.max_toggles {
        let t = Instant::now();
        if let Err(e) = op.enable().and_then(|()| op.disable()) {
            failure = Some(e);
            break;
        }
        longest = longest.max(t.elapsed());
        toggles += 1;
        if toggles.is_multiple_of(DRAIN_EVERY) {
            fetch.drain(false);
            op.drain(false);
        }
        // A vDSO clock read, no system call.
        if start.elapsed() >= budget {
            break;
        }
    }
    let elapsed = start.elapsed();
    // Disable fetch even after a failed ioctl, so that the quiet period stays quiet.
    let disabled = fetch.disable();
    let after = Interrupts::read()?;
    fetch.drain(false);
    op.drain(false);
    if let Some(e) = failure {
        return Err(format!("after {toggles} toggles: {e}"));
    }
    disabled?;
    Ok(Toggled {
        toggles,
        elapsed,
        longest,
        nmi: irq_count(&after, "NMI", cpu)?.saturating_sub(irq_count(&before, "NMI", cpu)?),
        pmi: irq_count(&after, "PMI", cpu)?.saturating_sub(irq_count(&before, "PMI", cpu)?),
    })
}

// ---- stale samples ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Unit {
    Fetch,
    Op,
}

/// The samples whose raw CTL has Val = 1 but En = 0 (or that do not decode), with
/// that CTL (0 if undecodable).
fn stale_samples(samples: &[Sample], unit: Unit) -> Vec<(usize, u64)> {
    samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let (ctl, en, val) = match unit {
                Unit::Fetch => (decode_fetch_raw(&s.raw).ok()?.ctl, FETCH_EN, FETCH_VAL),
                Unit::Op => (decode_op_raw(&s.raw).ok()?.ctl, OP_EN, OP_VAL),
            };
            (ctl & val != 0 && ctl & en == 0).then_some((i, ctl))
        })
        .collect()
}

fn stale_result(fetch: &[(usize, u64)], op: &[(usize, u64)]) -> Result<String, String> {
    if fetch.is_empty() && op.is_empty() {
        return Ok(
            "no sample with a CTL of Val=1 En=0 (a value written back by perf_ibs_stop)".into(),
        );
    }
    let first = |v: &[(usize, u64)]| {
        v.first()
            .map(|(i, ctl)| format!(", first #{i} CTL {ctl:#x}"))
            .unwrap_or_default()
    };
    Err(format!(
        "{} op and {} fetch samples carry a CTL with Val=1 En=0{}{}: the NMI handler took a \
         stale Val for a sample and re-enabled the unit from NMI context (the kernel lacks \
         fix 1b044ff3c17e and the device kept the Val it wrote)",
        op.len(),
        fetch.len(),
        first(op),
        first(fetch)
    ))
}

// ---- the quiet period ----

/// What happened with both events disabled.
struct Quiet {
    elapsed: Duration,
    nmi: u64,
    pmi: u64,
    /// NMIs on the other CPUs (informational).
    nmi_elsewhere: u64,
    late_records: u64,
}

impl Quiet {
    fn describe(&self, cpu: i32) -> String {
        format!(
            "{} NMIs, {} PMIs on cpu {cpu} in {} ms of user-mode spinning with both events disabled ({} NMIs on other CPUs)",
            self.nmi,
            self.pmi,
            self.elapsed.as_millis(),
            self.nmi_elsewhere
        )
    }
}

fn quiet_period(
    fetch: &mut Event,
    op: &mut Event,
    cpu: i32,
    seconds: f64,
) -> Result<Quiet, String> {
    let before = Interrupts::read()?;
    let start = Instant::now();
    let budget = Duration::from_secs_f64(seconds);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while start.elapsed() < budget {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.rotate_left(7) ^ 0x5851_f42d);
        }
    }
    let elapsed = start.elapsed();
    let after = Interrupts::read()?;
    fetch.drain(true);
    op.drain(true);
    let nmi = irq_count(&after, "NMI", cpu)?.saturating_sub(irq_count(&before, "NMI", cpu)?);
    let all = |i: &Interrupts| i.total("NMI").unwrap_or(0);
    Ok(Quiet {
        elapsed,
        nmi,
        pmi: irq_count(&after, "PMI", cpu)?.saturating_sub(irq_count(&before, "PMI", cpu)?),
        nmi_elsewhere: all(&after).saturating_sub(all(&before)).saturating_sub(nmi),
        late_records: fetch.after_disable.total() + op.after_disable.total(),
    })
}

// ---- kernel log ----

/// Counts of the kernel-log lines this check looks for.
#[derive(Debug, Default, PartialEq)]
struct LogFindings {
    lines: usize,
    unknown_nmi: usize,
    warnings: usize,
    slow_nmi: usize,
    took_too_long: usize,
    ibs: usize,
}

fn is_ibs_line(l: &str) -> bool {
    l.contains("IBS") || l.contains("ibs_") || l.contains("perf_ibs")
}

impl LogFindings {
    fn of(lines: &[String]) -> LogFindings {
        let count = |pats: &[&str]| {
            lines
                .iter()
                .filter(|l| pats.iter().any(|p| l.contains(p)))
                .count()
        };
        LogFindings {
            lines: lines.len(),
            unknown_nmi: count(&UNKNOWN_NMI),
            warnings: count(&WARNINGS),
            slow_nmi: count(&[SLOW_NMI]),
            took_too_long: count(&[TOOK_TOO_LONG]),
            ibs: lines.iter().filter(|l| is_ibs_line(l)).count(),
        }
    }
}

fn log_results(c: &mut Check, log: &Result<Vec<String>, String>) {
    let lines = match log {
        Ok(l) => l.as_slice(),
        Err(e) => {
            for what in ["log-unknown-nmi", "log-warnings"] {
                c.run(what, || Err(format!("cannot read the kernel log: {e}")));
            }
            return;
        }
    };
    for (what, pat) in [
        ("slow NMI handler", SLOW_NMI),
        ("interrupt took too long", TOOK_TOO_LONG),
    ] {
        let hits = lines_with(lines, pat);
        if let Some(last) = hits.last() {
            c.info(format_args!(
                "kernel log: {} x {what}, last: {}",
                hits.len(),
                clip(last)
            ));
        }
    }
    for l in lines.iter().filter(|l| is_ibs_line(l)).take(5) {
        c.info(format_args!("kernel log: {}", clip(l)));
    }
    c.run("log-unknown-nmi", || none_of_any(lines, &UNKNOWN_NMI));
    c.run("log-warnings", || none_of_any(lines, &WARNINGS));
}

// ---- the result line ----

/// The numbers of one run, as `KEY=VALUE` pairs for the host side.
struct ResultLine<'a> {
    toggled: &'a Toggled,
    fetch: &'a Records,
    op: &'a Records,
    fetch_stale: usize,
    op_stale: usize,
    quiet: Option<&'a Quiet>,
    log: Option<&'a LogFindings>,
}

impl ResultLine<'_> {
    fn render(&self) -> String {
        let t = self.toggled;
        let (f, o) = (self.fetch, self.op);
        let mut pairs: Vec<(&str, String)> = vec![
            ("toggles", t.toggles.to_string()),
            ("toggle_ms", t.elapsed.as_millis().to_string()),
            ("longest_toggle_ms", t.longest.as_millis().to_string()),
            ("fetch_samples", f.samples.len().to_string()),
            ("op_samples", o.samples.len().to_string()),
            ("fetch_stale_samples", self.fetch_stale.to_string()),
            ("op_stale_samples", self.op_stale.to_string()),
            ("lost", (f.lost + o.lost).to_string()),
            ("throttle", (f.throttle + o.throttle).to_string()),
            ("unthrottle", (f.unthrottle + o.unthrottle).to_string()),
            ("nmi", t.nmi.to_string()),
            ("pmi", t.pmi.to_string()),
        ];
        // Unknown where that step did not run: "-".
        let or_dash = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
        let q = self.quiet;
        pairs.extend([
            ("quiet_ms", or_dash(q.map(|q| q.elapsed.as_millis() as u64))),
            ("quiet_nmi", or_dash(q.map(|q| q.nmi))),
            ("quiet_pmi", or_dash(q.map(|q| q.pmi))),
            ("late_records", or_dash(q.map(|q| q.late_records))),
        ]);
        let l = self.log;
        let log = |f: fn(&LogFindings) -> usize| or_dash(l.map(|l| f(l) as u64));
        pairs.extend([
            ("unknown_nmi", log(|l| l.unknown_nmi)),
            ("warnings", log(|l| l.warnings)),
            ("slow_nmi_handler", log(|l| l.slow_nmi)),
            ("took_too_long", log(|l| l.took_too_long)),
            ("ibs_log_lines", log(|l| l.ibs)),
        ]);
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ibsvm_guest_checks::fixtures::{raw_payload, OP_REGS_7};

    fn sample(raw: Vec<u8>) -> Sample {
        Sample {
            ip: 0x40_1000,
            pid: 1,
            tid: 1,
            misc: 2,
            raw,
        }
    }

    #[test]
    fn stale_means_val_without_en() {
        let mut regs = OP_REGS_7;
        let good = sample(raw_payload(0x1f, &regs));
        regs[0] = OP_VAL | 0x1000; // written back by perf_ibs_stop: En cleared
        let stale = sample(raw_payload(0x1f, &regs));
        regs[0] = OP_EN | 0x1000; // no Val: not a sample the handler would take
        let no_val = sample(raw_payload(0x1f, &regs));
        let undecodable = sample(vec![1, 2, 3]);
        let s = [good, stale, no_val, undecodable];
        assert_eq!(stale_samples(&s, Unit::Op), vec![(1, OP_VAL | 0x1000)]);

        let fetch_ok = sample(raw_payload(0x1f, &[FETCH_EN | FETCH_VAL | 1, 0x40_1000, 0]));
        let fetch_stale = sample(raw_payload(0x1f, &[FETCH_VAL | 1, 0x40_1000, 0]));
        assert_eq!(
            stale_samples(&[fetch_ok, fetch_stale], Unit::Fetch),
            vec![(1, FETCH_VAL | 1)]
        );
        // The units' bits differ: an op payload is not read as a fetch one.
        assert!(stale_samples(&s[..2], Unit::Fetch).is_empty());
    }

    #[test]
    fn stale_result_names_the_first() {
        assert!(stale_result(&[], &[]).is_ok());
        let e = stale_result(&[], &[(4, 0x41000)]).unwrap_err();
        assert!(e.starts_with("1 op and 0 fetch samples"), "{e}");
        assert!(e.contains("first #4 CTL 0x41000"), "{e}");
    }

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn log_findings() {
        let l = lines(&[
            "[ 300.1] Uhhuh. NMI received for unknown reason 3d on CPU 0.",
            "[ 300.1] Dazed and confused, but trying to continue",
            "[ 300.2] INFO: NMI handler (perf_ibs_nmi_handler) took too long to run: 2.100 msecs",
            "[ 300.3] WARNING: CPU: 0 PID: 80 at arch/x86/events/amd/ibs.c:402 perf_ibs_start+0x1/0x2",
            "[ 300.4] perf: interrupt took too long (2510 > 2500), lowering kernel.perf_event_max_sample_rate to 79000",
            "[ 300.5] fine",
        ]);
        assert_eq!(
            LogFindings::of(&l),
            LogFindings {
                lines: 6,
                unknown_nmi: 2,
                warnings: 1,
                slow_nmi: 1,
                took_too_long: 1,
                ibs: 2,
            }
        );
        assert!(none_of_any(&l, &UNKNOWN_NMI)
            .unwrap_err()
            .starts_with("2 lines with"));
        assert!(none_of_any(&l[5..], &WARNINGS).is_ok());
    }

    #[test]
    fn result_line() {
        let toggled = Toggled {
            toggles: 1200,
            elapsed: Duration::from_millis(3001),
            longest: Duration::from_millis(42),
            nmi: 40,
            pmi: 38,
        };
        let fetch = Records {
            samples: vec![sample(Vec::new()); 3],
            lost: 2,
            throttle: 1,
            ..Records::default()
        };
        let op = Records {
            samples: vec![sample(Vec::new())],
            lost: 1,
            unthrottle: 1,
            ..Records::default()
        };
        let quiet = Quiet {
            elapsed: Duration::from_millis(300),
            nmi: 0,
            pmi: 0,
            nmi_elsewhere: 1,
            late_records: 0,
        };
        let log = LogFindings {
            lines: 9,
            unknown_nmi: 0,
            warnings: 0,
            slow_nmi: 4,
            took_too_long: 0,
            ibs: 0,
        };
        let mut r = ResultLine {
            toggled: &toggled,
            fetch: &fetch,
            op: &op,
            fetch_stale: 0,
            op_stale: 1,
            quiet: Some(&quiet),
            log: Some(&log),
        };
        assert_eq!(
            r.render(),
            "toggles=1200 toggle_ms=3001 longest_toggle_ms=42 fetch_samples=3 op_samples=1 fetch_stale_samples=0 \
             op_stale_samples=1 lost=3 throttle=1 unthrottle=1 nmi=40 pmi=38 quiet_ms=300 \
             quiet_nmi=0 quiet_pmi=0 late_records=0 unknown_nmi=0 warnings=0 \
             slow_nmi_handler=4 took_too_long=0 ibs_log_lines=0"
        );
        // Steps that did not run are "-", not 0.
        r.quiet = None;
        r.log = None;
        let line = r.render();
        assert!(line.contains(" quiet_nmi=- "), "{line}");
        assert!(line.ends_with(" ibs_log_lines=-"), "{line}");
    }

    #[test]
    fn toggle_rate() {
        let t = Toggled {
            toggles: 500,
            elapsed: Duration::from_secs(2),
            longest: Duration::from_micros(9000),
            nmi: 0,
            pmi: 0,
        };
        assert_eq!(
            t.describe(),
            "500 ibs_op enable/disable pairs in 2000 ms (250/s, 4000 us each, longest 9000 us) with ibs_fetch enabled"
        );
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
    }
}
