"""build: cache-key stability and sensitivity, environment, failures."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from harness import build, sources
from harness.patches import Tree


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    series = []
    for i in range(3):
        patch = tmp_path / f"000{i}-x.patch"
        patch.write_bytes(f"patch {i}\n".encode() * 50)
        series.append(patch)
    base = sources.Base(
        "qemu",
        "debian",
        "a" * 64,
        tmp_path / "orig.tar.xz",
        None,
        ("debian/patches/skip-install-dtb.patch",),
    )
    return Tree("qemu", "frozen", tmp_path / "tree", base, tuple(series))


def test_cache_key_is_stable(tree: Tree) -> None:
    options = build.qemu_options()
    assert build.cache_key(tree, options) == build.cache_key(tree, list(options))


def test_cache_key_changes_with_one_patch_byte(tree: Tree) -> None:
    key = build.cache_key(tree, build.qemu_options())
    data = bytearray(tree.patches[1].read_bytes())
    data[10] ^= 1
    tree.patches[1].write_bytes(bytes(data))
    assert build.cache_key(tree, build.qemu_options()) != key


@pytest.mark.parametrize("change", ["base", "fixups", "options", "order", "recipe"])
def test_cache_key_changes_with_each_input(
    tree: Tree, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = build.qemu_options()
    key = build.cache_key(tree, options)
    if change == "base":
        tree = dataclasses.replace(tree, base=dataclasses.replace(tree.base, ident="b" * 64))
    elif change == "fixups":
        tree = dataclasses.replace(tree, base=dataclasses.replace(tree.base, fixups=()))
    elif change == "options":
        options = [*options, "--enable-debug"]
    elif change == "order":
        tree = dataclasses.replace(tree, patches=tree.patches[::-1])
    else:
        monkeypatch.setattr(build, "RECIPE_VERSION", build.RECIPE_VERSION + "x")
    assert build.cache_key(tree, options) != key


def test_build_env_uses_ccache_with_relative_paths(tmp_path: Path) -> None:
    env = build.build_env(tmp_path)
    assert env["CCACHE_BASEDIR"] == str(tmp_path)
    assert env["CCACHE_NOHASHDIR"] == "1"
    if build.CCACHE_BIN_DIR.is_dir():
        assert env["PATH"].split(":")[0] == str(build.CCACHE_BIN_DIR)


def test_failed_step_reports_log_tail_and_path(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    cmd = ["sh", "-c", "for i in $(seq 1 100); do echo line$i; done; exit 3"]
    with pytest.raises(build.BuildError) as info:
        build.run_logged(cmd, log, {"PATH": "/usr/bin:/bin"}, "build qemu")
    message = str(info.value)
    assert "build qemu (exit 3) failed" in message
    assert "line100" in message and "line50" not in message
    assert str(log) in message


def test_cached_install_is_reused(tree: Tree, tmp_path: Path) -> None:
    key = build.cache_key(tree, build.qemu_options())
    prefix = build.install_prefix("qemu", "frozen")
    prefix.mkdir(parents=True)
    (prefix / build.STAMP).write_text(f'{{"key": "{key}", "timings": {{"build": 1.0}}}}')
    install = build.build(tree)
    assert install.cached and install.prefix == prefix and install.key == key


def test_run_logged_stops_the_whole_command_at_its_deadline(tmp_path: Path) -> None:
    """A budget ends a build mid-way, children included, as BuildStopped."""
    pidfile = tmp_path / "child.pid"
    cmd = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]
    start = time.monotonic()
    with pytest.raises(build.BuildStopped):
        build.run_logged(cmd, tmp_path / "log", dict(os.environ), "t", deadline=start + 0.5)
    assert time.monotonic() - start < 10
    child = int(pidfile.read_text())
    for _ in range(100):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"child {child} outlived the deadline ({state})")


def test_run_logged_failure_is_not_a_stop(tmp_path: Path) -> None:
    with pytest.raises(build.BuildError) as exc:
        build.run_logged(["sh", "-c", "exit 3"], tmp_path / "log", dict(os.environ), "t")
    assert not isinstance(exc.value, build.BuildStopped)
