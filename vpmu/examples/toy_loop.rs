//! Drive the virtual IBS device from a toy vCPU loop, without KVM.
//!
//! The "guest" is a few lines playing Linux's IBS driver
//! ([device model §3](vpmu::device_model)): it programs the extended LVT, enables op sampling,
//! and its NMI handler reads each sample and re-arms the unit. The "VMM" loop runs the guest
//! in time slices, stops at the device's deadlines, feeds sample points with the guest RIP,
//! and injects the interrupts the device hands back.
//!
//! Run: `cargo run -p vpmu --example toy_loop`

use std::error::Error;

use vpmu::msr::{IBS_CTL, IBS_OP_CTL, IBS_OP_RIP, OP_EN, OP_VAL, X2APIC_EILVT0};
use vpmu::{
    patch_cpuid, Caps, CpuidEntry, Interrupt, NoGuestContext, SamplePoint, SyntheticConfig,
    SyntheticSource, Vpmu, VpmuConfig,
};

/// Guest op sampling period 0x10000 ops: MaxCnt = period / 16.
const OP_CONFIG: u64 = 0x10000 >> 4;
/// The toy vCPU runs in slices of this much guest time between exits.
const SLICE_NS: u64 = 50_000;

fn main() -> Result<(), Box<dyn Error>> {
    let ctx = &NoGuestContext;
    let caps: Caps = "zen3".parse()?;

    // VMM: CPUID for the vCPU (a Milan host: family 0x19 model 0x01).
    let mut cpuid = vec![CpuidEntry {
        function: 1,
        eax: 0x00A0_0F11,
        ..CpuidEntry::default()
    }];
    let patch = patch_cpuid(&mut cpuid, caps);
    println!(
        "cpuid: IBS caps {caps}, family/model change {:?}",
        patch.family_model
    );

    let source = SyntheticSource::new(SyntheticConfig {
        seed: 1,
        ..SyntheticConfig::default()
    })?;
    let mut vpmu = Vpmu::new(
        VpmuConfig {
            caps,
            ..VpmuConfig::default()
        },
        source,
    );

    // Guest: Linux IBS init — IBS_CTL, then the EILVT entry: reserve masked, unmask as NMI.
    let ibs_ctl = vpmu.rdmsr(IBS_CTL)?;
    println!(
        "guest: IBS_CTL = {ibs_ctl:#x}, EILVT0 = {:#x}",
        vpmu.rdmsr(X2APIC_EILVT0)?
    );
    vpmu.wrmsr(X2APIC_EILVT0, 0x0001_0400, ctx)?;
    vpmu.wrmsr(X2APIC_EILVT0, 0x0000_0400, ctx)?;

    // Guest: perf_ibs_start (patched kernel): clear, then enable.
    vpmu.wrmsr(IBS_OP_CTL, 0, ctx)?;
    vpmu.wrmsr(IBS_OP_CTL, OP_CONFIG | OP_EN, ctx)?;

    let mut guest_ns = 0u64;
    let mut rip = 0xFFFF_FFFF_8100_0000u64;
    for _ in 0..40 {
        // VMM: run the vCPU until its slice ends or the device's deadline, whichever is first.
        let slice_end = guest_ns + SLICE_NS;
        guest_ns = vpmu.next_deadline().map_or(slice_end, |d| d.min(slice_end));
        rip = rip.wrapping_add(0x40 + (guest_ns % 0x1C0)); // the toy guest "executes"

        // VMM: sample point, then take and inject the interrupt right before re-entry.
        if !vpmu
            .sample_point(SamplePoint { rip, guest_ns })
            .interrupt_pending
        {
            continue;
        }
        let Some(irq) = vpmu.take_interrupt() else {
            continue;
        };
        if irq == Interrupt::Nmi {
            vpmu.nmi_injected();
        }

        // Guest: IBS NMI handler — read the sample, re-arm.
        let ctl = vpmu.rdmsr(IBS_OP_CTL)?;
        if ctl & OP_VAL != 0 {
            let sample_rip = vpmu.rdmsr(IBS_OP_RIP)?;
            println!("t={guest_ns:>8} ns  {irq:?}  IBS_OP_CTL={ctl:#018x}  OP_RIP={sample_rip:#x}");
            vpmu.wrmsr(IBS_OP_CTL, OP_CONFIG | OP_EN, ctx)?;
        }
        vpmu.nmi_returned();
    }

    // Guest: perf_ibs_stop — read, write back without En.
    let ctl = vpmu.rdmsr(IBS_OP_CTL)?;
    vpmu.wrmsr(IBS_OP_CTL, ctl & !OP_EN, ctx)?;

    println!("{:#?}", vpmu.stats());
    Ok(())
}
