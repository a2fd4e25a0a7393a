//! Guest protection policy ([device model §5.8](crate::device_model)) and race detection
//! ([device model §5.9](crate::device_model)).

use std::fmt;
use std::str::FromStr;

use crate::unit::UnitKind;

/// Who owns the Val bit of the sampling CTL registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Policy {
    /// Val is owned by the device: every guest write to a CTL stores Val = 0, whatever was
    /// written. The stale {Val = 1, En = 0} state an unpatched Linux stop path writes back can
    /// then not exist, which is what upstream commit 1b044ff3c17e achieves in the guest.
    #[default]
    Protect,
    /// A written Val is kept, as hardware does, to reproduce the Linux IBS race on purpose.
    Faithful,
}

/// What to do when the device sees a guest hit the IBS race (only in [`Policy::Faithful`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum RaceCheck {
    /// No detection.
    Off,
    /// Count it and report a non-fatal [`RaceEvent`].
    #[default]
    Warn,
    /// Count it and report a fatal [`RaceEvent`]: the embedder should stop the VM.
    Fail,
}

/// Error parsing a [`Policy`] or [`RaceCheck`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {text:?}: expected one of {expected}")]
pub struct ParsePolicyError {
    /// Which setting.
    pub what: &'static str,
    /// The text given.
    pub text: String,
    /// The accepted words.
    pub expected: &'static str,
}

impl FromStr for Policy {
    type Err = ParsePolicyError;
    /// Parse `protect` or `faithful`.
    fn from_str(text: &str) -> Result<Policy, ParsePolicyError> {
        match text {
            "protect" => Ok(Policy::Protect),
            "faithful" => Ok(Policy::Faithful),
            _ => Err(ParsePolicyError {
                what: "IBS policy",
                text: text.into(),
                expected: "protect, faithful",
            }),
        }
    }
}

impl FromStr for RaceCheck {
    type Err = ParsePolicyError;
    /// Parse `off`, `warn` or `fail`.
    fn from_str(text: &str) -> Result<RaceCheck, ParsePolicyError> {
        match text {
            "off" => Ok(RaceCheck::Off),
            "warn" => Ok(RaceCheck::Warn),
            "fail" => Ok(RaceCheck::Fail),
            _ => Err(ParsePolicyError {
                what: "IBS race check",
                text: text.into(),
                expected: "off, warn, fail",
            }),
        }
    }
}

/// What the embedder knows about the vCPU's state at an MSR exit. Queried lazily, only when a
/// race is otherwise established (a CTL enable right after a stale Val was presented).
pub trait GuestContext {
    /// True when the vCPU is inside an NMI handler (e.g. NMIs masked per
    /// `KVM_GET_VCPU_EVENTS`).
    fn in_nmi(&self) -> bool;
}

/// A [`GuestContext`] that knows nothing; the device then relies on the NMIs it injected
/// itself ([`crate::Vpmu::nmi_injected`] / [`crate::Vpmu::nmi_returned`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoGuestContext;

impl GuestContext for NoGuestContext {
    fn in_nmi(&self) -> bool {
        false
    }
}

impl<F: Fn() -> bool> GuestContext for F {
    fn in_nmi(&self) -> bool {
        self()
    }
}

/// How the device knew the guest was in an NMI handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum NmiEvidence {
    /// The device's own NMI was injected and has not been reported returned.
    DeviceNmi,
    /// The embedder's [`GuestContext::in_nmi`] said so.
    GuestContext,
}

/// A guest kernel hitting the Linux IBS race ([device model §4](crate::device_model)): it
/// enabled a unit from an NMI handler right after the device presented a Val = 1 the device
/// had not latched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RaceEvent {
    /// The unit.
    pub unit: UnitKind,
    /// The CTL value the guest read (Val = 1, not latched by the device).
    pub stale_ctl: u64,
    /// The CTL value the guest then wrote (En = 1).
    pub written_ctl: u64,
    /// Why the device believed the guest was in an NMI handler.
    pub evidence: NmiEvidence,
    /// True with [`RaceCheck::Fail`]: the embedder should stop the VM.
    pub fatal: bool,
}

impl fmt::Display for RaceEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest IBS race on the {} unit: enabled from an NMI handler ({:?}) after reading a \
             stale Val (read {:#x}, wrote {:#x}); the guest kernel lacks upstream fix \
             1b044ff3c17e",
            self.unit, self.evidence, self.stale_ctl, self.written_ctl
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!("protect".parse(), Ok(Policy::Protect));
        assert_eq!("faithful".parse(), Ok(Policy::Faithful));
        assert!("Protect".parse::<Policy>().is_err());
        assert_eq!("off".parse(), Ok(RaceCheck::Off));
        assert_eq!("warn".parse(), Ok(RaceCheck::Warn));
        assert_eq!("fail".parse(), Ok(RaceCheck::Fail));
        let e = "loud".parse::<RaceCheck>().unwrap_err();
        assert!(e.to_string().contains("off, warn, fail"));
        assert_eq!(Policy::default(), Policy::Protect);
    }

    #[test]
    fn contexts() {
        assert!(!NoGuestContext.in_nmi());
        assert!((|| true).in_nmi());
        assert!(!(|| false).in_nmi());
    }
}
