//! Noticing a guest that has halted for good: every vCPU in `HLT` with interrupts disabled.
//!
//! This VM has no ACPI, so a Linux guest has no way to power off: `poweroff -f` becomes a
//! halt (kernel/reboot.c turns `LINUX_REBOOT_CMD_POWER_OFF` into `..._HALT` when no power-off
//! handler is registered), which stops every CPU in `native_halt()` with interrupts off
//! (arch/x86/kernel/process.c `stop_this_cpu`). With the in-kernel irqchip, HLT never exits
//! to userspace, so without this the VMM would wait forever.
//!
//! A vCPU halted with RFLAGS.IF = 0 can only be woken by an NMI, INIT or SMI (Intel SDM
//! vol. 3A §10.4 / AMD APM vol. 2 §8.7 "HLT"). When every vCPU is in that state and none
//! has an NMI pending, nothing in this VM can wake any of them: the devices raise only
//! maskable interrupts, and the IBS sampler counts guest run time, which stops while
//! halted. The VM then ends as a power-off.
//!
//! The main thread starts a check round every [`CHECK_INTERVAL`] and kicks the vCPUs that
//! have not exited since the last round (a halted vCPU never does; one that exits is plainly
//! running, and an asynchronous exit costs the guest, see below); each kicked vCPU thread, at
//! its kick exit, reports whether it is halted that way ([`HaltWatch::report`]). A vCPU that
//! exits for any other reason is running. The VM is halted when every vCPU has
//! been seen halted in two consecutive rounds with no exit in between: a vCPU woken by
//! another's NMI just after it was seen halted is seen running at the next round's kick.
//!
//! Kicks are kept to quiet vCPUs because every kick is an exit at an arbitrary guest
//! instruction, and on CPL0-emulating hosts asynchronous exits make a host bug more likely
//! (guest-images/linux/README.md, "The pipeline crash, root-caused").

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the main thread checks for a halted guest.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// What a vCPU thread saw at one exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuActivity {
    /// In `HLT` (KVM_MP_STATE_HALTED) with RFLAGS.IF = 0 and no NMI pending.
    HaltedForGood,
    /// Anything else.
    Running,
}

/// One vCPU's reports.
#[derive(Debug, Default)]
struct Seen {
    /// The round since which it has been seen halted, or 0.
    halted_since: AtomicU64,
    /// The last round it reported in.
    round: AtomicU64,
    /// Exits other than kicks so far.
    exits: AtomicU64,
    /// `exits` when the current round started (written by the main thread only).
    exits_at_round: AtomicU64,
}

/// The VM-wide halt check (see the module docs).
#[derive(Debug)]
pub struct HaltWatch {
    /// The current check round, from 1.
    round: AtomicU64,
    vcpus: Vec<Seen>,
}

impl HaltWatch {
    /// A watch over `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self {
            round: AtomicU64::new(1),
            vcpus: (0..vcpus).map(|_| Seen::default()).collect(),
        }
    }

    /// Starts a new round; returns the vCPUs to kick: those with no exit since the last
    /// round started.
    pub fn next_round(&self) -> Vec<usize> {
        self.round.fetch_add(1, Ordering::AcqRel);
        self.vcpus
            .iter()
            .enumerate()
            .filter_map(|(id, v)| {
                let exits = v.exits.load(Ordering::Relaxed);
                let quiet = v.exits_at_round.swap(exits, Ordering::Relaxed) == exits;
                quiet.then_some(id)
            })
            .collect()
    }

    /// The current round: a vCPU checks its state at a kick once per round.
    pub fn round(&self) -> u64 {
        self.round.load(Ordering::Acquire)
    }

    /// Records what vCPU `id` saw; returns true when the whole VM is halted for good.
    pub fn report(&self, id: usize, activity: VcpuActivity) -> bool {
        let Some(seen) = self.vcpus.get(id) else {
            return false;
        };
        let round = self.round();
        seen.round.store(round, Ordering::Release);
        match activity {
            VcpuActivity::Running => {
                seen.halted_since.store(0, Ordering::Release);
                false
            }
            VcpuActivity::HaltedForGood => {
                // Keep the earliest round of an unbroken halt.
                let _ = seen.halted_since.compare_exchange(
                    0,
                    round,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                self.vcpus.iter().all(|s| {
                    let since = s.halted_since.load(Ordering::Acquire);
                    since != 0 && since < round && s.round.load(Ordering::Acquire) == round
                })
            }
        }
    }

    /// Marks vCPU `id` running, cheaply, at an exit that is not a kick.
    pub fn running(&self, id: usize) {
        if let Some(seen) = self.vcpus.get(id) {
            seen.exits.fetch_add(1, Ordering::Relaxed);
            if seen.halted_since.load(Ordering::Relaxed) != 0 {
                seen.halted_since.store(0, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VcpuActivity::*;

    #[test]
    fn two_rounds_of_every_vcpu_halted() {
        let w = HaltWatch::new(2);
        assert!(!w.report(0, HaltedForGood));
        assert!(!w.report(1, HaltedForGood), "one round is not enough");
        w.next_round();
        assert!(
            !w.report(0, HaltedForGood),
            "vCPU 1 not yet seen this round"
        );
        assert!(w.report(1, HaltedForGood));
    }

    #[test]
    fn any_sign_of_life_starts_over() {
        let w = HaltWatch::new(2);
        w.report(0, HaltedForGood);
        w.report(1, HaltedForGood);
        w.next_round();
        w.running(1); // an exit: vCPU 1 was woken (say by an NMI from vCPU 0)
        assert!(!w.report(0, HaltedForGood));
        assert!(!w.report(1, HaltedForGood));
        w.next_round();
        w.report(1, HaltedForGood);
        assert!(w.report(0, HaltedForGood));
        w.report(0, Running);
        w.next_round();
        assert!(!w.report(1, HaltedForGood), "vCPU 0 runs");
    }

    #[test]
    fn only_quiet_vcpus_are_kicked() {
        let w = HaltWatch::new(3);
        assert_eq!(w.next_round(), [0, 1, 2], "no exits yet");
        w.running(1);
        w.running(1);
        assert_eq!(w.next_round(), [0, 2], "vCPU 1 exited");
        assert_eq!(w.next_round(), [0, 1, 2], "and then did not");
    }

    #[test]
    fn one_vcpu_and_bad_ids() {
        let w = HaltWatch::new(1);
        assert!(!w.report(0, HaltedForGood));
        assert!(!w.report(7, HaltedForGood), "no such vCPU");
        w.running(7);
        w.next_round();
        assert!(w.report(0, HaltedForGood));
    }
}
