//! The sample source of a vCPU's virtual IBS: ibsvm's synthetic sampler, or the host's IBS
//! through perf (`--ibs host`, or `auto` on a host that has it).

use std::sync::Arc;

use vpmu::source::host_perf::{HostIbs, HostPerfError, HostPerfSource, IbsOpener, Waker};
use vpmu::{Arm, Caps, Sample, SamplePoint, SampleSink, SampleSource, SyntheticSource, UnitKind};

use crate::kick::KickTarget;
use crate::stats::Counters;

/// Where one vCPU's samples come from.
pub enum IbsSource {
    /// Sampled by ibsvm at sample points the vCPU loop stops at.
    Synthetic(SyntheticSource),
    /// Taken by the host's IBS while the vCPU thread runs the guest; a reader thread
    /// delivers them to the device's inbox and kicks `vcpu`.
    Host {
        /// The source.
        source: HostPerfSource<IbsOpener>,
        /// The vCPU thread its reader kicks after a delivery.
        vcpu: KickTarget,
    },
}

impl IbsSource {
    /// A host source for a device advertising `guest_caps`. Its events are opened on the
    /// vCPU thread when the guest first enables a unit.
    pub fn host(host: HostIbs, guest_caps: Caps) -> IbsSource {
        let vcpu = KickTarget::default();
        let target = vcpu.clone();
        let waker: Waker = Arc::new(move || target.kick());
        IbsSource::Host {
            source: HostPerfSource::new(IbsOpener::new(host), guest_caps, waker),
            vcpu,
        }
    }

    /// Hands the source its device's sink (a host source delivers there).
    pub fn connect(&mut self, sink: SampleSink) {
        if let IbsSource::Host { source, .. } = self {
            source.connect(sink);
        }
    }

    /// Call on the vCPU thread before an MSR write can arm the source: kicks after a
    /// delivery go to this thread.
    pub fn on_vcpu_thread(&self) {
        if let IbsSource::Host { vcpu, .. } = self {
            vcpu.bind_current_thread();
        }
    }

    /// The host source's latest error (opening an event, an ioctl, its reader), to log.
    pub fn take_error(&mut self) -> Option<HostPerfError> {
        match self {
            IbsSource::Host { source, .. } => source.take_error(),
            IbsSource::Synthetic(_) => None,
        }
    }

    /// Adds the host source's counters (`ibs.host.*`) to `counters`; nothing for synthetic.
    pub fn add_counters(&self, counters: &mut Counters) {
        let IbsSource::Host { source, .. } = self else {
            return;
        };
        let s = source.stats();
        let (r, c) = (s.rings, s.source);
        for (name, value) in [
            ("ibs.host.guest_samples", r.guest_samples),
            ("ibs.host.samples_delivered", c.delivered),
            ("ibs.host.samples_rejected", c.rejected),
            ("ibs.host.samples_unclaimed", c.unclaimed),
            ("ibs.host.host_samples_dropped", r.host_samples_dropped),
            ("ibs.host.decode_errors", r.decode_errors),
            ("ibs.host.lost", r.lost),
            ("ibs.host.throttles", r.throttles),
            ("ibs.host.unthrottles", r.unthrottles),
            ("ibs.host.discarded_bytes", r.discarded_bytes),
            ("ibs.host.corrupt_rings", r.corrupt),
            ("ibs.host.events_opened", c.events_opened),
            ("ibs.host.unbacked_armings", c.unbacked_armings),
            ("ibs.host.config_bits_dropped", c.config_bits_dropped),
            ("ibs.host.errors", c.errors),
        ] {
            counters.add(name, value);
        }
    }
}

impl IbsSource {
    fn inner(&self) -> &dyn SampleSource {
        match self {
            IbsSource::Synthetic(s) => s,
            IbsSource::Host { source, .. } => source,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn SampleSource {
        match self {
            IbsSource::Synthetic(s) => s,
            IbsSource::Host { source, .. } => source,
        }
    }
}

impl SampleSource for IbsSource {
    fn arm(&mut self, arm: &Arm) {
        self.inner_mut().arm(arm);
    }
    fn disarm(&mut self, unit: UnitKind) {
        self.inner_mut().disarm(unit);
    }
    fn next_deadline(&self) -> Option<u64> {
        self.inner().next_deadline()
    }
    fn poll(&mut self, at: &SamplePoint) -> Option<Sample> {
        self.inner_mut().poll(at)
    }
    fn set_guest_time(&mut self, guest_ns: u64) {
        self.inner_mut().set_guest_time(guest_ns);
    }
    fn expire(&mut self, unit: UnitKind) -> bool {
        self.inner_mut().expire(unit)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vpmu::source::host_perf::IbsPmus;

    use super::*;
    use crate::devices::VcpuDevices;
    use crate::ibs::vcpu::{ExitState, VcpuIbs};
    use crate::ibs::{IbsBackend, IbsSettings};

    const IBS_OP_CTL: u32 = 0xc001_1033;
    const EILVT0: u32 = 0x850;
    const OP_EN: u64 = 1 << 17;

    /// A vCPU whose "host IBS" is the software PMU (type 1): config 0 is cpu-clock, so the
    /// real events, ioctls, ring and reader thread run here; every sample is host-mode.
    fn vcpu_with_host_pmu(pmu_type: u32) -> VcpuIbs {
        let host = HostIbs {
            pmus: IbsPmus {
                fetch: pmu_type,
                op: pmu_type,
            },
            caps: 0x7,
        };
        let mut ibs =
            VcpuIbs::for_backend(&IbsSettings::default(), &IbsBackend::Host(host), 0, false)
                .unwrap();
        assert_eq!(ibs.wrmsr(EILVT0, 0x400), Some(Ok(())));
        ibs
    }

    fn counters(ibs: &VcpuIbs) -> Counters {
        let mut c = Counters::default();
        ibs.add_counters(&mut c);
        c
    }

    #[test]
    fn host_source_wiring_with_a_software_event() {
        let mut ibs = vcpu_with_host_pmu(1);
        assert_eq!(counters(&ibs).get("ibs.host.events_opened"), 0);
        // MaxCnt 0x1000: a cpu-clock period of 65.5 µs of this thread's CPU time.
        assert_eq!(ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN), Some(Ok(())));
        let start = Instant::now();
        let mut x = 0u64;
        while counters(&ibs).get("ibs.host.host_samples_dropped") < 10 {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no samples");
        }
        assert_eq!(
            ibs.after_exit(ExitState {
                rip: 0x1000,
                nmi_blocked: false,
                kicked: true,
                user_mode: true,
            }),
            None,
            "host-mode samples never reach the guest"
        );
        let c = counters(&ibs);
        assert_eq!(c.get("ibs.host.events_opened"), 1);
        assert_eq!(c.get("ibs.host.samples_delivered"), 0);
        assert_eq!(c.get("ibs.host.errors"), 0);
        assert_eq!(c.get("ibs.samples_latched"), 0);
    }

    #[test]
    fn host_source_errors_are_counted_and_taken_once() {
        // A PMU type no kernel has: the open at the guest's first enable fails.
        let mut ibs = vcpu_with_host_pmu(0x7FFF_FFF0);
        assert_eq!(
            ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN),
            Some(Ok(())),
            "no #GP for the guest"
        );
        assert_eq!(
            ibs.after_exit(ExitState {
                rip: 0x1000,
                nmi_blocked: false,
                kicked: true,
                user_mode: true,
            }),
            None
        ); // logs the error
        assert_eq!(counters(&ibs).get("ibs.host.errors"), 1);
        // The failed config is not reopened on the next enable.
        assert_eq!(ibs.wrmsr(IBS_OP_CTL, 0x1000), Some(Ok(())));
        assert_eq!(ibs.wrmsr(IBS_OP_CTL, 0x1000 | OP_EN), Some(Ok(())));
        let c = counters(&ibs);
        assert_eq!(
            (c.get("ibs.host.errors"), c.get("ibs.host.unbacked_armings")),
            (1, 1)
        );
    }

    #[test]
    fn the_synthetic_source_adds_no_host_counters() {
        let ibs = VcpuIbs::new(&IbsSettings::default(), 0, false).unwrap();
        let report = crate::stats::RunStats {
            exits: counters(&ibs),
            wall: Duration::ZERO,
            guest_tsc_khz: 0,
        }
        .to_string();
        assert!(report.contains("ibs.msr_exits"), "{report}");
        assert!(!report.contains("ibs.host."), "{report}");
    }
}
