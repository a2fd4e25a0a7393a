/*
 * test=smp: count the processors of the MP table, start every AP with
 * INIT-SIPI-SIPI and wait (bounded) until all are online.
 * Serial: "mptable: N cpus", one "cpu I online" per AP (I = 1..N-1, in
 * arrival order), "smp: N cpus online", "PASS"; exit 0.
 * If some AP does not come up: "smp: only M of N cpus online",
 * "FAIL: not all cpus came online"; exit 1.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST smp, test_smp

test_smp:
    push %rbx
    call smp_start_all              // rax = online, rdx = expected
    mov %rax, %rbx
    call smp_report
    pop %rbx
    xor %eax, %eax
    ret

/*
 * smp_report(rax = online, rdx = expected): print "smp: N cpus online"
 * or fail.  Shared with test=smpcall.
 */
    .globl smp_report
smp_report:
    push %rbx
    mov %rax, %rbx
    call console_lock
    cmp %rdx, %rbx
    jae 1f
    PUTS "smp: only "
    PUTDEC %rbx
    PUTS " of "
    PUTDEC %rdx
    PUTS " cpus online\n"
    FAIL "not all cpus came online"
1:  PUTS "smp: "
    PUTDEC %rbx
    PUTS " cpus online\n"
    call console_unlock
    pop %rbx
    ret
