"""lifecycle: a process group's end reaches what left the group."""

from __future__ import annotations

import os
import subprocess
import time

from harness.lifecycle import kill_group


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_group_reaches_a_child_in_a_session_of_its_own() -> None:
    """meson test runs each test with setsid: killing meson's group alone
    left migration-test and its QEMUs running for hours."""
    proc = subprocess.Popen(
        ["sh", "-c", "setsid sleep 300 & echo $!; sleep 300"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    escaped = int(proc.stdout.readline())
    try:
        deadline = time.monotonic() + 10
        while os.getsid(escaped) != escaped:  # setsid has run
            assert time.monotonic() < deadline
            time.sleep(0.01)
        kill_group(proc)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(escaped):
            assert time.monotonic() < deadline, "the setsid child survived"
            time.sleep(0.05)
    finally:
        if _alive(escaped):
            os.kill(escaped, 9)
        proc.kill()
        proc.wait()
