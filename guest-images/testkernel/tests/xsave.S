/*
 * test=xsave: the XSAVE feature set as a kernel uses it to switch AVX
 * state between tasks (SDM vol. 1 ch. 13), with the architectural faults.
 * On the dev hosts KVM's emulator cannot run xsave/xrstor at CPL0
 * (docs/host-kvm.md); ibsvm completes them, so this checks that completion.
 *
 * A CPU without XSAVE (CPUID.1:ECX[26] clear) has none of it, and that is
 * what is checked then: CR4.OSXSAVE and CPUID.1:ECX[27] read clear,
 * setting CR4.OSXSAVE raises #GP(0) (the bit is reserved: SDM vol. 3A
 * 2.5, vol. 2B "MOV - Move to/from Control Registers"; APM vol. 2 3.1.3),
 * and xgetbv, xsetbv, xsave64 and xrstor64 raise #UD (SDM vol. 2C, each
 * one's "64-Bit Mode Exceptions": CPUID.01H:ECX.XSAVE = 0 or CR4.OSXSAVE
 * = 0).  Serial: "xsave: CPU without XSAVE: CR4.OSXSAVE raises #GP;
 * xgetbv, xsetbv, xsave64, xrstor64 raise #UD", "xsave: ok", "PASS".
 *
 * With XSAVE:
 *  - CR4.OSXSAVE set -> CPUID.1:ECX[27] follows;
 *  - XCR0 reads 0x1 after reset; Fn0000_000D.0 EAX offers x87|SSE|AVX;
 *    xsetbv of AVX without SSE (0x5) raises #GP;
 *  - XCR 1: without XGETBV1 (Fn0000_000D.1 EAX[2] clear) xgetbv of it
 *    raises #GP; with XGETBV1 it reads XCR0 AND XINUSE (SDM vol. 1 13.3,
 *    vol. 2C "XGETBV"), so it has no bit outside XCR0;
 *  - xsetbv 0x7 reads back 0x7 at CPL0; at CPL3 (native) XCR0 holds at
 *    least 0x7 (printed: the host's own XCR0 on a CPL0-emulating host);
 *  - ymm0 loaded at CPL3 (YMM0[255:128] not zero, so AVX state is not in
 *    its initial configuration): with XGETBV1, XINUSE[2] reads 1 (SDM
 *    vol. 1 13.6); xsave64 at CPL0: XSTATE_BV[2] set, XMM0 at 160
 *    and YMM0[255:128] at the Fn0000_000D.2 EBX offset hold it;
 *  - another value written to the area, xrstor64: CPL3 reads it in ymm0;
 *    XSTATE_BV[2] cleared, xrstor64: ymm0[255:128] reads as zero (init);
 *  - xrstor64 of a misaligned area, and of XSTATE_BV bits outside XCR0,
 *    raise #GP; xsave64 into an unmapped page raises #PF with error code
 *    0x2 (supervisor write, not present) and CR2 = the area.
 * Serial: "xsave: XGETBV1: xgetbv of XCR 1 reads XCR0 & XINUSE" or
 * "xsave: no XGETBV1: xgetbv of XCR 1 raises #GP", "xsave: xcr0 0x1 ->
 * 0x7", "xsave: CPL3 xcr0 0x...", with XGETBV1 "xsave: XINUSE[2] set
 * with ymm0 in use", "xsave: ymm offset 0x240", "xsave: ok", "PASS".
 * Exit 0 (1 with "FAIL: ..." otherwise).
 *
 * The CPL0 instructions of the XSAVE set live in .completedtext, which
 * check.sh lets hold exactly those (xsave64, xrstor64; xsetbv, which KVM's
 * emulator runs, and xgetbv are not on its list of forbidden instructions).
 * On a CPL0-emulating host ibsvm also completes xgetbv of XCR 1, as the
 * guest sees XGETBV1 there (vmm/src/vcpu/completion/xstate.rs).
 */
#include "macros.h"

/* An address past our 1 GiB identity map (paging.S): never mapped. */
#define UNMAPPED_ADDR       0x40000000

    .text
    .code64

DEFINE_TEST xsave, test_xsave

test_xsave:
    push %rbx
    push %r12
    push %r13

    mov $CPUID_FEATURES, %eax
    xor %ecx, %ecx
    cpuid
    test $CPUID_1_ECX_XSAVE, %ecx
    jnz 1f
    call without_xsave
    jmp 25f
1:  mov %cr4, %rax
    or $CR4_OSXSAVE, %rax
    mov %rax, %cr4
    mov $CPUID_FEATURES, %eax
    xor %ecx, %ecx
    cpuid
    test $CPUID_1_ECX_OSXSAVE, %ecx
    jnz 2f
    FAIL "xsave: CPUID.1:ECX[27] (OSXSAVE) does not follow CR4.OSXSAVE"

2:  xor %edi, %edi
    call xgetbv_guarded
    test %rdx, %rdx
    jz 3f
    FAIL "xsave: xgetbv of XCR0 faulted"
3:  mov %rax, %r12                  // r12 = XCR0 after reset
    cmp $XCR0_X87, %rax
    je 4f
    FAIL "xsave: XCR0 is not 0x1 after reset"
4:  mov $CPUID_XSTATE, %eax
    xor %ecx, %ecx
    cpuid
    and $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %eax
    cmp $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %eax
    je 5f
    FAIL "xsave: Fn0000_000D.0 EAX lacks x87, SSE or AVX"

5:  xor %edi, %edi
    mov $(XCR0_X87 | XCR0_AVX), %esi
    call xsetbv_guarded
    mov %rax, %rdi
    mov $VEC_GP, %esi
    call expect_fault
    test %rax, %rax
    jz 6f
    FAIL "xsave: xsetbv of AVX without SSE did not raise #GP"
6:  call xgetbv1_offered
    test %rax, %rax
    jnz 27f
    mov $1, %edi
    call xgetbv_guarded
    mov %rdx, %rdi
    mov $VEC_GP, %esi
    call expect_fault
    test %rax, %rax
    jz 28f
    FAIL "xsave: xgetbv of XCR 1 did not raise #GP without XGETBV1"
28: PUTS "xsave: no XGETBV1: xgetbv of XCR 1 raises #GP\n"
    jmp 7f
27: mov $1, %edi
    call xgetbv_guarded
    test %rdx, %rdx
    jz 29f
    FAIL "xsave: xgetbv of XCR 1 faulted with XGETBV1"
29: mov %r12, %rcx
    not %rcx
    test %rcx, %rax
    jz 30f
    PUTS "xsave: XCR 1 "
    PUTHEX %rax
    PUTS "\n"
    FAIL "xsave: xgetbv of XCR 1 has bits outside XCR0"
30: PUTS "xsave: XGETBV1: xgetbv of XCR 1 reads XCR0 & XINUSE\n"
7:  xor %edi, %edi
    mov $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %esi
    call xsetbv_guarded
    test %rax, %rax
    jz 8f
    FAIL "xsave: xsetbv of XCR0 = 0x7 faulted"
8:  xor %edi, %edi
    call xgetbv_guarded
    mov %rax, %rbx
    PUTS "xsave: xcr0 "
    PUTHEX %r12
    PUTS " -> "
    PUTHEX %rbx
    PUTS "\n"
    cmp $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %rbx
    je 26f
    FAIL "xsave: XCR0 does not read back 0x7"
    // CPL3 code runs natively: the hardware XCR0 there holds at least the
    // guest's (on a CPL0-emulating host it is the host's own, docs/host-kvm.md).
26: lea user_xgetbv(%rip), %rdi
    xor %esi, %esi
    xor %edx, %edx
    call run_user
    mov %rax, %rbx
    PUTS "xsave: CPL3 xcr0 "
    PUTHEX %rbx
    PUTS "\n"
    and $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %rbx
    cmp $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %rbx
    je 9f
    FAIL "xsave: XCR0 at CPL3 lacks the guest's x87|SSE|AVX"

9:  mov $CPUID_XSTATE, %eax
    mov $2, %ecx
    cpuid
    mov %ebx, %r13d                 // r13 = offset of YMM_Hi128
    PUTS "xsave: ymm offset "
    PUTHEX %r13
    PUTS "\n"
    cmp $256, %eax                  // 16 registers x 16 bytes
    jne 10f
    cmp $(XSAVE_XSTATE_BV + 64), %r13
    jb 10f
    cmp $(4096 - 256), %r13
    jbe 11f
10: FAIL "xsave: Fn0000_000D.2 is not a 256-byte component past the header"

    // ymm0 = pattern A at CPL3, xsave64 at CPL0.
11: lea pattern_a(%rip), %rsi
    lea user_load_ymm0(%rip), %rdi
    xor %edx, %edx
    call run_user
    call xgetbv1_offered
    test %rax, %rax
    jz 31f
    mov $1, %edi
    call xgetbv_guarded
    test %rdx, %rdx
    jnz 32f
    test $XCR0_AVX, %rax
    jnz 33f
32: FAIL "xsave: XINUSE[2] (xgetbv of XCR 1) is not set with ymm0[255:128] in use"
33: PUTS "xsave: XINUSE[2] set with ymm0 in use\n"
31: lea xsave_area(%rip), %rdi
    mov $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %esi
    call xsave_guarded
    test %rax, %rax
    jz 12f
    FAIL "xsave: xsave64 faulted"
12: lea xsave_area(%rip), %rbx
    testb $XCR0_AVX, XSAVE_XSTATE_BV(%rbx)
    jnz 13f
    FAIL "xsave: XSTATE_BV[2] (AVX) clear with ymm0 in use"
13: lea pattern_a(%rip), %rdi
    mov %r13, %rsi
    call area_holds
    test %rax, %rax
    jnz 14f
    FAIL "xsave: the area does not hold ymm0 (XMM0 at 160, YMM0_H at the CPUID offset)"

    // Pattern B into the area, xrstor64, read back at CPL3.
14: lea pattern_b(%rip), %rdi
    mov %r13, %rsi
    call area_fill
    lea xsave_area(%rip), %rdi
    mov $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %esi
    call xrstor_guarded
    test %rax, %rax
    jz 15f
    FAIL "xsave: xrstor64 faulted"
15: lea user_buf(%rip), %rsi
    lea user_store_ymm0(%rip), %rdi
    xor %edx, %edx
    call run_user
    lea pattern_b(%rip), %rdi
    lea user_buf(%rip), %rsi
    mov $32, %edx
    call mem_eq
    test %rax, %rax
    jnz 16f
    FAIL "xsave: ymm0 after xrstor64 is not the restored value"

    // XSTATE_BV[2] = 0: xrstor64 puts YMM_Hi128 in its initial state.
16: andb $~XCR0_AVX, XSAVE_XSTATE_BV(%rbx)
    mov %rbx, %rdi
    mov $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %esi
    call xrstor_guarded
    test %rax, %rax
    jz 17f
    FAIL "xsave: xrstor64 with XSTATE_BV[2] clear faulted"
17: lea user_buf(%rip), %rsi
    lea user_store_ymm0(%rip), %rdi
    xor %edx, %edx
    call run_user
    lea pattern_b(%rip), %rdi
    lea user_buf(%rip), %rsi
    mov $16, %edx
    call mem_eq
    test %rax, %rax
    jz 18f
    lea pattern_zero(%rip), %rdi
    lea user_buf+16(%rip), %rsi
    mov $16, %edx
    call mem_eq
    test %rax, %rax
    jnz 19f
18: FAIL "xsave: XSTATE_BV[2] clear did not init ymm0[255:128] (or lost xmm0)"

    // The faults.
19: lea 8(%rbx), %rdi
    mov $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %esi
    call xrstor_guarded
    mov %rax, %rdi
    mov $VEC_GP, %esi
    call expect_fault
    test %rax, %rax
    jz 20f
    FAIL "xsave: xrstor64 of a misaligned area did not raise #GP"
20: orb $0x8, XSAVE_XSTATE_BV(%rbx)  // component 3 (MPX BNDREGS): not in XCR0
    mov %rbx, %rdi
    mov $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %esi
    call xrstor_guarded
    mov %rax, %rdi
    mov $VEC_GP, %esi
    call expect_fault
    test %rax, %rax
    jz 21f
    FAIL "xsave: xrstor64 of XSTATE_BV bits outside XCR0 did not raise #GP"
21: mov $UNMAPPED_ADDR, %edi
    mov $(XCR0_X87 | XCR0_SSE | XCR0_AVX), %esi
    call xsave_guarded
    test %rax, %rax
    jnz 22f
    FAIL "xsave: xsave64 into an unmapped page did not fault"
22: cmpq $VEC_PF, %gs:PC_FAULT_VEC
    je 23f
    FAIL "xsave: xsave64 into an unmapped page raised something other than #PF"
23: cmpq $PF_ERR_W, %gs:PC_FAULT_ERR
    je 24f
    PUTS "xsave: #PF error code "
    PUTHEX %gs:PC_FAULT_ERR
    PUTS "\n"
    FAIL "xsave: #PF error code is not 0x2"
24: mov %cr2, %rax
    cmp $UNMAPPED_ADDR, %rax
    je 25f
    FAIL "xsave: CR2 is not the unmapped area"

25: PUTS "xsave: ok\n"
    xor %eax, %eax
    pop %r13
    pop %r12
    pop %rbx
    ret

/*
 * without_xsave: the checks on a CPU without XSAVE (see the top); prints
 * what it checked, or fails the test.
 */
without_xsave:
    push %rbx
    push %r12
    mov %cr4, %r12
    test $CR4_OSXSAVE, %r12
    jz 1f
    FAIL "xsave: CR4.OSXSAVE is set on a CPU without XSAVE"
1:  mov $CPUID_FEATURES, %eax
    xor %ecx, %ecx
    cpuid
    test $CPUID_1_ECX_OSXSAVE, %ecx
    jz 2f
    FAIL "xsave: CPUID.1:ECX[27] (OSXSAVE) is set on a CPU without XSAVE"
2:  mov %r12, %rdi
    or $CR4_OSXSAVE, %rdi
    call write_cr4_guarded
    mov %rax, %rdi
    mov $VEC_GP, %esi
    call expect_fault
    test %rax, %rax
    jz 3f
    FAIL "xsave: setting CR4.OSXSAVE without XSAVE did not raise #GP"
3:  mov %cr4, %rax
    cmp %r12, %rax
    je 4f
    FAIL "xsave: CR4 changed although its write raised #GP"
4:  xor %edi, %edi
    call xgetbv_guarded
    mov %rdx, %rdi
    mov $VEC_UD, %esi
    call expect_fault
    test %rax, %rax
    jz 5f
    FAIL "xsave: xgetbv without XSAVE did not raise #UD"
5:  xor %edi, %edi
    mov $XCR0_X87, %esi
    call xsetbv_guarded
    mov %rax, %rdi
    mov $VEC_UD, %esi
    call expect_fault
    test %rax, %rax
    jz 6f
    FAIL "xsave: xsetbv without XSAVE did not raise #UD"
6:  lea xsave_area(%rip), %rdi
    mov $XCR0_X87, %esi
    call xsave_guarded
    mov %rax, %rdi
    mov $VEC_UD, %esi
    call expect_fault
    test %rax, %rax
    jz 7f
    FAIL "xsave: xsave64 without XSAVE did not raise #UD"
7:  lea xsave_area(%rip), %rdi
    mov $XCR0_X87, %esi
    call xrstor_guarded
    mov %rax, %rdi
    mov $VEC_UD, %esi
    call expect_fault
    test %rax, %rax
    jz 8f
    FAIL "xsave: xrstor64 without XSAVE did not raise #UD"
8:  PUTS "xsave: CPU without XSAVE: CR4.OSXSAVE raises #GP; xgetbv, xsetbv, xsave64, xrstor64 raise #UD\n"
    pop %r12
    pop %rbx
    ret

/* xgetbv1_offered: rax = CPUID Fn0000_000D.1 EAX[2] XGETBV1 (non-zero: offered). */
xgetbv1_offered:
    push %rbx
    mov $CPUID_XSTATE, %eax
    mov $1, %ecx
    cpuid
    and $CPUID_D_1_EAX_XGETBV1, %eax
    pop %rbx
    ret

/* write_cr4_guarded(rdi = value): rax = 0, or 1 if the write faulted. */
write_cr4_guarded:
1:  mov %rdi, %cr4
    xor %eax, %eax
    ret
2:  mov $1, %eax
    ret
    EXTABLE 1b, 2b

/*
 * expect_fault(rdi = a guarded helper's result, 1 if it faulted; esi =
 * vector): rax = 0 if the helper faulted with that vector.
 */
expect_fault:
    cmp $1, %rdi
    jne 1f
    cmp %rsi, %gs:PC_FAULT_VEC
    jne 1f
    xor %eax, %eax
    ret
1:  mov $1, %eax
    ret

/* area_holds(rdi = 32-byte value, rsi = YMM_Hi128 offset): rax = 1 if xsave_area holds it as ymm0. */
area_holds:
    push %rbx
    push %r12
    mov %rdi, %rbx
    mov %rsi, %r12
    lea xsave_area+XSAVE_XMM0(%rip), %rsi
    mov $16, %edx
    call mem_eq
    test %rax, %rax
    jz 1f
    lea 16(%rbx), %rdi
    lea xsave_area(%rip), %rsi
    add %r12, %rsi
    mov $16, %edx
    call mem_eq
1:  pop %r12
    pop %rbx
    ret

/* area_fill(rdi = 32-byte value, rsi = YMM_Hi128 offset): store it as xsave_area's ymm0. */
area_fill:
    lea xsave_area(%rip), %rdx
    mov (%rdi), %rax
    mov %rax, XSAVE_XMM0(%rdx)
    mov 8(%rdi), %rax
    mov %rax, XSAVE_XMM0+8(%rdx)
    add %rsi, %rdx
    mov 16(%rdi), %rax
    mov %rax, (%rdx)
    mov 24(%rdi), %rax
    mov %rax, 8(%rdx)
    ret

/* mem_eq(rdi, rsi, rdx = length): rax = 1 if equal. */
mem_eq:
    test %rdx, %rdx
    jz 2f
    mov (%rdi), %al
    cmp (%rsi), %al
    jne 1f
    inc %rdi
    inc %rsi
    dec %rdx
    jmp mem_eq
1:  xor %eax, %eax
    ret
2:  mov $1, %eax
    ret

/*
 * The XSAVE-set instructions at CPL0, each guarded by an extable entry:
 * a fault resumes at the "faulted" return with %gs:PC_FAULT_* filled in.
 */
    .section .completedtext, "ax"

/* xsetbv_guarded(edi = XCR, rsi = value): rax = 0, or 1 if it faulted. */
xsetbv_guarded:
    mov %edi, %ecx
    mov %esi, %eax
    mov %rsi, %rdx
    shr $32, %rdx
1:  xsetbv
    xor %eax, %eax
    ret
2:  mov $1, %eax
    ret
    EXTABLE 1b, 2b

/* xgetbv_guarded(edi = XCR): rax = value, rdx = 0; rdx = 1 if it faulted. */
xgetbv_guarded:
    mov %edi, %ecx
1:  xgetbv
    shl $32, %rdx
    or %rdx, %rax
    xor %edx, %edx
    ret
2:  mov $1, %edx
    ret
    EXTABLE 1b, 2b

/* xsave_guarded(rdi = area, rsi = requested-feature bitmap): rax = 0, or 1 if it faulted. */
xsave_guarded:
    mov %esi, %eax
    mov %rsi, %rdx
    shr $32, %rdx
1:  xsave64 (%rdi)
    xor %eax, %eax
    ret
2:  mov $1, %eax
    ret
    EXTABLE 1b, 2b

/* xrstor_guarded(rdi = area, rsi = requested-feature bitmap): rax = 0, or 1 if it faulted. */
xrstor_guarded:
    mov %esi, %eax
    mov %rsi, %rdx
    shr $32, %rdx
1:  xrstor64 (%rdi)
    xor %eax, %eax
    ret
2:  mov $1, %eax
    ret
    EXTABLE 1b, 2b

    .section .usertext, "ax"
user_xgetbv:
    xor %ecx, %ecx
    xgetbv
    shl $32, %rdx
    or %rdx, %rax
    ret

user_load_ymm0:
    vmovdqu (%rdi), %ymm0
    xor %eax, %eax
    ret

user_store_ymm0:
    vmovdqu %ymm0, (%rdi)
    xor %eax, %eax
    ret

    .section .rodata
    .balign 32
pattern_a:
    .quad 0x1111111111111111, 0x2222222222222222, 0x3333333333333333, 0x4444444444444444
pattern_b:
    .quad 0x5555555555555555, 0x6666666666666666, 0x7777777777777777, 0x8888888888888888
pattern_zero:
    .quad 0, 0

    .bss
    .balign XSAVE_ALIGN
xsave_area:
    .skip 4096
user_buf:
    .skip 32
