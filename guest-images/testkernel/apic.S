/*
 * apic.S - local APIC in x2APIC mode (SDM 10.12): everything is an MSR.
 * The in-kernel LAPIC of KVM handles these; AMD's extended LVTs (EILVT,
 * MSR 0x850+) are emulated by ibsvm (docs/host-kvm.md).
 */
#include "macros.h"

    .text
    .code64

/*
 * x2apic_enable: check CPUID.1:ECX[21], set IA32_APIC_BASE EN|EXTD,
 * software-enable the APIC (SVR bit 8, spurious vector 0xFF), record the
 * x2APIC id in %gs:PC_APIC_ID.  Returns rax = 0, or 1 if x2APIC is not
 * advertised.  Clobbers caller-saved registers.
 */
FUNC x2apic_enable
    push %rbx
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    test $(1 << 21), %ecx           // CPUID Fn0000_0001 ECX[21] x2APIC
    jz 1f
    mov $MSR_APIC_BASE, %ecx
    rdmsr
    or $(APIC_BASE_EN | APIC_BASE_EXTD), %eax
    wrmsr
    mov $MSR_X2APIC_SVR, %ecx
    mov $(SVR_APIC_ENABLE | SPURIOUS_VECTOR), %eax
    xor %edx, %edx
    wrmsr
    mov $MSR_X2APIC_ID, %ecx
    rdmsr
    mov %eax, %eax
    mov %rax, %gs:PC_APIC_ID
    xor %eax, %eax
    pop %rbx
    ret
1:  mov $1, %eax
    pop %rbx
    ret
ENDFUNC x2apic_enable

/* apic_send_ipi(edi = destination x2APIC id, esi = ICR low word). */
FUNC apic_send_ipi
    mov $MSR_X2APIC_ICR, %ecx
    mov %esi, %eax
    mov %edi, %edx
    wrmsr
    ret
ENDFUNC apic_send_ipi

/* apic_eoi: end of interrupt (all registers preserved). */
FUNC apic_eoi
    push %rax
    push %rcx
    push %rdx
    mov $MSR_X2APIC_EOI, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    pop %rdx
    pop %rcx
    pop %rax
    ret
ENDFUNC apic_eoi

/* delay_loops(rdi = n): spin n iterations (emulated: ~1 us each). */
FUNC delay_loops
    test %rdi, %rdi
    jz 2f
1:  pause
    dec %rdi
    jnz 1b
2:  ret
ENDFUNC delay_loops
