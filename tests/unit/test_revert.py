"""revert gate: a patch's tests must fail without it, and pass with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import git

from harness import patches, revert

QTEST = """#!/bin/sh
# passes only while runstate.c has the fix
if grep -q fixed "$(dirname "$0")/../../../runstate.c"; then
    echo "ok 1 /x86_64/x"; exit 0
fi
echo "ERROR:frozen-test.c:1:test_x: assertion failed"; echo "not ok 1 /x86_64/x"; exit 1
"""


def _series(tmp_path: Path, upstream: Path) -> patches.Tree:
    (upstream / "qtest.sh").write_text(QTEST)
    git(upstream, "add", ".")
    git(upstream, "commit", "-q", "-m", "the test")
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(upstream), str(work))
    git(work, "config", "user.name", "Test Identity")
    git(work, "config", "user.email", "test@example.invalid")

    def commit(subject: str, edit) -> None:
        edit()
        git(work, "commit", "-q", "-a", "-s", "-m", f"{subject}\n\nWhy.")

    runstate = work / "runstate.c"
    commit("block: fix it", lambda: runstate.write_text(runstate.read_text() + "int fixed;\n"))
    commit("qapi: add a line", lambda: runstate.write_text("int base;\n" + runstate.read_text()))
    commit(
        "qapi: change the line",
        lambda: runstate.write_text(runstate.read_text().replace("int base;", "long base;")),
    )
    (work / "other.c").write_text("int other;\n")
    git(work, "add", "other.c")
    commit("monitor: unrelated", lambda: None)
    series_dir = tmp_path / "series"
    names = [
        Path(p).name
        for p in git(work, "format-patch", "-o", str(series_dir), "origin/master").split()
    ]
    (series_dir / "series").write_text("".join(n + "\n" for n in names))
    return patches.prepare("qemu", local=upstream, path=tmp_path / "tree", series_dir=series_dir)


def _fake_build(tree, scratch: Path, tests, log, deadline) -> None:
    """Stands in for ninja: the 'qtest binary' is the tree's own script."""
    qtest = scratch / "build" / "tests" / "qtest" / "frozen-test"
    qtest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(scratch / "qtest.sh", qtest)
    qtest.chmod(0o755)


def test_revert_gate_judges_each_patch(
    tmp_path: Path, upstream: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = _series(tmp_path, upstream)
    test = "qtest:frozen-test:/x86_64/x"
    monkeypatch.setattr(revert, "_build", _fake_build)
    monkeypatch.setitem(
        revert.CASES,
        "qemu",
        {
            "block: fix it": (test,),
            "monitor: unrelated": (test,),
            "qapi: add a line": (test,),
            "net: not in the series": (test,),
        },
    )
    results = {r.patch: r for r in revert.run(tree)}
    assert results["full series"].ok, results["full series"].detail
    fix = results["0001-block-fix-it.patch"]
    assert fix.ok and "fail (ERROR:frozen-test.c:1:test_x: assertion failed)" in fix.detail
    # Still passing without it: the test does not cover the patch.
    unrelated = results["0004-monitor-unrelated.patch"]
    assert not unrelated.ok and f"{test}: pass" in unrelated.detail
    # A later patch rewrote its line: nothing can be shown, and that fails.
    conflict = results["0002-qapi-add-a-line.patch"]
    assert not conflict.ok and "conflicts in runstate.c" in conflict.detail
    assert not results["net: not in the series"].ok


def test_a_skip_is_neither_a_pass_nor_a_failure(tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    qtest = build_dir / "tests" / "qtest" / "t"
    qtest.parent.mkdir(parents=True)
    qtest.write_text("#!/bin/sh\necho 'ok 1 /x86_64/x # SKIP no colo-compare'\n")
    qtest.chmod(0o755)
    run = revert.run_test(build_dir, "qtest:t:/x86_64/x", {"PATH": "/usr/bin:/bin"})
    assert run.outcome == "skip" and "no colo-compare" in run.line
