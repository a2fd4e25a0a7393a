/*
 * user.S - running a function at CPL3.
 *
 * run_user enters CPL3 with iretq on this cpu's user stack; the function
 * returns into user_entry, which executes `ud2` at user_done_ud2.  The #UD
 * handler (idt.S) recognises that exact RIP from CPL3 and jumps to
 * user_return_from_frame, which resumes run_user's caller.  (SYSCALL is
 * broken on the dev hosts and int n cannot be emulated: docs/host-kvm.md.)
 * CPL3 code runs natively there, so heavy loops belong in .usertext.
 */
#include "macros.h"

    .text
    .code64

/*
 * run_user(rdi = fn, rsi = arg, rdx = rflags or 0 for RFLAGS_FIXED):
 * call fn(arg) at CPL3; returns rax = fn's rax.  fn must live in
 * .usertext (or any user-accessible page; all of our map is) and must
 * not touch privileged state.  An unexpected exception at CPL3 exits 3.
 */
FUNC run_user
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %gs:PC_USER_KRSP
    movq $1, %gs:PC_IN_USER
    test %rdx, %rdx
    jnz 1f
    mov $RFLAGS_FIXED, %edx
1:  or $RFLAGS_FIXED, %rdx
    mov %gs:PC_STACKS, %rax
    add $SB_USTACK_TOP, %rax
    pushq $USER_DS                  // SS
    push %rax                       // RSP
    push %rdx                       // RFLAGS
    pushq $USER_CS                  // CS
    lea user_entry(%rip), %rax
    push %rax                       // RIP
    mov %rdi, %rbx                  // fn
    mov %rsi, %rdi                  // arg
    xor %ebp, %ebp
    iretq
ENDFUNC run_user

/*
 * user_return_from_frame(rdi = exception frame): called on the RSP0 stack
 * by the #UD handler; abandons that stack and returns from run_user.
 */
FUNC user_return_from_frame
    mov FR_RAX(%rdi), %rax
    mov $KERNEL_DS, %ecx
    mov %cx, %ss                    // the CPL3 -> CPL0 entry left SS null
    movq $0, %gs:PC_IN_USER
    mov %gs:PC_USER_KRSP, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret
ENDFUNC user_return_from_frame

/* ---------------------------- CPL3 code ---------------------------- */
    .section .usertext, "ax"

/* Entered by iretq: rbx = fn, rdi = arg. */
FUNC user_entry
    call *%rbx
    .globl user_done_ud2
user_done_ud2:
    ud2
ENDFUNC user_entry

/* user_count_down(rdi = n): spin n times (dec/jnz), return USER_MAGIC. */
FUNC user_count_down
    test %rdi, %rdi
    jz 2f
1:  dec %rdi
    jnz 1b
2:  mov $USER_MAGIC, %eax
    ret
ENDFUNC user_count_down
