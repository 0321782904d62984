"""The Linux guest profile: a Debian kernel and busybox doing the probe's workload.

The probe guest (``harness/guest.py``) drives QEMU's devices by hand; this
profile runs the same workload through a real guest kernel's drivers: the
Debian bookworm kernel (virtio-pci, virtio-blk, virtio-net, pvpanic,
i6300esb/ib700 as modules) with a harness-made initramfs holding
busybox-static, those modules and an ``/init`` shell script.

Everything comes from two pinned Debian packages, fetched with
``apt-get download`` into the harness cache (never installed) and checked
against the pinned sha256 and the apt index:

* the kernel: ``vmlinuz`` is unpacked into an uncompressed ``vmlinux`` (the
  extract-vmlinux approach) that QEMU boots through its PVH entry note, which
  skips the real-mode setup and the in-guest decompressor (the slow parts
  under emulation);
* ``busybox-static``: the shell and tools of ``/init``.

A tiny static C helper (``frzrec``, built with the system gcc like the probe)
writes the record sectors and sends the datagrams, because the record format
carries a CRC-32 that a busybox shell cannot compute.  Disk sectors, UDP
payloads, console lines and the RAM tags are exactly the probe's (see
``guest.py``), so the same checks apply.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import lzma
import os
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import config, guest
from harness.rig import DEVICE_ID, DISK_NODE, NETDEV_ID, NIC_ID, Rig, create_image, guest_network
from harness.vm import VM, system_binary

#: The pinned packages: (name, version, sha256 of the .deb).
KERNEL_PACKAGE = (
    "linux-image-6.1.0-50-amd64",
    "6.1.176-1",
    "7b5597492a0a65aee61985a492e6bcc3f2cde830072a0e3b3d8c7e1b90279bd3",
)
BUSYBOX_PACKAGE = (
    "busybox-static",
    "1:1.35.0-4+deb12u1+b1",
    "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
)

#: Modules the guest needs (their dependencies are added from modinfo).
WANTED_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "pvpanic_mmio",
    "pvpanic_pci",
    "i6300esb",
    "ib700wdt",
)
#: Watchdog drivers: /init loads only the configured one, so it owns /dev/watchdog.
WATCHDOG_MODULES = {"i6300esb": ("i6300esb", "heartbeat"), "ib700": ("ib700wdt", "timeout")}
#: Bumped when the image layout changes without a source change.
LAYOUT_VERSION = "1"

#: Serial commands, as for the probe (one byte each on ttyS0).
CMD_PANIC = guest.CMD_PANIC  # panic() through sysrq: the pvpanic notifier tells QEMU
CMD_WATCHDOG = guest.CMD_WATCHDOG  # open /dev/watchdog and never feed it
CMD_STOP = guest.CMD_STOP
CMD_GO = guest.CMD_GO

XEN_ELFNOTE_PHYS32_ENTRY = 18


class LinuxGuestError(RuntimeError):
    """A package could not be fetched or verified, or an image not built."""


# -- packages ----------------------------------------------------------------


def deb_filename(name: str, version: str) -> str:
    """The file name ``apt-get download`` gives (epoch colon quoted as %3a)."""
    return f"{name}_{version.replace(':', '%3a')}_amd64.deb"


def apt_index_sha256(name: str, version: str) -> str | None:
    """The sha256 the machine's apt index lists for name=version, if any."""
    r = subprocess.run(
        ["apt-cache", "show", f"{name}={version}"], capture_output=True, text=True, check=False
    )
    m = re.search(r"^SHA256: ([0-9a-f]{64})$", r.stdout, re.M)
    return m.group(1) if r.returncode == 0 and m else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_deb(pkg: tuple[str, str, str], dest: Path) -> Path:
    """Download one pinned package (reused when cached); verify its sha256.

    The pin must agree with the apt index whenever the index still lists
    that version; a cached file is accepted on the pinned hash alone.
    """
    name, version, sha = pkg
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / deb_filename(name, version)
    if not path.is_file():
        indexed = apt_index_sha256(name, version)
        if indexed is None:
            raise LinuxGuestError(f"{name}={version} is not in the apt index (apt-get update?)")
        if indexed != sha:
            raise LinuxGuestError(f"{name}={version}: apt index sha256 {indexed} != pin {sha}")
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=dest))
        try:
            r = subprocess.run(
                ["apt-get", "download", "-q", f"{name}={version}"],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
            )
            got = tmp / path.name
            if r.returncode != 0 or not got.is_file():
                raise LinuxGuestError(f"apt-get download {name}={version}: {r.stderr.strip()}")
            os.replace(got, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    actual = sha256_file(path)
    if actual != sha:
        path.unlink()
        raise LinuxGuestError(f"{path.name}: sha256 {actual}, pinned {sha}; removed")
    return path


def unpack_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise LinuxGuestError(f"dpkg-deb -x {deb.name}: {r.stderr.strip()}")


# -- vmlinux from vmlinuz ----------------------------------------------------

#: Compressed payload magics inside a bzImage, as scripts/extract-vmlinux tries them.
_MAGICS = (
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
)


def _decompress(kind: str, data: bytes) -> bytes | None:
    try:
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        r = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=False)
        return r.stdout or None
    except (lzma.LZMAError, zlib.error, OSError):
        return None


def extract_vmlinux(image: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (first payload that is ELF)."""
    for kind, magic in _MAGICS:
        start = image.find(magic)
        while start >= 0:
            out = _decompress(kind, image[start:])
            if out and out.startswith(b"\x7fELF"):
                return out
            start = image.find(magic, start + 1)
    raise LinuxGuestError("no xz/zstd/gzip payload decompressing to an ELF found")


PT_LOAD = 1
PT_NOTE = 4


@dataclass(frozen=True)
class ElfSegment:
    type: int
    offset: int  # in the file
    paddr: int
    filesz: int


def elf_segments(elf: bytes) -> list[ElfSegment]:
    """The program headers of a little-endian ELF64 file (a kernel, a core dump)."""
    if not elf.startswith(b"\x7fELF\x02\x01"):
        raise LinuxGuestError("not a little-endian ELF64 file")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    segments = []
    for i in range(phnum):
        p_type, _flags, off, _va, pa, filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        segments.append(ElfSegment(p_type, off, pa, filesz))
    return segments


def elf_notes(elf: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of every note in the PT_NOTE segments of an ELF64."""
    notes = []
    for seg in elf_segments(elf):
        if seg.type != PT_NOTE:
            continue
        pos, end = seg.offset, seg.offset + seg.filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            pos += 12
            name = elf[pos : pos + namesz].rstrip(b"\0")
            pos += (namesz + 3) & ~3
            desc = elf[pos : pos + descsz]
            pos += (descsz + 3) & ~3
            notes.append((name, ntype, desc))
    return notes


def has_pvh_note(elf: bytes) -> bool:
    """True if the kernel has the Xen PVH entry note QEMU's -kernel looks for."""
    return any(n == b"Xen" and t == XEN_ELFNOTE_PHYS32_ENTRY for n, t, _ in elf_notes(elf))


# -- modules -----------------------------------------------------------------


def module_name(path: str) -> str:
    """``kernel/drivers/misc/pvpanic/pvpanic-mmio.ko`` -> ``pvpanic_mmio``."""
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")


def modinfo_depends(ko: bytes) -> list[str]:
    """Module names in the ``depends=`` entry of a .ko's .modinfo section."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def generate_modules_dep(moddir: Path) -> str:
    """A modules.dep for ``moddir`` (lib/modules/<ver>), as depmod writes it.

    Debian generates modules.dep at install time, so the package has none;
    it is made here from each module's own modinfo.
    """
    paths = {}
    for ko in sorted(moddir.rglob("*.ko")):
        rel = ko.relative_to(moddir).as_posix()
        paths[module_name(rel)] = rel
    lines = []
    for rel in paths.values():
        deps = modinfo_depends((moddir / rel).read_bytes())
        lines.append(f"{rel}: " + " ".join(paths[d] for d in deps if d in paths))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep text -> {module path: [paths it needs]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def resolve_modules(deps: Mapping[str, Sequence[str]], wanted: Iterable[str]) -> list[str]:
    """Paths of ``wanted`` modules and everything they need, in load order."""
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise LinuxGuestError(f"module dependency cycle through {path}")
        visiting.add(path)
        for d in deps.get(path, ()):
            visit(d)
        visiting.discard(path)
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise LinuxGuestError(f"module {name} is not in modules.dep")
        visit(path)
    return order


# -- cpio (newc) -------------------------------------------------------------

S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int  # type and permission bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A newc ("070701") archive, deterministic (mtime 0, uid/gid 0)."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, e in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        fields = (
            ino if e.name != "TRAILER!!!" else 0,
            e.mode,
            0,
            0,
            2 if e.mode & S_IFDIR == S_IFDIR else 1,
            0,
            len(e.data),
            0,
            0,
            e.rdev[0],
            e.rdev[1],
            len(name),
            0,
        )
        out += b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + name
        pad()
        out += e.data
        pad()
    return bytes(out)


# -- the guest's settings ----------------------------------------------------


@dataclass(frozen=True)
class LinuxConfig:
    """Settings of one Linux guest run; they travel on the kernel command line."""

    marker: str
    dst_port: int = 0  # 0: no datagrams
    dst_ip: str = "10.0.2.2"
    src_ip: str = "10.0.2.15"
    netmask: str = "255.255.255.0"
    gateway: str = "10.0.2.2"
    use_blk: bool = True
    use_net: bool = True
    period_ms: int = 100
    sectors: int = 64
    watchdog: str = "i6300esb"  # or "ib700": which driver /init loads
    wdt_timeout_s: int = 2
    quiet: bool = True  # kernel messages off the console (fast under TCG)

    def __post_init__(self) -> None:
        # Reuse the probe's validation of the shared fields.
        guest.ProbeConfig(
            marker=self.marker,
            dst_port=self.dst_port,
            dst_ip=self.dst_ip,
            src_ip=self.src_ip,
            netmask=self.netmask,
            gateway=self.gateway,
            sectors=self.sectors,
        )
        if self.watchdog not in WATCHDOG_MODULES:
            raise ValueError(f"watchdog must be one of {sorted(WATCHDOG_MODULES)}")
        if not 1 <= self.wdt_timeout_s <= 30:
            raise ValueError("wdt_timeout_s must be 1..30")
        if self.period_ms < 1:
            raise ValueError("period_ms must be >= 1")

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(f"0.0.0.0/{self.netmask}").prefixlen

    def options(self) -> dict[str, str]:
        """What /init reads, as ``frozen.<key>=<value>`` words."""
        return {
            "marker": self.marker,
            "ip": f"{self.src_ip}/{self.prefixlen}",
            "gw": self.gateway,
            "dst": self.dst_ip,
            "port": str(self.dst_port if self.use_net else 0),
            "blk": "1" if self.use_blk else "0",
            "period": str(self.period_ms),
            "sectors": str(self.sectors),
            "wdt": self.watchdog,
            "wdt_timeout": str(self.wdt_timeout_s),
        }

    def cmdline(self) -> str:
        # panic=0: stay in panic (no reboot) so the host sees the panicked VM;
        # cryptomgr.notests: the boot-time crypto self-tests take ~2 s under TCG.
        kernel = ["console=ttyS0", "panic=0", "tsc=reliable", "no_timer_check", "cryptomgr.notests"]
        if self.quiet:
            kernel.append("quiet")
        return " ".join([*kernel, *(f"frozen.{k}={v}" for k, v in self.options().items())])


@dataclass(frozen=True)
class LinuxImages:
    kernel: Path  # vmlinux with the PVH note (or the bzImage, see ``boot_mode``)
    initrd: Path  # uncompressed newc cpio
    bzimage: Path
    boot_mode: str  # "pvh": kernel is vmlinux; "bzimage": kernel is the bzImage

    def boot_args(self, cfg: LinuxConfig) -> list[str]:
        """QEMU arguments: direct kernel boot with the initramfs and settings."""
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", cfg.cmdline()]


def host_accel() -> str:
    """``kvm`` where the CPU has hardware virtualization, else ``tcg``.

    kvm_pvm (KVM without VMX/SVM) cannot run a stock kernel, so /dev/kvm alone
    is not enough.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    hw = re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M)
    return "kvm" if hw and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


# -- what runs in the guest --------------------------------------------------

#: The record/datagram helper: one call writes one sector and sends one datagram.
FRZREC_C = r"""
/* frzrec DEV|- SECTOR N MARKER IP PORT
 * N > 0: write record N (FRZREC01) at SECTOR and send its UDP datagram;
 * N = 0: write the header (FRZHDR01, ring size SECTOR) at sector 0.
 * Prints "blk=<ok|ioerr|off> net=<ok|fail|off> t=<ms>" (the probe's words). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint32_t crc32(const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffff;

    while (n--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320 & -(c & 1));
    }
    return ~c;
}

static uint32_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (uint32_t)(ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24;
}

int main(int argc, char **argv)
{
    const char *blk = "off", *net = "off";
    uint8_t *rec;
    char text[128];
    unsigned long sector, n;
    size_t mlen;
    int port;

    if (argc != 7)
        return 2;
    sector = strtoul(argv[2], 0, 10);
    n = strtoul(argv[3], 0, 10);
    mlen = strlen(argv[4]);
    port = atoi(argv[6]);
    if (mlen > 64 || posix_memalign((void **)&rec, 4096, 4096))
        return 2;
    memset(rec, 0, 512);
    snprintf(text, sizeof(text), n ? "FROZEN-RECORD:%s:%lu\n" : "FROZEN-HEADER:%s\n",
         argv[4], n);
    memcpy(rec, n ? "FRZREC01" : "FRZHDR01", 8);
    put32(rec + 8, n ? n : 1);
    put32(rec + 12, sector);
    put32(rec + 16, now_ms());
    put32(rec + 20, mlen);
    memcpy(rec + 24, argv[4], mlen);
    memcpy(rec + 88, text, strlen(text));
    put32(rec + 508, crc32(rec, 508));
    if (strcmp(argv[1], "-")) {
        /* O_DIRECT + fdatasync: completed means QEMU has it, flushed. */
        int fd = open(argv[1], O_WRONLY | O_DIRECT);

        blk = fd >= 0 && pwrite(fd, rec, 512, n ? sector * 512 : 0) == 512 &&
              !fdatasync(fd) ? "ok" : "ioerr";
        if (fd >= 0)
            close(fd);
    }
    if (n && port > 0) {
        struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port) };
        int s = socket(AF_INET, SOCK_DGRAM, 0);

        inet_pton(AF_INET, argv[5], &to.sin_addr);
        net = s >= 0 && sendto(s, text, strlen(text), 0, (struct sockaddr *)&to,
                       sizeof(to)) == (ssize_t)strlen(text) ? "ok" : "fail";
    }
    printf("blk=%s net=%s t=%u\n", blk, net, now_ms());
    return 0;
}
"""

#: /init: set up, then the probe's loop and console commands.
INIT_SH = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mkdir -p /run/frozen
cfg_marker=none cfg_ip=10.0.2.15/24 cfg_gw=10.0.2.2 cfg_dst=10.0.2.2 cfg_port=0
cfg_blk=1 cfg_period=100 cfg_sectors=64 cfg_wdt=i6300esb cfg_wdt_timeout=2
for w in $(cat /proc/cmdline); do
    case "$w" in
    frozen.*=*)
        k=${w#frozen.}; v=${k#*=}; k=${k%%=*}
        case "$k" in *[!a-z_]*) echo "ignoring option $k"; continue;; esac
        eval "cfg_$k=\$v";;
    esac
done
# The marker stays in RAM for the VM's whole life: a shell variable and a tmpfs file.
MARKER_TAG="FROZEN-MARKER:$cfg_marker"
printf %s "$MARKER_TAG" > /run/frozen/marker
echo "LINUX: frozen linux guest $(uname -r)"
echo "marker=$cfg_marker"
while read -r mod params; do
    case "$mod" in
    */i6300esb.ko) [ "$cfg_wdt" = i6300esb ] || continue
        params="heartbeat=$cfg_wdt_timeout";;
    */ib700wdt.ko) [ "$cfg_wdt" = ib700 ] || continue
        params="timeout=$cfg_wdt_timeout";;
    esac
    insmod "/lib/modules/$mod" $params 2>/dev/null || echo "insmod $mod failed"
done < /etc/frozen/modules
dev=-
if [ "$cfg_blk" = 1 ]; then
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do usleep 10000; i=$((i + 1)); done
    if [ -b /dev/vda ]; then
        cap=$(cat /sys/block/vda/size)
        [ "$cfg_sectors" -gt $((cap - 1)) ] && cfg_sectors=$((cap - 1))
        [ "$cfg_sectors" -gt 0 ] && dev=/dev/vda
        echo "virtio-blk ok, record sectors=$cfg_sectors"
        echo "header write $(frzrec $dev $cfg_sectors 0 $cfg_marker - 0)"
    else
        echo "virtio-blk init failed"
    fi
fi
if [ "$cfg_port" != 0 ]; then
    if ip link set eth0 up && ip addr add "$cfg_ip" dev eth0 &&
       ip route add default via "$cfg_gw"; then
        echo "virtio-net ok, ip=$cfg_ip dst=$cfg_dst:$cfg_port"
    else
        echo "virtio-net init failed"; cfg_port=0
    fi
fi
commands() {
    stty -icanon -echo 2>/dev/null
    while read -r -n 1 c; do
        case "$c" in
        p) echo "panic via sysrq (pvpanic notifier)"; echo c > /proc/sysrq-trigger;;
        w) exec 3> /dev/watchdog &&
           echo "watchdog $cfg_wdt armed, not fed, timeout s=$cfg_wdt_timeout";;
        s) : > /run/frozen/stop; echo stopped;;
        g) rm -f /run/frozen/stop; echo going;;
        esac
    done
}
commands < /dev/ttyS0 &
echo ready
n=0
period_us=$((cfg_period * 1000))
while :; do
    if [ ! -e /run/frozen/stop ]; then
        n=$((n + 1))
        st=$(frzrec $dev $((1 + (n - 1) % cfg_sectors)) $n $cfg_marker $cfg_dst $cfg_port)
        # Completed: publish it in RAM first, then on the console.
        LAST="FROZEN-LAST:$cfg_marker:$n
"
        printf %s "$LAST" > /run/frozen/last
        echo "record $n $st"
    fi
    usleep $period_us
done
"""

HELPER_CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra")


# -- building ----------------------------------------------------------------


def build_helper(out: Path, cc: str = "gcc") -> None:
    src = out.with_suffix(".c")
    src.write_text(FRZREC_C)
    r = subprocess.run(
        [cc, *HELPER_CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise LinuxGuestError(f"building frzrec failed:\n{r.stdout}{r.stderr}")


def initramfs_entries(
    busybox: bytes, helper: bytes, moddir: Path, modules: Sequence[str]
) -> list[CpioEntry]:
    entries = [
        CpioEntry(d, S_IFDIR | 0o755)
        for d in (
            "bin",
            "dev",
            "etc",
            "etc/frozen",
            "lib",
            "lib/modules",
            "proc",
            "run",
            "sys",
            "tmp",
        )
    ]
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    entries.append(CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)))
    entries += [
        CpioEntry("init", S_IFREG | 0o755, INIT_SH.encode()),
        CpioEntry("bin/busybox", S_IFREG | 0o755, busybox),
        CpioEntry("bin/sh", S_IFLNK | 0o777, b"busybox"),
        CpioEntry("bin/frzrec", S_IFREG | 0o755, helper),
        CpioEntry(
            "etc/frozen/modules", S_IFREG | 0o644, "".join(f"{m}\n" for m in modules).encode()
        ),
    ]
    dirs: set[str] = set()
    for m in modules:
        parts = m.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "lib/modules/" + "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                entries.append(CpioEntry(d, S_IFDIR | 0o755))
        entries.append(CpioEntry(f"lib/modules/{m}", S_IFREG | 0o644, (moddir / m).read_bytes()))
    return entries


def guest_digest(cc: str = "gcc") -> str:
    """Cache key: pinned packages, guest sources, compiler version, layout."""
    h = hashlib.sha256()
    for part in (
        KERNEL_PACKAGE[2],
        BUSYBOX_PACKAGE[2],
        FRZREC_C,
        INIT_SH,
        guest.compiler_version(cc),
        " ".join(HELPER_CFLAGS),
        " ".join(WANTED_MODULES),
        LAYOUT_VERSION,
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def build_linux_guest(out_dir: Path | None = None, *, cc: str = "gcc") -> LinuxImages:
    """Fetch, unpack and assemble the Linux guest into ``out_dir/linux-<digest>/``.

    Reused when already built.  Packages are kept in ``out_dir/debs``.
    """
    out_dir = Path(out_dir) if out_dir else config.cache_root() / "linux-guest"
    final = out_dir / f"linux-{guest_digest(cc)[:16]}"
    images = _images(final)
    if images is not None:
        return images
    kernel_deb = fetch_deb(KERNEL_PACKAGE, out_dir / "debs")
    busybox_deb = fetch_deb(BUSYBOX_PACKAGE, out_dir / "debs")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".linux-", dir=out_dir))
    try:
        unpack_deb(kernel_deb, tmp / "kernel")
        unpack_deb(busybox_deb, tmp / "busybox")
        vmlinuz = next((tmp / "kernel" / "boot").glob("vmlinuz-*"), None)
        moddir = next((k.parent for k in (tmp / "kernel").glob("lib/modules/*/kernel")), None)
        if vmlinuz is None or moddir is None:
            raise LinuxGuestError(f"{kernel_deb.name} has no boot/vmlinuz-* or lib/modules/*")
        bzimage = vmlinuz.read_bytes()
        (tmp / "out").mkdir()
        (tmp / "out" / "bzImage").write_bytes(bzimage)
        vmlinux = extract_vmlinux(bzimage)
        if has_pvh_note(vmlinux):
            (tmp / "out" / "vmlinux").write_bytes(vmlinux)
        dep = generate_modules_dep(moddir)
        modules = resolve_modules(parse_modules_dep(dep), WANTED_MODULES)
        build_helper(tmp / "frzrec", cc)
        entries = initramfs_entries(
            (tmp / "busybox" / "bin" / "busybox").read_bytes(),
            (tmp / "frzrec").read_bytes(),
            moddir,
            modules,
        )
        (tmp / "out" / "initrd.cpio").write_bytes(cpio_newc(entries))
        (tmp / "out" / "modules.dep").write_text(dep)
        try:
            os.rename(tmp / "out", final)
        except OSError:
            # A concurrent build of the same inputs won the race; use its result.
            if _images(final) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = _images(final)
    assert result is not None
    return result


def _images(final: Path) -> LinuxImages | None:
    initrd, bzimage, vmlinux = final / "initrd.cpio", final / "bzImage", final / "vmlinux"
    if not (initrd.is_file() and bzimage.is_file()):
        return None
    if vmlinux.is_file():
        return LinuxImages(vmlinux, initrd, bzimage, "pvh")
    return LinuxImages(bzimage, initrd, bzimage, "bzimage")


# -- the Linux guest as a rig --------------------------------------------------

#: The Linux guest's RAM (pmemsave reads all of it).
RAM_MB = 128
#: TCG on a shared 2-core machine takes ~4-15 s to the first record.
FIRST_RECORD_TIMEOUT = 90.0


def linux_args(
    images: LinuxImages,
    cfg: LinuxConfig,
    image: Path,
    disk_format: str,
    actions: Mapping[str, str],
    netdev: str,
) -> list[str]:
    """Modern virtio-blk/net (Linux drivers), ISA pvpanic (ACPI QEMU0001), i6300esb."""
    blockdev = {
        "driver": disk_format,
        "node-name": DISK_NODE,
        "file": {"driver": "file", "filename": str(image)},
    }
    args = [
        "-machine",
        "pc",
        "-m",
        str(RAM_MB),
        "-smp",
        "1",
        *images.boot_args(cfg),
        "-blockdev",
        json.dumps(blockdev),
        # share-rw: the writable NBD export of attempts.prepare_write_paths.
        "-device",
        f"virtio-blk-pci,drive={DISK_NODE},id={DEVICE_ID},share-rw=on",
        "-netdev",
        netdev,
        "-device",
        f"virtio-net-pci,netdev={NETDEV_ID},id={NIC_ID},romfile=",
        "-device",
        "pvpanic",
        "-device",
        "i6300esb",
    ]
    for k, v in actions.items():
        args += ["-action", f"{k}={v}"]
    return args


@contextlib.contextmanager
def linux_rig(
    prefix: Path,
    workdir: Path,
    *,
    disk_format: str = "raw",
    network: str = "user",
    actions: Mapping[str, str] | None = None,
    accel: str = "tcg",
    firmware_dirs: Sequence[Path] = (),
    log_dir: Path | None = None,
    first_record_timeout: float = FIRST_RECORD_TIMEOUT,
) -> Iterator[Rig]:
    """Boot the Linux guest and wait for its first record (as guest.probe_rig).

    ``network``: as rig.guest_network (``user`` or ``tap``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    images = build_linux_guest()
    # Firmware for the standby QEMU (it never runs, so any will do).
    standby_bios = guest.build_probe_images(config.cache_root() / "probe").bios
    image = workdir / f"disk.{disk_format}"
    create_image(prefix, image, disk_format)
    marker = secrets.token_hex(8)
    with guest_network(network) as net:
        cfg = LinuxConfig(marker=marker, **net.addresses)
        vm = VM(
            system_binary(prefix),
            linux_args(images, cfg, image, disk_format, actions or {}, net.netdev),
            name="linux",
            log_dir=log_dir or workdir / "vm",
            accel=accel,
            firmware_dirs=firmware_dirs,
            pass_fds=net.fds,
        )
        with vm:
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
                bios=standby_bios,
                ram_mb=RAM_MB,
                paged=True,
                record_timeout=10.0,
            )
            try:
                rig.wait_record(1, first_record_timeout)
            except BaseException:
                vm.mark_failed()
                raise
            yield rig
