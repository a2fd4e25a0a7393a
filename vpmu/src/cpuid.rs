//! CPUID patching: advertise (or hide) IBS to the guest ([device model §2](crate::device_model)).
//!
//! The VMM hands the table it is about to give the vCPU (e.g. converted from
//! `KVM_GET_SUPPORTED_CPUID`) as plain [`CpuidEntry`] values.
//!
//! ## Family and model
//! Linux's IBS driver changes behaviour by CPU family (Linux `arch/x86/events/amd/ibs.c`):
//! family 0x10 programs the IBS LVT offset through a northbridge PCI register
//! (`force_ibs_eilvt_setup`); families 0x16–0x18 set `fetch_count_reset_broken` and write the
//! fetch CTL twice on every enable; family 0x19 model < 0x10 sets `fetch_ignore_if_zero_rip`
//! (erratum #1197) and drops fetch samples whose linear address is 0. None of these paths
//! suits a virtual device, so [`patch_cpuid`] rewrites Fn0000_0001 EAX **only when** the
//! presented family/model falls in one of those ranges, and then to family 0x19 model 0x21
//! (a Zen 3 part: Linux `arch/x86/kernel/cpu/amd.c` files 0x19 models 0x20–0x5f under Zen 3),
//! keeping the stepping and every other EAX bit. Everything else stays as the host reports it,
//! so the guest's other family-specific code (mitigations, errata) still sees the host's
//! identity. Note that a Zen 2 host (family 0x17) is therefore presented as Zen 3, which
//! changes the mitigations a guest kernel selects for itself (e.g. Retbleed); the embedder
//! can avoid that by passing a table it patched itself to a good family.

/// One CPUID leaf/subleaf, independent of any hypervisor API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Subleaf (ECX input).
    pub index: u32,
    /// Embedder flags carried through untouched (e.g. KVM's `KVM_CPUID_FLAG_*`); 0 on entries
    /// this module adds.
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

/// Fn0000_0001: family, model, stepping in EAX.
pub const LEAF_FAMILY: u32 = 0x0000_0001;
/// Fn8000_0000: EAX is the largest extended leaf.
pub const LEAF_EXT_MAX: u32 = 0x8000_0000;
/// Fn8000_0001: extended feature flags.
pub const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// Fn8000_001B: IBS capabilities.
pub const LEAF_IBS: u32 = 0x8000_001B;
/// Fn8000_0001 ECX\[10\] IBS (Linux cpufeatures.h `X86_FEATURE_IBS`, word 6 bit 10).
pub const EXT_ECX_IBS: u32 = 1 << 10;
/// Fn8000_0001 ECX\[3\] ExtApicSpace (Linux cpufeatures.h `X86_FEATURE_EXTAPIC`, word 6 bit 3).
pub const EXT_ECX_EXTAPIC: u32 = 1 << 3;

/// Family and model decoded from Fn0000_0001 EAX (AMD APM vol. 3, CPUID Fn0000_0001 EAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FamilyModel {
    /// Effective family: BaseFamily\[11:8\] + ExtFamily\[27:20\] when BaseFamily is 0xF.
    pub family: u32,
    /// Effective model: ExtModel\[19:16\] << 4 | BaseModel\[7:4\] when BaseFamily is 0xF.
    pub model: u32,
}

impl std::fmt::Display for FamilyModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "family {:#x} model {:#x}", self.family, self.model)
    }
}

/// The identity presented when the host's falls in a range Linux treats specially.
pub const SAFE_FAMILY_MODEL: FamilyModel = FamilyModel {
    family: 0x19,
    model: 0x21,
};

impl FamilyModel {
    /// Decode Fn0000_0001 EAX.
    pub fn from_eax(eax: u32) -> FamilyModel {
        let base_family = (eax >> 8) & 0xF;
        let base_model = (eax >> 4) & 0xF;
        if base_family == 0xF {
            FamilyModel {
                family: base_family + ((eax >> 20) & 0xFF),
                model: (((eax >> 16) & 0xF) << 4) | base_model,
            }
        } else {
            FamilyModel {
                family: base_family,
                model: base_model,
            }
        }
    }

    /// Encode into `eax`, keeping its stepping and other bits. Families below 0xF are
    /// encoded without extended fields; `self` must be representable (family ≤ 0x10E).
    pub fn apply_to_eax(self, eax: u32) -> u32 {
        let keep = eax & !(0x0FF0_0000 | 0x000F_0000 | 0xF00 | 0xF0);
        let (base_family, ext_family) = if self.family >= 0xF {
            (0xF, (self.family - 0xF) & 0xFF)
        } else {
            (self.family, 0)
        };
        let (base_model, ext_model) = if self.family >= 0xF {
            (self.model & 0xF, (self.model >> 4) & 0xF)
        } else {
            (self.model & 0xF, 0)
        };
        keep | (ext_family << 20) | (ext_model << 16) | (base_family << 8) | (base_model << 4)
    }

    /// True when Linux's IBS driver would take a family-specific path (see module docs).
    pub fn takes_erratum_path(self) -> bool {
        self.family == 0x10
            || (0x16..=0x18).contains(&self.family)
            || (self.family == 0x19 && self.model < 0x10)
    }
}

/// What [`patch_cpuid`] changed beyond the IBS bits, for the embedder's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidPatch {
    /// `Some((before, after))` when Fn0000_0001 EAX was rewritten.
    pub family_model: Option<(FamilyModel, FamilyModel)>,
}

fn entry_mut(entries: &mut Vec<CpuidEntry>, function: u32) -> &mut CpuidEntry {
    let pos = match entries
        .iter()
        .position(|e| e.function == function && e.index == 0)
    {
        Some(pos) => pos,
        None => {
            entries.push(CpuidEntry {
                function,
                ..CpuidEntry::default()
            });
            entries.len() - 1
        }
    };
    &mut entries[pos]
}

/// Advertise IBS with `caps`: Fn8000_0001 ECX\[10\] IBS and \[3\] ExtApicSpace set, Fn8000_0000
/// EAX raised to at least 0x8000001B, Fn8000_001B EAX = caps with EBX/ECX/EDX = 0 (edited in
/// place, or added when absent), and Fn0000_0001 family/model moved out of Linux's
/// erratum ranges (module docs). Entries are matched on subleaf 0.
pub fn patch_cpuid(entries: &mut Vec<CpuidEntry>, caps: crate::Caps) -> CpuidPatch {
    let max = entry_mut(entries, LEAF_EXT_MAX);
    max.eax = max.eax.max(LEAF_IBS);
    entry_mut(entries, LEAF_EXT_FEATURES).ecx |= EXT_ECX_IBS | EXT_ECX_EXTAPIC;
    let ibs = entry_mut(entries, LEAF_IBS);
    (ibs.eax, ibs.ebx, ibs.ecx, ibs.edx) = (caps.bits(), 0, 0, 0);

    let mut patch = CpuidPatch::default();
    if let Some(leaf1) = entries
        .iter_mut()
        .find(|e| e.function == LEAF_FAMILY && e.index == 0)
    {
        let before = FamilyModel::from_eax(leaf1.eax);
        if before.takes_erratum_path() {
            leaf1.eax = SAFE_FAMILY_MODEL.apply_to_eax(leaf1.eax);
            patch.family_model = Some((before, SAFE_FAMILY_MODEL));
        }
    }
    patch
}

/// Make sure the guest sees no IBS (`--ibs off`): clear Fn8000_0001 ECX\[10\] and zero
/// Fn8000_001B if present. ExtApicSpace and the max leaf are left as they were.
pub fn hide_ibs(entries: &mut [CpuidEntry]) {
    for e in entries.iter_mut() {
        match e.function {
            LEAF_EXT_FEATURES => e.ecx &= !EXT_ECX_IBS,
            LEAF_IBS => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Caps;

    fn leaf(v: &[CpuidEntry], f: u32) -> CpuidEntry {
        *v.iter().find(|e| e.function == f).expect("leaf present")
    }

    // Family/model/stepping encodings of real parts (AMD APM vol. 3 CPUID Fn0000_0001).
    const MILAN: u32 = 0x00A0_0F11; // family 0x19 model 0x01 stepping 1
    const ROME: u32 = 0x0083_0F10; // family 0x17 model 0x31 stepping 0
    const GENOA: u32 = 0x00A1_0F11; // family 0x19 model 0x11 stepping 1

    #[test]
    fn decode_encode() {
        assert_eq!(
            FamilyModel::from_eax(MILAN),
            FamilyModel {
                family: 0x19,
                model: 0x01
            }
        );
        assert_eq!(
            FamilyModel::from_eax(ROME),
            FamilyModel {
                family: 0x17,
                model: 0x31
            }
        );
        assert_eq!(
            FamilyModel::from_eax(0x0000_0663),
            FamilyModel {
                family: 6,
                model: 6
            }
        );
        let fm = FamilyModel::from_eax(SAFE_FAMILY_MODEL.apply_to_eax(MILAN | 0xF000_0000));
        assert_eq!(fm, SAFE_FAMILY_MODEL);
        assert_eq!(SAFE_FAMILY_MODEL.apply_to_eax(MILAN), 0x00A2_0F11);
    }

    #[test]
    fn erratum_ranges() {
        let bad = |family, model| FamilyModel { family, model }.takes_erratum_path();
        assert!(bad(0x10, 2) && bad(0x16, 0) && bad(0x17, 0x31) && bad(0x18, 0));
        assert!(bad(0x19, 0x01) && bad(0x19, 0x0F));
        assert!(!bad(0x19, 0x10) && !bad(0x19, 0x21) && !bad(0x15, 0) && !bad(0x1A, 0));
        assert!(!SAFE_FAMILY_MODEL.takes_erratum_path());
        assert_eq!(SAFE_FAMILY_MODEL.to_string(), "family 0x19 model 0x21");
    }

    #[test]
    fn patches_existing_entries_in_place() {
        let mut v = vec![
            CpuidEntry {
                function: LEAF_FAMILY,
                eax: MILAN,
                ..Default::default()
            },
            CpuidEntry {
                function: LEAF_EXT_MAX,
                eax: 0x8000_0021,
                ebx: 0x6874_7541,
                ..Default::default()
            },
            CpuidEntry {
                function: LEAF_EXT_FEATURES,
                ecx: 0x1,
                flags: 7,
                ..Default::default()
            },
            CpuidEntry {
                function: LEAF_IBS,
                eax: 0x81BFF,
                ebx: 9,
                ..Default::default()
            },
        ];
        let p = patch_cpuid(&mut v, Caps::PROFILE_ZEN4);
        assert_eq!(v.len(), 4);
        assert_eq!(leaf(&v, LEAF_EXT_MAX).eax, 0x8000_0021);
        assert_eq!(leaf(&v, LEAF_EXT_MAX).ebx, 0x6874_7541);
        let f = leaf(&v, LEAF_EXT_FEATURES);
        assert_eq!((f.ecx, f.flags), (0x1 | EXT_ECX_IBS | EXT_ECX_EXTAPIC, 7));
        let i = leaf(&v, LEAF_IBS);
        assert_eq!((i.eax, i.ebx, i.ecx, i.edx), (0xBFF, 0, 0, 0));
        assert_eq!(
            p.family_model,
            Some((FamilyModel::from_eax(MILAN), SAFE_FAMILY_MODEL))
        );
        assert_eq!(leaf(&v, LEAF_FAMILY).eax & 0xF, 1, "stepping kept");
    }

    #[test]
    fn adds_missing_leaves_and_keeps_good_family() {
        let mut v = vec![
            CpuidEntry {
                function: LEAF_FAMILY,
                eax: GENOA,
                ..Default::default()
            },
            CpuidEntry {
                function: LEAF_EXT_MAX,
                eax: 0x8000_0008,
                ..Default::default()
            },
        ];
        let p = patch_cpuid(&mut v, Caps::PROFILE_ZEN3);
        assert_eq!(p.family_model, None);
        assert_eq!(leaf(&v, LEAF_FAMILY).eax, GENOA);
        assert_eq!(leaf(&v, LEAF_EXT_MAX).eax, LEAF_IBS);
        assert_eq!(
            leaf(&v, LEAF_EXT_FEATURES).ecx,
            EXT_ECX_IBS | EXT_ECX_EXTAPIC
        );
        assert_eq!(leaf(&v, LEAF_IBS).eax, 0x3FF);
    }

    #[test]
    fn hide_clears_ibs_only() {
        let mut v = Vec::new();
        patch_cpuid(&mut v, Caps::PROFILE_ZEN4);
        hide_ibs(&mut v);
        assert_eq!(leaf(&v, LEAF_EXT_FEATURES).ecx, EXT_ECX_EXTAPIC);
        let i = leaf(&v, LEAF_IBS);
        assert_eq!((i.eax, i.ebx, i.ecx, i.edx), (0, 0, 0, 0));
    }
}
