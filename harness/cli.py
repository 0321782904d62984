"""Command line: `frozen <command>` (also `python -m harness <command>`).

fetch     download and verify the pinned base sources
apply     make a work tree with the series applied (one commit per patch)
refresh   regenerate patches/<project> from the work tree's commits
build     build and install QEMU and libvirt (cached by content)
verify    boot the probe guest on KVM, freeze it by every trigger, print a table
all       fetch, apply, build, verify: the packager's proof
test      the project's test suite (what CI runs)
export    the series for Debian (DEP-3), RPM (spec snippet) or the list (mail)
check     the gates: commit shape, checkpatch, syntax-check, Debian tree, bisect,
          QEMU's own suites stock against frozen; on request (--gate revert):
          each patch's in-tree tests fail with that patch reverted
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from harness import build, config, distro, export, gates, patches, pipeline, sources
from harness.progress import say


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--qemu-src",
        type=Path,
        metavar="PATH",
        help="local QEMU tarball or git tree to use as the base",
    )
    parser.add_argument(
        "--libvirt-src",
        type=Path,
        metavar="PATH",
        help="local libvirt tarball or git tree to use as the base",
    )


def _add_build_args(parser: argparse.ArgumentParser) -> None:
    """Options of every command that may build."""
    parser.add_argument("--jobs", type=int, help="parallel build jobs (default: all cores)")
    parser.add_argument(
        "--force", action="store_true", help="discard work-tree changes that are not in the series"
    )
    _add_source_args(parser)


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
    tree = patches.prepare(
        args.project,
        args.variant,
        local=_local(args, args.project),
        path=args.tree,
        force=args.force,
    )
    print(tree.path)
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    for path in patches.refresh(args.project, args.tree):
        print(path)
    return 0


def _build_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "local": {p: _local(args, p) for p in config.PROJECTS},
        "force": getattr(args, "force", False),
        "jobs": getattr(args, "jobs", None),
    }


def cmd_build(args: argparse.Namespace) -> int:
    installs = pipeline.build_all(project=args.project, **_build_options(args))
    for (project, variant), install in installs.items():
        print(f"{project}\t{variant}\t{install.prefix}")
    return 0


def _partial(args: argparse.Namespace) -> bool | None:
    return True if getattr(args, "partial", False) else None


def cmd_verify(args: argparse.Namespace) -> int:
    if getattr(args, "cluster", False):  # the failover table (harness.failover)
        from harness import failover

        i = pipeline.build_all(**_build_options(args))
        qemu = {v: i[("qemu", v)].prefix for v in ("frozen", "stock")}
        return failover.run_verify(i[("libvirt", "frozen")].prefix, qemu)

    installs = pipeline.build_all(project="qemu", **_build_options(args))
    v = pipeline.verify(
        installs[("qemu", "frozen")].prefix,
        installs[("qemu", "stock")].prefix,
        partial=_partial(args),
    )
    print(v.text())
    return 0 if v.ok else 1


def cmd_all(args: argparse.Namespace) -> int:
    v = pipeline.prove(partial=_partial(args), **_build_options(args))
    print(v.text())
    return 0 if v.ok else 1


def cmd_test(args: argparse.Namespace) -> int:
    from harness import suite

    opts = _build_options(args)
    return suite.run(suite.Options(partial=args.partial, **opts))


def cmd_bench(args: argparse.Namespace) -> int:
    from harness import bench

    if args.table:
        print(bench.readme_table(bench.load_result(args.table)))
        return 0
    if args.stock_prefix and args.frozen_prefix:
        stock, frozen = args.stock_prefix, args.frozen_prefix
    else:
        # QEMU only: stock for stop/script/pause, patched for freeze.
        installs = pipeline.build_all(project="qemu", **_build_options(args))
        stock = args.stock_prefix or installs[("qemu", "stock")].prefix
        frozen = args.frozen_prefix or installs[("qemu", "frozen")].prefix
    sections = [s for s in args.sections if s != "builds" or not args.no_builds]
    libvirt = args.libvirt_prefix
    if "pacemaker" in sections and libvirt is None:
        # The cluster's nodes run the patched libvirt's virtqemud.
        installs = pipeline.build_all(project="libvirt", **_build_options(args))
        libvirt = installs[("libvirt", "frozen")].prefix
    result, out_dir = bench.run(
        stock,
        frozen,
        reps=args.reps,
        sections=sections,
        sizes=tuple(args.sizes),
        disks=tuple(args.disks),
        nics=tuple(args.nics),
        formats=tuple(args.formats),
        loads=tuple(args.loads),
        load_mb=args.load_mb,
        speed_mb=args.speed_mb,
        steady_s=args.steady_s,
        trace=args.trace,
        strace=args.strace,
        libvirt=libvirt,
        out_dir=args.out,
    )
    print(bench.table(result))
    print(
        f"\nresults: {out_dir / 'bench.json'}\nplot:    {out_dir / 'bench.png'}"
        f"\nREADME:  {out_dir / 'README-table.md'}"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    # Literal copies of bench.SECTIONS / bench.LOADS: the parser must not import
    # bench (matplotlib etc.) for every command.
    bench_sections = [
        "idle",
        "scaling",
        "memory",
        "load",
        "failover",
        "pacemaker",
        "steady",
        "builds",
    ]
    bench_loads = ["mirror-throttled", "mirror", "backup", "writes"]
    top = argparse.ArgumentParser(
        prog="frozen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and verify the pinned sources")
    p.add_argument("--project", choices=config.PROJECTS)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("apply", help="work tree with the series applied")
    p.add_argument("--project", choices=config.PROJECTS, required=True)
    p.add_argument("--variant", choices=patches.VARIANTS, default="frozen")
    p.add_argument("--tree", type=Path, help="work tree location (default: in the cache)")
    p.add_argument(
        "--force",
        action="store_true",
        help="discard commits and changes in the tree that are not in the series",
    )
    _add_source_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("refresh", help="regenerate the patch files from the work tree")
    p.add_argument("--project", choices=config.PROJECTS, required=True)
    p.add_argument("--tree", type=Path, help="work tree location (default: in the cache)")
    p.set_defaults(func=cmd_refresh)

    for name, func, text in (
        ("build", cmd_build, "build and install (cached)"),
        ("verify", cmd_verify, "freeze the probe guest on KVM"),
        ("all", cmd_all, "fetch, apply, build, verify"),
        ("test", cmd_test, "run the project's test suite"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "build":
            p.add_argument("--project", choices=config.BUILT_PROJECTS)
        if name == "verify":
            p.add_argument("--cluster", action="store_true", help="failover on a 2-node cluster")
        else:
            p.add_argument(
                "--partial",
                action="store_true",
                help="where this host lacks KVM or network namespaces, run what "
                "can run and report the rest as not proven (else: FAIL)",
            )
        _add_build_args(p)
        p.set_defaults(func=func)
    p = sub.add_parser("bench", help="benchmarks: freeze against the stock alternatives")
    p.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    p.add_argument(
        "--sections",
        nargs="+",
        choices=bench_sections,
        default=bench_sections,
        metavar="SECTION",
        help=f"what to run (default all: {' '.join(bench_sections)})",
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        metavar="MB",
        default=[512, 2048, 4096, 8192],
        help="guest RAM sizes for the memory curve",
    )
    p.add_argument(
        "--disks",
        type=int,
        nargs="+",
        default=[1, 8, 24],
        metavar="N",
        help="disk counts for the scaling section (default 1 8 24)",
    )
    p.add_argument(
        "--nics",
        type=int,
        nargs="+",
        default=[1, 4],
        metavar="N",
        help="NIC counts for the scaling section (default 1 4)",
    )
    p.add_argument("--formats", nargs="+", choices=["raw", "qcow2"], default=["raw", "qcow2"])
    p.add_argument(
        "--loads",
        nargs="+",
        default=list(bench_loads),
        choices=bench_loads,
        metavar="LOAD",
        help=f"load states (default {' '.join(bench_loads)})",
    )
    p.add_argument(
        "--load-mb",
        type=int,
        default=512,
        metavar="MIB",
        help="size of the image the mirror/backup jobs copy (default 512)",
    )
    p.add_argument(
        "--speed-mb",
        type=int,
        default=200,
        metavar="MIB_S",
        help="speed limit of the throttled mirror and the backup (default 200)",
    )
    p.add_argument(
        "--steady-s",
        type=float,
        default=60.0,
        metavar="S",
        help="window of the steady-state CPU measurement (default 60)",
    )
    p.add_argument("--stock-prefix", type=Path, help="stock QEMU install (default: build/cache)")
    p.add_argument(
        "--libvirt-prefix",
        type=Path,
        help="patched libvirt install, for the pacemaker section (default: build/cache)",
    )
    p.add_argument("--frozen-prefix", type=Path, help="frozen QEMU install (default: build/cache)")
    p.add_argument("--out", type=Path, help="result directory (default: in the cache)")
    p.add_argument(
        "--trace",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="QEMU trace events to log in each VM's qemu.log (e.g. 'job_*')",
    )
    p.add_argument(
        "--strace",
        action="store_true",
        help="diagnostic: strace QEMU's sync/lock/write syscalls around each command "
        "(slows them down: not for figures)",
    )
    p.add_argument(
        "--table", type=Path, metavar="JSON", help="print the README table of a bench.json and exit"
    )
    p.add_argument("--no-builds", action="store_true", help="skip the build timings")
    _add_build_args(p)
    p.set_defaults(func=cmd_bench)
    add_packaging_commands(sub)
    return top


# --------------------------------------------------------------------------
# export and check: the packager's and the upstream submitter's commands


def _print_outcomes(title: str, outcomes: list[distro.Outcome]) -> None:
    print(title)
    if not outcomes:
        print("  (no patches of ours to apply: the series is empty)")
    for o in outcomes:
        extra = ": " + "; ".join(o.offsets) if o.offsets else ""
        print(f"  {o.patch}: {o.status}{extra}")
        if o.detail and not o.ok:
            print("    " + o.detail.replace("\n", "\n    "))


def _export_debian(args: argparse.Namespace) -> int:
    files = patches.series(args.project)
    written = export.export_debian(files, args.dir, args.forwarded)
    print(
        f"{len(written)} DEP-3 patch(es) in {args.dir / export.DEBIAN_SUBDIR}, "
        f"series fragment {args.dir / 'series'}"
    )
    if args.no_verify:
        return 0
    check = export.verify_debian(args.project, args.dir)
    _print_outcomes(
        f"quilt push -a --fuzz=0 on the Debian source tree of {args.project}: "
        f"Debian's {check.debian_patches} patches, then ours:",
        check.ours,
    )
    print(
        f"quilt applied {len(check.applied)} patches "
        f"({check.debian_patches} Debian + {len(check.applied) - check.debian_patches} ours)"
    )
    return 0 if check.ok else 1


def _export_rpm(args: argparse.Namespace) -> int:
    files = patches.series(args.project)
    snippet = export.export_rpm(files, args.dir, args.project, args.first)
    print(f"{len(files)} patch file(s) and {snippet}")
    if args.no_verify:
        return 0
    outcomes = export.verify_rpm(args.project, args.dir)
    _print_outcomes(
        f"patch -p1 --fuzz=0 in spec order on the pinned {args.project} orig tarball:", outcomes
    )
    return 0 if len(outcomes) == len(files) and all(o.ok for o in outcomes) else 1


def _export_mail(args: argparse.Namespace) -> int:
    from harness import suite

    export.parse_signoff(args.signoff)  # refuse before any work
    tree = patches.prepare(args.project, "frozen", local=_local(args, args.project))
    result = export.export_mail(
        args.project,
        tree.path,
        args.dir,
        signoff=args.signoff,
        version=args.reroll_count,
        onto=args.onto,
        proof=suite.latest_test_summary(),
    )
    print(f"{len(result.files)} mail(s) in {args.dir} (cover letter included)")
    print(f"To: {', '.join(result.recipients.to)}  (from {result.recipients.source})")
    if result.recipients.cc:
        print(f"Cc: {', '.join(result.recipients.cc)}")
    failed_gates = [r for r in result.gate_results if not r.ok]
    for r in failed_gates:
        print(f"gate {r.gate} failed for {r.patch}: {r.detail}")
    if result.rebase is not None:
        print(f"rebase check onto {args.onto}:")
        for rb in result.rebase:
            print(f"  {rb.patch}: {rb.status}" + (f"\n    {rb.detail}" if rb.detail else ""))
    check = export.verify_mail(tree.path, result.files, args.signoff)
    print(
        f"git am onto the base: {check.applied} applied, {check.signed} carry your "
        f"Signed-off-by last, result {'equals' if check.same_tree else 'DIFFERS from'} "
        f"the series tree"
    )
    ok = check.same_tree and check.signed == check.applied == len(result.files) - 1
    # The mails are written either way, but a failed gate must not go unnoticed.
    return 0 if ok and not failed_gates else 1


def cmd_export(args: argparse.Namespace) -> int:
    run = {"debian": _export_debian, "rpm": _export_rpm, "mail": _export_mail}[args.format]
    try:
        return run(args)
    except (export.ExportError, distro.DistroError) as exc:
        print(f"frozen: error: {exc}", file=sys.stderr)
        return 2


def cmd_check(args: argparse.Namespace) -> int:
    from harness import suite

    results = []
    for project in _projects(args):
        for gate in args.gate or gates.GATES:
            start = time.monotonic()
            found = gates.run_gate(project, gate, local=_local(args, project), jobs=args.jobs)
            # a skip is named as one, never counted among the passes
            passed = sum(r.ok and not r.skipped for r in found)
            skipped = sum(r.skipped for r in found)
            say(
                f"{project}: gate {gate}: {passed}/{len(found)} passed"
                + (f", {skipped} skipped" if skipped else "")
                + f" ({time.monotonic() - start:.0f} s)"
            )
            results += found
    for r in results:
        mark = "skip" if r.skipped else "ok  " if r.ok else "FAIL"
        # the revert gate's detail is its evidence (each test's failing line)
        shown = r.detail and (not r.ok or r.gate == "revert")
        print(f"{mark} {r.gate:13s} {r.patch}" + (f"\n     {r.detail}" if shown else ""))
    if args.junit:
        suite.write_junit(args.junit, "check", results)
    return 0 if all(r.ok for r in results) else 1


def add_packaging_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the series for Debian, RPM or the mailing list")
    formats = p.add_subparsers(dest="format", required=True)
    d = formats.add_parser("debian", help="DEP-3 patches + series fragment, checked with quilt")
    d.add_argument("--forwarded", default="no", help="DEP-3 Forwarded: value (default: no)")
    r = formats.add_parser("rpm", help="patch files + PatchNNNN: spec snippet, checked with patch")
    r.add_argument(
        "--first",
        type=int,
        default=export.RPM_FIRST,
        help=f"number of the first PatchNNNN: line (default {export.RPM_FIRST})",
    )
    m = formats.add_parser("mail", help="git format-patch --cover-letter for the list")
    m.add_argument(
        "--signoff",
        metavar='"NAME <EMAIL>"',
        help="your Signed-off-by, appended to every patch (required)",
    )
    m.add_argument(
        "-v",
        "--reroll-count",
        type=int,
        default=1,
        metavar="N",
        help="series version, as git format-patch -v N",
    )
    m.add_argument(
        "--onto",
        type=Path,
        metavar="PATH",
        help="upstream git tree: report how each patch applies to its HEAD",
    )
    _add_source_args(m)
    for q in (d, r, m):
        q.add_argument("--project", choices=config.BUILT_PROJECTS, required=True)
        q.add_argument("dir", type=Path, metavar="DIR", help="output directory")
        if q is not m:
            q.add_argument(
                "--no-verify",
                action="store_true",
                help="skip applying the export with the consuming tool",
            )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "check", help="gates: commit shape, checkpatch / syntax-check, Debian tree, bisect"
    )
    p.add_argument("--project", choices=config.BUILT_PROJECTS)
    p.add_argument(
        "--gate",
        action="append",
        choices=gates.GATES + gates.OPTIONAL_GATES,
        help="run only this gate (repeatable; default: all but revert)",
    )
    p.add_argument("--jobs", type=int, help="parallel build jobs for the bisect gate")
    p.add_argument("--junit", type=Path, metavar="FILE", help="also write JUnit XML here")
    _add_source_args(p)
    p.set_defaults(func=cmd_check)


# end of export and check
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        sources.SourceError,
        config.LockError,
        patches.SeriesError,
        patches.PatchError,
        patches.TreeBusy,
        build.BuildError,
    ) as exc:
        print(f"frozen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
