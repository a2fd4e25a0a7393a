/*
 * test=ibs-cpuid caps=0xNNN: what a Linux IBS driver checks in CPUID
 * (vpmu/DEVICE.md §2), read at CPL0 (at CPL3 the dev hosts answer
 * with their own CPUID, docs/host-kvm.md):
 *  - Fn8000_0000 EAX >= 0x8000001B;
 *  - Fn8000_0001 ECX bit 10 (IBS) and bit 3 (ExtApicSpace) set;
 *  - Fn8000_001B EAX == caps= from the command line, EBX = ECX = EDX = 0;
 *  - Fn0000_0001 family/model is not one on which Linux's IBS driver takes
 *    an erratum path: family 0x10, 0x16-0x18, 0x19 with model < 0x10.
 * Serial: "ibs-cpuid: caps 0x3ff", "ibs-cpuid: family 0x19 model 0x21",
 * "ibs-cpuid: ok", "PASS"; exit 0 (1 with "FAIL: ..." otherwise).
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST ibs-cpuid, test_ibs_cpuid

test_ibs_cpuid:
    push %rbx
    push %r12
    push %r13
    LOAD_STR %rdi, "caps"
    xor %esi, %esi
    call cmdline_get_u64
    cmp $1, %rdx
    je 1f
    FAIL "ibs-cpuid: needs caps=0xNNN on the command line"
1:  mov %rax, %r12                  // r12 = expected caps

    mov $CPUID_EXT_MAX, %eax
    xor %ecx, %ecx
    cpuid
    cmp $CPUID_IBS_LEAF, %eax
    jae 2f
    PUTS "ibs-cpuid: max extended leaf "
    PUTHEX %rax
    PUTS "\n"
    FAIL "ibs-cpuid: Fn8000_0000 EAX < 0x8000001b"

2:  mov $CPUID_EXT_FEATURES, %eax
    xor %ecx, %ecx
    cpuid
    test $CPUID_EXT_ECX_IBS, %ecx
    jnz 3f
    FAIL "ibs-cpuid: Fn8000_0001 ECX[10] (IBS) is clear"
3:  test $CPUID_EXT_ECX_EXTAPIC, %ecx
    jnz 4f
    FAIL "ibs-cpuid: Fn8000_0001 ECX[3] (ExtApicSpace) is clear"

4:  mov $CPUID_IBS_LEAF, %eax
    xor %ecx, %ecx
    cpuid
    mov %eax, %r13d
    PUTS "ibs-cpuid: caps "
    PUTHEX %r13
    PUTS "\n"
    or %ecx, %ebx
    or %edx, %ebx
    jz 5f
    FAIL "ibs-cpuid: Fn8000_001B EBX/ECX/EDX not 0"
5:  cmp %r12, %r13
    je 6f
    PUTS "ibs-cpuid: expected caps "
    PUTHEX %r12
    PUTS "\n"
    FAIL "ibs-cpuid: Fn8000_001B EAX is not the expected caps"

    // Family/model (AMD APM vol. 3, CPUID Fn0000_0001 EAX).
6:  mov $1, %eax
    xor %ecx, %ecx
    cpuid
    mov %eax, %edx
    shr $8, %edx
    and $0xf, %edx                  // edx = base family
    mov %eax, %ecx
    shr $4, %ecx
    and $0xf, %ecx                  // ecx = base model
    cmp $0xf, %edx
    jne 7f
    mov %eax, %esi
    shr $20, %esi
    and $0xff, %esi
    add %esi, %edx                  // family = 0xf + ExtFamily
    mov %eax, %esi
    shr $16, %esi
    and $0xf, %esi
    shl $4, %esi
    or %esi, %ecx                   // model = ExtModel << 4 | BaseModel
7:  mov %rdx, %r12                  // r12 = family
    mov %rcx, %r13                  // r13 = model
    PUTS "ibs-cpuid: family "
    PUTHEX %r12
    PUTS " model "
    PUTHEX %r13
    PUTS "\n"
    cmp $0x10, %r12
    jne 8f
    FAIL "ibs-cpuid: family 0x10 (Linux programs the IBS LVT offset through PCI)"
8:  cmp $0x16, %r12
    jb 9f
    cmp $0x18, %r12
    ja 9f
    FAIL "ibs-cpuid: family 0x16-0x18 (Linux's fetch_count_reset_broken path)"
9:  cmp $0x19, %r12
    jne 10f
    cmp $0x10, %r13
    jae 10f
    FAIL "ibs-cpuid: family 0x19 model < 0x10 (Linux's erratum 1197 path)"
10: PUTS "ibs-cpuid: ok\n"
    pop %r13
    pop %r12
    pop %rbx
    xor %eax, %eax
    ret
