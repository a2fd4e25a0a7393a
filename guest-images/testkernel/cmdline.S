/*
 * cmdline.S - the kernel command line: copied from the zero page at entry,
 * then searched for key=value tokens (separated by spaces).
 */
#include "macros.h"

    .text
    .code64

/*
 * cmdline_init: copy hdr.cmd_line_ptr's string into cmdline_buf
 * (at most CMDLINE_MAX - 1 bytes).  A missing zero page or a pointer
 * outside our 1 GiB map gives an empty command line.
 */
FUNC cmdline_init
    lea cmdline_buf(%rip), %rdi
    movb $0, (%rdi)
    mov boot_params_ptr(%rip), %rsi
    test %rsi, %rsi
    jz 3f
    cmp $0x40000000, %rsi
    jae 3f
    mov BP_HDR_CMD_LINE_PTR(%rsi), %esi     // u32, zero-extended
    test %rsi, %rsi
    jz 3f
    cmp $0x40000000, %rsi
    jae 3f
    mov $(CMDLINE_MAX - 1), %ecx
1:  movzbl (%rsi), %eax
    test %eax, %eax
    jz 2f
    mov %al, (%rdi)
    inc %rsi
    inc %rdi
    dec %ecx
    jnz 1b
2:  movb $0, (%rdi)
3:  ret
ENDFUNC cmdline_init

/*
 * cmdline_find(rdi = key, NUL-terminated): find the token "key=value".
 * Returns rax = value pointer (0 if absent), rdx = value length.
 */
FUNC cmdline_find
    lea cmdline_buf(%rip), %rsi
1:  movzbl (%rsi), %eax             // skip spaces
    cmp $' ', %eax
    jne 2f
    inc %rsi
    jmp 1b
2:  test %eax, %eax
    jz .Lnotfound
    // Compare the key with the token at rsi.
    mov %rdi, %r8
    mov %rsi, %r9
3:  movzbl (%r8), %eax
    test %eax, %eax
    jz 4f                           // end of key
    cmp (%r9), %al
    jne 5f
    inc %r8
    inc %r9
    jmp 3b
4:  cmpb $'=', (%r9)
    jne 5f
    lea 1(%r9), %rax                // value
    mov %rax, %rdx
6:  movzbl (%rdx), %ecx
    test %ecx, %ecx
    jz 7f
    cmp $' ', %ecx
    je 7f
    inc %rdx
    jmp 6b
7:  sub %rax, %rdx                  // length
    ret
5:  movzbl (%rsi), %eax             // skip the rest of this token
    test %eax, %eax
    jz .Lnotfound
    cmp $' ', %eax
    je 1b
    inc %rsi
    jmp 5b
.Lnotfound:
    xor %eax, %eax
    xor %edx, %edx
    ret
ENDFUNC cmdline_find

/*
 * cmdline_get_u64(rdi = key, rsi = default): value of key=N, N decimal or
 * 0x-prefixed hex.  Returns rax = value, rdx = 1 if found and well formed,
 * 0 if absent (rax = default), 2 if malformed (rax = default).
 */
FUNC cmdline_get_u64
    push %rbx
    mov %rsi, %rbx                  // default
    call cmdline_find
    test %rax, %rax
    jz .Ldefault
    test %rdx, %rdx
    jz .Lmalformed
    mov %rax, %rsi                  // cursor
    lea (%rax,%rdx), %rdi           // end
    xor %eax, %eax                  // value
    mov $10, %r8d                   // base
    cmp $2, %rdx
    jbe 1f
    cmpb $'0', (%rsi)
    jne 1f
    movzbl 1(%rsi), %ecx
    or $0x20, %ecx                  // 'X' -> 'x'
    cmp $'x', %ecx
    jne 1f
    add $2, %rsi
    mov $16, %r8d
1:  cmp %rdi, %rsi
    jae 9f
    movzbl (%rsi), %ecx
    sub $'0', %ecx
    cmp $9, %ecx
    jbe 2f
    cmp $16, %r8d
    jne .Lmalformed
    movzbl (%rsi), %ecx
    or $0x20, %ecx                  // lower case
    sub $'a', %ecx
    cmp $5, %ecx
    ja .Lmalformed
    add $10, %ecx
2:  imul %r8, %rax
    add %rcx, %rax
    inc %rsi
    jmp 1b
9:  mov $1, %edx
    pop %rbx
    ret
.Lmalformed:
    mov %rbx, %rax
    mov $2, %edx
    pop %rbx
    ret
.Ldefault:
    mov %rbx, %rax
    xor %edx, %edx
    pop %rbx
    ret
ENDFUNC cmdline_get_u64

/* str_eq_n(rdi = NUL-terminated s, rsi = p, rdx = n): rax = 1 if s == p[0..n). */
FUNC str_eq_n
1:  movzbl (%rdi), %eax
    test %rdx, %rdx
    jz 2f
    test %eax, %eax
    jz 3f                           // s ended first
    cmp (%rsi), %al
    jne 3f
    inc %rdi
    inc %rsi
    dec %rdx
    jmp 1b
2:  test %eax, %eax                 // p ended: equal iff s ends too
    jnz 3f
    mov $1, %eax
    ret
3:  xor %eax, %eax
    ret
ENDFUNC str_eq_n

    .bss
    .globl cmdline_buf
cmdline_buf:
    .skip CMDLINE_MAX
