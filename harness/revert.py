"""The revert gate: each patch's in-tree tests fail with that patch reverted.

A test that passes with or without the change it is said to cover proves
nothing.  For every patch named in CASES the tests named for it are built
and run in a scratch clone with the patch reverted (`git revert
--no-commit`): each must fail.  Where depends on the case:

* ``at="own"``: an independent fix that carries its own test.  At the fix
  itself the test must pass; then the fix's code is reverted and its test
  files kept, and the test must fail.  That is the negative control a
  stable maintainer takes the fix on, and it does not depend on what the
  later patches do to the same paths.
* ``at="tip"``: a patch whose tests come later in the series (the qtest).
  The tests run once on the full series, where each must pass (a skip is
  not a pass); then the patch is reverted on top.  Where later patches
  change its lines, they are reverted with it, newest first, and named in
  the result: the tests then show that the patch and what was built on it
  are covered.  A revert that still conflicts fails the gate with the
  conflicting files.

A patch that only adds a helper, which nothing calls before a later
patch, cannot be reverted alone (the tree would not build).  For those,
MUTATIONS undoes the helper's effect at the series' tip with one exact
edit (a flag never set, a loop that skips its work), and the tests named
for the edit must fail.  An edit whose text is not in the file exactly
once fails the gate: the table must follow the code.

Patches are named by subject, so renumbering the series keeps the table.

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
from harness.lifecycle import run_group
from harness.patches import Tree
from harness.progress import say

#: per project: patch subject -> the in-tree tests that must fail without it.
#: A test is "qtest:<binary>:<path>", "iotest:<format>:<name>" or
#: "meson:<test name>[:<unittest -k pattern>]" (libvirt's suite, or QEMU's
#: meson-run tests; the pattern picks tests of a functional test file).
_Q = "qtest:frozen-test:/x86_64/frozen/"
_QMP = "qtest:qmp-cmd-test:/x86_64/qmp/"


@dataclass(frozen=True)
class Case:
    """The tests that must fail without a patch, and where it is reverted."""

    tests: tuple[str, ...]
    #: "own": at the patch, its code reverted and its test files kept;
    #: "at": the same, with the series' test patches as at its tip;
    #: "tip": reverted on top of the whole series
    at: str = "tip"


def _own(*tests: str) -> Case:
    return Case(tests, "own")


def _at(*tests: str) -> Case:
    return Case(tests, "at")


def _tip(*tests: str) -> Case:
    return Case(tests, "tip")


#: Left out: the run state and the severing helpers, which nothing uses
#: before the freeze command (its case covers them, and MUTATIONS each
#: helper); the test and docs patches; and the tests that guard what must
#: not change (action/job-stop, action/werror-stop: a 'stop' policy still
#: stops; the KVM internal-error test with the default action), which
#: pass with or without any patch.
CASES: dict[str, dict[str, Case]] = {
    "qemu": {
        "net/colo-compare: tear down only what complete() set up": _own(
            _QMP + "object-add-colo-compare-failure",
        ),
        "block/io: fail writes to inactive nodes instead of asserting": _own(
            "iotest:qcow2:qcow2-internal-snapshots",
        ),
        "dump: clean up before the status says the dump is over": _own(
            "qtest:dump-test:/x86_64/dump/detached/completed",
        ),
        "replay: do not set the error twice when replay-seek fails to load": _own(
            "meson:func-x86_64-replay_seek",
        ),
        "net/dump: do not close fd 0 when filter-dump was never set up": _own(
            _QMP + "object-add-filter-dump-failure",
        ),
        "cryptodev: make the cryptodev-backend base type abstract": _own(
            _QMP + "object-add-failure-modes",
        ),
        "blockdev: do not undo a bitmap enable that found no bitmap": _own(
            _QMP + "transaction-bitmap-enable-failure",
        ),
        "system/runstate: never leave the frozen state": _tip(
            _Q + "refusals",
            _Q + "guest-requests",
        ),
        "block: refuse new block activity while the VM is frozen": _tip(_Q + "refusals"),
        "migration: refuse migration and snapshots while the VM is frozen": _tip(_Q + "refusals"),
        "net: report the errors of HMP announce_self": _tip(_Q + "refusals"),
        "net: refuse to reconnect a frozen VM to the network": _tip(_Q + "refusals"),
        "system/qdev-monitor: refuse device_add while the VM is frozen": _tip(_Q + "refusals"),
        "net/slirp: refuse port forwardings once the VM is frozen": _tip(_Q + "refusals"),
        "net/colo-compare: stop relaying packets once the VM is frozen": _tip(_Q + "colo-compare"),
        "system/runstate: add the freeze command and the FROZEN event": _at(
            _Q + "freeze/running",
            _Q + "freeze/prelaunch",
            _Q + "freeze/paused",
            _Q + "freeze/guest-panicked",
            _Q + "freeze/inmigrate",
            _Q + "freeze/migrating",
            _Q + "reads",
            _Q + "job-cancelled",
            _Q + "exports-closed",
            _Q + "unreleased",
            _Q + "image/raw",
            _Q + "image/qcow2",
            "meson:func-x86_64-frozen:FrozenTest.test_freeze_kvm",
        ),
        "system/runstate: add the freeze panic action": _at(
            _Q + "action/panic",
            _Q + "action/panic-set-action",
            _Q + "action/panic-migrating",
        ),
        "hw/watchdog: add the freeze watchdog action": _at(
            _Q + "action/watchdog",
            _Q + "action/watchdog-set-action",
            _Q + "action/watchdog-migrating",
        ),
        "system/runstate: add an internal-error action that can freeze": _at(
            _Q + "action/internal-error",
            "meson:func-x86_64-frozen:FrozenTest.test_internal_error_freeze_kvm",
        ),
        "block: add the freeze error action for drives and block jobs": _at(
            _Q + "action/werror",
            _Q + "action/job-io-error",
            _Q + "action/job-target-error",
            _Q + "action/werror-migrating",
            _Q + "action/job-migrating",
        ),
        "blockjob: refuse the freeze error policy where there is no VM": _tip(
            _Q + "qsd-refuses-freeze",
        ),
        "system/runstate: refuse freeze actions with devices QEMU cannot sever": _tip(
            _Q + "unseverable",
        ),
    },
    "libvirt": {},
}


@dataclass(frozen=True)
class Mutation:
    """One exact edit at the series' tip that undoes what a helper does."""

    #: what the edit does, for the report
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


#: per project: subject of a patch that adds helpers -> its mutations
MUTATIONS: dict[str, dict[str, tuple[Mutation, ...]]] = {
    "qemu": {
        "net: add net_sever_all() to cut off every network client": (
            Mutation(
                "net_sever_all() returns at once",
                "net/net.c",
                "    /* From here on, nothing is sent or delivered, whatever the link state */\n",
                "    return;\n"
                "    /* From here on, nothing is sent or delivered, whatever the link state */\n",
                (_Q + "packets", _Q + "colo-compare", _Q + "refusals"),
            ),
        ),
        "block: add bdrv_inactivate_all_nodes() that tries every node": (
            Mutation(
                "bdrv_inactivate_all_nodes() inactivates no node",
                "block.c",
                "        ret = bdrv_inactivate_recurse(bs, true);\n"
                "        if (ret < 0) {\n"
                "            trace_bdrv_inactivate_all_nodes_fail(",
                "        ret = 0;\n"
                "        if (ret < 0) {\n"
                "            trace_bdrv_inactivate_all_nodes_fail(",
                (_Q + "image/raw", _Q + "image/qcow2", _Q + "freeze/running", _Q + "action/werror"),
            ),
        ),
        "block: add bdrv_sever_all() to fail every write for good": (
            Mutation(
                "bdrv_sever_all() severs nothing",
                "block.c",
                "    qatomic_set(&bdrv_severed, true);\n",
                "    qatomic_set(&bdrv_severed, false);\n",
                (_Q + "refusals", _Q + "unreleased", _Q + "image/raw", _Q + "image/qcow2"),
            ),
        ),
        "block: add helpers that close the images of inactive nodes": (
            Mutation(
                "blk_remove_all_inactive_bs() removes no medium",
                "block/block-backend.c",
                "        if (inactive) {\n            blk_remove_bs(blk);\n",
                "        if (inactive && false) {\n            blk_remove_bs(blk);\n",
                (_Q + "image/raw", _Q + "image/qcow2", _Q + "refusals"),
            ),
            Mutation(
                "blockdev_close_inactive_bdrv_states() closes no node",
                "blockdev.c",
                "        if (inactive) {\n"
                "            QTAILQ_REMOVE(&monitor_bdrv_states, bs, monitor_list);\n",
                "        if (inactive && false) {\n"
                "            QTAILQ_REMOVE(&monitor_bdrv_states, bs, monitor_list);\n",
                (_Q + "image/raw", _Q + "image/qcow2", _Q + "job-cancelled"),
            ),
        ),
        "net: keep the network severed for good and close the backends": (
            Mutation(
                "no backend closed",
                "net/net.c",
                "            nc->info->type != NET_CLIENT_DRIVER_HUBPORT) {\n"
                "            qemu_cleanup_net_client(nc, false);\n",
                "            nc->info->type != NET_CLIENT_DRIVER_HUBPORT && false) {\n"
                "            qemu_cleanup_net_client(nc, false);\n",
                (_Q + "packets",),
            ),
            Mutation(
                "the network not kept severed",
                "net/net.c",
                "    net_severed = true;\n",
                "    net_severed = false;\n",
                (_Q + "refusals", _Q + "colo-compare"),
            ),
        ),
        "block: add bdrv_hold_image_locks() to release no lock until told": (
            Mutation(
                "image locks never held",
                "block.c",
                "    qatomic_set(&bdrv_locks_held, hold);\n",
                "    qatomic_set(&bdrv_locks_held, false);\n",
                (_Q + "lock-waiter",),
            ),
        ),
    },
    "libvirt": {},
}


def _mutate(scratch: Path, mutation: Mutation) -> str:
    """Make the edit in the scratch clone; an error message if it cannot."""
    path = scratch / mutation.path
    text = path.read_text() if path.exists() else ""
    count = text.count(mutation.old)
    if count != 1:
        return f"{mutation.path} has the text to edit {count} times, not once"
    path.write_text(text.replace(mutation.old, mutation.new))
    return ""


#: one test run's limit: a hung test is a failure to show anything
TEST_TIMEOUT_S = 600

_FAIL_LINE = re.compile(r"^(Bail out!|ERROR[: ]|not ok |\*\*|FAIL|--- |\+\+\+ |Traceback)")


@dataclass(frozen=True)
class TestRun:
    """One run of one test: "pass", "fail", "skip" or "none" (it ran no
    test: a test id that names nothing), and the line that says so."""

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


#: per test kind: what its output shows when at least one test ran
_RAN = {
    "qtest": r"^ok \d+ ",  # TAP
    "iotest": r"^Passed all [1-9]\d* iotests",
    "meson": r"^Ok:\s+[1-9]",
}


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
        name, _, only = rest.partition(":")
        cmd = ["meson", "test", "-C", str(build_dir), "--no-rebuild", "--print-errorlogs"]
        if only:
            # a functional test file's one test: unittest's -k pattern
            cmd.append(f"--test-args=-k {only}")
        cmd.append(name)
        cwd = build_dir
    else:
        raise ValueError(f"unknown test kind in {test!r}")
    # its own group: what the test starts (QEMU, meson's test sessions)
    # ends with it, on a timeout too
    proc = run_group(cmd, cwd=cwd, env=env, timeout=TEST_TIMEOUT_S)
    if proc.returncode is None:
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
    if not re.search(_RAN[kind], output, re.M):
        # GLib's -p, ./check and meson test all exit 0 for a name that
        # matches nothing: that must not read as a pass.
        return TestRun(test, "none", "no test ran")
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


def _git(scratch: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(scratch), *args], capture_output=True, text=True)


def _files(scratch: Path, commit: str) -> set[str]:
    out = _git(scratch, "diff-tree", "--no-commit-id", "--name-only", "-r", commit).stdout
    return set(out.split())


def _is_test_file(path: str) -> bool:
    return path.startswith("tests/")


def _is_test_patch(files: set[str]) -> bool:
    """A patch that adds tests only (its MAINTAINERS entry aside)."""
    return bool(files) and all(_is_test_file(f) or f == "MAINTAINERS" for f in files)


@dataclass(frozen=True)
class Reverted:
    """A revert made in the scratch clone, or why it could not be made."""

    ok: bool
    #: how: "git revert", or its hunks placed without context lines
    how: str = "git revert"
    conflicts: tuple[str, ...] = ()
    error: str = ""


def _revert_on_tip(scratch: Path, head: str, commit: str) -> Reverted:
    """Revert `commit` on `head`.

    Where a later patch added lines right next to the patch's (git revert
    then conflicts on mere adjacency), its hunks are reversed without
    context lines: each hunk's own lines must still match exactly.  Any
    other conflict is reported, not resolved.
    """
    _git(scratch, "checkout", "--quiet", "--force", head)
    proc = _git(scratch, "revert", "--no-commit", commit)
    if proc.returncode == 0:
        return Reverted(True)
    conflicts = tuple(_git(scratch, "diff", "--name-only", "--diff-filter=U").stdout.split())
    _git(scratch, "revert", "--abort")
    _git(scratch, "reset", "--quiet", "--hard", head)
    diff = _git(scratch, "show", "--format=", "--binary", commit).stdout
    applied = subprocess.run(
        ["git", "-C", str(scratch), "apply", "-R", "-C0", "--index"],
        input=diff,
        capture_output=True,
        text=True,
    )
    if applied.returncode == 0:
        return Reverted(True, "its hunks reversed without context")
    _git(scratch, "reset", "--quiet", "--hard", head)
    return Reverted(False, conflicts=conflicts, error=proc.stderr.strip()[-200:])


def _revert_own_code(scratch: Path, commit: str) -> Reverted:
    """At `commit` (and the test files put there), revert its code, keep its tests."""
    proc = _git(scratch, "revert", "--no-commit", commit)
    if proc.returncode != 0:
        conflicts = tuple(_git(scratch, "diff", "--name-only", "--diff-filter=U").stdout.split())
        return Reverted(False, conflicts=conflicts, error=proc.stderr.strip()[-200:])
    kept = sorted(f for f in _files(scratch, commit) if _is_test_file(f))
    if kept:
        _git(scratch, "reset", "--quiet", "HEAD", "--", *kept)
        _git(scratch, "checkout", "--quiet", commit, "--", *kept)
    return Reverted(True)


def _place(
    scratch: Path, commit: str, head: str, tests_from_tip: list[str], *, revert_it: bool
) -> Reverted:
    """`commit` checked out, its code reverted if asked, the tip's tests put in."""
    _git(scratch, "checkout", "--quiet", "--force", commit)
    _git(scratch, "reset", "--quiet", "--hard", commit)
    done = _revert_own_code(scratch, commit) if revert_it else Reverted(True)
    if done.ok and tests_from_tip:
        _git(scratch, "checkout", "--quiet", head, "--", *tests_from_tip)
    return done


def run(tree: Tree, *, deadline: float | None = None) -> list[GateResult]:
    """The revert gate on a prepared work tree of the full series."""
    cases = CASES.get(tree.project, {})
    mutations = MUTATIONS.get(tree.project, {})
    if not cases and not mutations:
        return []
    commits = series_commits(tree)
    labels = [patch.name for patch in tree.patches]
    index = {subject: i for i, (_commit, subject) in enumerate(commits)}
    scratch = config.cache_root() / "trees" / f"{tree.project}-revert"
    head = commits[-1][0]  # the series' last patch is the tree's HEAD
    results: list[GateResult] = []
    for subject in [*cases, *mutations]:
        if subject not in index:
            results.append(GateResult("revert", subject, False, "no patch with this subject"))
    env = build.build_env(scratch)

    def out_of_time(label: str) -> bool:
        if deadline is not None and time.monotonic() > deadline:
            results.append(
                GateResult("revert", label, True, "not run: the time budget ran out", skipped=True)
            )
            return True
        return False

    def build_and_run(label: str, tag: str, tests: tuple[str, ...]) -> list[TestRun] | None:
        log = scratch / "build" / f"revert-{tag}.log"
        log.parent.mkdir(exist_ok=True)
        log.write_text("")
        try:
            _build(tree, scratch, list(tests), log, deadline)
        except build.BuildStopped:
            results.append(
                GateResult("revert", label, True, "not run: the time budget ran out", skipped=True)
            )
            return None
        except build.BuildError as exc:
            results.append(
                GateResult("revert", label, False, f"{tag}: does not build: {exc}"[:600])
            )
            return None
        return [run_test(scratch / "build", t, env) for t in tests]

    def baseline() -> set[str] | None:
        """The tip cases' tests pass on the full series, or their failures
        without a patch say nothing: the tests that do not pass."""
        tip_tests = tuple(
            sorted(
                {t for s, c in cases.items() if s in index and c.at == "tip" for t in c.tests}
                | {t for s, ms in mutations.items() if s in index for m in ms for t in m.tests}
            )
        )
        scratch_checkout(tree, scratch, head)
        say(f"revert {tree.project}: building the full series")
        base_runs = build_and_run("full series", "series", tip_tests)
        if base_runs is None:
            return None
        failing = {r.test for r in base_runs if r.outcome != "pass"}
        detail = _describe(base_runs) if failing else f"{len(base_runs)} tests pass"
        results.append(GateResult("revert", "full series", not failing, detail))
        return failing

    # The fixes at their own patches first, near the base, then the series'
    # tip once: each switch between the two rebuilds most of the tree.
    ordered = sorted(cases.items(), key=lambda item: item[1].at == "tip")
    not_passing: set[str] | None = None
    for subject, case in ordered:
        if subject not in index:
            continue
        if case.at == "tip" and not_passing is None:
            not_passing = baseline()
            if not_passing is None:
                return results
        i = index[subject]
        commit, label = commits[i][0], labels[i]
        tag = label.removesuffix(".patch")
        if out_of_time(label):
            continue
        scratch_checkout(tree, scratch, head)
        if case.at in ("own", "at"):
            # "at": the series' test patches, as at its tip
            tests_from_tip = (
                sorted(
                    f
                    for c, _s in commits[i + 1 :]
                    if _is_test_patch(files := _files(scratch, c))
                    for f in files
                    if _is_test_file(f)
                )
                if case.at == "at"
                else []
            )
            # with the patch, at the patch: its tests pass
            _place(scratch, commit, head, tests_from_tip, revert_it=False)
            say(f"revert {tree.project}: at {label}: building, then {len(case.tests)} test(s)")
            with_it = build_and_run(label, f"{tag}-with", case.tests)
            if with_it is None:
                continue
            if any(r.outcome != "pass" for r in with_it):
                results.append(GateResult("revert", label, False, "with it: " + _describe(with_it)))
                continue
            reverted = _place(scratch, commit, head, tests_from_tip, revert_it=True)
            where = "its code reverted at the patch, its tests kept"
            if tests_from_tip:
                where += ", the series' tests from its tip"
        else:
            reverted = _revert_on_tip(scratch, head, commit)
            where = "reverted on the series"
            if reverted.how != "git revert":
                where += f" ({reverted.how})"
        if not reverted.ok:
            results.append(
                GateResult(
                    "revert",
                    label,
                    False,
                    f"cannot be reverted ({where}; conflicts in "
                    f"{', '.join(reverted.conflicts) or reverted.error})",
                )
            )
            continue
        say(f"revert {tree.project}: without {label}: building, then {len(case.tests)} test(s)")
        runs = build_and_run(label, f"{tag}-without", case.tests)
        if runs is None:
            continue
        ok = all(r.outcome == "fail" for r in runs) and not (
            set(case.tests) & (not_passing or set())
        )
        results.append(GateResult("revert", label, ok, f"{where}: {_describe(runs)}"))

    for subject, muts in mutations.items():
        if subject not in index:
            continue
        if not_passing is None:
            not_passing = baseline()
            if not_passing is None:
                return results
        label = labels[index[subject]]
        for mutation in muts:
            name = f"{label} ({mutation.what})"
            if out_of_time(name):
                continue
            scratch_checkout(tree, scratch, head)
            _git(scratch, "reset", "--quiet", "--hard", head)
            error = _mutate(scratch, mutation)
            if error:
                results.append(GateResult("revert", name, False, f"mutation: {error}"))
                continue
            say(f"revert {tree.project}: {name}: building, then {len(mutation.tests)} test(s)")
            tag = f"{label.removesuffix('.patch')}-mutated-{muts.index(mutation)}"
            runs = build_and_run(name, tag, mutation.tests)
            if runs is None:
                continue
            ok = all(r.outcome == "fail" for r in runs) and not (set(mutation.tests) & not_passing)
            results.append(GateResult("revert", name, ok, f"mutated at the tip: {_describe(runs)}"))
    scratch_checkout(tree, scratch, head)
    _git(scratch, "reset", "--quiet", "--hard", head)
    return results
