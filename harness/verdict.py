"""Verdicts: pure functions from observations to pass or fail.

Nothing here touches QEMU: the scenario (``harness.scenario``) measures,
these functions and :class:`FreezeResult` decide, and ``harness.report``
prints. Each is unit-tested on synthetic evidence, both sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from harness.attempts import Attempt

#: trigger -> FROZEN reason the series reports for it
REASONS = {
    "qmp": "host-qmp-freeze",
    "panic": "guest-panic",
    "watchdog": "watchdog",
    "io-error": "io-error",
    "internal-error": "internal-error",
}
TRIGGERS = tuple(REASONS)


def missing_records(records: Mapping[int, int], last: int, sectors: int) -> list[int]:
    """Completed records (those still resident in the ring) absent from disk.

    Record n lives in sector 1 + (n-1) % sectors, so the last ``sectors``
    completed records must all be there with their own counter.
    """
    first = max(1, last - sectors + 1)
    return [n for n in range(first, last + 1) if records.get(1 + (n - 1) % sectors) != n]


@dataclass(frozen=True)
class MemoryVerdict:
    """The marker and the last completed counter, found in guest RAM."""

    marker: bool
    last_counter: bool
    #: A marker the guest never had was found: the search itself is void.
    decoy_found: bool

    @property
    def kept(self) -> bool:
        return self.marker and self.last_counter and not self.decoy_found


def memory_verdict(
    found: Mapping[str, bool], decoy: bytes, lasts: Sequence[bytes], *, paged: bool
) -> MemoryVerdict:
    """Judge ``observe.memory_has``'s answers for the marker (first needle),
    the last counter's tags and a decoy.

    The marker must be in every dump and read back with ``xp`` (and, for an
    unpaged guest, ``memsave``); one of the last counters in each dump.
    """
    decoy_key = decoy.decode()
    decoy_found = any(v for k, v in found.items() if k.endswith(decoy_key))
    real = {k: v for k, v in found.items() if not k.endswith(decoy_key)}
    marker_ok = all(v for k, v in real.items() if "MARKER" in k) and real.get("xp", False)
    marker_ok = marker_ok and real.get("memsave", paged)
    last_ok = all(
        any(real.get(f"{src}:{n.decode().strip()}", False) for n in lasts)
        for src in ("pmemsave", "dump-guest-memory")
    )
    return MemoryVerdict(marker_ok and not decoy_found, last_ok, decoy_found)


@dataclass
class FreezeResult:
    trigger: str
    accelerator: str
    memory_kept: bool
    bytes_written_after_freeze: int
    packets_after_freeze: int
    lock_released: bool
    refusals_held: bool
    details: list[str] = field(default_factory=list)
    status: str = ""
    frozen_events: int = 0
    reason: str | None = None
    records_on_disk: bool = False
    quit_clean: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    #: How long the soak watched (from the end of the memory checks).
    soak_s: float = 0.0
    #: How many times the soak retried the cheap write paths.
    soak_rounds: int = 0
    #: Records the console printed after the freeze: the guest ran again.
    records_after_freeze: int = 0
    #: A negative control (stock QEMU paused): expected to FAIL.
    control: bool = False
    #: What a partial run could not prove here (no namespaces, no KVM ...).
    not_proven: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.status == "frozen"
            and self.frozen_events == 1
            and self.reason == REASONS.get(self.trigger)
            and self.memory_kept
            and self.records_on_disk
            and self.bytes_written_after_freeze == 0
            and self.packets_after_freeze == 0
            and self.records_after_freeze == 0
            and self.lock_released
            and self.refusals_held
            and self.quit_clean
        )


def verdict(r: FreezeResult) -> str:
    """PASS/FAIL; a negative control is right when red, and void when green."""
    if r.control:
        return "red (expected)" if not r.ok else "GREEN: the proof cannot fail"
    if r.ok and r.not_proven:
        return "PASS (partial)"
    return "PASS" if r.ok else "FAIL"


def verdict_ok(r: FreezeResult) -> bool:
    """Whether a row is as it must be: frozen rows pass, controls go red."""
    return not r.ok if r.control else r.ok
