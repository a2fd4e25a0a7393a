//! The CPU this process runs on. Linux 6.1's IBS events are CPU-wide only, so a check
//! that wants to see its own code sampled pins itself to the CPU it opens them on.

/// Pins this thread to the CPU it runs on and returns that CPU.
pub fn pin_to_current_cpu() -> Result<libc::c_int, String> {
    // SAFETY: no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu < 0 {
        return Err(format!("sched_getcpu: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: cpu_set_t is plain data (all-zero is empty); CPU_SET writes inside it;
    // sched_setaffinity reads size_of::<cpu_set_t>() bytes from it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "sched_setaffinity(cpu {cpu}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_stays_put() {
        let cpu = pin_to_current_cpu().unwrap();
        for _ in 0..100 {
            std::thread::yield_now();
            // SAFETY: no arguments.
            assert_eq!(unsafe { libc::sched_getcpu() }, cpu);
        }
    }
}
