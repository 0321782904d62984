"""A schema-driven fuzz of QEMU's monitors against a frozen (or stopped) VM.

Every QMP command the running QEMU reports in ``query-qmp-schema`` is called
with argument sets generated from that schema, and every HMP command listed by
``help`` with a few argument shapes.  String arguments that name something
(nodes, devices, netdevs, snapshots, images) get the rig's REAL values, so a
call can actually reach the disks and NICs; files the operator names as
outputs get fresh paths in a scratch dir of their own (an operator
overwriting an image by name is not the VM writing to it).

After every call the invariants of the frozen state are measured, not
assumed: QEMU alive and answering, the run state, no new guest record on the
console, every image byte-identical, every image's lock bytes free for a
standby, no frame on the tap and no datagram at the listener.  A break is
attributed to the call after which it first appeared; one that persists is
not counted again.  Accepted calls that open a way to write or send get a
follow-up probe that tries it (an NBD client write to a new export, a
gdbstub continue, an announce after a network change).  ``quit`` comes last
and must end QEMU.

A crash ends a run; :func:`fuzz_with_restarts` then boots a fresh rig,
replays the setup calls and goes on after the crashing call, so one run
lists every crash.  The negative control (stock QEMU, stopped and
inactivated) restores that state after each call that broke something.

The pure parts (argument generation, HMP help parsing, the verdicts) take
plain data and are unit-tested; the rest drives a ``rig.Rig``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from harness import config, guest, netns
from harness.attempts import (
    WRITE_PATHS,
    WritePath,
    gdb_continue_step,
    nbd_client_write,
    prepare_write_paths,
)
from harness.observe import STANDBY_CONFLICTS, file_digest, held_lock_bytes, lock_byte_name
from harness.rig import (
    DEVICE_ID,
    DISK_NODE,
    IMAGE_SIZE,
    NETDEV_ID,
    NIC_ID,
    Rig,
    RigError,
    run_tool,
)
from harness.vm import VM, VMCommandError, VMError, VMTimeout, qemu_tool

#: A string that names nothing that exists (and is a valid id).
GARBAGE = "fuzz-no-such"
#: Every call is bounded; a command that takes longer is a hang.
CALL_TIMEOUT = 20.0
#: The liveness probe after each call.
STATUS_TIMEOUT = 10.0
#: Accepted calls that are not queries get this long for their background
#: effects (a job, an announce timer) to show before the invariants are read.
SETTLE_S = 0.05
#: Files QEMU writes in the scratch dir above this size are removed after
#: the call (dumps and migration streams of 64 MiB add up over a run).
SCRATCH_KEEP_BYTES = 4 << 20

#: Top-level argument sets per command, and per nested value.
MAX_SETS = 30
NESTED_CAP = 6
MAX_DEPTH = 4

# -- what the generator knows about argument names ---------------------------

#: Members whose string value names an object of the rig.
NAME_KEYS = frozenset(
    {
        "node-name",
        "node",
        "device",
        "id",
        "job-id",
        "name",
        "target",
        "base",
        "base-node",
        "top",
        "top-node",
        "overlay",
        "parent",
        "child",
        "drive",
        "netdev",
        "vmstate",
        "bitmap",
        "chardev",
        "backing",
        "image-node-name",
        "qdev",
        "iothread",
        "tag",
        "devices",
        "nodes",
        "interfaces",
        "snapshot-node-name",
        "export",
        "node-names",
        "bitmaps",
    }
)
#: Members naming a host file; never a rig image unless the command opens images.
PATH_KEYS = frozenset(
    {
        "filename",
        "file",
        "path",
        "snapshot-file",
        "mem-path",
        "dir",
        "out",
        "in",
        "logfile",
        "evdev",
        "mountpoint",
        "sock",
        "socket",
        "mem",
        "tls-creds-dir",
        "fsdev",
    }
)
#: Members holding a URI to write to.
URI_KEYS = frozenset({"uri", "protocol"})
#: Members naming a host to connect to: only loopback.
HOST_KEYS = frozenset({"host", "hostname", "server", "portal"})
#: Members naming a QOM/qdev type.
TYPE_KEYS = frozenset({"driver", "typename"})
#: Commands that open (read) images named by a path: real image paths go there.
OPENS_IMAGES = frozenset({"blockdev-add", "blockdev-change-medium", "change-backing-file"})
#: Keys that name an image of the backing chain by file name.
CHAIN_FILE_KEYS = frozenset({"base", "top", "backing-file"})
#: Per (command, key): the only values to use.
POOL_OVERRIDES: dict[tuple[str, str], str] = {
    ("drive-mirror", "target"): "path",
    ("drive-backup", "target"): "path",
    ("chardev-add", "device"): "path",
    ("chardev-change", "device"): "path",
}
#: Ints by member name (small: sizes and counts must never stress the host).
INT_POOLS: dict[str, list[int]] = {
    "size": [4096, 0],
    "val": [0],
    "speed": [0],
    "cpu-index": [0],
    "granularity": [65536],
    "index": [0],
    "begin": [0],
    "length": [4096],
    "initial": [1],
    "max": [2],
    "rounds": [1],
    "step": [1],
    "hubid": [0],
    "cid": [2],
    "bus": [0],
    "unit": [0],
}
#: Union cases never generated: they run host programs, open host devices or
#: networks outside loopback/the test's namespaces (tap gets an explicit,
#: harmless set instead).
SKIP_CASES = frozenset(
    {
        "bridge",
        "l2tpv3",
        "vde",
        "vhost-user",
        "vhost-vdpa",
        "af-xdp",
        "netmap",
        "passt",
        "vmnet-host",
        "vmnet-shared",
        "vmnet-bridged",
        "exec",
        "rdma",
        "stdio",
        "tap",
    }
)
#: Cases preferred as the default of a union (the first one found wins).
PREFERRED_CASES = ("raw", "file", "qcow2", "null", "unix", "user", "nbd", "full", "elf")
#: Commands the generated plan never calls: quit would end the run; it is
#: called once, last, to check that it still ends QEMU (quit_check).
SKIP_QMP = frozenset({"quit"})
SKIP_HMP = frozenset({"quit", "q"})
#: The classic ways out of a stopped VM, called first, on the pristine VM:
#: no earlier call (a second device on a node, say) can mask them.
FIRST = ("cont", "blockdev-set-active")
#: Commands called next: they set up things the later calls use (and are
#: replayed on a fresh rig after a crash).
PRELUDE = (
    "nbd-server-start",
    "blockdev-add",
    "chardev-add",
    "object-add",
    "netdev_add",
    "device_add",
    "block-export-add",
    "nbd-server-add",
)
#: Commands called last: they tear down what others would use.
EPILOGUE = (
    "blockdev-del",
    "device_del",
    "netdev_del",
    "chardev-remove",
    "object-del",
    "nbd-server-stop",
    "block-export-del",
    "eject",
    "blockdev-remove-medium",
    "blockdev-open-tray",
    "x-blockdev-change",
    "migrate",
    "migrate-incoming",
    "snapshot-load",
)
#: Accepted calls after which the announce probe runs.
NET_CHANGING = frozenset(
    {
        "set_link",
        "netdev_add",
        "device_add",
        "object-add",
        "netdev_del",
        "object_add",
        "x-blockdev-change",
        "qom-set",
    }
)
ANNOUNCE_ARGS = {"initial": 1, "max": 2, "rounds": 1, "step": 1}
_QUERY_RX = re.compile(r"^(x-)?(query-|qom-list|qom-get|device-list|trace-event-get)")
#: HMP answers that mean the command did nothing.
_HMP_REFUSED_RX = re.compile(
    r"(?i)error|unknown|invalid|failed|not found|could not|cannot|can't|missing|require|"
    r"not supported|frozen|usage|no such|not allowed|parameter|expected|not active|"
    r"does not|doesn't|is not|too many|bad|unsupported|denied|refus|unable|not enabled"
)


@dataclass(frozen=True)
class Scratch:
    """A fresh host path, made at call time in the fuzz's own scratch dir."""

    kind: str = "file"  # file | dir | sock | file-uri | unix-uri

    def __repr__(self) -> str:
        return f"<scratch {self.kind}>"


@dataclass(frozen=True)
class Fresh:
    """A new, unused id, made at call time: for what the command creates."""

    def __repr__(self) -> str:
        return "<fresh id>"


#: Per command, the members that name what it creates: their default is a
#: fresh id (the real names follow, to try duplicates), so that every object
#: type or union case is really created, not refused as a duplicate.
CREATES: dict[str, frozenset[str]] = {
    "object-add": frozenset({"id"}),
    "netdev_add": frozenset({"id"}),
    "chardev-add": frozenset({"id"}),
    "device_add": frozenset({"id"}),
    "block-export-add": frozenset({"id", "name"}),
    "nbd-server-add": frozenset({"name"}),
    "blockdev-add": frozenset({"node-name"}),
    "blockdev-snapshot-sync": frozenset({"snapshot-node-name"}),
    "blockdev-snapshot": frozenset(),
    "block-dirty-bitmap-add": frozenset({"name"}),
}


@dataclass
class RigValues:
    """The rig's real names, which the generated arguments use."""

    nodes: list[str]
    block_devices: list[str]
    nics: list[str]
    netdevs: list[str]
    chardevs: list[str]
    images: list[Path]
    snapshots: list[str]
    qom_paths: list[str] = field(default_factory=lambda: ["/machine"])
    device_types: list[str] = field(default_factory=lambda: ["virtio-blk-pci", "e1000"])
    garbage: str = GARBAGE

    def names(self, first: Sequence[str] = ()) -> list[str]:
        """Every real name, ``first`` in front, and the garbage one last."""
        out = [
            *first,
            *self.nodes,
            *self.block_devices,
            *self.nics,
            *self.netdevs,
            *self.snapshots,
            *self.chardevs,
            self.garbage,
        ]
        return list(dict.fromkeys(out))


# -- argument generation -----------------------------------------------------


def _round_robin(lists: Sequence[Sequence[Any]]) -> Iterator[Any]:
    """Items of several lists interleaved: every list is reached early."""
    for group in itertools.zip_longest(*lists):
        yield from (x for x in group if x is not None)


def _dedup(values: Iterable[Any]) -> list[Any]:
    seen: set[str] = set()
    out = []
    for v in values:
        k = json.dumps(v, sort_keys=True, default=repr)
        if k not in seen:
            seen.add(k)
            out.append(v)
    return out


class ArgGenerator:
    """Argument sets for every command of a ``query-qmp-schema`` answer.

    ``_values`` answers, for one type at one place, a list whose first item
    is the default and whose other items each change one choice (an enum
    value, a union case, an optional member, a real name): one factor at a
    time, so the count stays linear in the schema, capped per level.
    """

    def __init__(
        self, schema: Sequence[Mapping[str, Any]], values: RigValues, max_sets: int = MAX_SETS
    ):
        self.types = {e["name"]: e for e in schema}
        self.values = values
        self.max_sets = max_sets
        self._memo: dict[tuple[str, str, str, int, bool], list[Any]] = {}

    def commands(self) -> list[str]:
        return sorted(e["name"] for e in self.types.values() if e["meta-type"] == "command")

    def arg_sets(self, command: str) -> list[dict[str, Any]]:
        entity = self.types[command]
        arg_type = entity.get("arg-type")
        if not arg_type or arg_type not in self.types:
            return [{}]
        sets = self._values(arg_type, "", command, 0)
        sets = [s for s in sets if isinstance(s, dict)] or [{}]
        return _dedup([*sets, *extra_arg_sets(command, self.values)])[: self._cap(command)]

    def _cap(self, command: str) -> int:
        """Unions at the top (blockdev-add, object-add ...) get one set per case more."""
        arg = self.types.get(self.types[command].get("arg-type", ""), {})
        return (
            self.max_sets + len(arg.get("variants", [])) + len(extra_arg_sets(command, self.values))
        )

    def _values(
        self, tname: str, key: str, command: str, depth: int, ref: bool = False
    ) -> list[Any]:
        memo_key = (tname, key, command, depth, ref)
        if memo_key not in self._memo:
            self._memo[memo_key] = self._compute(tname, key, command, depth, ref)
        return self._memo[memo_key]

    def _compute(self, tname: str, key: str, command: str, depth: int, ref: bool) -> list[Any]:
        if tname.startswith("[") and tname not in self.types:
            tname_elem = tname[1:-1]
            return self._array(tname_elem, key, command, depth)
        entity = self.types.get(tname)
        if entity is None:
            return []
        meta = entity["meta-type"]
        if meta == "builtin":
            return self._builtin(tname, key, command, ref)
        if meta == "enum":
            vals = [v for v in entity.get("values", []) if v not in SKIP_CASES]
            return _prefer(vals)
        if meta == "array":
            return self._array(entity["element-type"], key, command, depth)
        if meta == "alternate":
            return self._alternate(entity, key, command, depth)
        if meta == "object":
            if depth > 2 * MAX_DEPTH:
                return []  # a recursive type (BlockdevOptions in BlockdevRef): stop here
            return self._object(entity, command, depth)
        return []

    def _array(self, elem: str, key: str, command: str, depth: int) -> list[Any]:
        vals = self._values(elem, key, command, depth + 1)
        if not vals:
            return [[]]
        return [[v] for v in vals]

    def _alternate(
        self, entity: Mapping[str, Any], key: str, command: str, depth: int
    ) -> list[Any]:
        kinds = [m["type"] for m in entity.get("members", [])]
        has_obj = any(self.types.get(k, {}).get("meta-type") == "object" for k in kinds)
        if has_obj and depth >= MAX_DEPTH and "str" in kinds:
            kinds = ["str"]  # deep down, a reference by name ends the recursion
        # An object-or-string alternate is a definition or a reference by name
        # (BlockdevRef): the string is a node name.  Deep down, prefer it.
        order = sorted(kinds, key=lambda k: (k != "str") if (has_obj and depth > 1) else 0)
        per = [self._values(k, key, command, depth, ref=has_obj and k == "str") for k in order]
        per = [p for p in per if p]
        if not per:
            return []
        heads = [p[0] for p in per]
        return _dedup([*heads, *_round_robin([p[1:] for p in per])])[: self._level_cap(depth)]

    def _level_cap(self, depth: int) -> int:
        return self.max_sets if depth == 0 else NESTED_CAP

    def _object(self, entity: Mapping[str, Any], command: str, depth: int) -> list[Any]:
        members = list(entity.get("members", []))
        tag = entity.get("tag")
        if not tag:
            return self._members(members, command, depth)
        tag_member = next((m for m in members if m["name"] == tag), None)
        cases = self._values(tag_member["type"], tag, command, depth + 1) if tag_member else []
        variants = {v["case"]: v["type"] for v in entity.get("variants", [])}
        base = [m for m in members if m["name"] != tag]
        if depth > 0 and "file" in cases:
            # A nested node is best a plain file (on a real image), not
            # another format layer.
            cases = ["file", *(c for c in cases if c != "file")]
        if depth >= MAX_DEPTH:
            cases = cases[:1]
        out: list[Any] = []
        first_variations: list[Any] = []
        for i, case in enumerate(cases):
            branch = base + list(self.types.get(variants.get(case, ""), {}).get("members", []))
            vals = self._members(branch, command, depth)
            if not vals:
                continue
            out.append({tag: case, **vals[0]})
            if i == 0:
                first_variations = [{tag: case, **v} for v in vals[1:]]
        cap = self.max_sets + len(cases) if depth == 0 else NESTED_CAP
        return _dedup([*out[:1], *_round_robin([out[1:], first_variations])])[:cap]

    def _members(
        self, members: Sequence[Mapping[str, Any]], command: str, depth: int
    ) -> list[dict[str, Any]]:
        required = [m for m in members if "default" not in m]
        optional = [m for m in members if "default" in m]
        default: dict[str, Any] = {}
        per_member: list[list[dict[str, Any]]] = []
        for m in required:
            vals = self._values(m["type"], m["name"], command, depth + 1)
            if not vals:
                return []  # a required member nobody can make: no such object
            default[m["name"]] = vals[0]
            per_member.append([{**default, m["name"]: v} for v in vals[1:]])
        if depth >= MAX_DEPTH:
            return [default]
        everything = dict(default)
        for m in optional:
            vals = self._values(m["type"], m["name"], command, depth + 1)
            if not vals:
                continue
            everything[m["name"]] = vals[0]
            per_member.append([{m["name"]: v} for v in vals])
        # Variations of required members were built against a partial default;
        # fill in the rest of the default under each.
        varied = [{**default, **v} for v in _round_robin(per_member)]
        extra = [everything] if everything != default else []
        return _dedup([default, *extra, *varied])[: self._level_cap(depth)]

    def _builtin(self, tname: str, key: str, command: str, ref: bool) -> list[Any]:
        if tname == "str":
            return self._strings(key, command, ref)
        if tname == "int":
            return list(INT_POOLS.get(key, [1, 0]))
        if tname == "number":
            return [1.0, 0.0]
        if tname == "bool":
            return [True, False]
        if tname == "null":
            return [None]
        return [GARBAGE]  # any

    def _strings(self, key: str, command: str, ref: bool) -> list[Any]:
        v = self.values
        images = [str(p) for p in v.images]
        if ref:
            return v.names(v.nodes)[: NESTED_CAP + len(v.nodes)]
        if POOL_OVERRIDES.get((command, key)) == "path":
            return [Scratch("file")]
        if key in URI_KEYS:
            return [Scratch("file-uri"), Scratch("unix-uri")]
        if key == "path" and command.startswith("qom-"):
            return [*v.qom_paths, v.garbage]
        if key in PATH_KEYS:
            if key == "dir" or key.endswith("-dir"):
                return [Scratch("dir")]
            if key in ("sock", "socket", "path") and command != "blockdev-add":
                return [Scratch("sock"), Scratch("file")]
            return [*images, Scratch("file")] if command in OPENS_IMAGES else [Scratch("file")]
        if key in HOST_KEYS:
            return ["127.0.0.1"]
        if key == "port":
            return ["0"]
        if key == "url":
            return ["http://127.0.0.1:1/fuzz"]
        if key in TYPE_KEYS:
            return [*v.device_types, v.garbage]
        if key in CHAIN_FILE_KEYS:
            return [*images, *v.names(v.nodes)]
        if key == "job-id" or key in CREATES.get(command, ()):
            return [Fresh(), *v.names(_first_names(key, command, v))]
        if key in NAME_KEYS or key.endswith(("-id", "-name", "-node")):
            return v.names(_first_names(key, command, v))
        if key == "command-line":
            return ["info status"]
        return [v.garbage]


def _first_names(key: str, command: str, v: RigValues) -> list[str]:
    """Which real names suit ``key`` best (the others follow)."""
    if command.startswith(("chardev-", "ringbuf")) or key == "chardev":
        return v.chardevs
    if key in ("job-id",) or command.startswith(("job-", "block-job-")):
        return ["fuzzjob"]
    if command.startswith("netdev") or key == "netdev":
        return v.netdevs
    if key in ("tag", "snapshot-id") or "snapshot" in command or command.startswith("snapshot"):
        return [*v.snapshots, *v.nodes]
    if command in ("set_link", "announce-self") or key == "interfaces":
        return [*v.nics, *v.netdevs]
    if key in ("device", "drive", "devices", "qdev", "id"):
        return [*v.block_devices, *v.nodes]
    return v.nodes


def _prefer(values: Sequence[str]) -> list[str]:
    """Enum values with the preferred default first, the others in order."""
    for p in PREFERRED_CASES:
        if p in values:
            return [p, *(x for x in values if x != p)]
    return list(values)


def _chain(v: RigValues) -> list[str]:
    """The overlay and its backing node (or the first node)."""
    return [n for n in v.nodes if n in ("ovl0", "base0")] or v.nodes[:1] or [GARBAGE]


def extra_arg_sets(command: str, v: RigValues) -> list[dict[str, Any]]:
    """Hand-written sets for the attack paths a one-factor generator may miss:
    each aims one real node/device at one way of writing or running."""
    disk = v.nodes[0] if v.nodes else GARBAGE
    chain = _chain(v)
    images = [str(p) for p in v.images]
    job = "fuzzjob-x"
    table: dict[str, list[dict[str, Any]]] = {
        "cont": [{}],
        "blockdev-set-active": [
            {"active": True},
            *({"node-name": n, "active": True} for n in v.nodes),
        ],
        "blockdev-add": [
            *(
                {
                    "driver": "raw",
                    "node-name": f"fuzzraw{i}",
                    "file": {"driver": "file", "filename": p},
                }
                for i, p in enumerate(images)
            ),
            {"driver": "qcow2", "node-name": "fuzzq0", "file": disk},
        ],
        "blockdev-backup": [
            {"job-id": job, "device": n, "target": t, "sync": "full"}
            for n in (disk, *chain)
            for t in ("tgt0",)
        ],
        "blockdev-mirror": [{"job-id": job, "device": disk, "target": "tgt0", "sync": "full"}],
        "drive-backup": [
            {"job-id": job, "device": disk, "target": Scratch(), "sync": "full", "format": "raw"}
        ],
        "drive-mirror": [
            {"job-id": job, "device": disk, "target": Scratch(), "sync": "full", "format": "raw"}
        ],
        "block-stream": [{"job-id": job, "device": n} for n in chain],
        "block-commit": [{"job-id": job, "device": n} for n in chain],
        "block_resize": [{"node-name": n, "size": 4096} for n in v.nodes[:4]],
        "blockdev-snapshot-internal-sync": [{"device": n, "name": "fuzzsnap"} for n in chain],
        "blockdev-snapshot-delete-internal-sync": [
            {"device": n, "name": s} for n in chain for s in v.snapshots
        ],
        "blockdev-snapshot-sync": [
            {
                "node-name": n,
                "snapshot-file": Scratch(),
                "snapshot-node-name": "fuzzsn0",
                "format": "qcow2",
            }
            for n in (disk, *chain)
        ],
        "snapshot-save": [
            {"job-id": job, "tag": "fuzzsnap", "vmstate": n, "devices": [n]} for n in chain
        ],
        "snapshot-delete": [
            {"job-id": job, "tag": s, "devices": [n]} for n in chain for s in v.snapshots
        ],
        "snapshot-load": [
            {"job-id": job, "tag": s, "vmstate": n, "devices": [n]}
            for n in chain
            for s in v.snapshots
        ],
        "blockdev-create": [
            {"job-id": job, "options": {"driver": "qcow2", "file": n, "size": 1 << 20}}
            for n in v.nodes[:4]
        ],
        "change-backing-file": [
            {"device": "ovl0", "image-node-name": "ovl0", "backing-file": GARBAGE}
        ],
        "block-export-add": [
            {
                "type": "nbd",
                "id": f"fuzzexp{i}",
                "node-name": n,
                "name": f"fuzzexp{i}",
                "writable": True,
            }
            for i, n in enumerate(v.nodes[:4])
        ],
        "nbd-server-add": [
            {"device": n, "name": f"fuzznbd{i}", "writable": True}
            for i, n in enumerate(v.nodes[:4])
        ],
        "nbd-server-start": [{"addr": {"type": "unix", "data": {"path": Scratch("sock")}}}],
        "set_link": [{"name": n, "up": True} for n in [*v.nics, *v.netdevs]],
        "announce-self": [ANNOUNCE_ARGS],
        "netdev_add": [
            {"type": "tap", "id": "fuzztap0", "fd": GARBAGE},
            {"type": "user", "id": "fuzzuser0", "restrict": True},
        ],
        "device_add": [
            {"driver": "virtio-blk-pci", "drive": disk, "id": "fuzzdev0"},
            {
                "driver": "virtio-net-pci",
                "netdev": v.netdevs[-1] if v.netdevs else GARBAGE,
                "id": "fuzzdev1",
                "romfile": "",
            },
            {"driver": "e1000", "id": "fuzzdev2", "romfile": ""},
            {"driver": "ide-hd", "drive": chain[-1], "bus": "ide.1", "unit": 1, "id": "fuzzdev3"},
        ],
        "migrate": [{"uri": Scratch("file-uri")}],
        "human-monitor-command": [{"command-line": "info status"}],
        "transaction": [
            {"actions": [a]}
            for a in (
                {
                    "type": "blockdev-snapshot-internal-sync",
                    "data": {"device": chain[0], "name": "fuzzsnapT"},
                },
                {
                    "type": "blockdev-backup",
                    "data": {"job-id": job, "device": disk, "target": "tgt0", "sync": "full"},
                },
                {
                    "type": "drive-backup",
                    "data": {"job-id": job, "device": disk, "target": Scratch(), "sync": "full"},
                },
            )
        ],
        "memsave": [{"val": 0, "size": 4096, "filename": Scratch()}],
        "pmemsave": [{"val": 0, "size": 4096, "filename": Scratch()}],
        "dump-guest-memory": [{"paging": False, "protocol": Scratch("file-uri")}],
    }
    return table.get(command, [])


# -- HMP ---------------------------------------------------------------------


@dataclass(frozen=True)
class HmpArg:
    name: str
    optional: bool
    kind: str  # name | path | number | fmt | flag | choice | text
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class HmpCommand:
    name: str
    aliases: tuple[str, ...]
    args: tuple[HmpArg, ...]


_HMP_NAME_ARGS = {
    "device",
    "id",
    "name",
    "node",
    "netdev_id",
    "tag",
    "drive",
    "target",
    "bootdevice",
    "capture",
    "audiodev",
    "interfaces",
    "protocol",
    "path",
    "property",
    "capability",
    "parameter",
    "display",
    "keys",
    "data",
    "args",
    "driver",
    "subcommand",
    "cmd",
    "item1",
    "state",
}
_HMP_PATH_ARGS = {"filename", "file", "uri", "new-image-file", "target-file"}


def _hmp_kind(token: str, command: str) -> HmpArg | None:
    optional = token.startswith("[")
    name = token.strip("[]")
    if not name or name.startswith(("<", ",")) or "=" in name:
        return None
    if name.startswith("-"):
        return HmpArg(name.split("|")[0], True, "flag")
    if name == "/fmt":
        return HmpArg(name, True, "fmt")
    if "|" in name and name != "device|all":
        alts = tuple(name.split("|"))
        if all(re.fullmatch(r"[\w-]+", a) for a in alts):
            return HmpArg(name, optional, "choice", alts)
        return HmpArg(name, optional, "text")
    if name in _HMP_PATH_ARGS or (command in ("drive_mirror", "drive_backup") and name == "target"):
        return HmpArg(name, optional, "path")
    if command == "wavcapture" and name == "path":
        return HmpArg(name, optional, "path")
    if name in _HMP_NAME_ARGS or name == "device|all" or name.endswith("_id"):
        return HmpArg(name, optional, "name")
    if name in ("command",):
        return HmpArg(name, optional, "text")
    return HmpArg(name, optional, "number")


def parse_hmp_help(text: str, prefix: str = "") -> list[HmpCommand]:
    """Commands from HMP ``help`` (or ``help info`` with prefix ``info``).

    Lines look like ``name[|alias] args -- description``; continuation lines
    start with blanks or ``[`` (drive_add's long usage).
    """
    out: list[HmpCommand] = []
    for line in text.splitlines():
        if not line.strip() or line[0].isspace() or line.startswith("["):
            continue
        head = line.split(" -- ", 1)[0]
        tokens = head.split()
        if prefix:
            if not tokens or tokens[0] != prefix or len(tokens) < 2:
                continue
            tokens = tokens[1:]
        names = tuple(tokens[0].split("|"))
        name = names[0]
        if not re.fullmatch(r"[a-z_][a-z0-9_-]*", name):
            continue
        rest = tokens[1:]
        if rest and rest[0] == name:  # "getfd getfd name"
            rest = rest[1:]
        args = tuple(a for a in (_hmp_kind(t, name) for t in rest) if a is not None)
        full = f"{prefix} {name}" if prefix else name
        out.append(HmpCommand(full, tuple(f"{prefix} {n}" if prefix else n for n in names), args))
    return out


def _hmp_value(arg: HmpArg, shape: str, name_value: str, v: RigValues) -> str | None:
    if arg.kind == "path":
        return "{path}"  # always a scratch path, in every shape
    if arg.kind == "fmt":
        return "/4xb"
    if arg.kind == "choice":
        return arg.choices[0] if shape != "last" else arg.choices[-1]
    if arg.kind == "flag":
        return None
    if arg.kind == "text":
        return '"read 0 512"'
    if shape == "number":
        return "1"
    if shape == "path":
        return "{path}" if arg.kind == "name" else "0"
    return name_value if arg.kind == "name" else "0"


def hmp_lines(cmd: HmpCommand, v: RigValues, max_ids: int = 4) -> list[str]:
    """A few argument shapes for one HMP command: none, the rig's real names,
    a number, a scratch path, and everything filled (flags included).
    ``{path}``/``{sock}``/``{image}`` are made at call time."""
    over = HMP_OVERRIDES.get(cmd.name)
    if over is not None and over.get("replace"):
        return list(over["lines"](v))
    lines = [cmd.name]
    req = [a for a in cmd.args if not a.optional and a.kind != "flag"]
    pos = [a for a in cmd.args if a.kind != "flag"]
    first_name = next((a for a in pos if a.kind == "name"), None)
    pool = v.names(_first_names(first_name.name, cmd.name, v))[:max_ids] if first_name else [""]
    if first_name and first_name.name == "device|all":
        pool = ["all", *pool]

    def fill(args: Sequence[HmpArg], shape: str, value: str, flags: Sequence[str] = ()) -> str:
        parts = [cmd.name, *flags]
        for a in args:
            x = _hmp_value(a, shape, value if a is first_name else (pool[0] or "0"), v)
            if x is not None:
                parts.append(x)
        return " ".join(parts)

    for value in pool:
        lines.append(fill(req or pos[:1], "ids", value))
    lines.append(fill(req or pos[:1], "number", ""))
    lines.append(fill(req or pos[:1], "path", ""))
    lines.append(fill(pos, "ids", pool[0], [a.name for a in cmd.args if a.kind == "flag"]))
    if any(a.kind == "choice" for a in pos):
        lines.append(fill(pos, "last", pool[0]))
    if over is not None:
        lines += over["lines"](v)
    return _dedup(line.strip() for line in lines)


def _hmp_over(lines: Callable[[RigValues], list[str]], replace: bool = False) -> dict[str, Any]:
    return {"lines": lines, "replace": replace}


#: HMP commands whose generic shapes would miss the point or be unsafe.
HMP_OVERRIDES: dict[str, dict[str, Any]] = {
    # A gdbstub on a unix socket of our own; the probe call then asks it to run.
    "gdbserver": _hmp_over(
        lambda v: ["gdbserver none", "gdbserver unix:{sock},server=on,wait=off", "gdbserver none"],
        replace=True,
    ),
    "migrate": _hmp_over(lambda v: ["migrate -d file:{path}", "migrate -d unix:{sock}"]),
    "migrate_incoming": _hmp_over(lambda v: ["migrate_incoming file:{path}"]),
    "qemu-io": _hmp_over(
        lambda v: (
            [f'qemu-io {n} "write -P 0x5a 0 512"' for n in v.nodes]
            + [f'qemu-io -d {d} "write -P 0x5a 0 512"' for d in v.block_devices]
            + [f'qemu-io {v.nodes[0]} "read 0 512"']
        ),
        replace=True,
    ),
    "nbd_server_start": _hmp_over(
        lambda v: ["nbd_server_start -a -w unix:{sock}", "nbd_server_start 127.0.0.1:0"]
    ),
    "nbd_server_add": _hmp_over(
        lambda v: [f"nbd_server_add -w {n} fuzzhmp{i}" for i, n in enumerate(v.nodes[:4])]
    ),
    "savevm": _hmp_over(lambda v: ["savevm fuzzsnap", *(f"savevm {s}" for s in v.snapshots)]),
    "loadvm": _hmp_over(lambda v: [f"loadvm {s}" for s in v.snapshots]),
    "delvm": _hmp_over(lambda v: [f"delvm {s}" for s in v.snapshots]),
    "drive_add": _hmp_over(
        lambda v: [f"drive_add 0 if=none,id=fuzzdrv{i},file={p}" for i, p in enumerate(v.images)],
        replace=True,
    ),
    "change": _hmp_over(
        lambda v: [f"change {d} {p} raw read-only" for d in v.block_devices for p in v.images[:1]]
    ),
    "netdev_add": _hmp_over(
        lambda v: [
            "netdev_add user,id=fuzzhnet0,restrict=on",
            f"netdev_add tap,id=fuzzhnet1,fd={GARBAGE}",
            "netdev_add hubport,id=fuzzhnet2,hubid=0",
        ],
        replace=True,
    ),
    "device_add": _hmp_over(
        lambda v: [
            f"device_add virtio-blk-pci,drive={v.nodes[0]},id=fuzzhdev0",
            f"device_add e1000,netdev={v.netdevs[-1]},id=fuzzhdev1,romfile=",
            "device_add e1000,id=fuzzhdev2,romfile=",
            f"device_add ide-hd,drive={_chain(v)[-1]},bus=ide.1,unit=1,id=fuzzhdev3",
        ],
        replace=True,
    ),
    "object_add": _hmp_over(
        lambda v: [
            f"object_add filter-dump,id=fuzzhf0,netdev={v.netdevs[0]},file={{path}}",
            f"object_add filter-redirector,id=fuzzhf1,netdev={v.netdevs[0]},queue=tx,"
            f"indev={v.chardevs[0]}",
            "object_add memory-backend-ram,id=fuzzhmem0,size=4096",
            "object_add iothread,id=fuzzhio0",
        ],
        replace=True,
    ),
    "chardev-add": _hmp_over(
        lambda v: ["chardev-add null,id=fuzzhchr0", "chardev-add file,id=fuzzhchr1,path={path}"],
        replace=True,
    ),
    "set_link": _hmp_over(lambda v: [f"set_link {n} on" for n in [*v.nics, *v.netdevs]]),
    "commit": _hmp_over(lambda v: ["commit all", *(f"commit {n}" for n in v.nodes[:3])]),
    "snapshot_blkdev": _hmp_over(
        lambda v: [f"snapshot_blkdev {n} {{path}} qcow2" for n in v.nodes[:3]]
    ),
    "snapshot_blkdev_internal": _hmp_over(
        lambda v: [f"snapshot_blkdev_internal {n} fuzzsnap" for n in v.nodes[:3]]
    ),
    "snapshot_delete_blkdev_internal": _hmp_over(
        lambda v: [
            f"snapshot_delete_blkdev_internal {n} {s}" for n in v.nodes[:3] for s in v.snapshots
        ]
    ),
    "block_resize": _hmp_over(lambda v: [f"block_resize {n} 4096" for n in v.nodes[:4]]),
    "block_stream": _hmp_over(lambda v: [f"block_stream {n}" for n in v.nodes[:3]]),
    "drive_mirror": _hmp_over(lambda v: [f"drive_mirror -f {v.nodes[0]} {{path}} raw"]),
    "drive_backup": _hmp_over(lambda v: [f"drive_backup -f {v.nodes[0]} {{path}} raw"]),
    "memsave": _hmp_over(lambda v: ["memsave 0 4096 {path}"], replace=True),
    "pmemsave": _hmp_over(lambda v: ["pmemsave 0 4096 {path}"], replace=True),
    "dump-guest-memory": _hmp_over(
        lambda v: ["dump-guest-memory {path}", "dump-guest-memory -p {path} 0 4096"]
    ),
    # Never an address that is not ours: loopback or nothing.
    "hostfwd_add": _hmp_over(
        lambda v: [f"hostfwd_add {v.netdevs[-1]} tcp:127.0.0.1:0-:1"], replace=True
    ),
    "client_migrate_info": _hmp_over(
        lambda v: ["client_migrate_info spice 127.0.0.1 1 1 x"], replace=True
    ),
    # The interactive ones that print a lot or wait for input.
    "help": _hmp_over(lambda v: ["help", "help info"], replace=True),
}


# -- invariants ----------------------------------------------------------------


@dataclass
class Observation:
    """What the harness measured after one call."""

    alive: bool
    status: str | None
    records: int
    digests: dict[str, str]
    locks: dict[str, list[int]]
    datagrams: int
    frames: int
    note: str = ""


def breaks(prev: Observation, now: Observation, expect: str) -> list[str]:
    """The invariants that broke between two observations (pure).

    ``expect`` is ``frozen`` (the status must be exactly that) or
    ``stopped`` (the negative control: anything but running).  A state that
    stays broken in the same way is not reported again; every new write,
    record, frame or datagram is.
    """
    out: list[str] = []
    if not now.alive:
        return [f"alive: {now.note or 'QEMU is gone'}"]
    if _status_bad(now.status, expect) and (
        not _status_bad(prev.status, expect) or now.status != prev.status
    ):
        out.append(f"status: {now.status} (was {prev.status})")
    if now.records > prev.records:
        out.append(f"guest ran: {now.records - prev.records} new record(s) on the console")
    for img, digest in now.digests.items():
        if prev.digests.get(img) not in (None, digest):
            out.append(f"bytes: {img} changed")
    for img, held in now.locks.items():
        if held and held != prev.locks.get(img):
            blocks = " (blocks a read-write standby)" if set(held) & STANDBY_CONFLICTS else ""
            out.append(f"lock: {img} " + ",".join(lock_byte_name(b) for b in held) + blocks)
    if now.frames > prev.frames:
        out.append(f"frames: {now.frames - prev.frames} on the tap")
    if now.datagrams > prev.datagrams:
        out.append(f"datagrams: {now.datagrams - prev.datagrams} at the listener")
    return out


def _status_bad(status: str | None, expect: str) -> bool:
    if expect == "frozen":
        return status != "frozen"
    return status is None or status == "running"


def invariant_of(text: str) -> str:
    """``bytes: disk.raw changed`` -> ``bytes``."""
    return text.split(":", 1)[0]


# -- results ---------------------------------------------------------------------


@dataclass
class CallResult:
    """One monitor call (or follow-up probe) and what it broke."""

    kind: str  # qmp | hmp | probe | setup
    command: str
    args: str
    refused: bool
    error: str = ""
    seconds: float = 0.0
    broken: list[str] = field(default_factory=list)
    alive: bool = True
    hung: bool = False
    #: the arguments as sent (scratch paths made), for the follow-up probes
    payload: Any = field(default=None, repr=False)

    def line(self) -> str:
        what = "refused" if self.refused else "accepted"
        err = f" [{self.error[:120]}]" if self.error else ""
        return (
            f"{self.kind} {self.command} {self.args[:160]} -> {what}{err}: {'; '.join(self.broken)}"
        )


@dataclass
class FuzzReport:
    expect: str
    binary: str
    calls: list[CallResult] = field(default_factory=list)
    #: command -> calls planned but not made (budget ran out, or a crash)
    not_run: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    #: one line per crash (or lost monitor): the call, QEMU's last words
    crashes: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    #: images that differ from before the fuzz, at the very end
    changed_overall: list[str] = field(default_factory=list)
    plan_size: int = 0
    #: frames on the tap and datagrams at the listener before the freeze:
    #: the capture works (the net invariants could fail)
    traffic_before: tuple[int, int] = (0, 0)
    #: plan indices whose call killed QEMU, and how many calls the prelude has
    crashed_at: list[int] = field(default_factory=list)
    prelude_size: int = 0
    #: where a fresh rig would go on after a crash (None: nothing left)
    next_index: int | None = None
    segments: int = 1
    #: What the run could not prove (partial run), for the summary.
    not_proven: list[str] = field(default_factory=list)

    def merge(self, later: FuzzReport) -> FuzzReport:
        """This segment followed by a later one (after a restart)."""
        return FuzzReport(
            expect=self.expect,
            binary=self.binary,
            calls=[*self.calls, *later.calls],
            not_run=dict(later.not_run),
            skipped=later.skipped,
            crashes=[*self.crashes, *later.crashes],
            elapsed=self.elapsed + later.elapsed,
            changed_overall=later.changed_overall,
            plan_size=later.plan_size,
            traffic_before=self.traffic_before,
            crashed_at=[*self.crashed_at, *later.crashed_at],
            prelude_size=later.prelude_size,
            next_index=later.next_index,
            segments=self.segments + later.segments,
            not_proven=list(dict.fromkeys([*self.not_proven, *later.not_proven])),
        )

    def commands(self, kind: str | None = None) -> int:
        return len(
            {
                (c.kind, c.command)
                for c in self.calls
                if c.kind in ("qmp", "hmp") and (kind is None or c.kind == kind)
            }
        )

    @property
    def failures(self) -> list[CallResult]:
        return [c for c in self.calls if c.broken]

    def failures_of(self, invariant: str) -> list[CallResult]:
        return [c for c in self.failures if any(invariant_of(b) == invariant for b in c.broken)]

    def counts(self) -> dict[str, int]:
        mon = [c for c in self.calls if c.kind in ("qmp", "hmp")]
        return {
            "commands": self.commands(),
            "qmp commands": self.commands("qmp"),
            "hmp commands": self.commands("hmp"),
            "calls": len(mon),
            "probe calls": sum(1 for c in self.calls if c.kind == "probe"),
            "refused": sum(1 for c in mon if c.refused),
            "accepted": sum(1 for c in mon if not c.refused),
            "hung": sum(1 for c in self.calls if c.hung),
            "crashes": len(self.crashes),
            "invariant failures": sum(len(c.broken) for c in self.calls),
            "calls breaking an invariant": len(self.failures),
            "not run (calls)": sum(self.not_run.values()),
            "not run (commands)": len(self.not_run),
        }

    def table(self, max_failures: int = 40) -> str:
        lines = [
            f"monitor fuzz, expecting '{self.expect}', on {self.binary} ({self.elapsed:.0f} s)"
        ]
        for k, n in self.counts().items():
            lines.append(f"  {k:<28} {n}")
        by_inv: dict[str, int] = {}
        for c in self.calls:
            for b in c.broken:
                by_inv[invariant_of(b)] = by_inv.get(invariant_of(b), 0) + 1
        if by_inv:
            lines.append(
                "  by invariant: " + ", ".join(f"{k}={n}" for k, n in sorted(by_inv.items()))
            )
        if self.skipped:
            lines.append(f"  skipped on purpose: {', '.join(self.skipped)}")
        frames, dgrams = self.traffic_before
        lines.append(
            f"  before the freeze: {frames} frames on the tap, {dgrams} datagrams "
            "at the listener (the capture works)"
        )
        if self.segments > 1:
            lines.append(f"  rigs booted (restarts after crashes): {self.segments}")
        for crash in self.crashes:
            lines.append(f"  CRASH: {crash}")
        if self.changed_overall:
            lines.append(
                f"  images changed since before the fuzz: {', '.join(self.changed_overall)}"
            )
        if self.not_run:
            lines.append(
                "  not run: " + ", ".join(f"{k}({n})" for k, n in sorted(self.not_run.items())[:60])
            )
        lines += [f"  NOT PROVEN (partial run): {g}" for g in self.not_proven]
        fails = self.failures
        if fails:
            lines.append(f"  calls that broke an invariant (first {max_failures} of {len(fails)}):")
            lines += [f"    {c.line()}" for c in fails[:max_failures]]
        return "\n".join(lines)


# -- the rig ---------------------------------------------------------------------


@dataclass
class FuzzRig:
    rig: Rig
    values: RigValues
    scratch: Path
    sock_dir: Path
    #: NBD server sockets the fuzz knows of (the pre-freeze one first)
    nbd_sockets: list[Path] = field(default_factory=list)
    #: What this rig cannot prove (a partial run without namespaces).
    not_proven: list[str] = field(default_factory=list)

    @property
    def images(self) -> list[Path]:
        return self.values.images


def _img(prefix: Path, *args: str | Path) -> None:
    r = run_tool([qemu_tool(prefix, "qemu-img"), *args])
    if r.returncode != 0:
        raise RigError(f"qemu-img {' '.join(map(str, args))}: {r.stderr.strip()}")


def _io(prefix: Path, fmt: str, image: Path, cmd: str) -> None:
    r = run_tool([qemu_tool(prefix, "qemu-io"), "-f", fmt, "-c", cmd, image])
    if r.returncode != 0 or "error" in r.stdout.lower():
        raise RigError(f"qemu-io {cmd} {image}: {r.stdout}{r.stderr}")


def make_images(prefix: Path, wd: Path) -> tuple[Path, Path]:
    """A backing file with data and an overlay on it with data and an
    internal snapshot: (base, overlay)."""
    base, ovl = wd / "base.qcow2", wd / "ovl.qcow2"
    _img(prefix, "create", "-q", "-f", "qcow2", base, str(IMAGE_SIZE))
    _io(prefix, "qcow2", base, "write -P 0x11 0 64k")
    _img(
        prefix,
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base,
        "-F",
        "qcow2",
        ovl,
        str(IMAGE_SIZE),
    )
    _io(prefix, "qcow2", ovl, "write -P 0x22 64k 64k")
    _img(prefix, "snapshot", "-c", "snap0", ovl)
    _io(prefix, "qcow2", ovl, "write -P 0x33 128k 64k")
    return base, ovl


def fuzz_extra_args(base: Path, ovl: Path) -> list[str]:
    """The devices the fuzz adds to the probe's: a qcow2 overlay (internal
    snapshot, backing chain) on an IDE disk, an empty IDE CD, a user NIC on
    an e1000, and two chardevs the fuzz may change or remove."""
    ovl_node = {
        "driver": "qcow2",
        "node-name": "ovl0",
        "file": {"driver": "file", "filename": str(ovl), "node-name": "ovl0-file"},
        "backing": {
            "driver": "qcow2",
            "node-name": "base0",
            "file": {"driver": "file", "filename": str(base), "node-name": "base0-file"},
        },
    }
    return [
        "-blockdev",
        json.dumps(ovl_node),
        "-device",
        "ide-hd,drive=ovl0,id=ide0,bus=ide.0,unit=0",
        "-device",
        "ide-cd,id=cd0,bus=ide.1,unit=0",
        "-netdev",
        "user,id=unet0,restrict=on",
        "-device",
        "e1000,netdev=unet0,id=nic1,romfile=",
        "-chardev",
        "null,id=fuzzchr0",
        "-chardev",
        "ringbuf,id=fuzzring0",
    ]


@contextlib.contextmanager
def scratch_cwd(path: Path) -> Iterator[Path]:
    """Run QEMU from a scratch dir: a file named relatively lands there."""
    path.mkdir(parents=True, exist_ok=True)
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


@contextlib.contextmanager
def fuzz_rig(
    prefix: Path,
    workdir: Path,
    *,
    firmware_dirs: Sequence[Path] = (),
    log_dir: Path | None = None,
    accel: str = "kvm",
    network: str | None = None,
) -> Iterator[FuzzRig]:
    """Boot the probe with the fuzz's devices, and set up what must exist
    before the freeze: what the write-path table needs (target nodes, an
    NBD server, a writable NBD export; ``attempts.prepare_write_paths``).

    The NICs are a tap in a private namespace (its frames captured) and a
    user NIC. Without namespaces this fails, unless the run is partial
    ($FROZEN_PARTIAL): then the tap becomes user networking and the report
    says so under "not proven".
    """
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "scratch"
    base, ovl = make_images(prefix, workdir)
    net = network or "tap"
    not_proven = []
    if net == "tap" and (why := netns.netns_supported()) is not None:
        if not config.partial_run():
            raise RigError(
                f"tap networking needs a network namespace: {why}; a partial run "
                f"({config.PARTIAL_ENV}=1) fuzzes on user networking and reports it"
            )
        not_proven.append(
            f"tap networking ({why}): fuzzed on user networking, so frames "
            "QEMU itself would send were not captured"
        )
        net = "user"
    sock_dir = Path(tempfile.mkdtemp(prefix="fz", dir="/tmp"))  # unix paths are short
    try:
        with (
            scratch_cwd(scratch / "cwd"),
            guest.probe_rig(
                prefix,
                workdir / "rig",
                network=net,
                accel=accel,
                firmware_dirs=firmware_dirs,
                extra_args=fuzz_extra_args(base, ovl),
                log_dir=log_dir,
            ) as rig,
        ):
            prepare_write_paths(rig)
            values = collect_values(rig, [rig.image, ovl, base, *rig.write_targets])
            yield FuzzRig(rig, values, scratch, sock_dir, [rig.nbd_socket], not_proven)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def collect_values(rig: Rig, images: list[Path]) -> RigValues:
    """The rig's names, read from QEMU (auto-named nodes included)."""
    vm = rig.vm
    named = [n["node-name"] for n in vm.cmd("query-named-block-nodes")]
    first = [DISK_NODE, "ovl0", "base0", "tgt0", "ovl0-file", "base0-file"]
    nodes = list(dict.fromkeys([*(n for n in first if n in named), *named]))
    peripherals = {p["name"] for p in vm.cmd("qom-list", path="/machine/peripheral")}
    blk = [d for d in (DEVICE_ID, "ide0", "cd0") if d in peripherals]
    nics = [d for d in (NIC_ID, "nic1") if d in peripherals]
    return RigValues(
        nodes=nodes,
        block_devices=blk,
        nics=nics,
        netdevs=[NETDEV_ID, "unet0"],
        chardevs=["fuzzchr0", "fuzzring0"],
        images=images,
        snapshots=["snap0"],
        qom_paths=[f"/machine/peripheral/{d}" for d in (*blk, *nics)] + ["/machine", "/objects"],
        device_types=[
            "virtio-blk-pci",
            "virtio-net-pci",
            "e1000",
            "ide-hd",
            "ide-cd",
            "virtio-rng-pci",
            "pvpanic",
        ],
    )


# -- running it ------------------------------------------------------------------


@dataclass
class _Planned:
    kind: str  # qmp | hmp
    command: str
    payload: Any  # args dict (qmp) or command line (hmp)


class _Fuzzer:
    """One fuzz run over one rig; see :func:`run_fuzz`."""

    def __init__(
        self,
        frig: FuzzRig,
        expect: str,
        call_timeout: float,
        restore: Callable[[Rig], None] | None,
        log: Callable[[str], None] | None,
    ):
        self.frig = frig
        self.rig = frig.rig
        self.vm = frig.rig.vm
        self.expect = expect
        self.call_timeout = call_timeout
        self.restore = restore
        self.log = log or (lambda s: None)
        self.report = FuzzReport(expect, str(self.vm.binary), not_proven=list(frig.not_proven))
        self.counter = itertools.count()
        self.made: list[Path] = []
        self.prev: Observation | None = None
        self.dead = False

    # -- observing

    def observe(self) -> Observation:
        alive = self.vm.is_running()
        status: str | None = None
        note = ""
        if alive:
            try:
                status = str(self.vm.cmd("query-status", timeout=STATUS_TIMEOUT)["status"])
            except (VMError, QMPError, OSError, EOFError) as e:
                alive = isinstance(e, VMCommandError)
                note = f"monitor lost (query-status: {e!r}), QEMU still running"
                if not alive:
                    # A dying QEMU closes the monitor a moment before it is
                    # gone: wait, to report its signal and last words.
                    with contextlib.suppress(VMError):
                        self.vm.wait_for_exit(3)
        if not self.vm.is_running():
            alive = False
            rc: int | str = "?"
            with contextlib.suppress(VMError):
                rc = self.vm.wait_for_exit(1)
            note = f"QEMU exited, {_exit_text(rc)}: {stderr_tail(self.rig)}"
        digests = {p.name: file_digest(p) for p in self.frig.images}
        locks = {p.name: held_lock_bytes(p) for p in self.frig.images}
        frames = len(self.rig.capture.datagrams()) if self.rig.capture is not None else 0
        return Observation(
            alive,
            status,
            len(self.rig.records()),
            digests,
            locks,
            len(self.rig.listener.datagrams()),
            frames,
            note,
        )

    # -- scratch paths

    def materialize(self, obj: Any, command: str) -> Any:
        if isinstance(obj, Fresh):
            return f"fz{next(self.counter)}"
        if isinstance(obj, Scratch):
            n = next(self.counter)
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", command)[:40]
            if obj.kind in ("sock", "unix-uri"):
                p = self.frig.sock_dir / f"s{n}.sock"
            else:
                p = self.frig.scratch / f"{n:05d}-{safe}"
            if obj.kind == "dir":
                p.mkdir(parents=True, exist_ok=True)
            self.made.append(p)
            return {"file-uri": f"file:{p}", "unix-uri": f"unix:{p}"}.get(obj.kind, str(p))
        if isinstance(obj, dict):
            return {k: self.materialize(v, command) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.materialize(v, command) for v in obj]
        return obj

    def expand_line(self, line: str, command: str) -> str:
        for token, kind in (("{path}", "file"), ("{sock}", "sock")):
            while token in line:
                line = line.replace(token, str(self.materialize(Scratch(kind), command)), 1)
        return line

    def prune_scratch(self) -> None:
        for p in self.made:
            with contextlib.suppress(OSError):
                if p.is_file() and p.stat().st_size > SCRATCH_KEEP_BYTES:
                    p.unlink()
        self.made.clear()

    # -- calling

    def call(self, item: _Planned) -> CallResult:
        """One call, bounded; QEMU dying or hanging is a result, not a traceback."""
        t0 = time.monotonic()
        if item.kind in ("qmp", "replay"):
            args = self.materialize(item.payload, item.command)
            summary = json.dumps(args, sort_keys=True)
        else:
            args = self.expand_line(item.payload, item.command)
            summary = args
        res = CallResult(item.kind, item.command, summary, refused=False)
        try:
            if item.kind in ("qmp", "replay"):
                self.vm.cmd(item.command, args, timeout=self.call_timeout)
            else:
                out = self.vm.hmp(args, timeout=self.call_timeout).strip()
                res.refused = bool(_HMP_REFUSED_RX.search(out))
                res.error = out[:300] if res.refused else ""
        except VMCommandError as e:
            res.refused, res.error = True, f"{e.error_class}: {e.desc}"
        except VMTimeout:
            res.hung = True
            res.broken.append(f"hung: no answer within {self.call_timeout:.0f} s")
        except (VMError, QMPError, OSError, EOFError) as e:
            res.error = repr(e)[:300]
        res.seconds = time.monotonic() - t0
        res.payload = args
        return res

    def check(self, res: CallResult, settle: bool) -> None:
        """Measure the invariants after a call and attribute new breaks to it."""
        if settle:
            time.sleep(SETTLE_S)
        now = self.observe()
        assert self.prev is not None
        res.broken += breaks(self.prev, now, self.expect)
        res.alive = now.alive
        if not now.alive:
            self.dead = True
            self.report.crashes.append(
                f"after {res.kind} {res.command} {res.args[:200]}: {now.note}"
            )
        elif res.hung:
            # A second hang on a trivial query means the monitor is gone.
            try:
                self.vm.cmd("query-status", timeout=STATUS_TIMEOUT)
            except (VMError, QMPError, OSError, EOFError) as e:
                self.dead = True
                self.report.crashes.append(f"monitor unresponsive after {res.command}: {e!r}")
        self.prev = now
        if res.broken and not self.dead and self.restore is not None:
            # Negative control: put the stock VM back into its stopped,
            # inactive state so the next call is judged on its own.
            try:
                self.restore(self.rig)
            except (VMError, QMPError, OSError, EOFError) as e:
                res.broken.append(f"restore failed: {e!r}")
            after = self.observe()
            res.broken += [
                f"{b} (until restored)"
                for b in breaks(now, after, self.expect)
                if not b.startswith(("status", "lock"))
            ]
            self.prev = after
            if not after.alive:
                self.dead = True
                self.report.crashes.append(f"during restore after {res.command}: {after.note}")

    def replay_prelude(self, items: Sequence[tuple[int, _Planned]]) -> None:
        """Recreate a crashed rig's state: the prelude's calls again, refused
        ones included (a refusal can have side effects), without per-call
        checks; one observation at the end judges them together."""
        n = 0
        for index, item in items:
            if item.command not in PRELUDE:
                continue  # never replay a way out (cont ...), only the setup
            res = self.call(_Planned("replay", item.command, item.payload))
            n += 1
            if not self.vm.is_running():
                self.check(res, settle=False)
                self.report.calls.append(res)
                self.report.crashed_at.append(index)
                return
        self.prune_scratch()
        res = CallResult("setup", f"replay of {n} prelude calls", "", refused=True)
        if self.restore is not None:
            with contextlib.suppress(VMError, QMPError, OSError, EOFError):
                self.restore(self.rig)
        self.check(res, settle=True)
        if res.broken:
            self.report.calls.append(res)
            self.log(f"BROKE: {res.line()}")

    def run_one(self, item: _Planned, index: int = -1) -> None:
        res = self.call(item)
        was_dead = self.dead
        self.report.calls.append(res)
        self.check(res, settle=not res.refused and not _QUERY_RX.match(item.command))
        self.prune_scratch()
        if self.dead and not was_dead:
            self.report.crashed_at.append(index)
        if res.broken:
            self.log(f"BROKE: {res.line()}")
        if not self.dead and not res.refused:
            for probe in self.follow_ups(item, res):
                if self.dead:
                    break
                self.run_probe(*probe)

    # -- active write attempts after an accepted call

    def follow_ups(
        self, item: _Planned, res: CallResult
    ) -> list[tuple[str, str, Callable[[], bool]]]:
        args = res.payload
        out: list[tuple[str, str, Callable[[], bool]]] = []
        text = json.dumps(args) if not isinstance(args, str) else args
        if item.command in ("nbd-server-start", "nbd_server_start"):
            for m in re.finditer(rf"{re.escape(str(self.frig.sock_dir))}/s\d+\.sock", text):
                self.frig.nbd_sockets.append(Path(m.group(0)))
        exports: list[str] = []
        if item.command == "block-export-add" and isinstance(args, dict):
            exports.append(str(args.get("name") or args.get("node-name") or ""))
        elif item.command == "nbd-server-add" and isinstance(args, dict):
            exports.append(str(args.get("name") or args.get("device") or ""))
        elif item.command == "nbd_server_add" and isinstance(args, str):
            parts = [p for p in args.split()[1:] if not p.startswith("-")]
            exports.append(parts[-1] if parts else "")
        for name in (e for e in exports if e):
            for sock in list(self.frig.nbd_sockets):
                out.append(
                    (
                        "nbd-client-write",
                        f"{sock.name} export={name}",
                        functools.partial(self._nbd_write, sock, name),
                    )
                )
        if item.command in NET_CHANGING:
            # A link that came back up (or a new NIC) shows only once
            # something sends: ask every NIC to announce itself.
            out.append(("announce-self", "after an accepted network change", self._announce))
        if item.command == "gdbserver" and isinstance(args, str) and "unix:" in args:
            path = Path(args.split("unix:", 1)[1].split(",", 1)[0])
            out.append(("gdb-continue-step", path.name, functools.partial(self._gdb_run, path)))
        return out

    def _announce(self) -> bool:
        err = self.vm.try_cmd("announce-self", ANNOUNCE_ARGS, timeout=STATUS_TIMEOUT)
        time.sleep(0.1)  # the first RARP goes out after 'initial' ms
        return err is None

    def _nbd_write(self, sock: Path, export: str) -> bool:
        if not sock.exists():
            return False
        return nbd_client_write(self.rig.prefix, sock, export).wrote

    def _gdb_run(self, path: Path) -> bool:
        """Ask the gdbstub to continue, then to step; the invariants judge."""
        if not path.exists():
            return False
        gdb_continue_step(self.vm, path, wait_s=0.5)
        return True

    def run_probe(self, name: str, summary: str, fn: Callable[[], bool]) -> None:
        t0 = time.monotonic()
        res = CallResult("probe", name, summary, refused=True)
        try:
            res.refused = not fn()
        except (OSError, subprocess.SubprocessError, RigError) as e:
            res.error = repr(e)[:200]
        res.seconds = time.monotonic() - t0
        self.report.calls.append(res)
        self.check(res, settle=True)
        if res.broken:
            self.log(f"BROKE: {res.line()}")


def stderr_tail(rig: Rig, n: int = 2) -> str:
    """QEMU's last words (an assertion, an error) from its log, without the
    command line on top, the CPUID warnings and qemu-img style chatter."""
    try:
        lines = rig.vm.paths.qemu_log.read_text(errors="replace").splitlines()[1:]
    except OSError:
        return ""
    noise = ("Formatting '", "warning:", "qemu-system-x86_64: warning:")
    useful = [x.strip() for x in lines if x.strip() and not x.strip().startswith(noise)]
    return " | ".join(useful[-n:]) or "(nothing on stderr)"


def _exit_text(rc: int | str) -> str:
    if isinstance(rc, int) and rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
    return f"rc={rc}"


def plan_qmp(gen: ArgGenerator) -> list[_Planned]:
    names = [c for c in gen.commands() if c not in SKIP_QMP]
    order = {c: i for i, c in enumerate((*FIRST, *PRELUDE))}
    last = {c: i for i, c in enumerate(EPILOGUE)}
    names.sort(key=lambda c: (0, order[c]) if c in order else (2, last[c]) if c in last else (1, 0))
    return [_Planned("qmp", c, a) for c in names for a in gen.arg_sets(c)]


def plan_hmp(help_text: str, info_text: str, values: RigValues) -> list[_Planned]:
    cmds = [c for c in parse_hmp_help(help_text) if not set(c.aliases) & SKIP_HMP]
    cmds += parse_hmp_help(info_text, prefix="info")
    # Teardown-ish and run-ish ones last, like the QMP side.
    late = (
        "device_del",
        "netdev_del",
        "chardev-remove",
        "object_del",
        "drive_del",
        "nbd_server_stop",
        "eject",
        "migrate",
        "loadvm",
        "gdbserver",
    )
    cmds.sort(key=lambda c: (c.name in late, late.index(c.name) if c.name in late else 0))
    return [_Planned("hmp", c.name, line) for c in cmds for line in hmp_lines(c, values)]


@dataclass
class Deadlines:
    """When the QMP part must give way to HMP, and when everything stops."""

    qmp: float
    end: float

    @classmethod
    def from_budget(cls, budget_s: float, qmp_share: float = 0.6) -> Deadlines:
        now = time.monotonic()
        return cls(now + budget_s * qmp_share, now + budget_s)


@contextlib.contextmanager
def quiet_qmp_logging() -> Iterator[None]:
    """qemu.qmp logs every message, pretty-printed, at DEBUG: thousands of
    calls make that the bottleneck under a test runner that records DEBUG.
    The VM keeps its own one-line-per-message transcript (qmp.log)."""
    qlog = logging.getLogger("qemu.qmp")
    old = qlog.level
    qlog.setLevel(logging.INFO)
    try:
        yield
    finally:
        qlog.setLevel(old)


def run_fuzz(
    frig: FuzzRig,
    *,
    expect: str = "frozen",
    budget_s: float = 240.0,
    deadlines: Deadlines | None = None,
    start: int = 0,
    replay: Sequence[int] = (),
    stop: int | None = None,
    final: bool = True,
    quit_at_end: bool = True,
    call_timeout: float = CALL_TIMEOUT,
    restore: Callable[[Rig], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> FuzzReport:
    """Fuzz both monitors of the frozen (``expect="frozen"``) or stopped
    (``expect="stopped"``, the stock negative control) VM of ``frig``.

    The plan is QMP then HMP; QMP has until ``deadlines.qmp`` (its unused
    time goes to HMP) and everything ends at ``deadlines.end``; what is not
    reached is reported as not run.  After a crash the fuzz stops and
    reports, with ``next_index`` set so that a fresh rig can go on from the
    call after the crash (``start``).  ``restore`` (negative control only)
    runs after every call that broke something, to stop the VM again.
    ``final`` adds the write attempt through the export opened before the
    freeze and the late-writes check at the end of the plan; ``quit_at_end``
    then quits, which must end QEMU (the only way out of the frozen state).
    ``stop`` ends the plan early (to bisect).  ``replay`` lists calls (plan
    indices, from the prelude) to make first, as kind ``replay``: after a
    restart they recreate what the crashed rig had (objects, chardevs ...).
    """
    with quiet_qmp_logging():
        return _run_fuzz(
            frig,
            expect,
            deadlines or Deadlines.from_budget(budget_s),
            start,
            replay,
            stop,
            final,
            quit_at_end,
            call_timeout,
            restore,
            log,
        )


def _run_fuzz(
    frig: FuzzRig,
    expect: str,
    dl: Deadlines,
    start: int,
    replay: Sequence[int],
    stop: int | None,
    final: bool,
    quit_at_end: bool,
    call_timeout: float,
    restore: Callable[[Rig], None] | None,
    log: Callable[[str], None] | None,
) -> FuzzReport:
    t0 = time.monotonic()
    fz = _Fuzzer(frig, expect, call_timeout, restore, log)
    vm = frig.rig.vm
    frig.scratch.mkdir(parents=True, exist_ok=True)
    gen = ArgGenerator(vm.cmd("query-qmp-schema"), frig.values)
    plan = plan_qmp(gen)
    n_qmp = len(plan)
    plan += plan_hmp(vm.hmp("help"), vm.hmp("help info"), frig.values)
    plan = plan[:stop] if stop is not None else plan
    fz.report.prelude_size = sum(
        1 for it in plan if it.kind == "qmp" and it.command in (*FIRST, *PRELUDE)
    )
    fz.report.plan_size = len(plan)
    fz.report.skipped = sorted(SKIP_QMP | SKIP_HMP)
    # Serial output of the last record may still be in flight after the stop.
    time.sleep(0.5)
    first = fz.observe()
    clean = Observation(
        True,
        "frozen" if expect == "frozen" else "paused",
        first.records,
        first.digests,
        {k: [] for k in first.locks},
        first.datagrams,
        first.frames,
    )
    setup = CallResult("setup", "state before the fuzz", f"(from call {start})", refused=True)
    setup.broken = breaks(clean, first, expect)
    fz.prev = first
    fz.report.traffic_before = (first.frames, first.datagrams)
    if setup.broken:
        fz.report.calls.append(setup)
        fz.log(f"BROKE: {setup.line()}")
    fz.dead = not first.alive
    before = dict(first.digests)

    if replay:
        fz.replay_prelude([(j, plan[j]) for j in replay if j < len(plan)])
    if fz.dead:
        # A replayed call crashed this time: go on after it, not before.
        fz.report.next_index = start
    i = start
    while i < len(plan) and not fz.dead:
        now = time.monotonic()
        if now > dl.end:
            break
        if i < n_qmp and now > dl.qmp:
            _not_run(fz.report, plan[i:n_qmp])
            i = n_qmp
            continue
        fz.run_one(plan[i], index=i)
        i += 1
    if fz.dead and fz.report.next_index is None:
        fz.report.next_index = i if i < len(plan) else None
        _not_run(fz.report, plan[i:])
    else:
        _not_run(fz.report, plan[i:])
        if final:
            # The proof's write-path table, each row judged by the
            # invariants; the export opened before the freeze comes last
            # (on stock its write may abort QEMU).
            for path in WRITE_PATHS:
                if fz.dead:
                    break
                if path.name != "NBD write via open export" and path.applies(fz.rig):
                    fz.run_probe("write-path", path.name, functools.partial(_went, path, fz.rig))
            for sock in frig.nbd_sockets[:1]:
                if fz.dead:
                    break
                fz.run_probe(
                    "nbd-client-write",
                    f"{sock.name} export=pre (opened before)",
                    functools.partial(fz._nbd_write, sock, "pre"),
                )
    if not fz.dead and final:
        time.sleep(2.0)  # late writers (jobs, detached dumps) get their chance
        tail = CallResult("setup", "after the fuzz (2 s later)", "", refused=True)
        now_obs = fz.observe()
        tail.broken = breaks(fz.prev, now_obs, expect) if fz.prev else []
        if tail.broken:
            fz.report.calls.append(tail)
        fz.report.changed_overall = [k for k, d in now_obs.digests.items() if before.get(k) != d]
        if quit_at_end and now_obs.alive:
            fz.report.calls.append(quit_check(frig))
    fz.report.elapsed = time.monotonic() - t0
    return fz.report


def _went(path: WritePath, rig: Rig) -> bool:
    """A table row as a fuzz probe: True when QEMU did not refuse it."""
    try:
        out = path.attempt(rig)
    except VMCommandError:
        return False
    except VMError:
        return True  # QEMU died inside it: the next observation reports how
    return not out.refused


QUIT_TIMEOUT = 15.0


def quit_check(frig: FuzzRig) -> CallResult:
    """``quit`` after the fuzz: QEMU must exit.  If it hangs, the threads'
    backtraces (gdb, when installed) go to a file in the VM's log dir."""
    vm = frig.rig.vm
    res = CallResult("qmp", "quit", "{} (last: the only way out)", refused=False)
    t0 = time.monotonic()
    try:
        vm.cmd("quit", timeout=STATUS_TIMEOUT)
    except VMCommandError as e:
        res.refused, res.error = True, f"{e.error_class}: {e.desc}"
    except (VMError, QMPError, OSError, EOFError) as e:
        res.error = repr(e)[:200]  # the monitor may close before the answer
    try:
        rc = vm.wait_for_exit(QUIT_TIMEOUT)
    except VMError:
        where = quit_hang_backtrace(vm.pid, vm.paths.log_dir / "quit-hang-backtrace.txt")
        res.broken.append(f"quit: QEMU still running {QUIT_TIMEOUT:.0f} s after quit; {where}")
        res.hung = True
    else:
        if rc != 0:
            res.broken.append(f"quit: QEMU exited {_exit_text(rc)}: {stderr_tail(frig.rig)}")
    res.seconds = time.monotonic() - t0
    return res


def quit_hang_backtrace(pid: int, out: Path) -> str:
    """Every thread's stack of a hung QEMU; returns where it is written and
    the main thread's innermost QEMU frames."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return "no gdb for a backtrace"
    try:
        r = subprocess.run(
            [gdb, "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt"],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    except subprocess.SubprocessError as e:
        return f"gdb failed: {e!r}"
    out.write_text(r.stdout + r.stderr)
    # Thread 1 is the main loop; name its first frames that are QEMU's own.
    main = r.stdout.split("\nThread 1 ", 1)[-1]
    frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+) \(.*?\) at (\S+)", main, re.M)
    # QEMU's sources are "../dir/file.c"; glibc's "./nptl/..." or "../sysdeps/...".
    own = [(fn, loc) for fn, loc in frames if loc.startswith("../") and "sysdeps" not in loc]
    top = " <- ".join(f"{fn} ({loc.rsplit('/', 1)[-1]})" for fn, loc in own[:5])
    return f"main thread: {top or 'no symbols'}; all threads in {out}"


def _not_run(report: FuzzReport, items: Sequence[_Planned]) -> None:
    for it in items:
        key = f"{it.kind}:{it.command}"
        report.not_run[key] = report.not_run.get(key, 0) + 1


def fuzz_with_restarts(
    boot: Callable[[], contextlib.AbstractContextManager[FuzzRig]],
    prepare: Callable[[FuzzRig], Callable[[Rig], None] | None],
    *,
    expect: str,
    budget_s: float = 240.0,
    max_restarts: int = 30,
    log: Callable[[str], None] | None = None,
) -> FuzzReport:
    """Run the fuzz; after each crash boot a fresh rig (``boot``), bring it
    into the state under test (``prepare``, which returns the restore hook)
    and go on from the call after the crash, within one budget.

    Every crash is listed; only the last segment's unreached calls count as
    not run.
    """
    dl = Deadlines.from_budget(budget_s)
    merged: FuzzReport | None = None
    start = 0
    for _segment in range(max_restarts + 1):
        with boot() as frig:
            try:
                restore = prepare(frig)
                # The prelude (objects, chardevs, nodes ...) rebuilds what
                # later calls found on the crashed rig.
                crashed = set(merged.crashed_at) if merged else set()
                size = min(start, merged.prelude_size) if merged else 0
                replay = [j for j in range(size) if j not in crashed]
                r = run_fuzz(
                    frig,
                    expect=expect,
                    deadlines=dl,
                    start=start,
                    replay=replay,
                    restore=restore,
                    log=log,
                )
            except BaseException:
                frig.rig.vm.mark_failed()
                raise
            if r.failures or r.crashes:
                frig.rig.vm.mark_failed()
        merged = r if merged is None else merged.merge(r)
        if r.next_index is None or time.monotonic() > dl.end:
            break
        start = r.next_index
        if log:
            log(f"restarting after a crash, from call {start} of {r.plan_size}")
    assert merged is not None
    return merged


def stock_restore(rig: Rig) -> None:
    """Make a stock VM stopped with inactive nodes again (negative control).

    Jobs are cancelled and exports removed first: either keeps its node
    active, so inactivation would fail.
    """
    vm = rig.vm
    for job in vm.cmd("query-block-jobs", timeout=STATUS_TIMEOUT):
        with contextlib.suppress(VMCommandError):
            vm.cmd("block-job-cancel", device=job["device"], force=True, timeout=STATUS_TIMEOUT)
    if vm.status() == "running":
        vm.cmd("stop", timeout=STATUS_TIMEOUT)
    _del_exports(vm)
    with contextlib.suppress(VMCommandError):
        vm.cmd("blockdev-set-active", active=False, timeout=STATUS_TIMEOUT)
    time.sleep(0.2)


def _del_exports(vm: VM) -> None:
    for exp in vm.cmd("query-block-exports", timeout=STATUS_TIMEOUT):
        with contextlib.suppress(VMCommandError):
            vm.cmd("block-export-del", id=exp["id"], mode="hard", timeout=STATUS_TIMEOUT)
    deadline = time.monotonic() + 5
    while vm.cmd("query-block-exports", timeout=STATUS_TIMEOUT) and time.monotonic() < deadline:
        time.sleep(0.05)


def stock_imitation(rig: Rig) -> None:
    """The best a stock QEMU can do: stop, links down, inactivate every node.

    A writable export keeps its node active (inactivation fails with EPERM),
    so the exports go first; the NBD server stays.
    """
    vm = rig.vm
    vm.cmd("stop")
    vm.event_wait("STOP", 5)
    for nic in (NIC_ID, "nic1"):
        with contextlib.suppress(VMCommandError):
            vm.cmd("set_link", {"name": nic, "up": False})
    _del_exports(vm)
    vm.cmd("blockdev-set-active", active=False)
