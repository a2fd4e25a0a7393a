#!/bin/sh
# check.sh ELF [BZIMAGE] - static checks of the test kernel (run by `make check`):
#  1. ELF layout: EXEC, x86-64, e_entry = _start = 0x100000, every PT_LOAD
#     with physical == virtual address, the first one at 0x100000;
#     startup_64 (the bzImage's 64-bit entry) = 0x100200.
#  2. CPL0 code (.text) holds no instruction that KVM's emulator on the dev
#     hosts cannot run (docs/host-kvm.md: int3/int n, ud2, xsave/xrstor,
#     cmpxchg16b, fwait, fences, SSE/AVX, popcnt...) and nothing objdump
#     cannot decode.  .completedtext is CPL0 code that may also hold the
#     instructions ibsvm completes for the guest (xsave64, xrstor64; xsetbv
#     and xgetbv, which the emulator runs) and nothing else outside that
#     subset.  CPL3 code (.usertext) runs natively and is exempt.
#     The 16/32-bit AP trampoline (.trampoline) is disassembled for reading
#     only (objdump cannot switch modes inside a section).
#  3. BZIMAGE (if given): the setup header fields a 64-bit loader reads
#     (mkbzimage.py), and a payload identical to the ELF's flat image.
set -eu
elf=${1:?usage: check.sh path/to/testkernel.elf [path/to/testkernel.bzImage]}
bz=${2:-}
fail=0
err() { echo "check.sh: $*" >&2; fail=1; }

hdr=$(readelf -hW "$elf")
echo "$hdr" | grep -q 'Type: *EXEC' || err "not an EXEC ELF"
echo "$hdr" | grep -q 'Machine: *Advanced Micro Devices X86-64' || err "not x86-64"
entry=$(echo "$hdr" | sed -n 's/.*Entry point address: *//p')
start=$(nm "$elf" | awk '$3 == "_start" { print "0x" $1 }')
[ "$((entry))" -eq "$((start))" ] || err "e_entry $entry != _start $start"
[ "$((entry))" -eq "$((0x100000))" ] || err "e_entry $entry != 0x100000"
entry64=$(nm "$elf" | awk '$3 == "startup_64" { print "0x" $1 }')
[ "$((entry64))" -eq "$((0x100200))" ] || err "startup_64 ${entry64:-missing} != 0x100200"

loads=$(readelf -lW "$elf" | awk '$1 == "LOAD" { print $3, $4 }')
[ -n "$loads" ] || err "no PT_LOAD segment"
echo "$loads" | while read -r vaddr paddr; do
    [ "$((vaddr))" -eq "$((paddr))" ] || { echo "check.sh: PT_LOAD vaddr $vaddr != paddr $paddr" >&2; exit 1; }
done || fail=1
lowest=$(echo "$loads" | awk '{ print $1 }' | sort | head -n 1)
[ "$((lowest))" -eq "$((0x100000))" ] || err "lowest PT_LOAD at $lowest, not 0x100000"

forbidden='^(int3|int1|int|into|icebp|ud0|ud1|ud2|xsave[a-z0-9]*|xrstor[a-z0-9]*|fxsave[a-z0-9]*|fxrstor[a-z0-9]*|cmpxchg16b|fwait|wait|popcnt|lzcnt|tzcnt|lfence|mfence|sfence|syscall|sysret[lq]?|sysenter|sysexit|\(bad\))$'
# bad_insns SECTION ALLOWED: instructions of SECTION matching $forbidden (or
# naming an SSE/AVX register) that are not exactly ALLOWED.
bad_insns() {
    objdump -d --no-show-raw-insn -j "$1" "$elf" |
        awk -F'\t' 'NF >= 2 && $1 ~ /^ *[0-9a-f]+:$/ { print $1 "\t" $2 }' |
        awk -F'\t' -v re="$forbidden" -v ok="$2" \
            '{ split($2, w, " "); if ((w[1] ~ re || $2 ~ /%[xyz]?mm[0-9]/) && w[1] !~ ok) print }'
}
bad=$(bad_insns .text '^$')
if [ -n "$bad" ]; then
    err "CPL0 code (.text) contains instructions the emulator cannot run:"
    echo "$bad" >&2
fi
bad=$(bad_insns .completedtext '^(xsave64|xrstor64)$')
if [ -n "$bad" ]; then
    err "CPL0 code (.completedtext) contains instructions neither the emulator nor ibsvm runs:"
    echo "$bad" >&2
fi

if [ -n "$bz" ]; then
    # field OFFSET SIZE: little-endian unsigned value in the bzImage file.
    field() { od -An -tu"$2" -j "$(($1))" -N "$2" "$bz" | tr -d ' '; }
    [ "$(dd if="$bz" bs=1 skip=$((0x202)) count=4 2>/dev/null)" = HdrS ] || err "$bz: no HdrS at 0x202"
    [ "$(field 0x1FE 2)" -eq "$((0xAA55))" ] || err "$bz: boot_flag != 0xAA55"
    [ "$(field 0x206 2)" -ge "$((0x020C))" ] || err "$bz: boot protocol < 2.12"
    [ "$(($(field 0x211 1) & 1))" -eq 1 ] || err "$bz: loadflags lacks LOADED_HIGH"
    [ "$(field 0x214 4)" -eq "$((0x100000))" ] || err "$bz: code32_start != 0x100000"
    [ "$(($(field 0x236 2) & 1))" -eq 1 ] || err "$bz: xloadflags lacks XLF_KERNEL_64"
    setup=$(( ($(field 0x1F1 1) + 1) * 512 ))
    flat=$(mktemp)
    objcopy -O binary "$elf" "$flat"
    tail -c +$((setup + 1)) "$bz" | cmp -s - "$flat" || err "$bz: payload at $setup differs from the ELF's flat image"
    rm -f "$flat"
fi

[ "$fail" -eq 0 ] || exit 1
echo "check.sh: $elf OK (entry $entry, PT_LOAD phys == virt, CPL0 code clean)"
[ -z "$bz" ] || echo "check.sh: $bz OK (setup $setup bytes, HdrS $(printf %#x "$(field 0x206 2)"), 64-bit entry at payload + 0x200)"
