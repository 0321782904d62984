"""The real pipeline: fetch -> apply -> build for both trees, then run the installs.

`frozen test` builds first (with progress) and passes the prefixes in
FROZEN_QEMU, FROZEN_QEMU_STOCK and FROZEN_LIBVIRT; here the same pipeline runs
again through the harness API, which must be a cache hit returning the same
prefixes, and the installed programs must run.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import build, config, patches, sources


def _prefix(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.fail(f"{var} is not set: run these tests through `frozen test`")
    return Path(value)


def _version(binary: Path, *args: str) -> str:
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{binary} {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("project", config.PROJECTS)
def test_pinned_sources_verify(project: str) -> None:
    files = sources.fetch(config.pin(project))
    pin = config.pin(project)
    for art in pin.artifacts:
        assert sources.sha256_file(files[art.role]) == art.sha256


@pytest.mark.parametrize(
    ("project", "variant", "var"),
    [
        ("qemu", "stock", "FROZEN_QEMU_STOCK"),
        ("qemu", "frozen", "FROZEN_QEMU"),
        ("libvirt", "frozen", "FROZEN_LIBVIRT"),
    ],
)
def test_second_run_is_a_cache_hit(project: str, variant: str, var: str) -> None:
    start = time.monotonic()
    tree = patches.prepare(project, variant)
    install = build.build(tree)
    elapsed = time.monotonic() - start
    assert install.cached, f"{project} ({variant}) was rebuilt instead of reused"
    assert install.prefix == _prefix(var)
    assert len(tree.patches) == len(patches.series(project, variant))
    print(f"{project} ({variant}) warm run: {elapsed:.2f} s")


def test_qemu_runs_with_its_tools() -> None:
    for var in ("FROZEN_QEMU", "FROZEN_QEMU_STOCK"):
        prefix = _prefix(var)
        assert "QEMU emulator version 10.2.2" in _version(
            prefix / "bin" / "qemu-system-x86_64", "--version"
        )
        for tool in ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon"):
            assert "10.2.2" in _version(prefix / "bin" / tool, "--version")
        datadir = prefix / "share" / "qemu"
        for blob in ("bios-256k.bin", "multiboot_dma.bin", "linuxboot_dma.bin", "pvh.bin"):
            assert (datadir / blob).exists(), f"{blob} missing from {datadir}"


def test_libvirt_runs() -> None:
    prefix = _prefix("FROZEN_LIBVIRT")
    assert "11.3.0" in _version(prefix / "bin" / "virsh", "--version")
    assert "11.3.0" in _version(prefix / "sbin" / "virtqemud", "--version")
    assert (prefix / "share" / "libvirt" / "api" / "libvirt-api.xml").exists()
