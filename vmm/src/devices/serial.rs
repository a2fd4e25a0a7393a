//! COM1: a 16550A UART (vm-superio) on the console — output to stdout, stdin to the guest.

use std::io::{self, Read, Stdout, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::{serial::SerialEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port and its eight registers (PC/AT convention).
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 interrupt line (ISA IRQ 4).
pub const COM1_IRQ: u32 = 4;

/// An interrupt line backed by an eventfd registered with KVM as an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the stdin subscriber that the guest drained the receive FIFO.
#[derive(Debug)]
pub struct RxSpace(pub EventFd);

impl SerialEvents for RxSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Best effort: if the eventfd counter is saturated a wake-up is already pending.
        let _ = self.0.write(1);
    }
}

/// Where the guest's console output goes: stdout, until writing it fails (a closed pipe,
/// a full disk). Then one warning, and the rest of the output is discarded: the guest keeps
/// running, and ibsvm does not warn once per byte.
#[derive(Debug)]
pub struct ConsoleOut<W> {
    out: W,
    failed: bool,
}

impl<W: Write> ConsoleOut<W> {
    fn new(out: W) -> Self {
        Self { out, failed: false }
    }

    /// Swallows `result`'s error after warning about the first one.
    fn keep_going<T>(&mut self, result: io::Result<T>, done: T) -> io::Result<T> {
        match result {
            Err(e) if !self.failed => {
                self.failed = true;
                log::warn!("console output: {e}; discarding the guest's further console output");
                Ok(done)
            }
            Err(_) => Ok(done),
            ok => ok,
        }
    }
}

impl<W: Write> Write for ConsoleOut<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Ok(buf.len());
        }
        let result = self.out.write(buf);
        self.keep_going(result, buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.failed {
            return Ok(());
        }
        let result = self.out.flush();
        self.keep_going(result, ())
    }
}

/// The console UART.
pub type ConsoleSerial = Serial<IrqLine, RxSpace, ConsoleOut<Stdout>>;

/// The UART shared between vCPU threads (register access) and the event loop (stdin).
pub type SharedSerial = Arc<Mutex<ConsoleSerial>>;

/// Creates the console UART; `irq` is the eventfd to register as COM1's irqfd.
pub fn console(irq: EventFd) -> io::Result<SharedSerial> {
    let rx_space = RxSpace(EventFd::new(libc::EFD_NONBLOCK)?);
    Ok(Arc::new(Mutex::new(Serial::with_events(
        IrqLine(irq),
        rx_space,
        ConsoleOut::new(io::stdout()),
    ))))
}

/// Forwards bytes from stdin to the guest's receive FIFO, pausing while the FIFO is full.
pub struct StdinForwarder {
    serial: SharedSerial,
    rx_space: EventFd,
    pending: Vec<u8>,
    reading: bool,
}

impl StdinForwarder {
    /// A forwarder for `serial`.
    pub fn new(serial: SharedSerial) -> io::Result<Self> {
        let rx_space = serial
            .lock()
            .map_err(|_| io::Error::other("serial lock poisoned"))?
            .events()
            .0
            .try_clone()?;
        Ok(Self {
            serial,
            rx_space,
            pending: Vec::new(),
            reading: true,
        })
    }

    /// Moves pending bytes into the FIFO; returns whether all fit.
    fn flush_pending(&mut self) -> bool {
        let Ok(mut serial) = self.serial.lock() else {
            return false;
        };
        if let Ok(n) = serial.enqueue_raw_bytes(&self.pending) {
            self.pending.drain(..n);
        }
        self.pending.is_empty()
    }

    fn stdin_events() -> Events {
        Events::new(&io::stdin(), EventSet::IN)
    }
}

impl MutEventSubscriber for StdinForwarder {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.rx_space.as_raw_fd() {
            let _ = self.rx_space.read();
        } else if events
            .event_set()
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            let mut buf = [0u8; 64];
            match io::stdin().lock().read(&mut buf) {
                Ok(0) | Err(_) => {
                    // EOF or a broken stdin: the guest keeps running without input.
                    let _ = ops.remove(Self::stdin_events());
                    self.reading = false;
                    return;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            }
        }
        let drained = self.flush_pending();
        if drained != self.reading {
            // Stop watching stdin while the FIFO is full; resume when the guest empties it.
            let result = if drained {
                ops.add(Self::stdin_events())
            } else {
                ops.remove(Self::stdin_events())
            };
            if result.is_ok() {
                self.reading = drained;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A regular file or a closed stdin cannot be polled: run without console input then.
        if ops.add(Self::stdin_events()).is_err() {
            log::debug!("stdin cannot be polled; the guest console gets no input");
            self.reading = false;
        }
        if let Err(e) = ops.add(Events::new(&self.rx_space, EventSet::IN)) {
            log::warn!("serial input flow control unavailable: {e}");
        }
    }
}

/// Flushes console output (called when the VM ends so that nothing is lost).
pub fn flush_console(serial: &SharedSerial) {
    if let Ok(mut s) = serial.lock() {
        let _ = s.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that fails every call and counts them.
    struct Broken(u32);

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            self.0 += 1;
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0 += 1;
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_failed_console_is_given_up_after_one_try() {
        let mut out = ConsoleOut::new(Broken(0));
        for _ in 0..100 {
            assert_eq!(out.write(b"x").unwrap(), 1);
        }
        out.flush().unwrap();
        assert_eq!(out.out.0, 1, "the broken stdout was written once");
    }
}
