/*
 * msr.S - MSR access that survives #GP (an MSR the VMM does not handle
 * gets #GP injected: boot contract).
 */
#include "macros.h"

    .text
    .code64

/*
 * rdmsr_safe(edi = msr): rax = value (edx:eax), rdx = 0 on success, or
 * rax = 0, rdx = FAULT_FLAG | vector if the rdmsr faulted.  Clobbers rcx.
 */
FUNC rdmsr_safe
    mov %edi, %ecx
.Lrdmsr_insn:
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    xor %edx, %edx
    ret
.Lrdmsr_fixup:
    xor %eax, %eax
    mov %gs:PC_FAULT_VEC, %rdx
    or $FAULT_FLAG, %rdx
    ret
    EXTABLE .Lrdmsr_insn, .Lrdmsr_fixup
ENDFUNC rdmsr_safe

/*
 * wrmsr_safe(edi = msr, rsi = value): rdx = 0 on success, or
 * FAULT_FLAG | vector if the wrmsr faulted.  Clobbers rax, rcx.
 */
FUNC wrmsr_safe
    mov %edi, %ecx
    mov %esi, %eax
    mov %rsi, %rdx
    shr $32, %rdx
.Lwrmsr_insn:
    wrmsr
    xor %edx, %edx
    ret
.Lwrmsr_fixup:
    mov %gs:PC_FAULT_VEC, %rdx
    or $FAULT_FLAG, %rdx
    ret
    EXTABLE .Lwrmsr_insn, .Lwrmsr_fixup
ENDFUNC wrmsr_safe
