//! XGETBV, XSAVE and XRSTOR completed against a vCPU: the checks and faults of SDM vol. 2C
//! ("XGETBV", "XSAVE", "XRSTOR": "64-Bit Mode Exceptions") in their architectural order,
//! the memory operand through the guest's page tables, and the state through
//! `KVM_GET_XCRS` and `KVM_GET_XSAVE`/`KVM_SET_XSAVE`.
//!
//! This host's KVM emulator runs XSETBV (so XCR0 is KVM's) but stops at these three; a
//! Linux guest that may use XSAVE needs all of them for its context switches.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xsave};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::operand::{Decoded, Segment};
use super::xsave_area::{self, Layout, AREA_ALIGN, KVM_XSAVE_BYTES};
use super::{Effect, Exception};
use crate::vcpu::guest_walk::{translate_access, DataAccess};

/// CR0 bit 3 TS (task switched: #NM on x87/SSE/XSAVE use) and bit 16 WP (SDM vol. 3A §2.5).
const CR0_TS: u64 = 1 << 3;
const CR0_WP: u64 = 1 << 16;
/// CR4 bit 12 LA57, bit 18 OSXSAVE, bit 21 SMAP (SDM vol. 3A §2.5).
const CR4_LA57: u64 = 1 << 12;
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_SMAP: u64 = 1 << 21;
/// RFLAGS bit 18 AC: with SMAP, supervisor accesses to user pages are allowed (§4.6.1).
const RFLAGS_AC: u64 = 1 << 18;
/// XCR0, the only XCR without XGETBV1 (SDM vol. 1 §13.3).
const XCR0: u32 = 0;
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

/// XGETBV: `regs` gets EDX:EAX = XCR0, the upper halves of RAX and RDX cleared.
pub fn xgetbv(fd: &VcpuFd, sregs: &kvm_sregs, regs: &mut kvm_regs) -> Result<Effect, XstateError> {
    if sregs.cr4 & CR4_OSXSAVE == 0 {
        return Ok(Effect::Fault(Exception::INVALID_OPCODE));
    }
    // ECX = 1 reads XINUSE, which exists only with XGETBV1; ibsvm's guests do not have it
    // (see `crate::host`), so only XCR0 is valid.
    if regs.rcx as u32 != XCR0 {
        return Ok(Effect::Fault(Exception::GENERAL_PROTECTION));
    }
    let value = xcr0(fd)?;
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

/// The general registers in ModRM encoding order.
fn gprs(r: &kvm_regs) -> [u64; 16] {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ]
}

/// XSAVE or XRSTOR of the area `insn` names, for the vCPU in `regs` and `sregs`.
pub fn transfer(
    fd: &VcpuFd,
    mem: &GuestMemoryMmap,
    layout: &Layout,
    (what, insn): (Transfer, &Decoded),
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Effect, XstateError> {
    let fault = |e| Ok(Effect::Fault(e));
    if sregs.cr4 & CR4_OSXSAVE == 0 {
        return fault(Exception::INVALID_OPCODE);
    }
    if sregs.cr0 & CR0_TS != 0 {
        return fault(Exception::DEVICE_NOT_AVAILABLE);
    }
    if sregs.cr4 & CR4_LA57 != 0 {
        return Err(XstateError::FiveLevelPaging);
    }
    let xcr0 = xcr0(fd)?;
    let rfbm = ((regs.rdx << 32) | (regs.rax & 0xffff_ffff)) & xcr0;
    let next_rip = regs.rip.wrapping_add(u64::from(insn.len));
    let base = match insn.mem.segment {
        Segment::Fs => sregs.fs.base,
        Segment::Gs => sregs.gs.base,
        Segment::Data | Segment::Stack => 0,
    };
    let linear = base.wrapping_add(insn.mem.effective(&gprs(regs), next_rip));
    let len = layout.area_len(rfbm) as u64;
    if !canonical(linear) || !canonical(linear.wrapping_add(len - 1)) {
        return fault(match insn.mem.segment {
            Segment::Stack => Exception::STACK_FAULT,
            _ => Exception::GENERAL_PROTECTION,
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
        write_protect: sregs.cr0 & CR0_WP != 0,
        smap: !user && sregs.cr4 & CR4_SMAP != 0 && regs.rflags & RFLAGS_AC == 0,
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
