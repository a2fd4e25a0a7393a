//! The per-vCPU device: [`Vpmu`].
//!
//! The vCPU thread owns `&mut Vpmu` and calls it at MSR exits ([`Vpmu::rdmsr`],
//! [`Vpmu::wrmsr`]), at sample points ([`Vpmu::sample_point`], before which it arranges to
//! stop the vCPU at [`Vpmu::next_deadline`]), and right before it re-enters the guest
//! ([`Vpmu::take_interrupt`], then it injects what it got). Other threads only ever touch the
//! [`SampleSink`] of [`Vpmu::sink`].

use crate::apic::{ApicError, ExtApic, Interrupt, LvtRoute};
use crate::caps::Caps;
use crate::msr::{
    is_ext_apic_msr, is_ibs_msr, msr_name, FETCH_RAND_EN, IBS_CTL, IBS_CTL_LVT_OFFSET_VALID,
    IBS_FETCH_CTL, IBS_LVT_OFFSET, IBS_OP_CTL,
};
use crate::policy::{GuestContext, NmiEvidence, Policy, RaceCheck, RaceEvent};
use crate::source::synthetic::SyntheticSource;
use crate::source::{Arm, Inbox, Sample, SamplePoint, SampleSink, SampleSource};
use crate::state::{StateError, UnitState, VpmuState};
use crate::stats::{DropReason, Stats};
use crate::unit::{Unit, UnitKind};

/// Why an MSR access faults. Every variant means: inject #GP into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsrError {
    /// An IBS MSR the advertised caps do not make exist (or one never advertised).
    #[error("MSR {index:#x} ({name}) does not exist with IBS caps {caps:#x}")]
    NotAdvertised {
        /// The MSR.
        index: u32,
        /// Its name.
        name: &'static str,
        /// The advertised caps.
        caps: u32,
    },
    /// A write sets bits that are reserved for the advertised caps.
    #[error("MSR {index:#x} ({name}): write {value:#x} sets reserved bits {reserved:#x}")]
    Reserved {
        /// The MSR.
        index: u32,
        /// Its name.
        name: &'static str,
        /// The value written.
        value: u64,
        /// The reserved bits that were set.
        reserved: u64,
    },
    /// A write to IBS_CTL. The register is read-only on hardware (AMD PPRs list
    /// MSRC001_103A as read-only) and Linux only reads it (ibs.c `get_ibs_lvt_offset`), so
    /// this device answers a write with #GP rather than silently ignoring it.
    #[error("MSR {index:#x} (IBS_CTL) is read-only")]
    ReadOnly {
        /// The MSR.
        index: u32,
    },
    /// An extended-APIC MSR access faults.
    #[error(transparent)]
    Apic(#[from] ApicError),
    /// Not an MSR of this device (see [`crate::is_vpmu_msr`]).
    #[error("MSR {index:#x} is not handled by the vpmu")]
    NotVpmu {
        /// The MSR.
        index: u32,
    },
}

/// When the interrupt of a sample forced by [`Vpmu::force_sample`] is raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ForcedIrq {
    /// At once, as for any sample: the embedder injects it before the guest's next
    /// instruction.
    Now,
    /// After the guest's next write of the unit's CTL (re-checked then, like every
    /// interrupt): the sample landed while the guest's stop path was between reading CTL and
    /// writing it back, and the NMI arrives after the write — the hardware timing that leaves
    /// {Val = 1, En = 0} behind in an unpatched Linux ([device model §4](crate::device_model)).
    AfterCtlWrite,
}

/// Why [`Vpmu::force_sample`] latched nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForceError {
    /// The unit is not counting: En = 0, or Val = 1 with its interrupt already taken.
    #[error("the {0} unit is not counting (En=0, or Val=1 already signalled)")]
    NotCounting(UnitKind),
    /// The sample source cannot end a period on request (e.g. host IBS).
    #[error("the sample source cannot force a {0} sample")]
    Unsupported(UnitKind),
}

/// Per-VM settings of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VpmuConfig {
    /// The advertised capability word (also what [`crate::patch_cpuid`] should get).
    pub caps: Caps,
    /// Who owns Val (default [`Policy::Protect`]).
    pub policy: Policy,
    /// Race detection, effective only under [`Policy::Faithful`].
    pub race_check: RaceCheck,
}

/// A source may return at most this many samples from one sample point (one per unit is
/// what a well-behaved source does; the bound only protects against a looping source).
const MAX_POLLS_PER_POINT: usize = 4;

/// The virtual IBS PMU of one vCPU.
#[derive(Debug)]
pub struct Vpmu<S = SyntheticSource> {
    config: VpmuConfig,
    units: [Unit; 2],
    apic: ExtApic,
    inbox: Inbox,
    source: S,
    irq_pending: bool,
    nmi_in_service: bool,
    race: Option<RaceEvent>,
    stats: Stats,
    /// Set only inside [`Vpmu::force_sample`]: the unit whose latch holds its interrupt.
    hold_irq: Option<UnitKind>,
}

fn ctl_unit(index: u32) -> Option<UnitKind> {
    match index {
        IBS_FETCH_CTL => Some(UnitKind::Fetch),
        IBS_OP_CTL => Some(UnitKind::Op),
        _ => None,
    }
}

fn name(index: u32) -> &'static str {
    msr_name(index).unwrap_or("reserved")
}

/// What a sample point or an inbox poll did: the samples it latched, and whether an
/// interrupt is pending — a new one, or one deferred earlier (then call
/// [`Vpmu::take_interrupt`] when the guest can take it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Latched {
    /// Samples latched just now (at most one per unit).
    pub samples: u32,
    /// An interrupt is pending.
    pub interrupt_pending: bool,
}

impl<S: SampleSource> Vpmu<S> {
    /// A device in its reset state (both units off, EILVTs masked).
    pub fn new(config: VpmuConfig, source: S) -> Vpmu<S> {
        Vpmu {
            config,
            units: [Unit::new(UnitKind::Fetch), Unit::new(UnitKind::Op)],
            apic: ExtApic::default(),
            inbox: Inbox::default(),
            source,
            irq_pending: false,
            nmi_in_service: false,
            race: None,
            stats: Stats::default(),
            hold_irq: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &VpmuConfig {
        &self.config
    }

    /// The sample source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The sample source, mutably (e.g. to hand it a [`SampleSink`]).
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// A handle through which other threads deliver samples.
    pub fn sink(&self) -> SampleSink {
        self.inbox.sink()
    }

    /// Guest RDMSR of a device MSR. `Err` means inject #GP.
    pub fn rdmsr(&mut self, index: u32) -> Result<u64, MsrError> {
        self.stats.msr_reads += 1;
        let result = self.read(index);
        if result.is_err() {
            self.stats.faults += 1;
        }
        result
    }

    /// Guest WRMSR of a device MSR. `Err` means inject #GP (and nothing was changed).
    /// `ctx` is asked whether the vCPU is in an NMI handler only when that decides a race
    /// report (see [`Vpmu::take_race`]); pass [`crate::NoGuestContext`] if unknown.
    pub fn wrmsr(
        &mut self,
        index: u32,
        value: u64,
        ctx: &dyn GuestContext,
    ) -> Result<(), MsrError> {
        self.stats.msr_writes += 1;
        let result = self.write(index, value, ctx);
        if result.is_err() {
            self.stats.faults += 1;
        }
        result
    }

    fn read(&mut self, index: u32) -> Result<u64, MsrError> {
        let caps = self.config.caps;
        if index == IBS_CTL {
            // IBS_CTL: LvtOffsetVal | offset (DEVICE.md §3, §5.1).
            return Ok(IBS_CTL_LVT_OFFSET_VALID | IBS_LVT_OFFSET as u64);
        }
        if let Some(kind) = ctl_unit(index) {
            let (value, stale) = self.units[kind.index()].read_ctl();
            if stale {
                self.stats.stale_val_reads += 1;
            }
            return Ok(value);
        }
        if let Some(reg) = UnitKind::data_reg(index, caps) {
            // PHYSADDR slots are never written, so they read 0 (DEVICE.md §5.4).
            return Ok(self.units[reg.unit.index()].data[reg.slot]);
        }
        if is_ibs_msr(index) {
            return Err(self.not_advertised(index));
        }
        if is_ext_apic_msr(index) {
            return Ok(self.apic.read(index)?);
        }
        Err(MsrError::NotVpmu { index })
    }

    fn write(&mut self, index: u32, value: u64, ctx: &dyn GuestContext) -> Result<(), MsrError> {
        let caps = self.config.caps;
        if index == IBS_CTL {
            return Err(MsrError::ReadOnly { index });
        }
        if let Some(kind) = ctl_unit(index) {
            return self.write_ctl(kind, value, ctx);
        }
        if let Some(reg) = UnitKind::data_reg(index, caps) {
            let reserved = value & !reg.writable;
            if reserved != 0 {
                return Err(MsrError::Reserved {
                    index,
                    name: name(index),
                    value,
                    reserved,
                });
            }
            self.units[reg.unit.index()].data[reg.slot] = value & !reg.ignored;
            return Ok(());
        }
        if is_ibs_msr(index) {
            return Err(self.not_advertised(index));
        }
        if is_ext_apic_msr(index) {
            return Ok(self.apic.write(index, value)?);
        }
        Err(MsrError::NotVpmu { index })
    }

    fn not_advertised(&self, index: u32) -> MsrError {
        MsrError::NotAdvertised {
            index,
            name: name(index),
            caps: self.config.caps.bits(),
        }
    }

    fn write_ctl(
        &mut self,
        kind: UnitKind,
        value: u64,
        ctx: &dyn GuestContext,
    ) -> Result<(), MsrError> {
        let reserved = value & !kind.ctl_writable(self.config.caps);
        if reserved != 0 {
            let index = kind.ctl_msr();
            return Err(MsrError::Reserved {
                index,
                name: name(index),
                value,
                reserved,
            });
        }
        self.check_race(kind, value, ctx);
        if value & kind.val() != 0 && value & kind.en() == 0 {
            self.stats.val_written_back += 1;
        }
        let mut stored = value & !kind.ctl_ignored();
        if self.config.policy == Policy::Protect {
            // DEVICE.md §5.8: Val is owned by the device.
            stored &= !kind.val();
        }
        let unit = &mut self.units[kind.index()];
        let change = unit.write_ctl(stored);
        if unit.counting() {
            self.start(kind);
        } else if change.was_counting {
            let reason = unit.idle_reason();
            self.stop(kind, reason);
        }
        if change.released_irq {
            self.request_interrupt();
        }
        Ok(())
    }

    /// [Device model §5.9](crate::device_model): in faithful mode, an enable written from an
    /// NMI handler right after a read that presented a Val the device had not latched is a
    /// guest hitting the race.
    fn check_race(&mut self, kind: UnitKind, value: u64, ctx: &dyn GuestContext) {
        let check = self.config.race_check;
        if self.config.policy != Policy::Faithful
            || check == RaceCheck::Off
            || value & kind.en() == 0
        {
            return;
        }
        let Some(stale_ctl) = self.units[kind.index()].stale_read else {
            return;
        };
        let evidence = if self.nmi_in_service {
            NmiEvidence::DeviceNmi
        } else if ctx.in_nmi() {
            NmiEvidence::GuestContext
        } else {
            return;
        };
        self.stats.races_detected += 1;
        // Keep the first unreported event; the counter has them all.
        self.race.get_or_insert(RaceEvent {
            unit: kind,
            stale_ctl,
            written_ctl: value,
            evidence,
            fatal: check == RaceCheck::Fail,
        });
    }

    /// The unit starts counting ([device model §5.7](crate::device_model),
    /// clear-before-start). Its latched sample was already dropped by the CTL write that got
    /// here; now (1) drop every in-flight sample of earlier armings by opening a new epoch in
    /// the inbox, (2) mark the unit armed with that epoch, (3) arm the source.
    fn start(&mut self, kind: UnitKind) {
        let epoch = self.inbox.open(kind);
        let unit = &mut self.units[kind.index()];
        unit.epoch = epoch;
        let caps = self.config.caps;
        let arm = Arm {
            unit: kind,
            epoch,
            ctl: unit.ctl,
            max_count: kind.max_count(unit.ctl, caps),
            start_count: kind.start_count(unit.ctl),
            rand_en: kind == UnitKind::Fetch && unit.ctl & FETCH_RAND_EN != 0,
        };
        self.source.arm(&arm);
    }

    /// The unit stops counting: refuse and drop its in-flight samples, disarm the source.
    fn stop(&mut self, kind: UnitKind, reason: DropReason) {
        self.inbox.close(kind, reason);
        self.source.disarm(kind);
    }

    /// Tells the source the vCPU's current guest run time (ns, the clock of
    /// [`SamplePoint::guest_ns`]). Call it before [`Vpmu::wrmsr`] so that a period the
    /// write starts is measured from the write.
    pub fn set_guest_time(&mut self, guest_ns: u64) {
        self.source.set_guest_time(guest_ns);
    }

    /// Guest time (ns) at which the source wants a sample point; the embedder should make the
    /// vCPU exit by then (e.g. a timer that kicks it) and call [`Vpmu::sample_point`].
    pub fn next_deadline(&self) -> Option<u64> {
        self.source.next_deadline()
    }

    /// Latch samples other threads delivered through the [`SampleSink`].
    pub fn poll_inbox(&mut self) -> Latched {
        let mut latched = 0;
        for sample in self.inbox.drain().into_iter().flatten() {
            latched += u32::from(self.accept(sample));
        }
        self.latched(latched)
    }

    /// A sample point: the vCPU is stopped at `at` (call it at or after
    /// [`Vpmu::next_deadline`], and whenever else convenient). Latches due samples, from the
    /// inbox and the source.
    pub fn sample_point(&mut self, at: SamplePoint) -> Latched {
        let mut latched = self.poll_inbox().samples;
        for _ in 0..MAX_POLLS_PER_POINT {
            match self.source.poll(&at) {
                Some(sample) => latched += u32::from(self.accept(sample)),
                None => break,
            }
        }
        self.latched(latched)
    }

    fn latched(&self, samples: u32) -> Latched {
        Latched {
            samples,
            interrupt_pending: self.irq_pending,
        }
    }

    /// Latches `sample` if its unit takes it (else counts the drop); returns whether it did.
    fn accept(&mut self, sample: Sample) -> bool {
        let kind = sample.unit();
        let unit = &mut self.units[kind.index()];
        match unit.latch(&sample, self.config.caps) {
            Err(reason) => {
                self.stats.record_drop(reason);
                false
            }
            Ok(()) => {
                self.stats.samples_latched += 1;
                let hold = self.hold_irq == Some(kind);
                unit.irq_held = hold;
                self.stop(kind, DropReason::ValSet);
                if !hold {
                    self.request_interrupt();
                }
                true
            }
        }
    }

    /// Test hook for reproducing the Linux IBS race on purpose (ibsvm's race test kernel
    /// asks for it through an I/O port): the counting `unit`'s period runs out now, at `at`,
    /// so its sample latches at once (with whatever else is due), and its interrupt is
    /// raised as `irq` says. Hardware offers no such thing; everything after the latch —
    /// Val, the interrupt re-check, race detection — is the device's ordinary behaviour.
    ///
    /// If the unit already holds a latched sample whose interrupt was not taken yet (its
    /// period ran out on its own just before), that sample serves: with
    /// [`ForcedIrq::AfterCtlWrite`] its interrupt is held instead, so the guest's next CTL
    /// read still finds it whatever the timing.
    pub fn force_sample(
        &mut self,
        unit: UnitKind,
        at: SamplePoint,
        irq: ForcedIrq,
    ) -> Result<(), ForceError> {
        let u = &mut self.units[unit.index()];
        if u.latched && !u.notified {
            u.irq_held |= irq == ForcedIrq::AfterCtlWrite;
            self.stats.forced_samples += 1;
            return Ok(());
        }
        if !u.counting() {
            return Err(ForceError::NotCounting(unit));
        }
        self.source.set_guest_time(at.guest_ns);
        if !self.source.expire(unit) {
            return Err(ForceError::Unsupported(unit));
        }
        self.hold_irq = (irq == ForcedIrq::AfterCtlWrite).then_some(unit);
        self.sample_point(at);
        self.hold_irq = None;
        self.stats.forced_samples += 1;
        Ok(())
    }

    /// Val went 0 → 1: raise one request if the LVT lets it through
    /// ([device model §5.2, §5.6](crate::device_model)).
    fn request_interrupt(&mut self) {
        match self.apic.route(IBS_LVT_OFFSET) {
            LvtRoute::Masked => self.stats.record_drop(DropReason::LvtMasked),
            LvtRoute::Undeliverable => self.stats.record_drop(DropReason::Undeliverable),
            LvtRoute::Deliver(_) => {
                if !self.irq_pending {
                    self.irq_pending = true;
                    self.stats.interrupts_requested += 1;
                }
            }
        }
    }

    /// True when an interrupt request is pending.
    pub fn interrupt_pending(&self) -> bool {
        self.irq_pending
    }

    /// Call right before injecting: consumes the pending request and re-checks it (spec
    /// §5.6). `None` if nothing is pending, no unit still holds a latched sample that was not
    /// yet signalled, or the LVT entry is masked or undeliverable now; otherwise the interrupt
    /// to inject (an NMI: then report [`Vpmu::nmi_injected`] once it is injected).
    pub fn take_interrupt(&mut self) -> Option<Interrupt> {
        if !std::mem::take(&mut self.irq_pending) {
            return None;
        }
        let waiting = self
            .units
            .iter()
            .filter(|u| u.latched && !u.notified && !u.irq_held)
            .count() as u64;
        if waiting == 0 {
            self.stats.record_drop(DropReason::NothingLatched);
            return None;
        }
        let irq = match self.apic.route(IBS_LVT_OFFSET) {
            LvtRoute::Deliver(irq) => irq,
            LvtRoute::Masked => {
                self.stats.record_drop(DropReason::LvtMasked);
                return None;
            }
            LvtRoute::Undeliverable => {
                self.stats.record_drop(DropReason::Undeliverable);
                return None;
            }
        };
        for unit in self.units.iter_mut().filter(|u| u.latched && !u.irq_held) {
            unit.notified = true;
        }
        self.stats.samples_delivered += waiting;
        self.stats.interrupts_taken += 1;
        Some(irq)
    }

    /// The embedder injected the device's NMI: until [`Vpmu::nmi_returned`], race detection
    /// treats the vCPU as inside an NMI handler.
    pub fn nmi_injected(&mut self) {
        self.nmi_in_service = true;
    }

    /// The guest returned from the device's NMI (e.g. the embedder saw NMIs unmasked again).
    pub fn nmi_returned(&mut self) {
        self.nmi_in_service = false;
    }

    /// The first race detected since the last call ([device model §5.9](crate::device_model));
    /// log it, and stop the VM if [`RaceEvent::fatal`]. [`Stats::races_detected`] counts them
    /// all.
    pub fn take_race(&mut self) -> Option<RaceEvent> {
        self.race.take()
    }

    /// The counters, including samples dropped by the cross-thread inbox.
    pub fn stats(&self) -> Stats {
        self.stats + self.inbox.drops()
    }

    /// vCPU reset (power-on or INIT): both units off and cleared, EILVTs masked, nothing
    /// pending. Counters are kept.
    pub fn reset(&mut self) {
        for kind in UnitKind::ALL {
            self.units[kind.index()] = Unit::new(kind);
            self.stop(kind, DropReason::UnitDisabled);
        }
        self.apic = ExtApic::default();
        self.irq_pending = false;
        self.nmi_in_service = false;
        self.race = None;
    }

    /// Snapshot the vCPU's IBS state.
    pub fn save_state(&self) -> VpmuState {
        let unit = |k: UnitKind| {
            let u = &self.units[k.index()];
            UnitState {
                ctl: u.ctl,
                data: u.data,
                latched: u.latched,
                notified: u.notified,
                irq_held: u.irq_held,
            }
        };
        VpmuState {
            caps: self.config.caps.bits(),
            fetch: unit(UnitKind::Fetch),
            op: unit(UnitKind::Op),
            ectrl: self.apic.ectrl,
            eilvt: self.apic.eilvt,
            interrupt_pending: self.irq_pending,
            nmi_in_service: self.nmi_in_service,
        }
    }

    /// Restore a snapshot after validating it against this device's settings; on error the
    /// device is unchanged. Counting units are re-armed with fresh epochs, so samples of the
    /// pre-restore armings are never latched.
    pub fn restore_state(&mut self, state: &VpmuState) -> Result<(), StateError> {
        state.validate(&self.config)?;
        for kind in UnitKind::ALL {
            let s = state.unit(kind);
            let unit = &mut self.units[kind.index()];
            *unit = Unit::new(kind);
            unit.ctl = s.ctl;
            unit.data = s.data;
            unit.latched = s.latched;
            unit.notified = s.notified;
            unit.irq_held = s.irq_held;
            if unit.counting() {
                self.start(kind);
            } else {
                let reason = unit.idle_reason();
                self.stop(kind, reason);
            }
        }
        self.apic = ExtApic {
            ectrl: state.ectrl,
            eilvt: state.eilvt,
        };
        self.irq_pending = state.interrupt_pending;
        self.nmi_in_service = state.nmi_in_service;
        self.race = None;
        Ok(())
    }
}

impl Default for Vpmu<SyntheticSource> {
    /// Default settings with the default synthetic source.
    fn default() -> Self {
        Vpmu::new(VpmuConfig::default(), SyntheticSource::default())
    }
}

#[cfg(test)]
mod tests;
