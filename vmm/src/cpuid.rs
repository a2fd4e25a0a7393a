//! The CPUID table each vCPU gets: KVM's supported set, cleaned up for a VM.
//!
//! Leaf and bit positions: AMD APM vol. 3 appendix E and Intel SDM vol. 2A "CPUID".

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID.1:ECX bit 13 CMPXCHG16B.
const LEAF1_ECX_CX16: u32 = 1 << 13;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28 HTT: EBX[23:16] is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CPUID.0xB level types (ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// How to adapt the table.
#[derive(Debug, Clone, Copy)]
pub struct CpuidPolicy {
    /// This vCPU's APIC ID.
    pub apic_id: u8,
    /// vCPUs in the VM (one socket, one thread per core).
    pub cpus: u8,
    /// Hide CMPXCHG16B (the CPL0 emulator here cannot execute it).
    pub hide_cx16: bool,
}

/// Bits needed to number `n` things (ceil(log2(n))).
fn width(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

/// Adapts `entries` in place for one vCPU.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], policy: CpuidPolicy) {
    let apic = u32::from(policy.apic_id);
    let cpus = u32::from(policy.cpus);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | (cpus << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if policy.hide_cx16 {
                    e.ecx &= !LEAF1_ECX_CX16;
                }
                if policy.cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            // Extended topology: one thread per core, `cpus` cores; EDX = x2APIC ID.
            0xb | 0x1f => {
                let (eax, ebx, level) = match e.index {
                    0 => (0, 1, LEVEL_SMT),
                    1 => (width(policy.cpus), cpus, LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                (e.eax, e.ebx, e.ecx, e.edx) = (eax, ebx, (level << 8) | e.index, apic);
            }
            // Architectural performance monitoring: this VMM exposes no counters.
            0xa => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            // AMD: ECX[7:0] NC = cores - 1, [15:12] ApicIdCoreIdSize.
            0x8000_0008 => e.ecx = (e.ecx & !0xf0ff) | (width(policy.cpus) << 12) | (cpus - 1),
            // AMD: EAX extended APIC ID, EBX[7:0] core ID with one thread per core.
            0x8000_001e => (e.eax, e.ebx, e.ecx) = (apic, apic, 0),
            _ => {}
        }
    }
}

/// The table with the virtual IBS PMU advertised with `caps`, or hidden when `None`; and the
/// family/model change `vpmu` made, if any (see `vpmu::patch_cpuid`).
pub fn with_ibs(
    entries: &[kvm_cpuid_entry2],
    caps: Option<vpmu::Caps>,
) -> (
    Vec<kvm_cpuid_entry2>,
    Option<(vpmu::FamilyModel, vpmu::FamilyModel)>,
) {
    let mut plain: Vec<vpmu::CpuidEntry> = entries
        .iter()
        .map(|e| vpmu::CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect();
    let family_model = match caps {
        Some(caps) => vpmu::patch_cpuid(&mut plain, caps).family_model,
        None => {
            vpmu::hide_ibs(&mut plain);
            None
        }
    };
    let out = plain
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    (out, family_model)
}

/// Looks up a leaf.
pub fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn table() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x1, 0, 0x00a2_0f12, 0x0010_0800, LEAF1_ECX_CX16 | 1, 0),
            entry(0xa, 0, 0x0803_0802, 1, 2, 3),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 8, 0x201, 7),
            entry(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
            entry(0x8000_001e, 0, 9, 0x100, 1, 0),
        ]
    }

    #[test]
    fn topology_follows_the_vcpu() {
        let mut t = table();
        normalize(
            &mut t,
            CpuidPolicy {
                apic_id: 1,
                cpus: 2,
                hide_cx16: false,
            },
        );
        let l1 = find(&t, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 1);
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_CX16, 0, "CX16 kept without the quirk");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let b1 = find(&t, 0xb, 1).unwrap();
        assert_eq!((b1.eax, b1.ebx, b1.ecx, b1.edx), (1, 2, 0x201, 1));
        assert_eq!(find(&t, 0xb, 0).unwrap().edx, 1);
        assert_eq!(find(&t, 0x8000_0008, 0).unwrap().ecx, 0x1001);
        assert_eq!(find(&t, 0x8000_001e, 0).unwrap().eax, 1);
        assert_eq!(find(&t, 0xa, 0).unwrap().eax, 0, "no PMU advertised");
    }

    #[test]
    fn cx16_hidden_on_request() {
        let mut t = table();
        normalize(
            &mut t,
            CpuidPolicy {
                apic_id: 0,
                cpus: 1,
                hide_cx16: true,
            },
        );
        assert_eq!(find(&t, 1, 0).unwrap().ecx & LEAF1_ECX_CX16, 0);
        assert_eq!(find(&t, 0x8000_0008, 0).unwrap().ecx & 0xf0ff, 0);
    }

    #[test]
    fn ibs_is_advertised_or_hidden() {
        let mut t = table();
        t.push(entry(0x8000_0000, 0, 0x8000_0021, 0, 0, 0));
        t.push(entry(0x8000_0001, 0, 0, 0, 0, 0));
        t.push(entry(0x8000_001b, 0, 0, 0, 0, 0));
        let (with, _) = with_ibs(&t, Some(vpmu::Caps::PROFILE_ZEN3));
        assert_eq!(find(&with, 0x8000_001b, 0).unwrap().eax, 0x3ff);
        assert_eq!(
            find(&with, 0x8000_0001, 0).unwrap().ecx & (1 << 10 | 1 << 3),
            1 << 10 | 1 << 3
        );
        assert_eq!(with.len(), t.len(), "edited in place");
        let (without, fm) = with_ibs(&with, None);
        assert_eq!(find(&without, 0x8000_001b, 0).unwrap().eax, 0);
        assert_eq!(find(&without, 0x8000_0001, 0).unwrap().ecx & (1 << 10), 0);
        assert_eq!(fm, None);
    }

    #[test]
    fn widths() {
        assert_eq!(
            (width(1), width(2), width(3), width(4), width(32)),
            (0, 1, 2, 2, 5)
        );
    }
}
