#!/usr/bin/env python3
"""Build ibsvm's stock-Linux guest image: Debian 12's kernel + busybox + check programs.

Usage (from anywhere; paths are computed from this file's location):

    python3 guest-images/linux/build.py [--out DIR] [--force] [--smoke]
    python3 guest-images/linux/build.py --update-pins

Steps (one line printed per step; steps whose outputs are up to date are skipped):
  1. fetch     the pinned .debs (manifest.json) into guest-images/cache/ with
               `apt-get download NAME=VERSION`, verifying their sha256;
  2. vmlinux   /boot/vmlinuz-* from the kernel .deb -> decompressed ELF `vmlinux`
               (as the kernel's scripts/extract-vmlinux does), checked to be ELF64 x86-64;
  3. busybox   /bin/busybox from busybox-static;
  4. checks    the Rust programs in checks/ (cargo, static glibc);
  5. initramfs `initramfs.cpio`: uncompressed newc, deterministic;
  6. info      `build-info.json`: versions, kernel banner, sha256s.
--smoke runs the check programs on this host afterwards (with the extracted busybox).
--update-pins rewrites manifest.json with the mirror's current versions and sha256s.

Python 3.11 standard library only, plus apt-get, apt-cache, dpkg-deb and cargo.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent  # guest-images/linux
REPO = HERE.parent.parent  # the repository root
MANIFEST = HERE / "manifest.json"
INIT_SCRIPT = HERE / "init"
CHECKS_DIR = HERE / "checks"
CACHE_DIR = HERE.parent / "cache"
DEFAULT_OUT = HERE.parent / "out" / "linux"
RUST_TARGET = "x86_64-unknown-linux-gnu"

# Bump when the way an output is made changes, so that re-runs rebuild it.
VMLINUX_RECIPE = 2
INITRAMFS_RECIPE = 1

# Busybox applets that get a /bin symlink (the init script and the checks use these;
# a few more for interactive debugging with ibsvm.exit=shell).
APPLETS = sorted(
    """
    sh ash mount umount cat echo ls sleep grep dd printf poweroff reboot halt true false
    test [ mkdir rm cp mv ln uname dmesg nproc ps kill env head tail wc sync stty timeout
    od hexdump xxd sed awk cut sort uniq tr find free uptime date id chmod stat
    """.split()
)


class BuildError(Exception):
    """A failure with a message that says what to do."""


def step(name: str, msg: str) -> None:
    print(f"[linux-guest] {name:<9} {msg}", flush=True)


# ----------------------------------------------------------------------------- utils


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_if_changed(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Writes atomically, only if the content differs. Returns True if written."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)
    return True


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


class Stamps:
    """Remembers, per step, a key of its inputs and the sha256 of its outputs."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def fresh(self, step_name: str, key: str, outputs: list[Path]) -> bool:
        rec = self.data.get(step_name)
        if not rec or rec.get("key") != key:
            return False
        for p in outputs:
            if not p.exists() or rec.get("outputs", {}).get(p.name) != sha256_file(p):
                return False
        return True

    def record(self, step_name: str, key: str, outputs: list[Path]) -> None:
        self.data[step_name] = {"key": key, "outputs": {p.name: sha256_file(p) for p in outputs}}
        write_if_changed(self.path, (json.dumps(self.data, indent=1, sort_keys=True) + "\n").encode())


# -------------------------------------------------------------------------- manifest


@dataclass
class Package:
    role: str  # "kernel" or "busybox"
    name: str
    version: str
    arch: str
    sha256: str
    # A metapackage whose first dependency names this package (the kernel's ABI changes
    # its name): what the mirror's current version is found from.
    track: str | None = None

    @property
    def deb_name(self) -> str:
        # apt-get download's file name: the epoch's ':' is written as %3a.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def load_manifest() -> tuple[dict, list[Package]]:
    m = json.loads(MANIFEST.read_text())
    pkgs = [
        Package(role, p["name"], p["version"], p.get("arch", "amd64"), p["sha256"].lower(),
                p.get("track"))
        for role, p in m["packages"].items()
    ]
    return m, pkgs


# ----------------------------------------------------------------------------- fetch


def apt_get_download(pkg: Package, dest: Path) -> subprocess.CompletedProcess:
    cmd = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # Root downloads into a directory the _apt sandbox user cannot write to.
        cmd += ["-o", "APT::Sandbox::User=root"]
    return run(cmd + [f"{pkg.name}={pkg.version}"], cwd=dest)


def current(pkg: Package) -> Package:
    """The mirror's current version of `pkg` (for a tracked kernel, the package its
    metapackage names now), with the SHA256 from apt's index, whose Release file apt
    verified against Debian's archive keys at `apt-get update`."""
    name = pkg.name
    if pkg.track:
        deps = apt_show(pkg.track, candidate(pkg.track)).get("Depends", "")
        name = deps.split(",")[0].split("(")[0].strip()
    version = candidate(name)
    sha = apt_show(name, version).get("SHA256", "").lower()
    if not sha:
        raise BuildError(f"apt's index has no SHA256 for {name}={version}")
    return Package(pkg.role, name, version, pkg.arch, sha, pkg.track)


def fetch(pkg: Package) -> tuple[Package, Path]:
    """The .deb of `pkg` with the pinned sha256 (cached, or downloaded), and `pkg`. When
    the mirror no longer has the pinned version (Debian keeps only the newest kernel in
    bookworm-security), the mirror's current one instead, verified against apt's signed
    index, said on one line: returns the package actually used."""
    try:
        return pkg, fetch_pinned(pkg)
    except PinGone as gone:
        now = current(pkg)
        step("fetch", f"{pkg.name}={pkg.version} is gone from the mirror ({gone}); using "
             f"{now.name}={now.version}, the mirror's current one (sha256 from apt's signed index); "
             "`build.py --update-pins` makes it the pin")
        return now, fetch_pinned(now)


class PinGone(Exception):
    """The mirror does not have the pinned version (any more)."""


def fetch_pinned(pkg: Package) -> Path:
    """Returns the cached .deb with the pinned sha256, downloading it if needed."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / pkg.deb_name
    if path.exists():
        if sha256_file(path) == pkg.sha256:
            step("fetch", f"{pkg.name} {pkg.version}: cached, sha256 ok")
            return path
        step("fetch", f"{pkg.name}: cached file has the wrong sha256; downloading again")
        path.unlink()
    step("fetch", f"{pkg.name} {pkg.version}: apt-get download")
    r = apt_get_download(pkg, CACHE_DIR)
    if r.returncode != 0:
        unknown = "Unable to locate package" in r.stderr or "was not found" in r.stderr
        if not unknown:
            raise BuildError(f"apt-get download {pkg.name}={pkg.version} failed:\n{r.stderr.strip()}")
        step("fetch", f"{pkg.name}={pkg.version} unknown to apt's package lists: running apt-get update")
        u = run(["apt-get", "update", "-q"])
        if u.returncode != 0:
            raise BuildError(f"apt-get update failed (are you root?):\n{u.stderr.strip()}")
        r = apt_get_download(pkg, CACHE_DIR)
        if r.returncode != 0:
            detail = r.stderr.strip().splitlines()
            raise PinGone(detail[-1] if detail else "apt-get download failed")
    if not path.exists():
        raise BuildError(f"apt-get download succeeded but {path} is missing:\n{r.stdout}{r.stderr}")
    got = sha256_file(path)
    if got != pkg.sha256:
        bad = path.with_name(path.name + ".bad-sha256")
        path.replace(bad)
        raise BuildError(
            f"{pkg.deb_name}: sha256 {got} does not match the pinned {pkg.sha256} (kept as {bad.name}).\n"
            "If the mirror legitimately rebuilt the package, update the pins with "
            "`python3 guest-images/linux/build.py --update-pins` and review the manifest."
        )
    step("fetch", f"{pkg.name}: downloaded, sha256 ok")
    return path


# --------------------------------------------------------------------------- .deb I/O


def deb_members(deb: Path, wanted) -> dict[str, bytes]:
    """Extracts the regular files whose path (as './x/y') satisfies `wanted` from a
    .deb's data archive, without installing it: `dpkg-deb --fsys-tarfile` streamed
    into tarfile (like `dpkg-deb -x`, but only the files needed reach the disk)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                if m.isfile() and wanted(m.name):
                    found[m.name] = tar.extractfile(m).read()
    finally:
        proc.stdout.close()
        rc = proc.wait()
    if rc != 0:
        raise BuildError(f"dpkg-deb --fsys-tarfile {deb} failed (exit {rc})")
    return found


# --------------------------------------------------------------------------- vmlinux

COMPRESSORS = [  # (name, magic) as in the kernel's scripts/extract-vmlinux
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"),
]


def decompress(kind: str, data: bytes) -> bytes:
    """Decompresses one stream; trailing bytes (the kernel appends the size) ignored."""
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=io.BytesIO(data)).read()
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    # zstd and lz4 are not in Python's standard library: use the Debian tools.
    tool = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}[kind]
    if not shutil.which(tool[0]):
        raise BuildError(f"kernel payload is {kind}-compressed: install {tool[0]} (apt-get install {tool[0]})")
    r = subprocess.run(tool, input=data, capture_output=True)
    if not r.stdout:
        raise BuildError(f"{tool[0]} failed: {r.stderr.decode(errors='replace')}")
    return r.stdout


def extract_vmlinux(bzimage: bytes) -> tuple[bytes, str]:
    """bzImage -> (ELF vmlinux, compression). Uses the boot protocol's payload_offset
    and payload_length (protocol >= 2.08) when present, else scans for magics."""
    candidates: list[tuple[str, bytes]] = []
    if bzimage[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", bzimage, 0x206)[0] >= 0x208:
        setup_sects = bzimage[0x1F1] or 4
        off, length = struct.unpack_from("<II", bzimage, 0x248)
        start = (setup_sects + 1) * 512 + off
        payload = bzimage[start : start + length]
        for kind, magic in COMPRESSORS:
            if payload.startswith(magic):
                candidates.append((kind, payload))
    for kind, magic in COMPRESSORS:  # fallback: every magic, like extract-vmlinux
        pos = bzimage.find(magic)
        while pos >= 0 and len(candidates) < 32:
            candidates.append((kind, bzimage[pos:]))
            pos = bzimage.find(magic, pos + 1)
    for kind, data in candidates:
        try:
            out = decompress(kind, data)
        except (lzma.LZMAError, OSError, EOFError, ValueError, BuildError):
            continue
        if out[:4] == b"\x7fELF":
            return out, kind
    raise BuildError("no compressed ELF payload found in the kernel's bzImage")


@dataclass
class ElfInfo:
    entry: int
    machine: int
    etype: int
    pvh_entry: int | None
    notes: list[str]
    has_interp: bool


def elf_info(data: bytes) -> ElfInfo:
    """Parses an ELF64 little-endian header, program headers and PT_NOTE notes."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError("not an ELF64 little-endian file")
    etype, machine = struct.unpack_from("<HH", data, 16)
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    pvh, notes, interp = None, [], False
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 3:  # PT_INTERP
            interp = True
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0").decode(errors="replace")
            dpos = pos + 12 + ((namesz + 3) & ~3)
            desc = data[dpos : dpos + descsz]
            label = f"{name}/{ntype:#x}"
            if name == "Xen" and ntype == 18 and descsz in (4, 8):  # XEN_ELFNOTE_PHYS32_ENTRY
                pvh = int.from_bytes(desc, "little")
                label += f" (XEN_ELFNOTE_PHYS32_ENTRY {pvh:#x}: PVH entry)"
            notes.append(label)
            pos = dpos + ((descsz + 3) & ~3)
    return ElfInfo(entry, machine, etype, pvh, notes, interp)


def kernel_banner(vmlinux: bytes) -> str:
    """The kernel's linux_banner ("Linux version 6.1.0-... #1 SMP ... Debian ...").
    vmlinux holds two: init/version.c's weak one (build number missing: "# SMP")
    and version-timestamp.c's, the one the kernel prints; prefer the latter."""
    found = []
    pos = vmlinux.find(b"Linux version ")
    while pos >= 0:
        s = vmlinux[pos : vmlinux.find(b"\0", pos)]
        if b"%" not in s and s.endswith(b"\n"):
            found.append(s.decode(errors="replace").strip())
        pos = vmlinux.find(b"Linux version ", pos + 1)
    if not found:
        raise BuildError("no Linux version banner in vmlinux")
    numbered = [b for b in found if re.search(r" #\d", b)]
    return (numbered or found)[0]


def build_vmlinux(kernel_pkg: Package, deb: Path, out: Path, stamps: Stamps) -> dict:
    vmlinux, config, system_map = out / "vmlinux", out / "kernel.config", out / "System.map"
    key = f"{VMLINUX_RECIPE}:{kernel_pkg.sha256}"
    info_path = out / "work" / "kernel.json"
    if stamps.fresh("vmlinux", key, [vmlinux, config, system_map]) and info_path.exists():
        info = json.loads(info_path.read_text())
        step("vmlinux", f"up to date ({info['release']})")
        return info
    step("vmlinux", f"extracting /boot/vmlinuz-* from {deb.name}")
    files = deb_members(deb, lambda n: n.startswith(("./boot/vmlinuz-", "./boot/config-", "./boot/System.map-")))
    vmlinuz = [n for n in files if n.startswith("./boot/vmlinuz-")]
    if len(vmlinuz) != 1:
        raise BuildError(f"expected one /boot/vmlinuz-* in {deb.name}, found {vmlinuz}")
    release = vmlinuz[0].removeprefix("./boot/vmlinuz-")
    elf, compression = extract_vmlinux(files[vmlinuz[0]])
    ei = elf_info(elf)
    if ei.machine != 62 or ei.etype != 2:  # EM_X86_64, ET_EXEC
        raise BuildError(f"vmlinux is not an x86-64 executable (e_machine {ei.machine}, e_type {ei.etype})")
    write_if_changed(vmlinux, elf)
    write_if_changed(config, files.get(f"./boot/config-{release}", b""))
    # The symbols, for profile.py (guest RIP samples from `ibsvm run --guest-profile`).
    write_if_changed(system_map, files.get(f"./boot/System.map-{release}", b""))
    info = {
        "release": release,
        "banner": kernel_banner(elf),
        "compression": compression,
        "bzimage_sha256": sha256_bytes(files[vmlinuz[0]]),
        "entry": f"{ei.entry:#x}",
        "pvh_entry": None if ei.pvh_entry is None else f"{ei.pvh_entry:#x}",
        "notes": ei.notes,
    }
    write_if_changed(info_path, (json.dumps(info, indent=1) + "\n").encode())
    stamps.record("vmlinux", key, [vmlinux, config, system_map])
    step("vmlinux", f"{release}: {compression} payload -> ELF64 x86-64, {len(elf)} bytes, entry {ei.entry:#x}")
    return info


# --------------------------------------------------------------------------- busybox


def build_busybox(pkg: Package, deb: Path, out: Path, stamps: Stamps) -> Path:
    dest = out / "work" / "busybox"
    if stamps.fresh("busybox", pkg.sha256, [dest]):
        step("busybox", "up to date")
        return dest
    files = deb_members(deb, lambda n: n == "./bin/busybox")
    if "./bin/busybox" not in files:
        raise BuildError(f"{deb.name} has no /bin/busybox")
    write_if_changed(dest, files["./bin/busybox"], 0o755)
    if elf_info(files["./bin/busybox"]).has_interp:
        raise BuildError("busybox is dynamically linked (need busybox-static)")
    stamps.record("busybox", pkg.sha256, [dest])
    step("busybox", f"extracted /bin/busybox ({len(files['./bin/busybox'])} bytes)")
    return dest


def busybox_check_applets(busybox: Path) -> None:
    """Fails if an applet the image links is missing from this busybox (skipped if
    the binary cannot run here)."""
    try:
        r = run([str(busybox), "--list"])
    except OSError:
        return
    if r.returncode == 0:
        have = set(r.stdout.split())
        missing = [a for a in APPLETS if a not in have]
        if missing:
            raise BuildError(f"busybox lacks applets {missing}: edit APPLETS in build.py")


def busybox_version(busybox: Path) -> str:
    data = busybox.read_bytes()
    pos = data.find(b"BusyBox v")
    return data[pos : data.find(b"\0", pos)].decode(errors="replace").strip() if pos >= 0 else "?"


# ---------------------------------------------------------------------------- checks


def cargo_env() -> dict[str, str]:
    env = dict(os.environ)
    # These would override .cargo/config.toml's +crt-static rustflags.
    for var in ("RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_BUILD_TARGET"):
        env.pop(var, None)
    env["CARGO_TARGET_DIR"] = str(CHECKS_DIR / "target")
    cargo_bin = Path.home() / ".cargo" / "bin"
    if not shutil.which("cargo") and cargo_bin.is_dir():
        env["PATH"] = f"{cargo_bin}:{env.get('PATH', '')}"
    return env


def build_checks() -> tuple[dict[str, Path], dict[str, Path]]:
    """Builds checks/ (static). Returns ({check: binary}, {tool: binary}): binaries
    named ibsvm-* are tools for /bin, the others are checks for /checks."""
    names = sorted(p.stem for p in (CHECKS_DIR / "src" / "bin").glob("*.rs"))
    bindir = CHECKS_DIR / "target" / RUST_TARGET / "release"
    before = {n: (bindir / n).stat().st_mtime_ns for n in names if (bindir / n).exists()}
    cmd = ["cargo", "build", "--release", "--target", RUST_TARGET]
    if (CHECKS_DIR / "Cargo.lock").exists():
        cmd.append("--locked")
    # cwd matters: cargo reads checks/.cargo/config.toml from the working directory.
    r = subprocess.run(cmd, cwd=CHECKS_DIR, env=cargo_env(), text=True, capture_output=True)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} (in {CHECKS_DIR}) failed:\n{r.stderr}")
    checks, tools = {}, {}
    for n in names:
        path = bindir / n
        if elf_info(path.read_bytes()).has_interp:
            raise BuildError(f"{path} is dynamically linked: is the +crt-static rustflag applied?")
        (tools if n.startswith("ibsvm-") else checks)[n] = path
    after = {n: (bindir / n).stat().st_mtime_ns for n in names}
    state = "up to date" if after == before else "built"
    step("checks", f"cargo build --release --target {RUST_TARGET}: {state} (checks: {', '.join(checks)}; "
         f"tools: {', '.join(tools)}; static)")
    return checks, tools


# ------------------------------------------------------------------------- initramfs


@dataclass
class CpioEntry:
    path: str  # without a leading '/'
    mode: int  # st_mode, with the file type bits
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)


S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


def newc_archive(entries: list[CpioEntry], mtime: int = 0) -> bytes:
    """An uncompressed 'newc' (070701) cpio archive: entries sorted by path (parents
    first), inode numbers in that order, uid/gid 0, fixed mtime, TRAILER!!! last."""

    def pad4(n: int) -> bytes:
        return b"\0" * (-n % 4)

    out = bytearray()

    def emit(ino: int, e: CpioEntry) -> None:
        name = e.path.encode() + b"\0"
        nlink = 2 if (e.mode & 0o170000) == S_IFDIR else 1
        fields = [ino, e.mode, 0, 0, nlink, mtime, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.extend(hdr + name + pad4(len(hdr) + len(name)))
        out.extend(e.data + pad4(len(e.data)))

    for ino, e in enumerate(sorted(entries, key=lambda e: e.path.split("/")), start=1):
        emit(ino, e)
    emit(0, CpioEntry("TRAILER!!!", 0))
    return bytes(out)


def read_newc(data: bytes) -> list[tuple[str, int, int, tuple[int, int]]]:
    """Lists a newc archive: (path, mode, size, (rdevmajor, rdevminor)). For checking."""
    pos, items = 0, []
    while True:
        if data[pos : pos + 6] != b"070701":
            raise BuildError(f"bad cpio header at {pos}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return items
        items.append((name, f[1], filesize, (f[9], f[10])))
        pos += filesize
        pos += -pos % 4


def initramfs_entries(busybox: Path, checks: dict[str, Path], tools: dict[str, Path]) -> list[CpioEntry]:
    e = [CpioEntry(d, S_IFDIR | 0o755) for d in ("bin", "checks", "dev", "proc", "sys", "root", "etc")]
    e.append(CpioEntry("tmp", S_IFDIR | 0o1777))
    e.append(CpioEntry("init", S_IFREG | 0o755, INIT_SCRIPT.read_bytes()))
    e.append(CpioEntry("bin/busybox", S_IFREG | 0o755, busybox.read_bytes()))
    e += [CpioEntry(f"bin/{a}", S_IFLNK | 0o777, b"busybox") for a in APPLETS]
    e += [CpioEntry(f"bin/{n}", S_IFREG | 0o755, p.read_bytes()) for n, p in tools.items()]
    e += [CpioEntry(f"checks/{n}", S_IFREG | 0o755, p.read_bytes()) for n, p in checks.items()]
    # Device nodes for before devtmpfs is mounted (the kernel opens /dev/console for
    # init's stdio) and in case mounting it fails.
    e.append(CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)))
    e.append(CpioEntry("dev/null", S_IFCHR | 0o666, rdev=(1, 3)))
    e.append(CpioEntry("dev/port", S_IFCHR | 0o600, rdev=(1, 4)))
    e.append(CpioEntry("etc/ibsvm-guest", S_IFREG | 0o644, b"ibsvm stock-Linux guest (guest-images/linux)\n"))
    return e


def build_initramfs(busybox: Path, checks: dict[str, Path], tools: dict[str, Path], out: Path,
                    stamps: Stamps) -> list[CpioEntry]:
    cpio = out / "initramfs.cpio"
    entries = initramfs_entries(busybox, checks, tools)
    key = sha256_bytes(
        json.dumps([INITRAMFS_RECIPE] + [(x.path, x.mode, sha256_bytes(x.data), x.rdev) for x in entries]).encode()
    )
    if stamps.fresh("initramfs", key, [cpio]):
        step("initramfs", f"up to date ({len(entries)} entries, {cpio.stat().st_size} bytes)")
        return entries
    data = newc_archive(entries)
    listed = read_newc(data)  # self-check of the writer
    if [x[0] for x in listed] != sorted((x.path for x in entries), key=lambda p: p.split("/")):
        raise BuildError("cpio self-check failed")
    write_if_changed(cpio, data)
    stamps.record("initramfs", key, [cpio])
    step("initramfs", f"wrote {cpio} ({len(entries)} entries, {len(data)} bytes, newc, uncompressed)")
    return entries


# ------------------------------------------------------------------------ build-info


def write_build_info(out: Path, pkgs: list[Package], kinfo: dict, busybox: Path,
                     entries: list[CpioEntry]) -> None:
    def file_info(name: str) -> dict:
        p = out / name
        return {"path": name, "sha256": sha256_file(p), "size": p.stat().st_size}

    info = {
        "kernel": {
            "release": kinfo["release"],
            "banner": kinfo["banner"],
            "bzimage_compression": kinfo["compression"],
            "bzimage_sha256": kinfo["bzimage_sha256"],
        },
        "vmlinux": {**file_info("vmlinux"), "format": "ELF64 x86-64 executable", "entry": kinfo["entry"],
                    "pvh_entry": kinfo["pvh_entry"], "notes": kinfo["notes"]},
        "initramfs": {**file_info("initramfs.cpio"), "format": "newc cpio, uncompressed",
                      "checks": sorted(x.path.removeprefix("checks/") for x in entries
                                       if x.path.startswith("checks/")),
                      "entries": [x.path for x in sorted(entries, key=lambda x: x.path.split("/"))]},
        "kernel_config": file_info("kernel.config"),
        "busybox": {"version": busybox_version(busybox), "sha256": sha256_file(busybox)},
        "packages": [{"role": p.role, "name": p.name, "version": p.version, "arch": p.arch,
                      "sha256": p.sha256} for p in pkgs],
    }
    changed = write_if_changed(out / "build-info.json", (json.dumps(info, indent=1) + "\n").encode())
    step("info", f"{'wrote' if changed else 'unchanged'} {out / 'build-info.json'}")


# ---------------------------------------------------------------------- smoke, pins


def smoke(checks: dict[str, Path], busybox: Path) -> bool:
    """Runs every check on this host (busybox from the image via IBSVM_BUSYBOX)."""
    ok = True
    for name, path in checks.items():
        r = subprocess.run([str(path)], env={**os.environ, "IBSVM_BUSYBOX": str(busybox)})
        step("smoke", f"{name}: {'PASS' if r.returncode == 0 else f'FAIL (status {r.returncode})'}")
        ok &= r.returncode == 0
    return ok


def apt_show(name: str, version: str) -> dict[str, str]:
    r = run(["apt-cache", "show", f"{name}={version}"])
    if r.returncode != 0:
        raise BuildError(f"apt-cache show {name}={version} failed: {r.stderr.strip()}")
    fields = {}
    for line in r.stdout.split("\n\n")[0].splitlines():
        if ":" in line and not line.startswith(" "):
            k, v = line.split(":", 1)
            fields[k] = v.strip()
    return fields


def candidate(name: str) -> str:
    r = run(["apt-cache", "policy", name])
    for line in r.stdout.splitlines():
        if line.strip().startswith("Candidate:"):
            v = line.split(":", 1)[1].strip()
            if v != "(none)":
                return v
    raise BuildError(f"apt has no candidate for {name} (run apt-get update?)")


def update_pins() -> None:
    """Re-pins to the mirror's current kernel (what `track` depends on) and busybox."""
    step("pins", "apt-get update")
    u = run(["apt-get", "update", "-q"])
    if u.returncode != 0:
        raise BuildError(f"apt-get update failed:\n{u.stderr.strip()}")
    m = json.loads(MANIFEST.read_text())
    for role, p in m["packages"].items():
        name = p["name"]
        if "track" in p:  # a metapackage whose dependency names the kernel package
            meta = p["track"]
            deps = apt_show(meta, candidate(meta)).get("Depends", "")
            name = deps.split(",")[0].split("(")[0].strip()
        version = candidate(name)
        sha = apt_show(name, version)["SHA256"]
        if (name, version, sha) != (p["name"], p["version"], p["sha256"]):
            step("pins", f"{role}: {p['name']} {p['version']} -> {name} {version}")
        else:
            step("pins", f"{role}: {name} {version} (unchanged)")
        p.update(name=name, version=version, sha256=sha)
    MANIFEST.write_text(json.dumps(m, indent=2) + "\n")
    step("pins", f"wrote {MANIFEST}; now run build.py, then review and commit the manifest and README")


# ------------------------------------------------------------------------------ main


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="rebuild every output")
    ap.add_argument("--smoke", action="store_true", help="afterwards, run the checks on this host")
    ap.add_argument("--update-pins", action="store_true", help="re-pin manifest.json to the mirror's versions")
    args = ap.parse_args(argv)
    try:
        if args.update_pins:
            update_pins()
            return 0
        out = args.out.resolve()
        (out / "work").mkdir(parents=True, exist_ok=True)
        stamps = Stamps(out / "work" / "stamps.json")
        if args.force:
            stamps.data = {}
        _, pinned = load_manifest()
        fetched = [fetch(p) for p in pinned]
        pkgs = [p for p, _ in fetched]
        by_role = {p.role: p for p in pkgs}
        debs = {p.role: deb for p, deb in fetched}
        kinfo = build_vmlinux(by_role["kernel"], debs["kernel"], out, stamps)
        busybox = build_busybox(by_role["busybox"], debs["busybox"], out, stamps)
        busybox_check_applets(busybox)
        checks, tools = build_checks()
        entries = build_initramfs(busybox, checks, tools, out, stamps)
        write_build_info(out, pkgs, kinfo, busybox, entries)
        step("done", f"{out}: vmlinux ({kinfo['release']}), initramfs.cpio, build-info.json")
        if args.smoke and not smoke(checks, busybox):
            return 1
        return 0
    except BuildError as e:
        print(f"[linux-guest] ERROR: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
