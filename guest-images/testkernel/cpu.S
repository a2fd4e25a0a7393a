/*
 * cpu.S - per-cpu descriptor tables and data: the GDT (shared, one 64-bit
 * TSS descriptor per cpu), the TSSs (RSP0 for CPL3 -> CPL0 entries, IST1 for
 * NMI, IST2 for #DF), the per-cpu structs (GS base) and the stack blocks.
 */
#include "macros.h"

    .text
    .code64

/*
 * cpu_init(edi = cpu index): load the GDT, reload all segment registers,
 * point GS base at this cpu's percpu struct, fill this cpu's TSS and its
 * descriptor, ltr, lidt.  Runs on the cpu being initialised, on its own
 * kernel stack.  Clobbers caller-saved registers.
 */
FUNC cpu_init
    push %rbx
    push %r12
    mov %edi, %ebx                  // rbx = cpu index

    lgdt gdt_desc(%rip)
    pushq $KERNEL_CS                // far return to reload CS
    lea 1f(%rip), %rax
    push %rax
    lretq
1:  mov $KERNEL_DS, %eax
    mov %eax, %ss
    // DS/ES/FS/GS = null: valid at any CPL in 64-bit mode, so the iretq to
    // CPL3 has nothing to reload; GS base is set through its MSR below.
    xor %eax, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs

    // Per-cpu struct, GS base.
    imul $PERCPU_SIZE, %rbx, %r12
    lea percpu(%rip), %rax
    add %rax, %r12                  // r12 = &percpu[cpu]
    mov %r12, PC_SELF(%r12)
    mov %rbx, PC_CPU(%r12)
    mov $MSR_GS_BASE, %ecx
    mov %r12d, %eax
    mov %r12, %rdx
    shr $32, %rdx
    wrmsr

    // Stack block of this cpu.
    imul $STACK_BLOCK_SIZE, %rbx, %rax
    lea stack_blocks(%rip), %rcx
    add %rcx, %rax                  // rax = stack block base
    mov %rax, PC_STACKS(%r12)

    // TSS of this cpu: RSP0, IST1 (NMI), IST2 (#DF), no I/O bitmap.
    imul $TSS_STRIDE, %rbx, %rdx
    lea tss_array(%rip), %rcx
    add %rcx, %rdx                  // rdx = &tss[cpu]
    mov %rdx, PC_TSS(%r12)
    lea SB_RSP0_TOP(%rax), %rcx
    mov %rcx, TSS_RSP0(%rdx)
    lea SB_NMI_TOP(%rax), %rcx
    mov %rcx, TSS_IST1(%rdx)
    lea SB_DF_TOP(%rax), %rcx
    mov %rcx, TSS_IST2(%rdx)
    movw $TSS_SIZE, TSS_IOPB(%rdx)  // bitmap offset past the limit: no bitmap

    // 16-byte TSS descriptor (APM 4.8.3): base split over 15:0 -> 31:16,
    // 23:16 -> 39:32, 31:24 -> 63:56, 63:32 -> next qword; limit 15:0; type.
    mov %rdx, %rsi                  // rsi = TSS base
    mov $TSS_LIMIT, %eax
    movzwl %si, %ecx
    shl $16, %rcx
    or %rcx, %rax
    mov %rsi, %rcx
    shr $16, %rcx
    and $0xff, %ecx
    shl $32, %rcx
    or %rcx, %rax
    mov $TSS_TYPE_AVAIL64, %ecx
    shl $40, %rcx
    or %rcx, %rax
    mov %rsi, %rcx
    shr $24, %rcx
    and $0xff, %ecx
    shl $56, %rcx
    or %rcx, %rax
    mov %ebx, %edi
    shl $4, %edi                    // 16 bytes per descriptor
    lea gdt_tss(%rip), %rcx
    add %rdi, %rcx
    mov %rax, (%rcx)
    mov %rsi, %rax
    shr $32, %rax
    mov %rax, 8(%rcx)
    add $TSS_SEL_BASE, %edi         // selector = 0x30 + 16 * cpu
    ltr %di

    lidt idt_desc(%rip)
    pop %r12
    pop %rbx
    ret
ENDFUNC cpu_init

/*
 * GDT.  Accessed bits are preset so loading a selector never writes the
 * table.  Layout and selectors: defs.h.
 */
    .data
    .balign 16
    .globl gdt
gdt:
    .quad 0                         // 0x00 null
    .quad 0x00af9b000000ffff        // 0x08 KERNEL_CS: P DPL0 code RX, L=1, G=1
    .quad 0x00cf93000000ffff        // 0x10 KERNEL_DS: P DPL0 data RW, D/B=1, G=1
    .quad 0x00cff3000000ffff        // 0x18 USER_DS:   P DPL3 data RW
    .quad 0x00affb000000ffff        // 0x20 USER_CS:   P DPL3 code RX, L=1
    .quad 0x00cf9b000000ffff        // 0x28 KERNEL_CS32: P DPL0 code RX, D=1 (AP trampoline)
gdt_tss:                            // 0x30 + 16*i: TSS of cpu i (filled by cpu_init)
    .fill 2 * MAX_CPUS, 8, 0
gdt_end:
    .if (gdt_tss - gdt) != GDT_FIXED_BYTES
    .error "GDT_FIXED_BYTES does not match the GDT"
    .endif
    .if (gdt_end - gdt) != GDT_BYTES
    .error "GDT_BYTES does not match the GDT"
    .endif

    .balign 8
gdt_desc:
    .word GDT_BYTES - 1
    .quad gdt

    .bss
    .balign 64
    .globl tss_array
tss_array:
    .skip TSS_STRIDE * MAX_CPUS

    .balign 64
    .globl percpu
percpu:
    .skip PERCPU_SIZE * MAX_CPUS

/* Stacks: STACK_BLOCK_SIZE per cpu, layout in defs.h.  Not zeroed. */
    .section .stack, "aw", @nobits
    .balign PAGE_SIZE
    .globl stack_blocks
stack_blocks:
    .skip STACK_BLOCK_SIZE * MAX_CPUS
