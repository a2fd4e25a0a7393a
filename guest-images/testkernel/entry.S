/*
 * entry.S - boot entry of the ibsvm test kernel and the test dispatcher.
 *
 * ===================== Boot contract (what ibsvm provides) =====================
 *  - The image is a static ELF64 executable, physical == virtual, loaded at
 *    0x100000 (1 MiB); execution starts at e_entry (= _start below) in 64-bit
 *    long mode at CPL0 with interrupts disabled (RFLAGS = 0x2).
 *    Or the same kernel as a bzImage (testkernel.bzImage, mkbzimage.py): its
 *    protected-mode payload is the flat image loaded at code32_start =
 *    0x100000, entered at payload + 0x200 (startup_64 below, the 64-bit boot
 *    protocol of boot.rst) in the same state; it jumps to _start.
 *  - Paging is on with an identity map of the first 1 GiB in 2 MiB pages
 *    (PML4 at 0x9000).  CR0 = PE|PG|ET (+others), CR4 = PAE, EFER = LME|LMA
 *    (SCE may or may not be set).
 *  - The VMM's GDT has selector 0x08 = 64-bit code, 0x10 = flat data.  We do
 *    not rely on it, nor on its page tables or IDT: _start loads its own GDT,
 *    TSS, IDT and page tables (an identity map of 1 GiB, 2 MiB pages, U/S=1
 *    so CPL3 test code can run from the image) before anything else.
 *  - RSI = physical address of the Linux boot_params ("zero page", 0x7000).
 *    hdr.cmd_line_ptr (u32 at +0x228) points to the NUL-terminated command
 *    line; it is copied into .bss at entry.  RSP points to a small boot stack
 *    that we leave at once for our own.
 *  - At least 64 MiB of RAM, identity mapped.
 *  - An Intel MP floating pointer "_MP_" in 0x9FC00..0xA0000 or
 *    0xF0000..0x100000 points to a "PCMP" config table whose processor entries
 *    (type 0, 20 bytes: +1 APIC id, +3 flags bit0 EN, bit1 BSP) list the vCPUs.
 *  - APs wait for INIT-SIPI-SIPI (in-kernel LAPIC) and start in real mode at
 *    vector * 0x1000; we use vector TRAMPOLINE_ADDR >> 12 (smp.S).
 *  - x2APIC is advertised (CPUID.1:ECX[21]) and enabled by setting
 *    IA32_APIC_BASE bits 11 (EN) and 10 (EXTD): ICR = MSR 0x830, SVR = 0x80F.
 *  - COM1 8250 at 0x3F8 (poll LSR bit 5 before writing THR).  ibsvm's stdin
 *    arrives in its receive FIFO (LSR bit 0, read RBR) when it is a pipe or a
 *    terminal; with /dev/null nothing arrives.
 *  - Test-exit device at port 0xF4: `out` of byte v ends the VM with status v.
 *    HLT never exits to userspace (in-kernel irqchip): every test ends there.
 *  - i8042 at 0x60/0x64: writing 0xFE to port 0x64 resets = VM ends, status 0.
 *  - RDMSR/WRMSR of an MSR the VMM does not handle gets #GP injected.
 *  - CPL0 code is emulated by KVM on the dev hosts (~1.8M instr/s) and some
 *    instructions cannot be emulated there (docs/host-kvm.md): CPL0 paths are
 *    short and use plain integer instructions; heavy loops run at CPL3.
 * ===============================================================================
 *
 * Command line: test=NAME (default smoke) picks a test registered with
 * DEFINE_TEST (macros.h); other key=value pairs are read by the tests.
 * Exit statuses: 0 pass, 1 test failure, 2 unknown test, 3 unexpected exception.
 */
#include "macros.h"

    .section .text.entry, "ax"
    .code64

FUNC _start
    cli
    cld
    mov %rsi, %r12                  // boot_params (zero page)

    // Own stack: cpu 0's kernel stack (.stack is not zeroed, needs no init).
    lea stack_blocks(%rip), %rsp
    add $SB_KSTACK_TOP, %rsp
    xor %ebp, %ebp

    // Zero .bss (page tables, IDT, TSSs, per-cpu data, hooks, buffers).
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    rep stosq

    mov %r12, boot_params_ptr(%rip)

    call paging_init                // own identity map, CR3
    call idt_init                   // build the IDT (loaded by cpu_init)
    xor %edi, %edi
    call cpu_init                   // GDT, segments, GS = per-cpu, TSS, IDT

    // Mask both 8259As: nothing may arrive through LINT0 ExtINT.
    mov $0xff, %al
    out %al, $PORT_PIC1_DATA
    out %al, $PORT_PIC2_DATA

    call serial_init
    call cmdline_init               // copy the command line out of the zero page
    jmp dispatch
ENDFUNC _start

/*
 * startup_64: the 64-bit entry of the bzImage, BZ_ENTRY64_OFFSET into the
 * payload (boot.rst "64-bit boot protocol"; the linker script checks the
 * address).  Same machine state as at _start.  The gap after _start is
 * filled with hlt.
 */
    .org BZ_ENTRY64_OFFSET, 0xf4
FUNC startup_64
    jmp _start
ENDFUNC startup_64

/*
 * kernel_info (boot protocol 2.15, boot.rst "The kernel_info"): the setup
 * header's kernel_info_offset points here (offset from the payload start,
 * written by mkbzimage.py).  No variable-length data.
 */
    .section .rodata.kernel_info, "a"
    .balign 4
    .globl kernel_info
kernel_info:
    .ascii "LToP"                   // header
    .long kernel_info_end - kernel_info // size (fixed part)
    .long kernel_info_end - kernel_info // size_total
    .long 0                         // setup_type_max: we read no setup_data
kernel_info_end:

/*
 * dispatch: print the banner and the command line, run the test named by
 * test=NAME (default "smoke").  Never returns.
 */
    .text
FUNC dispatch
    LOAD_STR %rdi, "test"
    call cmdline_find               // rax = value, rdx = length
    test %rax, %rax
    jnz 1f
    LOAD_STR %rax, "smoke"
    mov $5, %edx
1:  mov %rax, %r12                  // r12 = test name (not NUL-terminated)
    mov %rdx, %r13                  // r13 = its length

    PUTS "ibsvm testkernel: "
    mov %r12, %rdi
    mov %r13, %rsi
    call puts_n
    PUTS "\n"
    PUTS "cmdline: "
    lea cmdline_buf(%rip), %rdi
    call puts
    PUTS "\n"

    lea __testtab_start(%rip), %rbx
2:  lea __testtab_end(%rip), %rax
    cmp %rax, %rbx
    jae .Lunknown_test
    mov (%rbx), %rdi                // entry name (NUL-terminated)
    mov %r12, %rsi
    mov %r13, %rdx
    call str_eq_n
    test %rax, %rax
    jnz 3f
    add $16, %rbx
    jmp 2b

3:  call *8(%rbx)
    test %rax, %rax
    jz test_pass
    FAIL "test function returned failure"

.Lunknown_test:
    PUTS "unknown test: "
    mov %r12, %rdi
    mov %r13, %rsi
    call puts_n
    PUTS "\n"
    mov $EXIT_UNKNOWN_TEST, %edi
    jmp exit_vm
ENDFUNC dispatch

    .bss
    .balign 8
    .globl boot_params_ptr
boot_params_ptr:
    .quad 0
