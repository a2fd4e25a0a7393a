/*
 * test=ibs-off (boot with `ibsvm run --ibs off`): a CPU without IBS, as
 * architecturally defined (APM vol. 3 CPUID; vpmu/DEVICE.md §2):
 *  - CPUID (CPL0) Fn8000_0001 ECX[10] (IBS) = 0, and Fn8000_001B EAX = 0 if
 *    the leaf exists (Fn8000_0000 EAX >= 0x8000001B);
 *  - every MSR 0xC0011030-0xC001103F #GPs on read and on write of 0;
 *  - no AMD extended APIC either: Fn8000_0001 ECX[3] (ExtApicSpace) = 0
 *    and, in x2APIC mode, EFEAT 0x840, ECTRL 0x841 and EILVT 0x850-0x853
 *    #GP on read and write (x2APIC MSRs that do not exist, SDM 10.12.1.2).
 * Serial: "ibs-off: max extended leaf 0x...", "ibs-off: no ibs ok", "PASS";
 * exit 0.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST ibs-off, test_ibs_off

test_ibs_off:
    push %rbx
    push %r12
    mov $CPUID_EXT_MAX, %eax
    xor %ecx, %ecx
    cpuid
    mov %eax, %r12d                 // r12 = max extended leaf
    PUTS "ibs-off: max extended leaf "
    PUTHEX %r12
    PUTS "\n"
    mov $CPUID_EXT_FEATURES, %eax
    xor %ecx, %ecx
    cpuid
    test $CPUID_EXT_ECX_IBS, %ecx
    jz 1f
    FAIL "ibs-off: Fn8000_0001 ECX[10] (IBS) is set"
1:  test $CPUID_EXT_ECX_EXTAPIC, %ecx
    jz 2f
    FAIL "ibs-off: Fn8000_0001 ECX[3] (ExtApicSpace) is set without an extended APIC"
2:  cmp $CPUID_IBS_LEAF, %r12d
    jb 3f
    mov $CPUID_IBS_LEAF, %eax
    xor %ecx, %ecx
    cpuid
    test %eax, %eax
    jz 3f
    FAIL "ibs-off: Fn8000_001B EAX (IBS caps) is not 0"

3:  mov $MSR_IBS_FIRST, %ebx
4:  mov %ebx, %edi
    call ibs_expect_gp_rd
    test %rax, %rax
    jnz .Lreadable
    mov %ebx, %edi
    xor %esi, %esi
    call ibs_expect_gp_wr
    test %rax, %rax
    jnz .Lwritable
    inc %ebx
    cmp $MSR_IBS_LAST, %ebx
    jbe 4b

    call x2apic_enable
    test %rax, %rax
    jz 5f
    FAIL "ibs-off: x2apic not supported"
5:  lea ext_apic_msrs(%rip), %r12
6:  mov (%r12), %ebx
    test %ebx, %ebx
    jz 7f
    mov %ebx, %edi
    call ibs_expect_gp_rd
    test %rax, %rax
    jnz .Lreadable
    mov %ebx, %edi
    mov $EILVT_RESET, %esi
    call ibs_expect_gp_wr
    test %rax, %rax
    jnz .Lwritable
    add $4, %r12
    jmp 6b
7:  PUTS "ibs-off: no ibs ok\n"
    pop %r12
    pop %rbx
    xor %eax, %eax
    ret

.Lreadable:
    PUTS "ibs-off: msr "
    PUTHEX %rbx
    PUTS "\n"
    FAIL "ibs-off: rdmsr did not #GP"
.Lwritable:
    PUTS "ibs-off: msr "
    PUTHEX %rbx
    PUTS "\n"
    FAIL "ibs-off: wrmsr did not #GP"

    .section .rodata
    .balign 4
ext_apic_msrs:
    .long MSR_X2APIC_EFEAT, MSR_X2APIC_ECTRL
    .long MSR_X2APIC_EILVT0, MSR_X2APIC_EILVT0 + 1, MSR_X2APIC_EILVT0 + 2, MSR_X2APIC_EILVT0 + 3
    .long 0
