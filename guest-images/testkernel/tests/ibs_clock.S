/*
 * test=ibs-clock: how well the synthetic sampler's clock tracks the guest's
 * own execution (make bench's ibs_clock_error).  The same CPL3 spin of
 * loops=N iterations (default IBS_CLOCK_LOOPS) runs twice, timed with RDTSC
 * at CPL0 around it:
 *  1. with IBS off: no exit at all, so its TSC ticks are the loop's own
 *     execution time;
 *  2. with the op unit sampling at MaxCnt IBS_CLOCK_MAXCNT (period
 *     MaxCnt * 16 ops), the NMI handler (tests/ibs_lib.S) re-arming it
 *     for every sample.
 * Phase 2's sample count times the period is what the sampler's clock
 * counted; phase 1's ticks are what the guest executed (the handler's own
 * few hundred instructions per sample aside).  ibsvm's --stats gives the
 * guest TSC rate to compare them.  Fails only if no sample arrived.
 * Serial: "ibs-clock: loops N", "ibs-clock: maxcnt M", "ibs-clock: tsc
 * alone A", "ibs-clock: tsc sampled B", "ibs-clock: op samples S" (all
 * decimal), "PASS"; exit 0.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST ibs-clock, test_ibs_clock

test_ibs_clock:
    push %rbx
    push %r12
    push %r13
    push %r14
    call ibs_cpuid_caps
    test %rax, %rax
    jnz 1f
    FAIL "ibs-clock: CPUID advertises no IBS"
1:  LOAD_STR %rdi, "loops"
    mov $IBS_CLOCK_LOOPS, %rsi
    call cmdline_get_u64
    cmp $2, %rdx
    jne 3f
    FAIL "ibs-clock: loops=N is not a number"
3:  test %rax, %rax
    jnz 4f
    FAIL "ibs-clock: loops=0"
4:  mov %rax, %r14                  // r14 = loops
    call ibs_setup_nmi
    // The spin waits for a count that never comes: it runs all r14 iterations.
    lea ibs_op_count(%rip), %rax
    mov %rax, ibs_wait_ptr(%rip)
    movq $-1, ibs_wait_target(%rip)

    // ---- 1: alone ----
    call clock_spin
    mov %rax, %r12                  // r12 = ticks alone

    // ---- 2: sampled ----
    mov $-1, %rdi                   // never reach the target: always re-arm
    mov $IBS_CLOCK_MAXCNT, %esi
    call ibs_arm_op
    call clock_spin
    mov %rax, %r13                  // r13 = ticks sampled
    mov $MSR_IBS_OP_CTL, %edi
    xor %esi, %esi
    call ibs_wrmsr

    PUTS "ibs-clock: loops "
    PUTDEC %r14
    PUTS "\nibs-clock: maxcnt "
    mov $IBS_CLOCK_MAXCNT, %eax
    PUTDEC %rax
    PUTS "\nibs-clock: tsc alone "
    PUTDEC %r12
    PUTS "\nibs-clock: tsc sampled "
    PUTDEC %r13
    PUTS "\nibs-clock: op samples "
    PUTDEC ibs_op_count(%rip)
    PUTS "\n"
    cmpq $0, ibs_op_count(%rip)
    jne 2f
    FAIL "ibs-clock: no op sample arrived"
2:  mov $VEC_NMI, %edi
    xor %esi, %esi
    call set_vector_hook
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    xor %eax, %eax
    ret

/* clock_spin: ibs_user_wait for r14 iterations at CPL3 (IF = 0); rax = TSC
 * ticks it took. */
clock_spin:
    push %rbx
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %rbx
    lea ibs_user_wait(%rip), %rdi
    mov %r14, %rsi
    xor %edx, %edx
    call run_user
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %rbx, %rax
    pop %rbx
    ret
