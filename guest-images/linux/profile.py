#!/usr/bin/env python3
"""Symbolize an `ibsvm run --guest-profile FILE` profile of a Linux guest.

Usage: profile.py [--symbols FILE] [--console LOG] [--top N] PROFILE

Each profile line is `vcpu rip` (hexadecimal RIP), one sample per millisecond of vCPU run
time. Prints the functions with the most samples, with their share of all samples; user
addresses are grouped as "[user]".

Symbols: Debian's linux-image package ships only a placeholder System.map, so the guest
prints its own: boot once with `ibsvm.kallsyms=1` on the kernel command line and pass that
console log with --console; the symbols are kept in out/linux/kallsyms.txt for later runs
(the guest boots with nokaslr, so addresses do not move).
"""
import argparse
import base64
import bisect
import collections
import gzip
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SYMBOLS = HERE.parent / "out" / "linux" / "kallsyms.txt"
KERNEL_HALF = 0xFFFF_8000_0000_0000


def symbols_from_console(log: Path) -> bytes:
    """The /proc/kallsyms text the init printed between its begin/end markers."""
    lines = log.read_text(errors="replace").splitlines()
    try:
        start = lines.index("ibsvm-kallsyms: begin") + 1
        end = lines.index("ibsvm-kallsyms: end", start)
    except ValueError:
        raise OSError(f"{log}: no ibsvm-kallsyms block (boot with ibsvm.kallsyms=1)") from None
    return gzip.decompress(base64.b64decode("".join(lines[start:end])))


def load_map(path: Path) -> tuple[list[int], list[str]]:
    """Text symbols of a System.map / kallsyms file, sorted by address."""
    syms = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW":
            syms.append((int(parts[0], 16), parts[2]))
    syms.sort()
    return [a for a, _ in syms], [n for _, n in syms]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--symbols", type=Path, default=DEFAULT_SYMBOLS)
    ap.add_argument("--console", type=Path, help="console log of a boot with ibsvm.kallsyms=1")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    try:
        if args.console:
            args.symbols.write_bytes(symbols_from_console(args.console))
        addrs, names = load_map(args.symbols)
        lines = args.profile.read_text().splitlines()
    except OSError as e:
        print(f"profile.py: {e}", file=sys.stderr)
        return 1
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        if not line or line.startswith("#"):
            continue
        try:
            rip = int(line.split()[1], 16)
        except (IndexError, ValueError):
            print(f"profile.py: bad line {line!r}", file=sys.stderr)
            return 1
        total += 1
        if rip < KERNEL_HALF:
            counts["[user]"] += 1
            continue
        i = bisect.bisect_right(addrs, rip) - 1
        counts[names[i] if i >= 0 else "[unknown]"] += 1
    print(f"{total} samples ({total} ms of vCPU run time)")
    for name, n in counts.most_common(args.top):
        print(f"{n:8d} {100 * n / max(total, 1):6.2f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
