"""Unit tests for the pure parts of harness.fuzz: argument generation from a
small synthetic schema, HMP help parsing and shapes, the invariant verdicts,
the lock probe and the report."""

from __future__ import annotations

import fcntl
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness import fuzz, observe

IMAGES = [Path("/img/disk.raw"), Path("/img/ovl.qcow2")]


def values() -> fuzz.RigValues:
    return fuzz.RigValues(
        nodes=["disk0", "ovl0", "base0"],
        block_devices=["vblk0", "ide0"],
        nics=["nic0"],
        netdevs=["net0", "unet0"],
        chardevs=["fuzzchr0"],
        images=list(IMAGES),
        snapshots=["snap0"],
    )


def _cmd(name: str, arg_type: str | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"name": name, "meta-type": "command", "ret-type": "0"}
    if arg_type:
        e["arg-type"] = arg_type
    return e


def _obj(name: str, *members: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "meta-type": "object", "members": list(members), **extra}


def _m(name: str, tname: str, optional: bool = False) -> dict[str, Any]:
    m = {"name": name, "type": tname}
    if optional:
        m["default"] = None
    return m


#: A schema in the shape query-qmp-schema answers (type names masked).
SCHEMA: list[dict[str, Any]] = [
    {"name": "str", "meta-type": "builtin", "json-type": "string"},
    {"name": "int", "meta-type": "builtin", "json-type": "int"},
    {"name": "bool", "meta-type": "builtin", "json-type": "boolean"},
    {"name": "0", "meta-type": "object", "members": []},
    {"name": "10", "meta-type": "enum", "values": ["top", "full", "none"]},
    _obj("11", _m("node-name", "str"), _m("size", "int", True), _m("sync", "10", True)),
    _cmd("block-thing", "11"),
    # a flat union: driver file | raw | exec (exec is never generated)
    {"name": "20", "meta-type": "enum", "values": ["exec", "file", "raw"]},
    _obj("21", _m("filename", "str")),
    {"name": "22", "meta-type": "alternate", "members": [{"type": "23"}, {"type": "str"}]},
    _obj("24", _m("file", "22")),
    _obj("25", _m("args", "[str]")),
    _obj(
        "23",
        _m("driver", "20"),
        _m("node-name", "str", True),
        tag="driver",
        variants=[
            {"case": "file", "type": "21"},
            {"case": "raw", "type": "24"},
            {"case": "exec", "type": "25"},
        ],
    ),
    {"name": "[str]", "meta-type": "array", "element-type": "str"},
    _cmd("blockdev-add", "23"),
    _cmd("blockdev-create", "23"),
    _obj("30", _m("target", "str"), _m("device", "str")),
    _cmd("drive-mirror", "30"),
    _cmd("query-status"),
    _cmd("quit"),
    _obj("40", _m("name", "str"), _m("up", "bool")),
    _cmd("set_link", "40"),
    {"name": "50", "meta-type": "enum", "values": ["iothread", "secret"]},
    _obj("51", _m("poll-max-ns", "int", True)),
    _obj("52", _m("data", "str", True)),
    _obj(
        "53",
        _m("qom-type", "50"),
        _m("id", "str"),
        tag="qom-type",
        variants=[{"case": "iothread", "type": "51"}, {"case": "secret", "type": "52"}],
    ),
    _cmd("object-add", "53"),
    _cmd("cont"),
]


@pytest.fixture
def gen() -> fuzz.ArgGenerator:
    return fuzz.ArgGenerator(SCHEMA, values())


def _strings(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj]


def test_required_args_always_filled_and_real_names_used(gen: fuzz.ArgGenerator) -> None:
    sets = gen.arg_sets("block-thing")
    assert all("node-name" in s for s in sets)
    names = {s["node-name"] for s in sets}
    # Every real node, the devices, the snapshot, and the garbage value.
    assert {"disk0", "ovl0", "base0", "vblk0", "snap0", fuzz.GARBAGE} <= names
    assert sets[0] == {"node-name": "disk0"}, "the default names the rig's disk"


def test_optional_args_and_every_enum_value(gen: fuzz.ArgGenerator) -> None:
    sets = gen.arg_sets("block-thing")
    assert any("size" in s and "sync" in s for s in sets), "an all-optional variant"
    assert {s["sync"] for s in sets if "sync" in s} == {"top", "full", "none"}
    assert {s["size"] for s in sets if "size" in s} == set(fuzz.INT_POOLS["size"])


def test_union_covers_every_case_but_the_skipped(gen: fuzz.ArgGenerator) -> None:
    sets = gen.arg_sets("blockdev-add")
    drivers = {s["driver"] for s in sets}
    assert {"file", "raw"} <= drivers
    assert "exec" not in drivers, "cases that run host programs are never generated"
    assert sets[0]["driver"] == "raw", "the preferred case is the default"
    for s in sets:
        if s["driver"] == "file":
            assert "filename" in s
        if s["driver"] == "raw":
            assert "file" in s


def test_nested_reference_is_a_node_name_or_a_file_node(gen: fuzz.ArgGenerator) -> None:
    files = [s["file"] for s in gen.arg_sets("blockdev-add") if s["driver"] == "raw"]
    assert any(isinstance(f, str) and f in values().nodes for f in files)
    nested = [f for f in files if isinstance(f, dict)]
    assert nested and nested[0]["driver"] == "file", "a nested node is a plain file first"


def test_image_paths_only_where_images_are_opened(gen: fuzz.ArgGenerator) -> None:
    images = {str(p) for p in IMAGES}
    opened = [x for s in gen.arg_sets("blockdev-add") for x in _strings(s)]
    assert images <= set(opened), "blockdev-add gets the real images to open"
    created = [x for s in gen.arg_sets("blockdev-create") for x in _strings(s)]
    assert not images & set(created), "a created file is never a rig image"
    assert any(isinstance(x, fuzz.Scratch) for x in created)
    targets = [s["target"] for s in gen.arg_sets("drive-mirror")]
    assert targets and all(isinstance(t, fuzz.Scratch) for t in targets)


def test_created_objects_get_fresh_ids(gen: fuzz.ArgGenerator) -> None:
    sets = gen.arg_sets("object-add")
    # Every type is created under a new id, so none is refused as a duplicate.
    for t in ("iothread", "secret"):
        first = next(s for s in sets if s["qom-type"] == t)
        assert isinstance(first["id"], fuzz.Fresh)
    assert any(s["id"] == "vblk0" for s in sets), "duplicates of real ids are tried too"
    frig = SimpleNamespace(
        rig=SimpleNamespace(vm=SimpleNamespace(binary="qemu")),
        scratch=Path("/nonexistent"),
        sock_dir=Path("/nonexistent"),
        not_proven=[],
    )
    fz = fuzz._Fuzzer(frig, "frozen", 1.0, None, None)  # type: ignore[arg-type]
    ids = {fz.materialize(fuzz.Fresh(), "object-add") for _ in range(3)}
    assert len(ids) == 3 and not ids & set(values().names())


def test_extra_sets_aim_at_the_attack_paths(gen: fuzz.ArgGenerator) -> None:
    sets = gen.arg_sets("set_link")
    assert {"name": "nic0", "up": True} in sets
    assert {"name": "net0", "up": True} in sets


def test_no_args_and_json_serialisable(gen: fuzz.ArgGenerator) -> None:
    assert gen.arg_sets("query-status") == [{}]
    for c in gen.commands():
        json.dumps(gen.arg_sets(c), default=repr)


def test_plan_skips_quit_and_orders_prelude(gen: fuzz.ArgGenerator) -> None:
    plan = fuzz.plan_qmp(gen)
    cmds = [p.command for p in plan]
    assert "quit" not in cmds
    assert cmds[0] == "cont", "the classic way out first, on the pristine VM"
    assert cmds[1] == "blockdev-add", "then the setup commands"
    assert cmds.index("set_link") > cmds.index("object-add")
    assert len({c for c in cmds}) == len(gen.commands()) - 1


def test_recursive_types_terminate() -> None:
    # 50 = {child: alternate(50 | str)}: BlockdevRef in BlockdevOptions.
    schema = [
        *SCHEMA[:3],
        {"name": "51", "meta-type": "alternate", "members": [{"type": "50"}, {"type": "str"}]},
        _obj("50", _m("child", "51"), _m("other", "51", True)),
        _cmd("deep", "50"),
    ]
    sets = fuzz.ArgGenerator(schema, values()).arg_sets("deep")
    assert sets and all("child" in s for s in sets)


HELP = """\
announce_self [interfaces] [id] -- Trigger GARP/RARP announcements
block_resize device size -- resize a block image
cont|c  -- resume emulation
drive_add [-n] [[<domain>:]<bus>:]<slot>
[file=file][,if=type][,bus=n]
[,unit=m][,media=d][,index=i] -- add drive to PCI storage controller
getfd getfd name -- receive a file descriptor via SCM rights and assign it a name
memsave addr size file -- save to disk virtual memory dump starting at 'addr' of size 'size'
quit|q  -- quit the emulator
set_link name on|off -- change the link status of a network adapter
x /fmt addr -- virtual memory dump starting at 'addr'
block_job_cancel [-f] device -- stop an active background block operation (use -f
\t\t\t if you want to abort the operation immediately
"""

INFO = """\
info block [-n] [-v] [device] -- show info of one block device or all block devices
info status  -- show the current VM status (running|paused)
"""


def test_parse_hmp_help() -> None:
    cmds = {c.name: c for c in fuzz.parse_hmp_help(HELP)}
    assert set(cmds) == {
        "announce_self",
        "block_resize",
        "cont",
        "drive_add",
        "getfd",
        "memsave",
        "quit",
        "set_link",
        "x",
        "block_job_cancel",
    }
    assert cmds["cont"].aliases == ("cont", "c")
    assert [a.name for a in cmds["getfd"].args] == ["name"], "the repeated name is dropped"
    mem = cmds["memsave"].args
    assert [(a.name, a.kind) for a in mem] == [
        ("addr", "number"),
        ("size", "number"),
        ("file", "path"),
    ]
    link = cmds["set_link"].args
    assert link[0].kind == "name" and link[1].choices == ("on", "off")
    assert cmds["x"].args[0].kind == "fmt"
    assert cmds["block_job_cancel"].args[0].kind == "flag"
    info = {c.name for c in fuzz.parse_hmp_help(INFO, prefix="info")}
    assert info == {"info block", "info status"}


def test_hmp_lines_shapes() -> None:
    cmds = {c.name: c for c in fuzz.parse_hmp_help(HELP)}
    v = values()
    resize = fuzz.hmp_lines(cmds["block_resize"], v)
    assert resize[0] == "block_resize"
    assert "block_resize vblk0 0" in resize, "a real device id"
    assert "block_resize 1 1" in resize, "a number"
    assert "block_resize {path} 0" in resize, "a scratch path"
    assert "block_resize disk0 4096" in resize, "the override aims at the nodes"
    # A file argument is a scratch path in every shape, never a bare word
    # that QEMU would create relative to its working directory.
    for line in fuzz.hmp_lines(cmds["memsave"], v):
        assert line == "memsave" or line.endswith("{path}")
    link = fuzz.hmp_lines(cmds["set_link"], v)
    assert "set_link nic0 on" in link and "set_link nic0 off" in link
    assert "set_link net0 on" in link
    cancel = fuzz.hmp_lines(cmds["block_job_cancel"], v)
    assert "block_job_cancel -f vblk0" in cancel


def test_hmp_plan_excludes_quit() -> None:
    plan = fuzz.plan_hmp(HELP, INFO, values())
    assert not {p.command for p in plan} & {"quit", "q"}
    assert not any(p.payload.split()[0] in ("quit", "q") for p in plan)
    assert "info status" in {p.payload for p in plan}


# -- verdicts ------------------------------------------------------------------


def obs(**kw: Any) -> fuzz.Observation:
    base: dict[str, Any] = {
        "alive": True,
        "status": "frozen",
        "records": 5,
        "digests": {"disk.raw": "a", "ovl.qcow2": "b"},
        "locks": {"disk.raw": [], "ovl.qcow2": []},
        "datagrams": 3,
        "frames": 2,
    }
    base.update(kw)
    return fuzz.Observation(**base)


def test_breaks_nothing_when_nothing_moved() -> None:
    assert fuzz.breaks(obs(), obs(), "frozen") == []


def test_breaks_each_invariant() -> None:
    now = obs(
        status="running",
        records=7,
        digests={"disk.raw": "X", "ovl.qcow2": "b"},
        locks={"disk.raw": [101], "ovl.qcow2": []},
        datagrams=4,
        frames=5,
    )
    got = fuzz.breaks(obs(), now, "frozen")
    assert [fuzz.invariant_of(b) for b in got] == [
        "status",
        "guest ran",
        "bytes",
        "lock",
        "frames",
        "datagrams",
    ]
    assert "disk.raw" in got[2] and "101(write held)" in got[3]
    assert "blocks a read-write standby" in got[3]
    assert got[4].startswith("frames: 3")


def test_breaks_persisting_state_is_not_counted_again() -> None:
    bad = obs(status="paused", locks={"disk.raw": [100], "ovl.qcow2": []})
    assert [fuzz.invariant_of(b) for b in fuzz.breaks(obs(), bad, "frozen")] == ["status", "lock"]
    assert fuzz.breaks(bad, bad, "frozen") == []
    worse = obs(status="running", locks={"disk.raw": [100, 101], "ovl.qcow2": []})
    assert len(fuzz.breaks(bad, worse, "frozen")) == 2, "a different break is new"
    # A read lock alone does not stop a standby, but is still reported.
    assert "blocks" not in fuzz.breaks(obs(), bad, "frozen")[1]


def test_breaks_negative_control_needs_only_not_running() -> None:
    assert fuzz.breaks(obs(status="paused"), obs(status="postmigrate"), "stopped") == []
    assert fuzz.breaks(obs(status="paused"), obs(status="paused"), "stopped") == []
    got = fuzz.breaks(obs(status="paused"), obs(status="running"), "stopped")
    assert got == ["status: running (was paused)"]


def test_breaks_dead_qemu_is_one_failure() -> None:
    got = fuzz.breaks(obs(), obs(alive=False, note="killed by SIGABRT: Assertion"), "frozen")
    assert got == ["alive: killed by SIGABRT: Assertion"]


def test_lock_byte_names() -> None:
    assert observe.lock_byte_name(100) == "100(consistent-read held)"
    assert observe.lock_byte_name(201) == "201(write unshared)"
    assert observe.lock_byte_name(110) == "110(bit10 held)"


def _ofd_lock(fd: int, kind: int, start: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0))


def test_held_lock_bytes_sees_another_open_file(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(4096))
    assert observe.held_lock_bytes(img) == []
    # OFD locks belong to the open file, so a second open conflicts even in
    # this process, exactly like QEMU's own locks would.
    fd = os.open(img, os.O_RDWR)
    try:
        _ofd_lock(fd, fcntl.F_RDLCK, 100)
        _ofd_lock(fd, fcntl.F_RDLCK, 201)
        assert observe.held_lock_bytes(img) == [100, 201]
        _ofd_lock(fd, fcntl.F_UNLCK, 100)
        assert observe.held_lock_bytes(img) == [201]
    finally:
        os.close(fd)
    assert observe.held_lock_bytes(img) == []
    assert img.read_bytes() == bytes(4096), "probing never writes"


# -- report and scratch paths ----------------------------------------------------------


def test_report_counts_table_and_merge() -> None:
    a = fuzz.FuzzReport("frozen", "qemu")
    a.calls = [
        fuzz.CallResult("qmp", "cont", "{}", refused=True, error="frozen"),
        fuzz.CallResult("qmp", "query-status", "{}", refused=False),
        fuzz.CallResult("hmp", "info status", "info status", refused=False),
        fuzz.CallResult(
            "qmp",
            "block_resize",
            "{...}",
            refused=False,
            broken=["bytes: disk.raw changed", "alive: killed by SIGABRT"],
            alive=False,
        ),
    ]
    a.crashes = ["after qmp block_resize: killed by SIGABRT"]
    a.not_run = {"hmp:x": 3}
    b = fuzz.FuzzReport("frozen", "qemu", calls=[fuzz.CallResult("hmp", "x", "x", False)])
    m = a.merge(b)
    c = m.counts()
    assert (c["commands"], c["qmp commands"], c["hmp commands"]) == (5, 3, 2)
    assert (c["calls"], c["refused"], c["accepted"]) == (5, 1, 4)
    assert c["invariant failures"] == 2 and c["calls breaking an invariant"] == 1
    assert c["crashes"] == 1 and c["not run (calls)"] == 0, "the later segment reached x"
    assert m.segments == 2
    assert [r.command for r in m.failures_of("bytes")] == ["block_resize"]
    table = m.table()
    assert "CRASH: after qmp block_resize" in table
    assert "qmp block_resize {...} -> accepted: bytes: disk.raw changed" in table


def test_materialize_makes_fresh_scratch_paths(tmp_path: Path) -> None:
    frig = SimpleNamespace(
        rig=SimpleNamespace(vm=SimpleNamespace(binary="qemu")),
        scratch=tmp_path / "scratch",
        sock_dir=tmp_path / "s",
        not_proven=[],
    )
    fz = fuzz._Fuzzer(frig, "frozen", 1.0, None, None)  # type: ignore[arg-type]
    args = {
        "a": fuzz.Scratch(),
        "b": [fuzz.Scratch("file-uri")],
        "c": fuzz.Scratch("sock"),
        "d": fuzz.Scratch("dir"),
        "e": "keep",
    }
    out = fz.materialize(args, "dump-guest-memory")
    assert out["a"].startswith(str(tmp_path / "scratch"))
    assert out["b"][0].startswith(f"file:{tmp_path / 'scratch'}")
    assert out["c"].startswith(str(tmp_path / "s")) and out["c"].endswith(".sock")
    assert Path(out["d"]).is_dir() and out["e"] == "keep"
    assert len({out["a"], out["b"][0][5:], out["c"], out["d"]}) == 4, "all fresh"
    line = fz.expand_line("migrate -d file:{path} {path} unix:{sock}", "migrate")
    assert "{" not in line and line.count(str(tmp_path / "scratch")) == 2
