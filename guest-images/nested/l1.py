#!/usr/bin/env python3
"""Runs ibsvm's KVM test suite on an ordinary (hardware-virtualization) KVM host, made here.

Our development hosts' KVM emulates guest CPL0 code; the hosts people run ibsvm on use
SVM or VMX. This script makes such a host on any x86-64 Linux machine: an L1 Linux
under QEMU's software emulator (TCG) with AMD SVM and nested paging, whose own KVM
(`kvm_amd`) then runs ibsvm's guests as an ordinary KVM would. No /dev/kvm is needed
outside.

  1. L1 kernel and KVM modules: `boot/vmlinuz` and `kvm.ko`, `kvm-amd.ko`, `ccp.ko`,
     `irqbypass.ko` from the kernel package the Linux guest recipe pins
     (guest-images/linux/manifest.json; the same cached .deb), busybox from its pin.
  2. L1 initramfs: busybox, the modules, an /init (guest-images/nested/init), and every
     file of the suite at the *same absolute path* as on this machine: the ibsvm binary,
     the test executables (`cargo test --no-run`), the guest images, the files the tests
     read, and the shared libraries the executables load. So the test executables find
     everything exactly as they do natively and assert exactly the same.
  3. QEMU (`qemu-system-x86_64 -accel tcg -cpu MODEL,+svm,+npt`) boots it; /init loads
     KVM, runs each suite command in turn between `@@nested` marker lines on the serial
     console, and powers off. This script streams the console, and exits 0 only if every
     command ran and exited 0.

The CPU model leaves out XSAVE and AVX: QEMU's TCG does not deliver an L2 guest's XSETBV
to L1's KVM as an SVM intercept (its helper_xsetbv has no intercept check), so with
XSAVE, KVM keeps a stale guest XCR0 and CPUID 0xD, and a Linux L2 warns "XSAVE
consistency problem" (see guest-images/nested/README.md).

Python 3.11 standard library, plus qemu-system-x86_64, ldd and what
guest-images/linux/build.py needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import selectors
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent  # guest-images/nested
REPO = HERE.parent.parent
OUT = HERE.parent / "out" / "nested"
INIT_SCRIPT = HERE / "init"

# The Linux guest recipe: its manifest, cache, .deb reader and cpio writer.
_spec = importlib.util.spec_from_file_location("linux_build", HERE.parent / "linux" / "build.py")
linux_build = importlib.util.module_from_spec(_spec)
sys.modules["linux_build"] = linux_build
_spec.loader.exec_module(linux_build)
CpioEntry = linux_build.CpioEntry
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = linux_build.S_IFDIR, linux_build.S_IFREG, linux_build.S_IFLNK, linux_build.S_IFCHR

# The modules that make /dev/kvm on an AMD L1, in load order (modules.dep of the pinned
# kernel: kvm-amd needs kvm and ccp, kvm needs irqbypass).
MODULES = [
    "kernel/virt/lib/irqbypass.ko",
    "kernel/drivers/crypto/ccp/ccp.ko",
    "kernel/arch/x86/kvm/kvm.ko",
    "kernel/arch/x86/kvm/kvm-amd.ko",
]

# AMD EPYC with SVM and nested paging (what kvm_amd needs), without XSAVE and the
# features that depend on it (see the docstring).
DEFAULT_CPU = "EPYC,+svm,+npt,-xsave,-xsaveopt,-xgetbv1,-avx,-avx2,-fma,-f16c"

# QEMU's software emulator, one host thread per L1 CPU.
DEFAULT_ACCEL = "tcg,thread=multi"

# The busybox applets /init uses.
APPLETS = "sh mount insmod cat echo poweroff sleep kill grep uname date sync sed dmesg tail".split()

MARK = "@@nested"

# What in L1's own output (not a command's) means the environment itself failed.
L1_FAILURE_MARKS = ("Kernel panic", "BUG:", "Oops", "WARNING:", "@@nested error", "@@nested timeout",
                    "@@nested stuck", "rcu: INFO:", "soft lockup", "hard LOCKUP")
# What in L1's own output means an L1 CPU is stuck (in the emulator's nested SVM, a CPU
# that no longer takes interrupts while in L2): L1 is killed at once.
L1_STUCK_MARKS = ("rcu: INFO:", "soft lockup", "hard LOCKUP")


class NestedError(Exception):
    """A failure with a message that says what to do."""


def step(msg: str) -> None:
    print(f"[nested] {msg}", flush=True)


# ------------------------------------------------------------------------ the L1 system


def l1_kernel_and_modules() -> tuple[bytes, list[tuple[str, bytes]], Path]:
    """vmlinuz and the KVM modules from the pinned kernel .deb, and busybox."""
    _, pkgs = linux_build.load_manifest()
    by_role = {p.role: p for p in pkgs}
    _, kdeb = linux_build.fetch(by_role["kernel"])
    _, bdeb = linux_build.fetch(by_role["busybox"])
    wanted = {f"/{m}" for m in MODULES}
    members = linux_build.deb_members(
        kdeb, lambda n: n.startswith("./boot/vmlinuz-") or any(n.endswith(w) for w in wanted)
    )
    vmlinuz = [d for n, d in members.items() if n.startswith("./boot/vmlinuz-")]
    modules = []
    for m in MODULES:
        data = [d for n, d in members.items() if n.endswith(f"/{m}")]
        if len(data) != 1:
            raise NestedError(f"{kdeb.name} has no {m}")
        modules.append((Path(m).name, data[0]))
    if len(vmlinuz) != 1:
        raise NestedError(f"{kdeb.name} has no single boot/vmlinuz-*")
    busybox = linux_build.deb_members(bdeb, lambda n: n == "./bin/busybox")
    if not busybox:
        raise NestedError(f"{bdeb.name} has no bin/busybox")
    OUT.mkdir(parents=True, exist_ok=True)
    bb = OUT / "busybox"
    bb.write_bytes(busybox["./bin/busybox"])
    return vmlinuz[0], modules, bb


def shared_libraries(elf: Path) -> list[Path]:
    """The shared objects `elf` loads (its interpreter included), as ldd resolves them."""
    r = subprocess.run(["ldd", str(elf)], capture_output=True, text=True)
    if r.returncode != 0:
        if "not a dynamic executable" in (r.stdout + r.stderr):
            return []
        raise NestedError(f"ldd {elf} failed: {r.stderr.strip()}")
    libs = []
    for line in r.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
        elif "not found" in line:
            raise NestedError(f"{elf}: {line.strip()}")
    return libs


def file_entries(paths: list[Path]) -> list[CpioEntry]:
    """Each file at its own absolute path, with every parent directory."""
    entries: dict[str, CpioEntry] = {}
    for p in paths:
        rel = str(p).lstrip("/")
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            entries.setdefault(d, CpioEntry(d, S_IFDIR | 0o755))
        mode = 0o755 if os.access(p, os.X_OK) else 0o644
        entries[rel] = CpioEntry(rel, S_IFREG | mode, p.read_bytes())
    return list(entries.values())


@dataclass
class Command:
    """One suite command: a name for the markers, a shell command run in the repository,
    and the test executable it runs, if any."""

    name: str
    shell: str
    executable: Path | None = None


def build_initramfs(modules: list[tuple[str, bytes]], busybox: Path, payload: list[Path],
                    suite: list[Command], timeout_s: int) -> Path:
    libs = {lib for f in payload for lib in shared_libraries(f)}
    entries = [CpioEntry(d, S_IFDIR | 0o755) for d in ("bin", "dev", "proc", "sys", "nested", "nested/modules")]
    entries.append(CpioEntry("tmp", S_IFDIR | 0o1777))
    entries.append(CpioEntry("init", S_IFREG | 0o755, INIT_SCRIPT.read_bytes()))
    entries.append(CpioEntry("bin/busybox", S_IFREG | 0o755, busybox.read_bytes()))
    entries += [CpioEntry(f"bin/{a}", S_IFLNK | 0o777, b"busybox") for a in APPLETS]
    entries.append(CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("dev/null", S_IFCHR | 0o666, rdev=(1, 3)))
    entries += [CpioEntry(f"nested/modules/{i}-{n}", S_IFREG | 0o644, d) for i, (n, d) in enumerate(modules)]
    lines = [f"repo {REPO}", f"timeout {timeout_s}"]
    lines += [f"run {c.name} {c.shell}" for c in suite]
    entries.append(CpioEntry("nested/suite", S_IFREG | 0o644, ("\n".join(lines) + "\n").encode()))
    taken = {e.path for e in entries}
    entries += [e for e in file_entries(sorted(set(payload) | libs)) if e.path not in taken]
    cpio = OUT / "l1-initramfs.cpio"
    cpio.write_bytes(linux_build.newc_archive(entries))
    step(f"L1 initramfs {cpio} ({len(entries)} entries, {cpio.stat().st_size >> 20} MiB)")
    return cpio


# ------------------------------------------------------------------------------ the suite


def test_executables(packages: list[str]) -> list[Path]:
    """The test executables of `packages`, built (`cargo test --release --no-run`)."""
    cmd = ["cargo", "test", "--release", "--locked", "--no-run", "--message-format=json"]
    for p in packages:
        cmd += ["-p", p]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise NestedError(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    exes = {}
    for line in r.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
            exes[msg["target"]["name"]] = Path(msg["executable"])
    return [exes[k] for k in sorted(exes)]


def parse_suite(specs: list[str], executables: dict[str, Path]) -> list[Command]:
    """`NAME=COMMAND` specs: COMMAND is a shell command (one line); one starting with
    `test:TARGET` runs that test executable, the rest of the line its arguments."""
    suite = []
    for spec in specs:
        name, sep, command = spec.partition("=")
        command = command.strip()
        if not sep or not name or not command or " " in name or "\n" in command:
            raise NestedError(f"bad suite command {spec!r}: expected NAME=COMMAND on one line")
        first, _, rest = command.partition(" ")
        executable = None
        if first.startswith("test:"):
            target = first[len("test:"):]
            if target not in executables:
                raise NestedError(f"no test target {target!r} (have {', '.join(sorted(executables))})")
            executable = executables[target]
            command = f"{shlex.quote(str(executable))} {rest}".strip()
        suite.append(Command(name, command, executable))
    return suite


# ------------------------------------------------------------------------------- running


@dataclass
class Result:
    name: str
    rc: int | None = None
    seconds: float | None = None


def run_qemu(vmlinuz: Path, cpio: Path, accel: str, cpu: str, memory_mb: int, smp: int,
             deadline_s: int, timeout_s: int, log: Path) -> tuple[dict[str, Result], bool, list[str]]:
    """Boots L1 and streams its console; returns each command's result, whether /init
    finished, and the console lines. A command still running a minute past its timeout
    means L1 itself is stuck (its own watchdog would have ended the command): L1 is
    killed."""
    cmd = [
        "qemu-system-x86_64", "-accel", accel, "-cpu", cpu, "-m", str(memory_mb),
        "-smp", str(smp), "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-kernel", str(vmlinuz), "-initrd", str(cpio),
        "-append", "console=ttyS0 panic=-1 mitigations=off nowatchdog quiet loglevel=4",
    ]
    step(" ".join(shlex.quote(c) for c in cmd))
    results: dict[str, Result] = {}
    lines: list[str] = []
    done = False
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    running: tuple[str, float] | None = None  # the command in progress, since when
    with log.open("a") as f:
        while True:
            now = time.monotonic()
            if now - start > deadline_s:
                proc.kill()
                lines.append(f"{MARK} stuck: L1 killed after its deadline, {deadline_s} s")
                break
            if running and now - running[1] > timeout_s + 60:
                proc.kill()
                lines.append(f"{MARK} stuck: L1 gave no sign of life for {running[0]} in "
                             f"{timeout_s + 60} s; killed")
                break
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                lines.append(line)
                f.write(line + "\n")
                f.flush()
                print(line, flush=True)
                if not line.startswith("| ") and any(m in line for m in L1_STUCK_MARKS):
                    proc.kill()
                    lines.append(f"{MARK} stuck: an L1 CPU stopped responding; L1 killed")
                    break
                words = line.split()
                if words[:1] == [MARK] and len(words) >= 2:
                    if words[1] == "begin" and len(words) >= 3:
                        results[words[2]] = Result(words[2])
                        running = (words[2], time.monotonic())
                    elif words[1] == "end" and len(words) >= 5:
                        running = None
                        r = results.setdefault(words[2], Result(words[2]))
                        r.rc = int(words[3].removeprefix("rc="))
                        r.seconds = float(words[4].removesuffix("s"))
                    elif words[1] == "done":
                        done = True
    proc.wait()
    return results, done, lines


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        description="Run commands (ibsvm's KVM tests) inside an L1 Linux with nested SVM under QEMU TCG.",
        epilog="SUITE: NAME=COMMAND, run in the repository inside L1; `test:TARGET ARGS` runs the "
        "test executable of the ibsvm-tests target TARGET (e.g. 'testkernel=test:testkernel "
        "--test-threads=1'). Exit status 0 only if every command exited 0.",
    )
    ap.add_argument("--accel", default=DEFAULT_ACCEL, help=f"QEMU -accel (default {DEFAULT_ACCEL})")
    ap.add_argument("--cpu", default=DEFAULT_CPU, help=f"QEMU CPU model (default {DEFAULT_CPU})")
    ap.add_argument("--memory", type=int, default=6144, help="L1 memory, MiB (default 6144)")
    ap.add_argument("--smp", type=int, default=2, help="L1 CPUs (default 2)")
    ap.add_argument("--timeout", type=int, default=1800, help="per command, seconds (default 1800)")
    ap.add_argument("--deadline", type=int, default=3600, help="whole L1 run, seconds (default 3600)")
    ap.add_argument("--boots", type=int, default=3,
                    help="L1 boots at most: after an L1 failure (kernel panic, BUG, a stuck CPU) "
                    "the commands it cut short run again in a fresh L1 (default 3)")
    ap.add_argument("--file", action="append", default=[], type=Path,
                    help="another file to copy into L1 at its path (repeatable)")
    ap.add_argument("suite", nargs="+", metavar="SUITE")
    args = ap.parse_args(argv)
    try:
        if subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).returncode != 0:
            raise NestedError("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
        vmlinuz_data, modules, busybox = l1_kernel_and_modules()
        vmlinuz = OUT / "vmlinuz"
        vmlinuz.write_bytes(vmlinuz_data)
        exes = test_executables(["ibsvm-tests"])
        by_target = {p.name.rsplit("-", 1)[0]: p for p in exes}
        suite = parse_suite(args.suite, by_target)
        release = REPO / "target" / "release"
        images = HERE.parent / "out"
        payload = [release / "ibsvm", release / "race-matrix", release / "ibs-clock"]
        payload += [images / n for n in ("testkernel.elf", "testkernel.bzImage")]
        payload += [images / "linux" / n for n in ("vmlinux", "initramfs.cpio")]
        payload += [HERE.parent / "linux" / "cmdline"]
        payload += [c.executable for c in suite if c.executable]
        payload += [p.resolve() for p in args.file]
        missing = [p for p in payload if not p.is_file()]
        if missing:
            raise NestedError(f"missing: {', '.join(map(str, missing))} (run `make build images` first)")
        (OUT / "console.log").unlink(missing_ok=True)
        results: dict[str, Result] = {}
        l1_failures: list[str] = []
        started = time.monotonic()
        for boot in range(1, args.boots + 1):
            todo = [c for c in suite if c.name not in results]
            cpio = build_initramfs(modules, busybox, payload, todo, args.timeout)
            got, done, lines = run_qemu(vmlinuz, cpio, args.accel, args.cpu, args.memory,
                                        args.smp, args.deadline, args.timeout, OUT / "console.log")
            # Lines without the "| " of command output are L1's own (kernel, /init).
            broken = [line for line in lines if not line.startswith("| ")
                      and any(m in line for m in L1_FAILURE_MARKS)]
            finished = {n: r for n, r in got.items() if r.rc is not None}
            results.update(finished)
            if done and not broken:
                break
            cut = [c.name for c in todo if c.name not in finished]
            why = broken[0] if broken else "L1 /init did not finish"
            l1_failures.append(f"boot {boot}: {why} (unfinished: {' '.join(cut) or 'none'})")
            step(f"L1 failed in boot {boot} of at most {args.boots}: {why}")
            for line in broken[1:4]:
                step(f"L1: {line}")
            if not cut:
                # Nothing to run again: an L1 complaint while the commands ran fails the run.
                l1_failures[-1] += " - not retried"
                break
        wall = time.monotonic() - started
    except NestedError as e:
        print(f"[nested] ERROR: {e}", file=sys.stderr)
        return 2
    step(f"L1 ran {wall:.0f} s in {boot} boot(s); console in {OUT / 'console.log'}")
    ok = True
    for c in suite:
        r = results.get(c.name)
        if r is None:
            step(f"{c.name}: did not finish")
            ok = False
        else:
            step(f"{c.name}: exit {r.rc} after {r.seconds:.0f} s")
            ok &= r.rc == 0
    for failure in l1_failures:
        step(f"L1 failure: {failure}")
        ok &= not failure.endswith("not retried")
    step("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
