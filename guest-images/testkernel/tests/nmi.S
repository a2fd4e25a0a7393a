/*
 * test=nmi: install an NMI hook, enable the x2APIC and send this cpu two
 * NMIs through the ICR (delivery mode NMI, physical destination = own
 * x2APIC id).  Checks that each NMI ran the hook, on the IST1 stack, and
 * that the interrupted code's registers survived a hook that clobbers all
 * caller-saved registers; the second NMI proves iretq unmasked NMIs.
 * Serial: "nmi ok", "PASS"; exit 0.
 */
#include "macros.h"

#define NMI_ROUNDS 2

    .text
    .code64

DEFINE_TEST nmi, test_nmi

test_nmi:
    push %rbx
    mov $VEC_NMI, %edi
    lea nmi_test_hook(%rip), %rsi
    call set_vector_hook
    call x2apic_enable
    test %rax, %rax
    jz 1f
    FAIL "x2apic not supported"

1:  mov $1, %ebx
2:  mov %ebx, %edi
    call nmi_send_and_check
    cmp $1, %rax
    jne 3f
    FAIL "nmi: no NMI arrived"
3:  cmp $2, %rax
    jne 4f
    FAIL "nmi: registers not preserved across the NMI"
4:  // The hook ran on this cpu's IST1 stack?
    mov %gs:PC_STACKS, %rax
    mov nmi_hook_rsp(%rip), %rcx
    lea SB_RSP0_TOP(%rax), %rdx     // IST1 stack = [RSP0 top, NMI top)
    cmp %rdx, %rcx
    jb 5f
    lea SB_NMI_TOP(%rax), %rdx
    cmp %rdx, %rcx
    jb 6f
5:  FAIL "nmi: handler not on the IST stack"
6:  inc %ebx
    cmp $NMI_ROUNDS, %ebx
    jbe 2b

    cmpq $NMI_ROUNDS, %gs:PC_NMI_COUNT
    je 7f
    FAIL "nmi: per-cpu NMI count is wrong"
7:  mov $VEC_NMI, %edi
    xor %esi, %esi
    call set_vector_hook
    PUTS "nmi ok\n"
    pop %rbx
    xor %eax, %eax
    ret

/*
 * nmi_send_and_check(edi = hook count expected afterwards): send one NMI
 * to ourselves with known values in the registers the NMI must not change.
 * Returns rax = 0 ok, 1 no NMI within NMI_WAIT_LOOPS, 2 a register changed.
 */
nmi_send_and_check:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %edi, %eax
    mov %rax, nmi_expected(%rip)
    movabsq $0x1111111111111111, %rbx
    movabsq $0x2222222222222222, %rbp
    movabsq $0x3333333333333333, %rsi
    movabsq $0x4444444444444444, %rdi
    movabsq $0x8888888888888888, %r8
    movabsq $0x9999999999999999, %r9
    movabsq $0xaaaaaaaaaaaaaaaa, %r10
    movabsq $0xbbbbbbbbbbbbbbbb, %r11
    movabsq $0xcccccccccccccccc, %r12
    movabsq $0xdddddddddddddddd, %r13
    movabsq $0xeeeeeeeeeeeeeeee, %r14
    movabsq $0xffffffffffffffff, %r15
    mov %gs:PC_APIC_ID, %rdx        // ICR 63:32 = destination
    mov $(ICR_DM_NMI), %eax
    mov $MSR_X2APIC_ICR, %ecx
    wrmsr
    mov $NMI_WAIT_LOOPS, %ecx       // the wait touches only rax, rcx
1:  mov nmi_hook_count(%rip), %rax
    cmp nmi_expected(%rip), %rax
    jae 2f
    pause
    dec %ecx
    jnz 1b
    mov $1, %eax
    jmp 9f
2:  cmp %gs:PC_APIC_ID, %rdx
    jne 8f
    movabsq $0x1111111111111111, %rax
    cmp %rax, %rbx
    jne 8f
    movabsq $0x2222222222222222, %rax
    cmp %rax, %rbp
    jne 8f
    movabsq $0x3333333333333333, %rax
    cmp %rax, %rsi
    jne 8f
    movabsq $0x4444444444444444, %rax
    cmp %rax, %rdi
    jne 8f
    movabsq $0x8888888888888888, %rax
    cmp %rax, %r8
    jne 8f
    movabsq $0x9999999999999999, %rax
    cmp %rax, %r9
    jne 8f
    movabsq $0xaaaaaaaaaaaaaaaa, %rax
    cmp %rax, %r10
    jne 8f
    movabsq $0xbbbbbbbbbbbbbbbb, %rax
    cmp %rax, %r11
    jne 8f
    movabsq $0xcccccccccccccccc, %rax
    cmp %rax, %r12
    jne 8f
    movabsq $0xdddddddddddddddd, %rax
    cmp %rax, %r13
    jne 8f
    movabsq $0xeeeeeeeeeeeeeeee, %rax
    cmp %rax, %r14
    jne 8f
    movabsq $0xffffffffffffffff, %rax
    cmp %rax, %r15
    jne 8f
    xor %eax, %eax
    jmp 9f
8:  mov $2, %eax
9:  pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* NMI hook: count, note the stack, clobber every caller-saved register. */
nmi_test_hook:
    lock incq nmi_hook_count(%rip)
    mov %rsp, nmi_hook_rsp(%rip)
    movabsq $0xdeaddeaddeaddead, %rax
    mov %rax, %rcx
    mov %rax, %rdx
    mov %rax, %rsi
    mov %rax, %rdi
    mov %rax, %r8
    mov %rax, %r9
    mov %rax, %r10
    mov %rax, %r11
    xor %eax, %eax                  // handled
    ret

    .bss
    .balign 8
nmi_hook_count:
    .quad 0
nmi_hook_rsp:
    .quad 0
nmi_expected:
    .quad 0
