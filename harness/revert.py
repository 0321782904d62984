"""The revert gate: each patch's in-tree tests fail with that patch reverted.

A test that passes with or without the change it is said to cover proves
nothing.  For every patch named in CASES the full series is checked out
in a scratch clone, that one patch is reverted on top (`git revert
--no-commit`), and the tests named for it are built and run: each must
fail.  The same tests first run once on the full series, where each must
pass (a skip is not a pass), or a failure without the patch would mean
nothing.

Patches are named by subject, so renumbering the series keeps the table.
A patch that cannot be reverted on top (later patches build on its lines)
is reported as a failure of this gate with the conflicting files: it
shows nothing, and saying so is the point.

Run it with `frozen check --project qemu --gate revert`; it is not part
of the default gates, since it builds once per patch.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness import build, config
from harness.gates import GateResult, configure_once, scratch_checkout, series_commits
from harness.patches import Tree
from harness.progress import say

#: per project: patch subject -> the in-tree tests that must fail without it.
#: A test is "qtest:<binary>:<path>", "iotest:<format>:<name>" or
#: "meson:<test name>" (libvirt's suite, or QEMU's meson-run tests).
_Q = "qtest:frozen-test:/x86_64/frozen/"
_QMP = "qtest:qmp-cmd-test:/x86_64/qmp/"

#: Left out: patches whose revert the rest of the series cannot build
#: without (the run state, the severing helpers, the freeze command
#: itself), which every frozen test exercises.
CASES: dict[str, dict[str, tuple[str, ...]]] = {
    "qemu": {
        "net/colo-compare: tear down only what complete() set up": (
            _QMP + "object-add-colo-compare-failure",
        ),
        "block/io: fail writes to inactive nodes instead of asserting": (
            "iotest:qcow2:qcow2-internal-snapshots",
        ),
        "dump: clean up before the status says the dump is over": (
            "qtest:dump-test:/x86_64/dump/detached/completed",
        ),
        "replay: do not set the error twice when replay-seek fails to load": (
            "meson:func-x86_64-replay_seek",
        ),
        "net/dump: do not close fd 0 when filter-dump was never set up": (
            _QMP + "object-add-filter-dump-failure",
        ),
        "cryptodev: make the cryptodev-backend base type abstract": (
            _QMP + "object-add-failure-modes",
        ),
        "blockdev: do not undo a bitmap enable that found no bitmap": (
            _QMP + "transaction-bitmap-enable-failure",
        ),
        "system/runstate: never leave the frozen state": (_Q + "refusals",),
        "block: refuse new block activity while the VM is frozen": (_Q + "refusals",),
        "migration: refuse migration and snapshots while the VM is frozen": (_Q + "refusals",),
        "net: refuse to reconnect a frozen VM to the network": (_Q + "refusals",),
        "system/qdev-monitor: refuse device_add while the VM is frozen": (_Q + "refusals",),
        "net/slirp: refuse port forwardings once the VM is frozen": (_Q + "refusals",),
        "net/colo-compare: stop relaying packets once the VM is frozen": (_Q + "colo-compare",),
        "system/runstate: add the freeze panic action": (
            _Q + "action/panic",
            _Q + "action/panic-set-action",
        ),
        "hw/watchdog: add the freeze watchdog action": (
            _Q + "action/watchdog",
            _Q + "action/watchdog-set-action",
        ),
        "block: add the freeze error action for drives and block jobs": (
            _Q + "action/werror",
            _Q + "action/job-io-error",
            _Q + "action/job-target-error",
        ),
        "blockjob: refuse the freeze error policy where there is no VM": (
            _Q + "qsd-refuses-freeze",
        ),
        "system/runstate: report the action a freeze trigger really took": (
            _Q + "action/panic-migrating",
            _Q + "action/watchdog-migrating",
            _Q + "action/werror-migrating",
            _Q + "action/job-migrating",
        ),
    },
    "libvirt": {},
}

#: one test run's limit: a hung test is a failure to show anything
TEST_TIMEOUT_S = 600

_FAIL_LINE = re.compile(r"^(Bail out!|ERROR[: ]|not ok |\*\*|FAIL|--- |\+\+\+ |Traceback)")


@dataclass(frozen=True)
class TestRun:
    """One run of one test: "pass", "fail" or "skip", and the line that says so."""

    test: str
    outcome: str
    line: str


def _targets(project: str, tests: list[str]) -> list[str]:
    """The ninja targets the tests need (libvirt: everything)."""
    if project != "qemu":
        return []
    # the iotests' check also wants qemu-nbd
    wanted = [
        "qemu-system-x86_64",
        "qemu-img",
        "qemu-io",
        "qemu-nbd",
        "storage-daemon/qemu-storage-daemon",
    ]
    for test in tests:
        kind, _, rest = test.partition(":")
        if kind == "qtest":
            wanted.append(f"tests/qtest/{rest.split(':', 1)[0]}")
    return sorted(set(wanted))


def _first_failure(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if _FAIL_LINE.match(ln):
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def run_test(build_dir: Path, test: str, env: dict[str, str]) -> TestRun:
    """Run one test id in a built tree's build dir."""
    kind, _, rest = test.partition(":")
    env = dict(env)
    if kind == "qtest":
        binary, _, path = rest.partition(":")
        env.update(
            QTEST_QEMU_BINARY=str(build_dir / "qemu-system-x86_64"),
            QTEST_QEMU_IMG=str(build_dir / "qemu-img"),
            QTEST_QEMU_STORAGE_DAEMON_BINARY=str(
                build_dir / "storage-daemon" / "qemu-storage-daemon"
            ),
        )
        cmd = [str(build_dir / "tests" / "qtest" / binary), *(["-p", path] if path else [])]
        cwd = build_dir
    elif kind == "iotest":
        fmt, _, name = rest.partition(":")
        cmd = ["./check", f"-{fmt}", name]
        cwd = build_dir / "tests" / "qemu-iotests"
    elif kind == "meson":
        cmd = ["meson", "test", "-C", str(build_dir), "--no-rebuild", "--print-errorlogs", rest]
        cwd = build_dir
    else:
        raise ValueError(f"unknown test kind in {test!r}")
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TEST_TIMEOUT_S,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return TestRun(test, "fail", f"timed out after {TEST_TIMEOUT_S} s")
    output = proc.stdout + proc.stderr
    skipped = (
        "# SKIP" in output  # TAP (qtest)
        or re.search(r"^Not run:", output, re.M) is not None  # iotests
        or re.search(r"\bOk:\s+0\b.*\bSkipped:\s+[1-9]", output, re.S) is not None  # meson
    )
    if proc.returncode != 0:
        return TestRun(test, "fail", _first_failure(output))
    if skipped:
        skip = next((ln for ln in output.splitlines() if "SKIP" in ln or "Not run" in ln), "")
        return TestRun(test, "skip", skip.strip()[:300])
    return TestRun(test, "pass", "")


def _build(tree: Tree, scratch: Path, tests: list[str], log: Path, deadline: float | None) -> None:
    env = build.build_env(scratch)
    configure_once(tree, scratch, build.project_options(tree.project), log, env)
    build.run_logged(
        ["ninja", "-C", str(scratch / "build"), *_targets(tree.project, tests)],
        log,
        env,
        f"revert build {log.stem}",
        deadline=deadline,
    )
    if tree.project == "qemu":
        bd = scratch / "build"
        # The option ROMs are made by QEMU's Makefile, not by ninja.
        build.run_logged(["make", "-C", str(bd / "pc-bios" / "optionrom")], log, env, "option ROMs")
        build.layout_firmware(bd, build.bundle_datadir(bd))


def _describe(runs: list[TestRun]) -> str:
    return "; ".join(f"{r.test}: {r.outcome}" + (f" ({r.line})" if r.line else "") for r in runs)


def run(tree: Tree, *, deadline: float | None = None) -> list[GateResult]:
    """The revert gate on a prepared work tree of the full series."""
    cases = CASES.get(tree.project, {})
    if not cases:
        return []
    commits = series_commits(tree)
    series = {
        subject: (commit, patch.name)
        for (commit, subject), patch in zip(commits, tree.patches, strict=True)
    }
    scratch = config.cache_root() / "trees" / f"{tree.project}-revert"
    head = commits[-1][0]  # the series' last patch is the tree's HEAD
    results: list[GateResult] = []
    missing = [s for s in cases if s not in series]
    for subject in missing:
        results.append(GateResult("revert", subject, False, "no patch with this subject"))
    all_tests = sorted({t for s, ts in cases.items() if s in series for t in ts})

    # The tests pass on the full series, or their failures below say nothing.
    scratch_checkout(tree, scratch, head)
    log = scratch / "build" / "revert-series.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    say(f"revert {tree.project}: building the full series")
    try:
        _build(tree, scratch, all_tests, log, deadline)
    except build.BuildError as exc:
        return [*results, GateResult("revert", "full series", False, str(exc))]
    env = build.build_env(scratch)
    base_runs = [run_test(scratch / "build", t, env) for t in all_tests]
    not_passing = {r.test for r in base_runs if r.outcome != "pass"}
    results.append(
        GateResult(
            "revert",
            "full series",
            not not_passing,
            _describe(base_runs) if not_passing else f"{len(base_runs)} tests pass",
        )
    )
    for subject, tests in cases.items():
        if subject not in series:
            continue
        commit, label = series[subject]
        if deadline is not None and time.monotonic() > deadline:
            results.append(
                GateResult("revert", label, True, "not run: the time budget ran out", skipped=True)
            )
            continue
        scratch_checkout(tree, scratch, head)
        proc = subprocess.run(
            ["git", "-C", str(scratch), "revert", "--no-commit", commit],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            conflicts = subprocess.run(
                ["git", "-C", str(scratch), "diff", "--name-only", "--diff-filter=U"],
                capture_output=True,
                text=True,
            ).stdout.split()
            subprocess.run(["git", "-C", str(scratch), "reset", "--quiet", "--hard"], check=False)
            results.append(
                GateResult(
                    "revert",
                    label,
                    False,
                    "cannot be reverted on top of the series (conflicts in "
                    f"{', '.join(conflicts) or proc.stderr.strip()[-200:]})",
                )
            )
            continue
        log = scratch / "build" / f"revert-{label.removesuffix('.patch')}.log"
        log.write_text("")
        say(f"revert {tree.project}: without {label}: building, then {len(tests)} test(s)")
        try:
            _build(tree, scratch, list(tests), log, deadline)
        except build.BuildStopped:
            results.append(
                GateResult("revert", label, True, "not run: the time budget ran out", skipped=True)
            )
            continue
        except build.BuildError as exc:
            results.append(
                GateResult(
                    "revert", label, False, f"the tree does not build without it: {exc}"[:600]
                )
            )
            continue
        runs = [run_test(scratch / "build", t, env) for t in tests]
        ok = all(r.outcome == "fail" for r in runs) and not (set(tests) & not_passing)
        results.append(GateResult("revert", label, ok, _describe(runs)))
    scratch_checkout(tree, scratch, head)
    return results
