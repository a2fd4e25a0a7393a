//! `ibsvm-exit N`: end the VM with status N through ibsvm's test-exit device.
//!
//! Not a check: installed as `/bin/ibsvm-exit` and called by `/init` last.
//! 1. `tcdrain` stdout/stderr (and /dev/console) so the serial driver has sent
//!    every byte already written (tty output is interrupt-driven and would be lost
//!    when the VM ends);
//! 2. writes the byte N to I/O port 0xF4 with `pwrite` on /dev/port at offset 0xF4.
//!
//! Under ibsvm the write ends the VM and ibsvm exits with status N, so this never
//! returns. If the write fails, or returns (no test-exit device), it prints why and
//! exits 1 so that the caller can fall back (`poweroff -f`).

use std::os::unix::fs::FileExt;

const TEST_EXIT_PORT: u64 = 0xF4;

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let Ok(code) = arg.parse::<u8>() else {
        eprintln!("usage: ibsvm-exit N (0..=255), got {arg:?}");
        std::process::exit(2);
    };
    drain_console();
    let port = match std::fs::OpenOptions::new().write(true).open("/dev/port") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ibsvm-exit: open /dev/port: {e}");
            std::process::exit(1);
        }
    };
    match port.write_at(&[code], TEST_EXIT_PORT) {
        Ok(1) => {
            eprintln!("ibsvm-exit: wrote {code} to port {TEST_EXIT_PORT:#x} but the VM goes on")
        }
        Ok(n) => eprintln!("ibsvm-exit: short write to /dev/port ({n} bytes)"),
        Err(e) => eprintln!("ibsvm-exit: write /dev/port at {TEST_EXIT_PORT:#x}: {e}"),
    }
    std::process::exit(1);
}

/// Waits until output already written to the terminal(s) has been transmitted.
/// Errors (not a tty, ...) are ignored.
fn drain_console() {
    for fd in [1, 2] {
        // SAFETY: tcdrain on a file descriptor has no memory-safety preconditions.
        unsafe { libc::tcdrain(fd) };
    }
    use std::os::unix::fs::OpenOptionsExt;
    let console = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console");
    if let Ok(f) = console {
        use std::os::fd::AsRawFd;
        // SAFETY: as above; the fd stays open for the call.
        unsafe { libc::tcdrain(f.as_raw_fd()) };
    }
}
