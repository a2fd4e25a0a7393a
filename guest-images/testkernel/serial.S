/*
 * serial.S - COM1 output and the console lock.
 *
 * putc, puts, puts_n, put_hex, put_hex64, put_dec preserve every register
 * (flags excepted) and take no lock.  Code that may print while another cpu
 * prints wraps whole lines in console_lock / console_unlock (recursive per
 * cpu, so an exception report on the holder cannot deadlock; a holder that
 * never lets go is overridden after CONSOLE_LOCK_SPINS).
 * getc_poll reads console input (ibsvm forwards its stdin to COM1).
 */
#include "macros.h"

    .text
    .code64

/* serial_init: 115200 8N1, no interrupts (8250 datasheet). */
FUNC serial_init
    push %rax
    push %rdx
    mov $(COM1_BASE + UART_IER), %dx
    xor %eax, %eax
    out %al, %dx                    // IER = 0
    mov $(COM1_BASE + UART_LCR), %dx
    mov $UART_LCR_DLAB, %al
    out %al, %dx
    mov $(COM1_BASE + UART_DLL), %dx
    mov $1, %al                     // divisor 1 = 115200 baud
    out %al, %dx
    mov $(COM1_BASE + UART_DLM), %dx
    xor %eax, %eax
    out %al, %dx
    mov $(COM1_BASE + UART_LCR), %dx
    mov $UART_LCR_8N1, %al
    out %al, %dx
    mov $(COM1_BASE + UART_MCR), %dx
    mov $UART_MCR_DTR_RTS, %al
    out %al, %dx
    pop %rdx
    pop %rax
    ret
ENDFUNC serial_init

/* putc(dil = byte): wait (bounded) for THR empty, write. */
FUNC putc
    push %rax
    push %rcx
    push %rdx
    mov $(COM1_BASE + UART_LSR), %dx
    mov $UART_THRE_SPINS, %ecx
1:  in %dx, %al
    test $UART_LSR_THRE, %al
    jnz 2f
    pause
    dec %ecx
    jnz 1b
2:  mov $(COM1_BASE + UART_THR), %dx
    mov %dil, %al
    out %al, %dx
    pop %rdx
    pop %rcx
    pop %rax
    ret
ENDFUNC putc

/*
 * getc_poll(rdi = polls): read one byte from COM1's receive FIFO, polling
 * LSR bit 0 (data ready) at most `polls` times.  Returns rax = the byte, or
 * -1 if none arrived; rdx = polls left (pass it back to share one budget
 * over several bytes).  No interrupts: IER stays 0.
 */
FUNC getc_poll
    push %rcx
    mov %rdi, %rcx
1:  test %rcx, %rcx
    jz 3f
    dec %rcx
    mov $(COM1_BASE + UART_LSR), %dx
    in %dx, %al
    test $UART_LSR_DR, %al
    jnz 2f
    pause
    jmp 1b
2:  mov $(COM1_BASE + UART_RBR), %dx
    xor %eax, %eax
    in %dx, %al
    mov %rcx, %rdx
    pop %rcx
    ret
3:  mov $-1, %rax
    xor %edx, %edx
    pop %rcx
    ret
ENDFUNC getc_poll

/* puts(rdi = NUL-terminated string). */
FUNC puts
    push %rsi
    push %rdi
    mov %rdi, %rsi
1:  movzbl (%rsi), %edi
    test %edi, %edi
    jz 2f
    call putc
    inc %rsi
    jmp 1b
2:  pop %rdi
    pop %rsi
    ret
ENDFUNC puts

/* puts_n(rdi = string, rsi = length): stops early at a NUL. */
FUNC puts_n
    push %rsi
    push %rdi
    push %rcx
    mov %rsi, %rcx
    mov %rdi, %rsi
1:  test %rcx, %rcx
    jz 2f
    movzbl (%rsi), %edi
    test %edi, %edi
    jz 2f
    call putc
    inc %rsi
    dec %rcx
    jmp 1b
2:  pop %rcx
    pop %rdi
    pop %rsi
    ret
ENDFUNC puts_n

/* put_hex64(rdi): "0x" and 16 digits. */
FUNC put_hex64
    push %rcx
    mov $16, %ecx
    jmp put_hex_digits
ENDFUNC put_hex64

/* put_hex(rdi): "0x" and the digits without leading zeros ("0x0" for 0). */
FUNC put_hex
    push %rcx
    push %rax
    push %rdi
    mov $16, %ecx
1:  cmp $1, %ecx
    je 2f
    mov %rdi, %rax
    shr $60, %rax
    jnz 2f
    shl $4, %rdi
    dec %ecx
    jmp 1b
2:  pop %rdi
    pop %rax
    jmp put_hex_digits
ENDFUNC put_hex

/* Tail of put_hex/put_hex64: rcx pushed, ecx = digits to print. */
put_hex_digits:
    push %rax
    push %rsi
    push %rdi
    mov %rdi, %rsi
    // Rotate so the first digit to print is in the top nibble.
    mov $16, %eax
    sub %ecx, %eax
1:  test %eax, %eax
    jz 2f
    shl $4, %rsi
    dec %eax
    jmp 1b
2:  mov $'0', %edi
    call putc
    mov $'x', %edi
    call putc
3:  rol $4, %rsi
    mov %esi, %eax
    and $0xf, %eax
    lea hex_digits(%rip), %rdi
    movzbl (%rdi,%rax), %edi
    call putc
    dec %ecx
    jnz 3b
    pop %rdi
    pop %rsi
    pop %rax
    pop %rcx
    ret

/* put_dec(rdi): unsigned decimal. */
FUNC put_dec
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    sub $32, %rsp
    mov %rdi, %rax
    lea 32(%rsp), %rsi              // digits are written backwards from here
    mov $10, %ecx
1:  xor %edx, %edx
    div %rcx
    add $'0', %dl
    dec %rsi
    mov %dl, (%rsi)
    test %rax, %rax
    jnz 1b
2:  movzbl (%rsi), %edi
    call putc
    inc %rsi
    lea 32(%rsp), %rax
    cmp %rax, %rsi
    jb 2b
    add $32, %rsp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    ret
ENDFUNC put_dec

/* console_lock: all registers preserved.  Needs GS = per-cpu. */
FUNC console_lock
    push %rax
    push %rcx
    push %rdx
    mov %gs:PC_CPU, %rdx
    inc %rdx                        // owner = cpu + 1, 0 = free
    cmp console_owner(%rip), %rdx
    je 3f                           // nested on this cpu
    mov $CONSOLE_LOCK_SPINS, %ecx
1:  xor %eax, %eax
    lock cmpxchg %rdx, console_owner(%rip)
    je 2f
    pause
    dec %ecx
    jnz 1b
    mov %rdx, console_owner(%rip)   // stuck holder: take it over
2:  movq $1, console_depth(%rip)
    jmp 4f
3:  incq console_depth(%rip)
4:  pop %rdx
    pop %rcx
    pop %rax
    ret
ENDFUNC console_lock

/* console_unlock: all registers preserved. */
FUNC console_unlock
    decq console_depth(%rip)
    jnz 1f
    movq $0, console_owner(%rip)
1:  ret
ENDFUNC console_unlock

    .section .rodata
hex_digits:
    .ascii "0123456789abcdef"

    .bss
    .balign 64
console_owner:
    .quad 0
console_depth:
    .quad 0
