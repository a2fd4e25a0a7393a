/*
 * mptable.S - find and parse the Intel MP table (MultiProcessor
 * Specification 1.4, chapter 4): the floating pointer "_MP_" on a 16-byte
 * boundary in the first KiB of the EBDA, 0x9FC00..0xA0000 or
 * 0xF0000..0x100000, pointing to the "PCMP" configuration table.
 */
#include "macros.h"

#define MPF_SIGNATURE       0x5f504d5f  /* "_MP_" little endian */
#define MPF_PHYSPTR         4           /* u32 config table address */
#define MPF_LENGTH          8           /* u8, 16-byte units */
#define MPF_FEATURE1        11          /* u8, non-zero = default configuration */
#define MPC_SIGNATURE       0x504d4350  /* "PCMP" */
#define MPC_LENGTH          4           /* u16 base table length */
#define MPC_COUNT           34          /* u16 entry count */
#define MPC_ENTRIES         44          /* first entry */
#define MP_ENTRY_PROCESSOR  0           /* 20 bytes */
#define MP_PROC_APIC_ID     1
#define MP_PROC_FLAGS       3
#define MP_PROC_EN          0x01
#define MP_PROC_BP          0x02
#define MP_ENTRY_LAST_SMALL 4           /* types 1..4: 8 bytes */
#define BDA_EBDA_SEGMENT    0x40E       /* u16 real-mode segment of the EBDA */

    .text
    .code64

/*
 * mptable_parse: rax = number of enabled processors (0 if no valid table).
 * Fills mp_cpu_count, mp_apic_ids[] (first MAX_CPUS enabled entries, in
 * table order) and mp_bsp_apic_id.  Clobbers caller-saved registers.
 */
FUNC mptable_parse
    push %rbx
    movzwl BDA_EBDA_SEGMENT, %edi   // EBDA first KiB (if the BDA names one)
    shl $4, %edi
    test %edi, %edi
    jz 1f
    lea 1024(%rdi), %rsi
    call mp_scan
    test %rax, %rax
    jnz 2f
1:  mov $0x9fc00, %edi
    mov $0xa0000, %esi
    call mp_scan
    test %rax, %rax
    jnz 2f
    mov $0xf0000, %edi
    mov $0x100000, %esi
    call mp_scan
    test %rax, %rax
    jz .Lnone

2:  mov MPF_PHYSPTR(%rax), %ebx     // config table
    test %rbx, %rbx
    jz .Lnone                       // default configuration: not supported
    cmp $0x40000000, %rbx
    jae .Lnone
    cmpl $MPC_SIGNATURE, (%rbx)
    jne .Lnone
    mov %rbx, %rdi
    movzwl MPC_LENGTH(%rbx), %esi
    call checksum8
    test %al, %al
    jnz .Lnone

    movzwl MPC_COUNT(%rbx), %ecx    // entries left
    movzwl MPC_LENGTH(%rbx), %r8d
    add %rbx, %r8                   // end of the base table
    lea MPC_ENTRIES(%rbx), %rsi     // cursor
    xor %edx, %edx                  // enabled processors
    lea mp_apic_ids(%rip), %rdi
3:  test %ecx, %ecx
    jz 6f
    cmp %r8, %rsi
    jae 6f
    movzbl (%rsi), %eax
    cmp $MP_ENTRY_PROCESSOR, %eax
    jne 5f
    movzbl MP_PROC_FLAGS(%rsi), %eax
    test $MP_PROC_EN, %eax
    jz 4f
    movzbl MP_PROC_APIC_ID(%rsi), %r9d
    test $MP_PROC_BP, %eax
    jz 7f
    mov %r9, mp_bsp_apic_id(%rip)
7:  cmp $MAX_CPUS, %edx
    jae 8f
    mov %r9, (%rdi,%rdx,8)
8:  inc %edx
4:  add $20, %rsi
    dec %ecx
    jmp 3b
5:  cmp $MP_ENTRY_LAST_SMALL, %eax
    ja 6f                           // unknown entry type: stop
    add $8, %rsi
    dec %ecx
    jmp 3b
6:  mov %rdx, mp_cpu_count(%rip)
    mov %rdx, %rax
    pop %rbx
    ret
.Lnone:
    xor %eax, %eax
    mov %rax, mp_cpu_count(%rip)
    pop %rbx
    ret
ENDFUNC mptable_parse

/*
 * mp_scan(rdi = start, rsi = end): rax = address of a valid "_MP_"
 * floating pointer (signature and checksum) on a 16-byte boundary, or 0.
 */
mp_scan:
    push %rbx
    push %r12
    mov %rdi, %rbx
    mov %rsi, %r12
1:  cmp %r12, %rbx
    jae 3f
    cmpl $MPF_SIGNATURE, (%rbx)
    jne 2f
    mov %rbx, %rdi
    movzbl MPF_LENGTH(%rbx), %esi
    shl $4, %esi
    test %esi, %esi
    jz 2f
    call checksum8
    test %al, %al
    jnz 2f
    mov %rbx, %rax
    pop %r12
    pop %rbx
    ret
2:  add $16, %rbx
    jmp 1b
3:  xor %eax, %eax
    pop %r12
    pop %rbx
    ret

/* checksum8(rdi = p, rsi = length): al = byte sum (0 = valid). */
checksum8:
    xor %eax, %eax
1:  test %rsi, %rsi
    jz 2f
    add (%rdi), %al
    inc %rdi
    dec %rsi
    jmp 1b
2:  ret

    .bss
    .balign 8
    .globl mp_cpu_count, mp_apic_ids, mp_bsp_apic_id
mp_cpu_count:
    .quad 0
mp_bsp_apic_id:
    .quad 0
mp_apic_ids:
    .skip 8 * MAX_CPUS
