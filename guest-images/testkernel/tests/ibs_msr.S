/*
 * test=ibs-msr: the IBS MSR file as the advertised caps (CPUID Fn8000_001B,
 * read at CPL0) define it, per vpmu/DEVICE.md §1 and §5 and what
 * vpmu implements (vpmu/README.md; vpmu/src/unit.rs UnitKind::ctl_writable
 * and data_reg, vpmu/src/device.rs read/write):
 *  - existence: 0xC0011030-0xC001103A always; 0xC001103B (BR_TARGET) only
 *    with caps BRNTRGT (bit 5); 0xC001103C (FETCH_CTL_EXT) only with
 *    FETCHCTLEXTD (bit 9); 0xC001103D-F (OPDATA4, CTL2) never.  Existing
 *    ones read without fault; the others #GP on read and on write.
 *  - IBS_CTL reads 0x100 (valid, LVT offset 0) and is read-only (#GP on
 *    write: vpmu MsrError::ReadOnly); PHYSADDR registers read 0 even after
 *    a write (writes ignored); FETCH_CTL PhyAddrValid (52) and OP_DATA3
 *    DcPhyAddrValid (18) are write-ignored, read 0.
 *  - legal values written read back (CTL with En=0; data registers are
 *    writable as on hardware: vpmu data_reg gives OP_RIP, LINADDRs and
 *    BR_TARGET all 64 bits, OP_DATA/2/3 and FETCH_CTL_EXT their defined
 *    bits).  CTL bits gated by a cap (CntCtl/OPCNT, MaxCnt[22:16]/OPCNTEXT,
 *    CurCnt/RDWROPCNT, L3MissOnly/ZEN4) read back with the cap and #GP
 *    without it.
 *  - reserved bits #GP and the faulting write changes nothing: OP_CTL 27,
 *    31, 59, 63; FETCH_CTL 62, 63; OP_DATA 33; OP_DATA2 3; OP_DATA3 9;
 *    FETCH_CTL_EXT 16.
 *  - a Val written into OP_CTL: reported (ibsvm's default policy "protect"
 *    stores 0; "faithful" keeps it).
 * Serial: "ibs-msr: caps 0x...", "ibs-msr: N msrs ok",
 * "ibs-msr: ibs_ctl 0x100 physaddr 0", "ibs-msr: N values ok",
 * "ibs-msr: N gp checks", "ibs-msr: gp ok",
 * "ibs-msr: op Val written 1 reads 0|1", "PASS"; exit 0.
 */
#include "macros.h"

#define K_RW    0       /* with the caps: write ok, read == expect; else #GP, unchanged */
#define K_GP    1       /* write #GPs, the register is unchanged */

/* One table entry: msr, required caps (all bits), kind, value, expected read. */
.macro ENTRY msr, req, kind, value, expect
    .long \msr, \req
    .quad \kind, \value, \expect
.endm
#define ENTRY_SIZE 32

    .section .rodata
    .balign 8
/* Existence: msr, caps needed (0 = always, IBS_CAPS_NEVER = never). */
exist_table:
    .long MSR_IBS_FETCH_CTL, 0
    .long MSR_IBS_FETCH_LINADDR, 0
    .long MSR_IBS_FETCH_PHYSADDR, 0
    .long MSR_IBS_OP_CTL, 0
    .long MSR_IBS_OP_RIP, 0
    .long MSR_IBS_OP_DATA, 0
    .long MSR_IBS_OP_DATA2, 0
    .long MSR_IBS_OP_DATA3, 0
    .long MSR_IBS_DC_LINADDR, 0
    .long MSR_IBS_DC_PHYSADDR, 0
    .long MSR_IBS_CTL, 0
    .long MSR_IBS_BR_TARGET, IBS_CAPS_BRNTRGT
    .long MSR_IBS_FETCH_CTL_EXT, IBS_CAPS_FETCHCTLEXTD
    .long MSR_IBS_OP_DATA4, IBS_CAPS_NEVER
    .long MSR_IBS_OP_CTL2, IBS_CAPS_NEVER
    .long MSR_IBS_FETCH_CTL2, IBS_CAPS_NEVER
exist_table_end:

value_table:
    // IBS_FETCH_CTL: MaxCnt, Cnt; RandEn kept, PhyAddrValid ignored; L3MissOnly needs ZEN4.
    ENTRY MSR_IBS_FETCH_CTL, 0, K_RW, 0x51234, 0x51234
    ENTRY MSR_IBS_FETCH_CTL, 0, K_RW, 0x0210000000000010, 0x0200000000000010
    ENTRY MSR_IBS_FETCH_CTL, IBS_CAPS_ZEN4, K_RW, 0x0800000000000010, 0x0800000000000010
    ENTRY MSR_IBS_FETCH_CTL, 0, K_GP, 0x4000000000000010, 0
    ENTRY MSR_IBS_FETCH_CTL, 0, K_GP, 0x8000000000000010, 0
    ENTRY MSR_IBS_FETCH_LINADDR, 0, K_RW, 0xffff800012345678, 0xffff800012345678
    ENTRY MSR_IBS_FETCH_PHYSADDR, 0, K_RW, 0x12345000, 0
    // IBS_OP_CTL: MaxCnt; CntCtl, MaxCnt[22:16], CurCnt, L3MissOnly per caps.
    ENTRY MSR_IBS_OP_CTL, 0, K_RW, 0xabc, 0xabc
    ENTRY MSR_IBS_OP_CTL, IBS_CAPS_OPCNT, K_RW, 0x80abc, 0x80abc
    ENTRY MSR_IBS_OP_CTL, IBS_CAPS_OPCNTEXT, K_RW, 0x7f00abc, 0x7f00abc
    ENTRY MSR_IBS_OP_CTL, IBS_CAPS_RDWROPCNT, K_RW, 0x0001234500000abc, 0x0001234500000abc
    ENTRY MSR_IBS_OP_CTL, IBS_CAPS_ZEN4, K_RW, 0x10abc, 0x10abc
    ENTRY MSR_IBS_OP_CTL, 0, K_GP, 0x80000abc, 0
    ENTRY MSR_IBS_OP_CTL, 0, K_GP, 0x08000abc, 0
    ENTRY MSR_IBS_OP_CTL, 0, K_GP, 0x0800000000000abc, 0
    ENTRY MSR_IBS_OP_CTL, 0, K_GP, 0x8000000000000abc, 0
    // Op data registers.
    ENTRY MSR_IBS_OP_RIP, 0, K_RW, 0x00007fffdeadbeef, 0x00007fffdeadbeef
    ENTRY MSR_IBS_OP_DATA, 0, K_RW, 0x0000017cdeadbeef, 0x0000017cdeadbeef
    ENTRY MSR_IBS_OP_DATA, IBS_CAPS_OPBRNFUSE, K_RW, 0x0000008000000001, 0x0000008000000001
    ENTRY MSR_IBS_OP_DATA, 0, K_GP, 0x0000000200000000, 0
    ENTRY MSR_IBS_OP_DATA2, 0, K_RW, 0xf7, 0xf7
    ENTRY MSR_IBS_OP_DATA2, 0, K_GP, 0x8, 0
    ENTRY MSR_IBS_OP_DATA3, 0, K_RW, 0x0000123400060003, 0x0000123400020003
    ENTRY MSR_IBS_OP_DATA3, 0, K_GP, 0x200, 0
    ENTRY MSR_IBS_DC_LINADDR, 0, K_RW, 0xffff888000001000, 0xffff888000001000
    ENTRY MSR_IBS_DC_PHYSADDR, 0, K_RW, 0xabcd000, 0
    // IBS_CTL is read-only.
    ENTRY MSR_IBS_CTL, 0, K_GP, IBS_CTL_VALUE, 0
    // Optional registers.
    ENTRY MSR_IBS_BR_TARGET, IBS_CAPS_BRNTRGT, K_RW, 0xffffffff81000000, 0xffffffff81000000
    ENTRY MSR_IBS_FETCH_CTL_EXT, IBS_CAPS_FETCHCTLEXTD, K_RW, 0xbeef, 0xbeef
    ENTRY MSR_IBS_FETCH_CTL_EXT, 0, K_GP, 0x10000, 0
value_table_end:

    .text
    .code64

DEFINE_TEST ibs-msr, test_ibs_msr

test_ibs_msr:
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    call ibs_cpuid_caps
    mov %rax, %r15                  // r15 = caps
    PUTS "ibs-msr: caps "
    PUTHEX %r15
    PUTS "\n"
    test %r15, %r15
    jnz 1f
    FAIL "ibs-msr: CPUID advertises no IBS"

    // ---- existence ----
1:  xor %r13d, %r13d                // r13 = MSRs that exist and read fine
    xor %r14d, %r14d                // r14 = #GP checks passed
    lea exist_table(%rip), %rbx
2:  lea exist_table_end(%rip), %rax
    cmp %rax, %rbx
    jae 5f
    mov 4(%rbx), %eax
    mov %eax, %ecx
    and %r15d, %ecx
    cmp %eax, %ecx                  // all required caps present?
    jne 3f
    mov (%rbx), %edi
    call rdmsr_safe
    test %rdx, %rdx
    jnz .Lexist_faulted
    inc %r13
    jmp 4f
3:  mov (%rbx), %edi
    call ibs_expect_gp_rd
    test %rax, %rax
    jnz .Labsent_readable
    mov (%rbx), %edi
    xor %esi, %esi
    call ibs_expect_gp_wr
    test %rax, %rax
    jnz .Labsent_writable
    add $2, %r14
4:  add $8, %rbx
    jmp 2b
5:  PUTS "ibs-msr: "
    PUTDEC %r13
    PUTS " msrs ok\n"

    // ---- IBS_CTL and PHYSADDR reads ----
    mov $MSR_IBS_CTL, %edi
    call rdmsr_safe
    cmp $IBS_CTL_VALUE, %rax
    je 6f
    PUTS "ibs-msr: IBS_CTL reads "
    PUTHEX %rax
    PUTS "\n"
    FAIL "ibs-msr: IBS_CTL does not read 0x100"
6:  mov $MSR_IBS_FETCH_PHYSADDR, %edi
    call rdmsr_safe
    mov %rax, %r12
    mov $MSR_IBS_DC_PHYSADDR, %edi
    call rdmsr_safe
    or %rax, %r12
    jz 7f
    FAIL "ibs-msr: a PHYSADDR register does not read 0"
7:  PUTS "ibs-msr: ibs_ctl 0x100 physaddr 0\n"

    // ---- values ----
    xor %r13d, %r13d                // r13 = values written and read back
    lea value_table(%rip), %rbx
8:  lea value_table_end(%rip), %rax
    cmp %rax, %rbx
    jae .Lvalues_done
    mov 4(%rbx), %eax
    mov %eax, %ecx
    and %r15d, %ecx
    cmpq $K_GP, 8(%rbx)
    je .Lexpect_gp
    cmp %eax, %ecx
    jne .Lexpect_gp                 // a cap is missing: the bits are reserved
    // Legal value: write, read back the expected value.
    mov (%rbx), %edi
    mov 16(%rbx), %rsi
    call wrmsr_safe
    test %rdx, %rdx
    jnz .Lwrite_faulted
    mov (%rbx), %edi
    call rdmsr_safe
    test %rdx, %rdx
    jnz .Lread_faulted
    cmp 24(%rbx), %rax
    jne .Lreadback_wrong
    inc %r13
    jmp 9f
.Lexpect_gp:
    // The write must #GP and change nothing (also for an MSR that does not
    // exist: then both reads fault the same way).
    mov (%rbx), %edi
    call rdmsr_safe
    mov %rax, %r12                  // value before
    push %rdx                       // fault status before
    push %rdx
    mov (%rbx), %edi
    mov 16(%rbx), %rsi
    call ibs_expect_gp_wr
    pop %rdx
    pop %rdx
    test %rax, %rax
    jnz .Lno_gp
    push %rdx
    push %rdx
    mov (%rbx), %edi
    call rdmsr_safe
    pop %rcx
    pop %rcx
    cmp %rcx, %rdx
    jne .Lgp_changed
    cmp %r12, %rax
    jne .Lgp_changed
    inc %r14
9:  add $ENTRY_SIZE, %rbx
    jmp 8b

.Lvalues_done:
    PUTS "ibs-msr: "
    PUTDEC %r13
    PUTS " values ok\n"
    PUTS "ibs-msr: "
    PUTDEC %r14
    PUTS " gp checks\n"
    PUTS "ibs-msr: gp ok\n"

    // ---- a written Val ----
    mov $MSR_IBS_OP_CTL, %edi
    mov $(IBS_OP_VAL | 0xabc), %esi
    call wrmsr_safe
    test %rdx, %rdx
    jz 10f
    FAIL "ibs-msr: writing OP_CTL = Val | MaxCnt faulted"
10: mov $MSR_IBS_OP_CTL, %edi
    call rdmsr_safe
    mov %rax, %r12
    and $IBS_OP_MAX_CNT, %eax
    cmp $0xabc, %eax
    je 11f
    FAIL "ibs-msr: OP_CTL lost MaxCnt after a Val write"
11: shr $18, %r12                   // IBS_OP_VAL is bit 18
    and $1, %r12
    PUTS "ibs-msr: op Val written 1 reads "
    PUTDEC %r12
    PUTS "\n"

    // ---- leave every writable register at 0 ----
    lea exist_table(%rip), %rbx
12: lea exist_table_end(%rip), %rax
    cmp %rax, %rbx
    jae 14f
    mov (%rbx), %edi
    cmp $MSR_IBS_CTL, %edi
    je 13f
    mov 4(%rbx), %eax
    mov %eax, %ecx
    and %r15d, %ecx
    cmp %eax, %ecx
    jne 13f
    xor %esi, %esi
    call wrmsr_safe
    test %rdx, %rdx
    jz 13f
    FAIL "ibs-msr: writing 0 to an advertised MSR faulted"
13: add $8, %rbx
    jmp 12b
14: pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    xor %eax, %eax
    ret

/* Failure reports: print the MSR (and value), then FAIL. */
.Lexist_faulted:
    call print_msr
    FAIL "ibs-msr: an advertised MSR #GPs on read"
.Labsent_readable:
    call print_msr
    FAIL "ibs-msr: an MSR the caps do not advertise is readable"
.Labsent_writable:
    call print_msr
    FAIL "ibs-msr: an MSR the caps do not advertise is writable"
.Lwrite_faulted:
    call print_entry
    FAIL "ibs-msr: a legal write faulted"
.Lread_faulted:
    call print_entry
    FAIL "ibs-msr: reading back faulted"
.Lreadback_wrong:
    call print_entry
    PUTS "ibs-msr: read back "
    PUTHEX %rax
    PUTS "\n"
    FAIL "ibs-msr: a written value did not read back as expected"
.Lno_gp:
    call print_entry
    FAIL "ibs-msr: a write with reserved or unadvertised bits did not #GP"
.Lgp_changed:
    call print_entry
    PUTS "ibs-msr: before "
    PUTHEX %r12
    PUTS " after "
    PUTHEX %rax
    PUTS "\n"
    FAIL "ibs-msr: a faulting write changed the register"

/* print_msr(rbx = table entry): "ibs-msr: msr 0x..." */
print_msr:
    PUTS "ibs-msr: msr "
    mov (%rbx), %eax
    PUTHEX %rax
    PUTS "\n"
    ret

/* print_entry(rbx = value-table entry): "ibs-msr: msr 0x... value 0x..." */
print_entry:
    PUTS "ibs-msr: msr "
    mov (%rbx), %ecx
    PUTHEX %rcx
    PUTS " value "
    PUTHEX 16(%rbx)
    PUTS "\n"
    ret
