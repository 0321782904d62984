"""Unit tests for harness.vm: argument building, event matching, and the
launcher's process/QMP/console plumbing against a tiny fake QEMU (no KVM)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from harness import vm as vmmod
from harness.vm import VM, VMCommandError, VMDied, VMError, VMLaunchError, VMPaths, VMTimeout

FAKE_QEMU = (
    textwrap.dedent(r'''
    #!PYTHON
    """A fake qemu-system: speaks enough QMP and writes to the console socket."""
    import json, os, socket, sys, time
    args = sys.argv[1:]
    socks = {}
    for i, a in enumerate(args):
        if a == "-chardev":
            opts = dict(kv.split("=", 1) for kv in args[i + 1].split(",")[1:])
            ident = [kv for kv in args[i + 1].split(",") if kv.startswith("id=")][0][3:]
            socks[ident] = opts["path"]
    mode = os.environ.get("FAKE_MODE", "")
    TS = {"seconds": 0, "microseconds": 0}
    if mode == "die":
        print("fake: bad option", file=sys.stderr)
        sys.exit(1)
    con = socket.socket(socket.AF_UNIX); con.connect(socks["console"])
    con.sendall(b"boot\r\n")
    mon = socket.socket(socket.AF_UNIX); mon.connect(socks["qmp"])
    def send(o):
        mon.sendall(json.dumps(o).encode() + b"\n")
    def requests():
        # QMP input is a JSON stream, not lines.
        buf, dec = "", json.JSONDecoder()
        while True:
            data = mon.recv(4096)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    obj, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield obj
    send({"QMP": {"version": {}, "capabilities": []}})
    if mode == "late-die":
        # Like a lock conflict: the monitor connects, then an option fails.
        print("fake: Failed to get write lock", file=sys.stderr)
        sys.exit(1)
    status = "running"
    for req in requests():
        ex, rid = req.get("execute"), req.get("id")
        if ex == "qmp_capabilities":
            send({"return": {}, "id": rid})
            # An event emitted before the client issues any command of its own.
            send({"event": "EARLY", "data": {"n": 1}, "timestamp": TS})
        elif ex == "query-status":
            send({"return": {"status": status, "running": status == "running"}, "id": rid})
        elif ex == "stop":
            status = "paused"
            send({"return": {}, "id": rid})
            send({"event": "STOP", "timestamp": TS})
            con.sendall(b"stopped 42\r\n")
        elif ex == "crash":
            # QEMU aborting in the middle of a command: no reply, socket closed.
            os._exit(134)
        elif ex == "echo":
            send({"return": req.get("arguments", {}), "id": rid})
        elif ex == "quit":
            if mode == "stubborn":
                send({"return": {}, "id": rid})
                continue
            send({"return": {}, "id": rid})
            sys.exit(0)
        else:
            err = {"class": "CommandNotFound", "desc": f"The command {ex} has not been found"}
            send({"error": err, "id": rid})
''')
    .lstrip()
    .replace("#!PYTHON", "#!" + sys.executable)
)


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    p = tmp_path / "qemu-system-x86_64"
    p.write_text(FAKE_QEMU)
    p.chmod(0o755)
    return p


def test_build_command_plumbing_first_then_args(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path, tmp_path)
    cmd = vmmod.build_command(
        Path("/p/bin/qemu"), paths, ["-m", "64"], name="t", accel="kvm", firmware_dirs=[Path("/fw")]
    )
    assert cmd[0] == "/p/bin/qemu"
    assert cmd[-2:] == ["-m", "64"]
    assert f"socket,id=qmp,path={tmp_path}/qmp.sock" in cmd
    assert cmd[cmd.index("-serial") + 1] == "chardev:console"
    assert cmd[cmd.index("-accel") + 1] == "kvm"
    assert cmd[cmd.index("-L") + 1] == "/fw"
    assert "-nodefaults" in cmd


def test_build_command_console_kinds(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path, tmp_path)
    dbg = vmmod.build_command(Path("q"), paths, [], console="debugcon", accel=None)
    assert "isa-debugcon,iobase=0x402,chardev=console" in dbg
    assert "-serial" not in dbg and "-accel" not in dbg
    none = vmmod.build_command(Path("q"), paths, [], console="none")
    assert not any("id=console" in a for a in none)
    with pytest.raises(ValueError):
        vmmod.build_command(Path("q"), paths, [], console="vga")


def test_event_matches_recursive_subset() -> None:
    ev = {"event": "FROZEN", "data": {"reason": "watchdog", "extra": {"a": 1}}}
    assert vmmod.event_matches(ev, "FROZEN", None)
    assert vmmod.event_matches(ev, "FROZEN", {"data": {"reason": "watchdog"}})
    assert vmmod.event_matches(ev, None, {"data": {"extra": {"a": 1}}})
    assert not vmmod.event_matches(ev, "STOP", None)
    assert not vmmod.event_matches(ev, "FROZEN", {"data": {"reason": "guest-panic"}})
    assert not vmmod.event_matches(ev, "FROZEN", {"data": {"missing": 1}})
    assert not vmmod.event_matches(ev, "FROZEN", {"data": {"reason": {"x": 1}}})


def test_convert_keys() -> None:
    assert vmmod.convert_keys({"node_name": "a", "id": 1}) == {"node-name": "a", "id": 1}


def test_launch_events_console_cmd_and_quit(fake_qemu: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    with VM(fake_qemu, name="unit", log_dir=logs, accel=None) as vm:
        # The event sent right after negotiation is not lost.
        assert vm.event_wait("EARLY", timeout=5)["data"] == {"n": 1}
        assert vm.status() == "running"
        assert vm.cmd("echo", {"a_b": 1}, c_d=2) == {"a_b": 1, "c-d": 2}
        vm.cmd("stop")
        assert vm.event_wait("STOP", timeout=5)["event"] == "STOP"
        m = vm.wait_for_console(r"stopped (\d+)", timeout=5)
        assert m.group(1) == "42"
        with pytest.raises(VMTimeout):
            vm.event_wait("STOP", timeout=0.3)  # already consumed
        assert len(vm.events("STOP")) == 1
        err = vm.try_cmd("cont")
        assert isinstance(err, VMCommandError)
        assert err.error_class == "CommandNotFound" and "cont" in err.desc
        with pytest.raises(VMCommandError) as ei:
            vm.cmd("bogus", x=1)
        assert ei.value.arguments == {"x": 1}
        pid = vm.pid
    assert vm.exitcode == 0 and not vm.hard_killed
    assert not Path(f"/proc/{pid}").exists()
    assert "boot" in (logs / "console.log").read_text()
    assert "query-status" in (logs / "qmp.log").read_text()


def test_stubborn_qemu_is_killed(fake_qemu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "stubborn")
    vm = VM(fake_qemu, name="stubborn", accel=None)
    vm.launch()
    pid = vm.pid
    vm.shutdown(timeout=1)
    assert vm.hard_killed and vm.exitcode == -9
    assert not Path(f"/proc/{pid}").exists()
    # Failed shutdown keeps the logs.
    assert vm.paths.qemu_log.exists()


def test_launch_failure_reports_stderr(fake_qemu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "die")
    vm = VM(fake_qemu, name="dies", accel=None)
    with pytest.raises(VMLaunchError, match="bad option"):
        vm.launch(timeout=10)
    assert vm.exitcode == 1


def test_failure_after_monitor_connected(fake_qemu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "late-die")
    vm = VM(fake_qemu, name="late", accel=None)
    with pytest.raises(VMLaunchError, match="write lock") as ei:
        vm.launch(timeout=10)
    # The command line logged on top of qemu.log is not part of the message.
    assert "-nodefaults" not in str(ei.value)
    assert vm.exitcode == 1


def test_waits_notice_exit(fake_qemu: Path) -> None:
    with VM(fake_qemu, name="exits", accel=None) as vm:
        vm.cmd("quit")
        assert vm.wait_for_exit(5) == 0
        with pytest.raises(VMDied):
            vm.event_wait("NEVER", timeout=5)
        with pytest.raises(VMDied):
            vm.wait_for_console("never", timeout=5)


def test_sockets_removed_after_clean_shutdown(fake_qemu: Path) -> None:
    with VM(fake_qemu, name="clean", accel=None) as vm:
        sock_dir = vm.paths.sock_dir
        assert os.path.exists(sock_dir)
    assert not os.path.exists(sock_dir)


def test_qemu_dying_during_a_command_is_vmdied(fake_qemu: Path) -> None:
    """qemu.qmp's own EOF/disconnect errors never leak out of VM.cmd."""
    with VM(fake_qemu, name="crash", accel=None) as vm:
        with pytest.raises(VMDied, match="rc=134"):
            vm.cmd("crash")
        assert not vm.is_running()
        # Later commands are launcher errors too, not qemu.qmp StateError.
        with pytest.raises(VMError):
            vm.status()
        with pytest.raises(VMError):
            vm.try_cmd("cont")
    assert vm.exitcode == 134
