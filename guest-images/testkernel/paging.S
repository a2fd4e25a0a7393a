/*
 * paging.S - the kernel's own page tables: identity map of the first 1 GiB
 * with 2 MiB pages, user-accessible (PTE_US) so CPL3 test code and its
 * stacks can live inside the kernel image.  The tables are in .bss below
 * 4 GiB, so APs can load the same CR3 from 32-bit code (smp.S).
 */
#include "macros.h"

    .text
    .code64

/* paging_init: build the tables and switch CR3 to them (BSP, once). */
FUNC paging_init
    lea pd(%rip), %rdi
    mov $PDE_2M_FLAGS, %eax         // physical 0, flags
    mov $512, %ecx
1:  mov %rax, (%rdi)
    add $HUGE_PAGE_SIZE, %rax
    add $8, %rdi
    dec %ecx
    jnz 1b

    lea pd(%rip), %rax
    or $PTE_TABLE_FLAGS, %rax
    mov %rax, pdpt(%rip)            // PDPT[0] -> PD: 0..1 GiB
    lea pdpt(%rip), %rax
    or $PTE_TABLE_FLAGS, %rax
    mov %rax, pml4(%rip)            // PML4[0] -> PDPT

    // CPL0 runs from user-accessible pages: SMEP/SMAP/PKE must be off.
    mov %cr4, %rax
    and $~(CR4_SMEP | CR4_SMAP | CR4_PKE), %rax
    mov %rax, %cr4

    lea pml4(%rip), %rax
    mov %rax, %cr3
    ret
ENDFUNC paging_init

    .bss
    .balign PAGE_SIZE
    .globl pml4
pml4:
    .skip PAGE_SIZE
pdpt:
    .skip PAGE_SIZE
pd:
    .skip PAGE_SIZE
