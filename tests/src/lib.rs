//! Fixtures for the integration tests: run the real `ibsvm` binary on a guest image with
//! a deadline, and look at what the guest printed.

use std::io::Read;
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
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("ibsvm");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`make test` does, or `cargo build -p ibsvm`)",
        bin.display()
    );
    bin
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
        )
    }
}

/// Runs `ibsvm` with `args`, stdin closed, killing it after `deadline`.
pub fn ibsvm(args: &[&str], deadline: Duration) -> Run {
    let start = Instant::now();
    let mut child = Command::new(ibsvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ibsvm");
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
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ibsvm") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("reap ibsvm");
            let run = Run {
                status,
                stdout: reader.join().unwrap_or_default(),
                stderr: err_reader.join().unwrap_or_default(),
                elapsed: start.elapsed(),
            };
            panic!("ibsvm did not finish within {deadline:?}: {run}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Boots the test kernel with `cmdline` and extra `ibsvm run` flags (KVM required).
pub fn boot_testkernel(cmdline: &str, extra: &[&str]) -> Run {
    require_kvm();
    let kernel = image("testkernel.elf");
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().expect("UTF-8 path"),
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    ibsvm(&args, Duration::from_secs(120))
}
