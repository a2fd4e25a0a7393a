//! Perf records and IBS raw payloads laid out byte for byte as the kernel writes them
//! (include/uapi/linux/perf_event.h; arch/x86/events/amd/ibs.c `perf_ibs_handle_irq`),
//! for the unit tests of the parsers in [`crate::ring`], [`crate::ibs_pmu`] and the
//! check programs. Not used at run time.

use crate::ibs_pmu::{OP_EN, OP_VAL};
use crate::ring::PERF_RECORD_SAMPLE;

/// A record: `struct perf_event_header` (type, misc, size) and `body`, whose length
/// must keep the record 8-byte aligned.
pub fn record(ty: u32, misc: u16, body: &[u8]) -> Vec<u8> {
    let size = 8 + body.len();
    assert_eq!(size % 8, 0, "test record body must keep 8-byte alignment");
    let mut v = Vec::new();
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(&misc.to_le_bytes());
    v.extend_from_slice(&(size as u16).to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// A sample record as the kernel writes it for IP | TID | RAW (raw padded to 8 bytes).
pub fn sample_record(ip: u64, pid: u32, tid: u32, raw: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&ip.to_le_bytes());
    b.extend_from_slice(&pid.to_le_bytes());
    b.extend_from_slice(&tid.to_le_bytes());
    b.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    b.extend_from_slice(raw);
    while (8 + b.len()) % 8 != 0 {
        b.push(0);
    }
    record(PERF_RECORD_SAMPLE, 2, &b)
}

/// A PERF_RECORD_LOST: event id and the number of samples lost.
pub fn lost_record(id: u64, lost: u64) -> Vec<u8> {
    let mut b = id.to_le_bytes().to_vec();
    b.extend_from_slice(&lost.to_le_bytes());
    record(crate::ring::PERF_RECORD_LOST, 0, &b)
}

/// A PERF_RECORD_THROTTLE or _UNTHROTTLE (time, id, stream_id).
pub fn throttle_record(ty: u32) -> Vec<u8> {
    record(ty, 0, &[0u8; 24])
}

/// An IBS raw payload: the u32 caps word, then the registers.
pub fn raw_payload(caps: u32, regs: &[u64]) -> Vec<u8> {
    let mut v = caps.to_le_bytes().to_vec();
    for r in regs {
        v.extend_from_slice(&r.to_le_bytes());
    }
    v
}

/// The 7 op registers of a good sample (caps without BR_TARGET and OPDATA4).
pub const OP_REGS_7: [u64; 7] = [
    OP_VAL | OP_EN | 0x1000, // CTL
    0x5555_0000_1234,        // RIP
    0,                       // DATA
    0,                       // DATA2
    0,                       // DATA3
    0,                       // DC_LINADDR
    0,                       // DC_PHYSADDR
];
