"""Full release on freeze: QEMU lets go of everything but guest memory.

After ``freeze`` every block node is closed (no descriptor on the image
files, no node in query-named-block-nodes, no medium in query-block) and
every network backend's host side is closed (no /dev/net/tun descriptor, no
slirp host socket, no new hostfwd), so the storage below the VM can be
handed over while the frozen QEMU lives on; guest memory stays readable.
A node that cannot be inactivated is reported, by name, in the answer to
``freeze``, in query-status and in the FROZEN event, and the healthy ones are
released all the same.

The ``Release`` tests run on the PATCHED QEMU; ``StockRelease`` runs the
same measurements on the unpatched one, where they must go red (a stopped
and inactivated stock QEMU keeps its files open, so the filesystem stays
busy) and shows that the injected flush error does fail inactivation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from frozen_test import FrozenTest, need_network

from harness import guest, observe, release, verdict
from harness.rig import DEVICE_ID, DISK_NODE, NETDEV_ID, Rig, create_image

#: What a freeze through QMP reports as its reason.
QMP_REASON = verdict.REASONS["qmp"]


def marker_kept(rig: Rig, workdir: Path) -> tuple[bool, dict[str, bool]]:
    """The marker in pmemsave and dump-guest-memory (files written to ``workdir``)."""
    found = observe.memory_has(rig.vm, workdir, [guest.marker_tag(rig.marker)], ram_mb=rig.ram_mb)
    kept = [v for k, v in found.items() if k.startswith(("pmemsave:", "dump-guest-memory:"))]
    return len(kept) == 2 and all(kept), found


@contextlib.contextmanager
def loop_rig(test: FrozenTest, **kwargs: Any) -> Iterator[tuple[release.LoopMount, Rig]]:
    """The probe with its disk image on a loop-mounted ext4 in the test's dir.

    The VM is torn down before the filesystem is unmounted and detached,
    whatever happened in between.
    """
    with (
        release.loop_mounted_fs(test.work / "fs") as mnt,
        test.rig(image_dir=mnt.mountpoint, **kwargs) as rig,
    ):
        try:
            yield mnt, rig
        except BaseException:
            rig.vm.mark_failed()
            raise


def wait_detached(device: str, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while release.loop_backing(device) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class Release(FrozenTest):
    """:avocado: enable"""

    def _assert_alive_frozen(self, rig: Rig, why: str) -> None:
        self.assertTrue(rig.vm.is_running(), f"QEMU exited: {why}")
        self.assertEqual(rig.vm.status(), "frozen", why)

    def _assert_quits(self, rig: Rig) -> None:
        rig.vm.cmd("quit")
        self.assertEqual(rig.vm.wait_for_exit(10), 0, "quit after the freeze did not exit 0")

    def test_loop_fs_unmounts_while_frozen_tap(self) -> None:
        """The disk's filesystem unmounts and its loop device detaches under a
        live frozen QEMU on tap networking; memory is still dumped."""
        need_network(self, "tap")
        with loop_rig(self, network="tap") as (mnt, rig):
            vm = rig.vm
            rig.wait_record(3, 10)
            image = {"disk0": release.file_id(rig.image)}
            before = release.holdings(vm, image)
            self.log.info("before freeze: %s", before.describe())
            self.assertTrue(before.image_fds["disk0"], "the rig sees no image fd before the freeze")
            self.assertTrue(before.tun_fds, "the rig sees no tun fd before the freeze")
            assert rig.tap is not None
            self.assertTrue(rig.tap.carrier(), "the tap has no carrier before the freeze")

            out = release.freeze(vm)
            after = release.holdings(vm, image)
            carrier = rig.tap.carrier()  # the kernel's view: nobody holds the tap
            umounted = release.umount(mnt.mountpoint)
            detached = None
            if umounted.returncode == 0:
                detached = release.loop_detach(mnt.device)
            gone = detached is not None and detached.returncode == 0 and wait_detached(mnt.device)
            kept, found = marker_kept(rig, self.work / "mem")  # outside the mount
            why = (
                f"{out.describe()}; after: {after.describe()}; tap carrier={carrier}; "
                f"umount rc={umounted.returncode} {umounted.stderr.strip()!r}"
            )
            self.log.info("%s; losetup -d: %s; memory: %s", why, detached, found)

            self.assertIsNone(out.error, why)
            self.assertTrue(out.event, why)
            self.assertEqual(out.status["status"], "frozen", why)
            self.assertEqual(after.image_fds["disk0"], [], f"QEMU still holds the image: {why}")
            self.assertEqual(after.tun_fds, [], f"QEMU still holds /dev/net/tun: {why}")
            self.assertFalse(carrier, f"the tap still has a carrier: {why}")
            self.assertEqual(umounted.returncode, 0, f"umount under the frozen QEMU: {why}")
            self.assertFalse(release.is_mounted(mnt.mountpoint), why)
            self.assertTrue(gone, f"losetup -d {mnt.device}: {detached}")
            self._assert_alive_frozen(rig, why)
            self.assertTrue(kept, f"marker not in the memory dumps: {found}")
            self._assert_quits(rig)

    def test_inactivation_failure_reported(self) -> None:
        """A qcow2-over-blkdebug disk whose flushes fail cannot be inactivated:
        freeze says so by name everywhere, and the probe's disk is closed."""
        failing = self.work / "failing.qcow2"
        create_image(self.prefix, failing, "qcow2")
        args = release.flush_error_disk_args(failing)
        with self.rig(disk_format="qcow2", extra_args=args) as rig:
            vm = rig.vm
            try:
                rig.wait_record(3, 10)
                release.arm_flush_error(vm)
                images = {
                    "disk0": release.file_id(rig.image),
                    release.FAILING_NODE: release.file_id(failing),
                }
                before = release.holdings(vm, images)
                self.log.info("before freeze: %s", before.describe())
                self.assertTrue(all(before.image_fds.values()), before.describe())

                out = release.freeze(vm)
                after = release.holdings(vm, images)
                again = vm.try_cmd("freeze")
                kept, found = marker_kept(rig, self.work / "mem")
                why = f"{out.describe()}; after: {after.describe()}"
                self.log.info("%s; freeze again: %s; memory: %s", why, again, found)

                # The answer to freeze: an error naming the state and the node.
                self.assertIsNotNone(out.error, f"freeze reported success: {why}")
                assert out.error is not None
                self.assertIn("frozen", out.error.desc.lower(), why)
                self.assertIn(release.FAILING_NODE, out.error.desc, why)
                # Frozen all the same, and query-status names the node.
                self.assertEqual(out.status["status"], "frozen", why)
                self.assertEqual(out.status.get("freeze-reason"), QMP_REASON, why)
                self._assert_names_failing(out.status.get("unreleased-nodes"), why)
                # The FROZEN event says it too.
                self.assertTrue(out.event, f"no FROZEN event: {why}")
                self.assertEqual(out.data.get("reason"), QMP_REASON, why)
                self.assertIs(out.data.get("released"), False, why)
                self._assert_names_failing(out.data.get("unreleased-nodes"), why)
                self.assertEqual(
                    sorted(out.data["unreleased-nodes"]),
                    sorted(out.status["unreleased-nodes"]),
                    why,
                )
                # The healthy disk is released: closed, no node, no medium.
                self.assertEqual(after.image_fds["disk0"], [], why)
                self.assertNotIn(DISK_NODE, after.nodes, why)
                self.assertIsNone(after.media.get(DEVICE_ID), why)
                # The report is true: the unreleased node is still open.
                self.assertIn(release.FAILING_NODE, after.nodes, why)
                self.assertTrue(after.image_fds[release.FAILING_NODE], why)
                # Nothing aborted; memory is kept.
                self._assert_kept_and_quits(rig, why, kept, found)
            except BaseException:
                vm.mark_failed()
                raise

    def _assert_kept_and_quits(self, rig: Rig, why: str, kept: bool, found: Any) -> None:
        """Still alive and frozen, the marker in memory, and a clean quit."""
        self._assert_alive_frozen(rig, why)
        self.assertTrue(kept, f"marker not in the memory dumps: {found}")
        self._assert_quits(rig)

    def _assert_names_failing(self, nodes: Any, why: str) -> None:
        """The unreleased list names the failing disk and nothing else: its
        format node, and at most the nodes below it."""
        self.assertIsInstance(nodes, list, f"no unreleased-nodes list: {why}")
        self.assertIn(release.FAILING_NODE, nodes, why)
        self.assertLessEqual(set(nodes), set(release.FAILING_CHAIN), why)

    def test_normal_freeze_reports_released(self) -> None:
        """A freeze with nothing failing: FROZEN says released, every node is closed."""
        with self.rig(disk_format="qcow2") as rig:
            vm = rig.vm
            try:
                rig.wait_record(3, 10)
                image = {"disk0": release.file_id(rig.image)}
                before = release.holdings(vm, image)
                self.log.info("before freeze: %s", before.describe())
                self.assertTrue(before.image_fds["disk0"], before.describe())
                self.assertIn(DISK_NODE, before.nodes, before.describe())
                self.assertEqual(before.media.get(DEVICE_ID), DISK_NODE)

                out = release.freeze(vm)
                after = release.holdings(vm, image)
                kept, found = marker_kept(rig, self.work / "mem")
                why = f"{out.describe()}; after: {after.describe()}"
                self.log.info("%s; memory: %s", why, found)

                self.assertIsNone(out.error, why)
                self.assertTrue(out.event, f"no FROZEN event: {why}")
                self.assertEqual(out.data.get("reason"), QMP_REASON, why)
                self.assertIs(out.data.get("released"), True, why)
                self.assertNotIn("unreleased-nodes", out.data, why)
                self.assertEqual(out.status["status"], "frozen", why)
                self.assertFalse(out.status.get("unreleased-nodes"), why)
                self.assertEqual(after.image_fds["disk0"], [], f"image still open: {why}")
                self.assertEqual(after.nodes, [], f"block nodes left: {why}")
                self.assertEqual({d: n for d, n in after.media.items() if n is not None}, {}, why)
                self._assert_kept_and_quits(rig, why, kept, found)
            except BaseException:
                vm.mark_failed()
                raise

    def test_slirp_host_sockets_closed(self) -> None:
        """A hostfwd set before the freeze stops accepting; no new one can be
        added; QEMU holds no TCP/UDP socket."""
        port = release.free_tcp_port()
        with self.rig() as rig:
            vm = rig.vm
            try:
                added = vm.hmp(f"hostfwd_add {NETDEV_ID} tcp:127.0.0.1:{port}-:22")
                self.assertEqual(added.strip(), "", f"hostfwd_add before the freeze: {added}")
                rig.wait_record(3, 10)
                rig.listener.wait_for(lambda d: True, timeout=10)  # slirp's UDP socket
                connect_before = release.tcp_connect("127.0.0.1", port)
                before = release.inet_sockets(vm.pid)
                self.log.info(
                    "before: connect %s; sockets %s", connect_before, [str(s) for s in before]
                )
                here = f"127.0.0.1:{port}"
                listening = [s for s in before if s.local == here and s.state == release.TCP_LISTEN]
                self.assertTrue(listening, f"no hostfwd listener seen: {before}")
                self.assertEqual(connect_before, "connected")

                out = release.freeze(vm)
                connect_after = release.tcp_connect("127.0.0.1", port)
                after = release.inet_sockets(vm.pid)
                port2 = release.free_tcp_port()
                refused = vm.hmp(f"hostfwd_add {NETDEV_ID} tcp:127.0.0.1:{port2}-:22")
                connect_new = release.tcp_connect("127.0.0.1", port2)
                why = (
                    f"{out.describe()}; connect after: {connect_after}; "
                    f"sockets after: {[str(s) for s in after]}; "
                    f"hostfwd_add after: {refused.strip()!r}, "
                    f"connect to it: {connect_new}"
                )
                self.log.info("%s", why)

                self.assertIsNone(out.error, why)
                self.assertEqual(out.status["status"], "frozen", why)
                self.assertEqual(connect_after, "refused", why)
                self.assertEqual(after, [], f"slirp host sockets left: {why}")
                self.assertIn("frozen", refused.lower(), f"hostfwd_add not refused: {why}")
                self.assertEqual(connect_new, "refused", why)
                self._assert_alive_frozen(rig, why)
                self._assert_quits(rig)
            except BaseException:
                vm.mark_failed()
                raise


class StockRelease(FrozenTest):
    """Negative controls on the unpatched QEMU.

    :avocado: enable
    """

    prefix_variable = "FROZEN_QEMU_STOCK"
    what = "unpatched (stock) QEMU"

    def test_inactivated_stock_keeps_fs_busy(self) -> None:
        """Stopped and inactivated, stock QEMU keeps the image and the tap
        open: the same umount fails with "busy"."""
        need_network(self, "tap")
        with loop_rig(self, network="tap") as (mnt, rig):
            vm = rig.vm
            rig.wait_record(3, 10)
            vm.cmd("stop")
            vm.event_wait("STOP", 5)
            vm.cmd("blockdev-set-active", active=False)
            image = {"disk0": release.file_id(rig.image)}
            after = release.holdings(vm, image)
            umounted = release.umount(mnt.mountpoint)
            why = (
                f"after: {after.describe()}; umount rc={umounted.returncode} "
                f"{umounted.stderr.strip()!r}"
            )
            self.log.info("%s", why)
            self.assertFalse(release.named_nodes(vm)[DISK_NODE]["active"], why)
            self.assertTrue(after.image_fds["disk0"], why)
            self.assertTrue(after.tun_fds, why)
            assert rig.tap is not None
            self.assertTrue(rig.tap.carrier(), why)
            self.assertNotEqual(umounted.returncode, 0, why)
            self.assertIn("busy", umounted.stderr.lower(), why)
            self.assertTrue(release.is_mounted(mnt.mountpoint), why)
            self.assertEqual(vm.status(), "paused")

    def test_flush_error_fails_inactivation(self) -> None:
        """The injected flush error really makes inactivation of that disk
        fail: stock's blockdev-set-active false is refused, the node stays active."""
        failing = self.work / "failing.qcow2"
        create_image(self.prefix, failing, "qcow2")
        args = release.flush_error_disk_args(failing)
        with self.rig(disk_format="qcow2", extra_args=args) as rig:
            vm = rig.vm
            rig.wait_record(3, 10)
            nodes = release.named_nodes(vm)
            self.assertTrue(set(release.FAILING_CHAIN) <= set(nodes), sorted(nodes))
            release.arm_flush_error(vm)
            vm.cmd("stop")
            vm.event_wait("STOP", 5)
            err = vm.try_cmd("blockdev-set-active", active=False)
            nodes = release.named_nodes(vm)
            active = {n: info["active"] for n, info in nodes.items()}
            why = f"blockdev-set-active: {err}; active: {active}"
            self.log.info("%s", why)
            self.assertIsNotNone(err, why)
            self.assertTrue(active[release.FAILING_NODE], why)
            self.assertTrue(vm.is_running(), why)
