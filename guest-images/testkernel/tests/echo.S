/*
 * test=echo: console input.  ibsvm forwards its stdin (when it can poll it:
 * a pipe or a terminal, not /dev/null) to COM1's receive FIFO.  Read one
 * line - up to '\n' or '\r' (not printed), ECHO_LINE_MAX bytes, or the end
 * of the wait once at least one byte came (input closed without a newline)
 * - polling LSR.DR with one budget of ECHO_WAIT_POLLS for the whole line
 * (~10 s on the dev hosts).  Bytes outside 0x20..0x7e are printed as '?'.
 * Serial: "echo: LINE", "PASS"; exit 0.
 *         "FAIL: echo: no input" (nothing before the bound); exit 1.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST echo, test_echo

test_echo:
    push %rbx
    push %r12
    push %r13
    lea echo_line(%rip), %rbx       // rbx = buffer
    xor %r12d, %r12d                // r12 = bytes stored
    mov $ECHO_WAIT_POLLS, %r13      // r13 = polls left (whole line)

1:  cmp $ECHO_LINE_MAX, %r12
    jae 4f
    mov %r13, %rdi
    call getc_poll
    mov %rdx, %r13
    test %rax, %rax
    js 3f                           // budget spent
    cmp $'\n', %al
    je 4f
    cmp $'\r', %al
    je 4f
    cmp $0x20, %al
    jb 2f
    cmp $0x7e, %al
    jbe 5f
2:  mov $'?', %al
5:  mov %al, (%rbx,%r12)
    inc %r12
    jmp 1b

3:  test %r12, %r12
    jnz 4f
    FAIL "echo: no input"

4:  PUTS "echo: "
    mov %rbx, %rdi
    mov %r12, %rsi
    call puts_n
    PUTS "\n"
    pop %r13
    pop %r12
    pop %rbx
    xor %eax, %eax
    ret

    .bss
echo_line:
    .skip ECHO_LINE_MAX
