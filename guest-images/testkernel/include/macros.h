/*
 * macros.h - GNU as macros shared by the .S files (AT&T syntax throughout).
 *
 * Calling convention: System V AMD64 (args rdi, rsi, rdx, rcx; result rax,
 * sometimes rdx too; rbx rbp r12-r15 callee-saved) unless a function's
 * comment says otherwise.  The console helpers in serial.S preserve every
 * register so they can be dropped anywhere.
 *
 * Code that runs at CPL0 is executed by KVM's instruction emulator on the
 * dev hosts (docs/host-kvm.md): plain integer instructions only - no int3/int n,
 * ud2, fences, SSE/AVX, xsave, cmpxchg16b, popcnt.  `make check` greps the
 * disassembly of the CPL0 sections for those.  CPL3 code goes in .usertext.
 */
#ifndef TESTKERNEL_MACROS_H
#define TESTKERNEL_MACROS_H

#include "defs.h"

/* Global function symbol with type, for readable objdump output. */
.macro FUNC name
    .globl \name
    .type \name, @function
\name:
.endm

.macro ENDFUNC name
    .size \name, . - \name
.endm

/* reg = address of a NUL-terminated copy of str placed in .rodata. */
.macro LOAD_STR reg, str
    .pushsection .rodata.str, "a"
.Lstr_\@:
    .asciz "\str"
    .popsection
    lea .Lstr_\@(%rip), \reg
.endm

/* Print a literal string (no lock taken, all registers preserved). */
.macro PUTS str
    push %rdi
    LOAD_STR %rdi, "\str"
    call puts
    pop %rdi
.endm

/* Print a value in hex / decimal (all registers preserved). */
.macro PUTHEX src
    push %rdi
    mov \src, %rdi
    call put_hex
    pop %rdi
.endm

.macro PUTDEC src
    push %rdi
    mov \src, %rdi
    call put_dec
    pop %rdi
.endm

/* Fail the running test with a literal reason (prints "FAIL: reason"). */
.macro FAIL reason
    LOAD_STR %rdi, "\reason"
    jmp test_fail
.endm

/*
 * Register a test: `DEFINE_TEST name, function`.  The dispatcher in
 * entry.S looks the name given by test=NAME up in the .testtab section
 * (16-byte entries: name pointer, function pointer) and calls the
 * function on the BSP with the kernel fully initialised.  The function
 * ends through test_pass / test_fail / exit_vm, or returns rax = 0 (pass)
 * or non-zero (fail).
 */
.macro DEFINE_TEST name, fn
    .pushsection .rodata.str, "a"
.Ltestname_\@:
    .asciz "\name"
    .popsection
    .pushsection .testtab, "a"
    .balign 8
    .quad .Ltestname_\@, \fn
    .popsection
.endm

/*
 * Exception fixup: if the instruction at `insn` raises an exception
 * (vectors 0-31 except NMI), idt.S records it in %gs:PC_FAULT_* and
 * resumes at `fixup` with all registers as they were at the fault.
 */
.macro EXTABLE insn, fixup
    .pushsection .extable, "a"
    .balign 8
    .quad \insn, \fixup
    .popsection
.endm

#endif /* TESTKERNEL_MACROS_H */
