//! The vCPU thread's CPU time: the clock of guest run time (the synthetic IBS sampler's
//! periods, `--guest-profile` intervals).
//!
//! Wall time inside `KVM_RUN` would also count the time the host ran other threads while
//! the vCPU thread waited for a CPU: on a loaded host every period would then expire
//! early, and on a host that emulates guest kernel code the expiries would pile up in
//! kernel code, whose emulation takes the most wall time. CPU time is what the guest got.

use std::time::Duration;

/// CPU time this thread has consumed so far.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, a valid, exclusively borrowed
    // local; CLOCK_THREAD_CPUTIME_ID is supported by every Linux since 2.6.12, so the call
    // cannot fail (and `ts` would stay zero if it did).
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_this_threads_work_not_its_sleep() {
        let t0 = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_time() - t0;
        assert!(
            slept < Duration::from_millis(10),
            "sleep counted: {slept:?}"
        );
        let t1 = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() - t1 < Duration::from_millis(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(thread_cpu_time() - t1 >= Duration::from_millis(5));
    }
}
