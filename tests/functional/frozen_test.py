"""Shared base of the functional tests: find the builds, need KVM, keep logs.

The project's test command sets FROZEN_QEMU (install prefix of the patched
QEMU) and FROZEN_QEMU_STOCK (the unpatched one).  A missing variable is an
ERROR, never a skip. A missing /dev/kvm or missing network namespaces FAIL
the test: a proof that was not made is not a pass. Only a partial run asked
for explicitly (FROZEN_PARTIAL=1, ``frozen test --partial``) cancels instead,
and the suite's summary names what was not proven.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from avocado import Test

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # running from a checkout without installing
    sys.path.insert(0, str(REPO))

from harness import config, guest, netns, verdict  # noqa: E402
from harness.rig import Rig  # noqa: E402
from harness.vm import system_binary  # noqa: E402

#: Where Debian keeps the firmware when the prefix has none of its own.
DEBIAN_FIRMWARE = (Path("/usr/share/seabios"), Path("/usr/lib/ipxe/qemu"))


class CleanupTest(Test):
    """An avocado Test whose addCleanup callbacks run.

    avocado's Test runs setUp, the test and tearDown itself and never calls
    unittest's doCleanups: without this, every addCleanup (the processes a
    test started, their sockets, temporary dirs) is silently dropped. Runs
    them last-in first-out after the test, each even when one fails; the
    first failure is raised."""

    def tearDown(self) -> None:
        errors: list[BaseException] = []
        while self._cleanups:
            function, args, kwargs = self._cleanups.pop()
            try:
                function(*args, **kwargs)
            except Exception as e:  # the others still run
                errors.append(e)
        if errors:
            raise errors[0]


def firmware_dirs(prefix: Path) -> list[Path]:
    """Extra -L dirs: none when the prefix carries its firmware, else Debian's
    plus any listed in FROZEN_FIRMWARE_DIRS (colon separated)."""
    extra = [Path(p) for p in os.environ.get("FROZEN_FIRMWARE_DIRS", "").split(":") if p]
    if (prefix / "share" / "qemu" / "multiboot_dma.bin").exists():
        return extra
    return [*extra, *(d for d in DEBIAN_FIRMWARE if d.is_dir())]


def require_prefix(test: Test, variable: str, what: str) -> Path:
    """The install prefix in $variable; a missing one is an ERROR, never a skip."""
    value = os.environ.get(variable)
    if not value:
        test.error(
            f"{variable} is not set: it must name the install prefix of the {what}; "
            "run the suite through the project's test command"
        )
    return Path(value)


def not_proven(test: Test, why: str) -> None:
    """What this host cannot prove: FAIL, or CANCEL in an explicit partial run."""
    if config.partial_run():
        test.cancel(f"not proven (partial run): {why}")
    test.fail(
        f"{why}; for a partial run that reports this as not proven, "
        f"set {config.PARTIAL_ENV}=1 (frozen test --partial)"
    )


def need_kvm(test: Test) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        not_proven(test, "/dev/kvm is missing or not accessible: these tests need KVM")


def need_network(test: Test, network: str) -> None:
    """A tap rig needs a private network namespace; never fall back to user."""
    if network == "tap" and (why := netns.netns_supported()) is not None:
        not_proven(test, f"tap networking needs a network namespace: {why}")


def assert_frozen(
    test: Test, r: verdict.FreezeResult, what: str, accel: str, soak_s: float
) -> None:
    """Every promise of the frozen state, for the result of one trigger."""
    why = "; ".join(r.details)
    test.assertEqual(r.accelerator, accel)
    test.assertEqual(r.status, "frozen", why)
    test.assertEqual(r.reason, verdict.REASONS[what], why)
    test.assertEqual(r.frozen_events, 1, why)
    test.assertTrue(r.memory_kept, why)
    test.assertTrue(r.records_on_disk, why)
    test.assertEqual(r.bytes_written_after_freeze, 0, why)
    test.assertEqual(r.packets_after_freeze, 0, why)
    test.assertTrue(r.refusals_held, why)
    cont = next(a for a in r.attempts if a.name == "cont")
    test.assertIn("frozen", cont.message.lower(), "cont refusal does not name the state")
    test.assertTrue(r.lock_released, why)
    test.assertEqual(r.records_after_freeze, 0, why)
    test.assertTrue(r.quit_clean, why)
    # The soak is timed from the end of the memory checks and always runs its
    # whole window unless QEMU exits, so a short one is a failure; the
    # retries must actually have run.
    test.assertGreaterEqual(r.soak_s, soak_s, why)
    test.assertGreaterEqual(r.soak_rounds, 1, why)


def assert_control_red(test: Test, r: verdict.FreezeResult, what: str) -> None:
    """A negative control: the checks the frozen state must pass, red on stock.

    Stock QEMU was paused (``stop``, ``-action ...=pause``, ``werror=stop``,
    or its own stop on an internal error) with links down and nodes
    inactive, then measured exactly as a freeze is. The measurements of what
    the series adds must fail; those of what stock already does (memory kept,
    completed records on disk) must pass, so the control measured for real.
    """
    why = "; ".join(r.details)
    test.assertTrue(r.control, why)
    test.assertFalse(r.ok, f"the proof passed a stock pause: it cannot fail ({why})")
    test.assertNotEqual(r.status, "frozen", why)
    test.assertEqual(r.frozen_events, 0, why)
    test.assertIsNone(r.reason, why)
    test.assertTrue(r.memory_kept, why)
    test.assertTrue(r.records_on_disk, why)
    # Stock leaves an internal error only through a reset (then cont runs).
    resume = "system_reset" if what == "internal-error" else "cont"
    att = next(a for a in r.attempts if a.name == resume)
    test.assertFalse(att.refused, f"stock refused {resume}: {att.message}")
    test.assertFalse(r.refusals_held, why)
    test.assertGreater(r.bytes_written_after_freeze, 0, why)
    test.assertFalse(r.lock_released, why)
    if what != "io-error":
        # werror=stop retries the failing write on every cont and stops
        # again, so that guest never completes a record nor sends one.
        test.assertGreater(r.records_after_freeze, 0, why)
        test.assertGreater(r.packets_after_freeze, 0, why)


class FrozenTest(CleanupTest):
    """Base class; subclasses set ``prefix_variable``.

    :avocado: disable
    """

    prefix_variable = "FROZEN_QEMU"
    what = "patched QEMU (with the frozen series)"
    timeout = 180

    def setUp(self) -> None:
        self.prefix = require_prefix(self, self.prefix_variable, self.what)
        value = str(self.prefix)
        binary = system_binary(self.prefix)
        if not os.access(binary, os.X_OK):
            self.error(f"{self.prefix_variable}={value}: {binary} is missing")
        need_kvm(self)
        self.work = Path(self.workdir)
        self.fw = firmware_dirs(self.prefix)

    def rig(self, **kwargs: Any) -> AbstractContextManager[Rig]:
        """Boot the probe guest on this test's QEMU (see guest.probe_rig)."""
        need_network(self, kwargs.get("network", "user"))
        return guest.probe_rig(
            self.prefix,
            self.work / "rig",
            firmware_dirs=self.fw,
            log_dir=Path(self.logdir) / "vm",
            **kwargs,
        )
