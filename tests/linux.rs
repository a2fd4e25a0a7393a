//! The stock Debian kernel (guest-images/linux) under real KVM: one boot carrying every
//! guest-side check, asserted on the guest's own output and ibsvm's counters.
//!
//! The device runs with its default policy (protect) and the race detector on
//! (`--ibs-race-check warn`): the `ibs-race` check drives the unpatched kernel's IBS start
//! and stop paths while the other unit sends NMIs, and the detector must stay silent.
//! That is a check of the kernel and the device together, not proof that protect matters:
//! an NMI rarely lands inside perf_ibs_stop's window in this boot (`ibs.val_written_back`
//! is usually 0), so this boot would pass without protect too. The race kernel's matrix
//! (tests/race.rs) is what shows protect at work.

use std::time::Duration;

use ibsvm_tests::{ibsvm, image, repo_root, require_kvm, HostKind};

/// Generous: a boot plus checks takes several minutes on a CPL0-emulating host.
const DEADLINE: Duration = Duration::from_secs(25 * 60);

#[test]
fn debian_kernel_boots_to_userspace_and_passes_its_checks() {
    require_kvm();
    let cmdline = std::fs::read_to_string(repo_root().join("guest-images/linux/cmdline"))
        .expect("guest-images/linux/cmdline");
    let kernel = image("linux/vmlinux");
    let initrd = image("linux/initramfs.cpio");
    let run = ibsvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            cmdline.trim(),
            "--cpus",
            "2",
            "--linux-tsc-scale",
            "10",
            "--ibs-race-check",
            "warn",
            "--stats",
        ],
        DEADLINE,
    );
    eprintln!("{run}");
    let out = &run.stdout;
    // The kernel reached userspace.
    assert!(
        out.contains("Linux version 6.1."),
        "not the stock 6.1 kernel\n{run}"
    );
    assert!(out.contains("Run /init as init process"), "no /init\n{run}");
    run.assert_line("ibsvm-init: start");
    run.assert_line("ibsvm-init: cpus online 2 (0-1)");
    // Every check passed, as the guest itself reports.
    for check in ["fpu", "ibs", "ibs-race", "ibs-soak", "userspace"] {
        run.assert_line(&format!("ibsvm-check: {check}: PASS"));
    }
    run.assert_line("ibsvm-init: verdict PASS");
    assert_eq!(run.code(), 0, "{run}");
    // The VMM's measures for this host were taken (the system-call route exists only
    // where KVM emulates CPL0 and breaks SYSCALL), and nothing went wrong in the guest.
    let host = HostKind::detect();
    assert_eq!(
        run.stderr
            .contains("routing guest system calls through the #PF entry"),
        host == HostKind::EmulatesCpl0,
        "host {host:?}\n{run}"
    );
    // Protect: no CTL read ever presented a Val the device had not latched, so the
    // detector had nothing to see (guest-images/linux/README.md has the numbers).
    assert_eq!(run.stat("ibs.stale_val_reads"), 0, "{run}");
    assert_eq!(run.stat("ibs.races_detected"), 0, "{run}");
    assert!(!run.stderr.contains("guest IBS race"), "{run}");
    // The guest kernel switches every vector register user space can use (the pipeline
    // crash's cause: guest-images/linux/README.md), and each task keeps its own. The host's
    // XCR0 shows through at CPL3, so on our hosts AVX and AVX-512 are in use.
    // YMM state exists where this host's CPU has AVX (the nested test host's model has
    // no XSAVE, and so no AVX): the check says which it found.
    let ymm = if std::arch::is_x86_feature_detected!("avx") {
        "fpu: ok ymm-isolation:"
    } else {
        "fpu: info ymm-isolation does not apply"
    };
    for want in ["fpu: ok xstate-coverage:", "fpu: ok xmm-isolation:", ymm] {
        assert!(out.contains(want), "{want}\n{run}");
    }
    if out.contains("fpu: info xcr0 0xe7") {
        assert!(out.contains("fpu: ok avx512-isolation:"), "{run}");
    }
    // Where KVM emulates CPL0, the kernel's context switches went through ibsvm.
    if host == HostKind::EmulatesCpl0 {
        for insn in ["completed.xsave", "completed.xrstor"] {
            assert!(run.stat(insn) > 100, "{insn}\n{run}");
        }
    }
    // Kernel log lines on the console start with their "[ seconds]" timestamp (the guest
    // checks quote these strings in their own result lines).
    let kernel_log: Vec<&str> = out.lines().filter(|l| l.starts_with('[')).collect();
    // The platform ibsvm gives the guest, as the guest kernel reports it: x2APIC
    // (arch/x86/kernel/apic/apic.c), kvmclock as its clocksource (kernel/time/clocksource.c),
    // and IBS with exactly the capability word ibsvm advertises by default, `zen3` 0x3ff
    // (arch/x86/events/amd/ibs.c prints it as %08x).
    for want in [
        "x2apic enabled",
        "clocksource: Switched to clocksource kvm-clock",
        "LVT offset 0 assigned for vector 0x400",
        "perf: AMD IBS detected (0x000003ff)",
    ] {
        assert!(
            kernel_log.iter().any(|l| l.contains(want)),
            "guest log lacks {want:?}\n{run}"
        );
    }
    for bad in [
        "NMI received for unknown reason",
        "[Firmware Bug]",
        "unchecked MSR access",
        "segfault at",
    ] {
        assert!(
            !kernel_log.iter().any(|l| l.contains(bad)),
            "guest log has {bad:?}\n{run}"
        );
    }
}
