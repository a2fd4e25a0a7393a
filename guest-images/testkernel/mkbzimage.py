#!/usr/bin/env python3
"""mkbzimage.py ELF PAYLOAD OUT - wrap the test kernel's flat image in a bzImage.

ELF     testkernel.elf (read with `nm` for the symbols below)
PAYLOAD the flat image of ELF (objcopy -O binary): byte 0 is address 0x100000
OUT     the bzImage: a setup area of (SETUP_SECTS + 1) * 512 bytes holding the
        setup header (Documentation/arch/x86/boot.rst), then PAYLOAD

Only what a 64-bit loader (ibsvm, linux-loader, boot.rst "64-bit boot
protocol") needs is filled in; the rest of the setup area is zero.  There is
no real-mode setup code and no 32-bit entry: the jump at 0x200 leads to a
16-bit `cli; hlt` loop, payload offset 0 is _start (64-bit code), and
xloadflags advertises XLF_KERNEL_64 only.  Python 3 standard library only.
"""

import struct
import subprocess
import sys

LOAD_ADDR = 0x100000  # code32_start and pref_address: the ELF is linked there
ENTRY64_OFFSET = 0x200  # boot.rst: 64-bit entry = protected-mode code + 0x200
SETUP_SECTS = 1  # one 512-byte sector after the boot sector holds the header
SETUP_SIZE = (SETUP_SECTS + 1) * 512
BOOT_PROTOCOL = 0x020F  # 2.15: kernel_info_offset is the last field we write
LOADED_HIGH = 0x01  # loadflags bit 0: protected-mode code at 0x100000
XLF_KERNEL_64 = 0x01  # xloadflags bit 0: 64-bit entry at +0x200
CMDLINE_SIZE = 1023  # CMDLINE_MAX - 1 in include/defs.h
KERNEL_ALIGNMENT = 0x100000  # not relocatable; the load address' alignment
MIN_ALIGNMENT = 20  # log2(KERNEL_ALIGNMENT)
REALMODE_STUB = 0x26C  # right after the header: 16-bit `cli; hlt; jmp .-1`


def symbols(elf):
    out = subprocess.run(["nm", elf], check=True, capture_output=True, text=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return syms


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__.splitlines()[0])
    elf, payload_path, out = sys.argv[1:]
    syms = symbols(elf)
    payload = open(payload_path, "rb").read()

    def need(cond, why):
        if not cond:
            sys.exit(f"mkbzimage.py: {why}")

    need(syms["_start"] == LOAD_ADDR, f"_start at {syms['_start']:#x}, not {LOAD_ADDR:#x}")
    need(syms["startup_64"] == LOAD_ADDR + ENTRY64_OFFSET, "startup_64 is not at payload + 0x200")
    need(syms["__kernel_start"] == LOAD_ADDR, "__kernel_start is not the load address")
    need(len(payload) > ENTRY64_OFFSET, "payload too short")
    # Memory the kernel needs from the load address on: image, .bss, stacks.
    init_size = (syms["__kernel_end"] - LOAD_ADDR + 0xFFF) & ~0xFFF
    need(init_size >= len(payload), "payload larger than __kernel_end - 0x100000")
    kernel_info_offset = syms["kernel_info"] - LOAD_ADDR
    need(payload[kernel_info_offset:kernel_info_offset + 4] == b"LToP", "no kernel_info in the payload")

    setup = bytearray(SETUP_SIZE)

    def put(fmt, offset, value):
        struct.pack_into("<" + fmt, setup, offset, value)

    # Setup header (boot.rst "The real-mode kernel header"), offsets in the file.
    put("B", 0x1F1, SETUP_SECTS)                # setup_sects
    put("H", 0x1F2, 0)                          # root_flags: read-write
    put("I", 0x1F4, (len(payload) + 15) // 16)  # syssize: payload in 16-byte paragraphs
    put("H", 0x1FA, 0xFFFF)                     # vid_mode: "normal"
    put("H", 0x1FC, 0)                          # root_dev
    put("H", 0x1FE, 0xAA55)                     # boot_flag
    put("H", 0x200, 0xEB | (REALMODE_STUB - 0x202) << 8)  # jump: short jmp to the stub
    setup[0x202:0x206] = b"HdrS"                # header
    put("H", 0x206, BOOT_PROTOCOL)              # version
    put("H", 0x20C, 0x1000)                     # start_sys_seg (obsolete; Linux's value)
    put("B", 0x211, LOADED_HIGH)                # loadflags
    put("I", 0x214, LOAD_ADDR)                  # code32_start
    put("I", 0x22C, 0x7FFFFFFF)                 # initrd_addr_max
    put("I", 0x230, KERNEL_ALIGNMENT)           # kernel_alignment
    put("B", 0x234, 0)                          # relocatable_kernel: no
    put("B", 0x235, MIN_ALIGNMENT)              # min_alignment
    put("H", 0x236, XLF_KERNEL_64)              # xloadflags
    put("I", 0x238, CMDLINE_SIZE)               # cmdline_size
    put("Q", 0x258, LOAD_ADDR)                  # pref_address
    put("I", 0x260, init_size)                  # init_size
    put("I", 0x268, kernel_info_offset)         # kernel_info_offset
    # 16-bit setup code reached by a real-mode loader: cli; hlt; jmp .-1
    setup[REALMODE_STUB:REALMODE_STUB + 4] = b"\xFA\xF4\xEB\xFD"

    with open(out, "wb") as f:
        f.write(setup)
        f.write(payload)


if __name__ == "__main__":
    main()
