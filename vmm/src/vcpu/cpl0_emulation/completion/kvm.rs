//! The completions applied to a vCPU: registers, the XSAVE area and exceptions through KVM.

use kvm_bindings::kvm_regs;
use kvm_ioctls::SyncReg;

use super::xstate::{self, Transfer, XstateError};
use super::{Completion, Effect, Exception};
use crate::vcpu::{Vcpu, VcpuError};
use iced_x86::Instruction;

impl Vcpu {
    /// Completes an instruction the emulator rejected (see [`completion`]).
    pub(in crate::vcpu) fn complete(&mut self, c: Completion) -> Result<(), VcpuError> {
        let mut regs = self.fd.sync_regs().regs;
        let effect = match c {
            Completion::Int3 => Effect::Trap(Exception::BREAKPOINT),
            Completion::Fwait | Completion::Fence => Effect::Retired,
            Completion::Xgetbv => {
                let sregs = self.sregs()?;
                xstate::xgetbv(&self.fd, &sregs, &mut regs).map_err(self.completion_err(c))?
            }
            Completion::Xsave(insn) => self.transfer(c, (Transfer::Save, &insn), &regs)?,
            Completion::Xrstor(insn) => self.transfer(c, (Transfer::Restore, &insn), &regs)?,
        };
        let raise = match effect {
            Effect::Retired => None,
            Effect::Trap(e) => Some(e),
            Effect::Fault(e) => {
                self.counters.bump("completed.faulted");
                return self.raise(e);
            }
        };
        regs.rip = regs.rip.wrapping_add(u64::from(c.length()));
        self.fd.sync_regs_mut().regs = regs;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        self.counters.bump(c.counter());
        raise.map_or(Ok(()), |e| self.raise(e))
    }

    /// XSAVE or XRSTOR `insn` (the completion `c`) for the registers `regs`.
    fn transfer(
        &self,
        c: Completion,
        insn: (Transfer, &Instruction),
        regs: &kvm_regs,
    ) -> Result<Effect, VcpuError> {
        let sregs = self.sregs()?;
        xstate::transfer(&self.fd, &self.mem, &self.xsave_layout, insn, regs, &sregs)
            .map_err(self.completion_err(c))
    }

    fn completion_err(&self, c: Completion) -> impl FnOnce(XstateError) -> VcpuError {
        let (id, insn, rip) = (self.id, c.counter(), self.rip());
        move |source| VcpuError::Completion {
            id,
            insn,
            rip,
            source,
        }
    }

    /// Delivers `e` at the next entry, with CR2 for a page fault.
    fn raise(&mut self, e: Exception) -> Result<(), VcpuError> {
        if let Some(cr2) = e.cr2 {
            let mut sregs = self.sregs()?;
            sregs.cr2 = cr2;
            self.fd
                .set_sregs(&sregs)
                .map_err(self.ioctl_err("KVM_SET_SREGS"))?;
        }
        // KVM_SET_VCPU_EVENTS always writes the interrupt and NMI state too: start from
        // the current state so that only the exception changes.
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(self.ioctl_err("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = e.vector;
        events.exception.has_error_code = u8::from(e.error_code.is_some());
        events.exception.error_code = e.error_code.unwrap_or(0);
        events.flags = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(self.ioctl_err("KVM_SET_VCPU_EVENTS"))
    }
}
