//! `ibsvm`: boot a guest on KVM.

use std::process::ExitCode;

use ibsvm::cli::{self, Command, USAGE};
use ibsvm::stop::{EXIT_USAGE, EXIT_VMM_ERROR};
use ibsvm::vm::Vm;

fn main() -> ExitCode {
    ibsvm::logger::init(std::env::var("IBSVM_LOG").ok().as_deref());
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ibsvm: error: {e}\n(see `ibsvm --help`)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match command {
        Command::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("ibsvm {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run { config, stats } => match Vm::build(&config).and_then(Vm::run) {
            Ok(report) => {
                if stats {
                    eprint!("{}", report.stats);
                }
                let status = report.stop.exit_status();
                match &report.stop {
                    s @ ibsvm::stop::GuestStop::Crash { .. } => eprintln!("ibsvm: error: {s}"),
                    s => log::info!("{s}; exit status {status}"),
                }
                ExitCode::from(status)
            }
            Err(e) => {
                eprintln!("ibsvm: error: {e}");
                ExitCode::from(EXIT_VMM_ERROR)
            }
        },
    }
}
