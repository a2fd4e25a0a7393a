/*
 * test=msr-bench a=MSR b=MSR [count=N] [write=VALUE]: the cost of RDMSR (or,
 * with write=, of WRMSR of VALUE) of two MSRs the VMM traps, measured in one
 * run (`make bench`, ibs_msr_exit_ratio).  Reads each MSR once through
 * rdmsr_safe (a #GP fails the test), then alternates 10 blocks of N/10 plain
 * accesses of a and of b, timing each block with RDTSC, so that drift on the
 * host affects both alike.
 * Serial: "msr-bench: a 0x... N reads T tsc" ("writes" with write=), the same
 * for b, then PASS.
 */
#include "macros.h"

#define BENCH_ROUNDS 10

    .text
    .code64

DEFINE_TEST msr-bench, test_msr_bench

/*
 * Reads MSR edi r12/BENCH_ROUNDS times, or writes bench_value to it when
 * bench_write is set; returns rax = TSC ticks taken.
 */
bench_block:
    push %rbx
    mov %edi, %ecx
    mov %r12, %rax
    xor %edx, %edx
    mov $BENCH_ROUNDS, %r8
    div %r8
    mov %rax, %rbx                  // reads in this block
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r9                   // start
    cmpb $0, bench_write(%rip)
    jne 3f
1:  test %rbx, %rbx
    jz 2f
    rdmsr
    dec %rbx
    jmp 1b
3:  mov bench_value(%rip), %eax
    mov bench_value+4(%rip), %edx
4:  test %rbx, %rbx
    jz 2f
    wrmsr
    dec %rbx
    jmp 4b
2:  rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %r9, %rax
    pop %rbx
    ret

/* Parses key rdi (must be present); returns rax. */
bench_key:
    xor %esi, %esi
    call cmdline_get_u64
    cmp $1, %rdx
    jne 1f
    ret
1:  FAIL "msr-bench: needs a=MSR b=MSR (and optional count=N)"

test_msr_bench:
    LOAD_STR %rdi, "a"
    call bench_key
    mov %rax, %r13                  // MSR a
    LOAD_STR %rdi, "b"
    call bench_key
    mov %rax, %r14                  // MSR b
    LOAD_STR %rdi, "count"
    mov $20000, %esi
    call cmdline_get_u64
    cmp $2, %rdx
    jne 1f
    FAIL "msr-bench: malformed count="
1:  cmp $BENCH_ROUNDS, %rax
    jae 2f
    FAIL "msr-bench: count= must be at least 10"
2:  mov %rax, %r12                  // total accesses of each MSR
    LOAD_STR %rdi, "write"
    xor %esi, %esi
    call cmdline_get_u64
    cmp $2, %rdx
    jne 6f
    FAIL "msr-bench: malformed write="
6:  mov %rax, bench_value(%rip)
    mov %dl, bench_write(%rip)      // 1 if write= was given
    mov %r13d, %edi
    call rdmsr_safe
    test %rdx, %rdx
    jz 3f
    FAIL "msr-bench: reading MSR a faults"
3:  mov %r14d, %edi
    call rdmsr_safe
    test %rdx, %rdx
    jz 4f
    FAIL "msr-bench: reading MSR b faults"
4:  xor %r15d, %r15d                // ticks for a
    push $0                         // ticks for b, at (%rsp)
    push $BENCH_ROUNDS              // rounds left, at (%rsp)
5:  mov %r13d, %edi
    call bench_block
    add %rax, %r15
    mov %r14d, %edi
    call bench_block
    add %rax, 8(%rsp)
    decq (%rsp)
    jnz 5b
    pop %rax
    pop %rbx                        // ticks for b
    PUTS "msr-bench: a "
    PUTHEX %r13
    PUTS " "
    PUTDEC %r12
    call put_access
    PUTDEC %r15
    PUTS " tsc\nmsr-bench: b "
    PUTHEX %r14
    PUTS " "
    PUTDEC %r12
    call put_access
    PUTDEC %rbx
    PUTS " tsc\n"
    jmp test_pass

/* Prints " reads " or " writes ". */
put_access:
    cmpb $0, bench_write(%rip)
    jne 1f
    PUTS " reads "
    ret
1:  PUTS " writes "
    ret

    .bss
bench_value:
    .quad 0
bench_write:
    .byte 0
