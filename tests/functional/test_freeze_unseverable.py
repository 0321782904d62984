"""Devices QEMU cannot sever: freezing and freeze actions are refused.

A vhost-user device has its data path in another process: the disk of a
vhost-user-blk device is written by qemu-storage-daemon, the frames of a
vhost-user NIC are sent by its backend, past QEMU's block and net layers.
A freeze could not stop them, so QEMU refuses to freeze such a VM, to set a
freeze action for it (set-action, watchdog-set-action, -action,
werror=freeze), and to hot-plug such a device once a freeze action is set,
each time naming the device.  The backends are the real ones QEMU ships:
qemu-storage-daemon's vhost-user-blk export and the tree's
vhost-user-bridge (its frames go to UDP on loopback).

The control: the same VM, shared memory and all, without the vhost-user
device freezes, so the refusals are the device's doing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from frozen_test import FrozenTest

from harness import vhost
from harness.rig import create_image
from harness.vm import VM, system_binary

SEABIOS_BANNER = r"SeaBIOS \(version"
MEMORY = "64"
#: vhost-user needs guest RAM the backend can map
SHARED_MEMORY = [
    "-object",
    f"memory-backend-memfd,id=mem,size={MEMORY}M,share=on",
    "-machine",
    "pc,memory-backend=mem",
    "-m",
    MEMORY,
]
DEVICE_REFUSED = "The VM cannot be frozen: device '{id}' ({type}) does I/O that QEMU cannot sever"
NETDEV_REFUSED = "The VM cannot be frozen: netdev '{id}' ({type}) does I/O that QEMU cannot sever"
ACTION_REFUSED = "The {action} action is freeze, but: "
HOTPLUG_REFUSED = (
    "Cannot add device '{id}' ({type}): the {action} action is freeze, "
    "and the device does I/O that QEMU cannot sever"
)
NETDEV_ADD_REFUSED = (
    "Cannot add netdev '{id}' ({type}): the {action} action is freeze, "
    "and the netdev does I/O that QEMU cannot sever"
)
#: set-action arguments that ask for a freeze
FREEZE_ACTIONS = ({"panic": "freeze"}, {"watchdog": "freeze"}, {"internal-error": "freeze"})
STARTUP_TIMEOUT = 30.0
UDP_PORTS = (47101, 47102)


class Unseverable(FrozenTest):
    """:avocado: enable"""

    def setUp(self) -> None:
        super().setUp()
        # Unix socket paths must be short; the test's work dir is deep.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="frozen-vhost-"))

    def tearDown(self) -> None:
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        super().tearDown()

    def _vm(self, name: str, extra: list[str]) -> VM:
        return VM(
            system_binary(self.prefix),
            [*SHARED_MEMORY, *extra],
            name=name,
            log_dir=Path(self.logdir) / name,
            firmware_dirs=self.fw,
            console="debugcon",
        )

    def _blk_backend(self, name: str) -> vhost.Backend:
        image = self.work / f"{name}.raw"
        create_image(self.prefix, image, "raw")
        return vhost.vhost_user_blk(
            self.prefix, image, self.sock_dir / f"{name}.sock", Path(self.logdir) / f"{name}.log"
        )

    def _assert_not_frozen(self, vm: VM) -> None:
        self.assertTrue(vm.is_running(), "QEMU died on a refused command")
        self.assertEqual(vm.status(), "running")
        self.assertEqual(vm.events("FROZEN"), [])

    def _assert_refused(self, vm: VM, command: str, expected: str, **args: object) -> None:
        err = vm.try_cmd(command, args) if args else vm.try_cmd(command)
        self.assertIsNotNone(err, f"{command} {args} was accepted")
        assert err is not None
        self.assertEqual(err.desc, expected, f"{command} {args}")

    def _assert_all_refused(self, vm: VM, refusal: str) -> None:
        """freeze and every freeze action fail with `refusal`."""
        self._assert_refused(vm, "freeze", refusal)
        for action in FREEZE_ACTIONS:
            self._assert_refused(vm, "set-action", refusal, **action)
        self._assert_refused(vm, "watchdog-set-action", refusal, action="freeze")
        self._assert_not_frozen(vm)

    def _assert_vm_refuses(self, name: str, extra: list[str], refusal: str) -> None:
        with self._vm(name, extra) as vm:
            vm.wait_for_console(SEABIOS_BANNER, 60)
            self._assert_all_refused(vm, refusal)

    def test_vhost_user_blk(self) -> None:
        """A vhost-user-blk disk (qemu-storage-daemon): every freeze refused."""
        with self._blk_backend("vub0") as backend:
            extra = [
                "-chardev",
                f"socket,id=vub0c,path={backend.socket}",
                "-device",
                "vhost-user-blk-pci,id=vub0,chardev=vub0c",
            ]
            refusal = DEVICE_REFUSED.format(id="vub0", type="vhost-user-blk-pci")
            self._assert_vm_refuses("vub", extra, refusal)

    def test_vhost_user_net(self) -> None:
        """A vhost-user NIC (vhost-user-bridge): every freeze refused."""
        sock = self.sock_dir / "vubr.sock"
        log = Path(self.logdir) / "vubr.log"
        with vhost.vhost_user_bridge(self.prefix, sock, log, *UDP_PORTS):
            extra = [
                "-chardev",
                f"socket,id=vun0c,path={sock}",
                "-netdev",
                "vhost-user,id=vun0,chardev=vun0c",
                "-device",
                "virtio-net-pci,netdev=vun0,id=nic0",
            ]
            refusal = NETDEV_REFUSED.format(id="vun0", type="vhost-user")
            self._assert_vm_refuses("vun", extra, refusal)

    def test_hotplug_with_a_freeze_action(self) -> None:
        """With panic=freeze set, vhost-user devices and netdevs cannot be added."""
        with self._blk_backend("vub1") as backend, self._vm("hotplug", []) as vm:
            vm.wait_for_console(SEABIOS_BANNER, 60)
            vm.cmd("set-action", panic="freeze")
            vm.cmd(
                "chardev-add",
                id="vub1c",
                backend={
                    "type": "socket",
                    "data": {"addr": {"type": "unix", "data": {"path": str(backend.socket)}}},
                },
            )
            self._assert_refused(
                vm,
                "device_add",
                HOTPLUG_REFUSED.format(id="vub1", type="vhost-user-blk-pci", action="panic"),
                driver="vhost-user-blk-pci",
                id="vub1",
                chardev="vub1c",
            )
            self._assert_refused(
                vm,
                "netdev_add",
                NETDEV_ADD_REFUSED.format(id="vun1", type="vhost-user", action="panic"),
                type="vhost-user",
                id="vun1",
                chardev="vub1c",
            )
            peripherals = [p["name"] for p in vm.cmd("qom-list", path="/machine/peripheral")]
            self.assertNotIn("vub1", peripherals)
            self._assert_not_frozen(vm)
            # the control: the VM itself can still be frozen
            vm.cmd("freeze")
            self.assertEqual(vm.status(), "frozen")

    def test_control_without_the_device(self) -> None:
        """The same VM without a vhost-user device freezes: the device is why."""
        with self._vm("control", []) as vm:
            vm.wait_for_console(SEABIOS_BANNER, 60)
            for action in FREEZE_ACTIONS:
                vm.cmd("set-action", **action)
            vm.cmd("freeze")
            self.assertEqual(vm.status(), "frozen")
            self.assertEqual(len(vm.events("FROZEN")), 1)

    def _startup(self, backend: vhost.Backend, extra: list[str]) -> subprocess.CompletedProcess:
        """QEMU started with a freeze action and a vhost-user-blk device."""
        argv = [
            str(system_binary(self.prefix)),
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-accel",
            "kvm",
            *SHARED_MEMORY,
            "-chardev",
            f"socket,id=vub0c,path={backend.socket}",
            "-device",
            "vhost-user-blk-pci,id=vub0,chardev=vub0c",
            *extra,
        ]
        # A QEMU that is not refused keeps running: the timeout ends it by PID.
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=STARTUP_TIMEOUT, stdin=subprocess.DEVNULL
        )

    def test_startup_with_a_freeze_action(self) -> None:
        """-action watchdog=freeze or werror=freeze with a vhost-user disk: QEMU exits."""
        drive = self.work / "d0.raw"
        create_image(self.prefix, drive, "raw")
        cases = {
            "watchdog": ["-action", "watchdog=freeze"],
            "werror/rerror": ["-drive", f"file={drive},format=raw,if=none,id=d0,werror=freeze"],
        }
        with self._blk_backend("vub0") as backend:
            for action, extra in cases.items():
                r = self._startup(backend, extra)
                self.assertEqual(r.returncode, 1, f"{action}: QEMU was not refused: {r.stderr}")
                self.assertIn(
                    HOTPLUG_REFUSED.format(id="vub0", type="vhost-user-blk-pci", action=action),
                    r.stderr,
                )
