"""Apply a series the way distributions do: quilt on the Debian source tree, patch -p1.

The Debian source tree is what `dpkg-source -x` yields for a 3.0 (quilt)
package: the orig tarball unpacked, the debian.tar.xz unpacked into it and
Debian's own patch series pushed with quilt.  The .dsc itself is not used
(it is not served for every pinned package here); the two tarballs it names
are the pinned, verified artifacts.  The tree is made once per pinned
artifacts, as a git tree whose tag `debian` holds Debian's series applied
(quilt's .pc state included), so every check starts from a clean reset
instead of a fresh unpack; its tag `base` is the pristine orig tarball.

Every apply runs with fuzz 0: an offset is reported, fuzz is a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import config, sources
from harness.progress import say

QUILT_PATCHES = "debian/patches"
STAMP_FILE = "frozen-debsrc.json"
#: Bump when the way the Debian tree is made changes.
DEBSRC_VERSION = "1"


class DistroError(Exception):
    """The Debian source tree cannot be made, or a tool failed unexpectedly."""


@dataclass(frozen=True)
class Outcome:
    """How one patch applied: cleanly, with offsets, or not at all."""

    patch: str
    ok: bool
    offsets: tuple[str, ...] = ()
    detail: str = ""

    @property
    def status(self) -> str:
        if not self.ok:
            return "does not apply"
        return "applies with offset" if self.offsets else "applies"


@dataclass(frozen=True)
class DebianTree:
    """A Debian source tree with Debian's own series pushed."""

    project: str
    path: Path
    debian_patches: tuple[Outcome, ...]


# --------------------------------------------------------------------------
# GNU patch output (quilt runs patch, rpm's %autosetup runs patch)

_FILE_RE = re.compile(r"^patching file '?([^'\n]+)'?$", re.M)
_OFFSET_RE = re.compile(
    r"^Hunk #(\d+) succeeded at (\d+)(?: with fuzz (\d+))?"
    r"(?: \(offset (-?\d+) lines?\))?\.$"
)
_FAILED_RE = re.compile(r"^Hunk #(\d+) FAILED at (\d+)", re.M)


def read_patch_output(name: str, output: str, rc: int) -> Outcome:
    """An Outcome from GNU patch's (or quilt push's) output for one patch."""
    offsets: list[str] = []
    problems: list[str] = []
    current = "?"
    for line in output.splitlines():
        file_match = _FILE_RE.match(line)
        if file_match:
            current = file_match.group(1)
            continue
        hunk = _OFFSET_RE.match(line)
        if hunk and hunk.group(3):
            problems.append(f"{current}: hunk #{hunk.group(1)} needs fuzz {hunk.group(3)}")
        elif hunk and hunk.group(4):
            offsets.append(f"{current}: hunk #{hunk.group(1)} offset {hunk.group(4)}")
        failed = _FAILED_RE.match(line)
        if failed:
            problems.append(f"{current}: hunk #{failed.group(1)} FAILED at line {failed.group(2)}")
    ok = rc == 0 and not problems
    if not ok and not problems:
        problems = [ln for ln in output.strip().splitlines()[-10:]]
    return Outcome(name, ok, tuple(offsets), "\n".join(problems))


def patch_in_order(tree: Path, files: list[Path]) -> list[Outcome]:
    """`patch -p1 --fuzz=0` each file in order, as rpm's %autosetup -p1 does.

    Stops at the first patch that does not apply (later ones depend on it).
    """
    outcomes = []
    for path in files:
        proc = subprocess.run(
            [
                "patch",
                "-p1",
                "--fuzz=0",
                "--batch",
                "--forward",
                "--no-backup-if-mismatch",
                "-d",
                str(tree),
                "-i",
                str(path.resolve()),
            ],
            capture_output=True,
            text=True,
        )
        outcome = read_patch_output(path.name, proc.stdout + proc.stderr, proc.returncode)
        outcomes.append(outcome)
        if not outcome.ok:
            break
    return outcomes


# --------------------------------------------------------------------------
# quilt


def _quilt(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QUILT_PATCHES": QUILT_PATCHES, "QUILT_PC": ".pc", "LC_ALL": "C"}
    # No ~/.quiltrc: the result must not depend on who runs it.
    return subprocess.run(
        ["quilt", "--quiltrc=/dev/null", *args], cwd=tree, env=env, capture_output=True, text=True
    )


def quilt_push_all(tree: Path) -> list[Outcome]:
    """`quilt push -a --fuzz=0`, split into one Outcome per patch it tried."""
    proc = _quilt(tree, "push", "-a", "--fuzz=0")
    output = proc.stdout + proc.stderr
    if "No patches in series" in output or "File series fully applied" in output:
        return []
    blocks = re.split(r"^Applying patch (\S+)\n", output, flags=re.M)
    outcomes = []
    for name, text in zip(blocks[1::2], blocks[2::2], strict=True):
        failed = re.search(rf"^Patch {re.escape(name)} does not apply", text, re.M)
        outcomes.append(read_patch_output(name, text, 1 if failed else 0))
    if proc.returncode != 0 and (not outcomes or outcomes[-1].ok):
        raise DistroError(f"quilt push -a failed in {tree}:\n{output[-2000:]}")
    return outcomes


def quilt_applied(tree: Path) -> list[str]:
    proc = _quilt(tree, "applied")
    return proc.stdout.split() if proc.returncode == 0 else []


# --------------------------------------------------------------------------
# the Debian source tree


def debsrc_path(project: str) -> Path:
    return config.cache_root() / "trees" / f"{project}-debsrc"


def _git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def _key(base: sources.Base) -> str:
    return f"{base.ident}:{DEBSRC_VERSION}"


def _load(path: Path, key: str, project: str) -> DebianTree | None:
    try:
        stamp = json.loads((path / ".git" / STAMP_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if stamp.get("key") != key:
        return None
    outcomes = tuple(Outcome(o["patch"], True, tuple(o["offsets"])) for o in stamp["debian"])
    return DebianTree(project, path, outcomes)


def debian_tree(project: str) -> DebianTree:
    """The Debian source tree of `project`'s pinned version, Debian's series pushed."""
    base = sources.resolve_base(project)
    if base.debian is None:
        raise DistroError(f"sources.lock pins no debian.tar.xz for {project}")
    path = debsrc_path(project)
    key = _key(base)
    cached = _load(path, key, project)
    if cached is not None:
        return cached
    say(f"making the Debian source tree of {project} in {path}")
    # The base commit is the whole orig tarball (nothing left untracked, as
    # dpkg-source unpacks it); Debian's fix-ups come with its whole series
    # below, not as the harness's separate commit.
    sources.make_tree(dataclasses.replace(base, fixups=(), untracked=()), path)
    subprocess.run(["tar", "-xf", str(base.debian), "-C", str(path), "--no-same-owner"], check=True)
    _git(path, "add", "--all", "--force", ".")
    _git(path, "commit", "--quiet", "--no-verify", "-m", f"debian/ from {base.debian.name}")
    outcomes = quilt_push_all(path)
    bad = [o for o in outcomes if not o.ok]
    if bad:
        raise DistroError(
            f"Debian's own series of {project} does not apply with fuzz 0: "
            f"{bad[0].patch}\n{bad[0].detail}"
        )
    _git(path, "add", "--all", "--force", ".")
    _git(
        path,
        "commit",
        "--quiet",
        "--no-verify",
        "-m",
        f"Debian series applied ({len(outcomes)} patches)",
    )
    _git(path, "tag", "-f", "debian")
    (path / ".git" / STAMP_FILE).write_text(
        json.dumps(
            {
                "key": key,
                "debian": [{"patch": o.patch, "offsets": list(o.offsets)} for o in outcomes],
            },
            indent=1,
        )
    )
    return DebianTree(project, path, tuple(outcomes))


def reset(tree: DebianTree, tag: str = "debian") -> None:
    """Back to tag `debian` (Debian's series applied) or `base` (the orig tarball).

    `base` is the verified orig tarball committed as unpacked, so resetting
    to it gives the pristine source without unpacking it again.
    """
    _git(tree.path, "reset", "--quiet", "--hard", f"refs/tags/{tag}")
    _git(tree.path, "clean", "-q", "-fdx")


def push_ours(tree: DebianTree, entries: list[tuple[str, Path]]) -> list[Outcome]:
    """Add `entries` (series line, file) after Debian's series and `quilt push -a`.

    Exactly what a packager does with the export: the files go under
    debian/patches/ and the lines are appended to debian/patches/series.
    """
    reset(tree)
    patches_dir = tree.path / QUILT_PATCHES
    with (patches_dir / "series").open("a") as series:
        for line, path in entries:
            target = patches_dir / line
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            series.write(line + "\n")
    outcomes = quilt_push_all(tree.path)
    applied = quilt_applied(tree.path)
    expected = [o.patch for o in tree.debian_patches] + [line for line, _ in entries]
    if all(o.ok for o in outcomes) and applied != expected:
        raise DistroError(
            f"quilt reports {len(applied)} applied patches, expected "
            f"{len(expected)} (Debian's and ours)"
        )
    return outcomes


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary dir in the cache (same file system as the trees)."""
    root = config.cache_root() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=root)
