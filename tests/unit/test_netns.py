"""Unit tests for harness.netns: the UDP listener on loopback, and (as root)
a private namespace with a tap whose frames reach a listener inside it."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from harness import netns


def _send(port: int, payload: bytes, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(payload, (host, port))


def test_listener_records_datagrams_with_times() -> None:
    with netns.UdpListener("127.0.0.1") as lst:
        assert lst.port > 0
        t0 = time.monotonic()
        _send(lst.port, b"rec 1")
        first = lst.wait_for(lambda d: d.payload == b"rec 1", timeout=5)
        assert first.t > t0
        _send(lst.port, b"rec 2")
        lst.wait_for(lambda d: d.payload == b"rec 2", timeout=5)
        assert [d.payload for d in lst.datagrams()] == [b"rec 1", b"rec 2"]
        assert lst.count_after(first.t) == 1
        assert lst.count_after(time.monotonic()) == 0
        # Kernel arrival times are wall-clock and ordered.
        second = lst.datagrams()[1]
        assert abs(first.wall - time.time()) < 60
        assert [d.payload for d in lst.after_wall(first.wall)] == [b"rec 2"]
        assert second.wall >= first.wall


def test_listener_wait_times_out() -> None:
    with netns.UdpListener("127.0.0.1") as lst, pytest.raises(TimeoutError):
        lst.wait_for(lambda d: True, timeout=0.3)


def test_listener_stops_on_close() -> None:
    lst = netns.UdpListener("127.0.0.1")
    lst.close()
    assert not lst._thread.is_alive()


@pytest.mark.parametrize(
    "name,ok", [("ftap01", True), ("", False), ("x" * 16, False), ("a b", False)]
)
def test_valid_ifname(name: str, ok: bool) -> None:
    assert netns.valid_ifname(name) is ok


def _checksum(b: bytes) -> int:
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _udp_frame(dst_mac: bytes, port: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 4000, port, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        1,
        0,
        64,
        17,
        0,
        socket.inet_aton(netns.TAP_GUEST_IP),
        socket.inet_aton(netns.TAP_HOST_IP),
    )
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + bytes.fromhex("525400123456") + b"\x08\x00" + ip + udp


@pytest.mark.skipif(netns.netns_supported() is not None, reason=str(netns.netns_supported()))
def test_namespace_tap_frames_stay_inside() -> None:
    with netns.network_namespace("frozen-unit") as ns:
        tap = ns.add_tap()
        assert not tap.carrier()
        fd = tap.open_fd()
        try:
            assert tap.carrier()
            with (
                netns.UdpListener(netns.TAP_HOST_IP, netns=ns.name) as lst,
                netns.FrameCapture(tap) as cap,
            ):
                # A broadcast frame written by "QEMU" to the tap is delivered to
                # the listener in the namespace, and captured on the tap.
                frame = _udp_frame(b"\xff" * 6, lst.port, b"probe 7")
                os.write(fd, frame)
                d = lst.wait_for(lambda d: True, timeout=5)
                assert d.payload == b"probe 7"
                assert d.source[0] == netns.TAP_GUEST_IP
                c = cap.wait_for(lambda d: d.payload == frame, timeout=5)
                assert c.wall <= d.wall + 1
        finally:
            os.close(fd)
        assert not tap.carrier()
        # The tap does not exist in the root namespace.
        assert not os.path.exists(f"/sys/class/net/{tap.ifname}")
        name = ns.name
    assert not netns.namespace_exists(name)


@pytest.mark.skipif(netns.netns_supported() is not None, reason=str(netns.netns_supported()))
def test_namespace_deleted_on_error() -> None:
    with pytest.raises(RuntimeError), netns.network_namespace("frozen-unit") as ns:
        name = ns.name
        raise RuntimeError("boom")
    assert not netns.namespace_exists(name)
