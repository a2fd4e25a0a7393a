/*
 * smp.S - starting the APs and running work on them.
 *
 * BSP: smp_start_all parses the MP table, enables its x2APIC, copies the
 * trampoline to TRAMPOLINE_ADDR and sends INIT, SIPI, SIPI to every enabled
 * processor other than itself, then waits (bounded) for all to come online.
 *
 * AP: real mode at TRAMPOLINE_ADDR -> protected mode (KERNEL_CS32, our
 * GDT) -> PAE + our page tables (pml4, below 4 GiB) + EFER.LME + PG ->
 * compatibility mode -> far jump to ap_entry64 (KERNEL_CS).  The trampoline
 * only refers to itself relative to TRAMPOLINE_ADDR and to the kernel by
 * absolute link-time addresses, so it needs no patching.  ap_entry64 takes
 * the next cpu index (lock xadd), switches to that cpu's stack, runs
 * cpu_init, enables its x2APIC, prints "cpu N online", counts itself in
 * cpus_online and idles in sti;hlt waiting for smp_call_on work.
 */
#include "macros.h"

/* ------------------------- real-mode trampoline ------------------------- */
    .section .trampoline, "ax"
    .code16
    .globl trampoline_start, trampoline_end
trampoline_start:
    cli
    cld
    mov %cs, %ax                    // CS = TRAMPOLINE_ADDR >> 4, IP = 0
    mov %ax, %ds
    lgdtl (tramp_gdt_desc - trampoline_start)
    mov %cr0, %eax
    or $CR0_PE, %eax
    mov %eax, %cr0
    ljmpl $KERNEL_CS32, $(TRAMPOLINE_ADDR + (tramp_pm32 - trampoline_start))

    .code32
tramp_pm32:
    mov $KERNEL_DS, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $(CR0_PG | CR0_PE), %eax
    mov %eax, %cr0                  // long mode active, compatibility mode
    ljmp $KERNEL_CS, $ap_entry64

    .balign 8
tramp_gdt_desc:                     // 32-bit base: lgdtl from real mode
    .word GDT_BYTES - 1
    .long gdt
trampoline_end:

/* ------------------------------ 64-bit AP ------------------------------ */
    .text
    .code64

FUNC ap_entry64
    mov $KERNEL_DS, %eax
    mov %ax, %ss
    mov $1, %eax
    lock xadd %eax, ap_next_index(%rip)
    cmp $MAX_CPUS, %eax
    jae ap_park
    mov %eax, %ebx                  // rbx = cpu index
    imul $STACK_BLOCK_SIZE, %rbx, %rsp
    lea stack_blocks(%rip), %rax
    add %rax, %rsp
    add $SB_KSTACK_TOP, %rsp
    xor %ebp, %ebp
    mov ap_cr4(%rip), %rax          // same CR4/CR0 as the BSP
    mov %rax, %cr4
    mov ap_cr0(%rip), %rax
    mov %rax, %cr0

    mov %ebx, %edi
    call cpu_init
    call x2apic_enable
    movq $1, %gs:PC_ONLINE

    call console_lock
    PUTS "cpu "
    PUTDEC %rbx
    PUTS " online\n"
    call console_unlock
    lock incq cpus_online(%rip)     // after printing: the BSP's summary follows all lines

/* Idle: run mailbox work, else sleep until an interrupt (VEC_IPI_WAKE). */
ap_idle:
    cli
    mov %gs:PC_WORK_FN, %rax
    test %rax, %rax
    jz 1f
    mov %gs:PC_WORK_ARG, %rdi
    call *%rax
    mov %rax, %gs:PC_WORK_ARG       // result, then clear: x86 stores are ordered
    movq $0, %gs:PC_WORK_FN
    jmp ap_idle
1:  sti                             // sti;hlt: no wakeup lost in between
    hlt
    jmp ap_idle
ENDFUNC ap_entry64

ap_park:                            // more cpus than MAX_CPUS
    lock incq ap_overflow(%rip)
1:  cli
    hlt
    jmp 1b

/* VEC_IPI_WAKE hook: the wakeup itself was the point. */
ipi_wake_hook:
    call apic_eoi
    xor %eax, %eax
    ret

/*
 * smp_start_all: bring up every enabled processor of the MP table.
 * Prints "mptable: N cpus".  Returns rax = cpus online (BSP included),
 * rdx = cpus in the MP table.  Fails the test (test_fail) if there is no
 * MP table, no x2APIC, or more than MAX_CPUS processors.
 */
FUNC smp_start_all
    push %rbx
    push %r12
    push %r13
    call mptable_parse
    test %rax, %rax
    jnz 1f
    FAIL "mptable: not found"
1:  mov %rax, %r12                  // r12 = expected cpus
    PUTS "mptable: "
    PUTDEC %r12
    PUTS " cpus\n"
    cmp $MAX_CPUS, %r12
    jbe 2f
    FAIL "smp: more cpus than MAX_CPUS"
2:  call x2apic_enable
    test %rax, %rax
    jz 3f
    FAIL "x2apic not supported"
3:  movq $1, %gs:PC_ONLINE
    movq $1, cpus_online(%rip)
    movl $1, ap_next_index(%rip)
    cmp $1, %r12
    je .Lsmp_done

    mov $VEC_IPI_WAKE, %edi
    lea ipi_wake_hook(%rip), %rsi
    call set_vector_hook

    // Trampoline and the control registers the APs copy.
    lea trampoline_start(%rip), %rsi
    mov $TRAMPOLINE_ADDR, %edi
    mov $(trampoline_end - trampoline_start), %ecx
    rep movsb
    mov %cr0, %rax
    mov %rax, ap_cr0(%rip)
    mov %cr4, %rax
    mov %rax, ap_cr4(%rip)

    // INIT, SIPI, SIPI (MP spec B.4; KVM needs no delays, hardware would).
    mov $(ICR_DM_INIT | ICR_LEVEL_ASSERT), %edi
    call send_to_aps
    mov $IPI_DELAY_LOOPS, %edi
    call delay_loops
    mov $(ICR_DM_STARTUP | SIPI_VECTOR), %edi
    call send_to_aps
    mov $IPI_DELAY_LOOPS, %edi
    call delay_loops
    mov $(ICR_DM_STARTUP | SIPI_VECTOR), %edi
    call send_to_aps

    // Bounded wait for all of them.
    mov $SMP_WAIT_LOOPS, %ecx
4:  mov cpus_online(%rip), %rax
    cmp %r12, %rax
    jae .Lsmp_done
    pause
    dec %ecx
    jnz 4b
.Lsmp_done:
    mov cpus_online(%rip), %rax
    mov %r12, %rdx
    pop %r13
    pop %r12
    pop %rbx
    ret
ENDFUNC smp_start_all

/* send_to_aps(edi = ICR low word): send it to every MP-table cpu but us. */
send_to_aps:
    push %rbx
    push %r12
    push %r13
    mov %edi, %r13d
    mov mp_cpu_count(%rip), %r12
    xor %ebx, %ebx
1:  cmp %r12, %rbx
    jae 3f
    lea mp_apic_ids(%rip), %rax
    mov (%rax,%rbx,8), %rdi
    cmp %gs:PC_APIC_ID, %rdi
    je 2f
    mov %r13d, %esi
    call apic_send_ipi
2:  inc %rbx
    jmp 1b
3:  pop %r13
    pop %r12
    pop %rbx
    ret

/*
 * smp_call_on(edi = cpu index, rsi = fn, rdx = arg): run fn(arg) on that
 * (online, idle) AP and wait for it.  Returns rax = 0 and rdx = fn's
 * result, or rax = 1 on timeout.
 */
FUNC smp_call_on
    push %rbx
    imul $PERCPU_SIZE, %rdi, %rbx
    lea percpu(%rip), %rax
    add %rax, %rbx                  // rbx = target's percpu
    mov %rdx, PC_WORK_ARG(%rbx)
    mov %rsi, PC_WORK_FN(%rbx)      // publish after the argument
    mov PC_APIC_ID(%rbx), %rdi
    mov $(ICR_DM_FIXED | VEC_IPI_WAKE), %esi
    call apic_send_ipi
    mov $SMP_CALL_LOOPS, %ecx
1:  cmpq $0, PC_WORK_FN(%rbx)
    je 2f
    pause
    dec %ecx
    jnz 1b
    mov $1, %eax
    pop %rbx
    ret
2:  mov PC_WORK_ARG(%rbx), %rdx
    xor %eax, %eax
    pop %rbx
    ret
ENDFUNC smp_call_on

    .bss
    .balign 64
    .globl cpus_online
cpus_online:
    .quad 0
ap_next_index:
    .long 0
    .balign 8
ap_overflow:
    .quad 0
ap_cr0:
    .quad 0
ap_cr4:
    .quad 0
