//! The kernel log: reading it (`klogctl`, else `/dev/kmsg`) and looking through it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Longest line of the kernel log printed.
pub const MAX_LINE: usize = 200;

/// The kernel log as lines: `klogctl(SYSLOG_ACTION_READ_ALL)` (two system calls),
/// else a non-blocking read of `/dev/kmsg` (one system call per record, bounded).
pub fn read() -> Result<Vec<String>, String> {
    // include/linux/syslog.h
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER ignores the buffer arguments.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let klog_err = if size > 0 {
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf has room for `size` bytes.
        let n = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), size) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(String::from_utf8_lossy(&buf)
                .lines()
                .map(strip_klog_prefix)
                .collect());
        }
        std::io::Error::last_os_error()
    } else {
        std::io::Error::last_os_error()
    };
    read_dev_kmsg().map_err(|e| format!("klogctl: {klog_err}; /dev/kmsg: {e}"))
}

/// `<6>[    1.000000] text` -> `[    1.000000] text`.
pub fn strip_klog_prefix(l: &str) -> String {
    if let Some(rest) = l.strip_prefix('<') {
        if let Some(end) = rest.find('>') {
            if rest[..end].bytes().all(|b| b.is_ascii_digit()) {
                return rest[end + 1..].to_string();
            }
        }
    }
    l.to_string()
}

fn read_dev_kmsg() -> Result<Vec<String>, String> {
    let path = CString::new("/dev/kmsg").unwrap();
    // SAFETY: path is NUL-terminated.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 8192];
    for _ in 0..20_000 {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => break,
                Some(libc::EPIPE) => continue, // overwritten records: go on
                _ => return Err(e.to_string()),
            }
        }
        if n == 0 {
            break;
        }
        // "prio,seq,usec,flags;text\n[ KEY=value\n...]"
        let rec = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
        if let Some(first) = rec.lines().next() {
            lines.push(first.split_once(';').map_or(first, |(_, t)| t).to_string());
        }
    }
    Ok(lines)
}

/// The lines of `after` that came after the last line of `before` (two reads of the
/// log, `before` the earlier one). If that line is gone (the log buffer wrapped),
/// all of `after`. Lines carry their `[seconds]` timestamp, so a repeated text is
/// not mistaken for it.
pub fn new_lines<'a>(before: &[String], after: &'a [String]) -> &'a [String] {
    let Some(last) = before.last() else {
        return after;
    };
    match after.iter().rposition(|l| l == last) {
        Some(i) => &after[i + 1..],
        None => after,
    }
}

/// `l` trimmed and cut to [`MAX_LINE`] characters.
pub fn clip(l: &str) -> String {
    let t = l.trim();
    if t.chars().count() <= MAX_LINE {
        return t.to_string();
    }
    let mut s: String = t.chars().take(MAX_LINE).collect();
    s.push_str("...");
    s
}

/// The lines that contain `pat`.
pub fn lines_with<'a>(lines: &'a [String], pat: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.contains(pat)).collect()
}

/// `Ok` if no line contains `pat`, else `Err` quoting up to three of them.
pub fn none_of(lines: &[String], pat: &str) -> Result<String, String> {
    none_of_any(lines, &[pat])
}

/// `Ok` if no line contains any of `pats`, else `Err` quoting up to three of them.
pub fn none_of_any(lines: &[String], pats: &[&str]) -> Result<String, String> {
    let hits: Vec<&String> = lines
        .iter()
        .filter(|l| pats.iter().any(|p| l.contains(p)))
        .collect();
    let what = match pats {
        [one] => format!("{one:?}"),
        _ => format!("{pats:?}"),
    };
    if hits.is_empty() {
        return Ok(format!("no {what} in {} log lines", lines.len()));
    }
    let shown: Vec<String> = hits.iter().take(3).map(|l| clip(l)).collect();
    Err(format!(
        "{} lines with {what}: {}",
        hits.len(),
        shown.join(" | ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn helpers() {
        assert_eq!(
            strip_klog_prefix("<6>[    0.512000] perf: AMD IBS detected (0x000003ff)"),
            "[    0.512000] perf: AMD IBS detected (0x000003ff)"
        );
        assert_eq!(strip_klog_prefix("<x>y"), "<x>y");
        let l = lines(&[
            "[ 1.0] Uhhuh. NMI received for unknown reason 3c on CPU 0.",
            "[ 1.1] fine",
        ]);
        assert!(none_of(&l, "NMI received for unknown reason")
            .unwrap_err()
            .contains("1 lines"));
        assert_eq!(
            none_of(&l, "[Firmware Bug]"),
            Ok("no \"[Firmware Bug]\" in 2 log lines".to_string())
        );
        let e = none_of_any(&l, &["fine", "Uhhuh"]).unwrap_err();
        assert!(
            e.starts_with("2 lines with [\"fine\", \"Uhhuh\"]: [ 1.0] Uhhuh"),
            "{e}"
        );
        assert!(none_of_any(&l, &["a1", "b2"]).is_ok());
        assert_eq!(lines_with(&l, "fine").len(), 1);
        let long = "x".repeat(MAX_LINE + 5);
        assert_eq!(clip(&long).len(), MAX_LINE + 3);
        assert_eq!(clip("  short "), "short");
    }

    #[test]
    fn new_lines_after_a_snapshot() {
        let before = lines(&["[1.0] a", "[2.0] b"]);
        let after = lines(&["[1.0] a", "[2.0] b", "[3.0] c", "[4.0] d"]);
        assert_eq!(new_lines(&before, &after), &after[2..]);
        // Nothing new.
        assert!(new_lines(&before, &before).is_empty());
        // The buffer wrapped: the marker line is gone, everything is new.
        let wrapped = lines(&["[3.0] c", "[4.0] d"]);
        assert_eq!(new_lines(&before, &wrapped), &wrapped[..]);
        // An empty snapshot: everything is new.
        assert_eq!(new_lines(&[], &after), &after[..]);
        // The last occurrence counts (same text printed twice without timestamps).
        let dup = lines(&["b", "x", "b", "y"]);
        assert_eq!(new_lines(&lines(&["b"]), &dup), &dup[3..]);
    }

    #[test]
    fn kernel_log_readable() {
        match read() {
            Ok(lines) => assert!(!lines.is_empty()),
            Err(e) => eprintln!("kernel_log_readable skipped: {e}"),
        }
    }
}
