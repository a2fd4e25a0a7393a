//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets
//! `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost
//! (Documentation/virt/kvm/api.rst, "immediate_exit").

use std::cell::Cell;
use std::ptr::null_mut;

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

/// Sends a kick to the thread `thread`.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill only sends a signal; the thread id comes from a live JoinHandle
    // owned by the caller, so it has not been recycled.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}
