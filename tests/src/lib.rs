//! Fixtures for the integration tests: run the real `ibsvm` binary on a guest image with
//! a deadline, and look at what the guest printed.

pub mod race;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_owned()
}

/// The `ibsvm` binary: `$IBSVM_BIN`, else the one built beside this test executable
/// (`target/<profile>/ibsvm`; `make test` builds it first).
pub fn ibsvm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("IBSVM_BIN") {
        return PathBuf::from(p);
    }
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let exe = std::env::current_exe().expect("test executable path");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("ibsvm"))
        .collect();
    candidates
        .iter()
        .find(|bin| bin.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{} is missing: build it first (`make test` does, or `cargo build -p ibsvm`)",
                candidates[candidates.len() - 1].display()
            )
        })
}

/// A guest image under `guest-images/out`; panics with how to build it if missing.
pub fn image(relative: &str) -> PathBuf {
    let p = repo_root().join("guest-images/out").join(relative);
    assert!(p.exists(), "{} is missing: run `make images`", p.display());
    p
}

/// Fails loudly when /dev/kvm is unusable: these tests must run, not skip.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("/dev/kvm is required by this test and cannot be opened: {e}");
    }
}

/// The kind of KVM host the tests run on, for the few results that depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// KVM runs guest CPL0 code in its instruction emulator (see `ibsvm::host`).
    EmulatesCpl0,
    /// Hardware virtualization on AMD (SVM).
    Svm,
    /// Hardware virtualization on Intel (VMX).
    Vmx,
}

impl HostKind {
    /// This host, as ibsvm itself decides it (and the CPU flags for SVM or VMX).
    pub fn detect() -> Self {
        if ibsvm::host::HostKvm::detect().emulates_cpl0 {
            return Self::EmulatesCpl0;
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let svm = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "svm"));
        if svm {
            Self::Svm
        } else {
            Self::Vmx
        }
    }

    /// KVM INITs the vCPU before it reports a triple fault (AMD SVM), so ibsvm cannot tell
    /// a deliberate one (empty IDT) from a crash.
    pub fn resets_vcpu_at_shutdown(self) -> bool {
        self == Self::Svm
    }
}

/// What one `ibsvm` run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit status.
    pub status: ExitStatus,
    /// Guest console and anything else on stdout.
    pub stdout: String,
    /// ibsvm's own messages.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Run {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("ibsvm was killed: {self}"))
    }

    /// Asserts a test-kernel test passed: its banner, `PASS`, no `FAIL`, status 0.
    pub fn assert_testkernel_pass(&self, test: &str) {
        self.assert_line(&format!("ibsvm testkernel: {test}"));
        self.assert_line("PASS");
        assert!(!self.stdout.contains("FAIL"), "{self}");
        assert_eq!(self.code(), 0, "{self}");
    }

    /// The value of an `ibsvm stats: NAME N` line on stderr (`--stats`).
    pub fn stat(&self, name: &str) -> u64 {
        let prefix = format!("ibsvm stats: {name} ");
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no stats line for {name}\n{self}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("stats line for {name}: {e}\n{self}"))
    }

    /// The number in a console line `{prefix}N{suffix}`.
    pub fn console_number(&self, prefix: &str, suffix: &str) -> u64 {
        self.stdout
            .lines()
            .find_map(|l| l.trim_end().strip_prefix(prefix)?.strip_suffix(suffix))
            .unwrap_or_else(|| panic!("no console line {prefix:?}N{suffix:?}\n{self}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("console line {prefix:?}: {e}\n{self}"))
    }

    /// Asserts that the console shows `line` as a whole line.
    pub fn assert_line(&self, line: &str) {
        assert!(
            self.stdout.lines().any(|l| l.trim_end() == line),
            "console lacks the line {line:?}\n{self}"
        );
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )?;
        // Repeated last: a failure report is often cut to its head and tail, and a long
        // guest log would otherwise hide the lines that say what failed.
        writeln!(f, "\n--- console lines that tell what failed ---")?;
        for line in self.stdout.lines().filter(|l| tells_failure(l)) {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// Console lines worth repeating in a failure report: results, failures, crashes.
fn tells_failure(line: &str) -> bool {
    const MARKS: [&str; 8] = [
        "FAIL",
        "ibsvm-check:",
        "verdict",
        "segfault",
        "Kernel panic",
        "BUG:",
        "Oops",
        "NMI received for unknown reason",
    ];
    MARKS.iter().any(|m| line.contains(m))
}

/// What `ibsvm` gets on stdin, which it forwards to the guest's COM1 receive FIFO.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// `/dev/null`: ibsvm cannot poll it, so the guest gets no console input.
    Null,
    /// These bytes through a pipe that is closed once they are written: ibsvm reads
    /// them, then EOF (the bytes written before the close still reach the guest).
    Pipe(&'a [u8]),
}

/// Runs `ibsvm` with `args`, stdin `/dev/null`, killing it after `deadline`.
pub fn ibsvm(args: &[&str], deadline: Duration) -> Run {
    ibsvm_with_input(args, Input::Null, deadline)
}

/// Runs `ibsvm` with `args` and `input` on stdin, killing it after `deadline`.
pub fn ibsvm_with_input(args: &[&str], input: Input<'_>, deadline: Duration) -> Run {
    let start = Instant::now();
    let stdin = match input {
        Input::Null => Stdio::null(),
        Input::Pipe(_) => Stdio::piped(),
    };
    let mut child = Command::new(ibsvm_bin())
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ibsvm");
    // Written from a thread: a pipe holds 64 KiB, and ibsvm reads only as fast as the
    // guest drains its FIFO. A write error (ibsvm ended before reading it all) is not
    // ours to report: the guest's console shows what arrived.
    let writer = match input {
        Input::Null => None,
        Input::Pipe(bytes) => {
            let mut pipe = child.stdin.take().expect("piped stdin");
            let bytes = bytes.to_vec();
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
                // `pipe` is dropped here: ibsvm sees EOF after the bytes.
            }))
        }
    };
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().expect("wait for ibsvm") {
            break (status, false);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            break (child.wait().expect("reap ibsvm"), true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if let Some(writer) = writer {
        // ibsvm is gone, so its end of the pipe is closed and the write has finished.
        let _ = writer.join();
    }
    let run = Run {
        status,
        stdout: reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    };
    if timed_out {
        panic!("ibsvm did not finish within {deadline:?}: {run}");
    }
    run
}

/// Deadline of one test-kernel boot.
const TESTKERNEL_DEADLINE: Duration = Duration::from_secs(120);

/// Boots the guest image `kernel` (under `guest-images/out`) with `cmdline`, extra
/// `ibsvm run` flags and `input` on the console (KVM required).
pub fn boot_image(kernel: &str, cmdline: &str, extra: &[&str], input: Input<'_>) -> Run {
    require_kvm();
    let kernel = image(kernel);
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().expect("UTF-8 path"),
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    ibsvm_with_input(&args, input, TESTKERNEL_DEADLINE)
}

/// Boots the test kernel (ELF) with `cmdline` and extra `ibsvm run` flags (KVM required).
pub fn boot_testkernel(cmdline: &str, extra: &[&str]) -> Run {
    boot_image("testkernel.elf", cmdline, extra, Input::Null)
}

/// Boots the test kernel (ELF) with `input` written to its console, then EOF.
pub fn boot_testkernel_with_input(cmdline: &str, extra: &[&str], input: &[u8]) -> Run {
    boot_image("testkernel.elf", cmdline, extra, Input::Pipe(input))
}
