//! The Intel MultiProcessor Specification 1.4 table that tells a guest about its CPUs,
//! the I/O APIC and how legacy IRQs are routed (Linux reads it when ACPI is off).
//!
//! Structure layouts: MP spec 1.4, chapter 4 ("MP Configuration Table"): §4.1 floating
//! pointer, §4.2 header, §4.3.1 processor, §4.3.2 bus, §4.3.3 I/O APIC, §4.3.4 I/O interrupt
//! assignment, §4.3.5 local interrupt assignment entries.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_END, IOAPIC_BASE, LAPIC_BASE, MPTABLE_START};

/// Number of I/O APIC pins KVM's in-kernel I/O APIC has (KVM_IOAPIC_NUM_PINS).
pub const IOAPIC_PINS: u8 = 24;
/// Most CPUs a table fits in the EBDA for (APIC IDs 0..N-1; the I/O APIC takes ID N).
pub const MAX_CPUS: u8 = 32;

const MPC_SPEC_REV: u8 = 4; // MP spec 1.4
const APIC_VERSION: u8 = 0x14; // integrated local APIC (MP spec §4.3.1 "Local APIC Version")
const IOAPIC_VERSION: u8 = 0x11; // 82093AA I/O APIC
const CPU_ENABLED: u8 = 1; // §4.3.1 CPU Flags bit 0 EN
const CPU_BSP: u8 = 2; // §4.3.1 CPU Flags bit 1 BP
const IOAPIC_ENABLED: u8 = 1; // §4.3.3 flags bit 0 EN
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0; // vectored interrupt (Table 4-10)
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ALL_LAPICS: u8 = 0xff;

/// Errors building the MP table.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// Unsupported CPU count.
    #[error("{0} vCPUs: the MP table supports 1..={MAX_CPUS}")]
    CpuCount(u8),
    /// Writing to guest memory failed.
    #[error("cannot write the MP table at {MPTABLE_START:#x}: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Two's-complement checksum making the bytes sum to zero (MP spec §4.1/§4.2).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `cpus` CPUs, to be placed at
/// `base`. Returns the bytes.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        // CPU signature (family 6-style stepping/model/family) and feature flags (FPU|APIC):
        // informational only; Linux takes the real values from CPUID.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // ISA IRQ n → I/O APIC pin n, conforming polarity and trigger.
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 = ExtINT (the PIC), LINT1 = NMI, on every local APIC.
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_EXTINT, 0, 0, 0, 0, ALL_LAPICS, 0]);
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_NMI, 0, 0, 0, 0, ALL_LAPICS, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[MPC_SPEC_REV, 0]); // checksum patched below
    header.extend_from_slice(b"IBSVM   ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // no extended table
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units; features: MP table present
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `cpus` CPUs at [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(cpus, MPTABLE_START)?;
    debug_assert!(MPTABLE_START + bytes.len() as u64 <= EBDA_END);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1, 2, MAX_CPUS] {
            let t = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64,
                MPTABLE_START + 16
            );
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let entries = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(entries, cpus as usize + 2 + IOAPIC_PINS as usize + 2);
            // Walk the entries: processors first, BSP flag on the first only.
            let mut off = 44;
            let mut procs = 0;
            while off < len {
                let size = if table[off] == ENTRY_PROCESSOR { 20 } else { 8 };
                if table[off] == ENTRY_PROCESSOR {
                    assert_eq!(table[off + 1], procs);
                    assert_eq!(table[off + 3] & CPU_BSP != 0, procs == 0);
                    procs += 1;
                }
                off += size;
            }
            assert_eq!(off, len);
            assert_eq!(procs, cpus);
            assert!(MPTABLE_START + t.len() as u64 <= EBDA_END);
        }
    }

    #[test]
    fn cpu_count_is_checked() {
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(MAX_CPUS + 1, MPTABLE_START).is_err());
    }
}
