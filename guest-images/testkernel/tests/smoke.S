/*
 * test=smoke [loops=N]: the IDT catches an injected #GP (rdmsr of an MSR
 * nobody implements), a CPL3 loop of N (default 10 million) dec/jnz
 * iterations runs and comes back through #UD.
 * Serial: "gp ok", "user ok", "PASS"; exit 0.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST smoke, test_smoke

test_smoke:
    push %rbx
    mov $MSR_UNIMPLEMENTED, %edi
    call rdmsr_safe
    cmp $(FAULT_FLAG | VEC_GP), %rdx
    je 1f
    FAIL "rdmsr of MSR 0xc0de0001 did not raise #GP"
1:  PUTS "gp ok\n"

    LOAD_STR %rdi, "loops"
    mov $SMOKE_USER_LOOPS, %esi
    call cmdline_get_u64
    cmp $2, %rdx
    jne 2f
    FAIL "smoke: malformed loops="
2:  mov %rax, %rsi
    lea user_count_down(%rip), %rdi
    xor %edx, %edx
    call run_user
    cmp $USER_MAGIC, %rax
    je 3f
    FAIL "user function returned a wrong value"
3:  PUTS "user ok\n"
    pop %rbx
    xor %eax, %eax
    ret
