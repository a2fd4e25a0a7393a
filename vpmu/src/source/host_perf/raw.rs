//! Decoding of the `PERF_SAMPLE_RAW` payload of Linux's `ibs_fetch` / `ibs_op` events.
//!
//! Layout (Linux `arch/x86/events/amd/ibs.c`, `perf_ibs_handle_irq`;
//! [device model §6](crate::device_model)), little endian, no padding: a `u32` holding the
//! host's IBS caps word (CPUID Fn8000_001B EAX), then `u64` registers in this order:
//!
//! | unit | registers |
//! |---|---|
//! | fetch | FETCH_CTL, FETCH_LINADDR, FETCH_PHYSADDR, \[FETCH_CTL_EXT if caps FETCHCTLEXTD (bit 9)\] |
//! | op | OP_CTL, OP_RIP, OP_DATA, OP_DATA2, OP_DATA3, DC_LINADDR, DC_PHYSADDR, \[BR_TARGET if caps BRNTRGT (bit 5)\], \[OP_DATA4 if caps OPDATA4 (bit 10)\] |
//!
//! The raw field is `4 + 8 × n` bytes, so with the record's own `u32` size word it is already
//! 8-byte aligned and perf adds no padding: any other length is malformed and rejected.
//!
//! **Physical addresses never leave this module**: FETCH_PHYSADDR and DC_PHYSADDR are not
//! copied anywhere, and FETCH_CTL\[52\] PhyAddrValid and OP_DATA3\[18\] DcPhyAddrValid are
//! cleared. (The kernel clears them only for readers that may not profile the kernel; a VMM
//! with CAP_PERFMON or `perf_event_paranoid` <= 1 gets them, so this is the line of defence.)
//! OP_DATA4 is read past and dropped: the device never advertises it
//! ([device model §7](crate::device_model)).

use crate::caps::Caps;
use crate::msr::{FETCH_PHY_ADDR_VALID, OP_DATA3_DC_PHY_ADDR_VALID};
use crate::source::{FetchSample, OpSample, SampleRegs};
use crate::unit::UnitKind;

/// Size of the leading caps word.
pub const RAW_CAPS_BYTES: usize = 4;

/// A raw IBS payload that does not match the documented layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RawError {
    /// Too short even for the caps word.
    #[error("IBS {unit} raw payload of {got} bytes has no 4-byte caps word")]
    NoCaps {
        /// The unit the payload was read for.
        unit: UnitKind,
        /// Payload length in bytes.
        got: usize,
    },
    /// Shorter than the registers its caps word announces.
    #[error("IBS {unit} raw payload truncated: {got} bytes, caps {caps:#x} need {want}")]
    Truncated {
        /// The unit the payload was read for.
        unit: UnitKind,
        /// The caps word in the payload.
        caps: u32,
        /// Payload length in bytes.
        got: usize,
        /// The length the caps word implies.
        want: usize,
    },
    /// Longer than the registers its caps word announces.
    #[error("IBS {unit} raw payload oversized: {got} bytes, caps {caps:#x} need {want}")]
    Oversized {
        /// The unit the payload was read for.
        unit: UnitKind,
        /// The caps word in the payload.
        caps: u32,
        /// Payload length in bytes.
        got: usize,
        /// The length the caps word implies.
        want: usize,
    },
}

/// A decoded raw IBS record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawIbs {
    /// The host's caps word from the payload.
    pub caps: u32,
    /// The registers, physical addresses scrubbed. `status` is the whole CTL value the host
    /// latched (minus PhyAddrValid); the device keeps only the status bits the guest's caps
    /// allow and sets MaxCnt/Cnt/En/Val itself.
    pub regs: SampleRegs,
}

/// Number of `u64` registers a payload of `unit` carries for the host caps word `caps`.
pub fn register_count(unit: UnitKind, caps: u32) -> usize {
    let has = |bit: u32| usize::from(caps & bit != 0);
    match unit {
        UnitKind::Fetch => 3 + has(Caps::FETCHCTLEXTD),
        UnitKind::Op => 7 + has(Caps::BRNTRGT) + has(Caps::OPDATA4),
    }
}

/// Expected payload length in bytes for `unit` and host caps `caps`.
pub fn payload_len(unit: UnitKind, caps: u32) -> usize {
    RAW_CAPS_BYTES + 8 * register_count(unit, caps)
}

/// Decode the raw payload of a sample of `unit` (the bytes after the raw field's `u32` size).
pub fn decode(unit: UnitKind, payload: &[u8]) -> Result<RawIbs, RawError> {
    let got = payload.len();
    let Some((caps_bytes, rest)) = payload.split_first_chunk::<RAW_CAPS_BYTES>() else {
        return Err(RawError::NoCaps { unit, got });
    };
    let caps = u32::from_le_bytes(*caps_bytes);
    let want = payload_len(unit, caps);
    if got < want {
        return Err(RawError::Truncated {
            unit,
            caps,
            got,
            want,
        });
    }
    if got > want {
        return Err(RawError::Oversized {
            unit,
            caps,
            got,
            want,
        });
    }
    let mut words = rest
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
    let mut next = || words.next().unwrap_or(0);
    let regs = match unit {
        UnitKind::Fetch => {
            let ctl = next();
            let linaddr = next();
            let _physaddr = next(); // never passed on
            let ctl_ext = if caps & Caps::FETCHCTLEXTD != 0 {
                next()
            } else {
                0
            };
            SampleRegs::Fetch(FetchSample {
                status: ctl & !FETCH_PHY_ADDR_VALID,
                linaddr,
                ctl_ext,
            })
        }
        UnitKind::Op => {
            let ctl = next();
            let rip = next();
            let data = next();
            let data2 = next();
            let data3 = next();
            let dc_linaddr = next();
            let _dc_physaddr = next(); // never passed on
            let br_target = if caps & Caps::BRNTRGT != 0 { next() } else { 0 };
            // OP_DATA4 (caps bit 10), if present, is the last word: not modelled, dropped.
            SampleRegs::Op(OpSample {
                status: ctl,
                rip,
                data,
                data2,
                data3: data3 & !OP_DATA3_DC_PHY_ADDR_VALID,
                dc_linaddr,
                br_target,
            })
        }
    };
    Ok(RawIbs { caps, regs })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload built from the documented layout: caps, then the registers.
    fn payload(caps: u32, regs: &[u64]) -> Vec<u8> {
        let mut v = caps.to_le_bytes().to_vec();
        for r in regs {
            v.extend_from_slice(&r.to_le_bytes());
        }
        v
    }

    const PHYS: u64 = 0x0000_0012_3456_7000;

    #[test]
    fn fetch_with_and_without_ctl_ext() {
        for caps in [
            0x1F,
            0x1F | Caps::FETCHCTLEXTD,
            0x3FF,
            0xBFF,
            0x3FF & !Caps::FETCHCTLEXTD,
        ] {
            let ext = caps & Caps::FETCHCTLEXTD != 0;
            let ctl = FETCH_PHY_ADDR_VALID | (1 << 50) | (1 << 49) | (1 << 48) | 0x1234;
            let mut regs = vec![ctl, 0xFFFF_8000_0000_1000, PHYS];
            if ext {
                regs.push(0xABCD);
            }
            let bytes = payload(caps, &regs);
            assert_eq!(bytes.len(), payload_len(UnitKind::Fetch, caps));
            let d = decode(UnitKind::Fetch, &bytes).unwrap();
            assert_eq!(d.caps, caps);
            assert_eq!(
                d.regs,
                SampleRegs::Fetch(FetchSample {
                    status: ctl & !FETCH_PHY_ADDR_VALID,
                    linaddr: 0xFFFF_8000_0000_1000,
                    ctl_ext: if ext { 0xABCD } else { 0 },
                }),
                "caps {caps:#x}"
            );
        }
    }

    #[test]
    fn op_every_optional_register_combination() {
        for (br, d4) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut caps = 0x1F | Caps::FETCHCTLEXTD; // fetch-only bit must not matter
            if br {
                caps |= Caps::BRNTRGT;
            }
            if d4 {
                caps |= Caps::OPDATA4;
            }
            let data3 = OP_DATA3_DC_PHY_ADDR_VALID | (1 << 17) | 1;
            let mut regs = vec![0x7 << 17, 0x40_1000, 0xD1, 0xD2, data3, 0x7FFF_0000, PHYS];
            if br {
                regs.push(0x40_2000);
            }
            if d4 {
                regs.push(0xD4D4);
            }
            let bytes = payload(caps, &regs);
            assert_eq!(bytes.len(), 4 + 8 * (7 + br as usize + d4 as usize));
            let d = decode(UnitKind::Op, &bytes).unwrap();
            assert_eq!(
                d.regs,
                SampleRegs::Op(OpSample {
                    status: 0x7 << 17,
                    rip: 0x40_1000,
                    data: 0xD1,
                    data2: 0xD2,
                    data3: data3 & !OP_DATA3_DC_PHY_ADDR_VALID,
                    dc_linaddr: 0x7FFF_0000,
                    br_target: if br { 0x40_2000 } else { 0 },
                }),
                "BRNTRGT {br}, OPDATA4 {d4}"
            );
        }
    }

    #[test]
    fn physical_addresses_never_come_out() {
        let f = decode(UnitKind::Fetch, &payload(0x1F, &[u64::MAX, 0, PHYS])).unwrap();
        let o = decode(
            UnitKind::Op,
            &payload(0x1F, &[0, 0, 0, 0, u64::MAX, 0, PHYS]),
        )
        .unwrap();
        let SampleRegs::Fetch(f) = f.regs else {
            panic!()
        };
        let SampleRegs::Op(o) = o.regs else { panic!() };
        assert_eq!(f.status & FETCH_PHY_ADDR_VALID, 0);
        assert_eq!(o.data3 & OP_DATA3_DC_PHY_ADDR_VALID, 0);
        let all = [
            f.status, f.linaddr, f.ctl_ext, o.status, o.rip, o.data, o.data2,
        ];
        assert!(!all.contains(&PHYS));
        assert!(![o.data3, o.dc_linaddr, o.br_target].contains(&PHYS));
    }

    #[test]
    fn truncated_and_oversized_are_rejected_with_sizes() {
        for unit in UnitKind::ALL {
            for caps in [0x1Fu32, 0x3FF, 0x7FF] {
                let want = payload_len(unit, caps);
                let full = payload(caps, &vec![0; register_count(unit, caps)]);
                assert!(decode(unit, &full).is_ok());
                for cut in [5, 8, want - 8, want - 1] {
                    assert_eq!(
                        decode(unit, &full[..cut]),
                        Err(RawError::Truncated {
                            unit,
                            caps,
                            got: cut,
                            want
                        })
                    );
                }
                for extra in [1, 4, 8, 16] {
                    let mut long = full.clone();
                    long.resize(want + extra, 0);
                    let err = decode(unit, &long).unwrap_err();
                    assert_eq!(
                        err,
                        RawError::Oversized {
                            unit,
                            caps,
                            got: want + extra,
                            want
                        }
                    );
                    let msg = err.to_string();
                    assert!(
                        msg.contains(&want.to_string())
                            && msg.contains(&(want + extra).to_string()),
                        "{msg}"
                    );
                }
            }
            for short in 0..4 {
                assert_eq!(
                    decode(unit, &[0; 4][..short]),
                    Err(RawError::NoCaps { unit, got: short })
                );
            }
        }
        // Software events write a 4-byte zero raw field: caps 0 → truncated, not a sample.
        assert!(matches!(
            decode(UnitKind::Op, &[0; 4]),
            Err(RawError::Truncated {
                got: 4,
                want: 60,
                ..
            })
        ));
    }
}
