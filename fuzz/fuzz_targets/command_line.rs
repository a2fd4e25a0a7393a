//! Any arguments (NUL-separated bytes, not necessarily UTF-8): `ibsvm`'s parser must give a
//! command or a usage error, never a panic.

#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args = data
        .split(|&b| b == 0)
        .map(|a| OsStr::from_bytes(a).to_owned());
    let _ = ibsvm::cli::parse(args);
});
