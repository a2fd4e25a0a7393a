//! `fpu`: does each guest task keep its own vector registers across context switches?
//!
//! The pipeline crash of the `userspace` check (a freshly exec'd busybox dying in glibc's
//! `__ctype_init`) was another task's AVX registers showing through: on a CPL0-emulating
//! host guest CPL3 code sees the host's CPUID and runs with the host's XCR0 whatever the
//! guest kernel set, so glibc uses AVX and AVX-512; a guest kernel that saves less than
//! that XCR0 (it ran `noxsave`, when XSAVE could not run at CPL0) lets those registers
//! leak between tasks (guest-images/linux/README.md, "The pipeline crash"). ibsvm now
//! completes XSAVE/XRSTOR at CPL0, so the kernel switches every component.
//!
//! What CPL3 code can use is checked first, as the CPU reports it: CPUID.1:ECX[27]
//! OSXSAVE (the kernel set CR4.OSXSAVE) before XGETBV, which raises #UD without it.
//!
//! - `xstate-coverage`: with OSXSAVE, every state component XCR0 enables at CPL3 (XGETBV)
//!   is one the kernel saves and restores (`arch_prctl(ARCH_GET_XCOMP_SUPP)`); without it
//!   (a CPU without XSAVE, or a kernel that left it off), CPL3 has x87 and SSE state only,
//!   and the kernel must report exactly those, the FXSAVE state.
//! - `xmm-isolation`: XMM0–XMM7 stay each task's own. A few processes, all on this CPU,
//!   hold their own pattern in registers and check it in a loop of plain register
//!   compares, yielding the CPU every round, so that the kernel switches tasks again and
//!   again.
//! - `ymm-isolation` (when AVX is usable: the CPU has it and XCR0 enables its state): the
//!   upper half of YMM0, each round also touching a new page (the crash's page fault).
//! - `avx512-isolation` (when AVX-512F is usable: the CPU has it and XCR0 enables the three
//!   AVX-512 components): opmask K1, bits 511:256 of ZMM0 and ZMM16, likewise.
//!
//! Options (`KEY=VALUE` arguments): `FPU_TASKS` (processes, default 3), `FPU_ROUNDS`
//! (page faults and yields per process, default 300).

use ibsvm_guest_checks::cpu::pin_to_current_cpu;
use ibsvm_guest_checks::options::Options;
use ibsvm_guest_checks::{describe_wait_status, Check};

/// CPUID.1:ECX bit 26 XSAVE (the CPU has the XSAVE feature set) and bit 27 OSXSAVE (CR4.
/// OSXSAVE is set: XGETBV and the XCR0-enabled state work): SDM vol. 2A "CPUID" Table
/// 3-10, vol. 1 §13.2; AMD APM vol. 3 appendix E, Fn0000_0001_ECX.
const CPUID1_ECX_XSAVE: u32 = 1 << 26;
const CPUID1_ECX_OSXSAVE: u32 = 1 << 27;
/// XCR0 bits 0 (x87) and 1 (SSE): the state FXSAVE/FXRSTOR switch, all a task has without
/// XSAVE (SDM vol. 1 §13.3, §10.5; Linux's XFEATURE_MASK_FPSSE, which
/// `ARCH_GET_XCOMP_SUPP` reports on a CPU with FXSR and without XSAVE:
/// arch/x86/kernel/fpu/init.c, fpu__init_system_xstate_size_legacy).
const XCR0_FPSSE: u64 = 0b11;
/// The components user space can use (x87 to PKRU, bit 9; AMX, 17-18), the ones
/// `ARCH_GET_XCOMP_SUPP` speaks about (arch/x86/include/asm/fpu/xstate.h,
/// XFEATURE_MASK_USER_SUPPORTED).
const XCR0_USER: u64 = 0x6_02ff;
/// arch_prctl code: the XSAVE components the kernel supports for user space, since Linux
/// 5.16 (arch/x86/include/uapi/asm/prctl.h).
const ARCH_GET_XCOMP_SUPP: libc::c_int = 0x1021;

/// The vector state user space has, as the CPU reports it to this task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VectorState {
    /// OSXSAVE: XCR0 (XGETBV at CPL3) says which components are enabled.
    Xsave {
        /// XCR0.
        xcr0: u64,
    },
    /// No OSXSAVE: x87 and SSE only; XGETBV and every VEX instruction raise #UD (SDM vol.
    /// 2C "XGETBV", vol. 2A §2.4).
    Fxsave {
        /// The CPU has XSAVE (CPUID.1:ECX[26]) but the kernel left it off.
        cpu_has_xsave: bool,
    },
}

impl VectorState {
    /// Reads CPUID leaf 1, and XCR0 if OSXSAVE allows XGETBV.
    fn of_this_cpu() -> Self {
        // Unsafe in older Rust, safe in recent releases (1.95 here): allowed either way.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU and only writes its result registers.
        let ecx = unsafe { std::arch::x86_64::__cpuid(1) }.ecx;
        if ecx & CPUID1_ECX_OSXSAVE == 0 {
            return Self::Fxsave {
                cpu_has_xsave: ecx & CPUID1_ECX_XSAVE != 0,
            };
        }
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 reads XCR0; OSXSAVE is set, so it does not raise #UD
        // (SDM vol. 2C "XGETBV"); it touches only EAX/EDX.
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
        }
        Self::Xsave {
            xcr0: u64::from(hi) << 32 | u64::from(lo),
        }
    }

    /// What it is, for the log.
    fn describe(self) -> String {
        match self {
            Self::Xsave { xcr0 } => format!(
                "xcr0 {xcr0:#x} (XGETBV at CPL3; bit 1 SSE, 2 AVX, 5-7 AVX-512)"
            ),
            Self::Fxsave { cpu_has_xsave } => format!(
                "CPUID.1:ECX[27] OSXSAVE clear ({}): x87 and SSE state only, XGETBV and AVX raise #UD",
                if cpu_has_xsave {
                    "the CPU has XSAVE, the kernel left it off"
                } else {
                    "a CPU without XSAVE"
                }
            ),
        }
    }
}

/// The components the kernel saves and restores for user space.
fn kernel_xfeatures() -> Result<u64, String> {
    let mut features = 0u64;
    // SAFETY: ARCH_GET_XCOMP_SUPP writes one u64 through the pointer, which is valid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_SUPP,
            &mut features as *mut u64,
        )
    };
    if r != 0 {
        return Err(format!(
            "arch_prctl(ARCH_GET_XCOMP_SUPP): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(features)
}

/// `xstate-coverage`: what user space can use, the kernel must switch.
fn coverage(state: VectorState) -> Result<String, String> {
    coverage_of(state, kernel_xfeatures()?)
}

/// [`coverage`] given the components the kernel reports it saves.
fn coverage_of(state: VectorState, saved: u64) -> Result<String, String> {
    match state {
        VectorState::Xsave { xcr0 } => match xcr0 & XCR0_USER & !saved {
            0 => Ok(format!(
                "XCR0 {xcr0:#x} at CPL3, the kernel switches {saved:#x}: every usable component"
            )),
            unsaved => Err(format!(
                "XCR0 {xcr0:#x} at CPL3 enables components {unsaved:#x} that the kernel ({saved:#x}) never saves: their registers are shared between tasks"
            )),
        },
        VectorState::Fxsave { .. } if saved == XCR0_FPSSE => Ok(format!(
            "no OSXSAVE: CPL3 has x87 and SSE state only, and the kernel switches {saved:#x}: the FXSAVE state, every usable component"
        )),
        VectorState::Fxsave { .. } => Err(format!(
            "no OSXSAVE, so CPL3 has x87 and SSE state only, but the kernel reports components {saved:#x}, not {XCR0_FPSSE:#x} (x87, SSE)"
        )),
    }
}

/// Which registers a task holds its pattern in.
#[derive(Clone, Copy)]
enum Regs {
    /// XMM0-XMM7 (saved by FXSAVE).
    Xmm,
    /// The upper 128 bits of YMM0 (AVX state).
    YmmUpper,
    /// K1, ZMM0[511:256] and ZMM16 (the three AVX-512 components).
    Avx512,
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
    let state = VectorState::of_this_cpu();
    c.info(state.describe());
    let (tasks, rounds) = match opts {
        Ok(o) => o,
        Err(e) => {
            c.run("options", || Err(e));
            c.finish();
        }
    };
    c.run("xstate-coverage", || coverage(state));
    c.run("xmm-isolation", || isolation(tasks, rounds, Regs::Xmm));
    // std's detection: the CPUID feature bit, OSXSAVE, and XCR0 enabling the state (XCR0
    // bits 2:1 for AVX, 7:5 for AVX-512; SDM vol. 1 §14.3, §15.2).
    if is_x86_feature_detected!("avx") {
        c.run("ymm-isolation", || isolation(tasks, rounds, Regs::YmmUpper));
    } else {
        c.info("ymm-isolation does not apply: AVX is not usable here (CPU, OSXSAVE or XCR0), so AVX instructions raise #UD and there is no YMM state to isolate");
    }
    if is_x86_feature_detected!("avx512f") {
        c.run("avx512-isolation", || {
            isolation(tasks, rounds, Regs::Avx512)
        });
    } else {
        c.info("avx512-isolation does not apply: AVX-512F is not usable here (CPU, OSXSAVE or XCR0), so there is no opmask or ZMM state to isolate");
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
                // SAFETY: std's detection says AVX-512F is usable: the CPU has it and
                // XCR0 enables its three components.
                Regs::Avx512 if is_x86_feature_detected!("avx512f") => unsafe {
                    hold_avx512(pattern(k), rounds)
                },
                Regs::Avx512 => Err("AVX-512F is not usable here".into()),
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
        Regs::Avx512 => ("K1, ZMM0[511:256] and ZMM16", "page faults and yields"),
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

/// Fresh anonymous pages: touching each one is a page fault, kernel code that may switch
/// tasks.
struct FreshPages {
    start: *mut libc::c_void,
    len: usize,
}

impl FreshPages {
    fn new(count: u64) -> Result<Self, String> {
        let len = (count as usize) * 4096;
        // SAFETY: a private anonymous mapping, unmapped by Drop.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if start == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self { start, len })
    }
}

impl Drop for FreshPages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made.
        unsafe { libc::munmap(self.start, self.len) };
    }
}

/// Puts `pat` in bits 191:128 of YMM0, then `rounds` times touches a new page, checks
/// those bits and yields. Returns 0, or the first foreign value; an error if AVX is not
/// usable.
fn hold_ymm_upper(pat: u64, rounds: u64) -> Result<u64, String> {
    if !is_x86_feature_detected!("avx") {
        return Err("AVX is not usable here".into());
    }
    let pages = FreshPages::new(rounds)?;
    let seen: u64;
    // SAFETY: AVX is usable (checked above); VMOVQ, VINSERTF128 and VEXTRACTF128 are AVX
    // (SDM vol. 2). The asm touches YMM0/XMM1, the declared GPRs, and one byte in each of
    // the `rounds` pages; sched_yield (24, arch/x86/entry/syscalls/syscall_64.tbl) has no
    // arguments.
    unsafe {
        std::arch::asm!(
            "vmovq xmm1, {pat}",
            "vinsertf128 ymm0, ymm0, xmm1, 1",
            "2:",
            "mov byte ptr [{p}], 1",
            "add {p}, 4096",
            "mov {n}, {per_round}",
            "3:",
            "vextractf128 xmm1, ymm0, 1",
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
            p = inout(reg) pages.start => _,
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
    }
    Ok(seen)
}

/// Fills K1 (with the low 16 bits of `pat`), ZMM0 and ZMM16 with `pat`, then `rounds`
/// times touches a new page, checks K1, ZMM0[319:256] and ZMM16[63:0] and yields.
/// Returns 0, or the first foreign value.
///
/// # Safety
/// The CPU must have AVX-512F and XCR0 enable its three components.
#[target_feature(enable = "avx512f")]
unsafe fn hold_avx512(pat: u64, rounds: u64) -> Result<u64, String> {
    let pages = FreshPages::new(rounds)?;
    let seen: u64;
    // SAFETY: AVX-512F is usable (the caller's contract); KMOVW, VPBROADCASTQ zmm,
    // VEXTRACTI64X4 and VMOVQ with XMM16 are AVX-512F. The asm touches K1, ZMM0, ZMM1,
    // ZMM16, the declared GPRs and one byte in each of the `rounds` pages; sched_yield as
    // in hold_ymm_upper.
    unsafe {
        std::arch::asm!(
            "vmovq xmm1, {pat}",
            "vpbroadcastq zmm0, xmm1",
            "vpbroadcastq zmm16, xmm1",
            "kmovw k1, {pat:e}",
            "2:",
            "mov byte ptr [{p}], 1",
            "add {p}, 4096",
            "mov {n}, {per_round}",
            "3:",
            "kmovw {v:e}, k1",
            "cmp {v:e}, {pat16:e}",
            "jne 5f",
            "vextracti64x4 ymm1, zmm0, 1",
            "vmovq {v}, xmm1",
            "cmp {v}, {pat}",
            "jne 5f",
            "vmovq {v}, xmm16",
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
            pat16 = in(reg) pat & 0xffff,
            p = inout(reg) pages.start => _,
            per_round = in(reg) CHECKS_PER_ROUND / 8,
            rounds = inout(reg) rounds => _,
            n = out(reg) _,
            v = out(reg) seen,
            out("rax") _,
            out("rcx") _,
            out("r11") _,
            out("zmm0") _,
            out("zmm1") _,
            out("zmm16") _,
            out("k1") _,
            options(nostack),
        );
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
        if is_x86_feature_detected!("avx") {
            assert_eq!(hold_ymm_upper(pattern(1), 3), Ok(0));
            assert_eq!(isolation(2, 2, Regs::YmmUpper).map(|_| ()), Ok(()));
        } else {
            assert!(hold_ymm_upper(pattern(1), 3).is_err());
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: std's detection says AVX-512F is usable.
            assert_eq!(unsafe { hold_avx512(pattern(2), 3) }, Ok(0));
            assert_eq!(isolation(2, 2, Regs::Avx512).map(|_| ()), Ok(()));
        }
        // This host's kernel switches what its CPU lets user space use.
        let state = VectorState::of_this_cpu();
        assert!(coverage(state).is_ok(), "{state:?}");
    }

    #[test]
    fn coverage_follows_what_cpl3_can_use() {
        let xsave = |xcr0| VectorState::Xsave { xcr0 };
        let fxsave = VectorState::Fxsave {
            cpu_has_xsave: false,
        };
        assert!(coverage_of(xsave(0xe7), 0x2e7).is_ok());
        assert!(coverage_of(xsave(0x7), 0x7).is_ok());
        assert!(coverage_of(xsave(0xe7), 0x7).is_err(), "AVX-512 unsaved");
        assert!(
            coverage_of(xsave(0x7), XCR0_FPSSE).is_err(),
            "the noxsave leak"
        );
        assert!(coverage_of(fxsave, XCR0_FPSSE).is_ok());
        assert!(
            coverage_of(fxsave, 0x7).is_err(),
            "AVX claimed without OSXSAVE"
        );
        assert!(coverage_of(fxsave, 0x1).is_err(), "SSE not switched");
    }
}
