/*
 * test=fault [kind=gp|user|nmi]: raise an exception nobody expects, to
 * check the report and ibsvm's propagation of exit status 3.
 *   kind=gp   (default) unguarded rdmsr of MSR 0xc0de0001 at CPL0 -> #GP
 *   kind=user CPL3 code executes hlt -> #GP from CPL3 (via TSS.RSP0)
 *   kind=nmi  self-NMI with no NMI hook installed
 * Serial: "fault: kind K", then
 *   "unexpected exception #GP: vector 0xd error 0x0 rip 0x... cs 0x8 ..."
 *   (cs 0x23 for kind=user, "NMI: vector 0x2" for kind=nmi) and a "regs:"
 *   line; exit 3.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST fault, test_fault

test_fault:
    LOAD_STR %rdi, "kind"
    call cmdline_find
    mov %rax, %rbx
    mov %rdx, %r12
    test %rbx, %rbx
    jnz 1f
    LOAD_STR %rbx, "gp"
    mov $2, %r12d
1:  PUTS "fault: kind "
    mov %rbx, %rdi
    mov %r12, %rsi
    call puts_n
    PUTS "\n"

    LOAD_STR %rdi, "gp"
    mov %rbx, %rsi
    mov %r12, %rdx
    call str_eq_n
    test %rax, %rax
    jz 2f
    mov $MSR_UNIMPLEMENTED, %ecx
    rdmsr                           // no extable entry: unexpected #GP
    FAIL "fault: rdmsr did not fault"

2:  LOAD_STR %rdi, "user"
    mov %rbx, %rsi
    mov %r12, %rdx
    call str_eq_n
    test %rax, %rax
    jz 3f
    lea user_hlt(%rip), %rdi
    xor %esi, %esi
    xor %edx, %edx
    call run_user
    FAIL "fault: hlt at CPL3 did not fault"

3:  LOAD_STR %rdi, "nmi"
    mov %rbx, %rsi
    mov %r12, %rdx
    call str_eq_n
    test %rax, %rax
    jz 4f
    call x2apic_enable
    mov %gs:PC_APIC_ID, %edi
    mov $ICR_DM_NMI, %esi
    call apic_send_ipi
    mov $NMI_WAIT_LOOPS, %edi
    call delay_loops
    FAIL "fault: the NMI did not arrive"

4:  FAIL "fault: unknown kind= (gp, user, nmi)"

    .section .usertext, "ax"
user_hlt:
    hlt                             // privileged: #GP at CPL3
    ret
