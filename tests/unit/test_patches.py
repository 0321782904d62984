"""patches: series parsing, git am errors, work trees, refresh."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import git, make_patch

from harness import patches


def test_parse_series_skips_comments_and_blank_lines() -> None:
    text = "# Frozen\n\n0001-qapi-add.patch\n0002-runstate.patch -p1  # trailing\n"
    assert patches.parse_series(text) == ["0001-qapi-add.patch", "0002-runstate.patch"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.patch -p0\n", "only -p1"),
        ("a.patch\na.patch\n", "listed twice"),
        ("../a.patch\n", "not a file name"),
    ],
)
def test_parse_series_rejects(text: str, message: str) -> None:
    with pytest.raises(patches.SeriesError, match=message):
        patches.parse_series(text, "series")


def test_empty_series_is_valid(tmp_path: Path) -> None:
    (tmp_path / "series").write_text("# nothing yet\n")
    assert patches.series("qemu", "frozen", tmp_path) == []
    assert patches.series("qemu", "stock", tmp_path) == []


def test_series_names_missing_patch(tmp_path: Path) -> None:
    (tmp_path / "series").write_text("0001-gone.patch\n")
    with pytest.raises(patches.SeriesError, match=r"0001-gone\.patch"):
        patches.series("qemu", "frozen", tmp_path)


def test_series_digest_follows_every_byte(tmp_path: Path) -> None:
    one, two = tmp_path / "1.patch", tmp_path / "2.patch"
    one.write_bytes(b"a" * 100)
    two.write_bytes(b"b" * 100)
    digest = patches.series_digest([one, two])
    assert digest == patches.series_digest([one, two])
    assert digest != patches.series_digest([two, one])
    two.write_bytes(b"b" * 99 + b"c")
    assert digest != patches.series_digest([one, two])


def _series_of(upstream: Path, out: Path) -> Path:
    def edit(tree: Path) -> None:
        text = (tree / "runstate.c").read_text().replace("int line10;", "int frozen10;")
        (tree / "runstate.c").write_text(text)

    patch = make_patch(upstream, out, "system/runstate: rename line10", edit)
    (out / "series").write_text(patch.name + "\n")
    return patch


def test_prepare_applies_one_commit_per_patch(tmp_path: Path, upstream: Path) -> None:
    series_dir = tmp_path / "series"
    patch = _series_of(upstream, series_dir)
    tree = patches.prepare("qemu", local=upstream, path=tmp_path / "tree", series_dir=series_dir)
    assert tree.patches == (patch,)
    assert git(tree.path, "log", "-1", "--format=%s") == "system/runstate: rename line10"
    assert "int frozen10;" in (tree.path / "runstate.c").read_text()
    # Current tree: reused, not re-made.
    head = git(tree.path, "rev-parse", "HEAD")
    again = patches.prepare("qemu", local=upstream, path=tree.path, series_dir=series_dir)
    assert git(again.path, "rev-parse", "HEAD") == head


def test_patch_that_does_not_apply_names_patch_and_hunk(tmp_path: Path, upstream: Path) -> None:
    series_dir = tmp_path / "series"
    patch = _series_of(upstream, series_dir)
    # Upstream moves on: the context of the hunk disappears.
    text = (upstream / "runstate.c").read_text().replace("int line10;", "int moved10;")
    (upstream / "runstate.c").write_text(text)
    git(upstream, "commit", "-q", "-a", "-m", "conflicting change")
    with pytest.raises(patches.PatchError) as info:
        patches.prepare("qemu", local=upstream, path=tmp_path / "tree", series_dir=series_dir)
    message = str(info.value)
    assert patch.name in message
    assert "failing hunk at runstate.c:" in message
    assert "int line10;" in message, "the hunk's missing context is shown"
    # The failed am is aborted: the tree is usable and sits at the base.
    assert git(tmp_path / "tree", "status", "--porcelain") == ""


def test_prepare_refuses_to_discard_unexported_work(tmp_path: Path, upstream: Path) -> None:
    series_dir = tmp_path / "series"
    _series_of(upstream, series_dir)
    tree = patches.prepare("qemu", local=upstream, path=tmp_path / "tree", series_dir=series_dir)
    (tree.path / "new.c").write_text("int x;\n")
    git(tree.path, "add", "new.c")
    git(tree.path, "commit", "-q", "-m", "monitor: developer work")
    (series_dir / "series").write_text("")  # the series changed meanwhile
    with pytest.raises(patches.TreeBusy, match="refresh"):
        patches.prepare("qemu", local=upstream, path=tree.path, series_dir=series_dir)
    assert (tree.path / "new.c").exists(), "nothing was lost"


def test_refresh_exports_the_tree_commits(tmp_path: Path, upstream: Path) -> None:
    series_dir = tmp_path / "series"
    old = _series_of(upstream, series_dir)
    tree = patches.prepare("qemu", local=upstream, path=tmp_path / "tree", series_dir=series_dir)
    (tree.path / "freeze.c").write_text("void qmp_freeze(void) {}\n")
    git(tree.path, "add", "freeze.c")
    git(tree.path, "commit", "-q", "-s", "-m", "monitor: add freeze\n\nWhy it is needed.")
    written = patches.refresh("qemu", tree.path, series_dir)
    assert [p.name for p in written] == [old.name, "0002-monitor-add-freeze.patch"]
    assert patches.parse_series((series_dir / "series").read_text()) == [p.name for p in written]
    # The regenerated series re-applies to an identical tree.
    fresh = patches.prepare("qemu", local=upstream, path=tmp_path / "fresh", series_dir=series_dir)
    assert (fresh.path / "freeze.c").read_text() == "void qmp_freeze(void) {}\n"
    assert "int frozen10;" in (fresh.path / "runstate.c").read_text()
