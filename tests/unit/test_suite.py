"""`frozen test` stages: what was not run or not proven is never a pass."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from harness import suite

JUNIT = """<testsuite name="avocado" tests="3">
<testcase classname="Freeze" name="test_qmp"/>
<testcase classname="Freeze" name="test_tap"><skipped/></testcase>
<testcase classname="Release" name="test_loop"><skipped/></testcase>
</testsuite>"""
RESULTS = {
    "tests": [
        {"name": "test_freeze.py:Freeze.test_qmp", "status": "PASS", "fail_reason": None},
        {
            "name": "test_freeze.py:Freeze.test_tap",
            "status": "CANCEL",
            "fail_reason": "not proven (partial run): tap networking needs a network namespace",
        },
        {"name": "test_release.py:Release.test_loop", "status": "CANCEL", "fail_reason": "x"},
    ]
}


@pytest.fixture
def fake_avocado(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, list[str]]]:
    """avocado run, replaced by what it writes: the xunit file and results.json
    (the libvirt stream's job: all passed)."""
    calls: list[dict[str, list[str]]] = []

    def run(cmds: dict[str, list[str]], env: Any) -> dict[str, int]:
        calls.append(cmds)
        for name, cmd in cmds.items():
            junit = Path(cmd[cmd.index("--xunit") + 1])
            job = Path(cmd[cmd.index("--job-results-dir") + 1]) / "latest"
            job.mkdir(parents=True)
            if name == "qemu":
                junit.write_text(JUNIT)
                (job / "results.json").write_text(json.dumps(RESULTS))
            else:
                junit.write_text(
                    '<testsuite name="avocado" tests="1">'
                    '<testcase classname="Cluster" name="test_failover"/></testsuite>'
                )
                (job / "results.json").write_text(json.dumps({"tests": []}))
        return {name: 0 for name in cmds}

    monkeypatch.setattr(suite, "_run_streams", run)
    return calls


def test_cancelled_functional_tests_fail_a_full_run(tmp_path: Path, fake_avocado: None) -> None:
    s = suite.Suite(tmp_path / "r")
    suite.stage_functional(s, {})
    _, counts, _ = s.stages[-1]
    assert (counts.passed, counts.failed, counts.skipped) == (2, 2, 0)
    assert any("cancelled in a full run: not proven" in f for f in counts.failures)
    assert "NOT PROVEN" not in s.summary()


def test_partial_run_names_what_was_not_proven(tmp_path: Path, fake_avocado: None) -> None:
    s = suite.Suite(tmp_path / "r")
    suite.stage_functional(s, {"FROZEN_PARTIAL": "1"})
    _, counts, _ = s.stages[-1]
    assert (counts.passed, counts.failed, counts.skipped) == (2, 0, 2)
    text = s.summary()
    assert "NOT PROVEN (partial run" in text
    assert "test_freeze.py:Freeze.test_tap: not proven (partial run): tap networking" in text


def test_every_functional_file_is_in_exactly_one_stream(
    fake_avocado: list[dict[str, list[str]]], tmp_path: Path
) -> None:
    suite.stage_functional(suite.Suite(tmp_path / "r"), {})
    (cmds,) = fake_avocado
    ran = [arg for cmd in cmds.values() for arg in cmd if arg.endswith(".py")]
    files = sorted((Path(__file__).parents[1] / "functional").glob("test_*.py"))
    assert sorted(ran) == [str(f) for f in files]
    libvirt = {Path(a).name for a in cmds["libvirt"] if a.endswith(".py")}
    assert libvirt == set(suite.LIBVIRT_STREAM)


def test_a_stream_that_exits_non_zero_with_no_failure_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(suite, "_run_streams", lambda cmds, env: {n: 2 for n in cmds})
    s = suite.Suite(tmp_path / "r")
    suite.stage_functional(s, {})
    _, counts, _ = s.stages[-1]
    assert counts.failed == 2  # neither wrote results
    assert any("no results written" in f for f in counts.failures)


def test_streams_run_at_the_same_time(tmp_path: Path) -> None:
    """Both start before either ends: each waits for the other's file."""
    a, b = tmp_path / "a", tmp_path / "b"
    wait = "for i in $(seq 100); do [ -e {0} ] && exit 0; sleep 0.05; done; exit 1"
    codes = suite._run_streams(
        {
            "one": ["sh", "-c", f"touch {a}; " + wait.format(b)],
            "two": ["sh", "-c", f"touch {b}; " + wait.format(a)],
        },
        {},
    )
    assert codes == {"one": 0, "two": 0}


def test_not_run_tests_tolerates_a_missing_job(tmp_path: Path) -> None:
    assert suite.not_run_tests(tmp_path / "none.json") == []


def test_split_expected() -> None:
    listed = ["qemu:qtest+qtest-x86_64 / qtest-x86_64/frozen-test", "qemu:func / other"]
    expected = ("qtest-x86_64/frozen-test", "func-x86_64-frozen")
    found, missing = suite.split_expected(expected, listed)
    assert found == ["qtest-x86_64/frozen-test"] and missing == ["func-x86_64-frozen"]


def _install(tmp_path: Path) -> Any:
    return types.SimpleNamespace(build_dir=tmp_path / "b", prefix=tmp_path / "p", tree=None)


@pytest.fixture
def no_firmware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite.build, "layout_firmware", lambda *a: None)
    monkeypatch.setattr(suite.build, "bundle_datadir", lambda *a: None)


def test_vanished_in_tree_tests_fail_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_firmware: None
) -> None:
    monkeypatch.setattr(suite, "meson_test_names", lambda install: ["qemu:unit / test-foo"])
    s = suite.Suite(tmp_path / "r")
    suite.stage_qemu_in_tree(s, _install(tmp_path))
    stage, counts, _ = s.stages[-1]
    assert stage == "qemu-in-tree" and counts.failed == len(suite.QEMU_IN_TREE_TESTS)
    assert all("not in `meson test --list`" in f for f in counts.failures)


def test_failing_meson_list_fails_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_firmware: None
) -> None:
    def broken(install: Any) -> list[str]:
        raise suite.MesonListError("qemu-in-tree: meson test --list exited 1: no build.ninja")

    monkeypatch.setattr(suite, "meson_test_names", broken)
    s = suite.Suite(tmp_path / "r")
    suite.stage_qemu_in_tree(s, _install(tmp_path))
    _, counts, _ = s.stages[-1]
    assert counts.failed == 1 and "exited 1" in counts.failures[0]


def test_one_vanished_test_fails_beside_the_ones_that_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_firmware: None
) -> None:
    listed = ["qemu:qtest+qtest-x86_64 / qtest-x86_64/frozen-test"]
    monkeypatch.setattr(suite, "meson_test_names", lambda install: listed)
    monkeypatch.setattr(
        suite, "QEMU_IN_TREE_TESTS", ("qtest-x86_64/frozen-test", "func-x86_64-frozen")
    )
    ran: list[list[str]] = []

    def meson_test(
        s: suite.Suite,
        stage: str,
        install: Any,
        args: list[str],
        started: float,
        extra: suite.Counts | None = None,
    ) -> None:
        ran.append(args)
        counts = suite.Counts(passed=len(args))
        if extra is not None:
            counts.add(extra)
        s.record(stage, counts, started)

    monkeypatch.setattr(suite, "_meson_test", meson_test)
    s = suite.Suite(tmp_path / "r")
    suite.stage_qemu_in_tree(s, _install(tmp_path))
    _, counts, _ = s.stages[-1]
    assert ran == [["qtest-x86_64/frozen-test"]]
    assert (counts.passed, counts.failed) == (1, 1)


def test_progress_reports_to_a_stderr_without_isatty(monkeypatch: pytest.MonkeyPatch) -> None:
    """avocado replaces sys.stderr with a stream that has no isatty: a
    download's progress inside a functional test must still report."""
    from harness import progress

    class Stream:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> int:
            self.text += s
            return len(s)

        def flush(self) -> None:
            pass

    stream = Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    p = progress.Progress("download x", 10, unit=" B")
    p.update(10)
    assert "download x: 100%" in stream.text
