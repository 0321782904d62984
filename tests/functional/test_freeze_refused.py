"""Freezes QEMU must refuse, because it could not keep the state's promises.

Record/replay: with replay enabled, draining does not wait for the block
queue, and inactivating the nodes would abort QEMU (and lose the memory the
state keeps).  A short SeaBIOS run is recorded under TCG, replayed, and
``freeze`` must fail with its message while the replay goes on unharmed.

Postcopy destination: it runs while part of the guest memory is still on
the source, so the memory a freeze keeps is not all there.  A postcopy
migration between two QEMUs on KVM is throttled to 1 MiB/s so that it stays
in postcopy; ``freeze`` on the destination must fail with its message.

COLO: a COLO secondary follows the primary's checkpoints; frozen, it would
abort at the next one.  Two QEMUs on KVM enter COLO (no disks, no NICs:
nothing to replicate but memory) and ``freeze`` must fail on both sides
while the checkpoints go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from frozen_test import FrozenTest

from harness.rig import create_image
from harness.vm import VM, system_binary

REPLAY_REFUSED = "The VM cannot be frozen while record/replay is enabled"
POSTCOPY_REFUSED = (
    "The VM cannot be frozen during an incoming postcopy migration: "
    "part of its memory is still on the source"
)
#: 1 MiB/s: MIGRATION_RAM_MB of random RAM stays in postcopy for a minute.
POSTCOPY_BANDWIDTH = 1 << 20
MIGRATION_RAM_MB = 64
RAM_BACKEND = ["-object", f"memory-backend-ram,id=mem,size={MIGRATION_RAM_MB}M"]
#: SeaBIOS shows its boot menu prompt for the splash time, then finds no
#: boot device.  The record runs to the end; the replay is frozen at the
#: prompt, seconds of guest time before the log (and the replay) ends.
COLO_REFUSED = "The VM cannot be frozen while COLO is active"
#: ms between COLO checkpoints: several run while the test looks
COLO_CHECKPOINT_DELAY = 500
BOOT_MENU = r"Press ESC for boot menu"
NO_BOOT_DEVICE = r"No bootable device"
SEABIOS_BANNER = r"SeaBIOS \(version"


class FreezeRefused(FrozenTest):
    """:avocado: enable"""

    def _replay_vm(self, mode: str, image: Path, log: Path) -> VM:
        rr = self.work / "replay.bin"
        return VM(
            system_binary(self.prefix),
            [
                "-machine",
                "pc",
                "-m",
                "32",
                "-boot",
                "menu=on,splash-time=3000",
                "-icount",
                f"shift=auto,rr={mode},rrfile={rr},rrsnapshot=init",
                "-drive",
                f"file={image},if=none,id=rr0,snapshot=off",
            ],
            name=f"replay-{mode}",
            log_dir=log,
            accel="tcg",
            firmware_dirs=self.fw,
            console="debugcon",
        )

    def test_record_replay(self) -> None:
        """``freeze`` of a replayed VM fails, names why, and aborts nothing."""
        image = self.work / "rr.qcow2"
        create_image(self.prefix, image, "qcow2")
        logs = Path(self.logdir)
        with self._replay_vm("record", image, logs / "record") as vm:
            vm.wait_for_console(NO_BOOT_DEVICE, 60)
        with self._replay_vm("replay", image, logs / "replay") as vm:
            vm.wait_for_console(BOOT_MENU, 60)
            self.assertEqual(vm.cmd("query-replay")["mode"], "play")
            err = vm.try_cmd("freeze")
            self.assertIsNotNone(err, "freeze of a replayed VM was accepted")
            assert err is not None
            self.assertEqual(err.desc, REPLAY_REFUSED)
            self.assertTrue(vm.is_running(), "QEMU died on the refused freeze")
            self.assertEqual(vm.status(), "running")
            self.assertEqual(vm.events("FROZEN"), [])

    def _migration_vm(self, name: str, extra: list[str]) -> VM:
        return VM(
            system_binary(self.prefix),
            ["-machine", "pc,memory-backend=mem", "-m", str(MIGRATION_RAM_MB), *extra],
            name=name,
            log_dir=Path(self.logdir) / name,
            firmware_dirs=self.fw,
            console="debugcon",
        )

    def _random_ram(self) -> list[str]:
        """Guest RAM that starts as random bytes, not zero pages.

        Zero pages migrate as flags, so an idle guest's RAM would be sent
        in a moment whatever the bandwidth limit; random pages take
        MIGRATION_RAM_MB seconds at POSTCOPY_BANDWIDTH.
        """
        path = self.work / "ram.bin"
        with path.open("wb") as f:
            for _ in range(MIGRATION_RAM_MB):
                f.write(os.urandom(1 << 20))
        return [
            "-object",
            f"memory-backend-file,id=mem,size={MIGRATION_RAM_MB}M,mem-path={path},share=off",
        ]

    @contextlib.contextmanager
    def _migrating(
        self, names: tuple[str, str], caps: list[str], params: dict[str, int]
    ) -> Iterator[tuple[VM, VM]]:
        """A source on KVM migrating to a destination, both with `caps`."""
        with (
            self._migration_vm(names[0], self._random_ram()) as src,
            self._migration_vm(names[1], [*RAM_BACKEND, "-incoming", "defer"]) as dst,
        ):
            # The destination's private dir keeps the socket path short.
            sock = dst.paths.sock_dir / "migrate.sock"
            src.wait_for_console(SEABIOS_BANNER, 60)
            wanted = [{"capability": c, "state": True} for c in (*caps, "events")]
            for vm in (src, dst):
                vm.cmd("migrate-set-capabilities", capabilities=wanted)
            src.cmd("migrate-set-parameters", params)
            dst.cmd("migrate-incoming", uri=f"unix:{sock}")
            src.cmd("migrate", uri=f"unix:{sock}")
            yield src, dst

    def _assert_freeze_refused(self, vm: VM, expected: str, what: str) -> None:
        err = vm.try_cmd("freeze")
        self.assertIsNotNone(err, f"freeze of {what} was accepted")
        assert err is not None
        self.assertEqual(err.desc, expected)
        self.assertEqual(vm.events("FROZEN"), [])

    def test_postcopy_destination(self) -> None:
        """``freeze`` of a postcopy destination fails and the migration goes on."""
        limit = {"max-bandwidth": POSTCOPY_BANDWIDTH, "max-postcopy-bandwidth": POSTCOPY_BANDWIDTH}
        with self._migrating(("source", "destination"), ["postcopy-ram"], limit) as (src, dst):
            src.event_wait("MIGRATION", 30, match={"data": {"status": "active"}})
            src.cmd("migrate-start-postcopy")
            dst.event_wait("MIGRATION", 30, match={"data": {"status": "postcopy-active"}})
            dst.event_wait("RESUME", 30)
            self._assert_freeze_refused(dst, POSTCOPY_REFUSED, "a postcopy destination")
            self.assertEqual(dst.status(), "running")
            self.assertEqual(dst.cmd("query-migrate")["status"], "postcopy-active")

    def test_colo(self) -> None:
        """``freeze`` on a COLO primary and secondary fails; checkpoints go on."""
        delay = {"x-checkpoint-delay": COLO_CHECKPOINT_DELAY}
        with self._migrating(("primary", "secondary"), ["x-colo"], delay) as (pri, sec):
            pri.event_wait("MIGRATION", 60, match={"data": {"status": "colo"}})
            sec.event_wait("MIGRATION", 60, match={"data": {"status": "colo"}})
            for vm, mode in ((pri, "primary"), (sec, "secondary")):
                self.assertEqual(vm.cmd("query-colo-status")["mode"], mode)
                self._assert_freeze_refused(vm, COLO_REFUSED, f"the COLO {mode}")
            # Checkpoints still run: the secondary stops and resumes for each.
            mark = sec.event_mark()
            sec.event_wait("STOP", 30, after=mark)
            sec.event_wait("RESUME", 30, after=mark)
            self.assertEqual(pri.cmd("query-colo-status")["mode"], "primary")
            self.assertEqual(sec.cmd("query-colo-status")["mode"], "secondary")
            self.assertTrue(pri.is_running() and sec.is_running())
