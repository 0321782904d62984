"""Where things live: the repository, the cache, the pinned lock file.

A leaf module: it reads the environment and the repository layout, nothing
else in the harness.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

PROJECTS = ("qemu", "libvirt", "resource-agents")
#: Projects the harness builds; resource-agents is shell and only patched.
BUILT_PROJECTS = ("qemu", "libvirt")

REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_root() -> Path:
    return REPO_ROOT


def cache_root() -> Path:
    """The harness cache: $FROZEN_CACHE, else $XDG_CACHE_HOME/frozen."""
    explicit = os.environ.get("FROZEN_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(xdg).expanduser() / "frozen").resolve()


def patches_dir(project: str) -> Path:
    return REPO_ROOT / "patches" / project


@dataclass(frozen=True)
class Artifact:
    """One pinned source file, identified by name and sha256."""

    name: str
    sha256: str
    role: str  # "orig" (the source tarball) or "debian" (packaging, fix-ups)


@dataclass(frozen=True)
class SourcePin:
    """The pinned base of one project, as recorded in sources.lock."""

    project: str
    version: str
    debian_source: str
    debian_version: str
    suite: str
    artifacts: tuple[Artifact, ...]
    #: Debian patches (paths inside the debian tarball) applied as build
    #: fix-ups before the series; kept out of the series itself.
    fixups: tuple[str, ...] = ()
    #: Paths of the tarball left untracked in the work tree (upstream submodules).
    untracked: tuple[str, ...] = ()

    def artifact(self, role: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.role == role), None)

    @property
    def orig(self) -> Artifact:
        art = self.artifact("orig")
        if art is None:
            raise LockError(f"sources.lock: {self.project} has no orig artifact")
        return art


class LockError(Exception):
    """sources.lock is missing, malformed or lacks an entry."""


def load_lock(path: Path | None = None) -> dict[str, SourcePin]:
    path = path or REPO_ROOT / "sources.lock"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise LockError(f"{path}: not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"{path}: {exc}") from exc
    pins: dict[str, SourcePin] = {}
    for project, entry in data.items():
        try:
            artifacts = tuple(
                Artifact(name=f["name"], sha256=f["sha256"].lower(), role=f["role"])
                for f in entry["files"]
            )
            pins[project] = SourcePin(
                project=project,
                version=entry["version"],
                debian_source=entry["debian_source"],
                debian_version=entry["debian_version"],
                suite=entry["suite"],
                artifacts=artifacts,
                fixups=tuple(entry.get("fixups", ())),
                untracked=tuple(entry.get("untracked", ())),
            )
        except (KeyError, TypeError) as exc:
            raise LockError(f"{path}: [{project}] lacks or misshapes {exc}") from exc
    return pins


def pin(project: str, path: Path | None = None) -> SourcePin:
    pins = load_lock(path)
    if project not in pins:
        raise LockError(f"sources.lock has no [{project}] entry")
    return pins[project]


#: Set to 1 by ``frozen test --partial``/``frozen verify --partial``: what the
#: host cannot prove (no KVM, no namespaces) is reported as not proven
#: instead of failing.
PARTIAL_ENV = "FROZEN_PARTIAL"


def partial_run() -> bool:
    return os.environ.get(PARTIAL_ENV, "") not in ("", "0")
