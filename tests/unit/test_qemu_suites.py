"""qemu_suites: the verdict on stock against frozen, the parsers, the budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import build, lifecycle, qemu_suites
from harness.qemu_suites import SideResult, SuiteTest

PASS, FAIL, SKIP = SideResult("pass"), SideResult("fail", "boom"), SideResult("skip")


@pytest.mark.parametrize(
    ("stock", "frozen", "verdict", "ok"),
    [
        (PASS, PASS, "pass", True),
        (SKIP, SKIP, "skipped", False),
        (FAIL, FAIL, "pre-existing", True),
        (FAIL, PASS, "fixed", True),
        (SKIP, PASS, "fixed", True),
        (PASS, FAIL, "regression", False),
        (PASS, SKIP, "regression", False),
        (SKIP, FAIL, "changed", False),
        (FAIL, SKIP, "changed", False),
        (qemu_suites.NOT_RUN, PASS, "not run", False),
        (PASS, qemu_suites.NOT_RUN, "not run", False),
        (qemu_suites.ABSENT, PASS, "new", True),
        (qemu_suites.ABSENT, FAIL, "regression", False),
        (qemu_suites.ABSENT, SKIP, "regression", False),
        (PASS, qemu_suites.ABSENT, "vanished", False),
        (FAIL, qemu_suites.ABSENT, "vanished", False),
    ],
)
def test_judge(stock: SideResult, frozen: SideResult, verdict: str, ok: bool) -> None:
    c = qemu_suites.compare(SuiteTest("iotests-raw", "001"), stock, frozen)
    assert c.verdict == verdict
    assert c.ok is ok
    # a skip or a test not run is never a pass
    assert c.skipped is (verdict in ("skipped", "not run"))


def test_parse_tap() -> None:
    text = """\
# QEMU -- "/b/qemu-system-x86_64"
1..4
# running raw 001
ok raw 001
# running raw 030
ok raw 030 # SKIP
not ok raw 041
ok raw inactive-node-nbd
"""
    assert qemu_suites.parse_tap(text) == {
        "001": "pass",
        "030": "skip",
        "041": "fail",
        "inactive-node-nbd": "pass",
    }


def test_parse_tap_ignores_comments_and_plan() -> None:
    assert qemu_suites.parse_tap("1..1\n# ok raw 001\n") == {}


@pytest.mark.parametrize(
    ("meson", "ours"),
    [
        ("OK", "pass"),
        ("EXPECTEDFAIL", "pass"),
        ("SKIP", "skip"),
        ("FAIL", "fail"),
        ("TIMEOUT", "fail"),
        ("ERROR", "fail"),
        ("UNEXPECTEDPASS", "fail"),
    ],
)
def test_meson_result(meson: str, ours: str) -> None:
    assert qemu_suites.meson_result(meson) == ours


def _install(tmp_path: Path, variant: str) -> build.Install:
    tree = tmp_path / variant
    (tree / "build").mkdir(parents=True)
    return build.Install("qemu", variant, f"key-{variant}", tmp_path / f"p-{variant}", tree)


def _fake(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tests: list[SuiteTest],
    results: dict[tuple[str, str], SideResult],
) -> list[tuple[str, str]]:
    ran: list[tuple[str, str]] = []

    def run_one(install: build.Install, test: SuiteTest, limit: float) -> SideResult:
        ran.append((install.variant, test.name))
        return results[(install.variant, test.name)]

    monkeypatch.setenv("FROZEN_CACHE", str(tmp_path / "cache"))
    every = frozenset(tests)
    monkeypatch.setattr(
        qemu_suites, "plan", lambda stock, frozen: qemu_suites.Plan(tests, every, every)
    )
    monkeypatch.setattr(qemu_suites, "run_one", run_one)
    monkeypatch.setattr(build, "layout_firmware", lambda *a: None)
    monkeypatch.setattr(build, "bundle_datadir", lambda *a: tmp_path)
    return ran


def test_run_caches_and_reruns_frozen_failures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tests = [SuiteTest("iotests-raw", n) for n in ("001", "002", "003")]
    results = {
        ("stock", "001"): PASS,
        ("frozen", "001"): PASS,
        ("stock", "002"): PASS,
        ("frozen", "002"): FAIL,
        ("stock", "003"): FAIL,
        ("frozen", "003"): FAIL,
    }
    ran = _fake(monkeypatch, tmp_path, tests, results)
    stock, frozen = _install(tmp_path, "stock"), _install(tmp_path, "frozen")
    first = qemu_suites.run(stock, frozen)
    assert [c.verdict for c in first] == ["pass", "regression", "pre-existing"]
    # each side once, and the regression's two reruns on both sides
    assert len(ran) == 6 + 2 * qemu_suites.RERUNS
    assert first[1].reruns == "frozen failed 3 of 3, stock 0 of 3"
    ran.clear()
    second = qemu_suites.run(stock, frozen)
    # only the regression runs again (and is rerun); a failure stock shares is kept
    assert sorted(ran) == sorted(
        [("frozen", "002")] + [("stock", "002"), ("frozen", "002")] * qemu_suites.RERUNS
    )
    assert [c.verdict for c in second] == ["pass", "regression", "pre-existing"]
    assert second[0].stock.cached and second[0].frozen.cached


def test_run_past_the_deadline_reports_not_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tests = [SuiteTest("qtest-x86_64", "qom-test")]
    ran = _fake(monkeypatch, tmp_path, tests, {})
    out = qemu_suites.run(_install(tmp_path, "stock"), _install(tmp_path, "frozen"), deadline=0.0)
    assert ran == []
    assert out[0].verdict == "not run" and out[0].skipped and not out[0].ok


def test_the_series_own_test_not_reached_is_not_run() -> None:
    """Not a regression: the budget, not the series, left it out."""
    c = qemu_suites.compare(
        SuiteTest("qtest-x86_64", "frozen-test"), qemu_suites.ABSENT, qemu_suites.NOT_RUN
    )
    assert c.verdict == "not run" and c.skipped


def test_a_test_the_budget_ends_is_not_run_and_not_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FROZEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "build_env", lambda tree: dict(os.environ))
    install = _install(tmp_path, "frozen")
    (install.build_dir / "meson-logs").mkdir()
    calls: list[float] = []

    def hung(
        cmd: list[str], *, cwd: Path | None, env: dict[str, str], timeout: float
    ) -> lifecycle.Finished:
        calls.append(timeout)
        return lifecycle.Finished(None, "", "")

    monkeypatch.setattr(qemu_suites, "run_group", hung)
    cut = qemu_suites.run_qtest(install, "qom-test", limit=2.0)
    assert calls == [2.0]
    assert cut.result == "not run" and "budget" in cut.detail
    own = qemu_suites.run_qtest(install, "qom-test")
    assert calls[-1] == qemu_suites.QTEST_TIMEOUT_S
    assert own.result == "fail" and "hung" in own.detail


def test_report_lists_what_is_not_a_plain_pass() -> None:
    results = [
        qemu_suites.compare(SuiteTest("iotests-qcow2", "001"), PASS, PASS),
        qemu_suites.compare(SuiteTest("iotests-qcow2", "002"), FAIL, FAIL),
        qemu_suites.compare(SuiteTest("qtest-x86_64", "qom-test"), PASS, FAIL),
    ]
    text = qemu_suites.report(results)
    assert "iotests-qcow2  1 pass, 1 pre-existing" in text
    assert "pre-existing iotests-qcow2/002: stock fail, frozen fail" in text
    assert "regression   qtest-x86_64/qom-test: stock pass, frozen fail" in text
    assert "iotests-qcow2/001" not in text


def test_plan_orders_and_tells_the_sides_apart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stock, frozen = _install(tmp_path, "stock"), _install(tmp_path, "frozen")
    qtests = {"stock": ["qom-test", "old-test"], "frozen": ["qom-test", "frozen-test"]}
    monkeypatch.setattr(qemu_suites, "close_iotests", lambda inst: ["inactive-node-nbd"])
    monkeypatch.setattr(qemu_suites, "list_qtests", lambda inst: qtests[inst.variant])
    monkeypatch.setattr(qemu_suites, "list_iotests", lambda inst, fmt, group: ["001"])
    p = qemu_suites.plan(stock, frozen)
    # the series' own tests first, so no budget leaves them out
    assert [t.label for t in p.tests] == [
        "qtest-x86_64/frozen-test",
        "iotests-raw/inactive-node-nbd",
        "iotests-qcow2/inactive-node-nbd",
        "qtest-x86_64/qom-test",
        "qtest-x86_64/old-test",
        "iotests-raw/001",
        "iotests-qcow2/001",
    ]
    assert SuiteTest("qtest-x86_64", "frozen-test") not in p.stock
    assert SuiteTest("qtest-x86_64", "old-test") not in p.frozen


def _regression() -> qemu_suites.Comparison:
    test = qemu_suites.SuiteTest("iotests-qcow2", "058")
    stock, frozen = qemu_suites.SideResult("pass"), qemu_suites.SideResult("fail", "diff")
    first = qemu_suites.compare(test, stock, frozen)
    assert first.verdict == "regression"
    return first


def _reruns(*pairs: tuple[str, str]):  # type: ignore[no-untyped-def]
    queue = list(pairs)

    def rerun() -> tuple[qemu_suites.SideResult, qemu_suites.SideResult]:
        stock, frozen = queue.pop(0)
        return qemu_suites.SideResult(stock), qemu_suites.SideResult(frozen)

    return rerun


@pytest.mark.parametrize(
    ("pairs", "verdict", "counts"),
    [
        # stock fails too once run again: the test races, not the series
        ((("fail", "pass"), ("pass", "pass")), "flaky", "frozen failed 1 of 3, stock 1 of 3"),
        # the series fails it again: a regression
        ((("pass", "fail"), ("pass", "pass")), "regression", "frozen failed 2 of 3, stock 0 of 3"),
        # one failure that no rerun repeats: reported, counted
        ((("pass", "pass"), ("pass", "pass")), "unconfirmed", "frozen failed 1 of 3, stock 0 of 3"),
    ],
)
def test_a_regression_is_run_again_before_it_counts(
    pairs: tuple[tuple[str, str], ...], verdict: str, counts: str
) -> None:
    result = qemu_suites.confirm(_regression(), _reruns(*pairs))
    assert (result.verdict, result.reruns) == (verdict, counts)
    assert result.ok == (verdict != "regression")
    assert result.frozen.detail == "diff"  # the first failure stays shown


def test_a_regression_without_time_to_rerun_stays_one() -> None:
    result = qemu_suites.confirm(_regression(), _reruns(), out_of_time=lambda: True)
    assert (result.verdict, result.reruns) == ("regression", "frozen failed 1 of 1, stock 0 of 1")
    assert not result.ok
