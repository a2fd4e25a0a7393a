//! Plain snapshot of one vCPU's IBS state, for save/restore and migration.
//!
//! What is saved is architectural (register values) plus the device's latch bookkeeping.
//! Epochs and in-flight samples are not: a restore re-arms counting units with new epochs.

use crate::apic::{check_ectrl, check_eilvt, ApicError};
use crate::device::VpmuConfig;
use crate::msr::{EILVT_COUNT, X2APIC_EILVT0};
use crate::policy::Policy;
use crate::unit::{UnitKind, DATA_REGS};

/// One unit's registers and latch bookkeeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct UnitState {
    /// The CTL register.
    pub ctl: u64,
    /// Data registers in the order of [`UnitKind::data_msrs`]; slots past that list, and
    /// registers the caps do not make exist, are 0.
    pub data: [u64; DATA_REGS],
    /// Val was set by the device latching a sample (not written by the guest).
    pub latched: bool,
    /// The interrupt for the latched sample was already taken.
    pub notified: bool,
    /// The latched sample's interrupt is held until the next CTL write
    /// ([`crate::device::ForcedIrq::AfterCtlWrite`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub irq_held: bool,
}

/// A vCPU's IBS state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VpmuState {
    /// The capability word the state was saved under; must equal the restoring device's.
    pub caps: u32,
    /// The fetch unit.
    pub fetch: UnitState,
    /// The op unit.
    pub op: UnitState,
    /// Extended APIC control register (x2APIC MSR 0x841).
    pub ectrl: u32,
    /// Extended LVT entries 0–3 (x2APIC MSRs 0x850–0x853).
    pub eilvt: [u32; EILVT_COUNT],
    /// An interrupt request was pending.
    pub interrupt_pending: bool,
    /// The device's NMI was injected and not reported returned.
    pub nmi_in_service: bool,
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Saved under a different capability word.
    #[error("vpmu state: saved with IBS caps {state:#x}, device advertises {device:#x}")]
    CapsMismatch {
        /// The state's caps.
        state: u32,
        /// The device's caps.
        device: u32,
    },
    /// A register holds bits a guest write could not have set (or a read-as-zero bit).
    #[error("vpmu state: {unit} unit MSR {index:#x} holds {value:#x}, invalid bits {invalid:#x}")]
    Reserved {
        /// The unit.
        unit: UnitKind,
        /// The MSR.
        index: u32,
        /// The saved value.
        value: u64,
        /// The offending bits.
        invalid: u64,
    },
    /// A data slot past the unit's register list is not 0.
    #[error("vpmu state: {unit} unit data slot {slot} is unused but holds {value:#x}")]
    UnusedSlot {
        /// The unit.
        unit: UnitKind,
        /// The slot.
        slot: usize,
        /// The saved value.
        value: u64,
    },
    /// `latched` without En = 1 and Val = 1 in CTL.
    #[error("vpmu state: {unit} unit marked latched but CTL {ctl:#x} lacks En=1, Val=1")]
    LatchedWithoutVal {
        /// The unit.
        unit: UnitKind,
        /// The saved CTL.
        ctl: u64,
    },
    /// `notified` without `latched`.
    #[error("vpmu state: {unit} unit marked notified without a latched sample")]
    NotifiedWithoutLatch {
        /// The unit.
        unit: UnitKind,
    },
    /// `irq_held` without a latched sample whose interrupt was not yet taken.
    #[error("vpmu state: {unit} unit holds an interrupt but no untaken latched sample")]
    HeldIrqWithoutLatch {
        /// The unit.
        unit: UnitKind,
    },
    /// Val = 1 not latched by the device, which [`Policy::Protect`] never produces.
    #[error("vpmu state: {unit} unit holds a guest-written Val=1, impossible under Protect")]
    StaleValUnderProtect {
        /// The unit.
        unit: UnitKind,
    },
    /// An extended-APIC register holds reserved bits.
    #[error("vpmu state: {0}")]
    Apic(#[from] ApicError),
}

impl VpmuState {
    /// The state of `unit`.
    pub fn unit(&self, unit: UnitKind) -> &UnitState {
        match unit {
            UnitKind::Fetch => &self.fetch,
            UnitKind::Op => &self.op,
        }
    }

    /// Check the snapshot against a device's settings.
    pub fn validate(&self, config: &VpmuConfig) -> Result<(), StateError> {
        let caps = config.caps;
        if self.caps != caps.bits() {
            return Err(StateError::CapsMismatch {
                state: self.caps,
                device: caps.bits(),
            });
        }
        for kind in UnitKind::ALL {
            let s = self.unit(kind);
            let invalid = s.ctl & !(kind.ctl_writable(caps) & !kind.ctl_ignored());
            if invalid != 0 {
                return Err(StateError::Reserved {
                    unit: kind,
                    index: kind.ctl_msr(),
                    value: s.ctl,
                    invalid,
                });
            }
            for (slot, &value) in s.data.iter().enumerate() {
                let Some(&index) = kind.data_msrs().get(slot) else {
                    if value != 0 {
                        return Err(StateError::UnusedSlot {
                            unit: kind,
                            slot,
                            value,
                        });
                    }
                    continue;
                };
                let valid = UnitKind::data_reg(index, caps).map_or(0, |r| r.writable & !r.ignored);
                if value & !valid != 0 {
                    return Err(StateError::Reserved {
                        unit: kind,
                        index,
                        value,
                        invalid: value & !valid,
                    });
                }
            }
            let en_val = kind.en() | kind.val();
            if s.latched && s.ctl & en_val != en_val {
                return Err(StateError::LatchedWithoutVal {
                    unit: kind,
                    ctl: s.ctl,
                });
            }
            if s.notified && !s.latched {
                return Err(StateError::NotifiedWithoutLatch { unit: kind });
            }
            if s.irq_held && (s.notified || !s.latched) {
                return Err(StateError::HeldIrqWithoutLatch { unit: kind });
            }
            if config.policy == Policy::Protect && s.ctl & kind.val() != 0 && !s.latched {
                return Err(StateError::StaleValUnderProtect { unit: kind });
            }
        }
        check_ectrl(u64::from(self.ectrl))?;
        for (n, &lvt) in (0u32..).zip(&self.eilvt) {
            let index = X2APIC_EILVT0 + n;
            // check_eilvt drops the read-only delivery status, which a snapshot cannot hold.
            let stored = check_eilvt(index, u64::from(lvt))?;
            if stored != lvt {
                return Err(ApicError::Reserved {
                    index,
                    value: u64::from(lvt),
                    reserved: u64::from(lvt & !stored),
                }
                .into());
            }
        }
        Ok(())
    }
}
