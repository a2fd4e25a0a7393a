//! Instructions this host's KVM emulator rejects at CPL0 that ibsvm completes itself.
//!
//! On hosts whose KVM runs guest CPL0 code through its instruction emulator (see
//! [`super::host`]), a few instructions stop the VM with an emulation failure. Those whose
//! architectural effect ibsvm can reproduce exactly are completed here; everything else is
//! a guest crash.

mod kvm;
pub mod operand;
pub mod xsave_area;
pub mod xstate;

use operand::{decode_0f_mem, Decoded};

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
    Xsave(Decoded),
    /// `REX.W 0F AE /5` xrstor64 m: restore it (SDM vol. 2C "XRSTOR"); see [`xstate`].
    Xrstor(Decoded),
}

/// ModRM.reg of XSAVE and XRSTOR in opcode group 15, `0F AE` (SDM vol. 2D Table A-6).
const GROUP15_XSAVE: u8 = 4;
const GROUP15_XRSTOR: u8 = 5;

impl Completion {
    /// Instruction length.
    pub fn length(self) -> u8 {
        match self {
            Self::Int3 | Self::Fwait => 1,
            Self::Fence | Self::Xgetbv => 3,
            Self::Xsave(d) | Self::Xrstor(d) => d.len,
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

/// How to complete the instruction starting with `insn`, if ibsvm can.
///
/// XSAVE and XRSTOR only in their 64-bit forms (REX.W), the ones a 64-bit kernel uses: the
/// forms without REX.W store the x87 instruction and data pointers in the 32-bit format
/// (SDM vol. 1 §13.5.1), which `KVM_GET_XSAVE` does not give.
pub fn completion_for(insn: &[u8]) -> Option<Completion> {
    match insn {
        [0xcc, ..] => Some(Completion::Int3),
        [0x9b, ..] => Some(Completion::Fwait),
        [0x0f, 0xae, 0xe8 | 0xf0 | 0xf8, ..] => Some(Completion::Fence),
        [0x0f, 0x01, 0xd0, ..] => Some(Completion::Xgetbv),
        _ => {
            let d = decode_0f_mem(insn).filter(|d| d.opcode == 0xae && d.rex_w)?;
            match d.reg {
                GROUP15_XSAVE => Some(Completion::Xsave(d)),
                GROUP15_XRSTOR => Some(Completion::Xrstor(d)),
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instructions_complete() {
        assert_eq!(completion_for(&[0xcc, 0x90]), Some(Completion::Int3));
        assert_eq!(completion_for(&[0x9b]), Some(Completion::Fwait));
        for last in [0xe8, 0xf0, 0xf8] {
            assert_eq!(completion_for(&[0x0f, 0xae, last]), Some(Completion::Fence));
        }
        assert_eq!(
            completion_for(&[0x0f, 0x01, 0xd0]),
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
        let save = completion_for(&[0x48, 0x0f, 0xae, 0x27]).unwrap();
        assert!(matches!(save, Completion::Xsave(d) if d.mem.base == Some(7)));
        assert_eq!((save.length(), save.counter()), (4, "completed.xsave"));
        let restore = completion_for(&[0x48, 0x0f, 0xae, 0x6b, 0x40]).unwrap();
        assert!(matches!(restore, Completion::Xrstor(d) if d.mem.disp == 0x40));
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
            assert_eq!(completion_for(insn), None, "{insn:02x?}");
        }
    }
}
