//! Devices: the traits the exit dispatch sees them through ([`PortIo`] for the VM's port-I/O
//! devices, [`VcpuDevices`] for a vCPU's own), and the VM's port-I/O devices: COM1, the i8042
//! reset line, the test-exit port, and what a PC answers on ports nobody implements.

pub mod serial;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vm_superio::{I8042Device, Trigger};

use crate::stop::GuestStop;
use serial::{SharedSerial, COM1_BASE};

/// Port I/O devices as seen by dispatch.
pub trait PortIo {
    /// Fills `data` for an IN from `port`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// Handles an OUT to `port`; may end the VM.
    fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestStop>;
}

/// A vCPU's own emulated devices: MSRs emulated in userspace, and ports whose meaning
/// depends on the vCPU that accesses them. They see an access before the VM's [`PortIo`].
pub trait VcpuDevices {
    /// RDMSR: `Some(Ok(value))`, `Some(Err(()))` for an architectural #GP, `None` if unowned
    /// (the guest gets #GP).
    fn rdmsr(&mut self, index: u32) -> Option<Result<u64, ()>>;
    /// WRMSR: `Some(Ok(()))`, `Some(Err(()))` for #GP, `None` if unowned (#GP).
    fn wrmsr(&mut self, index: u32, value: u64) -> Option<Result<(), ()>>;
    /// IN: fills `data` and returns true if the port is this vCPU's.
    fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        let _ = (port, data);
        false
    }
    /// OUT: returns true if the port is this vCPU's.
    fn pio_write(&mut self, port: u16, data: &[u8]) -> bool {
        let _ = (port, data);
        false
    }
}

/// The devices of a vCPU without any: every MSR that reaches userspace is one KVM would
/// have refused, so the guest gets #GP; every port goes to the VM's devices.
pub struct NoVcpuDevices;

impl VcpuDevices for NoVcpuDevices {
    fn rdmsr(&mut self, _: u32) -> Option<Result<u64, ()>> {
        None
    }
    fn wrmsr(&mut self, _: u32, _: u64) -> Option<Result<(), ()>> {
        None
    }
}

/// The test-exit port: a write of `v` ends the VM with exit status `v & 0xff`.
pub const TEST_EXIT_PORT: u16 = 0xf4;
/// i8042 data port (offset 0 of vm-superio's device).
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port (offset 4; 0xFE = pulse the CPU reset line).
pub const I8042_COMMAND: u16 = 0x64;
/// CMOS/RTC index and data ports: read as 0 so that RTC probes give up at once.
pub const CMOS_PORTS: [u16; 2] = [0x70, 0x71];

/// Latches the i8042 "reset CPU" request for the vCPU that made it.
#[derive(Debug, Default)]
pub struct ResetLatch(AtomicBool);

impl Trigger for ResetLatch {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// All port-I/O devices of a VM.
pub struct PioDevices {
    serial: SharedSerial,
    i8042: Mutex<I8042Device<ResetLatch>>,
}

impl PioDevices {
    /// Devices around the console UART.
    pub fn new(serial: SharedSerial) -> Self {
        Self {
            serial,
            i8042: Mutex::new(I8042Device::new(ResetLatch::default())),
        }
    }

    /// The console UART.
    pub fn serial(&self) -> &SharedSerial {
        &self.serial
    }
}

/// The little-endian value of an OUT of 1, 2 or 4 bytes.
fn out_value(data: &[u8]) -> u32 {
    data.iter().rev().fold(0, |v, b| (v << 8) | u32::from(*b))
}

impl PortIo for PioDevices {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => {
                if let Ok(mut s) = self.serial.lock() {
                    data[0] = s.read((port - COM1_BASE) as u8);
                }
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => {
                if let Ok(mut k) = self.i8042.lock() {
                    data[0] = k.read((port - I8042_DATA) as u8);
                }
            }
            p if CMOS_PORTS.contains(&p) => data.fill(0),
            // Nothing decodes the port: the bus floats high.
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestStop> {
        match port {
            TEST_EXIT_PORT => return Some(GuestStop::TestExit(out_value(data) as u8)),
            COM1_BASE..=0x3ff if data.len() == 1 => {
                if let Ok(mut s) = self.serial.lock() {
                    if let Err(e) = s.write((port - COM1_BASE) as u8, data[0]) {
                        log::warn!("COM1 write to port {port:#x}: {e:?}");
                    }
                }
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => {
                let mut k = self.i8042.lock().ok()?;
                let _ = k.write((port - I8042_DATA) as u8, data[0]);
                if k.reset_evt().0.swap(false, Ordering::SeqCst) {
                    return Some(GuestStop::Reset("i8042 reset line"));
                }
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn devices() -> PioDevices {
        PioDevices::new(serial::console(EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap())
    }

    #[test]
    fn test_exit_takes_the_low_byte() {
        let d = devices();
        assert_eq!(
            d.pio_write(TEST_EXIT_PORT, &[0]),
            Some(GuestStop::TestExit(0))
        );
        assert_eq!(
            d.pio_write(TEST_EXIT_PORT, &[0x34, 0x12, 0, 0]),
            Some(GuestStop::TestExit(0x34))
        );
        assert_eq!(
            d.pio_write(TEST_EXIT_PORT, &[0x01, 0x02]),
            Some(GuestStop::TestExit(1))
        );
    }

    #[test]
    fn i8042_reset_ends_the_vm() {
        let d = devices();
        assert_eq!(d.pio_write(I8042_COMMAND, &[0x20]), None);
        assert!(matches!(
            d.pio_write(I8042_COMMAND, &[0xfe]),
            Some(GuestStop::Reset(_))
        ));
    }

    #[test]
    fn unclaimed_ports_float_high_and_cmos_reads_zero() {
        let d = devices();
        let mut b = [0u8; 1];
        d.pio_read(0x2f8, &mut b);
        assert_eq!(b, [0xff]);
        d.pio_read(0x71, &mut b);
        assert_eq!(b, [0]);
        // The UART's line status register reports an empty transmitter.
        d.pio_read(COM1_BASE + 5, &mut b);
        assert_eq!(b[0] & 0x20, 0x20);
    }
}
