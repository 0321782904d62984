"""The freeze scenarios: boot the probe guest, trigger a freeze, verify it.

These are the reusable steps behind both the functional tests and the CLI's
final verification table.  Everything is measured, nothing assumed: the run
state and events come from QMP, memory from ``pmemsave`` and
``dump-guest-memory`` files, disk bytes from the image file, packets from a
listener (and, on a tap, a raw capture) that record kernel arrival times.

Only the QEMU install prefix is needed (``<prefix>/bin/qemu-system-x86_64``,
``qemu-img``, ``qemu-io``); this module does not know how it was built.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import config, guest, netns
from harness.vm import VM, VMCommandError, VMError, qemu_tool, system_binary

#: trigger -> FROZEN reason the series reports for it
REASONS = {
    "qmp": "host-qmp-freeze",
    "panic": "guest-panic",
    "watchdog": "watchdog",
    "io-error": "io-error",
    "internal-error": "internal-error",
}
TRIGGERS = tuple(REASONS)

DISK_NODE = "disk0"
DEVICE_ID = "vblk0"
NETDEV_ID = "net0"
NIC_ID = "nic0"
IMAGE_SIZE = 1 << 20
RAM_MB = 64
NBD_WRITE_OFFSET = 512 << 10
SECTOR = 512
RECORD_RX = re.compile(r"^record (\d+) blk=(\w+) net=(\w+)", re.M)
FREEZE_EVENT_TIMEOUT = 20.0
#: The proof's soak: from the end of the memory checks, attempts inside it.
SOAK_S = 30.0
#: Soak of a negative control: stock goes red at the first retry.
CONTROL_SOAK_S = 3.0
#: blkdebug rules that make every write fail with EIO once the host has read
#: from the device (HMP qemu-io), so the host chooses the moment: the probe
#: only writes, and its writes come with flushes (no write cache negotiated),
#: so neither writes nor flushes can serve as the switch.
_BLKDEBUG_SET_STATE = [{"event": "read_aio", "state": 1, "new_state": 2}]
_BLKDEBUG_INJECT = [{"event": "pwritev", "state": 2, "errno": 5, "once": False, "iotype": "write"}]


class CheckError(Exception):
    """The scenario could not be set up or driven (not a verdict)."""


# -- small tools -------------------------------------------------------------


def run_tool(argv: Sequence[str | Path], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool (no shell), capturing its output; never raises on rc."""
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def create_image(prefix: Path, path: Path, fmt: str, size: int = IMAGE_SIZE) -> None:
    r = run_tool([qemu_tool(prefix, "qemu-img"), "create", "-q", "-f", fmt, path, str(size)])
    if r.returncode != 0:
        raise CheckError(f"qemu-img create {path}: {r.stderr.strip()}")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bytes_changed(before: bytes, after: bytes) -> int:
    """How many bytes differ (a size change counts its whole difference)."""
    n = min(len(before), len(after))
    diff = sum(1 for a, b in zip(before[:n], after[:n], strict=True) if a != b)
    return diff + abs(len(before) - len(after))


def guest_view(prefix: Path, image: Path, fmt: str, out: Path) -> bytes:
    """The guest-visible disk contents (format driver applied), read-only, shared."""
    if fmt == "raw":
        return image.read_bytes()
    r = run_tool(
        [qemu_tool(prefix, "qemu-img"), "convert", "-U", "-f", fmt, "-O", "raw", image, out]
    )
    if r.returncode != 0:
        raise CheckError(f"qemu-img convert: {r.stderr.strip()}")
    return out.read_bytes()


def second_qemu_opens_rw(
    prefix: Path,
    image: Path,
    fmt: str,
    workdir: Path,
    accel: str = "kvm",
    bios: Path | None = None,
) -> tuple[bool, str]:
    """Can a standby QEMU open the image read-write while the first one lives?

    A second qemu-system (stopped with -S, so the guest never runs) attaches
    the image to a virtio-blk device with the default share-rw=off, which
    takes QEMU's image locks exactly as a standby would; it is quit at once.
    """
    blockdev = {
        "driver": fmt,
        "node-name": "standby0",
        "file": {"driver": "file", "filename": str(image)},
    }
    args = [
        "-S",
        "-machine",
        "pc",
        "-blockdev",
        json.dumps(blockdev),
        "-device",
        "virtio-blk-pci,drive=standby0",
    ]
    if bios is not None:
        # Any firmware will do, it never runs; this one needs no -L dirs.
        args += ["-bios", str(bios)]
    log_dir = workdir / f"standby-{secrets.token_hex(3)}"
    vm = VM(
        system_binary(prefix), args, name="standby", log_dir=log_dir, accel=accel, console="none"
    )
    try:
        with vm:
            info = next(
                b for b in vm.cmd("query-named-block-nodes") if b.get("node-name") == "standby0"
            )
            ok = info.get("ro") is False
            text = "opened read-write" if ok else f"opened read-only: {info}"
    except VMError as e:
        # QEMU refuses to start on a lock conflict; its message says why.
        log = (log_dir / "qemu.log").read_text(errors="replace")
        text = log.strip().splitlines()[-1] if log.strip() else str(e)
        return False, text
    return ok, text


def nbd_client_write(prefix: Path, sock: Path, export: str) -> tuple[bool, str]:
    """A real NBD client write through QEMU's own client; True if it succeeded.

    It writes 4 KiB of 0x5a at NBD_WRITE_OFFSET, away from the probe's records.
    """
    uri = f"nbd+unix:///{export}?socket={sock}"
    cmd = f"write -P 0x5a {NBD_WRITE_OFFSET} 4096"
    r = run_tool(
        [qemu_tool(prefix, "qemu-io"), "-f", "raw", "-c", cmd, uri],
        timeout=30,
    )
    text = (r.stdout + r.stderr).strip()
    ok = r.returncode == 0 and "wrote 4096" in text and "failed" not in text.lower()
    return ok, text


def parse_records(disk: bytes, marker: str) -> dict[int, int]:
    """Sector -> counter of every valid probe record (magic, CRC, marker) on disk."""
    found: dict[int, int] = {}
    for off in range(SECTOR, len(disk) - SECTOR + 1, SECTOR):
        rec = guest.decode_sector(disk[off : off + SECTOR])
        if rec is None or rec.magic != guest.RECORD_MAGIC:
            continue
        if rec.sector != off // SECTOR or rec.marker != marker:
            continue
        found[rec.sector] = rec.counter
    return found


def missing_records(records: Mapping[int, int], last: int, sectors: int) -> list[int]:
    """Completed records (those still resident in the ring) absent from disk.

    Record n lives in sector 1 + (n-1) % sectors, so the last ``sectors``
    completed records must all be there with their own counter.
    """
    first = max(1, last - sectors + 1)
    return [n for n in range(first, last + 1) if records.get(1 + (n - 1) % sectors) != n]


# -- the rig: probe guest + disk + network -----------------------------------


@dataclass
class Rig:
    """One running probe VM with its disk, network listener and capture."""

    vm: VM
    prefix: Path
    workdir: Path
    image: Path
    disk_format: str
    network: str
    marker: str
    listener: netns.UdpListener
    capture: netns.FrameCapture | None = None
    tap: netns.Tap | None = None
    backup_target: Path | None = None
    #: Files a write path would write (job targets, overlays, migration
    #: streams): every non-zero byte in them counts as written after freeze.
    write_targets: list[Path] = field(default_factory=list)
    accel: str = "kvm"
    bios: Path | None = None
    #: Guest RAM, for pmemsave of all of it.
    ram_mb: int = RAM_MB
    #: A paging guest (Linux): virtual != physical, so memsave is not checked.
    paged: bool = False
    #: How long a live guest may take per record (TCG Linux is slow).
    record_timeout: float = 10.0
    #: share-rw=on on the guest's disk: needed for a writable NBD export of
    #: it (the NBD rig); production-shaped rigs have share-rw=off.
    share_rw: bool = True

    def standby_opens_rw(self) -> tuple[bool, str]:
        """Can a second QEMU open this rig's image read-write right now?"""
        return second_qemu_opens_rw(
            self.prefix, self.image, self.disk_format, self.workdir, self.accel, self.bios
        )

    @property
    def nbd_socket(self) -> Path:
        return self.vm.paths.sock_dir / "nbd.sock"

    @property
    def sectors(self) -> int:
        """The record ring size the probe reported at boot."""
        m = re.search(r"record sectors=(\d+)", self.vm.console_text())
        if not m:
            raise CheckError("the probe did not report its record sectors")
        return int(m.group(1))

    def records_printed(self) -> list[int]:
        return [int(m.group(1)) for m in RECORD_RX.finditer(self.vm.console_text())]

    def last_record(self) -> int:
        recs = self.records_printed()
        return recs[-1] if recs else 0

    def wait_record(self, n: int, timeout: float) -> int:
        """Wait until the guest has completed record ``n`` (or a later one)."""
        deadline = time.monotonic() + timeout
        start = 0
        while True:
            m = self.vm.wait_for_console(RECORD_RX, max(0.0, deadline - time.monotonic()), start)
            if int(m.group(1)) >= n:
                return int(m.group(1))
            start = m.end()

    def guest_command(self, c: bytes) -> None:
        self.vm.console_write(c)

    def records_after(self, offset: int) -> list[int]:
        """Records the console printed after byte ``offset``: the guest ran."""
        return [int(m.group(1)) for m in RECORD_RX.finditer(self.vm.console_text(), offset)]

    def datagrams_after(self, wall: float) -> int:
        n = len(self.listener.after_wall(wall))
        if self.capture is not None:
            n = max(n, len(self.capture.after_wall(wall)))
        return n


def probe_args(
    boot_args: Sequence[str],
    image: Path,
    disk_format: str,
    *,
    netdev: str,
    actions: Mapping[str, str],
    werror: str | None,
    io_error_injection: bool,
    share_rw: bool = True,
) -> list[str]:
    """QEMU arguments for the probe guest: legacy virtio-blk/net, pvpanic, ib700.

    ``share_rw=False`` is what production has (libvirt's default): the
    guest's device then takes the unshare-write lock byte too, so only a
    real release lets a standby open the image; but no writable NBD export
    of the same node can be added next to it.
    """
    file_node: dict[str, Any] = {"driver": "file", "filename": str(image)}
    if io_error_injection:
        file_node = {
            "driver": "blkdebug",
            "image": file_node,
            "set-state": _BLKDEBUG_SET_STATE,
            "inject-error": _BLKDEBUG_INJECT,
        }
    blockdev = {"driver": disk_format, "node-name": DISK_NODE, "file": file_node}
    blk_dev = f"virtio-blk-pci,disable-modern=on,drive={DISK_NODE},id={DEVICE_ID}"
    blk_dev += ",share-rw=on" if share_rw else ",share-rw=off"
    if werror:
        blk_dev += f",werror={werror}"
    if io_error_injection:
        # An explicit geometry spares QEMU its guessing read of sector 0 at
        # startup, which would otherwise arm the read-triggered rule.
        blk_dev += ",cyls=2,heads=16,secs=63"
    args = [
        "-machine",
        "pc",
        "-m",
        str(RAM_MB),
        *boot_args,
        "-blockdev",
        json.dumps(blockdev),
        "-device",
        blk_dev,
        "-netdev",
        netdev,
        "-device",
        f"virtio-net-pci,disable-modern=on,netdev={NETDEV_ID},id={NIC_ID},romfile=",
        "-device",
        "pvpanic",
        "-device",
        "ib700",
    ]
    for k, v in actions.items():
        args += ["-action", f"{k}={v}"]
    return args


@contextlib.contextmanager
def probe_rig(
    prefix: Path,
    workdir: Path,
    *,
    disk_format: str = "raw",
    network: str = "user",
    actions: Mapping[str, str] | None = None,
    werror: str | None = None,
    io_error_injection: bool = False,
    accel: str = "kvm",
    firmware_dirs: Sequence[Path] = (),
    extra_args: Sequence[str] = (),
    guest_options: Mapping[str, Any] | None = None,
    first_record_timeout: float = 30.0,
    log_dir: Path | None = None,
    boot: str = "bios",
    probe_cache: Path | None = None,
    image_dir: Path | None = None,
    share_rw: bool = True,
) -> Iterator[Rig]:
    """Boot the probe guest and wait for its first records; always tear down.

    ``boot="bios"`` runs the probe as the firmware (first record in well
    under a second on KVM here); ``"kernel"`` boots it through SeaBIOS as a
    multiboot kernel (needs the firmware dirs, and is slow under emulation).
    The disk image goes to ``image_dir`` when given (e.g. a filesystem to
    unmount after the freeze), else to ``workdir``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    images = guest.build_probe_images(probe_cache or config.cache_root() / "probe")
    image = (image_dir or workdir) / f"disk.{disk_format}"
    create_image(prefix, image, disk_format)
    marker = secrets.token_hex(8)
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(guest_network(network))
        cfg = guest.ProbeConfig(marker=marker, **{**net.addresses, **(guest_options or {})})
        if boot == "bios":
            boot_args = cfg.bios_args(images.bios)
        elif boot == "kernel":
            boot_args = cfg.kernel_args(images.elf)
        else:
            raise ValueError(f"unknown boot mode {boot!r}")
        args = probe_args(
            boot_args,
            image,
            disk_format,
            netdev=net.netdev,
            actions=actions or {},
            werror=werror,
            io_error_injection=io_error_injection,
            share_rw=share_rw,
        )
        vm = VM(
            system_binary(prefix),
            [*args, *extra_args],
            name="probe",
            log_dir=log_dir or workdir / "vm",
            accel=accel,
            firmware_dirs=firmware_dirs,
            pass_fds=net.fds,
        )
        stack.enter_context(vm)
        net.close_fds()  # QEMU holds its own copy of the tap fd now
        rig = Rig(
            vm,
            prefix,
            workdir,
            image,
            disk_format,
            network,
            marker,
            net.listener,
            net.capture,
            net.tap,
            accel=accel,
            bios=images.bios,
            share_rw=share_rw,
        )
        try:
            rig.wait_record(1, first_record_timeout)
        except VMError:
            vm.mark_failed()
            raise
        yield rig


@dataclass
class GuestNetwork:
    """The host side of a guest's NIC: the -netdev, the listener, the capture."""

    netdev: str
    listener: netns.UdpListener
    #: the guest's addressing (dst_ip, dst_port, src_ip, ...), for its config
    addresses: dict[str, Any]
    capture: netns.FrameCapture | None = None
    tap: netns.Tap | None = None
    #: descriptors QEMU inherits (the tap), closed once QEMU has them
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())


@contextlib.contextmanager
def guest_network(network: str) -> Iterator[GuestNetwork]:
    """``user``: slirp to a listener on 127.0.0.1; ``tap``: a tap in a private
    network namespace, with the listener and a frame capture inside it."""
    with contextlib.ExitStack() as stack:
        if network == "user":
            listener = stack.enter_context(netns.UdpListener("127.0.0.1"))
            net = GuestNetwork(
                f"user,id={NETDEV_ID}",
                listener,
                {"dst_ip": netns.USER_NET_HOST_IP, "dst_port": listener.port},
            )
        elif network == "tap":
            ns = stack.enter_context(netns.network_namespace())
            tap = ns.add_tap()
            listener = stack.enter_context(netns.UdpListener(netns.TAP_HOST_IP, netns=ns.name))
            capture = stack.enter_context(netns.FrameCapture(tap))
            fd = tap.open_fd()
            net = GuestNetwork(
                f"tap,id={NETDEV_ID},fd={fd}",
                listener,
                {
                    "src_ip": netns.TAP_GUEST_IP,
                    "gateway": netns.TAP_HOST_IP,
                    "dst_ip": netns.TAP_HOST_IP,
                    "netmask": "255.255.255.0",
                    "dst_port": listener.port,
                },
                capture,
                tap,
                [fd],
            )
        else:
            raise ValueError(f"unknown network {network!r}")
        stack.callback(net.close_fds)
        yield net


# -- triggers ----------------------------------------------------------------


def trigger(rig: Rig, what: str) -> None:
    """Make the VM freeze through ``what`` (see TRIGGERS)."""
    if what == "qmp":
        rig.vm.cmd("freeze")
    elif what == "panic":
        rig.guest_command(guest.CMD_PANIC)
    elif what == "watchdog":
        rig.guest_command(guest.CMD_WATCHDOG)
    elif what == "internal-error":
        rig.guest_command(guest.CMD_EMULATION_ERROR)
    elif what == "io-error":
        # A read from the host arms the blkdebug rule: the guest's next
        # write fails with EIO and werror=freeze acts on it.
        out = rig.vm.hmp(f'qemu-io {DISK_NODE} "read 0 512"')
        if out.strip():
            raise CheckError(f"HMP qemu-io read: {out.strip()}")
    else:
        raise ValueError(f"unknown trigger {what!r}")


def control_actions(what: str) -> dict[str, str]:
    """The stock -action settings that pause instead (negative control).

    A KVM internal error stops a stock VM by itself; an I/O error pauses it
    through werror=stop.
    """
    return {"panic": {"panic": "pause"}, "watchdog": {"watchdog": "pause"}}.get(what, {})


def trigger_actions(what: str) -> dict[str, str]:
    """The -action settings (and werror) a trigger needs on the patched build."""
    return {
        "panic": {"panic": "freeze"},
        "watchdog": {"watchdog": "freeze"},
        "internal-error": {"internal-error": "freeze"},
    }.get(what, {})


# -- verification ------------------------------------------------------------


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


@dataclass
class FreezeResult:
    trigger: str
    accelerator: str
    memory_kept: bool
    bytes_written_after_freeze: int
    packets_after_freeze: int
    lock_released: bool
    refusals_held: bool
    details: list[str] = field(default_factory=list)
    status: str = ""
    frozen_events: int = 0
    reason: str | None = None
    records_on_disk: bool = False
    quit_clean: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    #: How long the soak watched (from the end of the memory checks).
    soak_s: float = 0.0
    #: How many times the soak retried the cheap write paths.
    soak_rounds: int = 0
    #: Records the console printed after the freeze: the guest ran again.
    records_after_freeze: int = 0
    #: A negative control (stock QEMU paused): expected to FAIL.
    control: bool = False
    #: What a partial run could not prove here (no namespaces, no KVM ...).
    not_proven: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.status == "frozen"
            and self.frozen_events == 1
            and self.reason == REASONS.get(self.trigger)
            and self.memory_kept
            and self.records_on_disk
            and self.bytes_written_after_freeze == 0
            and self.packets_after_freeze == 0
            and self.records_after_freeze == 0
            and self.lock_released
            and self.refusals_held
            and self.quit_clean
        )


def accelerator(vm: VM) -> str:
    kvm = vm.cmd("query-kvm")
    return "kvm" if kvm.get("enabled") else "tcg"


def memory_has(
    vm: VM, workdir: Path, needles: Sequence[bytes], *, ram_mb: int = RAM_MB, paged: bool = False
) -> dict[str, bool]:
    """Look for each needle in RAM through every read path a frozen VM keeps.

    ``pmemsave`` of all RAM and ``dump-guest-memory`` are searched for every
    needle; the first needle is then also read back at the address where
    pmemsave found it, with HMP ``xp`` (physical) and, for an unpaged guest
    such as the probe (virtual == physical), ``memsave``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    pmem = workdir / "pmemsave.bin"
    dump = workdir / "dump.elf"
    vm.cmd("pmemsave", val=0, size=ram_mb << 20, filename=str(pmem))
    vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{dump}", timeout=120)
    found = {}
    addr = -1
    for label, path in (("pmemsave", pmem), ("dump-guest-memory", dump)):
        data = path.read_bytes()
        for n in needles:
            found[f"{label}:{n.decode(errors='replace').strip()}"] = n in data
        if label == "pmemsave" and needles:
            addr = data.find(needles[0])
        path.unlink()
    if needles:
        first = needles[0]
        found["xp"] = addr >= 0 and xp_bytes(vm, addr, len(first)) == first
        if paged:
            return found
        found["memsave"] = False
        if addr >= 0:
            out = workdir / "memsave.bin"
            vm.cmd("memsave", val=addr, size=len(first), filename=str(out))
            found["memsave"] = out.read_bytes() == first
            out.unlink()
    return found


def xp_bytes(vm: VM, addr: int, size: int) -> bytes:
    """Read guest-physical memory through HMP ``xp``."""
    text = vm.hmp(f"xp /{size}xb 0x{addr:x}")
    out = bytearray()
    for line in text.splitlines():
        _, _, values = line.partition(":")
        out += bytes(int(v, 16) for v in values.split() if v.startswith("0x"))
    return bytes(out)


def _attempt(
    vm: VM, name: str, fn: Callable[[], tuple[bool, str]], expect_status: str = "frozen"
) -> Attempt:
    """Run one write/run attempt; ``fn`` returns (refused, message)."""
    try:
        refused, msg = fn()
    except VMCommandError as e:
        refused, msg = True, f"{e.error_class}: {e.desc}"
    except (VMError, CheckError, OSError, subprocess.SubprocessError) as e:
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


def _cmd_refused(vm: VM, name: str, args: Mapping[str, Any] | None = None) -> tuple[bool, str]:
    err = vm.try_cmd(name, args)
    if err is None:
        return False, "accepted"
    return True, f"{err.error_class}: {err.desc}"


def write_attempts(rig: Rig) -> list[Attempt]:
    """Try every path that could run the guest or write to disk or network."""
    vm, wd = rig.vm, rig.workdir
    out: list[Attempt] = []

    def add(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        out.append(_attempt(vm, name, fn))

    for cmd in ("cont", "system_reset", "system_powerdown", "system_wakeup", "inject-nmi"):
        add(cmd, functools.partial(_cmd_refused, vm, cmd))
    add("hmp cont", lambda: _hmp_refused(vm, "cont"))
    add("blockdev-set-active", lambda: _cmd_refused(vm, "blockdev-set-active", {"active": True}))
    add(
        "blockdev-set-active node",
        lambda: _cmd_refused(vm, "blockdev-set-active", {"node-name": DISK_NODE, "active": True}),
    )
    add("blockdev-add", lambda: _blockdev_add_refused(rig))
    add("blockdev-backup", lambda: _backup_refused(rig))
    if rig.share_rw:
        add("NBD write via open export", lambda: _nbd_write_refused(rig, "pre"))
    add("block-export-add + NBD write", lambda: _export_add_refused(rig))
    add("set_link up", lambda: _cmd_refused(vm, "set_link", {"name": NIC_ID, "up": True}))
    add(
        "announce-self",
        lambda: _cmd_refused(
            vm, "announce-self", {"initial": 50, "max": 100, "rounds": 3, "step": 50}
        ),
    )
    # Block jobs and snapshots: each would write the image or a file next
    # to it (all listed in rig.write_targets, so their bytes are measured).
    for name, args in _block_write_commands(rig):
        add(name, functools.partial(_cmd_refused, vm, name, args))
    add("hmp qemu-io write", lambda: _hmp_io_write_refused(vm))
    add("hmp savevm", lambda: _hmp_refused(vm, "savevm frz-hmp"))
    add("netdev_add", lambda: _cmd_refused(vm, "netdev_add", {"type": "user", "id": "frzn1"}))
    add(
        "device_add virtio-net",
        lambda: _cmd_refused(
            vm, "device_add", {"driver": "virtio-net-pci", "netdev": "spare0", "id": "frznic1"}
        ),
    )
    add(
        "device_add virtio-blk",
        lambda: _cmd_refused(
            vm, "device_add", {"driver": "virtio-blk-pci", "drive": "spare0", "id": "frzblk1"}
        ),
    )
    # Before migrate: on stock, gdb 'c' after a migration completed runs the
    # guest on inactive nodes and QEMU aborts (block/io.c: "!(bs->open_flags
    # & BDRV_O_INACTIVE)"), a stock bug the negative control must not trip.
    add("gdbstub continue/step", lambda: _gdb_run_refused(rig))
    if wd / "migrate.bin" not in rig.write_targets:
        rig.write_targets.append(wd / "migrate.bin")
    add("migrate to file", lambda: _migrate_refused(vm, wd / "migrate.bin"))
    return out


def _migrate_refused(vm: VM, path: Path) -> tuple[bool, str]:
    err = vm.try_cmd("migrate", {"uri": f"file:{path}"})
    if err is not None:
        return True, f"{err.error_class}: {err.desc}"
    # Accepted: let it finish (it inactivates the disks at the end), so what
    # follows sees one state, not a race with the migration thread.
    deadline = time.monotonic() + 30
    status = "?"
    while time.monotonic() < deadline:
        status = vm.cmd("query-migrate").get("status", "?")
        if status in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    return False, f"migrate accepted ({status})"


def _block_write_commands(rig: Rig) -> list[tuple[str, dict[str, Any]]]:
    """QMP block jobs/snapshots that write, with the files they would write."""
    wd = rig.workdir
    overlay, dbackup = wd / "overlay.qcow2", wd / "drive-backup.raw"
    rig.write_targets += [p for p in (overlay, dbackup) if p not in rig.write_targets]
    return [
        (
            "blockdev-mirror",
            {"job-id": "frz-mirror", "device": DISK_NODE, "target": "tgt1", "sync": "full"},
        ),
        (
            "drive-backup",
            {
                "job-id": "frz-dbackup",
                "device": DISK_NODE,
                "sync": "full",
                "target": str(dbackup),
                "format": "raw",
            },
        ),
        ("block-commit", {"job-id": "frz-commit", "device": DISK_NODE}),
        ("block-stream", {"job-id": "frz-stream", "device": DISK_NODE}),
        (
            "blockdev-snapshot-sync",
            {
                "node-name": DISK_NODE,
                "snapshot-file": str(overlay),
                "snapshot-node-name": "frzsnap",
                "format": "qcow2",
            },
        ),
        (
            "snapshot-save",
            {"job-id": "frz-snapsave", "tag": "frz", "vmstate": DISK_NODE, "devices": [DISK_NODE]},
        ),
        ("block_resize", {"node-name": DISK_NODE, "size": 2 * IMAGE_SIZE}),
    ]


def _hmp_io_write_refused(vm: VM) -> tuple[bool, str]:
    """HMP qemu-io writing into the guest's disk, away from its records."""
    text = vm.hmp(f'qemu-io {DISK_NODE} "write -P 0x33 {NBD_WRITE_OFFSET + 8192} 512"').strip()
    return "wrote" not in text, text or "no output"


def _hmp_refused(vm: VM, line: str) -> tuple[bool, str]:
    text = vm.hmp(line).strip()
    # HMP reports errors as text; an empty answer means it was done.
    return bool(text), text or "accepted"


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


def _blockdev_add_refused(rig: Rig) -> tuple[bool, str]:
    extra = rig.workdir / "extra.raw"
    create_image(rig.prefix, extra, "raw")
    return _cmd_refused(
        rig.vm,
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "extra0",
            "file": {"driver": "file", "filename": str(extra)},
        },
    )


def _backup_refused(rig: Rig) -> tuple[bool, str]:
    vm = rig.vm
    err = vm.try_cmd(
        "blockdev-backup",
        {"job-id": "frz-backup", "device": DISK_NODE, "target": "tgt0", "sync": "full"},
    )
    if err is not None:
        return True, f"{err.error_class}: {err.desc}"
    # Accepted: let it run to the end so the damage is measured.
    with contextlib.suppress(VMError):
        vm.event_wait("BLOCK_JOB_COMPLETED", 30, match={"data": {"device": "frz-backup"}})
    return False, "blockdev-backup accepted"


def _nbd_write_refused(rig: Rig, export: str) -> tuple[bool, str]:
    wrote, text = nbd_client_write(rig.prefix, rig.nbd_socket, export)
    return not wrote, f"NBD client write {'succeeded' if wrote else 'failed'}: {text[-200:]}"


def _export_add_refused(rig: Rig) -> tuple[bool, str]:
    err = rig.vm.try_cmd(
        "block-export-add",
        {"type": "nbd", "id": "post", "node-name": DISK_NODE, "name": "post", "writable": True},
    )
    wrote, _text = nbd_client_write(rig.prefix, rig.nbd_socket, "post")
    msg = "accepted" if err is None else f"{err.error_class}: {err.desc}"
    return err is not None and not wrote, f"{msg}; client write {'ok' if wrote else 'failed'}"


def _gdb_send(sock: socket.socket, body: str) -> None:
    csum = sum(body.encode()) % 256
    sock.sendall(f"${body}#{csum:02x}".encode())


def _gdb_reply(sock: socket.socket, timeout: float) -> str | None:
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


def _gdb_run_refused(rig: Rig) -> tuple[bool, str]:
    """Attach QEMU's gdbstub and ask it to continue, then to single-step.

    Refused means the guest did not run: no new record on the console (the
    wait for one must time out) and, checked by the caller, still frozen.
    """
    vm = rig.vm
    path = vm.paths.sock_dir / "gdb.sock"
    out = vm.hmp(f"gdbserver unix:{path},server=on,wait=off").strip()
    if not path.exists():
        return True, f"gdbserver not started: {out}"
    notes = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gdb:
            gdb.connect(str(path))
            _gdb_send(gdb, "?")
            notes.append(f"? -> {_gdb_reply(gdb, 5)}")
            for cmd in ("c", "s"):
                start = len(vm.console_text())
                _gdb_send(gdb, cmd)
                notes.append(f"{cmd} -> {_gdb_reply(gdb, 1.0)}")
                try:
                    m = vm.wait_for_console(RECORD_RX, 1.0, start)
                except VMError:
                    continue
                ran = f"guest ran after gdb '{cmd}': {m.group(0)}"
                break
            else:
                ran = ""
            # Detach as gdb does (breakpoints and single-step cleared): a stub
            # just dropped leaves a stock vCPU single-stepping into a 'debug'
            # stop later, which aborts QEMU if it lands during a migration.
            _gdb_send(gdb, "D")
            notes.append(f"D -> {_gdb_reply(gdb, 1.0)}")
            if ran:
                return False, ran
    finally:
        vm.hmp("gdbserver none")
    return True, "; ".join(notes)


@dataclass
class Soak:
    """What the soak saw: how long it watched, how often it retried, what moved."""

    seconds: float = 0.0
    rounds: int = 0
    notes: list[str] = field(default_factory=list)


def _soak_round(rig: Rig, expect_status: str) -> list[str]:
    """One retry of the paths cheap enough to loop on; what got through."""
    vm = rig.vm
    moved = []
    for name, args in (
        ("cont", None),
        ("set_link", {"name": NIC_ID, "up": True}),
        ("blockdev-set-active", {"active": True}),
    ):
        if vm.try_cmd(name, args) is None:
            moved.append(f"soak: {name} accepted")
    if vm.hmp("cont").strip() == "":
        moved.append("soak: hmp cont accepted")
    if rig.share_rw:
        wrote, _ = nbd_client_write(rig.prefix, rig.nbd_socket, "pre")
        if wrote:
            moved.append("soak: NBD write via the open export succeeded")
    if (status := vm.status()) != expect_status:
        moved.append(f"soak: status became {status}")
    return moved


def soak(
    rig: Rig,
    seconds: float,
    freeze_wall: float,
    console_mark: int,
    image_at_freeze: bytes,
    expect_status: str = "frozen",
    retry: Callable[[], list[Attempt]] | None = None,
) -> Soak:
    """Retry the write paths for ``seconds`` while watching everything.

    Every round retries the cheap paths (cont, set_link, activation, HMP
    cont, the open NBD export) and, with ``retry``, the whole attempt table.

    Watched every round: the console (a new record means the guest ran),
    the image bytes, the listener and the tap capture, QEMU's status. The
    soak always runs its whole window unless QEMU exits, so a short soak
    shows up in ``seconds`` and the tests can fail on it.
    """
    start = time.monotonic()
    until = start + seconds
    out = Soak()
    seen: dict[str, None] = {}  # notes in order, each once
    while (left := until - time.monotonic()) > 0:
        if not rig.vm.is_running():
            seen["soak: QEMU exited"] = None
            break
        try:
            notes = []
            if retry is not None:
                # Named once per path: stock's messages vary round to round.
                notes += [f"soak: {a.name} not held" for a in retry() if not a.held]
            # The cheap paths last, cont among them: a VM that can be
            # resumed ends every round resumed (its locks re-taken).
            notes += _soak_round(rig, expect_status)
        except VMError as e:
            notes = [f"soak: {type(e).__name__}"]
        out.rounds += 1
        if rig.records_after(console_mark):
            notes.append("soak: guest ran again (the console printed new records)")
        if rig.image.read_bytes() != image_at_freeze:
            notes.append("soak: image bytes changed")
        if rig.datagrams_after(freeze_wall):
            notes.append("soak: datagram after freeze")
        seen.update(dict.fromkeys(notes))
        # The pause between rounds is itself a wait for a datagram that must
        # never come (kernel timestamps, checked after the loop too).
        with contextlib.suppress(TimeoutError):
            rig.listener.wait_for(lambda d: d.wall > freeze_wall, timeout=min(0.5, left))
    out.seconds = time.monotonic() - start
    out.notes = list(seen)
    return out


def _enter_stock_pause(rig: Rig, what: str, details: list[str]) -> dict[str, Any]:
    """The stock stand-in for a freeze (negative control): pause, then what an
    operator scripts today -- links down and every node inactive."""
    vm = rig.vm
    if what == "qmp":
        vm.cmd("stop")
    else:
        trigger(rig, what)  # with -action ...=pause / werror=stop on this rig
    ev = vm.event_wait("STOP", FREEZE_EVENT_TIMEOUT)
    # The open export would make stock refuse to inactivate (EPERM): close it
    # first, as a careful operator would, so the lock check is tested against
    # a release that did happen.
    for name, args in (
        *((("block-export-del", {"id": "pre"}),) if rig.share_rw else ()),
        ("nbd-server-stop", None),
        ("set_link", {"name": NIC_ID, "up": False}),
        ("blockdev-set-active", {"active": False}),
    ):
        if name == "nbd-server-stop" and rig.share_rw:
            with contextlib.suppress(VMError):
                vm.event_wait("BLOCK_EXPORT_DELETED", 10)
        err = vm.try_cmd(name, args)
        details.append(f"stock {name} {args}: {'ok' if err is None else err.desc}")
    return ev


def verify_frozen(rig: Rig, what: str, soak_s: float, *, control: bool = False) -> FreezeResult:
    """Trigger a freeze through ``what`` and measure every promise.

    ``control=True`` is the negative control on stock QEMU: the rig pauses
    instead (``stop``, ``-action ...=pause``, ``werror=stop``), links go down
    and nodes inactive, and the very same measurements follow; they must go
    red there, or they could not catch a broken freeze.
    """
    vm = rig.vm
    details: list[str] = []
    acc = accelerator(vm)
    # The guest is live: records reach the disk and the listener.
    before = rig.wait_record(3, 2 * rig.record_timeout)
    rig.listener.wait_for(lambda d: True, timeout=10)
    details.append(f"records before trigger: {before}, datagrams: {len(rig.listener.datagrams())}")
    prepare_write_paths(rig)
    if control:
        ev = _enter_stock_pause(rig, what, details)
    else:
        trigger(rig, what)
        ev = vm.event_wait("FROZEN", FREEZE_EVENT_TIMEOUT)
    ts = ev.get("timestamp", {})
    freeze_wall = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
    reason = ev.get("data", {}).get("reason") if ev.get("event") == "FROZEN" else None
    image_at_freeze = rig.image.read_bytes()
    status = vm.status()
    last = rig.last_record()
    details.append(f"{ev.get('event')} reason={reason}; status={status}; last record={last}")

    # Nothing the guest completed is lost.
    view = guest_view(rig.prefix, rig.image, rig.disk_format, rig.workdir / "view.raw")
    missing = missing_records(parse_records(view, rig.marker), last, rig.sectors)
    records_ok = last > 0 and not missing
    if missing:
        details.append(f"completed records missing on disk: {missing[:10]}")

    # Memory is kept: marker and the last completed counter.
    tag = guest.marker_tag(rig.marker)
    lasts = [guest.last_record_tag(rig.marker, n) for n in (last, last + 1)]
    # A marker the guest never had: finding it would mean the search is void.
    decoy = guest.marker_tag(secrets.token_hex(8))
    found = memory_has(
        vm, rig.workdir / "mem", [tag, *lasts, decoy], ram_mb=rig.ram_mb, paged=rig.paged
    )
    decoy_key = decoy.decode()
    decoy_found = any(v for k, v in found.items() if k.endswith(decoy_key))
    found = {k: v for k, v in found.items() if not k.endswith(decoy_key)}
    if decoy_found:
        details.append("memory: a marker the guest never had was found: the search is void")
    marker_ok = all(v for k, v in found.items() if "MARKER" in k) and found["xp"]
    marker_ok = marker_ok and not decoy_found
    marker_ok = marker_ok and found.get("memsave", rig.paged)
    last_ok = all(
        any(found[f"{src}:{n.decode().strip()}"] for n in lasts)
        for src in ("pmemsave", "dump-guest-memory")
    )
    memory_kept = marker_ok and last_ok
    details.append(f"memory: marker={marker_ok} last counter={last_ok} ({found})")

    # The soak starts after the memory checks: every attempt is inside it.
    # Console bytes from before this point are long settled (vCPUs stopped).
    console_mark = len(vm.console_text())
    soak_start = time.monotonic()
    attempts = write_attempts(rig)
    again: str | None = None
    if not control and vm.is_running():
        err = _attempt(vm, "freeze again", lambda: _cmd_refused(vm, "freeze"))
        # freeze on a frozen VM must succeed (agents retry): "refused" is bad.
        again = None if (not err.refused and err.alive and err.still_frozen) else err.message
        details.append(f"freeze again: {again or 'ok'}")
    # The whole table again, round after round, until the soak's end.
    sk = soak(
        rig,
        max(0.0, soak_start + soak_s - time.monotonic()),
        freeze_wall,
        console_mark,
        image_at_freeze,
        expect_status="frozen" if not control else status,
        retry=lambda: write_attempts(rig),
    )
    details += sk.notes
    soaked = time.monotonic() - soak_start
    details.append(f"soak: {soaked:.1f} s, {sk.rounds} rounds of retries after the attempts")
    records_after = len(rig.records_after(console_mark))

    written = bytes_changed(image_at_freeze, rig.image.read_bytes())
    for target in rig.write_targets:
        if target.exists():
            tgt = target.read_bytes()
            if moved := len(tgt) - tgt.count(0):
                details.append(f"{target.name}: {moved} bytes written after the freeze")
                written += moved
    packets = rig.datagrams_after(freeze_wall)
    alive = vm.is_running()
    if rig.tap is not None:
        details.append(f"tap carrier after freeze (QEMU still holds it): {rig.tap.carrier()}")
    if alive:
        with contextlib.suppress(VMError, KeyError):
            fr = vm.cmd("query-status").get("freeze-reason")
            details.append(f"query-status freeze-reason: {fr}")
    frozen_events = len(vm.events("FROZEN"))
    lock_released, lock_text = rig.standby_opens_rw()
    if not lock_released:
        details.append(f"second open: {lock_text[-200:]}")
    final_status = "exited"
    if vm.is_running():
        try:
            final_status = vm.status()
        except VMError as e:
            final_status = f"? ({e})"
    if final_status != "frozen":
        details.append(f"status at the end: {final_status}")
    refusals_held = (
        all(a.held for a in attempts)
        and again is None
        and not sk.notes
        and final_status == "frozen"
    )
    for a in attempts:
        if not a.held:
            details.append(f"NOT HELD {a.name}: {a.message} (alive={a.alive})")
    quit_clean = False
    if vm.is_running():
        with contextlib.suppress(VMError):  # the reply may be lost as QEMU exits
            vm.cmd("quit")
        with contextlib.suppress(VMError):
            quit_clean = vm.wait_for_exit(10) == 0
    return FreezeResult(
        trigger=what,
        accelerator=acc,
        memory_kept=memory_kept,
        bytes_written_after_freeze=written,
        packets_after_freeze=packets,
        lock_released=lock_released,
        refusals_held=refusals_held,
        details=details,
        status=status,
        frozen_events=frozen_events,
        reason=reason,
        records_on_disk=records_ok,
        quit_clean=quit_clean,
        attempts=attempts,
        soak_s=soaked,
        soak_rounds=sk.rounds,
        records_after_freeze=records_after,
        control=control,
    )


def freeze_scenario(
    prefix: Path,
    workdir: Path,
    what: str,
    *,
    disk_format: str = "raw",
    network: str = "user",
    soak_s: float = 5.0,
    accel: str = "kvm",
    firmware_dirs: Sequence[Path] = (),
    action_via: str = "cmdline",
    control: bool = False,
    log_dir: Path | None = None,
    share_rw: bool = False,
) -> FreezeResult:
    """Boot the probe on the patched QEMU, freeze it through ``what``, verify.

    ``action_via="qmp"`` sets the trigger's action with ``set-action`` on the
    running VM instead of ``-action`` on the command line. ``control=True``
    runs the negative control on a stock QEMU in ``prefix`` instead (see
    verify_frozen), with the stock pause actions. The rig is production-
    shaped (share-rw=off) unless ``share_rw`` (the NBD rig).
    """
    io = what == "io-error"
    actions = control_actions(what) if control else trigger_actions(what)
    werror = ("stop" if control else "freeze") if io else None
    with probe_rig(
        prefix,
        workdir,
        disk_format=disk_format,
        network=network,
        actions=actions if action_via == "cmdline" else {},
        werror=werror,
        io_error_injection=io,
        accel=accel,
        firmware_dirs=firmware_dirs,
        log_dir=log_dir,
        share_rw=share_rw,
    ) as rig:
        try:
            if action_via == "qmp" and actions:
                rig.vm.cmd("set-action", actions)
            result = verify_frozen(rig, what, soak_s, control=control)
        except BaseException:
            rig.vm.mark_failed()
            raise
        if not result.ok and not control:
            rig.vm.mark_failed()
        return result


#: trigger -> (disk format, network, how the action is set) used by
#: verify_all: both formats, both networks and both ways of setting the
#: action are covered across the triggers.
VERIFY_MATRIX = {
    "qmp": ("raw", "user", "cmdline"),
    "panic": ("qcow2", "user", "cmdline"),
    "watchdog": ("raw", "tap", "cmdline"),
    "io-error": ("qcow2", "tap", "cmdline"),
    "internal-error": ("raw", "user", "qmp"),
}


#: Set to 1 by ``frozen test --partial``/``frozen verify --partial``: what the
#: host cannot prove (no KVM, no namespaces) is reported as not proven
#: instead of failing.
PARTIAL_ENV = "FROZEN_PARTIAL"


def partial_run() -> bool:
    return os.environ.get(PARTIAL_ENV, "") not in ("", "0")


def default_accel() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def verify_all(
    prefix: Path,
    workdir: Path | None = None,
    *,
    triggers: Sequence[str] = TRIGGERS,
    soak_s: float = SOAK_S,
    accel: str | None = None,
    firmware_dirs: Sequence[Path] = (),
    progress: Callable[[str], None] | None = None,
    partial: bool | None = None,
    control: bool = False,
) -> list[FreezeResult]:
    """Freeze the probe guest through each trigger on the QEMU in ``prefix``.

    A scenario that breaks down (no FROZEN event, QEMU died ...) yields a
    failed result carrying the error, so the table always has every row.
    Without KVM or network namespaces the rows that need them FAIL, unless
    ``partial`` (default: $FROZEN_PARTIAL): then they run on TCG / user
    networking and say what was not proven. ``control`` runs the negative
    controls on a stock QEMU in ``prefix`` (rows that must FAIL).
    Work files are removed when everything passed, kept otherwise.
    """
    partial = partial_run() if partial is None else partial
    no_kvm = accel is None and default_accel() != "kvm"
    accel = accel or "kvm"
    if no_kvm and partial:
        accel = "tcg"
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="frozen-verify-"))
    no_tap = netns.netns_supported()
    results = []
    for what in triggers:
        fmt, net, via = VERIFY_MATRIX[what]
        gaps = []
        if no_kvm:
            gaps.append("KVM: /dev/kvm is missing or not accessible")
        if net == "tap" and no_tap is not None:
            gaps.append(f"tap networking: {no_tap}")
            if partial:
                net = "user"
        if progress:
            progress(f"verify: {what} ({fmt} disk, {net} networking, action via {via}, {accel})")
        if gaps and not partial:
            r = FreezeResult(
                what,
                accel,
                False,
                -1,
                -1,
                False,
                False,
                control=control,
                details=[f"error: cannot prove: {g} (--partial runs the rest)" for g in gaps],
            )
        else:
            try:
                r = freeze_scenario(
                    prefix,
                    base / what,
                    what,
                    disk_format=fmt,
                    network=net,
                    soak_s=soak_s,
                    accel=accel,
                    firmware_dirs=firmware_dirs,
                    action_via=via,
                    control=control,
                )
            except (CheckError, VMError, OSError, TimeoutError, subprocess.SubprocessError) as e:
                r = FreezeResult(
                    what, accel, False, -1, -1, False, False, [f"error: {e}"], control=control
                )
            r.not_proven = gaps
        r.details.insert(0, f"disk={fmt} network={net} action={via} workdir={base / what}")
        results.append(r)
    if workdir is None and all(r.ok for r in results):
        shutil.rmtree(base, ignore_errors=True)
    return results


def verdict(r: FreezeResult) -> str:
    """PASS/FAIL; a negative control is right when red, and void when green."""
    if r.control:
        return "red (expected)" if not r.ok else "GREEN: the proof cannot fail"
    if r.ok and r.not_proven:
        return "PASS (partial)"
    return "PASS" if r.ok else "FAIL"


def verdict_ok(r: FreezeResult) -> bool:
    """Whether a row is as it must be: frozen rows pass, controls go red."""
    return not r.ok if r.control else r.ok


def format_table(results: Sequence[FreezeResult]) -> str:
    """The short verification table the CLI prints, and what was not proven."""
    head = (
        "trigger",
        "accel",
        "memory kept",
        "bytes after",
        "packets after",
        "ran again",
        "lock released",
        "refusals held",
        "verdict",
    )
    rows = [
        (
            r.trigger + (" (stock control)" if r.control else ""),
            r.accelerator,
            _yn(r.memory_kept),
            _count(r.bytes_written_after_freeze),
            _count(r.packets_after_freeze),
            str(r.records_after_freeze),
            _yn(r.lock_released),
            _yn(r.refusals_held),
            verdict(r),
        )
        for r in results
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for r in results:
        lines += [f"not proven ({r.trigger}): {g}" for g in r.not_proven]
    return "\n".join(lines)


def _yn(b: bool) -> str:
    return "yes" if b else "NO"


def _count(n: int) -> str:
    return "?" if n < 0 else str(n)


def keep_copy(src: Path, dst: Path) -> None:
    """Copy a file for the logs (used by tests on failure)."""
    with contextlib.suppress(OSError):
        shutil.copy2(src, dst)
