//! `ibs-clock`: the error of the synthetic IBS sampler's clock against a known guest
//! workload, on this host (`make bench` runs it here and inside the nested SVM host).
//!
//! The test kernel's `test=ibs-clock` spins a CPL3 loop once alone (no exit: its TSC ticks
//! are its own execution time) and once sampled by the op unit at a fixed period. Every
//! sample stands for one period of what the sampler counted as guest execution, so
//!
//! ```text
//! error = samples × period / loop time alone − 1
//! ```
//!
//! 0 is a sampler that counts exactly what the guest executed; +100 % one that counts twice
//! as much (host work charged to the guest: samples come too often, and pile up where the
//! host works). Prints `name: value` lines; fails only if the guest run fails.

use ibsvm_tests::{boot_testkernel, HostKind};

/// Nanoseconds of guest time per counted op at ibsvm's default `--ibs-scale`.
const NS_PER_OP: f64 = 1.0;
/// Ops per MaxCnt unit (the op period is MaxCnt × 16; AMD PPR, IBS_OP_CTL[15:0]).
const OPS_PER_MAXCNT: u64 = 16;

fn main() {
    let run = boot_testkernel("test=ibs-clock", &["--stats"]);
    run.assert_testkernel_pass("ibs-clock");
    let number = |what: &str| run.console_number(&format!("ibs-clock: {what} "), "");
    let alone_ticks = number("tsc alone");
    let samples = number("op samples");
    let maxcnt = number("maxcnt");
    let khz = run.stat("guest tsc_khz");
    let alone_ns = alone_ticks as f64 * 1e6 / khz as f64;
    let period_ns = (maxcnt * OPS_PER_MAXCNT) as f64 * NS_PER_OP;
    let counted_ns = samples as f64 * period_ns;
    println!("ibs_clock_host: {:?}", HostKind::detect());
    println!("ibs_clock_period_ns: {period_ns:.0}");
    println!("ibs_clock_loop_alone_ms: {:.1}", alone_ns / 1e6);
    println!(
        "ibs_clock_samples: {samples} (exact clock: {:.0})",
        alone_ns / period_ns
    );
    println!(
        "ibs_clock_error_pct: {:+.1}",
        (counted_ns / alone_ns - 1.0) * 100.0
    );
}
