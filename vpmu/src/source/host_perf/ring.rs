//! Reader of a perf ring buffer (the data area after `struct perf_event_mmap_page`).
//!
//! Protocol (Linux `include/uapi/linux/perf_event.h`, comments on `data_head`/`data_tail`):
//! load `data_head` with acquire ordering, read the records between `data_tail` and
//! `data_head` (offsets modulo the power-of-two data size, so a record may wrap around the
//! end), then store the new `data_tail` with release ordering to hand the space back.
//!
//! Records: `struct perf_event_header { u32 type; u16 misc; u16 size; }` followed by the
//! body. `PERF_RECORD_SAMPLE` bodies hold the fields selected by `sample_type` in the ABI order
//! (IP, TID, TIME, ID, CPU, PERIOD, …, RAW); `PERF_RECORD_LOST` is `{ id, lost }`;
//! `PERF_RECORD_THROTTLE`/`UNTHROTTLE` are `{ time, id, stream_id }`. The low 3 bits of
//! `misc` are the cpumode: `PERF_RECORD_MISC_GUEST_KERNEL` (4) and `GUEST_USER` (5) mark
//! samples taken while the CPU ran a guest — the only ones a host IBS source may pass on.

use super::attr::{
    PERF_SAMPLE_CPU, PERF_SAMPLE_ID, PERF_SAMPLE_IP, PERF_SAMPLE_PERIOD, PERF_SAMPLE_RAW,
    PERF_SAMPLE_TID, PERF_SAMPLE_TIME,
};

/// `PERF_RECORD_LOST`.
pub const PERF_RECORD_LOST: u32 = 2;
/// `PERF_RECORD_THROTTLE`.
pub const PERF_RECORD_THROTTLE: u32 = 5;
/// `PERF_RECORD_UNTHROTTLE`.
pub const PERF_RECORD_UNTHROTTLE: u32 = 6;
/// `PERF_RECORD_SAMPLE`.
pub const PERF_RECORD_SAMPLE: u32 = 9;
/// `PERF_RECORD_MISC_CPUMODE_MASK`.
pub const PERF_RECORD_MISC_CPUMODE_MASK: u16 = 7;

/// `sample_type` bits the reader can parse.
pub const SUPPORTED_SAMPLE_TYPE: u64 = PERF_SAMPLE_IP
    | PERF_SAMPLE_TID
    | PERF_SAMPLE_TIME
    | PERF_SAMPLE_ID
    | PERF_SAMPLE_CPU
    | PERF_SAMPLE_PERIOD
    | PERF_SAMPLE_RAW;

const HEADER: usize = 8;

/// The memory of a perf ring: the control words and the data area. Implemented by the
/// mmapped ring of a perf event and by plain memory in tests.
pub trait RingMemory {
    /// Size of the data area in bytes (a power of two).
    fn data_size(&self) -> usize;
    /// `data_head`, loaded with acquire ordering (records before it are complete).
    fn load_head(&self) -> u64;
    /// `data_tail` as last stored.
    fn load_tail(&self) -> u64;
    /// Store `data_tail` with release ordering (space before it may be overwritten).
    fn store_tail(&self, tail: u64);
    /// Copy `dst.len()` bytes of the data area from `offset`; the caller guarantees
    /// `offset + dst.len() <= data_size()` and that the bytes lie between tail and head.
    fn copy_out(&self, offset: usize, dst: &mut [u8]);
}

/// The CPU mode of a sample (`misc & PERF_RECORD_MISC_CPUMODE_MASK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// 0: unknown.
    Unknown,
    /// 1: host kernel.
    Kernel,
    /// 2: host user space.
    User,
    /// 3: hypervisor.
    Hypervisor,
    /// 4: guest kernel.
    GuestKernel,
    /// 5: guest user space.
    GuestUser,
    /// 6, 7: undefined values.
    Other(u16),
}

impl CpuMode {
    /// The mode encoded in a record's `misc`.
    pub fn from_misc(misc: u16) -> CpuMode {
        match misc & PERF_RECORD_MISC_CPUMODE_MASK {
            0 => CpuMode::Unknown,
            1 => CpuMode::Kernel,
            2 => CpuMode::User,
            3 => CpuMode::Hypervisor,
            4 => CpuMode::GuestKernel,
            5 => CpuMode::GuestUser,
            m => CpuMode::Other(m),
        }
    }

    /// True for samples taken in guest mode.
    pub fn is_guest(self) -> bool {
        matches!(self, CpuMode::GuestKernel | CpuMode::GuestUser)
    }
}

/// A `PERF_RECORD_SAMPLE`, with the fields its `sample_type` selects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleRecord<'a> {
    /// The header's `misc`.
    pub misc: u16,
    /// `PERF_SAMPLE_IP`.
    pub ip: Option<u64>,
    /// `PERF_SAMPLE_TID`: (pid, tid).
    pub pid_tid: Option<(u32, u32)>,
    /// `PERF_SAMPLE_TIME`.
    pub time: Option<u64>,
    /// `PERF_SAMPLE_ID`.
    pub id: Option<u64>,
    /// `PERF_SAMPLE_CPU`.
    pub cpu: Option<u32>,
    /// `PERF_SAMPLE_PERIOD`.
    pub period: Option<u64>,
    /// `PERF_SAMPLE_RAW`: the payload after its `u32` size.
    pub raw: Option<&'a [u8]>,
}

impl SampleRecord<'_> {
    /// The sample's CPU mode.
    pub fn mode(&self) -> CpuMode {
        CpuMode::from_misc(self.misc)
    }
}

/// One record of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// `PERF_RECORD_SAMPLE`.
    Sample(SampleRecord<'a>),
    /// `PERF_RECORD_LOST`: `lost` samples did not fit into the ring.
    Lost {
        /// Event id.
        id: u64,
        /// Number of lost records.
        lost: u64,
    },
    /// `PERF_RECORD_THROTTLE`: the kernel stopped the event for exceeding its interrupt rate.
    Throttle {
        /// Time stamp.
        time: u64,
        /// Event id.
        id: u64,
    },
    /// `PERF_RECORD_UNTHROTTLE`: the event runs again.
    Unthrottle {
        /// Time stamp.
        time: u64,
        /// Event id.
        id: u64,
    },
    /// Any other record type (skipped).
    Other {
        /// `perf_event_header.type`.
        kind: u32,
    },
}

/// Counters of a reader, all monotonic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Sample records taken in guest mode.
    pub guest_samples: u64,
    /// Sample records taken in host mode (or of unknown mode): to be dropped by IBS sources.
    pub host_samples: u64,
    /// Records lost by the kernel (sum of `PERF_RECORD_LOST.lost`).
    pub lost: u64,
    /// `PERF_RECORD_THROTTLE` records.
    pub throttles: u64,
    /// `PERF_RECORD_UNTHROTTLE` records.
    pub unthrottles: u64,
    /// Records of other types.
    pub other_records: u64,
    /// Bytes dropped by [`RingReader::discard_all`].
    pub discarded_bytes: u64,
    /// Times the ring held a malformed record and everything up to the head was dropped.
    pub corrupt: u64,
}

/// A malformed ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `sample_type` selects a field the reader does not parse.
    #[error("perf ring: sample_type {0:#x} has fields this reader does not parse")]
    SampleType(u64),
    /// The data area is not a power of two of at least 8 bytes.
    #[error("perf ring: data area of {0} bytes is not a power of two")]
    DataSize(usize),
    /// A record header or body does not fit; the rest of the ring was skipped.
    #[error("perf ring: malformed record at {tail:#x} (size {size}, head {head:#x}); skipped to the head")]
    Corrupt {
        /// Position of the record.
        tail: u64,
        /// Its header size.
        size: u16,
        /// The head at the time.
        head: u64,
    },
}

/// Reads the records of one ring.
#[derive(Debug)]
pub struct RingReader<M> {
    mem: M,
    sample_type: u64,
    scratch: Vec<u8>,
    stats: RingStats,
}

fn u64_at(b: &[u8], at: &mut usize) -> Option<u64> {
    let v = b.get(*at..*at + 8)?;
    *at += 8;
    Some(u64::from_le_bytes(v.try_into().ok()?))
}

fn u32_at(b: &[u8], at: &mut usize) -> Option<u32> {
    let v = b.get(*at..*at + 4)?;
    *at += 4;
    Some(u32::from_le_bytes(v.try_into().ok()?))
}

fn parse_sample(sample_type: u64, misc: u16, body: &[u8]) -> Option<SampleRecord<'_>> {
    let has = |bit: u64| sample_type & bit != 0;
    let mut at = 0;
    let mut s = SampleRecord {
        misc,
        ..SampleRecord::default()
    };
    if has(PERF_SAMPLE_IP) {
        s.ip = Some(u64_at(body, &mut at)?);
    }
    if has(PERF_SAMPLE_TID) {
        s.pid_tid = Some((u32_at(body, &mut at)?, u32_at(body, &mut at)?));
    }
    if has(PERF_SAMPLE_TIME) {
        s.time = Some(u64_at(body, &mut at)?);
    }
    if has(PERF_SAMPLE_ID) {
        s.id = Some(u64_at(body, &mut at)?);
    }
    if has(PERF_SAMPLE_CPU) {
        s.cpu = Some(u32_at(body, &mut at)?);
        at += 4; // res
    }
    if has(PERF_SAMPLE_PERIOD) {
        s.period = Some(u64_at(body, &mut at)?);
    }
    if has(PERF_SAMPLE_RAW) {
        let len = u32_at(body, &mut at)? as usize;
        s.raw = Some(body.get(at..at.checked_add(len)?)?);
    }
    Some(s)
}

fn parse<'a>(sample_type: u64, kind: u32, misc: u16, body: &'a [u8]) -> Option<Record<'a>> {
    let mut at = 0;
    Some(match kind {
        PERF_RECORD_SAMPLE => Record::Sample(parse_sample(sample_type, misc, body)?),
        PERF_RECORD_LOST => Record::Lost {
            id: u64_at(body, &mut at)?,
            lost: u64_at(body, &mut at)?,
        },
        PERF_RECORD_THROTTLE | PERF_RECORD_UNTHROTTLE => {
            let time = u64_at(body, &mut at)?;
            let id = u64_at(body, &mut at)?;
            if kind == PERF_RECORD_THROTTLE {
                Record::Throttle { time, id }
            } else {
                Record::Unthrottle { time, id }
            }
        }
        kind => Record::Other { kind },
    })
}

impl<M: RingMemory> RingReader<M> {
    /// A reader of `mem` for samples of `sample_type`.
    pub fn new(mem: M, sample_type: u64) -> Result<RingReader<M>, RingError> {
        if sample_type & !SUPPORTED_SAMPLE_TYPE != 0 {
            return Err(RingError::SampleType(sample_type));
        }
        let size = mem.data_size();
        if size < HEADER || !size.is_power_of_two() {
            return Err(RingError::DataSize(size));
        }
        Ok(RingReader {
            mem,
            sample_type,
            scratch: Vec::new(),
            stats: RingStats::default(),
        })
    }

    /// The ring memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The counters.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// Copy `len` bytes at ring position `pos` into the scratch buffer, wrapping around.
    fn copy(&mut self, pos: u64, len: usize) {
        let size = self.mem.data_size();
        let off = (pos & (size as u64 - 1)) as usize;
        self.scratch.resize(len, 0);
        let first = len.min(size - off);
        self.mem.copy_out(off, &mut self.scratch[..first]);
        if first < len {
            self.mem.copy_out(0, &mut self.scratch[first..]);
        }
    }

    /// Drop everything in the ring (clear-before-start: records of an earlier enable period
    /// must not reach a new arming). Returns the number of bytes dropped.
    pub fn discard_all(&mut self) -> u64 {
        let head = self.mem.load_head();
        let dropped = head.wrapping_sub(self.mem.load_tail());
        self.mem.store_tail(head);
        self.stats.discarded_bytes += dropped;
        dropped
    }

    /// Hand every complete record to `f`, update the counters, and release the space.
    /// Returns the number of records read. On a malformed record everything up to the head
    /// is skipped (counted in [`RingStats::corrupt`]) and the error returned.
    pub fn read(&mut self, mut f: impl FnMut(&Record<'_>)) -> Result<usize, RingError> {
        let head = self.mem.load_head();
        let mut tail = self.mem.load_tail();
        let size = self.mem.data_size() as u64;
        let mut n = 0;
        let mut result = Ok(());
        while tail != head {
            let avail = head.wrapping_sub(tail);
            let corrupt = |sz: u16| RingError::Corrupt {
                tail,
                size: sz,
                head,
            };
            if avail < HEADER as u64 || avail > size {
                result = Err(corrupt(0));
                break;
            }
            self.copy(tail, HEADER);
            let h = &self.scratch;
            let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let misc = u16::from_le_bytes([h[4], h[5]]);
            let len = u16::from_le_bytes([h[6], h[7]]);
            if (len as usize) < HEADER || u64::from(len) > avail {
                result = Err(corrupt(len));
                break;
            }
            self.copy(tail, len as usize);
            let Some(rec) = parse(self.sample_type, kind, misc, &self.scratch[HEADER..]) else {
                result = Err(corrupt(len));
                break;
            };
            match rec {
                Record::Sample(s) if s.mode().is_guest() => self.stats.guest_samples += 1,
                Record::Sample(_) => self.stats.host_samples += 1,
                Record::Lost { lost, .. } => self.stats.lost += lost,
                Record::Throttle { .. } => self.stats.throttles += 1,
                Record::Unthrottle { .. } => self.stats.unthrottles += 1,
                Record::Other { .. } => self.stats.other_records += 1,
            }
            f(&rec);
            n += 1;
            tail = tail.wrapping_add(u64::from(len));
        }
        if result.is_err() {
            self.stats.corrupt += 1;
            tail = head;
        }
        self.mem.store_tail(tail);
        result.map(|()| n)
    }
}

/// Ring memory in a plain buffer, for tests and fuzzing of the reader.
#[derive(Debug)]
pub struct VecRing {
    data: Vec<u8>,
    head: std::cell::Cell<u64>,
    tail: std::cell::Cell<u64>,
}

impl VecRing {
    /// An empty ring of `size` bytes (a power of two), head = tail = `start`.
    pub fn new(size: usize, start: u64) -> VecRing {
        VecRing {
            data: vec![0; size],
            head: start.into(),
            tail: start.into(),
        }
    }

    /// Append a record (header + body) at the head, wrapping around, as the kernel would.
    pub fn push(&mut self, kind: u32, misc: u16, body: &[u8]) {
        let len = HEADER + body.len();
        let len16 = u16::try_from(len).expect("record too long");
        let mut rec = Vec::with_capacity(len);
        rec.extend_from_slice(&kind.to_le_bytes());
        rec.extend_from_slice(&misc.to_le_bytes());
        rec.extend_from_slice(&len16.to_le_bytes());
        rec.extend_from_slice(body);
        self.push_bytes(&rec);
    }

    /// Append raw bytes at the head (to build malformed rings).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        let size = self.data.len() as u64;
        let head = self.head.get();
        assert!(
            head - self.tail.get() + bytes.len() as u64 <= size,
            "ring full"
        );
        for (i, b) in bytes.iter().enumerate() {
            self.data[((head + i as u64) % size) as usize] = *b;
        }
        self.head.set(head + bytes.len() as u64);
    }
}

impl RingMemory for VecRing {
    fn data_size(&self) -> usize {
        self.data.len()
    }
    fn load_head(&self) -> u64 {
        self.head.get()
    }
    fn load_tail(&self) -> u64 {
        self.tail.get()
    }
    fn store_tail(&self, tail: u64) {
        self.tail.set(tail);
    }
    fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        dst.copy_from_slice(&self.data[offset..offset + dst.len()]);
    }
}

impl<M: RingMemory> RingMemory for &mut M {
    fn data_size(&self) -> usize {
        (**self).data_size()
    }
    fn load_head(&self) -> u64 {
        (**self).load_head()
    }
    fn load_tail(&self) -> u64 {
        (**self).load_tail()
    }
    fn store_tail(&self, tail: u64) {
        (**self).store_tail(tail);
    }
    fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        (**self).copy_out(offset, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::host_perf::attr::IBS_SAMPLE_TYPE;

    /// Body of an IBS_SAMPLE_TYPE sample: ip, pid/tid, time, raw.
    fn sample_body(ip: u64, time: u64, raw: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&ip.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&time.to_le_bytes());
        b.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        b.extend_from_slice(raw);
        b
    }

    fn lost_body(lost: u64) -> Vec<u8> {
        [1u64.to_le_bytes(), lost.to_le_bytes()].concat()
    }

    fn throttle_body(time: u64) -> Vec<u8> {
        [time.to_le_bytes(), 1u64.to_le_bytes(), 1u64.to_le_bytes()].concat()
    }

    fn collect<M: RingMemory>(r: &mut RingReader<M>) -> Vec<String> {
        let mut out = Vec::new();
        r.read(|rec| out.push(format!("{rec:?}"))).unwrap();
        out
    }

    #[test]
    fn reads_each_record_type_and_counts() {
        let mut ring = VecRing::new(4096, 0);
        let raw = [0xAAu8; 12];
        ring.push(PERF_RECORD_SAMPLE, 4, &sample_body(0x1000, 5, &raw)); // guest kernel
        ring.push(PERF_RECORD_SAMPLE, 5, &sample_body(0x2000, 6, &raw)); // guest user
        ring.push(PERF_RECORD_SAMPLE, 1, &sample_body(0x3000, 7, &raw)); // host kernel
        ring.push(PERF_RECORD_SAMPLE, 2, &sample_body(0x4000, 8, &raw)); // host user
        ring.push(PERF_RECORD_LOST, 0, &lost_body(17));
        ring.push(PERF_RECORD_THROTTLE, 0, &throttle_body(9));
        ring.push(PERF_RECORD_UNTHROTTLE, 0, &throttle_body(10));
        ring.push(3, 0, &[0; 16]); // PERF_RECORD_COMM: skipped
        let mut r = RingReader::new(&mut ring, IBS_SAMPLE_TYPE).unwrap();
        let mut samples = Vec::new();
        let n = r
            .read(|rec| {
                if let Record::Sample(s) = rec {
                    samples.push((s.ip, s.pid_tid, s.time, s.raw.map(<[u8]>::to_vec), s.mode()));
                }
            })
            .unwrap();
        assert_eq!(n, 8);
        assert_eq!(samples.len(), 4);
        assert_eq!(
            samples[0],
            (
                Some(0x1000),
                Some((7, 8)),
                Some(5),
                Some(raw.to_vec()),
                CpuMode::GuestKernel
            )
        );
        assert_eq!(samples[1].4, CpuMode::GuestUser);
        assert_eq!(samples[3].4, CpuMode::User);
        let s = r.stats();
        assert_eq!((s.guest_samples, s.host_samples), (2, 2));
        assert_eq!(
            (s.lost, s.throttles, s.unthrottles, s.other_records),
            (17, 1, 1, 1)
        );
        assert_eq!(
            r.memory().load_tail(),
            r.memory().load_head(),
            "space released"
        );
        assert_eq!(collect(&mut r).len(), 0);
    }

    #[test]
    fn wraps_around_with_a_record_straddling_the_end() {
        // A 256-byte ring whose positions start near the end, so records wrap; the u64
        // positions also run far past the size (they are free-running counters).
        for start in [200u64, 248, 252, 256 * 1000 + 250] {
            let mut ring = VecRing::new(256, start);
            let raw: Vec<u8> = (0..60).collect(); // a 64-byte record body → straddles
            ring.push(PERF_RECORD_SAMPLE, 4, &sample_body(0xAB, 1, &raw));
            ring.push(PERF_RECORD_LOST, 0, &lost_body(2));
            let mut r = RingReader::new(&mut ring, IBS_SAMPLE_TYPE).unwrap();
            let mut got = None;
            r.read(|rec| {
                if let Record::Sample(s) = rec {
                    got = Some((s.ip, s.raw.map(<[u8]>::to_vec)));
                }
            })
            .unwrap();
            assert_eq!(got, Some((Some(0xAB), Some(raw.clone()))), "start {start}");
            assert_eq!(r.stats().lost, 2);
            // Keep going around the ring several times.
            for i in 0..20u64 {
                let ring = &mut *r.mem;
                ring.push(PERF_RECORD_SAMPLE, 5, &sample_body(i, i, &raw));
                ring.push(PERF_RECORD_SAMPLE, 2, &sample_body(i, i, &[]));
                let mut ips = Vec::new();
                r.read(|rec| {
                    if let Record::Sample(s) = rec {
                        ips.push(s.ip.unwrap());
                    }
                })
                .unwrap();
                assert_eq!(ips, [i, i]);
            }
            assert_eq!((r.stats().guest_samples, r.stats().host_samples), (21, 20));
        }
    }

    #[test]
    fn only_complete_records_before_the_head_are_read() {
        let mut ring = VecRing::new(512, 0);
        ring.push(PERF_RECORD_LOST, 0, &lost_body(1));
        let mut r = RingReader::new(&mut ring, IBS_SAMPLE_TYPE).unwrap();
        assert_eq!(r.read(|_| {}), Ok(1));
        assert_eq!(r.read(|_| {}), Ok(0));
    }

    #[test]
    fn discard_all_empties_the_ring() {
        let mut ring = VecRing::new(1024, 100);
        for i in 0..5 {
            ring.push(PERF_RECORD_SAMPLE, 4, &sample_body(i, i, &[1, 2, 3, 4]));
        }
        let mut r = RingReader::new(&mut ring, IBS_SAMPLE_TYPE).unwrap();
        let dropped = r.discard_all();
        assert_eq!(dropped, 5 * (8 + 8 + 8 + 8 + 4 + 4));
        assert_eq!(r.read(|_| panic!("nothing left")), Ok(0));
        assert_eq!(r.stats().discarded_bytes, dropped);
        assert_eq!(
            r.stats().guest_samples,
            0,
            "discarded records are not counted as samples"
        );
    }

    #[test]
    fn malformed_records_skip_to_the_head() {
        // Size smaller than a header.
        let mut ring = VecRing::new(256, 0);
        ring.push_bytes(&[9, 0, 0, 0, 4, 0, 4, 0]);
        let mut r = RingReader::new(&mut ring, IBS_SAMPLE_TYPE).unwrap();
        assert!(matches!(
            r.read(|_| {}),
            Err(RingError::Corrupt { size: 4, .. })
        ));
        assert_eq!(r.memory().load_tail(), 8);
        // Size beyond the head.
        r.mem.push_bytes(&[9, 0, 0, 0, 4, 0, 64, 0]);
        assert!(r.read(|_| {}).is_err());
        // A raw field longer than its record.
        let mut body = sample_body(1, 1, &[0; 8]);
        let at = body.len() - 12;
        body[at..at + 4].copy_from_slice(&100u32.to_le_bytes());
        r.mem.push(PERF_RECORD_SAMPLE, 4, &body);
        assert!(r.read(|_| {}).is_err());
        assert_eq!(r.stats().corrupt, 3);
        assert_eq!(r.stats().guest_samples, 0);
        // The reader recovers.
        r.mem.push(PERF_RECORD_LOST, 0, &lost_body(3));
        assert_eq!(r.read(|_| {}), Ok(1));
    }

    #[test]
    fn rejects_unsupported_layouts() {
        let bad = PERF_SAMPLE_IP | (1 << 5); // CALLCHAIN
        assert_eq!(
            RingReader::new(VecRing::new(64, 0), bad).unwrap_err(),
            RingError::SampleType(bad)
        );
        assert!(RingReader::new(VecRing::new(48, 0), PERF_SAMPLE_IP).is_err());
    }

    #[test]
    fn all_supported_fields_in_abi_order() {
        let st = SUPPORTED_SAMPLE_TYPE;
        let mut body = 1u64.to_le_bytes().to_vec(); // ip
        body.extend_from_slice(&[2, 0, 0, 0, 3, 0, 0, 0]); // pid, tid
        body.extend_from_slice(&4u64.to_le_bytes()); // time
        body.extend_from_slice(&5u64.to_le_bytes()); // id
        body.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]); // cpu, res
        body.extend_from_slice(&7u64.to_le_bytes()); // period
        body.extend_from_slice(&4u32.to_le_bytes());
        body.extend_from_slice(&[8, 8, 8, 8]);
        let mut ring = VecRing::new(256, 0);
        ring.push(PERF_RECORD_SAMPLE, 0x4000 | 5, &body); // other misc bits ignored
        let mut r = RingReader::new(&mut ring, st).unwrap();
        let mut got = None;
        r.read(|rec| {
            if let Record::Sample(s) = rec {
                got = Some(*s).map(|s| (s.ip, s.pid_tid, s.time, s.id, s.cpu, s.period, s.mode()));
            }
        })
        .unwrap();
        assert_eq!(
            got,
            Some((
                Some(1),
                Some((2, 3)),
                Some(4),
                Some(5),
                Some(6),
                Some(7),
                CpuMode::GuestUser
            ))
        );
        assert_eq!(CpuMode::from_misc(3), CpuMode::Hypervisor);
        assert_eq!(CpuMode::from_misc(0), CpuMode::Unknown);
        assert_eq!(CpuMode::from_misc(6), CpuMode::Other(6));
        assert!(!CpuMode::Hypervisor.is_guest() && !CpuMode::Unknown.is_guest());
    }
}
