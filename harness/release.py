"""What a frozen QEMU still holds on the host, and storage to hand over.

Freezing releases what a standby needs: the image files and the network
backends' host descriptors are closed, so the storage below the VM can be
stopped while the frozen QEMU lives on with its memory.  These helpers
measure that from outside QEMU: descriptors from ``/proc/<pid>/fd``, inet
sockets from ``/proc/<pid>/net``, block nodes from QMP; and they make the
storage a standby would take over, a loop-mounted ext4 filesystem that must
unmount while QEMU lives.

Plain functions over a PID or a :class:`~harness.vm.VM`; nothing here
decides a verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.rig import run_tool
from harness.vm import VM, VMCommandError, VMTimeout

TUN_DEVICE = "/dev/net/tun"
#: The second disk of the inactivation-failure scenario: qcow2 over blkdebug.
FAILING_NODE = "disk1"
FAILING_DEBUG_NODE = "disk1-dbg"
FAILING_FILE_NODE = "disk1-file"
FAILING_DEVICE_ID = "vblk1"
FAILING_CHAIN = (FAILING_NODE, FAILING_DEBUG_NODE, FAILING_FILE_NODE)
#: blkdebug: once a host read has gone through (``arm_flush_error``), every
#: flush of the node fails with EIO.  The rule is activated by the
#: ``flush_to_os`` event, which the qcow2 parent raises on its file child
#: at the start of each of its own flushes, so the freeze's flush activates
#: it; it then stays active (not ``once``) for the flush that inactivation
#: does.  Nothing fires before the read: the probe never touches this disk.
FLUSH_ERROR_SET_STATE = [{"event": "read_aio", "state": 1, "new_state": 2}]
FLUSH_ERROR_INJECT = [
    {"event": "flush_to_os", "state": 2, "iotype": "flush", "errno": 5, "once": False}
]
#: ``/proc/net/tcp`` state code of a listening socket.
TCP_LISTEN = "0A"


class ReleaseError(Exception):
    """A host-side step (mkfs, losetup, mount) could not be done."""


# -- descriptors -------------------------------------------------------------


FileId = tuple[int, int]


def file_id(path: Path) -> FileId:
    """(st_dev, st_ino) of a file, to find its descriptors whatever the path."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def fd_targets(pid: int) -> dict[int, str]:
    """Every descriptor of ``pid`` and what it points at (readlink)."""
    out: dict[int, str] = {}
    base = Path(f"/proc/{pid}/fd")
    for entry in base.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            out[int(entry.name)] = os.readlink(entry)
    return out


def fds_on(pid: int, ident: FileId) -> list[int]:
    """Descriptors of ``pid`` open on the file ``ident`` (see :func:`file_id`)."""
    found = []
    for fd in fd_targets(pid):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            found.append(fd)
    return sorted(found)


def tun_fds(pid: int) -> list[int]:
    """Descriptors of ``pid`` on ``/dev/net/tun`` (a tap netdev's host side)."""
    return sorted(fd for fd, target in fd_targets(pid).items() if target == TUN_DEVICE)


@dataclass(frozen=True)
class InetSocket:
    proto: str
    local: str
    remote: str
    state: str
    inode: int

    def __str__(self) -> str:
        return f"{self.proto} {self.local} -> {self.remote} state={self.state}"


def _hex_addr(text: str) -> str:
    """``0100007F:1F90`` (as /proc/net prints it) -> ``127.0.0.1:8080``."""
    addr, _, port = text.partition(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # IPv6: four host-order 32-bit words
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        host = f"[{socket.inet_ntop(socket.AF_INET6, words)}]"
    return f"{host}:{int(port, 16)}"


def parse_proc_net(proto: str, text: str) -> list[InetSocket]:
    """The sockets of one ``/proc/net/{tcp,udp,tcp6,udp6}`` table."""
    out = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10:
            continue
        out.append(InetSocket(proto, _hex_addr(cols[1]), _hex_addr(cols[2]), cols[3], int(cols[9])))
    return out


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds (``socket:[N]`` descriptors)."""
    out = set()
    for target in fd_targets(pid).values():
        if target.startswith("socket:[") and target.endswith("]"):
            out.add(int(target[8:-1]))
    return out


def inet_sockets(pid: int) -> list[InetSocket]:
    """TCP/UDP sockets (IPv4 and IPv6) that ``pid`` holds, in its network namespace.

    QEMU's monitor and console are unix sockets, so on a VM with user
    networking (and nothing else listening: no VNC, no gdbstub on TCP)
    these are slirp's host sockets: hostfwd listeners and the sockets
    of the guest's own connections and datagrams.
    """
    mine = socket_inodes(pid)
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            text = Path(f"/proc/{pid}/net/{proto}").read_text()
        except FileNotFoundError:
            continue
        out += [s for s in parse_proc_net(proto, text) if s.inode in mine]
    return out


# -- QMP views ---------------------------------------------------------------


def named_nodes(vm: VM) -> dict[str, dict[str, Any]]:
    """query-named-block-nodes by node name."""
    return {n["node-name"]: n for n in vm.cmd("query-named-block-nodes")}


def device_id(qdev: str) -> str:
    """``/machine/peripheral/vblk0/virtio-backend`` (query-block's qdev) -> ``vblk0``."""
    parts = qdev.split("/")
    if "peripheral" in parts[:-1]:
        return parts[parts.index("peripheral") + 1]
    return qdev


def inserted_media(vm: VM) -> dict[str, str | None]:
    """query-block: device id (else name) -> node name of its medium, or None."""
    out: dict[str, str | None] = {}
    for dev in vm.cmd("query-block"):
        key = device_id(dev["qdev"]) if dev.get("qdev") else dev.get("device") or "?"
        ins = dev.get("inserted")
        out[key] = ins.get("node-name") if ins else None
    return out


@dataclass
class Holdings:
    """What QEMU holds right now: image fds, tun fds, inet sockets, nodes, media."""

    image_fds: dict[str, list[int]]
    tun_fds: list[int]
    inet: list[InetSocket]
    nodes: list[str]
    media: dict[str, str | None]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"image fds={self.image_fds} tun fds={self.tun_fds} "
            f"inet={[str(s) for s in self.inet]} nodes={self.nodes} media={self.media}"
        )


def holdings(vm: VM, images: Mapping[str, FileId]) -> Holdings:
    """Snapshot what ``vm`` holds; ``images`` maps a label to a :func:`file_id`."""
    pid = vm.pid
    return Holdings(
        image_fds={label: fds_on(pid, ident) for label, ident in images.items()},
        tun_fds=tun_fds(pid),
        inet=inet_sockets(pid),
        nodes=sorted(named_nodes(vm)),
        media=inserted_media(vm),
    )


@dataclass
class FreezeOutcome:
    """The answer to ``freeze``, the FROZEN event and query-status after it."""

    error: VMCommandError | None
    event: dict[str, Any]
    status: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.event.get("data", {}))

    def describe(self) -> str:
        err = "ok" if self.error is None else f"{self.error.error_class}: {self.error.desc}"
        return f"freeze: {err}; FROZEN data={self.data}; query-status={self.status}"


def freeze(vm: VM, timeout: float = 20.0) -> FreezeOutcome:
    """QMP ``freeze``, then the FROZEN event, which must come, error or not.

    ``event`` is empty when none came (a QEMU without the command: at once).
    """
    err = vm.try_cmd("freeze")
    ev: dict[str, Any] = {}
    if err is None or err.error_class != "CommandNotFound":
        with contextlib.suppress(VMTimeout):
            ev = vm.event_wait("FROZEN", timeout)
    return FreezeOutcome(err, ev, vm.cmd("query-status"))


# -- the inactivation-failure disk ---------------------------------------------


def flush_error_disk_args(image: Path) -> list[str]:
    """-blockdev/-device for a qcow2 disk over blkdebug whose flushes fail once armed.

    The device is a second legacy virtio-blk behind the probe's own (the
    probe drives the first it finds), with an explicit geometry so QEMU does
    not read the disk at startup.
    """
    blockdev = {
        "driver": "qcow2",
        "node-name": FAILING_NODE,
        "file": {
            "driver": "blkdebug",
            "node-name": FAILING_DEBUG_NODE,
            "image": {"driver": "file", "node-name": FAILING_FILE_NODE, "filename": str(image)},
            "set-state": FLUSH_ERROR_SET_STATE,
            "inject-error": FLUSH_ERROR_INJECT,
        },
    }
    device = (
        f"virtio-blk-pci,disable-modern=on,drive={FAILING_NODE},id={FAILING_DEVICE_ID},"
        "cyls=2,heads=16,secs=63"
    )
    return ["-blockdev", json.dumps(blockdev), "-device", device]


def arm_flush_error(vm: VM) -> None:
    """Dirty the failing disk (so a flush has work to do), then arm the rule.

    A write from the host leaves data and qcow2 metadata that only a flush
    makes durable; the read of the same sector moves blkdebug to the state
    in which flushes fail.  Both go through the device's own BlockBackend
    (HMP ``qemu-io -d``), which holds the write permission.  qemu-io
    reports its results on QEMU's stdout; the monitor answers only errors.
    """
    for cmd in ("write -P 0x5a 0 512", "read 0 512"):
        out = vm.hmp(f'qemu-io -d {FAILING_DEVICE_ID}/virtio-backend "{cmd}"').strip()
        if out:
            raise ReleaseError(f"HMP qemu-io {cmd!r} on {FAILING_DEVICE_ID}: {out}")


# -- TCP ----------------------------------------------------------------------


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_connect(host: str, port: int, timeout: float = 3.0) -> str:
    """``connected``, ``refused`` or what else happened, for one TCP connect."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return f"error: {e!r}"


# -- a loop-mounted filesystem ---------------------------------------------------


def _checked(argv: Sequence[str | Path]) -> str:
    r = run_tool(argv)
    if r.returncode != 0:
        raise ReleaseError(f"{' '.join(map(str, argv))}: rc={r.returncode}: {r.stderr.strip()}")
    return r.stdout.strip()


def is_mounted(mountpoint: Path) -> bool:
    target = str(Path(mountpoint).resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def loop_backing(device: str) -> str | None:
    """The backing file of loop ``device``, None when it is detached."""
    p = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    try:
        return p.read_text().strip()
    except OSError:
        return None


def umount(mountpoint: Path) -> subprocess.CompletedProcess[str]:
    """A plain (not lazy) umount; it fails with "target is busy" while files are open."""
    return run_tool(["umount", mountpoint])


def loop_detach(device: str) -> subprocess.CompletedProcess[str]:
    return run_tool(["losetup", "-d", device])


@dataclass
class LoopMount:
    backing: Path
    device: str
    mountpoint: Path


@contextlib.contextmanager
def loop_mounted_fs(base: Path, size_mb: int = 64) -> Iterator[LoopMount]:
    """An ext4 filesystem in ``base/fs.img`` on a loop device, mounted on ``base/mnt``.

    Always unmounted and detached on exit, also when the body failed or
    unmounted it itself: a plain umount is retried for a few seconds (a
    killed QEMU may take a moment to let go), then done lazily.
    """
    base.mkdir(parents=True, exist_ok=True)
    backing = base / "fs.img"
    mnt = base / "mnt"
    mnt.mkdir(exist_ok=True)
    with open(backing, "wb") as f:
        f.truncate(size_mb << 20)
    _checked(["mkfs.ext4", "-q", "-F", backing])
    device = _checked(["losetup", "--find", "--show", backing])
    try:
        _checked(["mount", "-t", "ext4", device, mnt])
        yield LoopMount(backing, device, mnt)
    finally:
        _release_mount(mnt, device, backing)


def _release_mount(mnt: Path, device: str, backing: Path) -> None:
    deadline = time.monotonic() + 5
    while is_mounted(mnt):
        if umount(mnt).returncode == 0:
            break
        if time.monotonic() > deadline:
            run_tool(["umount", "-l", mnt])
            break
        time.sleep(0.2)
    # Only our own attachment: the number may have been reused once detached.
    if loop_backing(device) == str(backing.resolve()):
        loop_detach(device)
