"""Write attempts: every way a frozen QEMU could be made to run or write.

One table (:data:`WRITE_PATHS`) lists them, as data: the name the report
uses, how to try it on a rig, when it applies, which files it would write,
and whether the soak retries it every round. The KVM proof tries the whole
table after the freeze and again round after round during the soak; the
monitor fuzz tries it after its last call; the fuzz's follow-up probes (an
NBD client write, a gdbstub continue) are the same functions.

A try returns an :class:`Outcome`; :func:`attempt` turns it into an
:class:`Attempt`, noting whether QEMU is alive and still frozen after it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.rig import (
    DISK_NODE,
    IMAGE_SIZE,
    NIC_ID,
    RECORD_RX,
    Rig,
    RigError,
    create_image,
    run_tool,
)
from harness.vm import VM, VMCommandError, VMError, qemu_tool

#: Where the NBD client and HMP qemu-io write: away from the probe's records.
NBD_WRITE_OFFSET = 512 << 10


@dataclass(frozen=True)
class Outcome:
    """What one try got: refused or not, and what QEMU (or the client) said."""

    refused: bool
    message: str


@dataclass(frozen=True)
class ClientWrite:
    """What a real client's write did: written or not, and its output."""

    wrote: bool
    text: str


#: A try: one way to run the guest or write its disk or NIC, on a rig.
Try = Callable[[Rig], Outcome]


@dataclass
class Attempt:
    """One attempt to make a frozen QEMU run or write."""

    name: str
    refused: bool
    message: str
    alive: bool
    still_frozen: bool

    @property
    def held(self) -> bool:
        return self.refused and self.alive and self.still_frozen


@dataclass(frozen=True)
class WritePath:
    """One row of the table: a way to run the guest or write its disk or NIC."""

    name: str
    attempt: Try
    #: Whether the path exists on this rig (e.g. an export open at the freeze).
    applies: Callable[[Rig], bool] = field(default=lambda rig: True)
    #: Files in the rig's workdir the path would write, measured after freeze.
    targets: tuple[str, ...] = ()
    #: Cheap enough to retry every round of the soak.
    soak: bool = False


def attempt(vm: VM, name: str, fn: Callable[[], Outcome], expect_status: str = "frozen") -> Attempt:
    """Run one write/run attempt (``fn``) and see whether QEMU held."""
    try:
        out = fn()
        refused, msg = out.refused, out.message
    except VMCommandError as e:
        refused, msg = True, f"{e.error_class}: {e.desc}"
    except (VMError, RigError, OSError, subprocess.SubprocessError) as e:
        # QEMU died (or the harness could not drive the path): recorded as
        # not held, never raised, so the verdict still has every row.
        refused, msg = False, f"{type(e).__name__}: {e}"
    alive = vm.is_running()
    status = ""
    if alive:
        try:
            status = vm.status()
        except VMError as e:
            status = f"? ({e})"
    return Attempt(name, refused, msg, alive, status == expect_status)


def cmd_refused(vm: VM, name: str, args: Mapping[str, Any] | None = None) -> Outcome:
    err = vm.try_cmd(name, args)
    if err is None:
        return Outcome(False, "accepted")
    return Outcome(True, f"{err.error_class}: {err.desc}")


def hmp_refused(vm: VM, line: str) -> Outcome:
    text = vm.hmp(line).strip()
    # HMP reports errors as text; an empty answer means it was done.
    return Outcome(bool(text), text or "accepted")


# -- the write paths that need more than one command -----------------------------


def nbd_client_write(prefix: Path, sock: Path, export: str) -> ClientWrite:
    """A real NBD client write through QEMU's own client.

    It writes 4 KiB of 0x5a at NBD_WRITE_OFFSET, away from the probe's records.
    """
    uri = f"nbd+unix:///{export}?socket={sock}"
    cmd = f"write -P 0x5a {NBD_WRITE_OFFSET} 4096"
    r = run_tool([qemu_tool(prefix, "qemu-io"), "-f", "raw", "-c", cmd, uri], timeout=30)
    text = (r.stdout + r.stderr).strip()
    ok = r.returncode == 0 and "wrote 4096" in text and "failed" not in text.lower()
    return ClientWrite(ok, text)


def gdb_send(sock: socket.socket, body: str) -> None:
    csum = sum(body.encode()) % 256
    sock.sendall(f"${body}#{csum:02x}".encode())


def gdb_reply(sock: socket.socket, timeout: float) -> str | None:
    """The next packet from the stub (acks skipped), or None on timeout."""
    deadline = time.monotonic() + timeout
    buf = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        if not data:
            break
        buf += data
        m = re.search(rb"\$([^#]*)#[0-9a-fA-F]{2}", buf)
        if m:
            sock.sendall(b"+")
            return m.group(1).decode(errors="replace")
    return None


def gdb_continue_step(vm: VM, path: Path, wait_s: float = 1.0) -> Outcome:
    """Attach to a gdbstub listening on ``path``, continue, then single-step.

    Refused means the guest did not run: no new record on the console (the
    wait for one must time out); the caller checks the state.
    """
    notes = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gdb:
        gdb.settimeout(2)
        gdb.connect(str(path))
        gdb_send(gdb, "?")
        notes.append(f"? -> {gdb_reply(gdb, 5)}")
        ran = ""
        for cmd in ("c", "s"):
            start = len(vm.console_text())
            gdb_send(gdb, cmd)
            notes.append(f"{cmd} -> {gdb_reply(gdb, wait_s)}")
            try:
                m = vm.wait_for_console(RECORD_RX, wait_s, start)
            except VMError:
                continue
            ran = f"guest ran after gdb '{cmd}': {m.group(0)}"
            break
        # Detach as gdb does (breakpoints and single-step cleared): a stub
        # just dropped leaves a stock vCPU single-stepping into a 'debug'
        # stop later, which aborts QEMU if it lands during a migration.
        gdb_send(gdb, "D")
        notes.append(f"D -> {gdb_reply(gdb, wait_s)}")
    if ran:
        return Outcome(False, ran)
    return Outcome(True, "; ".join(notes))


def _gdb_run_refused(rig: Rig) -> Outcome:
    """Start QEMU's gdbstub over HMP and try it (see gdb_continue_step)."""
    vm = rig.vm
    path = vm.paths.sock_dir / "gdb.sock"
    out = vm.hmp(f"gdbserver unix:{path},server=on,wait=off").strip()
    if not path.exists():
        return Outcome(True, f"gdbserver not started: {out}")
    try:
        return gdb_continue_step(vm, path)
    finally:
        vm.hmp("gdbserver none")


def _migrate_refused(rig: Rig) -> Outcome:
    vm = rig.vm
    err = vm.try_cmd("migrate", {"uri": f"file:{rig.workdir / 'migrate.bin'}"})
    if err is not None:
        return Outcome(True, f"{err.error_class}: {err.desc}")
    # Accepted: let it finish (it inactivates the disks at the end), so what
    # follows sees one state, not a race with the migration thread.
    deadline = time.monotonic() + 30
    status = "?"
    while time.monotonic() < deadline:
        status = vm.cmd("query-migrate").get("status", "?")
        if status in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    return Outcome(False, f"migrate accepted ({status})")


def _hmp_io_write_refused(vm: VM) -> Outcome:
    """HMP qemu-io writing into the guest's disk, away from its records."""
    text = vm.hmp(f'qemu-io {DISK_NODE} "write -P 0x33 {NBD_WRITE_OFFSET + 8192} 512"').strip()
    return Outcome("wrote" not in text, text or "no output")


def _blockdev_add_refused(rig: Rig) -> Outcome:
    extra = rig.workdir / "extra.raw"
    create_image(rig.prefix, extra, "raw")
    return cmd_refused(
        rig.vm,
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "extra0",
            "file": {"driver": "file", "filename": str(extra)},
        },
    )


def _backup_refused(rig: Rig) -> Outcome:
    vm = rig.vm
    err = vm.try_cmd(
        "blockdev-backup",
        {"job-id": "frz-backup", "device": DISK_NODE, "target": "tgt0", "sync": "full"},
    )
    if err is not None:
        return Outcome(True, f"{err.error_class}: {err.desc}")
    # Accepted: let it run to the end so the damage is measured.
    with contextlib.suppress(VMError):
        vm.event_wait("BLOCK_JOB_COMPLETED", 30, match={"data": {"device": "frz-backup"}})
    return Outcome(False, "blockdev-backup accepted")


def _nbd_write_refused(rig: Rig, export: str) -> Outcome:
    w = nbd_client_write(rig.prefix, rig.nbd_socket, export)
    said = f"NBD client write {'succeeded' if w.wrote else 'failed'}: {w.text[-200:]}"
    return Outcome(not w.wrote, said)


def _export_add_refused(rig: Rig) -> Outcome:
    err = rig.vm.try_cmd(
        "block-export-add",
        {"type": "nbd", "id": "post", "node-name": DISK_NODE, "name": "post", "writable": True},
    )
    wrote = nbd_client_write(rig.prefix, rig.nbd_socket, "post").wrote
    msg = "accepted" if err is None else f"{err.error_class}: {err.desc}"
    return Outcome(
        err is not None and not wrote, f"{msg}; client write {'ok' if wrote else 'failed'}"
    )


# -- the table -------------------------------------------------------------------


def _qmp(name: str, args: Callable[[Rig], dict[str, Any]] | dict[str, Any] | None = None) -> Try:
    """A try that is one QMP command (``args`` may depend on the rig)."""

    def run(rig: Rig) -> Outcome:
        return cmd_refused(rig.vm, name, args(rig) if callable(args) else args)

    return run


def _hmp(line: str) -> Try:
    return lambda rig: hmp_refused(rig.vm, line)


def _share_rw(rig: Rig) -> bool:
    return rig.share_rw


WRITE_PATHS: tuple[WritePath, ...] = (
    WritePath("cont", _qmp("cont"), soak=True),
    WritePath("system_reset", _qmp("system_reset")),
    WritePath("system_powerdown", _qmp("system_powerdown")),
    WritePath("system_wakeup", _qmp("system_wakeup")),
    WritePath("inject-nmi", _qmp("inject-nmi")),
    WritePath("hmp cont", _hmp("cont"), soak=True),
    WritePath("blockdev-set-active", _qmp("blockdev-set-active", {"active": True}), soak=True),
    WritePath(
        "blockdev-set-active node",
        _qmp("blockdev-set-active", {"node-name": DISK_NODE, "active": True}),
    ),
    WritePath("blockdev-add", _blockdev_add_refused),
    WritePath("blockdev-backup", _backup_refused),
    WritePath(
        "NBD write via open export",
        lambda rig: _nbd_write_refused(rig, "pre"),
        applies=_share_rw,
        soak=True,
    ),
    WritePath("block-export-add + NBD write", _export_add_refused),
    WritePath("set_link up", _qmp("set_link", {"name": NIC_ID, "up": True}), soak=True),
    WritePath(
        "announce-self",
        _qmp("announce-self", {"initial": 50, "max": 100, "rounds": 3, "step": 50}),
    ),
    # Block jobs and snapshots: each would write the image or a file next
    # to it (its targets, so their bytes are measured).
    WritePath(
        "blockdev-mirror",
        _qmp(
            "blockdev-mirror",
            {"job-id": "frz-mirror", "device": DISK_NODE, "target": "tgt1", "sync": "full"},
        ),
    ),
    WritePath(
        "drive-backup",
        _qmp(
            "drive-backup",
            lambda rig: {
                "job-id": "frz-dbackup",
                "device": DISK_NODE,
                "sync": "full",
                "target": str(rig.workdir / "drive-backup.raw"),
                "format": "raw",
            },
        ),
        targets=("drive-backup.raw",),
    ),
    WritePath("block-commit", _qmp("block-commit", {"job-id": "frz-commit", "device": DISK_NODE})),
    WritePath("block-stream", _qmp("block-stream", {"job-id": "frz-stream", "device": DISK_NODE})),
    WritePath(
        "blockdev-snapshot-sync",
        _qmp(
            "blockdev-snapshot-sync",
            lambda rig: {
                "node-name": DISK_NODE,
                "snapshot-file": str(rig.workdir / "overlay.qcow2"),
                "snapshot-node-name": "frzsnap",
                "format": "qcow2",
            },
        ),
        targets=("overlay.qcow2",),
    ),
    WritePath(
        "snapshot-save",
        _qmp(
            "snapshot-save",
            {"job-id": "frz-snapsave", "tag": "frz", "vmstate": DISK_NODE, "devices": [DISK_NODE]},
        ),
    ),
    WritePath(
        "block_resize", _qmp("block_resize", {"node-name": DISK_NODE, "size": 2 * IMAGE_SIZE})
    ),
    WritePath("hmp qemu-io write", lambda rig: _hmp_io_write_refused(rig.vm)),
    WritePath("hmp savevm", _hmp("savevm frz-hmp")),
    WritePath("netdev_add", _qmp("netdev_add", {"type": "user", "id": "frzn1"})),
    WritePath(
        "device_add virtio-net",
        _qmp("device_add", {"driver": "virtio-net-pci", "netdev": "spare0", "id": "frznic1"}),
    ),
    WritePath(
        "device_add virtio-blk",
        _qmp("device_add", {"driver": "virtio-blk-pci", "drive": "spare0", "id": "frzblk1"}),
    ),
    # Before migrate: on stock, gdb 'c' after a migration completed runs the
    # guest on inactive nodes and QEMU aborts (block/io.c: "!(bs->open_flags
    # & BDRV_O_INACTIVE)"), a stock bug the negative control must not trip.
    WritePath("gdbstub continue/step", _gdb_run_refused),
    WritePath("migrate to file", _migrate_refused, targets=("migrate.bin",)),
)


def soak_paths() -> tuple[WritePath, ...]:
    """The rows the soak retries every round."""
    return tuple(p for p in WRITE_PATHS if p.soak)


def write_attempts(
    rig: Rig, paths: Sequence[WritePath] = WRITE_PATHS, expect_status: str = "frozen"
) -> list[Attempt]:
    """Try every path of ``paths`` that applies to ``rig``, in order."""
    out: list[Attempt] = []
    for p in paths:
        if not p.applies(rig):
            continue
        for name in p.targets:
            if (target := rig.workdir / name) not in rig.write_targets:
                rig.write_targets.append(target)
        out.append(attempt(rig.vm, p.name, functools.partial(p.attempt, rig), expect_status))
    return out


def prepare_write_paths(rig: Rig) -> None:
    """While the VM still runs: a backup target node, an NBD server and, on
    a share-rw rig, a writable NBD export of the guest's disk.

    So that after the freeze a block job can be started against an existing
    target, an export can be added, and a client can write through an
    export that was already open.
    """
    vm = rig.vm
    # tgt0/tgt1: targets for backup and mirror; spare0: a node (and a netdev)
    # no device uses yet, for device_add after the freeze.
    vm.cmd("netdev_add", {"type": "user", "id": "spare0"})
    for node, name in (
        ("tgt0", "backup-target.raw"),
        ("tgt1", "mirror-target.raw"),
        ("spare0", "spare.raw"),
    ):
        target = rig.workdir / name
        create_image(rig.prefix, target, "raw")
        rig.write_targets.append(target)
        vm.cmd(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": node,
                "file": {"driver": "file", "filename": str(target)},
            },
        )
    rig.backup_target = rig.write_targets[0]
    vm.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(rig.nbd_socket)}}})
    if not rig.share_rw:
        return  # the device does not share write: QEMU refuses the export
    vm.cmd(
        "block-export-add",
        {"type": "nbd", "id": "pre", "node-name": DISK_NODE, "name": "pre", "writable": True},
    )
