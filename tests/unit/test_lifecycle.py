"""lifecycle: a process group's end reaches what left the group."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from harness import lifecycle
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


def test_run_group_kills_what_the_test_started(tmp_path: Path) -> None:
    """A timed-out test's own children (a QEMU, a daemon) die with it."""
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; echo started; sleep 300"
    r = lifecycle.run_group(["sh", "-c", script], cwd=None, env=dict(os.environ), timeout=1.0)
    assert r.returncode is None
    assert "started" in r.stdout
    child = int(pidfile.read_text())
    # A SIGKILLed task still shows R until it has run its exit; gone or a
    # zombie within a few seconds, or it was not killed at all.
    state = "?"
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z"):
            break
        time.sleep(0.05)
    assert state in ("gone", "Z"), f"child {child} still running ({state})"


def test_run_group_returns_output_and_status() -> None:
    r = lifecycle.run_group(
        ["sh", "-c", "echo out; echo err >&2; exit 3"], cwd=None, env=dict(os.environ), timeout=10.0
    )
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
