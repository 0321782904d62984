"""QEMU's own test suites on the patched tree, stock against frozen.

The series changes the block layer, the net layer, migration and the run
state machine; reviewers run `make check` and the iotests, packagers run
the package's tests.  This gate runs, in the stock and the frozen build
trees side by side (one process each, so the two cores are used):

* the iotests closest to the series (inactive nodes, NBD and exports,
  jobs, migration of block devices), for raw and qcow2;
* meson's whole ``qtest-x86_64`` suite, as the minimal build produces it;
* the iotests' ``quick`` group, for raw and qcow2.

Each test gets a verdict from both sides: pass in both, fail in both
(pre-existing, listed with the stock result beside it), fixed, or changed
(a regression, which fails the gate).  A skip in both is a skip, never a
pass.  Each side's result is cached by the install's key, so an unchanged
series costs nothing and a budgeted run goes on where the last one ended;
what the budget did not reach is reported as not run.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import build, config
from harness.lifecycle import run_group
from harness.progress import Progress, say

#: Bump when how a test is run or judged changes.
GATE_VERSION = "1"
QTEST_SUITE = "qtest-x86_64"
IOTEST_FORMATS = ("raw", "qcow2")
IOTEST_TIMEOUT_S = 300.0
#: meson's own per-test timeouts apply to qtests (some are 10 minutes);
#: this only bounds a hung meson.
QTEST_TIMEOUT_S = 900.0
DETAIL_TAIL = 1500

#: iotests that exercise what the series changes, run before the groups:
#: inactive nodes and migration of block devices, NBD and exports, jobs
#: (mirror, backup, commit, stream), internal snapshots, I/O errors.
CLOSE_IOTESTS = (
    "inactive-node-nbd",
    "qsd-migrate",
    "migrate-during-backup",
    "migration-permissions",
    "backing-file-invalidation",
    "export-incoming-iothread",
    "iothreads-nbd-export",
    "nbd-multiconn",
    "nbd-qemu-allocation",
    "nbd-reconnect-on-open",
    "qsd-jobs",
    "mirror-top-perms",
    "mirror-ready-cancel-error",
    "mirror-change-copy-mode",
    "mirror-sparse",
    "backup-discard-source",
    "copy-before-write",
    "image-fleecing",
    "commit-zero-blocks",
    "iothreads-commit-active",
    "stream-error-on-reset",
    "stream-under-throttle",
    "iothreads-stream",
    "qcow2-internal-snapshots",
    "file-io-error",
    "graph-changes-while-io",
    "030",
    "040",
    "041",
    "055",
    "056",
    "094",
    "118",
    "124",
    "141",
    "151",
    "181",
    "185",
    "223",
    "234",
    "240",
    "245",
    "307",
)

TAP_RE = re.compile(r"^(?P<not>not )?ok \S+ (?P<name>\S+)(?: # (?P<directive>SKIP|TODO)\b.*)?$")


@dataclass(frozen=True)
class SuiteTest:
    """One test of one suite: a qtest by its meson name, an iotest by name."""

    suite: str  # "qtest-x86_64", "iotests-raw" or "iotests-qcow2"
    name: str

    @property
    def label(self) -> str:
        return f"{self.suite}/{self.name}"


@dataclass(frozen=True)
class SideResult:
    """How a test ended on one side: pass, fail, skip or not run."""

    result: str
    detail: str = ""
    seconds: float = 0.0
    cached: bool = False


NOT_RUN = SideResult("not run")
#: the side's tree has no such test
ABSENT = SideResult("absent")


@dataclass(frozen=True)
class Comparison:
    """A test's results on both sides and the gate's verdict on them."""

    test: SuiteTest
    stock: SideResult
    frozen: SideResult
    #: pass, pre-existing, fixed, new, regression, flaky, unconfirmed,
    #: vanished, changed, skipped or not run
    verdict: str
    #: how a failure's reruns went, e.g. "frozen failed 1 of 3, stock 0 of 3"
    reruns: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict in ("pass", "pre-existing", "fixed", "new", "flaky", "unconfirmed")

    @property
    def skipped(self) -> bool:
        return self.verdict in ("skipped", "not run")


def judge(stock: SideResult, frozen: SideResult) -> str:
    """The verdict on one test from its stock and frozen results."""
    if frozen.result == "absent":
        return "vanished"  # the series removed or renamed a test
    if "not run" in (stock.result, frozen.result):
        return "not run"
    if stock.result == "absent":
        # the series' own tests: new, and they must pass
        return "new" if frozen.result == "pass" else "regression"
    pair = (stock.result, frozen.result)
    if pair == ("pass", "pass"):
        return "pass"
    if pair == ("skip", "skip"):
        return "skipped"
    if pair == ("fail", "fail"):
        return "pre-existing"
    if frozen.result == "pass":
        return "fixed"  # failed or was skipped on stock
    if stock.result == "pass":
        return "regression"  # fails or is skipped with the series
    return "changed"  # skip on one side, failure on the other


def compare(test: SuiteTest, stock: SideResult, frozen: SideResult) -> Comparison:
    return Comparison(test, stock, frozen, judge(stock, frozen))


#: how often a regression is run again, both sides side by side, before
#: it counts: some iotests race under load (058's qemu-nbd socket,
#: iothreads-create), on stock as much as with the series
RERUNS = 2


def confirm(
    first: Comparison,
    rerun: Callable[[], tuple[SideResult, SideResult]],
    *,
    out_of_time: Callable[[], bool] = lambda: False,
) -> Comparison:
    """A regression again, or what its reruns show instead.

    `rerun` runs both sides once more and returns (stock, frozen).  A test
    that stock also fails in a rerun is "flaky", not the series' doing.
    One that fails with the series once more is a regression.  One whose
    single failure no rerun repeats, stock passing every time, is
    "unconfirmed": reported with its counts, not failing the gate.
    """
    stock_fails, frozen_fails, runs = 0, 1, 1
    for _ in range(RERUNS):
        if out_of_time():
            break
        stock, frozen = rerun()
        if "not run" in (stock.result, frozen.result):
            break
        runs += 1
        stock_fails += stock.result != "pass"
        frozen_fails += frozen.result != "pass"
    counts = f"frozen failed {frozen_fails} of {runs}, stock {stock_fails} of {runs}"
    if stock_fails:
        verdict = "flaky"
    elif frozen_fails > 1 or runs == 1:
        verdict = "regression"
    else:
        verdict = "unconfirmed"
    return Comparison(first.test, first.stock, first.frozen, verdict, counts)


def parse_tap(text: str) -> dict[str, str]:
    """iotests' `check -tap` output -> {test name: pass/fail/skip}."""
    results = {}
    for line in text.splitlines():
        m = TAP_RE.match(line.strip())
        if not m:
            continue
        if m["not"]:
            results[m["name"]] = "fail"
        elif m["directive"] == "SKIP":
            results[m["name"]] = "skip"
        else:
            results[m["name"]] = "pass"
    return results


def meson_result(result: str) -> str:
    """A meson testlog result -> pass/fail/skip."""
    if result in ("OK", "EXPECTEDFAIL"):
        return "pass"
    if result == "SKIP":
        return "skip"
    return "fail"


# --------------------------------------------------------------------------
# running one test on one side


def _iotests_dirs(install: build.Install) -> tuple[Path, Path]:
    return install.tree / "tests" / "qemu-iotests", install.build_dir / "tests" / "qemu-iotests"


def _budget_stop(limit: float, seconds: float) -> SideResult:
    return SideResult("not run", f"stopped at the suite's budget after {limit:.0f} s", seconds)


def run_iotest(
    install: build.Install, fmt: str, name: str, limit: float = IOTEST_TIMEOUT_S
) -> SideResult:
    """One iotest in `install`'s build tree, the way meson's block suite runs it.

    `limit` caps its timeout at what is left of the budget; a test that the
    cap ends is not run, not failed.
    """
    src, bld = _iotests_dirs(install)
    cmd = [
        sys.executable,
        str(src / "check"),
        "-tap",
        f"-{fmt}",
        name,
        "--source-dir",
        str(src),
        "--build-dir",
        str(bld),
    ]
    env = build.build_env(install.tree)
    # Each side its own scratch dir: stock and frozen run at the same time.
    env["TEST_DIR"] = str(bld / "scratch-gate")
    env["SOCK_DIR"] = str(_sock_dir(install))
    start = time.monotonic()
    proc = run_group(cmd, cwd=bld, env=env, timeout=min(limit, IOTEST_TIMEOUT_S))
    seconds = time.monotonic() - start
    if proc.returncode is None and limit < IOTEST_TIMEOUT_S:
        return _budget_stop(limit, seconds)
    if proc.returncode is None:
        return SideResult(
            "fail",
            f"timed out after {IOTEST_TIMEOUT_S:.0f} s\n" + proc.stdout[-DETAIL_TAIL:],
            seconds,
        )
    result = parse_tap(proc.stdout).get(name)
    if result is None:
        return SideResult(
            "fail",
            f"check printed no result for {name} (rc {proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-DETAIL_TAIL:],
            seconds,
        )
    return SideResult(
        result, (proc.stdout + proc.stderr)[-DETAIL_TAIL:] if result == "fail" else "", seconds
    )


def _sock_dir(install: build.Install) -> Path:
    # Unix socket paths must stay short: not under the deep build dir.
    digest = hashlib.sha256(str(install.build_dir).encode()).hexdigest()[:8]
    path = Path("/tmp") / f"frozen-iotests-{digest}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def run_qtest(install: build.Install, name: str, limit: float = QTEST_TIMEOUT_S) -> SideResult:
    """One qtest through meson in `install`'s build dir (no rebuild); `limit` as for iotests."""
    logbase = "frozen-gate-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)
    log = install.build_dir / "meson-logs" / f"{logbase}.json"
    log.unlink(missing_ok=True)
    start = time.monotonic()
    proc = run_group(
        [
            "meson",
            "test",
            "-C",
            str(install.build_dir),
            "--no-rebuild",
            "--num-processes=1",
            "--logbase",
            logbase,
            f"{QTEST_SUITE}/{name}",
        ],
        cwd=None,
        env=build.build_env(install.tree),
        timeout=min(limit, QTEST_TIMEOUT_S),
    )
    seconds = time.monotonic() - start
    if proc.returncode is None and limit < QTEST_TIMEOUT_S:
        return _budget_stop(limit, seconds)
    if proc.returncode is None:
        return SideResult("fail", f"meson test hung for {QTEST_TIMEOUT_S:.0f} s", seconds)
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if len(entries) != 1:
        return SideResult(
            "fail",
            f"meson test ran {len(entries)} tests for {name} "
            f"(rc {proc.returncode}):\n" + (proc.stdout + proc.stderr)[-DETAIL_TAIL:],
            seconds,
        )
    result = meson_result(entries[0]["result"])
    detail = entries[0].get("stdout", "")[-DETAIL_TAIL:] if result == "fail" else ""
    return SideResult(result, detail, seconds)


def run_one(install: build.Install, test: SuiteTest, limit: float = float("inf")) -> SideResult:
    if test.suite == QTEST_SUITE:
        return run_qtest(install, test.name, limit)
    return run_iotest(install, test.suite.removeprefix("iotests-"), test.name, limit)


# --------------------------------------------------------------------------
# which tests


def list_qtests(install: build.Install) -> list[str]:
    """The qtest-x86_64 tests meson knows in this build, by short name."""
    proc = subprocess.run(
        [
            "meson",
            "test",
            "-C",
            str(install.build_dir),
            "--no-rebuild",
            "--list",
            "--suite",
            QTEST_SUITE,
        ],
        env=build.build_env(install.tree),
        capture_output=True,
        text=True,
    )
    names = [
        line.rsplit(f"{QTEST_SUITE}/", 1)[1].strip()
        for line in proc.stdout.splitlines()
        if f"{QTEST_SUITE}/" in line
    ]
    if proc.returncode != 0 or not names:
        raise build.BuildError(
            f"meson test --list found no {QTEST_SUITE} tests "
            f"(rc {proc.returncode}): {proc.stderr[-500:]}",
            install.build_dir / "meson-logs" / "meson-log.txt",
        )
    return names


def list_iotests(install: build.Install, fmt: str, group: str) -> list[str]:
    src, bld = _iotests_dirs(install)
    proc = subprocess.run(
        [
            sys.executable,
            str(src / "check"),
            "-n",
            f"-{fmt}",
            "-g",
            group,
            "--source-dir",
            str(src),
            "--build-dir",
            str(bld),
        ],
        cwd=bld,
        env=build.build_env(install.tree),
        capture_output=True,
        text=True,
    )
    names = proc.stdout.split()
    if proc.returncode != 0 or not names:
        raise build.BuildError(
            f"iotests check -n -{fmt} -g {group} listed nothing "
            f"(rc {proc.returncode}): {proc.stderr[-500:]}",
            bld / "check",
        )
    return names


def close_iotests(install: build.Install) -> list[str]:
    """CLOSE_IOTESTS that this tree has (a name that vanished is reported)."""
    src, _ = _iotests_dirs(install)
    return [n for n in CLOSE_IOTESTS if (src / n).exists() or (src / "tests" / n).exists()]


@dataclass(frozen=True)
class Plan:
    """The tests in gate order, and which of them each side's tree has."""

    tests: list[SuiteTest]
    stock: frozenset[SuiteTest]
    frozen: frozenset[SuiteTest]


def plan(stock: build.Install, frozen: build.Install) -> Plan:
    """Every test the gate runs, in order: close iotests, qtests, quick groups.

    The lists come from both trees: a test only the frozen tree has is new
    (the series' own), one only the stock tree has vanished (a regression).
    """
    tests: list[SuiteTest] = []
    has: dict[str, set[SuiteTest]] = {"stock": set(), "frozen": set()}

    def add(suite: str, side: str, names: list[str]) -> None:
        for name in names:
            t = SuiteTest(suite, name)
            if t not in has["stock"] and t not in has["frozen"]:
                tests.append(t)
            has[side].add(t)

    sides = (("stock", stock), ("frozen", frozen))
    for fmt in IOTEST_FORMATS:
        for side, inst in sides:
            add(f"iotests-{fmt}", side, close_iotests(inst))
    for side, inst in sides:
        add(QTEST_SUITE, side, list_qtests(inst))
    for fmt in IOTEST_FORMATS:
        for side, inst in sides:
            add(f"iotests-{fmt}", side, list_iotests(inst, fmt, "quick"))
    # The series' own tests first: a budget must never leave them out.
    own = [t for t in tests if t not in has["stock"]]
    tests = own + [t for t in tests if t in has["stock"]]
    return Plan(tests, frozenset(has["stock"]), frozenset(has["frozen"]))


# --------------------------------------------------------------------------
# the gate


def _stamp(install: build.Install, test: SuiteTest) -> Path:
    key = hashlib.sha256(
        "\0".join((install.key, test.suite, test.name, GATE_VERSION)).encode()
    ).hexdigest()
    path = config.cache_root() / "gates" / "qemu-suites"
    path.mkdir(parents=True, exist_ok=True)
    return path / f"{install.variant}-{key[:20]}.json"


def _cached(install: build.Install, test: SuiteTest) -> SideResult | None:
    stamp = _stamp(install, test)
    if not stamp.exists():
        return None
    data = json.loads(stamp.read_text())
    return SideResult(data["result"], data["detail"], data["seconds"], cached=True)


def _remember(install: build.Install, test: SuiteTest, result: SideResult) -> None:
    _stamp(install, test).write_text(
        json.dumps(
            {
                "test": test.label,
                "result": result.result,
                "detail": result.detail,
                "seconds": result.seconds,
            }
        )
    )


def run(
    stock: build.Install, frozen: build.Install, *, deadline: float | None = None
) -> list[Comparison]:
    """Every planned test on both sides, side by side, within `deadline`.

    A side's result is remembered unless it is a frozen-side failure that
    stock does not share: a regression is run again next time, never taken
    from the cache, while a pre-existing failure is not run again.
    """
    for install in (stock, frozen):
        build.layout_firmware(install.build_dir, build.bundle_datadir(install.build_dir))
    planned = plan(stock, frozen)
    tests = planned.tests
    say(
        f"qemu-suites: {len(tests)} tests, stock {stock.tree.name} against "
        f"frozen {frozen.tree.name}"
    )
    progress = Progress("qemu-suites", len(tests), unit=" tests", step=5)
    out: list[Comparison] = []

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    def limit() -> float:
        return float("inf") if deadline is None else max(1.0, deadline - time.monotonic())

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for done, test in enumerate(tests, 1):
            sides = {
                "stock": _cached(stock, test) if test in planned.stock else ABSENT,
                "frozen": _cached(frozen, test) if test in planned.frozen else ABSENT,
            }
            if any(r is None for r in sides.values()) and out_of_time():
                out.append(compare(test, sides["stock"] or NOT_RUN, sides["frozen"] or NOT_RUN))
                continue
            futures = {
                name: pool.submit(run_one, inst, test, limit())
                for name, inst in (("stock", stock), ("frozen", frozen))
                if sides[name] is None
            }
            for name, future in futures.items():
                sides[name] = future.result()
            stock_r, frozen_r = sides["stock"], sides["frozen"]
            assert stock_r is not None and frozen_r is not None
            if "stock" in futures and stock_r.result != "not run":
                _remember(stock, test, stock_r)
            verdict = compare(test, stock_r, frozen_r)
            if verdict.verdict == "regression" and stock_r.result == "pass" and futures:

                def rerun(test: SuiteTest = test) -> tuple[SideResult, SideResult]:
                    both = [pool.submit(run_one, i, test, limit()) for i in (stock, frozen)]
                    return both[0].result(), both[1].result()

                verdict = confirm(verdict, rerun, out_of_time=out_of_time)
            # A failure that stock shares is pre-existing and kept; one
            # that is the series' doing (or may be) always runs again.
            if (
                "frozen" in futures
                and frozen_r.result != "not run"
                and (frozen_r.result != "fail" or verdict.verdict == "pre-existing")
            ):
                _remember(frozen, test, frozen_r)
            out.append(verdict)
            progress.update(done)
    progress.finish()
    return out


@dataclass(frozen=True)
class Summary:
    """Counts per verdict and per suite, for the gate's report."""

    by_verdict: dict[str, int]
    by_suite: dict[str, dict[str, int]]
    seconds_run: float


def summarize(results: list[Comparison]) -> Summary:
    by_verdict: dict[str, int] = {}
    by_suite: dict[str, dict[str, int]] = {}
    seconds = 0.0
    for c in results:
        by_verdict[c.verdict] = by_verdict.get(c.verdict, 0) + 1
        suite = by_suite.setdefault(c.test.suite, {})
        suite[c.verdict] = suite.get(c.verdict, 0) + 1
        seconds += sum(r.seconds for r in (c.stock, c.frozen) if not r.cached)
    return Summary(by_verdict, by_suite, seconds)


def report(results: list[Comparison]) -> str:
    """The per-suite counts, then every test that is not a plain pass."""
    summary = summarize(results)
    lines = ["qemu-suites: stock against frozen"]
    for suite, counts in sorted(summary.by_suite.items()):
        lines.append(f"  {suite:14} " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
    for c in results:
        if c.verdict in ("pass", "skipped", "not run"):
            continue
        lines.append(
            f"  {c.verdict:12} {c.test.label}: stock {c.stock.result}, frozen {c.frozen.result}"
            + (f" ({c.reruns})" if c.reruns else "")
        )
    return "\n".join(lines)


def env_budget(default: float) -> float:
    return float(os.environ.get("FROZEN_SUITES_BUDGET", default))
