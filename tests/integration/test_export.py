"""Exports and the Debian-tree gate on the real series, verified by the real tools.

quilt on the Debian source tree of the pinned version (Debian's own series
first), patch -p1 on the pristine orig tarball, git am on the work tree's
base.  An empty series is reported as such: the trees are still made and
checked (Debian's series, the pristine version), and the counts say 0.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from harness import config, distro, export, gates, patches, sources

PROJECTS = ("qemu", "libvirt")


def _debian_series(project: str) -> list[str]:
    """Debian's own series, read from the pinned debian.tar.xz."""
    debian = sources.fetch(config.pin(project))["debian"]
    with tarfile.open(debian) as tar:
        handle = tar.extractfile("debian/patches/series")
        assert handle is not None
        text = handle.read().decode()
    return [ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _version_in(tree: Path, project: str) -> bool:
    pin = config.pin(project)
    if project == "qemu":
        return (tree / "VERSION").read_text().strip() == pin.version
    return f"version: '{pin.version}'" in (tree / "meson.build").read_text()


def _clean(tree: Path) -> bool:
    return (
        subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        == ""
    )


@pytest.mark.parametrize("project", PROJECTS)
def test_debian_tree_has_debians_series_applied(project: str) -> None:
    tree = distro.debian_tree(project)
    expected = _debian_series(project)
    assert [o.patch for o in tree.debian_patches] == expected
    distro.reset(tree)
    assert distro.quilt_applied(tree.path) == expected
    print(
        f"{project}: Debian's {len(expected)} patches pushed with fuzz 0 "
        f"({sum(bool(o.offsets) for o in tree.debian_patches)} with offset)"
    )


@pytest.mark.parametrize("project", PROJECTS)
def test_debian_apply_gate(project: str) -> None:
    files = patches.series(project)
    results = gates.debian_apply(project, files)
    assert len(results) == 1 + len(files), "one result for Debian's series, one per patch"
    assert results[0].patch == "debian/patches/series" and results[0].ok, results[0].detail
    failed = [f"{r.patch}: {r.detail}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    print(f"{project}: {len(files)} patch(es) of ours apply after Debian's series")


@pytest.mark.parametrize("project", PROJECTS)
def test_debian_export_pushes_with_quilt(project: str, tmp_path: Path) -> None:
    files = patches.series(project)
    written = export.export_debian(files, tmp_path)
    assert len(written) == len(files)
    for path in written:
        head = path.read_text().split("\n---\n", 1)[0]
        for field in ("Description: ", "Author: ", "Forwarded: no", "Last-Update: "):
            assert field in head, f"{path.name} lacks {field}"
    check = export.verify_debian(project, tmp_path)
    assert check.debian_patches == len(_debian_series(project))
    assert [o.patch for o in check.ours] == [f"frozen/{p.name}" for p in files]
    assert check.ok, [(o.patch, o.detail) for o in check.ours if not o.ok]
    assert check.applied[check.debian_patches :] == [f"frozen/{p.name}" for p in files]
    print(f"{project}: quilt applied {check.debian_patches} Debian + {len(files)} exported")


@pytest.mark.parametrize("project", PROJECTS)
def test_rpm_export_applies_on_the_pristine_tarball(project: str, tmp_path: Path) -> None:
    files = patches.series(project)
    snippet = export.export_rpm(files, tmp_path, project)
    assert export.parse_spec_snippet(snippet.read_text()) == [p.name for p in files]
    tree = distro.debian_tree(project)
    distro.reset(tree, "base")
    assert _version_in(tree.path, project), "the base commit is the pinned orig tarball"
    assert not (tree.path / "debian").exists(), "the pristine tarball carries no debian/"
    outcomes = export.verify_rpm(project, tmp_path)
    assert [o.patch for o in outcomes] == [p.name for p in files]
    assert all(o.ok for o in outcomes), [(o.patch, o.detail) for o in outcomes if not o.ok]
    assert _clean(tree.path), "verification leaves the Debian tree as it found it"
    print(f"{project}: patch -p1 --fuzz=0 applied {len(outcomes)} patch(es) on the tarball")


@pytest.mark.parametrize("project", PROJECTS)
def test_mail_export_survives_git_am(project: str, tmp_path: Path) -> None:
    files = patches.series(project)
    tree = patches.prepare(project, "frozen")
    name, address = sources.git_identity()
    signoff = f"{name} <{address}>"
    if not files:
        with pytest.raises(export.ExportError, match="nothing to mail"):
            export.export_mail(project, tree.path, tmp_path, signoff=signoff)
        print(f"{project}: empty series, nothing to mail (refused)")
        return
    result = export.export_mail(project, tree.path, tmp_path, signoff=signoff)
    assert len(result.files) == len(files) + 1, "cover letter + one mail per patch"
    assert result.recipients.to, "a list address from the tree's own rules"
    cover = result.files[0].read_text()
    assert "*** BLURB HERE ***" not in cover and "Provenance" in cover
    check = export.verify_mail(tree.path, result.files, signoff)
    assert check.applied == len(files)
    assert check.signed == len(files)
    assert check.same_tree, "git am of the mails must give the series' tree"
    print(
        f"{project}: {len(files)} mail(s) to {', '.join(result.recipients.to)}, "
        f"git am applied {check.applied}"
    )
