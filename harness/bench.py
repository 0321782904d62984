"""Benchmarks: freeze against the stock alternatives, side by side in one run.

These machines are shared and noisy, so every figure is reported with its
paired alternative measured in the same run (median, min, max over N
repetitions), and as a ratio.  Nothing here is a pass/fail threshold.

1. freeze latency: QMP `freeze` until FROZEN arrives, against the stock
   scripted equivalent (`stop`, `set_link off`, `blockdev-set-active false`),
   and the time until the image lock is free, for both;
2. flat in memory: freeze latency for growing guest RAM (really backed with
   -mem-prealloc) against `dump-guest-memory`, today's way to keep memory;
3. failure to failover-ready: guest panic / watchdog expiry until the image
   lock is free, `-action ...=freeze` against `=pause` + a client's `quit`;
4. steady state while frozen: QEMU CPU time over 10 s and RSS;
5. builds: cold, warm (cache hit) and incremental build times.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import build, checks, config, guest, patches
from harness.progress import say

MEMORY_SIZES_MB = (512, 2048, 4096, 8192)
LOCK_TIMEOUT = 30.0
STEADY_WINDOW_S = 10.0

# QEMU's file-posix locks one byte per permission at 100 + bit ("I use it")
# and 200 + bit ("others may not"); any lock there blocks a standby.
_QEMU_LOCK_START, _QEMU_LOCK_LEN = 100, 200
_F_OFD_GETLK = 36
_FLOCK = "hhxxxxqqixxxx"


def image_locked(image: Path) -> bool:
    """True while any process holds a QEMU permission lock on `image`."""
    fd = os.open(image, os.O_RDWR)
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _QEMU_LOCK_START,
                            _QEMU_LOCK_LEN, 0)
        answer = fcntl.fcntl(fd, _F_OFD_GETLK, query)
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def wait_unlocked(image: Path, since: float, timeout: float = LOCK_TIMEOUT) -> float:
    """Seconds from `since` (monotonic) until the image lock is free."""
    deadline = since + timeout
    while image_locked(image):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{image} still locked after {timeout} s")
        time.sleep(0.001)  # a 1 ms poll of a lock, not a wait for an event
    return time.monotonic() - since


@dataclass(frozen=True)
class Stat:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Stat:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def ms(self) -> str:
        return f"{self.median * 1e3:8.1f} ms [{self.min * 1e3:.1f}-{self.max * 1e3:.1f}]"


def _repeat(reps: int, sample: Callable[[int], float]) -> Stat:
    return Stat.of([sample(i) for i in range(reps)])


@dataclass
class Bench:
    prefix: Path
    workdir: Path
    reps: int
    accel: str

    def rig(self, name: str, **kw: Any) -> AbstractContextManager[checks.Rig]:
        return checks.probe_rig(self.prefix, self.workdir / name, accel=self.accel, **kw)

    # -- 1. freeze latency against the scripted stock equivalent -----------

    def freeze_once(self, i: int, extra: list[str] | None = None) -> tuple[float, float]:
        with self.rig(f"freeze-{i}", extra_args=extra or []) as rig:
            start = time.monotonic()
            rig.vm.cmd("freeze")
            rig.vm.event_wait("FROZEN", checks.FREEZE_EVENT_TIMEOUT)
            latency = time.monotonic() - start
            unlocked = wait_unlocked(rig.image, start)
        return latency, unlocked

    def scripted_once(self, i: int) -> tuple[float, float]:
        with self.rig(f"scripted-{i}") as rig:
            start = time.monotonic()
            rig.vm.cmd("stop")
            rig.vm.cmd("set_link", {"name": checks.NIC_ID, "up": False})
            rig.vm.cmd("blockdev-set-active", active=False)
            latency = time.monotonic() - start
            unlocked = wait_unlocked(rig.image, start)
        return latency, unlocked

    def latency(self) -> dict[str, Any]:
        frozen = [self.freeze_once(i) for i in range(self.reps)]
        scripted = [self.scripted_once(i) for i in range(self.reps)]
        out: dict[str, Any] = {
            "freeze": Stat.of([f[0] for f in frozen]),
            "scripted": Stat.of([s[0] for s in scripted]),
            "freeze_lock_free": Stat.of([f[1] for f in frozen]),
            "scripted_lock_free": Stat.of([s[1] for s in scripted]),
        }
        out["ratio_freeze_over_scripted"] = out["freeze"].median / out["scripted"].median
        return out

    # -- 2. flat in memory, against dump-guest-memory -----------------------

    def memory_once(self, mb: int, i: int) -> tuple[float, float]:
        extra = ["-m", str(mb), "-mem-prealloc"]
        with self.rig(f"mem-{mb}-{i}", extra_args=extra, first_record_timeout=120) as rig:
            dump = rig.workdir / "dump.elf"
            rig.vm.cmd("stop")
            start = time.monotonic()
            rig.vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{dump}",
                       timeout=600)
            dumped = time.monotonic() - start
            dump.unlink()
            rig.vm.cmd("cont")
            start = time.monotonic()
            rig.vm.cmd("freeze")
            rig.vm.event_wait("FROZEN", checks.FREEZE_EVENT_TIMEOUT)
            frozen = time.monotonic() - start
        return frozen, dumped

    def memory(self, sizes: tuple[int, ...]) -> dict[str, Any]:
        curve = {}
        for mb in sizes:
            say(f"bench: {mb} MB guest")
            runs = [self.memory_once(mb, i) for i in range(self.reps)]
            curve[mb] = {"freeze": Stat.of([r[0] for r in runs]),
                         "dump": Stat.of([r[1] for r in runs])}
        lo, hi = min(sizes), max(sizes)
        mid = 4096 if 4096 in curve else hi
        return {
            "curve": curve,
            "freeze_ratio_max_over_min": curve[hi]["freeze"].median / curve[lo]["freeze"].median,
            "dump_over_freeze": curve[mid]["dump"].median / curve[mid]["freeze"].median,
            "dump_over_freeze_mb": mid,
        }

    # -- 3. failure to failover-ready ---------------------------------------

    def failover_once(self, what: str, action: str, i: int) -> float:
        event = {"panic": "GUEST_PANICKED", "watchdog": "WATCHDOG"}[what]
        command = {"panic": guest.CMD_PANIC, "watchdog": guest.CMD_WATCHDOG}[what]
        with self.rig(f"{what}-{action}-{i}", actions={what: action}) as rig:
            rig.guest_command(command)
            ev = rig.vm.event_wait(event, 30)
            # Measured from the failure itself, as QEMU stamped its event.
            stamp = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
            failed_at = time.monotonic() - (time.time() - stamp)
            if action == "pause":
                # The stock path: the client saw the event, now it quits QEMU.
                rig.vm.shutdown()
            return wait_unlocked(rig.image, failed_at)

    def failover(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for what in ("panic", "watchdog"):
            frozen = _repeat(self.reps, functools.partial(self.failover_once, what, "freeze"))
            stock = _repeat(self.reps, functools.partial(self.failover_once, what, "pause"))
            out[what] = {"freeze": frozen, "pause_then_quit": stock,
                         "ratio_freeze_over_stock": frozen.median / stock.median}
        return out

    # -- 4. steady state while frozen ---------------------------------------

    def steady(self) -> dict[str, Any]:
        with self.rig("steady") as rig:
            pid = rig.vm.pid
            running_cpu = _cpu_over(pid, STEADY_WINDOW_S)
            rss_before = _rss_kib(pid)
            rig.vm.cmd("freeze")
            rig.vm.event_wait("FROZEN", checks.FREEZE_EVENT_TIMEOUT)
            frozen_cpu = _cpu_over(pid, STEADY_WINDOW_S)
            rss_after = _rss_kib(pid)
        return {"window_s": STEADY_WINDOW_S, "cpu_s_running": running_cpu,
                "cpu_s_frozen": frozen_cpu, "rss_kib_before": rss_before,
                "rss_kib_after": rss_after}


def _cpu_over(pid: int, window: float) -> float:
    """QEMU's user+system CPU seconds spent during `window` seconds."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    before = cpu()
    time.sleep(window)  # the measurement window itself
    return cpu() - before


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


# -- 5. builds ----------------------------------------------------------------


def builds() -> dict[str, Any]:
    """Recorded cold builds, a timed warm run, a timed incremental rebuild."""
    out: dict[str, Any] = {"cores": os.cpu_count()}
    for project, variant in (("qemu", "stock"), ("qemu", "frozen"), ("libvirt", "frozen")):
        start = time.monotonic()
        tree = patches.prepare(project, variant)
        install = build.build(tree)
        out[f"{project}-{variant}"] = {
            "recorded_build_s": sum(install.timings.values()),
            "warm_run_s": time.monotonic() - start,
            "warm_was_cache_hit": install.cached,
        }
    out["qemu_incremental_s"] = _incremental_qemu()
    return out


def _incremental_qemu() -> float | None:
    """Touch the files of the newest patch that changes C and time the rebuild."""
    tree = patches.tree_path("qemu", "frozen")
    if not (tree / "build" / "build.ninja").exists():
        return None
    files: list[str] = []
    for commit in subprocess.run(["git", "-C", str(tree), "rev-list", "fixups..HEAD"],
                                 check=True, capture_output=True, text=True).stdout.split():
        files = subprocess.run(["git", "-C", str(tree), "diff-tree", "--no-commit-id",
                                "--name-only", "-r", commit],
                               check=True, capture_output=True, text=True).stdout.split()
        if any(name.endswith((".c", ".h")) for name in files):
            break
    now = time.time()
    for name in files:
        if (tree / name).exists():
            os.utime(tree / name, (now, now))
    start = time.monotonic()
    build.run_logged(["make", "-C", str(tree / "build"), f"-j{os.cpu_count() or 2}"],
                     tree / "build" / "bench-incremental.log", build.build_env(tree),
                     "incremental qemu build")
    return time.monotonic() - start


# -- report -------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stat):
        return vars(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def table(result: dict[str, Any]) -> str:
    lat, mem, fail, steady = (result[k] for k in ("latency", "memory", "failover", "steady"))
    lines = [
        f"accelerator {result['accel']}, {result['reps']} repetitions, median [min-max]",
        "",
        f"freeze (QMP -> FROZEN)              {lat['freeze'].ms()}",
        f"stop + set_link + set-active        {lat['scripted'].ms()}",
        f"  ratio freeze / scripted            {lat['ratio_freeze_over_scripted']:.2f}",
        f"lock free after freeze              {lat['freeze_lock_free'].ms()}",
        f"lock free after scripted            {lat['scripted_lock_free'].ms()}",
        "",
        "guest RAM   freeze                         dump-guest-memory",
    ]
    for mb, row in mem["curve"].items():
        lines.append(f"{mb:6d} MB {row['freeze'].ms()}   {row['dump'].ms()}")
    lines += [
        f"  freeze(max RAM) / freeze(min RAM)  {mem['freeze_ratio_max_over_min']:.2f}",
        f"  dump / freeze at {mem['dump_over_freeze_mb']} MB"
        f"{'':{18 - len(str(mem['dump_over_freeze_mb']))}}{mem['dump_over_freeze']:.1f}",
        "",
    ]
    for what, row in fail.items():
        lines.append(f"{what + ' -> lock free, freeze':36s}{row['freeze'].ms()}")
        lines.append(f"{what + ' -> lock free, pause + quit':36s}{row['pause_then_quit'].ms()}")
        lines.append(f"  ratio freeze / pause + quit       {row['ratio_freeze_over_stock']:.2f}")
    lines += [
        "",
        f"QEMU CPU over {steady['window_s']:.0f} s: running {steady['cpu_s_running']:.2f} s, "
        f"frozen {steady['cpu_s_frozen']:.2f} s",
        f"QEMU RSS: before freeze {steady['rss_kib_before']} KiB, "
        f"after {steady['rss_kib_after']} KiB",
    ]
    if "builds" in result:
        b = result["builds"]
        lines += ["", f"builds on {b['cores']} cores:"]
        for key in ("qemu-stock", "qemu-frozen", "libvirt-frozen"):
            lines.append(f"  {key:15s} recorded build {b[key]['recorded_build_s']:7.0f} s, "
                         f"warm run {b[key]['warm_run_s']:.1f} s")
        if b.get("qemu_incremental_s") is not None:
            lines.append(f"  qemu incremental after touching a patch that changes C: "
                         f"{b['qemu_incremental_s']:.0f} s")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    curve = result["memory"]["curve"]
    sizes = [int(mb) for mb in curve]
    for key, label in (("freeze", "freeze (QMP -> FROZEN)"), ("dump", "dump-guest-memory")):
        med = [curve[mb][key].median for mb in curve]
        lo = [curve[mb][key].median - curve[mb][key].min for mb in curve]
        hi = [curve[mb][key].max - curve[mb][key].median for mb in curve]
        left.errorbar(sizes, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
    left.set_xlabel("guest RAM (MB)")
    left.set_ylabel("seconds")
    left.set_yscale("log")
    left.set_title("Keeping memory: freeze vs dump")
    left.legend()
    lat, fail = result["latency"], result["failover"]
    bars = {
        "freeze": lat["freeze"], "stop+link+inactivate": lat["scripted"],
        "panic->lock free\n(freeze)": fail["panic"]["freeze"],
        "panic->lock free\n(pause+quit)": fail["panic"]["pause_then_quit"],
    }
    right.bar(range(len(bars)), [s.median * 1e3 for s in bars.values()],
              yerr=[[(s.median - s.min) * 1e3 for s in bars.values()],
                    [(s.max - s.median) * 1e3 for s in bars.values()]], capsize=3)
    right.set_xticks(range(len(bars)), list(bars), fontsize=8)
    right.set_ylabel("milliseconds")
    right.set_title(f"Latency ({result['accel']}, median of {result['reps']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(prefix: Path, *, reps: int = 3, sizes: tuple[int, ...] = MEMORY_SIZES_MB,
        with_builds: bool = True, out_dir: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Run every benchmark; returns the result and the directory written."""
    out_dir = out_dir or config.cache_root() / "results" / time.strftime("bench-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(prefix, out_dir / "work", reps, checks.default_accel())
    result: dict[str, Any] = {"accel": bench.accel, "reps": reps, "prefix": str(prefix)}
    say("bench: freeze latency")
    result["latency"] = bench.latency()
    say("bench: memory curve")
    result["memory"] = bench.memory(sizes)
    say("bench: failure to failover-ready")
    result["failover"] = bench.failover()
    say("bench: steady state")
    result["steady"] = bench.steady()
    if with_builds:
        say("bench: builds")
        result["builds"] = builds()
    (out_dir / "bench.json").write_text(json.dumps(_jsonable(result), indent=1))
    plot(result, out_dir / "bench.png")
    return result, out_dir
