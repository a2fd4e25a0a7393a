//! Shared helpers for ibsvm's guest check programs.
//!
//! Every check is one static binary in `src/bin/`. The guest's `/init` runs each
//! program in `/checks` and takes exit status 0 as PASS. Programs print their own
//! result lines on stdout, each prefixed with the check's name:
//!
//! ```text
//! userspace: start
//! userspace: ok syscalls: 500 getpid calls, pid stable (3 ms)
//! userspace: FAIL pipeline: run 7: output "" (status signal 11) (1 ms)
//! userspace: done: 5 passed, 1 failed (120 ms)
//! ```
//!
//! What more than one check needs lives in the modules below: [`perf`] (the
//! `perf_event_open` ABI and calls), [`ring`] (the mmap'ed ring buffer and its records),
//! [`ibs_pmu`] (Linux's IBS PMUs: sysfs, event attr, raw payloads), [`cpu`] (pinning),
//! [`interrupts`] (`/proc/interrupts`), [`klog`] (the kernel log), [`options`]
//! (`KEY=VALUE` options) and [`fixtures`] (byte-exact records for unit tests).

pub mod cpu;
pub mod fixtures;
pub mod ibs_pmu;
pub mod interrupts;
pub mod klog;
pub mod options;
pub mod perf;
pub mod ring;

use std::ffi::OsString;
use std::fmt::Display;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// The busybox binary the checks run: `/bin/busybox` in the guest; the environment
/// variable `IBSVM_BUSYBOX` overrides it (for smoke tests on a host).
pub fn busybox() -> OsString {
    std::env::var_os("IBSVM_BUSYBOX").unwrap_or_else(|| OsString::from("/bin/busybox"))
}

/// One check program's results: counts sub-tests, prints one line per sub-test.
pub struct Check {
    name: &'static str,
    passed: u32,
    failed: u32,
    start: Instant,
}

impl Check {
    /// Starts a check and prints `NAME: start`.
    pub fn new(name: &'static str) -> Self {
        let c = Check {
            name,
            passed: 0,
            failed: 0,
            start: Instant::now(),
        };
        c.line(format_args!("start"));
        c
    }

    fn line(&self, msg: std::fmt::Arguments<'_>) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}: {}", self.name, msg);
        let _ = out.flush();
    }

    /// Prints an informational line (`NAME: info ...`) that is neither pass nor fail.
    pub fn info(&self, msg: impl Display) {
        self.line(format_args!("info {msg}"));
    }

    /// Runs one sub-test. `Ok(detail)` prints `NAME: ok WHAT: detail (T ms)`;
    /// `Err(detail)` or a panic prints `NAME: FAIL WHAT: detail (T ms)`.
    pub fn run(&mut self, what: &str, f: impl FnOnce() -> Result<String, String>) {
        let t = Instant::now();
        let res = match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(format!("panicked: {msg}"))
            }
        };
        let ms = t.elapsed().as_millis();
        match res {
            Ok(detail) => {
                self.passed += 1;
                self.line(format_args!("ok {what}: {detail} ({ms} ms)"));
            }
            Err(detail) => {
                self.failed += 1;
                self.line(format_args!("FAIL {what}: {detail} ({ms} ms)"));
            }
        }
    }

    /// Sub-tests passed and failed so far.
    pub fn counts(&self) -> (u32, u32) {
        (self.passed, self.failed)
    }

    /// Prints `NAME: done: P passed, F failed (T ms)` and exits: status 0 only if
    /// at least one sub-test ran and none failed, else 1.
    pub fn finish(self) -> ! {
        let ms = self.start.elapsed().as_millis();
        self.line(format_args!(
            "done: {} passed, {} failed ({ms} ms)",
            self.passed, self.failed
        ));
        let ok = self.failed == 0 && self.passed > 0;
        std::process::exit(if ok { 0 } else { 1 })
    }
}

/// Describes a `waitpid` status word: `exit N`, `signal N` or the raw value.
pub fn describe_wait_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("raw status {status:#x}")
    }
}

/// Describes a `std::process::ExitStatus` like [`describe_wait_status`].
pub fn describe_exit_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{status:?}"),
    }
}

/// The FS base as the kernel reports it (`arch_prctl(ARCH_GET_FS)`) and the two
/// self-pointers glibc keeps at the start of the TCB, read through the FS segment
/// (`%fs:0` = `tcb`, `%fs:0x10` = `self`). All three are equal when the FS base the
/// CPU uses matches the one the kernel holds for this thread.
pub fn fs_base_views() -> Result<(u64, u64, u64), String> {
    const ARCH_GET_FS: libc::c_int = 0x1003;
    let mut base: u64 = 0;
    // SAFETY: ARCH_GET_FS writes one u64 to the pointer given, which is valid.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_FS, &mut base as *mut u64) };
    if r != 0 {
        return Err(format!(
            "arch_prctl(ARCH_GET_FS) failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let tcb: u64;
    let selfp: u64;
    // SAFETY: glibc on x86-64 keeps a valid TCB header at the FS base of every
    // thread; these loads read its first and third words and change nothing.
    unsafe {
        std::arch::asm!("mov {0}, qword ptr fs:[0]", out(reg) tcb, options(nostack, readonly, preserves_flags));
        std::arch::asm!("mov {0}, qword ptr fs:[0x10]", out(reg) selfp, options(nostack, readonly, preserves_flags));
    }
    Ok((base, tcb, selfp))
}

/// Checks [`fs_base_views`] for consistency; `Err` describes a mismatch.
pub fn check_fs_base() -> Result<u64, String> {
    let (base, tcb, selfp) = fs_base_views()?;
    if base == 0 || base != tcb || base != selfp {
        return Err(format!(
            "FS base mismatch: arch_prctl {base:#x}, %fs:0 {tcb:#x}, %fs:0x10 {selfp:#x}"
        ));
    }
    Ok(base)
}
