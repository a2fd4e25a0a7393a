/*
 * exit.S - ending the VM.  Every test ends here: the test-exit device at
 * port 0xF4 stops the VM with the byte written as ibsvm's exit status.
 * (HLT never exits to userspace with the in-kernel irqchip, so halting is
 * only the fallback if the device is missing.)
 */
#include "macros.h"

    .text
    .code64

/* exit_vm(edi = status): does not return. */
FUNC exit_vm
    mov %edi, %eax
    out %al, $PORT_TEST_EXIT
    cli
1:  hlt
    jmp 1b
ENDFUNC exit_vm

/* test_pass: print "PASS", exit EXIT_PASS. */
FUNC test_pass
    call console_lock
    PUTS "PASS\n"
    mov $EXIT_PASS, %edi
    jmp exit_vm
ENDFUNC test_pass

/* test_fail(rdi = reason string or 0): print "FAIL: reason", exit EXIT_FAIL. */
FUNC test_fail
    call console_lock
    PUTS "FAIL: "
    test %rdi, %rdi
    jz 1f
    call puts
1:  PUTS "\n"
    mov $EXIT_FAIL, %edi
    jmp exit_vm
ENDFUNC test_fail
