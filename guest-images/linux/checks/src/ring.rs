//! A perf event's mmap'ed ring buffer and the records in it
//! (include/uapi/linux/perf_event.h: `struct perf_event_mmap_page`,
//! `enum perf_event_type`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// `enum perf_event_type`: PERF_RECORD_LOST.
pub const PERF_RECORD_LOST: u32 = 2;
/// PERF_RECORD_THROTTLE.
pub const PERF_RECORD_THROTTLE: u32 = 5;
/// PERF_RECORD_UNTHROTTLE.
pub const PERF_RECORD_UNTHROTTLE: u32 = 6;
/// PERF_RECORD_SAMPLE.
pub const PERF_RECORD_SAMPLE: u32 = 9;

/// `struct perf_event_mmap_page`: offsets of data_head, data_tail, data_offset,
/// data_size.
const MMAP_DATA_HEAD: usize = 1024;
const MMAP_DATA_TAIL: usize = 1032;
const MMAP_DATA_OFFSET: usize = 1040;
const MMAP_DATA_SIZE: usize = 1048;

const PAGE: usize = 4096;

/// The event's mmap'ed ring buffer: metadata page plus 2^n data pages.
pub struct Ring {
    base: *mut u8,
    len: usize,
    data: *const u8,
    size: u64,
}

impl Ring {
    /// Maps the ring of the event `fd` with `data_pages` data pages (a power of two).
    pub fn map(fd: &OwnedFd, data_pages: usize) -> Result<Ring, String> {
        let len = (1 + data_pages) * PAGE;
        // SAFETY: a new shared mapping of the perf fd; nothing else uses that range.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "mmap {} pages: {}",
                1 + data_pages,
                std::io::Error::last_os_error()
            ));
        }
        let base = base as *mut u8;
        let mut ring = Ring {
            base,
            len,
            data: base,
            size: 0,
        };
        // data_offset/data_size are set by Linux 4.1+; fall back to the classic layout.
        let off = ring.meta(MMAP_DATA_OFFSET).load(Ordering::Relaxed) as usize;
        let size = ring.meta(MMAP_DATA_SIZE).load(Ordering::Relaxed) as usize;
        let (off, size) = if off == 0 || size == 0 {
            (PAGE, data_pages * PAGE)
        } else {
            (off, size)
        };
        if off + size > len || !size.is_power_of_two() {
            return Err(format!(
                "ring buffer layout: data_offset {off}, data_size {size}, mapping {len}"
            ));
        }
        // SAFETY: off < len, checked above.
        ring.data = unsafe { base.add(off) };
        ring.size = size as u64;
        Ok(ring)
    }

    fn meta(&self, off: usize) -> &AtomicU64 {
        // SAFETY: off is one of the 8-aligned u64 fields of the metadata page, which
        // stays mapped while self lives; the kernel updates them concurrently, hence
        // atomic accesses.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    /// Takes everything the kernel has written since the last call and parses it
    /// (no system call).
    pub fn drain(&self, has_raw: bool, out: &mut Records) -> Result<(), String> {
        // Acquire: the records up to data_head are visible after this load.
        let head = self.meta(MMAP_DATA_HEAD).load(Ordering::Acquire);
        let tail = self.meta(MMAP_DATA_TAIL).load(Ordering::Relaxed);
        if head == tail {
            return Ok(());
        }
        // SAFETY: data points to size mapped bytes; linearize reads only [tail, head)
        // modulo size, which the kernel does not touch until data_tail moves past it.
        let bytes = unsafe { linearize(self.data, self.size, tail, head) }?;
        // Release: our reads of the records happen before the kernel may reuse them.
        self.meta(MMAP_DATA_TAIL).store(head, Ordering::Release);
        parse_records(&bytes, has_raw, out)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in map().
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Copies the ring bytes from `tail` to `head` (free-running offsets) out of a ring
/// of `size` bytes (a power of two) at `data`, unwrapping the wrap-around.
///
/// # Safety
/// `data` must be valid for reads of `size` bytes.
pub unsafe fn linearize(
    data: *const u8,
    size: u64,
    tail: u64,
    head: u64,
) -> Result<Vec<u8>, String> {
    let n = head.wrapping_sub(tail);
    if n > size {
        return Err(format!(
            "ring overrun: data_head {head:#x} - data_tail {tail:#x} > size {size:#x}"
        ));
    }
    let mut v = vec![0u8; n as usize];
    let start = (tail % size) as usize;
    let first = (n as usize).min(size as usize - start);
    // SAFETY: start + first <= size and first + (n - first) = n <= size bytes are
    // read from data (valid for size bytes, the caller's promise) into v (n bytes).
    unsafe {
        std::ptr::copy_nonoverlapping(data.add(start), v.as_mut_ptr(), first);
        std::ptr::copy_nonoverlapping(data, v.as_mut_ptr().add(first), n as usize - first);
    }
    Ok(v)
}

/// One PERF_RECORD_SAMPLE with sample_type IP | TID [| RAW].
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub ip: u64,
    pub pid: u32,
    pub tid: u32,
    pub misc: u16,
    pub raw: Vec<u8>,
}

/// What a ring held: samples, and counts of the other records.
#[derive(Default, Debug)]
pub struct Records {
    pub samples: Vec<Sample>,
    /// PERF_RECORD_LOST records, and the samples they say were lost.
    pub lost_records: u64,
    pub lost: u64,
    pub throttle: u64,
    pub unthrottle: u64,
    pub other: u64,
}

impl Records {
    /// Records of any kind counted so far (a LOST record counts once).
    pub fn total(&self) -> u64 {
        self.samples.len() as u64 + self.lost_records + self.throttle + self.unthrottle + self.other
    }
}

/// The little-endian u16 at `off` of `b`.
pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

/// The little-endian u32 at `off` of `b`.
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// The little-endian u64 at `off` of `b`.
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Parses perf records laid out one after another (no wrap-around; see
/// [`linearize`]). Samples are expected with sample_type IP | TID [| RAW].
pub fn parse_records(b: &[u8], has_raw: bool, out: &mut Records) -> Result<(), String> {
    let mut off = 0usize;
    while off < b.len() {
        let left = b.len() - off;
        if left < 8 {
            return Err(format!(
                "truncated record header at +{off}: {left} bytes left"
            ));
        }
        let ty = u32_at(b, off);
        let misc = u16_at(b, off + 4);
        let size = u16_at(b, off + 6) as usize;
        if size < 8 || !size.is_multiple_of(8) {
            return Err(format!("record at +{off} (type {ty}): bad size {size}"));
        }
        if size > left {
            return Err(format!(
                "truncated record at +{off} (type {ty}): size {size}, {left} bytes left"
            ));
        }
        let r = &b[off..off + size];
        match ty {
            PERF_RECORD_SAMPLE => {
                let min = if has_raw { 28 } else { 24 };
                if size < min {
                    return Err(format!("sample at +{off}: size {size} < {min}"));
                }
                let raw = if has_raw {
                    let rs = u32_at(r, 24) as usize;
                    if 28 + rs > size {
                        return Err(format!(
                            "sample at +{off}: raw size {rs} overruns record size {size}"
                        ));
                    }
                    r[28..28 + rs].to_vec()
                } else {
                    Vec::new()
                };
                out.samples.push(Sample {
                    ip: u64_at(r, 8),
                    pid: u32_at(r, 16),
                    tid: u32_at(r, 20),
                    misc,
                    raw,
                });
            }
            PERF_RECORD_LOST => {
                if size < 24 {
                    return Err(format!("lost record at +{off}: size {size} < 24"));
                }
                out.lost_records += 1;
                out.lost += u64_at(r, 16);
            }
            PERF_RECORD_THROTTLE => out.throttle += 1,
            PERF_RECORD_UNTHROTTLE => out.unthrottle += 1,
            _ => out.other += 1,
        }
        off += size;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        lost_record, raw_payload, record, sample_record, throttle_record, OP_REGS_7,
    };
    use crate::ibs_pmu::decode_op_raw;

    /// Writes `bytes` into a ring of `size` bytes starting at free-running offset
    /// `tail`, wrapping; returns the ring and head.
    fn ring_with(size: usize, tail: u64, bytes: &[u8]) -> (Vec<u8>, u64) {
        let mut ring = vec![0xAAu8; size];
        for (i, b) in bytes.iter().enumerate() {
            ring[(tail.wrapping_add(i as u64) % size as u64) as usize] = *b;
        }
        (ring, tail.wrapping_add(bytes.len() as u64))
    }

    #[test]
    fn parse_sample_lost_throttle() {
        let raw = raw_payload(0x1f, &OP_REGS_7);
        let mut bytes = sample_record(0x5555_0000_1234, 7, 8, &raw);
        bytes.extend(lost_record(1, 42));
        bytes.extend(throttle_record(PERF_RECORD_THROTTLE));
        bytes.extend(throttle_record(PERF_RECORD_UNTHROTTLE));
        bytes.extend(record(3, 0, &[0u8; 8])); // PERF_RECORD_COMM-ish: "other"
        let mut r = Records::default();
        parse_records(&bytes, true, &mut r).unwrap();
        assert_eq!(r.samples.len(), 1);
        assert_eq!(
            r.samples[0],
            Sample {
                ip: 0x5555_0000_1234,
                pid: 7,
                tid: 8,
                misc: 2,
                raw: raw.clone()
            }
        );
        assert_eq!((r.lost_records, r.lost), (1, 42));
        assert_eq!((r.throttle, r.unthrottle, r.other), (1, 1, 1));
        assert_eq!(r.total(), 5);
        // The raw record is 4 + 4 + 7*8 = 64 bytes: no padding; sample = 8+16+64 = 88.
        assert_eq!(sample_record(0, 0, 0, &raw).len(), 88);
    }

    #[test]
    fn wrap_around() {
        let raw = raw_payload(
            0x3ff,
            &[
                crate::ibs_pmu::OP_VAL | crate::ibs_pmu::OP_EN | 1,
                0x401000,
                0,
                0,
                0,
                0,
                0,
                0x401234,
            ],
        );
        let mut bytes = sample_record(0x401000, 1, 1, &raw);
        bytes.extend(sample_record(0x401008, 1, 1, &raw));
        bytes.extend(lost_record(9, 3));
        // 256-byte ring, free-running tail far past several wraps, records straddle.
        for tail in [0u64, 100 * 256 + 200, 256 * 7 + 8, u64::MAX - 50] {
            let (ring, head) = ring_with(256, tail, &bytes);
            // SAFETY: ring holds 256 bytes.
            let lin = unsafe { linearize(ring.as_ptr(), 256, tail, head) }.unwrap();
            assert_eq!(lin, bytes, "tail {tail}");
            let mut r = Records::default();
            parse_records(&lin, true, &mut r).unwrap();
            assert_eq!(r.samples.len(), 2);
            assert_eq!(r.samples[1].ip, 0x401008);
            assert_eq!(r.lost, 3);
            let o = decode_op_raw(&r.samples[0].raw).unwrap();
            assert_eq!(o.br_target, Some(0x401234));
        }
    }

    #[test]
    fn overrun_is_an_error() {
        let ring = [0u8; 64];
        // SAFETY: ring holds 64 bytes.
        let e = unsafe { linearize(ring.as_ptr(), 64, 0, 65) }.unwrap_err();
        assert!(e.contains("overrun"), "{e}");
        // SAFETY: as above.
        assert!(unsafe { linearize(ring.as_ptr(), 64, 10, 10) }
            .unwrap()
            .is_empty());
    }

    #[test]
    fn truncated_records() {
        let raw = raw_payload(0x1f, &OP_REGS_7);
        let full = sample_record(1, 1, 1, &raw);
        let mut r = Records::default();
        // Record cut short of its header size.
        let e = parse_records(&full[..48], true, &mut r).unwrap_err();
        assert!(e.contains("truncated record at +0"), "{e}");
        // Only part of a header.
        let mut two = full.clone();
        two.extend_from_slice(&[9, 0, 0, 0]);
        let mut r = Records::default();
        let e = parse_records(&two, true, &mut r).unwrap_err();
        assert!(e.contains("truncated record header at +88"), "{e}");
        assert_eq!(r.samples.len(), 1, "the samples before the error are kept");
        // A size of zero would loop forever: rejected.
        let e = parse_records(
            &record(9, 0, &[])[..4].repeat(2),
            true,
            &mut Records::default(),
        )
        .unwrap_err();
        assert!(e.contains("bad size 0"), "{e}");
        // Raw size overrunning the record.
        let mut bad = full.clone();
        bad[24..28].copy_from_slice(&1000u32.to_le_bytes());
        let e = parse_records(&bad, true, &mut Records::default()).unwrap_err();
        assert!(e.contains("raw size 1000 overruns"), "{e}");
    }

    #[test]
    fn samples_without_raw() {
        let mut b = Vec::new();
        b.extend_from_slice(&0x1234u64.to_le_bytes());
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&6u32.to_le_bytes());
        let rec = record(PERF_RECORD_SAMPLE, 2, &b);
        let mut r = Records::default();
        parse_records(&rec, false, &mut r).unwrap();
        assert_eq!(
            (r.samples[0].ip, r.samples[0].pid, r.samples[0].tid),
            (0x1234, 5, 6)
        );
        assert!(r.samples[0].raw.is_empty());
    }
}
