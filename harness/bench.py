"""Benchmarks that measure QEMU, not the harness: freeze against stock, in one run.

Method (what makes the figures QEMU's and not the client's or the machine's):

* each side runs on its own binary: the patched QEMU for ``freeze``, the stock
  QEMU (same tree, same options, no series) for ``stop``, the scripted stock
  equivalent and ``-action ...=pause``;
* repetitions are interleaved (frozen, stock, frozen, stock ...), one fresh VM
  per sample, so a load change on this shared machine hits both sides alike;
  every figure is a median with its min-max over the repetitions;
* the timed commands go through a lean raw-socket QMP client (``LeanQMP``) on
  a second monitor of the VM; the same client's round trip of a no-op
  (``query-status``) is measured on the same VM just before: the *client
  floor*, printed beside every latency (and the harness's own qemu.qmp client
  floor once, to show why it is not used for timing);
* the lock figure comes from a real standby: a second process blocked in
  ``F_OFD_SETLKW`` on the bytes a writer needs (``Standby``), verified blocked
  in the kernel (``/proc/locks``) before the command is sent; it stamps the
  moment it gets the lock on its own CLOCK_MONOTONIC.

Sections: ``idle`` (freeze / stop / script, lock free), ``scaling`` (1, 8, 24
disks raw and qcow2; 1 and 4 NICs), ``memory`` (freeze flat in RAM against
``dump-guest-memory``), ``load`` (mirror throttled and unthrottled mid-copy, a
running backup, the guest writing back to back), ``failover`` (guest panic /
watchdog until a standby has the lock: ``=freeze`` against ``=pause`` +
``quit``), ``steady`` (CPU and RSS while frozen, against a stopped stock
QEMU), ``builds``.  Under a job the stock side is timed twice: the plain
script, and the script with ``block-job-cancel`` first (the plain one fails
with a backup running, and may crash stock QEMU with a mirror running).

``pacemaker`` runs a real two-node Pacemaker/corosync cluster (harness.cluster)
and times a guest panic until the service's first write on node 2: the frozen
agent with ``on_crash=freeze`` on the patched QEMU against the stock agent on
stock QEMU with ``on_crash=destroy`` and ``=preserve``, interleaved, and records
whether node 1 kept the guest's memory.  ``add_pacemaker()`` puts figures
measured elsewhere into a bench.json.  Targets are printed next to the
figures (met / not met); nothing here is a pass/fail test.  ``--trace`` and
``--strace`` show where a command's time goes (and slow QEMU down).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import build, config, guest, patches
from harness.observe import Standby, StandbyError, job_progress, monotonic_to_wall
from harness.progress import say
from harness.rig import NIC_ID, Rig, create_image
from harness.scenario import FREEZE_EVENT_TIMEOUT, default_accel
from harness.vm import VMTimeout

MEMORY_SIZES_MB = (512, 2048, 4096, 8192)
DISK_COUNTS = (1, 8, 24)
NIC_COUNTS = (1, 4)
FORMATS = ("raw", "qcow2")
LOAD_MB = 512
MIRROR_SPEED_MB = 200  # the throttled mirror/backup, MiB/s
LOADS = ("mirror-throttled", "mirror", "backup", "writes")
JOB_LOADS = ("mirror-throttled", "mirror", "backup")
MID_COPY_ATTEMPTS = 3
SECTIONS = ("idle", "scaling", "memory", "load", "failover", "pacemaker", "steady", "builds")
#: (label, OCF provider, on_crash, QEMU side) of the Pacemaker failover rows;
#: "stock" is the agent's usual setting, "stock_preserve" keeps a crashed domain
PACEMAKER_ROWS = (
    ("frozen", "frozen", "freeze", "frozen"),
    ("stock", "stock", "destroy", "stock"),
    ("stock_preserve", "stock", "preserve", "stock"),
)
LOCK_TIMEOUT = 30.0
STEADY_WINDOW_S = 60.0
FLOOR_SAMPLES = 5
GIL_SWITCH_S = 1e-4
#: "Flat in RAM": freeze at the largest size within this factor of the smallest.
FLAT_RAM_LIMIT = 1.2

# -- statistics and verdicts ----------------------------------------------------


@dataclass(frozen=True)
class Stat:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    @classmethod
    def load(cls, value: Stat | Mapping[str, Any]) -> Stat:
        """A Stat from itself or from its JSON form."""
        if isinstance(value, Stat):
            return value
        return cls(
            float(value["median"]), float(value["min"]), float(value["max"]), int(value["n"])
        )

    def ms(self) -> str:
        return f"{self.median * 1e3:8.1f} ms [{self.min * 1e3:.1f}-{self.max * 1e3:.1f}]"

    def md(self) -> str:
        """Markdown cell: median (min-max), in ms with a precision that fits."""
        digits = 2 if self.max < 0.01 else 1 if self.max < 1 else 0
        return (
            f"{self.median * 1e3:.{digits}f} ({self.min * 1e3:.{digits}f}-"
            f"{self.max * 1e3:.{digits}f})"
        )


def stat_or_none(samples: Sequence[float | None]) -> Stat | None:
    vals = [s for s in samples if s is not None]
    return Stat.of(vals) if vals else None


def ratio(a: Stat | Mapping[str, Any] | None, b: Stat | Mapping[str, Any] | None) -> float | None:
    """median(a) / median(b), None when either is missing or b is zero."""
    if a is None or b is None:
        return None
    den = Stat.load(b).median
    return Stat.load(a).median / den if den else None


@dataclass(frozen=True)
class Target:
    """One target of the issue: `value` against `limit` (value <= limit is met)."""

    name: str
    value: float | None
    limit: float | None
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or self.limit is None:
            return None
        return self.value <= self.limit

    @property
    def verdict(self) -> str:
        return {True: "met", False: "not met", None: "pending"}[self.met]

    def line(self) -> str:
        value = "-" if self.value is None else f"{self.value:.3f}"
        limit = "-" if self.limit is None else f"{self.limit:.3f}"
        return f"{self.name:44s} {value:>7s} <= {limit:<6s} {self.verdict:8s} {self.detail}"


def _get(d: Mapping[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def targets(result: Mapping[str, Any]) -> list[Target]:
    """The issue's targets from a result (live or loaded from JSON)."""
    out: list[Target] = []

    def lat(block: Any, action: str) -> Any:
        return _get(block, action, "latency")

    idle = result.get("idle")
    if idle:
        r = ratio(lat(idle, "freeze"), lat(idle, "stop"))
        out.append(Target("freeze <= 1.1x stop, idle", r, 1.1, "freeze / stop"))
        r = ratio(_get(idle, "freeze", "lock_free"), lat(idle, "freeze"))
        out.append(Target("lock free <= freeze, idle", r, 1.0, "standby has the lock / FROZEN"))
    for load, row in (result.get("load") or {}).items():
        r = ratio(lat(row, "freeze"), lat(row, "stop"))
        out.append(Target(f"freeze <= 1.2x stop, {load}", r, 1.2, "freeze / stop"))
        r = ratio(_get(row, "freeze", "lock_free"), lat(row, "freeze"))
        out.append(Target(f"lock free <= freeze, {load}", r, 1.0, "standby has the lock / FROZEN"))
    scaling = result.get("scaling") or {}
    for fmt, rows in (scaling.get("disks") or {}).items():
        counts = sorted(rows, key=int)
        if len(counts) < 2:
            continue
        lo, hi = rows[counts[0]], rows[counts[-1]]
        f = ratio(lat(hi, "freeze"), lat(lo, "freeze"))
        s = ratio(lat(hi, "script"), lat(lo, "script"))
        name = f"freeze({counts[-1]})/freeze({counts[0]}) <= script, {fmt}"
        out.append(Target(name, f, s, "disk scaling ratio against the script's"))
    curve = (result.get("memory") or {}).get("curve")
    if curve:
        # Flat: the slowest size's median within FLAT_RAM_LIMIT of the fastest's.
        medians = {mb: Stat.load(r["freeze"]).median for mb, r in curve.items()}
        hi_mb = max(medians, key=medians.__getitem__)
        lo_mb = min(medians, key=medians.__getitem__)
        r = ratio(curve[hi_mb]["freeze"], curve[lo_mb]["freeze"])
        detail = f"slowest freeze ({hi_mb} MB) / fastest ({lo_mb} MB)"
        out.append(Target("freeze flat in RAM", r, FLAT_RAM_LIMIT, detail))
    pm = result.get("pacemaker")
    r = ratio(_get(pm, "frozen"), _get(pm, "stock"))
    detail = "stock agent, on_crash=destroy" if pm else "pacemaker section not run"
    out.append(Target("failover frozen <= stock (Pacemaker)", r, 1.0 if pm else None, detail))
    preserve = _get(pm, "rows", "stock_preserve", "seconds")
    if preserve:
        r = ratio(_get(pm, "frozen"), preserve)
        detail = "stock agent, on_crash=preserve"
        out.append(Target("failover frozen <= stock preserve (Pacemaker)", r, 1.0, detail))
    return out


# -- a lean QMP client ------------------------------------------------------------


class LeanQMPError(Exception):
    """QMP answered with an error, or the connection failed."""

    def __init__(self, command: str, error: Mapping[str, Any] | str):
        text = error if isinstance(error, str) else f"{error.get('class')}: {error.get('desc')}"
        super().__init__(f"{command}: {text}")
        self.command = command
        self.error = error


class LeanQMP:
    """A minimal blocking QMP client on a unix socket: one request at a time.

    No threads, no asyncio, no logging on the timed path: a command is one
    ``sendall`` and reads until the reply with its id; events read meanwhile
    are kept with their arrival time (``time.monotonic()``).
    """

    def __init__(self, path: Path | str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""
        self._id = 0
        #: (arrival monotonic time, event) in arrival order
        self.events: list[tuple[float, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.01)
        try:
            self.greeting = self._read(deadline)
            if "QMP" not in self.greeting:
                raise LeanQMPError("greeting", f"not a QMP greeting: {self.greeting}")
            self.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LeanQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, deadline: float) -> dict[str, Any]:
        """The next message (QEMU ends each with CRLF)."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no QMP message in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise LeanQMPError("read", "connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise LeanQMPError("read", f"not a QMP message: {line!r}")
        return msg

    def send(self, name: str, args: Mapping[str, Any] | None = None) -> tuple[int, float]:
        """Send one command; returns its id and the monotonic time just before sending."""
        self._id += 1
        req: dict[str, Any] = {"execute": name, "id": self._id}
        if args:
            req["arguments"] = dict(args)
        data = json.dumps(req).encode() + b"\n"
        start = time.monotonic()
        self.sock.sendall(data)
        return self._id, start

    def reply(self, name: str, cid: int, timeout: float = 30.0) -> tuple[Any, float]:
        """Wait for the reply to `cid`; returns its value and its arrival time."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(deadline)
            now = time.monotonic()
            if "event" in msg:
                self.events.append((now, msg))
            elif msg.get("id") == cid:
                if "error" in msg:
                    raise LeanQMPError(name, msg["error"])
                return msg.get("return"), now

    def execute(
        self, name: str, args: Mapping[str, Any] | None = None, timeout: float = 30.0
    ) -> Any:
        cid, _ = self.send(name, args)
        return self.reply(name, cid, timeout)[0]

    def timed(
        self, name: str, args: Mapping[str, Any] | None = None, timeout: float = 30.0
    ) -> tuple[float, Any]:
        """Seconds from send to reply, and the reply."""
        cid, start = self.send(name, args)
        value, end = self.reply(name, cid, timeout)
        return end - start, value

    def wait_event(
        self, name: str | Sequence[str], timeout: float, after: float = 0.0
    ) -> tuple[float, dict]:
        """The first event `name` (or any of the names) that arrived at or
        after `after`, and its arrival time."""
        names = (name,) if isinstance(name, str) else tuple(name)
        deadline = time.monotonic() + timeout
        while True:
            for at, ev in self.events:
                if ev.get("event") in names and at >= after:
                    return at, ev
            msg = self._read(deadline)
            if "event" in msg:
                self.events.append((time.monotonic(), msg))

    def floor(self, samples: int = FLOOR_SAMPLES) -> float:
        """Median round trip of the no-op ``query-status``: this client's floor."""
        return statistics.median(self.timed("query-status")[0] for _ in range(samples))


def qmp2_args(path: Path) -> list[str]:
    """A second QMP monitor (QEMU listens) for the lean client."""
    return [
        "-chardev",
        f"socket,id=qmp2,path={path},server=on,wait=off",
        "-mon",
        "chardev=qmp2,mode=control",
    ]


# -- VMs for the benchmarks --------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What a benchmark VM has beyond the probe guest's own disk and NIC."""

    disks: int = 1
    fmt: str = "raw"
    nics: int = 1
    ram_mb: int | None = None
    load_image: Path | None = None  # attached as node "load0" for the jobs
    guest: Mapping[str, Any] = field(default_factory=dict)
    actions: Mapping[str, str] = field(default_factory=dict)


def layout_args(layout: Layout, workdir: Path, prefix: Path) -> list[str]:
    """Extra disks (1 MiB, same format), NICs, RAM and the load disk of `layout`."""
    args: list[str] = []
    for i in range(1, layout.disks):
        image = workdir / f"disk{i}.{layout.fmt}"
        create_image(prefix, image, layout.fmt)
        node = {
            "driver": layout.fmt,
            "node-name": f"disk{i}",
            "file": {"driver": "file", "filename": str(image)},
        }
        args += [
            "-blockdev",
            json.dumps(node),
            "-device",
            f"virtio-blk-pci,drive=disk{i},id=vblk{i}",
        ]
    for i in range(1, layout.nics):
        args += [
            "-netdev",
            f"user,id=net{i}",
            "-device",
            f"virtio-net-pci,netdev=net{i},id=nic{i},romfile=",
        ]
    if layout.load_image is not None:
        node = {
            "driver": "raw",
            "node-name": "load0",
            "file": {"driver": "file", "filename": str(layout.load_image)},
        }
        args += ["-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=load0,id=vblkload"]
    if layout.ram_mb is not None:
        args += ["-m", str(layout.ram_mb), "-mem-prealloc"]
    return args


def nic_ids(layout: Layout) -> list[str]:
    return [NIC_ID, *(f"nic{i}" for i in range(1, layout.nics))]


@dataclass
class Box:
    """One benchmark VM: the harness rig and the lean client on its second monitor."""

    rig: Rig
    qmp: LeanQMP
    layout: Layout
    side: str


def fill_image(path: Path, mb: int) -> None:
    """A raw image of `mb` MiB of non-zero data (a job has to copy every byte)."""
    block = bytes(range(256)) * 4096  # 1 MiB, no zero detection shortcut
    with open(path, "wb") as f:
        for i in range(mb):
            f.write(block[i % 256 :] + block[: i % 256])
        f.flush()
        os.fsync(f.fileno())


# -- the benchmarks -----------------------------------------------------------------


@dataclass
class Bench:
    stock: Path
    frozen: Path
    workdir: Path
    reps: int
    accel: str
    load_mb: int = LOAD_MB
    speed_mb: int = MIRROR_SPEED_MB
    steady_s: float = STEADY_WINDOW_S
    #: QEMU trace event patterns (-trace enable=...), logged with timestamps
    #: to each VM's qemu.log (the log backend) to see where a command's time goes
    trace: Sequence[str] = ()
    #: attach strace (STRACE_SYSCALLS, -tt -T) to QEMU just before each
    #: command: a diagnostic that shows which syscalls a command waits for,
    #: and slows those syscalls down; never for figures
    strace: bool = False
    #: the patched libvirt's prefix: the nodes' virtqemud in the pacemaker section
    libvirt: Path | None = None
    #: the harness client's no-op round trip, one per VM (for the header only)
    harness_floors: list[float] = field(default_factory=list)
    _serial: int = 0

    def prefix(self, side: str) -> Path:
        return {"frozen": self.frozen, "stock": self.stock}[side]

    @contextlib.contextmanager
    def box(self, side: str, name: str, layout: Layout = Layout()) -> Iterator[Box]:
        """Boot a probe VM on `side`'s binary with `layout`; always torn down."""
        self._serial += 1
        workdir = self.workdir / f"{self._serial:04d}-{side}-{name}"
        workdir.mkdir(parents=True, exist_ok=True)
        sock_dir = Path(tempfile.mkdtemp(prefix="fzb-"))  # short: sun_path is 108 bytes
        extra = [*layout_args(layout, workdir, self.prefix(side)), *qmp2_args(sock_dir / "q")]
        for pattern in self.trace:
            extra += ["-trace", f"enable={pattern}"]
        if self.trace:
            extra += ["-msg", "timestamp=on"]  # the log backend's pid@seconds prefix
        timeout = 120.0 if layout.ram_mb and layout.ram_mb > 1024 else 30.0
        try:
            rig_cm = guest.probe_rig(
                self.prefix(side),
                workdir,
                accel=self.accel,
                disk_format=layout.fmt,
                extra_args=extra,
                actions=layout.actions,
                guest_options=dict(layout.guest),
                first_record_timeout=timeout,
            )
            with rig_cm as rig, LeanQMP(sock_dir / "q") as qmp:
                start = time.monotonic()
                rig.vm.cmd("query-status")
                self.harness_floors.append(time.monotonic() - start)
                yield Box(rig, qmp, layout, side)
        finally:
            shutil.rmtree(sock_dir, ignore_errors=True)
            for image in workdir.glob("*.raw"):
                image.unlink()  # the large ones: targets of jobs
            for image in workdir.glob("*.qcow2"):
                image.unlink()

    # -- the commands under test --------------------------------------------

    @staticmethod
    def act(box: Box, action: str) -> tuple[float, float]:
        """Run `action` with the lean client: (monotonic send time, seconds to done)."""
        q = box.qmp
        if action == "freeze":
            cid, start = q.send("freeze")
            q.reply("freeze", cid, FREEZE_EVENT_TIMEOUT)
            at, _ = q.wait_event("FROZEN", FREEZE_EVENT_TIMEOUT, after=start)
            return start, at - start
        if action == "stop":
            cid, start = q.send("stop")
            return start, q.reply("stop", cid)[1] - start
        if action in ("script", "script-cancel"):
            cid, start = q.send("stop")
            q.reply("stop", cid)
            if action == "script-cancel":
                # What a stock client must do first for the inactivation to
                # work (and not crash QEMU, under a mirror): end the job.
                q.execute("block-job-cancel", {"device": "job0", "force": True})
                q.wait_event(
                    ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), LOCK_TIMEOUT, after=start
                )
            for nic in nic_ids(box.layout):
                q.execute("set_link", {"name": nic, "up": False})
            cid, _ = q.send("blockdev-set-active", {"active": False})
            return start, q.reply("blockdev-set-active", cid)[1] - start
        raise ValueError(f"unknown action {action!r}")

    def sample(
        self,
        side: str,
        action: str,
        name: str,
        layout: Layout = Layout(),
        load: str | None = None,
        standby: bool = True,
    ) -> dict[str, Any]:
        """One fresh VM, one command: latency, client floor, lock free, job state.

        Order: client floor, standby blocked on the lock (the VM holds it from
        boot), load started, job offset checked, command sent at once.
        """
        out: dict[str, Any] = {"side": side, "action": action}
        job = load in JOB_LOADS
        with self.box(side, name, layout) as box:
            out["floor"] = box.qmp.floor()
            image = layout.load_image if job else box.rig.image
            assert image is not None
            with Standby(image) as sb, contextlib.ExitStack() as stack:
                if standby:
                    sb.start()
                if load is not None:
                    out.update(self.start_load(box, load))
                if self.strace:
                    stack.enter_context(
                        strace_attached(box.rig.vm.pid, box.rig.workdir / "strace.log")
                    )
                if job:
                    job_now = job_progress(box.qmp.execute)
                    out["job_status"] = job_now.status
                    out["job_offset_frac"] = job_now.done / job_now.total if job_now.total else None
                    out["mid_copy"] = job_now.mid_copy
                try:
                    send, out["latency"] = self.act(box, action)
                    # Wall clock of the send, to line up with QEMU's --trace timestamps
                    out["send_wall"] = monotonic_to_wall(send)
                except (LeanQMPError, OSError, TimeoutError) as e:
                    out["latency"], out["error"] = None, f"{action}: {e}"
                    with contextlib.suppress(VMTimeout):
                        rc = box.rig.vm.wait_for_exit(2)
                        out["error"] += f" (QEMU died, rc {rc}: "
                        out["error"] += f"{_last_line(box.rig.vm.paths.qemu_log)})"
                    return out
                if standby:
                    try:
                        out["lock_free"] = sb.acquired(LOCK_TIMEOUT) - send
                    except StandbyError as e:
                        out["lock_free"], out["lock_error"] = None, str(e)
        return out

    def start_load(self, box: Box, load: str) -> dict[str, Any]:
        q = box.qmp
        if load == "writes":
            last = box.rig.last_record()
            box.rig.wait_record(last + 5, 10)
            return {"records_before": box.rig.last_record()}
        target = box.rig.workdir / "target.raw"
        create_image(self.prefix(box.side), target, "raw", self.load_mb << 20)
        q.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "tgt0",
                "file": {"driver": "file", "filename": str(target)},
            },
        )
        args: dict[str, Any] = {
            "job-id": "job0",
            "device": "load0",
            "target": "tgt0",
            "sync": "full",
        }
        if load in ("mirror-throttled", "backup"):
            args["speed"] = self.speed_mb << 20
        q.execute("blockdev-mirror" if load.startswith("mirror") else "blockdev-backup", args)
        deadline = time.monotonic() + 10
        while job_progress(q.execute).done == 0:  # wait until the job has data in flight
            if time.monotonic() > deadline:
                raise LeanQMPError(load, "job made no progress in 10 s")
            time.sleep(0.005)
        return {"load": load}

    def pair(
        self,
        name: str,
        sides: Sequence[tuple[str, str]],
        layout: Layout = Layout(),
        load: str | None = None,
    ) -> dict[str, Any]:
        """Interleaved samples of (side, action) pairs; per action: latency, floor, lock.

        A job sample whose job was not mid-copy when the command went is
        taken again on a fresh VM (MID_COPY_ATTEMPTS in all), and kept, flagged,
        if it never was.
        """
        runs: dict[str, list[dict[str, Any]]] = {action: [] for _, action in sides}
        for i in range(self.reps):
            for side, action in sides:
                for attempt in range(1, MID_COPY_ATTEMPTS + 1):
                    say(f"bench: {name} {action} ({side}) {i + 1}/{self.reps}")
                    s = self.sample(
                        side,
                        action,
                        f"{name}-{action}-{i}-{attempt}",
                        layout,
                        load,
                        standby=action != "stop",
                    )
                    s["attempts"] = attempt
                    if s.get("mid_copy", True):
                        break
                runs[action].append(s)
        return {action: summarize(samples) for action, samples in runs.items()}

    # -- sections ------------------------------------------------------------

    def idle(self) -> dict[str, Any]:
        return self.pair("idle", (("frozen", "freeze"), ("stock", "stop"), ("stock", "script")))

    def scaling(
        self, disks: Sequence[int], nics: Sequence[int], formats: Sequence[str]
    ) -> dict[str, Any]:
        sides = (("frozen", "freeze"), ("stock", "script"))
        out: dict[str, Any] = {"disks": {}, "nics": {}}
        for fmt in formats:
            out["disks"][fmt] = {
                n: self.pair(f"disks{n}-{fmt}", sides, Layout(disks=n, fmt=fmt)) for n in disks
            }
        for n in nics:
            out["nics"][n] = self.pair(f"nics{n}", sides, Layout(nics=n))
        return out

    def memory(self, sizes: Sequence[int]) -> dict[str, Any]:
        """freeze (frozen) against stop + dump-guest-memory (stock), per RAM size."""
        curve: dict[int, dict[str, Any]] = {}
        for mb in sizes:
            frozen: list[float] = []
            dumped: list[float] = []
            floors: list[float] = []
            for i in range(self.reps):
                say(f"bench: {mb} MB guest {i + 1}/{self.reps}")
                with self.box("frozen", f"mem{mb}-{i}", Layout(ram_mb=mb)) as box:
                    floors.append(box.qmp.floor())
                    frozen.append(self.act(box, "freeze")[1])
                with self.box("stock", f"dump{mb}-{i}", Layout(ram_mb=mb)) as box:
                    floors.append(box.qmp.floor())
                    box.qmp.execute("stop")
                    dump = box.rig.workdir / "dump.elf"
                    took, _ = box.qmp.timed(
                        "dump-guest-memory",
                        {"paging": False, "protocol": f"file:{dump}"},
                        timeout=600,
                    )
                    dumped.append(took)
                    dump.unlink()
            curve[mb] = {
                "freeze": Stat.of(frozen),
                "dump": Stat.of(dumped),
                "floor": Stat.of(floors),
            }
        return {"curve": curve}

    def load(self, loads: Sequence[str]) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        source = self.workdir / "load-source.raw"
        say(f"bench: writing a {self.load_mb} MiB source image for the jobs")
        fill_image(source, self.load_mb)
        out: dict[str, Any] = {}
        try:
            for load in loads:
                layout = Layout(
                    load_image=source if load != "writes" else None,
                    guest={"period_ms": 0} if load == "writes" else {},
                )
                sides = [("frozen", "freeze"), ("stock", "stop"), ("stock", "script")]
                if load in JOB_LOADS:
                    sides.append(("stock", "script-cancel"))
                out[load] = self.pair(f"load-{load}", sides, layout, load)
        finally:
            source.unlink()
        return out

    def failover_once(self, side: str, what: str) -> float:
        """Guest failure until a standby has the disk lock."""
        event = {"panic": "GUEST_PANICKED", "watchdog": "WATCHDOG"}[what]
        command = {"panic": guest.CMD_PANIC, "watchdog": guest.CMD_WATCHDOG}[what]
        action = "freeze" if side == "frozen" else "pause"
        with (
            self.box(side, f"{what}-{action}", Layout(actions={what: action})) as box,
            Standby(box.rig.image) as sb,
        ):
            sb.start()
            box.rig.command(command)
            _, ev = box.qmp.wait_event(event, 30)
            # From the failure itself, as QEMU stamped its event (wall clock).
            stamp = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
            failed_at = time.monotonic() - (time.time() - stamp)
            if side == "stock":
                with contextlib.suppress(LeanQMPError, OSError):
                    box.qmp.execute("quit")  # the stock path: a client quits QEMU
            return sb.acquired(LOCK_TIMEOUT) - failed_at

    def failover(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for what in ("panic", "watchdog"):
            runs: dict[str, list[float]] = {"frozen": [], "stock": []}
            for i in range(self.reps):
                for side in ("frozen", "stock"):
                    say(f"bench: {what} -> lock ({side}) {i + 1}/{self.reps}")
                    runs[side].append(self.failover_once(side, what))
            out[what] = {
                "freeze": Stat.of(runs["frozen"]),
                "pause_then_quit": Stat.of(runs["stock"]),
            }
        return out

    def pacemaker(self) -> dict[str, Any]:
        """Guest panic until the service's first write on node 2, under a
        real two-node cluster: each row of PACEMAKER_ROWS per repetition,
        interleaved, each on a service of its own (its filesystem and VM
        group, migration-threshold=1)."""
        from harness import cluster, failover  # the cluster stack, only here

        if self.libvirt is None:
            raise ValueError("the pacemaker section needs the patched libvirt's prefix")
        why = cluster.cluster_supported()
        if why:
            raise RuntimeError(f"cannot run a cluster here: {why}")
        work = self.workdir / "pacemaker"
        shared = Path(tempfile.mkdtemp(prefix="fzb-cl-"))  # short: console socket paths
        rows: dict[str, list[Any]] = {label: [] for label, *_ in PACEMAKER_ROWS}
        try:
            with cluster.Cluster(
                work / "cluster", self.libvirt, failover.agent_dirs(), logdir=work / "logs"
            ) as cl:
                cl.configure_defaults()
                for i in range(self.reps):
                    for label, provider, on_crash, side in PACEMAKER_ROWS:
                        say(f"bench: pacemaker failover ({label}) {i + 1}/{self.reps}")
                        name = f"p{i}{provider[:2]}{on_crash[:2]}"
                        svc = failover.make_service(
                            shared, self.prefix(side), name, on_crash=on_crash
                        )
                        rows[label].append(
                            failover.run_failover(
                                cl, svc, provider, on_crash=on_crash, workdir=work
                            )
                        )
        finally:
            shutil.rmtree(shared, ignore_errors=True)
        return pacemaker_result(rows)

    def steady(self) -> dict[str, Any]:
        out: dict[str, Any] = {"window_s": self.steady_s}
        with self.box("frozen", "steady") as box:
            pid = box.rig.vm.pid
            out["cpu_s_running"] = _cpu_over(pid, self.steady_s)
            out["rss_kib_running"] = _rss_kib(pid)
            self.act(box, "freeze")
            out["cpu_s_frozen"] = _cpu_over(pid, self.steady_s)
            out["rss_kib_frozen"] = _rss_kib(pid)
        with self.box("stock", "steady") as box:
            box.qmp.execute("stop")
            out["cpu_s_stock_stopped"] = _cpu_over(box.rig.vm.pid, self.steady_s)
            out["rss_kib_stock_stopped"] = _rss_kib(box.rig.vm.pid)
        return out


STRACE_SYSCALLS = "fdatasync,fsync,fcntl,close,pwrite64,pwritev,pwritev2,io_uring_enter"


def pacemaker_result(rows: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The pacemaker block from failover.FailoverResult rows per label: seconds
    over the repetitions that failed over, and how many kept the memory and
    served on node 2."""
    out: dict[str, Any] = {"what": "guest panic", "rows": {}}
    for label, provider, on_crash, side in PACEMAKER_ROWS:
        runs = rows.get(label, ())
        seconds = [r.failover_s for r in runs if r.failover_s is not None]
        out["rows"][label] = {
            "agent": provider,
            "on_crash": on_crash,
            "qemu": side,
            "seconds": stat_or_none(seconds),
            "runs": len(runs),
            "failed_over": len(seconds),
            "memory_kept": sum(bool(r.memory_kept) for r in runs),
            "node2_serving": sum(bool(r.disk_opened_on_node2) for r in runs),
        }
    frozen = out["rows"]["frozen"]
    out["frozen"] = frozen["seconds"]
    out["stock"] = out["rows"]["stock"]["seconds"]
    out["memory_kept"] = bool(frozen["runs"]) and frozen["memory_kept"] == frozen["runs"]
    return out


@contextlib.contextmanager
def strace_attached(pid: int, out: Path, syscalls: str = STRACE_SYSCALLS) -> Iterator[None]:
    """strace on every thread of `pid` for the duration; ended by its PID."""
    proc = subprocess.Popen(
        ["strace", "-f", "-tt", "-T", "-e", f"trace={syscalls}", "-o", str(out), "-p", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not _all_traced(pid, proc.pid):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"strace did not attach to {pid}")
            time.sleep(0.01)  # waiting for ptrace to seize every thread
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # strace detaches and writes out
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _all_traced(pid: int, tracer: int) -> bool:
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError):
            for line in status.read_text().splitlines():
                if line.startswith("TracerPid:") and int(line.split()[1]) != tracer:
                    return False
    return True


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "no message"


def summarize(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stats of one action's samples: latency, client floor, lock free, job state."""
    out: dict[str, Any] = {
        "latency": stat_or_none([s.get("latency") for s in samples]),
        "floor": stat_or_none([s.get("floor") for s in samples]),
        "lock_free": stat_or_none([s.get("lock_free") for s in samples]),
    }
    out["samples"] = [dict(s) for s in samples]  # the raw figures, in run order
    errors = sorted({e for s in samples for e in (s.get("error"), s.get("lock_error")) if e})
    if errors:
        out["errors"] = errors
    if any("mid_copy" in s for s in samples):
        out["mid_copy"] = sum(bool(s.get("mid_copy")) for s in samples)
        out["job_offset_frac"] = [s.get("job_offset_frac") for s in samples]
        out["attempts"] = sum(int(s.get("attempts", 1)) for s in samples)
    return out


def _cpu_over(pid: int, window: float) -> float:
    """QEMU's user+system CPU seconds spent during `window` seconds."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    before = cpu()
    time.sleep(window)  # the measurement window itself
    return cpu() - before


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


# -- builds ------------------------------------------------------------------------


def builds() -> dict[str, Any]:
    """Recorded cold builds, a timed warm run, a timed incremental rebuild."""
    out: dict[str, Any] = {"cores": os.cpu_count()}
    for project, variant in (("qemu", "stock"), ("qemu", "frozen"), ("libvirt", "frozen")):
        start = time.monotonic()
        tree = patches.prepare(project, variant)
        install = build.build(tree)
        out[f"{project}-{variant}"] = {
            "recorded_build_s": sum(install.timings.values()),
            "warm_run_s": time.monotonic() - start,
            "warm_was_cache_hit": install.cached,
        }
    out["qemu_incremental_s"] = _incremental_qemu()
    return out


def _incremental_qemu() -> float | None:
    """Touch the files of the newest patch that changes C and time the rebuild."""
    tree = patches.tree_path("qemu", "frozen")
    if not (tree / "build" / "build.ninja").exists():
        return None
    files: list[str] = []
    for commit in subprocess.run(
        ["git", "-C", str(tree), "rev-list", "fixups..HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split():
        files = subprocess.run(
            ["git", "-C", str(tree), "diff-tree", "--no-commit-id", "--name-only", "-r", commit],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        if any(name.endswith((".c", ".h")) for name in files):
            break
    now = time.time()
    for name in files:
        if (tree / name).exists():
            os.utime(tree / name, (now, now))
    start = time.monotonic()
    build.run_logged(
        ["make", "-C", str(tree / "build"), f"-j{os.cpu_count() or 2}"],
        tree / "build" / "bench-incremental.log",
        build.build_env(tree),
        "incremental qemu build",
    )
    return time.monotonic() - start


# -- report ------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stat):
        return vars(value)
    if isinstance(value, Target):
        return {
            "name": value.name,
            "value": value.value,
            "limit": value.limit,
            "met": value.met,
            "detail": value.detail,
        }
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _load(result: Mapping[str, Any]) -> str:
    start, end = result.get("loadavg"), result.get("loadavg_end")
    if start is None:
        return "not recorded"
    return f"{start:.1f} at the start, {end:.1f} at the end" if end is not None else f"{start:.1f}"


def _ms(value: Stat | Mapping[str, Any] | None) -> str:
    return "-" if value is None else Stat.load(value).ms()


def _md(value: Stat | Mapping[str, Any] | None) -> str:
    return "n/a" if value is None else Stat.load(value).md()


def _seconds(value: Stat | Mapping[str, Any] | None) -> str:
    if value is None:
        return "n/a"
    st = Stat.load(value)
    return f"{st.median:.1f} s ({st.min:.1f}-{st.max:.1f})"


def _floor_ms(row: Mapping[str, Any]) -> str:
    f = row.get("floor")
    return "" if f is None else f"  floor {Stat.load(f).median * 1e3:.2f} ms"


def _lock(row: Mapping[str, Any]) -> str:
    lock = row.get("lock_free")
    return "" if lock is None else f"  lock free {_ms(lock).strip()}"


_ACTION_TEXT = {
    "freeze": "freeze (frozen QEMU)",
    "stop": "stop (stock)",
    "script": "stop+set_link+set-active (stock)",
    "script-cancel": "stop+job-cancel+link+inactive (stock)",
}


def _rows(title: str, block: Mapping[str, Any]) -> list[str]:
    lines = [title]
    for action, row in block.items():
        extra = ""
        if "mid_copy" in row:
            fracs = ", ".join("-" if f is None else f"{f:.2f}" for f in row["job_offset_frac"])
            extra = f"  mid-copy {row['mid_copy']}/{len(row['job_offset_frac'])} (at {fracs})"
        lines.append(
            f"  {_ACTION_TEXT.get(action, action):38s}{_ms(row['latency'])}"
            f"{_floor_ms(row)}{_lock(row)}{extra}"
        )
        for e in row.get("errors", []):
            lines.append(f"    error: {e}")
    return lines


def table(result: Mapping[str, Any]) -> str:
    """The text report: every figure with its client floor, then the targets."""
    hf = result.get("harness_floor")
    lines = [
        f"accelerator {result['accel']}, {result['reps']} repetitions interleaved, "
        "median [min-max]; floor = the same client's query-status round trip on that VM",
        f"stock QEMU {result.get('stock_prefix')}, frozen QEMU {result.get('frozen_prefix')}",
        f"{result.get('cores', '?')} cores, load average {_load(result)}",
    ]
    if hf:
        lines.append(f"harness qemu.qmp client floor {_ms(hf).strip()} (not used for timing)")
    if result.get("idle"):
        lines += ["", *_rows("idle, 1 raw disk, 1 NIC:", result["idle"])]
    scaling = result.get("scaling") or {}
    for fmt, rows in (scaling.get("disks") or {}).items():
        for n, block in rows.items():
            lines += _rows(f"scaling: {n} {fmt} disk{'s' if int(n) > 1 else ''}:", block)
    for n, block in (scaling.get("nics") or {}).items():
        lines += _rows(f"scaling: {n} NIC{'s' if int(n) > 1 else ''}:", block)
    mem = result.get("memory")
    if mem and mem.get("curve"):
        lines += ["", "guest RAM   freeze (frozen)                dump-guest-memory (stock)"]
        for mb, row in mem["curve"].items():
            lines.append(
                f"{int(mb):6d} MB {_ms(row['freeze'])}   {_ms(row['dump'])}{_floor_ms(row)}"
            )
    for load, block in (result.get("load") or {}).items():
        lines += ["", *_rows(f"under load: {load}", block)]
    fail = result.get("failover")
    if fail:
        lines.append("")
        for what, row in fail.items():
            lines.append(f"{what + ' -> standby has the lock, freeze':44s}{_ms(row['freeze'])}")
            lines.append(
                f"{what + ' -> standby has the lock, pause + quit':44s}"
                f"{_ms(row['pause_then_quit'])}"
            )
    pm = result.get("pacemaker")
    if pm and pm.get("rows"):
        lines += ["", f"failover under Pacemaker, {pm.get('what')} -> first write on node 2:"]
        for label, row in pm["rows"].items():
            n = row["runs"]
            lines.append(
                f"  {label:15s} {row['agent']} agent, on_crash={row['on_crash']:8s} "
                f"{_seconds(row.get('seconds')):>22s}  failed over {row['failed_over']}/{n}, "
                f"memory kept {row['memory_kept']}/{n}, node 2 serving {row['node2_serving']}/{n}"
            )
    st = result.get("steady")
    if st:
        lines += [
            "",
            f"QEMU CPU over {st['window_s']:.0f} s: running {st['cpu_s_running']:.2f} s, "
            f"frozen {st['cpu_s_frozen']:.2f} s, stock stopped {st['cpu_s_stock_stopped']:.2f} s",
            f"QEMU RSS: running {st['rss_kib_running']} KiB, frozen {st['rss_kib_frozen']} KiB, "
            f"stock stopped {st['rss_kib_stock_stopped']} KiB",
        ]
    if result.get("builds"):
        b = result["builds"]
        lines += ["", f"builds on {b['cores']} cores:"]
        for key in ("qemu-stock", "qemu-frozen", "libvirt-frozen"):
            lines.append(
                f"  {key:15s} recorded build {b[key]['recorded_build_s']:7.0f} s, "
                f"warm run {b[key]['warm_run_s']:.1f} s"
            )
        if b.get("qemu_incremental_s") is not None:
            lines.append(
                f"  qemu incremental after touching a patch that changes C: "
                f"{b['qemu_incremental_s']:.0f} s"
            )
    for name, error in (result.get("errors") or {}).items():
        lines += ["", f"section {name} failed: {error}"]
    lines += ["", "targets (value <= limit):", *(t.line() for t in targets(result))]
    return "\n".join(lines)


def readme_table(result: Mapping[str, Any]) -> str:
    """The README's performance section (markdown), from a result or its JSON."""
    out = [
        f"Measured by `frozen bench` ({result['accel']}, {result['reps']} repetitions "
        "interleaved, one fresh VM each; median (min-max) in ms; each side on its own "
        "binary; the client floor is the same raw-socket client's `query-status` round trip "
        'on the same VM; "standby has the lock" is a second process blocked in a write-lock '
        "wait on the image, on its own clock, from the moment the command was sent; "
        f"{result.get('cores', '?')} cores, load average {_load(result)}).",
        "",
        "| state | frozen: `freeze` | stock: `stop` | stock: `stop` + `set_link off` + "
        "`blockdev-set-active false` | freeze / stop | standby has the lock after freeze | "
        "after the script | client floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []

    def cell(row: Mapping[str, Any] | None, key: str = "latency") -> str:
        """A figure, or a footnote mark when the command failed in every sample."""
        row = row or {}
        if row.get(key) is None and row.get("errors"):
            text = "; ".join(row["errors"])
            if text not in notes:
                notes.append(text)
            return f"failed [{notes.index(text) + 1}]"
        return _md(row.get(key))

    def floor_of(block: Mapping[str, Any]) -> str:
        floors = [
            Stat.load(r["floor"]).median
            for r in block.values()
            if isinstance(r, Mapping) and r.get("floor") is not None
        ]
        return "n/a" if not floors else f"{statistics.median(floors) * 1e3:.2f}"

    def freeze_over_stop(block: Mapping[str, Any]) -> str:
        r = ratio(_get(block, "freeze", "latency"), _get(block, "stop", "latency"))
        return "n/a" if r is None else f"{r:.2f}"

    def row(label: str, block: Mapping[str, Any]) -> str:
        f, s, sc = block.get("freeze"), block.get("stop"), block.get("script")
        locks = f"{cell(f, 'lock_free')} | {cell(sc, 'lock_free')}"
        return (
            f"| {label} | {cell(f)} | {cell(s)} | {cell(sc)} | {freeze_over_stop(block)} | "
            f"{locks} | {floor_of(block)} |"
        )

    if result.get("idle"):
        out.append(row("idle, 1 raw disk, 1 NIC", result["idle"]))
    scaling = result.get("scaling") or {}
    for fmt, rows in (scaling.get("disks") or {}).items():
        for n, block in rows.items():
            out.append(row(f"scaling: {n} {fmt} disk{'s' if int(n) > 1 else ''}", block))
    for n, block in (scaling.get("nics") or {}).items():
        out.append(row(f"scaling: {n} NIC{'s' if int(n) > 1 else ''}", block))
    load = result.get("load") or {}
    if load:
        out += [
            "",
            f"Under load (jobs copy a {result.get('load_mb', '?')} MiB image; throttled mirror "
            f'and backup at {result.get("speed_mb", "?")} MiB/s; "mid-copy" counts the '
            "samples whose job was between 0 and 100 % when the command was sent):",
            "",
            "| state | frozen: `freeze` | stock: `stop` | stock: script | stock: script with "
            "`block-job-cancel` first | freeze / stop | standby has the lock after freeze | "
            "after the script | after the script with cancel | mid-copy | client floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, block in load.items():
            f, sc, cc = block.get("freeze"), block.get("script"), block.get("script-cancel")
            mids = [r for r in block.values() if isinstance(r, Mapping) and "mid_copy" in r]
            taken = sum(len(r["job_offset_frac"]) for r in mids)
            mid = f"{sum(r['mid_copy'] for r in mids)}/{taken}" if mids else "n/a"
            out.append(
                f"| {name} | {cell(f)} | {cell(block.get('stop'))} | {cell(sc)} | "
                f"{cell(cc) if cc else 'n/a'} | {freeze_over_stop(block)} | "
                f"{cell(f, 'lock_free')} | {cell(sc, 'lock_free')} | "
                f"{cell(cc, 'lock_free') if cc else 'n/a'} | {mid} | {floor_of(block)} |"
            )
    if notes:
        out += ["", *(f"[{i}] {text}" for i, text in enumerate(notes, 1))]
    mem = result.get("memory")
    if mem and mem.get("curve"):
        out += [
            "",
            "| guest RAM | frozen: `freeze` | stock: `dump-guest-memory` (after `stop`) "
            "| client floor |",
            "|---|---|---|---|",
        ]
        for mb, r in mem["curve"].items():
            floor = "n/a" if r.get("floor") is None else f"{Stat.load(r['floor']).median * 1e3:.2f}"
            out.append(f"| {mb} MB | {_md(r['freeze'])} | {_md(r['dump'])} | {floor} |")
    fail = result.get("failover")
    if fail:
        out += [
            "",
            "| guest failure until a standby has the lock | `=freeze` | stock `=pause` + `quit` |",
            "|---|---|---|",
        ]
        for what, r in fail.items():
            out.append(f"| {what} | {_md(r['freeze'])} | {_md(r['pause_then_quit'])} |")
    pm = result.get("pacemaker")
    if pm and pm.get("rows"):
        out += [
            "",
            f"Failover under Pacemaker (two nodes, {pm.get('what', 'guest failure')}): seconds "
            "from the failure until the service's first write on node 2.",
            "",
            "| agent | on_crash | QEMU | seconds | failed over | memory kept on node 1 "
            "| node 2 serving |",
            "|---|---|---|---|---|---|---|",
        ]
        for line in pm["rows"].values():
            n = line["runs"]
            out.append(
                f"| {line['agent']} | {line['on_crash']} | {line['qemu']} | "
                f"{_seconds(line.get('seconds'))} | {line['failed_over']}/{n} | "
                f"{line['memory_kept']}/{n} | {line['node2_serving']}/{n} |"
            )
    elif pm:
        out += [
            "",
            "| failover under Pacemaker: guest failure until the service's first write "
            "on node 2 | frozen agent | stock agent | memory kept |",
            "|---|---|---|---|",
            f"| {pm.get('what', 'failure')} | {_seconds(pm.get('frozen'))} "
            f"| {_seconds(pm.get('stock'))} | {pm.get('memory_kept', 'n/a')} |",
        ]
    st = result.get("steady")
    if st:
        out += [
            "",
            f"Steady state over {st['window_s']:.0f} s: QEMU CPU running "
            f"{st['cpu_s_running']:.2f} s, frozen {st['cpu_s_frozen']:.2f} s, stock stopped "
            f"{st['cpu_s_stock_stopped']:.2f} s; RSS running {st['rss_kib_running']} KiB, "
            f"frozen {st['rss_kib_frozen']} KiB.",
        ]
    out += ["", "| target | value | limit | verdict |", "|---|---|---|---|"]
    for t in targets(result):
        v = "n/a" if t.value is None else f"{t.value:.3f}"
        lim = "n/a" if t.limit is None else f"{t.limit:.3f}"
        out.append(f"| {t.name} | {v} | {lim} | {t.verdict} |")
    return "\n".join(out)


def plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.6))
    curve = (result.get("memory") or {}).get("curve") or {}
    if curve:
        sizes = [int(mb) for mb in curve]
        for key, label in (("freeze", "freeze (frozen)"), ("dump", "dump-guest-memory (stock)")):
            stats = [Stat.load(curve[mb][key]) for mb in curve]
            left.errorbar(
                sizes,
                [s.median for s in stats],
                yerr=[[s.median - s.min for s in stats], [s.max - s.median for s in stats]],
                marker="o",
                capsize=3,
                label=label,
            )
        left.set_xlabel("guest RAM (MB)")
        left.set_ylabel("seconds")
        left.set_yscale("log")
        left.legend()
    left.set_title("Keeping memory: freeze vs dump")
    groups = [("idle", result.get("idle") or {}), *(result.get("load") or {}).items()]
    groups = [(label, block) for label, block in groups if block]
    floors: list[float] = []
    width = 0.2
    for k, action in enumerate(("freeze", "stop", "script", "script-cancel")):
        xs, stats = [], []
        for g, (_, block) in enumerate(groups):
            row = block.get(action) or {}
            if row.get("latency") is not None:
                xs.append(g + (k - 1.5) * width)
                stats.append(Stat.load(row["latency"]))
                if row.get("floor") is not None:
                    floors.append(Stat.load(row["floor"]).median)
        if stats:
            mid.bar(
                xs,
                [st.median * 1e3 for st in stats],
                width,
                label=_ACTION_TEXT[action],
                yerr=[
                    [(st.median - st.min) * 1e3 for st in stats],
                    [(st.max - st.median) * 1e3 for st in stats],
                ],
                capsize=2,
            )
    if groups:
        mid.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8, rotation=20)
        if floors:
            mid.axhline(
                statistics.median(floors) * 1e3,
                color="grey",
                linestyle="--",
                label="client floor (query-status)",
            )
        mid.set_yscale("log")
        mid.legend(fontsize=7, loc="upper left")
    mid.set_ylabel("milliseconds")
    mid.set_title(f"Latency ({result['accel']}, median of {result['reps']})")
    disks = (result.get("scaling") or {}).get("disks") or {}
    for fmt, rows in disks.items():
        counts = sorted(rows, key=int)
        for action, style in (("freeze", "-o"), ("script", "--s")):
            stats = [
                Stat.load(rows[n][action]["latency"])
                for n in counts
                if (rows[n].get(action) or {}).get("latency") is not None
            ]
            if len(stats) == len(counts):
                right.plot(
                    [int(n) for n in counts],
                    [st.median * 1e3 for st in stats],
                    style,
                    label=f"{action} ({fmt})",
                )
    if disks:
        right.set_xlabel("disks")
        right.legend(fontsize=7)
    right.set_ylabel("milliseconds")
    right.set_title("Disk scaling: freeze vs stop+set_link+set-active")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    stock: Path,
    frozen: Path,
    *,
    reps: int = 3,
    sections: Sequence[str] = SECTIONS[:-1],
    sizes: Sequence[int] = MEMORY_SIZES_MB,
    disks: Sequence[int] = DISK_COUNTS,
    nics: Sequence[int] = NIC_COUNTS,
    formats: Sequence[str] = FORMATS,
    loads: Sequence[str] = LOADS,
    load_mb: int = LOAD_MB,
    speed_mb: int = MIRROR_SPEED_MB,
    steady_s: float = STEADY_WINDOW_S,
    trace: Sequence[str] = (),
    strace: bool = False,
    libvirt: Path | None = None,
    out_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the chosen sections; returns the result and the directory written."""
    out_dir = out_dir or config.cache_root() / "results" / time.strftime("bench-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        stock,
        frozen,
        out_dir / "work",
        reps,
        default_accel(),
        load_mb=load_mb,
        speed_mb=speed_mb,
        steady_s=steady_s,
        trace=tuple(trace),
        strace=strace,
        libvirt=libvirt,
    )
    result: dict[str, Any] = {
        "accel": bench.accel,
        "reps": reps,
        "stock_prefix": str(stock),
        "frozen_prefix": str(frozen),
        "load_mb": load_mb,
        "speed_mb": speed_mb,
        "trace": list(trace),
        "strace": strace,
        "work": str(out_dir / "work"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg": os.getloadavg()[0],
        "cores": os.cpu_count(),
        # Failover under Pacemaker: {"frozen": Stat, "stock": Stat, "memory_kept":
        # bool, "rows": ...} from the pacemaker section or add_pacemaker().
        "pacemaker": None,
    }
    steps: dict[str, Callable[[], Any]] = {
        "idle": bench.idle,
        "scaling": lambda: bench.scaling(disks, nics, formats),
        "memory": lambda: bench.memory(sizes),
        "load": lambda: bench.load(loads),
        "failover": bench.failover,
        "pacemaker": bench.pacemaker,
        "steady": bench.steady,
        "builds": builds,
    }
    # The harness's qemu.qmp client runs on a thread of this process and gets
    # every event too (STOP, FROZEN ...); a short switch interval bounds how
    # long the timing thread can wait for the GIL when both wake at once.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        for name in SECTIONS:
            if name in sections:
                say(f"bench: {name}")
                try:
                    result[name] = steps[name]()
                except Exception as e:  # one section's failure does not lose the others
                    say(f"bench: {name} failed: {e!r}")
                    result.setdefault("errors", {})[name] = repr(e)
    finally:
        sys.setswitchinterval(interval)
    if bench.harness_floors:
        result["harness_floor"] = Stat.of(bench.harness_floors)
    result["loadavg_end"] = os.getloadavg()[0]
    result["targets"] = targets(result)
    (out_dir / "bench.json").write_text(json.dumps(_jsonable(result), indent=1))
    plot(result, out_dir / "bench.png")
    (out_dir / "README-table.md").write_text(readme_table(result) + "\n")
    return result, out_dir


def add_pacemaker(
    path: Path,
    frozen: Sequence[float],
    stock: Sequence[float],
    *,
    memory_kept: bool | None = None,
    what: str = "guest failure",
) -> dict[str, Any]:
    """The hook for the cluster work: put its failover figures into a bench result.

    `frozen` and `stock` are seconds from the guest's failure to the service's
    first write on node 2, per repetition, with the frozen and the stock agent.
    Rewrites bench.json (targets included) and README-table.md beside it.
    """
    result = load_result(path)
    result["pacemaker"] = {
        "frozen": Stat.of(frozen),
        "stock": Stat.of(stock),
        "memory_kept": memory_kept,
        "what": what,
    }
    result["targets"] = targets(result)
    path.write_text(json.dumps(_jsonable(result), indent=1))
    (path.parent / "README-table.md").write_text(readme_table(load_result(path)) + "\n")
    return load_result(path)


def load_result(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a bench result")
    return data
