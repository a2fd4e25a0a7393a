//! Instructions this host's KVM emulator rejects at CPL0 that ibsvm completes itself.
//!
//! On hosts whose KVM runs guest CPL0 code through its instruction emulator (see
//! `crate::host`), a few instructions stop the VM with an emulation failure. Those whose
//! architectural effect ibsvm can reproduce exactly are completed here; everything else is
//! a guest crash.

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
}

impl Completion {
    /// Instruction length.
    pub fn length(self) -> u8 {
        match self {
            Self::Int3 | Self::Fwait => 1,
            Self::Fence => 3,
        }
    }

    /// Counter name for `--stats`.
    pub fn counter(self) -> &'static str {
        match self {
            Self::Int3 => "completed.int3",
            Self::Fwait => "completed.fwait",
            Self::Fence => "completed.fence",
        }
    }
}

/// How to complete the instruction starting with `insn`, if ibsvm can.
pub fn completion_for(insn: &[u8]) -> Option<Completion> {
    match insn {
        [0xcc, ..] => Some(Completion::Int3),
        [0x9b, ..] => Some(Completion::Fwait),
        [0x0f, 0xae, 0xe8 | 0xf0 | 0xf8, ..] => Some(Completion::Fence),
        _ => None,
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
            (
                Completion::Int3.length(),
                Completion::Fwait.length(),
                Completion::Fence.length()
            ),
            (1, 1, 3)
        );
    }

    #[test]
    fn others_do_not() {
        // xsave, popcnt, cmpxchg16b, clflush (0f ae /7 with a memory operand), empty.
        for insn in [
            &[0x0f, 0xae, 0x27][..],
            &[0xf3, 0x0f, 0xb8, 0xc0],
            &[0x48, 0x0f, 0xc7, 0x0e],
            &[0x0f, 0xae, 0x38],
            &[],
        ] {
            assert_eq!(completion_for(insn), None, "{insn:02x?}");
        }
    }
}
