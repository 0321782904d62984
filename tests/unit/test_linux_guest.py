"""The Linux guest profile's building blocks, on synthetic inputs (no download)."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from harness import guest, linux_guest
from harness.linux_guest import CpioEntry, LinuxConfig, LinuxGuestError
from harness.rig import RECORD_RX


def fake_elf(notes: list[tuple[bytes, int, bytes]]) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding ``notes``."""
    blob = b""
    for name, ntype, desc in notes:
        n = name + b"\0"
        blob += struct.pack("<III", len(n), len(desc), ntype)
        blob += n + b"\0" * (-len(n) % 4) + desc + b"\0" * (-len(desc) % 4)
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(blob), len(blob), 4)
    return bytes(ehdr) + phdr + blob


PVH_NOTE = (b"Xen", linux_guest.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000000))


# -- settings ------------------------------------------------------------------


def test_cmdline_carries_settings() -> None:
    cfg = LinuxConfig(marker="abc123", dst_port=4242, netmask="255.255.0.0", period_ms=50)
    words = cfg.cmdline().split()
    assert "console=ttyS0" in words and "panic=0" in words and "quiet" in words
    assert "frozen.marker=abc123" in words
    assert "frozen.port=4242" in words
    assert "frozen.ip=10.0.2.15/16" in words
    assert "frozen.period=50" in words
    assert "frozen.wdt=i6300esb" in words


def test_cmdline_net_off_sends_nothing() -> None:
    assert "frozen.port=0" in LinuxConfig(marker="ab", dst_port=99, use_net=False).cmdline()


@pytest.mark.parametrize(
    "bad",
    [
        {"marker": "not-hex"},
        {"marker": "ab", "dst_ip": "10.0.2"},
        {"marker": "ab", "sectors": 0},
        {"marker": "ab", "watchdog": "none"},
        {"marker": "ab", "wdt_timeout_s": 0},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LinuxConfig(**bad)  # type: ignore[arg-type]


def test_boot_args() -> None:
    images = linux_guest.LinuxImages(Path("/k"), Path("/i"), Path("/b"), "pvh")
    cfg = LinuxConfig(marker="ab")
    assert images.boot_args(cfg) == ["-kernel", "/k", "-initrd", "/i", "-append", cfg.cmdline()]


# -- cpio ----------------------------------------------------------------------


def test_cpio_newc_layout() -> None:
    data = linux_guest.cpio_newc(
        [
            CpioEntry("init", linux_guest.S_IFREG | 0o755, b"#!/bin/sh\n"),
            CpioEntry("dev/console", linux_guest.S_IFCHR | 0o600, rdev=(5, 1)),
        ]
    )
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert data.count(b"070701") == 3  # two entries and the trailer
    assert b"TRAILER!!!\0" in data
    # The header's filesize field (7th) of the first entry, then its name and data.
    assert int(data[6 + 6 * 8 : 6 + 7 * 8], 16) == len(b"#!/bin/sh\n")
    assert int(data[6 + 1 * 8 : 6 + 2 * 8], 16) == 0o100755
    assert b"init\0" in data and b"#!/bin/sh\n" in data


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio tool to read the archive")
def test_cpio_newc_readable_by_cpio(tmp_path: Path) -> None:
    data = linux_guest.cpio_newc(
        [
            CpioEntry("bin", linux_guest.S_IFDIR | 0o755),
            CpioEntry("bin/tool", linux_guest.S_IFREG | 0o755, b"x" * 513),
            CpioEntry("bin/sh", linux_guest.S_IFLNK | 0o777, b"tool"),
        ]
    )
    r = subprocess.run(
        ["cpio", "-idm", "--quiet"], input=data, cwd=tmp_path, capture_output=True, check=False
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bin" / "tool").read_bytes() == b"x" * 513
    assert (tmp_path / "bin" / "sh").is_symlink()


# -- modules -------------------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/net/net_failover.ko
kernel/drivers/misc/pvpanic/pvpanic.ko:
kernel/drivers/misc/pvpanic/pvpanic-mmio.ko: kernel/drivers/misc/pvpanic/pvpanic.ko
"""


def test_resolve_modules_orders_dependencies_first() -> None:
    deps = linux_guest.parse_modules_dep(MODULES_DEP)
    order = linux_guest.resolve_modules(deps, ["virtio_net", "pvpanic_mmio", "virtio_pci"])
    names = [linux_guest.module_name(p) for p in order]
    assert sorted(names) == sorted(set(names))  # each once
    for mod, needs in (
        ("virtio_net", "net_failover"),
        ("net_failover", "failover"),
        ("virtio_pci", "virtio_ring"),
        ("pvpanic_mmio", "pvpanic"),
    ):
        assert names.index(needs) < names.index(mod)
    assert "virtio_pci_modern_dev" in names


def test_resolve_modules_unknown_and_cycle() -> None:
    with pytest.raises(LinuxGuestError, match=r"not in modules\.dep"):
        linux_guest.resolve_modules(linux_guest.parse_modules_dep(MODULES_DEP), ["nope"])
    cyclic = {"a.ko": ["b.ko"], "b.ko": ["a.ko"]}
    with pytest.raises(LinuxGuestError, match="cycle"):
        linux_guest.resolve_modules(cyclic, ["a"])


def test_generate_modules_dep_from_modinfo(tmp_path: Path) -> None:
    mods = tmp_path / "kernel"
    (mods / "a").mkdir(parents=True)
    (mods / "a" / "base.ko").write_bytes(b"\x7fELF...\0license=GPL\0depends=\0name=base\0")
    (mods / "a" / "top-dev.ko").write_bytes(b"\x7fELF\0alias=x\0depends=base\0name=top_dev\0")
    dep = linux_guest.generate_modules_dep(tmp_path)
    assert "kernel/a/top-dev.ko: kernel/a/base.ko\n" in dep
    assert "kernel/a/base.ko:\n" in dep
    order = linux_guest.resolve_modules(linux_guest.parse_modules_dep(dep), ["top_dev"])
    assert order == ["kernel/a/base.ko", "kernel/a/top-dev.ko"]


# -- vmlinux -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["xz", "gzip", "zstd"])
def test_extract_vmlinux_from_synthetic_bzimage(kind: str) -> None:
    elf = fake_elf([PVH_NOTE]) + bytes(range(256)) * 64
    if kind == "xz":
        payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    elif kind == "gzip":
        payload = gzip.compress(elf)
    else:
        if shutil.which("zstd") is None:
            pytest.skip("no zstd tool")
        payload = subprocess.run(
            ["zstd", "-q", "-c"], input=elf, capture_output=True, check=True
        ).stdout
    # Setup code before, a stray false magic, trailing data after (as in a bzImage).
    image = b"MZ" + b"\0" * 510 + b"HdrS" + b"\x1f\x8b\x08junk" + payload + b"\0" * 100
    out = linux_guest.extract_vmlinux(image)
    assert out == elf
    assert linux_guest.has_pvh_note(out)


def test_extract_vmlinux_needs_an_elf_payload() -> None:
    with pytest.raises(LinuxGuestError):
        linux_guest.extract_vmlinux(b"MZ" + lzma.compress(b"not an elf", format=lzma.FORMAT_XZ))


def test_pvh_note_detection() -> None:
    assert not linux_guest.has_pvh_note(fake_elf([(b"GNU", 3, b"\1" * 20)]))
    assert linux_guest.has_pvh_note(fake_elf([(b"GNU", 3, b"\1" * 20), PVH_NOTE]))
    with pytest.raises(LinuxGuestError):
        linux_guest.elf_notes(b"MZ not an elf")


# -- packages and the helper -----------------------------------------------------


def test_deb_filename_quotes_epoch() -> None:
    name, version, _ = linux_guest.BUSYBOX_PACKAGE
    assert linux_guest.deb_filename(name, version).startswith("busybox-static_1%3a1.35")


def test_fetch_deb_rejects_a_bad_cached_file(tmp_path: Path) -> None:
    pkg = ("pkg", "1.0", "0" * 64)
    bad = tmp_path / linux_guest.deb_filename("pkg", "1.0")
    bad.write_bytes(b"not the pinned file")
    with pytest.raises(LinuxGuestError, match="sha256"):
        linux_guest.fetch_deb(pkg, tmp_path)
    assert not bad.exists()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_helper_writes_probe_records(tmp_path: Path) -> None:
    """frzrec writes sectors guest.decode_sector accepts, with the probe's text."""
    helper = tmp_path / "frzrec"
    try:
        linux_guest.build_helper(helper)
    except LinuxGuestError as e:
        pytest.skip(f"cannot build a static helper here: {e}")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(8 * 512))
    # O_DIRECT may be refused on tmpfs; then the helper reports ioerr.
    out = subprocess.run(
        [str(helper), str(disk), "5", "0", "c0ffee", "-", "0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "blk=ioerr" in out:
        pytest.skip("O_DIRECT not supported on this file system")
    assert out.startswith("blk=ok net=off t=")
    subprocess.run([str(helper), str(disk), "3", "7", "c0ffee", "127.0.0.1", "0"], check=True)
    data = disk.read_bytes()
    hdr = guest.decode_sector(data[:512])
    assert hdr is not None and hdr.magic == guest.HEADER_MAGIC
    assert (hdr.counter, hdr.sector, hdr.marker) == (1, 5, "c0ffee")
    rec = guest.decode_sector(data[3 * 512 : 4 * 512])
    assert rec is not None and rec.magic == guest.RECORD_MAGIC
    assert (rec.counter, rec.sector, rec.marker) == (7, 3, "c0ffee")
    assert data[3 * 512 + 88 :].startswith(guest.record_text("c0ffee", 7))
    assert (
        zlib.crc32(data[3 * 512 : 3 * 512 + 508]) == struct.unpack_from("<I", data, 4 * 512 - 4)[0]
    )


def test_host_accel_is_known() -> None:
    assert linux_guest.host_accel() in ("kvm", "tcg")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox")
def test_init_script_parses(tmp_path: Path) -> None:
    """/init is valid busybox sh and prints the words the checks parse."""
    init = tmp_path / "init"
    init.write_text(linux_guest.INIT_SH)
    r = subprocess.run(
        ["busybox", "sh", "-n", str(init)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    assert "record sectors=" in linux_guest.INIT_SH
    assert 'echo "record $n $st"' in linux_guest.INIT_SH
    assert RECORD_RX.match("record 12 blk=ok net=ok t=345")
