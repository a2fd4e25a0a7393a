//! One vCPU's virtual IBS: the `vpmu` device, its sample source, and the guest run-time
//! clock the synthetic source samples on (the vCPU loop stops the vCPU at the device's
//! deadlines; a host source's samples arrive through the device's inbox instead).

use vpmu::{
    is_vpmu_msr, Interrupt, NoGuestContext, RaceEvent, SamplePoint, SyntheticConfig,
    SyntheticError, SyntheticSource, Vpmu, VpmuConfig,
};

use super::source::IbsSource;
use super::{IbsBackend, IbsSettings};
use crate::stats::Counters;
use crate::vcpu::exit::MsrHandler;

/// Per-vCPU seed spread (the 64-bit golden ratio, as in SplitMix64).
const SEED_STRIDE: u64 = 0x9e37_79b9_7f4a_7c15;

/// The IBS state of one vCPU.
pub struct VcpuIbs {
    dev: Vpmu<IbsSource>,
    /// Nanoseconds this vCPU spent inside KVM_RUN: the synthetic source's clock.
    guest_ns: u64,
    /// The device's NMI was injected and the guest has not yet unmasked NMIs.
    nmi_in_service: bool,
    nmis_injected: u64,
    fixed_injected: u64,
    /// See [`VcpuIbs::account_run`]; 1 where KVM runs CPL0 code natively.
    cpl0_time_divisor: u64,
}

/// How much slower this host's KVM runs emulated CPL0 code than native code, roughly
/// (shared/docs/host-kvm.md: ~1.8 M emulated instructions/s against native ~0.2 ns per
/// loop iteration): the divisor [`VcpuIbs::account_run`] applies there.
pub const CPL0_EMULATION_SLOWDOWN: u64 = 1000;

impl VcpuIbs {
    /// The device for vCPU `id` with the synthetic source; `emulated_cpl0` when the host's
    /// KVM emulates CPL0 code.
    pub fn new(
        settings: &IbsSettings,
        id: u8,
        emulated_cpl0: bool,
    ) -> Result<Self, SyntheticError> {
        Self::for_backend(settings, &IbsBackend::Synthetic, id, emulated_cpl0)
    }

    /// The device for vCPU `id` with the source `backend` selected (not
    /// [`IbsBackend::Off`]: that is no device at all; it gets the synthetic source).
    pub fn for_backend(
        settings: &IbsSettings,
        backend: &IbsBackend,
        id: u8,
        emulated_cpl0: bool,
    ) -> Result<Self, SyntheticError> {
        let source = match backend {
            IbsBackend::Host(host) => IbsSource::host(*host, settings.caps),
            IbsBackend::Synthetic | IbsBackend::Off => {
                IbsSource::Synthetic(SyntheticSource::new(SyntheticConfig {
                    seed: settings.seed ^ SEED_STRIDE.wrapping_mul(u64::from(id) + 1),
                    ns_per_op: settings.ns_per_op,
                    ..SyntheticConfig::default()
                })?)
            }
        };
        let config = VpmuConfig {
            caps: settings.caps,
            policy: settings.policy,
            race_check: settings.race_check,
        };
        let mut dev = Vpmu::new(config, source);
        let sink = dev.sink();
        dev.source_mut().connect(sink);
        Ok(Self {
            dev,
            guest_ns: 0,
            nmi_in_service: false,
            nmis_injected: 0,
            fixed_injected: 0,
            cpl0_time_divisor: if emulated_cpl0 {
                CPL0_EMULATION_SLOWDOWN
            } else {
                1
            },
        })
    }

    /// How long (guest ns) until the source's next deadline, if it has one.
    pub fn deadline_in(&self) -> Option<u64> {
        self.dev
            .next_deadline()
            .map(|d| d.saturating_sub(self.guest_ns))
    }

    /// Adds one KVM_RUN of `ns` nanoseconds to the guest clock; `native` says whether the
    /// vCPU was at CPL3 when it entered and when it left.
    ///
    /// The synthetic source turns guest time into counted ops. Where KVM emulates CPL0 code
    /// (~0.5 µs an instruction instead of a fraction of a nanosecond), time spent in the
    /// kernel would otherwise buy thousands of times its share of samples, and a period the
    /// guest's NMI handler re-arms would expire inside that handler; such runs count
    /// `1/cpl0_time_divisor` of their time.
    pub fn account_run(&mut self, ns: u64, native: bool) {
        self.guest_ns += if native {
            ns
        } else {
            ns / self.cpl0_time_divisor
        };
    }

    /// After an exit: note an NMI return, take a sample if one is due at `rip`, and return
    /// the interrupt to inject now, if any.
    pub fn after_exit(&mut self, rip: u64, nmi_masked: bool) -> Option<Interrupt> {
        if self.nmi_in_service && !nmi_masked {
            self.nmi_in_service = false;
            self.dev.nmi_returned();
        }
        if self.dev.next_deadline().is_some_and(|d| self.guest_ns >= d) {
            self.dev.sample_point(SamplePoint {
                rip,
                guest_ns: self.guest_ns,
            });
        }
        // Samples a host source's reader delivered (it kicked this vCPU to get here).
        self.dev.poll_inbox();
        if let Some(e) = self.dev.source_mut().take_error() {
            log::warn!("{e}");
        }
        if self.dev.interrupt_pending() {
            return self.dev.take_interrupt();
        }
        None
    }

    /// The embedder injected `irq`.
    pub fn injected(&mut self, irq: Interrupt) {
        match irq {
            Interrupt::Nmi => {
                self.nmis_injected += 1;
                self.nmi_in_service = true;
                self.dev.nmi_injected();
            }
            Interrupt::Fixed { .. } => self.fixed_injected += 1,
        }
    }

    /// A race the device saw since the last call.
    pub fn take_race(&mut self) -> Option<RaceEvent> {
        self.dev.take_race()
    }

    /// Adds this vCPU's IBS counters to `counters`.
    pub fn add_counters(&self, counters: &mut Counters) {
        let s = self.dev.stats();
        for (name, value) in [
            ("ibs.msr_exits", s.msr_reads + s.msr_writes),
            ("ibs.msr_faults", s.faults),
            ("ibs.samples_latched", s.samples_latched),
            ("ibs.samples_delivered", s.samples_delivered),
            ("ibs.nmis_injected", self.nmis_injected),
            ("ibs.fixed_interrupts_injected", self.fixed_injected),
            ("ibs.dropped.unit_disabled", s.dropped_unit_disabled),
            ("ibs.dropped.val_set", s.dropped_val_set),
            ("ibs.dropped.stale_epoch", s.dropped_stale_epoch),
            ("ibs.dropped.inbox_full", s.dropped_inbox_full),
            ("ibs.dropped.lvt_masked", s.dropped_lvt_masked),
            ("ibs.dropped.undeliverable", s.dropped_undeliverable),
            ("ibs.dropped.nothing_latched", s.dropped_nothing_latched),
            ("ibs.stale_val_reads", s.stale_val_reads),
            ("ibs.races_detected", s.races_detected),
        ] {
            counters.add(name, value);
        }
        self.dev.source().add_counters(counters);
    }
}

impl MsrHandler for VcpuIbs {
    fn rdmsr(&mut self, index: u32) -> Option<Result<u64, ()>> {
        is_vpmu_msr(index).then(|| self.dev.rdmsr(index).map_err(|e| log::debug!("{e}")))
    }

    fn wrmsr(&mut self, index: u32, value: u64) -> Option<Result<(), ()>> {
        if !is_vpmu_msr(index) {
            return None;
        }
        // A period this write starts runs from now; a host source's kicks come here.
        self.dev.set_guest_time(self.guest_ns);
        self.dev.source().on_vcpu_thread();
        // In-NMI evidence for race detection is the device's own NMI still in service.
        Some(
            self.dev
                .wrmsr(index, value, &NoGuestContext)
                .map_err(|e| log::debug!("{e}")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Linux's op-unit sequence (spec §3), driven through the embedder glue.
    const IBS_OP_CTL: u32 = 0xc001_1033;
    const EILVT0: u32 = 0x850;
    const OP_EN: u64 = 1 << 17;
    const OP_VAL: u64 = 1 << 18;

    #[test]
    fn a_sample_becomes_one_nmi() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        assert_eq!(ibs.rdmsr(EILVT0), Some(Ok(0x10000)), "EILVT resets masked");
        assert_eq!(
            ibs.wrmsr(EILVT0, 0x400),
            Some(Ok(())),
            "unmasked, NMI message type"
        );
        assert_eq!(ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN), Some(Ok(())));
        assert_eq!(ibs.after_exit(0x40_1000, false), None, "no time has passed");
        ibs.account_run(10_000_000, true);
        assert_eq!(ibs.after_exit(0x40_1000, false), Some(Interrupt::Nmi));
        ibs.injected(Interrupt::Nmi);
        assert_eq!(ibs.after_exit(0x40_1000, true), None, "one NMI per sample");
        let ctl = ibs.rdmsr(IBS_OP_CTL).unwrap().unwrap();
        assert_eq!(ctl & (OP_EN | OP_VAL), OP_EN | OP_VAL);
        assert_eq!(
            ibs.rdmsr(0xc001_1034),
            Some(Ok(0x40_1000)),
            "OP_RIP is the guest RIP"
        );
        let mut c = Counters::default();
        ibs.add_counters(&mut c);
        assert_eq!(
            (c.get("ibs.samples_latched"), c.get("ibs.nmis_injected")),
            (1, 1)
        );
        assert!(c.get("ibs.msr_exits") >= 5);
    }

    #[test]
    fn periods_start_at_the_enabling_write() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        // 50 ms of guest time pass before the guest enables a 65 536-op (65.5 µs) period.
        ibs.account_run(50_000_000, true);
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        assert_eq!(
            ibs.after_exit(0x1234, false),
            None,
            "no sample at the enabling write"
        );
        ibs.account_run(65_536, true);
        assert_eq!(ibs.after_exit(0x40_2000, false), Some(Interrupt::Nmi));
        assert_eq!(ibs.rdmsr(0xc001_1034), Some(Ok(0x40_2000)));
    }

    #[test]
    fn emulated_kernel_time_counts_less() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 0, true).unwrap();
        ibs.wrmsr(EILVT0, 0x400);
        ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN);
        // 3 ms in an emulated NMI handler: 3 µs of the 65.5 µs period.
        ibs.account_run(3_000_000, false);
        assert_eq!(ibs.after_exit(0xffff_ffff_8100_0000, false), None);
        ibs.account_run(65_536, true);
        assert_eq!(ibs.after_exit(0x40_2000, false), Some(Interrupt::Nmi));
        assert_eq!(
            ibs.rdmsr(0xc001_1034),
            Some(Ok(0x40_2000)),
            "the sample is in user code"
        );
    }

    #[test]
    fn other_msrs_are_not_ours() {
        let mut ibs = VcpuIbs::new(&IbsSettings::default(), 1, false).unwrap();
        assert_eq!(ibs.rdmsr(0x10), None);
        assert_eq!(ibs.wrmsr(0xc000_0082, 1), None);
        assert_eq!(
            ibs.rdmsr(0xc001_103d),
            Some(Err(())),
            "OPDATA4 is never advertised: #GP"
        );
    }
}
