"""Obtain the pinned base sources and unpack them into git work trees.

The pinned files are fetched through the machine's own apt configuration: a
private deb-src list derived from the Debian entries already configured on
the system, with a private state and cache dir, so nothing under /etc/apt
changes and no archive host is written anywhere.  Files are pinned by name
and sha256; when the suite's index no longer lists the version, the same file
is taken from Debian's standard pool path under the configured URI.

A local tarball or git tree can replace the Debian base (for rebasing onto
upstream); the Debian build fix-ups then do not apply.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from harness import config
from harness.progress import Progress, say

DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: How long a private apt index stays fresh before `apt-get update` again.
INDEX_MAX_AGE_S = 24 * 3600


class SourceError(Exception):
    """A base source cannot be obtained or unpacked."""


class ChecksumError(SourceError):
    def __init__(self, name: str, expected: str, actual: str, kept: Path | None = None):
        where = f"; the rejected file was moved to {kept}" if kept else ""
        super().__init__(
            f"checksum mismatch for {name}: sources.lock pins sha256 {expected}, "
            f"the downloaded file has sha256 {actual}{where}"
        )
        self.name = name
        self.expected = expected
        self.actual = actual


# --------------------------------------------------------------------------
# apt configuration


@dataclass(frozen=True)
class AptEntry:
    """A `deb` entry of the system's apt configuration."""

    uri: str
    suites: tuple[str, ...]
    signed_by: str | None = None


def _parse_deb822(text: str) -> list[AptEntry]:
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            entries.append(
                AptEntry(
                    uri.rstrip("/"),
                    tuple(fields.get("suites", "").split()),
                    fields.get("signed-by") or None,
                )
            )
    return entries


def _parse_one_line(text: str) -> list[AptEntry]:
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        options = {}
        match = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        rest = line[4:].strip()
        if match:
            for opt in match.group(1).split():
                k, _, v = opt.partition("=")
                options[k] = v
            rest = match.group(2)
        words = rest.split()
        if len(words) >= 2:
            entries.append(AptEntry(words[0].rstrip("/"), (words[1],), options.get("signed-by")))
    return entries


def system_apt_entries(etc_apt: Path = Path("/etc/apt")) -> list[AptEntry]:
    """Every enabled `deb` entry of the system's apt configuration."""
    entries: list[AptEntry] = []
    main_list = etc_apt / "sources.list"
    if main_list.is_file():
        entries += _parse_one_line(main_list.read_text())
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".sources":
                entries += _parse_deb822(path.read_text())
            elif path.suffix == ".list":
                entries += _parse_one_line(path.read_text())
    return entries


def debian_archive_entries(entries: list[AptEntry]) -> list[AptEntry]:
    """The entries that point at the main Debian archive.

    Recognised by their suites (Debian code names without -security, which
    lives in another archive) and the `debian` path component of the URI, so
    third-party repositories configured beside it are left out.
    """
    found: list[AptEntry] = []
    for entry in entries:
        path = urllib.parse.urlparse(entry.uri).path.rstrip("/")
        if not path.endswith("/debian"):
            continue
        if any(s.endswith("-security") for s in entry.suites):
            continue
        if entry.uri not in (e.uri for e in found):
            found.append(entry)
    return found


def private_sources_list(archive: list[AptEntry], suites: list[str]) -> str:
    """deb-src lines for `suites` on every configured Debian archive URI."""
    if not archive:
        raise SourceError(
            "no Debian archive entry found in the system's apt configuration "
            "(/etc/apt/sources.list, /etc/apt/sources.list.d): cannot derive deb-src sources"
        )
    lines = []
    for entry in archive:
        keyring = entry.signed_by or DEFAULT_KEYRING
        for suite in suites:
            lines.append(f"deb-src [signed-by={keyring}] {entry.uri} {suite} main")
    return "\n".join(lines) + "\n"


def pool_path(source: str, name: str) -> str:
    """Debian's standard pool path of a source package's file."""
    prefix = source[:4] if source.startswith("lib") else source[0]
    return f"pool/main/{prefix}/{source}/{urllib.parse.quote(name)}"


class PrivateApt:
    """apt-get with a private sources list, state and cache dir."""

    def __init__(self, root: Path, suites: list[str], etc_apt: Path = Path("/etc/apt")):
        self.root = root
        self.archive = debian_archive_entries(system_apt_entries(etc_apt))
        self.sources_list = root / "sources.list"
        self.lists = root / "lists"
        self.cache = root / "cache"
        for d in (self.lists / "partial", self.cache / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        text = private_sources_list(self.archive, suites)
        if not self.sources_list.exists() or self.sources_list.read_text() != text:
            self.sources_list.write_text(text)
            for old in self.lists.glob("*_Sources*"):
                old.unlink()

    def _options(self) -> list[str]:
        return [
            "-o",
            f"Dir::Etc::SourceList={self.sources_list}",
            "-o",
            "Dir::Etc::SourceParts=/nonexistent",
            "-o",
            f"Dir::State::Lists={self.lists}",
            "-o",
            f"Dir::Cache={self.cache}",
            "-o",
            "APT::Sandbox::User=root",
        ]

    def _fresh(self) -> bool:
        import time

        stamps = list(self.lists.glob("*_Sources*"))
        return bool(stamps) and all(
            time.time() - p.stat().st_mtime < INDEX_MAX_AGE_S for p in stamps
        )

    def update(self) -> None:
        if self._fresh():
            return
        say("apt-get update (private deb-src index)")
        proc = subprocess.run(
            ["apt-get", *self._options(), "update"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SourceError(
                f"apt-get update of the private deb-src list failed:\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )

    def source_uris(self, source: str, version: str) -> dict[str, str]:
        """File name -> URI for a source package version; {} when not listed."""
        self.update()
        proc = subprocess.run(
            [
                "apt-get",
                *self._options(),
                "source",
                "--print-uris",
                "--download-only",
                f"{source}={version}",
            ],
            capture_output=True,
            text=True,
            cwd=self.root,
        )
        uris = {}
        for match in re.finditer(r"^'([^']+)'\s+(\S+)\s+\d+\s+\S+", proc.stdout, re.M):
            uris[match.group(2)] = match.group(1)
        return uris

    def pool_uris(self, source: str, name: str) -> list[str]:
        return [f"{e.uri}/{pool_path(source, name)}" for e in self.archive]


# --------------------------------------------------------------------------
# downloads


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    """Raise ChecksumError (file moved aside, never used) unless sums match."""
    actual = sha256_file(path)
    if actual != expected:
        rejected = path.with_name(path.name + ".rejected")
        path.replace(rejected)
        raise ChecksumError(path.name, expected, actual, rejected)


def _download(uri: str, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(uri, timeout=60) as response, part.open("wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        progress = Progress(f"download {dest.name}", total, unit=" B")
        done = 0
        while block := response.read(1 << 20):
            out.write(block)
            done += len(block)
            progress.update(done)
        progress.finish()
    part.replace(dest)


def downloads_dir() -> Path:
    path = config.cache_root() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(pin: config.SourcePin, apt: PrivateApt | None = None) -> dict[str, Path]:
    """Every pinned artifact of `pin`, verified; role -> path in the cache."""
    out: dict[str, Path] = {}
    missing = []
    for art in pin.artifacts:
        path = downloads_dir() / art.name
        if path.exists():
            verify(path, art.sha256)
            out[art.role] = path
        else:
            missing.append(art)
    if not missing:
        return out
    apt = apt or PrivateApt(config.cache_root() / "apt", sorted({pin.suite, "sid", "trixie"}))
    listed = apt.source_uris(pin.debian_source, pin.debian_version)
    for art in missing:
        path = downloads_dir() / art.name
        candidates = ([listed[art.name]] if art.name in listed else []) + apt.pool_uris(
            pin.debian_source, art.name
        )
        errors = []
        for uri in candidates:
            try:
                _download(uri, path)
                break
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{urllib.parse.urlparse(uri).path}: {exc}")
        else:
            raise SourceError(f"cannot download {art.name}: " + "; ".join(errors))
        verify(path, art.sha256)
        out[art.role] = path
    return out


# --------------------------------------------------------------------------
# base trees


@dataclass(frozen=True)
class Base:
    """What a work tree starts from."""

    project: str
    kind: str  # "debian", "tarball" or "git"
    ident: str  # sha256 of the tarball(s) or the git commit id
    orig: Path
    debian: Path | None = None
    fixups: tuple[str, ...] = ()
    untracked: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        if self.kind == "debian":
            return f"{self.orig.name} (Debian {self.project})"
        return f"{self.kind} {self.orig}"


def _git(tree: Path, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(tree), *args], check=True, text=True, capture_output=True, **kw
    )


def git_identity() -> tuple[str, str]:
    """The Frozen repository's git identity, used for the work trees' commits.

    Its configured user, else the author of its newest commit (a fresh CI
    clone carries no local config); never a made-up name.
    """
    root = str(config.repo_root())

    def ask(*cmd: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *cmd], capture_output=True, text=True
        ).stdout.strip()

    name, email = ask("config", "user.name"), ask("config", "user.email")
    if not (name and email):
        name, email = ask("log", "-1", "--format=%an"), ask("log", "-1", "--format=%ae")
    if not (name and email):
        raise SourceError(
            "no git identity: set user.name and user.email in the Frozen repository "
            "(git config user.name ...); work-tree commits use it"
        )
    return name, email


def resolve_base(project: str, local: Path | None = None) -> Base:
    """The base for `project`: the pinned Debian source, or a local override."""
    if local is None:
        pin = config.pin(project)
        files = fetch(pin)
        pinned = "".join(f"{a.name}:{a.sha256}\n" for a in pin.artifacts)
        shape = "\n".join(pin.fixups) + "\0" + "\n".join(pin.untracked)
        ident = hashlib.sha256((pinned + shape).encode()).hexdigest()
        return Base(
            project, "debian", ident, files["orig"], files.get("debian"), pin.fixups, pin.untracked
        )
    local = local.expanduser().resolve()
    if (local / ".git").exists() or local.name.endswith(".git"):
        head = subprocess.run(
            ["git", "-C", str(local), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(local), "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
        if dirty:
            say(f"warning: {local} has uncommitted changes; only commit {head[:12]} is used")
        return Base(project, "git", head, local)
    if local.is_file():
        return Base(project, "tarball", sha256_file(local), local)
    raise SourceError(f"{local}: neither a tarball nor a git tree")


def _extract(tarball: Path, dest: Path) -> None:
    """Unpack `tarball` into `dest`, dropping its single top-level dir."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # --no-same-owner: files owned by the tarball's uid make git refuse
        # the tree as "dubious ownership" when running as root.
        subprocess.run(["tar", "-xf", str(tarball), "-C", tmp, "--no-same-owner"], check=True)
        tops = list(Path(tmp).iterdir())
        top = tops[0] if len(tops) == 1 and tops[0].is_dir() else Path(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        for item in top.iterdir():
            shutil.move(str(item), dest / item.name)


def _debian_file(debian_tarball: Path, member: str) -> bytes:
    with tarfile.open(debian_tarball) as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise SourceError(f"{debian_tarball.name} has no {member}")
        return handle.read()


def write_excludes(tree: Path, base: Base) -> None:
    """Paths git must not see as changes in a work tree.

    The build dir lives inside the tree so that ccache sees the same
    relative paths whichever tree (stock, frozen, bisect) is built; meson
    leaves its subproject lock file in the source tree.
    """
    info = tree / ".git" / "info"
    info.mkdir(parents=True, exist_ok=True)
    paths = [f"/{p}/" for p in ("build", *base.untracked)] + ["/subprojects/.wraplock"]
    (info / "exclude").write_text("".join(p + "\n" for p in paths))


def make_tree(base: Base, tree: Path) -> None:
    """Create `tree` as a git work tree: tag `base`, then tag `fixups`.

    The series is applied on top of `fixups`; for a local base the two tags
    name the same commit.
    """
    if tree.exists():
        shutil.rmtree(tree)
    tree.parent.mkdir(parents=True, exist_ok=True)
    say(f"unpacking {base.description} into {tree}")
    if base.kind == "git":
        subprocess.run(
            ["git", "clone", "--quiet", "--no-checkout", str(base.orig), str(tree)], check=True
        )
        _git(tree, "checkout", "--quiet", "-B", "frozen", base.ident)
    else:
        _extract(base.orig, tree)
        _git(tree, "init", "--quiet", "-b", "frozen")
    name, email = git_identity()
    _git(tree, "config", "user.name", name)
    _git(tree, "config", "user.email", email)
    write_excludes(tree, base)
    if base.kind != "git":
        # --force: the tarball may ship files its own .gitignore names.
        _git(tree, "add", "--all", "--force", "--", ".", *(f":!{p}" for p in base.untracked))
        _git(
            tree,
            "commit",
            "--quiet",
            "--no-verify",
            "-m",
            f"{base.project}: base {base.orig.name}\n\nsha256-ident: {base.ident}",
        )
    _git(tree, "tag", "-f", "base")
    if base.fixups:
        assert base.debian is not None
        for member in base.fixups:
            patch = _debian_file(base.debian, member)
            proc = subprocess.run(
                [
                    "patch",
                    "-p1",
                    "--no-backup-if-mismatch",
                    "--forward",
                    "--batch",
                    "-d",
                    str(tree),
                ],
                input=patch,
                capture_output=True,
            )
            if proc.returncode != 0:
                raise SourceError(
                    f"build fix-up {member} does not apply:\n{proc.stdout.decode()[-2000:]}"
                )
        _git(tree, "add", "--all", ".")
        _git(
            tree,
            "commit",
            "--quiet",
            "--no-verify",
            "-m",
            "build fix-ups for the Debian tarball\n\n"
            + "\n".join(f"Applied: {m}" for m in base.fixups),
        )
    _git(tree, "tag", "-f", "fixups")
