"""The probe guest: build it from its C sources and format its settings.

The probe (sources in ``harness/probe/``) is a small freestanding 32-bit
program that drives QEMU's legacy virtio-blk/virtio-net, ISA pvpanic, an
ib700 or i6300esb watchdog and COM1 through I/O ports. One set of sources gives two images:

* ``probe.elf`` -- a multiboot v1 kernel for ``-kernel``/``-append``
  (SeaBIOS and QEMU's multiboot option ROM load it);
* ``probe.bin`` -- a 64 KiB firmware image for ``-bios`` with settings in
  ``-fw_cfg name=opt/frozen/cmdline,string=...``; no SeaBIOS runs, which
  matters where guest ring-0 code is emulated (kvm_pvm): SeaBIOS alone
  takes 3-10 s there, the probe firmware reaches its first record in < 1 s.

Both understand the same ``key=value`` settings (see ``ProbeConfig``) and
write the same records (see ``ProbeRecord``).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import config
from harness.rig import DEVICE_ID, DISK_NODE, NETDEV_ID, NIC_ID, Rig, create_image, guest_network
from harness.vm import VM, VMError, system_binary

PROBE_DIR = Path(__file__).resolve().parent / "probe"

#: Sources shared by both images, in link order (entry object first).
COMMON_SOURCES = (
    "cpu.S",
    "lib.c",
    "console.c",
    "pci.c",
    "fwcfg.c",
    "virtio.c",
    "blk.c",
    "net.c",
    "time.c",
    "watchdog.c",
    "main.c",
)
HEADERS = ("probe.h",)
KERNEL_ENTRY, KERNEL_LDS = "multiboot.S", "probe.ld"
BIOS_ENTRY, BIOS_LDS = "bios.S", "probe-bios.ld"

CFLAGS = (
    "-m32",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-stack-protector",
    "-Os",
    # Only integer registers: no SSE/x87 code that an instruction emulator may lack.
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-Wall",
    "-Wextra",
)
LDFLAGS = ("-no-pie", "-static", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments")

#: fw_cfg file the probe reads its settings from (the only channel with -bios).
FW_CFG_NAME = "opt/frozen/cmdline"
MULTIBOOT_MAGIC = 0x1BADB002
BIOS_SIZE = 64 * 1024

#: Serial commands understood by the probe (one byte each on COM1).
CMD_PANIC = b"p"  # write 1 to the ISA pvpanic port 0x505
CMD_WATCHDOG = b"w"  # arm the watchdog (wdt_timeout seconds) and never feed it again
CMD_EMULATION_ERROR = b"e"  # run instructions KVM's emulator refuses
CMD_STOP = b"s"  # stop writing records (console stays responsive)
CMD_GO = b"g"  # resume writing records

SECTOR = 512
RECORD_MAGIC = b"FRZREC01"
HEADER_MAGIC = b"FRZHDR01"


class ProbeBuildError(RuntimeError):
    """The probe guest did not compile or link; carries the compiler output."""


@dataclass(frozen=True)
class ProbeImages:
    elf: Path  # multiboot kernel: -kernel ELF -append CMDLINE
    bios: Path  # firmware: -bios BIN -fw_cfg name=opt/frozen/cmdline,string=CMDLINE


def compiler_version(cc: str = "gcc") -> str:
    """``cc --version``: part of the cache key of everything ``cc`` builds."""
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as e:
        raise ProbeBuildError(f"cannot run the C compiler {cc!r}: {e}") from e


def source_digest(cc: str = "gcc") -> str:
    """Cache key over the sources, the flags and the compiler's version."""
    h = hashlib.sha256()
    h.update(compiler_version(cc).encode())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    names = (*COMMON_SOURCES, *HEADERS, KERNEL_ENTRY, KERNEL_LDS, BIOS_ENTRY, BIOS_LDS)
    for name in sorted(names):
        h.update(name.encode() + b"\0")
        h.update((PROBE_DIR / name).read_bytes())
    return h.hexdigest()


def _run(cmd: list[str], what: str) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ProbeBuildError(f"building the probe {what}: cannot run {cmd[0]!r}: {e}") from e
    if r.returncode != 0:
        raise ProbeBuildError(
            f"building the probe {what} failed ({r.returncode}): {' '.join(cmd)}\n"
            f"{r.stdout}{r.stderr}"
        )


def _link(cc: str, entry: str, lds: str, out: Path) -> None:
    srcs = [str(PROBE_DIR / s) for s in (entry, *COMMON_SOURCES)]
    cmd = [cc, *CFLAGS, *LDFLAGS, f"-Wl,-T,{PROBE_DIR / lds}", "-o", str(out), *srcs, "-lgcc"]
    _run(cmd, out.name)


def build_probe_images(out_dir: Path, *, cc: str = "gcc", objcopy: str = "objcopy") -> ProbeImages:
    """Build both probe images into ``out_dir/<digest>/``; reuse a previous build."""
    out_dir = Path(out_dir)
    final = out_dir / f"probe-{source_digest(cc)[:16]}"
    images = ProbeImages(final / "probe.elf", final / "probe.bin")
    if images.elf.is_file() and images.bios.is_file():
        return images
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".probe-", dir=out_dir))
    try:
        _link(cc, KERNEL_ENTRY, KERNEL_LDS, tmp / "probe.elf")
        _link(cc, BIOS_ENTRY, BIOS_LDS, tmp / "probe-bios.elf")
        _run(
            [objcopy, "-O", "binary", str(tmp / "probe-bios.elf"), str(tmp / "probe.bin")],
            "firmware image",
        )
        size = (tmp / "probe.bin").stat().st_size
        if size != BIOS_SIZE:
            raise ProbeBuildError(f"probe firmware image is {size} bytes, expected {BIOS_SIZE}")
        try:
            os.rename(tmp, final)
        except OSError:
            # A concurrent build of the same sources won the race; use its result.
            if not (images.elf.is_file() and images.bios.is_file()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return images


def build_probe(out_dir: Path) -> Path:
    """Build (or reuse) the probe and return its multiboot ELF (``-kernel``)."""
    return build_probe_images(out_dir).elf


def build_probe_bios(out_dir: Path) -> Path:
    """Build (or reuse) the probe and return its 64 KiB firmware image (``-bios``)."""
    return build_probe_images(out_dir).bios


# -- settings ----------------------------------------------------------------

_HEX_RE = re.compile(r"^[0-9a-fA-F]{1,64}$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
EMULATION_METHODS = ("all", "iret", "enter", "mmio")


def _ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError as e:
        raise ValueError(f"{what}: not an IPv4 address: {value!r}") from e


def _port(value: int, what: str) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"{what}: not a UDP port: {value}")
    return value


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of one probe run; ``cmdline()`` is what the probe parses.

    Defaults fit QEMU user networking: guest 10.0.2.15 sends to the host
    alias 10.0.2.2, which reaches 127.0.0.1:dst_port on the host.
    """

    marker: str
    dst_port: int = 0  # 0: no datagrams
    dst_ip: str = "10.0.2.2"
    src_ip: str = "10.0.2.15"
    netmask: str = "255.255.255.0"
    gateway: str = "10.0.2.2"
    src_port: int = 40000
    mac: str | None = None  # guest MAC; default: the NIC's own
    gw_mac: str | None = None  # next-hop MAC; default: resolved by ARP
    use_blk: bool = True
    use_net: bool = True
    period_ms: int = 50
    sectors: int = 64  # record ring: sectors 1..sectors
    watchdog: str = "auto"  # "auto": an i6300esb if present, else ib700; or "ib700"
    wdt_timeout_s: int = 2  # watchdog timeout armed by 'w' (ib700: even, 0..30)
    wdt_feed: bool = False  # arm the watchdog at boot and feed it every record
    idle: str = "hlt"  # "hlt": sleep on the 100 Hz PIT tick; "spin": busy-wait
    emulation: str = "all"  # which instruction(s) 'e' runs, see EMULATION_METHODS
    emulation_addr: int = 0xFEBF0000  # MMIO/unbacked address 'e' jumps to

    def __post_init__(self) -> None:
        if not _HEX_RE.match(self.marker):
            raise ValueError(f"marker must be 1-64 hex digits: {self.marker!r}")
        for what in ("dst_ip", "src_ip", "netmask", "gateway"):
            _ip(getattr(self, what), what)
        _port(self.dst_port, "dst_port")
        _port(self.src_port, "src_port")
        for what in ("mac", "gw_mac"):
            v = getattr(self, what)
            if v is not None and not _MAC_RE.match(v):
                raise ValueError(f"{what}: not a MAC address: {v!r}")
        if self.sectors < 1:
            raise ValueError("sectors must be >= 1")
        if not 0 <= self.wdt_timeout_s <= 30:
            raise ValueError("wdt_timeout_s must be 0..30 (ib700 range)")
        if self.watchdog not in ("auto", "ib700"):
            raise ValueError(f"watchdog must be 'auto' or 'ib700': {self.watchdog!r}")
        if self.idle not in ("hlt", "spin"):
            raise ValueError(f"idle must be 'hlt' or 'spin': {self.idle!r}")
        if self.emulation not in EMULATION_METHODS:
            raise ValueError(f"emulation must be one of {EMULATION_METHODS}")

    def options(self) -> dict[str, str]:
        opts = {
            "marker": self.marker,
            "ip": self.src_ip,
            "mask": self.netmask,
            "gw": self.gateway,
            "dst": self.dst_ip,
            "port": str(self.dst_port),
            "sport": str(self.src_port),
            "blk": "1" if self.use_blk else "0",
            "net": "1" if self.use_net else "0",
            "period": str(self.period_ms),
            "sectors": str(self.sectors),
            "wdt": self.watchdog,
            "wdt_timeout": str(self.wdt_timeout_s),
            "wdt_feed": "1" if self.wdt_feed else "0",
            "idle": self.idle,
            "emu": self.emulation,
            "emu_addr": f"0x{self.emulation_addr:x}",
        }
        if self.mac:
            opts["mac"] = self.mac.lower()
        if self.gw_mac:
            opts["dmac"] = self.gw_mac.lower()
        return opts

    def cmdline(self) -> str:
        """Space-separated ``key=value`` words (no commas, so -fw_cfg takes it as is)."""
        return " ".join(f"{k}={v}" for k, v in self.options().items())

    def kernel_args(self, elf: Path) -> list[str]:
        """QEMU arguments booting the multiboot image through SeaBIOS."""
        return ["-kernel", str(elf), "-append", self.cmdline()]

    def bios_args(self, bios: Path) -> list[str]:
        """QEMU arguments running the probe as the firmware (fast boot)."""
        return ["-bios", str(bios), "-fw_cfg", f"name={FW_CFG_NAME},string={self.cmdline()}"]


def probe_cmdline(
    marker: str,
    *,
    dst_ip: str = "10.0.2.2",
    dst_port: int,
    src_ip: str = "10.0.2.15",
    gw_mac: str | None = None,
    **more: object,
) -> str:
    """The probe's command line; ``more`` takes any other ``ProbeConfig`` field."""
    cfg = ProbeConfig(
        marker=marker,
        dst_ip=dst_ip,
        dst_port=dst_port,
        src_ip=src_ip,
        gw_mac=gw_mac,
        **more,  # type: ignore[arg-type]
    )
    return cfg.cmdline()


# -- what the probe writes ---------------------------------------------------


@dataclass(frozen=True)
class ProbeRecord:
    """One 512-byte sector written by the probe (record or sector-0 header)."""

    magic: bytes
    counter: int  # record number N (>= 1); format version in the header
    sector: int  # where the probe wrote it; ring size in the header
    ms: int  # guest milliseconds since boot
    marker: str


def record_text(marker: str, n: int) -> bytes:
    """The text of record N: the UDP payload, and also inside the disk record."""
    return f"FROZEN-RECORD:{marker}:{n}\n".encode()


def marker_tag(marker: str) -> bytes:
    """Static string the probe keeps in RAM for its whole life."""
    return f"FROZEN-MARKER:{marker}".encode()


def last_record_tag(marker: str, n: int) -> bytes:
    """String the probe keeps in RAM naming the last record it completed."""
    return f"FROZEN-LAST:{marker}:{n}\n".encode()


def decode_sector(data: bytes) -> ProbeRecord | None:
    """Decode one sector; None unless it is a probe record/header with a good CRC."""
    if len(data) != SECTOR or data[:8] not in (RECORD_MAGIC, HEADER_MAGIC):
        return None
    if zlib.crc32(data[:508]) != struct.unpack_from("<I", data, 508)[0]:
        return None
    counter, sector, ms, mlen = struct.unpack_from("<IIII", data, 8)
    if mlen > 64:
        return None
    marker = data[24 : 24 + mlen].decode("ascii", errors="replace")
    return ProbeRecord(data[:8], counter, sector, ms, marker)


# -- the probe as a rig --------------------------------------------------------

#: The probe's RAM (pmemsave reads all of it).
RAM_MB = 64
#: blkdebug rules that make every write fail with EIO once the host has read
#: from the device (HMP qemu-io), so the host chooses the moment: the probe
#: only writes, and its writes come with flushes (no write cache negotiated),
#: so neither writes nor flushes can serve as the switch.
_BLKDEBUG_SET_STATE = [{"event": "read_aio", "state": 1, "new_state": 2}]
_BLKDEBUG_INJECT = [{"event": "pwritev", "state": 2, "errno": 5, "once": False, "iotype": "write"}]


def probe_args(
    boot_args: Sequence[str],
    image: Path,
    disk_format: str,
    *,
    netdev: str,
    actions: Mapping[str, str],
    werror: str | None,
    io_error_injection: bool,
    share_rw: bool = True,
) -> list[str]:
    """QEMU arguments for the probe guest: legacy virtio-blk/net, pvpanic, ib700.

    ``share_rw=False`` is what production has (libvirt's default): the
    guest's device then takes the unshare-write lock byte too, so only a
    real release lets a standby open the image; but no writable NBD export
    of the same node can be added next to it.
    """
    file_node: dict[str, Any] = {"driver": "file", "filename": str(image)}
    if io_error_injection:
        file_node = {
            "driver": "blkdebug",
            "image": file_node,
            "set-state": _BLKDEBUG_SET_STATE,
            "inject-error": _BLKDEBUG_INJECT,
        }
    blockdev = {"driver": disk_format, "node-name": DISK_NODE, "file": file_node}
    blk_dev = f"virtio-blk-pci,disable-modern=on,drive={DISK_NODE},id={DEVICE_ID}"
    blk_dev += ",share-rw=on" if share_rw else ",share-rw=off"
    if werror:
        blk_dev += f",werror={werror}"
    if io_error_injection:
        # An explicit geometry spares QEMU its guessing read of sector 0 at
        # startup, which would otherwise arm the read-triggered rule.
        blk_dev += ",cyls=2,heads=16,secs=63"
    args = [
        "-machine",
        "pc",
        "-m",
        str(RAM_MB),
        *boot_args,
        "-blockdev",
        json.dumps(blockdev),
        "-device",
        blk_dev,
        "-netdev",
        netdev,
        "-device",
        f"virtio-net-pci,disable-modern=on,netdev={NETDEV_ID},id={NIC_ID},romfile=",
        "-device",
        "pvpanic",
        "-device",
        "ib700",
    ]
    for k, v in actions.items():
        args += ["-action", f"{k}={v}"]
    return args


@contextlib.contextmanager
def probe_rig(
    prefix: Path,
    workdir: Path,
    *,
    disk_format: str = "raw",
    network: str = "user",
    actions: Mapping[str, str] | None = None,
    werror: str | None = None,
    io_error_injection: bool = False,
    accel: str = "kvm",
    firmware_dirs: Sequence[Path] = (),
    extra_args: Sequence[str] = (),
    guest_options: Mapping[str, Any] | None = None,
    first_record_timeout: float = 30.0,
    log_dir: Path | None = None,
    boot: str = "bios",
    probe_cache: Path | None = None,
    image_dir: Path | None = None,
    share_rw: bool = True,
) -> Iterator[Rig]:
    """Boot the probe guest and wait for its first records; always tear down.

    ``boot="bios"`` runs the probe as the firmware (first record in well
    under a second on KVM here); ``"kernel"`` boots it through SeaBIOS as a
    multiboot kernel (needs the firmware dirs, and is slow under emulation).
    The disk image goes to ``image_dir`` when given (e.g. a filesystem to
    unmount after the freeze), else to ``workdir``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    images = build_probe_images(probe_cache or config.cache_root() / "probe")
    image = (image_dir or workdir) / f"disk.{disk_format}"
    create_image(prefix, image, disk_format)
    marker = secrets.token_hex(8)
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(guest_network(network))
        cfg = ProbeConfig(marker=marker, **{**net.addresses, **(guest_options or {})})
        if boot == "bios":
            boot_args = cfg.bios_args(images.bios)
        elif boot == "kernel":
            boot_args = cfg.kernel_args(images.elf)
        else:
            raise ValueError(f"unknown boot mode {boot!r}")
        args = probe_args(
            boot_args,
            image,
            disk_format,
            netdev=net.netdev,
            actions=actions or {},
            werror=werror,
            io_error_injection=io_error_injection,
            share_rw=share_rw,
        )
        vm = VM(
            system_binary(prefix),
            [*args, *net.args, *extra_args],
            name="probe",
            log_dir=log_dir or workdir / "vm",
            accel=accel,
            firmware_dirs=firmware_dirs,
            pass_fds=net.fds,
        )
        stack.enter_context(vm)
        net.close_fds()  # QEMU holds its own copy of the tap fd now
        rig = Rig(
            vm,
            prefix,
            workdir,
            image,
            disk_format,
            network,
            marker,
            net.listener,
            net.capture,
            net.tap,
            accel=accel,
            bios=images.bios,
            ram_mb=RAM_MB,
            share_rw=share_rw,
        )
        try:
            rig.wait_record(1, first_record_timeout)
        except VMError:
            vm.mark_failed()
            raise
        yield rig
