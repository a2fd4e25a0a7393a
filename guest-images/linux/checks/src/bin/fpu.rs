//! `fpu`: does each guest task keep its own vector registers across context switches?
//!
//! The pipeline crash of the `userspace` check (a freshly exec'd busybox dying in glibc's
//! `__ctype_init`) left a TLS block whose 0x28 bytes of `.tdata` held 8 zero bytes and
//! `"__vdso_clock_getres\0__vdso_getcp"`: another task's vDSO string compare, stored by
//! this task's AVX `memcpy` of the TLS image after a page fault had switched tasks in
//! between. The guest kernel runs `noxsave` (XSAVE cannot be emulated at CPL0 on
//! CPL0-emulating hosts), so it saves only x87/SSE state (FXSAVE); but guest CPL3 code
//! sees the host's CPUID and XCR0, so glibc picks AVX/AVX-512 string functions whose
//! registers no one saves (guest-images/linux/README.md, "The pipeline crash").
//!
//! This check shows both halves: a few processes, all on this CPU, each hold their own
//! pattern in registers and check it in a loop of plain register compares, yielding the
//! CPU every round, so that the kernel switches tasks again and again.
//! - `xmm-isolation`: XMM0–XMM7 (FXSAVE state) must stay each task's own.
//! - `ymm-isolation`: the upper half of YMM0 (AVX state), each round also touching a new
//!   page (the crash's page fault), checked when XCR0 enables AVX
//!   and the kernel manages AVX (`avx` in /proc/cpuinfo). When XCR0 enables AVX but the
//!   kernel does not manage it, user space has no business using it: the result is
//!   printed as info (`not isolated between tasks: ...` on such hosts), not failed.
//!
//! Options (`KEY=VALUE` arguments): `FPU_TASKS` (processes, default 3), `FPU_ROUNDS`
//! (page faults and yields per process, default 300).

use ibsvm_guest_checks::cpu::pin_to_current_cpu;
use ibsvm_guest_checks::options::Options;
use ibsvm_guest_checks::{describe_wait_status, Check};

/// XCR0 bits 1 (SSE) and 2 (AVX, the upper halves of YMM0-15): SDM vol. 1 §13.3.
const XCR0_SSE_AVX: u64 = 0b110;

/// XCR0 as this task sees it.
fn xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0; it needs CPUID.1:ECX.OSXSAVE, which every
    // x86-64 CPU this runs on (the host's CPUID at CPL3) reports; touches only EAX/EDX.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Whether the kernel saves and restores AVX state: it lists `avx` in /proc/cpuinfo only
/// then (arch/x86/kernel/fpu/xstate.c clears the XSAVE-dependent features without XSAVE).
fn kernel_manages_avx() -> Result<bool, String> {
    let cpuinfo =
        std::fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("/proc/cpuinfo: {e}"))?;
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .ok_or("/proc/cpuinfo has no flags line")?;
    Ok(flags.split_whitespace().any(|f| f == "avx"))
}

/// Which registers a task holds its pattern in.
#[derive(Clone, Copy)]
enum Regs {
    /// XMM0-XMM7 (saved by FXSAVE).
    Xmm,
    /// The upper 128 bits of YMM0 (AVX state: XSAVE only).
    YmmUpper,
}

/// Register checks between two yields (a few ms of native CPL3 time).
const CHECKS_PER_ROUND: u64 = 2_000_000;

fn main() {
    let mut c = Check::new("fpu");
    let opts = Options::from_args(&["FPU_TASKS", "FPU_ROUNDS"]).and_then(|o| {
        Ok((
            o.number("FPU_TASKS", 3, 2..=16)?,
            o.number("FPU_ROUNDS", 300, 1..=1_000_000)?,
        ))
    });
    let xcr0 = xcr0();
    c.info(format!(
        "xcr0 {xcr0:#x} (XGETBV at CPL3; bit 1 SSE, 2 AVX, 5-7 AVX-512)"
    ));
    let (tasks, rounds) = match opts {
        Ok(o) => o,
        Err(e) => {
            c.run("options", || Err(e));
            c.finish();
        }
    };
    c.run("xmm-isolation", || isolation(tasks, rounds, Regs::Xmm));
    let kernel_avx = kernel_manages_avx();
    match (xcr0 & XCR0_SSE_AVX == XCR0_SSE_AVX, kernel_avx) {
        (false, _) => c.info("AVX state not enabled in XCR0: AVX instructions #UD, nothing to isolate"),
        // The kernel context-switches AVX state: it must stay each task's own.
        (true, Ok(true)) => c.run("ymm-isolation", || isolation(tasks, rounds, Regs::YmmUpper)),
        // AVX works at CPL3 only because the host's XCR0 shows through; the kernel
        // (noxsave) never saves it, so user space must not use it. Measured, not failed.
        (true, Ok(false)) => c.info(format!(
            "AVX usable at CPL3 but the kernel does not manage its state (no avx in /proc/cpuinfo): {}",
            match isolation(tasks, rounds, Regs::YmmUpper) {
                Ok(_) => "its registers stayed each task's own this time".to_string(),
                Err(e) => format!("not isolated between tasks: {e}"),
            }
        )),
        (true, Err(e)) => c.run("ymm-isolation", || Err(e)),
    }
    c.finish();
}

/// The pattern of task `k`: distinct per task and per byte, never 0.
fn pattern(k: u64) -> u64 {
    0x0101_0101_0101_0101u64.wrapping_mul(0x11 * (k + 1)) ^ 0x8000_0000_0000_0001
}

/// Forks `tasks` processes on this CPU holding their pattern in `regs`; all must exit 0.
fn isolation(tasks: u64, rounds: u64, regs: Regs) -> Result<String, String> {
    let cpu = pin_to_current_cpu()?;
    let mut children = Vec::new();
    for k in 0..tasks {
        // SAFETY: the child runs only register code and raw system calls, then _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            let seen = match regs {
                Regs::Xmm => Ok(hold_xmm(pattern(k), rounds)),
                Regs::YmmUpper => hold_ymm_upper(pattern(k), rounds),
            };
            let seen = seen.unwrap_or_else(|e| {
                eprintln!("fpu: task {k}: {e}");
                // SAFETY: as below.
                unsafe { libc::_exit(2) }
            });
            if seen != 0 {
                eprintln!(
                    "fpu: task {k} pattern {:#018x}: a register held {seen:#018x} ({})",
                    pattern(k),
                    describe(seen, tasks)
                );
            }
            // SAFETY: _exit ends the forked child without running the parent's atexit work.
            unsafe { libc::_exit(i32::from(seen != 0)) };
        }
        children.push(pid);
    }
    let mut failed = Vec::new();
    for (k, pid) in children.into_iter().enumerate() {
        let mut status = 0;
        // SAFETY: waits for our own child; status points to a valid c_int.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
        }
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            failed.push(format!("task {k}: {}", describe_wait_status(status)));
        }
    }
    let (what, rounds_of) = match regs {
        Regs::Xmm => ("XMM0-XMM7", "yields"),
        Regs::YmmUpper => ("the upper half of YMM0", "page faults and yields"),
    };
    if failed.is_empty() {
        Ok(format!(
            "{tasks} processes on cpu {cpu}, {rounds} {rounds_of} each, {what} intact"
        ))
    } else {
        Err(format!(
            "{} of {tasks} processes on cpu {cpu} saw foreign contents in {what}: {}",
            failed.len(),
            failed.join("; ")
        ))
    }
}

/// What a foreign value looks like: another task's pattern, zero, or something else.
fn describe(seen: u64, tasks: u64) -> String {
    match (0..tasks).find(|&k| pattern(k) == seen) {
        Some(k) => format!("task {k}'s pattern"),
        None if seen == 0 => "zero".into(),
        None => format!("bytes {:?}", String::from_utf8_lossy(&seen.to_le_bytes())),
    }
}

/// Fills XMM0–XMM7 with `pat`, then `rounds` times checks all eight
/// [`CHECKS_PER_ROUND`] times and yields the CPU. Returns 0, or the first foreign value.
fn hold_xmm(pat: u64, rounds: u64) -> u64 {
    let seen: u64;
    // SAFETY: the asm touches only the registers it declares (XMM0–XMM7 and GPRs as
    // operands or clobbers; `syscall` clobbers RCX and R11 and returns in RAX) and no
    // memory; sched_yield (24, arch/x86/entry/syscalls/syscall_64.tbl) has no arguments.
    unsafe {
        std::arch::asm!(
            "movq xmm0, {pat}",
            "movq xmm1, {pat}",
            "movq xmm2, {pat}",
            "movq xmm3, {pat}",
            "movq xmm4, {pat}",
            "movq xmm5, {pat}",
            "movq xmm6, {pat}",
            "movq xmm7, {pat}",
            "2:",
            "mov {n}, {per_round}",
            "3:",
            "movq {v}, xmm0", "cmp {v}, {pat}", "jne 5f",
            "movq {v}, xmm1", "cmp {v}, {pat}", "jne 5f",
            "movq {v}, xmm2", "cmp {v}, {pat}", "jne 5f",
            "movq {v}, xmm3", "cmp {v}, {pat}", "jne 5f",
            "movq {v}, xmm4", "cmp {v}, {pat}", "jne 5f",
            "movq {v}, xmm5", "cmp {v}, {pat}", "jne 5f",
            "movq {v}, xmm6", "cmp {v}, {pat}", "jne 5f",
            "movq {v}, xmm7", "cmp {v}, {pat}", "jne 5f",
            "dec {n}",
            "jnz 3b",
            "mov eax, 24",
            "syscall",
            "dec {rounds}",
            "jnz 2b",
            "xor {v:e}, {v:e}",
            "5:",
            pat = in(reg) pat,
            per_round = in(reg) CHECKS_PER_ROUND,
            rounds = inout(reg) rounds => _,
            n = out(reg) _,
            v = out(reg) seen,
            out("rax") _,
            out("rcx") _,
            out("r11") _,
            out("xmm0") _,
            out("xmm1") _,
            out("xmm2") _,
            out("xmm3") _,
            out("xmm4") _,
            out("xmm5") _,
            out("xmm6") _,
            out("xmm7") _,
            options(nostack),
        );
    }
    seen
}

/// Fills the upper 128 bits of YMM0 with `pat`, then `rounds` times touches a new page
/// (a page fault: kernel code that may switch tasks), checks the register and yields.
/// Returns 0, or the first foreign value.
fn hold_ymm_upper(pat: u64, rounds: u64) -> Result<u64, String> {
    let len = (rounds as usize) * 4096;
    // SAFETY: a private anonymous mapping, unmapped below; the asm writes one byte per page
    // inside it.
    let area = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if area == libc::MAP_FAILED {
        return Err(format!(
            "mmap of {len} bytes: {}",
            std::io::Error::last_os_error()
        ));
    }
    let seen: u64;
    // SAFETY: AVX2 is present (XCR0 enables AVX, and the host CPU this runs on has AVX2);
    // the asm touches YMM0/XMM1, the declared GPRs, and one byte per page of `area`.
    unsafe {
        std::arch::asm!(
            "vmovq xmm1, {pat}",
            "vpbroadcastq ymm0, xmm1",
            "2:",
            "mov byte ptr [{p}], 1",
            "add {p}, 4096",
            "mov {n}, {per_round}",
            "3:",
            "vextracti128 xmm1, ymm0, 1",
            "vmovq {v}, xmm1",
            "cmp {v}, {pat}",
            "jne 5f",
            "dec {n}",
            "jnz 3b",
            "mov eax, 24",
            "syscall",
            "dec {rounds}",
            "jnz 2b",
            "xor {v:e}, {v:e}",
            "5:",
            "vzeroupper",
            pat = in(reg) pat,
            p = inout(reg) area => _,
            per_round = in(reg) CHECKS_PER_ROUND / 8,
            rounds = inout(reg) rounds => _,
            n = out(reg) _,
            v = out(reg) seen,
            out("rax") _,
            out("rcx") _,
            out("r11") _,
            out("xmm0") _,
            out("xmm1") _,
            options(nostack),
        );
        libc::munmap(area, len);
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_distinct_and_never_zero() {
        let p: Vec<u64> = (0..16).map(pattern).collect();
        for (i, a) in p.iter().enumerate() {
            assert_ne!(*a, 0);
            assert!(p[i + 1..].iter().all(|b| b != a), "{a:#x} repeats");
        }
        assert_eq!(describe(pattern(2), 3), "task 2's pattern");
        assert_eq!(describe(0, 3), "zero");
    }

    #[test]
    fn registers_hold_on_this_host() {
        assert_eq!(hold_xmm(pattern(0), 3), 0);
        assert_eq!(isolation(2, 2, Regs::Xmm).map(|_| ()), Ok(()));
        if xcr0() & XCR0_SSE_AVX == XCR0_SSE_AVX {
            assert_eq!(hold_ymm_upper(pattern(1), 3), Ok(0));
            assert_eq!(isolation(2, 2, Regs::YmmUpper).map(|_| ()), Ok(()));
        }
    }
}
