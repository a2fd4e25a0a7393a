//! A small stderr logger: `ibsvm: message` lines; level from `IBSVM_LOG` (error, warn,
//! info — the default — debug, trace).

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            match record.level() {
                log::Level::Info => eprintln!("ibsvm: {}", record.args()),
                level => eprintln!(
                    "ibsvm: {}: {}",
                    level.as_str().to_lowercase(),
                    record.args()
                ),
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger; `spec` is the value of `IBSVM_LOG`, if set.
pub fn init(spec: Option<&str>) {
    let level = spec
        .and_then(|s| s.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
