//! The virtual IBS PMU seen from a guest: the test kernel's `ibs-*` tests
//! (guest-images/testkernel/tests/ibs_*.S) under real KVM, checked through the console,
//! the exit status and `--stats`.

use ibsvm_tests::{boot_testkernel, Run};

/// Boots the test kernel with `--stats` and `extra` flags.
fn boot(cmdline: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--stats"];
    args.extend_from_slice(extra);
    boot_testkernel(cmdline, &args)
}

fn assert_pass(run: &Run, test: &str) {
    run.assert_testkernel_pass(test);
}

fn assert_fail(run: &Run, line: &str) {
    run.assert_line(line);
    assert!(!run.stdout.lines().any(|l| l == "PASS"), "{run}");
    assert_eq!(run.code(), 1, "{run}");
}

fn stat(run: &Run, name: &str) -> u64 {
    run.stat(name)
}

fn console_number(run: &Run, prefix: &str, suffix: &str) -> u64 {
    run.console_number(prefix, suffix)
}

/// The sample count at the end of an ibs-demo histogram line, e.g.
/// `ibs-demo:   hot_a      0x103cc0-0x103ccb  153 samples`.
fn demo_count(run: &Run, what: &str) -> u64 {
    let prefix = format!("ibs-demo:   {what} ");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no histogram line for {what}\n{run}"));
    line.trim_end()
        .strip_suffix(" samples")
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("malformed histogram line {line:?}\n{run}"))
}

#[test]
fn cpuid_advertises_each_caps_profile() {
    for (flag, caps) in [
        ("old", "0x1f"),
        ("zen3", "0x3ff"),
        ("zen4", "0xbff"),
        ("0x97", "0x97"),
    ] {
        let run = boot(
            &format!("test=ibs-cpuid caps={caps}"),
            &["--ibs", "synthetic", "--ibs-caps", flag],
        );
        run.assert_line(&format!("ibs-cpuid: caps {caps}"));
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with("ibs-cpuid: family 0x") && l.contains(" model 0x")),
            "{run}"
        );
        run.assert_line("ibs-cpuid: ok");
        assert_pass(&run, "ibs-cpuid");
    }
}

#[test]
fn cpuid_default_caps_are_zen3() {
    let run = boot("test=ibs-cpuid caps=0x3ff", &["--ibs", "synthetic"]);
    run.assert_line("ibs-cpuid: caps 0x3ff");
    assert_pass(&run, "ibs-cpuid");
}

#[test]
fn cpuid_test_catches_wrong_caps() {
    // The guest expects zen3 but ibsvm advertises the old profile: the test must fail.
    let run = boot(
        "test=ibs-cpuid caps=0x3ff",
        &["--ibs", "synthetic", "--ibs-caps", "old"],
    );
    run.assert_line("ibs-cpuid: caps 0x1f");
    assert_fail(
        &run,
        "FAIL: ibs-cpuid: Fn8000_001B EAX is not the expected caps",
    );
}

#[test]
fn msrs_follow_the_advertised_caps() {
    // BR_TARGET exists with caps bit 5, FETCH_CTL_EXT with bit 9: 11 MSRs without both.
    for (flag, caps, msrs) in [
        ("old", "0x1f", 11),
        ("zen3", "0x3ff", 13),
        ("zen4", "0xbff", 13),
        ("0x7", "0x7", 11),
    ] {
        let run = boot("test=ibs-msr", &["--ibs", "synthetic", "--ibs-caps", flag]);
        run.assert_line(&format!("ibs-msr: caps {caps}"));
        run.assert_line(&format!("ibs-msr: {msrs} msrs ok"));
        run.assert_line("ibs-msr: ibs_ctl 0x100 physaddr 0");
        run.assert_line("ibs-msr: gp ok");
        run.assert_line("ibs-msr: op Val written 1 reads 0");
        assert_pass(&run, "ibs-msr");
        let checks = console_number(&run, "ibs-msr: ", " gp checks");
        assert!(checks >= 10, "{run}");
        assert!(
            console_number(&run, "ibs-msr: ", " values ok") >= 10,
            "{run}"
        );
        // Every #GP the guest saw was the device's answer.
        assert!(stat(&run, "ibs.msr_faults") >= checks, "{run}");
    }
}

#[test]
fn msr_faithful_policy_keeps_a_written_val() {
    let run = boot(
        "test=ibs-msr",
        &["--ibs", "synthetic", "--ibs-policy", "faithful"],
    );
    run.assert_line("ibs-msr: 13 msrs ok");
    run.assert_line("ibs-msr: op Val written 1 reads 1");
    assert_pass(&run, "ibs-msr");
}

#[test]
fn eilvt_registers_mask_and_fixed_delivery() {
    let run = boot("test=ibs-eilvt", &["--ibs", "synthetic"]);
    run.assert_line("ibs-eilvt: ok");
    run.assert_line("ibs-eilvt: masked: no nmi, val latched");
    run.assert_line("ibs-eilvt: fixed vector 0xe0 delivered");
    assert_pass(&run, "ibs-eilvt");
    // One sample behind the masked entry, one through the fixed vector, no NMI.
    assert_eq!(stat(&run, "ibs.samples_latched"), 2, "{run}");
    assert_eq!(stat(&run, "ibs.dropped.lvt_masked"), 1, "{run}");
    assert_eq!(stat(&run, "ibs.fixed_interrupts_injected"), 1, "{run}");
    assert_eq!(stat(&run, "ibs.nmis_injected"), 0, "{run}");
}

#[test]
fn op_and_fetch_samples_arrive_by_nmi_in_the_sampled_loop() {
    let run = boot("test=ibs-sample", &["--ibs", "synthetic"]);
    run.assert_line("ibs-sample: 20 samples, 20 in loop");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("ibs-sample: first rip 0x")),
        "{run}"
    );
    run.assert_line("ibs-sample: ctl ok");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("ibs-sample: 3 fetch samples, 3 in loop, first ctl 0x")),
        "{run}"
    );
    run.assert_line("ibs-sample: fetch ok");
    assert_pass(&run, "ibs-sample");
    // 20 op + 3 fetch samples, one NMI each, none dropped or signalled for nothing.
    assert_eq!(stat(&run, "ibs.samples_latched"), 23, "{run}");
    assert_eq!(stat(&run, "ibs.nmis_injected"), 23, "{run}");
    assert_eq!(stat(&run, "ibs.samples_delivered"), 23, "{run}");
    assert_eq!(stat(&run, "ibs.dropped.nothing_latched"), 0, "{run}");
    assert_eq!(stat(&run, "ibs.dropped.lvt_masked"), 0, "{run}");
    assert_eq!(stat(&run, "ibs.msr_faults"), 0, "{run}");
}

#[test]
fn ibs_off_hides_cpuid_and_msrs() {
    let run = boot("test=ibs-off", &["--ibs", "off"]);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("ibs-off: max extended leaf 0x")),
        "{run}"
    );
    run.assert_line("ibs-off: no ibs ok");
    assert_pass(&run, "ibs-off");
}

#[test]
fn ibs_off_test_catches_ibs() {
    // Booted with IBS on, the ibs-off test must fail at the CPUID bit.
    let run = boot("test=ibs-off", &["--ibs", "synthetic"]);
    assert_fail(&run, "FAIL: ibs-off: Fn8000_0001 ECX[10] (IBS) is set");
    // ...and a sampling test without IBS fails cleanly rather than hanging.
    let run = boot("test=ibs-sample", &["--ibs", "off"]);
    assert_fail(&run, "FAIL: ibs-sample: CPUID advertises no IBS");
}

#[test]
fn demo_shows_where_the_samples_landed() {
    // The demo boots with ibsvm's defaults (`--ibs auto`), as `make run` does.
    let run = boot("test=ibs-demo", &[]);
    run.assert_line("ibs-demo: 200 op samples via NMI");
    run.assert_line("ibs-demo: En=1 Val=1 in every sample");
    assert_pass(&run, "ibs-demo");
    let (a, b, elsewhere) = (
        demo_count(&run, "hot_a"),
        demo_count(&run, "hot_b"),
        demo_count(&run, "elsewhere"),
    );
    assert_eq!(a + b + elsewhere, 200, "{run}");
    // hot_a does three times hot_b's work: 1.8x to 6x, about ±3.5 σ of ~200 samples.
    assert!(b > 0 && 5 * a >= 9 * b && a <= 6 * b, "{run}");
    assert!(a + b >= 180, "{run}");
    assert_eq!(stat(&run, "ibs.nmis_injected"), 200, "{run}");
}
