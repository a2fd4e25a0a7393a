//! The command line: `ibsvm run --kernel PATH [options]`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use thiserror::Error;

use crate::boot::BootSpec;
use crate::ibs::{IbsMode, IbsSettings};
use crate::vm::{QuirkMode, VmConfig};

/// `ibsvm --help`.
pub const USAGE: &str = "\
ibsvm: a KVM virtual machine monitor whose guests get a virtual AMD IBS PMU

Usage:
  ibsvm run --kernel PATH [options]
  ibsvm --help | --version

Options of `run`:
  --kernel PATH         kernel: ELF vmlinux (64-bit entry) or bzImage (required)
  --initrd PATH         initramfs to load
  --cmdline STR         kernel command line
  --memory MIB          guest RAM in MiB (default 256)
  --cpus N              number of vCPUs, 1..=32 (default 1)
  --stats               when the VM ends, print exit counts and wall time to stderr
  --guest-profile PATH  sample each vCPU's RIP every millisecond of its run time and
                        write `vcpu rip` lines to PATH when the VM ends (symbolize a
                        Linux guest with guest-images/linux/profile.py)
  --linux-tsc-scale N   tell a Linux guest its TSC runs N times faster than it does
                        (appends tsc_early_khz): timer interrupts, the tick included,
                        then fire N times later in wall time while kvm-clock keeps the
                        time right. On CPL0-emulating hosts an emulated tick costs about
                        a tick period; N=10 gives the guest its CPU back. Guest sleeps
                        last N times longer. Default 1 (off)
  --cpl0-quirks MODE    auto|on|off (default auto): on hosts whose KVM emulates guest
                        CPL0 code, hide CPUID CX16, complete int3/fwait/fences and
                        xgetbv/xsave/xrstor, route system calls, and append the
                        parameters a Linux guest needs
  -h, --help            this text

Virtual IBS (AMD Instruction-Based Sampling) options:
  --ibs MODE            auto|off|synthetic|host (default auto). auto: the host's IBS
                        when ibsvm can use it, else synthetic (one line says which,
                        and why). off: no IBS in CPUID, IBS MSRs #GP. synthetic:
                        ibsvm samples the vCPU itself (any host). host: the host's IBS
                        through perf (AMD with ibs_op/ibs_fetch PMUs, Linux 6.2+,
                        perf_event_paranoid <= 1 or CAP_PERFMON; docs/host-ibs.md);
                        without them ibsvm stops at start-up and says what is missing
  --ibs-caps CAPS       capabilities advertised in CPUID Fn8000_001B: a profile
                        (old = 0x1f, zen2/zen3 = 0x3ff, zen4 = 0xbff) or a hex word
                        (default zen3)
  --ibs-policy POLICY   protect|faithful (default protect). protect: a guest write to
                        a CTL never leaves Val set, so a guest without Linux fix
                        1b044ff3c17e can never see a stale IbsOpVal. faithful: a
                        written Val is kept, as hardware does (reproduces the race)
  --ibs-race-check MODE off|warn|fail (default off): report a guest enabling a unit
                        from its NMI handler after reading a stale Val; fail ends the
                        VM with status 121. With --ibs-policy faithful it catches the
                        race; with protect (the default, logged) it checks that the
                        protection holds, and stays silent. Needs IBS (not --ibs off)
  --ibs-seed N          seed of the synthetic sampler (deterministic samples)
  --ibs-scale NS        synthetic sampler: guest nanoseconds per counted op or cycle
                        (default 1.0: a period of MaxCnt*16 ops lasts that many ns of
                        guest run time: the vCPU thread's CPU time in KVM_RUN, less
                        the host's cost of exits, those the guest's own instructions
                        caused and those KVM handled itself; on CPL0-emulating
                        hosts, time the vCPU spends in emulated
                        kernel code counts 1/1000)

Benchmarking:
  --null-msr INDEX      trap MSR INDEX to ibsvm and answer it with no device at all
                        (reads 0, writes ignored): the baseline of `make bench`.
                        Not the IBS or extended-APIC MSRs, nor those ibsvm
                        relies on (APIC_BASE, x2APIC, EFER, LSTAR, SFMASK, HWCR)

The console is COM1 (ttyS0) on stdin/stdout. A guest ends the VM by writing a byte
to I/O port 0xf4. With virtual IBS, I/O port 0xf5 is ibsvm's IBS test port, which lets
a test kernel place IBS NMIs exactly (docs/ibs-race.md).

Exit status:
  the byte the guest wrote to port 0xf4; 0 after a guest reset, or once every
  vCPU sits in HLT with interrupts disabled (Linux's halt, and its power-off on
  this VM, which has no ACPI); 120 if the guest crashed (diagnostic on stderr);
  121 if --ibs-race-check fail caught the guest in the IBS race; 130 or 143 if
  SIGINT or SIGTERM stopped the VM (--stats and --guest-profile are still
  written; a second signal ends ibsvm at once); 1 if ibsvm failed; 2 usage
  error. Kernel and initrd must be regular files, and a kernel's headers
  must describe what the file holds (ELF PT_LOAD segments in the file, in
  RAM above 1 MiB, not overlapping, the entry in code; a bzImage's setup and
  payload sizes), else one error line names the field before the guest
  runs; only paths may be other than UTF-8. If writing the console fails (a closed pipe), ibsvm warns once
  and discards the rest of the guest's console output.
";

/// What the command line asks for.
#[derive(Debug, Clone)]
pub enum Command {
    /// Print the usage text.
    Help,
    /// Print the version.
    Version,
    /// Boot a guest.
    Run {
        /// The VM.
        config: VmConfig,
        /// `--stats`.
        stats: bool,
    },
}

/// Usage errors (exit status 2).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UsageError {
    /// No subcommand.
    #[error("missing command (try `ibsvm run --kernel PATH`)")]
    NoCommand,
    /// Unknown subcommand.
    #[error("unknown command `{0}`")]
    UnknownCommand(String),
    /// Unknown flag.
    #[error("unknown option `{0}`")]
    UnknownOption(String),
    /// A flag without its value.
    #[error("option `{0}` needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("invalid value `{value}` for `{flag}`: {why}")]
    BadValue {
        /// The flag.
        flag: String,
        /// The value.
        value: String,
        /// What is expected.
        why: String,
    },
    /// --kernel not given.
    #[error("`run` needs --kernel PATH")]
    NoKernel,
    /// A flag given twice.
    #[error("option `{0}` given twice")]
    Repeated(String),
    /// Two options that cannot work together.
    #[error("`{flag}` cannot be used with `{with}`: {why}")]
    Conflict {
        /// The option refused.
        flag: String,
        /// The option it conflicts with.
        with: String,
        /// Why.
        why: &'static str,
    },
    /// A command or option name that is not UTF-8 (shown with replacement characters).
    #[error("argument `{0}` is not valid UTF-8")]
    NotUtf8(String),
}

fn bad(flag: &str, value: &str, why: impl ToString) -> UsageError {
    UsageError::BadValue {
        flag: flag.into(),
        value: value.into(),
        why: why.to_string(),
    }
}

/// An argument as text; only paths may be other than UTF-8.
fn utf8(arg: OsString) -> Result<String, UsageError> {
    arg.into_string()
        .map_err(|arg| UsageError::NotUtf8(arg.to_string_lossy().into_owned()))
}

/// Parses the arguments after the program name (`std::env::args_os()`: paths need not be
/// UTF-8).
pub fn parse<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut args = args.into_iter().map(Into::into);
    let first = args.next().map(utf8).transpose()?;
    match first.as_deref() {
        None => Err(UsageError::NoCommand),
        Some("-h" | "--help" | "help") => Ok(Command::Help),
        Some("-V" | "--version") => Ok(Command::Version),
        Some("run") => parse_run(args),
        Some(other) => Err(UsageError::UnknownCommand(other.into())),
    }
}

/// A decimal or 0x-prefixed hexadecimal number.
fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn parse_run(args: impl Iterator<Item = OsString>) -> Result<Command, UsageError> {
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut memory = None;
    let mut cpus = None;
    let mut quirks = None;
    let mut ibs_mode = None;
    let mut ibs_caps = None;
    let mut ibs_policy = None;
    let mut ibs_race = None;
    let mut ibs_seed = None;
    let mut ibs_scale = None;
    let mut guest_profile = None;
    let mut tsc_scale = None;
    let mut null_msr = None;
    let mut stats = false;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        // `--flag=VALUE`: split at the first `=` (ASCII, so the flag part stays whole).
        let bytes = arg.as_bytes();
        let (flag, inline) = match bytes.iter().position(|&b| b == b'=') {
            Some(at) if bytes.starts_with(b"--") => (
                utf8(OsStr::from_bytes(&bytes[..at]).to_owned())?,
                Some(OsStr::from_bytes(&bytes[at + 1..]).to_owned()),
            ),
            _ => (utf8(arg.clone())?, None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(Command::Help);
        }
        if flag == "--stats" {
            if let Some(v) = &inline {
                return Err(bad(&flag, &v.to_string_lossy(), "takes no value"));
            }
            stats = true;
            continue;
        }
        let os_value = |args: &mut std::iter::Peekable<_>| -> Result<OsString, UsageError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .ok_or_else(|| UsageError::MissingValue(flag.clone())),
            }
        };
        let slot_value = |args: &mut std::iter::Peekable<_>| -> Result<String, UsageError> {
            os_value(args)?
                .into_string()
                .map_err(|v| bad(&flag, &v.to_string_lossy(), "not valid UTF-8"))
        };
        fn set<T>(slot: &mut Option<T>, flag: &str, value: T) -> Result<(), UsageError> {
            if slot.is_some() {
                return Err(UsageError::Repeated(flag.into()));
            }
            *slot = Some(value);
            Ok(())
        }
        match flag.as_str() {
            "--kernel" => set(&mut kernel, &flag, PathBuf::from(os_value(&mut args)?))?,
            "--initrd" => set(&mut initrd, &flag, PathBuf::from(os_value(&mut args)?))?,
            "--cmdline" => set(&mut cmdline, &flag, slot_value(&mut args)?)?,
            "--memory" => {
                let v = slot_value(&mut args)?;
                let mib = v
                    .parse::<u64>()
                    .map_err(|_| bad(&flag, &v, "expected a size in MiB"))?;
                set(&mut memory, &flag, mib)?
            }
            "--cpus" => {
                let v = slot_value(&mut args)?;
                let n = v
                    .parse::<u8>()
                    .ok()
                    .filter(|n| (1..=crate::boot::mptable::MAX_CPUS).contains(n))
                    .ok_or_else(|| bad(&flag, &v, "expected 1..=32"))?;
                set(&mut cpus, &flag, n)?
            }
            "--cpl0-quirks" => {
                let v = slot_value(&mut args)?;
                let mode = match v.as_str() {
                    "auto" => QuirkMode::Auto,
                    "on" => QuirkMode::On,
                    "off" => QuirkMode::Off,
                    _ => return Err(bad(&flag, &v, "expected auto, on or off")),
                };
                set(&mut quirks, &flag, mode)?
            }
            "--guest-profile" => set(
                &mut guest_profile,
                &flag,
                PathBuf::from(os_value(&mut args)?),
            )?,
            "--null-msr" => {
                let v = slot_value(&mut args)?;
                let index = parse_u64(&v)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| !vpmu::is_vpmu_msr(*n))
                    .ok_or_else(|| {
                        bad(
                            &flag,
                            &v,
                            "expected an MSR index outside the IBS and extended-APIC MSRs",
                        )
                    })?;
                if let Some(why) = crate::msr::relied_on(index) {
                    return Err(bad(&flag, &v, format!("ibsvm relies on this MSR: {why}")));
                }
                set(&mut null_msr, &flag, index)?
            }
            "--linux-tsc-scale" => {
                let v = slot_value(&mut args)?;
                let n = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| bad(&flag, &v, "expected 1..=100"))?;
                set(&mut tsc_scale, &flag, n)?
            }
            "--ibs" => {
                let v = slot_value(&mut args)?;
                let mode = match v.as_str() {
                    "auto" => IbsMode::Auto,
                    "off" => IbsMode::Off,
                    "synthetic" => IbsMode::Synthetic,
                    "host" => IbsMode::Host,
                    _ => return Err(bad(&flag, &v, "expected auto, off, synthetic or host")),
                };
                set(&mut ibs_mode, &flag, mode)?
            }
            "--ibs-caps" => {
                let v = slot_value(&mut args)?;
                let caps = v.parse::<vpmu::Caps>().map_err(|e| bad(&flag, &v, e))?;
                set(&mut ibs_caps, &flag, caps)?
            }
            "--ibs-policy" => {
                let v = slot_value(&mut args)?;
                let policy = v.parse::<vpmu::Policy>().map_err(|e| bad(&flag, &v, e))?;
                set(&mut ibs_policy, &flag, policy)?
            }
            "--ibs-race-check" => {
                let v = slot_value(&mut args)?;
                let check = v
                    .parse::<vpmu::RaceCheck>()
                    .map_err(|e| bad(&flag, &v, e))?;
                set(&mut ibs_race, &flag, check)?
            }
            "--ibs-seed" => {
                let v = slot_value(&mut args)?;
                let seed = parse_u64(&v).ok_or_else(|| bad(&flag, &v, "expected a number"))?;
                set(&mut ibs_seed, &flag, seed)?
            }
            "--ibs-scale" => {
                let v = slot_value(&mut args)?;
                let scale = v
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| bad(&flag, &v, "expected guest nanoseconds per op, > 0"))?;
                set(&mut ibs_scale, &flag, scale)?
            }
            _ => return Err(UsageError::UnknownOption(flag)),
        }
    }
    if ibs_mode == Some(IbsMode::Off) {
        let set = [
            ("--ibs-caps", ibs_caps.is_some()),
            ("--ibs-policy", ibs_policy.is_some()),
            ("--ibs-race-check", ibs_race.is_some()),
            ("--ibs-seed", ibs_seed.is_some()),
            ("--ibs-scale", ibs_scale.is_some()),
        ];
        if let Some((flag, _)) = set.into_iter().find(|(_, given)| *given) {
            return Err(UsageError::Conflict {
                flag: flag.into(),
                with: "--ibs off".into(),
                why: "there is no virtual IBS to configure",
            });
        }
    }
    let defaults = IbsSettings::default();
    let ibs = IbsSettings {
        mode: ibs_mode.unwrap_or(defaults.mode),
        caps: ibs_caps.unwrap_or(defaults.caps),
        policy: ibs_policy.unwrap_or(defaults.policy),
        race_check: ibs_race.unwrap_or(defaults.race_check),
        seed: ibs_seed.unwrap_or(defaults.seed),
        ns_per_op: ibs_scale.unwrap_or(defaults.ns_per_op),
    };
    let boot = BootSpec {
        kernel: kernel.ok_or(UsageError::NoKernel)?,
        initrd,
        cmdline: cmdline.unwrap_or_default(),
        memory_mib: memory.unwrap_or(256),
        cpus: cpus.unwrap_or(1),
    };
    Ok(Command::Run {
        config: VmConfig {
            boot,
            quirks: quirks.unwrap_or(QuirkMode::Auto),
            ibs,
            guest_profile,
            linux_tsc_scale: tsc_scale.unwrap_or(1),
            null_msr,
        },
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn run_with_defaults() {
        let Command::Run { config, stats } = p(&["run", "--kernel", "k"]).unwrap() else {
            panic!()
        };
        assert_eq!(config.boot.kernel, PathBuf::from("k"));
        assert_eq!(
            (config.boot.memory_mib, config.boot.cpus, stats),
            (256, 1, false)
        );
        assert_eq!(config.quirks, QuirkMode::Auto);
        assert!(config.boot.initrd.is_none());
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
            assert!(
                matches!(&err, UsageError::Conflict { flag: f, .. } if flag.starts_with(f.as_str())),
                "{flag}: {err}"
            );
        }
        assert!(p(&["run", "--kernel", "k", "--ibs", "off"]).is_ok());
    }

    #[test]
    fn paths_need_not_be_utf8_but_everything_else_must() {
        let bad = || OsString::from(OsStr::from_bytes(b"\xff.elf"));
        let run = |args: Vec<OsString>| parse(args);
        let os = |s: &str| OsString::from(s);
        let Ok(Command::Run { config, .. }) = run(vec![os("run"), os("--kernel"), bad()]) else {
            panic!("a non-UTF-8 kernel path")
        };
        assert_eq!(config.boot.kernel.as_os_str().as_bytes(), b"\xff.elf");
        let mut inline = b"--initrd=".to_vec();
        inline.extend_from_slice(b"\xff");
        let inline = OsString::from(OsStr::from_bytes(&inline));
        assert!(run(vec![os("run"), os("--kernel"), os("k"), inline]).is_ok());
        assert_eq!(
            run(vec![
                os("run"),
                os("--kernel"),
                os("k"),
                os("--cmdline"),
                bad()
            ])
            .err(),
            Some(UsageError::BadValue {
                flag: "--cmdline".into(),
                value: "\u{fffd}.elf".into(),
                why: "not valid UTF-8".into()
            })
        );
        assert_eq!(
            run(vec![bad()]).err(),
            Some(UsageError::NotUtf8("\u{fffd}.elf".into()))
        );
        assert!(matches!(
            run(vec![os("run"), bad()]),
            Err(UsageError::NotUtf8(_))
        ));
    }

    #[test]
    fn every_option() {
        let cmd = p(&[
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
        ])
        .unwrap();
        let Command::Run { config, stats } = cmd else {
            panic!()
        };
        assert_eq!(config.boot.initrd, Some(PathBuf::from("i")));
        assert_eq!(config.boot.cmdline, "a b=c");
        assert_eq!(
            (config.boot.memory_mib, config.boot.cpus, stats),
            (512, 2, true)
        );
        assert_eq!(config.quirks, QuirkMode::Off);
    }

    #[test]
    fn ibs_options() {
        let Command::Run { config, .. } = p(&[
            "run",
            "--kernel",
            "k",
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
        .unwrap() else {
            panic!()
        };
        let ibs = config.ibs;
        assert_eq!(ibs.mode, IbsMode::Synthetic);
        assert_eq!(ibs.caps, vpmu::Caps::PROFILE_ZEN4);
        assert_eq!(ibs.policy, vpmu::Policy::Faithful);
        assert_eq!(ibs.race_check, vpmu::RaceCheck::Fail);
        assert_eq!((ibs.seed, ibs.ns_per_op), (16, 2.5));
        let Command::Run { config, .. } =
            p(&["run", "--kernel", "k", "--ibs-caps", "0x1f"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(config.ibs.caps.bits(), 0x1f);
        assert_eq!(config.ibs.mode, IbsMode::Auto);
        assert_eq!(config.ibs.policy, vpmu::Policy::Protect);
        for bad_args in [
            &["--ibs", "on"][..],
            &["--ibs-caps", "0x7ff"], // OPDATA4
            &["--ibs-caps", "zen9"],
            &["--ibs-policy", "lenient"],
            &["--ibs-race-check", "maybe"],
            &["--ibs-seed", "x"],
            &["--ibs-scale", "0"],
        ] {
            let mut args = vec!["run", "--kernel", "k"];
            args.extend_from_slice(bad_args);
            assert!(
                matches!(p(&args), Err(UsageError::BadValue { .. })),
                "{bad_args:?}"
            );
        }
    }

    #[test]
    fn profile_and_tsc_scale() {
        let Command::Run { config, .. } = p(&[
            "run",
            "--kernel",
            "k",
            "--guest-profile",
            "prof.txt",
            "--linux-tsc-scale",
            "10",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(config.guest_profile, Some(PathBuf::from("prof.txt")));
        assert_eq!(config.linux_tsc_scale, 10);
        let Command::Run { config, .. } = p(&["run", "--kernel", "k"]).unwrap() else {
            panic!()
        };
        assert_eq!((config.guest_profile, config.linux_tsc_scale), (None, 1));
        assert_eq!(config.null_msr, None);
        let Command::Run { config, .. } =
            p(&["run", "--kernel", "k", "--null-msr", "0xc0011ff0"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(config.null_msr, Some(0xc001_1ff0));
        for bad_msr in ["0xc0011033", "0x850", "0x1_0000_0000", "msr"] {
            assert!(matches!(
                p(&["run", "--kernel", "k", "--null-msr", bad_msr]),
                Err(UsageError::BadValue { .. })
            ));
        }
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
        for bad_scale in ["0", "101", "x"] {
            assert!(matches!(
                p(&["run", "--kernel", "k", "--linux-tsc-scale", bad_scale]),
                Err(UsageError::BadValue { .. })
            ));
        }
    }

    #[test]
    fn usage_errors() {
        assert_eq!(p(&[]).unwrap_err(), UsageError::NoCommand);
        assert_eq!(
            p(&["boot"]).unwrap_err(),
            UsageError::UnknownCommand("boot".into())
        );
        assert_eq!(p(&["run"]).unwrap_err(), UsageError::NoKernel);
        assert_eq!(
            p(&["run", "--kernel"]).unwrap_err(),
            UsageError::MissingValue("--kernel".into())
        );
        assert_eq!(
            p(&["run", "--kernel", "k", "--frobnicate"]).unwrap_err(),
            UsageError::UnknownOption("--frobnicate".into())
        );
        assert!(matches!(
            p(&["run", "--kernel", "k", "--cpus", "0"]),
            Err(UsageError::BadValue { .. })
        ));
        assert!(matches!(
            p(&["run", "--kernel", "k", "--cpus", "x"]),
            Err(UsageError::BadValue { .. })
        ));
        assert!(matches!(
            p(&["run", "--kernel", "k", "--cpus", "33"]),
            Err(UsageError::BadValue { .. })
        ));
        assert!(matches!(
            p(&["run", "--kernel", "k", "--memory", "-1"]),
            Err(UsageError::BadValue { .. })
        ));
        assert!(matches!(
            p(&["run", "--kernel", "k", "--cpl0-quirks", "maybe"]),
            Err(UsageError::BadValue { .. })
        ));
        assert_eq!(
            p(&["run", "--kernel", "k", "--kernel", "j"]).unwrap_err(),
            UsageError::Repeated("--kernel".into())
        );
        assert!(matches!(
            p(&["run", "--kernel", "k", "--stats=1"]),
            Err(UsageError::BadValue { .. })
        ));
    }

    #[test]
    fn help_and_version() {
        assert!(matches!(p(&["--help"]), Ok(Command::Help)));
        assert!(matches!(p(&["run", "--help"]), Ok(Command::Help)));
        assert!(matches!(p(&["--version"]), Ok(Command::Version)));
    }
}
