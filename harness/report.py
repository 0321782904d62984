"""The report: the verification table `frozen verify` and the tests print."""

from __future__ import annotations

from collections.abc import Sequence

from harness.verdict import FreezeResult, verdict


def format_table(results: Sequence[FreezeResult]) -> str:
    """The short verification table the CLI prints, and what was not proven."""
    head = (
        "trigger",
        "accel",
        "memory kept",
        "bytes after",
        "packets after",
        "ran again",
        "lock released",
        "refusals held",
        "verdict",
    )
    rows = [
        (
            r.trigger + (" (stock control)" if r.control else ""),
            r.accelerator,
            _yn(r.memory_kept),
            _count(r.bytes_written_after_freeze),
            _count(r.packets_after_freeze),
            str(r.records_after_freeze),
            _yn(r.lock_released),
            _yn(r.refusals_held),
            verdict(r),
        )
        for r in results
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for r in results:
        lines += [f"not proven ({r.trigger}): {g}" for g in r.not_proven]
    return "\n".join(lines)


def _yn(b: bool) -> str:
    return "yes" if b else "NO"


def _count(n: int) -> str:
    return "?" if n < 0 else str(n)
