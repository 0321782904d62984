"""Patch series: parse quilt `series` files, apply with `git am`, export back.

A series is the product: `patches/<project>/series` lists git format-patch
files in order, exactly as a packager drops them into debian/patches.  The
work tree gets one commit per patch on top of the `fixups` tag, so developers
edit C there and `refresh` regenerates the patch files from the commits.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness import config, sources
from harness.progress import say

VARIANTS = ("stock", "frozen")
STATE_FILE = "frozen-applied.json"


class SeriesError(Exception):
    """A series file is malformed or names a missing patch."""


class PatchError(Exception):
    """A patch does not apply cleanly; names the patch and the failing hunk."""

    def __init__(self, patch: Path, detail: str):
        super().__init__(f"patch {patch.name} does not apply:\n{detail}")
        self.patch = patch
        self.detail = detail


class TreeBusy(Exception):
    """The work tree holds work that is not in the series; refusing to reset it."""


# --------------------------------------------------------------------------
# series files


def parse_series(text: str, origin: str = "series") -> list[str]:
    """Patch names of a quilt series file, in order.

    Blank lines and comments are skipped; quilt's per-patch `-p1` option is
    accepted, any other strip level is refused since `git am` applies -p1.
    """
    names: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *options = line.split()
        if options and options != ["-p1"]:
            raise SeriesError(
                f"{origin}:{lineno}: unsupported options {' '.join(options)!r} "
                f"for {name} (only -p1 is applied)"
            )
        if "/" in name or name in (".", ".."):
            raise SeriesError(f"{origin}:{lineno}: {name!r} is not a file name in this dir")
        if name in names:
            raise SeriesError(f"{origin}:{lineno}: {name} is listed twice")
        names.append(name)
    return names


def series(project: str, variant: str = "frozen", directory: Path | None = None) -> list[Path]:
    """The patch files of `project`'s series; empty for the stock variant."""
    if variant not in VARIANTS:
        raise SeriesError(f"unknown variant {variant!r} (expected one of {VARIANTS})")
    if variant == "stock":
        return []
    directory = directory or config.patches_dir(project)
    series_file = directory / "series"
    if not series_file.exists():
        return []
    paths = [directory / n for n in parse_series(series_file.read_text(), str(series_file))]
    for path in paths:
        if not path.is_file():
            raise SeriesError(f"{series_file} lists {path.name}, which is not in {directory}")
    return paths


def series_digest(paths: list[Path]) -> str:
    """sha256 over the names and bytes of the series, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# --------------------------------------------------------------------------
# applying


def _failing_hunk(tree: Path, patch: Path) -> str:
    """`git apply --check -v` output narrowed to the failing file and hunk."""
    proc = subprocess.run(
        ["git", "-C", str(tree), "apply", "--check", "-v", str(patch)],
        capture_output=True,
        text=True,
    )
    out = proc.stderr + proc.stdout
    failed = re.findall(r"^error: patch failed: (\S+)$", out, re.M)
    searched = re.search(r"^error: while searching for:\n(.*?)(?=^error:)", out, re.M | re.S)
    lines = []
    if failed:
        lines.append(f"  failing hunk at {failed[0]}")
    if searched:
        lines.append("  context not found in the tree:")
        lines += ["    | " + ln for ln in searched.group(1).rstrip("\n").splitlines()[:20]]
    if not lines:
        lines = ["  " + ln for ln in out.strip().splitlines()[-15:]]
    return "\n".join(lines)


def apply_series(tree: Path, paths: list[Path]) -> None:
    """`git am` each patch in order, without 3-way merge and without fuzz."""
    for path in paths:
        proc = subprocess.run(
            ["git", "-C", str(tree), "am", "--no-3way", "--quiet", "--keep-cr", str(path)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            subprocess.run(["git", "-C", str(tree), "am", "--abort"], capture_output=True)
            raise PatchError(path, _failing_hunk(tree, path))


# --------------------------------------------------------------------------
# work trees


@dataclass(frozen=True)
class Tree:
    project: str
    variant: str
    path: Path
    base: sources.Base
    patches: tuple[Path, ...]

    @property
    def build_dir(self) -> Path:
        return self.path / "build"


def tree_path(project: str, variant: str) -> Path:
    return config.cache_root() / "trees" / f"{project}-{variant}"


def _state(path: Path) -> dict | None:
    try:
        return json.loads((path / ".git" / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _head(path: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def _check_not_busy(path: Path, state: dict | None, force: bool) -> None:
    if force or not (path / ".git").exists():
        return
    dirty = subprocess.run(
        ["git", "-C", str(path), "status", "--porcelain"], capture_output=True, text=True
    ).stdout.strip()
    moved = state is None or _head(path) != state.get("head")
    if dirty or moved:
        what = "uncommitted changes" if dirty else "commits that are not in the series"
        raise TreeBusy(
            f"{path} has {what}; export them with `frozen refresh --project "
            f"{path.name.rsplit('-', 1)[0]}` or pass --force to discard them"
        )


def prepare(
    project: str,
    variant: str = "frozen",
    *,
    local: Path | None = None,
    path: Path | None = None,
    force: bool = False,
    series_dir: Path | None = None,
) -> Tree:
    """A work tree of `project` with the series applied, reused when current.

    The tree is re-made only when its base changed; a changed series is
    re-applied on the existing tree so the build dir inside it stays warm.
    """
    path = path or tree_path(project, variant)
    base = sources.resolve_base(project, local)
    patches = series(project, variant, series_dir)
    digest = series_digest(patches)
    state = _state(path)
    if (path / ".git").is_dir():
        sources.write_excludes(path, base)
    if (
        state
        and state.get("base") == base.ident
        and state.get("series") == digest
        and _head(path) == state.get("head")
    ):
        return Tree(project, variant, path, base, tuple(patches))
    _check_not_busy(path, state, force)
    if state and state.get("base") == base.ident:
        say(f"re-applying the {project} series in {path}")
        subprocess.run(["git", "-C", str(path), "reset", "--quiet", "--hard", "fixups"], check=True)
        # Without -x: ignored paths (the build dir, untracked submodules) stay.
        subprocess.run(["git", "-C", str(path), "clean", "-q", "-fd"], check=True)
    else:
        sources.make_tree(base, path)
    say(f"applying {len(patches)} patch(es) to {project} ({variant})")
    apply_series(path, patches)
    (path / ".git" / STATE_FILE).write_text(
        json.dumps({"base": base.ident, "series": digest, "head": _head(path)}, indent=1)
    )
    return Tree(project, variant, path, base, tuple(patches))


def refresh(project: str, tree: Path | None = None, directory: Path | None = None) -> list[Path]:
    """Regenerate `patches/<project>` from the tree's commits after `fixups`."""
    tree = tree or tree_path(project, "frozen")
    directory = directory or config.patches_dir(project)
    directory.mkdir(parents=True, exist_ok=True)
    # Old files go only once the new ones exist, so a failure loses nothing.
    old = set(directory.glob("*.patch"))
    proc = subprocess.run(
        [
            "git",
            "-C",
            str(tree),
            "format-patch",
            "--zero-commit",
            "--no-signature",
            "-o",
            str(directory),
            "fixups..HEAD",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SeriesError(f"git format-patch failed in {tree}:\n{proc.stderr}")
    new = [Path(line) for line in proc.stdout.splitlines() if line.endswith(".patch")]
    for stale in old - set(new):
        stale.unlink()
    (directory / "series").write_text("".join(p.name + "\n" for p in new))
    say(f"refreshed {len(new)} patch(es) into {directory}")
    state = _state(tree)
    if state is not None:
        state.update(series=series_digest(new), head=_head(tree))
        (tree / ".git" / STATE_FILE).write_text(json.dumps(state, indent=1))
    return new
