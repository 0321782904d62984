"""gates: commit message shape; suite: JUnit counting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import build, gates, suite

GOOD = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: Seed maintainers <maintainers@example.invalid>
Date: Wed, 25 Nov 2026 18:00:00 +0000
Subject: [PATCH 01/11] qapi: add the frozen run state

A frozen VM never runs again and never modifies external resources.

Signed-off-by: Seed maintainers <maintainers@example.invalid>
---
 qapi/run-state.json | 1 +
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "0001.patch"
    path.write_text(text)
    return path


def test_good_patch_passes(tmp_path: Path) -> None:
    result = gates.shape(_write(tmp_path, GOOD))
    assert result.ok, result.detail


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("qapi: add the frozen run state", "qapi: " + "x" * 80, "chars"),
        ("qapi: add the frozen run state", "add the frozen run state", "prefix"),
        ("Signed-off-by: Seed maintainers <maintainers@example.invalid>\n", "", "Signed-off-by"),
        ("A frozen VM never runs again and never modifies external resources.\n", "", "body"),
    ],
)
def test_shape_problems_are_named(tmp_path: Path, old: str, new: str, problem: str) -> None:
    result = gates.shape(_write(tmp_path, GOOD.replace(old, new)))
    assert not result.ok
    assert problem in result.detail


def test_folded_subject_is_measured_whole(tmp_path: Path) -> None:
    # format-patch folds long subjects over two header lines.
    short = GOOD.replace(
        "qapi: add the frozen run state", "qapi: add the frozen run state and\n its documentation"
    )
    assert gates.shape(_write(tmp_path, short)).ok
    long = GOOD.replace(
        "qapi: add the frozen run state",
        "qapi: add the frozen run state, its transitions and\n"
        " the FreezeReason enum for every trigger",
    )
    result = gates.shape(_write(tmp_path, long))
    assert not result.ok and "91 chars" in result.detail


def test_junit_counts_and_missing_file(tmp_path: Path) -> None:
    results = [
        gates.GateResult("g", "a", True),
        gates.GateResult("g", "b", False, "bad"),
        gates.GateResult("g", "c", True, "later", skipped=True),
    ]
    path = tmp_path / "r.xml"
    suite.write_junit(path, "gates", results)
    counts = suite.junit_counts(path)
    assert (counts.passed, counts.failed, counts.skipped) == (1, 1, 1)
    assert counts.failures == ["gates.g::b"]
    missing = suite.junit_counts(tmp_path / "none.xml")
    assert missing.failed == 1, "a stage that wrote no results counts as failed"


def test_bisect_past_its_deadline_skips_instead_of_passing(tmp_path: Path, upstream: Path) -> None:
    from conftest import git

    from harness import patches

    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(upstream), str(work))
    git(work, "config", "user.name", "Test Identity")
    git(work, "config", "user.email", "test@example.invalid")
    for i in range(3):
        (work / f"f{i}.c").write_text(f"int f{i};\n")
        git(work, "add", f"f{i}.c")
        git(work, "commit", "-q", "-s", "-m", f"monitor: add f{i}\n\nWhy.")
    series_dir = tmp_path / "series"
    names = [
        Path(p).name
        for p in git(work, "format-patch", "-o", str(series_dir), "origin/master").split()
    ]
    (series_dir / "series").write_text("".join(n + "\n" for n in names))
    tree = patches.prepare("qemu", local=upstream, path=tmp_path / "tree", series_dir=series_dir)
    results = gates.bisect(tree, deadline=0.0)
    assert [r.patch for r in results] == names
    # No regular build of this series: the last prefix is no exception.
    assert all(r.skipped and "budget" in r.detail for r in results)
    # The regular build's install of exactly this series: its stamp is reused,
    # and the result says so.
    prefix = build.install_prefix("qemu", tree.variant)
    prefix.mkdir(parents=True)
    key = build.cache_key(tree, build.project_options("qemu"))
    (prefix / build.STAMP).write_text(json.dumps({"key": key}))
    results = gates.bisect(tree, deadline=0.0)
    assert all(r.skipped for r in results[:-1])
    last = results[-1]
    assert last.ok and not last.skipped and "not rebuilt" in last.detail and key[:16] in last.detail
    # A stamp of another series is not reused.
    (prefix / build.STAMP).write_text(json.dumps({"key": "other"}))
    assert gates.bisect(tree, deadline=0.0)[-1].skipped


def _fake_meson(tmp_path: Path, results: list[str], rc: int) -> dict[str, str]:
    """A `meson` on PATH whose `meson test` writes a testlog with `results`."""
    import json
    import os

    bindir = tmp_path / "bin"
    bindir.mkdir()
    lines = "".join(
        json.dumps({"name": f"libvirt:t{i}", "result": r}) + "\n" for i, r in enumerate(results)
    )
    script = bindir / "meson"
    script.write_text(
        "#!/bin/sh\n"
        'mkdir -p "$3/meson-logs"\n'
        f"cat > \"$3/meson-logs/testlog.json\" <<'END'\n{lines}END\n"
        f"exit {rc}\n"
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def test_bisect_meson_test_counts_every_result(tmp_path: Path) -> None:
    env = _fake_meson(tmp_path, ["OK", "OK", "SKIP", "EXPECTEDFAIL"], 0)
    result = gates._meson_test(tmp_path / "build", Path("0001-x.patch"), env, 2)
    assert result.ok, result.detail
    assert "2 ok" in result.detail and "1 skip" in result.detail
    assert "1 expectedfail" in result.detail


def test_bisect_meson_test_names_the_failing_tests(tmp_path: Path) -> None:
    env = _fake_meson(tmp_path, ["OK", "FAIL", "TIMEOUT"], 1)
    result = gates._meson_test(tmp_path / "build", Path("0002-y.patch"), env, 2)
    assert not result.ok
    assert "libvirt:t1" in result.detail and "libvirt:t2" in result.detail
    assert "libvirt:t0" not in result.detail.split("failing:")[1]


def test_scratch_build_reconfigured_for_another_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scratch build dir configured by another venv (a removed clean
    clone's) regenerates with that venv's meson: configure it again."""
    runs: list[list[str]] = []

    def fake_run(cmd: list[str], *args: object, **kwargs: object) -> float:
        runs.append(cmd)
        (tmp_path / "build" / "build.ninja").write_text("")
        return 0.0

    monkeypatch.setattr(build, "run_logged", fake_run)
    monkeypatch.setattr(build, "configure_command", lambda *a: ["configure"])
    monkeypatch.setattr(build, "install_prefix", lambda *a: tmp_path / "prefix")
    tree = type("T", (), {"project": "qemu", "variant": "frozen"})()
    log = tmp_path / "log"
    gates.configure_once(tree, tmp_path, ["-Dx"], log, {})  # type: ignore[arg-type]
    gates.configure_once(tree, tmp_path, ["-Dx"], log, {})  # type: ignore[arg-type]
    assert len(runs) == 1
    monkeypatch.setattr(gates.sys, "prefix", "/gone/clone/.venv")
    gates.configure_once(tree, tmp_path, ["-Dx"], log, {})  # type: ignore[arg-type]
    assert len(runs) == 2
