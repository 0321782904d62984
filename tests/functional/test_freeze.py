"""The frozen state on KVM: every trigger, verified the same way.

Each test boots the probe guest on the PATCHED QEMU, freezes it through one
trigger and checks (harness.scenario.verify_frozen): status ``frozen``, one
FROZEN event with the right reason, marker and last counter in pmemsave and
dump-guest-memory, completed records on disk, then a 30 s soak in which
every write path is tried and the cheap ones retried until its end while the
console (no new record), the image bytes, the listener and the tap capture
are watched; the image lock released for a second opener, QEMU alive after
each refusal, and a clean ``quit``.  Disks (raw, qcow2) and networks (user,
tap in a private netns) are spread across the triggers. test_negative_control
runs the same verification on stock QEMU paused, where it must go red.
"""

from __future__ import annotations

from frozen_test import FrozenTest, assert_frozen

from harness import report, scenario

#: Every trigger soaks this long, timed from the end of the memory checks
#: (the write attempts run inside it, then the retries go on until its end).
SOAK_S = scenario.SOAK_S


class Freeze(FrozenTest):
    """:avocado: enable"""

    def _scenario(
        self,
        what: str,
        disk_format: str,
        network: str,
        soak_s: float = SOAK_S,
        runtime_action: tuple[str, dict[str, str]] | None = None,
        share_rw: bool = False,
    ) -> None:
        """Run one trigger; ``runtime_action`` sets the action over QMP
        instead of on the command line. The disk has share-rw=off, as in
        production, so the primary holds every lock byte until it releases;
        ``share_rw`` makes the NBD rig (a writable export of the disk)."""
        with self.rig(
            disk_format=disk_format,
            network=network,
            share_rw=share_rw,
            actions={} if runtime_action else scenario.trigger_actions(what),
            werror="freeze" if what == "io-error" else None,
            io_error_injection=what == "io-error",
        ) as rig:
            try:
                if runtime_action:
                    rig.vm.cmd(runtime_action[0], runtime_action[1])
                r = scenario.verify_frozen(rig, what, soak_s)
            except BaseException:
                rig.vm.mark_failed()
                raise
        self.log.info("%s", report.format_table([r]))
        for line in r.details:
            self.log.info("%s", line)
        for a in r.attempts:
            self.log.info(
                "attempt %-30s refused=%s alive=%s frozen=%s: %s",
                a.name,
                a.refused,
                a.alive,
                a.still_frozen,
                a.message,
            )
        assert_frozen(self, r, what, "kvm", soak_s)

    def _row(self, what: str) -> None:
        """One row of scenario.MATRIX, the rows `frozen verify` runs."""
        row = scenario.matrix_row(what)
        action = None
        if row.action_via == "qmp":
            action = ("set-action", scenario.trigger_actions(what))
        self._scenario(what, row.disk_format, row.network, SOAK_S, action)

    # -- the matrix (the same rows as `frozen verify`; a unit test checks it)

    def test_matrix_qmp(self) -> None:
        self._row("qmp")

    def test_matrix_panic(self) -> None:
        self._row("panic")

    def test_matrix_watchdog(self) -> None:
        self._row("watchdog")

    def test_matrix_io_error(self) -> None:
        self._row("io-error")

    def test_matrix_internal_error(self) -> None:
        """The action set over QMP (set-action) on a running VM."""
        self._row("internal-error")

    # -- beyond the matrix

    def test_qmp_freeze_nbd_rig_raw_user(self) -> None:
        """The NBD rig: share-rw=on and a writable export open at the freeze,
        written through (and re-added) during the whole soak."""
        self._scenario("qmp", "raw", "user", share_rw=True)

    def test_qmp_freeze_qcow2_tap(self) -> None:
        self._scenario("qmp", "qcow2", "tap", SOAK_S)

    def test_watchdog_set_at_runtime_qcow2_user(self) -> None:
        """The action set over QMP (watchdog-set-action) on a running VM."""
        action = ("watchdog-set-action", {"action": "freeze"})
        self._scenario("watchdog", "qcow2", "user", SOAK_S, action)

    def test_guest_panic_set_action_raw_tap(self) -> None:
        """The action set over QMP (set-action) on a running VM."""
        self._scenario("panic", "raw", "tap", SOAK_S, ("set-action", {"panic": "freeze"}))

    def test_internal_error_raw_user(self) -> None:
        """-action internal-error=freeze on the command line."""
        self._scenario("internal-error", "raw", "user", SOAK_S)

    def test_internal_error_set_action_qcow2_tap(self) -> None:
        """The same action set over QMP (set-action) on a running VM."""
        action = ("set-action", {"internal-error": "freeze"})
        self._scenario("internal-error", "qcow2", "tap", SOAK_S, action)
