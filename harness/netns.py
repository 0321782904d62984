"""Private network namespaces with a tap for QEMU, and a UDP listener.

Design: QEMU runs in the root namespace (so its QMP/console sockets, slirp and
everything else stay as usual), but its tap device lives inside a namespace
that the harness creates: the harness creates a persistent tap there, opens it
from a thread that has entered the namespace (``setns`` only affects the
calling thread) and hands the file descriptor to QEMU (``-netdev
tap,fd=N``).  Every frame the guest sends therefore arrives inside the private
namespace, where the listener socket is bound; nothing reaches the host's
interfaces.  Deleting the namespace removes the tap with it.

For user networking the listener binds 127.0.0.1 in the root namespace:
slirp forwards guest traffic for 10.0.2.2:port to host loopback:port.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
NETNS_RUN_DIR = Path("/run/netns")
IFNAMSIZ = 16

# Addresses on the namespace side of the tap; the guest uses another address
# of the same /24.
TAP_HOST_IP = "10.0.3.1"
TAP_GUEST_IP = "10.0.3.15"
TAP_PREFIXLEN = 24
# What a guest on user networking sends to so that it reaches host 127.0.0.1.
USER_NET_HOST_IP = "10.0.2.2"
USER_NET_GUEST_IP = "10.0.2.15"

SO_TIMESTAMPNS = 35
ETH_P_ALL = 0x0003

T = TypeVar("T")
R = TypeVar("R", bound="_Receiver")


class NetnsError(Exception):
    """A namespace or tap operation failed."""


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def netns_supported() -> str | None:
    """None when namespaces and taps can be made here, else the reason."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if subprocess.run(["ip", "-V"], capture_output=True, check=False).returncode != 0:
        return "iproute2 'ip' is missing"
    return None


def valid_ifname(name: str) -> bool:
    return 0 < len(name) < IFNAMSIZ and re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None


def run_in_netns(ns_name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread that has entered network namespace ``ns_name``.

    File descriptors it creates (sockets, tap fds) stay bound to that
    namespace after the thread ends; the rest of the process is unaffected.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(NETNS_RUN_DIR / ns_name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=body, name=f"netns-{ns_name}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def open_tap_fd(ifname: str) -> int:
    """Attach to tap ``ifname`` of the current thread's namespace; returns the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        ifr = struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class Namespace:
    """A network namespace this process created (and will delete)."""

    name: str
    taps: list[str] = field(default_factory=list)

    def ip(self, *args: str) -> str:
        return _ip("-n", self.name, *args)

    def add_tap(
        self, ifname: str | None = None, address: str = TAP_HOST_IP, prefixlen: int = TAP_PREFIXLEN
    ) -> Tap:
        """Create a persistent tap in the namespace, addressed and up."""
        ifname = ifname or f"ftap{secrets.token_hex(3)}"
        if not valid_ifname(ifname):
            raise NetnsError(f"bad interface name {ifname!r}")
        self.ip("tuntap", "add", "dev", ifname, "mode", "tap")
        self.taps.append(ifname)
        self.ip("addr", "add", f"{address}/{prefixlen}", "dev", ifname)
        self.ip("link", "set", ifname, "up")
        return Tap(self, ifname, address)

    def link_state(self, ifname: str) -> str:
        """``ip link`` flags of an interface, e.g. 'NO-CARRIER,BROADCAST,UP'."""
        out = self.ip("-o", "link", "show", "dev", ifname)
        m = re.search(r"<([^>]*)>", out)
        return m.group(1) if m else ""


@dataclass
class Tap:
    ns: Namespace
    ifname: str
    host_ip: str

    def open_fd(self) -> int:
        """An fd on the tap for QEMU (``-netdev tap,fd=N``); caller closes it."""
        return run_in_netns(self.ns.name, lambda: open_tap_fd(self.ifname))

    def carrier(self) -> bool:
        """True while a process (QEMU) holds the tap open."""
        return "NO-CARRIER" not in self.ns.link_state(self.ifname).split(",")


@contextmanager
def network_namespace(prefix: str = "frozen") -> Iterator[Namespace]:
    """Create a uniquely named namespace with loopback up; always delete it."""
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    ns = Namespace(name)
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        delete_namespace(name)


def delete_namespace(name: str) -> None:
    try:
        _ip("netns", "del", name)
    except NetnsError as e:
        if (NETNS_RUN_DIR / name).exists():
            raise
        del e


def namespace_exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


@dataclass(frozen=True)
class Datagram:
    """One received datagram or frame.

    ``t`` is time.monotonic() when the receive thread got it; ``wall`` is the
    kernel's arrival time (CLOCK_REALTIME, SO_TIMESTAMPNS), comparable with
    the ``timestamp`` of a QMP event, which QEMU takes from the same clock.
    """

    t: float
    wall: float
    payload: bytes
    source: tuple[object, ...]


class _Receiver:
    """A socket drained by a thread into a timestamped list."""

    def __init__(self, sock: socket.socket, label: str):
        self._sock = sock
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.settimeout(0.2)
        self._datagrams: list[Datagram] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=label, daemon=True)
        self._thread.start()

    def _accept(self, source: tuple[object, ...]) -> bool:
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, src = self._sock.recvmsg(65536, socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno in (errno.EBADF, errno.ENOTSOCK) or self._stop.is_set():
                    break
                continue
            if not self._accept(tuple(src)):
                continue
            wall = time.time()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack("qq", value[:16])
                    wall = sec + nsec / 1e9
            d = Datagram(time.monotonic(), wall, data, tuple(src))
            with self._cond:
                self._datagrams.append(d)
                self._cond.notify_all()

    def __enter__(self: R) -> R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def datagrams(self) -> list[Datagram]:
        with self._cond:
            return list(self._datagrams)

    def count_after(self, t: float) -> int:
        """Arrivals strictly after monotonic time ``t``."""
        with self._cond:
            return sum(1 for d in self._datagrams if d.t > t)

    def after_wall(self, wall: float) -> list[Datagram]:
        """Arrivals whose kernel timestamp is after wall-clock time ``wall``."""
        with self._cond:
            return [d for d in self._datagrams if d.wall > wall]

    def wait_for(
        self, predicate: Callable[[Datagram], bool], timeout: float, after: float | None = None
    ) -> Datagram:
        """Oldest arrival satisfying ``predicate`` (and after monotonic ``after``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for d in self._datagrams:
                    if (after is None or d.t > after) and predicate(d):
                        return d
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"nothing matching within {timeout} s ({len(self._datagrams)} received)"
                    )
                self._cond.wait(left)


class UdpListener(_Receiver):
    """Records every datagram that reaches one UDP port, with arrival times.

    Bound on ``host`` in the root namespace, or inside ``netns`` when given.
    A context manager; the receive thread always stops and the socket closes.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, netns: str | None = None):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind((host, port))
            except BaseException:
                s.close()
                raise
            return s

        sock = run_in_netns(netns, make) if netns else make()
        self.host, self.port = sock.getsockname()
        self.netns = netns
        super().__init__(sock, f"udp-{self.port}")


class FrameCapture(_Receiver):
    """Every Ethernet frame QEMU writes into a tap (ARP, announces, UDP ...).

    An AF_PACKET socket on the tap inside its namespace; frames the namespace
    itself sends towards the guest (PACKET_OUTGOING) are not recorded.
    """

    def __init__(self, tap: Tap):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            try:
                s.bind((tap.ifname, 0))
            except BaseException:
                s.close()
                raise
            return s

        self.tap = tap
        super().__init__(run_in_netns(tap.ns.name, make), f"cap-{tap.ifname}")

    def _accept(self, source: tuple[object, ...]) -> bool:
        # (ifname, proto, pkttype, hatype, addr)
        return len(source) < 3 or source[2] != socket.PACKET_OUTGOING
