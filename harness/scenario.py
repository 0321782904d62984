"""The freeze scenarios: boot a rig, trigger a freeze, measure, soak, judge.

These are the steps behind both the functional tests and `frozen verify`'s
table. Everything is measured, nothing assumed: the run state and events
come from QMP, memory from ``pmemsave`` and ``dump-guest-memory`` files,
disk bytes from the image file, packets from a listener (and, on a tap, a
raw capture) that record kernel arrival times. The write attempts are the
table in ``harness.attempts``, the measurements ``harness.observe``'s, the
verdict ``harness.verdict``'s.

Only the QEMU install prefix is needed (``<prefix>/bin/qemu-system-x86_64``,
``qemu-img``, ``qemu-io``); this module does not know how it was built.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import config, guest, netns
from harness.attempts import (
    Attempt,
    attempt,
    cmd_refused,
    prepare_write_paths,
    soak_paths,
    write_attempts,
)
from harness.observe import (
    accelerator,
    bytes_changed,
    bytes_in_targets,
    memory_has,
    parse_records,
    standby_opens_rw,
)
from harness.rig import DISK_NODE, NIC_ID, Rig, RigError
from harness.verdict import FreezeResult, memory_verdict, missing_records
from harness.vm import VMError

FREEZE_EVENT_TIMEOUT = 20.0
#: The proof's soak: from the end of the memory checks, attempts inside it.
SOAK_S = 30.0
#: Soak of a negative control: stock goes red at the first retry.
CONTROL_SOAK_S = 3.0


# -- triggers ----------------------------------------------------------------


def trigger(rig: Rig, what: str) -> None:
    """Make the VM freeze through ``what`` (see TRIGGERS)."""
    if what == "qmp":
        rig.vm.cmd("freeze")
    elif what == "panic":
        rig.command(guest.CMD_PANIC)
    elif what == "watchdog":
        rig.command(guest.CMD_WATCHDOG)
    elif what == "internal-error":
        rig.command(guest.CMD_EMULATION_ERROR)
    elif what == "io-error":
        # A read from the host arms the blkdebug rule: the guest's next
        # write fails with EIO and werror=freeze acts on it.
        out = rig.vm.hmp(f'qemu-io {DISK_NODE} "read 0 512"')
        if out.strip():
            raise RigError(f"HMP qemu-io read: {out.strip()}")
    else:
        raise ValueError(f"unknown trigger {what!r}")


def control_actions(what: str) -> dict[str, str]:
    """The stock -action settings that pause instead (negative control).

    A KVM internal error stops a stock VM by itself; an I/O error pauses it
    through werror=stop.
    """
    return {"panic": {"panic": "pause"}, "watchdog": {"watchdog": "pause"}}.get(what, {})


def trigger_actions(what: str) -> dict[str, str]:
    """The -action settings (and werror) a trigger needs on the patched build."""
    return {
        "panic": {"panic": "freeze"},
        "watchdog": {"watchdog": "freeze"},
        "internal-error": {"internal-error": "freeze"},
    }.get(what, {})


# -- the soak ----------------------------------------------------------------


@dataclass
class Soak:
    """What the soak saw: how long it watched, how often it retried, what moved."""

    seconds: float = 0.0
    rounds: int = 0
    notes: list[str] = field(default_factory=list)


def soak(
    rig: Rig,
    seconds: float,
    freeze_wall: float,
    console_mark: int,
    image_at_freeze: bytes,
    expect_status: str = "frozen",
    retry: Callable[[], list[Attempt]] | None = None,
) -> Soak:
    """Retry the write paths for ``seconds`` while watching everything.

    Every round retries the table's cheap rows (``attempts.soak_paths``:
    cont, HMP cont, activation, the open NBD export, set_link) and, with
    ``retry``, the whole table first.

    Watched every round: the console (a new record means the guest ran),
    the image bytes, the listener and the tap capture, QEMU's status. The
    soak always runs its whole window unless QEMU exits, so a short soak
    shows up in ``seconds`` and the tests can fail on it.
    """
    start = time.monotonic()
    until = start + seconds
    out = Soak()
    seen: dict[str, None] = {}  # notes in order, each once
    while (left := until - time.monotonic()) > 0:
        if not rig.vm.is_running():
            seen["soak: QEMU exited"] = None
            break
        try:
            notes = []
            if retry is not None:
                # Named once per path: stock's messages vary round to round.
                notes += [f"soak: {a.name} not held" for a in retry() if not a.held]
            # The cheap paths last, cont among them: a VM that can be
            # resumed ends every round resumed (its locks re-taken).
            cheap = write_attempts(rig, soak_paths(), expect_status)
            notes += [
                f"soak: {a.name} {'not held' if a.refused else 'accepted'}"
                for a in cheap
                if not a.held
            ]
            if (status := rig.vm.status()) != expect_status:
                notes.append(f"soak: status became {status}")
        except VMError as e:
            notes = [f"soak: {type(e).__name__}"]
        out.rounds += 1
        if rig.records_after(console_mark):
            notes.append("soak: guest ran again (the console printed new records)")
        if rig.image.read_bytes() != image_at_freeze:
            notes.append("soak: image bytes changed")
        if rig.datagrams_after(freeze_wall):
            notes.append("soak: datagram after freeze")
        seen.update(dict.fromkeys(notes))
        # The pause between rounds is itself a wait for a datagram that must
        # never come (kernel timestamps, checked after the loop too).
        with contextlib.suppress(TimeoutError):
            rig.listener.wait_for(lambda d: d.wall > freeze_wall, timeout=min(0.5, left))
    out.seconds = time.monotonic() - start
    out.notes = list(seen)
    return out


def _enter_stock_pause(rig: Rig, what: str, details: list[str]) -> dict[str, Any]:
    """The stock stand-in for a freeze (negative control): pause, then what an
    operator scripts today -- links down and every node inactive."""
    vm = rig.vm
    if what == "qmp":
        vm.cmd("stop")
    else:
        trigger(rig, what)  # with -action ...=pause / werror=stop on this rig
    ev = vm.event_wait("STOP", FREEZE_EVENT_TIMEOUT)
    # The open export would make stock refuse to inactivate (EPERM): close it
    # first, as a careful operator would, so the lock check is tested against
    # a release that did happen.
    for name, args in (
        *((("block-export-del", {"id": "pre"}),) if rig.share_rw else ()),
        ("nbd-server-stop", None),
        ("set_link", {"name": NIC_ID, "up": False}),
        ("blockdev-set-active", {"active": False}),
    ):
        if name == "nbd-server-stop" and rig.share_rw:
            with contextlib.suppress(VMError):
                vm.event_wait("BLOCK_EXPORT_DELETED", 10)
        err = vm.try_cmd(name, args)
        details.append(f"stock {name} {args}: {'ok' if err is None else err.desc}")
    return ev


def verify_frozen(rig: Rig, what: str, soak_s: float, *, control: bool = False) -> FreezeResult:
    """Trigger a freeze through ``what`` and measure every promise.

    ``control=True`` is the negative control on stock QEMU: the rig pauses
    instead (``stop``, ``-action ...=pause``, ``werror=stop``), links go down
    and nodes inactive, and the very same measurements follow; they must go
    red there, or they could not catch a broken freeze.
    """
    vm = rig.vm
    details: list[str] = []
    acc = accelerator(vm)
    # The guest is live: records reach the disk and the listener.
    before = rig.wait_record(3, 2 * rig.record_timeout)
    rig.listener.wait_for(lambda d: True, timeout=10)
    details.append(f"records before trigger: {before}, datagrams: {len(rig.listener.datagrams())}")
    prepare_write_paths(rig)
    if control:
        ev = _enter_stock_pause(rig, what, details)
    else:
        trigger(rig, what)
        ev = vm.event_wait("FROZEN", FREEZE_EVENT_TIMEOUT)
    ts = ev.get("timestamp", {})
    freeze_wall = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
    reason = ev.get("data", {}).get("reason") if ev.get("event") == "FROZEN" else None
    image_at_freeze = rig.image.read_bytes()
    status = vm.status()
    last = rig.last_record()
    details.append(f"{ev.get('event')} reason={reason}; status={status}; last record={last}")

    # Nothing the guest completed is lost.
    missing = missing_records(parse_records(rig.disk_view(), rig.marker), last, rig.sectors)
    records_ok = last > 0 and not missing
    if missing:
        details.append(f"completed records missing on disk: {missing[:10]}")

    # Memory is kept: marker and the last completed counter.
    tag = guest.marker_tag(rig.marker)
    lasts = [guest.last_record_tag(rig.marker, n) for n in (last, last + 1)]
    # A marker the guest never had: finding it would mean the search is void.
    decoy = guest.marker_tag(secrets.token_hex(8))
    found = memory_has(
        vm, rig.workdir / "mem", [tag, *lasts, decoy], ram_mb=rig.ram_mb, paged=rig.paged
    )
    mem = memory_verdict(found, decoy, lasts, paged=rig.paged)
    if mem.decoy_found:
        details.append("memory: a marker the guest never had was found: the search is void")
    memory_kept = mem.kept
    details.append(f"memory: marker={mem.marker} last counter={mem.last_counter} ({found})")

    # The soak starts after the memory checks: every attempt is inside it.
    # Console bytes from before this point are long settled (vCPUs stopped).
    console_mark = len(vm.console_text())
    soak_start = time.monotonic()
    attempts = write_attempts(rig)
    again: str | None = None
    if not control and vm.is_running():
        err = attempt(vm, "freeze again", lambda: cmd_refused(vm, "freeze"))
        # freeze on a frozen VM must succeed (agents retry): "refused" is bad.
        again = None if (not err.refused and err.alive and err.still_frozen) else err.message
        details.append(f"freeze again: {again or 'ok'}")
    # The whole table again, round after round, until the soak's end.
    sk = soak(
        rig,
        max(0.0, soak_start + soak_s - time.monotonic()),
        freeze_wall,
        console_mark,
        image_at_freeze,
        expect_status="frozen" if not control else status,
        retry=lambda: write_attempts(rig),
    )
    details += sk.notes
    soaked = time.monotonic() - soak_start
    details.append(f"soak: {soaked:.1f} s, {sk.rounds} rounds of retries after the attempts")
    records_after = len(rig.records_after(console_mark))

    written = bytes_changed(image_at_freeze, rig.image.read_bytes())
    for name, moved in bytes_in_targets(rig.write_targets).items():
        details.append(f"{name}: {moved} bytes written after the freeze")
        written += moved
    packets = rig.datagrams_after(freeze_wall)
    alive = vm.is_running()
    if rig.tap is not None:
        details.append(f"tap carrier after freeze (QEMU still holds it): {rig.tap.carrier()}")
    if alive:
        with contextlib.suppress(VMError, KeyError):
            fr = vm.cmd("query-status").get("freeze-reason")
            details.append(f"query-status freeze-reason: {fr}")
    frozen_events = len(vm.events("FROZEN"))
    standby = standby_opens_rw(rig)
    lock_released = standby.opened
    if not lock_released:
        details.append(f"second open: {standby.text[-200:]}")
    final_status = "exited"
    if vm.is_running():
        try:
            final_status = vm.status()
        except VMError as e:
            final_status = f"? ({e})"
    if final_status != "frozen":
        details.append(f"status at the end: {final_status}")
    refusals_held = (
        all(a.held for a in attempts)
        and again is None
        and not sk.notes
        and final_status == "frozen"
    )
    for a in attempts:
        if not a.held:
            details.append(f"NOT HELD {a.name}: {a.message} (alive={a.alive})")
    quit_clean = False
    if vm.is_running():
        with contextlib.suppress(VMError):  # the reply may be lost as QEMU exits
            vm.cmd("quit")
        with contextlib.suppress(VMError):
            quit_clean = vm.wait_for_exit(10) == 0
    return FreezeResult(
        trigger=what,
        accelerator=acc,
        memory_kept=memory_kept,
        bytes_written_after_freeze=written,
        packets_after_freeze=packets,
        lock_released=lock_released,
        refusals_held=refusals_held,
        details=details,
        status=status,
        frozen_events=frozen_events,
        reason=reason,
        records_on_disk=records_ok,
        quit_clean=quit_clean,
        attempts=attempts,
        soak_s=soaked,
        soak_rounds=sk.rounds,
        records_after_freeze=records_after,
        control=control,
    )


def freeze_scenario(
    prefix: Path,
    workdir: Path,
    what: str,
    *,
    disk_format: str = "raw",
    network: str = "user",
    soak_s: float = 5.0,
    accel: str = "kvm",
    firmware_dirs: Sequence[Path] = (),
    action_via: str = "cmdline",
    control: bool = False,
    log_dir: Path | None = None,
    share_rw: bool = False,
) -> FreezeResult:
    """Boot the probe on the patched QEMU, freeze it through ``what``, verify.

    ``action_via="qmp"`` sets the trigger's action with ``set-action`` on the
    running VM instead of ``-action`` on the command line. ``control=True``
    runs the negative control on a stock QEMU in ``prefix`` instead (see
    verify_frozen), with the stock pause actions. The rig is production-
    shaped (share-rw=off) unless ``share_rw`` (the NBD rig).
    """
    io = what == "io-error"
    actions = control_actions(what) if control else trigger_actions(what)
    werror = ("stop" if control else "freeze") if io else None
    with guest.probe_rig(
        prefix,
        workdir,
        disk_format=disk_format,
        network=network,
        actions=actions if action_via == "cmdline" else {},
        werror=werror,
        io_error_injection=io,
        accel=accel,
        firmware_dirs=firmware_dirs,
        log_dir=log_dir,
        share_rw=share_rw,
    ) as rig:
        try:
            if action_via == "qmp" and actions:
                rig.vm.cmd("set-action", actions)
            result = verify_frozen(rig, what, soak_s, control=control)
        except BaseException:
            rig.vm.mark_failed()
            raise
        if not result.ok and not control:
            rig.vm.mark_failed()
        return result


# -- the matrix ------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixRow:
    """One scenario of the matrix: a trigger on a disk format and a network,
    its action set on the command line or over QMP (``set-action``)."""

    trigger: str
    disk_format: str
    network: str
    action_via: str

    @property
    def name(self) -> str:
        return f"{self.trigger}-{self.disk_format}-{self.network}-{self.action_via}"


#: The proof's matrix, one row per trigger: both formats, both networks and
#: both ways of setting the action are covered across the triggers. `frozen
#: verify` runs it, and CI runs it too (test_freeze's ``test_matrix_*``,
#: test_negative_control's controls); a unit test keeps them in step.
MATRIX: tuple[MatrixRow, ...] = (
    MatrixRow("qmp", "raw", "user", "cmdline"),
    MatrixRow("panic", "qcow2", "user", "cmdline"),
    MatrixRow("watchdog", "raw", "tap", "cmdline"),
    MatrixRow("io-error", "qcow2", "tap", "cmdline"),
    MatrixRow("internal-error", "raw", "user", "qmp"),
)


MATRIX_TRIGGERS = tuple(row.trigger for row in MATRIX)


def matrix_row(trigger: str) -> MatrixRow:
    return next(r for r in MATRIX if r.trigger == trigger)


def default_accel() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def verify_all(
    prefix: Path,
    workdir: Path | None = None,
    *,
    triggers: Sequence[str] = MATRIX_TRIGGERS,
    soak_s: float = SOAK_S,
    accel: str | None = None,
    firmware_dirs: Sequence[Path] = (),
    progress: Callable[[str], None] | None = None,
    partial: bool | None = None,
    control: bool = False,
) -> list[FreezeResult]:
    """Freeze the probe guest through each row of :data:`MATRIX` (its
    ``triggers``) on the QEMU in ``prefix``.

    A scenario that breaks down (no FROZEN event, QEMU died ...) yields a
    failed result carrying the error, so the table always has every row.
    Without KVM or network namespaces the rows that need them FAIL, unless
    ``partial`` (default: $FROZEN_PARTIAL): then they run on TCG / user
    networking and say what was not proven. ``control`` runs the negative
    controls on a stock QEMU in ``prefix`` (rows that must FAIL).
    Work files are removed when everything passed, kept otherwise.
    """
    partial = config.partial_run() if partial is None else partial
    no_kvm = accel is None and default_accel() != "kvm"
    accel = accel or "kvm"
    if no_kvm and partial:
        accel = "tcg"
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="frozen-verify-"))
    no_tap = netns.netns_supported()
    results = []
    for what in triggers:
        row = matrix_row(what)
        fmt, net, via = row.disk_format, row.network, row.action_via
        gaps = []
        if no_kvm:
            gaps.append("KVM: /dev/kvm is missing or not accessible")
        if net == "tap" and no_tap is not None:
            gaps.append(f"tap networking: {no_tap}")
            if partial:
                net = "user"
        if progress:
            progress(f"verify: {what} ({fmt} disk, {net} networking, action via {via}, {accel})")
        if gaps and not partial:
            r = FreezeResult(
                what,
                accel,
                False,
                -1,
                -1,
                False,
                False,
                control=control,
                details=[f"error: cannot prove: {g} (--partial runs the rest)" for g in gaps],
            )
        else:
            try:
                r = freeze_scenario(
                    prefix,
                    base / what,
                    what,
                    disk_format=fmt,
                    network=net,
                    soak_s=soak_s,
                    accel=accel,
                    firmware_dirs=firmware_dirs,
                    action_via=via,
                    control=control,
                )
            except (RigError, VMError, OSError, TimeoutError, subprocess.SubprocessError) as e:
                r = FreezeResult(
                    what, accel, False, -1, -1, False, False, [f"error: {e}"], control=control
                )
            r.not_proven = gaps
        r.details.insert(0, f"disk={fmt} network={net} action={via} workdir={base / what}")
        results.append(r)
    if workdir is None and all(r.ok for r in results):
        shutil.rmtree(base, ignore_errors=True)
    return results


def keep_copy(src: Path, dst: Path) -> None:
    """Copy a file for the logs (used by tests on failure)."""
    with contextlib.suppress(OSError):
        shutil.copy2(src, dst)
