//! XGETBV, XSAVE and XRSTOR completed against a vCPU: the checks and faults of SDM vol. 2C
//! ("XGETBV", "XSAVE", "XRSTOR": "64-Bit Mode Exceptions") in their architectural order,
//! the memory operand through the guest's page tables, and the state through
//! `KVM_GET_XCRS` and `KVM_GET_XSAVE`/`KVM_SET_XSAVE`.
//!
//! This host's KVM emulator runs XSETBV (so XCR0 is KVM's) but stops at these three; a
//! Linux guest that may use XSAVE needs all of them for its context switches.
//!
//! XGETBV of XCR 1 (XINUSE) is valid exactly when the guest's CPUID offers XGETBV1, and
//! guest code on these hosts reads that bit from the host whatever ibsvm's table says (see
//! [`xgetbv1_offered`]), so ibsvm completes it where the host has XGETBV1: hiding the bit
//! is not in its power there.

use iced_x86::Instruction;
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xsave};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::decode;
use super::xsave_area::{self, Layout, AREA_ALIGN, KVM_XSAVE_BYTES};
use super::{Effect, Exception};
use crate::vcpu::guest_walk::{translate_access, DataAccess};
use crate::x86::xcr::{XCR0, XCR1};
use crate::x86::{cr0, cr4, rflags};

/// CPUID Fn0000_000D sub-leaf 1 EAX bit 2 XGETBV1 (SDM vol. 2A "CPUID" Table 3-8; AMD APM
/// vol. 3 appendix E, Fn0000_000D_EAX_x1).
const LEAF_D_1_EAX_XGETBV1: u32 = 1 << 2;
/// XSTATE_BV, bytes 512-519 of the standard-format area `KVM_GET_XSAVE` fills (SDM vol. 1
/// §13.4.2).
const XSTATE_BV: std::ops::Range<usize> = 512..520;
const PAGE: u64 = 4096;

/// A failure completing XGETBV, XSAVE or XRSTOR that is not the guest's fault.
#[derive(Debug, Error)]
pub enum XstateError {
    /// An ioctl on the vCPU failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_XCRS` did not report XCR0.
    #[error("KVM_GET_XCRS reported no XCR0")]
    NoXcr0,
    /// The operand is mapped, but not to guest RAM.
    #[error("the XSAVE area at {linear:#x} is mapped to {gpa:#x}, which is not RAM")]
    NotRam {
        /// Linear address.
        linear: u64,
        /// Guest-physical address.
        gpa: u64,
    },
    /// The operand's address needs a register the decoder asked for and ibsvm does not
    /// provide (none of XSAVE's encodings does).
    #[error("cannot compute the XSAVE operand's address")]
    Operand,
    /// The guest uses 5-level paging, which [`translate_access`] does not walk.
    #[error("the guest runs with CR4.LA57 (5-level paging), which ibsvm cannot walk")]
    FiveLevelPaging,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> XstateError {
    move |source| XstateError::Ioctl { what, source }
}

/// The vCPU's XCR0.
fn xcr0(fd: &VcpuFd) -> Result<u64, XstateError> {
    let xcrs = fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    xcrs.xcrs[..n]
        .iter()
        .find(|x| x.xcr == XCR0)
        .map(|x| x.value)
        .ok_or(XstateError::NoXcr0)
}

/// The vCPU's XINUSE: the XSTATE_BV of its state as `KVM_GET_XSAVE` reports it, which the
/// host's XSAVE wrote from XINUSE when it saved the guest's registers (SDM vol. 1 §13.7).
fn xinuse(fd: &VcpuFd) -> Result<u64, XstateError> {
    let state = state_bytes(&fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?);
    Ok(u64::from_le_bytes(
        state[XSTATE_BV].try_into().expect("8-byte field"),
    ))
}

/// Whether the guest sees XGETBV1. KVM's table cannot hide leaf 0xD sub-leaf 1 from guest
/// code on the hosts whose CPL0 it emulates: measured on such a host, the test kernel
/// (`test=xsave`) reads EAX 0x7 (XSAVEOPT, XSAVEC, XGETBV1) at CPL0 and CPL3 while the
/// table from `KVM_GET_SUPPORTED_CPUID` holds 0 there; the host's own EAX is 0xf. So the
/// guest's XGETBV1 is the host's.
fn xgetbv1_offered() -> bool {
    use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
    // Unsafe functions in older Rust (rust-version is 1.80), safe in recent releases.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU and only writes the four result registers;
    // leaf 0xD is read only if leaf 0 says it exists.
    unsafe {
        __get_cpuid_max(0).0 >= 0xd && __cpuid_count(0xd, 1).eax & LEAF_D_1_EAX_XGETBV1 != 0
    }
}

/// XGETBV: `regs` gets EDX:EAX = XCR[ECX], the upper halves of RAX and RDX cleared: XCR0,
/// or with XGETBV1 XCR 1 = XCR0 AND XINUSE; any other ECX is #GP(0), after the #UD of
/// CR4.OSXSAVE clear (SDM vol. 2C "XGETBV" exceptions; vol. 3A §6.9 priorities).
pub fn xgetbv(fd: &VcpuFd, sregs: &kvm_sregs, regs: &mut kvm_regs) -> Result<Effect, XstateError> {
    if sregs.cr4 & cr4::OSXSAVE == 0 {
        return Ok(Effect::Fault(Exception::INVALID_OPCODE));
    }
    let value = match regs.rcx as u32 {
        XCR0 => xcr0(fd)?,
        XCR1 if xgetbv1_offered() => xcr0(fd)? & xinuse(fd)?,
        _ => return Ok(Effect::Fault(Exception::GENERAL_PROTECTION)),
    };
    regs.rax = value & 0xffff_ffff;
    regs.rdx = value >> 32;
    Ok(Effect::Retired)
}

/// Which of the two instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// XSAVE: state to memory.
    Save,
    /// XRSTOR: memory to state.
    Restore,
}

/// Whether `la` is canonical with 4-level paging (bits 63:47 equal; SDM vol. 1 §3.3.7.1).
fn canonical(la: u64) -> bool {
    ((la << 16) as i64 >> 16) as u64 == la
}

/// XSAVE or XRSTOR of the area `insn` names, for the vCPU in `regs` and `sregs`.
pub fn transfer(
    fd: &VcpuFd,
    mem: &GuestMemoryMmap,
    layout: &Layout,
    (what, insn): (Transfer, &Instruction),
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Effect, XstateError> {
    let fault = |e| Ok(Effect::Fault(e));
    if sregs.cr4 & cr4::OSXSAVE == 0 {
        return fault(Exception::INVALID_OPCODE);
    }
    if sregs.cr0 & cr0::TS != 0 {
        return fault(Exception::DEVICE_NOT_AVAILABLE);
    }
    if sregs.cr4 & cr4::LA57 != 0 {
        return Err(XstateError::FiveLevelPaging);
    }
    let xcr0 = xcr0(fd)?;
    let rfbm = ((regs.rdx << 32) | (regs.rax & 0xffff_ffff)) & xcr0;
    let linear = decode::linear_address(insn, regs, sregs).ok_or(XstateError::Operand)?;
    let len = layout.area_len(rfbm) as u64;
    if !canonical(linear) || !canonical(linear.wrapping_add(len - 1)) {
        return fault(if decode::uses_stack_segment(insn) {
            Exception::STACK_FAULT
        } else {
            Exception::GENERAL_PROTECTION
        });
    }
    if linear % AREA_ALIGN != 0 {
        return fault(Exception::GENERAL_PROTECTION);
    }
    // CPL = CS.RPL in long mode (SDM vol. 3A §5.5).
    let user = sregs.cs.selector & 3 == 3;
    let access = DataAccess {
        cr3: sregs.cr3,
        write: what == Transfer::Save,
        user,
        write_protect: sregs.cr0 & cr0::WP != 0,
        smap: !user && sregs.cr4 & cr4::SMAP != 0 && regs.rflags & rflags::AC == 0,
    };
    // Every page of the area, translated before any byte moves: (gpa, its bytes of the area).
    let mut pieces = Vec::with_capacity(2);
    let mut at = linear;
    while at < linear + len {
        let n = (PAGE - at % PAGE).min(linear + len - at);
        let bytes = (at - linear) as usize..(at - linear + n) as usize;
        match translate_access(mem, at, access) {
            Ok(gpa) => pieces.push((gpa, bytes)),
            Err(code) => return fault(Exception::page_fault(at, code)),
        }
        at += n;
    }
    let mut area = vec![0u8; len as usize];
    for (gpa, bytes) in &pieces {
        mem.read_slice(&mut area[bytes.clone()], GuestAddress(*gpa))
            .map_err(|_| XstateError::NotRam { linear, gpa: *gpa })?;
    }
    let mut state = state_bytes(&fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?);
    match what {
        Transfer::Save => {
            xsave_area::xsave(&state, &mut area, rfbm, layout);
            for (gpa, bytes) in &pieces {
                mem.write_slice(&area[bytes.clone()], GuestAddress(*gpa))
                    .map_err(|_| XstateError::NotRam { linear, gpa: *gpa })?;
            }
        }
        Transfer::Restore => {
            if let Err(why) = xsave_area::xrstor(&mut state, &area, rfbm, xcr0, layout) {
                log::debug!("xrstor at {linear:#x}: #GP(0), {why:?}");
                return fault(Exception::GENERAL_PROTECTION);
            }
            let xsave = kvm_xsave {
                region: std::array::from_fn(|i| {
                    u32::from_le_bytes(state[i * 4..i * 4 + 4].try_into().expect("4 bytes"))
                }),
                ..Default::default()
            };
            // SAFETY: KVM_SET_XSAVE reads `struct kvm_xsave` (4 KiB) unless the VM enabled
            // a dynamic XSTATE feature (AMX) with arch_prctl, which ibsvm never does; the
            // buffer is a whole, initialized `kvm_xsave`.
            unsafe { fd.set_xsave(&xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        }
    }
    Ok(Effect::Retired)
}

/// The `KVM_GET_XSAVE` buffer as bytes.
fn state_bytes(x: &kvm_xsave) -> [u8; KVM_XSAVE_BYTES] {
    let mut bytes = [0u8; KVM_XSAVE_BYTES];
    for (dst, word) in bytes.chunks_exact_mut(4).zip(x.region) {
        dst.copy_from_slice(&word.to_le_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses() {
        assert!(canonical(0x0000_7fff_ffff_ffff));
        assert!(canonical(0xffff_8000_0000_0000));
        assert!(!canonical(0x0000_8000_0000_0000));
        assert!(!canonical(0xfff7_8000_0000_0000));
    }
}
