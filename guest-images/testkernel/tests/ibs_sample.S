/*
 * test=ibs-sample: op and fetch sampling the way Linux drives it
 * (vpmu/DEVICE.md §3): x2APIC on, EILVT0 = 0x400 (NMI, unmasked),
 * an NMI handler (tests/ibs_lib.S ibs_nmi_hook), then
 *  - op: IBS_OP_CTL = En | MaxCnt (IBS_OP_MAXCNT_TEST = 0x1000, 65536 ops),
 *    a CPL3 loop (ibs_user_wait) polls the sample count.  Each NMI must
 *    find IBS_OP_CTL with En=1, Val=1 and MaxCnt as programmed; it reads
 *    IBS_OP_RIP and re-arms with En | MaxCnt (read back: En=1 Val=0), until
 *    IBS_SAMPLE_COUNT (20) samples; then it writes CTL = 0.  Every OP_RIP
 *    must lie in the CPL3 loop [ibs_user_wait, ibs_user_wait_end).
 *  - fetch: IBS_FETCH_CTL = En (bit 48) | MaxCnt, IBS_FETCH_COUNT (3)
 *    samples with Val (bit 49), En, MaxCnt as programmed, PhyAddrValid 0,
 *    IBS_FETCH_PHYSADDR 0 and IBS_FETCH_LINADDR in the loop.
 * Every NMI must carry a sample (no empty NMI), and both units must be
 * idle (CTL = 0) at the end.
 * Serial: "ibs-sample: 20 samples, 20 in loop", "ibs-sample: first rip
 * 0x...", "ibs-sample: first ctl 0x...", "ibs-sample: ctl ok",
 * "ibs-sample: fetch ok", "PASS"; exit 0.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST ibs-sample, test_ibs_sample

test_ibs_sample:
    push %rbx
    push %r12
    call ibs_cpuid_caps
    test %rax, %rax
    jnz 1f
    FAIL "ibs-sample: CPUID advertises no IBS"
1:  call ibs_setup_nmi

    // ---- op unit ----
    mov $IBS_SAMPLE_COUNT, %edi
    mov $IBS_OP_MAXCNT_TEST, %esi
    call ibs_arm_op
    lea ibs_op_count(%rip), %rdi
    mov $IBS_SAMPLE_COUNT, %esi
    call ibs_run_user_wait
    test %rax, %rax
    jz 2f
    PUTS "ibs-sample: "
    PUTDEC ibs_op_count(%rip)
    PUTS " samples before the wait ran out\n"
    mov $MSR_IBS_OP_CTL, %edi
    xor %esi, %esi
    call ibs_wrmsr
    FAIL "ibs-sample: the expected NMIs did not arrive"

2:  lea ibs_op_addrs(%rip), %rdi
    mov ibs_op_count(%rip), %rsi
    lea ibs_user_wait(%rip), %rdx
    lea ibs_user_wait_end(%rip), %rcx
    call ibs_count_in
    mov %rax, %rbx                  // rbx = samples in the loop
    PUTS "ibs-sample: "
    PUTDEC ibs_op_count(%rip)
    PUTS " samples, "
    PUTDEC %rbx
    PUTS " in loop\n"
    PUTS "ibs-sample: first rip "
    PUTHEX ibs_op_addrs(%rip)
    PUTS "\n"
    PUTS "ibs-sample: first ctl "
    PUTHEX ibs_op_first_ctl(%rip)
    PUTS "\n"
    cmpq $IBS_SAMPLE_COUNT, ibs_op_count(%rip)
    je 3f
    FAIL "ibs-sample: the NMI handler took more samples than asked"
3:  cmp $IBS_SAMPLE_COUNT, %rbx
    je 4f
    call print_op_addrs
    FAIL "ibs-sample: an IBS_OP_RIP lies outside the CPL3 loop"
4:  cmpq $0, ibs_op_bad_ctl(%rip)
    je 5f
    PUTS "ibs-sample: bad ctl "
    PUTHEX ibs_op_last_bad_ctl(%rip)
    PUTS "\n"
    FAIL "ibs-sample: a sample's IBS_OP_CTL lacks En=1, Val=1 or the programmed MaxCnt"
5:  cmpq $0, ibs_op_bad_rearm(%rip)
    je 6f
    PUTS "ibs-sample: "
    PUTDEC ibs_op_bad_rearm(%rip)
    PUTS " re-arms read back without En=1 Val=0\n"
    FAIL "ibs-sample: after a re-arm IBS_OP_CTL did not read En=1 Val=0"
6:  mov $MSR_IBS_OP_CTL, %edi
    call ibs_rdmsr
    test %rax, %rax
    jz 7f
    FAIL "ibs-sample: IBS_OP_CTL is not 0 after the handler stopped the unit"
7:  PUTS "ibs-sample: ctl ok\n"

    // ---- fetch unit ----
    mov $IBS_FETCH_COUNT, %edi
    mov $IBS_FETCH_MAXCNT_TEST, %esi
    call ibs_arm_fetch
    lea ibs_fetch_count(%rip), %rdi
    mov $IBS_FETCH_COUNT, %esi
    call ibs_run_user_wait
    test %rax, %rax
    jz 8f
    mov $MSR_IBS_FETCH_CTL, %edi
    xor %esi, %esi
    call ibs_wrmsr
    FAIL "ibs-sample: no fetch sample NMI arrived"
8:  lea ibs_fetch_addrs(%rip), %rdi
    mov ibs_fetch_count(%rip), %rsi
    lea ibs_user_wait(%rip), %rdx
    lea ibs_user_wait_end(%rip), %rcx
    call ibs_count_in
    mov %rax, %rbx
    PUTS "ibs-sample: "
    PUTDEC ibs_fetch_count(%rip)
    PUTS " fetch samples, "
    PUTDEC %rbx
    PUTS " in loop, first ctl "
    PUTHEX ibs_fetch_first_ctl(%rip)
    PUTS "\n"
    cmpq $IBS_FETCH_COUNT, ibs_fetch_count(%rip)
    je 9f
    FAIL "ibs-sample: the NMI handler took more fetch samples than asked"
9:  cmp $IBS_FETCH_COUNT, %rbx
    je 10f
    PUTS "ibs-sample: first fetch linaddr "
    PUTHEX ibs_fetch_addrs(%rip)
    PUTS "\n"
    FAIL "ibs-sample: an IBS_FETCH_LINADDR lies outside the CPL3 loop"
10: cmpq $0, ibs_fetch_bad_ctl(%rip)
    je 11f
    PUTS "ibs-sample: bad fetch ctl "
    PUTHEX ibs_fetch_last_bad_ctl(%rip)
    PUTS "\n"
    FAIL "ibs-sample: a fetch sample's CTL lacks En=1, Val=1, MaxCnt or has PhyAddrValid"
11: cmpq $0, ibs_fetch_physaddr_or(%rip)
    je 12f
    FAIL "ibs-sample: IBS_FETCH_PHYSADDR is not 0 in a sample"
12: mov $MSR_IBS_FETCH_CTL, %edi
    call ibs_rdmsr
    test %rax, %rax
    jz 13f
    FAIL "ibs-sample: IBS_FETCH_CTL is not 0 after the handler stopped the unit"
13: PUTS "ibs-sample: fetch ok\n"

    // ---- every NMI carried a sample ----
    cmpq $0, ibs_nmi_empty(%rip)
    je 14f
    PUTS "ibs-sample: "
    PUTDEC ibs_nmi_empty(%rip)
    PUTS " NMIs without a sample\n"
    FAIL "ibs-sample: an NMI arrived with no Val in either unit"
14: mov $VEC_NMI, %edi
    xor %esi, %esi
    call set_vector_hook
    pop %r12
    pop %rbx
    xor %eax, %eax
    ret

/* print_op_addrs: "ibs-sample: rip 0x..." for every recorded op sample. */
print_op_addrs:
    push %rbx
    xor %ebx, %ebx
1:  cmp ibs_op_count(%rip), %rbx
    jae 2f
    cmp $IBS_MAX_SAMPLES, %rbx
    jae 2f
    PUTS "ibs-sample: rip "
    lea ibs_op_addrs(%rip), %rax
    mov (%rax,%rbx,8), %rax
    PUTHEX %rax
    PUTS "\n"
    inc %rbx
    jmp 1b
2:  PUTS "ibs-sample: loop "
    lea ibs_user_wait(%rip), %rax
    PUTHEX %rax
    PUTS "-"
    lea ibs_user_wait_end(%rip), %rax
    PUTHEX %rax
    PUTS "\n"
    pop %rbx
    ret
