"""export: DEP-3 headers, spec snippet, sign-off, mail and rebase report; CI definitions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import git, make_patch

from harness import cli, config, distro, export, gates

SUBMITTER = "Sub Mitter <submitter@example.invalid>"


def _edit_line(number: int, text: str):
    def edit(tree: Path) -> None:
        path = tree / "runstate.c"
        lines = path.read_text().splitlines(keepends=True)
        lines[number] = text + "\n"
        path.write_text("".join(lines))

    return edit


@pytest.fixture
def two_patches(upstream: Path, tmp_path: Path) -> list[Path]:
    out = tmp_path / "series"
    first = make_patch(upstream, out, "system/runstate: freeze line 10", _edit_line(10, "int a;"))
    git(upstream, "merge", "-q", "--ff-only", "p0")
    second = make_patch(upstream, out, "net: freeze line 30", _edit_line(30, "int b;"))
    git(upstream, "reset", "-q", "--hard", "HEAD~1")
    return [first, second]


# --------------------------------------------------------------------------
# reading patches and DEP-3


def test_dep3_header_from_the_patch(two_patches: list[Path], upstream: Path) -> None:
    patch = export.read_patch(two_patches[0])
    header = export.dep3_header(patch)
    lines = header.splitlines()
    assert lines[0] == "Description: system/runstate: freeze line 10"
    assert " Body explaining why." in lines
    assert " ." in lines, "blank lines of the body become ' .'"
    assert "Author: Test Identity <test@example.invalid>" in lines
    assert "Forwarded: no" in lines
    day = git(upstream, "log", "-1", "--format=%ad", "--date=short", "p0")
    assert f"Last-Update: {day}" in lines
    assert all(
        ln.startswith((" ", "Description:", "Author:", "Forwarded:", "Last-Update:"))
        for ln in lines
    )


def test_dep3_decodes_encoded_author_and_keeps_the_diff(tmp_path: Path) -> None:
    raw = (
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        "From: =?UTF-8?q?Ren=C3=A9=20Test?= <rene@example.invalid>\n"
        "Date: Tue, 24 Nov 2026 23:30:00 -0800\n"
        "Subject: [PATCH v2 3/9] qapi: add the\n frozen run state\n\n"
        "Why it is needed.\n\nSigned-off-by: Ren\u00e9 Test <rene@example.invalid>\n"
        "---\n f | 2 +-\n\ndiff --git a/f b/f\n--- a/f\n+++ b/f\n@@ -1 +1 @@\n-x\n+y\n"
        "-- \n2.39.5\n\n"
    )
    path = tmp_path / "0003-x.patch"
    path.write_bytes(raw.encode())
    patch = export.read_patch(path)
    assert patch.author == "Ren\u00e9 Test <rene@example.invalid>"
    assert patch.subject == "qapi: add the frozen run state"
    text = export.to_dep3(patch, forwarded="https://lists.example.invalid/msg")
    assert "Last-Update: 2026-11-24" in text, "the patch's own date, not converted to UTC"
    assert "Forwarded: https://lists.example.invalid/msg" in text
    assert text.endswith("@@ -1 +1 @@\n-x\n+y\n"), "format-patch's signature is dropped"


def test_read_patch_refuses_a_plain_diff(tmp_path: Path) -> None:
    path = tmp_path / "plain.diff"
    path.write_text("--- a/f\n+++ b/f\n@@ -1 +1 @@\n-x\n+y\n")
    with pytest.raises(export.ExportError, match="not a git format-patch"):
        export.read_patch(path)


def test_debian_export_applies_with_quilt(
    two_patches: list[Path], upstream: Path, tmp_path: Path
) -> None:
    out = tmp_path / "deb"
    written = export.export_debian(two_patches, out)
    assert [p.parent.name for p in written] == ["frozen", "frozen"]
    assert (out / "series").read_text().splitlines() == [f"frozen/{p.name}" for p in two_patches]
    # A miniature Debian tree: one Debian patch of its own, then ours appended.
    (upstream / "debian" / "patches").mkdir(parents=True)
    (upstream / "debian" / "patches" / "own.patch").write_text(
        "--- a/extra.c\n+++ b/extra.c\n@@ -0,0 +1 @@\n+int debian;\n"
    )
    (upstream / "debian" / "patches" / "series").write_text("own.patch\n")
    assert [o.patch for o in distro.quilt_push_all(upstream)] == ["own.patch"]
    with (upstream / "debian" / "patches" / "series").open("a") as series:
        series.write((out / "series").read_text())
    for line, path in export.series_entries(out):
        target = upstream / "debian" / "patches" / line
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(path.read_bytes())
    outcomes = distro.quilt_push_all(upstream)
    assert [(o.patch, o.status) for o in outcomes] == [
        (f"frozen/{p.name}", "applies") for p in two_patches
    ]
    assert distro.quilt_applied(upstream)[-1] == f"frozen/{two_patches[1].name}"
    assert "int b;" in (upstream / "runstate.c").read_text()


def test_patch_output_offsets_fuzz_and_failures() -> None:
    out = (
        "patching file block.c\nHunk #1 succeeded at 12.\n"
        "Hunk #2 succeeded at 585 (offset -3 lines).\n"
        "patching file net/net.c\nHunk #1 succeeded at 7 with fuzz 1 (offset 1 line).\n"
        "Hunk #2 FAILED at 40.\n1 out of 2 hunks FAILED -- saving rejects\n"
    )
    outcome = distro.read_patch_output("p.patch", out, 1)
    assert outcome.offsets == ("block.c: hunk #2 offset -3",)
    assert not outcome.ok
    assert "net/net.c: hunk #1 needs fuzz 1" in outcome.detail
    assert "net/net.c: hunk #2 FAILED at line 40" in outcome.detail
    clean = distro.read_patch_output("q.patch", "patching file a.c\n", 0)
    assert clean.ok and clean.status == "applies"


# --------------------------------------------------------------------------
# rpm


def test_spec_snippet_numbers_in_series_order() -> None:
    snippet = export.spec_snippet(["0001-a.patch", "0002-b.patch"], "qemu", first=101)
    assert "Patch0101: 0001-a.patch\nPatch0102: 0002-b.patch\n" in snippet
    assert "%autosetup -p1" in snippet
    assert all(ln.startswith(("#", "Patch")) for ln in snippet.splitlines())
    # rpm applies by number, not by line order.
    assert export.parse_spec_snippet("Patch9002: b.patch\nPatch9001: a.patch\n") == [
        "a.patch",
        "b.patch",
    ]


def test_rpm_export_applies_with_patch_in_spec_order(
    two_patches: list[Path], upstream: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rpm"
    snippet = export.export_rpm(two_patches, out, "qemu")
    names = export.parse_spec_snippet(snippet.read_text())
    assert names == [p.name for p in two_patches]
    # The upstream tree gained 3 lines at the top: both patches apply with offset.
    text = (upstream / "runstate.c").read_text()
    (upstream / "runstate.c").write_text("/* a */\n/* b */\n/* c */\n" + text)
    outcomes = distro.patch_in_order(upstream, [out / n for n in names])
    assert [o.status for o in outcomes] == ["applies with offset"] * 2
    assert outcomes[0].offsets == ("runstate.c: hunk #1 offset 3",)


def test_patch_in_order_stops_at_fuzz(two_patches: list[Path], upstream: Path) -> None:
    _edit_line(8, "int changed_context;")(upstream)  # inside patch 1's context
    outcomes = distro.patch_in_order(upstream, two_patches)
    assert len(outcomes) == 1, "later patches are not tried after a failure"
    assert not outcomes[0].ok and "runstate.c: hunk #1" in outcomes[0].detail


# --------------------------------------------------------------------------
# mail


@pytest.mark.parametrize(
    "signoff", [None, "", "nobody", "Name <not-an-address>", "<a@example.invalid>"]
)
def test_mail_refuses_without_a_proper_signoff(signoff: str | None, tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="--signoff"):
        export.export_mail("libvirt", tmp_path / "nowhere", tmp_path / "out", signoff=signoff)
    assert not (tmp_path / "out").exists(), "nothing is written before the refusal"


def test_cli_mail_without_signoff_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["export", "mail", "--project", "qemu", str(tmp_path / "out")])
    assert rc == 2
    assert "refusing to export for mail without --signoff" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def series_tree(upstream: Path) -> Path:
    """A libvirt-like tree: docs naming the list, tag `fixups`, two commits on top."""
    (upstream / "docs").mkdir()
    (upstream / "docs" / "submitting-patches.rst").write_text(
        "::\n\n  $ git send-email --cover-letter --to=devel@lists.example.invalid master\n"
        "  $ git config sendemail.to devel@lists.example.invalid\n"
    )
    git(upstream, "add", ".")
    git(upstream, "commit", "-q", "-m", "docs")
    git(upstream, "tag", "fixups")
    for subject, number, text in (
        ("conf: freeze line 5", 5, "int c;"),
        ("qemu: freeze line 25", 25, "int d;"),
    ):
        _edit_line(number, text)(upstream)
        git(upstream, "commit", "-q", "-a", "-s", "-m", f"{subject}\n\nBecause frozen.")
    return upstream


def test_mail_export_signs_addresses_and_survives_git_am(series_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "mail"
    result = export.export_mail("libvirt", series_tree, out, signoff=SUBMITTER, version=2)
    names = [p.name for p in result.files]
    assert names[0] == "v2-0000-cover-letter.patch" and len(names) == 3
    assert result.recipients.to == ("devel@lists.example.invalid",)
    cover = result.files[0].read_text()
    assert "*** SUBJECT HERE ***" not in cover and "*** BLURB HERE ***" not in cover
    assert "[PATCH v2 0/2]" in cover and "VIR_DOMAIN_FROZEN" in cover
    assert "code-provenance.rst" in cover and "AI assistant" in cover
    assert "To: devel@lists.example.invalid" in cover
    for mail in result.files[1:]:
        body = mail.read_text().split("\n---\n", 1)[0]
        assert body.rstrip().endswith(f"Signed-off-by: {SUBMITTER}")
        assert "Signed-off-by: Test Identity <test@example.invalid>" in body
    assert all(r.ok for r in result.gate_results), result.gate_results
    check = export.verify_mail(series_tree, result.files, SUBMITTER)
    assert (check.applied, check.signed, check.same_tree) == (2, 2, True)


def test_qemu_recipients_come_from_get_maintainer(tmp_path: Path) -> None:
    tree = tmp_path / "qemu"
    (tree / "scripts").mkdir(parents=True)
    # A stand-in with get_maintainer.pl's output format (roles in parentheses).
    (tree / "scripts" / "get_maintainer.pl").write_text(
        'print "A Maintainer <a\\@example.invalid> (maintainer:Main loop)\\n";\n'
        'print "qemu-devel\\@lists.example.invalid (open list:All patches CC here)\\n";\n'
    )
    rcpt = export.qemu_recipients(tree, [])
    assert rcpt.to == ("qemu-devel@lists.example.invalid",)
    assert rcpt.cc == ("A Maintainer <a@example.invalid>",)


# --------------------------------------------------------------------------
# rebase report


def test_rebase_report_patch_by_patch(upstream: Path, tmp_path: Path) -> None:
    out = tmp_path / "series"
    patches = [
        make_patch(upstream, out, "a: edit line 2", _edit_line(2, "int two;")),
        make_patch(upstream, out, "b: edit line 20", _edit_line(20, "int twenty;")),
        make_patch(upstream, out, "c: edit line 35", _edit_line(35, "int thirtyfive;")),
    ]
    # Upstream moves on: line 2 rewritten (conflict), 4 lines inserted after
    # line 10 (offset for the later patches).
    _edit_line(2, "int upstream_two;")(upstream)
    text = (upstream / "runstate.c").read_text().splitlines(keepends=True)
    text[11:11] = ["/* new */\n"] * 4
    (upstream / "runstate.c").write_text("".join(text))
    git(upstream, "commit", "-q", "-a", "-m", "upstream moves on")
    report = export.rebase_report(upstream, patches)
    assert [r.status for r in report] == ["conflicts", "applies with offset", "applies with offset"]
    assert "runstate.c" in report[0].detail and "int line2;" in report[0].detail
    assert "offset 4 lines" in report[1].detail
    assert git(upstream, "status", "--porcelain") == "", "the user's tree is not touched"


def test_rebase_report_clean_and_not_a_git_tree(upstream: Path, tmp_path: Path) -> None:
    patch = make_patch(upstream, tmp_path / "s", "a: edit", _edit_line(3, "int x;"))
    assert [r.status for r in export.rebase_report(upstream, [patch])] == ["applies"]
    with pytest.raises(export.ExportError, match="not a git tree"):
        export.rebase_report(tmp_path / "s", [patch])


# --------------------------------------------------------------------------
# libvirt syntax-check attribution


def _sc(result: str, stdout: str) -> dict:
    return {"name": "syntax-check - libvirt:prohibit_strcmp", "result": result, "stdout": stdout}


def test_syntax_check_failure_in_a_touched_file_fails(tmp_path: Path) -> None:
    out = f"make: Entering\n{tmp_path}/src/qemu/qemu_driver.c:12: if (strcmp(a, b))\n"
    result = gates._judge_syntax_check(_sc("FAIL", out), tmp_path, {"src/qemu/qemu_driver.c"})
    assert not result.ok and result.patch == "prohibit_strcmp"
    assert "qemu_driver.c:12" in result.detail


def test_syntax_check_failure_elsewhere_is_shown_but_passes(tmp_path: Path) -> None:
    out = f"{tmp_path}/subprojects/keycodemapdb/tests/stdc.c:34: strcmp(x, y)\n"
    result = gates._judge_syntax_check(_sc("FAIL", out), tmp_path, {"src/qemu/qemu_driver.c"})
    assert result.ok and "does not touch" in result.detail and "stdc.c:34" in result.detail


def test_syntax_check_failure_naming_no_file_fails(tmp_path: Path) -> None:
    result = gates._judge_syntax_check(_sc("FAIL", "something is wrong\n"), tmp_path, set())
    assert not result.ok
    assert gates._judge_syntax_check(_sc("OK", ""), tmp_path, set()).ok


# --------------------------------------------------------------------------
# CI definitions


CI = config.repo_root() / "scripts" / "ci"
TEST_COMMAND = "./scripts/bootstrap && .venv/bin/frozen test"


def test_gitlab_ci_job() -> None:
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    jobs = {k: v for k, v in doc.items() if isinstance(v, dict) and "script" in v}
    assert jobs, "no job with a script"
    job = next(iter(jobs.values()))
    assert "kvm" in job["tags"]
    assert any(TEST_COMMAND in line for line in job["script"])
    assert "cache" in job and job["cache"]["paths"]
    assert job["variables"]["FROZEN_CACHE"] == "$CI_PROJECT_DIR/.frozen-cache"
    assert ".frozen-cache/results/" in job["artifacts"]["paths"]
    assert job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"]["junit"]
    # GitLab keys on two files at most; the series is keyed by the harness.
    assert job["cache"]["key"]["files"] == ["sources.lock", "harness/build.py"]


def test_github_workflow() -> None:
    doc = yaml.safe_load((CI / "github-kvm.yml").read_text())
    assert doc.get("on") or doc.get(True), "no trigger"  # YAML 1.1 reads `on` as True
    job = next(iter(doc["jobs"].values()))
    assert job["runs-on"].startswith("ubuntu")
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "/dev/kvm" in runs and "udevadm" in runs
    assert TEST_COMMAND in runs
    uses = [step.get("uses", "") for step in job["steps"]]
    assert any(u.startswith("actions/cache") for u in uses)
    upload = next(
        s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")
    )
    assert upload["if"].startswith("always()")
    assert upload["with"]["path"].startswith(".frozen-cache/results")
    assert job["env"]["FROZEN_CACHE"].endswith("/.frozen-cache")
    restore = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/cache/restore"))
    for part in ("sources.lock", "patches/**", "harness/build.py"):
        assert part in restore["with"]["key"], f"the cache key must cover {part}"


def test_ci_scripts_are_valid_shell() -> None:
    for path in CI.glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
