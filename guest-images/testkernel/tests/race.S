/*
 * test=race order=prefix|fixed [rounds=N] [stress=1] [seed=S]: the Linux IBS
 * driver's op-unit sequence, for real, against ibsvm's virtual IBS, to
 * reproduce the stale-IbsOpVal race (vpmu/DEVICE.md §4, §5; Linux
 * commit 1b044ff3c17e "perf/amd/ibs: Avoid race between event add and NMI").
 *
 * Modelled on arch/x86/events/amd/ibs.c of Linux 6.1 (the unpatched kernel
 * Debian 12 ships): per unit a state word with STARTED / STOPPING / STOPPED;
 *  - start (perf_ibs_start): order=fixed first writes CTL = 0 (the fix);
 *    then STARTED is set, STOPPING cleared, and CTL = En | MaxCnt written.
 *    order=prefix has no clearing write: the unpatched order.
 *  - stop (perf_ibs_stop): test-and-set STOPPING, read CTL, set STOPPED,
 *    write the value read back without En and MaxCnt (Val as read), clear
 *    STARTED.
 *  - the NMI handler (perf_ibs_nmi_handler): the fetch unit, then the op
 *    unit; each one (perf_ibs_handle_irq) ignores the unit unless STARTED,
 *    reads CTL, and if Val is set takes the sample and re-enables the unit
 *    with CTL = En | MaxCnt; otherwise a set STOPPED is consumed as "ours".
 * The fetch unit samples throughout (started once): it is the "other
 * source" of NMIs.  Every round: op start, one natural op sample at CPL3
 * (the handler re-enables), op stop.
 *
 * ibsvm's IBS test port (PORT_IBS_TEST) puts the NMIs where the race needs
 * them: in stop, just before CTL is read, an op sample latches whose NMI
 * comes only after stop's write-back (so stop writes Val = 1 back, as on
 * hardware when a sample lands during stop); in start, between setting
 * STARTED and the enable write (the window), a fetch sample latches and its
 * NMI arrives at once.  An unpatched start then lets the handler see the
 * stale Val and enable the op unit from NMI context: an "accidental
 * enable", counted when the handler enables op while the round's start has
 * not enabled it yet.
 *
 * stress=1 randomises instead (xorshift64*, seed=S): each round puts the
 * fetch NMI at one of the points RACE_POINT 0-5 and 7 around start and stop,
 * and the late op sample in stop in half of the rounds.  Point 6, between
 * stop's write-back and clearing STARTED, is left out on purpose: an NMI
 * there finds STARTED and the Val that stop itself wrote back, in every
 * kernel, fixed or not (the "NMI handler seeing STARTED" case the comments
 * of perf_ibs_stop discuss) - a different problem from the one
 * 1b044ff3c17e fixes.
 *
 * Serial:
 *   race: order prefix, rounds N, stress 0, seed S
 *   race: rounds N, window nmis W, stop read Val V (interfered I), op samples
 *         O, fetch samples F, nmis T, unknown nmis U     (one line)
 *   race: stale stops S, accidental enables A
 *   then PASS, or FAIL: ... with
 * (V: stops that read Val = 1; I: stops where the unit's own sample beat the
 * test port's and its NMI handler took it first, so stop read Val = 0; S:
 * stops that wrote Val = 1 back and were followed by a start - under
 * prefix + faithful each of those starts is caught, so A = S.)
 * Exit status: 0 no accidental enable; 1 accidental enables (or unknown
 * NMIs); 4 (EXIT_BROKEN) the test could not run as designed: no IBS, no
 * test port, bad options, or (stress=0) a round whose window NMI did not
 * arrive or whose stop found no sample at all.
 */
#include "macros.h"

/* Unit state bits (ibs.c enum IBS_STARTED, IBS_STOPPING, IBS_STOPPED). */
#define ST_STARTED      0
#define ST_STOPPING     1
#define ST_STOPPED      2

/* A unit descriptor (race_fetch, race_op below). */
#define U_STATE         0               /* state bits */
#define U_MSR           8               /* CTL MSR */
#define U_VAL           16              /* Val mask */
#define U_REARM         24              /* En | MaxCnt */
#define U_SAMPLES       32              /* samples the handler took */
#define U_ENABLED       40              /* 1 once start wrote the enable */

/* Points of the round where stress=1 may put the fetch NMI (RACE_POINT). */
#define POINT_WINDOW    2
#define POINT_NONE      0xFF

/*
 * RACE_POINT n: if this round's fetch NMI belongs here, ask for it.  Keeps
 * every register.
 */
.macro RACE_POINT n
    cmpb $\n, race_point(%rip)
    jne .Lrace_point_\@
    push %rax
    mov $IBS_TEST_FETCH_NMI, %al
    out %al, $PORT_IBS_TEST
    pop %rax
.Lrace_point_\@:
.endm

/* BROKEN "reason": print FAIL: reason and exit EXIT_BROKEN. */
.macro BROKEN reason
    LOAD_STR %rdi, "\reason"
    jmp race_broken
.endm

    .text
    .code64

DEFINE_TEST race, test_race

test_race:
    push %rbx
    push %r12
    call race_options
    call ibs_cpuid_caps
    test $IBS_CAPS_OPSAM, %eax
    jz 1f
    test $IBS_CAPS_FETCHSAM, %eax
    jnz 2f
1:  BROKEN "race: CPUID advertises no IBS op and fetch sampling (run with --ibs synthetic)"
2:  in $PORT_IBS_TEST, %al
    cmp $IBS_TEST_PORT_ID, %al
    je 3f
    BROKEN "race: no IBS test port at 0xf5 (ibsvm provides it with virtual IBS)"
3:  call x2apic_enable
    test %rax, %rax
    jz 4f
    BROKEN "race: x2apic not supported"
4:  mov $MSR_X2APIC_EILVT0, %edi
    mov $EILVT_MSG_NMI, %esi
    call wrmsr_safe
    test %rdx, %rdx
    jz 5f
    BROKEN "race: writing EILVT0 = 0x400 faulted"
5:  mov $VEC_NMI, %edi
    lea race_nmi(%rip), %rsi
    call set_vector_hook

    // The fetch unit: started once, sampling until the end.
    btsq $ST_STARTED, race_fetch+U_STATE(%rip)
    movq $1, race_fetch+U_ENABLED(%rip)
    mov $MSR_IBS_FETCH_CTL, %edi
    mov race_fetch+U_REARM(%rip), %rsi
    call ibs_wrmsr

    xor %ebx, %ebx                  // rbx = round
.Lround:
    cmp race_rounds(%rip), %rbx
    jae .Lrounds_done
    call race_plan_round
    movb $0, race_window_hit(%rip)
    call race_op_start
    movzbl race_window_hit(%rip), %eax
    add %rax, race_window_rounds(%rip)
    // The op unit samples: wait at CPL3 for the next natural op sample.
    mov race_op+U_SAMPLES(%rip), %rsi
    inc %rsi
    lea race_op+U_SAMPLES(%rip), %rdi
    call ibs_run_user_wait
    test %rax, %rax
    jz 6f
    BROKEN "race: no op sample arrived at CPL3"
6:  call race_op_stop               // rax = 1 if it left a stale Val
    lea 1(%rbx), %rcx
    cmp race_rounds(%rip), %rcx
    jae 7f                          // the last stop is followed by no start
    add %rax, race_stale_stops(%rip)
7:  inc %rbx
    jmp .Lround

.Lrounds_done:
    // Fetch off (plain disable, as at the end of a perf session).
    btrq $ST_STARTED, race_fetch+U_STATE(%rip)
    mov $MSR_IBS_FETCH_CTL, %edi
    xor %esi, %esi
    call ibs_wrmsr
    mov $VEC_NMI, %edi
    xor %esi, %esi
    call set_vector_hook

    PUTS "race: rounds "
    PUTDEC race_rounds(%rip)
    PUTS ", window nmis "
    PUTDEC race_window_rounds(%rip)
    PUTS ", stop read Val "
    PUTDEC race_stop_val(%rip)
    PUTS " (interfered "
    PUTDEC race_interfered(%rip)
    PUTS ")"
    PUTS ", op samples "
    PUTDEC race_op+U_SAMPLES(%rip)
    PUTS ", fetch samples "
    PUTDEC race_fetch+U_SAMPLES(%rip)
    PUTS ", nmis "
    PUTDEC race_nmis(%rip)
    PUTS ", unknown nmis "
    PUTDEC race_unknown_nmis(%rip)
    PUTS "\n"
    PUTS "race: stale stops "
    PUTDEC race_stale_stops(%rip)
    PUTS ", accidental enables "
    PUTDEC race_accidental(%rip)
    PUTS "\n"

    cmpb $0, race_stress(%rip)
    jne 7f
    mov race_rounds(%rip), %rax
    cmp %rax, race_window_rounds(%rip)
    je 8f
    BROKEN "race: a round's window NMI did not arrive (test port)"
8:  mov race_stop_val(%rip), %rcx
    add race_interfered(%rip), %rcx
    cmp %rax, %rcx
    je 7f
    BROKEN "race: a round's stop did not read Val=1 (test port)"
7:  cmpq $0, race_accidental(%rip)
    je 9f
    FAIL "race: the op unit was enabled by its NMI handler before its start enabled it (stale IbsOpVal)"
9:  cmpq $0, race_unknown_nmis(%rip)
    je 10f
    FAIL "race: NMIs that no unit claimed (Linux: NMI received for unknown reason)"
10: xor %eax, %eax
    pop %r12
    pop %rbx
    ret

/* race_broken(rdi = reason): FAIL: reason, exit EXIT_BROKEN. */
FUNC race_broken
    call console_lock
    PUTS "FAIL: "
    call puts
    PUTS "\n"
    mov $EXIT_BROKEN, %edi
    jmp exit_vm
ENDFUNC race_broken

/* race_options: order=, rounds=, stress=, seed= into race_*; prints them. */
FUNC race_options
    push %rbx
    push %r12
    LOAD_STR %rdi, "order"
    call cmdline_find
    mov %rax, %rbx                  // value (0 if absent)
    mov %rdx, %r12                  // length
    LOAD_STR %rdi, "prefix"
    mov %rbx, %rsi
    mov %r12, %rdx
    call str_eq_n
    test %rax, %rax
    jnz 1f
    LOAD_STR %rdi, "fixed"
    mov %rbx, %rsi
    mov %r12, %rdx
    call str_eq_n
    test %rax, %rax
    jz .Lbad_order
    movb $1, race_fixed(%rip)
1:  LOAD_STR %rdi, "rounds"
    mov $RACE_ROUNDS, %esi
    call cmdline_get_u64
    cmp $2, %rdx
    je .Lbad_number
    test %rax, %rax
    jz .Lbad_number
    mov %rax, race_rounds(%rip)
    LOAD_STR %rdi, "stress"
    xor %esi, %esi
    call cmdline_get_u64
    cmp $2, %rdx
    je .Lbad_number
    cmp $1, %rax
    ja .Lbad_number
    mov %al, race_stress(%rip)
    LOAD_STR %rdi, "seed"
    mov $1, %esi
    call cmdline_get_u64
    cmp $2, %rdx
    je .Lbad_number
    test %rax, %rax                 // xorshift needs a non-zero state
    jnz 2f
    mov $1, %eax
2:  mov %rax, race_rng(%rip)

    PUTS "race: order "
    LOAD_STR %rdi, "prefix"
    cmpb $0, race_fixed(%rip)
    je 3f
    LOAD_STR %rdi, "fixed"
3:  call puts
    PUTS ", rounds "
    PUTDEC race_rounds(%rip)
    PUTS ", stress "
    movzbl race_stress(%rip), %eax
    PUTDEC %rax
    PUTS ", seed "
    PUTDEC race_rng(%rip)
    PUTS "\n"
    pop %r12
    pop %rbx
    ret
.Lbad_order:
    BROKEN "race: want order=prefix (unpatched start) or order=fixed (1b044ff3c17e)"
.Lbad_number:
    BROKEN "race: rounds=N (N >= 1), stress=0|1 and seed=S take decimal or 0x numbers"
ENDFUNC race_options

/*
 * race_plan_round: this round's fetch NMI point and whether stop gets the
 * late op sample.  stress=0: the window, always.  stress=1: random.
 */
FUNC race_plan_round
    cmpb $0, race_stress(%rip)
    jne 1f
    movb $POINT_WINDOW, race_point(%rip)
    movb $1, race_late(%rip)
    ret
1:  call race_random
    mov %rax, %rcx
    shr $33, %rax
    xor %edx, %edx
    mov $7, %esi
    div %rsi                        // rdx = 0..6
    cmp $6, %edx                    // point 6 is left out (file comment)
    jne 2f
    mov $7, %edx
2:  mov %dl, race_point(%rip)
    and $1, %ecx
    mov %cl, race_late(%rip)
    ret
ENDFUNC race_plan_round

/* race_random: rax = next xorshift64* output (Vigna 2016). */
FUNC race_random
    mov race_rng(%rip), %rax
    mov %rax, %rdx
    shr $12, %rdx
    xor %rdx, %rax
    mov %rax, %rdx
    shl $25, %rdx
    xor %rdx, %rax
    mov %rax, %rdx
    shr $27, %rdx
    xor %rdx, %rax
    mov %rax, race_rng(%rip)
    movabsq $0x2545F4914F6CDD1D, %rdx
    imul %rdx, %rax
    ret
ENDFUNC race_random

/* race_wrmsr(ecx = msr, rax = value). */
.macro RACE_WRMSR
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
.endm

/* race_op_start: perf_ibs_start for the op unit, in the order chosen. */
FUNC race_op_start
    RACE_POINT 0
    cmpb $0, race_fixed(%rip)
    je 1f
    mov $MSR_IBS_OP_CTL, %ecx       // 1b044ff3c17e: clear before STARTED
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
1:  RACE_POINT 1
    btsq $ST_STARTED, race_op+U_STATE(%rip)
    btrq $ST_STOPPING, race_op+U_STATE(%rip)
    movb $1, race_in_window(%rip)
    RACE_POINT 2                    // the window
    mov $MSR_IBS_OP_CTL, %ecx
    mov race_op+U_REARM(%rip), %rax
    RACE_WRMSR
    // An NMI from here to race_op_enable_noted comes after the enable write:
    // a sample of the unit's own period that latched at once (on a normal
    // host the timer may expire during the WRMSR's own exit), not a stale Val.
race_op_enable_retired:
    movb $0, race_in_window(%rip)
    movq $1, race_op+U_ENABLED(%rip)
race_op_enable_noted:
    RACE_POINT 3
    ret
ENDFUNC race_op_start

/*
 * race_op_stop: perf_ibs_stop for the op unit.  rax = 1 if it wrote a Val = 1
 * back (the stale state).  A read of Val = 0 right after the test port's
 * late sample means an op sample of the unit's own period latched first and
 * its NMI handler took it (and re-enabled the unit) in between: counted in
 * race_interfered.
 */
FUNC race_op_stop
    push %rbx
    push %r12
    push %r13
    xor %r13d, %r13d                // r13 = wrote a stale Val back
    RACE_POINT 4
    btsq $ST_STOPPING, race_op+U_STATE(%rip)
    jc .Lstop_done
    xor %r12d, %r12d
    btq $ST_STARTED, race_op+U_STATE(%rip)
    setc %r12b                      // r12 = stopping
    mov race_op+U_SAMPLES(%rip), %rsi
    push %rsi                       // op samples before the late sample
    cmpb $0, race_late(%rip)
    je 1f
    mov $IBS_TEST_OP_LATE, %al      // a sample lands now; its NMI after our write
    out %al, $PORT_IBS_TEST
1:  mov $MSR_IBS_OP_CTL, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rbx                  // rbx = config as read
    pop %rsi
    test $IBS_OP_VAL, %eax
    jz 3f
    incq race_stop_val(%rip)
    jmp 2f
3:  cmpb $0, race_late(%rip)
    je 2f
    cmp race_op+U_SAMPLES(%rip), %rsi
    je 2f
    incq race_interfered(%rip)
2:  RACE_POINT 5
    test %r12d, %r12d
    jz .Lstop_done
    btsq $ST_STOPPED, race_op+U_STATE(%rip)
    // perf_ibs_disable_event: config & ~cnt_mask, then & ~En; Val as read.
    mov %rbx, %rax
    and $~(IBS_OP_MAX_CNT | IBS_OP_EN), %rax
    mov $MSR_IBS_OP_CTL, %ecx
    RACE_WRMSR
    test $IBS_OP_VAL, %ebx
    setnz %r13b
    // (no RACE_POINT 6: see the file comment)
    btrq $ST_STARTED, race_op+U_STATE(%rip)
    movq $0, race_op+U_ENABLED(%rip)
.Lstop_done:
    RACE_POINT 7
    mov %r13, %rax
    pop %r13
    pop %r12
    pop %rbx
    ret
ENDFUNC race_op_stop

/*
 * race_nmi(rdi = frame, rsi = vector): perf_ibs_nmi_handler.  Always claims
 * the NMI; one that no unit took is counted in race_unknown_nmis.
 */
FUNC race_nmi
    push %rbx
    incq race_nmis(%rip)
    mov FR_RIP(%rdi), %rax
    mov %rax, race_nmi_rip(%rip)
    lea race_fetch(%rip), %rdi
    call race_handle_unit
    mov %eax, %ebx
    test %eax, %eax
    jz 1f
    cmpb $0, race_in_window(%rip)
    je 1f
    movb $1, race_window_hit(%rip)
1:  lea race_op(%rip), %rdi
    call race_handle_unit
    add %eax, %ebx
    jnz 2f
    incq race_unknown_nmis(%rip)
2:  xor %eax, %eax
    pop %rbx
    ret
ENDFUNC race_nmi

/*
 * race_handle_unit(rdi = unit descriptor): perf_ibs_handle_irq.  rax = 1
 * if the unit claims the NMI.  Plain rdmsr/wrmsr: the MSRs exist (CPUID was
 * checked) and an NMI hook must not fault.
 */
FUNC race_handle_unit
    mov %rdi, %rsi
    btq $ST_STARTED, U_STATE(%rsi)
    jnc .Lunit_fail
    mov U_MSR(%rsi), %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    test U_VAL(%rsi), %rax
    jz .Lunit_fail
    incq U_SAMPLES(%rsi)
    cmpq $0, U_ENABLED(%rsi)
    jne 1f
    // Start's enable write retired, U_ENABLED not yet set: a legitimate sample.
    mov race_nmi_rip(%rip), %rax
    lea race_op_enable_retired(%rip), %rdx
    cmp %rdx, %rax
    jb 2f
    lea race_op_enable_noted(%rip), %rdx
    cmp %rdx, %rax
    jb 1f
2:  incq race_accidental(%rip)      // enabling what start has not enabled yet
1:  mov U_MSR(%rsi), %ecx
    mov U_REARM(%rsi), %rax
    RACE_WRMSR
    mov $1, %eax
    ret
.Lunit_fail:
    btrq $ST_STOPPED, U_STATE(%rsi)  // a late NMI after stop is ours
    setc %al
    movzbl %al, %eax
    ret
ENDFUNC race_handle_unit

    .data
    .balign 8
race_fetch:
    .quad 0                                         // U_STATE
    .quad MSR_IBS_FETCH_CTL                         // U_MSR
    .quad 1 << IBS_FETCH_VAL_BIT                    // U_VAL
    .quad (1 << IBS_FETCH_EN_BIT) | RACE_FETCH_MAXCNT // U_REARM
    .quad 0                                         // U_SAMPLES
    .quad 0                                         // U_ENABLED
race_op:
    .quad 0
    .quad MSR_IBS_OP_CTL
    .quad IBS_OP_VAL
    .quad IBS_OP_EN | RACE_OP_MAXCNT
    .quad 0
    .quad 0

    .bss
    .balign 8
race_rounds:        .quad 0
race_rng:           .quad 0
race_nmis:          .quad 0
race_unknown_nmis:  .quad 0
race_accidental:    .quad 0
race_nmi_rip:       .quad 0         // where the NMI being handled interrupted
race_window_rounds: .quad 0
race_stop_val:      .quad 0
race_interfered:    .quad 0
race_stale_stops:   .quad 0
race_fixed:         .byte 0
race_stress:        .byte 0
race_point:         .byte 0
race_late:          .byte 0
race_in_window:     .byte 0
race_window_hit:    .byte 0
