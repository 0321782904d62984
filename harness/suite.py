"""The project's test suite, stage by stage, as `frozen test` runs it.

Stages: lint, unit tests, builds (stock and frozen QEMU, frozen libvirt),
integration tests against the installs, the avocado functional tests on
KVM, QEMU's own in-tree tests of the series, and gates on the series (shape,
checkpatch, bisect build).  Every stage writes JUnit XML; the closing
line sums them, and the exit status is non-zero if anything failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from harness import build, config, gates, patches, pipeline, qemu_suites
from harness.progress import say

#: Time each project's bisect build may take within `frozen test`, so a
#: cold CI run stays under an hour; $FROZEN_BISECT_BUDGET sets both.  The
#: first QEMU prefix is mostly ccache hits of the stock build.
BISECT_BUDGET_S = {"qemu": 5 * 60.0, "libvirt": 3 * 60.0}
#: QEMU's own suites (qemu_suites) within this; what is not reached is
#: reported as not run (skipped).
SUITES_BUDGET_S = 4 * 60
#: QEMU's in-tree tests that the series adds (meson test names).
#: the series' own tests, and the ones its independent fixes add to QEMU's
QEMU_IN_TREE_TESTS = (
    "qtest-x86_64/frozen-test",
    "func-x86_64-frozen",
    "qtest-x86_64/qmp-cmd-test",
    "qtest-x86_64/dump-test",
    "func-x86_64-replay_seek",
)


@dataclass
class Options:
    """What `frozen test` was asked for (the command line parses it)."""

    partial: bool = False
    jobs: int | None = None
    force: bool = False
    #: project -> a local tarball or git tree to use as its base
    local: dict[str, Path | None] = field(default_factory=dict)


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        self.passed += other.passed
        self.failed += other.failed
        self.skipped += other.skipped
        self.failures += other.failures


def junit_counts(path: Path) -> Counts:
    """Counts from a JUnit XML file (pytest, avocado, meson and our own)."""
    counts = Counts()
    if not path.exists():
        counts.failed = 1
        counts.failures.append(f"{path.name}: no results written")
        return counts
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        if case.find("failure") is not None or case.find("error") is not None:
            counts.failed += 1
            counts.failures.append(name)
        elif case.find("skipped") is not None:
            counts.skipped += 1
        else:
            counts.passed += 1
    return counts


def write_junit(path: Path, suite: str, results: list[gates.GateResult]) -> None:
    root = ET.Element("testsuite", name=suite, tests=str(len(results)))
    for result in results:
        case = ET.SubElement(
            root, "testcase", classname=f"{suite}.{result.gate}", name=result.patch
        )
        if result.skipped:
            ET.SubElement(case, "skipped", message=result.detail)
        elif not result.ok:
            ET.SubElement(case, "failure", message=result.detail[:200]).text = result.detail
    ET.ElementTree(root).write(path, encoding="unicode")


def _venv_tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, env=env, cwd=cwd).returncode


class Suite:
    def __init__(self, results_dir: Path):
        self.dir = results_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total = Counts()
        self.stages: list[tuple[str, Counts, float]] = []
        #: What a partial run (--partial) did not prove, one line each.
        self.not_proven: list[str] = []

    def record(self, stage: str, counts: Counts, started: float) -> None:
        self.total.add(counts)
        self.stages.append((stage, counts, time.monotonic() - started))

    def junit(self, name: str) -> Path:
        path = self.dir / f"{name}.xml"
        path.unlink(missing_ok=True)
        return path

    def summary(self) -> str:
        lines = ["", "stage                 passed  failed  skipped   time"]
        for stage, c, secs in self.stages:
            lines.append(f"{stage:20s} {c.passed:7d} {c.failed:7d} {c.skipped:8d} {secs:6.0f} s")
        if self.total.failures:
            lines.append("failed:")
            lines += [f"  {f}" for f in self.total.failures]
        if self.not_proven:
            lines.append("NOT PROVEN (partial run; a full run fails on these):")
            lines += [f"  {f}" for f in self.not_proven]
        lines.append(f"results: {self.dir}")
        lines.append(
            f"{self.total.passed} passed, {self.total.failed} failed, {self.total.skipped} skipped"
        )
        return "\n".join(lines)


def lint_commands() -> list[list[str]]:
    """The lint stage's tools, each one result: ruff, its formatter, mypy."""
    root = config.repo_root()
    paths = [str(root / "harness"), str(root / "tests")]
    return [
        [_venv_tool("ruff"), "check", *paths],
        [_venv_tool("ruff"), "format", "--check", *paths],
        [_venv_tool("mypy"), "--config-file", str(root / "pyproject.toml")],
    ]


def stage_lint(suite: Suite) -> None:
    start = time.monotonic()
    counts = Counts()
    for cmd in lint_commands():
        rc = _run(cmd, cwd=config.repo_root())
        name = " ".join([Path(cmd[0]).name, *cmd[1:2]])
        if rc == 0:
            counts.passed += 1
        else:
            counts.failed += 1
            counts.failures.append(name)
    suite.record("lint", counts, start)


def stage_pytest(suite: Suite, name: str, path: Path, env: dict[str, str]) -> None:
    start = time.monotonic()
    junit = suite.junit(name)
    rc = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            str(path),
        ],
        env=env,
    )
    counts = junit_counts(junit)
    if rc not in (0, 1) and not counts.failed:  # usage error, collection crash ...
        counts.failed += 1
        counts.failures.append(f"pytest {path} exited {rc}")
    suite.record(name, counts, start)


def stage_builds(suite: Suite, opts: Options) -> pipeline.Installs:
    start = time.monotonic()
    results = []
    installs: dict[tuple[str, str], build.Install] = {}
    try:
        installs = pipeline.build_all(local=opts.local, force=opts.force, jobs=opts.jobs)
        for (project, variant), install in installs.items():
            results.append(
                gates.GateResult("build", f"{project}-{variant}", True, str(install.prefix))
            )
    except (build.BuildError, patches.PatchError, patches.SeriesError) as exc:
        results.append(gates.GateResult("build", "builds", False, str(exc)))
        print(f"frozen: error: {exc}", file=sys.stderr)
    junit = suite.junit("builds")
    write_junit(junit, "builds", results)
    suite.record("builds", junit_counts(junit), start)
    return installs


def stage_gates(suite: Suite, opts: Options) -> None:
    """The maintainer's gates on every series (`frozen check` runs the same).

    The bisect build of each project gets BISECT_BUDGET_S (override with
    $FROZEN_BISECT_BUDGET) so the suite fits CI's time; what it could not
    build is reported as skipped and is built by the next run.
    """
    start = time.monotonic()
    override = os.environ.get("FROZEN_BISECT_BUDGET")
    results: list[gates.GateResult] = []
    for project in config.PROJECTS:
        budget = float(override) if override else BISECT_BUDGET_S.get(project, 0.0)
        for gate in gates.GATES:
            if gate == "syntax-check":
                continue  # libvirt's meson test runs it, in stage libvirt-in-tree
            if gate == "qemu-suites":
                continue  # a stage of its own, with its own budget
            try:
                results += gates.run_gate(
                    project,
                    gate,
                    local=opts.local.get(project),
                    jobs=opts.jobs,
                    deadline=time.monotonic() + budget,
                )
            except (build.BuildError, patches.PatchError, patches.SeriesError) as exc:
                results.append(gates.GateResult(gate, project, False, str(exc)))
    for r in results:
        if not r.ok or r.skipped:
            verdict = "skipped" if r.skipped else "failed"
            print(f"frozen: gate {r.gate} {verdict} for {r.patch}: {r.detail}", file=sys.stderr)
    junit = suite.junit("gates")
    write_junit(junit, "gates", results)
    suite.record("gates", junit_counts(junit), start)


def stage_qemu_suites(suite: Suite, opts: Options) -> None:
    """QEMU's qtest-x86_64 suite and iotests, stock against frozen.

    Gets SUITES_BUDGET_S ($FROZEN_SUITES_BUDGET); results are cached per
    test and side, so each run goes on where the last one stopped.
    """
    start = time.monotonic()
    budget = qemu_suites.env_budget(SUITES_BUDGET_S)
    try:
        results = gates.run_gate(
            "qemu",
            "qemu-suites",
            local=opts.local.get("qemu"),
            jobs=opts.jobs,
            deadline=time.monotonic() + budget,
        )
    except (build.BuildError, patches.PatchError, patches.SeriesError) as exc:
        results = [gates.GateResult("qemu-suites", "qemu", False, str(exc))]
    not_run = [r for r in results if r.skipped and r.detail.startswith("not run")]
    if not_run:
        say(
            f"qemu-suites: {len(not_run)} tests not run within the {budget:.0f} s budget "
            "(reported as skipped, not passed)"
        )
    for r in results:
        if not r.ok:
            print(f"frozen: qemu-suites failed for {r.patch}: {r.detail}", file=sys.stderr)
    junit = suite.junit("qemu-suites")
    write_junit(junit, "qemu-suites", results)
    suite.record("qemu-suites", junit_counts(junit), start)


def _meson_test(
    suite: Suite,
    stage: str,
    install: build.Install | None,
    args: list[str],
    started: float,
    extra: Counts | None = None,
) -> None:
    """`meson test` in an install's build dir; its JUnit log is the result.

    ``extra`` is added to the stage's counts (e.g. expected tests not found).
    """
    if install is None:
        suite.record(stage, Counts(failed=1, failures=[f"{stage}: no build"]), started)
        return
    env = build.build_env(install.tree)
    log = install.build_dir / "meson-logs" / "testlog.junit.xml"
    log.unlink(missing_ok=True)
    rc = _run(
        [
            "meson",
            "test",
            "-C",
            str(install.build_dir),
            "--print-errorlogs",
            f"--num-processes={os.cpu_count() or 2}",
            *args,
        ],
        env=env,
    )
    junit = suite.junit(stage)
    if log.exists():
        shutil.copy(log, junit)
    counts = junit_counts(junit)
    if rc != 0 and not counts.failed:
        counts.failed += 1
        counts.failures.append(f"{stage}: meson test exited {rc}")
    if extra is not None:
        counts.add(extra)
    suite.record(stage, counts, started)


def stage_qemu_in_tree(suite: Suite, install: build.Install | None) -> None:
    """QEMU's own tests that the series adds, run by meson in the frozen tree."""
    start = time.monotonic()
    if install:
        # Tests run QEMU from the build dir, which loads blobs from its bundle.
        build.layout_firmware(install.build_dir, build.bundle_datadir(install.build_dir))
    if install is None:
        _meson_test(suite, "qemu-in-tree", None, [], start)
        return
    try:
        names = meson_test_names(install)
    except MesonListError as exc:
        suite.record("qemu-in-tree", Counts(failed=1, failures=[str(exc)]), start)
        return
    tests, missing = split_expected(QEMU_IN_TREE_TESTS, names)
    # A test the series adds that meson no longer lists (renamed, dropped from
    # meson.build) is a failure, never a 0/0/0 stage.
    lost = Counts(
        failed=len(missing),
        failures=[f"qemu-in-tree: {t}: not in `meson test --list`" for t in missing],
    )
    if not tests:
        suite.record("qemu-in-tree", lost, start)
        return
    _meson_test(suite, "qemu-in-tree", install, tests, start, extra=lost)


def stage_libvirt_in_tree(suite: Suite, install: build.Install | None) -> None:
    """libvirt's whole test suite (syntax-check included) on the frozen tree."""
    _meson_test(suite, "libvirt-in-tree", install, [], time.monotonic())


class MesonListError(Exception):
    """`meson test --list` failed: the tests cannot be found, so none ran."""


def meson_test_names(install: build.Install) -> list[str]:
    """Every test `meson test --list` names in an install's build dir."""
    proc = subprocess.run(
        ["meson", "test", "-C", str(install.build_dir), "--list"],
        capture_output=True,
        text=True,
        env=build.build_env(install.tree),
    )
    if proc.returncode != 0:
        raise MesonListError(
            f"qemu-in-tree: meson test --list exited {proc.returncode}: "
            f"{proc.stderr.strip()[-300:]}"
        )
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def split_expected(expected: tuple[str, ...], listed: list[str]) -> tuple[list[str], list[str]]:
    """(found, missing): meson lists "suite / name", we know the name's tail."""
    found = [t for t in expected if any(n.endswith(t) for n in listed)]
    return found, [t for t in expected if t not in found]


def not_run_tests(results_json: Path) -> list[tuple[str, str]]:
    """(test, reason) of every CANCEL/SKIP in an avocado job's results.json."""
    try:
        tests = json.loads(results_json.read_text())["tests"]
    except (OSError, ValueError, KeyError):
        return []
    return [
        (t.get("name", "?"), t.get("fail_reason") or "")
        for t in tests
        if t.get("status") in ("CANCEL", "SKIP")
    ]


#: The functional tests that talk to libvirt: they share the prefix's
#: virtqemud socket and the cluster's daemons, so they run one at a time in
#: a stream of their own.  Every other test file owns what it starts.
LIBVIRT_STREAM = (
    "test_libvirt_driver.py",
    "test_libvirt_frozen.py",
    "test_resource_agent.py",
    "test_cluster.py",
)


def functional_streams(tests_dir: Path) -> dict[str, list[Path]]:
    """The functional test files in two streams that run side by side.

    Each stream runs one test at a time; the two together keep both cores
    busy, since a probe guest mostly waits (soaks, events).  A new file goes
    to the QEMU stream unless it is listed in LIBVIRT_STREAM.
    """
    files = sorted(tests_dir.glob("test_*.py"))
    return {
        "qemu": [f for f in files if f.name not in LIBVIRT_STREAM],
        "libvirt": [f for f in files if f.name in LIBVIRT_STREAM],
    }


def _prefix_lines(stream: str, pipe: IO[str]) -> None:
    for line in pipe:
        sys.stdout.write(f"[{stream}] {line}")
        sys.stdout.flush()


def _run_streams(cmds: dict[str, list[str]], env: dict[str, str]) -> dict[str, int]:
    """Run the commands at the same time, each line of output prefixed with
    its stream's name; returns each one's exit status.  On an interrupt the
    streams still running are ended (avocado then ends its tests)."""
    procs: dict[str, subprocess.Popen[str]] = {}
    threads = []
    try:
        for name, cmd in cmds.items():
            say(f"[{name}] $ " + " ".join(cmd))
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            procs[name] = proc
            assert proc.stdout is not None
            t = threading.Thread(target=_prefix_lines, args=(name, proc.stdout), daemon=True)
            t.start()
            threads.append(t)
        return {name: proc.wait() for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for t in threads:
            t.join(5)


def stage_functional(suite: Suite, env: dict[str, str]) -> None:
    """The avocado tests on KVM, in functional_streams' two streams. A test
    that could not prove its part here (no /dev/kvm, no namespaces ...)
    cancels only in a partial run ($FROZEN_PARTIAL, `frozen test
    --partial`); a cancel in a full run fails the stage, whichever test it
    came from."""
    start = time.monotonic()
    streams = functional_streams(config.repo_root() / "tests" / "functional")
    cmds = {}
    for name, files in streams.items():
        if not files:
            continue
        cmds[name] = [
            _venv_tool("avocado"),
            "run",
            "--max-parallel-tasks=1",
            "--job-results-dir",
            str(suite.dir / f"avocado-{name}"),
            "--xunit",
            str(suite.junit(f"functional-{name}")),
            *(str(f) for f in files),
        ]
    codes = _run_streams(cmds, env)
    counts = Counts()
    for name in cmds:
        stream = junit_counts(suite.dir / f"functional-{name}.xml")
        if codes[name] != 0 and not stream.failed:
            stream.failed += 1
            stream.failures.append(f"avocado ({name} stream) exited {codes[name]}")
        not_run = not_run_tests(suite.dir / f"avocado-{name}" / "latest" / "results.json")
        if env.get(config.PARTIAL_ENV, "") not in ("", "0"):
            suite.not_proven += [f"{test}: {why}" for test, why in not_run]
        elif not_run:
            stream.skipped -= len(not_run)
            stream.failed += len(not_run)
            stream.failures += [f"{test}: cancelled in a full run: {why}" for test, why in not_run]
        counts.add(stream)
    suite.record("functional", counts, start)


def run(opts: Options) -> int:
    suite = Suite(config.cache_root() / "results" / time.strftime("%Y%m%d-%H%M%S"))
    env = dict(os.environ)
    if opts.partial:
        env[config.PARTIAL_ENV] = "1"
    stage_lint(suite)
    stage_pytest(suite, "unit", config.repo_root() / "tests" / "unit", env)
    installs = stage_builds(suite, opts)
    for (project, variant), install in installs.items():
        suffix = "" if variant == "frozen" else "_STOCK"
        env[f"FROZEN_{project.upper()}{suffix}"] = str(install.prefix)
    if installs:
        stage_pytest(suite, "integration", config.repo_root() / "tests" / "integration", env)
        # The KVM proof before the slow bisect gate: its verdict matters most.
        stage_functional(suite, env)
        stage_qemu_in_tree(suite, installs.get(("qemu", "frozen")))
        stage_libvirt_in_tree(suite, installs.get(("libvirt", "frozen")))
        stage_gates(suite, opts)
        stage_qemu_suites(suite, opts)
    print(suite.summary())
    return 0 if suite.total.failed == 0 and suite.total.passed > 0 else 1


def latest_test_summary() -> str:
    """Per-stage counts of the newest `frozen test` run here, for the cover letter."""
    root = config.cache_root() / "results"
    runs = (
        sorted(p for p in root.glob("*") if p.is_dir() and any(p.glob("*.xml")))
        if root.is_dir()
        else []
    )
    if not runs:
        return ""
    lines = [f"`frozen test` results of run {runs[-1].name} on the exporting machine:"]
    for xml in sorted(runs[-1].glob("*.xml")):
        counts = junit_counts(xml)
        lines.append(
            f"- {xml.stem}: {counts.passed} passed, {counts.failed} failed, "
            f"{counts.skipped} skipped"
        )
    return "\n".join(lines) + "\n"
