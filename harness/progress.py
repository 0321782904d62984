"""Progress lines for long work (downloads, configure, builds).

Writes to stderr so that stdout stays for results (tables, paths).  On a
terminal a single line is rewritten; in CI logs one line per step is printed,
so the log stays short but shows that work goes on.
"""

from __future__ import annotations

import sys
import time


def say(message: str) -> None:
    print(f"frozen: {message}", file=sys.stderr, flush=True)


class Progress:
    """Reports `done` of `total` units, at most once per `step` percent."""

    def __init__(self, label: str, total: int | None, *, unit: str = "", step: int = 10):
        self.label = label
        self.total = total
        self.unit = unit
        self.step = step
        self._next = step
        # A test runner's stderr (avocado's StreamToQueue) may have no isatty.
        isatty = getattr(sys.stderr, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._start = time.monotonic()

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        if not self.total:
            return
        percent = min(100, done * 100 // self.total)
        if self._tty:
            print(
                f"\rfrozen: {self.label}: {percent:3d}% ({done}/{self.total}{self.unit})",
                end="",
                file=sys.stderr,
                flush=True,
            )
        elif percent >= self._next:
            say(f"{self.label}: {percent}% ({done}/{self.total}{self.unit})")
            self._next = (percent // self.step + 1) * self.step

    def finish(self, note: str = "") -> float:
        elapsed = time.monotonic() - self._start
        if self._tty:
            print(file=sys.stderr)
        say(f"{self.label}: done in {elapsed:.1f} s{(' ' + note) if note else ''}")
        return elapsed
