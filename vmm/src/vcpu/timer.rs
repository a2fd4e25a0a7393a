//! A per-vCPU-thread timer that kicks the thread out of `KVM_RUN` at a deadline (the
//! virtual IBS sampler's next sample point): a POSIX timer delivering the kick signal to
//! this thread only (`SIGEV_THREAD_ID`, timer_create(2)).

use std::io;

use crate::kick::kick_signal;

/// The timer; created on, and bound to, the calling thread.
pub struct KickTimer {
    id: libc::timer_t,
    armed: bool,
}

// SAFETY: a timer_t is a kernel timer id; it is only used through the timer_* calls, which
// may be made from any thread. The kick still goes to the thread it was created for.
unsafe impl Send for KickTimer {}

impl KickTimer {
    /// A disarmed timer whose expiry kicks the calling thread.
    pub fn for_this_thread() -> io::Result<Self> {
        // SAFETY: sigevent is plain data; an all-zero value is valid and every field we rely
        // on is set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: sev and id are valid for the call; the kernel writes the new timer id.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { id, armed: false })
    }

    fn settime(&mut self, ns: u64) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as i64,
                tv_nsec: (ns % 1_000_000_000) as i64,
            },
        };
        // SAFETY: the timer id is live (deleted only in Drop) and spec is a valid itimerspec.
        if unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = ns != 0;
        Ok(())
    }

    /// Fires once, `ns` nanoseconds from now (at least 1 ns).
    pub fn arm_in(&mut self, ns: u64) -> io::Result<()> {
        self.settime(ns.max(1))
    }

    /// Cancels a pending expiry.
    pub fn disarm(&mut self) -> io::Result<()> {
        if self.armed {
            self.settime(0)?;
        }
        Ok(())
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: the id came from timer_create and is deleted exactly once.
        unsafe {
            libc::timer_delete(self.id);
        }
    }
}
