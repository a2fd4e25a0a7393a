//! The test kernel (guest-images/testkernel) under real KVM: what it reports on the
//! console and through the test-exit port.

use ibsvm_tests::{boot_testkernel, Run};

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
fn deliberate_triple_fault_is_a_reset() {
    let run = boot("test=reboot", &[]);
    run.assert_line("reboot: faulting with an empty IDT");
    assert_eq!(run.code(), 0, "{run}");
    assert!(
        run.stderr.contains("triple fault with an empty IDT"),
        "{run}"
    );
}

#[test]
fn unexpected_triple_fault_is_a_crash() {
    let run = boot("test=triplefault", &[]);
    run.assert_line("triplefault: faulting with an IDT of absent gates");
    assert_eq!(run.code(), 120, "{run}");
    assert!(
        run.stderr.contains("guest crashed on vCPU 0 at RIP 0x"),
        "{run}"
    );
    assert!(run.stderr.contains("triple fault"), "{run}");
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

#[test]
fn quirks_can_be_forced_off_and_the_test_kernel_still_runs() {
    let run = boot("test=smoke", &["--cpl0-quirks", "off"]);
    assert!(!run.stderr.contains("emulates guest CPL0"), "{run}");
    assert_pass(&run, "smoke");
}
