//! The test kernel (guest-images/testkernel) under real KVM: what it reports on the
//! console and through the test-exit port.

use std::time::Duration;

use ibsvm_tests::{
    boot_image, boot_testkernel, boot_testkernel_with_input, ibsvm, image, HostKind, Input, Run,
};

fn boot(cmdline: &str, extra: &[&str]) -> Run {
    boot_testkernel(cmdline, extra)
}

fn assert_pass(run: &Run, test: &str) {
    run.assert_testkernel_pass(test);
}

#[test]
fn smoke_exceptions_and_user_mode() {
    let run = boot("test=smoke", &[]);
    run.assert_line("cmdline: test=smoke");
    run.assert_line("gp ok");
    run.assert_line("user ok");
    assert_pass(&run, "smoke");
    // The CPL0-emulation measures are announced once, and not for a non-Linux kernel's cmdline.
    let notes = run
        .stderr
        .lines()
        .filter(|l| l.contains("emulates guest CPL0"))
        .count();
    assert!(notes <= 1, "{run}");
    assert!(
        !run.stderr.contains("appended to the kernel command line"),
        "{run}"
    );
}

#[test]
fn one_vcpu() {
    let run = boot("test=smp", &[]);
    run.assert_line("mptable: 1 cpus");
    run.assert_line("smp: 1 cpus online");
    assert_pass(&run, "smp");
}

#[test]
fn two_vcpus_come_online() {
    let run = boot("test=smp", &["--cpus", "2"]);
    run.assert_line("mptable: 2 cpus");
    run.assert_line("cpu 1 online");
    run.assert_line("smp: 2 cpus online");
    assert_pass(&run, "smp");
}

#[test]
fn four_vcpus_answer_calls() {
    let run = boot("test=smpcall", &["--cpus", "4"]);
    run.assert_line("smp: 4 cpus online");
    run.assert_line("smpcall: 3 aps answered");
    assert_pass(&run, "smpcall");
}

#[test]
fn self_nmi_is_delivered() {
    let run = boot("test=nmi", &[]);
    run.assert_line("nmi ok");
    assert_pass(&run, "nmi");
}

#[test]
fn exit_status_is_the_byte_written() {
    for code in [0, 1, 7, 42, 255] {
        let run = boot(&format!("test=exit code={code}"), &[]);
        run.assert_line(&format!("exit: status {code}"));
        assert_eq!(run.code(), code, "{run}");
    }
}

#[test]
fn unknown_test_and_unexpected_exception_statuses() {
    let run = boot("test=nonesuch", &[]);
    run.assert_line("unknown test: nonesuch");
    assert_eq!(run.code(), 2, "{run}");
    let run = boot("test=fault kind=gp", &[]);
    assert!(run.stdout.contains("unexpected exception #GP"), "{run}");
    assert_eq!(run.code(), 3, "{run}");
}

#[test]
fn i8042_reset_ends_with_status_0() {
    let run = boot("test=reset", &[]);
    run.assert_line("resetting");
    assert_eq!(run.code(), 0, "{run}");
    assert!(
        run.stderr.contains("guest reset (i8042 reset line)"),
        "{run}"
    );
}

#[test]
fn every_cpu_halted_with_interrupts_off_ends_with_status_0() {
    // Linux's halt, and its power-off without ACPI, end like this: the VM must end, not hang.
    for cpus in ["1", "2"] {
        let run = boot("test=halt", &["--cpus", cpus]);
        run.assert_line(&format!("halt: {cpus} cpus halting with interrupts off"));
        assert_eq!(run.code(), 0, "{run}");
        assert!(
            run.stderr
                .contains("guest halted every vCPU with interrupts disabled"),
            "{run}"
        );
    }
}

#[test]
fn deliberate_triple_fault_is_a_reset() {
    let run = boot("test=reboot", &[]);
    run.assert_line("reboot: faulting with an empty IDT");
    if HostKind::detect().resets_vcpu_at_shutdown() {
        eprintln!("checked: this host's KVM resets the vCPU at a shutdown (SVM): a crash");
        assert_triple_fault_state_lost(&run);
        return;
    }
    assert_eq!(run.code(), 0, "{run}");
    assert!(
        run.stderr.contains("triple fault with an empty IDT"),
        "{run}"
    );
}

/// Where KVM resets the vCPU before reporting a triple fault, ibsvm says so and reports a
/// crash: it cannot know whether the IDT was empty.
fn assert_triple_fault_state_lost(run: &Run) {
    assert_eq!(run.code(), 120, "{run}");
    assert!(
        run.stderr
            .contains("triple fault (this host's KVM resets the vCPU at a shutdown"),
        "{run}"
    );
}

#[test]
fn unexpected_triple_fault_is_a_crash() {
    let run = boot("test=triplefault", &[]);
    run.assert_line("triplefault: faulting with an IDT of absent gates");
    if HostKind::detect().resets_vcpu_at_shutdown() {
        eprintln!("checked: this host's KVM resets the vCPU at a shutdown (SVM)");
        assert_triple_fault_state_lost(&run);
        return;
    }
    assert_eq!(run.code(), 120, "{run}");
    assert!(
        run.stderr.contains("guest crashed on vCPU 0 at RIP 0x"),
        "{run}"
    );
    assert!(run.stderr.contains("triple fault; code at RIP: "), "{run}");
}

#[test]
fn stats_count_exits() {
    let run = boot("test=smoke", &["--stats"]);
    assert_eq!(run.code(), 0, "{run}");
    assert!(run.stderr.contains("ibsvm stats: wall time"), "{run}");
    // Every console byte is at least one OUT.
    assert!(
        run.stat("exit.io_out") as usize >= run.stdout.len(),
        "{run}"
    );
    assert!(
        run.stat("exit.rdmsr") >= 1,
        "the #GP probe is an MSR exit\n{run}"
    );
}

/// XSAVE state switching at CPL0, with its faults. The guest reports what its CPU offers
/// (XSAVE, XGETBV1) and checks the instructions accordingly; each way has its own lines.
/// Where KVM emulates CPL0 (ibsvm's log says so), its emulator stops at xgetbv, xsave64
/// and xrstor64 and ibsvm completes them: the counters say so.
#[test]
fn xsave_and_xrstor_switch_avx_state_at_cpl0() {
    const WITHOUT_XSAVE: &str = "xsave: CPU without XSAVE: CR4.OSXSAVE raises #GP; xgetbv, xsetbv, xsave64, xrstor64 raise #UD";
    const XGETBV1: &str = "xsave: XGETBV1: xgetbv of XCR 1 reads XCR0 & XINUSE";
    const NO_XGETBV1: &str = "xsave: no XGETBV1: xgetbv of XCR 1 raises #GP";
    let run = boot("test=xsave", &["--stats"]);
    assert_pass(&run, "xsave");
    run.assert_line("xsave: ok");
    let has = |line: &str| run.stdout.lines().any(|l| l.trim_end() == line);
    let completed = run.stderr.contains("emulates guest CPL0");
    // Where ibsvm completes them: xgetbv, xsave64 and xrstor64 retired, and those faulted.
    let counts = if has(WITHOUT_XSAVE) {
        for line in [XGETBV1, NO_XGETBV1, "xsave: xcr0 0x1 -> 0x7"] {
            assert!(!has(line), "{line:?} on a CPU without XSAVE\n{run}");
        }
        // xgetbv, xsave64 and xrstor64 each raise #UD (xsetbv is KVM's emulator's).
        [0, 0, 0, 3]
    } else {
        run.assert_line("xsave: xcr0 0x1 -> 0x7");
        run.assert_line("xsave: ymm offset 0x240");
        // xsave64 twice (one faults: #PF), xrstor64 four times (two fault: #GP), xgetbv of
        // XCR0 twice; of XCR 1 twice with XGETBV1, else once (#GP).
        match (has(XGETBV1), has(NO_XGETBV1)) {
            (true, false) => {
                run.assert_line("xsave: XINUSE[2] set with ymm0 in use");
                [4, 1, 2, 3]
            }
            (false, true) => {
                assert!(!run.stdout.contains("XINUSE"), "{run}");
                [2, 1, 2, 4]
            }
            _ => panic!("the guest reports neither or both of {XGETBV1:?}, {NO_XGETBV1:?}\n{run}"),
        }
    };
    if completed {
        let seen = [
            "completed.xgetbv",
            "completed.xsave",
            "completed.xrstor",
            "completed.faulted",
        ]
        .map(|c| run.stat(c));
        assert_eq!(seen, counts, "{run}");
    }
}

#[test]
fn quirks_can_be_forced_off_and_the_test_kernel_still_runs() {
    let run = boot("test=smoke", &["--cpl0-quirks", "off"]);
    assert!(!run.stderr.contains("emulates guest CPL0"), "{run}");
    assert_pass(&run, "smoke");
}

#[test]
fn console_input_is_echoed() {
    // The pipe is closed right after the line: what was written still arrives.
    let run = boot_testkernel_with_input("test=echo", &[], b"hello from the host\n");
    run.assert_line("echo: hello from the host");
    assert_pass(&run, "echo");
}

#[test]
fn echo_without_input_fails() {
    // /dev/null (ibsvm cannot poll it), then a pipe closed with nothing written (EOF).
    for run in [
        boot("test=echo", &[]),
        boot_testkernel_with_input("test=echo", &[], b""),
    ] {
        run.assert_line("FAIL: echo: no input");
        assert!(!run.stdout.contains("PASS"), "{run}");
        assert_eq!(run.code(), 1, "{run}");
    }
}

/// Boots the bzImage build of the test kernel (same objects as the ELF).
fn boot_bzimage(cmdline: &str, extra: &[&str]) -> Run {
    boot_image("testkernel.bzImage", cmdline, extra, Input::Null)
}

/// The console shows `cmdline: {cmdline}`, possibly followed by what ibsvm appends: to
/// ibsvm every bzImage is a Linux kernel, so on a host that emulates guest CPL0 it adds
/// Linux parameters. That note on stderr also shows the bzImage path was taken.
fn assert_bzimage_cmdline(run: &Run, cmdline: &str) {
    let line = format!("cmdline: {cmdline}");
    assert!(
        run.stdout
            .lines()
            .map(str::trim_end)
            .any(|l| l == line || l.starts_with(&format!("{line} "))),
        "console lacks {line:?}\n{run}"
    );
    if run.stderr.contains("emulates guest CPL0") {
        assert!(
            run.stderr.contains("appended to the kernel command line"),
            "{run}"
        );
    }
}

#[test]
fn bzimage_smoke() {
    let run = boot_bzimage("test=smoke", &[]);
    assert_bzimage_cmdline(&run, "test=smoke");
    run.assert_line("gp ok");
    run.assert_line("user ok");
    assert_pass(&run, "smoke");
}

#[test]
fn bzimage_two_vcpus_come_online() {
    let run = boot_bzimage("test=smp", &["--cpus", "2"]);
    assert_bzimage_cmdline(&run, "test=smp");
    run.assert_line("mptable: 2 cpus");
    run.assert_line("cpu 1 online");
    run.assert_line("smp: 2 cpus online");
    assert_pass(&run, "smp");
}

#[test]
fn bzimage_without_xlf_kernel_64_is_refused() {
    let mut bz = std::fs::read(image("testkernel.bzImage")).expect("read testkernel.bzImage");
    // Setup header (boot.rst): xloadflags at 0x236, bit 0 XLF_KERNEL_64.
    assert_eq!(&bz[0x202..0x206], b"HdrS");
    assert_eq!(bz[0x236] & 1, 1, "the built image advertises XLF_KERNEL_64");
    bz[0x236] &= !1;
    let dir = std::env::temp_dir().join(format!("ibsvm-testkernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("no-xlf64.bzImage");
    std::fs::write(&path, &bz).expect("write the patched copy");
    let path_str = path.to_str().expect("UTF-8 path");
    let run = ibsvm(
        &["run", "--kernel", path_str, "--cmdline", "test=smoke"],
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.code(), 1, "{run}");
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("ibsvm: error:"))
        .unwrap_or_else(|| panic!("no error line\n{run}"));
    assert!(line.contains(path_str), "{run}");
    assert!(line.contains("XLF_KERNEL_64"), "{run}");
    assert!(
        !run.stdout.contains("ibsvm testkernel"),
        "the guest must not run\n{run}"
    );
}
