"""Shared fixtures: a private cache and small synthetic git trees."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own harness cache; the real one is never touched."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FROZEN_CACHE", str(cache))
    return cache


def git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A tiny 'upstream' git tree with one C file."""
    tree = tmp_path / "upstream"
    tree.mkdir()
    git(tree, "init", "-q", "-b", "master")
    git(tree, "config", "user.name", "Test Identity")
    git(tree, "config", "user.email", "test@example.invalid")
    (tree / "runstate.c").write_text("".join(f"int line{i};\n" for i in range(40)))
    git(tree, "add", ".")
    git(tree, "commit", "-q", "-m", "initial")
    return tree


def make_patch(tree: Path, out_dir: Path, subject: str, edit) -> Path:
    """Commit `edit(tree)` on a scratch branch and export it as a patch file."""
    git(tree, "checkout", "-q", "-b", f"p{len(list(out_dir.glob('*.patch')))}")
    edit(tree)
    git(tree, "commit", "-q", "-a", "-s", "-m", f"{subject}\n\nBody explaining why.")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = git(tree, "format-patch", "-1", "-o", str(out_dir), "HEAD")
    git(tree, "checkout", "-q", "-")
    return Path(name)
