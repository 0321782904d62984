"""harness.release: the /proc readers, on this very process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from harness import release

TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1
"""
TCP6_TABLE = """\
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1
"""  # noqa: E501 - the kernel's own line


def test_parse_proc_net_ipv4() -> None:
    (s,) = release.parse_proc_net("tcp", TCP_TABLE)
    assert (s.local, s.remote, s.state, s.inode) == ("127.0.0.1:8080", "0.0.0.0:0", "0A", 4242)


def test_parse_proc_net_ipv6() -> None:
    (s,) = release.parse_proc_net("tcp6", TCP6_TABLE)
    assert s.local == "[::1]:22"
    assert s.inode == 77


def test_device_id() -> None:
    assert release.device_id("/machine/peripheral/vblk0/virtio-backend") == "vblk0"
    assert release.device_id("/machine/unattached/device[3]") == "/machine/unattached/device[3]"


def test_fds_on_finds_an_open_file(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"x")
    ident = release.file_id(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fd in release.fds_on(os.getpid(), ident)
    finally:
        os.close(fd)
    assert release.fds_on(os.getpid(), ident) == []


def test_inet_sockets_sees_a_listener() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        here = f"127.0.0.1:{s.getsockname()[1]}"
        mine = release.inet_sockets(os.getpid())
        assert any(x.local == here and x.state == release.TCP_LISTEN for x in mine)
        port = s.getsockname()[1]
    assert release.tcp_connect("127.0.0.1", port, timeout=2) == "refused"


def test_tcp_connect_to_a_listener() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert release.tcp_connect("127.0.0.1", s.getsockname()[1], timeout=2) == "connected"
