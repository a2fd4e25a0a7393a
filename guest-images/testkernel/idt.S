/*
 * idt.S - IDT for all 256 vectors, the common exception path, and the hooks
 * tests use:
 *  - set_vector_hook(vector, fn): fn(rdi = frame, rsi = vector) runs on
 *    every delivery of that vector (NMI = vector 2, fixed-vector interrupts
 *    32..255, or an exception) and returns rax = 0 if it handled it; any
 *    other value falls through to the extable/unexpected path.  Hooks run
 *    with IF=0 on the interrupted stack (NMI: IST1, #DF: IST2) and may edit
 *    the frame (defs.h FR_*).  Interrupt hooks send their own EOI
 *    (apic_eoi).  NMI hooks must not fault: the iretq of a nested
 *    exception would unmask NMIs and a second NMI would reuse IST1.
 *  - the exception table (EXTABLE in macros.h, used by rdmsr_safe): a fault
 *    at a listed RIP is recorded in %gs:PC_FAULT_* and resumes at the fixup.
 *  - #UD from CPL3 at user_done_ud2 ends run_user (user.S).
 * Anything else prints vector, error code, RIP, registers and exits 3.
 */
#include "macros.h"

    .text
    .code64

/*
 * 256 entry stubs, IDT_STUB_ALIGN bytes apart: push a zero error code when
 * the CPU does not push one, push the vector, jump to exc_common.
 * Vectors with an error code (APM 8.2): 8, 10-14, 17, 21, 29, 30.
 */
    .balign IDT_STUB_ALIGN
    .globl idt_stubs
idt_stubs:
    vector = 0
    .rept IDT_ENTRIES
    .balign IDT_STUB_ALIGN
    .if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    pushq $vector
    .else
    pushq $0
    pushq $vector
    .endif
    jmp exc_common
    vector = vector + 1
    .endr
    .balign IDT_STUB_ALIGN
    .globl idt_stubs_end            // linker.ld asserts 256 * 16 bytes in all
idt_stubs_end:

/*
 * exc_common: save all GPRs below the vector/error words, giving the
 * frame of defs.h (FR_*), call exc_dispatch(frame), restore, iretq.
 */
exc_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    cld
    mov %rsp, %rdi
    call exc_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp                   // vector, error code
    iretq

/* exc_dispatch(rdi = frame): returns if the event was handled. */
exc_dispatch:
    push %rbx
    mov %rdi, %rbx
    mov FR_VEC(%rbx), %rax

    // run_user's way back: #UD from CPL3 exactly at user_done_ud2.
    cmp $VEC_UD, %rax
    jne 1f
    testb $3, FR_CS(%rbx)
    jz 1f
    lea user_done_ud2(%rip), %rcx
    cmp %rcx, FR_RIP(%rbx)
    jne 1f
    mov %rbx, %rdi
    jmp user_return_from_frame      // does not return here

1:  cmp $VEC_NMI, %rax
    jne 2f
    incq %gs:PC_NMI_COUNT
2:  lea vector_hooks(%rip), %rcx
    mov (%rcx,%rax,8), %rcx
    test %rcx, %rcx
    jz 3f
    mov %rbx, %rdi
    mov %rax, %rsi
    call *%rcx
    test %rax, %rax
    jz .Lhandled
    mov FR_VEC(%rbx), %rax

3:  cmp $SPURIOUS_VECTOR, %rax      // APIC spurious interrupt: no EOI, ignore
    je .Lhandled
    cmp $VEC_NMI, %rax              // an NMI nobody claimed is unexpected
    je .Lunexpected
    cmp $32, %rax
    jae .Lunexpected

    // Exception table lookup.
    mov FR_RIP(%rbx), %rdx
    lea __extable_start(%rip), %rcx
    lea __extable_end(%rip), %rsi
4:  cmp %rsi, %rcx
    jae .Lunexpected
    cmp (%rcx), %rdx
    je 5f
    add $16, %rcx
    jmp 4b
5:  mov %rax, %gs:PC_FAULT_VEC
    mov FR_ERR(%rbx), %rax
    mov %rax, %gs:PC_FAULT_ERR
    mov %rdx, %gs:PC_FAULT_RIP
    incq %gs:PC_FAULT_COUNT
    mov 8(%rcx), %rax
    mov %rax, FR_RIP(%rbx)          // resume at the fixup

.Lhandled:
    pop %rbx
    ret

.Lunexpected:
    mov %rbx, %rdi
    jmp exc_unexpected

/*
 * exc_unexpected(rdi = frame): report and exit EXIT_EXCEPTION.
 *   unexpected exception #GP: vector 0xd error 0x0 rip 0x... cs 0x8 rflags 0x...
 *     rsp 0x... cr2 0x... cpu 0
 *   regs: rax 0x... rbx 0x... ... r15 0x...
 */
FUNC exc_unexpected
    mov %rdi, %rbx
    call console_lock
    mov FR_VEC(%rbx), %rax
    LOAD_STR %rdi, "interrupt"
    cmp $32, %rax
    jae 1f
    lea vec_names(%rip), %rdi
    mov (%rdi,%rax,8), %rdi
1:  PUTS "unexpected exception "
    call puts
    PUTS ": vector "
    PUTHEX FR_VEC(%rbx)
    PUTS " error "
    PUTHEX FR_ERR(%rbx)
    PUTS " rip "
    PUTHEX FR_RIP(%rbx)
    PUTS " cs "
    PUTHEX FR_CS(%rbx)
    PUTS " rflags "
    PUTHEX FR_RFLAGS(%rbx)
    PUTS " rsp "
    PUTHEX FR_RSP(%rbx)
    PUTS " cr2 "
    mov %cr2, %rax
    PUTHEX %rax
    PUTS " cpu "
    PUTDEC %gs:PC_CPU
    PUTS "\n"

    PUTS "regs:"
    lea reg_dump_table(%rip), %r12
2:  mov (%r12), %rdi
    test %rdi, %rdi
    jz 3f
    call puts                       // " rax "
    mov 8(%r12), %rax
    mov (%rbx,%rax), %rdi
    call put_hex
    add $16, %r12
    jmp 2b
3:  PUTS "\n"
    mov $EXIT_EXCEPTION, %edi
    jmp exit_vm
ENDFUNC exc_unexpected

/* set_vector_hook(edi = vector, rsi = fn or 0). */
FUNC set_vector_hook
    movzbl %dil, %eax
    lea vector_hooks(%rip), %rcx
    mov %rsi, (%rcx,%rax,8)
    ret
ENDFUNC set_vector_hook

/* idt_init: fill idt_table with interrupt gates to the stubs (BSP, once). */
FUNC idt_init
    lea idt_stubs(%rip), %rsi
    lea idt_table(%rip), %rdi
    xor %ecx, %ecx                  // vector
1:  movzwl %si, %eax                // offset 15:0
    mov %rsi, %rdx
    shr $16, %rdx
    and $0xffff, %edx
    shl $48, %rdx                   // offset 31:16 -> 63:48
    or %rdx, %rax
    movabsq $((IDT_GATE_INTR << 40) | (KERNEL_CS << 16)), %rdx
    or %rdx, %rax
    cmp $VEC_NMI, %ecx
    jne 2f
    mov $IST_NMI, %edx
    shl $32, %rdx                   // IST index -> bits 34:32
    or %rdx, %rax
2:  cmp $VEC_DF, %ecx
    jne 3f
    mov $IST_DF, %edx
    shl $32, %rdx
    or %rdx, %rax
3:  mov %rax, (%rdi)
    mov %rsi, %rax
    shr $32, %rax
    mov %rax, 8(%rdi)               // offset 63:32
    add $16, %rdi
    add $IDT_STUB_ALIGN, %rsi
    inc %ecx
    cmp $IDT_ENTRIES, %ecx
    jb 1b
    ret
ENDFUNC idt_init

    .section .rodata
    .balign 8
    .globl idt_desc
idt_desc:
    .word IDT_ENTRIES * 16 - 1
    .quad idt_table

/* Name strings for the report: one .quad pointer each. */
.macro STRPTR str
    .pushsection .rodata.str, "a"
.Lstrptr_\@:
    .asciz "\str"
    .popsection
    .quad .Lstrptr_\@
.endm

    .balign 8
vec_names:                          // APM 8.2 / SDM 6.15 vector names
    STRPTR "#DE"
    STRPTR "#DB"
    STRPTR "NMI"
    STRPTR "#BP"
    STRPTR "#OF"
    STRPTR "#BR"
    STRPTR "#UD"
    STRPTR "#NM"
    STRPTR "#DF"
    STRPTR "#CSO"
    STRPTR "#TS"
    STRPTR "#NP"
    STRPTR "#SS"
    STRPTR "#GP"
    STRPTR "#PF"
    STRPTR "#15"
    STRPTR "#MF"
    STRPTR "#AC"
    STRPTR "#MC"
    STRPTR "#XM"
    STRPTR "#VE"
    STRPTR "#CP"
    STRPTR "#22"
    STRPTR "#23"
    STRPTR "#24"
    STRPTR "#25"
    STRPTR "#26"
    STRPTR "#27"
    STRPTR "#HV"
    STRPTR "#VC"
    STRPTR "#SX"
    STRPTR "#31"

reg_dump_table:                     // (" name ", frame offset), 0-terminated
    STRPTR " rax "
    .quad FR_RAX
    STRPTR " rbx "
    .quad FR_RBX
    STRPTR " rcx "
    .quad FR_RCX
    STRPTR " rdx "
    .quad FR_RDX
    STRPTR " rsi "
    .quad FR_RSI
    STRPTR " rdi "
    .quad FR_RDI
    STRPTR " rbp "
    .quad FR_RBP
    STRPTR " r8 "
    .quad FR_R8
    STRPTR " r9 "
    .quad FR_R9
    STRPTR " r10 "
    .quad FR_R10
    STRPTR " r11 "
    .quad FR_R11
    STRPTR " r12 "
    .quad FR_R12
    STRPTR " r13 "
    .quad FR_R13
    STRPTR " r14 "
    .quad FR_R14
    STRPTR " r15 "
    .quad FR_R15
    .quad 0, 0

    .bss
    .balign 4096
idt_table:
    .skip IDT_ENTRIES * 16
    .balign 8
    .globl vector_hooks
vector_hooks:
    .skip IDT_ENTRIES * 8
