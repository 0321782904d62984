"""Command line: `frozen <command>` (also `python -m harness <command>`).

    fetch     download and verify the pinned base sources
    apply     make a work tree with the series applied (one commit per patch)
    refresh   regenerate patches/<project> from the work tree's commits
    build     build and install QEMU and libvirt (cached by content)
    verify    boot the probe guest on KVM, freeze it by every trigger, print a table
    all       fetch, apply, build, verify: the packager's proof
    test      the project's test suite (what CI runs)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import build, config, patches, sources
from harness.progress import say


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qemu-src", type=Path, metavar="PATH",
                        help="local QEMU tarball or git tree to use as the base")
    parser.add_argument("--libvirt-src", type=Path, metavar="PATH",
                        help="local libvirt tarball or git tree to use as the base")


def _local(args: argparse.Namespace, project: str) -> Path | None:
    return getattr(args, f"{project}_src", None)


def _projects(args: argparse.Namespace) -> list[str]:
    return [args.project] if getattr(args, "project", None) else list(config.BUILT_PROJECTS)


def cmd_fetch(args: argparse.Namespace) -> int:
    for project in (args.project,) if args.project else config.PROJECTS:
        for role, path in sources.fetch(config.pin(project)).items():
            print(f"{project}\t{role}\t{path}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    tree = patches.prepare(args.project, args.variant, local=_local(args, args.project),
                           path=args.tree, force=args.force)
    print(tree.path)
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    for path in patches.refresh(args.project, args.tree):
        print(path)
    return 0


def build_all(args: argparse.Namespace) -> dict[tuple[str, str], build.Install]:
    """Every build the proof needs: stock and frozen QEMU, frozen libvirt."""
    wanted = [("qemu", "stock"), ("qemu", "frozen"), ("libvirt", "frozen")]
    if getattr(args, "project", None):
        wanted = [w for w in wanted if w[0] == args.project]
    installs = {}
    for project, variant in wanted:
        start = time.monotonic()
        tree = patches.prepare(project, variant, local=_local(args, project),
                               force=getattr(args, "force", False))
        install = build.build(tree, jobs=getattr(args, "jobs", None))
        installs[(project, variant)] = install
        say(f"{project} ({variant}) ready in {time.monotonic() - start:.1f} s: {install.prefix}")
    return installs


def cmd_build(args: argparse.Namespace) -> int:
    for (project, variant), install in build_all(args).items():
        print(f"{project}\t{variant}\t{install.prefix}")
    return 0


def cmd_verify(args: argparse.Namespace, installs=None) -> int:
    from harness import checks

    installs = installs or build_all(argparse.Namespace(**{**vars(args), "project": "qemu"}))
    results = checks.verify_all(installs[("qemu", "frozen")].prefix)
    print(checks.format_table(results))
    return 0 if all(r.ok for r in results) else 1


def cmd_all(args: argparse.Namespace) -> int:
    start = time.monotonic()
    for project in config.PROJECTS:
        sources.fetch(config.pin(project))
    installs = build_all(args)
    say(f"fetch + apply + build: {time.monotonic() - start:.1f} s")
    return cmd_verify(args, installs)


def cmd_test(args: argparse.Namespace) -> int:
    from harness import suite

    return suite.run(args)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="frozen", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and verify the pinned sources")
    p.add_argument("--project", choices=config.PROJECTS)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("apply", help="work tree with the series applied")
    p.add_argument("--project", choices=config.BUILT_PROJECTS, required=True)
    p.add_argument("--variant", choices=patches.VARIANTS, default="frozen")
    p.add_argument("--tree", type=Path, help="work tree location (default: in the cache)")
    p.add_argument("--force", action="store_true",
                   help="discard commits and changes in the tree that are not in the series")
    _add_source_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("refresh", help="regenerate the patch files from the work tree")
    p.add_argument("--project", choices=config.BUILT_PROJECTS, required=True)
    p.add_argument("--tree", type=Path, help="work tree location (default: in the cache)")
    p.set_defaults(func=cmd_refresh)

    for name, func, text in (("build", cmd_build, "build and install (cached)"),
                             ("verify", cmd_verify, "freeze the probe guest on KVM"),
                             ("all", cmd_all, "fetch, apply, build, verify"),
                             ("test", cmd_test, "run the project's test suite")):
        p = sub.add_parser(name, help=text)
        if name == "build":
            p.add_argument("--project", choices=config.BUILT_PROJECTS)
        p.add_argument("--jobs", type=int, help="parallel build jobs (default: all cores)")
        p.add_argument("--force", action="store_true",
                       help="discard work-tree changes that are not in the series")
        _add_source_args(p)
        p.set_defaults(func=func)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (sources.SourceError, config.LockError, patches.SeriesError, patches.PatchError,
            patches.TreeBusy, build.BuildError) as exc:
        print(f"frozen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
