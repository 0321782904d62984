"""Schema-driven monitor fuzz on KVM (harness.fuzz).

The probe guest boots with a richer rig (raw virtio disk, qcow2 overlay with
an internal snapshot and a backing file on IDE, an empty IDE CD, a tap NIC in
a private namespace and a user NIC), is frozen, and then every QMP command in
``query-qmp-schema`` and every HMP command in ``help`` is called with
generated arguments that use the rig's real names.  After each call: QEMU
alive, status ``frozen``, no guest record, image bytes identical, lock bytes
free, no frame or datagram.

The negative control runs the same fuzz on stock QEMU after ``stop`` +
``blockdev-set-active false`` (the best stock imitation) and must report
failures, or the fuzz proves nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from frozen_test import FrozenTest

from harness import fuzz
from harness.rig import Rig

#: Per run, QMP and HMP together; the test timeout leaves room for boot and
#: teardown.
BUDGET_S = 240.0


class _FuzzTest(FrozenTest):
    """Boot the fuzz rig, freeze (or stop) it, fuzz; log the counts table.

    :avocado: disable
    """

    timeout = 420

    def _fuzz(self, expect: str) -> fuzz.FuzzReport:
        n = iter(range(100))

        def boot() -> AbstractContextManager[fuzz.FuzzRig]:
            # A fresh rig (own images) per segment: a crash leaves its files.
            i = next(n)
            return fuzz.fuzz_rig(
                self.prefix,
                self.work / f"fuzz{i}",
                firmware_dirs=self.fw,
                log_dir=Path(self.logdir) / f"vm{i}",
            )

        def prepare(frig: fuzz.FuzzRig) -> Callable[[Rig], None] | None:
            frig.rig.wait_record(3, 10)
            if expect == "frozen":
                frig.rig.vm.cmd("freeze")
                frig.rig.vm.event_wait("FROZEN", 20)
                return None
            fuzz.stock_imitation(frig.rig)
            return fuzz.stock_restore

        report = fuzz.fuzz_with_restarts(
            boot, prepare, expect=expect, budget_s=BUDGET_S, log=self.log.info
        )
        for line in report.table(max_failures=200).splitlines():
            self.log.info("%s", line)
        (Path(self.logdir) / "fuzz-calls.txt").write_text(
            "\n".join(c.line() for c in report.calls) + "\n"
        )
        return report

    def _assert_reached(self, report: fuzz.FuzzReport) -> None:
        counts = report.counts()
        self.assertGreater(counts["qmp commands"], 100, report.table())
        self.assertGreater(counts["hmp commands"], 50, report.table())
        self.assertGreater(counts["calls"], 500, report.table())
        self.assertGreater(counts["refused"], 0, report.table())
        self.assertGreater(counts["accepted"], 0, report.table())
        # The net invariants can only fail if the capture sees traffic at all.
        frames, datagrams = report.traffic_before
        self.assertGreater(frames, 0, "the tap capture saw none of the guest's frames")
        self.assertGreater(datagrams, 0, "the listener got none of the guest's datagrams")


class MonitorFuzz(_FuzzTest):
    """:avocado: enable"""

    def test_frozen(self) -> None:
        """Nothing any monitor command does makes a frozen VM run or write."""
        report = self._fuzz("frozen")
        self._assert_reached(report)
        self.assertEqual(report.crashes, [], report.table())
        self.assertEqual(report.failures, [], report.table())
        self.assertEqual(report.changed_overall, [], report.table())


class MonitorFuzzStock(_FuzzTest):
    """:avocado: enable"""

    prefix_variable = "FROZEN_QEMU_STOCK"
    what = "unpatched (stock) QEMU"

    def test_negative_control(self) -> None:
        """Stock stop + blockdev-set-active false: the fuzz must find breaks."""
        report = self._fuzz("stopped")
        self._assert_reached(report)
        found = {fuzz.invariant_of(b) for c in report.failures for b in c.broken}
        self.assertTrue(report.failures, f"the fuzz found nothing on stock:\n{report.table()}")
        # The known stock holes, each seen by its own invariant.
        self.assertIn("status", found, report.table())  # cont runs the guest
        self.assertIn("lock", found, report.table())  # blockdev-set-active true
        self.assertIn("bytes", found, report.table())  # jobs, NBD, snapshots write
