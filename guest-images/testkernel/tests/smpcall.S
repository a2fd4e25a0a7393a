/*
 * test=smpcall: like test=smp, then run a function on every AP through
 * smp_call_on (mailbox + fixed IPI VEC_IPI_WAKE) and check its result.
 * Serial: as test=smp, then "smpcall: K aps answered" (K = N-1), "PASS".
 */
#include "macros.h"

#define SMPCALL_ARG 0x5000

    .text
    .code64

DEFINE_TEST smpcall, test_smpcall

test_smpcall:
    push %rbx
    push %r12
    call smp_start_all
    mov %rax, %r12                  // r12 = cpus online
    call smp_report
    mov $1, %ebx
1:  cmp %r12, %rbx
    jae 3f
    mov %ebx, %edi
    lea smpcall_fn(%rip), %rsi
    mov $SMPCALL_ARG, %edx
    call smp_call_on
    test %rax, %rax
    jz 2f
    FAIL "smpcall: an AP did not run the call"
2:  lea SMPCALL_ARG(%rbx), %rax
    cmp %rax, %rdx
    je 4f
    FAIL "smpcall: wrong result from an AP"
4:  inc %ebx
    jmp 1b
3:  lea -1(%r12), %rbx
    PUTS "smpcall: "
    PUTDEC %rbx
    PUTS " aps answered\n"
    pop %r12
    pop %rbx
    xor %eax, %eax
    ret

/* Runs on the AP: returns arg + its cpu index. */
smpcall_fn:
    mov %gs:PC_CPU, %rax
    add %rdi, %rax
    ret
