"""sources: apt source derivation, checksum verification, base trees."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import git

from harness import config, sources

DEB822 = """\
Types: deb
# http://mirror.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://vendor.example/apt
Suites: stable
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
"""

ONE_LINE = """\
# a comment
deb [arch=amd64 signed-by=/etc/keyring.gpg] http://other.example/debian/ bookworm main
deb-src http://src-only.example/debian bookworm main
"""


@pytest.fixture
def etc_apt(tmp_path: Path) -> Path:
    etc = tmp_path / "etc-apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    (etc / "sources.list").write_text(ONE_LINE)
    return etc


def test_archive_entries_come_from_the_system_config(etc_apt: Path) -> None:
    archive = sources.debian_archive_entries(sources.system_apt_entries(etc_apt))
    assert [e.uri for e in archive] == [
        "http://other.example/debian",
        "http://mirror.example/debian",
    ]
    assert archive[0].signed_by == "/etc/keyring.gpg"


def test_private_sources_list_has_deb_src_for_each_suite(etc_apt: Path) -> None:
    archive = sources.debian_archive_entries(sources.system_apt_entries(etc_apt))
    text = sources.private_sources_list(archive, ["sid", "trixie"])
    assert text.splitlines() == [
        "deb-src [signed-by=/etc/keyring.gpg] http://other.example/debian sid main",
        "deb-src [signed-by=/etc/keyring.gpg] http://other.example/debian trixie main",
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian sid main",
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian trixie main",
    ]


def test_no_debian_entry_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb https://vendor.example/apt stable main\n")
    archive = sources.debian_archive_entries(sources.system_apt_entries(tmp_path))
    with pytest.raises(sources.SourceError, match="no Debian archive entry"):
        sources.private_sources_list(archive, ["sid"])


def test_private_apt_writes_only_below_its_root(tmp_path: Path, etc_apt: Path) -> None:
    apt = sources.PrivateApt(tmp_path / "apt", ["sid"], etc_apt)
    assert apt.sources_list.read_text().count("deb-src") == 2
    opts = apt._options()
    assert f"Dir::Etc::SourceList={apt.sources_list}" in opts
    assert "Dir::Etc::SourceParts=/nonexistent" in opts


@pytest.mark.parametrize(
    ("source", "name", "path"),
    [
        ("qemu", "qemu_10.2.2+ds.orig.tar.xz", "pool/main/q/qemu/qemu_10.2.2%2Bds.orig.tar.xz"),
        (
            "libvirt",
            "libvirt_11.3.0.orig.tar.xz",
            "pool/main/libv/libvirt/libvirt_11.3.0.orig.tar.xz",
        ),
    ],
)
def test_pool_path(source: str, name: str, path: str) -> None:
    assert sources.pool_path(source, name) == path


def test_checksum_mismatch_names_file_and_both_sums(tmp_path: Path) -> None:
    bad = tmp_path / "qemu_10.2.2+ds.orig.tar.xz"
    bad.write_bytes(b"not the tarball")
    actual = hashlib.sha256(b"not the tarball").hexdigest()
    expected = "0" * 64
    with pytest.raises(sources.ChecksumError) as info:
        sources.verify(bad, expected)
    message = str(info.value)
    assert "qemu_10.2.2+ds.orig.tar.xz" in message
    assert expected in message and actual in message
    assert not bad.exists(), "a file that failed verification must not stay usable"
    assert (tmp_path / "qemu_10.2.2+ds.orig.tar.xz.rejected").exists()


def test_fetch_reuses_verified_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    content = b"pinned bytes"
    cached = sources.downloads_dir() / "x_1.orig.tar.xz"
    cached.write_bytes(content)
    pin = config.SourcePin(
        "x",
        "1",
        "x",
        "1-1",
        "sid",
        (config.Artifact("x_1.orig.tar.xz", hashlib.sha256(content).hexdigest(), "orig"),),
    )
    # No apt object is needed: nothing is missing, so nothing is downloaded.
    assert sources.fetch(pin, apt=None) == {"orig": cached}


def test_lock_pins_every_project_with_sha256() -> None:
    pins = config.load_lock()
    assert set(pins) == set(config.PROJECTS)
    for pin in pins.values():
        assert pin.orig.name.endswith((".tar.xz", ".tar.gz"))
        for art in pin.artifacts:
            assert len(art.sha256) == 64 and int(art.sha256, 16) >= 0
    assert pins["qemu"].version == "10.2.2" and pins["libvirt"].version == "11.3.0"


def test_malformed_lock_is_a_clear_error(tmp_path: Path) -> None:
    lock = tmp_path / "sources.lock"
    lock.write_text("[qemu]\nversion = '1'\n")
    with pytest.raises(config.LockError, match=r"\[qemu\] lacks"):
        config.load_lock(lock)


def _tarball(tmp_path: Path, files: dict[str, bytes], uid: int = 4242) -> Path:
    path = tmp_path / "proj-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"proj-1.0/{name}")
            info.size = len(data)
            info.uid = uid  # a foreign owner, as in Debian's tarballs
            tar.addfile(info, io.BytesIO(data))
    return path


def test_local_tarball_base_becomes_a_git_tree(tmp_path: Path) -> None:
    tarball = _tarball(tmp_path, {"a.c": b"int a;\n", "sub/b.c": b"int b;\n"})
    base = sources.resolve_base("qemu", tarball)
    assert base.kind == "tarball"
    assert base.ident == hashlib.sha256(tarball.read_bytes()).hexdigest()
    tree = tmp_path / "tree"
    sources.make_tree(base, tree)
    assert (tree / "sub" / "b.c").read_text() == "int b;\n"
    assert git(tree, "rev-parse", "base") == git(tree, "rev-parse", "fixups")
    assert git(tree, "status", "--porcelain") == ""


def test_local_git_base_uses_its_head(tmp_path: Path, upstream: Path) -> None:
    base = sources.resolve_base("qemu", upstream)
    assert base.kind == "git" and base.ident == git(upstream, "rev-parse", "HEAD")
    tree = tmp_path / "tree"
    sources.make_tree(base, tree)
    assert git(tree, "rev-parse", "fixups") == base.ident
    assert (tree / "runstate.c").exists()


def test_debian_fixups_are_a_commit_of_their_own(tmp_path: Path) -> None:
    orig = _tarball(tmp_path, {"pc-bios/meson.build": b"blobs = ['a.bin']\n"})
    fixup = (
        b"--- a/pc-bios/meson.build\n+++ b/pc-bios/meson.build\n"
        b"@@ -1 +1 @@\n-blobs = ['a.bin']\n+blobs = []\n"
    )
    debian = tmp_path / "proj_1.0-1.debian.tar.xz"
    with tarfile.open(debian, "w:xz") as tar:
        info = tarfile.TarInfo("debian/patches/skip.patch")
        info.size = len(fixup)
        tar.addfile(info, io.BytesIO(fixup))
    base = sources.Base("qemu", "debian", "id", orig, debian, ("debian/patches/skip.patch",))
    tree = tmp_path / "tree"
    sources.make_tree(base, tree)
    assert (tree / "pc-bios" / "meson.build").read_text() == "blobs = []\n"
    assert git(tree, "rev-list", "--count", "base..fixups") == "1"
    assert "skip.patch" in git(tree, "log", "-1", "--format=%B", "fixups")


def test_git_identity_is_the_repositorys() -> None:
    name, email = sources.git_identity()
    root = str(config.repo_root())
    configured = subprocess.run(
        ["git", "-C", root, "config", "user.name"], capture_output=True, text=True
    ).stdout.strip()
    author = subprocess.run(
        ["git", "-C", root, "log", "-1", "--format=%an"], capture_output=True, text=True
    ).stdout.strip()
    assert name in (configured, author) and "@" in email


def test_untracked_paths_stay_out_of_the_base_commit(tmp_path: Path) -> None:
    tarball = _tarball(
        tmp_path, {"src/a.c": b"int a;\n", "subprojects/keycodemapdb/keymaps.csv": b"a,b\n"}
    )
    base = sources.Base(
        "libvirt", "tarball", "id", tarball, untracked=("subprojects/keycodemapdb",)
    )
    tree = tmp_path / "tree"
    sources.make_tree(base, tree)
    assert (tree / "subprojects" / "keycodemapdb" / "keymaps.csv").exists()
    assert git(tree, "ls-files") == "src/a.c"
    assert git(tree, "status", "--porcelain") == ""
