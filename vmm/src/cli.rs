//! The command line: `ibsvm run --kernel PATH [options]`.

use std::path::PathBuf;

use thiserror::Error;

use crate::boot::BootSpec;
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
  --cpl0-quirks MODE    auto|on|off (default auto): on hosts whose KVM emulates guest
                        CPL0 code, hide CPUID CX16, complete int3/fwait/fences in ibsvm
                        and append the parameters a Linux guest needs
  -h, --help            this text

The console is COM1 (ttyS0) on stdin/stdout. A guest ends the VM by writing a byte
to I/O port 0xf4.

Exit status:
  the byte the guest wrote to port 0xf4; 0 after a guest reset or power-off;
  120 if the guest crashed (diagnostic on stderr); 1 if ibsvm failed; 2 usage error
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
        why: &'static str,
    },
    /// --kernel not given.
    #[error("`run` needs --kernel PATH")]
    NoKernel,
    /// A flag given twice.
    #[error("option `{0}` given twice")]
    Repeated(String),
}

fn bad(flag: &str, value: &str, why: &'static str) -> UsageError {
    UsageError::BadValue {
        flag: flag.into(),
        value: value.into(),
        why,
    }
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, UsageError> {
    let mut args = args.into_iter();
    match args.next().as_deref() {
        None => Err(UsageError::NoCommand),
        Some("-h" | "--help" | "help") => Ok(Command::Help),
        Some("-V" | "--version") => Ok(Command::Version),
        Some("run") => parse_run(args),
        Some(other) => Err(UsageError::UnknownCommand(other.into())),
    }
}

fn parse_run(args: impl Iterator<Item = String>) -> Result<Command, UsageError> {
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut memory = None;
    let mut cpus = None;
    let mut quirks = None;
    let mut stats = false;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(Command::Help);
        }
        if flag == "--stats" {
            if inline.is_some() {
                return Err(bad(
                    &flag,
                    inline.as_deref().unwrap_or(""),
                    "takes no value",
                ));
            }
            stats = true;
            continue;
        }
        let slot_value = |args: &mut std::iter::Peekable<_>| -> Result<String, UsageError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .ok_or_else(|| UsageError::MissingValue(flag.clone())),
            }
        };
        fn set<T>(slot: &mut Option<T>, flag: &str, value: T) -> Result<(), UsageError> {
            if slot.is_some() {
                return Err(UsageError::Repeated(flag.into()));
            }
            *slot = Some(value);
            Ok(())
        }
        match flag.as_str() {
            "--kernel" => set(&mut kernel, &flag, PathBuf::from(slot_value(&mut args)?))?,
            "--initrd" => set(&mut initrd, &flag, PathBuf::from(slot_value(&mut args)?))?,
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
            _ => return Err(UsageError::UnknownOption(arg)),
        }
    }
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
