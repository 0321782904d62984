"""bench: the pure parts (stats, targets, tables), the lean QMP client against a
fake server, and the standby against a real lock held by the test (no VM)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import bench, cli, observe


def _ofd_lock(fd: int, kind: int, start: int, length: int = 1) -> None:
    fcntl.fcntl(
        fd, observe._F_OFD_SETLK, struct.pack(observe._FLOCK, kind, os.SEEK_SET, start, length, 0)
    )


def test_image_locked_sees_a_qemu_style_permission_lock(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 4096)
    assert not observe.image_locked(image)
    # QEMU takes shared locks on one byte per permission, as another
    # open file description does here.
    fd = os.open(image, os.O_RDWR)
    try:
        _ofd_lock(fd, fcntl.F_RDLCK, 201)
        assert observe.image_locked(image)
        _ofd_lock(fd, fcntl.F_UNLCK, 201)
        assert not observe.image_locked(image)
        _ofd_lock(fd, fcntl.F_RDLCK, 50)  # outside QEMU's lock bytes
        assert not observe.image_locked(image)
    finally:
        os.close(fd)


def test_wait_unlocked_measures_from_the_given_moment(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 512)
    elapsed = observe.wait_unlocked(image, since=observe.time.monotonic() - 0.25)
    assert 0.25 <= elapsed < 5


# -- statistics, ratios, targets ---------------------------------------------------


def test_stat_of_samples() -> None:
    stat = bench.Stat.of([0.003, 0.001, 0.002])
    assert (stat.median, stat.min, stat.max, stat.n) == (0.002, 0.001, 0.003, 3)
    assert stat.ms().strip().startswith("2.0 ms [1.0-3.0]")
    assert stat.md() == "2.00 (1.00-3.00)"
    assert bench.Stat.of([0.25, 0.5]).md() == "375.0 (250.0-500.0)"


def test_stat_survives_json() -> None:
    stat = bench.Stat.of([0.004, 0.002])
    again = bench.Stat.load(json.loads(json.dumps(bench._jsonable(stat))))
    assert again == stat
    assert bench.Stat.load(stat) is stat


def test_stat_or_none_skips_missing_samples() -> None:
    assert bench.stat_or_none([None, None]) is None
    assert bench.stat_or_none([None, 0.5]) == bench.Stat(0.5, 0.5, 0.5, 1)


def test_ratio_of_medians_and_missing_values() -> None:
    a, b = bench.Stat.of([0.2]), bench.Stat.of([0.1])
    assert bench.ratio(a, b) == pytest.approx(2.0)
    assert bench.ratio(bench._jsonable(a), b) == pytest.approx(2.0)
    assert bench.ratio(None, b) is None
    assert bench.ratio(a, None) is None
    assert bench.ratio(a, bench.Stat.of([0.0])) is None


@pytest.mark.parametrize(
    ("value", "limit", "met", "verdict"),
    [
        (1.0, 1.1, True, "met"),
        (1.1, 1.1, True, "met"),
        (1.2, 1.1, False, "not met"),
        (None, 1.1, None, "pending"),
        (1.0, None, None, "pending"),
    ],
)
def test_target_verdict(
    value: float | None, limit: float | None, met: bool | None, verdict: str
) -> None:
    t = bench.Target("x", value, limit)
    assert t.met is met
    assert t.verdict == verdict
    assert verdict in t.line()


def _s(*ms: float) -> bench.Stat:
    return bench.Stat.of([m / 1e3 for m in ms])


def _block(freeze: float, stop: float | None, script: float, lock: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "freeze": {"latency": _s(freeze), "floor": _s(0.15), "lock_free": _s(lock)},
        "script": {"latency": _s(script), "floor": _s(0.15), "lock_free": _s(script)},
    }
    if stop is not None:
        out["stop"] = {"latency": _s(stop), "floor": _s(0.15), "lock_free": None}
    return out


def _result() -> dict[str, Any]:
    mirror = _block(300, 100, 120, 290)
    mirror["stop"].update(mid_copy=1, job_offset_frac=[0.4], attempts=1)
    mirror["script-cancel"] = {"latency": _s(110), "floor": _s(0.15), "lock_free": _s(111)}
    return {
        "accel": "kvm",
        "reps": 1,
        "stock_prefix": "/s",
        "frozen_prefix": "/f",
        "harness_floor": _s(1.5),
        "idle": _block(1.0, 1.0, 2.0, 0.9),
        "scaling": {
            "disks": {"raw": {1: _block(1.0, None, 2.0, 1.0), 24: _block(4.0, None, 20.0, 4.0)}},
            "nics": {4: _block(1.0, None, 2.5, 1.0)},
        },
        "memory": {
            "curve": {
                512: {"freeze": _s(1.0), "dump": _s(300)},
                8192: {"freeze": _s(1.1), "dump": _s(5000)},
            }
        },
        "load": {"mirror": mirror},
        "failover": {"panic": {"freeze": _s(3), "pause_then_quit": _s(30)}},
        "steady": {
            "window_s": 60.0,
            "cpu_s_running": 1.0,
            "cpu_s_frozen": 0.01,
            "cpu_s_stock_stopped": 0.02,
            "rss_kib_running": 100,
            "rss_kib_frozen": 100,
            "rss_kib_stock_stopped": 99,
        },
        "pacemaker": None,
    }


def _verdicts(result: dict[str, Any]) -> dict[str, str]:
    return {t.name: t.verdict for t in bench.targets(result)}


@pytest.mark.parametrize("via_json", [False, True])
def test_targets_from_a_result(via_json: bool) -> None:
    result = _result()
    if via_json:
        result = json.loads(json.dumps(bench._jsonable(result)))
    v = _verdicts(result)
    assert v["freeze <= 1.1x stop, idle"] == "met"  # 1.0 / 1.0
    assert v["lock free <= freeze, idle"] == "met"  # 0.9 / 1.0
    assert v["freeze <= 1.2x stop, mirror"] == "not met"  # 300 / 100
    assert v["lock free <= freeze, mirror"] == "met"
    assert v["freeze(24)/freeze(1) <= script, raw"] == "met"  # 4 <= 10
    assert v["freeze flat in RAM"] == "met"  # 1.1 / 1.0 <= 1.2
    assert v["failover frozen <= stock (Pacemaker)"] == "pending"
    values = {t.name: t.value for t in bench.targets(result)}
    assert values["freeze <= 1.2x stop, mirror"] == pytest.approx(3.0)
    assert values["freeze(24)/freeze(1) <= script, raw"] == pytest.approx(4.0)


def test_targets_not_met_and_pacemaker_hook() -> None:
    result = _result()
    result["idle"] = _block(1.2, 1.0, 2.0, 1.3)
    result["memory"]["curve"][8192]["freeze"] = _s(2.0)
    result["scaling"]["disks"]["raw"][24] = _block(30.0, None, 20.0, 30.0)
    result["pacemaker"] = {"frozen": _s(4000), "stock": _s(9000), "memory_kept": True}
    v = _verdicts(result)
    assert v["freeze <= 1.1x stop, idle"] == "not met"
    assert v["lock free <= freeze, idle"] == "not met"
    assert v["freeze flat in RAM"] == "not met"
    assert v["freeze(24)/freeze(1) <= script, raw"] == "not met"  # 30 > 10
    assert v["failover frozen <= stock (Pacemaker)"] == "met"


def test_targets_of_a_partial_run() -> None:
    assert _verdicts({"accel": "kvm", "reps": 1}) == {
        "failover frozen <= stock (Pacemaker)": "pending"
    }


def test_summarize_samples() -> None:
    samples = [
        {
            "latency": 0.002,
            "floor": 0.0001,
            "lock_free": 0.0021,
            "mid_copy": True,
            "job_offset_frac": 0.5,
            "attempts": 1,
        },
        {
            "latency": 0.004,
            "floor": 0.0003,
            "lock_free": None,
            "lock_error": "standby silent",
            "mid_copy": False,
            "job_offset_frac": 1.0,
            "attempts": 3,
        },
        {"latency": None, "floor": 0.0002, "error": "blockdev-set-active: GenericError: no"},
    ]
    out = bench.summarize(samples)
    assert out["latency"] == bench.Stat(0.003, 0.002, 0.004, 2)
    assert out["floor"].median == pytest.approx(0.0002)
    assert out["lock_free"] == bench.Stat(0.0021, 0.0021, 0.0021, 1)
    assert out["errors"] == ["blockdev-set-active: GenericError: no", "standby silent"]
    assert out["mid_copy"] == 1
    assert out["job_offset_frac"] == [0.5, 1.0, None]
    assert out["attempts"] == 5


# -- rendering ------------------------------------------------------------------


@pytest.mark.parametrize("via_json", [False, True])
def test_readme_table_from_the_json(via_json: bool) -> None:
    result = _result()
    if via_json:
        result = json.loads(json.dumps(bench._jsonable(result)))
    md = bench.readme_table(result)
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| state |"))
    assert lines[header + 1].startswith("|---|")
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| ")}
    idle = rows["| idle, 1 raw disk, 1 NIC"].split(" | ")
    assert idle[1:5] == ["1.00 (1.00-1.00)", "1.00 (1.00-1.00)", "2.00 (2.00-2.00)", "1.00"]
    assert idle[-1] == "0.15 |"
    assert rows["| scaling: 24 raw disks"].split(" | ")[2] == "n/a"  # no stop measured
    assert "| scaling: 4 NICs |" in md
    assert (
        "| mirror | 300.0 (300.0-300.0) | 100.0 (100.0-100.0) | 120.0 (120.0-120.0) | "
        "110.0 (110.0-110.0) | 3.00 | 290.0 (290.0-290.0) | 120.0 (120.0-120.0) | "
        "111.0 (111.0-111.0) | 1/1 | 0.15 |" in md
    )
    assert "| 8192 MB | 1.10 (1.10-1.10) | 5000 (5000-5000) | n/a |" in md
    assert "| panic | 3.00 (3.00-3.00) | 30.0 (30.0-30.0) |" in md
    assert "| freeze <= 1.2x stop, mirror | 3.000 | 1.200 | not met |" in md
    assert "| failover frozen <= stock (Pacemaker) | n/a | n/a | pending |" in md
    # Every table row has as many cells as its header.
    for line in lines:
        if line.startswith("|"):
            start = (
                max(
                    i
                    for i in range(len(lines[: lines.index(line) + 1]))
                    if not lines[i].startswith("|")
                )
                + 1
            )
            assert line.count("|") == lines[start].count("|"), line


@pytest.mark.parametrize("via_json", [False, True])
def test_text_table_puts_floor_and_targets_beside_figures(via_json: bool) -> None:
    result = _result()
    if via_json:
        result = json.loads(json.dumps(bench._jsonable(result)))
    text = bench.table(result)
    assert "harness qemu.qmp client floor" in text
    freeze_line = next(line for line in text.splitlines() if "freeze (frozen QEMU)" in line)
    assert "floor 0.15 ms" in freeze_line and "lock free" in freeze_line
    assert "mid-copy 1/1 (at 0.40)" in text
    assert "freeze <= 1.2x stop, mirror" in text and "not met" in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    bench.plot(json.loads(json.dumps(bench._jsonable(_result()))), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_lists_match_the_module() -> None:
    p = cli.parser()
    args = p.parse_args(["bench", "--sections", "idle", "--loads", "writes"])
    assert args.sections == ["idle"]
    full = p.parse_args(["bench"])
    assert tuple(full.sections) == bench.SECTIONS
    assert tuple(full.loads) == bench.LOADS


def test_layout_args_for_nics_and_ram(tmp_path: Path) -> None:
    args = bench.layout_args(bench.Layout(nics=3, ram_mb=2048), tmp_path, tmp_path)
    assert args.count("-netdev") == 2
    assert "virtio-net-pci,netdev=net2,id=nic2,romfile=" in args
    assert args[-3:] == ["-m", "2048", "-mem-prealloc"]
    assert bench.nic_ids(bench.Layout(nics=3)) == ["nic0", "nic1", "nic2"]


# -- the lean QMP client against a fake server ------------------------------------


class FakeQMP:
    """A QMP server on a unix socket that answers from a script of handlers."""

    def __init__(self, path: Path, handler: Callable[[dict[str, Any]], list[bytes]]):
        self.path = path
        self.handler = handler
        self.received: list[dict[str, Any]] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    req = json.loads(line)
                    self.received.append(req)
                    for chunk in self.handler(req):
                        conn.sendall(chunk)
                        time.sleep(0.001)  # separate reads on the client side

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)


def _reply(req: dict[str, Any], value: Any = None) -> bytes:
    return json.dumps({"return": {} if value is None else value, "id": req["id"]}).encode()


def _event(name: str) -> bytes:
    return json.dumps(
        {"event": name, "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}
    ).encode()


def _handler(req: dict[str, Any]) -> list[bytes]:
    name = req["execute"]
    if name == "freeze":
        # Reply split across writes, the event in the same write as its tail.
        whole = _reply(req) + b"\r\n" + _event("FROZEN") + b"\r\n"
        return [whole[:5], whole[5:20], whole[20:]]
    if name == "stop":
        # An event before the reply: kept, and the reply still found by id.
        return [_event("STOP") + b"\r\n" + _reply(req) + b"\r\n"]
    if name == "bad":
        err = {"error": {"class": "GenericError", "desc": "nope"}, "id": req["id"]}
        return [json.dumps(err).encode() + b"\r\n"]
    if name == "query-status":
        return [_reply(req, {"status": "running", "running": True}) + b"\r\n"]
    if name == "quiet":
        return []
    return [_reply(req) + b"\r\n"]


@pytest.fixture
def fake_qmp(tmp_path: Path) -> Iterator[tuple[FakeQMP, bench.LeanQMP]]:
    server = FakeQMP(tmp_path / "q", _handler)
    client = bench.LeanQMP(tmp_path / "q", timeout=5)
    try:
        yield server, client
    finally:
        client.close()
        server.close()


def test_lean_qmp_negotiates_and_numbers_commands(
    fake_qmp: tuple[FakeQMP, bench.LeanQMP],
) -> None:
    server, client = fake_qmp
    assert "QMP" in client.greeting
    assert client.execute("query-status") == {"status": "running", "running": True}
    assert [r["execute"] for r in server.received] == ["qmp_capabilities", "query-status"]
    assert [r["id"] for r in server.received] == [1, 2]
    client.execute("set_link", {"name": "nic0", "up": False})
    assert server.received[-1]["arguments"] == {"name": "nic0", "up": False}
    assert "arguments" not in server.received[1]


def test_lean_qmp_framing_split_reply_and_event_after(
    fake_qmp: tuple[FakeQMP, bench.LeanQMP],
) -> None:
    _, client = fake_qmp
    cid, start = client.send("freeze")
    assert client.reply("freeze", cid, 5)[0] == {}
    at, ev = client.wait_event("FROZEN", 5, after=start)
    assert ev["event"] == "FROZEN" and at >= start


def test_lean_qmp_keeps_events_before_the_reply(
    fake_qmp: tuple[FakeQMP, bench.LeanQMP],
) -> None:
    _, client = fake_qmp
    took, value = client.timed("stop")
    assert value == {} and 0 < took < 5
    assert [e["event"] for _, e in client.events] == ["STOP"]
    at, _ = client.wait_event("STOP", 0.5)
    with pytest.raises(TimeoutError):
        client.wait_event("STOP", 0.2, after=at + 1e-6)  # only one STOP arrived


def test_lean_qmp_errors_and_timeouts(fake_qmp: tuple[FakeQMP, bench.LeanQMP]) -> None:
    _, client = fake_qmp
    with pytest.raises(bench.LeanQMPError, match="bad: GenericError: nope"):
        client.execute("bad")
    with pytest.raises(TimeoutError):
        client.execute("quiet", timeout=0.2)


def test_lean_qmp_floor(fake_qmp: tuple[FakeQMP, bench.LeanQMP]) -> None:
    server, client = fake_qmp
    floor = client.floor(samples=3)
    assert 0 < floor < 1
    assert [r["execute"] for r in server.received].count("query-status") == 3


# -- the standby against a real lock ------------------------------------------------


def test_blocked_waiters_parses_proc_locks(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0")
    ident = observe.lock_id(image)
    text = (
        f"1: OFDLCK  ADVISORY  READ  -1 {ident} 101 101\n"
        f"1: -> OFDLCK ADVISORY  WRITE -1 {ident} 101 101\n"
        f"2: -> OFDLCK ADVISORY  WRITE -1 {ident}9 101 101\n"  # another inode
    )
    assert observe.blocked_waiters(image, text) == 1


def test_standby_waits_for_a_held_lock_and_stamps_its_own_clock(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 4096)
    fd = os.open(image, os.O_RDWR)
    try:
        # As QEMU does with share-rw=on: a shared lock on "I use write".
        _ofd_lock(fd, fcntl.F_RDLCK, observe.WRITE_LOCK_BYTES[0])
        with observe.Standby(image) as sb:
            sb.start()  # returns only once the child is blocked in the kernel
            assert observe.blocked_waiters(image) == 1
            time.sleep(0.1)
            released = time.monotonic()
            _ofd_lock(fd, fcntl.F_UNLCK, observe.WRITE_LOCK_BYTES[0])
            got = sb.acquired(5)
            assert released <= got < released + 2
            # The standby now holds the bytes a writer needs.
            assert observe.image_locked(image)
            pid = sb.proc.pid if sb.proc else None
        assert pid is not None
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
        assert not observe.image_locked(image)
    finally:
        os.close(fd)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


def test_standby_refuses_a_lock_that_was_not_held(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 512)
    with observe.Standby(image) as sb, pytest.raises(observe.StandbyError, match="not held"):
        sb.start()
    assert sb.proc is None  # ended on the way out


def test_standby_times_out_when_the_lock_stays(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 512)
    fd = os.open(image, os.O_RDWR)
    try:
        _ofd_lock(fd, fcntl.F_RDLCK, observe.WRITE_LOCK_BYTES[1])
        with observe.Standby(image) as sb:
            sb.start()
            with pytest.raises(observe.StandbyError, match="silent"):
                sb.acquired(0.3)
    finally:
        os.close(fd)


def test_readme_table_marks_a_command_that_always_failed() -> None:
    result = _result()
    backup = _block(9.0, 1.0, 1.0, 4.0)
    backup["script"] = {
        "latency": None,
        "floor": _s(0.15),
        "lock_free": None,
        "errors": ["script: blockdev-set-active: GenericError: nope"],
    }
    result["load"]["backup"] = backup
    md = bench.readme_table(json.loads(json.dumps(bench._jsonable(result))))
    assert (
        "| backup | 9.00 (9.00-9.00) | 1.00 (1.00-1.00) | failed [1] | n/a | 9.00 | "
        "4.00 (4.00-4.00) | failed [1] | n/a | n/a | 0.15 |" in md
    )
    assert "\n\n[1] script: blockdev-set-active: GenericError: nope\n" in md
    assert "[2]" not in md


def test_add_pacemaker_fills_the_hook_and_the_target(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench._jsonable(_result())))
    result = bench.add_pacemaker(path, [4.0, 5.0, 6.0], [9.0, 10.0], memory_kept=True)
    assert bench.Stat.load(result["pacemaker"]["frozen"]).median == 5.0
    assert _verdicts(result)["failover frozen <= stock (Pacemaker)"] == "met"
    assert {t["name"]: t["met"] for t in result["targets"]}[
        "failover frozen <= stock (Pacemaker)"
    ] is True
    md = (tmp_path / "README-table.md").read_text()
    assert "| guest failure | 5.0 s (4.0-6.0) | 9.5 s (9.0-10.0) | True |" in md


class _Run:
    """The fields of failover.FailoverResult that the pacemaker block reads."""

    def __init__(self, seconds: float | None, kept: bool, serving: bool) -> None:
        self.failover_s = seconds
        self.memory_kept = kept
        self.disk_opened_on_node2 = serving


def test_pacemaker_block_rows_targets_and_tables() -> None:
    rows = {
        "frozen": [_Run(7.0, True, True), _Run(8.0, True, True), _Run(None, True, False)],
        "stock": [_Run(6.0, False, True), _Run(7.0, False, True)],
        "stock_preserve": [_Run(10.0, False, True)],
    }
    pm = bench.pacemaker_result(rows)
    assert bench.Stat.load(pm["frozen"]).median == 7.5  # the run that never served is left out
    assert pm["rows"]["frozen"]["failed_over"] == 2 and pm["rows"]["frozen"]["runs"] == 3
    assert pm["memory_kept"] is True
    assert pm["rows"]["stock"]["memory_kept"] == 0
    result = _result()
    result["pacemaker"] = json.loads(json.dumps(bench._jsonable(pm)))
    v = _verdicts(result)
    assert v["failover frozen <= stock (Pacemaker)"] == "not met"  # 7.5 / 6.5
    assert v["failover frozen <= stock preserve (Pacemaker)"] == "met"
    md = bench.readme_table(result)
    assert "| frozen | freeze | frozen | 7.5 s (7.0-8.0) | 2/3 | 3/3 | 2/3 |" in md
    assert "| stock | preserve | stock | 10.0 s (10.0-10.0) | 1/1 | 0/1 | 1/1 |" in md
    assert "memory kept 0/2" in bench.table(result)


def test_pacemaker_block_of_a_row_that_never_ran() -> None:
    pm = bench.pacemaker_result({"frozen": [], "stock": []})
    assert pm["frozen"] is None and pm["memory_kept"] is False
    assert pm["rows"]["stock_preserve"]["runs"] == 0


def test_flat_in_ram_looks_at_every_size_and_partial_blocks_are_pending() -> None:
    result = _result()
    result["memory"]["curve"] = {
        512: {"freeze": _s(1.0)},
        2048: {"freeze": _s(3.0)},
        8192: {"freeze": _s(1.1)},
    }
    del result["idle"]["stop"]
    targets = {t.name: t for t in bench.targets(result)}
    assert targets["freeze flat in RAM"].value == pytest.approx(3.0)
    assert targets["freeze flat in RAM"].verdict == "not met"
    assert "2048 MB" in targets["freeze flat in RAM"].detail
    assert targets["freeze <= 1.1x stop, idle"].verdict == "pending"
