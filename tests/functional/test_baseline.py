"""Baseline: what the UNPATCHED QEMU does today, on KVM with the probe guest.

Each test asserts a stock behaviour the frozen series exists to change, so the
suite documents exactly what the series changes.
"""

from __future__ import annotations

from frozen_test import FrozenTest

from harness import attempts, guest, observe
from harness.rig import DISK_NODE, Rig, create_image


class StockBaseline(FrozenTest):
    """:avocado: enable"""

    prefix_variable = "FROZEN_QEMU_STOCK"
    what = "unpatched (stock) QEMU"

    def _assert_resumes(self, rig: Rig, stopped_status: str) -> None:
        vm = rig.vm
        self.assertEqual(vm.status(), stopped_status)
        last = rig.last_record()
        vm.cmd("cont")
        vm.event_wait("RESUME", 5)
        self.assertEqual(vm.status(), "running")
        # The guest really runs again: it completes a new record.
        self.assertGreater(rig.wait_record(last + 2, 10), last)

    def test_cont_resumes_paused(self) -> None:
        with self.rig() as rig:
            rig.wait_record(3, 10)
            err = rig.vm.try_cmd("freeze")
            self.assertIsNotNone(err, "stock QEMU unexpectedly has a freeze command")
            self.assertEqual(err.error_class, "CommandNotFound")
            rig.vm.cmd("stop")
            rig.vm.event_wait("STOP", 5)
            self._assert_resumes(rig, "paused")

    def test_cont_resumes_guest_panicked(self) -> None:
        with self.rig(actions={"panic": "pause"}) as rig:
            rig.wait_record(3, 10)
            rig.command(guest.CMD_PANIC)
            ev = rig.vm.event_wait("GUEST_PANICKED", 10)
            self.assertEqual(ev["data"]["action"], "pause")
            self._assert_resumes(rig, "guest-panicked")

    def test_cont_resumes_watchdog_stopped(self) -> None:
        with self.rig(actions={"watchdog": "pause"}) as rig:
            rig.wait_record(3, 10)
            rig.command(guest.CMD_WATCHDOG)
            ev = rig.vm.event_wait("WATCHDOG", 15)
            self.assertEqual(ev["data"]["action"], "pause")
            self._assert_resumes(rig, "watchdog")

    def test_backup_job_writes_while_paused(self) -> None:
        with self.rig() as rig:
            vm = rig.vm
            rig.wait_record(3, 10)
            vm.cmd("stop")
            vm.event_wait("STOP", 5)
            target = self.work / "backup.raw"
            create_image(self.prefix, target, "raw")
            vm.cmd(
                "blockdev-add",
                {
                    "driver": "raw",
                    "node-name": "tgt0",
                    "file": {"driver": "file", "filename": str(target)},
                },
            )
            vm.cmd(
                "blockdev-backup",
                {"job-id": "b0", "device": DISK_NODE, "target": "tgt0", "sync": "full"},
            )
            ev = vm.event_wait("BLOCK_JOB_COMPLETED", 30, match={"data": {"device": "b0"}})
            self.assertNotIn("error", ev["data"])
            self.assertEqual(vm.status(), "paused")
            # The job wrote the guest's records into another image while paused.
            copied = observe.parse_records(target.read_bytes(), rig.marker)
            self.assertGreaterEqual(len(copied), 3, "backup target holds no probe records")

    def test_nbd_export_writes_while_paused(self) -> None:
        with self.rig() as rig:
            vm = rig.vm
            rig.wait_record(3, 10)
            vm.cmd("stop")
            vm.event_wait("STOP", 5)
            before = observe.file_digest(rig.image)
            sock = vm.paths.sock_dir / "nbd.sock"
            vm.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
            vm.cmd(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": "e0",
                    "node-name": DISK_NODE,
                    "name": "e0",
                    "writable": True,
                },
            )
            w = attempts.nbd_client_write(self.prefix, sock, "e0")
            self.assertTrue(w.wrote, f"NBD write was not accepted: {w.text}")
            self.assertEqual(vm.status(), "paused")
            self.assertNotEqual(observe.file_digest(rig.image), before)
            off = attempts.NBD_WRITE_OFFSET
            self.assertEqual(rig.image.read_bytes()[off : off + 4096], b"\x5a" * 4096)

    def test_set_active_false_then_cont_reactivates(self) -> None:
        with self.rig() as rig:
            vm = rig.vm
            rig.wait_record(3, 10)
            vm.cmd("stop")
            vm.event_wait("STOP", 5)
            standby = observe.standby_opens_rw(rig)
            self.assertFalse(
                standby.opened, f"image was not locked by a paused QEMU: {standby.text}"
            )
            vm.cmd("blockdev-set-active", active=False)
            standby = observe.standby_opens_rw(rig)
            self.assertTrue(
                standby.opened, f"lock not released after set-active false: {standby.text}"
            )
            vm.cmd("cont")
            vm.event_wait("RESUME", 5)
            self.assertEqual(vm.status(), "running")
            # cont silently re-activated the node: the lock is back, writes go on.
            standby = observe.standby_opens_rw(rig)
            self.assertFalse(standby.opened, f"lock not re-taken after cont: {standby.text}")
            last = rig.last_record()
            self.assertGreater(rig.wait_record(last + 2, 10), last)
