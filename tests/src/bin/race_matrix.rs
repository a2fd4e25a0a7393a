//! `race-matrix`: the stale-IbsOpVal race matrix under real KVM, as a table.
//!
//! Boots the race test kernel (guest-images/testkernel, `test=race`) for each start-path
//! order (prefix = unpatched, fixed = 1b044ff3c17e) under each `--ibs-policy`, and prints
//! one row per boot. Exit status 0 only if every row is as expected: only prefix +
//! faithful reproduces the race, in every run; the other cells never do.
//!
//! ```text
//! race-matrix                 the window every round (20 rounds), with --ibs-race-check
//!                             warn and again with fail (ibsvm then exits 121)
//! race-matrix --stress        random NMI points around start and stop (60000 rounds),
//!                             warn only; protect cells must inject >= 100000 NMIs
//!   [--rounds N] [--seed S] [--min-nmis N]
//! ```

use std::process::ExitCode;

use ibsvm_tests::race::{Cell, CellRun, Plan, RaceCheck};

const USAGE: &str = "usage: race-matrix [--stress] [--rounds N] [--seed S] [--min-nmis N]";

struct Options {
    plan: Plan,
    min_nmis: u64,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let stress = args.iter().any(|a| a == "--stress");
    let mut plan = if stress {
        Plan {
            rounds: 60_000,
            stress: true,
            seed: 1,
        }
    } else {
        Plan::MATRIX
    };
    let mut min_nmis = if stress { 100_000 } else { 0 };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse().map_err(|_| format!("{name} {v:?}: not a number"))
        };
        match a.as_str() {
            "--stress" => {}
            "--rounds" => plan.rounds = number("--rounds")?.max(1),
            "--seed" => plan.seed = number("--seed")?,
            "--min-nmis" => min_nmis = number("--min-nmis")?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Options { plan, min_nmis })
}

fn row(r: &CellRun, problems: &[String]) {
    let opt = |v: Option<u64>| v.map_or("-".into(), |n| n.to_string());
    println!(
        "{:<18} {:<5} {:>4} {:>10} {:>8} {:>10} {:>9}  {}",
        r.cell.to_string(),
        format!("{:?}", r.check).to_lowercase(),
        r.code(),
        opt(r.accidental()),
        r.stat("ibs.races_detected"),
        r.stat("ibs.stale_val_reads"),
        r.stat("ibs.nmis_injected"),
        if problems.is_empty() {
            "ok".to_string()
        } else {
            format!("UNEXPECTED: {}", problems.join("; "))
        }
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("race-matrix: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let plan = opts.plan;
    let checks: &[RaceCheck] = if plan.stress {
        &[RaceCheck::Warn]
    } else {
        &[RaceCheck::Warn, RaceCheck::Fail]
    };
    println!(
        "race matrix: test=race rounds={} stress={} seed={}{}",
        plan.rounds,
        u8::from(plan.stress),
        plan.seed,
        if opts.min_nmis > 0 {
            format!(", protect cells need >= {} NMIs", opts.min_nmis)
        } else {
            String::new()
        }
    );
    println!(
        "{:<18} {:<5} {:>4} {:>10} {:>8} {:>10} {:>9}  verdict",
        "order + policy", "check", "exit", "accidental", "races", "stale Val", "NMIs"
    );
    let mut failed = 0;
    for &check in checks {
        for cell in Cell::all() {
            let r = cell.run(plan, check);
            let mut problems = r.problems(plan);
            let nmis = r.stat("ibs.nmis_injected");
            if cell.policy == ibsvm_tests::race::Policy::Protect && nmis < opts.min_nmis {
                problems.push(format!("{nmis} NMIs injected, want >= {}", opts.min_nmis));
            }
            row(&r, &problems);
            if !problems.is_empty() {
                failed += 1;
                eprintln!("--- {cell} ({check:?}) ---\n{}", r.run);
            }
        }
    }
    if failed > 0 {
        println!("race matrix: {failed} row(s) not as expected");
        return ExitCode::FAILURE;
    }
    println!("race matrix: every row as expected (only prefix + faithful reproduces the race)");
    ExitCode::SUCCESS
}
