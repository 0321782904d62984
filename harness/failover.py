"""Failover scenarios on a harness.cluster cluster, and their table.

A *service* is the probe guest as a libvirt domain whose disk lives on an
ext4 image on shared storage, loop-mounted by a ``Filesystem`` resource
grouped before the ``VirtualDomain`` resource (ordered and colocated, as
real clusters do).  One domain XML on shared storage serves every node;
the console socket and log it names are node-local (the node's /run), so
each node's instance writes its own log.

The disk I/O error scenario needs a disk that fails on node 1 only, at a
moment the test picks, while node 2 reaches the same bytes intact.  The
device-mapper ``error`` target is not available here (the kernel has no
device-mapper), and a dm or loop device of the one shared kernel would
fail for both nodes alike.  So the failing layer is node-local: each
node's group runs a qemu-storage-daemon (``ocf:heartbeat:anything``,
between the Filesystem and the VM) that serves the disk file, still on
the Filesystem resource, over NBD on a unix socket in the node's /run,
through a blkdebug node; the guest's disk is that NBD export with
``error_policy='freeze'``.  The trigger is one host read through node 1's
export, which arms blkdebug: every write after it fails with EIO, so
QEMU freezes the domain (``frozen (I/O error)``).  Node 2's daemon is a new
process over the same file, without the armed rule: like a second path
to a LUN whose first path died.

A scenario starts the group on node 1, makes the guest fail there (a
panic through the console, the watchdog, a disk I/O error), and measures
what the cluster makes of it:
the failed monitor's rc, whether the failed node keeps the domain with the
marker in memory, whether the group came up on node 2 with its guest
writing to the same disk, and the seconds from the failure to the first
record that guest completed on node 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import secrets
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import config, guest, libvirtd, patches
from harness.cluster import (
    NODE_RUN,
    Cluster,
    ClusterError,
    ClusterStatus,
    Node,
    group,
    location,
    primitive,
)
from harness.observe import parse_records
from harness.progress import say
from harness.rig import console_records as records_in
from harness.vm import qemu_tool, system_binary

FS_SIZE = "16M"
MONITOR_INTERVAL = "2s"
START_TIMEOUT = "60s"
STOP_TIMEOUT = "30s"
FAILOVER_TIMEOUT = 180.0
FIRST_RECORDS = 3
#: trigger -> the probe's console command; "watchdog" arms the ib700 and
#: stops feeding it (it fires after the probe's wdt_timeout, 2 s)
TRIGGERS = {"panic": guest.CMD_PANIC, "watchdog": guest.CMD_WATCHDOG}
POLL = 0.05
#: the disk I/O error scenario: the NBD export's name, and the blkdebug
#: rules of its node (a host read arms them; then every write fails)
NBD_EXPORT = "disk"
BLKDEBUG_SET_STATE = [{"event": "read_aio", "state": 1, "new_state": 2}]
BLKDEBUG_INJECT = [{"event": "pwritev", "state": 2, "errno": 5, "once": False, "iotype": "write"}]
#: how long a row whose guest fails unnoticed (error_policy='stop': the
#: stock agent reads "paused" as running) waits for a failover
UNNOTICED_TIMEOUT = 45.0


@dataclass(frozen=True)
class Service:
    """A probe VM on a loop-mounted filesystem image, as the cluster sees it."""

    name: str
    fs_image: Path
    mountpoint: Path
    xml: Path
    marker: str
    console: Path  # node-local
    console_log: Path  # node-local
    #: the disk served over NBD by a node-local qemu-storage-daemon
    #: (its start script on shared storage, its socket in the node's /run)
    nbd_script: Path | None = None
    nbd_socket: Path | None = None
    qemu_io: Path | None = None

    @property
    def disk(self) -> Path:
        return self.mountpoint / "disk.raw"

    @property
    def group_id(self) -> str:
        return f"g-{self.name}"

    @property
    def vm_id(self) -> str:
        return f"vm-{self.name}"

    @property
    def fs_id(self) -> str:
        return f"fs-{self.name}"

    @property
    def nbd_id(self) -> str:
        return f"nbd-{self.name}"


def nbd_script(qemu_prefix: Path, disk: Path, socket: Path) -> str:
    """A qemu-storage-daemon serving ``disk`` over NBD on ``socket``
    through blkdebug (see BLKDEBUG_*), in the foreground: the ``anything``
    agent keeps its PID."""
    blockdevs = [
        {"driver": "file", "filename": str(disk), "node-name": "file0"},
        {
            "driver": "blkdebug",
            "node-name": "dbg0",
            "image": "file0",
            "set-state": BLKDEBUG_SET_STATE,
            "inject-error": BLKDEBUG_INJECT,
        },
        {"driver": "raw", "node-name": "disk0", "file": "dbg0"},
    ]
    args = [str(qemu_tool(qemu_prefix, "qemu-storage-daemon"))]
    for b in blockdevs:
        args += ["--blockdev", json.dumps(b, separators=(",", ":"))]
    args += [
        "--nbd-server",
        f"addr.type=unix,addr.path={socket}",
        "--export",
        f"type=nbd,id=exp0,node-name=disk0,name={NBD_EXPORT},writable=on",
    ]
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    return f"#!/bin/sh\nrm -f '{socket}'\nexec {quoted}\n"


def nbd_disk_xml(xml: str, socket: Path) -> str:
    """The domain's file disk replaced by the NBD export on ``socket``;
    the driver (error policies) kept.  An explicit geometry spares QEMU its
    guessing read of sector 0, which would arm blkdebug at start."""
    dom = ET.fromstring(xml)
    disk = dom.find("./devices/disk")
    assert disk is not None
    disk.set("type", "network")
    src = disk.find("source")
    assert src is not None
    disk.remove(src)
    src = ET.Element("source", protocol="nbd", name=NBD_EXPORT)
    ET.SubElement(src, "host", transport="unix", socket=str(socket))
    disk.insert(1, src)
    ET.SubElement(disk, "geometry", cyls="2", heads="16", secs="63")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def make_service(
    shared: Path, qemu_prefix: Path, name: str, *, nbd: bool = False, **domain: object
) -> Service:
    """The fs image (holding a raw disk), the mount point and the domain XML.

    The image is filled at mkfs time (``mkfs.ext4 -d``): nothing is mounted
    on the host.  ``nbd``: the guest reaches the disk through a node-local
    qemu-storage-daemon (see the module's doc).
    """
    stage = shared / f".stage-{name}"
    stage.mkdir(parents=True)
    r = subprocess.run(
        [
            str(qemu_tool(qemu_prefix, "qemu-img")),
            "create",
            "-q",
            "-f",
            "raw",
            str(stage / "disk.raw"),
            str(libvirtd.DISK_SIZE),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise ClusterError(f"qemu-img create: {r.stderr.strip()}")
    image = shared / f"fs-{name}.img"
    r = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(stage), str(image), FS_SIZE],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise ClusterError(f"mkfs.ext4 {image}: {r.stderr.strip()}")
    (stage / "disk.raw").unlink()
    stage.rmdir()
    mountpoint = shared / f"mnt-{name}"
    mountpoint.mkdir()
    marker = secrets.token_hex(8)
    images = guest.build_probe_images(config.cache_root() / "probe")
    cfg = guest.ProbeConfig(marker=marker, use_net=False, watchdog="ib700")
    console = Path(NODE_RUN) / f"{name}.sock"
    console_log = Path(NODE_RUN) / f"{name}.log"
    dom = libvirtd.ProbeDomain(
        name=name,
        emulator=system_binary(qemu_prefix),
        image=images.bios,
        cmdline=cfg.cmdline(),
        disk=mountpoint / "disk.raw",
        console=console,
        console_log=console_log,
        network=False,
        **domain,  # type: ignore[arg-type]
    )
    xml = shared / f"{name}.xml"
    if not nbd:
        xml.write_text(dom.xml())
        return Service(name, image, mountpoint, xml, marker, console, console_log)
    socket = Path(NODE_RUN) / f"{name}.nbd"
    script = shared / f"nbd-{name}.sh"
    script.write_text(nbd_script(qemu_prefix, mountpoint / "disk.raw", socket))
    script.chmod(0o755)
    xml.write_text(nbd_disk_xml(dom.xml(), socket))
    return Service(
        name,
        image,
        mountpoint,
        xml,
        marker,
        console,
        console_log,
        nbd_script=script,
        nbd_socket=socket,
        qemu_io=qemu_tool(qemu_prefix, "qemu-io"),
    )


def service_group(
    svc: Service,
    provider: str,
    *,
    vm_params: dict[str, str] | None = None,
    meta: dict[str, str] | None = None,
) -> str:
    """The group ``Filesystem`` then ``VirtualDomain`` for ``svc`` (with
    the NBD daemon, ``anything``, between them when the disk is served).

    force_unmount=false: a filesystem still held by QEMU must fail the
    stop (and show), not have its holder killed.
    """
    fs = primitive(
        svc.fs_id,
        "heartbeat",
        "Filesystem",
        {
            "device": str(svc.fs_image),
            "directory": str(svc.mountpoint),
            "fstype": "ext4",
            "options": "loop",
            "force_unmount": "false",
        },
        [("monitor", "20s", "40s"), ("start", "0", "60s"), ("stop", "0", "60s")],
    )
    vm = primitive(
        svc.vm_id,
        provider,
        "VirtualDomain",
        {"config": str(svc.xml), **(vm_params or {})},
        [
            ("monitor", MONITOR_INTERVAL, "30s"),
            ("start", "0", START_TIMEOUT),
            ("stop", "0", STOP_TIMEOUT),
        ],
    )
    if svc.nbd_script is None:
        return group(svc.group_id, fs, vm, meta=meta)
    # start returns once the socket is there (monitor_hook, polled)
    wait_socket = (
        f"i=0; while [ ! -S {svc.nbd_socket} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
        f"test -S {svc.nbd_socket}"
    )
    nbd = primitive(
        svc.nbd_id,
        "heartbeat",
        "anything",
        {
            "binfile": str(svc.nbd_script),
            "logfile": f"{NODE_RUN}/{svc.name}-qsd.log",
            "monitor_hook": wait_socket,
            "stop_timeout": "10",
        },
        [("monitor", "10s", "20s"), ("start", "0", "30s"), ("stop", "0", "30s")],
    )
    return group(svc.group_id, fs, nbd, vm, meta=meta)


# -- what the test looks at ------------------------------------------------------


def start_on_node1(cl: Cluster, svc: Service, group_xml: str, timeout: float) -> None:
    """Create the service's group, prefer node1, wait until its guest writes there."""
    n1 = cl.nodes[0]
    cl.cib_create("resources", group_xml)
    cl.cib_create("constraints", location(f"loc-{svc.name}", svc.group_id, n1.name, "100"))
    cl.wait(
        lambda s: s.started_on(svc.vm_id) == n1.name,
        timeout,
        f"{svc.vm_id} started on {n1.name}",
        hopeless=lambda s: own_failures(s, svc),
    )
    wait_records(n1, svc, FIRST_RECORDS, 60)


@dataclass(frozen=True)
class Served:
    """When the service wrote again after its guest failed, and where it runs."""

    #: seconds from the failure to the first record a guest on one of the
    #: watched nodes completed (None: not within the timeout)
    seconds: float | None
    #: the node Pacemaker reports the VM started on (None: nowhere)
    on: str | None


def wait_served(
    cl: Cluster, svc: Service, nodes: Sequence[Node], t0: float, timeout: float
) -> Served:
    """Wait for the first record completed on `nodes` (its console line is
    printed once the record is on disk), then for the VM resource's node."""
    seconds = None
    while time.monotonic() < t0 + timeout:
        if any(blk == "ok" for node in nodes for _, blk in console_records(node, svc)):
            seconds = time.monotonic() - t0
            break
        time.sleep(POLL)
    on = None
    with contextlib.suppress(ClusterError):
        st = cl.wait(lambda s: s.started_on(svc.vm_id) is not None, 30, f"{svc.vm_id} started")
        on = st.started_on(svc.vm_id)
    return Served(seconds, on)


def console_records(node: Node, svc: Service) -> list[tuple[int, str]]:
    """(record number, blk status) of every record line in the node's console log."""
    try:
        data = node.path(svc.console_log).read_bytes()
    except FileNotFoundError:
        return []
    return [(r.counter, r.blk) for r in records_in(data)]


def wait_records(node: Node, svc: Service, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(console_records(node, svc)) < n:
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{svc.name} on {node.name}: fewer than {n} records within {timeout:.0f} s"
            )
        time.sleep(POLL)


def domstate(node: Node, name: str) -> str:
    """``virsh domstate --reason`` on the node, "absent" without the domain."""
    assert node.daemon is not None
    r = node.daemon.virsh("domstate", "--reason", name, check=False)
    if r.returncode == 0:
        return r.stdout.strip()
    if "failed to get domain" in r.stderr.lower():
        return "absent"
    return f"error: {r.stderr.strip()}"


def qemu_pid(node: Node, name: str) -> int | None:
    """QEMU's PID as the node sees it (in the node's PID namespace)."""
    assert node.daemon is not None
    with contextlib.suppress(OSError, ValueError):
        return int((node.daemon.run.private("run") / "qemu" / f"{name}.pid").read_text())
    return None


def memory_has_marker(node: Node, svc: Service, workdir: Path) -> bool:
    """The marker is in a memory-only core dump of the node's domain."""
    assert node.daemon is not None
    dump = workdir / f"{svc.name}-{node.name}-{time.monotonic_ns()}.core"
    r = node.daemon.virsh("dump", "--memory-only", svc.name, str(dump), check=False)
    try:
        return r.returncode == 0 and guest.marker_tag(svc.marker) in dump.read_bytes()
    except FileNotFoundError:
        return False
    finally:
        dump.unlink(missing_ok=True)


def mounted(node: Node, mountpoint: Path) -> bool:
    """Is ``mountpoint`` mounted in the node's mount namespace?"""
    assert node.init_pid is not None
    mounts = Path(f"/proc/{node.init_pid}/mounts").read_text().split("\n")
    return any(line.split(" ")[1:2] == [str(mountpoint)] for line in mounts if line)


def disk_records(node: Node, svc: Service) -> int:
    """Probe records with the service's marker on its disk, read through the
    node's mount of the filesystem."""
    try:
        return len(parse_records(node.path(svc.disk).read_bytes(), svc.marker))
    except OSError:
        return 0


@dataclass(frozen=True)
class FailoverResult:
    """One row of the failover table."""

    trigger: str
    agent: str
    on_crash: str
    monitor_rc: int | None
    failed_node_state: str
    memory_kept: bool
    same_qemu: bool
    fs_released: bool
    recovered_on: str | None
    disk_opened_on_node2: bool
    node2_records: int
    failover_s: float | None
    crm_mon_before: str
    crm_mon_after: str

    def row(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("crm_mon")}


def own_failures(st: ClusterStatus, svc: Service) -> bool:
    """Has an operation of the service's resources failed?"""
    ids = (f"{svc.vm_id}_", f"{svc.fs_id}_", f"{svc.nbd_id}_")
    return any(f.get("op_key", "").startswith(ids) for f in st.failures)


def arm_io_error(node: Node, svc: Service) -> None:
    """One host read through the node's NBD export: from now on every
    write of the guest there fails with EIO (BLKDEBUG_*)."""
    assert svc.nbd_socket is not None and svc.qemu_io is not None
    uri = f"nbd+unix:///{NBD_EXPORT}?socket={svc.nbd_socket}"
    node.run(str(svc.qemu_io), "-r", "-f", "raw", "-c", "read 0 512", uri, timeout=30)


def failed_monitor_rc(cl: Cluster, svc: Service, node: str) -> int | None:
    """The rc of the first failed recurring monitor of the VM on ``node``.

    From the node's Pacemaker log: crm_mon keeps only the last failure of
    a resource on a node, and a failed start that follows replaces it.
    """
    log = cl.node(node).root / "log-pacemaker" / "pacemaker.log"
    key = re.compile(
        rf"Result of monitor operation for {re.escape(svc.vm_id)} on "
        rf"{re.escape(node)}: .* key={re.escape(svc.vm_id)}_monitor_[1-9]\d* "
        r"rc=(\d+)"
    )
    with contextlib.suppress(OSError):
        for m in key.finditer(log.read_text(errors="replace")):
            if m.group(1) != "0":
                return int(m.group(1))
    return None


def run_failover(
    cl: Cluster,
    svc: Service,
    provider: str,
    *,
    on_crash: str,
    workdir: Path,
    trigger: str = "panic",
    vm_params: dict[str, str] | None = None,
    timeout: float = FAILOVER_TIMEOUT,
) -> FailoverResult:
    """Start ``svc`` on node1 with the agent of ``provider``, fail its guest,
    follow the recovery to node2 and measure it.  migration-threshold=1:
    the first failure moves the group (same-node recovery is its own
    scenario).  ``trigger="move"`` fails nothing: the group is banned
    from node1 and the agent's stop has to deal with a guest that
    ignores the shutdown request (the probe has no ACPI)."""
    n1, n2 = cl.nodes[0], cl.nodes[1]
    group_xml = service_group(svc, provider, vm_params=vm_params, meta={"migration-threshold": "1"})
    start_on_node1(cl, svc, group_xml, timeout)
    before = cl.snapshot(f"{svc.name} ({provider}, on_crash={on_crash}): before the failure")
    pid = qemu_pid(n1, svc.name)

    if trigger == "move":
        t0 = time.monotonic()
        cl.resource("--ban", "--resource", svc.group_id, "--node", n1.name)
    elif trigger == "ioerror":
        t0 = time.monotonic()
        arm_io_error(n1, svc)
    else:
        with libvirtd.Console(n1.path(svc.console)) as con:
            t0 = time.monotonic()
            con.write(TRIGGERS[trigger])

    served = wait_served(cl, svc, [n2], t0, timeout)
    failover_s, recovered_on = served.seconds, served.on
    after = cl.snapshot(f"{svc.name} ({provider}, on_crash={on_crash}): after the failover")

    state = domstate(n1, svc.name)
    kept = state != "absent" and memory_has_marker(n1, svc, workdir)
    records = [n for n, blk in console_records(n2, svc) if blk == "ok"]
    return FailoverResult(
        trigger=trigger,
        agent=provider,
        on_crash=on_crash,
        monitor_rc=failed_monitor_rc(cl, svc, n1.name),
        failed_node_state=state,
        memory_kept=kept,
        same_qemu=pid is not None
        and qemu_pid(n1, svc.name) == pid
        and n1.path(Path(f"/proc/{pid}")).exists(),
        fs_released=not mounted(n1, svc.mountpoint),
        recovered_on=recovered_on,
        disk_opened_on_node2=recovered_on == n2.name and disk_records(n2, svc) > 0,
        node2_records=len(records),
        failover_s=None if failover_s is None else round(failover_s, 2),
        crm_mon_before=before.text,
        crm_mon_after=after.text,
    )


def yes_no(v: bool) -> str:
    return "yes" if v else "no"


def table(results: list[FailoverResult]) -> str:
    """The failover table: trigger x agent, what each kept and how fast."""
    head = (
        "trigger",
        "agent",
        "action",
        "monitor rc",
        "node1 domain",
        "memory kept",
        "fs released",
        "node2 serving",
        "disk opened on node2",
        "failover s",
    )
    rows = [head]
    for r in results:
        rows.append(
            (
                r.trigger,
                r.agent,
                r.on_crash,
                str(r.monitor_rc),
                r.failed_node_state,
                yes_no(r.memory_kept),
                yes_no(r.fs_released),
                yes_no(r.recovered_on == "node2" and r.node2_records > 0),
                yes_no(r.disk_opened_on_node2),
                "-" if r.failover_s is None else f"{r.failover_s:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class SameNodeResult:
    """Recovery with migration-threshold at its default (INFINITY):
    Pacemaker first restarts the resource where it failed."""

    agent: str
    dump_dir: bool
    monitor_rc: int | None
    start_rc_node1: int | None  # a failed start's rc on node1, None if none failed
    recovered_on: str | None
    node1_state: str
    frozen_memory_kept: bool  # the frozen domain on node1 still holds the marker
    dump_has_marker: bool  # a dump in frozen_dump_dir holds the failed guest's last record
    dumps: int
    recovery_s: float | None  # failure -> first record of the new instance
    crm_mon_before: str
    crm_mon_after: str

    def row(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("crm_mon")}


def failed_start_rc(cl: Cluster, svc: Service, node: str) -> int | None:
    for f in cl.status().failures:
        if f.get("op_key", "") == f"{svc.vm_id}_start_0" and f.get("node") == node:
            with contextlib.suppress(ValueError):
                return int(f.get("exitcode", ""))
    return None


def run_same_node(
    cl: Cluster,
    svc: Service,
    provider: str,
    *,
    workdir: Path,
    dump_dir: Path | None,
    timeout: float = FAILOVER_TIMEOUT,
) -> SameNodeResult:
    """Panic ``svc``'s guest on node1 with on_crash=freeze and default
    migration-threshold: with ``dump_dir`` the agent must dump, destroy and
    restart on node1; without, fail start node-locally so the group moves."""
    n1 = cl.nodes[0]
    params = {"frozen_dump_dir": str(dump_dir)} if dump_dir else {}
    start_on_node1(cl, svc, service_group(svc, provider, vm_params=params), timeout)
    label = f"{svc.name} ({provider}, same node, frozen_dump_dir={'set' if dump_dir else 'unset'})"
    before = cl.snapshot(f"{label}: before the failure")
    with libvirtd.Console(n1.path(svc.console)) as con:
        last = console_records(n1, svc)[-1][0]
        t0 = time.monotonic()
        con.write(guest.CMD_PANIC)
    # the frozen QEMU keeps its fd; a new instance on node1 makes a new log
    log = n1.path(svc.console_log)
    log.rename(log.with_suffix(".failed"))

    served = wait_served(cl, svc, cl.nodes, t0, timeout)
    recovery_s, recovered_on = served.seconds, served.on
    after = cl.snapshot(f"{label}: after the recovery")

    state = domstate(n1, svc.name)
    frozen_kept = state.startswith("frozen") and memory_has_marker(n1, svc, workdir)
    cores = sorted(dump_dir.glob(f"{svc.name}-frozen-*.core")) if dump_dir else []
    tags = [guest.last_record_tag(svc.marker, n) for n in (last, last + 1)]
    dump_ok = any(any(t in c.read_bytes() for t in tags) for c in cores)
    return SameNodeResult(
        agent=provider,
        dump_dir=dump_dir is not None,
        monitor_rc=failed_monitor_rc(cl, svc, n1.name),
        start_rc_node1=failed_start_rc(cl, svc, n1.name),
        recovered_on=recovered_on,
        node1_state=state,
        frozen_memory_kept=frozen_kept,
        dump_has_marker=dump_ok,
        dumps=len(cores),
        recovery_s=None if recovery_s is None else round(recovery_s, 2),
        crm_mon_before=before.text,
        crm_mon_after=after.text,
    )


#: (trigger, provider, on_crash -- the watchdog's action for "watchdog" --,
#: which QEMU) of each row of the failover table
TABLE_ROWS = (
    ("panic", "frozen", "freeze", "frozen"),
    ("panic", "stock", "freeze", "frozen"),
    ("panic", "stock", "preserve", "stock"),
    ("panic", "stock", "destroy", "stock"),
    ("watchdog", "frozen", "freeze", "frozen"),
    ("watchdog", "stock", "freeze", "frozen"),
)


def agent_dirs() -> dict[str, Path]:
    """The pinned resource-agents tree, with and without the series, as
    OCF providers ``frozen`` and ``stock``."""
    dirs = {}
    for variant in ("frozen", "stock"):
        lock = config.cache_root() / f".resource-agents-{variant}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # parallel tests prepare one tree once
            dirs[variant] = patches.prepare("resource-agents", variant).path / "heartbeat"
    return dirs


def failover_table(
    cl: Cluster, shared: Path, qemu: dict[str, Path], workdir: Path
) -> Iterator[FailoverResult]:
    """Every row of TABLE_ROWS on one cluster, in order."""
    for i, (trigger, provider, action, build) in enumerate(TABLE_ROWS):
        domain: dict[str, Any] = (
            {"on_crash": action} if trigger == "panic" else {"watchdog_action": action}
        )
        svc = make_service(shared, qemu[build], f"v{i}{provider[:2]}{action[:2]}", **domain)
        yield run_failover(cl, svc, provider, on_crash=action, workdir=workdir, trigger=trigger)


#: (provider, error_policy, which QEMU) of the disk I/O error rows: the
#: series; the stock agent on the same frozen domain (negative control);
#: today's closest choice, error_policy='stop' on stock QEMU, which keeps
#: the memory in a paused domain that the stock agent reports as running
IO_ROWS = (
    ("frozen", "freeze", "frozen"),
    ("stock", "freeze", "frozen"),
    ("stock", "stop", "stock"),
)


def io_error_table(
    cl: Cluster, shared: Path, qemu: dict[str, Path], workdir: Path
) -> Iterator[FailoverResult]:
    """The guest's disk fails on node1 (its NBD daemon's blkdebug armed)."""
    for i, (provider, policy, build) in enumerate(IO_ROWS):
        svc = make_service(
            shared, qemu[build], f"d{i}{provider[:2]}{policy[:2]}", nbd=True, error_policy=policy
        )
        yield run_failover(
            cl,
            svc,
            provider,
            on_crash=f"disk:{policy}",
            workdir=workdir,
            trigger="ioerror",
            timeout=UNNOTICED_TIMEOUT if policy == "stop" else FAILOVER_TIMEOUT,
        )


#: (provider, stop_failure_action) of the rows of the stop-failure table
STOP_ROWS = (("frozen", "freeze"), ("stock", "freeze"))


def stop_failure_table(
    cl: Cluster, shared: Path, qemu: Path, workdir: Path
) -> Iterator[FailoverResult]:
    """The group moves away from node1 while its guest ignores the
    shutdown request: stop_failure_action=freeze must freeze it within
    the stop timeout (the stock agent, which knows no such parameter,
    destroys it)."""
    for i, (provider, action) in enumerate(STOP_ROWS):
        svc = make_service(shared, qemu, f"m{i}{provider[:2]}", on_crash="destroy")
        yield run_failover(
            cl,
            svc,
            provider,
            on_crash=f"stop:{action}",
            workdir=workdir,
            trigger="move",
            vm_params={"stop_failure_action": action},
        )


@dataclass(frozen=True)
class ClusterVerification:
    """``frozen verify --cluster``: every failover row on one cluster."""

    rows: tuple[FailoverResult, ...]
    logs: Path

    @property
    def ok(self) -> bool:
        """The series' rows keep the memory and serve from node 2."""
        frozen = [r for r in self.rows if r.agent == "frozen"]
        return bool(frozen) and all(
            r.memory_kept and r.disk_opened_on_node2 and r.recovered_on == "node2" for r in frozen
        )


def verify_cluster(
    workdir: Path, libvirt: Path, qemu: dict[str, Path], shared: Path
) -> ClusterVerification:
    """Bring up a two-node cluster in ``workdir`` and run every row: guest
    panic and watchdog (TABLE_ROWS), disk I/O error (IO_ROWS), a stop whose
    shutdown hangs (STOP_ROWS); stock agent against frozen.  ``qemu`` maps
    "frozen" and "stock" to install prefixes; ``shared`` is the shared
    storage (short: socket paths)."""
    rows: list[FailoverResult] = []

    def note(r: FailoverResult) -> None:
        rows.append(r)
        say(
            f"failover: {r.trigger}, {r.agent} agent, {r.on_crash}: "
            f"memory kept {yes_no(r.memory_kept)}, node2 serving {yes_no(serving(r))}, "
            f"{'-' if r.failover_s is None else r.failover_s} s"
        )

    logs = workdir / "logs"
    with Cluster(workdir / "cluster", libvirt, agent_dirs(), logdir=logs) as cl:
        cl.configure_defaults()
        for r in failover_table(cl, shared, qemu, workdir):
            note(r)
        for r in io_error_table(cl, shared, qemu, workdir):
            note(r)
        for r in stop_failure_table(cl, shared, qemu["frozen"], workdir):
            note(r)
    return ClusterVerification(tuple(rows), logs)


def serving(r: FailoverResult) -> bool:
    """Node 2 runs the service and its guest wrote there."""
    return r.recovered_on == "node2" and r.node2_records > 0


def verification_table(result: ClusterVerification) -> str:
    """trigger x agent: memory kept, node 2 serving, seconds to failover."""
    head = ("trigger", "agent", "action", "memory kept", "node2 serving", "failover s")
    rows = [head]
    for r in result.rows:
        action = r.on_crash.split(":", 1)[-1]
        fo = "-" if r.failover_s is None else f"{r.failover_s:.1f}"
        rows.append((r.trigger, r.agent, action, yes_no(r.memory_kept), yes_no(serving(r)), fo))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_verify(libvirt: Path, qemu: dict[str, Path], workdir: Path | None = None) -> int:
    """Run verify_cluster, print both tables; 0 when the series' rows pass."""
    import shutil
    import tempfile

    workdir = workdir or Path(tempfile.mkdtemp(prefix="frozen-verify-cluster-"))
    shared = Path(tempfile.mkdtemp(prefix="frozen-cl-"))
    try:
        result = verify_cluster(workdir, libvirt, qemu, shared)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    print(verification_table(result))
    print()
    print(table(list(result.rows)))
    print(f"\ncrm_mon snapshots and logs: {result.logs}")
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.failover [WORKDIR]``: the failover table on
    this machine, stock agent against frozen, from the cached builds (or
    FROZEN_LIBVIRT, FROZEN_QEMU, FROZEN_QEMU_STOCK)."""
    import os
    import sys

    args = sys.argv[1:] if argv is None else argv
    from harness.build import install_prefix

    libvirt = Path(os.environ.get("FROZEN_LIBVIRT", install_prefix("libvirt", "frozen")))
    qemu = {
        "frozen": Path(os.environ.get("FROZEN_QEMU", install_prefix("qemu", "frozen"))),
        "stock": Path(os.environ.get("FROZEN_QEMU_STOCK", install_prefix("qemu", "stock"))),
    }
    return run_verify(libvirt, qemu, Path(args[0]) if args else None)


if __name__ == "__main__":
    raise SystemExit(main())
