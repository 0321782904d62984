"""The probe guest builds into a multiboot kernel and a BIOS image; settings format."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import pytest

from harness import guest

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the probe")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> guest.ProbeImages:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build the probe")
    return guest.build_probe_images(tmp_path_factory.mktemp("probe"))


def multiboot_header_offset(data: bytes) -> int:
    """Offset of a valid multiboot v1 header in the first 8 KiB, or -1."""
    for off in range(0, min(len(data), 8192) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == guest.MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off
    return -1


@needs_gcc
def test_kernel_is_32bit_multiboot_elf(images: guest.ProbeImages) -> None:
    data = images.elf.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert data[4] == 1, "ELFCLASS32: QEMU's multiboot loader refuses 64-bit images"
    assert struct.unpack_from("<H", data, 18)[0] == 3, "EM_386"
    off = multiboot_header_offset(data)
    assert off >= 0, "no multiboot header in the first 8 KiB"
    # Without the address fields (flag bit 16) QEMU loads it as an ELF.
    assert not struct.unpack_from("<I", data, off + 4)[0] & 0x10000
    assert 4096 < len(data) < 256 * 1024


@needs_gcc
def test_bios_image_is_64k_with_reset_jump(images: guest.ProbeImages) -> None:
    data = images.bios.read_bytes()
    assert len(data) == guest.BIOS_SIZE
    # The CPU starts at 0xfffffff0 = offset 0xfff0: a near jump to the entry.
    assert data[0xFFF0] == 0xE9
    target = (0xFFF3 + struct.unpack_from("<h", data, 0xFFF1)[0]) & 0xFFFF
    assert data[target] == 0xFA, "the entry starts with cli"


@needs_gcc
def test_build_is_cached(images: guest.ProbeImages) -> None:
    mtime = images.elf.stat().st_mtime_ns
    again = guest.build_probe_images(images.elf.parent.parent)
    assert again == images
    assert again.elf.stat().st_mtime_ns == mtime
    assert guest.build_probe(images.elf.parent.parent) == images.elf
    assert guest.build_probe_bios(images.elf.parent.parent) == images.bios


@needs_gcc
def test_build_failure_carries_compiler_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "src"
    shutil.copytree(guest.PROBE_DIR, broken)
    with (broken / "main.c").open("a") as f:
        f.write("\nint broken_on_purpose = ;\n")
    monkeypatch.setattr(guest, "PROBE_DIR", broken)
    with pytest.raises(guest.ProbeBuildError, match=r"main\.c.*error"):
        guest.build_probe_images(tmp_path / "out")
    assert not list((tmp_path / "out").iterdir()), "a failed build leaves nothing behind"


def test_missing_compiler_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(guest.ProbeBuildError, match="cannot run"):
        guest.build_probe_images(tmp_path, cc=str(tmp_path / "no-such-compiler"))


def test_cmdline_defaults_fit_user_networking() -> None:
    line = guest.probe_cmdline("00ff", dst_port=5555)
    words = dict(w.split("=", 1) for w in line.split())
    assert words["marker"] == "00ff"
    assert words["port"] == "5555"
    assert words["dst"] == "10.0.2.2"
    assert words["ip"] == "10.0.2.15"
    assert "dmac" not in words, "the next hop is resolved by ARP unless given"
    assert "," not in line, "-fw_cfg string= cannot carry commas"


def test_cmdline_static_neighbour_and_tap_addresses() -> None:
    line = guest.probe_cmdline(
        "abc123",
        dst_ip="192.168.77.1",
        dst_port=9,
        src_ip="192.168.77.2",
        gw_mac="52:55:0A:00:02:02",
        gateway="192.168.77.1",
    )
    words = dict(w.split("=", 1) for w in line.split())
    assert words["dmac"] == "52:55:0a:00:02:02"
    assert (words["ip"], words["dst"], words["gw"]) == (
        "192.168.77.2",
        "192.168.77.1",
        "192.168.77.1",
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"marker": "not-hex"},
        {"marker": "a" * 65},
        {"marker": "ab", "dst_ip": "10.0.2"},
        {"marker": "ab", "dst_port": 70000},
        {"marker": "ab", "gw_mac": "52:55:0a:00:02"},
        {"marker": "ab", "emulation": "sse"},
        {"marker": "ab", "wdt_timeout_s": 31},
        {"marker": "ab", "watchdog": "diag288"},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        guest.ProbeConfig(**kwargs)  # type: ignore[arg-type]


def test_qemu_argument_forms(tmp_path: Path) -> None:
    cfg = guest.ProbeConfig(marker="beef", dst_port=4000)
    assert cfg.kernel_args(tmp_path / "p.elf") == [
        "-kernel",
        str(tmp_path / "p.elf"),
        "-append",
        cfg.cmdline(),
    ]
    bios = cfg.bios_args(tmp_path / "p.bin")
    assert bios[:3] == ["-bios", str(tmp_path / "p.bin"), "-fw_cfg"]
    assert bios[3] == f"name=opt/frozen/cmdline,string={cfg.cmdline()}"


def _record(n: int, sector: int, marker: str) -> bytes:
    body = bytearray(512)
    body[:8] = guest.RECORD_MAGIC
    struct.pack_into("<IIII", body, 8, n, sector, 1234, len(marker))
    body[24 : 24 + len(marker)] = marker.encode()
    text = guest.record_text(marker, n)
    body[88 : 88 + len(text)] = text
    struct.pack_into("<I", body, 508, zlib.crc32(bytes(body[:508])))
    return bytes(body)


def test_decode_sector_checks_magic_and_crc() -> None:
    good = _record(7, 7, "c0ffee")
    rec = guest.decode_sector(good)
    assert rec == guest.ProbeRecord(guest.RECORD_MAGIC, 7, 7, 1234, "c0ffee")
    corrupt = bytearray(good)
    corrupt[100] ^= 1
    assert guest.decode_sector(bytes(corrupt)) is None
    assert guest.decode_sector(bytes(512)) is None
    assert guest.decode_sector(good[:511]) is None
