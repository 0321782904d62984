"""The rig protocol: what the proof needs of a running guest, whoever runs it.

A rig is a guest that writes numbered records, with its host side: the
console those records are printed on, the disk they are written to, the
listener their datagrams reach, and the marker the guest keeps in RAM.
Three guests implement it: the probe and the Linux guest on a QEMU the
harness launches (:class:`Rig`, built by ``guest.probe_rig`` and
``linux_guest.linux_rig``), and the probe as a libvirt domain
(``libvirtd.ProbeGuest``). One record line format serves all three.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness import netns
from harness.vm import VM, qemu_tool

DISK_NODE = "disk0"
DEVICE_ID = "vblk0"
NETDEV_ID = "net0"
NIC_ID = "nic0"
#: the stalled network's sink: a hub port to a NIC nobody drives
SINK_NETDEV_ID = "sink-net0"
IMAGE_SIZE = 1 << 20

#: The console line of every record, from the probe and the Linux guest alike.
RECORD_RX = re.compile(r"^record (\d+) blk=(\w+) net=(\w+)", re.M)
_SECTORS_RX = re.compile(r"record sectors=(\d+)")


class RigError(Exception):
    """A rig could not be set up or driven (not a verdict)."""


@dataclass(frozen=True)
class ConsoleRecord:
    """One ``record N blk=.. net=..`` line: what the guest says it completed."""

    counter: int
    blk: str
    net: str


def console_records(text: str | bytes, offset: int = 0) -> list[ConsoleRecord]:
    """Every record line in a console (str, or a log file's bytes) after ``offset``."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return [
        ConsoleRecord(int(m.group(1)), m.group(2), m.group(3))
        for m in RECORD_RX.finditer(text, offset)
    ]


def record_sectors(text: str) -> int | None:
    """The record ring size the guest reported at boot, if it did."""
    m = _SECTORS_RX.search(text)
    return int(m.group(1)) if m else None


class GuestRig(Protocol):
    """What every rig offers: records, listener, disk view, marker, console."""

    marker: str
    listener: netns.UdpListener

    def console_text(self) -> str: ...

    def records(self) -> list[int]: ...

    def last_record(self) -> int: ...

    def wait_record(self, n: int, timeout: float) -> int: ...

    def disk_view(self) -> bytes: ...

    def command(self, c: bytes) -> None: ...


# -- small tools -------------------------------------------------------------


def run_tool(argv: Sequence[str | Path], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool (no shell), capturing its output; never raises on rc."""
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def create_image(prefix: Path, path: Path, fmt: str, size: int = IMAGE_SIZE) -> None:
    r = run_tool([qemu_tool(prefix, "qemu-img"), "create", "-q", "-f", fmt, path, str(size)])
    if r.returncode != 0:
        raise RigError(f"qemu-img create {path}: {r.stderr.strip()}")


def guest_view(prefix: Path, image: Path, fmt: str, out: Path) -> bytes:
    """The guest-visible disk contents (format driver applied), read-only, shared."""
    if fmt == "raw":
        return image.read_bytes()
    r = run_tool(
        [qemu_tool(prefix, "qemu-img"), "convert", "-U", "-f", fmt, "-O", "raw", image, out]
    )
    if r.returncode != 0:
        raise RigError(f"qemu-img convert: {r.stderr.strip()}")
    return out.read_bytes()


# -- a guest on a QEMU the harness launches ------------------------------------


@dataclass
class Rig:
    """One running guest VM with its disk, network listener and capture."""

    vm: VM
    prefix: Path
    workdir: Path
    image: Path
    disk_format: str
    network: str
    marker: str
    listener: netns.UdpListener
    capture: netns.FrameCapture | None = None
    tap: netns.Tap | None = None
    backup_target: Path | None = None
    #: Files a write path would write (job targets, overlays, migration
    #: streams): every non-zero byte in them counts as written after freeze.
    write_targets: list[Path] = field(default_factory=list)
    accel: str = "kvm"
    #: Firmware for a standby QEMU (it never runs, so any will do).
    bios: Path | None = None
    #: Guest RAM, for pmemsave of all of it.
    ram_mb: int = 64
    #: A paging guest (Linux): virtual != physical, so memsave is not checked.
    paged: bool = False
    #: How long a live guest may take per record (TCG Linux is slow).
    record_timeout: float = 10.0
    #: share-rw=on on the guest's disk: needed for a writable NBD export of
    #: it (the NBD rig); production-shaped rigs have share-rw=off.
    share_rw: bool = True

    @property
    def nbd_socket(self) -> Path:
        return self.vm.paths.sock_dir / "nbd.sock"

    @property
    def sectors(self) -> int:
        """The record ring size the guest reported at boot."""
        n = record_sectors(self.vm.console_text())
        if n is None:
            raise RigError("the guest did not report its record sectors")
        return n

    def console_text(self) -> str:
        return self.vm.console_text()

    def records(self) -> list[int]:
        return [r.counter for r in console_records(self.vm.console_text())]

    def last_record(self) -> int:
        recs = self.records()
        return recs[-1] if recs else 0

    def wait_record(self, n: int, timeout: float) -> int:
        """Wait until the guest has completed record ``n`` (or a later one)."""
        deadline = time.monotonic() + timeout
        start = 0
        while True:
            m = self.vm.wait_for_console(RECORD_RX, max(0.0, deadline - time.monotonic()), start)
            if int(m.group(1)) >= n:
                return int(m.group(1))
            start = m.end()

    def disk_view(self) -> bytes:
        return guest_view(self.prefix, self.image, self.disk_format, self.workdir / "view.raw")

    def command(self, c: bytes) -> None:
        self.vm.console_write(c)

    def records_after(self, offset: int) -> list[int]:
        """Records the console printed after byte ``offset``: the guest ran."""
        return [r.counter for r in console_records(self.vm.console_text(), offset)]

    def datagrams_after(self, wall: float) -> int:
        n = len(self.listener.after_wall(wall))
        if self.capture is not None:
            n = max(n, len(self.capture.after_wall(wall)))
        return n


@dataclass
class GuestNetwork:
    """The host side of a guest's NIC: the -netdev, the listener, the capture."""

    netdev: str
    listener: netns.UdpListener
    #: the guest's addressing (dst_ip, dst_port, src_ip, ...), for its config
    addresses: dict[str, Any]
    capture: netns.FrameCapture | None = None
    tap: netns.Tap | None = None
    #: descriptors QEMU inherits (the tap), closed once QEMU has them
    fds: list[int] = field(default_factory=list)
    #: more QEMU arguments the network needs (the stalled network's sink)
    args: list[str] = field(default_factory=list)

    def close_fds(self) -> None:
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())


@contextlib.contextmanager
def guest_network(network: str) -> Iterator[GuestNetwork]:
    """``user``: slirp to a listener on 127.0.0.1; ``tap``: a tap in a private
    network namespace, with the listener and a frame capture inside it;
    ``stalled``: a hub to a NIC that cannot receive (nothing leaves)."""
    with contextlib.ExitStack() as stack:
        if network == "user":
            listener = stack.enter_context(netns.UdpListener("127.0.0.1"))
            net = GuestNetwork(
                f"user,id={NETDEV_ID}",
                listener,
                {"dst_ip": netns.USER_NET_HOST_IP, "dst_port": listener.port},
            )
        elif network == "tap":
            ns = stack.enter_context(netns.network_namespace())
            tap = ns.add_tap()
            listener = stack.enter_context(netns.UdpListener(netns.TAP_HOST_IP, netns=ns.name))
            capture = stack.enter_context(netns.FrameCapture(tap))
            fd = tap.open_fd()
            net = GuestNetwork(
                f"tap,id={NETDEV_ID},fd={fd}",
                listener,
                {
                    "src_ip": netns.TAP_GUEST_IP,
                    "gateway": netns.TAP_HOST_IP,
                    "dst_ip": netns.TAP_HOST_IP,
                    "netmask": "255.255.255.0",
                    "dst_port": listener.port,
                },
                capture,
                tap,
                [fd],
            )
        elif network == "stalled":
            # The NIC's peer is a hub whose only other port is a second NIC
            # that no driver sets up: nothing can receive, so the guest's
            # first frame stays queued in QEMU, its TX queue holding one
            # request in flight (the probe sends one frame at a time).
            listener = stack.enter_context(netns.UdpListener("127.0.0.1"))
            net = GuestNetwork(
                f"hubport,id={NETDEV_ID},hubid=0",
                listener,
                {"dst_ip": netns.USER_NET_HOST_IP, "dst_port": listener.port},
                args=[
                    "-netdev",
                    f"hubport,id={SINK_NETDEV_ID},hubid=0",
                    "-device",
                    f"virtio-net-pci,disable-modern=on,netdev={SINK_NETDEV_ID},id=sink0,romfile=",
                ],
            )
        else:
            raise ValueError(f"unknown network {network!r}")
        stack.callback(net.close_fds)
        yield net
