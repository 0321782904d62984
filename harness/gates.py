"""Gates a maintainer runs before a series leaves: each returns per-patch results.

* checkpatch: QEMU's own scripts/checkpatch.pl, 0 errors and 0 warnings;
* shape: subject <= 76 chars with a subsystem prefix, a body, Signed-off-by;
* bisect: every prefix of the series builds (incremental, ccache); for
  libvirt, whose contribution rules ask it of every patch, each prefix
  also passes its whole `meson test` (syntax-check included);
* debian-apply: the series applies with fuzz 0 after Debian's own series;
* syntax-check: libvirt's own syntax checks, on what the series touches;
* qemu-suites: QEMU's qtest-x86_64 suite and block iotests (raw, qcow2),
  stock against frozen, zero regressions (harness/qemu_suites.py).

A bisect result is cached by content (base, series prefix, options): an
unchanged series is not rebuilt, a changed one always is.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import build, config, distro, patches, qemu_suites, sources
from harness.patches import Tree, series_digest
from harness.progress import say

SUBJECT_MAX = 76
SUBJECT_RE = re.compile(r"^\[PATCH[^\]]*\]\s*(?P<subject>.*)$", re.S)
PREFIX_RE = re.compile(r"^[A-Za-z0-9_./+-]+(?:, ?[A-Za-z0-9_./+-]+)*: \S")


@dataclass(frozen=True)
class GateResult:
    gate: str
    patch: str
    ok: bool
    detail: str = ""
    skipped: bool = False


def _subject(message: email.message.Message) -> str:
    raw = " ".join(str(message.get("Subject", "")).split())
    match = SUBJECT_RE.match(raw)
    return match.group("subject").strip() if match else raw


def shape(patch: Path) -> GateResult:
    """Commit message shape as QEMU's and libvirt's submission docs ask."""
    message = email.message_from_bytes(patch.read_bytes(), policy=email.policy.compat32)
    subject = _subject(message)
    payload = message.get_payload(decode=True) or b""
    assert isinstance(payload, bytes)  # decode=True on a non-multipart message
    body = payload.decode(errors="replace").split("\n---\n", 1)[0]
    problems = []
    if len(subject) > SUBJECT_MAX:
        problems.append(f"subject is {len(subject)} chars (> {SUBJECT_MAX})")
    if not PREFIX_RE.match(subject):
        problems.append(f"subject {subject!r} lacks a 'subsystem: ' prefix")
    text = [ln for ln in body.splitlines() if ln.strip() and not ln.startswith("Signed-off-by:")]
    if not text:
        problems.append("no commit message body")
    if not re.search(r"^Signed-off-by: .+ <[^>]+>$", body, re.M):
        problems.append("no Signed-off-by line")
    return GateResult("shape", patch.name, not problems, "; ".join(problems))


def checkpatch(tree: Path, patch: Path) -> GateResult:
    """QEMU's scripts/checkpatch.pl on one patch file: 0 errors, 0 warnings."""
    script = tree / "scripts" / "checkpatch.pl"
    proc = subprocess.run(
        ["perl", str(script), "--no-color", str(patch)], cwd=tree, capture_output=True, text=True
    )
    out = proc.stdout + proc.stderr
    total = re.search(r"total: (\d+) errors, (\d+) warnings", out)
    if not total:
        return GateResult("checkpatch", patch.name, False, out.strip()[-1500:])
    errors, warnings = int(total.group(1)), int(total.group(2))
    ok = errors == 0 and warnings == 0 and proc.returncode == 0
    findings = "\n".join(ln for ln in out.splitlines() if ln.startswith(("ERROR", "WARNING")))
    return GateResult(
        "checkpatch",
        patch.name,
        ok,
        f"{errors} errors, {warnings} warnings" + (f"\n{findings}" if findings else ""),
    )


#: what a bisect step proves, per project: part of the cached result's key
BISECT_CHECKS = {"qemu": "build", "libvirt": "build+meson-test"}


def _bisect_stamp_dir() -> Path:
    path = config.cache_root() / "gates"
    path.mkdir(parents=True, exist_ok=True)
    return path


def series_commits(tree: Tree) -> list[tuple[str, str]]:
    """(commit, subject) of each patch of the series, in order, one per file."""
    lines = subprocess.run(
        ["git", "-C", str(tree.path), "log", "--reverse", "--format=%H%x00%s", "fixups..HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    if len(lines) != len(tree.patches):
        raise build.BuildError(
            f"{tree.path}: {len(lines)} commits for {len(tree.patches)} patches",
            tree.path / "build.log",
        )
    return [(commit, subject) for commit, subject in (ln.split("\0", 1) for ln in lines)]


def bisect(
    tree: Tree, *, jobs: int | None = None, deadline: float | None = None
) -> list[GateResult]:
    """Build every prefix of the series in one incremental build dir.

    Prefixes are built in a separate work tree whose build dir shares
    ccache with the others. The last prefix, the full series, is built and
    recorded like the others, unless the regular build's install of exactly
    this series is there and proves the same (QEMU: a build); the result
    then says it reused that install's stamp.
    With a `deadline` (time.monotonic()), prefixes not started by then, and
    the one whose build it stops, are reported as skipped, never as passed;
    built ones stay cached, so the next run goes on from there.
    """
    results = []
    commits = [commit for commit, _ in series_commits(tree)]
    options = build.project_options(tree.project)
    bisect_tree = config.cache_root() / "trees" / f"{tree.project}-bisect"
    for index, (commit, patch) in enumerate(zip(commits, tree.patches, strict=True), 1):
        if index == len(commits) and (reused := _full_build_result(tree, patch, options)):
            results.append(reused)
            continue
        key = hashlib.sha256(
            (
                series_digest(list(tree.patches[:index]))
                + tree.base.ident
                + "\0".join(options)
                + build.RECIPE_VERSION
                + BISECT_CHECKS[tree.project]
            ).encode()
        ).hexdigest()
        stamp = _bisect_stamp_dir() / f"{tree.project}-{key[:16]}.json"
        cached = json.loads(stamp.read_text()) if stamp.exists() else None
        if cached and cached.get("key") == key:
            results.append(
                GateResult(
                    "bisect", patch.name, cached["ok"], cached["detail"] + " (cached result)"
                )
            )
            continue
        if deadline is not None and time.monotonic() > deadline:
            results.append(
                GateResult(
                    "bisect",
                    patch.name,
                    True,
                    skipped=True,
                    detail="not built: the bisect time budget ran out; "
                    f"`frozen check --project {tree.project} --gate bisect` builds it",
                )
            )
            continue
        say(f"bisect {tree.project}: building patch {index}/{len(commits)} {patch.name}")
        result = _build_commit(tree, bisect_tree, commit, patch, options, jobs, deadline)
        if result.ok:  # a failure is rebuilt next time, never remembered
            stamp.write_text(json.dumps({"key": key, "ok": True, "detail": result.detail}))
        results.append(result)
    return results


def _full_build_result(tree: Tree, patch: Path, options: list[str]) -> GateResult | None:
    """The last prefix's result from the regular build, when that proves it.

    libvirt's step also runs `meson test`, which the regular build does not:
    its last prefix is always built and tested here.
    """
    if BISECT_CHECKS[tree.project] != "build":
        return None
    prefix = build.install_prefix(tree.project, tree.variant)
    key = build.cache_key(tree, options)
    stamp = build.read_stamp(prefix)
    if not stamp or stamp.get("key") != key:
        return None
    return GateResult(
        "bisect",
        patch.name,
        True,
        f"full series: not rebuilt, the regular build's install {prefix} "
        f"(stamp key {key[:16]}) is this prefix built",
    )


def scratch_checkout(tree: Tree, scratch: Path, commit: str) -> None:
    """Check `commit` of `tree` out in the clone `scratch` (made once).

    Its build dir stays across checkouts, so each build is incremental.
    """
    if not (scratch / ".git").exists():
        subprocess.run(
            ["git", "clone", "--quiet", "--shared", str(tree.path), str(scratch)], check=True
        )
    sources.write_excludes(scratch, tree.base)
    for path in tree.base.untracked:  # not in git, so not in the clone
        if not (scratch / path).exists():
            shutil.copytree(tree.path / path, scratch / path, symlinks=True)
    subprocess.run(
        ["git", "-C", str(scratch), "fetch", "--quiet", str(tree.path), commit], check=True
    )
    subprocess.run(
        ["git", "-C", str(scratch), "checkout", "--quiet", "--force", commit], check=True
    )


def configure_once(
    tree: Tree, scratch: Path, options: list[str], log: Path, env: dict[str, str]
) -> None:
    """Configure `scratch`/build unless it is configured with `options`."""
    build_dir = scratch / "build"
    build_dir.mkdir(exist_ok=True)
    # The results are keyed by the options: configure again when they change.
    # And when another venv runs the gate: the build dir's regeneration
    # runs the meson of the venv that configured it, which may be gone
    # (a clean clone's, removed with it).
    configured = build_dir / "frozen-options.txt"
    wanted = "\n".join([*options, build.RECIPE_VERSION, sys.prefix])
    if (
        (build_dir / "build.ninja").exists()
        and configured.exists()
        and configured.read_text() == wanted
    ):
        return
    configured.unlink(missing_ok=True)
    build.run_logged(
        # libvirt: the install's prefix (never installed to), since it is
        # compiled in and the same one lets ccache reuse the full build's
        # objects; QEMU always gets QEMU_PREFIX.
        build.configure_command(
            tree.project, scratch, build_dir, build.install_prefix(tree.project, tree.variant)
        ),
        log,
        env,
        f"configure {scratch.name}",
        cwd=build_dir,
    )
    configured.write_text(wanted)


def _build_commit(
    tree: Tree,
    bisect_tree: Path,
    commit: str,
    patch: Path,
    options: list[str],
    jobs: int | None,
    deadline: float | None = None,
) -> GateResult:
    """Build (libvirt: and test) one prefix; a build the deadline stops is
    skipped, not failed, and goes on incrementally next time."""
    scratch_checkout(tree, bisect_tree, commit)
    build_dir = bisect_tree / "build"
    build_dir.mkdir(exist_ok=True)
    log = build_dir / f"bisect-{patch.stem}.log"
    log.write_text("")
    env = build.build_env(bisect_tree)
    jobs = jobs or 2
    try:
        configure_once(tree, bisect_tree, options, log, env)
        tool = "make" if tree.project == "qemu" else "ninja"
        build.run_logged(
            [tool, "-C", str(build_dir), f"-j{jobs}"],
            log,
            env,
            f"bisect build {patch.name}",
            deadline=deadline,
        )
    except build.BuildStopped:
        return GateResult(
            "bisect",
            patch.name,
            True,
            skipped=True,
            detail="not finished: the bisect time budget ran out during its build; "
            f"`frozen check --project {tree.project} --gate bisect` builds it",
        )
    except build.BuildError as exc:
        return GateResult("bisect", patch.name, False, str(exc))
    if tree.project == "libvirt":
        return _meson_test(build_dir, patch, env, jobs)
    return GateResult("bisect", patch.name, True, "builds")


def _testlog_path(build_dir: Path) -> Path:
    return build_dir / "meson-logs" / "testlog.json"


def _read_testlog(build_dir: Path) -> list[dict]:
    """meson test's per-test results of the last run (none if it wrote none)."""
    log = _testlog_path(build_dir)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _meson_test(build_dir: Path, patch: Path, env: dict[str, str], jobs: int) -> GateResult:
    """The whole `meson test` of a built prefix: every test passes or is skipped."""
    say(f"bisect: meson test after {patch.name}")
    _testlog_path(build_dir).unlink(missing_ok=True)
    # Without --no-rebuild: some checks read files that only tests depend on
    # (the RPC headers of disabled drivers), which `ninja` alone does not make.
    proc = subprocess.run(
        ["meson", "test", "-C", str(build_dir), "--print-errorlogs", f"--num-processes={jobs}"],
        capture_output=True,
        text=True,
        env=env,
    )
    tests = _read_testlog(build_dir)
    if not tests:
        return GateResult(
            "bisect",
            patch.name,
            False,
            "builds, but meson test ran nothing:\n" + (proc.stdout + proc.stderr)[-1500:],
        )
    counts: dict[str, int] = {}
    for test in tests:
        counts[test["result"]] = counts.get(test["result"], 0) + 1
    summary = ", ".join(f"{n} {result.lower()}" for result, n in sorted(counts.items()))
    failed = [t["name"] for t in tests if t["result"] not in ("OK", "SKIP", "EXPECTEDFAIL")]
    if failed or proc.returncode != 0:
        return GateResult(
            "bisect",
            patch.name,
            False,
            f"builds; meson test: {summary}; failing: {', '.join(failed)}",
        )
    return GateResult("bisect", patch.name, True, f"builds; meson test: {summary}")


# --------------------------------------------------------------------------
# applies on the Debian-patched tree (added with the packager exports)


def debian_apply(project: str, files: list[Path]) -> list[GateResult]:
    """The series applies with zero fuzz after Debian's own quilt series.

    One result for Debian's series itself (so an empty series of ours still
    reports what was checked), then one per patch of ours: applies, applies
    with offset (passes, offsets named), or fails with the hunk.
    """
    try:
        tree = distro.debian_tree(project)
    except distro.DistroError as exc:
        return [GateResult("debian-apply", "debian/patches/series", False, str(exc))]
    shifted = sum(bool(o.offsets) for o in tree.debian_patches)
    results = [
        GateResult(
            "debian-apply",
            "debian/patches/series",
            True,
            f"Debian's {len(tree.debian_patches)} patches pushed with fuzz 0 "
            f"({shifted} with offset)",
        )
    ]
    entries = [(f"frozen/{p.name}", p) for p in files]
    outcomes = {o.patch: o for o in distro.push_ours(tree, entries)}
    for line, _ in entries:
        outcome = outcomes.get(line)
        if outcome is None:
            results.append(
                GateResult(
                    "debian-apply", line, False, "not tried: an earlier patch does not apply"
                )
            )
            continue
        detail = (
            outcome.status
            + (": " + "; ".join(outcome.offsets) if outcome.offsets else "")
            + (f"\n{outcome.detail}" if outcome.detail else "")
        )
        results.append(GateResult("debian-apply", line.removeprefix("frozen/"), outcome.ok, detail))
    distro.reset(tree)
    return results


def syntax_check(tree: Path) -> list[GateResult]:
    """libvirt's own syntax checks: `meson test --suite syntax-check`, one result each.

    Runs in the tree's configured build dir (`frozen build` makes it); the
    checks read the file list from git.  A tree made from the release
    tarball tracks files upstream's git does not (the vendored
    subprojects/keycodemapdb, generated RPC stubs), and some checks fail on
    those even without the series.  So a failing check fails the gate when
    its output names a file the series touches, or names no file at all;
    one that names only untouched files passes, with its findings shown.
    """
    build_dir = tree / "build"
    if not (build_dir / "build.ninja").exists():
        return [
            GateResult(
                "syntax-check",
                tree.name,
                False,
                f"{build_dir} is not configured: run `frozen build --project libvirt`",
            )
        ]
    proc = subprocess.run(
        [
            "meson",
            "test",
            "-C",
            str(build_dir),
            "--no-rebuild",
            "--suite",
            "syntax-check",
            "--print-errorlogs",
        ],
        capture_output=True,
        text=True,
        env=build.build_env(tree),
    )
    tests = _read_testlog(build_dir)
    if not tests:
        return [
            GateResult(
                "syntax-check",
                tree.name,
                False,
                "no syntax-check results:\n" + (proc.stdout + proc.stderr)[-1500:],
            )
        ]
    touched = _touched_files(tree)
    return [_judge_syntax_check(test, tree, touched) for test in tests]


def _touched_files(tree: Path) -> set[str]:
    out = subprocess.run(
        ["git", "-C", str(tree), "diff", "--name-only", "fixups..HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def _judge_syntax_check(test: dict, tree: Path, touched: set[str]) -> GateResult:
    name = test["name"].rsplit(":", 1)[-1]
    if test["result"] in ("OK", "SKIP"):
        return GateResult("syntax-check", name, True, skipped=test["result"] == "SKIP")
    findings = [
        ln
        for ln in (test.get("stdout") or "").splitlines()
        if not ln.startswith(("make:", "make[")) and ln.strip()
    ]
    ours = [ln for ln in findings if any(f in ln for f in touched)]
    names_files = any(str(tree) + "/" in ln or re.match(r"^[-+][\w./-]+$", ln) for ln in findings)
    if ours or not names_files:
        return GateResult("syntax-check", name, False, "\n".join((ours or findings)[:30]))
    return GateResult(
        "syntax-check",
        name,
        True,
        "fails only on files the series does not touch:\n" + "\n".join(findings[:5]),
    )


GATES = ("shape", "checkpatch", "syntax-check", "debian-apply", "bisect", "qemu-suites")
#: gates run only when asked for by name: they build once per patch
OPTIONAL_GATES = ("revert",)


def run_gate(
    project: str,
    gate: str,
    *,
    local: Path | None = None,
    jobs: int | None = None,
    deadline: float | None = None,
) -> list[GateResult]:
    """The results of one gate on `project`'s series; [] where it does not apply."""
    files = patches.series(project)
    if gate == "shape":
        return [shape(p) for p in files]
    if project not in config.BUILT_PROJECTS:
        return []  # resource-agents is shell: nothing to build or check with C tools
    if gate == "debian-apply":
        return debian_apply(project, files)
    applies = {
        "checkpatch": project == "qemu" and bool(files),
        "syntax-check": project == "libvirt",
        "bisect": bool(files),
        "qemu-suites": project == "qemu",
        "revert": bool(files),
    }
    if gate not in applies:
        raise ValueError(f"unknown gate {gate!r} (expected one of {GATES + OPTIONAL_GATES})")
    if not applies[gate]:
        return []
    if gate == "qemu-suites":
        return qemu_suites_gate(local=local, jobs=jobs, deadline=deadline)
    tree = patches.prepare(project, "frozen", local=local)
    if gate == "checkpatch":
        return [checkpatch(tree.path, p) for p in files]
    if gate == "syntax-check":
        return syntax_check(tree.path)
    if gate == "revert":
        from harness import revert  # it builds on this module's helpers

        return revert.run(tree, deadline=deadline)
    return bisect(tree, jobs=jobs, deadline=deadline)


def qemu_suites_gate(
    *, local: Path | None = None, jobs: int | None = None, deadline: float | None = None
) -> list[GateResult]:
    """QEMU's suites in the stock and frozen builds (each built or reused)."""
    stock = build.build(patches.prepare("qemu", "stock", local=local), jobs=jobs)
    frozen = build.build(patches.prepare("qemu", "frozen", local=local), jobs=jobs)
    results = qemu_suites.run(stock, frozen, deadline=deadline)
    print(qemu_suites.report(results))
    out = []
    for c in results:
        detail = f"{c.verdict}: stock {c.stock.result}, frozen {c.frozen.result}"
        if c.reruns:
            detail += f"; {c.reruns}"
        if c.verdict == "not run":
            detail += (
                "; the time budget ran out: "
                "`frozen check --project qemu --gate qemu-suites` runs it"
            )
        elif not c.ok and not c.skipped:
            detail += "\n" + (c.frozen.detail or c.stock.detail)
        out.append(
            GateResult("qemu-suites", c.test.label, c.ok or c.skipped, detail, skipped=c.skipped)
        )
    return out
