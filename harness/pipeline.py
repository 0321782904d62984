"""The packager's proof as one pipeline: fetch → apply → build → verify.

`frozen build`, `frozen verify`, `frozen all` and the suite's builds stage
call these; the command line only parses arguments. The verification is
the scenario matrix (``scenario.MATRIX``) on the frozen QEMU, then the same
rows as negative controls on stock QEMU, which must go red.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness import build, config, patches, scenario, sources
from harness.progress import say
from harness.report import format_table
from harness.verdict import FreezeResult, verdict, verdict_ok

#: Every build the proof needs: stock and frozen QEMU, frozen libvirt.
BUILDS = (("qemu", "stock"), ("qemu", "frozen"), ("libvirt", "frozen"))

Installs = dict[tuple[str, str], build.Install]


def fetch_all() -> dict[str, dict[str, Path]]:
    """Download and verify every pinned source: project -> role -> path."""
    return {p: sources.fetch(config.pin(p)) for p in config.PROJECTS}


def build_all(
    *,
    project: str | None = None,
    local: Mapping[str, Path | None] | None = None,
    force: bool = False,
    jobs: int | None = None,
) -> Installs:
    """Apply and build what the proof needs (of ``project`` only, if given)."""
    installs = {}
    for proj, variant in BUILDS:
        if project and proj != project:
            continue
        start = time.monotonic()
        tree = patches.prepare(proj, variant, local=(local or {}).get(proj), force=force)
        install = build.build(tree, jobs=jobs)
        installs[(proj, variant)] = install
        say(f"{proj} ({variant}) ready in {time.monotonic() - start:.1f} s: {install.prefix}")
    return installs


@dataclass
class Verification:
    """The rows of `frozen verify`: the matrix on frozen, then on stock."""

    results: list[FreezeResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(verdict_ok(r) for r in self.results)

    def text(self) -> str:
        """The table, then the details of every row that is not as it must be."""
        lines = [format_table(self.results)]
        for r in self.results:
            if not verdict_ok(r):
                lines.append(
                    f"\n{verdict(r)} {r.trigger}{' (stock control)' if r.control else ''}:"
                )
                lines += [f"  {d}" for d in r.details]
        return "\n".join(lines)


def verify(
    frozen: Path,
    stock: Path,
    *,
    partial: bool | None = None,
    progress: Callable[[str], None] | None = say,
) -> Verification:
    """Every matrix row on the frozen QEMU, then the same rows on stock QEMU
    paused, which must go red or the proof proves nothing."""
    partial = config.partial_run() if partial is None else partial
    results = scenario.verify_all(frozen, partial=partial, progress=progress)
    results += scenario.verify_all(
        stock, partial=partial, soak_s=scenario.CONTROL_SOAK_S, control=True, progress=progress
    )
    return Verification(results)


def prove(
    *,
    local: Mapping[str, Path | None] | None = None,
    force: bool = False,
    jobs: int | None = None,
    partial: bool | None = None,
) -> Verification:
    """The whole pipeline: fetch, apply, build everything, verify."""
    start = time.monotonic()
    fetch_all()
    installs = build_all(local=local, force=force, jobs=jobs)
    say(f"fetch + apply + build: {time.monotonic() - start:.1f} s")
    return verify(
        installs[("qemu", "frozen")].prefix, installs[("qemu", "stock")].prefix, partial=partial
    )
