"""The frozen state with a real guest kernel: the Linux guest profile.

The same scenarios as test_freeze.py, but the guest is the Debian kernel with
a busybox initramfs (harness.linux_guest) using Linux's own virtio-pci,
virtio-blk, virtio-net and pvpanic drivers.  It runs on KVM where the host
CPU has hardware virtualization and on TCG elsewhere (kvm_pvm cannot run a
stock kernel); each test records the accelerator it used in its whiteboard.

The steps are harness.scenario's (trigger, the write-path table, soak,
records on disk, second opener); only the memory check differs: the guest's RAM is
larger than the probe's and paged, so the whole RAM is searched in pmemsave
and dump-guest-memory and the marker read back with ``xp`` (physical).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from frozen_test import CleanupTest, assert_frozen, firmware_dirs, need_network

from harness import linux_guest, report, scenario
from harness.rig import RigError
from harness.vm import VMError, system_binary

SOAK_S = scenario.SOAK_S


class LinuxGuestFreeze(CleanupTest):
    """:avocado: enable"""

    timeout = 240

    def setUp(self) -> None:
        value = os.environ.get("FROZEN_QEMU")
        if not value:
            self.error(
                "FROZEN_QEMU is not set: it must name the install prefix of the "
                "patched QEMU; run the suite through the project's test command"
            )
        self.prefix = Path(value)
        if not os.access(system_binary(self.prefix), os.X_OK):
            self.error(f"FROZEN_QEMU={value}: {system_binary(self.prefix)} is missing")
        self.accel = linux_guest.host_accel()
        self.work = Path(self.workdir)

    def _scenario(self, what: str, disk_format: str, network: str = "user") -> None:
        need_network(self, network)
        t0 = time.monotonic()
        with linux_guest.linux_rig(
            self.prefix,
            self.work / "rig",
            disk_format=disk_format,
            network=network,
            actions=scenario.trigger_actions(what),
            accel=self.accel,
            firmware_dirs=firmware_dirs(self.prefix),
            log_dir=Path(self.logdir) / "vm",
        ) as rig:
            first = time.monotonic() - t0
            try:
                r = scenario.verify_frozen(rig, what, SOAK_S)
            except (VMError, RigError, TimeoutError):
                rig.vm.mark_failed()
                raise
            if not r.ok:
                rig.vm.mark_failed()
        self.whiteboard = f"accel={r.accelerator} network={network} first_record_s={first:.1f}"
        self.log.info("accelerator %s; first record %.1f s after launch", r.accelerator, first)
        self.log.info("%s", report.format_table([r]))
        for line in r.details:
            self.log.info("%s", line)
        assert_frozen(self, r, what, self.accel, SOAK_S)

    def test_qmp_freeze_raw(self) -> None:
        self._scenario("qmp", "raw")

    def test_guest_panic_qcow2(self) -> None:
        """A real kernel panic: sysrq crash -> panic notifier -> pvpanic -> freeze."""
        self._scenario("panic", "qcow2")

    def test_watchdog_raw_tap(self) -> None:
        """/dev/watchdog (i6300esb driver) opened and never fed; tap networking."""
        self._scenario("watchdog", "raw", "tap")
