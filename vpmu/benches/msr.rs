//! Cost of the device's MSR handlers alone (no VM exit), averaged over many iterations.
//! Prints `vpmu_rdmsr_ns: <value>` and `vpmu_wrmsr_ns: <value>`.
//!
//! RDMSR: IBS_OP_CTL, the register Linux's NMI handler reads first. WRMSR: IBS_OP_CTL with
//! En, the handler's re-arm (clear-before-start, new epoch, source armed) — the costliest
//! write on the sampling path.

use std::hint::black_box;
use std::time::Instant;

use vpmu::msr::{IBS_OP_CTL, OP_EN};
use vpmu::{NoGuestContext, Vpmu};

const ITERATIONS: u32 = 2_000_000;

fn per_iteration_ns(mut f: impl FnMut()) -> f64 {
    for _ in 0..ITERATIONS / 10 {
        f(); // warm-up
    }
    let start = Instant::now();
    for _ in 0..ITERATIONS {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(ITERATIONS)
}

fn main() {
    let mut vpmu = Vpmu::default();
    let ctx = &NoGuestContext;
    vpmu.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN, ctx)
        .expect("legal enable");

    let rd = per_iteration_ns(|| {
        black_box(vpmu.rdmsr(black_box(IBS_OP_CTL))).ok();
    });
    let wr = per_iteration_ns(|| {
        black_box(vpmu.wrmsr(black_box(IBS_OP_CTL), black_box(0x1000 | OP_EN), ctx)).ok();
    });
    println!("vpmu_rdmsr_ns: {rd:.1}");
    println!("vpmu_wrmsr_ns: {wr:.1}");
}
