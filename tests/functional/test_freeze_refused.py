"""Freezes QEMU must refuse, because it could not keep the state's promises.

Record/replay: with replay enabled, draining does not wait for the block
queue, and inactivating the nodes would abort QEMU (and lose the memory the
state keeps).  A short SeaBIOS run is recorded under TCG, replayed, and
``freeze`` must fail with its message while the replay goes on unharmed.
"""

from __future__ import annotations

from pathlib import Path

from frozen_test import FrozenTest

from harness import checks
from harness.vm import VM, system_binary

REPLAY_REFUSED = "The VM cannot be frozen while record/replay is enabled"
#: SeaBIOS shows its boot menu prompt for the splash time, then finds no
#: boot device.  The record runs to the end; the replay is frozen at the
#: prompt, seconds of guest time before the log (and the replay) ends.
BOOT_MENU = r"Press ESC for boot menu"
NO_BOOT_DEVICE = r"No bootable device"


class FreezeRefused(FrozenTest):
    """:avocado: enable"""

    def _replay_vm(self, mode: str, image: Path, log: Path) -> VM:
        rr = self.work / "replay.bin"
        return VM(
            system_binary(self.prefix),
            [
                "-machine", "pc", "-m", "32",
                "-boot", "menu=on,splash-time=3000",
                "-icount", f"shift=auto,rr={mode},rrfile={rr},rrsnapshot=init",
                "-drive", f"file={image},if=none,id=rr0,snapshot=off",
            ],
            name=f"replay-{mode}",
            log_dir=log,
            accel="tcg",
            firmware_dirs=self.fw,
            console="debugcon",
        )  # fmt: skip

    def test_record_replay(self) -> None:
        """``freeze`` of a replayed VM fails, names why, and aborts nothing."""
        image = self.work / "rr.qcow2"
        checks.create_image(self.prefix, image, "qcow2")
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
