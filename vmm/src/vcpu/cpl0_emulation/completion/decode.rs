//! The instructions ibsvm completes, decoded by iced-x86 (a maintained x86 decoder: prefixes,
//! REX, ModRM, SIB, displacement and which prefixes an encoding forbids, Intel SDM vol. 2A
//! §2.1-2.2), and the linear address of their memory operand.

use iced_x86::{Decoder, DecoderOptions, Instruction, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};

/// The 64-bit-mode instruction at `rip` whose bytes start `insn`; `None` if they are not a
/// valid instruction (truncated, or a prefix the encoding forbids, such as LOCK on XSAVE).
pub fn decode(insn: &[u8], rip: u64) -> Option<Instruction> {
    let instruction = Decoder::with_ip(64, insn, rip, DecoderOptions::NONE).decode();
    (!instruction.is_invalid()).then_some(instruction)
}

/// The linear address of `insn`'s memory operand for the vCPU in `regs` and `sregs`: the
/// effective address plus the segment base, which in 64-bit mode only FS and GS have
/// (SDM vol. 3A §3.4.4); RIP-relative from the next instruction; wrapped to 32 bits under
/// the address-size prefix.
pub fn linear_address(insn: &Instruction, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<u64> {
    insn.virtual_address(0, 0, |register, _, _| value(register, regs, sregs))
}

/// Whether the memory operand goes through SS (a base of RSP or RBP, or an SS override):
/// a non-canonical address there is #SS, not #GP (SDM vol. 3A §6.15).
pub fn uses_stack_segment(insn: &Instruction) -> bool {
    insn.memory_segment() == Register::SS
}

/// A register's value for the address computation: a general register (64- or 32-bit, in
/// iced's encoding order RAX, RCX, ... R15) or a segment base.
fn value(register: Register, r: &kvm_regs, s: &kvm_sregs) -> Option<u64> {
    let gprs = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    let slot = |first: Register| {
        (register as usize)
            .checked_sub(first as usize)
            .and_then(|n| gprs.get(n).copied())
    };
    match register {
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        Register::FS => Some(s.fs.base),
        Register::GS => Some(s.gs.base),
        _ => slot(Register::RAX).or_else(|| slot(Register::EAX).map(|v| v & 0xffff_ffff)),
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::Code;

    use super::*;

    /// RAX = 0x1000, RCX = 0x2000, ... R15 = 0x10000; FS.base 0x7000_0000, GS.base 0x8000_0000.
    fn state() -> (kvm_regs, kvm_sregs) {
        let v = |i: u64| 0x1000 * (i + 1);
        let regs = kvm_regs {
            rax: v(0),
            rcx: v(1),
            rdx: v(2),
            rbx: v(3),
            rsp: v(4),
            rbp: v(5),
            rsi: v(6),
            rdi: v(7),
            r8: v(8),
            r9: v(9),
            r10: v(10),
            r11: v(11),
            r12: v(12),
            r13: v(13),
            r14: v(14),
            r15: v(15),
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.fs.base = 0x7000_0000;
        sregs.gs.base = 0x8000_0000;
        (regs, sregs)
    }

    fn address(bytes: &[u8], rip: u64) -> (Instruction, u64) {
        let insn = decode(bytes, rip).unwrap();
        let (regs, sregs) = state();
        (insn, linear_address(&insn, &regs, &sregs).unwrap())
    }

    #[test]
    fn linux_xsave_forms() {
        // xsave64 (%rdi), xrstor64 0x40(%rbx): what Linux's XSTATE_XSAVE/XRSTOR emit.
        let (insn, at) = address(&[0x48, 0x0f, 0xae, 0x27], 0);
        assert_eq!(
            (insn.code(), insn.len(), at),
            (Code::Xsave64_mem, 4, 0x8000)
        );
        assert!(!uses_stack_segment(&insn));
        let (insn, at) = address(&[0x48, 0x0f, 0xae, 0x6b, 0x40], 0);
        assert_eq!(
            (insn.code(), insn.len(), at),
            (Code::Xrstor64_mem, 5, 0x4040)
        );
    }

    #[test]
    fn sib_disp_rex_segments_and_address_size() {
        // xsave 0x10(%r12,%r9,4): REX.WXB, SIB with scale 4.
        let (insn, at) = address(&[0x4b, 0x0f, 0xae, 0x64, 0x8c, 0x10], 0);
        assert_eq!((insn.len(), at), (6, 0xd000 + 0xa000 * 4 + 0x10));
        // xsave -0x40(%rsp) and 0x100(%rbp): through SS.
        let (insn, at) = address(&[0x0f, 0xae, 0x64, 0x24, 0xc0], 0);
        assert_eq!(at, 0x5000 - 0x40);
        assert!(uses_stack_segment(&insn));
        let (insn, at) = address(&[0x0f, 0xae, 0xa5, 0, 1, 0, 0], 0);
        assert_eq!(at, 0x6100);
        assert!(uses_stack_segment(&insn));
        // xsave 0x12345678: no base, no index.
        assert_eq!(
            address(&[0x0f, 0xae, 0x24, 0x25, 0x78, 0x56, 0x34, 0x12], 0).1,
            0x1234_5678
        );
        // xsave64 %fs:0x10(%rax), %gs:(%rax): the segment base is added.
        assert_eq!(
            address(&[0x64, 0x48, 0x0f, 0xae, 0x60, 0x10], 0).1,
            0x7000_1010
        );
        assert_eq!(address(&[0x65, 0x0f, 0xae, 0x20], 0).1, 0x8000_1000);
        // 67: the address is computed in 32 bits and wraps at 4 GiB.
        let insn = decode(&[0x67, 0x0f, 0xae, 0xa0, 0xff, 0xff, 0xff, 0xff], 0).unwrap();
        let (mut regs, sregs) = state();
        regs.rax = 0x1_0000_0010;
        assert_eq!(linear_address(&insn, &regs, &sregs), Some(0xf));
    }

    #[test]
    fn rip_relative_counts_from_the_next_instruction() {
        // xsave 0x20(%rip), 7 bytes long, at 0xffff_ffff_8100_0000.
        let (insn, at) = address(&[0x0f, 0xae, 0x25, 0x20, 0, 0, 0], 0xffff_ffff_8100_0000);
        assert_eq!((insn.len(), at), (7, 0xffff_ffff_8100_0027));
    }

    #[test]
    fn invalid_bytes_decode_to_nothing() {
        for insn in [
            &[0xf0, 0x0f, 0xae, 0x27][..], // LOCK on xsave
            &[0x48, 0x0f, 0xae],           // truncated
            &[0x0f, 0xae, 0x24],           // SIB missing
            &[0x0f, 0xae, 0x25, 0x20, 0],  // disp32 truncated
            &[],
        ] {
            assert_eq!(decode(insn, 0), None, "{insn:02x?}");
        }
    }
}
