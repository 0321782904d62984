"""Out-of-process vhost-user backends, real ones, for the tests.

A VM with a vhost-user device has its data path in another process, past
QEMU's block and network layers, so a freeze could not sever it and QEMU
refuses one.  The refusal is tested against the backends QEMU ships:
qemu-storage-daemon's vhost-user-blk export (a disk) and the tree's
vhost-user-bridge (a NIC whose frames go to a UDP socket on loopback).

A backend owns its process like the QEMU launcher does: started on enter,
ended by PID on exit, whatever happened in between.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.lifecycle import Started
from harness.vm import qemu_tool

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class BackendError(Exception):
    """A backend did not come up; carries its log."""


@dataclass
class Backend(Started):
    """A backend process serving a vhost-user socket."""

    argv: list[str]
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_ready()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _wait_ready(self) -> None:
        # Neither daemon signals readiness; the listening socket is the sign.
        deadline = time.monotonic() + READY_TIMEOUT
        assert self.proc is not None
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise BackendError(
                    f"{self.argv[0]} exited with {self.proc.returncode}:\n"
                    + self.log.read_text(errors="replace")[-2000:]
                )
            if time.monotonic() > deadline:
                raise BackendError(
                    f"{self.argv[0]}: no socket {self.socket} after {READY_TIMEOUT:.0f} s"
                )
            time.sleep(0.05)

    def close(self) -> None:
        """End the process by PID: SIGTERM, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)


def vhost_user_blk(prefix: Path, image: Path, socket: Path, log: Path) -> Backend:
    """qemu-storage-daemon exporting `image` (raw) as a vhost-user-blk socket."""
    return Backend(
        [
            str(qemu_tool(prefix, "qemu-storage-daemon")),
            "--blockdev",
            f"driver=file,node-name=file0,filename={image}",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,"
            f"addr.type=unix,addr.path={socket}",
        ],
        socket,
        log,
    )


def vhost_user_bridge(
    prefix: Path, socket: Path, log: Path, local_port: int, remote_port: int
) -> Backend:
    """vhost-user-bridge serving `socket`, its frames on UDP over loopback."""
    return Backend(
        [
            str(prefix / "libexec" / "frozen-tests" / "vhost-user-bridge"),
            "-u",
            str(socket),
            "-l",
            f"127.0.0.1:{local_port}",
            "-r",
            f"127.0.0.1:{remote_port}",
        ],
        socket,
        log,
    )
