/*
 * ibs_lib.S - helpers shared by the IBS tests (tests/ibs_*.S); registers no
 * test itself.
 *
 *  - ibs_cpuid_caps: CPUID at CPL0 (at CPL3 the dev hosts answer with their
 *    own values, docs/host-kvm.md), IBS capability word or 0.
 *  - ibs_expect_gp_rd / ibs_expect_gp_wr: an MSR access must raise #GP.
 *  - ibs_setup_nmi: x2APIC on, EILVT0 = NMI unmasked, NMI hook installed.
 *  - ibs_nmi_hook: the sampling NMI handler.  Like Linux's perf_ibs_handle_irq
 *    (vpmu/DEVICE.md §3) it reads each unit's CTL, and if Val is set
 *    records the CTL and the sample address (IBS_OP_RIP / IBS_FETCH_LINADDR),
 *    then re-arms with CTL = En | MaxCnt (Val 0) until the unit's target
 *    count is reached, then writes CTL = 0.  It uses plain rdmsr/wrmsr (no
 *    fault may happen in an NMI hook, idt.S): callers check the caps first.
 *  - ibs_user_wait (CPL3): spin until *ibs_wait_ptr >= ibs_wait_target or
 *    the iteration bound runs out.
 */
#include "macros.h"

    .text
    .code64

/*
 * ibs_cpuid_caps: rax = CPUID Fn8000_001B EAX if Fn8000_0000 EAX >=
 * 0x8000001B and Fn8000_0001 ECX[10] (IBS) is set, else 0.
 * rdx = Fn8000_0001 ECX.  Clobbers rcx, rsi, rdi.
 */
FUNC ibs_cpuid_caps
    push %rbx
    mov $CPUID_EXT_FEATURES, %eax
    xor %ecx, %ecx
    cpuid
    mov %ecx, %esi                  // esi = Fn8000_0001 ECX
    xor %edi, %edi                  // edi = caps
    mov $CPUID_EXT_MAX, %eax
    xor %ecx, %ecx
    cpuid
    cmp $CPUID_IBS_LEAF, %eax
    jb 1f
    test $CPUID_EXT_ECX_IBS, %esi
    jz 1f
    mov $CPUID_IBS_LEAF, %eax
    xor %ecx, %ecx
    cpuid
    mov %eax, %edi
1:  mov %edi, %eax
    mov %esi, %edx
    pop %rbx
    ret
ENDFUNC ibs_cpuid_caps

/*
 * ibs_expect_gp_rd(edi = msr): rax = 0 if rdmsr raised #GP, 1 if not.
 * ibs_expect_gp_wr(edi = msr, rsi = value): same for wrmsr.
 */
FUNC ibs_expect_gp_rd
    call rdmsr_safe
    cmp $(FAULT_FLAG | VEC_GP), %rdx
    setne %al
    movzbl %al, %eax
    ret
ENDFUNC ibs_expect_gp_rd

FUNC ibs_expect_gp_wr
    call wrmsr_safe
    cmp $(FAULT_FLAG | VEC_GP), %rdx
    setne %al
    movzbl %al, %eax
    ret
ENDFUNC ibs_expect_gp_wr

/* ibs_wrmsr(edi = msr, rsi = value): plain wrmsr.  Clobbers rax, rcx, rdx. */
FUNC ibs_wrmsr
    mov %edi, %ecx
    mov %esi, %eax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    ret
ENDFUNC ibs_wrmsr

/* ibs_rdmsr(edi = msr): rax = value, plain rdmsr.  Clobbers rcx, rdx. */
FUNC ibs_rdmsr
    mov %edi, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    ret
ENDFUNC ibs_rdmsr

/*
 * ibs_setup_nmi: the Linux-like set-up (vpmu/DEVICE.md §3): x2APIC
 * on, EILVT0 (IBS_CTL offset 0) = 0x400 (NMI, unmasked), the sampling NMI
 * hook installed, the sample state cleared.  Fails the test on error.
 */
FUNC ibs_setup_nmi
    call x2apic_enable
    test %rax, %rax
    jz 1f
    FAIL "ibs: x2apic not supported"
1:  call ibs_reset_state
    mov $VEC_NMI, %edi
    lea ibs_nmi_hook(%rip), %rsi
    call set_vector_hook
    mov $MSR_X2APIC_EILVT0, %edi
    mov $EILVT_MSG_NMI, %esi
    call wrmsr_safe
    test %rdx, %rdx
    jz 2f
    FAIL "ibs: writing EILVT0 = 0x400 faulted"
2:  ret
ENDFUNC ibs_setup_nmi

/* ibs_reset_state: zero every counter and slot of the sample state. */
FUNC ibs_reset_state
    lea ibs_state_start(%rip), %rdi
    lea ibs_state_end(%rip), %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    rep stosq
    ret
ENDFUNC ibs_reset_state

/*
 * ibs_arm_op(rdi = target samples, rsi = MaxCnt): set the op unit's
 * target and re-arm value (En | MaxCnt), then enable it.
 * ibs_arm_fetch(rdi = target, rsi = MaxCnt): the same for fetch (En bit 48).
 * Clobber caller-saved registers.
 */
FUNC ibs_arm_op
    mov %rdi, ibs_op_target(%rip)
    and $IBS_OP_MAX_CNT, %esi
    or $IBS_OP_EN, %esi
    mov %rsi, ibs_op_rearm(%rip)
    mov $MSR_IBS_OP_CTL, %edi
    jmp ibs_wrmsr
ENDFUNC ibs_arm_op

FUNC ibs_arm_fetch
    mov %rdi, ibs_fetch_target(%rip)
    and $IBS_FETCH_MAX_CNT, %esi
    bts $IBS_FETCH_EN_BIT, %rsi
    mov %rsi, ibs_fetch_rearm(%rip)
    mov $MSR_IBS_FETCH_CTL, %edi
    jmp ibs_wrmsr
ENDFUNC ibs_arm_fetch

/*
 * ibs_nmi_hook(rdi = frame, rsi = vector): see the file comment.  Always
 * claims the NMI (returns 0); an NMI that found no Val in either unit is
 * counted in ibs_nmi_empty for the test to report.
 */
FUNC ibs_nmi_hook
    push %rbx
    push %r12
    incq ibs_nmi_total(%rip)
    xor %r12d, %r12d                // r12 = units that had a sample

    // ---- op unit ----
    mov $MSR_IBS_OP_CTL, %edi
    call ibs_rdmsr
    test $IBS_OP_VAL, %eax
    jz .Lfetch_unit
    inc %r12d
    mov ibs_op_count(%rip), %rbx
    test %rbx, %rbx
    jnz 1f
    mov %rax, ibs_op_first_ctl(%rip)
1:  // CTL must show En = 1, Val = 1 and MaxCnt as programmed.
    mov %rax, %rdx
    and $(IBS_OP_EN | IBS_OP_VAL | IBS_OP_MAX_CNT), %edx
    mov ibs_op_rearm(%rip), %rcx
    or $IBS_OP_VAL, %rcx
    cmp %rcx, %rdx
    je 2f
    incq ibs_op_bad_ctl(%rip)
    mov %rax, ibs_op_last_bad_ctl(%rip)
2:  mov $MSR_IBS_OP_RIP, %edi
    call ibs_rdmsr
    cmp $IBS_MAX_SAMPLES, %rbx
    jae 3f
    lea ibs_op_addrs(%rip), %rcx
    mov %rax, (%rcx,%rbx,8)
3:  inc %rbx
    mov %rbx, ibs_op_count(%rip)
    cmp ibs_op_target(%rip), %rbx
    jae 4f
    // Re-arm: CTL = En | MaxCnt (Val 0), then read back: Val must be 0.
    mov $MSR_IBS_OP_CTL, %edi
    mov ibs_op_rearm(%rip), %rsi
    call ibs_wrmsr
    mov $MSR_IBS_OP_CTL, %edi
    call ibs_rdmsr
    and $(IBS_OP_EN | IBS_OP_VAL), %eax
    cmp $IBS_OP_EN, %eax
    je .Lfetch_unit
    incq ibs_op_bad_rearm(%rip)
    jmp .Lfetch_unit
4:  mov $MSR_IBS_OP_CTL, %edi       // target reached: stop the unit
    xor %esi, %esi
    call ibs_wrmsr

    // ---- fetch unit ----
.Lfetch_unit:
    mov $MSR_IBS_FETCH_CTL, %edi
    call ibs_rdmsr
    bt $IBS_FETCH_VAL_BIT, %rax
    jnc .Lhook_done
    inc %r12d
    mov ibs_fetch_count(%rip), %rbx
    test %rbx, %rbx
    jnz 1f
    mov %rax, ibs_fetch_first_ctl(%rip)
1:  // En = 1, Val = 1, PhyAddrValid = 0, MaxCnt as programmed.
    mov %rax, %rdx
    movabsq $((1 << IBS_FETCH_EN_BIT) | (1 << IBS_FETCH_VAL_BIT) | (1 << IBS_FETCH_PHYADDR_VALID_BIT) | IBS_FETCH_MAX_CNT), %rcx
    and %rcx, %rdx
    mov ibs_fetch_rearm(%rip), %rcx
    bts $IBS_FETCH_VAL_BIT, %rcx
    cmp %rcx, %rdx
    je 2f
    incq ibs_fetch_bad_ctl(%rip)
    mov %rax, ibs_fetch_last_bad_ctl(%rip)
2:  mov $MSR_IBS_FETCH_LINADDR, %edi
    call ibs_rdmsr
    cmp $IBS_MAX_SAMPLES, %rbx
    jae 3f
    lea ibs_fetch_addrs(%rip), %rcx
    mov %rax, (%rcx,%rbx,8)
3:  mov $MSR_IBS_FETCH_PHYSADDR, %edi
    call ibs_rdmsr
    or %rax, ibs_fetch_physaddr_or(%rip)
    inc %rbx
    mov %rbx, ibs_fetch_count(%rip)
    cmp ibs_fetch_target(%rip), %rbx
    jae 4f
    mov $MSR_IBS_FETCH_CTL, %edi
    mov ibs_fetch_rearm(%rip), %rsi
    call ibs_wrmsr
    jmp .Lhook_done
4:  mov $MSR_IBS_FETCH_CTL, %edi
    xor %esi, %esi
    call ibs_wrmsr

.Lhook_done:
    test %r12d, %r12d
    jnz 5f
    incq ibs_nmi_empty(%rip)
5:  xor %eax, %eax
    pop %r12
    pop %rbx
    ret
ENDFUNC ibs_nmi_hook

/*
 * ibs_count_in(rdi = array, rsi = n, rdx = lo, rcx = hi): rax = how many
 * of the first n (at most IBS_MAX_SAMPLES) entries lie in [lo, hi).
 */
FUNC ibs_count_in
    xor %eax, %eax
    cmp $IBS_MAX_SAMPLES, %rsi
    jbe 1f
    mov $IBS_MAX_SAMPLES, %esi
1:  test %rsi, %rsi
    jz 3f
    mov (%rdi), %r8
    cmp %rdx, %r8
    jb 2f
    cmp %rcx, %r8
    jae 2f
    inc %rax
2:  add $8, %rdi
    dec %rsi
    jmp 1b
3:  ret
ENDFUNC ibs_count_in

/*
 * ibs_run_user_wait(rdi = &counter, rsi = target): run ibs_user_wait at
 * CPL3 (IF = 0: only NMIs).  rax = 0 if the counter reached the target,
 * 1 if the iteration bound ran out.
 */
FUNC ibs_run_user_wait
    mov %rdi, ibs_wait_ptr(%rip)
    mov %rsi, ibs_wait_target(%rip)
    lea ibs_user_wait(%rip), %rdi
    mov $IBS_USER_WAIT_LOOPS, %esi
    xor %edx, %edx
    jmp run_user
ENDFUNC ibs_run_user_wait

/* ---------------------------- CPL3 code ---------------------------- */
    .section .usertext, "ax"

/*
 * ibs_user_wait(rdi = iteration bound): spin until *ibs_wait_ptr >=
 * ibs_wait_target (rax = 0) or the bound runs out (rax = 1).  The samples
 * of ibs-sample are expected in [ibs_user_wait, ibs_user_wait_end).
 */
    .balign 16
FUNC ibs_user_wait
    mov ibs_wait_ptr(%rip), %rsi
    mov ibs_wait_target(%rip), %rdx
1:  cmp %rdx, (%rsi)
    jae 2f
    dec %rdi
    jnz 1b
    mov $1, %eax
    ret
2:  xor %eax, %eax
    ret
    .globl ibs_user_wait_end
ibs_user_wait_end:
ENDFUNC ibs_user_wait

/* ------------------------------ state ------------------------------ */
    .bss
    .balign 8
    .globl ibs_wait_ptr, ibs_wait_target
ibs_wait_ptr:
    .quad 0
ibs_wait_target:
    .quad 0

    .globl ibs_op_target, ibs_op_rearm, ibs_op_count, ibs_op_first_ctl
    .globl ibs_op_bad_ctl, ibs_op_last_bad_ctl, ibs_op_bad_rearm, ibs_op_addrs
    .globl ibs_fetch_target, ibs_fetch_rearm, ibs_fetch_count, ibs_fetch_first_ctl
    .globl ibs_fetch_bad_ctl, ibs_fetch_last_bad_ctl, ibs_fetch_addrs
    .globl ibs_fetch_physaddr_or, ibs_nmi_total, ibs_nmi_empty
ibs_state_start:
ibs_op_target:          .quad 0     // samples wanted
ibs_op_rearm:           .quad 0     // En | MaxCnt
ibs_op_count:           .quad 0     // samples taken
ibs_op_first_ctl:       .quad 0     // CTL of the first sample
ibs_op_bad_ctl:         .quad 0     // samples whose CTL lacked En/Val/MaxCnt
ibs_op_last_bad_ctl:    .quad 0
ibs_op_bad_rearm:       .quad 0     // re-arms that did not read back En=1 Val=0
ibs_fetch_target:       .quad 0
ibs_fetch_rearm:        .quad 0
ibs_fetch_count:        .quad 0
ibs_fetch_first_ctl:    .quad 0
ibs_fetch_bad_ctl:      .quad 0
ibs_fetch_last_bad_ctl: .quad 0
ibs_fetch_physaddr_or:  .quad 0     // OR of every IBS_FETCH_PHYSADDR read
ibs_nmi_total:          .quad 0     // NMIs through the hook
ibs_nmi_empty:          .quad 0     // ... that found no Val in either unit
ibs_op_addrs:           .skip 8 * IBS_MAX_SAMPLES
ibs_fetch_addrs:        .skip 8 * IBS_MAX_SAMPLES
ibs_state_end:
