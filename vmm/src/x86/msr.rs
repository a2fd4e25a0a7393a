//! The architectural MSRs ibsvm itself touches or protects (the IBS and extended-APIC MSRs
//! belong to the `vpmu` crate), and which of them `--null-msr` may not take.

/// IA32_APIC_BASE (Intel SDM vol. 3 §11.4.4; AMD APM vol. 2 §16.3.1 "APIC_BASE").
pub const APIC_BASE: u32 = 0x1b;
/// The x2APIC register MSRs 800h–8FFh (Intel SDM vol. 3 §11.12.1.2, table 11-6).
pub const X2APIC_FIRST: u32 = 0x800;
/// Last of the x2APIC register MSRs.
pub const X2APIC_LAST: u32 = 0x8ff;
/// EFER, extended feature enable (AMD APM vol. 2 §3.1.7; Intel SDM vol. 3 §2.2.1).
pub const EFER: u32 = 0xc000_0080;
/// LSTAR: the 64-bit SYSCALL target (AMD APM vol. 2 §6.1.1).
pub const LSTAR: u32 = 0xc000_0082;
/// SFMASK: the RFLAGS bits SYSCALL clears (AMD APM vol. 2 §6.1.1).
pub const SFMASK: u32 = 0xc000_0084;
/// HWCR, hardware configuration (AMD PPR for family 19h, MSRC001_0015). KVM accepts it
/// from userspace (Linux arch/x86/kvm/x86.c, MSR_K7_HWCR).
pub const K7_HWCR: u32 = 0xc001_0015;
/// HWCR bit 24 TscFreqSel, "the TSC increments at the P0 frequency" (same PPR; Linux
/// `arch/x86/kernel/cpu/amd.c` warns "[Firmware Bug]: TSC doesn't count with P0
/// frequency!" when firmware left it clear).
pub const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// Why `--null-msr` may not take `index`, or `None` if it may. A null MSR reads 0 and drops
/// writes, so on one of these it would silently break what the reason names. (The IBS and
/// extended-APIC MSRs are refused as well: `vpmu::is_vpmu_msr`.)
pub fn relied_on(index: u32) -> Option<&'static str> {
    Some(match index {
        LSTAR | SFMASK => "the syscall bridge traps the guest's writes of it",
        K7_HWCR => "ibsvm sets its TscFreqSel bit on every vCPU",
        APIC_BASE | X2APIC_FIRST..=X2APIC_LAST => {
            "virtual IBS interrupts go through the guest's local APIC"
        }
        EFER => "the guest runs in long mode through it",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_msrs_ibsvm_relies_on_are_named_and_others_are_free() {
        for index in [APIC_BASE, 0x830, X2APIC_LAST, EFER, LSTAR, SFMASK, K7_HWCR] {
            assert!(relied_on(index).is_some(), "{index:#x}");
        }
        // CSTAR stays with KVM; C001_1FF0 is the benchmark's null MSR.
        for index in [0xc000_0083, 0xc001_1ff0, 0x10] {
            assert_eq!(relied_on(index), None, "{index:#x}");
        }
    }
}
