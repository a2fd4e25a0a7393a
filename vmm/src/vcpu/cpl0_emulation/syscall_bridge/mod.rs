//! Routing guest system calls into the guest kernel on hosts whose KVM does not.
//!
//! On a host whose KVM emulates guest CPL0 (see [`super::host`]), a `SYSCALL` executed by
//! guest userspace jumps to the kernel's entry point (MSR LSTAR) **without** switching to
//! CPL0: the instruction fetch at LSTAR then faults as a user-mode #PF on a supervisor
//! page, and the kernel kills the process (measured on our development hosts).
//!
//! ibsvm completes the SYSCALL itself. It watches the guest's writes of LSTAR and SFMASK
//! (an MSR filter sends them to userspace; ibsvm writes them through with
//! `KVM_SET_MSRS`), and once LSTAR is set it traps the guest's #PF entry point (IDT vector
//! 14). When the trap fires:
//! - if the faulting RIP is LSTAR and the faulting CS has RPL 3, the #PF is a SYSCALL that
//!   did not enter the kernel: ibsvm finishes the architectural SYSCALL (AMD APM vol. 3
//!   "SYSCALL": RFLAGS ← RFLAGS & ~SFMASK, RIP ← LSTAR, RSP unchanged; RCX and R11 were
//!   already written by the host) by pointing RIP at LSTAR with the user RSP and masked
//!   RFLAGS, still at CPL0 where the #PF delivery left the vCPU;
//! - otherwise it is an ordinary page fault and the handler goes on.
//!
//! Two ways to trap the entry ([`PfTrap`]):
//! - **planted** (preferred): Linux's exception entries start with `[endbr64] [clac or its
//!   NOP padding] cld` (arch/x86/entry/entry_64.S, `idtentry`). ibsvm overwrites that `cld`
//!   with `int3`, which this host's emulator cannot run at CPL0, so it exits to ibsvm; for
//!   an ordinary fault ibsvm performs the `cld` (RFLAGS.DF ← 0, RIP + 1). The instructions
//!   before it are left alone because the kernel's alternatives patching rewrites them
//!   after LSTAR is set; `cld` is never patched.
//! - **hardware breakpoint** (any other entry): a guest-debug breakpoint on the entry; an
//!   ordinary fault single-steps the first instruction (breakpoints here re-trigger even
//!   with RFLAGS.RF set) and re-arms. Costs two exits a fault and slows emulation while
//!   armed, hence the fallback only.

use crate::x86::{msr, rflags};

/// Size of a long-mode IDT gate (SDM vol. 3A §6.14.1).
pub const IDT_GATE_SIZE: u64 = 16;
/// `cld` and `int3` opcodes.
pub const OPCODE_CLD: u8 = 0xfc;
/// `int3`.
pub const OPCODE_INT3: u8 = 0xcc;
/// How many bytes of the entry [`plant_site`] looks at.
pub const ENTRY_SCAN: usize = 16;

/// How the #PF entry is trapped (VM-wide: every vCPU shares the kernel's IDT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PfTrap {
    /// `int3` planted over the `cld` at guest-virtual `va`.
    Planted {
        /// Where.
        va: u64,
    },
    /// A hardware breakpoint on the entry at `va`.
    Breakpoint {
        /// Where.
        va: u64,
    },
}

impl std::fmt::Display for PfTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Planted { va } => write!(f, "int3 planted on its cld at {va:#x}"),
            Self::Breakpoint { va } => write!(f, "hardware breakpoint at {va:#x}"),
        }
    }
}

/// Where in the #PF entry's first bytes the `cld` is that can carry an `int3`: only if
/// everything before it is `endbr64`, `clac` or a NOP that Linux pads alternatives with
/// (arch/x86/include/asm/nops.h).
pub fn plant_site(entry: &[u8]) -> Option<usize> {
    const SKIPPABLE: [&[u8]; 8] = [
        &[0xf3, 0x0f, 0x1e, 0xfa],             // endbr64
        &[0x0f, 0x01, 0xca],                   // clac
        &[0x90],                               // nop
        &[0x66, 0x90],                         // BYTES_NOP2
        &[0x0f, 0x1f, 0x00],                   // BYTES_NOP3
        &[0x0f, 0x1f, 0x40, 0x00],             // BYTES_NOP4
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],       // BYTES_NOP5
        &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00], // BYTES_NOP6
    ];
    let mut at = 0;
    while at < entry.len() {
        if entry[at] == OPCODE_CLD {
            return Some(at);
        }
        at += SKIPPABLE
            .iter()
            .find(|insn| entry[at..].starts_with(insn))?
            .len();
    }
    None
}

/// RFLAGS after the `cld` the planted `int3` replaced.
pub fn rflags_after_cld(rflags: u64) -> u64 {
    rflags & !rflags::DF
}

/// The frame the CPU pushes for an exception with an error code in long mode, lowest
/// address first (SDM vol. 3A figure 6-9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExceptionFrame {
    /// Error code.
    pub error: u64,
    /// Faulting RIP.
    pub rip: u64,
    /// Faulting CS.
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// RSP at the fault.
    pub rsp: u64,
    /// SS at the fault.
    pub ss: u64,
}

impl ExceptionFrame {
    /// Bytes the frame occupies.
    pub const SIZE: usize = 48;

    /// Decodes the frame from the bytes at the handler's RSP.
    pub fn parse(bytes: &[u8; Self::SIZE]) -> Self {
        let q = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        Self {
            error: q(0),
            rip: q(1),
            cs: q(2),
            rflags: q(3),
            rsp: q(4),
            ss: q(5),
        }
    }
}

/// The handler address in a long-mode interrupt gate (offset 15:0, 31:16, 63:32).
pub fn gate_target(gate: &[u8; IDT_GATE_SIZE as usize]) -> u64 {
    u64::from(u16::from_le_bytes([gate[0], gate[1]]))
        | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16
        | u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32
}

/// Registers that complete a SYSCALL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallEntry {
    /// LSTAR.
    pub rip: u64,
    /// The user stack pointer (SYSCALL leaves RSP alone).
    pub rsp: u64,
    /// RFLAGS & ~SFMASK, RF clear.
    pub rflags: u64,
}

/// Per-vCPU state of the bridge.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyscallBridge {
    lstar: u64,
    sfmask: u64,
    /// How this vCPU traps the #PF entry, once LSTAR is set.
    pub trap: Option<PfTrap>,
    /// Single-stepping over the #PF handler's first instruction (breakpoint trap).
    pub stepping: bool,
}

impl SyscallBridge {
    /// Records a guest write of LSTAR or SFMASK; returns whether the breakpoint should
    /// now be (re)armed (LSTAR got a non-zero value).
    pub fn record_msr(&mut self, index: u32, value: u64) -> bool {
        match index {
            msr::LSTAR => {
                self.lstar = value;
                value != 0
            }
            msr::SFMASK => {
                self.sfmask = value;
                false
            }
            _ => false,
        }
    }

    /// Whether `rip` is this vCPU's planted `int3`.
    pub fn planted_at(&self, rip: u64) -> bool {
        self.trap == Some(PfTrap::Planted { va: rip })
    }

    /// What a #PF with `frame` is: `Some(entry)` for a SYSCALL to complete.
    pub fn syscall_entry(&self, frame: &ExceptionFrame) -> Option<SyscallEntry> {
        (self.lstar != 0 && frame.rip == self.lstar && frame.cs & 3 == 3).then_some(SyscallEntry {
            rip: self.lstar,
            rsp: frame.rsp,
            rflags: (frame.rflags & !self.sfmask & !rflags::RF) | rflags::FIXED,
        })
    }
}

mod kvm;

#[cfg(test)]
mod tests {
    use super::*;

    const LSTAR: u64 = 0xffff_ffff_8160_0080;

    fn frame(rip: u64, cs: u64) -> ExceptionFrame {
        ExceptionFrame {
            error: 0x15,
            rip,
            cs,
            rflags: 0x10246 | rflags::RF,
            rsp: 0x7ffd_0000,
            ss: 0x2b,
        }
    }

    fn bridge() -> SyscallBridge {
        let mut b = SyscallBridge::default();
        assert!(!b.record_msr(msr::SFMASK, 0x47700));
        assert!(b.record_msr(msr::LSTAR, LSTAR));
        b
    }

    #[test]
    fn a_user_fault_at_lstar_is_a_syscall() {
        let entry = bridge().syscall_entry(&frame(LSTAR, 0x33)).unwrap();
        assert_eq!(entry.rip, LSTAR);
        assert_eq!(entry.rsp, 0x7ffd_0000);
        // IF (bit 9) and the other SFMASK bits cleared, RF cleared, bit 1 set.
        assert_eq!(entry.rflags, 0x46);
        assert_eq!(entry.rflags & rflags::RF, 0);
    }

    #[test]
    fn other_faults_are_ordinary() {
        let b = bridge();
        assert_eq!(
            b.syscall_entry(&frame(LSTAR, 0x10)),
            None,
            "kernel-mode fault at LSTAR"
        );
        assert_eq!(
            b.syscall_entry(&frame(0x40_1000, 0x33)),
            None,
            "user fault elsewhere"
        );
        assert_eq!(
            SyscallBridge::default().syscall_entry(&frame(0, 0x33)),
            None,
            "LSTAR not set yet"
        );
    }

    #[test]
    fn plant_sites_follow_linux_entries() {
        // Debian 6.1 asm_exc_page_fault: 3-byte NOP padding for ASM_CLAC, cld, call.
        assert_eq!(
            plant_site(&[0x90, 0x90, 0x90, 0xfc, 0xe8, 0x17, 0x09]),
            Some(3)
        );
        // After alternatives optimised the padding, with IBT, or with SMAP (clac).
        assert_eq!(plant_site(&[0x0f, 0x1f, 0x00, 0xfc]), Some(3));
        assert_eq!(
            plant_site(&[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x01, 0xca, 0xfc]),
            Some(7)
        );
        assert_eq!(plant_site(&[0xfc]), Some(0));
        // Anything else before a cld, or no cld: no site.
        assert_eq!(plant_site(&[0x55, 0xfc]), None);
        assert_eq!(plant_site(&[0x90, 0x90]), None);
        assert_eq!(plant_site(&[0x0f, 0x1f]), None, "truncated NOP");
        assert_eq!(plant_site(&[0xcc, 0xfc]), None);
    }

    #[test]
    fn cld_clears_only_df() {
        assert_eq!(rflags_after_cld(0x446), 0x46);
        assert_eq!(rflags_after_cld(0x46), 0x46);
    }

    #[test]
    fn frames_and_gates_decode() {
        let mut bytes = [0u8; ExceptionFrame::SIZE];
        for (i, v) in [4u64, LSTAR, 0x33, 0x246, 0x7ffd_0000, 0x2b]
            .iter()
            .enumerate()
        {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let f = ExceptionFrame::parse(&bytes);
        assert_eq!(
            (f.error, f.rip, f.cs, f.rflags, f.rsp, f.ss),
            (4, LSTAR, 0x33, 0x246, 0x7ffd_0000, 0x2b)
        );
        // asm_exc_page_fault at 0xffffffff81a00a70 through selector 0x10, present interrupt gate.
        let gate = [
            0x70, 0x0a, 0x10, 0x00, 0x00, 0x8e, 0xa0, 0x81, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ];
        assert_eq!(gate_target(&gate), 0xffff_ffff_81a0_0a70);
    }
}
