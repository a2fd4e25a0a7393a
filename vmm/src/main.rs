//! `ibsvm`: boot a guest on KVM.

use std::process::ExitCode;

use ibsvm::cli::{self, Command};
use ibsvm::stop::{GuestStop, EXIT_VMM_ERROR};
use ibsvm::vm::Vm;

fn main() -> ExitCode {
    ibsvm::logger::init(std::env::var("IBSVM_LOG").ok().as_deref());
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            // Usage errors (status 2), or --help and --version (status 0).
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_VMM_ERROR));
        }
    };
    let Command::Run { config, stats } = command;
    match Vm::build(&config).and_then(Vm::run) {
        Ok(report) => {
            if stats {
                eprint!("{}", report.stats);
            }
            let status = report.stop.exit_status();
            match &report.stop {
                s @ GuestStop::Crash { .. } => eprintln!("ibsvm: error: {s}"),
                s => log::info!("{s}; exit status {status}"),
            }
            ExitCode::from(status)
        }
        Err(e) => {
            eprintln!("ibsvm: error: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}
