"""A freeze tears down running block jobs while a standby waits for the lock.

The probe gets a second disk (share-rw=off, as production has it) that a
block job copies while two standbys, second processes blocked in
F_OFD_SETLKW on the bytes a writer needs, wait: one on the copied disk, one
on the guest's own disk. Tearing a mirror down drops the copied disk's
permissions and takes them back (mirror_exit_common() removes the filter
node); a standby blocked on the lock takes it in between, and QEMU aborts
when it fails to take it back ("Failed to lock byte 101"), losing the
memory the state exists to keep. One of three unthrottled-mirror samples of
`frozen bench` aborted so on the series before bdrv_hold_image_locks(): the
race is a matter of timing, so each scenario runs REPEAT times.

Asserted each time: QEMU alive and frozen, FROZEN with released: true, no
job left, the job running (or a mirror ready) when the freeze was sent, and
both standbys holding their lock in the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from frozen_test import FrozenTest

from harness import rig as rigs
from harness import scenario
from harness.bench import fill_image
from harness.observe import Standby, job_progress, monotonic_to_wall

#: the copied disk's size: an unthrottled mirror is usually still copying it
SOURCE_MB = 256
#: samples per scenario: the race the test exists for is a matter of timing
REPEAT = 3


class FreezeUnderJob(FrozenTest):
    """:avocado: enable"""

    timeout = 240

    def _scenario(self, command: str, speed_mb: int | None) -> None:
        source = self.work / "load-source.raw"
        fill_image(source, SOURCE_MB)
        for i in range(REPEAT):
            self._once(command, speed_mb, source, i)

    def _once(self, command: str, speed_mb: int | None, source: Path, i: int) -> None:
        blockdev = {
            "driver": "raw",
            "node-name": "load0",
            "file": {"driver": "file", "filename": str(source)},
        }
        extra = [
            "-blockdev",
            json.dumps(blockdev),
            "-device",
            "virtio-blk-pci,drive=load0,id=vload",
        ]
        target = self.work / f"target-{i}.raw"
        with self.rig(extra_args=extra, share_rw=False) as rig:
            rigs.create_image(self.prefix, target, "raw", SOURCE_MB << 20)
            file = {"driver": "file", "filename": str(target)}
            rig.vm.cmd("blockdev-add", {"driver": "raw", "node-name": "tgt0", "file": file})
            with Standby(source) as sb_job, Standby(rig.image) as sb_disk:
                # each checks the lock is held and its process blocked on it
                sb_job.start()
                sb_disk.start()
                args = {"job-id": "job0", "device": "load0", "target": "tgt0", "sync": "full"}
                if speed_mb:
                    args["speed"] = speed_mb << 20
                rig.vm.cmd(command, args)
                deadline = time.monotonic() + 10
                while job_progress(rig.vm.cmd).done == 0:
                    if time.monotonic() > deadline:
                        self.fail(f"{command} made no progress in 10 s")
                    time.sleep(0.005)  # polling the job's offset: no event for it
                mark = rig.vm.event_mark()
                job = job_progress(rig.vm.cmd)
                rig.vm.cmd("freeze", timeout=60)
                ev = rig.vm.event_wait("FROZEN", scenario.FREEZE_EVENT_TIMEOUT, after=mark)
                t_job, t_disk = sb_job.acquired(30), sb_disk.acquired(30)
            self.assertEqual(rig.vm.status(), "frozen", "QEMU did not survive the freeze")
            self.assertTrue(ev["data"]["released"], ev)
            self.assertFalse(rig.vm.cmd("query-jobs"), "a job outlived the freeze")
        frozen_at = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
        self.log.info(
            "%s %d %s at %d/%d bytes: standbys got the job's disk %.2f ms and the guest's"
            " disk %.2f ms before FROZEN",
            command,
            i,
            job.status,
            job.done,
            job.total,
            (frozen_at - monotonic_to_wall(t_job)) * 1e3,
            (frozen_at - monotonic_to_wall(t_disk)) * 1e3,
        )
        # An unthrottled mirror may have copied everything and be "ready":
        # its teardown at the freeze is the same.
        self.assertIn(job.status, ("running", "ready"), f"no job to tear down: {job}")

    def test_mirror_unthrottled(self) -> None:
        self._scenario("blockdev-mirror", None)

    def test_backup_throttled(self) -> None:
        self._scenario("blockdev-backup", 200)
