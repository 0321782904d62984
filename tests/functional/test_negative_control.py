"""Negative controls: the KVM proof, run against stock QEMU, must go red.

A check that cannot fail proves nothing. Each test boots the probe on the
UNPATCHED QEMU with the same disk/network as the frozen proof of that trigger
(scenario.MATRIX), pauses it the stock way -- ``stop``, ``-action
panic=pause``/``watchdog=pause``, ``werror=stop``, or stock's own stop on a
KVM internal error -- then does what an operator can script today (close the
export, ``set_link off``, ``blockdev-set-active false``), and runs the very
same verification as test_freeze (scenario.verify_frozen, control=True).

It must report: ``cont`` accepted and the console printing new records, bytes
written after the pause, the standby unable to take the lock (cont
re-activated the node), datagrams leaving, refusals absent. Memory kept and
records on disk stay green: stock does keep those, and the control shows the
measurement itself works.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from unittest import mock

from frozen_test import FrozenTest, assert_control_red, need_network

from harness import attempts, report, scenario, verdict
from harness.vm import VM


class NegativeControl(FrozenTest):
    """:avocado: enable"""

    prefix_variable = "FROZEN_QEMU_STOCK"
    what = "unpatched (stock) QEMU"

    def _control(self, what: str) -> None:
        row = scenario.matrix_row(what)
        need_network(self, row.network)
        r = scenario.freeze_scenario(
            self.prefix,
            self.work / "rig",
            what,
            disk_format=row.disk_format,
            network=row.network,
            action_via=row.action_via,
            soak_s=scenario.CONTROL_SOAK_S,
            firmware_dirs=self.fw,
            control=True,
            log_dir=Path(self.logdir) / "vm",
        )
        self.log.info("%s", report.format_table([r]))
        for line in r.details:
            self.log.info("%s", line)
        assert_control_red(self, r, what)

    def test_qmp_stop_raw_user(self) -> None:
        self._control("qmp")

    def test_panic_pause_qcow2_user(self) -> None:
        self._control("panic")

    def test_watchdog_pause_raw_tap(self) -> None:
        self._control("watchdog")

    def test_io_error_werror_stop_qcow2_tap(self) -> None:
        self._control("io-error")

    def test_internal_error_stop_raw_user(self) -> None:
        self._control("internal-error")


class QemuDiesDuringAttempt(FrozenTest):
    """A QEMU that dies while the proof tries a write path is a FAIL row with
    the attempt recorded (alive=False), never a traceback or a pass.

    :avocado: enable
    """

    def test_kill_during_an_attempt_is_a_fail_row(self) -> None:
        def killed(vm: VM) -> tuple[bool, str]:
            # Stands in for QEMU aborting inside the command (SIGKILL by PID).
            os.kill(vm.pid, signal.SIGKILL)
            vm.wait_for_exit(10)
            return True, f"status after the kill: {vm.status()}"  # raises VMDied

        with mock.patch.object(attempts, "_hmp_io_write_refused", killed):
            rows = scenario.verify_all(
                self.prefix,
                self.work / "verify",
                triggers=("qmp",),
                soak_s=scenario.CONTROL_SOAK_S,
                firmware_dirs=self.fw,
            )
        table = report.format_table(rows)
        self.log.info("%s", table)
        for line in rows[0].details:
            self.log.info("%s", line)
        r = rows[0]
        self.assertEqual(verdict.verdict(r), "FAIL", table)
        io = next(a for a in r.attempts if a.name == "hmp qemu-io write")
        self.assertFalse(io.alive, io.message)
        self.assertIn("VMDied", io.message)
        later = next(a for a in r.attempts if a.name == "migrate to file")
        self.assertFalse(later.held)
        self.assertFalse(r.refusals_held)
        self.assertFalse(r.quit_clean)
        self.assertTrue(any("alive=False" in d for d in r.details), r.details)
