"""revert gate: a patch's tests must fail without it, and pass with it."""

from __future__ import annotations

import contextlib
import shutil
import time
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
    note = work / "tests" / "fix-note.txt"

    def fix() -> None:
        runstate.write_text(runstate.read_text() + "int fixed;\n")
        note.parent.mkdir(exist_ok=True)
        note.write_text("the fix's own test file\n")
        git(work, "add", str(note))

    def change_line() -> None:
        runstate.write_text(runstate.read_text().replace("int base;", "long base;"))
        note.write_text("a test that changes with it\n")

    net = work / "net.c"

    def net_file() -> None:
        net.write_text("int a;\n")
        git(work, "add", "net.c")

    commit("block: fix it", fix)
    commit("qapi: add a line", lambda: runstate.write_text("int base;\n" + runstate.read_text()))
    commit("qapi: change the line", change_line)
    (work / "other.c").write_text("int other;\n")
    git(work, "add", "other.c")
    commit("monitor: unrelated", lambda: None)
    commit("net: add the file", net_file)
    commit("net: add a line", lambda: net.write_text(net.read_text() + "int net;\n"))
    commit("net: add the next line", lambda: net.write_text(net.read_text() + "int next;\n"))
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


#: the stand-in qtest's one test
TEST = "qtest:frozen-test:/x86_64/x"


@pytest.fixture
def tree(tmp_path: Path, upstream: Path, monkeypatch: pytest.MonkeyPatch) -> patches.Tree:
    """The series' work tree, with builds that only put the qtest in place."""
    monkeypatch.setattr(revert, "_build", _fake_build)
    return _series(tmp_path, upstream)


def test_revert_gate_judges_each_patch(tree: patches.Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    test = TEST
    monkeypatch.setitem(
        revert.CASES,
        "qemu",
        {
            "block: fix it": revert.Case((test,), "own"),
            "monitor: unrelated": revert.Case((test,)),
            "qapi: add a line": revert.Case((test,)),
            "net: add a line": revert.Case((test,)),
            "net: not in the series": revert.Case((test,)),
        },
    )
    results = {r.patch: r for r in revert.run(tree)}
    assert results["full series"].ok, results["full series"].detail
    # At the fix, with its code reverted and its test file kept, it fails.
    fix = results["0001-block-fix-it.patch"]
    assert fix.ok, fix.detail
    assert "its code reverted at the patch, its tests kept" in fix.detail
    assert "fail (ERROR:frozen-test.c:1:test_x: assertion failed)" in fix.detail
    # Still passing without it: the test does not cover the patch.
    unrelated = results["0004-monitor-unrelated.patch"]
    assert not unrelated.ok and f"{test}: pass" in unrelated.detail
    # A later patch added lines next to it: its hunks are reversed alone.
    net = results["0006-net-add-a-line.patch"]
    assert "reverted on the series (its hunks reversed without context)" in net.detail
    # A later patch changed its lines: nothing can be shown, and that fails.
    conflict = results["0002-qapi-add-a-line.patch"]
    assert not conflict.ok and "conflicts in runstate.c" in conflict.detail
    assert not results["net: not in the series"].ok


def _run_qtest(tmp_path: Path, script: str, path: str) -> revert.TestRun:
    """Run a stand-in qtest binary "t" that is the given shell script."""
    build_dir = tmp_path / "build"
    qtest = build_dir / "tests" / "qtest" / "t"
    qtest.parent.mkdir(parents=True)
    qtest.write_text("#!/bin/sh\n" + script)
    qtest.chmod(0o755)
    return revert.run_test(build_dir, f"qtest:t:{path}", {"PATH": "/usr/bin:/bin"})


def test_a_skip_is_neither_a_pass_nor_a_failure(tmp_path: Path) -> None:
    run = _run_qtest(tmp_path, "echo 'ok 1 /x86_64/x # SKIP no colo-compare'\n", "/x86_64/x")
    assert run.outcome == "skip" and "no colo-compare" in run.line


def test_a_test_id_that_names_nothing_is_not_a_pass(tmp_path: Path) -> None:
    # GLib's -p with an unknown path runs nothing and exits 0
    run = _run_qtest(tmp_path, "echo '# Start of x86_64 tests'; echo '1..0'\n", "/x86_64/gone")
    assert (run.outcome, run.line) == ("none", "no test ran")


def test_a_functional_test_id_picks_one_test(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    meson = bin_dir / "meson"
    # a stand-in meson test that runs a test only when asked for it by -k
    meson.write_text(
        "#!/bin/sh\n"
        'case "$*" in *"--test-args=-k FrozenTest.test_freeze_kvm func-x86_64-frozen")\n'
        '    echo "Ok:                 1";;\n'
        '*) echo "Ok:                 0";;\n'
        "esac\n"
    )
    meson.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    one = revert.run_test(tmp_path, "meson:func-x86_64-frozen:FrozenTest.test_freeze_kvm", env)
    assert one.outcome == "pass"
    other = revert.run_test(tmp_path, "meson:func-x86_64-frozen:FrozenTest.gone", env)
    assert (other.outcome, other.line) == ("none", "no test ran")


def test_a_mutation_must_make_its_tests_fail(
    tree: patches.Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    test = TEST
    monkeypatch.setitem(revert.CASES, "qemu", {})

    def mutation(what: str, old: str, new: str) -> revert.Mutation:
        return revert.Mutation(what, "runstate.c", old, new, (test,))

    monkeypatch.setitem(
        revert.MUTATIONS,
        "qemu",
        {
            "block: fix it": (
                mutation("the fix undone", "int fixed;\n", "int broken;\n"),
                mutation("a harmless edit", "long base;\n", "long base; \n"),
                mutation("text that is gone", "int base;\n", "int x;\n"),
            ),
            "net: not in the series": (mutation("x", "a", "b"),),
        },
    )
    results = {r.patch: r for r in revert.run(tree)}
    assert results["full series"].ok, results["full series"].detail
    undone = results["0001-block-fix-it.patch (the fix undone)"]
    assert undone.ok and "mutated at the tip" in undone.detail, undone.detail
    harmless = results["0001-block-fix-it.patch (a harmless edit)"]
    assert not harmless.ok and f"{test}: pass" in harmless.detail
    gone = results["0001-block-fix-it.patch (text that is gone)"]
    assert not gone.ok and "runstate.c has the text to edit 0 times" in gone.detail
    assert not results["net: not in the series"].ok
    # the scratch clone is left at the tip, unedited
    scratch = revert.config.cache_root() / "trees" / "qemu-revert"
    assert "int fixed;" in (scratch / "runstate.c").read_text()


def test_a_hung_test_fails_and_is_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(revert, "TEST_TIMEOUT_S", 0.5)
    pidfile = tmp_path / "sleep.pid"
    run = _run_qtest(tmp_path, f"sleep 60 & echo $! > {pidfile}; wait\n", "/x86_64/x")
    assert (run.outcome, run.line) == ("fail", "timed out after 0.5 s")
    # the test's own child went with its group: gone or a zombie within a
    # few seconds (a SIGKILLed task shows R until it has run its exit)
    stat = Path(f"/proc/{pidfile.read_text().strip()}/stat")
    deadline = time.monotonic() + 5.0
    while stat.exists() and time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    else:
        assert not stat.exists(), f"{stat.parent.name} still runs"
