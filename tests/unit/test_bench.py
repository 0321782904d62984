"""bench: the image-lock probe and the statistics (no VM needed)."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from harness import bench

_F_OFD_SETLK = 37


def _ofd_lock(fd: int, kind: int, start: int, length: int = 1) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack(bench._FLOCK, kind, os.SEEK_SET, start, length, 0))


def test_image_locked_sees_a_qemu_style_permission_lock(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 4096)
    assert not bench.image_locked(image)
    # QEMU takes shared locks on one byte per permission, as another
    # open file description does here.
    fd = os.open(image, os.O_RDWR)
    try:
        _ofd_lock(fd, fcntl.F_RDLCK, 201)
        assert bench.image_locked(image)
        _ofd_lock(fd, fcntl.F_UNLCK, 201)
        assert not bench.image_locked(image)
        _ofd_lock(fd, fcntl.F_RDLCK, 50)  # outside QEMU's lock bytes
        assert not bench.image_locked(image)
    finally:
        os.close(fd)


def test_wait_unlocked_measures_from_the_given_moment(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 512)
    elapsed = bench.wait_unlocked(image, since=bench.time.monotonic() - 0.25)
    assert 0.25 <= elapsed < 5


def test_stat_of_samples() -> None:
    stat = bench.Stat.of([0.003, 0.001, 0.002])
    assert (stat.median, stat.min, stat.max, stat.n) == (0.002, 0.001, 0.003, 3)
    assert stat.ms().strip().startswith("2.0 ms [1.0-3.0]")
