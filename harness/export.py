"""Export the series for the people who never run the harness.

* debian: DEP-3 patch files under `frozen/` plus a `series` fragment, a
  drop-in for debian/patches/; verified with quilt on the Debian source tree.
* rpm: the patch files plus a spec snippet of `PatchNNNN:` lines for
  `%autosetup -p1`; verified with `patch -p1 --fuzz=0` on the pristine tarball.
* mail: `git format-patch --cover-letter -v N` with a written cover letter,
  To/Cc from the tree's own rules and the submitter's Signed-off-by;
  verified with `git am` on the base; optionally checked against an upstream
  tree (`--onto`), patch by patch.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from harness import config, distro, gates, patches, sources
from harness.progress import say

DEBIAN_SUBDIR = "frozen"
RPM_SNIPPET = "frozen-patches.spec.inc"
RPM_FIRST = 9001
COVER = "0000-cover-letter.patch"


class ExportError(Exception):
    """An export cannot be made or its verification failed."""


# --------------------------------------------------------------------------
# reading a git format-patch file


@dataclass(frozen=True)
class PatchFile:
    """The parts of a git format-patch file the exports need."""

    path: Path
    author: str
    date: datetime
    subject: str
    message: str  # the commit message body, trailers included
    diff: str  # everything after the `---` line: diffstat and diff


def _header(message: email.message.Message, name: str) -> str:
    raw = message.get(name, "")
    text = str(email.header.make_header(email.header.decode_header(str(raw))))
    return " ".join(text.split())


def read_patch(path: Path) -> PatchFile:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    subject = re.sub(r"^\[PATCH[^\]]*\]\s*", "", _header(message, "Subject"))
    date_text = _header(message, "Date")
    if not (message.get("From") and date_text):
        raise ExportError(f"{path.name}: not a git format-patch file (no From or Date)")
    raw = message.get_payload(decode=True) or b""
    assert isinstance(raw, bytes)  # decode=True on a non-multipart message
    payload = raw.decode("utf-8", errors="replace")
    body, sep, diff = payload.partition("\n---\n")
    if not sep:
        raise ExportError(f"{path.name}: no '---' line between message and diff")
    # format-patch's signature ("-- \n2.39.5") is mail decoration, not patch.
    diff = re.sub(r"\n-- \n[^\n]*\n*\Z", "\n", diff)
    return PatchFile(
        path,
        _header(message, "From"),
        email.utils.parsedate_to_datetime(date_text),
        subject,
        body.strip("\n"),
        diff,
    )


# --------------------------------------------------------------------------
# debian


def dep3_header(patch: PatchFile, forwarded: str = "no") -> str:
    """DEP-3 fields: Description (subject + body), Author, Forwarded, Last-Update."""
    lines = [f"Description: {patch.subject}"]
    for line in patch.message.splitlines():
        lines.append(f" {line}" if line.strip() else " .")
    lines += [
        f"Author: {patch.author}",
        f"Forwarded: {forwarded}",
        f"Last-Update: {patch.date.strftime('%Y-%m-%d')}",
    ]
    return "\n".join(lines) + "\n"


def to_dep3(patch: PatchFile, forwarded: str = "no") -> str:
    return dep3_header(patch, forwarded) + "---\n" + patch.diff


def export_debian(files: list[Path], out_dir: Path, forwarded: str = "no") -> list[Path]:
    """DEP-3 copies of `files` in out_dir/frozen/ and out_dir/series (to append)."""
    target = out_dir / DEBIAN_SUBDIR
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    written = []
    for path in files:
        out = target / path.name
        out.write_text(to_dep3(read_patch(path), forwarded))
        written.append(out)
    (out_dir / "series").write_text("".join(f"{DEBIAN_SUBDIR}/{p.name}\n" for p in written))
    return written


def series_entries(out_dir: Path) -> list[tuple[str, Path]]:
    """(series line, file) of an export dir, as its `series` fragment lists them."""
    lines = [ln.split("#", 1)[0].strip() for ln in (out_dir / "series").read_text().splitlines()]
    return [(ln.split()[0], out_dir / ln.split()[0]) for ln in lines if ln]


@dataclass(frozen=True)
class DebianCheck:
    debian_patches: int
    ours: list[distro.Outcome]
    applied: list[str]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.ours) and len(self.applied) == self.debian_patches + len(
            self.ours
        )


def verify_debian(project: str, out_dir: Path) -> DebianCheck:
    """quilt push -a of the export onto the Debian tree (Debian's series first)."""
    tree = distro.debian_tree(project)
    entries = series_entries(out_dir)
    outcomes = distro.push_ours(tree, entries)
    applied = distro.quilt_applied(tree.path)
    distro.reset(tree)
    if len(outcomes) != len(entries) and all(o.ok for o in outcomes):
        raise ExportError(f"quilt tried {len(outcomes)} of {len(entries)} exported patches")
    return DebianCheck(len(tree.debian_patches), outcomes, applied)


# --------------------------------------------------------------------------
# rpm


def spec_snippet(names: list[str], project: str, first: int = RPM_FIRST) -> str:
    """`PatchNNNN:` lines in series order; %autosetup -p1 applies them by number."""
    lines = [
        f"# Frozen series for {project}: {len(names)} patch(es), `frozen export rpm`.",
        "# Paste into the spec preamble; `%autosetup -p1` applies them in number",
        "# order, after patches with lower numbers.",
    ]
    lines += [f"Patch{first + i:04d}: {name}" for i, name in enumerate(names)]
    return "\n".join(lines) + "\n"


def parse_spec_snippet(text: str) -> list[str]:
    """Patch file names of a spec snippet, in the order rpm applies them."""
    numbered = [
        (int(m.group(1)), m.group(2)) for m in re.finditer(r"^Patch(\d+):\s*(\S+)\s*$", text, re.M)
    ]
    return [name for _, name in sorted(numbered)]


def export_rpm(files: list[Path], out_dir: Path, project: str, first: int = RPM_FIRST) -> Path:
    """The patch files unchanged plus the spec snippet; returns the snippet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.patch"):
        stale.unlink()
    for path in files:
        shutil.copyfile(path, out_dir / path.name)
    snippet = out_dir / RPM_SNIPPET
    snippet.write_text(spec_snippet([p.name for p in files], project, first))
    return snippet


def verify_rpm(project: str, out_dir: Path) -> list[distro.Outcome]:
    """patch -p1 --fuzz=0, in the snippet's order, onto the pinned orig tarball.

    The tarball's content is the `base` commit of the Debian source tree.
    """
    names = parse_spec_snippet((out_dir / RPM_SNIPPET).read_text())
    tree = distro.debian_tree(project)
    distro.reset(tree, "base")
    try:
        return distro.patch_in_order(tree.path, [out_dir / n for n in names])
    finally:
        distro.reset(tree)


# --------------------------------------------------------------------------
# mail: recipients, cover letter, format-patch, git am, rebase check


@dataclass(frozen=True)
class Recipients:
    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    source: str = ""


def qemu_recipients(tree: Path, files: list[Path]) -> Recipients:
    """scripts/get_maintainer.pl of the tree: the all-patches list is To, the rest Cc."""
    script = tree / "scripts" / "get_maintainer.pl"
    proc = subprocess.run(
        ["perl", str(script), "--no-git", "--no-git-fallback", *map(str, files)],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ExportError(f"{script} failed:\n{proc.stderr[-1500:]}")
    lists: list[tuple[str, str]] = []
    people: list[tuple[str, str]] = []
    for line in proc.stdout.splitlines():
        address, _, role = line.partition(" (")
        if address.strip():
            (lists if "list" in role else people).append((address.strip(), role))
    if not lists:
        raise ExportError(f"{script} named no mailing list for the series")
    # MAINTAINERS marks the list every patch goes to ("All patches CC here"):
    # that one is To, the subsystem lists and the people are Cc.
    to = [a for a, role in lists if "All patches" in role] or [a for a, _ in lists]
    cc = [a for a, _ in lists if a not in to] + [a for a, _ in people]
    return Recipients(tuple(to), tuple(cc), "scripts/get_maintainer.pl")


def libvirt_recipients(tree: Path) -> Recipients:
    """The list address libvirt's docs/submitting-patches.rst tells you to use."""
    doc = tree / "docs" / "submitting-patches.rst"
    found = Counter(re.findall(r"--to=([\w.+-]+@[\w.-]+\w)", doc.read_text()))
    if not found:
        raise ExportError(f"{doc} names no --to= list address")
    return Recipients((found.most_common(1)[0][0],), (), "docs/submitting-patches.rst")


def recipients(project: str, tree: Path, files: list[Path]) -> Recipients:
    if project == "qemu":
        return qemu_recipients(tree, files)
    if project == "libvirt":
        return libvirt_recipients(tree)
    raise ExportError(f"no submission rules known for {project}")


def parse_signoff(signoff: str | None) -> tuple[str, str]:
    """(name, email) of `--signoff "Name <email>"`; refuses anything else."""
    if not signoff:
        raise ExportError(
            'refusing to export for mail without --signoff "Name <email>": '
            "the submitter certifies the DCO for every patch"
        )
    name, address = email.utils.parseaddr(signoff)
    if not name or not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+", address):
        raise ExportError(f'--signoff {signoff!r} is not of the form "Name <email>"')
    return name, address


NO_PROOF = "No `frozen test` results on the exporting machine; run it before sending.\n"

PROVENANCE_POLICY = {
    "qemu": """\
QEMU's docs/devel/code-provenance.rst declines contributions believed to
include or derive from AI-generated content.""",
    "libvirt": """\
Check libvirt's current contributor docs for its rules on generated
content (QEMU's docs/devel/code-provenance.rst declines such content).""",
}


def provenance(project: str) -> str:
    """The plain statement a submitter must read before signing off."""
    return (
        "Provenance: this series was written with the help of an AI assistant.\n"
        + PROVENANCE_POLICY[project]
        + "\nWhoever signs off on these patches certifies "
        "the Developer's\nCertificate of Origin for them and must decide whether "
        "they can.\n"
    )


WHAT_WHY = {
    "qemu": """\
This series adds a `frozen` run state to QEMU.

It targets QEMU 12.0: 11.2 is in its freeze, so a new feature posted now
lands in 12.0, and the `Since:` tags say so. The series is based on
10.2.2 because that is the release the distribution that carries it
ships; it is meant to be rebased onto master for merging.

Why: a VM that failed (guest panic, watchdog, I/O error, KVM internal
error) can today be killed, which loses the memory that explains the
failure, or paused, which keeps the memory but lets anybody resume it and
keeps its disks, image locks and network backends in use. A cluster
manager failing the VM over needs a third state: stopped for good,
harmless to the outside, memory still readable.

The contract of the state:
- entered by QMP/HMP `freeze`, `-action panic=freeze`,
  `-action watchdog=freeze`, `-action internal-error=freeze`, and
  werror/rerror or a block job's on-error `freeze`; each trigger's event
  reports what really happened ("freeze", or "pause"/"stop" where the
  freeze was refused, e.g. during a migration);
- entering it: the state is set and the vCPUs stop; the network is
  severed for good (links down, queued packets dropped without being
  completed, backends closed); the NBD server and exports are stopped and
  block jobs cancelled; block I/O is drained and flushed once; every node
  is inactivated (image locks dropped) and the images of released nodes
  closed; the block layer then fails every write to any node; FROZEN is
  emitted once, saying whether every node was released;
- refused up front: a freeze during an incoming migration, a running
  migration or snapshot, COLO, record/replay, or with devices whose I/O
  QEMU cannot sever (vhost-user, vfio, ...);
- while frozen, every command that could run the guest, reopen or write
  an image, or reconnect the network is refused with an error naming the
  state; reads (query-*, dump-guest-memory, pmemsave, memsave, qemu-io
  reads) stay allowed, `freeze` is idempotent and `quit` works;
- no command leaves the state: only quitting QEMU ends a frozen VM.
""",
    "libvirt": """\
This series adds the VIR_DOMAIN_FROZEN domain state to libvirt, mapping
QEMU's `frozen` run state (proposed on qemu-devel).

Why: a failed domain should be stoppable for good, harmless to its storage
and network, while its memory stays readable for diagnosis; paused is not
that (anybody can resume it) and destroy loses the memory.

The contract:
- virDomainFreeze() / `virsh freeze`, VIR_DOMAIN_FROZEN with reasons and
  the VIR_DOMAIN_EVENT_FROZEN event;
- <on_crash>freeze</on_crash>, <watchdog action='freeze'/> and disk
  error_policy='freeze' map to the QEMU triggers;
- resume, suspend, save, managed save, migration and snapshot creation of a
  frozen domain fail with VIR_ERR_OPERATION_INVALID; destroy, memory-only
  core dump and memory peek are allowed; the state survives a daemon
  restart.
""",
}


def cover_letter(
    project: str,
    files: list[Path],
    gate_results: list[gates.GateResult],
    rebase: list[RebaseResult] | None,
    proof: str = "",
) -> tuple[str, str]:
    """(subject, blurb) of the cover letter: what, why, how tested, provenance."""
    pin = config.pin(project)
    subject = {
        "qemu": "add a frozen run state: stopped for good, I/O severed",
        "libvirt": "add the VIR_DOMAIN_FROZEN domain state",
    }[project]
    failed = [r for r in gate_results if not r.ok]
    tested = [
        f"Based on {project} {pin.version}; {len(files)} patches.",
        f"Gates run at export: {', '.join(sorted({r.gate for r in gate_results}))}: "
        f"{len(gate_results) - len(failed)} passed, {len(failed)} failed.",
    ]
    tested += [
        f"- {r.gate} {r.patch}: {r.detail.splitlines()[0] if r.detail else ''}" for r in failed
    ]
    if rebase is not None:
        tested.append(
            "Rebase check against the upstream tree: "
            + ", ".join(f"{n} {s}" for s, n in Counter(r.status for r in rebase).items())
        )
    blurb = (
        WHAT_WHY[project]
        + "\nHow it was tested:\n"
        + "\n".join(tested)
        + "\n"
        + (proof or NO_PROOF)
        + "\n"
        + provenance(project)
    )
    return subject, blurb


@dataclass(frozen=True)
class RebaseResult:
    patch: str
    status: str  # "applies", "applies with offset", "conflicts"
    detail: str = ""


def _apply_one(tree: Path, patch: Path) -> RebaseResult:
    proc = subprocess.run(
        ["git", "-C", str(tree), "apply", "-v", "--check", str(patch)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return RebaseResult(patch.name, "conflicts", patches._failing_hunk(tree, patch))
    subprocess.run(
        ["git", "-C", str(tree), "apply", "--index", str(patch)], check=True, capture_output=True
    )
    offsets = re.findall(
        r"^(Hunk #\d+ succeeded at \d+ \(offset -?\d+ lines?\))\.$", proc.stderr + proc.stdout, re.M
    )
    if offsets:
        return RebaseResult(patch.name, "applies with offset", "; ".join(offsets))
    return RebaseResult(patch.name, "applies")


def rebase_report(upstream: Path, files: list[Path]) -> list[RebaseResult]:
    """Each patch in order onto upstream's HEAD (a scratch clone), no fuzz.

    A conflicting patch is left out and the next ones are still tried, so
    the report names every patch that needs work, not just the first.
    """
    if not (upstream / ".git").exists() and not upstream.name.endswith(".git"):
        raise ExportError(f"--onto {upstream}: not a git tree")
    with distro.scratch_dir("onto-") as tmp:
        clone = Path(tmp) / "tree"
        subprocess.run(
            ["git", "clone", "--quiet", "--shared", str(upstream), str(clone)],
            check=True,
            capture_output=True,
        )
        return [_apply_one(clone, path) for path in files]


@dataclass(frozen=True)
class MailExport:
    files: list[Path]
    recipients: Recipients
    gate_results: list[gates.GateResult]
    rebase: list[RebaseResult] | None = None


def _format_patch(
    tree: Path, out_dir: Path, signer: tuple[str, str], version: int, rcpt: Recipients
) -> list[Path]:
    cmd = [
        "git",
        "-C",
        str(tree),
        "-c",
        f"user.name={signer[0]}",
        "-c",
        f"user.email={signer[1]}",
        "format-patch",
        "--cover-letter",
        "--signoff",
        "--zero-commit",
        "--no-signature",
        f"-v{version}",
        "--thread=shallow",
        "-o",
        str(out_dir),
    ]
    cmd += [f"--to={a}" for a in rcpt.to] + [f"--cc={a}" for a in rcpt.cc]
    proc = subprocess.run([*cmd, "fixups..HEAD"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExportError(f"git format-patch failed in {tree}:\n{proc.stderr}")
    return [Path(line) for line in proc.stdout.splitlines() if line.endswith(".patch")]


def _fill_cover(cover: Path, subject: str, blurb: str) -> None:
    text = cover.read_text()
    if "*** SUBJECT HERE ***" not in text or "*** BLURB HERE ***" not in text:
        raise ExportError(f"{cover.name}: git's cover-letter placeholders not found")
    cover.write_text(
        text.replace("*** SUBJECT HERE ***", subject).replace(
            "*** BLURB HERE ***", blurb.rstrip("\n")
        )
    )


def export_mail(
    project: str,
    tree: Path,
    out_dir: Path,
    *,
    signoff: str | None,
    version: int = 1,
    onto: Path | None = None,
    proof: str = "",
) -> MailExport:
    """format-patch the tree's commits after `fixups` for the mailing list."""
    signer = parse_signoff(signoff)
    commits = subprocess.run(
        ["git", "-C", str(tree), "rev-list", "fixups..HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not commits:
        raise ExportError(f"{tree}: no commits after `fixups`, nothing to mail")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.patch"):
        stale.unlink()
    with distro.scratch_dir("mail-") as tmp:
        plain = _format_plain(tree, Path(tmp))
        rcpt = recipients(project, tree, plain)
        results = [gates.shape(p) for p in plain]
        if project == "qemu":
            results += [gates.checkpatch(tree, p) for p in plain]
        rebase = rebase_report(onto, plain) if onto else None
    files = _format_patch(tree, out_dir, signer, version, rcpt)
    _fill_cover(files[0], *cover_letter(project, files[1:], results, rebase, proof))
    say(provenance(project).strip().replace("\n", " "))
    return MailExport(files, rcpt, results, rebase)


def _format_plain(tree: Path, out_dir: Path) -> list[Path]:
    proc = subprocess.run(
        [
            "git",
            "-C",
            str(tree),
            "format-patch",
            "--zero-commit",
            "--no-signature",
            "-o",
            str(out_dir),
            "fixups..HEAD",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return [Path(line) for line in proc.stdout.splitlines() if line.endswith(".patch")]


@dataclass(frozen=True)
class MailCheck:
    applied: int
    same_tree: bool
    signed: int


def verify_mail(tree: Path, files: list[Path], signoff: str) -> MailCheck:
    """`git am` the mails (cover letter excluded) onto `fixups` in a scratch clone.

    The result must be the tree the series makes, and every commit must end
    with the submitter's Signed-off-by.
    """
    name, address = parse_signoff(signoff)
    trailer = f"Signed-off-by: {name} <{address}>"
    mails = [p for p in files if not p.name.endswith(COVER)]
    with distro.scratch_dir("am-") as tmp:
        clone = Path(tmp) / "tree"
        subprocess.run(
            ["git", "clone", "--quiet", "--shared", "--no-checkout", str(tree), str(clone)],
            check=True,
            capture_output=True,
        )
        git = ["git", "-C", str(clone)]
        # git am records a committer: the repository's identity, as in the work trees.
        committer = sources.git_identity()
        subprocess.run([*git, "config", "user.name", committer[0]], check=True)
        subprocess.run([*git, "config", "user.email", committer[1]], check=True)
        subprocess.run([*git, "checkout", "--quiet", "--detach", "fixups"], check=True)
        try:
            patches.apply_series(clone, mails)
        except patches.PatchError as exc:
            raise ExportError(f"git am of the mail export failed: {exc}") from exc
        log = subprocess.run(
            [*git, "log", "--format=%B%x00", "fixups..HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        bodies = [b.strip() for b in log.split("\0") if b.strip()]
        signed = sum(b.splitlines()[-1] == trailer for b in bodies)
        same = _tree_id(clone) == _tree_id(tree)
        return MailCheck(len(bodies), same, signed)


def _tree_id(tree: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD^{tree}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
