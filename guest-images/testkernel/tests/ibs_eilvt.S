/*
 * test=ibs-eilvt: the AMD extended APIC registers IBS interrupts go
 * through, in x2APIC MSR form (vpmu/DEVICE.md §3 and §5.2; vpmu
 * src/apic.rs):
 *  - EILVT0-3 (0x850-0x853) read 0x00010000 (masked) at reset, EFEAT
 *    (0x840) reads 0x00040000, ECTRL (0x841) reads 0;
 *  - EILVT writes read back: 0x400 (NMI), 0x10400 (masked NMI), 0xf0 (fixed
 *    vector 0xf0); delivery status (bit 12) is read-only (written 0x1400
 *    reads 0x400); reserved bits (11, 17, 32) #GP; EFEAT is read-only
 *    (#GP); ECTRL takes 0 and #GPs on 1;
 *  - a masked entry gets no NMI: EILVT0 = 0x10400, op sampling enabled, a
 *    CPL3 loop runs for many periods: no NMI arrives, but IBS_OP_CTL shows
 *    En=1 Val=1 (the sample latched, the interrupt was suppressed);
 *  - a fixed-vector entry: EILVT0 = IBS_FIXED_VECTOR (0xe0, message type
 *    fixed), op sampling enabled, the CPL3 loop runs with IF=1: exactly
 *    that interrupt arrives (no NMI), with Val=1 in IBS_OP_CTL.
 * Serial: "ibs-eilvt: ok", "ibs-eilvt: masked: no nmi, val latched",
 * "ibs-eilvt: fixed vector 0xe0 delivered", "PASS"; exit 0.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST ibs-eilvt, test_ibs_eilvt

test_ibs_eilvt:
    push %rbx
    push %r12
    push %r13
    call ibs_cpuid_caps
    test %rax, %rax
    jnz 1f
    FAIL "ibs-eilvt: CPUID advertises no IBS"
1:  call x2apic_enable
    test %rax, %rax
    jz 2f
    FAIL "ibs-eilvt: x2apic not supported"

    // ---- reset values ----
2:  mov $MSR_X2APIC_EILVT0, %ebx
3:  mov %ebx, %edi
    call rdmsr_safe
    test %rdx, %rdx
    jnz .Lread_fault
    cmp $EILVT_RESET, %rax
    jne .Lbad_reset
    inc %ebx
    cmp $(MSR_X2APIC_EILVT0 + 3), %ebx
    jbe 3b
    mov $MSR_X2APIC_EFEAT, %ebx
    mov %ebx, %edi
    call rdmsr_safe
    test %rdx, %rdx
    jnz .Lread_fault
    cmp $EFEAT_VALUE, %rax
    jne .Lbad_reset
    mov $MSR_X2APIC_ECTRL, %ebx
    mov %ebx, %edi
    call rdmsr_safe
    test %rdx, %rdx
    jnz .Lread_fault
    test %rax, %rax
    jnz .Lbad_reset

    // ---- write / read back on every entry ----
    mov $MSR_X2APIC_EILVT0, %ebx
4:  lea eilvt_values(%rip), %r12
5:  lea eilvt_values_end(%rip), %rax
    cmp %rax, %r12
    jae 6f
    mov %ebx, %edi
    mov (%r12), %rsi
    call wrmsr_safe
    test %rdx, %rdx
    jnz .Lwrite_fault
    mov %ebx, %edi
    call rdmsr_safe
    test %rdx, %rdx
    jnz .Lread_fault
    cmp 8(%r12), %rax
    jne .Lbad_readback
    add $16, %r12
    jmp 5b
6:  // Reserved bits #GP and change nothing (the entry holds 0x10000 now).
    lea eilvt_reserved(%rip), %r12
7:  lea eilvt_reserved_end(%rip), %rax
    cmp %rax, %r12
    jae 8f
    mov %ebx, %edi
    mov (%r12), %rsi
    call ibs_expect_gp_wr
    test %rax, %rax
    jnz .Lno_gp
    mov %ebx, %edi
    call rdmsr_safe
    cmp $EILVT_RESET, %rax
    jne .Lgp_changed
    add $8, %r12
    jmp 7b
8:  inc %ebx
    cmp $(MSR_X2APIC_EILVT0 + 3), %ebx
    jbe 4b

    mov $MSR_X2APIC_EFEAT, %ebx
    mov %ebx, %edi
    mov $EFEAT_VALUE, %esi
    call ibs_expect_gp_wr
    test %rax, %rax
    jnz .Lno_gp
    mov $MSR_X2APIC_ECTRL, %ebx
    mov %ebx, %edi
    mov $1, %esi
    call ibs_expect_gp_wr
    test %rax, %rax
    jnz .Lno_gp
    mov %ebx, %edi
    xor %esi, %esi
    call wrmsr_safe
    test %rdx, %rdx
    jnz .Lwrite_fault
    PUTS "ibs-eilvt: ok\n"

    // ---- masked: the sample latches, no NMI ----
    call ibs_reset_state
    mov $VEC_NMI, %edi
    lea ibs_nmi_hook(%rip), %rsi
    call set_vector_hook
    mov %gs:PC_NMI_COUNT, %r13      // NMIs so far
    mov $MSR_X2APIC_EILVT0, %edi
    mov $EILVT_MASKED_NMI, %esi
    call wrmsr_safe
    test %rdx, %rdx
    jnz .Lwrite_fault
    mov $1, %edi
    mov $IBS_OP_MAXCNT_TEST, %esi
    call ibs_arm_op
    lea user_count_down(%rip), %rdi
    mov $IBS_MASKED_SPIN_LOOPS, %esi
    xor %edx, %edx
    call run_user
    mov $MSR_IBS_OP_CTL, %edi
    call rdmsr_safe
    mov %rax, %r12
    mov $MSR_IBS_OP_CTL, %edi       // stop the unit
    xor %esi, %esi
    call wrmsr_safe
    cmp %gs:PC_NMI_COUNT, %r13
    je 9f
    FAIL "ibs-eilvt: an NMI arrived through a masked EILVT0"
9:  mov %r12, %rax
    and $(IBS_OP_EN | IBS_OP_VAL), %eax
    cmp $(IBS_OP_EN | IBS_OP_VAL), %eax
    je 10f
    PUTS "ibs-eilvt: IBS_OP_CTL "
    PUTHEX %r12
    PUTS "\n"
    FAIL "ibs-eilvt: masked: no sample latched (IBS_OP_CTL lacks En=1 Val=1)"
10: PUTS "ibs-eilvt: masked: no nmi, val latched\n"

    // ---- fixed vector ----
    movq $0, fixed_count(%rip)
    mov $IBS_FIXED_VECTOR, %edi
    lea fixed_hook(%rip), %rsi
    call set_vector_hook
    mov $MSR_X2APIC_EILVT0, %edi
    mov $IBS_FIXED_VECTOR, %esi     // message type 0 (fixed), unmasked
    call wrmsr_safe
    test %rdx, %rdx
    jnz .Lwrite_fault
    mov $MSR_IBS_OP_CTL, %edi
    mov $(IBS_OP_EN | IBS_OP_MAXCNT_TEST), %esi
    call wrmsr_safe
    lea fixed_count(%rip), %rax
    mov %rax, ibs_wait_ptr(%rip)
    movq $1, ibs_wait_target(%rip)
    lea ibs_user_wait(%rip), %rdi
    mov $IBS_USER_WAIT_LOOPS, %esi
    mov $(RFLAGS_FIXED | RFLAGS_IF), %edx
    call run_user
    mov %rax, %r12                  // 1 = timed out
    mov $MSR_IBS_OP_CTL, %edi
    xor %esi, %esi
    call wrmsr_safe
    mov $MSR_X2APIC_EILVT0, %edi
    mov $EILVT_RESET, %esi
    call wrmsr_safe
    test %r12, %r12
    jz 11f
    FAIL "ibs-eilvt: no fixed interrupt arrived through EILVT0"
11: cmpq $1, fixed_count(%rip)
    je 12f
    FAIL "ibs-eilvt: more than one fixed interrupt for one sample"
12: mov fixed_ctl(%rip), %rax
    and $(IBS_OP_EN | IBS_OP_VAL), %eax
    cmp $(IBS_OP_EN | IBS_OP_VAL), %eax
    je 13f
    FAIL "ibs-eilvt: fixed interrupt without Val in IBS_OP_CTL"
13: cmp %gs:PC_NMI_COUNT, %r13
    je 14f
    FAIL "ibs-eilvt: an NMI arrived for a fixed-vector EILVT0"
14: PUTS "ibs-eilvt: fixed vector "
    PUTHEX $IBS_FIXED_VECTOR
    PUTS " delivered\n"
    mov $VEC_NMI, %edi
    xor %esi, %esi
    call set_vector_hook
    pop %r13
    pop %r12
    pop %rbx
    xor %eax, %eax
    ret

.Lread_fault:
    call print_msr
    FAIL "ibs-eilvt: rdmsr faulted"
.Lwrite_fault:
    FAIL "ibs-eilvt: a legal write faulted"
.Lbad_reset:
    call print_msr
    PUTS "ibs-eilvt: reads "
    PUTHEX %rax
    PUTS "\n"
    FAIL "ibs-eilvt: wrong reset value"
.Lbad_readback:
    call print_msr
    PUTS "ibs-eilvt: wrote "
    PUTHEX (%r12)
    PUTS " read "
    PUTHEX %rax
    PUTS "\n"
    FAIL "ibs-eilvt: a written value did not read back"
.Lno_gp:
    call print_msr
    FAIL "ibs-eilvt: a write of reserved bits or a read-only register did not #GP"
.Lgp_changed:
    call print_msr
    FAIL "ibs-eilvt: a faulting write changed the entry"

/* print_msr(ebx = msr) */
print_msr:
    PUTS "ibs-eilvt: msr "
    PUTHEX %rbx
    PUTS "\n"
    ret

/*
 * fixed_hook(rdi = frame, rsi = vector): the IBS interrupt through a fixed
 * vector: record IBS_OP_CTL, stop the unit, EOI.
 */
fixed_hook:
    incq fixed_count(%rip)
    mov $MSR_IBS_OP_CTL, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, fixed_ctl(%rip)
    mov $MSR_IBS_OP_CTL, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    call apic_eoi
    xor %eax, %eax
    ret

    .section .rodata
    .balign 8
eilvt_values:                       // written, expected read; ends masked
    .quad 0x400, 0x400
    .quad 0x10400, 0x10400
    .quad 0xf0, 0xf0
    .quad 0x1400, 0x400             // delivery status is read-only
    .quad 0x104ff, 0x104ff
    .quad EILVT_RESET, EILVT_RESET
eilvt_values_end:
eilvt_reserved:
    .quad 0x800                     // bit 11
    .quad 0x20000                   // bit 17
    .quad 0x100000000               // bit 32
eilvt_reserved_end:

    .bss
    .balign 8
fixed_count:
    .quad 0
fixed_ctl:
    .quad 0
