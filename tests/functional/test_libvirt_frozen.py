"""The frozen state through libvirt: a private virtqemud, the probe guest on KVM.

Each scenario boots the probe guest as a transient ``type='kvm'`` domain on
the patched QEMU through a private virtqemud of the patched libvirt
(harness.libvirtd), freezes it by one trigger (``virsh freeze``,
``virDomainFreeze``, ``<on_crash>freeze</on_crash>`` + guest panic,
``<watchdog action='freeze'/>``) and checks, through virsh AND
libvirt-python: state and reason, exactly one lifecycle event; resume,
suspend, save, managed save, snapshot, migrate, reset, reboot, shutdown,
PM wakeup, NMI, hotplug, block jobs and link up refused with
VIR_ERR_OPERATION_INVALID naming the frozen state; the guest marker in a
memory-only dump and through virDomainMemoryPeek; disk bytes unchanged and
no datagram after the freeze; the state across a virtqemud restart; and
``destroy``.

The baseline class runs on the unpatched QEMU: a paused domain resumes and
writes again (today's behaviour, exactly what ``frozen`` forbids), and
``virsh freeze`` fails cleanly when QEMU lacks the state.

Environment: FROZEN_LIBVIRT and FROZEN_QEMU (install prefixes; the project's
test command sets them), FROZEN_QEMU_STOCK for the baseline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # running from a checkout without installing
    sys.path.insert(0, str(REPO))

from frozen_test import CleanupTest, require_prefix  # noqa: E402

from harness import config, guest, libvirtd, linux_guest  # noqa: E402
from harness.vm import system_binary  # noqa: E402

SYNC_XML = """<domain type='kvm'><name>evsync</name><memory unit='MiB'>16</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><emulator>{emulator}</emulator></devices></domain>
"""
#: a disk to hot-plug into a frozen domain (the file is never opened)
HOTPLUG_XML = """<disk type='file' device='disk'><driver name='qemu' type='raw'/>
<source file='{path}'/><target dev='vdb' bus='virtio'/></disk>
"""
#: how a refusal names the state (libvirt: "domain 'x' is frozen (reason: ...)")
FROZEN_ERROR = r"(?i)\bis frozen\b"
#: a migration destination that does not exist: the refusal must come first
NOWHERE = "qemu+unix:///system?socket=/nonexistent/virtqemud-sock"
SOAK_S = 3.0
FREEZE_TIMEOUT = 30.0

#: trigger -> (domain options, reason word virsh prints, reason constant name)
TRIGGERS: dict[str, tuple[dict[str, Any], str, str]] = {
    "virsh": ({}, "user", "VIR_DOMAIN_FROZEN_USER"),
    "api": ({}, "user", "VIR_DOMAIN_FROZEN_USER"),
    "panic": ({"on_crash": "freeze"}, "panicked", "VIR_DOMAIN_FROZEN_PANICKED"),
    "watchdog": ({"watchdog_action": "freeze"}, "watchdog", "VIR_DOMAIN_FROZEN_WATCHDOG"),
}


def _physical_address(core: bytes, offset: int) -> int:
    """The guest-physical address of ``offset`` in an ELF64 memory-only dump."""
    for seg in linux_guest.elf_segments(core):
        if seg.type == linux_guest.PT_LOAD and seg.offset <= offset < seg.offset + seg.filesz:
            return seg.paddr + offset - seg.offset
    raise AssertionError(f"offset {offset:#x} is in no PT_LOAD segment of the dump")


def _link_up(domain_xml: str) -> str:
    """The domain's NIC as it is, with its link set up (what domif-setlink sends)."""
    nic = ET.fromstring(domain_xml).find("devices/interface")
    assert nic is not None, "the probe domain has no NIC"
    link = nic.find("link")
    if link is None:
        link = ET.SubElement(nic, "link")
    link.set("state", "up")
    return ET.tostring(nic, encoding="unicode")


class EventLog:
    """``virsh event --loop`` in the background, printing lifecycle events."""

    def __init__(self, daemon: libvirtd.Virtqemud, path: Path):
        self.path = path
        self.out = path.open("w")
        self.proc = subprocess.Popen(
            [
                str(daemon.install.virsh),
                "--connect",
                daemon.uri,
                "event",
                "--loop",
                "--event",
                "lifecycle",
            ],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            env=daemon.install.env(),
            text=True,
        )

    def lines(self) -> list[str]:
        return [ln for ln in self.path.read_text().splitlines() if "lifecycle" in ln]

    def for_domain(self, name: str) -> list[str]:
        return [ln for ln in self.lines() if f"'{name}'" in ln]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


@dataclass
class PyEvents:
    """libvirt-python lifecycle events, received by the default event loop."""

    events: list[tuple[float, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(self, _conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
        with self.lock:
            self.events.append((time.monotonic(), event, detail))

    def since(self, t: float) -> list[tuple[int, int]]:
        with self.lock:
            return [(e, d) for (tt, e, d) in self.events if tt >= t]


_EVENT_LOOP_STARTED = False


def start_event_loop(libvirt: Any) -> None:
    """libvirt's default event loop in a daemon thread, once per process."""
    global _EVENT_LOOP_STARTED
    if _EVENT_LOOP_STARTED:
        return
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    _EVENT_LOOP_STARTED = True


def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)  # poll interval


class LibvirtTest(CleanupTest):
    """Shared set-up: the builds, KVM, a private virtqemud, libvirt-python.

    :avocado: disable
    """

    timeout = 300
    qemu_variable = "FROZEN_QEMU"
    #: run the daemon with the lockd lock manager and a private virtlockd
    lockd = False

    def setUp(self) -> None:
        self.libvirt_prefix = require_prefix(self, "FROZEN_LIBVIRT", "patched libvirt")
        self.qemu_prefix = require_prefix(self, self.qemu_variable, "QEMU for this test")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            self.cancel("/dev/kvm is missing or not accessible: these tests need KVM")
        self.work = Path(self.workdir)
        self.daemon = libvirtd.Virtqemud(
            self.libvirt_prefix, self.work / "virtqemud", lockd=self.lockd
        )
        self.daemon.__enter__()
        self.addCleanup(self.daemon.copy_logs, Path(self.logdir))
        self.addCleanup(self.daemon.close)

    def libvirt(self) -> Any:
        site = libvirtd.build_libvirt_python(
            self.libvirt_prefix, config.cache_root() / "libvirt-python" / self.libvirt_prefix.name
        )
        sys.path.insert(0, str(site))
        import libvirt  # type: ignore[import-not-found]

        return libvirt

    def guest(
        self, name: str = "vm", **options: Any
    ) -> contextlib.AbstractContextManager[libvirtd.ProbeGuest]:
        return libvirtd.probe_guest(
            self.daemon, self.qemu_prefix, self.work / name, name=name, **options
        )

    def domstate(self, name: str) -> str:
        return self.daemon.virsh("domstate", "--reason", name).stdout.strip()

    def events_file(self, tag: str) -> EventLog:
        """``virsh event`` running and known to be registered with the daemon."""
        log = EventLog(self.daemon, Path(self.logdir) / f"virsh-event-{tag}.log")
        self.addCleanup(log.close)
        # Defining and undefining a throw-away domain makes lifecycle
        # events; the first one virsh prints proves it is listening.
        sync = self.work / "evsync.xml"
        sync.write_text(SYNC_XML.format(emulator=system_binary(self.qemu_prefix)))
        deadline = time.monotonic() + 30
        while not any("'evsync'" in ln for ln in log.lines()):
            if log.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"virsh event is not listening: {log.path.read_text()}")
            self.daemon.virsh("define", str(sync))
            self.daemon.virsh("undefine", "evsync")
        return log


class LibvirtFrozen(LibvirtTest):
    """:avocado: enable"""

    def _scenario(self, trigger: str) -> None:
        options, reason_word, reason_const = TRIGGERS[trigger]
        libvirt = self.libvirt()
        for name in ("VIR_DOMAIN_FROZEN", reason_const, "VIR_DOMAIN_EVENT_FROZEN"):
            self.assertTrue(hasattr(libvirt, name), f"libvirt-python lacks {name}")
        self.assertTrue(hasattr(libvirt.virDomain, "freeze"), "libvirt-python lacks freeze()")
        start_event_loop(libvirt)
        with self.guest(**options) as probe:
            conn = libvirt.open(self.daemon.uri)
            dom = conn.lookupByName(probe.name)
            py_events = PyEvents()
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, py_events.callback, None
            )
            virsh_events = self.events_file(trigger)
            probe.wait_record(3, 30)
            before_events = len(virsh_events.for_domain(probe.name))
            t_trigger = time.monotonic()
            self._trigger(trigger, probe, dom)
            wait_until(
                "the frozen state",
                lambda: dom.state()[0] == libvirt.VIR_DOMAIN_FROZEN,
                FREEZE_TIMEOUT,
            )
            wall_frozen = time.time()
            disk_at_freeze = probe.domain.disk.read_bytes()
            last = probe.last_record()
            self.log.info("%s: frozen after record %d", trigger, last)

            # state and reason, both ways
            self.assertEqual(
                dom.state(), [libvirt.VIR_DOMAIN_FROZEN, getattr(libvirt, reason_const)]
            )
            self.assertEqual(self.domstate(probe.name), f"frozen ({reason_word})")
            self.assertIn(
                probe.name, self.daemon.virsh("list", "--state-frozen", "--name").stdout.split()
            )

            # refusals, both ways, while the soak runs
            self._refusals_virsh(probe)
            self._refusals_python(libvirt, dom)

            # memory is kept: marker and last record in a memory-only dump
            dump = self.work / f"{trigger}.core"
            self.daemon.virsh("dump", "--memory-only", probe.name, str(dump))
            core = dump.read_bytes()
            self.assertIn(guest.marker_tag(probe.marker), core)
            self.assertIn(guest.last_record_tag(probe.marker, last), core)
            # ... and readable in place with virDomainMemoryPeek
            tag = guest.marker_tag(probe.marker)
            paddr = _physical_address(core, core.index(tag))
            self.assertEqual(dom.memoryPeek(paddr, len(tag), libvirt.VIR_MEMORY_PHYSICAL), tag)

            # nothing leaves: soak, then compare disk bytes and datagrams
            wait_until("the soak", lambda: time.time() - wall_frozen >= SOAK_S, SOAK_S + 5)
            self.assertEqual(
                probe.domain.disk.read_bytes(), disk_at_freeze, "the disk changed after the freeze"
            )
            late = probe.listener.after_wall(wall_frozen)
            self.assertEqual(late, [], f"{len(late)} datagram(s) after the freeze")
            self.assertEqual(probe.last_record(), last, "the guest printed records while frozen")

            # exactly one FROZEN lifecycle event, the last one, with the
            # reason's detail; before it only what QEMU really did on the
            # way: the pause of the vCPUs (SUSPENDED), a crash (CRASHED)
            # (the soak above left time for any later one)
            got = py_events.since(t_trigger)
            frozen = [e for e in got if e[0] == libvirt.VIR_DOMAIN_EVENT_FROZEN]
            self.assertEqual(
                frozen,
                [(libvirt.VIR_DOMAIN_EVENT_FROZEN, getattr(libvirt, reason_const))],
                f"libvirt-python lifecycle events: {got}",
            )
            self.assertEqual(got[-1][0], libvirt.VIR_DOMAIN_EVENT_FROZEN, got)
            self.assertLessEqual(
                {e for e, _ in got[:-1]},
                {libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_CRASHED},
                got,
            )
            new_lines = virsh_events.for_domain(probe.name)[before_events:]
            self.assertEqual(len(new_lines), len(got), f"virsh event lines: {new_lines}")
            self.assertIn("frozen", new_lines[-1].lower())
            virsh_events.close()
            conn.close()

            # the state survives a virtqemud restart
            self.daemon.restart()
            self.assertEqual(self.domstate(probe.name), f"frozen ({reason_word})")
            conn = libvirt.open(self.daemon.uri)
            dom = conn.lookupByName(probe.name)
            self.assertEqual(
                dom.state(), [libvirt.VIR_DOMAIN_FROZEN, getattr(libvirt, reason_const)]
            )
            self._refusals_virsh(probe)

            # destroy works and removes the transient domain
            self.daemon.virsh("destroy", probe.name)
            r = self.daemon.virsh("domstate", probe.name, check=False)
            self.assertNotEqual(r.returncode, 0, "the domain still exists after destroy")
            conn.close()

    def _trigger(self, trigger: str, probe: libvirtd.ProbeGuest, dom: Any) -> None:
        if trigger == "virsh":
            self.daemon.virsh("freeze", probe.name)
        elif trigger == "api":
            self.assertEqual(dom.freeze(0), 0)
        elif trigger == "panic":
            probe.command(guest.CMD_PANIC)
        elif trigger == "watchdog":
            probe.command(guest.CMD_WATCHDOG)

    def _refusals_virsh(self, probe: libvirtd.ProbeGuest) -> None:
        for args in (
            ["resume", probe.name],
            ["suspend", probe.name],
            ["save", probe.name, str(self.work / "save.img")],
            ["snapshot-create-as", probe.name, "snap"],
            ["migrate", "--p2p", "--live", probe.name, NOWHERE],
            ["reset", probe.name],
        ):
            r = self.daemon.virsh(*args, check=False)
            err = " ".join(r.stderr.split())
            self.log.info("virsh %s -> %d %s", args[0], r.returncode, err)
            self.assertNotEqual(r.returncode, 0, f"virsh {args[0]} was not refused")
            # (the work dir's name contains "frozen": match the message)
            self.assertRegex(err, FROZEN_ERROR, f"virsh {args[0]}")
        self.assertTrue(self.domstate(probe.name).startswith("frozen"))
        # a second freeze is accepted and changes nothing
        self.daemon.virsh("freeze", probe.name)

    def _refusals_python(self, libvirt: Any, dom: Any) -> None:
        attempts: dict[str, Callable[[], Any]] = {
            "resume": dom.resume,
            "suspend": dom.suspend,
            "save": lambda: dom.save(str(self.work / "save-py.img")),
            "snapshot": lambda: dom.snapshotCreateXML("<domainsnapshot/>"),
            "managed save": dom.managedSave,
            "migrate": lambda: dom.migrateToURI3(
                NOWHERE, {}, libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_LIVE
            ),
            # anything that would run the guest again, or touch its disks
            "reset": dom.reset,
            "reboot": lambda: dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN),
            "shutdown": lambda: dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN),
            "pm wakeup": dom.pMWakeup,
            "inject nmi": dom.injectNMI,
            "hotplug": lambda: dom.attachDeviceFlags(
                HOTPLUG_XML.format(path=self.work / "hotplug.img"), libvirt.VIR_DOMAIN_AFFECT_LIVE
            ),
            "block pull": lambda: dom.blockPull("vda"),
            "block commit": lambda: dom.blockCommit("vda", None, None),
            "block resize": lambda: dom.blockResize("vda", 1 << 20),
            "link up": lambda: dom.updateDeviceFlags(
                _link_up(dom.XMLDesc()), libvirt.VIR_DOMAIN_AFFECT_LIVE
            ),
        }
        for what, call in attempts.items():
            with self.assertRaises(libvirt.libvirtError, msg=f"{what} was not refused") as cm:
                call()
            err = cm.exception
            self.log.info("python %s -> %s (%s)", what, err.get_error_code(), err)
            self.assertEqual(err.get_error_code(), libvirt.VIR_ERR_OPERATION_INVALID, str(err))
            self.assertRegex(str(err), FROZEN_ERROR)
        self.assertEqual(dom.state()[0], libvirt.VIR_DOMAIN_FROZEN)

    def test_virsh_freeze(self) -> None:
        self._scenario("virsh")

    def test_api_freeze(self) -> None:
        self._scenario("api")

    def test_on_crash_freeze_guest_panic(self) -> None:
        self._scenario("panic")

    def test_watchdog_action_freeze(self) -> None:
        self._scenario("watchdog")


class LibvirtBaseline(LibvirtTest):
    """Today's behaviour, on the unpatched QEMU.

    :avocado: enable
    """

    qemu_variable = "FROZEN_QEMU_STOCK"

    def test_paused_domain_resumes_and_writes(self) -> None:
        """A paused domain is 'paused', resumes, and writes to its disk again."""
        with self.guest() as probe:
            probe.wait_record(3, 30)
            self.daemon.virsh("suspend", probe.name)
            self.assertEqual(self.domstate(probe.name), "paused (user)")
            paused_at = probe.last_record()
            disk = probe.domain.disk.read_bytes()
            self.daemon.virsh("resume", probe.name)
            self.assertEqual(self.domstate(probe.name), "running (unpaused)")
            probe.wait_record(paused_at + 3, 30)
            self.assertNotEqual(
                probe.domain.disk.read_bytes(), disk, "the resumed domain did not write"
            )

    def test_freeze_refused_without_qemu_support(self) -> None:
        """virsh freeze on a QEMU without the frozen state fails, the domain runs on."""
        help_rc = self.daemon.virsh("help", "freeze", check=False).returncode
        if help_rc != 0:
            self.cancel("this libvirt has no 'virsh freeze' (unpatched)")
        with self.guest() as probe:
            probe.wait_record(2, 30)
            r = self.daemon.virsh("freeze", probe.name, check=False)
            self.log.info(
                "virsh freeze on stock QEMU -> %d %s", r.returncode, " ".join(r.stderr.split())
            )
            self.assertNotEqual(r.returncode, 0)
            self.assertTrue(self.domstate(probe.name).startswith("running"))
            n = probe.last_record()
            probe.wait_record(n + 2, 30)
