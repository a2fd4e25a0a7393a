/*
 * test=halt: every cpu halts with interrupts disabled, as Linux's halt and
 * its power-off without ACPI leave them (arch/x86/kernel/process.c
 * stop_this_cpu); nothing can wake them, and ibsvm ends the VM with status 0.
 * Starts the APs (as test=smp), has each run halt_forever through
 * smp_call_on, then halts this cpu too.
 * Serial: as test=smp, then "halt: N cpus halting with interrupts off";
 * exit 0 (from the VMM).
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST halt, test_halt

test_halt:
    call smp_start_all              // rax = online, rdx = expected
    mov %rax, %r12                  // r12 = cpus online
    call smp_report
    mov $1, %ebx
1:  cmp %r12, %rbx
    jae 2f
    mov %ebx, %edi
    lea halt_forever(%rip), %rsi
    xor %edx, %edx
    call smp_call_on
    test %rax, %rax
    jz 3f
    FAIL "halt: an AP did not take the call"
3:  inc %ebx
    jmp 1b
2:  PUTS "halt: "
    PUTDEC %r12
    PUTS " cpus halting with interrupts off\n"
    jmp halt_forever

/* Answers smp_call_on at once (it never returns), then halts for good. */
halt_forever:
    movq $0, %gs:PC_WORK_FN
    cli
1:  hlt
    jmp 1b
