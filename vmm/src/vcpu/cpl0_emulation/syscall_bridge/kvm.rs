//! The syscall bridge's KVM side: writing LSTAR/SFMASK through, trapping the guest's #PF
//! entry, and completing SYSCALLs or resuming ordinary faults.

use kvm_bindings::{
    kvm_guest_debug, kvm_msr_entry, Msrs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::SyncReg;
use vm_memory::{Bytes, GuestAddress};

use super::{
    gate_target, plant_site, rflags_after_cld, ExceptionFrame, PfTrap, ENTRY_SCAN, IDT_GATE_SIZE,
    OPCODE_CLD, OPCODE_INT3,
};
use crate::vcpu::context::VcpuContext;
use crate::vcpu::guest_walk::{read_virt, translate};
use crate::vcpu::{Vcpu, VcpuError};
use crate::x86::vector;

impl Vcpu {
    /// Writes LSTAR/SFMASK through for the guest; once LSTAR is set, traps the #PF entry.
    pub(in crate::vcpu) fn syscall_msr(
        &mut self,
        context: &VcpuContext,
        index: u32,
        value: u64,
    ) -> Result<(), VcpuError> {
        let msr = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data: value,
            ..Default::default()
        }])
        .map_err(|_| VcpuError::MsrList { id: self.id })?;
        self.fd
            .set_msrs(&msr)
            .map_err(self.ioctl_err("KVM_SET_MSRS"))?;
        if !self.bridge.record_msr(index, value) {
            return Ok(());
        }
        let trap = {
            // Every vCPU shares the kernel's IDT: the first one to get here decides.
            let mut shared_trap = context.pf_trap().lock().map_err(|_| VcpuError::Poisoned {
                id: self.id,
                what: "#PF trap",
            })?;
            match *shared_trap {
                Some(trap) => trap,
                None => {
                    let trap = self.install_pf_trap()?;
                    log::info!("routing guest system calls through the #PF entry: {trap}");
                    *shared_trap.insert(trap)
                }
            }
        };
        self.bridge.trap = Some(trap);
        self.bridge.stepping = false;
        if let PfTrap::Breakpoint { .. } = trap {
            self.set_debug(false)?;
        }
        Ok(())
    }

    /// Finds the #PF entry from the IDT and plants `int3` on its `cld`, or falls back to a
    /// hardware breakpoint.
    fn install_pf_trap(&mut self) -> Result<PfTrap, VcpuError> {
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.ioctl_err("KVM_GET_SREGS"))?;
        let mut gate = [0u8; IDT_GATE_SIZE as usize];
        let gate_va = sregs.idt.base + u64::from(vector::PF) * IDT_GATE_SIZE;
        if read_virt(&self.mem, sregs.cr3, gate_va, &mut gate) != gate.len() {
            return Err(VcpuError::PfGateUnreadable {
                id: self.id,
                va: gate_va,
            });
        }
        let entry = gate_target(&gate);
        let mut code = [0u8; ENTRY_SCAN];
        let n = read_virt(&self.mem, sregs.cr3, entry, &mut code);
        let site = plant_site(&code[..n]).map(|off| entry + off as u64);
        if let Some(va) = site {
            if let Some(gpa) = translate(&self.mem, sregs.cr3, va) {
                let planted = self.mem.write_obj(OPCODE_INT3, GuestAddress(gpa));
                if planted.is_ok() {
                    debug_assert_eq!(code[(va - entry) as usize], OPCODE_CLD);
                    return Ok(PfTrap::Planted { va });
                }
            }
        }
        Ok(PfTrap::Breakpoint { va: entry })
    }

    /// Guest debug: the hardware breakpoint on the #PF entry, or one single step.
    fn set_debug(&mut self, single_step: bool) -> Result<(), VcpuError> {
        let mut dbg = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE,
            ..Default::default()
        };
        if single_step {
            dbg.control |= KVM_GUESTDBG_SINGLESTEP;
        } else if let Some(PfTrap::Breakpoint { va }) = self.bridge.trap {
            dbg.control |= KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[0] = va;
            // DR7 bit 0 L0: breakpoint 0 enabled; R/W0 = 00 and LEN0 = 00: instruction fetch
            // (SDM vol. 3B §17.2.4).
            dbg.arch.debugreg[7] = 1;
        }
        self.fd
            .set_guest_debug(&dbg)
            .map_err(self.ioctl_err("KVM_SET_GUEST_DEBUG"))
    }

    /// The #PF trap fired at `pc`: complete a SYSCALL, or let an ordinary fault go on.
    pub(in crate::vcpu) fn bridge_trap(&mut self, pc: u64) -> Result<(), VcpuError> {
        if self.bridge.stepping {
            // The single step over the entry's first instruction is done: re-arm.
            self.bridge.stepping = false;
            return self.set_debug(false);
        }
        let at_trap = match self.bridge.trap {
            Some(PfTrap::Planted { va } | PfTrap::Breakpoint { va }) => va == pc,
            None => false,
        };
        if !at_trap {
            return Err(VcpuError::StrayDebugExit { id: self.id, pc });
        }
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.ioctl_err("KVM_GET_SREGS"))?;
        let rsp = self.fd.sync_regs().regs.rsp;
        let mut bytes = [0u8; ExceptionFrame::SIZE];
        if read_virt(&self.mem, sregs.cr3, rsp, &mut bytes) != bytes.len() {
            return Err(VcpuError::PfFrameUnreadable { id: self.id, rsp });
        }
        if let Some(entry) = self.bridge.syscall_entry(&ExceptionFrame::parse(&bytes)) {
            let regs = &mut self.fd.sync_regs_mut().regs;
            (regs.rip, regs.rsp, regs.rflags) = (entry.rip, entry.rsp, entry.rflags);
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            self.counters.bump("syscall.routed");
            return Ok(());
        }
        self.counters.bump("syscall.pf_passed");
        match self.bridge.trap {
            Some(PfTrap::Planted { .. }) => {
                // Perform the `cld` the int3 replaced.
                let regs = &mut self.fd.sync_regs_mut().regs;
                regs.rflags = rflags_after_cld(regs.rflags);
                regs.rip = pc + 1;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                Ok(())
            }
            _ => {
                self.bridge.stepping = true;
                self.set_debug(true)
            }
        }
    }
}
