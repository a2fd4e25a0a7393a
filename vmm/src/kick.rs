//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets
//! `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost
//! (Documentation/virt/kvm/api.rst, "immediate_exit").

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::{Arc, OnceLock};

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, or null.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

/// The signal used for kicks.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is the mmapped kvm_run of this thread's vCPU; it is published
        // by `publish` and withdrawn by `withdraw` before the mapping goes away, and both run
        // on this thread, so it is valid here. A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), on_kick)
}

/// Makes this thread's kicks land on `run` until [`withdraw`].
pub fn publish(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

/// Stops kicks from touching this thread's `kvm_run`.
pub fn withdraw() {
    KVM_RUN.with(|c| c.set(null_mut()));
}

/// Sends a kick to the thread `thread`, which must be alive: a thread of a live
/// `JoinHandle` the caller owns, or a [`KickTarget`] used as its docs say.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill only sends a signal; the caller guarantees (see above) that the
    // thread id belongs to a live thread, so it has not been recycled.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// A thread to kick that is learned on that thread, for a waker made before the thread
/// exists (the host IBS source's, created with the vCPU on the main thread).
///
/// Kick it only while the bound thread is alive. The host IBS source's reader thread, its
/// only user, is stopped and joined when the source is dropped, which happens on the vCPU
/// thread it is bound to, before that thread ends.
#[derive(Clone, Debug, Default)]
pub struct KickTarget(Arc<OnceLock<libc::pthread_t>>);

impl KickTarget {
    /// Binds the target to the calling thread (the first call wins).
    pub fn bind_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions and cannot fail.
        self.0.get_or_init(|| unsafe { libc::pthread_self() });
    }

    /// Kicks the bound thread; nothing if none is bound yet.
    pub fn kick(&self) {
        if let Some(&thread) = self.0.get() {
            kick(thread);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_kick_target_reaches_the_thread_that_bound_it() {
        install_handler().unwrap();
        let target = KickTarget::default();
        target.kick(); // nobody bound yet: nothing happens
        let bound = target.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let vcpu = std::thread::spawn(move || {
            let mut run = kvm_run::default();
            publish(&mut run);
            bound.bind_current_thread();
            ready_tx.send(()).unwrap();
            let start = Instant::now();
            let flag = std::ptr::addr_of!(run.immediate_exit);
            // SAFETY: `flag` points into `run`, alive for this loop; the signal handler
            // writes it on this very thread, hence the volatile read.
            while unsafe { flag.read_volatile() } == 0 {
                assert!(start.elapsed() < Duration::from_secs(10), "no kick arrived");
                std::thread::sleep(Duration::from_millis(1));
            }
            withdraw();
        });
        ready_rx.recv().unwrap();
        target.kick();
        vcpu.join().unwrap();
    }
}
