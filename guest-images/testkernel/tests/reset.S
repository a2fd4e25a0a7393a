/*
 * test=reset: reset through the i8042 (command 0xFE on port 0x64); ibsvm
 * ends the VM with status 0.
 * Serial: "resetting"; exit 0 (from the VMM).  If nothing happens within
 * RESET_WAIT_LOOPS: "FAIL: reset did not happen", exit 1.
 */
#include "macros.h"

    .text
    .code64

DEFINE_TEST reset, test_reset

test_reset:
    PUTS "resetting\n"
    mov $I8042_IBF_SPINS, %ecx      // wait (bounded) for an empty input buffer
1:  in $PORT_I8042_STATUS, %al
    test $I8042_STATUS_IBF, %al
    jz 2f
    pause
    dec %ecx
    jnz 1b
2:  mov $I8042_CMD_RESET, %al
    out %al, $PORT_I8042_STATUS
    mov $RESET_WAIT_LOOPS, %edi
    call delay_loops
    FAIL "reset did not happen"
