//! `ibs-soak`: IBS programmed at random through perf for a bounded time, like perf_fuzzer
//! restricted to IBS: does the guest kernel with ibsvm's virtual IBS stay sane?
//!
//! One thread per online CPU, pinned to it, repeats random actions on its own events
//! until the deadline (at most [`MAX_EVENTS`] open per thread):
//! - open `ibs_op` or `ibs_fetch`, CPU-wide on its CPU (Linux 6.1 has no per-task IBS
//!   events), disabled, with a random period from the minimum (0x10) up to 2^20, the
//!   single-bit format fields the PMU advertises (`format/`, e.g. `cnt_ctl`, `rand_en`)
//!   set at random, and a ring buffer half of the time;
//! - enable, disable, change the period (`PERF_EVENT_IOC_PERIOD`), drain a ring, close;
//! - spin in user mode for a while (so that samples land in user code too).
//!
//! Results: `run` (how many of each action ran; at least one open and one enable must
//! have succeeded, else nothing was tested), `quiet` (all closed: no NMI on any CPU for
//! 0.3 s), `log-unknown-nmi` and `log-warnings` (kernel log since the start: no
//! `NMI received for unknown reason`, `Dazed and confused`, `WARNING:`, `BUG:`, `Oops`).
//! Failed opens and ioctls are counted, not failed on: random configurations may be
//! refused (EINVAL) by the kernel, which is its right.
//!
//! Options, as environment variables or `KEY=VALUE` arguments: `IBS_SOAK_SECONDS`
//! (default 10; `make soak` sets minutes' worth), `IBS_SOAK_SEED` (default: the clock).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use ibsvm_guest_checks::ibs_pmu::{self, pmu_type, MIN_PERIOD_6_1, SYSFS_PMUS};
use ibsvm_guest_checks::interrupts::Interrupts;
use ibsvm_guest_checks::klog::{self, none_of_any};
use ibsvm_guest_checks::options;
use ibsvm_guest_checks::perf;
use ibsvm_guest_checks::ring::{Records, Ring};
use ibsvm_guest_checks::Check;

/// Events one thread keeps open at most.
const MAX_EVENTS: usize = 4;
/// Largest random period.
const MAX_PERIOD: u64 = 1 << 20;
/// Ring buffer data pages (plus one metadata page).
const DATA_PAGES: usize = 4;
/// PERF_EVENT_IOC_PERIOD: _IOW('$', 4, u64) (include/uapi/linux/perf_event.h).
const PERF_EVENT_IOC_PERIOD: libc::c_ulong = 0x4008_2404;
const UNKNOWN_NMI: [&str; 2] = ["NMI received for unknown reason", "Dazed and confused"];
const WARNINGS: [&str; 3] = ["WARNING:", "BUG:", "Oops"];

/// xorshift64*: a seeded, reproducible stream (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// An IBS PMU: its type and the config bits of its single-bit format fields.
#[derive(Clone)]
struct Pmu {
    name: &'static str,
    type_: u32,
    bits: Vec<u64>,
}

impl Pmu {
    fn load(name: &'static str) -> Result<Pmu, String> {
        let type_ = pmu_type(name)?;
        let dir = format!("{SYSFS_PMUS}/{name}/format");
        let mut bits = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
            let path = entry.map_err(|e| format!("{dir}: {e}"))?.path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // "config:19" is one bit; ranges ("config:0-15") are not flags.
            if let Some(bit) = text
                .trim()
                .strip_prefix("config:")
                .and_then(|b| b.parse::<u32>().ok())
            {
                bits.push(1u64 << bit);
            }
        }
        Ok(Pmu { name, type_, bits })
    }
}

struct Event {
    fd: OwnedFd,
    ring: Option<Ring>,
}

/// What one thread did: counts by action ("open", "open-refused", ...).
type Tally = BTreeMap<&'static str, u64>;

fn soak(cpu: usize, pmus: &[Pmu], deadline: Instant, seed: u64) -> Result<Tally, String> {
    pin_to(cpu)?;
    let mut rng = Rng(seed | 1);
    let mut events: Vec<Event> = Vec::new();
    let mut tally = Tally::new();
    let mut records = Records::default();
    let bump = |t: &mut Tally, what: &'static str| *t.entry(what).or_default() += 1;
    while Instant::now() < deadline {
        let pick = rng.below(8);
        if events.is_empty() || (pick == 0 && events.len() < MAX_EVENTS) {
            let pmu = &pmus[rng.below(pmus.len() as u64) as usize];
            let period = MIN_PERIOD_6_1 + rng.below(MAX_PERIOD);
            let mut attr = ibs_pmu::attr(pmu.type_, period);
            for bit in &pmu.bits {
                if rng.below(2) == 1 {
                    attr.config |= bit;
                }
            }
            match perf::open(&attr, -1, cpu as libc::c_int) {
                Ok(fd) => {
                    let ring = if rng.below(2) == 1 {
                        Ring::map(&fd, DATA_PAGES).ok()
                    } else {
                        None
                    };
                    events.push(Event { fd, ring });
                    bump(
                        &mut tally,
                        if pmu.name == "ibs_op" {
                            "open-op"
                        } else {
                            "open-fetch"
                        },
                    );
                }
                Err(_) => bump(&mut tally, "open-refused"),
            }
            continue;
        }
        let i = rng.below(events.len() as u64) as usize;
        match pick {
            1 | 2 => match perf::enable(&events[i].fd) {
                Ok(()) => bump(&mut tally, "enable"),
                Err(_) => bump(&mut tally, "ioctl-refused"),
            },
            3 => match perf::disable(&events[i].fd) {
                Ok(()) => bump(&mut tally, "disable"),
                Err(_) => bump(&mut tally, "ioctl-refused"),
            },
            4 => {
                let period = MIN_PERIOD_6_1 + rng.below(MAX_PERIOD);
                // SAFETY: PERF_EVENT_IOC_PERIOD reads one u64 through the pointer, which
                // points at `period`, alive across the call; the fd is an open perf event.
                let r = unsafe {
                    libc::ioctl(
                        events[i].fd.as_raw_fd(),
                        PERF_EVENT_IOC_PERIOD,
                        &period as *const u64,
                    )
                };
                bump(&mut tally, if r == 0 { "period" } else { "ioctl-refused" });
            }
            5 => {
                if let Some(ring) = &events[i].ring {
                    ring.drain(true, &mut records)?;
                    bump(&mut tally, "drain");
                }
            }
            6 => {
                events.swap_remove(i);
                bump(&mut tally, "close");
            }
            _ => {
                let spins = rng.below(2_000_000);
                let mut x = 0u64;
                for k in 0..spins {
                    x = std::hint::black_box(x.wrapping_add(k));
                }
                bump(&mut tally, "spin");
            }
        }
    }
    for e in &events {
        let _ = perf::disable(&e.fd);
    }
    drop(events);
    *tally.entry("samples").or_default() += records.samples.len() as u64;
    *tally.entry("lost").or_default() += records.lost;
    Ok(tally)
}

/// Pins this thread to `cpu`.
fn pin_to(cpu: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data (all-zero is the empty set); CPU_SET writes a bit
    // inside it (cpu < CPU_SETSIZE, checked); sched_setaffinity reads the set.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(format!("cpu {cpu} out of range"));
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "sched_setaffinity(cpu {cpu}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() {
    let mut c = Check::new("ibs-soak");
    let opts = match options::Options::from_args(&["IBS_SOAK_SECONDS", "IBS_SOAK_SEED"]) {
        Ok(o) => o,
        Err(e) => {
            c.run("options", || Err(e));
            c.finish();
        }
    };
    let seconds = match opts.seconds("IBS_SOAK_SECONDS", 10.0, 0.1..=86_400.0) {
        Ok(s) => s,
        Err(e) => {
            c.run("options", || Err(e));
            c.finish();
        }
    };
    let seed = opts
        .get("IBS_SOAK_SEED")
        .and_then(|s| options::parse_u64(&s))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let cpus = online_cpus();
    c.info(format_args!(
        "options: {seconds} s on {cpus} CPUs, seed {seed:#x}"
    ));
    let _ = perf::lift_interrupt_time_limit();
    let log_before = klog::read().unwrap_or_default();

    let mut pmus = Vec::new();
    c.run("pmu", || {
        for name in ["ibs_op", "ibs_fetch"] {
            pmus.push(Pmu::load(name)?);
        }
        Ok(pmus
            .iter()
            .map(|p| {
                format!(
                    "{} type {} with {} flag bits",
                    p.name,
                    p.type_,
                    p.bits.len()
                )
            })
            .collect::<Vec<_>>()
            .join(", "))
    });
    if pmus.len() < 2 {
        c.finish();
    }

    c.run("run", || {
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let threads: Vec<_> = (0..cpus)
            .map(|cpu| {
                let pmus = pmus.clone();
                let seed = seed ^ (cpu as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                std::thread::spawn(move || soak(cpu, &pmus, deadline, seed))
            })
            .collect();
        let mut total = Tally::new();
        for t in threads {
            let tally = t
                .join()
                .map_err(|_| "a soak thread panicked".to_string())??;
            for (k, v) in tally {
                *total.entry(k).or_default() += v;
            }
        }
        let opened = total.get("open-op").copied().unwrap_or(0)
            + total.get("open-fetch").copied().unwrap_or(0);
        let d = total
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        if opened == 0 || total.get("enable").copied().unwrap_or(0) == 0 {
            return Err(format!(
                "{d}: nothing was opened and enabled, nothing tested"
            ));
        }
        Ok(d)
    });

    c.run("quiet", || {
        let before = Interrupts::read()?.total("NMI").unwrap_or(0);
        std::thread::sleep(Duration::from_millis(300));
        let after = Interrupts::read()?.total("NMI").unwrap_or(0);
        if after != before {
            return Err(format!("{} NMIs with every event closed", after - before));
        }
        Ok(format!(
            "no NMI in 0.3 s with every event closed ({after} in all)"
        ))
    });

    let log_after = klog::read().unwrap_or_default();
    let new = klog::new_lines(&log_before, &log_after);
    c.run("log-unknown-nmi", || none_of_any(new, &UNKNOWN_NMI));
    c.run("log-warnings", || none_of_any(new, &WARNINGS));
    c.finish();
}
