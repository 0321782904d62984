"""The proof (rig, observe, attempts, verdict, report, scenario) on synthetic evidence.

Every function that turns evidence into a verdict is fed both sides: the
evidence a good freeze leaves, and the evidence a broken one would leave, so
each check is shown able to fail. Records are built sector by sector as the
probe writes them, consoles as it prints them, dumps as files, datagrams
sent over loopback to the real listener.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import socket
import struct
import time
import types
import zlib
from pathlib import Path
from typing import Any

import pytest

from harness import attempts, config, guest, libvirtd, netns, observe, report, scenario, verdict
from harness.rig import GuestRig, Rig, console_records, record_sectors
from harness.vm import VMCommandError, VMDied

MARKER = "c0ffee0123456789"


# -- synthetic evidence ------------------------------------------------------


def record(n: int, sector: int, marker: str = MARKER, magic: bytes = guest.RECORD_MAGIC) -> bytes:
    """One 512-byte sector exactly as the probe writes it (see probe/main.c)."""
    body = bytearray(observe.SECTOR)
    body[:8] = magic
    struct.pack_into("<IIII", body, 8, n, sector, 1000 + n, len(marker))
    body[24 : 24 + len(marker)] = marker.encode()
    text = guest.record_text(marker, n)
    body[88 : 88 + len(text)] = text
    struct.pack_into("<I", body, 508, zlib.crc32(bytes(body[:508])))
    return bytes(body)


def disk_after(last: int, sectors: int, size_sectors: int = 128) -> bytearray:
    """The disk after the probe completed records 1..last in a ring of ``sectors``."""
    disk = bytearray(size_sectors * observe.SECTOR)
    disk[: observe.SECTOR] = record(1, sectors, magic=guest.HEADER_MAGIC)
    for n in range(1, last + 1):
        s = 1 + (n - 1) % sectors
        disk[s * observe.SECTOR : (s + 1) * observe.SECTOR] = record(n, s)
    return disk


def put(disk: bytearray, sector: int, data: bytes) -> None:
    disk[sector * observe.SECTOR : (sector + 1) * observe.SECTOR] = data


# -- disk records ------------------------------------------------------------


def test_parse_records_finds_the_ring() -> None:
    disk = disk_after(last=70, sectors=64)
    recs = observe.parse_records(bytes(disk), MARKER)
    assert len(recs) == 64
    assert recs[1] == 65 and recs[6] == 70 and recs[7] == 7 and recs[64] == 64


def test_parse_records_rejects_what_the_probe_did_not_write() -> None:
    disk = disk_after(last=5, sectors=64)
    put(disk, 2, record(2, 2, marker="deadbeef"))  # another run's record
    put(disk, 3, record(9, 4))  # a record copied to the wrong sector
    bad = bytearray(record(4, 4))
    bad[100] ^= 0xFF  # corrupt after the CRC was taken
    put(disk, 4, bytes(bad))
    put(disk, 5, record(5, 5, magic=guest.HEADER_MAGIC))  # a header is no record
    put(disk, 6, b"\x5a" * observe.SECTOR)  # an NBD client's bytes
    assert observe.parse_records(bytes(disk), MARKER) == {1: 1}


def test_missing_records_green_when_every_completed_record_is_there() -> None:
    for last, sectors in ((3, 64), (64, 64), (70, 64), (1000, 8)):
        recs = observe.parse_records(bytes(disk_after(last, sectors)), MARKER)
        assert verdict.missing_records(recs, last, sectors) == [], (last, sectors)


def test_missing_records_red_on_a_lost_write() -> None:
    disk = disk_after(last=70, sectors=64)
    put(disk, 6, bytes(observe.SECTOR))  # record 70 never reached the disk
    recs = observe.parse_records(bytes(disk), MARKER)
    assert verdict.missing_records(recs, 70, 64) == [70]
    # A stale counter (record 6 still there where 70 belongs) is missing too.
    put(disk, 6, record(6, 6))
    recs = observe.parse_records(bytes(disk), MARKER)
    assert verdict.missing_records(recs, 70, 64) == [70]
    # The console claims more than the disk holds.
    assert verdict.missing_records(recs, 72, 64) == [70, 71, 72]


def test_missing_records_nothing_completed() -> None:
    assert verdict.missing_records({}, 0, 64) == []


# -- disk bytes ----------------------------------------------------------------


def test_bytes_changed() -> None:
    before = bytes(disk_after(5, 64))
    assert observe.bytes_changed(before, before) == 0
    one = bytearray(before)
    one[4000] ^= 1
    assert observe.bytes_changed(before, bytes(one)) == 1
    nbd = bytearray(before)
    nbd[attempts.NBD_WRITE_OFFSET : attempts.NBD_WRITE_OFFSET + 4096] = b"\x5a" * 4096
    assert observe.bytes_changed(before, bytes(nbd)) == 4096
    # A grown or truncated image counts its whole difference.
    assert observe.bytes_changed(before, before + bytes(10)) == 10
    assert observe.bytes_changed(before, before[:-512]) == 512
    assert observe.bytes_changed(b"ab", b"xbcd") == 3


# -- console records -----------------------------------------------------------

PROBE_CONSOLE = (
    "PROBE: virtio-blk ok, record sectors=64\r\n"
    "record 1 blk=ok net=ok t=120\r\n"
    "record 2 blk=ok net=fail t=170\r\n"
    "noise record 99 blk=ok net=ok t=1\r\n"  # not at the start of a line
    "record 3 blk=ioerr net=off t=220\r\n"
    "record 4 blk="  # still arriving
)
#: The Linux guest's init: echo "record $n $st", st from frzrec.
LINUX_CONSOLE = "ready\nrecord 11 blk=ok net=ok t=5\nrecord 12 blk=ok net=off t=9\n"


def test_one_record_regex_for_every_console() -> None:
    """rig.RECORD_RX, through console_records, on str consoles and bytes logs."""
    for text, want in ((PROBE_CONSOLE, [1, 2, 3]), (LINUX_CONSOLE, [11, 12])):
        assert [r.counter for r in console_records(text)] == want
        assert [r.counter for r in console_records(text.encode())] == want
    first = console_records(PROBE_CONSOLE)[0]
    assert (first.blk, first.net) == ("ok", "ok")
    assert console_records("record sectors=64\r\n") == []
    assert record_sectors(PROBE_CONSOLE) == 64 and record_sectors("") is None
    offset = PROBE_CONSOLE.index("record 3")
    assert [r.counter for r in console_records(PROBE_CONSOLE, offset)] == [3]


def test_the_other_record_regexes_are_gone() -> None:
    assert not hasattr(guest, "RECORD_LINE_RE")
    assert not hasattr(libvirtd, "RECORD_RX")


def test_libvirt_probe_guest_is_a_rig(tmp_path: Path) -> None:
    """The libvirt guest reads its records from the console log, as a rig."""
    log = tmp_path / "console.log"
    log.write_bytes(LINUX_CONSOLE.encode())
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x01" * 512)
    domain = types.SimpleNamespace(name="vm", console_log=log, disk=disk)
    probe = libvirtd.ProbeGuest(domain, MARKER, None, tmp_path / "vm.xml")  # type: ignore[arg-type]
    view: GuestRig = probe
    assert view.records() == [11, 12] and view.last_record() == 12
    assert view.wait_record(12, 1) == 12
    assert view.disk_view() == b"\x01" * 512
    assert "record 11" in view.console_text()


class FakeVM:
    """The little of harness.vm.VM the verdict helpers use, scripted."""

    def __init__(self, console: str = "", running: bool = True, accept: set[str] | None = None):
        self.console = console
        self.running = running
        self.accept = accept or set()
        self.status_value = "frozen"
        self.ram = b""
        self.dump = b""
        self.calls: list[str] = []
        self.paths = types.SimpleNamespace(sock_dir=Path("/nonexistent"))

    def console_text(self) -> str:
        return self.console

    def is_running(self) -> bool:
        return self.running

    def try_cmd(self, name: str, args: Any = None, **_: Any) -> VMCommandError | None:
        self.calls.append(name)
        if not self.running:
            raise VMDied(f"{name}: QEMU exited")
        if name in self.accept:
            return None
        return VMCommandError(name, args or {}, "GenericError", "The VM is frozen")

    def hmp(self, line: str) -> str:
        if line.startswith("xp "):
            _, fmt, addr = line.split()
            size, a = int(fmt[1:-2]), int(addr, 16)
            data = self.ram[a : a + size]
            return "".join(f"{a + i:016x}: 0x{b:02x}\n" for i, b in enumerate(data))
        return "" if "hmp " + line in self.accept else "Error: The VM is frozen"

    def status(self) -> str:
        if not self.running:
            raise VMDied("QEMU exited")
        return self.status_value

    def cmd(self, name: str, args: Any = None, **kw: Any) -> Any:
        if name == "pmemsave":
            Path(kw["filename"]).write_bytes(self.ram)
        elif name == "dump-guest-memory":
            Path(kw["protocol"].removeprefix("file:")).write_bytes(self.dump)
        elif name == "memsave":
            Path(kw["filename"]).write_bytes(self.ram[kw["val"] : kw["val"] + kw["size"]])
        return {}


def fake_rig(tmp_path: Path, vm: FakeVM, listener: Any = None) -> Rig:
    image = tmp_path / "disk.raw"
    if not image.exists():
        image.write_bytes(bytes(disk_after(3, 64)))
    return Rig(vm, tmp_path, tmp_path, image, "raw", "user", MARKER, listener)  # type: ignore[arg-type]


def test_rig_console_views(tmp_path: Path) -> None:
    vm = FakeVM(PROBE_CONSOLE)
    rig = fake_rig(tmp_path, vm)
    assert rig.records() == [1, 2, 3] and rig.last_record() == 3
    assert rig.sectors == 64
    mark = len(vm.console)
    assert rig.records_after(mark) == []
    vm.console += "blk=ok net=ok t=270\r\nrecord 5 blk=ok net=ok t=320\r\n"
    # Record 4's line began before the mark: only what started after counts.
    assert rig.records_after(mark) == [5]


# -- datagrams -----------------------------------------------------------------


def test_datagrams_after_counts_only_arrivals_after_the_freeze(tmp_path: Path) -> None:
    with netns.UdpListener("127.0.0.1") as listener:
        rig = fake_rig(tmp_path, FakeVM(), listener)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"FROZEN-RECORD:before", ("127.0.0.1", listener.port))
            listener.wait_for(lambda d: True, timeout=5)
            time.sleep(0.05)
            freeze_wall = time.time()
            assert rig.datagrams_after(freeze_wall) == 0
            tx.sendto(b"FROZEN-RECORD:after", ("127.0.0.1", listener.port))
            listener.wait_for(lambda d: d.wall > freeze_wall, timeout=5)
        assert rig.datagrams_after(freeze_wall) == 1


# -- memory --------------------------------------------------------------------


def test_memory_has_green_and_red(tmp_path: Path) -> None:
    tag = guest.marker_tag(MARKER)
    last = guest.last_record_tag(MARKER, 3)
    decoy = guest.marker_tag("feedface")
    vm = FakeVM()
    vm.ram = bytes(4096) + tag + bytes(100) + last + bytes(4096)
    vm.dump = b"\x7fELF" + bytes(64) + vm.ram
    found = observe.memory_has(vm, tmp_path / "mem", [tag, last, decoy], ram_mb=1)  # type: ignore[arg-type]
    key = tag.decode()
    assert found[f"pmemsave:{key}"] and found[f"dump-guest-memory:{key}"]
    assert found["xp"] and found["memsave"]
    assert found[f"pmemsave:{last.decode().strip()}"]
    assert not found[f"pmemsave:{decoy.decode()}"]
    assert not found[f"dump-guest-memory:{decoy.decode()}"]
    # Memory lost: a zeroed RAM and an empty dump find nothing.
    vm.ram, vm.dump = bytes(8192), b""
    found = observe.memory_has(vm, tmp_path / "mem", [tag, last], ram_mb=1)  # type: ignore[arg-type]
    assert not any(found.values())


# -- attempts ------------------------------------------------------------------


def test_attempt_held_only_when_refused_alive_and_still_frozen() -> None:
    assert attempts.Attempt("cont", True, "refused", True, True).held
    for refused, alive, frozen in ((False, True, True), (True, False, True), (True, True, False)):
        assert not attempts.Attempt("cont", refused, "", alive, frozen).held


def test_attempt_records_qemu_dying() -> None:
    vm = FakeVM()

    def crash() -> tuple[bool, str]:
        vm.running = False
        raise VMDied("cont: QEMU exited (rc=-6) during the command")

    a = attempts.attempt(vm, "cont", crash)  # type: ignore[arg-type]
    assert (a.refused, a.alive, a.still_frozen, a.held) == (False, False, False, False)
    assert "VMDied" in a.message and "rc=-6" in a.message


def test_attempt_accepted_and_refused() -> None:
    vm = FakeVM(accept={"cont"})
    a = attempts.attempt(vm, "cont", lambda: attempts.cmd_refused(vm, "cont"))  # type: ignore[arg-type]
    assert not a.refused and not a.held
    b = attempts.attempt(vm, "x", lambda: attempts.cmd_refused(vm, "system_reset"))  # type: ignore[arg-type]
    assert b.refused and b.held and "frozen" in b.message


# -- soak ----------------------------------------------------------------------


@pytest.fixture
def no_nbd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        attempts, "nbd_client_write", lambda *a: attempts.ClientWrite(False, "no server")
    )


def _soak(tmp_path: Path, vm: FakeVM, seconds: float, mutate: Any = None) -> scenario.Soak:
    with netns.UdpListener("127.0.0.1") as listener:
        rig = fake_rig(tmp_path, vm, listener)
        image, mark, freeze_wall = rig.image.read_bytes(), len(vm.console), time.time()
        if mutate:
            mutate(rig, listener)
        return scenario.soak(rig, seconds, freeze_wall, mark, image)


def test_soak_runs_its_whole_window_when_nothing_moves(tmp_path: Path, no_nbd: None) -> None:
    s = _soak(tmp_path, FakeVM(PROBE_CONSOLE), 1.2)
    assert s.seconds >= 1.2 and s.rounds >= 2 and s.notes == []


def test_soak_sees_every_kind_of_movement(tmp_path: Path, no_nbd: None) -> None:
    vm = FakeVM(PROBE_CONSOLE, accept={"cont", "hmp cont"})

    def move(rig: Rig, listener: netns.UdpListener) -> None:
        vm.console += "\r\nrecord 9 blk=ok net=ok t=1\r\n"
        rig.image.write_bytes(b"\x5a" + rig.image.read_bytes()[1:])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"FROZEN-RECORD:x", ("127.0.0.1", listener.port))
        listener.wait_for(lambda d: True, timeout=5)
        vm.status_value = "running"

    s = _soak(tmp_path, vm, 0.6, move)
    text = "\n".join(s.notes)
    for want in (
        "cont accepted",
        "hmp cont accepted",
        "status became running",
        "guest ran again",
        "image bytes changed",
        "datagram after freeze",
    ):
        assert want in text, (want, s.notes)
    assert len(s.notes) == len(set(s.notes)), "each movement noted once"


def test_soak_stops_when_qemu_exits(tmp_path: Path, no_nbd: None) -> None:
    s = _soak(tmp_path, FakeVM(running=False), 5.0)
    assert s.notes == ["soak: QEMU exited"] and s.seconds < 5.0


# -- the verdict ---------------------------------------------------------------


def good(**kw: Any) -> verdict.FreezeResult:
    base = dict(
        trigger="panic",
        accelerator="kvm",
        memory_kept=True,
        bytes_written_after_freeze=0,
        packets_after_freeze=0,
        lock_released=True,
        refusals_held=True,
        status="frozen",
        frozen_events=1,
        reason="guest-panic",
        records_on_disk=True,
        quit_clean=True,
        soak_s=30.0,
        soak_rounds=40,
    )
    return verdict.FreezeResult(**{**base, **kw})


BROKEN = {
    "status": "paused",
    "frozen_events": 2,
    "reason": "host-qmp-freeze",
    "memory_kept": False,
    "records_on_disk": False,
    "bytes_written_after_freeze": 1,
    "packets_after_freeze": 1,
    "records_after_freeze": 1,
    "lock_released": False,
    "refusals_held": False,
    "quit_clean": False,
}


def test_freeze_result_ok_green() -> None:
    assert good().ok
    assert verdict.verdict(good()) == "PASS" and verdict.verdict_ok(good())


@pytest.mark.parametrize("field,value", sorted(BROKEN.items()))
def test_freeze_result_ok_red_on_each_broken_promise(field: str, value: Any) -> None:
    r = good(**{field: value})
    assert not r.ok
    assert verdict.verdict(r) == "FAIL" and not verdict.verdict_ok(r)


def test_every_verdict_field_is_covered() -> None:
    """A field added to the verdict without a red case here fails this test."""
    verdict_fields = {
        "status",
        "frozen_events",
        "reason",
        "memory_kept",
        "records_on_disk",
        "bytes_written_after_freeze",
        "packets_after_freeze",
        "records_after_freeze",
        "lock_released",
        "refusals_held",
        "quit_clean",
    }
    assert set(BROKEN) == verdict_fields
    # The fields FreezeResult.ok reads (but the trigger, which picks the reason).
    source = inspect.getsource(verdict.FreezeResult.ok.fget)  # type: ignore[attr-defined]
    assert set(re.findall(r"self\.(\w+)", source)) - {"trigger"} == verdict_fields
    names = {f.name for f in dataclasses.fields(verdict.FreezeResult)}
    assert verdict_fields <= names


def test_error_rows_are_failures() -> None:
    r = verdict.FreezeResult("qmp", "kvm", False, -1, -1, False, False, ["error: boom"])
    assert not r.ok
    assert "FAIL" in report.format_table([r]) and "?" in report.format_table([r])


def test_controls_are_right_when_red() -> None:
    red = good(
        status="paused",
        frozen_events=0,
        reason=None,
        control=True,
        refusals_held=False,
        bytes_written_after_freeze=300,
    )
    assert verdict.verdict(red) == "red (expected)" and verdict.verdict_ok(red)
    green = good(control=True)
    assert "cannot fail" in verdict.verdict(green) and not verdict.verdict_ok(green)
    assert "(stock control)" in report.format_table([red])


def test_partial_rows_name_what_was_not_proven() -> None:
    r = good(not_proven=["tap networking: creating network namespaces needs root"])
    assert verdict.verdict(r) == "PASS (partial)"
    assert "not proven (panic): tap networking" in report.format_table([r])


def test_verify_all_fails_without_kvm_or_namespaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No silent TCG or user-networking fallback, unless asked for."""
    monkeypatch.setattr(scenario, "default_accel", lambda: "tcg")
    monkeypatch.setattr(netns, "netns_supported", lambda: "no namespaces here")
    ran: list[tuple[str, str, str]] = []

    def fake(prefix: Path, wd: Path, what: str, **kw: Any) -> verdict.FreezeResult:
        ran.append((what, kw["network"], kw["accel"]))
        return good(trigger=what, reason=verdict.REASONS[what])

    monkeypatch.setattr(scenario, "freeze_scenario", fake)
    monkeypatch.delenv(config.PARTIAL_ENV, raising=False)
    rows = scenario.verify_all(tmp_path, tmp_path / "w", triggers=("qmp", "watchdog"))
    assert ran == [] and not any(r.ok for r in rows)
    assert all("cannot prove" in r.details[1] for r in rows)
    rows = scenario.verify_all(tmp_path, tmp_path / "w", triggers=("qmp", "watchdog"), partial=True)
    assert ran == [("qmp", "user", "tcg"), ("watchdog", "user", "tcg")]
    assert [verdict.verdict(r) for r in rows] == ["PASS (partial)"] * 2
    assert any("tap networking" in g for g in rows[1].not_proven)


def test_soak_retries_the_whole_table_every_round(tmp_path: Path, no_nbd: None) -> None:
    rounds: list[int] = []

    def table() -> list[attempts.Attempt]:
        rounds.append(1)
        held = attempts.Attempt("cont", True, "refused", True, True)
        through = attempts.Attempt("block_resize", False, "accepted", True, True)
        return [held, through] if len(rounds) > 2 else [held]

    with netns.UdpListener("127.0.0.1") as listener:
        rig = fake_rig(tmp_path, FakeVM(), listener)
        s = scenario.soak(rig, 1.2, time.time(), 0, rig.image.read_bytes(), retry=table)
    assert len(rounds) == s.rounds >= 3
    assert s.notes == ["soak: block_resize not held"]


# -- one matrix for `frozen verify` and CI ---------------------------------------


def _called(path: Path, helper: str) -> set[str]:
    return set(re.findall(rf'self\.{helper}\("([\w-]+)"\)', path.read_text()))


def test_ci_runs_the_matrix_frozen_verify_runs() -> None:
    """test_freeze runs every MATRIX row, test_negative_control controls every
    row; `frozen verify` runs MATRIX (verify_all's default) on both builds."""
    functional = Path(__file__).resolve().parents[1] / "functional"
    rows = {r.trigger for r in scenario.MATRIX}
    assert _called(functional / "test_freeze.py", "_row") == rows
    assert _called(functional / "test_negative_control.py", "_control") == rows
    assert inspect.signature(scenario.verify_all).parameters["triggers"].default == tuple(
        r.trigger for r in scenario.MATRIX
    )
    assert set(verdict.TRIGGERS) == rows and len(scenario.MATRIX) == len(rows)


def test_the_stalled_network_is_a_hub_to_a_nic_nobody_drives() -> None:
    from harness import rig

    with rig.guest_network("stalled") as net:
        assert net.netdev == f"hubport,id={rig.NETDEV_ID},hubid=0"
        # the sink is on the same hub, behind a NIC the probe never sets up
        # (it drives the first virtio-net it finds: the rig's, added first)
        assert f"hubport,id={rig.SINK_NETDEV_ID},hubid=0" in net.args
        assert any(a.startswith("virtio-net-pci,") and rig.SINK_NETDEV_ID in a for a in net.args)
        assert net.fds == []


def test_job_progress_reads_query_jobs_and_a_finished_job_as_absent() -> None:
    jobs = [
        {"id": "other", "status": "running", "current-progress": 9, "total-progress": 9},
        {"id": "job0", "status": "running", "current-progress": 4, "total-progress": 10},
    ]
    p = observe.job_progress(lambda cmd: jobs if cmd == "query-jobs" else None)
    assert p == observe.JobProgress("running", 4, 10) and p.mid_copy
    gone = observe.job_progress(lambda cmd: [])
    assert gone.status == "absent" and not gone.mid_copy
