"""Out-of-tree minimal builds of QEMU and libvirt into private prefixes.

A build is identified by a cache key over everything that shapes it (base
source sums, fix-ups, series bytes, options, this recipe's version); an
install whose stamp carries the key is reused as is.  ccache is on, with the
build dir inside the work tree and paths made relative, so the stock, frozen
and bisect trees share compiled objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import config
from harness.lifecycle import kill_group
from harness.patches import Tree
from harness.progress import Progress, say

#: Bump when the recipe changes in a way the options do not show.
RECIPE_VERSION = "4"
STAMP = ".frozen-build.json"
LOG_TAIL_LINES = 40

SEABIOS_DIR = Path("/usr/share/seabios")
IPXE_DIR = Path("/usr/lib/ipxe/qemu")
CCACHE_BIN_DIR = Path("/usr/lib/ccache")


class BuildError(Exception):
    """A configure, build or install step failed; carries the log tail and path."""

    def __init__(self, what: str, log: Path):
        lines = (
            log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if log.exists() else []
        )
        super().__init__(
            f"{what} failed; last {len(lines)} lines of {log}:\n"
            + "\n".join("  " + ln for ln in lines)
            + f"\n(full log: {log})"
        )
        self.log = log


def qemu_options() -> list[str]:
    """configure options for the minimal QEMU the proof needs.

    x86_64 system emulator with KVM and TCG (TCG runs the Linux guest where
    KVM cannot), user networking, tools (qemu-img, qemu-io, qemu-nbd,
    qemu-storage-daemon), Linux AIO, the COLO proxy and replication (so the
    tests cover how a freeze removes colo-compare objects and is refused on
    a COLO secondary; distributions build both), and the vhost backends
    (vhost-user with qemu-storage-daemon's vhost-user-blk export,
    vhost-kernel, vhost-net, vhost-vdpa) that distributions enable, so the
    refusal of devices QEMU cannot sever runs against real devices.
    virtio, pvpanic, the watchdogs, qcow2, blkdebug and NBD are in the
    default device and block driver sets.
    Blobs are not installed: firmware is laid out from Debian's packages and
    the option ROMs built from the tree.
    """
    return [
        "--target-list=x86_64-softmmu",
        "--without-default-features",
        "--enable-kvm",
        "--enable-tcg",
        "--enable-slirp",
        "--enable-tools",
        "--enable-linux-aio",
        "--enable-attr",
        "--enable-cap-ng",
        "--enable-colo-proxy",
        "--enable-replication",
        "--enable-vhost-user",
        "--enable-vhost-user-blk-server",
        "--enable-vhost-kernel",
        "--enable-vhost-net",
        "--enable-vhost-vdpa",
        "--disable-docs",
        "--disable-download",
        "--disable-install-blobs",
        "--disable-werror",
    ]


#: The prefix every QEMU build is configured for, stock, frozen and bisect
#: alike.  It is compiled into config-host.h, which every object includes:
#: one prefix for all trees is what lets ccache share the objects the series
#: does not touch.  QEMU is relocatable (it finds its data relative to its
#: binary), so `make install DESTDIR=` stages it and the staged prefix is
#: moved to the variant's install dir.
QEMU_PREFIX = Path("/opt/frozen-qemu")


def qemu_configure_args() -> list[str]:
    return [f"--python={sys.executable}", f"--prefix={QEMU_PREFIX}", *qemu_options()]


def project_options(project: str) -> list[str]:
    """The build options of `project`, as they enter the cache keys."""
    if project == "qemu":
        return qemu_options()
    if project == "libvirt":
        return libvirt_options(Path("<prefix>"))
    raise ValueError(f"{project} is not built")


def configure_command(project: str, src: Path, build_dir: Path, prefix: Path) -> list[str]:
    """Configure `build_dir` for `src`; run it with `build_dir` as the cwd.

    `prefix` is libvirt's install prefix; QEMU is always configured for
    QEMU_PREFIX and staged into its install dir (install_qemu).

    A configured libvirt build dir is reconfigured, not wiped, so a series
    change stays an incremental build.
    """
    if project == "qemu":
        return [str(src / "configure"), *qemu_configure_args()]
    reconfigure = ["--reconfigure"] if (build_dir / "build.ninja").exists() else []
    return ["meson", "setup", *reconfigure, str(build_dir), str(src), *libvirt_options(prefix)]


def libvirt_options(prefix: Path) -> list[str]:
    """meson options: QEMU driver, virtqemud, remote, virsh, test driver, tests.

    sysconfdir, localstatedir and runstatedir stay inside the prefix, so the
    private virtqemud and the prefix's virsh agree on the socket and nothing
    on the host is touched.
    """
    disabled = (
        "driver_bhyve",
        "driver_esx",
        "driver_hyperv",
        "driver_interface",
        "driver_libxl",
        "driver_lxc",
        "driver_ch",
        "driver_network",
        "driver_openvz",
        "driver_secrets",
        "driver_vbox",
        "driver_vmware",
        "driver_vz",
        "storage_dir",
        "storage_disk",
        "storage_fs",
        "storage_gluster",
        "storage_iscsi",
        "storage_iscsi_direct",
        "storage_lvm",
        "storage_mpath",
        "storage_rbd",
        "storage_scsi",
        "storage_vstorage",
        "storage_zfs",
        "docs",
        "expensive_tests",
        "nss",
        "wireshark_dissector",
        "sanlock",
        "polkit",
        "firewalld",
        "bash_completion",
        "apparmor",
        "secdriver_apparmor",
        "nbdkit",
        "glusterfs",
        "libiscsi",
        "host_validate",
        "sysctl_config",
    )
    return [
        f"--prefix={prefix}",
        f"--sysconfdir={prefix}/etc",
        f"--localstatedir={prefix}/var",
        f"-Drunstatedir={prefix}/var/run",
        "--libdir=lib",
        "-Dqemu_user=root",
        "-Dqemu_group=root",
        # driver_libvirtd builds the modular daemons, virtqemud among them.
        *(
            f"-D{d}=enabled"
            for d in ("driver_qemu", "driver_libvirtd", "driver_remote", "driver_test")
        ),
        *(f"-D{d}=disabled" for d in disabled),
        "-Dtests=enabled",
        "-Dinit_script=none",
        "-Dwerror=false",
    ]


@dataclass(frozen=True)
class Install:
    """A finished, installed build."""

    project: str
    variant: str
    key: str
    prefix: Path
    tree: Path
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    cached: bool = field(default=False, compare=False)

    def bin(self, name: str) -> Path:
        for sub in ("bin", "sbin"):
            path = self.prefix / sub / name
            if path.exists():
                return path
        return self.prefix / "bin" / name

    @property
    def build_dir(self) -> Path:
        return self.tree / "build"


def cache_key(tree: Tree, options: list[str]) -> str:
    """sha256 over base, fix-ups, series bytes, options and recipe version."""
    from harness.patches import series_digest

    digest = hashlib.sha256()
    for part in (
        tree.project,
        tree.base.kind,
        tree.base.ident,
        "\n".join(tree.base.fixups),
        series_digest(list(tree.patches)),
        "\0".join(options),
        RECIPE_VERSION,
    ):
        digest.update(part.encode() + b"\n")
    return digest.hexdigest()


def build_env(tree: Path) -> dict[str, str]:
    """Environment for configure and build: ccache with tree-relative paths."""
    env = dict(os.environ)
    # The venv's bin first: configure and meson find its meson >= 1.5.
    path = [str(Path(sys.executable).parent), *env.get("PATH", "").split(os.pathsep)]
    if CCACHE_BIN_DIR.is_dir():
        path.insert(0, str(CCACHE_BIN_DIR))
    env["PATH"] = os.pathsep.join(path)
    env.setdefault("CCACHE_DIR", str(config.cache_root() / "ccache"))
    env["CCACHE_BASEDIR"] = str(tree)
    env["CCACHE_NOHASHDIR"] = "1"
    env.setdefault("CCACHE_MAXSIZE", "6G")
    env["LC_ALL"] = "C"
    return env


class BuildStopped(BuildError):
    """A step was stopped at its deadline (a time budget), not failed."""


def run_logged(
    cmd: list[str],
    log: Path,
    env: dict[str, str],
    label: str,
    cwd: Path | None = None,
    deadline: float | None = None,
) -> float:
    """Run `cmd` with output to `log`, showing ninja's [n/m] as progress.

    At `deadline` (time.monotonic()) the command and everything it started
    are killed and BuildStopped is raised: an interrupted ninja build dir
    stays consistent, so the next run goes on from there.
    """
    progress = Progress(label, None, step=10)
    start = time.monotonic()
    stopped = threading.Event()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
            errors="replace",
            start_new_session=deadline is not None,
        )

        def stop() -> None:
            stopped.set()
            kill_group(proc)

        timer = None
        if deadline is not None:
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), stop)
            timer.daemon = True
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                match = re.match(r"\[(\d+)/(\d+)\]", line)
                if match:
                    progress.update(int(match.group(1)), int(match.group(2)))
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
    if stopped.is_set():
        raise BuildStopped(f"{label} stopped at its deadline", log)
    if rc != 0:
        raise BuildError(f"{label} (exit {rc})", log)
    progress.finish()
    return time.monotonic() - start


def install_prefix(project: str, variant: str) -> Path:
    """One prefix per project and variant; the stamp in it says which key.

    libvirt's prefix is compiled in: keeping it stable is what makes a
    rebuild after a series change incremental.  QEMU's compiled-in prefix is
    QEMU_PREFIX for every variant; this is only where it is installed.
    """
    return config.cache_root() / "installs" / f"{project}-{variant}"


def read_stamp(prefix: Path) -> dict | None:
    """The stamp of the install in ``prefix`` (its key, timings), if complete."""
    try:
        return json.loads((prefix / STAMP).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def layout_firmware(build_dir: Path, datadir: Path) -> None:
    """Put every blob QEMU loads into `datadir`, so it needs no -L.

    SeaBIOS and iPXE come from Debian's packages (linked), the x86 option
    ROMs from this tree's own pc-bios/optionrom build (copied).  Idempotent.
    """
    datadir.mkdir(parents=True, exist_ok=True)
    for src_dir, pattern in ((SEABIOS_DIR, "*.bin"), (IPXE_DIR, "*.rom")):
        if not src_dir.is_dir():
            raise BuildError(
                f"firmware layout: {src_dir} is missing (install Debian's seabios and ipxe-qemu)",
                build_dir / "frozen-build.log",
            )
        for blob in src_dir.glob(pattern):
            link = datadir / blob.name
            if not link.exists():
                link.symlink_to(blob.resolve())
    roms = list((build_dir / "pc-bios" / "optionrom").glob("*.bin"))
    if not roms:
        raise BuildError(
            "the x86 option ROMs were not built (is gcc-multilib installed?)",
            build_dir / "frozen-build.log",
        )
    for rom in roms:
        shutil.copy2(rom, datadir / rom.name)


#: Test programs of the QEMU tree that `make install` leaves out; the
#: functional tests use them as real backends (vhost-user-bridge: a
#: vhost-user net backend).
TEST_PROGRAMS = ("tests/vhost-user-bridge",)


def install_test_programs(build_dir: Path, prefix: Path) -> None:
    """Copy TEST_PROGRAMS into <prefix>/libexec/frozen-tests."""
    dest = prefix / "libexec" / "frozen-tests"
    dest.mkdir(parents=True, exist_ok=True)
    for rel in TEST_PROGRAMS:
        src = build_dir / rel
        if not src.is_file():
            raise BuildError(
                f"test program {rel} was not built (vhost-user enabled?)",
                build_dir / "frozen-build.log",
            )
        shutil.copy2(src, dest / src.name)


def install_qemu(build_dir: Path, prefix: Path, log: Path, env: dict[str, str]) -> float:
    """`make install` staged under DESTDIR, then moved to `prefix`; seconds."""
    staging = prefix.parent / f".{prefix.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    seconds = run_logged(
        ["make", "-C", str(build_dir), "install"],
        log,
        {**env, "DESTDIR": str(staging)},  # meson install reads it
        "install qemu",
    )
    staged = staging / QEMU_PREFIX.relative_to("/")
    if not (staged / "bin").is_dir():
        raise BuildError(f"install qemu: nothing was staged in {staged}", log)
    if prefix.exists():
        shutil.rmtree(prefix)
    staged.rename(prefix)
    shutil.rmtree(staging)
    return seconds


def bundle_datadir(build_dir: Path) -> Path:
    """Where QEMU run from its build dir (qtests, meson test) looks for blobs."""
    return build_dir / "qemu-bundle" / QEMU_PREFIX.relative_to("/") / "share" / "qemu"


def _install_api_xml(
    src: Path, build_dir: Path, prefix: Path, log: Path, env: dict[str, str]
) -> None:
    """libvirt-api.xml and friends, which libvirt-python is generated from.

    meson makes them only with docs enabled (which needs rst2html5); the
    tree's own apibuild.py makes the same files from the headers.
    """
    out = build_dir / "docs"
    out.mkdir(exist_ok=True)
    run_logged(
        [sys.executable, str(src / "scripts" / "apibuild.py"), str(src / "docs"), str(out)],
        log,
        env,
        "generate libvirt API XML",
    )
    api_dir = prefix / "share" / "libvirt" / "api"
    api_dir.mkdir(parents=True, exist_ok=True)
    for xml in out.glob("libvirt-*api.xml"):
        shutil.copy2(xml, api_dir / xml.name)
    if not (api_dir / "libvirt-api.xml").exists():
        raise BuildError("apibuild.py wrote no libvirt-api.xml", log)


def build(tree: Tree, *, jobs: int | None = None) -> Install:
    """Build and install `tree`, or reuse the install with the same key."""
    jobs = jobs or os.cpu_count() or 2
    try:
        options = project_options(tree.project)
    except ValueError as exc:
        raise BuildError(str(exc), tree.path / "build.log") from None
    key = cache_key(tree, options)
    prefix = install_prefix(tree.project, tree.variant)
    stamp = read_stamp(prefix)
    if stamp and stamp.get("key") == key:
        say(f"{tree.project} ({tree.variant}): cache hit {prefix}")
        return Install(
            tree.project,
            tree.variant,
            key,
            prefix,
            tree.path,
            stamp.get("timings", {}),
            cached=True,
        )

    build_dir = tree.build_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "frozen-build.log"
    log.write_text("")
    env = build_env(tree.path)
    timings: dict[str, float] = {}
    # No stamp while the prefix is being replaced: an interrupted build is
    # never taken for a finished one.
    (prefix / STAMP).unlink(missing_ok=True)
    if prefix.exists():
        shutil.rmtree(prefix)
    say(
        f"building {tree.project} ({tree.variant}, {len(tree.patches)} patches) "
        f"with {jobs} jobs; log: {log}"
    )
    timings["configure"] = run_logged(
        configure_command(tree.project, tree.path, build_dir, prefix),
        log,
        env,
        f"configure {tree.project}",
        cwd=build_dir,
    )
    if tree.project == "qemu":
        timings["build"] = run_logged(
            ["make", "-C", str(build_dir), f"-j{jobs}"], log, env, "build qemu"
        )
        timings["install"] = install_qemu(build_dir, prefix, log, env)
        layout_firmware(build_dir, prefix / "share" / "qemu")
        install_test_programs(build_dir, prefix)
        layout_firmware(build_dir, bundle_datadir(build_dir))
    else:
        timings["build"] = run_logged(
            ["ninja", "-C", str(build_dir), f"-j{jobs}"], log, env, "build libvirt"
        )
        timings["install"] = run_logged(
            ["meson", "install", "-C", str(build_dir), "--no-rebuild", "--quiet"],
            log,
            env,
            "install libvirt",
        )
        _install_api_xml(tree.path, build_dir, prefix, log, env)
    (prefix / STAMP).write_text(
        json.dumps(
            {
                "key": key,
                "project": tree.project,
                "variant": tree.variant,
                "base": tree.base.description,
                "patches": [p.name for p in tree.patches],
                "timings": timings,
                "jobs": jobs,
                "built_at": time.time(),
            },
            indent=1,
        )
    )
    say(f"{tree.project} ({tree.variant}) installed in {prefix} ({sum(timings.values()):.0f} s)")
    return Install(tree.project, tree.variant, key, prefix, tree.path, timings)
