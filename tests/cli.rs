//! Bad input to the real `ibsvm` binary: one clear line on stderr, the right status, no
//! panic, no hang.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ibsvm_tests::{boot_testkernel, ibsvm, image, require_kvm, Run};

const DEADLINE: Duration = Duration::from_secs(30);

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ibsvm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Starts `ibsvm` with `args`, stdout as given and stderr piped, for a test that acts on
/// the running process (a signal, a closed pipe).
fn spawn(args: &[&str], stdout: Stdio) -> Child {
    Command::new(ibsvm_tests::ibsvm_bin())
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ibsvm")
}

/// Waits for a [`spawn`]ed ibsvm to end, at most [`DEADLINE`] (then kills it and fails),
/// and returns (exit code, stderr).
fn finish(mut child: Child) -> (Option<i32>, String) {
    let mut pipe = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut stderr = String::new();
        let _ = pipe.read_to_string(&mut stderr);
        stderr
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ibsvm") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ibsvm still running after {DEADLINE:?}: {}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), reader.join().expect("stderr reader"))
}

/// Exit status `code`, an `ibsvm: error:` line mentioning `needle`, and no panic.
/// ibsvm's own errors start "ibsvm: error:", usage errors (clap's) "error:".
fn assert_error(run: &Run, code: i32, needle: &str) {
    assert_eq!(run.code(), code, "{run}");
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("ibsvm: error:") || l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line\n{run}"));
    assert!(
        line.contains(needle),
        "error line {line:?} lacks {needle:?}\n{run}"
    );
    assert!(!run.stderr.contains("panicked"), "{run}");
    assert!(
        run.stdout.is_empty(),
        "nothing should reach the console\n{run}"
    );
}

#[test]
fn usage_errors_exit_2() {
    // No command: the usage, on stderr.
    let run = ibsvm(&[], DEADLINE);
    assert_eq!(run.code(), 2, "{run}");
    assert!(run.stderr.contains("Usage: ibsvm <COMMAND>"), "{run}");
    assert!(run.stdout.is_empty(), "{run}");
    let run = ibsvm(&["run"], DEADLINE);
    assert_error(&run, 2, "required arguments were not provided");
    assert!(run.stderr.contains("--kernel <PATH>"), "{run}");
    assert_error(
        &ibsvm(&["run", "--kernel", "k", "--bogus"], DEADLINE),
        2,
        "unexpected argument '--bogus'",
    );
    assert_error(
        &ibsvm(&["run", "--kernel", "k", "--cpus", "0"], DEADLINE),
        2,
        "--cpus",
    );
    assert_error(
        &ibsvm(&["run", "--kernel", "k", "--cpus", "33"], DEADLINE),
        2,
        "not in 1..=32",
    );
    assert_error(
        &ibsvm(&["run", "--kernel", "k", "--memory", "lots"], DEADLINE),
        2,
        "--memory",
    );
    assert_error(
        &ibsvm(&["run", "--kernel"], DEADLINE),
        2,
        "a value is required for '--kernel <PATH>'",
    );
    assert_error(
        &ibsvm(
            &["run", "--kernel", "k", "--ibs", "off", "--ibs-seed", "1"],
            DEADLINE,
        ),
        2,
        "`--ibs-seed` cannot be used with `--ibs off`",
    );
}

#[test]
fn help_lists_every_option() {
    let run = ibsvm(&["--help"], DEADLINE);
    assert_eq!(run.code(), 0);
    assert!(run.stdout.contains("run"), "{run}");
    let run = ibsvm(&["run", "--help"], DEADLINE);
    assert_eq!(run.code(), 0);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--cpus",
        "--stats",
        "--cpl0-quirks",
        "0xf4",
    ] {
        assert!(run.stdout.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn missing_and_unreadable_files() {
    require_kvm();
    assert_error(
        &ibsvm(&["run", "--kernel", "/nonexistent/vmlinux"], DEADLINE),
        1,
        "cannot read kernel /nonexistent/vmlinux",
    );
    assert_error(
        &ibsvm(&["run", "--kernel", "/"], DEADLINE),
        1,
        "kernel /: not a regular file (a directory)",
    );
    // A FIFO nobody writes would block a plain open(2) forever; a device never ends.
    let fifo = scratch("fifo", b"").with_file_name("kernel.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path `c`, which lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert_error(
        &ibsvm(&["run", "--kernel", fifo.to_str().unwrap()], DEADLINE),
        1,
        "not a regular file (a FIFO or pipe)",
    );
    let kernel = image("testkernel.elf");
    let k = kernel.to_str().unwrap();
    assert_error(
        &ibsvm(
            &["run", "--kernel", k, "--initrd", "/nonexistent/initrd"],
            DEADLINE,
        ),
        1,
        "cannot read initrd",
    );
    assert_error(
        &ibsvm(&["run", "--kernel", k, "--initrd", "/dev/zero"], DEADLINE),
        1,
        "initrd /dev/zero: not a regular file (a character device)",
    );
}

#[test]
fn non_utf8_paths_work_and_a_non_utf8_cmdline_is_refused() {
    require_kvm();
    use std::os::unix::ffi::OsStrExt;
    let kernel = image("testkernel.elf");
    let odd = scratch("k", b"").with_file_name(std::ffi::OsStr::from_bytes(b"\xff.elf"));
    std::fs::copy(&kernel, &odd).unwrap();
    let out = Command::new(ibsvm_tests::ibsvm_bin())
        .arg("run")
        .arg("--kernel")
        .arg(&odd)
        .args(["--cmdline", "test=smoke"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
    let out = Command::new(ibsvm_tests::ibsvm_bin())
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--cmdline"])
        .arg(std::ffi::OsStr::from_bytes(b"test=\xff"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'test=\u{fffd}' for '--cmdline': not valid UTF-8"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sigint_stops_the_vm_and_keeps_the_stats() {
    require_kvm();
    // A Linux kernel without an initramfs runs (boots, then panics and waits) until stopped.
    let kernel = image("linux/vmlinux");
    let child = spawn(
        &["run", "--kernel", kernel.to_str().unwrap(), "--stats"],
        Stdio::null(),
    );
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill only sends a signal to the child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains("ibsvm: stopped by SIGINT; exit status 130"),
        "{stderr}"
    );
    assert!(stderr.contains("ibsvm stats: exits total "), "{stderr}");
}

#[test]
fn a_closed_console_gets_one_warning() {
    require_kvm();
    let kernel = image("testkernel.elf");
    let mut child = spawn(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "test=smoke",
        ],
        Stdio::piped(),
    );
    drop(child.stdout.take()); // the reader of `ibsvm ... | head -1` is gone
    let (code, stderr) = finish(child);
    let warnings = stderr.matches("ibsvm: warn: console output").count();
    assert_eq!(warnings, 1, "{stderr}");
    // The guest ran to its end regardless.
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn images_whose_headers_lie_are_refused_at_once() {
    require_kvm();
    let refused = |name: &str, bytes: &[u8], field: &str| {
        let path = scratch(name, bytes);
        let run = ibsvm(&["run", "--kernel", path.to_str().unwrap()], DEADLINE);
        assert_error(&run, 1, &format!("{name}: {field}"));
        assert!(run.elapsed < Duration::from_secs(1), "{run}");
    };
    let bz = std::fs::read(image("testkernel.bzImage")).unwrap();
    refused("half.bzImage", &bz[..bz.len() / 2], "syssize");
    refused("setup-only.bzImage", &bz[..1024], "syssize");

    let elf = std::fs::read(image("testkernel.elf")).unwrap();
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let phoff = u64_at(&elf, 32) as usize;
    // The first program header is the first PT_LOAD of the test kernel.
    assert_eq!(&elf[phoff..phoff + 4], &1u32.to_le_bytes(), "PT_LOAD first");
    let patched = |at: usize, value: u64| {
        let mut e = elf.clone();
        e[phoff + at..phoff + at + 8].copy_from_slice(&value.to_le_bytes());
        e
    };
    let memsz = u64_at(&elf, phoff + 40);
    refused(
        "filesz.elf",
        &patched(32, memsz + 1),
        "program header 0 (PT_LOAD): p_filesz",
    );
    refused(
        "low.elf",
        &patched(24, 0x7000),
        "program header 0 (PT_LOAD): p_paddr 0x7000",
    );
    refused(
        "huge.elf",
        &patched(40, 1 << 40),
        "program header 0 (PT_LOAD): p_paddr",
    );
    let mut no_load = elf.clone();
    no_load[56..58].copy_from_slice(&0u16.to_le_bytes()); // e_phnum
    refused("noload.elf", &no_load, "program headers: no PT_LOAD");
    let mut entry = elf.clone();
    entry[24..32].copy_from_slice(&(64u64 << 20).to_le_bytes());
    refused("entry.elf", &entry, "e_entry");
}

#[test]
fn files_that_are_not_kernels() {
    require_kvm();
    let text = scratch("notes.txt", b"this is not a kernel\n");
    assert_error(
        &ibsvm(&["run", "--kernel", text.to_str().unwrap()], DEADLINE),
        1,
        "not a kernel image",
    );

    let elf = std::fs::read(image("testkernel.elf")).unwrap();
    let truncated = scratch("truncated.elf", &elf[..elf.len().min(200)]);
    assert_error(
        &ibsvm(&["run", "--kernel", truncated.to_str().unwrap()], DEADLINE),
        1,
        "truncated.elf",
    );

    let mut elf32 = elf.clone();
    elf32[4] = 1; // ELFCLASS32
    let elf32 = scratch("class32.elf", &elf32);
    assert_error(
        &ibsvm(&["run", "--kernel", elf32.to_str().unwrap()], DEADLINE),
        1,
        "not a 64-bit ELF",
    );

    // A bzImage header with boot protocol 2.01 and no 64-bit entry.
    let mut bz = vec![0u8; 8192];
    bz[0x1f1] = 4; // setup_sects
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x0201u16.to_le_bytes());
    bz[0x211] = 1; // loadflags LOADED_HIGH
    bz[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let bz = scratch("old.bzImage", &bz);
    assert_error(
        &ibsvm(&["run", "--kernel", bz.to_str().unwrap()], DEADLINE),
        1,
        "old.bzImage",
    );
}

#[test]
fn guest_too_large_for_memory() {
    require_kvm();
    let kernel = image("testkernel.elf");
    let big = scratch("big.initrd", &vec![0u8; 20 << 20]);
    let run = ibsvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            big.to_str().unwrap(),
            "--memory",
            "16",
        ],
        DEADLINE,
    );
    assert_error(&run, 1, "does not fit in guest memory");
    assert_error(
        &ibsvm(
            &["run", "--kernel", kernel.to_str().unwrap(), "--memory", "4"],
            DEADLINE,
        ),
        1,
        "--memory 4 MiB is out of range",
    );
    // A kernel whose image (here its second PT_LOAD's p_memsz: program headers start at
    // e_phoff 64 and are 56 bytes each, p_memsz at +40; ELF-64 gABI) ends past RAM.
    let mut elf = std::fs::read(&kernel).unwrap();
    assert_eq!(u64::from_le_bytes(elf[32..40].try_into().unwrap()), 64);
    let memsz = 64 + 56 + 40;
    elf[memsz..memsz + 8].copy_from_slice(&(512u64 << 20).to_le_bytes());
    let huge = scratch("huge-bss.elf", &elf);
    assert_error(
        &ibsvm(
            &["run", "--kernel", huge.to_str().unwrap(), "--memory", "256"],
            DEADLINE,
        ),
        1,
        "outside guest RAM 0x100000..0x10000000 (try a larger --memory)",
    );
}

#[test]
fn command_line_too_long() {
    require_kvm();
    let kernel = image("testkernel.elf");
    let long = "x".repeat(4096);
    assert_error(
        &ibsvm(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--cmdline",
                &long,
            ],
            DEADLINE,
        ),
        1,
        "command line is 4096 bytes",
    );
}

/// Whether this host exposes an IBS op PMU (our development machines have no hardware PMU).
fn host_has_ibs() -> bool {
    std::path::Path::new("/sys/bus/event_source/devices/ibs_op").exists()
}

#[test]
fn ibs_host_without_host_ibs_is_one_clear_error() {
    let run = boot_testkernel("test=smoke", &["--ibs", "host"]);
    if host_has_ibs() {
        // An AMD host with IBS (and the permissions): the guest runs.
        assert_eq!(run.code(), 0, "{run}");
        return;
    }
    assert_error(&run, 1, "--ibs host: host IBS unavailable: no `ibs_op` PMU");
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("ibsvm: error:"))
        .unwrap();
    for needle in ["/sys/bus/event_source/devices/ibs_op", "--ibs synthetic"] {
        assert!(line.contains(needle), "{line:?} lacks {needle:?}");
    }
    assert_eq!(
        run.stderr.lines().filter(|l| l.contains("ibs_op")).count(),
        1,
        "one line names what is missing\n{run}"
    );
}

#[test]
fn ibs_auto_without_host_ibs_says_so_and_samples_synthetically() {
    let run = boot_testkernel("test=ibs-sample", &["--ibs", "auto", "--stats"]);
    let note =
        "ibsvm: --ibs auto: guest IBS samples are synthetic (host IBS unavailable: no `ibs_op` PMU";
    if host_has_ibs() {
        assert!(
            run.stderr
                .contains("guest IBS samples come from the host's IBS"),
            "{run}"
        );
        return;
    }
    assert_eq!(
        run.stderr.lines().filter(|l| l.starts_with(note)).count(),
        1,
        "one fallback line\n{run}"
    );
    run.assert_line("ibs-sample: 20 samples, 20 in loop");
    run.assert_line("PASS");
    assert_eq!(run.code(), 0, "{run}");
    assert_eq!(run.stat("ibs.samples_latched"), 23, "{run}");
    assert!(
        !run.stderr.contains("ibs.host."),
        "no host counters with the synthetic source\n{run}"
    );
}
