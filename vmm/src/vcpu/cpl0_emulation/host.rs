//! What the host's KVM is, as far as a guest needs to know: whether it runs guest CPL0
//! code through KVM's instruction emulator (a paravirtual "pagetable-based" backend such
//! as `kvm_pvm`) instead of hardware SVM/VMX, and what a guest then needs.

use std::path::Path;

/// Kernel parameters a stock Linux guest needs on a CPL0-emulating host, each with why; a
/// parameter the user gave keeps the user's value.
///
/// First, what it cannot run without, measured on our development hosts, which are such
/// hosts: `KVM_SET_CPUID2` cannot hide the leaf 1/7 features from guest CPL0 code, and the
/// emulator cannot execute them. The leaf 0xD.1 ones are hidden the same way (whether the
/// table would hide them was not measured), since ibsvm completes only the standard forms.
/// XSAVE and XRSTOR themselves stay: ibsvm completes them (`super::completion::xstate`).
///
/// Then what keeps its boot from taking many minutes there, where every kernel instruction
/// is emulated (docs/boot-time.md): checks and self-tests skipped, no page zeroing at
/// allocation, no read-only kernel mappings. They trade hardening for boot time in a guest
/// that is there to be profiled; `--cpl0-quirks off` or the user's own value undoes each.
pub const CPL0_EMULATION_LINUX_PARAMS: &[(&str, &str)] = &[
    // X86_FEATURE_* numbers (arch/x86/include/asm/cpufeatures.h, word*32+bit): 151 POPCNT,
    // 59 RDTSCP, 288 FSGSBASE, 308 SMAP, 137 SSSE3, 298 INVPCID, 311 CLFLUSHOPT, 312 CLWB,
    // 534 RDPID; 320-323 XSAVEOPT, XSAVEC, XGETBV1, XSAVES (CPUID Fn0000_000D.1 EAX).
    (
        "clearcpuid=151,59,288,308,137,298,311,312,534,320,321,322,323",
        "popcnt, rdtscp, fsgsbase, smap, ssse3, invpcid, clflushopt, clwb and rdpid cannot be emulated, and ibsvm completes only the standard xsave/xrstor",
    ),
    ("io_delay=none", "every port-0x80 delay is a trapped I/O exit"),
    (
        "cryptomgr.notests",
        "the crypto self-tests run as emulated kernel code",
    ),
    (
        "init_on_alloc=0",
        "zeroing every allocated page runs as emulated kernel code",
    ),
    (
        "rodata=off",
        "the W+X check of the read-only kernel mappings takes minutes emulated",
    ),
    ("nowatchdog", "emulated kernel code trips the lockup watchdogs"),
    (
        "initcall_blacklist=ftrace_check_for_weak_functions",
        "ftrace's weak-function check takes over a minute emulated",
    ),
];

/// How the host runs guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKvm {
    /// Guest CPL0 code runs in KVM's instruction emulator.
    pub emulates_cpl0: bool,
    /// What the decision rests on, for the log.
    pub evidence: String,
}

impl HostKvm {
    /// Inspects this host (`/sys/module`, `/proc/cpuinfo`).
    pub fn detect() -> Self {
        let pvm_module = Path::new("/sys/module/kvm_pvm").exists();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_evidence(pvm_module, &cpuinfo)
    }

    /// The decision from its inputs: the `kvm_pvm` module is loaded, or KVM works although
    /// the CPU flags show neither `svm` nor `vmx` (so no hardware virtualization backs it).
    pub fn from_evidence(pvm_module: bool, cpuinfo: &str) -> Self {
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        let hw_virt = flags.iter().any(|f| *f == "svm" || *f == "vmx");
        match (pvm_module, hw_virt) {
            (true, _) => Self {
                emulates_cpl0: true,
                evidence: "the kvm_pvm module backs /dev/kvm".into(),
            },
            (false, false) if !flags.is_empty() => Self {
                emulates_cpl0: true,
                evidence: "the CPU flags show neither svm nor vmx".into(),
            },
            (false, _) => Self {
                emulates_cpl0: false,
                evidence: "hardware virtualization (svm/vmx)".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPYC_BARE: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr svm lm\n";
    const EPYC_NESTED_PVM: &str =
        "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr hypervisor lm\n";
    const XEON: &str = "flags\t\t: fpu vmx lm\n";

    #[test]
    fn hardware_virtualization_means_no_quirks() {
        assert!(!HostKvm::from_evidence(false, EPYC_BARE).emulates_cpl0);
        assert!(!HostKvm::from_evidence(false, XEON).emulates_cpl0);
    }

    #[test]
    fn pvm_is_recognised() {
        assert!(HostKvm::from_evidence(true, EPYC_BARE).emulates_cpl0);
        let h = HostKvm::from_evidence(false, EPYC_NESTED_PVM);
        assert!(h.emulates_cpl0);
        assert!(h.evidence.contains("neither svm nor vmx"));
    }

    #[test]
    fn unreadable_cpuinfo_is_not_evidence() {
        assert!(!HostKvm::from_evidence(false, "").emulates_cpl0);
    }
}
