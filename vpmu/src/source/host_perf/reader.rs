//! The reader thread of a host-perf source: waits on the event descriptors (each polls
//! readable after `wakeup_events` samples), reads every ring under the source's lock, and
//! calls the embedder's waker after it delivered a sample, outside the lock.
//!
//! It also waits on one end of a socket pair: the source writes a byte to it after it opened
//! an event (so the new descriptor joins the poll set), and closes it to stop the thread
//! (the reader sees end-of-file and returns). Nothing else stops or wakes it; it never
//! touches the events' enable state.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::backend::PerfControl;
use super::detect::HostPerfError;
use super::event::wait_readable;
use super::units::HostUnits;
use super::RingMemory;

/// Called after a sample was delivered, to make the vCPU thread look at the device's inbox
/// soon (e.g. kick it out of `KVM_RUN`). Called on the reader thread, never under a lock.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Lock the shared state. Every update under this lock leaves it consistent (no operation
/// panics half-way by design), so a poisoned lock is still used.
pub(crate) fn lock<E, R>(units: &Mutex<HostUnits<E, R>>) -> MutexGuard<'_, HostUnits<E, R>> {
    units
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running reader thread; stopped and joined on drop.
#[derive(Debug)]
pub(crate) struct ReaderThread {
    /// The source's end of the wake-up socket (`None` once closed, on drop).
    wake: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl ReaderThread {
    /// Start reading the rings of `units`.
    pub(crate) fn spawn<E, R>(
        units: Arc<Mutex<HostUnits<E, R>>>,
        waker: Waker,
    ) -> Result<ReaderThread, HostPerfError>
    where
        E: PerfControl + 'static,
        R: RingMemory + Send + 'static,
    {
        let err = |what| move |source| HostPerfError::Reader { what, source };
        let (wake, inbox) = UnixStream::pair().map_err(err("socket pair"))?;
        inbox.set_nonblocking(true).map_err(err("socket pair"))?;
        wake.set_nonblocking(true).map_err(err("socket pair"))?;
        let thread = std::thread::Builder::new()
            .name("ibs-host-reader".into())
            .spawn(move || run(&units, inbox, &waker))
            .map_err(err("spawn"))?;
        Ok(ReaderThread {
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Make the thread rebuild its poll set and read the rings now.
    pub(crate) fn wake(&self) {
        // A full socket (WouldBlock) already holds a wake-up the thread has not consumed.
        if let Some(mut wake) = self.wake.as_ref() {
            let _ = wake.write(&[1]);
        }
    }
}

impl Drop for ReaderThread {
    fn drop(&mut self) {
        // Closing our end makes the thread's poll return with end-of-file.
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the wake-up socket held.
enum Wakeup {
    /// Bytes, or nothing (the wake-up was for an event descriptor).
    Continue,
    /// End of file: the source is gone.
    Stop,
}

fn drain(inbox: &mut UnixStream) -> std::io::Result<Wakeup> {
    let mut buf = [0u8; 64];
    loop {
        match inbox.read(&mut buf) {
            Ok(0) => return Ok(Wakeup::Stop),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Wakeup::Continue),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn run<E: PerfControl, R: RingMemory>(
    units: &Mutex<HostUnits<E, R>>,
    mut inbox: UnixStream,
    waker: &Waker,
) {
    let fail = |what, source| lock(units).record(HostPerfError::Reader { what, source });
    loop {
        let mut fds = lock(units).wakeup_fds();
        fds.push(inbox.as_raw_fd());
        // The descriptors stay open while this thread runs: it holds the shared state that
        // owns the events.
        match wait_readable(&fds) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return fail("poll", e),
        }
        match drain(&mut inbox) {
            Ok(Wakeup::Stop) => return,
            Ok(Wakeup::Continue) => {}
            Err(e) => return fail("wake-up socket", e),
        }
        read_and_wake(units, waker);
    }
}

/// One pass over the rings; calls `waker` (outside the lock) if a sample was delivered.
/// Returns the number delivered.
pub(crate) fn read_and_wake<E: PerfControl, R: RingMemory>(
    units: &Mutex<HostUnits<E, R>>,
    waker: &Waker,
) -> usize {
    let delivered = lock(units).read();
    if delivered > 0 {
        waker();
    }
    delivered
}
