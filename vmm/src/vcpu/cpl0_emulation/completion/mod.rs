//! Instructions this host's KVM emulator rejects at CPL0 that ibsvm completes itself.
//!
//! On hosts whose KVM runs guest CPL0 code through its instruction emulator (see
//! [`super::host`]), a few instructions stop the VM with an emulation failure. Those whose
//! architectural effect ibsvm can reproduce exactly are completed here; everything else is
//! a guest crash.

pub mod decode;
mod kvm;
pub mod xsave_area;
pub mod xstate;

use iced_x86::{Code, Instruction};

/// An instruction ibsvm completes, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// `CC` int3: advance RIP past it and inject #BP (vector 3), a trap whose saved RIP is
    /// the next instruction (SDM vol. 3A §6.15, "Interrupt 3—Breakpoint Exception").
    Int3,
    /// `9B` fwait: waits for pending unmasked x87 exceptions. The emulated guest never
    /// executes x87 arithmetic at CPL0 (the emulator cannot run it either), so none can be
    /// pending: advance RIP (SDM vol. 2B "WAIT/FWAIT").
    Fwait,
    /// `0F AE E8/F0/F8` lfence/mfence/sfence: ordering barriers; the emulator executes one
    /// instruction at a time with all prior accesses complete, so advance RIP.
    Fence,
    /// `0F 01 D0` xgetbv: EDX:EAX = XCR[ECX] (SDM vol. 2C "XGETBV"); see [`xstate`].
    Xgetbv,
    /// `REX.W 0F AE /4` xsave64 m: save the extended state RFBM selects (SDM vol. 2C
    /// "XSAVE"); see [`xstate`].
    Xsave(Instruction),
    /// `REX.W 0F AE /5` xrstor64 m: restore it (SDM vol. 2C "XRSTOR"); see [`xstate`].
    Xrstor(Instruction),
}

impl Completion {
    /// Instruction length.
    pub fn length(self) -> u8 {
        match self {
            Self::Int3 | Self::Fwait => 1,
            Self::Fence | Self::Xgetbv => 3,
            // At most 15 bytes (SDM vol. 2A §2.1).
            Self::Xsave(i) | Self::Xrstor(i) => i.len() as u8,
        }
    }

    /// Counter name for `--stats`.
    pub fn counter(self) -> &'static str {
        match self {
            Self::Int3 => "completed.int3",
            Self::Fwait => "completed.fwait",
            Self::Fence => "completed.fence",
            Self::Xgetbv => "completed.xgetbv",
            Self::Xsave(_) => "completed.xsave",
            Self::Xrstor(_) => "completed.xrstor",
        }
    }
}

/// An exception a completed instruction raises (SDM vol. 3A §6.15: vectors, error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    /// Vector.
    pub vector: u8,
    /// Error code, for the vectors that push one.
    pub error_code: Option<u32>,
    /// CR2 for a page fault: the linear address that faulted.
    pub cr2: Option<u64>,
}

impl Exception {
    const fn new(vector: u8, error_code: Option<u32>) -> Self {
        Self {
            vector,
            error_code,
            cr2: None,
        }
    }

    /// #BP, vector 3.
    pub const BREAKPOINT: Self = Self::new(3, None);
    /// #UD, vector 6.
    pub const INVALID_OPCODE: Self = Self::new(6, None);
    /// #NM, vector 7.
    pub const DEVICE_NOT_AVAILABLE: Self = Self::new(7, None);
    /// #SS(0), vector 12.
    pub const STACK_FAULT: Self = Self::new(12, Some(0));
    /// #GP(0), vector 13.
    pub const GENERAL_PROTECTION: Self = Self::new(13, Some(0));

    /// #PF, vector 14, at `address` with `error_code` (SDM vol. 3A §4.7).
    pub fn page_fault(address: u64, error_code: u32) -> Self {
        Self {
            cr2: Some(address),
            ..Self::new(14, Some(error_code))
        }
    }
}

/// What completing an instruction does to the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The instruction retired: RIP moves past it.
    Retired,
    /// It retired and then raises a trap, whose saved RIP is the next instruction.
    Trap(Exception),
    /// It raises a fault instead: RIP stays on it and nothing else changed.
    Fault(Exception),
}

/// How to complete the instruction at `rip` starting with `insn`, if ibsvm can.
///
/// XSAVE and XRSTOR only in their 64-bit forms (REX.W), the ones a 64-bit kernel uses: the
/// forms without REX.W store the x87 instruction and data pointers in the 32-bit format
/// (SDM vol. 1 §13.5.1), which `KVM_GET_XSAVE` does not give. The others only in their
/// plain encodings (no prefixes), whose lengths [`Completion::length`] knows.
pub fn completion_for(insn: &[u8], rip: u64) -> Option<Completion> {
    let i = decode::decode(insn, rip)?;
    let plain = |len| i.len() == len;
    match i.code() {
        Code::Int3 if plain(1) => Some(Completion::Int3),
        Code::Wait if plain(1) => Some(Completion::Fwait),
        Code::Lfence | Code::Mfence | Code::Sfence if plain(3) => Some(Completion::Fence),
        Code::Xgetbv if plain(3) => Some(Completion::Xgetbv),
        Code::Xsave64_mem => Some(Completion::Xsave(i)),
        Code::Xrstor64_mem => Some(Completion::Xrstor(i)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion_for_bytes(insn: &[u8]) -> Option<Completion> {
        completion_for(insn, 0x1000)
    }

    #[test]
    fn known_instructions_complete() {
        assert_eq!(completion_for_bytes(&[0xcc, 0x90]), Some(Completion::Int3));
        assert_eq!(completion_for_bytes(&[0x9b]), Some(Completion::Fwait));
        for last in [0xe8, 0xf0, 0xf8] {
            assert_eq!(
                completion_for_bytes(&[0x0f, 0xae, last]),
                Some(Completion::Fence)
            );
        }
        assert_eq!(
            completion_for_bytes(&[0x0f, 0x01, 0xd0]),
            Some(Completion::Xgetbv)
        );
        assert_eq!(
            [
                Completion::Int3,
                Completion::Fwait,
                Completion::Fence,
                Completion::Xgetbv
            ]
            .map(Completion::length),
            [1, 1, 3, 3]
        );
    }

    #[test]
    fn xsave64_and_xrstor64_carry_their_operand() {
        // xsave64 (%rdi) and xrstor64 0x40(%rbx): Linux's XSTATE_XSAVE / XSTATE_XRESTORE.
        let save = completion_for_bytes(&[0x48, 0x0f, 0xae, 0x27]).unwrap();
        assert!(matches!(save, Completion::Xsave(i) if i.memory_base() == iced_x86::Register::RDI));
        assert_eq!((save.length(), save.counter()), (4, "completed.xsave"));
        let restore = completion_for_bytes(&[0x48, 0x0f, 0xae, 0x6b, 0x40]).unwrap();
        assert!(matches!(restore, Completion::Xrstor(i) if i.memory_displacement64() == 0x40));
        assert_eq!(restore.length(), 5);
    }

    #[test]
    fn others_do_not() {
        // xsave without REX.W, xsaveopt64 (/6), popcnt, cmpxchg16b, clflush (0f ae /7 with
        // a memory operand), xsetbv (KVM's emulator runs it), truncated, empty.
        for insn in [
            &[0x0f, 0xae, 0x27][..],
            &[0x48, 0x0f, 0xae, 0x37],
            &[0xf3, 0x0f, 0xb8, 0xc0],
            &[0x48, 0x0f, 0xc7, 0x0e],
            &[0x0f, 0xae, 0x38],
            &[0x0f, 0x01, 0xd1],
            &[0x48, 0x0f, 0xae],
            &[],
        ] {
            assert_eq!(completion_for_bytes(insn), None, "{insn:02x?}");
        }
    }
}
