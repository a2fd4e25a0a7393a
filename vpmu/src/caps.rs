//! The IBS capability word (CPUID Fn8000_001B EAX) the device advertises, and named profiles.
//!
//! Bit numbers are Linux `arch/x86/include/asm/perf_event.h` `IBS_CAPS_*`
//! ([device model §2](crate::device_model)). The advertised word decides which MSRs exist and
//! which CTL bits a guest may write.

use std::fmt;
use std::str::FromStr;

/// A validated IBS capability word: only bits this device models, and always
/// AVAIL | FETCHSAM | OPSAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "u32", into = "u32"))]
pub struct Caps(u32);

/// Description of one capability bit: its number and Linux name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapBit {
    /// Bit number in CPUID Fn8000_001B EAX.
    pub bit: u32,
    /// Linux `IBS_CAPS_*` name without the prefix.
    pub name: &'static str,
}

macro_rules! cap_bits {
    ($($(#[$doc:meta])* $konst:ident = $bit:literal;)*) => {
        impl Caps {
            $($(#[$doc])* pub const $konst: u32 = 1 << $bit;)*
        }
        const NAMES: &[CapBit] = &[$(CapBit { bit: $bit, name: stringify!($konst) },)*];
    };
}

cap_bits! {
    /// Bit 0: the capability word is valid (perf_event.h `IBS_CAPS_AVAIL`).
    AVAIL = 0;
    /// Bit 1: fetch sampling (perf_event.h `IBS_CAPS_FETCHSAM`).
    FETCHSAM = 1;
    /// Bit 2: op sampling (perf_event.h `IBS_CAPS_OPSAM`).
    OPSAM = 2;
    /// Bit 3: IBS_OP_CTL CurCnt readable and writable (perf_event.h `IBS_CAPS_RDWROPCNT`).
    RDWROPCNT = 3;
    /// Bit 4: IBS_OP_CTL CntCtl, op counting mode (perf_event.h `IBS_CAPS_OPCNT`).
    OPCNT = 4;
    /// Bit 5: IBS_BR_TARGET exists (perf_event.h `IBS_CAPS_BRNTRGT`).
    BRNTRGT = 5;
    /// Bit 6: IBS_OP_CTL MaxCnt\[22:16\] in bits 26:20 (perf_event.h `IBS_CAPS_OPCNTEXT`).
    OPCNTEXT = 6;
    /// Bit 7: IBS_OP_DATA RipInvalid is valid (perf_event.h `IBS_CAPS_RIPINVALIDCHK`).
    RIPINVALIDCHK = 7;
    /// Bit 8: IBS_OP_DATA BrnFuse (perf_event.h `IBS_CAPS_OPBRNFUSE`).
    OPBRNFUSE = 8;
    /// Bit 9: IBS_FETCH_CTL_EXT exists (perf_event.h `IBS_CAPS_FETCHCTLEXTD`).
    FETCHCTLEXTD = 9;
    /// Bit 10: IBS_OP_DATA4 exists (perf_event.h `IBS_CAPS_OPDATA4`); never advertised (§7).
    OPDATA4 = 10;
    /// Bit 11: Zen 4 extensions, L3MissOnly filters (perf_event.h `IBS_CAPS_ZEN4`).
    ZEN4 = 11;
    /// Bit 12: load-latency filter (perf_event.h `IBS_CAPS_OPLDLAT`); not modelled.
    OPLDLAT = 12;
    /// Bit 13: CTL2 disable bits (perf_event.h `IBS_CAPS_DIS`); not modelled
    /// ([device model §7](crate::device_model)).
    DIS = 13;
    /// Bit 14: fetch latency filter (perf_event.h `IBS_CAPS_FETCHLAT`); not modelled.
    FETCHLAT = 14;
    /// Bit 15: RIP bit-63 filter (perf_event.h `IBS_CAPS_BIT63_FILTER`); not modelled.
    BIT63_FILTER = 15;
    /// Bit 16: streaming-store / remote-socket filter (perf_event.h
    /// `IBS_CAPS_STRMST_RMTSOCKET`); not modelled.
    STRMST_RMTSOCKET = 16;
    /// Bit 19: op DTLB page size (perf_event.h `IBS_CAPS_OPDTLBPGSIZE`); not modelled.
    OPDTLBPGSIZE = 19;
}

/// Bits that every advertised word must carry (Linux falls back to 0x7 without them,
/// [device model §2](crate::device_model)).
const REQUIRED: u32 = Caps::AVAIL | Caps::FETCHSAM | Caps::OPSAM;
/// Bits whose behaviour this device models.
const MODELLED: u32 = REQUIRED
    | Caps::RDWROPCNT
    | Caps::OPCNT
    | Caps::BRNTRGT
    | Caps::OPCNTEXT
    | Caps::RIPINVALIDCHK
    | Caps::OPBRNFUSE
    | Caps::FETCHCTLEXTD
    | Caps::ZEN4;

/// Why a capability word or profile name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsError {
    /// The word sets a bit the device does not model.
    #[error("IBS caps {caps:#x}: bit {bit} ({name}) is not modelled by the device")]
    Unsupported {
        /// The refused word.
        caps: u32,
        /// The offending bit number.
        bit: u32,
        /// Its Linux name, or "reserved".
        name: &'static str,
    },
    /// The word lacks a bit every guest needs.
    #[error("IBS caps {caps:#x}: required bit {bit} ({name}) is clear")]
    Missing {
        /// The refused word.
        caps: u32,
        /// The missing bit number.
        bit: u32,
        /// Its Linux name.
        name: &'static str,
    },
    /// The text is neither a profile name nor a hex number.
    #[error("IBS caps {text:?}: expected a profile (old, zen2, zen3, zen4) or a hex word 0x…")]
    Parse {
        /// The text that failed to parse.
        text: String,
    },
}

fn name_of(bit: u32) -> &'static str {
    NAMES
        .iter()
        .find(|c| c.bit == bit)
        .map_or("reserved", |c| c.name)
}

impl Caps {
    /// Validate a raw capability word.
    pub fn new(raw: u32) -> Result<Caps, CapsError> {
        let missing = REQUIRED & !raw;
        if missing != 0 {
            let bit = missing.trailing_zeros();
            return Err(CapsError::Missing {
                caps: raw,
                bit,
                name: name_of(bit),
            });
        }
        let extra = raw & !MODELLED;
        if extra != 0 {
            let bit = extra.trailing_zeros();
            return Err(CapsError::Unsupported {
                caps: raw,
                bit,
                name: name_of(bit),
            });
        }
        Ok(Caps(raw))
    }

    /// The word as advertised in CPUID Fn8000_001B EAX.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// True when every bit of `mask` is advertised.
    pub fn has(self, mask: u32) -> bool {
        self.0 & mask == mask
    }

    /// Family 10h-era IBS: AVAIL, FETCHSAM, OPSAM, RDWROPCNT, OPCNT
    /// (0x1F, [device model §2](crate::device_model)).
    pub const PROFILE_OLD: Caps = Caps(0x1F);
    /// Zen 2: bits 0–9 (0x3FF, [device model §2](crate::device_model)).
    pub const PROFILE_ZEN2: Caps = Caps(0x3FF);
    /// Zen 3: same word as Zen 2 (0x3FF, [device model §2](crate::device_model)).
    pub const PROFILE_ZEN3: Caps = Caps(0x3FF);
    /// Zen 4 without OPDATA4: bits 0–9 and ZEN4
    /// (0xBFF, [device model §2, §7](crate::device_model)).
    pub const PROFILE_ZEN4: Caps = Caps(0xBFF);
}

impl Default for Caps {
    /// The Zen 2/3 word, 0x3FF: everything modelled except the Zen 4 filters.
    fn default() -> Caps {
        Caps::PROFILE_ZEN3
    }
}

impl FromStr for Caps {
    type Err = CapsError;

    /// Parse `old`, `zen2`, `zen3`, `zen4` (any case) or a hex word `0x…`.
    fn from_str(text: &str) -> Result<Caps, CapsError> {
        let t = text.trim();
        match t.to_ascii_lowercase().as_str() {
            "old" => return Ok(Caps::PROFILE_OLD),
            "zen2" => return Ok(Caps::PROFILE_ZEN2),
            "zen3" => return Ok(Caps::PROFILE_ZEN3),
            "zen4" => return Ok(Caps::PROFILE_ZEN4),
            _ => {}
        }
        let hex = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .ok_or_else(|| CapsError::Parse { text: text.into() })?;
        let raw =
            u32::from_str_radix(hex, 16).map_err(|_| CapsError::Parse { text: text.into() })?;
        Caps::new(raw)
    }
}

impl TryFrom<u32> for Caps {
    type Error = CapsError;
    fn try_from(raw: u32) -> Result<Caps, CapsError> {
        Caps::new(raw)
    }
}

impl From<Caps> for u32 {
    fn from(c: Caps) -> u32 {
        c.0
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles() {
        assert_eq!("old".parse::<Caps>().unwrap().bits(), 0x1F);
        assert_eq!("zen2".parse::<Caps>().unwrap().bits(), 0x3FF);
        assert_eq!("ZEN3".parse::<Caps>().unwrap().bits(), 0x3FF);
        assert_eq!("zen4".parse::<Caps>().unwrap().bits(), 0xBFF);
        assert_eq!("0x7".parse::<Caps>().unwrap().bits(), 0x7);
        assert_eq!(Caps::default(), Caps::PROFILE_ZEN3);
        for p in [Caps::PROFILE_OLD, Caps::PROFILE_ZEN2, Caps::PROFILE_ZEN4] {
            assert_eq!(Caps::new(p.bits()), Ok(p));
            assert!(!p.has(Caps::OPDATA4));
        }
    }

    #[test]
    fn refuses_unmodelled_bits_by_name() {
        for (raw, bit, name) in [
            (0x7FF, 10, "OPDATA4"),
            (0x1007, 12, "OPLDLAT"),
            (0x2007, 13, "DIS"),
            (0x4007, 14, "FETCHLAT"),
            (0x8007, 15, "BIT63_FILTER"),
            (0x1_0007, 16, "STRMST_RMTSOCKET"),
            (0x8_0007, 19, "OPDTLBPGSIZE"),
            (0x2_0007, 17, "reserved"),
            (0x81BFF, 12, "OPLDLAT"), // Zen 5
        ] {
            let e = Caps::new(raw).unwrap_err();
            assert_eq!(
                e,
                CapsError::Unsupported {
                    caps: raw,
                    bit,
                    name
                }
            );
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn refuses_missing_required() {
        let e = Caps::new(0x5).unwrap_err();
        assert!(matches!(
            e,
            CapsError::Missing {
                bit: 1,
                name: "FETCHSAM",
                ..
            }
        ));
        assert!(matches!(
            Caps::new(0x6),
            Err(CapsError::Missing { bit: 0, .. })
        ));
    }

    #[test]
    fn parse_errors() {
        for t in ["", "zen5", "3ff", "0x", "0xZZ", "0x1_0000_0000"] {
            assert!(
                matches!(t.parse::<Caps>(), Err(CapsError::Parse { .. })),
                "{t}"
            );
        }
    }
}
