//! `userspace`: does ordinary Linux userspace work in the guest?
//!
//! Exercises what a stock kernel on ibsvm's host needs from the VMM: system calls
//! from CPL3, fork/exec/wait, pipelines (the known failure: busybox applets on the
//! reading side of a pipeline died at start with a segfault in glibc's
//! `__ctype_init`: AVX state shared between tasks, see the `fpu` check), threads with thread-locals (the FS base
//! across context switches) and /proc. Kept to a few thousand system calls, since
//! every guest system call runs emulated kernel code.
//!
//! Exit status 0 only if every sub-test passed. `IBSVM_BUSYBOX` overrides
//! `/bin/busybox` (host smoke tests).

use std::cell::Cell;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};

use ibsvm_guest_checks::{
    busybox, check_fs_base, describe_exit_status, describe_wait_status, Check,
};

const GETPID_CALLS: u32 = 500;
const FORK_EXEC_RUNS: u32 = 10;
const PIPELINE_RUNS: u32 = 8;
const THREADS: usize = 4;
const THREAD_ITERS: u64 = 100_000;
const THREAD_YIELDS: u64 = 50;

thread_local! {
    static COUNTER: Cell<u64> = const { Cell::new(0) };
    static MARK: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn main() {
    let mut c = Check::new("userspace");
    let mut uts: libc::utsname = unsafe_zeroed_utsname();
    // SAFETY: uname writes into the utsname struct passed, which is valid.
    if unsafe { libc::uname(&mut uts) } == 0 {
        c.info(format!(
            "kernel {} pid {}",
            cstr_field(&uts.release),
            std::process::id()
        ));
    }
    c.run("syscalls", syscalls);
    c.run("fork-exec", fork_exec);
    c.run("pipeline", pipeline);
    c.run("threads", threads);
    c.run("cpuinfo", cpuinfo);
    c.finish();
}

fn unsafe_zeroed_utsname() -> libc::utsname {
    // SAFETY: utsname is plain old data (arrays of c_char); all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn cstr_field(f: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = f
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Many cheap system calls; the pid must stay the same and the FS base (TLS)
/// consistent across them.
fn syscalls() -> Result<String, String> {
    let pid = std::process::id() as libc::c_long;
    let base0 = check_fs_base()?;
    MARK.with(|m| m.set(0x5eed));
    for i in 0..GETPID_CALLS {
        // SAFETY: getpid has no arguments and cannot fail.
        let p = unsafe { libc::syscall(libc::SYS_getpid) };
        if p != pid {
            return Err(format!("call {i}: getpid returned {p}, expected {pid}"));
        }
        if i % 100 == 99 {
            let b = check_fs_base().map_err(|e| format!("after call {i}: {e}"))?;
            if b != base0 {
                return Err(format!(
                    "after call {i}: FS base moved {base0:#x} -> {b:#x}"
                ));
            }
            if MARK.with(|m| m.get()) != 0x5eed {
                return Err(format!("after call {i}: thread-local value changed"));
            }
        }
    }
    Ok(format!(
        "{GETPID_CALLS} getpid calls, pid {pid} stable, FS base {base0:#x} stable"
    ))
}

/// fork + exec of `busybox true` + wait, many times. The child checks its FS base
/// (inherited TLS) before exec; exit status must be 0 every time.
fn fork_exec() -> Result<String, String> {
    let bb = CString::new(busybox().as_bytes()).map_err(|e| e.to_string())?;
    let arg1 = CString::new("true").unwrap();
    let argv = [bb.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    for i in 0..FORK_EXEC_RUNS {
        // SAFETY: the child only calls async-signal-safe code (the FS-base check is
        // a system call and two loads) before execv or _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!(
                "run {i}: fork failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        if pid == 0 {
            // SAFETY: in the forked child; execv gets NUL-terminated strings and a
            // NULL-terminated argv that live until the call; _exit never returns.
            unsafe {
                if check_fs_base().is_err() {
                    libc::_exit(3);
                }
                libc::execv(bb.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
        }
        let mut status: libc::c_int = 0;
        // SAFETY: waits for our own child; status points to a valid c_int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r != pid {
            return Err(format!(
                "run {i}: waitpid failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            let what = match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
                (true, 3) => " (child saw an inconsistent FS base)".to_string(),
                (true, 127) => format!(" (execv {:?} failed)", bb),
                _ => String::new(),
            };
            return Err(format!(
                "run {i}: child {}{what}",
                describe_wait_status(status)
            ));
        }
    }
    Ok(format!(
        "{FORK_EXEC_RUNS} fork+exec+wait of busybox true, all exit 0"
    ))
}

/// `sh -c 'echo ... | busybox cat | busybox grep ...'`, output checked every time.
/// The reading-side applets are exec'd by path, so each starts a fresh static
/// glibc (the `__ctype_init` TLS read that used to segfault).
fn pipeline() -> Result<String, String> {
    let bb = busybox();
    // $1 = busybox path, $2 = run number. pipefail: a crash anywhere fails the run.
    let script = r#"set -o pipefail; echo "ibsvm-pipe $2 token" | "$1" cat | "$1" grep token"#;
    for i in 0..PIPELINE_RUNS {
        let mut cmd = Command::new(&bb);
        cmd.args(["sh", "-c", script, "sh"])
            .arg(&bb)
            .arg(i.to_string())
            .stdin(Stdio::null());
        // SAFETY: the hook does nothing. Having one makes std fork+exec instead of
        // posix_spawn, whose child resets all 64 signal actions (64 system calls).
        unsafe { cmd.pre_exec(|| Ok(())) };
        let out = cmd
            .output()
            .map_err(|e| format!("run {i}: spawn {bb:?} sh failed: {e}"))?;
        let want = format!("ibsvm-pipe {i} token\n");
        let got = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || got != want {
            return Err(format!(
                "run {i}: status {}, stdout {:?} (want {:?}), stderr {:?}",
                describe_exit_status(out.status),
                got,
                want,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(format!(
        "{PIPELINE_RUNS} runs of echo | cat | grep, output right every time"
    ))
}

/// A few threads, each with its own thread-locals and FS base, yielding to each
/// other (context switches) while checking that TLS stays theirs.
fn threads() -> Result<String, String> {
    let main_base = check_fs_base()?;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = Arc::clone(&barrier);
            std::thread::Builder::new()
                .name(format!("t{t}"))
                .spawn(move || -> Result<(u64, u64), String> {
                    let base = check_fs_base().map_err(|e| format!("thread {t}: {e}"))?;
                    MARK.with(|m| m.set(t));
                    barrier.wait();
                    let every = THREAD_ITERS / THREAD_YIELDS;
                    for i in 0..THREAD_ITERS {
                        COUNTER.with(|c| c.set(std::hint::black_box(c.get() + 1)));
                        if i % every == every - 1 {
                            // SAFETY: sched_yield has no arguments.
                            unsafe { libc::sched_yield() };
                            if MARK.with(|m| m.get()) != t {
                                return Err(format!(
                                    "thread {t}: thread-local mark changed at {i}"
                                ));
                            }
                            let b =
                                check_fs_base().map_err(|e| format!("thread {t} iter {i}: {e}"))?;
                            if b != base {
                                return Err(format!(
                                    "thread {t}: FS base moved {base:#x} -> {b:#x}"
                                ));
                            }
                        }
                    }
                    Ok((base, COUNTER.with(|c| c.get())))
                })
                .map_err(|e| format!("spawn thread {t}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut bases = vec![main_base];
    let mut total = 0;
    for (t, h) in handles.into_iter().enumerate() {
        let (base, count) = h.join().map_err(|_| format!("thread {t} panicked"))??;
        if count != THREAD_ITERS {
            return Err(format!(
                "thread {t}: counter {count}, expected {THREAD_ITERS}"
            ));
        }
        if bases.contains(&base) {
            return Err(format!("thread {t}: FS base {base:#x} not unique"));
        }
        bases.push(base);
        total += count;
    }
    if MARK.with(|m| m.get()) == 0 && COUNTER.with(|c| c.get()) != 0 {
        return Err("main thread's thread-locals were changed by other threads".into());
    }
    Ok(format!(
        "{THREADS} threads, {total} thread-local increments, {} yields, distinct FS bases",
        THREADS as u64 * THREAD_YIELDS
    ))
}

/// Counts processors in /proc/cpuinfo; must be >= 1 and match the online count.
fn cpuinfo() -> Result<String, String> {
    let text =
        std::fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("read /proc/cpuinfo: {e}"))?;
    let field = |key: &str| {
        text.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let n = text
        .lines()
        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
        .count();
    // SAFETY: sysconf has no memory-safety preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let desc = format!(
        "{n} processors, {online} online, {} / {}",
        field("vendor_id"),
        field("model name")
    );
    if n == 0 || online < 1 || n as libc::c_long != online {
        return Err(desc);
    }
    Ok(desc)
}
