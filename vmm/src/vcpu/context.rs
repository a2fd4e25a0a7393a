//! What the vCPU threads share with each other and with the main thread: the port-I/O
//! devices, interrupt delivery into the VM, the halt watch, the #PF trap the syscall bridge
//! chose, and how the VM ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::cpl0_emulation::syscall_bridge::PfTrap;
use super::halt::HaltWatch;
use super::VcpuError;
use crate::devices::PioDevices;
use crate::layout::LAPIC_BASE;
use crate::stop::GuestStop;

/// How a vCPU ended the VM.
#[derive(Debug)]
pub enum VmEnd {
    /// Because of the guest.
    Guest(GuestStop),
    /// Because ibsvm failed on that vCPU.
    Failed(VcpuError),
}

/// The state shared by the vCPU threads and the main thread (behind an `Arc`).
pub struct VcpuContext {
    vm: VmFd,
    devices: PioDevices,
    halt: HaltWatch,
    pf_trap: Mutex<Option<PfTrap>>,
    end: Mutex<Option<VmEnd>>,
    stopping: AtomicBool,
    /// Written when the VM starts stopping, so that the main thread's event loop wakes up.
    wake: EventFd,
}

impl VcpuContext {
    /// The context of a VM with `cpus` vCPUs.
    pub fn new(vm: VmFd, devices: PioDevices, cpus: usize) -> std::io::Result<Self> {
        Ok(Self {
            vm,
            devices,
            halt: HaltWatch::new(cpus),
            pf_trap: Mutex::new(None),
            end: Mutex::new(None),
            stopping: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The VM, to create its vCPUs.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The port-I/O devices.
    pub fn devices(&self) -> &PioDevices {
        &self.devices
    }

    /// Sends a fixed interrupt with `vector` to the local APIC `apic_id` (an MSI, Intel SDM
    /// vol. 3A §10.11: address 0xFEEx_x000 with the destination ID in bits 19:12, data =
    /// vector with fixed delivery, edge-triggered).
    pub fn send_fixed_interrupt(&self, apic_id: u8, vector: u8) -> Result<(), kvm_ioctls::Error> {
        let msi = kvm_msi {
            address_lo: (LAPIC_BASE as u32) | (u32::from(apic_id) << 12),
            data: u32::from(vector),
            ..Default::default()
        };
        self.vm.signal_msi(msi).map(drop)
    }

    /// The check for a guest that halted for good.
    pub fn halt_watch(&self) -> &HaltWatch {
        &self.halt
    }

    /// How the syscall bridge traps the guest's #PF entry (decided by the first vCPU).
    pub fn pf_trap(&self) -> &Mutex<Option<PfTrap>> {
        &self.pf_trap
    }

    /// A handle on the eventfd written when the VM starts stopping.
    pub fn wake_fd(&self) -> std::io::Result<EventFd> {
        self.wake.try_clone()
    }

    /// Whether the VM is ending.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Ends the VM because of the guest (the first end wins).
    pub fn stop(&self, stop: GuestStop) {
        self.end_with(Some(VmEnd::Guest(stop)));
    }

    /// Ends the VM because ibsvm failed on a vCPU (the first end wins).
    pub fn fail(&self, error: VcpuError) {
        self.end_with(Some(VmEnd::Failed(error)));
    }

    /// Stops the vCPUs for a reason the main thread keeps itself.
    pub fn request_stop(&self) {
        self.end_with(None);
    }

    /// How the vCPUs ended the VM, if they did.
    pub fn take_end(&self) -> Option<VmEnd> {
        self.end
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn end_with(&self, end: Option<VmEnd>) {
        if let Some(end) = end {
            // Nothing panics while holding this lock: a poisoned one still holds a sound value.
            let mut slot = self.end.lock().unwrap_or_else(PoisonError::into_inner);
            slot.get_or_insert(end);
        }
        self.stopping.store(true, Ordering::Release);
        // The main loop wakes up and kicks the other vCPUs.
        let _ = self.wake.write(1);
    }
}
