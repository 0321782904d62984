"""Guest memory is kept byte-identical from the moment the vCPUs stop.

The probe's NIC sits on a hub whose only other port is a NIC nobody drives
(rig.guest_network "stalled"): its first frame cannot be delivered, so
QEMU holds the guest's TX request in flight and the guest waits for it.
That request is what a stop completes: QEMU flushes or purges the queued
frame and its completion writes the guest's used ring (and pops and
completes whatever else is queued). A frozen VM must not: the rings'
bytes in guest memory (descriptor table, avail and used ring of the TX
queue) are read with pmemsave before the freeze, right after FROZEN and
10 s later, and must be equal. The stock control does the same with
``stop`` and must see the used ring change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from frozen_test import FrozenTest

from harness import rig as rigs
from harness import scenario
from harness.rig import Rig
from harness.vm import VM

#: virtio-net's TX queue of the first queue pair
TX_QUEUE = 1
#: the soak between the two reads after FROZEN
SOAK_S = 10.0


@dataclass(frozen=True)
class Ring:
    """A split virtqueue as QEMU reports it, and its bytes in guest memory."""

    num: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    inuse: int

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(guest-physical address, length) of the descriptor table and the
        avail and used rings (each with its event index)."""
        return [
            (self.desc_addr, 16 * self.num),
            (self.avail_addr, 4 + 2 * self.num + 2),
            (self.used_addr, 4 + 8 * self.num + 2),
        ]


def tx_ring(vm: VM) -> Ring:
    st = vm.cmd(
        "x-query-virtio-queue-status",
        path=f"/machine/peripheral/{rigs.NIC_ID}/virtio-backend",
        queue=TX_QUEUE,
    )
    return Ring(st["vring-num"], st["vring-desc"], st["vring-avail"], st["vring-used"], st["inuse"])


def ring_bytes(vm: VM, ring: Ring, work: Path, tag: str) -> bytes:
    """The ring's bytes in guest memory, through pmemsave."""
    out = b""
    for i, (addr, size) in enumerate(ring.spans):
        path = work / f"ring-{tag}-{i}.bin"
        vm.cmd("pmemsave", val=addr, size=size, filename=str(path))
        out += path.read_bytes()
    return out


def used_idx(ring: Ring, data: bytes) -> int:
    """The used ring's idx field, from ring_bytes()."""
    at = 16 * ring.num + (4 + 2 * ring.num + 2) + 2
    return int.from_bytes(data[at : at + 2], "little")


class MemoryTest(FrozenTest):
    """:avocado: disable"""

    def stalled(self, rig: Rig) -> tuple[Ring, bytes]:
        """Wait until the guest's TX request is held in QEMU and the rings
        stay still (two reads 0.5 s apart agree); the rings and their bytes."""
        deadline = time.monotonic() + 20
        while True:
            ring = tx_ring(rig.vm)
            if ring.inuse == 1:
                first = ring_bytes(rig.vm, ring, self.work, "stall-a")
                time.sleep(0.5)  # a stillness window, not a wait for an event
                second = ring_bytes(rig.vm, ring, self.work, "stall-b")
                if first == second and tx_ring(rig.vm).inuse == 1:
                    return ring, second
            if time.monotonic() > deadline:
                self.fail(f"the TX queue never stalled with one request in flight: {ring}")
            time.sleep(0.1)  # polling QEMU's queue state: there is no event for it


class FrozenMemory(MemoryTest):
    """:avocado: enable"""

    def test_freeze_leaves_the_tx_rings_untouched(self) -> None:
        with self.rig(network="stalled") as rig:
            ring, before = self.stalled(rig)
            mark = rig.vm.event_mark()
            rig.vm.cmd("freeze")
            rig.vm.event_wait("FROZEN", scenario.FREEZE_EVENT_TIMEOUT, after=mark)
            after = ring_bytes(rig.vm, ring, self.work, "frozen")
            time.sleep(SOAK_S)  # the soak: nothing may write the rings in it
            later = ring_bytes(rig.vm, ring, self.work, "later")
            self.assertEqual(rig.vm.status(), "frozen")
        self.log.info(
            "TX used idx: stalled %d, after FROZEN %d, %.0f s later %d",
            used_idx(ring, before),
            used_idx(ring, after),
            SOAK_S,
            used_idx(ring, later),
        )
        self.assertEqual(used_idx(ring, after), used_idx(ring, before))
        self.assertEqual(after, before, "the freeze wrote the guest's TX rings")
        self.assertEqual(later, before, "the guest's TX rings changed while frozen")


class StockStopControl(MemoryTest):
    """:avocado: enable"""

    prefix_variable = "FROZEN_QEMU_STOCK"
    what = "unpatched (stock) QEMU"

    def test_stop_completes_the_stalled_request(self) -> None:
        """Negative control: stock ``stop`` completes the request held in
        flight, writing the used ring after the vCPUs stopped."""
        with self.rig(network="stalled") as rig:
            ring, before = self.stalled(rig)
            mark = rig.vm.event_mark()
            rig.vm.cmd("stop")
            rig.vm.event_wait("STOP", 10, after=mark)
            after = ring_bytes(rig.vm, ring, self.work, "stopped")
        self.log.info(
            "TX used idx: stalled %d, after STOP %d", used_idx(ring, before), used_idx(ring, after)
        )
        self.assertNotEqual(after, before, "the control saw no write: the check cannot fail")
        self.assertGreater(used_idx(ring, after), used_idx(ring, before))


#: detached dumps in the race test, each followed at once by the next
DUMP_ROUNDS = 60


class FrozenDumps(MemoryTest):
    """:avocado: enable"""

    def test_back_to_back_detached_dumps(self) -> None:
        """A new dump asked for the moment a detached one ends must not
        crash QEMU: the old dump's cleanup used to run after its status
        said "completed", on the state (and the file) of the next dump.
        The monitor fuzz hit it once (SIGSEGV after "g_hash_table_destroy:
        assertion 'hash_table != NULL' failed"); this asks for the next
        dump in a tight loop, DUMP_ROUNDS times. The window is narrow: on
        the series without the fix this loop did not hit it in 2 x 60
        rounds, so it guards the path, the fuzz is what found it."""
        with self.rig() as rig:
            mark = rig.vm.event_mark()
            rig.vm.cmd("freeze")
            rig.vm.event_wait("FROZEN", scenario.FREEZE_EVENT_TIMEOUT, after=mark)
            path = self.work / "dump.elf"
            accepted = busy = 0
            deadline = time.monotonic() + 120
            while accepted < DUMP_ROUNDS and time.monotonic() < deadline:
                err = rig.vm.try_cmd(
                    "dump-guest-memory",
                    {"paging": True, "detach": True, "protocol": f"file:{path}"},
                )
                if err is None:
                    accepted += 1
                elif "There is a dump in process" in err.desc:
                    busy += 1  # the previous one is still running: ask again at once
                else:
                    self.fail(f"dump-guest-memory refused: {err.desc}")
            self.log.info("%d dumps accepted, %d refused as busy", accepted, busy)
            self.assertEqual(accepted, DUMP_ROUNDS, "the dumps did not all start in 120 s")
            self.assertTrue(rig.vm.is_running(), "QEMU died during the dumps")
            self.assertEqual(rig.vm.status(), "frozen")
