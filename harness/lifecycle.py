"""One base for what the harness starts and must always end.

A daemon, a cluster or a backend process: entering starts it, and if
starting fails half-way what did start is closed before the error goes on;
leaving closes it. ``close`` must be safe to call on a half-started or
already closed object. QEMU's launcher (``vm.VM``) follows QEMUMachine's
own protocol instead (launch, shutdown, the crash log).
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self


def _children_of() -> dict[int, list[int]]:
    """Each PID's children, from /proc's parent links."""
    links: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            with open(f"/proc/{entry}/stat") as f:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            links.setdefault(ppid, []).append(int(entry))
    return links


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (orphans adopted by a subreaper included)."""
    return _children_of().get(pid, [])


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    links = _children_of()
    found, todo = [], [pid]
    while todo:
        for child in links.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process group `proc` leads (started with
    start_new_session), children included; gone already is fine.

    A descendant in a group or session of its own (meson test puts each
    test in one) is killed too: first, while `proc` still links to it.
    """
    # A process may fork while we kill; after three rounds what is left
    # was started faster than SIGKILL lands, which no round would catch.
    for _ in range(3):
        below = _descendants(proc.pid)
        if not below:
            break
        groups = set()
        for pid in below:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                groups.add(os.getpgid(pid))
        groups.discard(os.getpgrp())  # never the harness's own group
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Finished:
    """What a test process printed and how it ended (returncode None: timed out)."""

    returncode: int | None
    stdout: str
    stderr: str


def run_group(cmd: list[str], *, cwd: Path | None, env: dict[str, str], timeout: float) -> Finished:
    """Run `cmd` in its own process group and end the whole group after it.

    iotests and qtests start QEMU, qemu-storage-daemon and shells of their
    own: on a timeout, or when the gate itself is interrupted, every one of
    them is killed by the group's ID instead of being left running.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return Finished(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        return Finished(None, out, err)
    finally:
        # whatever the test left behind goes with its group, also on an interrupt
        kill_group(proc)
        if proc.returncode is None:
            proc.communicate()


def reap_children(exited: dict[int, int]) -> None:
    """Collect every child that has exited, without waiting, into `exited`
    (PID -> exit code as subprocess reports it). For the PID-1 supervisors
    of a namespace, which must reap whatever is re-parented to them."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exited[pid] = os.waitstatus_to_exitcode(status)


class Started(abc.ABC):
    """A context manager that starts on enter and always closes."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
