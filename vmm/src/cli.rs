//! The command line: `ibsvm run --kernel PATH [options]`, parsed by clap.
//!
//! clap checks the syntax and each value; [`parse`] then refuses the combinations that
//! cannot work together, as clap errors too, so every usage error looks the same and
//! exits with status 2.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::boot::BootSpec;
use crate::ibs::{IbsMode, IbsSettings};
use crate::vm::{QuirkMode, TscScale, VmConfig};

/// What the command line asks for.
#[derive(Debug, Clone)]
pub enum Command {
    /// Boot a guest.
    Run {
        /// The VM.
        config: VmConfig,
        /// `--stats`.
        stats: bool,
    },
}

const AFTER_HELP: &str = "\
The console is COM1 (ttyS0) on stdin/stdout. A guest ends the VM by writing a byte to I/O \
port 0xf4. With virtual IBS, I/O port 0xf5 is ibsvm's IBS test port, which lets a test \
kernel place IBS NMIs exactly (docs/ibs-race.md).

Kernel and initrd must be regular files, and a kernel's headers must describe what the \
file holds (ELF PT_LOAD segments in the file, in RAM above 1 MiB, not overlapping, the entry \
in code; a bzImage's setup and payload sizes), else one error line names the field before \
the guest runs. Only paths may be other than UTF-8. If writing the console fails (a closed \
pipe), ibsvm warns once and discards the rest of the guest's console output.

Exit status: the byte the guest wrote to port 0xf4; 0 after a guest reset, or once every \
vCPU sits in HLT with interrupts disabled (Linux's halt, and its power-off on this VM, which \
has no ACPI); 120 if the guest crashed (diagnostic on stderr); 121 if --ibs-race-check fail \
caught the guest in the IBS race; 130 or 143 if SIGINT or SIGTERM stopped the VM (--stats \
and --guest-profile are still written; a second signal ends ibsvm at once); 1 if ibsvm \
failed; 2 usage error.";

/// ibsvm: a KVM virtual machine monitor whose guests get a virtual AMD IBS PMU.
#[derive(Debug, Parser)]
#[command(name = "ibsvm", version, propagate_version = true, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Boot a guest: a Linux kernel or any 64-bit kernel image, with virtual IBS.
    #[command(after_help = AFTER_HELP)]
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Kernel: ELF vmlinux (64-bit entry) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line. Without it a Linux kernel gets what this VM needs, "console=ttyS0
    /// pci=off acpi=off reboot=k panic=-1" (console on COM1, no PCI, no ACPI, reboot through
    /// the i8042, exit on panic); other kernels get an empty line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<OsString>,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(crate::boot::mptable::MAX_CPUS)))]
    cpus: u8,
    /// When the VM ends, print exit counts and wall time to stderr.
    #[arg(long)]
    stats: bool,
    /// Sample each vCPU's RIP every millisecond of its run time and write `vcpu rip` lines
    /// to PATH when the VM ends (symbolize a Linux guest with
    /// guest-images/linux/profile.py).
    #[arg(long, value_name = "PATH")]
    guest_profile: Option<PathBuf>,
    /// Tell a Linux guest its TSC runs N times faster than it does (appends
    /// tsc_early_khz): timer interrupts, the tick included, then fire N times later in wall
    /// time while kvm-clock keeps the time right; guest sleeps last N times longer. On
    /// CPL0-emulating hosts an emulated tick costs about a tick period, so `auto` is 10
    /// there for a Linux kernel (logged) and 1 (off) everywhere else.
    #[arg(long, value_name = "N|auto", default_value = "auto", value_parser = parse_tsc_scale)]
    linux_tsc_scale: TscScale,
    /// On hosts whose KVM emulates guest CPL0 code: hide CPUID CX16, complete
    /// int3/fwait/fences and xgetbv/xsave/xrstor, route system calls, and append to a Linux
    /// guest's command line the parameters it needs there and those that keep its boot
    /// short (docs/boot-time.md; logged; a parameter you give keeps your value).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = QuirkMode::Auto)]
    cpl0_quirks: QuirkMode,

    /// Where guest IBS samples come from. auto: the host's IBS when ibsvm can use it, else
    /// synthetic (one line says which, and why). off: no IBS in CPUID, IBS MSRs #GP.
    /// synthetic: ibsvm samples the vCPU itself (any host). host: the host's IBS through
    /// perf (AMD with ibs_op/ibs_fetch PMUs, Linux 6.2+, perf_event_paranoid <= 1 or
    /// CAP_PERFMON; docs/host-ibs.md); without them ibsvm stops at start-up and says what
    /// is missing.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = IbsMode::Auto,
          help_heading = "Virtual IBS (AMD Instruction-Based Sampling)")]
    ibs: IbsMode,
    /// Capabilities advertised in CPUID Fn8000_001B: a profile (old = 0x1f, zen2/zen3 =
    /// 0x3ff, zen4 = 0xbff) or a hex word [default: zen3].
    #[arg(
        long,
        value_name = "CAPS",
        help_heading = "Virtual IBS (AMD Instruction-Based Sampling)"
    )]
    ibs_caps: Option<vpmu::Caps>,
    /// protect|faithful [default: protect]. protect: a guest write to a CTL never leaves Val
    /// set, so a guest without Linux fix 1b044ff3c17e can never see a stale IbsOpVal.
    /// faithful: a written Val is kept, as hardware does (reproduces the race).
    #[arg(
        long,
        value_name = "POLICY",
        help_heading = "Virtual IBS (AMD Instruction-Based Sampling)"
    )]
    ibs_policy: Option<vpmu::Policy>,
    /// off|warn|fail [default: off]: report a guest enabling a unit from its NMI handler
    /// after reading a stale Val; fail ends the VM with status 121. With --ibs-policy
    /// faithful it catches the race; with protect (the default, logged) it checks that the
    /// protection holds, and stays silent.
    #[arg(
        long,
        value_name = "MODE",
        help_heading = "Virtual IBS (AMD Instruction-Based Sampling)"
    )]
    ibs_race_check: Option<vpmu::RaceCheck>,
    /// Seed of the synthetic sampler (deterministic samples); decimal or 0x-hex.
    #[arg(long, value_name = "N", value_parser = parse_u64,
          help_heading = "Virtual IBS (AMD Instruction-Based Sampling)")]
    ibs_seed: Option<u64>,
    /// Synthetic sampler: guest nanoseconds per counted op or cycle [default: 1.0]. A period
    /// of MaxCnt*16 ops lasts that many ns of guest run time: the vCPU thread's CPU time in
    /// KVM_RUN, less the host's cost of exits, those the guest's own instructions caused and
    /// those KVM handled itself; on CPL0-emulating hosts, time the vCPU spends in emulated
    /// kernel code counts 1/1000.
    #[arg(long, value_name = "NS", value_parser = parse_scale,
          help_heading = "Virtual IBS (AMD Instruction-Based Sampling)")]
    ibs_scale: Option<f64>,

    /// Trap MSR INDEX to ibsvm and answer it with no device at all (reads 0, writes
    /// ignored): the baseline of `make bench`. Not the IBS or extended-APIC MSRs, nor those
    /// ibsvm relies on (APIC_BASE, x2APIC, EFER, LSTAR, SFMASK, HWCR).
    #[arg(long, value_name = "INDEX", value_parser = parse_null_msr, help_heading = "Benchmarking")]
    null_msr: Option<u32>,
}

fn parse_tsc_scale(text: &str) -> Result<TscScale, String> {
    if text == "auto" {
        return Ok(TscScale::Auto);
    }
    text.parse::<u32>()
        .ok()
        .filter(|n| (1..=100).contains(n))
        .map(TscScale::Fixed)
        .ok_or_else(|| "expected auto or 1..=100".into())
}

/// A decimal or 0x-prefixed hexadecimal number.
fn parse_u64(text: &str) -> Result<u64, String> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|_| "expected a decimal or 0x-prefixed hex number".into())
}

fn parse_scale(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x > 0.0)
        .ok_or_else(|| "expected guest nanoseconds per op, > 0".into())
}

fn parse_null_msr(text: &str) -> Result<u32, String> {
    let index = parse_u64(text)
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| !vpmu::is_vpmu_msr(*n))
        .ok_or("expected an MSR index outside the IBS and extended-APIC MSRs")?;
    match crate::x86::msr::relied_on(index) {
        Some(why) => Err(format!("ibsvm relies on this MSR: {why}")),
        None => Ok(index),
    }
}

/// Parses the arguments after the program name (`std::env::args_os().skip(1)`: paths need
/// not be UTF-8). `--help` and `--version` come back as errors of kind
/// [`ErrorKind::DisplayHelp`] and [`ErrorKind::DisplayVersion`]: print them and exit with
/// their [`clap::Error::exit_code`], as for every other error.
pub fn parse<I>(args: I) -> Result<Command, clap::Error>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let argv = std::iter::once(OsString::from("ibsvm")).chain(args.into_iter().map(Into::into));
    let Sub::Run(run) = Cli::try_parse_from(argv)?.command;
    run.into_command()
}

impl RunArgs {
    fn into_command(self) -> Result<Command, clap::Error> {
        if self.ibs == IbsMode::Off {
            let given = [
                ("--ibs-caps", self.ibs_caps.is_some()),
                ("--ibs-policy", self.ibs_policy.is_some()),
                ("--ibs-race-check", self.ibs_race_check.is_some()),
                ("--ibs-seed", self.ibs_seed.is_some()),
                ("--ibs-scale", self.ibs_scale.is_some()),
            ];
            if let Some((flag, _)) = given.into_iter().find(|(_, given)| *given) {
                return Err(Cli::command().error(
                    ErrorKind::ArgumentConflict,
                    format!("`{flag}` cannot be used with `--ibs off`: there is no virtual IBS to configure"),
                ));
            }
        }
        let defaults = IbsSettings::default();
        let ibs = IbsSettings {
            mode: self.ibs,
            caps: self.ibs_caps.unwrap_or(defaults.caps),
            policy: self.ibs_policy.unwrap_or(defaults.policy),
            race_check: self.ibs_race_check.unwrap_or(defaults.race_check),
            seed: self.ibs_seed.unwrap_or(defaults.seed),
            ns_per_op: self.ibs_scale.unwrap_or(defaults.ns_per_op),
        };
        // Taken as bytes so that the error can name the option (clap's would not).
        let cmdline = self
            .cmdline
            .map(|c| {
                c.into_string().map_err(|c| {
                    Cli::command().error(
                        ErrorKind::InvalidUtf8,
                        format!(
                            "invalid value '{}' for '--cmdline': not valid UTF-8",
                            c.to_string_lossy()
                        ),
                    )
                })
            })
            .transpose()?;
        let boot = BootSpec {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline,
            memory_mib: self.memory,
            cpus: self.cpus,
        };
        Ok(Command::Run {
            config: VmConfig {
                boot,
                quirks: self.cpl0_quirks,
                ibs,
                guest_profile: self.guest_profile,
                linux_tsc_scale: self.linux_tsc_scale,
                null_msr: self.null_msr,
            },
            stats: self.stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    use super::*;
    use crate::vm::DEFAULT_LINUX_CMDLINE;

    fn p(args: &[&str]) -> Result<Command, clap::Error> {
        parse(args.iter().map(|s| s.to_string()))
    }

    fn config(args: &[&str]) -> VmConfig {
        let mut all = vec!["run", "--kernel", "k"];
        all.extend_from_slice(args);
        match p(&all) {
            Ok(Command::Run { config, .. }) => config,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    /// clap's kinds for a value not among the choices, and one a parser refused.
    fn invalid_value(kind: ErrorKind) -> bool {
        matches!(kind, ErrorKind::InvalidValue | ErrorKind::ValueValidation)
    }

    fn kind(args: &[&str]) -> ErrorKind {
        let mut all = vec!["run", "--kernel", "k"];
        all.extend_from_slice(args);
        p(&all).expect_err(&format!("{args:?}")).kind()
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_shows_the_default_linux_command_line() {
        let mut run = Cli::command();
        let help = run
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        // Wrapped to the terminal width: compare words.
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(words(&help).contains(DEFAULT_LINUX_CMDLINE), "{help}");
    }

    #[test]
    fn run_with_defaults() {
        let Command::Run { config, stats } = p(&["run", "--kernel", "k"]).unwrap();
        assert_eq!(config.boot.kernel, PathBuf::from("k"));
        assert_eq!(
            (config.boot.memory_mib, config.boot.cpus, stats),
            (256, 1, false)
        );
        assert_eq!(config.quirks, QuirkMode::Auto);
        assert!(config.boot.initrd.is_none() && config.boot.cmdline.is_none());
        assert_eq!(config.linux_tsc_scale, TscScale::Auto);
        assert_eq!((config.guest_profile, config.null_msr), (None, None));
        assert_eq!(config.ibs, IbsSettings::default());
    }

    #[test]
    fn ibs_options_need_ibs() {
        for flag in [
            "--ibs-caps=zen4",
            "--ibs-policy=faithful",
            "--ibs-race-check=warn",
            "--ibs-seed=1",
            "--ibs-scale=2",
        ] {
            let err = p(&["run", "--kernel", "k", "--ibs", "off", flag]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ArgumentConflict, "{flag}: {err}");
            let name = flag.split('=').next().unwrap();
            assert!(err.to_string().contains(name), "{flag}: {err}");
        }
        assert_eq!(config(&["--ibs", "off"]).ibs.mode, IbsMode::Off);
    }

    #[test]
    fn paths_need_not_be_utf8_but_everything_else_must() {
        let bad = || OsString::from(OsStr::from_bytes(b"\xff.elf"));
        let os = |s: &str| OsString::from(s);
        let Ok(Command::Run { config, .. }) = parse(vec![os("run"), os("--kernel"), bad()]) else {
            panic!("a non-UTF-8 kernel path")
        };
        assert_eq!(config.boot.kernel.as_os_str().as_bytes(), b"\xff.elf");
        let inline = OsString::from(OsStr::from_bytes(b"--initrd=\xff"));
        assert!(parse(vec![os("run"), os("--kernel"), os("k"), inline]).is_ok());
        let cmdline = parse(vec![
            os("run"),
            os("--kernel"),
            os("k"),
            os("--cmdline"),
            bad(),
        ]);
        let err = cmdline.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidUtf8);
        assert!(err.to_string().contains("'--cmdline'"), "{err}");
        assert!(parse(vec![bad()]).is_err());
        assert!(parse(vec![os("run"), bad()]).is_err());
    }

    #[test]
    fn every_option() {
        let Command::Run { config, stats } = p(&[
            "run",
            "--kernel=k",
            "--initrd",
            "i",
            "--cmdline",
            "a b=c",
            "--memory",
            "512",
            "--cpus=2",
            "--stats",
            "--cpl0-quirks",
            "off",
            "--guest-profile",
            "prof.txt",
            "--linux-tsc-scale",
            "10",
        ])
        .unwrap();
        assert_eq!(config.boot.initrd, Some(PathBuf::from("i")));
        assert_eq!(config.boot.cmdline.as_deref(), Some("a b=c"));
        assert_eq!(
            (config.boot.memory_mib, config.boot.cpus, stats),
            (512, 2, true)
        );
        assert_eq!(config.quirks, QuirkMode::Off);
        assert_eq!(config.guest_profile, Some(PathBuf::from("prof.txt")));
        assert_eq!(config.linux_tsc_scale, TscScale::Fixed(10));
    }

    #[test]
    fn ibs_options() {
        let ibs = config(&[
            "--ibs",
            "synthetic",
            "--ibs-caps",
            "zen4",
            "--ibs-policy",
            "faithful",
            "--ibs-race-check",
            "fail",
            "--ibs-seed",
            "0x10",
            "--ibs-scale",
            "2.5",
        ])
        .ibs;
        assert_eq!(ibs.mode, IbsMode::Synthetic);
        assert_eq!(ibs.caps, vpmu::Caps::PROFILE_ZEN4);
        assert_eq!(ibs.policy, vpmu::Policy::Faithful);
        assert_eq!(ibs.race_check, vpmu::RaceCheck::Fail);
        assert_eq!((ibs.seed, ibs.ns_per_op), (16, 2.5));
        let ibs = config(&["--ibs-caps", "0x1f"]).ibs;
        assert_eq!(ibs.caps.bits(), 0x1f);
        assert_eq!(
            (ibs.mode, ibs.policy),
            (IbsMode::Auto, vpmu::Policy::Protect)
        );
        for bad in [
            &["--ibs", "on"][..],
            &["--ibs-caps", "0x7ff"], // OPDATA4
            &["--ibs-caps", "zen9"],
            &["--ibs-policy", "lenient"],
            &["--ibs-race-check", "maybe"],
            &["--ibs-seed", "x"],
            &["--ibs-scale", "0"],
        ] {
            assert!(invalid_value(kind(bad)), "{bad:?}");
        }
    }

    #[test]
    fn bad_values_name_the_option() {
        for bad in [
            &["--cpus", "0"][..],
            &["--cpus", "33"],
            &["--memory", "lots"],
            &["--linux-tsc-scale", "0"],
            &["--linux-tsc-scale", "101"],
            &["--linux-tsc-scale", "x"],
            &["--null-msr", "0xc0011033"],
            &["--null-msr", "0x850"],
            &["--null-msr", "0x1_0000_0000"],
            &["--null-msr", "msr"],
        ] {
            let mut all = vec!["run", "--kernel", "k"];
            all.extend_from_slice(bad);
            let err = p(&all).unwrap_err();
            assert!(invalid_value(err.kind()), "{bad:?}: {err}");
            assert!(err.to_string().contains(bad[0]), "{bad:?}: {err}");
        }
        assert_eq!(
            config(&["--null-msr", "0xc0011ff0"]).null_msr,
            Some(0xc001_1ff0)
        );
        for relied_on in [
            "0xc0000082",
            "0xc0000084",
            "0x1b",
            "0x830",
            "0xc0000080",
            "0xc0010015",
        ] {
            let err = p(&["run", "--kernel", "k", "--null-msr", relied_on]).unwrap_err();
            assert!(
                err.to_string().contains("ibsvm relies on"),
                "{relied_on}: {err}"
            );
        }
    }

    #[test]
    fn usage_errors() {
        let kind_of = |args: &[&str]| p(args).unwrap_err().kind();
        assert_eq!(
            kind_of(&[]),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        assert_eq!(kind_of(&["boot"]), ErrorKind::InvalidSubcommand);
        assert_eq!(kind_of(&["run"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(kind_of(&["run", "--kernel"]), ErrorKind::InvalidValue);
        assert_eq!(kind(&["--frobnicate"]), ErrorKind::UnknownArgument);
        assert_eq!(kind(&["--kernel", "j"]), ErrorKind::ArgumentConflict);
        assert_eq!(kind(&["--stats=yes"]), ErrorKind::TooManyValues);
        assert_eq!(kind_of(&["--help"]), ErrorKind::DisplayHelp);
        assert_eq!(kind_of(&["run", "--help"]), ErrorKind::DisplayHelp);
        assert_eq!(kind_of(&["--version"]), ErrorKind::DisplayVersion);
        assert_eq!(p(&["--help"]).unwrap_err().exit_code(), 0);
        assert_eq!(p(&["run"]).unwrap_err().exit_code(), 2);
    }
}
