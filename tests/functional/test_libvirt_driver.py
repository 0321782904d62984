"""The QEMU driver's behaviour around the frozen state, on KVM (issue 14).

Each test drives the probe guest through a private virtqemud of the patched
libvirt (harness.libvirtd) on the patched QEMU and checks one thing the
driver must get right for a cluster:

* a pause QEMU really makes is reported as one, also when a disk has a
  'freeze' policy for the other direction (error_policy='stop' with
  rerror_policy='freeze': a write error gives ``paused (ioerror)``);
* a freeze gets through while a core dump (an async job) runs;
* a domain frozen while virtqemud was not running has its lock manager
  lease released when virtqemud reconnects (virtlockd + lockd, real
  fcntl leases), and so has one frozen through virDomainFreeze;
* reverting a frozen domain to a snapshot is refused with the frozen error
  and keeps the frozen QEMU (and its memory);
* a freeze whose images QEMU could not release fails, also when retried;
* the crash action can be switched to 'freeze' on a running domain, and
  is checked against the QEMU binary for the persistent definition;
* a device whose I/O QEMU cannot sever (a vhost-user interface, a PCI host
  device) makes a freeze action fail with VIR_ERR_OPERATION_UNSUPPORTED naming the device.

Environment: FROZEN_LIBVIRT and FROZEN_QEMU (install prefixes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # running from a checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_libvirt_frozen import (  # noqa: E402
    FROZEN_ERROR,
    LibvirtTest,
    PyEvents,
    start_event_loop,
    wait_until,
)

from harness import guest, libvirtd, release  # noqa: E402
from harness.vm import qemu_tool, system_binary  # noqa: E402

#: how long a fencing freeze may take while a dump runs ("a few seconds")
FENCE_DEADLINE_S = 5.0
STATE_TIMEOUT = 30.0


def _end(proc: subprocess.Popen[Any]) -> None:
    """End a process this test started, by its PID."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def lease_held(disk: Path) -> bool:
    """True while another process holds the lockd lease on ``disk``.

    virtlockd's direct leases are a POSIX write lock on byte 0 of the image
    (QEMU's own image locks use bytes 100 and up): try to take it.
    """
    fd = os.open(disk, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the lock, if taken
    return False


class LibvirtDriver(LibvirtTest):
    """:avocado: enable"""

    def _start(self, probe: libvirtd.ProbeGuest, xml: str) -> None:
        probe.xml_path.write_text(xml)
        self.daemon.virsh("create", str(probe.xml_path))

    def _qemu_pid(self, name: str) -> int:
        return int((self.daemon.run.private("run") / "qemu" / f"{name}.pid").read_text())

    # -- item 1 ------------------------------------------------------------

    def _nbd_failing_writes(self, image: Path) -> Path:
        """qemu-storage-daemon exporting ``image`` over NBD, every write EIO."""
        sock = self.daemon.run.sockdir / "nbd.sock"
        node = {
            "driver": "blkdebug",
            "node-name": "dbg",
            "image": {"driver": "file", "filename": str(image)},
            "inject-error": [{"event": "pwritev", "errno": 5, "once": False, "iotype": "write"}],
        }
        log = (Path(self.logdir) / "qsd.log").open("w")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [
                str(qemu_tool(self.qemu_prefix, "qemu-storage-daemon")),
                "--blockdev",
                json.dumps(node),
                "--nbd-server",
                f"addr.type=unix,addr.path={sock}",
                "--export",
                "type=nbd,id=exp0,node-name=dbg,name=disk,writable=on",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(_end, proc)
        wait_until("the NBD socket", sock.exists, 30)
        return sock

    def _on_failing_nbd(self, probe: libvirtd.ProbeGuest, policy: str) -> str:
        """The probe's domain XML with its disk on the failing-writes NBD export."""
        sock = self._nbd_failing_writes(probe.domain.disk)
        dom_xml = ET.fromstring(probe.domain.xml())
        devices = dom_xml.find("devices")
        assert devices is not None
        old = devices.find("disk")
        assert old is not None
        devices.remove(old)
        disk = ET.fromstring(
            "<disk type='network' device='disk'>"
            f"<driver name='qemu' type='raw' {policy}/>"
            f"<source protocol='nbd' name='disk'><host transport='unix' socket='{sock}'/>"
            "</source><target dev='vda' bus='virtio'/></disk>"
        )
        devices.insert(1, disk)
        return ET.tostring(dom_xml, encoding="unicode")

    def test_mixed_error_policies_pause(self) -> None:
        """error_policy='stop' rerror_policy='freeze': a write error pauses."""
        libvirt = self.libvirt()
        start_event_loop(libvirt)
        with self.guest(start=False) as probe:
            xml = self._on_failing_nbd(probe, "error_policy='stop' rerror_policy='freeze'")
            # listening before the domain starts: its first write fails
            conn = libvirt.open(self.daemon.uri)
            self.addCleanup(conn.close)
            events = PyEvents()
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, events.callback, None
            )
            self._start(probe, xml)
            dom = conn.lookupByName(probe.name)
            paused_ioerror = [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR]
            try:
                wait_until("paused (ioerror)", lambda: dom.state() == paused_ioerror, STATE_TIMEOUT)
            finally:
                self.log.info("domstate: %s", self.domstate(probe.name))
            self.assertEqual(self.domstate(probe.name), "paused (I/O error)")
            suspended = (
                libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR,
            )
            wait_until("the SUSPENDED event", lambda: suspended in events.since(0), 10)
            # resuming is possible (not "already running"); the next write
            # fails again and pauses the domain again
            r = self.daemon.virsh("resume", probe.name, check=False)
            self.log.info("virsh resume -> %d %s", r.returncode, r.stderr.strip())
            self.assertEqual(r.returncode, 0, r.stderr)
            wait_until(
                "paused (ioerror) again", lambda: dom.state() == paused_ioerror, STATE_TIMEOUT
            )

    def test_disk_error_freeze_reported(self) -> None:
        """error_policy='freeze': the io-error event says freeze, then frozen."""
        libvirt = self.libvirt()
        start_event_loop(libvirt)
        with self.guest(start=False) as probe:
            xml = self._on_failing_nbd(probe, "error_policy='freeze'")
            conn = libvirt.open(self.daemon.uri)
            self.addCleanup(conn.close)
            lifecycle = PyEvents()
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle.callback, None
            )
            io_actions: list[int] = []

            def io_error(_c: Any, _d: Any, _src: str, _alias: str, action: int, *_: Any) -> None:
                io_actions.append(action)

            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, io_error, None
            )
            self._start(probe, xml)
            dom = conn.lookupByName(probe.name)
            frozen_ioerror = [libvirt.VIR_DOMAIN_FROZEN, libvirt.VIR_DOMAIN_FROZEN_IOERROR]
            try:
                wait_until("frozen (ioerror)", lambda: dom.state() == frozen_ioerror, STATE_TIMEOUT)
            finally:
                self.log.info(
                    "domstate: %s; io-error actions %s", self.domstate(probe.name), io_actions
                )
            self.assertEqual(self.domstate(probe.name), "frozen (I/O error)")
            wait_until("the io-error event", lambda: bool(io_actions), 10)
            # 3 is VIR_DOMAIN_EVENT_IO_ERROR_FREEZE; a libvirt that does not
            # know QEMU's 'freeze' action reports 0 (none: "error ignored")
            self.assertEqual(set(io_actions), {3}, io_actions)
            frozen = (libvirt.VIR_DOMAIN_EVENT_FROZEN, libvirt.VIR_DOMAIN_EVENT_FROZEN_IOERROR)
            wait_until("the FROZEN event", lambda: frozen in lifecycle.since(0), 10)

    # -- item 4 ------------------------------------------------------------

    def test_freeze_during_dump(self) -> None:
        """virsh freeze returns in seconds while a memory-only dump runs."""
        with self.guest() as probe:
            probe.wait_record(3, 30)
            fifo = self.work / "dump.fifo"
            os.mkfifo(fifo)
            # A reader that does not read: QEMU's dump blocks on the full pipe
            rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            self.addCleanup(os.close, rfd)
            dump = subprocess.Popen(
                [
                    str(self.daemon.install.virsh),
                    "--connect",
                    self.daemon.uri,
                    "dump",
                    "--memory-only",
                    probe.name,
                    str(fifo),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self.daemon.install.env(),
            )
            self.addCleanup(_end, dump)
            wait_until(
                "the dump job",
                lambda: self.domstate(probe.name) == "paused (dumping)",
                STATE_TIMEOUT,
            )
            t0 = time.monotonic()
            r = self.daemon.virsh("freeze", probe.name, check=False, timeout=60)
            took = time.monotonic() - t0
            self.log.info(
                "virsh freeze during dump -> %d in %.1f s: %s",
                r.returncode,
                took,
                " ".join(r.stderr.split()),
            )
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertLess(took, FENCE_DEADLINE_S)
            self.assertEqual(self.domstate(probe.name), "frozen (user)")

            # drain the pipe: the dump completes, with the guest's memory
            os.set_blocking(rfd, True)
            core = bytearray()

            def drain() -> None:
                while chunk := os.read(rfd, 1 << 20):
                    core.extend(chunk)

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            _out, err = dump.communicate(timeout=120)
            reader.join(timeout=30)
            self.log.info("virsh dump -> %d %s", dump.returncode, " ".join(err.split()))
            self.assertEqual(dump.returncode, 0, err)
            self.assertIn(guest.marker_tag(probe.marker), bytes(core))
            self.assertEqual(self.domstate(probe.name), "frozen (user)")

    # -- item 3 ------------------------------------------------------------

    def test_snapshot_revert_refused(self) -> None:
        """Reverting a frozen domain to a snapshot is refused, QEMU is kept."""
        libvirt = self.libvirt()
        with self.guest() as probe:
            probe.wait_record(2, 30)
            conn = libvirt.open(self.daemon.uri)
            self.addCleanup(conn.close)
            dom = conn.lookupByName(probe.name)
            # metadata of a running snapshot (redefining writes nothing)
            snap_xml = (
                f"<domainsnapshot><name>s1</name><state>running</state>"
                f"<creationTime>{int(time.time())}</creationTime>"
                f"<memory snapshot='internal'/>"
                f"<disks><disk name='vda' snapshot='internal'/></disks>"
                f"{dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)}</domainsnapshot>"
            )
            snap = dom.snapshotCreateXML(snap_xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
            self.daemon.virsh("freeze", probe.name)
            pid = self._qemu_pid(probe.name)
            with self.assertRaises(libvirt.libvirtError) as cm:
                dom.revertToSnapshot(snap, 0)
            err = cm.exception
            self.log.info(
                "revert -> %s (%s); domstate %s",
                err.get_error_code(),
                err,
                self.domstate(probe.name),
            )
            self.assertEqual(err.get_error_code(), libvirt.VIR_ERR_OPERATION_INVALID, str(err))
            self.assertRegex(str(err), FROZEN_ERROR)
            self.assertEqual(self.domstate(probe.name), "frozen (user)")
            self.assertEqual(self._qemu_pid(probe.name), pid, "QEMU was replaced")
            self.assertTrue(Path(f"/proc/{pid}").exists(), "the frozen QEMU is gone")
            r = self.daemon.virsh("snapshot-revert", probe.name, "s1", check=False)
            self.log.info("virsh snapshot-revert -> %d %s", r.returncode, r.stderr.strip())
            self.assertNotEqual(r.returncode, 0)
            self.assertRegex(" ".join(r.stderr.split()), FROZEN_ERROR)

    # -- item 6 ------------------------------------------------------------

    def test_freeze_fails_when_images_not_released(self) -> None:
        """A node QEMU cannot release: every freeze fails, naming it; still frozen.

        The second disk is qcow2 over blkdebug (given on QEMU's command line,
        libvirt has no XML for blkdebug), whose flushes fail once armed, as
        in harness.release: its inactivation fails.
        """
        image = self.work / "disk1.qcow2"
        r = subprocess.run(
            [
                str(qemu_tool(self.qemu_prefix, "qemu-img")),
                "create",
                "-q",
                "-f",
                "qcow2",
                str(image),
                "1M",
            ],
            capture_output=True,
            text=True,
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        with self.guest(start=False) as probe:
            dom = ET.fromstring(probe.domain.xml())
            cmdline = dom.find(f"{{{libvirtd.QEMU_XMLNS}}}commandline")
            assert cmdline is not None
            args = release.flush_error_disk_args(image)
            # a slot libvirt does not assign, after the probe's own disk
            args[-1] += ",bus=pci.0,addr=0x1e"
            for arg in args:
                ET.SubElement(cmdline, f"{{{libvirtd.QEMU_XMLNS}}}arg", value=arg)
            self._start(probe, ET.tostring(dom, encoding="unicode"))
            probe.wait_record(2, 60)
            for cmd in ("write -P 0x5a 0 512", "read 0 512"):
                self.daemon.virsh(
                    "qemu-monitor-command",
                    "--hmp",
                    probe.name,
                    f'qemu-io -d {release.FAILING_DEVICE_ID}/virtio-backend "{cmd}"',
                )
            for attempt in ("first", "retry"):
                r = self.daemon.virsh("freeze", probe.name, check=False)
                err = " ".join(r.stderr.split())
                self.log.info("virsh freeze (%s) -> %d %s", attempt, r.returncode, err)
                self.assertNotEqual(r.returncode, 0, f"the {attempt} freeze succeeded")
                self.assertIn("could not be released", err)
                self.assertIn(release.FAILING_NODE, err)
                self.assertEqual(self.domstate(probe.name), "frozen (user)")

    # -- item 7 ------------------------------------------------------------

    def test_unseverable_device_refused(self) -> None:
        """A freeze action with a device QEMU cannot sever: refused, naming it.

        A vhost-user interface with on_crash=freeze, a PCI host device with
        a watchdog action freeze.  (Neither can run here, no backend and no
        device, so virDomainFreeze() on such a domain is not exercised.)
        """
        libvirt = self.libvirt()
        sock = self.daemon.run.sockdir / "nobody.sock"  # never connected to
        cases = [
            (
                {"on_crash": "freeze"},
                "52:54:00:fe:00:01",
                "<interface type='vhostuser'><mac address='52:54:00:fe:00:01'/>"
                f"<source type='unix' path='{sock}' mode='client'/><model type='virtio'/>"
                "</interface>",
            ),
            (
                {"watchdog_action": "freeze"},
                "0000:06:12.5",
                "<hostdev mode='subsystem' type='pci' managed='no'><source>"
                "<address domain='0x0000' bus='0x06' slot='0x12' function='0x5'/>"
                "</source></hostdev>",
            ),
        ]
        with self.guest(start=False) as probe:
            conn = libvirt.open(self.daemon.uri)
            self.addCleanup(conn.close)
            for options, named, device in cases:
                domain = dataclasses.replace(probe.domain, name="vm2", **options)
                dom = ET.fromstring(domain.xml())
                dom.insert(
                    3,
                    ET.fromstring(
                        "<memoryBacking><source type='memfd'/>"
                        "<access mode='shared'/></memoryBacking>"
                    ),
                )
                devices = dom.find("devices")
                assert devices is not None
                devices.insert(2, ET.fromstring(device))
                with self.assertRaises(libvirt.libvirtError, msg=f"{options} accepted") as cm:
                    conn.defineXML(ET.tostring(dom, encoding="unicode")).undefine()
                err = cm.exception
                self.log.info(
                    "define %s + %s -> %s (%s)", options, named, err.get_error_code(), err
                )
                self.assertEqual(
                    err.get_error_code(), libvirt.VIR_ERR_OPERATION_UNSUPPORTED, str(err)
                )
                self.assertIn(f"'{named}'", str(err))

    # -- item 5 ------------------------------------------------------------

    def test_set_lifecycle_action_freeze_live(self) -> None:
        """set-lifecycle-action crash freeze --live: a panic then freezes."""
        with self.guest(on_crash="preserve") as probe:
            probe.wait_record(2, 30)
            r = self.daemon.virsh(
                "set-lifecycle-action", probe.name, "crash", "freeze", "--live", check=False
            )
            self.log.info("set-lifecycle-action --live -> %d %s", r.returncode, r.stderr.strip())
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn(
                "<on_crash>freeze</on_crash>", self.daemon.virsh("dumpxml", probe.name).stdout
            )
            probe.command(guest.CMD_PANIC)
            wait_until(
                "frozen (panicked)",
                lambda: self.domstate(probe.name) == "frozen (panicked)",
                STATE_TIMEOUT,
            )

    def test_set_lifecycle_action_freeze_config_checked(self) -> None:
        """--config on_crash=freeze is refused for a QEMU without frozen."""
        stock = os.environ.get("FROZEN_QEMU_STOCK")
        if not stock or not Path(stock).is_dir():
            self.cancel("FROZEN_QEMU_STOCK (the unpatched QEMU) is not set")
        with self.guest(start=False) as probe:
            domain = dataclasses.replace(
                probe.domain, name="vm3", emulator=system_binary(Path(stock))
            )
            xml = self.work / "vm3.xml"
            xml.write_text(domain.xml())
            self.daemon.virsh("define", str(xml))
            self.addCleanup(self.daemon.virsh, "undefine", "vm3", check=False)
            r = self.daemon.virsh(
                "set-lifecycle-action", "vm3", "crash", "freeze", "--config", check=False
            )
            self.log.info(
                "set-lifecycle-action --config (stock QEMU) -> %d %s",
                r.returncode,
                r.stderr.strip(),
            )
            self.assertNotEqual(r.returncode, 0, "accepted for a QEMU without frozen")
            self.assertIn("not supported with this QEMU binary", r.stderr)
            self.assertNotIn(
                "<on_crash>freeze</on_crash>",
                self.daemon.virsh("dumpxml", "--inactive", "vm3").stdout,
            )


class LibvirtDriverLeases(LibvirtTest):
    """Real leases: the lockd lock manager and a private virtlockd.

    :avocado: enable
    """

    lockd = True

    def test_freeze_releases_lease(self) -> None:
        """virsh freeze of a running domain releases its lease."""
        with self.guest() as probe:
            probe.wait_record(2, 30)
            self.assertTrue(lease_held(probe.domain.disk), "no lease while running")
            self.daemon.virsh("freeze", probe.name)
            self.assertEqual(self.domstate(probe.name), "frozen (user)")
            self.assertFalse(lease_held(probe.domain.disk), "the frozen domain keeps its lease")

    def test_frozen_while_daemon_down(self) -> None:
        """Frozen while virtqemud was down: frozen on reconnect, lease released."""
        with self.guest(on_crash="freeze") as probe:
            probe.wait_record(3, 30)
            self.assertTrue(lease_held(probe.domain.disk), "no lease while running")
            self.daemon.stop()
            probe.command(guest.CMD_PANIC)
            # QEMU freezes by itself: the records stop
            last, since = probe.last_record(), time.monotonic()
            deadline = since + STATE_TIMEOUT
            while time.monotonic() - since < 2.0:
                if probe.last_record() != last:
                    last, since = probe.last_record(), time.monotonic()
                if time.monotonic() > deadline:
                    raise AssertionError("the guest kept running after its panic")
                time.sleep(0.1)  # poll interval on the console log
            self.log.info("frozen after record %d, virtqemud down", last)
            self.assertTrue(lease_held(probe.domain.disk), "virtlockd dropped the lease by itself")
            self.daemon.start()
            state = self.domstate(probe.name)
            held = lease_held(probe.domain.disk)
            self.log.info("after reconnect: domstate %s, lease held: %s", state, held)
            self.assertEqual(state, "frozen (panicked)")
            self.assertFalse(held, "the lease is still held after the reconnect")
            r = self.daemon.virsh("resume", probe.name, check=False)
            self.assertRegex(" ".join(r.stderr.split()), FROZEN_ERROR)
