"""The frozen state with a real guest kernel: the Linux guest profile.

The same scenarios as test_freeze.py, but the guest is the Debian kernel with
a busybox initramfs (harness.linux_guest) using Linux's own virtio-pci,
virtio-blk, virtio-net and pvpanic drivers.  It runs on KVM where the host
CPU has hardware virtualization and on TCG elsewhere (kvm_pvm cannot run a
stock kernel); each test records the accelerator it used in its whiteboard.

The steps are harness.checks' (trigger, write attempts, soak, records on
disk, second opener); only the memory check differs: the guest's RAM is
larger than the probe's and paged, so the whole RAM is searched in pmemsave
and dump-guest-memory and the marker read back with ``xp`` (physical).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from avocado import Test
from frozen_test import assert_frozen, firmware_dirs, need_network

from harness import checks, config, guest, linux_guest
from harness.vm import VM, VMError, system_binary

RAM_MB = 128
FIRST_RECORD_TIMEOUT = 90.0  # TCG on a shared 2-core machine: ~4-15 s
SOAK_S = checks.SOAK_S


def linux_args(
    images: linux_guest.LinuxImages,
    cfg: linux_guest.LinuxConfig,
    image: Path,
    disk_format: str,
    actions: Mapping[str, str],
    netdev: str,
) -> list[str]:
    """Modern virtio-blk/net (Linux drivers), ISA pvpanic (ACPI QEMU0001), i6300esb."""
    blockdev = {
        "driver": disk_format,
        "node-name": checks.DISK_NODE,
        "file": {"driver": "file", "filename": str(image)},
    }
    args = [
        "-machine",
        "pc",
        "-m",
        str(RAM_MB),
        "-smp",
        "1",
        *images.boot_args(cfg),
        "-blockdev",
        json.dumps(blockdev),
        # share-rw: the writable NBD export of checks.prepare_write_paths.
        "-device",
        f"virtio-blk-pci,drive={checks.DISK_NODE},id={checks.DEVICE_ID},share-rw=on",
        "-netdev",
        netdev,
        "-device",
        f"virtio-net-pci,netdev={checks.NETDEV_ID},id={checks.NIC_ID},romfile=",
        "-device",
        "pvpanic",
        "-device",
        "i6300esb",
    ]
    for k, v in actions.items():
        args += ["-action", f"{k}={v}"]
    return args


@contextlib.contextmanager
def linux_rig(
    prefix: Path,
    workdir: Path,
    *,
    disk_format: str = "raw",
    network: str = "user",
    actions: Mapping[str, str] | None = None,
    accel: str = "tcg",
    fw_dirs: Sequence[Path] = (),
    log_dir: Path | None = None,
) -> Iterator[checks.Rig]:
    """Boot the Linux guest and wait for its first record (as checks.probe_rig).

    ``network``: as checks.guest_network (``user`` or ``tap``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    images = linux_guest.build_linux_guest()
    # Firmware for checks' standby QEMU (it never runs, so any will do).
    standby_bios = guest.build_probe_images(config.cache_root() / "probe").bios
    image = workdir / f"disk.{disk_format}"
    checks.create_image(prefix, image, disk_format)
    marker = secrets.token_hex(8)
    with checks.guest_network(network) as net:
        cfg = linux_guest.LinuxConfig(marker=marker, **net.addresses)
        vm = VM(
            system_binary(prefix),
            linux_args(images, cfg, image, disk_format, actions or {}, net.netdev),
            name="linux",
            log_dir=log_dir or workdir / "vm",
            accel=accel,
            firmware_dirs=fw_dirs,
            pass_fds=net.fds,
        )
        with vm:
            net.close_fds()  # QEMU holds its own copy of the tap fd now
            rig = checks.Rig(
                vm,
                prefix,
                workdir,
                image,
                disk_format,
                network,
                marker,
                net.listener,
                net.capture,
                net.tap,
                accel=accel,
                bios=standby_bios,
                ram_mb=RAM_MB,
                paged=True,
                record_timeout=10.0,
            )
            try:
                rig.wait_record(1, FIRST_RECORD_TIMEOUT)
            except BaseException:
                vm.mark_failed()
                raise
            yield rig


class LinuxGuestFreeze(Test):
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
        with linux_rig(
            self.prefix,
            self.work / "rig",
            disk_format=disk_format,
            network=network,
            actions=checks.trigger_actions(what),
            accel=self.accel,
            fw_dirs=firmware_dirs(self.prefix),
            log_dir=Path(self.logdir) / "vm",
        ) as rig:
            first = time.monotonic() - t0
            try:
                r = checks.verify_frozen(rig, what, SOAK_S)
            except (VMError, checks.CheckError, TimeoutError):
                rig.vm.mark_failed()
                raise
            if not r.ok:
                rig.vm.mark_failed()
        self.whiteboard = f"accel={r.accelerator} network={network} first_record_s={first:.1f}"
        self.log.info("accelerator %s; first record %.1f s after launch", r.accelerator, first)
        self.log.info("%s", checks.format_table([r]))
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
