/*
 * test=triplefault: an unexpected triple fault.  Load an IDT whose 256 gates
 * are all not present and fault: the #GP gate is not present (#NP), nor is
 * the #DF gate, so the CPU shuts down (KVM_EXIT_SHUTDOWN) with a usable-looking
 * IDT.  ibsvm reports a guest crash (exit status 120, diagnostic on stderr).
 * Serial: "triplefault: faulting with an IDT of absent gates".
 *
 * test=reboot: the deliberate reset idiom (Linux reboot=t, boot loaders): load
 * an empty IDT (limit 0) and fault.  ibsvm reports a guest reset, exit 0.
 * Serial: "reboot: faulting with an empty IDT".
 *
 * If the VM somehow survives either: "FAIL: ..." and exit 1.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST triplefault, test_triplefault
DEFINE_TEST reboot, test_reboot

test_triplefault:
    PUTS "triplefault: faulting with an IDT of absent gates\n"
    lidt absent_idt_desc(%rip)
    jmp fault_now

test_reboot:
    PUTS "reboot: faulting with an empty IDT\n"
    lidt empty_idt_desc(%rip)

fault_now:
    movabsq $0x8000000000000000, %rax   // non-canonical: #GP on access
    mov (%rax), %rax
    lidt idt_desc(%rip)
    FAIL "still running after a triple fault"

    .section .rodata
    .balign 8
empty_idt_desc:
    .word 0
    .quad 0
absent_idt_desc:
    .word 256 * 16 - 1
    .quad absent_idt

    .bss
    .balign 4096
absent_idt:
    .skip 256 * 16
