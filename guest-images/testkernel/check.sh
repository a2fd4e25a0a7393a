#!/bin/sh
# check.sh ELF - static checks of the test kernel (run by `make check`):
#  1. ELF layout: EXEC, x86-64, e_entry = _start = 0x100000, every PT_LOAD
#     with physical == virtual address, the first one at 0x100000.
#  2. CPL0 code (.text) holds no instruction that KVM's emulator on the dev
#     hosts cannot run (host-kvm.md: int3/int n, ud2, xsave/xrstor,
#     cmpxchg16b, fwait, fences, SSE/AVX, popcnt...) and nothing objdump
#     cannot decode.  CPL3 code (.usertext) runs natively and is exempt.
#     The 16/32-bit AP trampoline (.trampoline) is disassembled for reading
#     only (objdump cannot switch modes inside a section).
set -eu
elf=${1:?usage: check.sh path/to/testkernel.elf}
fail=0
err() { echo "check.sh: $*" >&2; fail=1; }

hdr=$(readelf -hW "$elf")
echo "$hdr" | grep -q 'Type: *EXEC' || err "not an EXEC ELF"
echo "$hdr" | grep -q 'Machine: *Advanced Micro Devices X86-64' || err "not x86-64"
entry=$(echo "$hdr" | sed -n 's/.*Entry point address: *//p')
start=$(nm "$elf" | awk '$3 == "_start" { print "0x" $1 }')
[ "$((entry))" -eq "$((start))" ] || err "e_entry $entry != _start $start"
[ "$((entry))" -eq "$((0x100000))" ] || err "e_entry $entry != 0x100000"

loads=$(readelf -lW "$elf" | awk '$1 == "LOAD" { print $3, $4 }')
[ -n "$loads" ] || err "no PT_LOAD segment"
echo "$loads" | while read -r vaddr paddr; do
    [ "$((vaddr))" -eq "$((paddr))" ] || { echo "check.sh: PT_LOAD vaddr $vaddr != paddr $paddr" >&2; exit 1; }
done || fail=1
lowest=$(echo "$loads" | awk '{ print $1 }' | sort | head -n 1)
[ "$((lowest))" -eq "$((0x100000))" ] || err "lowest PT_LOAD at $lowest, not 0x100000"

forbidden='^(int3|int1|int|into|icebp|ud0|ud1|ud2|xsave[a-z0-9]*|xrstor[a-z0-9]*|fxsave[a-z0-9]*|fxrstor[a-z0-9]*|cmpxchg16b|fwait|wait|popcnt|lzcnt|tzcnt|lfence|mfence|sfence|syscall|sysret[lq]?|sysenter|sysexit|\(bad\))$'
bad=$(objdump -d --no-show-raw-insn -j .text "$elf" |
      awk -F'\t' 'NF >= 2 && $1 ~ /^ *[0-9a-f]+:$/ { print $1 "\t" $2 }' |
      awk -F'\t' -v re="$forbidden" '{ split($2, w, " "); if (w[1] ~ re || $2 ~ /%[xyz]?mm[0-9]/) print }')
if [ -n "$bad" ]; then
    err "CPL0 code (.text) contains instructions the emulator cannot run:"
    echo "$bad" >&2
fi

[ "$fail" -eq 0 ] || exit 1
echo "check.sh: $elf OK (entry $entry, PT_LOAD phys == virt, CPL0 code clean)"
