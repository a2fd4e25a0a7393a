/*
 * test=exit code=N: write N (0..255, default 0) to the test-exit port so
 * ibsvm's exit-status propagation can be checked.
 * Serial: "exit: status N"; exit N.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST exit, test_exit

test_exit:
    LOAD_STR %rdi, "code"
    xor %esi, %esi
    call cmdline_get_u64
    cmp $2, %rdx
    jne 1f
    FAIL "exit: malformed code="
1:  cmp $255, %rax
    jbe 2f
    FAIL "exit: code= must be 0..255"
2:  mov %rax, %rbx
    PUTS "exit: status "
    PUTDEC %rbx
    PUTS "\n"
    mov %ebx, %edi
    jmp exit_vm
