"""Observation: what a rig's guest and QEMU left, measured at the source.

Disk bytes from the image file (and the guest's view through the format
driver), records decoded sector by sector, memory from ``pmemsave``,
``dump-guest-memory``, ``xp`` and ``memsave``, QEMU's image lock bytes read
with OFD locks, and a standby QEMU that tries to open the image
read-write. Nothing here judges: the verdicts are in ``harness.verdict``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import guest
from harness.rig import Rig
from harness.vm import VM, VMError, system_binary

SECTOR = guest.SECTOR

#: QEMU file-posix locks one byte per permission at 100+bit while it holds
#: the permission and at 200+bit while it refuses to share it (BLK_PERM_*).
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
LOCK_SPAN = 64
PERM_NAMES = ("consistent-read", "write", "write-unchanged", "resize")
#: The bytes that make a standby's read-write open (a disk device: it needs
#: read and write, shares read) fail; the others only mean "still open".
STANDBY_CONFLICTS = frozenset({LOCK_PERM_BASE + 1, LOCK_SHARED_BASE + 0, LOCK_SHARED_BASE + 1})


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bytes_changed(before: bytes, after: bytes) -> int:
    """How many bytes differ (a size change counts its whole difference)."""
    n = min(len(before), len(after))
    diff = sum(1 for a, b in zip(before[:n], after[:n], strict=True) if a != b)
    return diff + abs(len(before) - len(after))


def bytes_in_targets(targets: Sequence[Path]) -> dict[str, int]:
    """Non-zero bytes in each write target that exists: written after the freeze."""
    out = {}
    for target in targets:
        if target.exists():
            data = target.read_bytes()
            if moved := len(data) - data.count(0):
                out[target.name] = moved
    return out


def parse_records(disk: bytes, marker: str) -> dict[int, int]:
    """Sector -> counter of every valid probe record (magic, CRC, marker) on disk."""
    found: dict[int, int] = {}
    for off in range(SECTOR, len(disk) - SECTOR + 1, SECTOR):
        rec = guest.decode_sector(disk[off : off + SECTOR])
        if rec is None or rec.magic != guest.RECORD_MAGIC:
            continue
        if rec.sector != off // SECTOR or rec.marker != marker:
            continue
        found[rec.sector] = rec.counter
    return found


# -- memory --------------------------------------------------------------------


def accelerator(vm: VM) -> str:
    kvm = vm.cmd("query-kvm")
    return "kvm" if kvm.get("enabled") else "tcg"


def memory_has(
    vm: VM,
    workdir: Path,
    needles: Sequence[bytes],
    *,
    ram_mb: int = guest.RAM_MB,
    paged: bool = False,
) -> dict[str, bool]:
    """Look for each needle in RAM through every read path a frozen VM keeps.

    ``pmemsave`` of all RAM and ``dump-guest-memory`` are searched for every
    needle; the first needle is then also read back at the address where
    pmemsave found it, with HMP ``xp`` (physical) and, for an unpaged guest
    such as the probe (virtual == physical), ``memsave``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    pmem = workdir / "pmemsave.bin"
    dump = workdir / "dump.elf"
    vm.cmd("pmemsave", val=0, size=ram_mb << 20, filename=str(pmem))
    vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{dump}", timeout=120)
    found = {}
    addr = -1
    for label, path in (("pmemsave", pmem), ("dump-guest-memory", dump)):
        data = path.read_bytes()
        for n in needles:
            found[f"{label}:{n.decode(errors='replace').strip()}"] = n in data
        if label == "pmemsave" and needles:
            addr = data.find(needles[0])
        path.unlink()
    if needles:
        first = needles[0]
        found["xp"] = addr >= 0 and xp_bytes(vm, addr, len(first)) == first
        if paged:
            return found
        found["memsave"] = False
        if addr >= 0:
            out = workdir / "memsave.bin"
            vm.cmd("memsave", val=addr, size=len(first), filename=str(out))
            found["memsave"] = out.read_bytes() == first
            out.unlink()
    return found


def xp_bytes(vm: VM, addr: int, size: int) -> bytes:
    """Read guest-physical memory through HMP ``xp``."""
    text = vm.hmp(f"xp /{size}xb 0x{addr:x}")
    out = bytearray()
    for line in text.splitlines():
        _, _, values = line.partition(":")
        out += bytes(int(v, 16) for v in values.split() if v.startswith("0x"))
    return bytes(out)


# -- locks ---------------------------------------------------------------------


@dataclass(frozen=True)
class StandbyOpen:
    """What a standby QEMU got when it opened the image read-write."""

    opened: bool
    text: str


def second_qemu_opens_rw(
    prefix: Path,
    image: Path,
    fmt: str,
    workdir: Path,
    accel: str = "kvm",
    bios: Path | None = None,
) -> StandbyOpen:
    """Can a standby QEMU open the image read-write while the first one lives?

    A second qemu-system (stopped with -S, so the guest never runs) attaches
    the image to a virtio-blk device with the default share-rw=off, which
    takes QEMU's image locks exactly as a standby would; it is quit at once.
    """
    blockdev = {
        "driver": fmt,
        "node-name": "standby0",
        "file": {"driver": "file", "filename": str(image)},
    }
    args = [
        "-S",
        "-machine",
        "pc",
        "-blockdev",
        json.dumps(blockdev),
        "-device",
        "virtio-blk-pci,drive=standby0",
    ]
    if bios is not None:
        # Any firmware will do, it never runs; this one needs no -L dirs.
        args += ["-bios", str(bios)]
    log_dir = workdir / f"standby-{secrets.token_hex(3)}"
    vm = VM(
        system_binary(prefix), args, name="standby", log_dir=log_dir, accel=accel, console="none"
    )
    try:
        with vm:
            info = next(
                b for b in vm.cmd("query-named-block-nodes") if b.get("node-name") == "standby0"
            )
            ok = info.get("ro") is False
            text = "opened read-write" if ok else f"opened read-only: {info}"
    except VMError as e:
        # QEMU refuses to start on a lock conflict; its message says why.
        log = (log_dir / "qemu.log").read_text(errors="replace")
        text = log.strip().splitlines()[-1] if log.strip() else str(e)
        return StandbyOpen(False, text)
    return StandbyOpen(ok, text)


def standby_opens_rw(rig: Rig) -> StandbyOpen:
    """Can a second QEMU open this rig's image read-write right now?"""
    return second_qemu_opens_rw(
        rig.prefix, rig.image, rig.disk_format, rig.workdir, rig.accel, rig.bios
    )


def _flock(fd: int, cmd: int, kind: int, start: int, length: int) -> tuple[bool, int]:
    """One OFD lock request; returns (done, l_type answered by F_OFD_GETLK)."""
    # struct flock on Linux x86_64: short l_type, short l_whence, off_t l_start,
    # off_t l_len, pid_t l_pid (0 for OFD locks), padding.
    req = struct.pack("hhqqi4x", kind, os.SEEK_SET, start, length, 0)
    try:
        ans = fcntl.fcntl(fd, cmd, req)
    except OSError:
        return False, -1
    return True, struct.unpack("hhqqi4x", ans)[0]


def lock_byte_name(offset: int) -> str:
    base, what = (
        (LOCK_SHARED_BASE, "shared") if offset >= LOCK_SHARED_BASE else (LOCK_PERM_BASE, "perm")
    )
    bit = offset - base
    perm = PERM_NAMES[bit] if 0 <= bit < len(PERM_NAMES) else f"bit{bit}"
    label = "unshared" if what == "shared" else "held"
    return f"{offset}({perm} {label})"


def held_lock_bytes(path: Path) -> list[int]:
    """QEMU lock bytes some other open file holds on ``path`` (empty: all free).

    A standby opening the image read-write needs these bytes; a write lock
    (F_OFD_SETLK F_WRLCK) over both ranges succeeds only when nobody holds
    any of them.  It is released at once; the held bytes are then named one
    by one with F_OFD_GETLK.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        held: list[int] = []
        for base in (LOCK_PERM_BASE, LOCK_SHARED_BASE):
            ok, _ = _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, base, LOCK_SPAN)
            if ok:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, base, LOCK_SPAN)
                continue
            for off in range(base, base + LOCK_SPAN):
                done, kind = _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, off, 1)
                if done and kind != fcntl.F_UNLCK:
                    held.append(off)
        return held
    finally:
        os.close(fd)


# -- image locks and a real standby ------------------------------------------------

#: how long a standby waits for the lock by default
STANDBY_TIMEOUT = 30.0

# QEMU's file-posix locks one byte per permission at 100 + bit ("I use it")
# and 200 + bit ("others may not"); any lock there blocks a standby.
_QEMU_LOCK_START, _QEMU_LOCK_LEN = 100, 200
#: BLK_PERM_WRITE is bit 1: a writer that does not share writing (a standby
#: QEMU with share-rw=off) needs byte 101 (nobody uses write) and byte 201
#: (nobody refuses to share write) free.
WRITE_LOCK_BYTES = (_QEMU_LOCK_START + 1, _QEMU_LOCK_START + 100 + 1)
_F_OFD_GETLK, _F_OFD_SETLK, _F_OFD_SETLKW = 36, 37, 38
_FLOCK = "hhxxxxqqixxxx"


def image_locked(image: Path) -> bool:
    """True while any process holds a QEMU permission lock on `image`."""
    fd = os.open(image, os.O_RDWR)
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _QEMU_LOCK_START, _QEMU_LOCK_LEN, 0)
        answer = fcntl.fcntl(fd, _F_OFD_GETLK, query)
        return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def wait_unlocked(image: Path, since: float, timeout: float = STANDBY_TIMEOUT) -> float:
    """Seconds from `since` (monotonic) until the image lock is free (1 ms poll).

    Kept for quick checks; the benchmarks use ``Standby``.
    """
    deadline = since + timeout
    while image_locked(image):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{image} still locked after {timeout} s")
        time.sleep(0.001)  # a 1 ms poll of a lock, not a wait for an event
    return time.monotonic() - since


def monotonic_to_wall(monotonic: float) -> float:
    """A CLOCK_MONOTONIC reading (a standby's) as wall-clock seconds, to
    compare with the timestamps of QEMU's events."""
    return time.time() - (time.monotonic() - monotonic)


@dataclass(frozen=True)
class JobProgress:
    """A job as query-jobs shows it; status ``absent`` when it is gone."""

    status: str
    done: int
    total: int

    @property
    def mid_copy(self) -> bool:
        return 0 < self.done < self.total


def job_progress(execute: Callable[[str], Any], job: str = "job0") -> JobProgress:
    """The progress of `job`, through any QMP client's execute (VM.cmd, the
    benchmarks' lean client): a job that has finished reads as absent."""
    for j in execute("query-jobs"):
        if j.get("id") == job:
            return JobProgress(j["status"], int(j["current-progress"]), int(j["total-progress"]))
    return JobProgress("absent", 0, 0)


_STANDBY = r"""
import fcntl, os, struct, sys, time
FMT, GETLK, SETLKW = "hhxxxxqqixxxx", 36, 38
fd = os.open(sys.argv[1], os.O_RDWR)
offsets = [int(a) for a in sys.argv[2:]]
def req(kind, off):
    return struct.pack(FMT, kind, os.SEEK_SET, off, 1, 0)
held = [o for o in offsets
        if struct.unpack(FMT, fcntl.fcntl(fd, GETLK, req(fcntl.F_WRLCK, o)))[0] != fcntl.F_UNLCK]
print("held" if held else "free", flush=True)
for o in offsets:
    fcntl.fcntl(fd, SETLKW, req(fcntl.F_WRLCK, o))
print("got %.9f" % time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)
sys.stdin.read()
"""


class StandbyError(Exception):
    """The standby did not wait as it should (lock not held, not blocked, no lock)."""


def lock_id(path: Path) -> str:
    """How /proc/locks names the file: MAJ:MIN:INODE (major and minor in hex)."""
    st = os.stat(path)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def blocked_waiters(path: Path, locks_text: str | None = None) -> int:
    """How many lock requests on `path` wait in the kernel (``->`` in /proc/locks)."""
    text = Path("/proc/locks").read_text() if locks_text is None else locks_text
    ident = lock_id(path)
    return sum(1 for line in text.splitlines() if "->" in line and ident in line.split())


class Standby:
    """A second process blocked in a write-lock wait on `image`.

    ``start()`` returns once the child found the lock held and is blocked in
    the kernel on it; ``acquired()`` is the child's CLOCK_MONOTONIC when it
    got the lock.  Ended by PID on close, also on failure.
    """

    def __init__(self, image: Path, offsets: Sequence[int] = WRITE_LOCK_BYTES):
        self.image = image
        self.offsets = tuple(offsets)
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Standby:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise StandbyError(f"standby silent for {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise StandbyError(f"standby exited (rc {self.proc.poll()})")
        return line.strip()

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _STANDBY, str(self.image), *map(str, self.offsets)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        first = self._line(timeout)
        if first != "held":
            raise StandbyError(f"the lock on {self.image} was not held before the command")
        deadline = time.monotonic() + timeout
        while blocked_waiters(self.image) < 1:
            if time.monotonic() > deadline:
                raise StandbyError("standby not blocked in the kernel")
            time.sleep(0.002)  # waiting for the child to enter F_OFD_SETLKW

    def acquired(self, timeout: float = STANDBY_TIMEOUT) -> float:
        """The standby's CLOCK_MONOTONIC when it had the lock."""
        line = self._line(timeout)
        if not line.startswith("got "):
            raise StandbyError(f"standby said {line!r}")
        return float(line.split()[1])

    def close(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()  # by PID: the Popen we started
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
