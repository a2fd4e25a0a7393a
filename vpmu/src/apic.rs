//! The AMD extended APIC registers IBS needs, in x2APIC MSR form
//! ([device model §3, §5.2](crate::device_model)).
//!
//! EFEAT (0x840) is read-only and reports 4 extended LVT entries; ECTRL (0x841) reads 0 and
//! accepts only legal values (no extended feature is offered, so only 0); EILVT0–3
//! (0x850–0x853) reset to masked and store what the guest writes. Valid EILVT bits: vector
//! \[7:0\], message type \[10:8\], delivery status \[12\] (read-only, reads 0, writes ignored) and
//! mask \[16\]; any other bit set in a write is #GP, as is any bit in \[63:32\] of any of these
//! MSRs (x2APIC registers are 32 bits wide).

use crate::msr::{
    ECTRL_VALID, EFEAT_VALUE, EILVT_COUNT, EILVT_DELIVERY_STATUS, EILVT_MASKED, EILVT_MSG_FIXED,
    EILVT_MSG_NMI, EILVT_MSG_TYPE, EILVT_MSG_TYPE_SHIFT, EILVT_RESET, EILVT_VECTOR, EILVT_WRITABLE,
    X2APIC_ECTRL, X2APIC_EFEAT, X2APIC_EILVT0,
};

/// Why an extended-APIC access faults (every variant is a #GP for the guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApicError {
    /// A write sets a reserved bit of the register.
    #[error("x2APIC MSR {index:#x}: write {value:#x} sets reserved bits {reserved:#x}")]
    Reserved {
        /// The MSR.
        index: u32,
        /// The value written.
        value: u64,
        /// The reserved bits that were set.
        reserved: u64,
    },
    /// A write to a read-only register.
    #[error("x2APIC MSR {index:#x} (EFEAT) is read-only")]
    ReadOnly {
        /// The MSR.
        index: u32,
    },
    /// Not one of the extended-APIC MSRs.
    #[error("MSR {index:#x} is not an extended-APIC MSR")]
    NotExtApic {
        /// The MSR.
        index: u32,
    },
}

/// Where an unmasked extended LVT entry sends its interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Interrupt {
    /// Message type 4: inject an NMI.
    Nmi,
    /// Message type 0: inject a fixed interrupt with this vector (16..=255).
    Fixed {
        /// The vector from EILVT\[7:0\].
        vector: u8,
    },
}

/// What an extended LVT entry currently allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LvtRoute {
    /// Deliverable as this interrupt.
    Deliver(Interrupt),
    /// The mask bit is set.
    Masked,
    /// A message type (SMI, ExtINT, reserved) or vector (< 16) the device does not deliver.
    Undeliverable,
}

/// The extended APIC register file of one vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExtApic {
    pub(crate) ectrl: u32,
    pub(crate) eilvt: [u32; EILVT_COUNT],
}

impl Default for ExtApic {
    fn default() -> Self {
        ExtApic {
            ectrl: 0,
            eilvt: [EILVT_RESET; EILVT_COUNT],
        }
    }
}

fn eilvt_slot(index: u32) -> Option<usize> {
    let n = index.checked_sub(X2APIC_EILVT0)? as usize;
    (n < EILVT_COUNT).then_some(n)
}

/// Check an EILVT value (as stored) for reserved bits; the read-only delivery status is
/// dropped first.
pub(crate) fn check_eilvt(index: u32, value: u64) -> Result<u32, ApicError> {
    let reserved = value & !u64::from(EILVT_WRITABLE | EILVT_DELIVERY_STATUS);
    if reserved != 0 {
        return Err(ApicError::Reserved {
            index,
            value,
            reserved,
        });
    }
    // Fits in u32: every bit above EILVT_WRITABLE was rejected just above.
    Ok(value as u32 & EILVT_WRITABLE)
}

/// Check an ECTRL value for reserved bits.
pub(crate) fn check_ectrl(value: u64) -> Result<u32, ApicError> {
    let reserved = value & !u64::from(ECTRL_VALID);
    if reserved != 0 {
        return Err(ApicError::Reserved {
            index: X2APIC_ECTRL,
            value,
            reserved,
        });
    }
    Ok(value as u32)
}

impl ExtApic {
    pub(crate) fn read(&self, index: u32) -> Result<u64, ApicError> {
        match index {
            X2APIC_EFEAT => Ok(u64::from(EFEAT_VALUE)),
            X2APIC_ECTRL => Ok(u64::from(self.ectrl)),
            _ => eilvt_slot(index)
                .map(|n| u64::from(self.eilvt[n]))
                .ok_or(ApicError::NotExtApic { index }),
        }
    }

    pub(crate) fn write(&mut self, index: u32, value: u64) -> Result<(), ApicError> {
        match index {
            X2APIC_EFEAT => Err(ApicError::ReadOnly { index }),
            X2APIC_ECTRL => {
                self.ectrl = check_ectrl(value)?;
                Ok(())
            }
            _ => {
                let n = eilvt_slot(index).ok_or(ApicError::NotExtApic { index })?;
                self.eilvt[n] = check_eilvt(index, value)?;
                Ok(())
            }
        }
    }

    /// The route of extended LVT entry `offset`.
    pub(crate) fn route(&self, offset: usize) -> LvtRoute {
        let Some(&lvt) = self.eilvt.get(offset) else {
            return LvtRoute::Undeliverable;
        };
        if lvt & EILVT_MASKED != 0 {
            return LvtRoute::Masked;
        }
        let vector = (lvt & EILVT_VECTOR) as u8;
        match (lvt & EILVT_MSG_TYPE) >> EILVT_MSG_TYPE_SHIFT {
            EILVT_MSG_NMI => LvtRoute::Deliver(Interrupt::Nmi),
            // Vectors 0–15 are illegal for fixed delivery (Intel SDM vol. 3 §11.5.2,
            // "Send Illegal Vector" error); never inject them.
            EILVT_MSG_FIXED if vector >= 16 => LvtRoute::Deliver(Interrupt::Fixed { vector }),
            _ => LvtRoute::Undeliverable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_and_feature_values() {
        let a = ExtApic::default();
        assert_eq!(a.read(0x840), Ok(0x0004_0000));
        assert_eq!(a.read(0x841), Ok(0));
        for m in 0x850..=0x853 {
            assert_eq!(a.read(m), Ok(0x0001_0000));
        }
        assert_eq!(a.read(0x854), Err(ApicError::NotExtApic { index: 0x854 }));
        assert_eq!(a.route(0), LvtRoute::Masked);
        assert_eq!(a.route(9), LvtRoute::Undeliverable);
    }

    #[test]
    fn linux_sequence_and_routes() {
        let mut a = ExtApic::default();
        // Linux setup_APIC_eilvt: reserve (masked NMI) then unmask on every CPU (DEVICE.md §3).
        a.write(0x850, 0x0001_0400).unwrap();
        assert_eq!(a.route(0), LvtRoute::Masked);
        a.write(0x850, 0x0000_0400).unwrap();
        assert_eq!(a.read(0x850), Ok(0x400));
        assert_eq!(a.route(0), LvtRoute::Deliver(Interrupt::Nmi));
        a.write(0x850, 0x0000_00F0).unwrap();
        assert_eq!(
            a.route(0),
            LvtRoute::Deliver(Interrupt::Fixed { vector: 0xF0 })
        );
        a.write(0x850, 0x0000_000F).unwrap();
        assert_eq!(a.route(0), LvtRoute::Undeliverable);
        a.write(0x850, 0x0000_0200).unwrap(); // SMI
        assert_eq!(a.route(0), LvtRoute::Undeliverable);
        // Delivery status is read-only: ignored on write, reads 0.
        a.write(0x851, 0x0000_1400).unwrap();
        assert_eq!(a.read(0x851), Ok(0x400));
    }

    #[test]
    fn faults() {
        let mut a = ExtApic::default();
        assert_eq!(a.write(0x840, 0), Err(ApicError::ReadOnly { index: 0x840 }));
        assert!(matches!(
            a.write(0x850, 0x0002_0000),
            Err(ApicError::Reserved {
                reserved: 0x0002_0000,
                ..
            })
        ));
        assert!(matches!(
            a.write(0x852, 1 << 32),
            Err(ApicError::Reserved { .. })
        ));
        assert!(matches!(a.write(0x841, 1), Err(ApicError::Reserved { .. })));
        a.write(0x841, 0).unwrap();
        assert_eq!(a, ExtApic::default(), "faulting writes change nothing");
    }
}
