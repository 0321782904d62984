"""A private virtqemud from a libvirt install prefix, for end-to-end tests.

A privileged virtqemud takes its configuration, state, log and socket paths
from the prefix it was built for (``<prefix>/etc/libvirt``,
``<prefix>/var/run/libvirt`` ...).  To keep every run private, and the
install itself untouched, the daemon runs in its own mount namespace where a
per-run directory is bound over each of those paths.  Its socket sits in
a short private temporary dir (``unix_sock_dir``), reached from outside
with an explicit URI (``qemu:///system?socket=...``), so several daemons
of one prefix can run side by side.

The daemon runs under a small supervisor (this module run with
``--supervise``): PID 1 on this machine does not reap orphans, and QEMU,
which libvirt daemonizes, would otherwise linger as a zombie that
``virsh destroy`` waits for in vain.  The supervisor is a child subreaper:
it reaps every QEMU, restarts virtqemud on request (domains keep running),
and on exit ends the daemon and any QEMU left, by PID.

Also here: the probe guest as a libvirt domain, and libvirt-python built
against the prefix.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import build, config, guest, netns
from harness.lifecycle import Started, children, reap_children
from harness.rig import console_records
from harness.vm import qemu_tool, system_binary

#: libvirt-python release matching the pinned libvirt
LIBVIRT_PYTHON_VERSION = "11.3.0"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
VIRSH_TIMEOUT = 120.0
QEMU_XMLNS = "http://libvirt.org/schemas/domain/qemu/1.0"
DISK_SIZE = 1 << 20
#: longest unix socket path (sun_path holds 108 bytes with the NUL)
MAX_SOCKET_PATH = 107

#: per-run directory name -> the prefix path it replaces
BINDS = {
    "etc": Path("etc/libvirt"),
    "run": Path("var/run/libvirt"),
    "lib": Path("var/lib/libvirt"),
    "log": Path("var/log/libvirt"),
    "cache": Path("var/cache/libvirt"),
}

#: Nothing on the host is touched: no cgroups, no relabelling or chown,
#: no /dev namespace, QEMU's stdio straight to a file (no virtlogd).
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

VIRTQEMUD_CONF = """\
unix_sock_dir = "{sockdir}"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_filters = "1:qemu 1:conf 3:rpc 3:util 4:object 4:json 4:event"
log_outputs = "1:file:{log}"
"""

#: With ``lockd``: real leases through a private virtlockd, which locks
#: byte 0 of each disk image (``fcntl``), held while the domain runs.
QEMU_LOCKD_CONF = """\
auto_disk_leases = 1
require_lease_for_disks = 1
"""

VIRTLOCKD_CONF = """\
log_outputs = "3:file:{log}"
"""


class LibvirtdError(Exception):
    """virtqemud did not start, stop or answer as expected; names its log."""


# -- the prefix --------------------------------------------------------------


@dataclass(frozen=True)
class Prefix:
    """A libvirt install prefix: where its programs and libraries are."""

    path: Path

    @property
    def virtqemud(self) -> Path:
        return self.path / "sbin" / "virtqemud"

    @property
    def virsh(self) -> Path:
        return self.path / "bin" / "virsh"

    @property
    def libdir(self) -> Path:
        """Where libvirt.so.0 is: ``lib`` for the harness's builds, a
        multiarch dir for a plain Debian meson setup."""
        for sub in ("lib", "lib64", "lib/x86_64-linux-gnu"):
            if (self.path / sub / "libvirt.so.0").exists():
                return self.path / sub
        return self.path / "lib"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the prefix's programs: its libraries first, C locale."""
        env = dict(os.environ if base is None else base)
        libs = [str(self.libdir), *filter(None, env.get("LD_LIBRARY_PATH", "").split(":"))]
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        env["LC_ALL"] = "C"
        env.pop("LIBVIRT_DEFAULT_URI", None)
        return env

    def check(self) -> None:
        for prog in (self.virtqemud, self.virsh):
            if not os.access(prog, os.X_OK):
                raise LibvirtdError(f"{prog} is missing: {self.path} is not a libvirt install")


@dataclass(frozen=True)
class RunDir:
    """The per-run directories bound over the prefix's paths, and the logs.

    Sockets live in ``sockdir``, a short path: a unix socket path is limited
    to 108 bytes and test work dirs are long.
    """

    root: Path
    sockdir: Path

    def private(self, name: str) -> Path:
        return self.root / name

    @property
    def socket(self) -> Path:
        return self.sockdir / "virtqemud-sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "virtqemud.pid"

    @property
    def daemon_log(self) -> Path:
        return self.private("log") / "virtqemud.log"

    @property
    def daemon_output(self) -> Path:
        return self.private("log") / "virtqemud.out"

    @property
    def qemu_logs(self) -> Path:
        return self.private("log") / "qemu"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def virtlockd_socket(self) -> Path:
        """Where virtlockd listens (the prefix's compiled-in run dir, bound)."""
        return self.private("run") / "virtlockd-sock"

    def binds(self, prefix: Path) -> list[tuple[Path, Path]]:
        return [(self.private(name), prefix / rel) for name, rel in BINDS.items()]

    def create(self, prefix: Path, lockd: bool = False) -> None:
        """Make the per-run dirs, the mount points and the configuration."""
        for private, target in self.binds(prefix):
            private.mkdir(parents=True, exist_ok=True)
            target.mkdir(parents=True, exist_ok=True)
        etc = self.private("etc")
        (etc / "qemu.conf").write_text(QEMU_CONF + ('lock_manager = "lockd"\n' if lockd else ""))
        if lockd:
            (etc / "qemu-lockd.conf").write_text(QEMU_LOCKD_CONF)
            (etc / "virtlockd.conf").write_text(
                VIRTLOCKD_CONF.format(log=prefix / BINDS["log"] / "virtlockd.log")
            )
        # The log path is the one virtqemud sees: inside the bound log dir.
        (etc / "virtqemud.conf").write_text(
            VIRTQEMUD_CONF.format(sockdir=self.sockdir, log=prefix / BINDS["log"] / "virtqemud.log")
        )


# -- the supervisor (runs as its own process) --------------------------------

PR_SET_CHILD_SUBREAPER = 36


class _Supervisor:
    """Reaps every child, starts and stops virtqemud on commands from stdin.

    Commands (one a line): ``start``, ``stop``, ``quit``.  Answers on stdout:
    ``started <pid>``, ``stopped <status>``, ``error <text>``.  End of stdin
    means the test is gone: everything is ended as on ``quit``.
    """

    def __init__(self, argv: list[str], output: Path, stop_timeout: float):
        self.argv = argv
        self.output = output
        self.stop_timeout = stop_timeout
        self.daemon: int | None = None
        self.exited: dict[int, int] = {}
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        self.terminated = False
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, *_: object) -> None:
        self.terminated = True

    def reap(self) -> None:
        reap_children(self.exited)

    def wait_gone(self, pids: Sequence[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.reap()
            if all(p in self.exited or not Path(f"/proc/{p}").exists() for p in pids):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(InterruptedError):
                select.select([self.wake_r], [], [], left)
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 512)

    def end(self, pids: Sequence[int]) -> None:
        """SIGTERM, then SIGKILL what is still there after the timeout."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                if pid not in self.exited:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            if self.wait_gone(pids, self.stop_timeout):
                return

    def start(self) -> str:
        if self.daemon is not None and self.daemon not in self.exited:
            return f"error virtqemud already runs as {self.daemon}"
        with self.output.open("ab") as out:
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.daemon = proc.pid
        return f"started {proc.pid}"

    def stop(self) -> str:
        if self.daemon is None:
            return "stopped none"
        pid, self.daemon = self.daemon, None
        self.end([pid])
        return f"stopped {self.exited.pop(pid, 'unknown')}"

    def quit(self) -> None:
        self.stop()
        # QEMU processes libvirt left behind were adopted by us.
        self.end(children(os.getpid()))

    def serve(self) -> None:
        stdin = sys.stdin.fileno()
        while True:
            ready: list[int] = []
            with contextlib.suppress(InterruptedError):
                ready, _, _ = select.select([stdin, self.wake_r], [], [])
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 512)
            self.reap()
            if self.terminated:
                self.quit()
                return
            if stdin not in ready:
                continue
            line = sys.stdin.readline().strip()
            if line in ("", "quit"):
                self.quit()
                print("quit", flush=True)
                return
            answer = {"start": self.start, "stop": self.stop}.get(line)
            print(answer() if answer else f"error unknown command {line!r}", flush=True)


def _supervise(spec_json: str) -> int:
    spec = json.loads(spec_json)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"error prctl: {os.strerror(ctypes.get_errno())}", flush=True)
        return 1
    for private, target in spec["binds"]:
        r = subprocess.run(["mount", "--bind", private, target], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"error mount {private} on {target}: {r.stderr.strip()}", flush=True)
            return 1
    # Helpers (virtlockd) run for the supervisor's whole life: restarting
    # virtqemud leaves them alone; quit ends them with every other child.
    for argv in spec.get("helpers", []):
        with Path(spec["output"]).open("ab") as out:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    print("ready", flush=True)
    _Supervisor(spec["argv"], Path(spec["output"]), spec["stop_timeout"]).serve()
    return 0


# -- the daemon, seen from the test --------------------------------------------


@dataclass
class Virtqemud(Started):
    """A private virtqemud; a context manager that always ends what it started.

    ``uri`` is what virsh, libvirt-python and the resource agent connect to.
    With ``lockd`` the QEMU driver uses the lockd lock manager and a private
    virtlockd (started once, kept across ``restart``) holds the leases.
    """

    prefix: Path
    workdir: Path
    lockd: bool = False
    start_timeout: float = START_TIMEOUT
    stop_timeout: float = STOP_TIMEOUT
    #: command prefix that puts the daemon into other namespaces (a cluster
    #: node's: ``nsenter -t PID ...``); empty: this process's own
    enter: Sequence[str] = ()
    #: mount propagation of the daemon's namespace: "slave" lets QEMU see
    #: filesystems mounted later (a cluster's Filesystem resource)
    propagation: str = "private"
    daemon_pid: int | None = field(default=None, init=False)
    _sup: subprocess.Popen[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.install = Prefix(self.prefix)
        self.run = RunDir(self.workdir, Path(tempfile.mkdtemp(prefix="frozen-vq-")))

    @property
    def uri(self) -> str:
        return self.run.uri

    # supervisor plumbing

    def _launch_supervisor(self) -> None:
        self.install.check()
        self.run.create(self.prefix, lockd=self.lockd)
        helpers = []
        if self.lockd:
            helpers.append(
                [
                    str(self.install.path / "sbin" / "virtlockd"),
                    "--pid-file",
                    str(self.run.root / "virtlockd.pid"),
                ]
            )
        spec = {
            "binds": [[str(a), str(b)] for a, b in self.run.binds(self.prefix)],
            "argv": [str(self.install.virtqemud), "--pid-file", str(self.run.pidfile)],
            "helpers": helpers,
            "output": str(self.run.daemon_output),
            "stop_timeout": self.stop_timeout,
        }
        cmd = [
            *self.enter,
            "unshare",
            "--mount",
            "--propagation",
            self.propagation,
            sys.executable,
            "-m",
            "harness.libvirtd",
            "--supervise",
            json.dumps(spec),
        ]
        env = self.install.env()
        env["PYTHONPATH"] = os.pathsep.join(
            [str(config.repo_root()), *filter(None, [env.get("PYTHONPATH")])]
        )
        self._sup = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        self._expect("ready", self.start_timeout)
        if self.lockd:
            deadline = time.monotonic() + self.start_timeout
            while not self.run.virtlockd_socket.exists():
                if time.monotonic() > deadline:
                    raise LibvirtdError(
                        f"virtlockd socket {self.run.virtlockd_socket} not "
                        f"ready; {self._log_hint()}"
                    )
                time.sleep(0.05)  # poll interval of the readiness check

    def _ask(self, command: str, timeout: float) -> str:
        if self._sup is None or self._sup.stdin is None:
            raise LibvirtdError("the virtqemud supervisor is not running")
        self._sup.stdin.write(command + "\n")
        self._sup.stdin.flush()
        return self._reply(timeout)

    def _reply(self, timeout: float) -> str:
        assert self._sup is not None and self._sup.stdout is not None
        ready, _, _ = select.select([self._sup.stdout], [], [], timeout)
        line = self._sup.stdout.readline().strip() if ready else ""
        if not line:
            raise LibvirtdError(
                f"no answer from the virtqemud supervisor in {timeout:.0f} s "
                f"(exit status {self._sup.poll()}); {self._log_hint()}"
            )
        if line.startswith("error"):
            raise LibvirtdError(f"virtqemud supervisor: {line}; {self._log_hint()}")
        return line

    def _expect(self, word: str, timeout: float) -> str:
        line = self._reply(timeout)
        if not line.startswith(word):
            raise LibvirtdError(f"virtqemud supervisor said {line!r}, expected {word!r}")
        return line

    def _log_hint(self) -> str:
        return f"logs: {self.run.daemon_output}, {self.run.daemon_log}"

    # daemon lifecycle

    def start(self) -> None:
        """Start virtqemud (and its supervisor, once) and wait for its socket."""
        if self._sup is None:
            self._launch_supervisor()
        self.run.socket.unlink(missing_ok=True)
        self.daemon_pid = int(self._ask("start", self.start_timeout).split()[1])
        self._wait_socket()

    def _wait_socket(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.daemon_pid is None or not Path(f"/proc/{self.daemon_pid}").exists():
                raise LibvirtdError(f"virtqemud exited during start; {self._log_hint()}")
            if self.run.socket.exists():
                with (
                    contextlib.suppress(OSError),
                    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
                ):
                    s.connect(str(self.run.socket))
                    return
            if time.monotonic() > deadline:
                raise LibvirtdError(
                    f"virtqemud socket {self.run.socket} not ready after "
                    f"{self.start_timeout:.0f} s; {self._log_hint()}"
                )
            time.sleep(0.05)  # poll interval of the readiness check

    def stop(self) -> str:
        """Stop virtqemud only (SIGTERM, then SIGKILL); domains keep running."""
        answer = self._ask("stop", 3 * self.stop_timeout)
        self.daemon_pid = None
        return answer.split(maxsplit=1)[1]

    def restart(self) -> None:
        self.stop()
        self.start()

    def copy_logs(self, dest: Path, limit: int = 2_000_000) -> None:
        """Copy the daemon's and the domains' logs (their last `limit` bytes)."""
        for path in self.run.private("log").rglob("*"):
            if path.is_file():
                (dest / path.name).write_bytes(path.read_bytes()[-limit:])

    def close(self) -> None:
        """Stop the daemon, then end the QEMU processes left; by PID."""
        sup, self._sup = self._sup, None
        if sup is None:
            shutil.rmtree(self.run.sockdir, ignore_errors=True)
            return
        try:
            if sup.poll() is None and sup.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    sup.stdin.write("quit\n")
                    sup.stdin.close()
            sup.wait(timeout=4 * self.stop_timeout)
        except subprocess.TimeoutExpired:
            # Its children go first: once it is gone they are nobody's.
            for pid in [*children(sup.pid), sup.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            sup.wait()
        finally:
            if sup.stdout is not None:
                sup.stdout.close()
            self.daemon_pid = None
            shutil.rmtree(self.run.sockdir, ignore_errors=True)

    # clients

    def virsh(
        self, *args: str, check: bool = True, timeout: float = VIRSH_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run the prefix's virsh against this daemon."""
        cmd = [str(self.install.virsh), "--connect", self.uri, *args]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=self.install.env()
        )
        if check and proc.returncode != 0:
            raise LibvirtdError(
                f"virsh {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def check_domain_name(self, name: str) -> None:
        """Fail early if libvirt could not bind the domain's monitor socket.

        libvirt puts it under the prefix's compiled-in state dir,
        ``var/lib/libvirt/qemu/domain-<id>-<name>/monitor.sock``, and a unix
        socket path has at most 107 bytes: long prefixes need short names.
        """
        path = self.prefix / BINDS["lib"] / "qemu" / f"domain-99-{name[:20]}" / "monitor.sock"
        if len(str(path)) > MAX_SOCKET_PATH:
            raise LibvirtdError(
                f"domain {name!r}: libvirt's monitor socket path would be {len(str(path))} "
                f"bytes (max {MAX_SOCKET_PATH}) under {self.prefix}; use a shorter domain name "
                "or install prefix"
            )

    def domain_log(self, name: str) -> Path:
        """QEMU's own log for a domain (command line, stderr)."""
        return self.run.qemu_logs / f"{name}.log"


# -- the probe guest as a domain -----------------------------------------------


@dataclass(frozen=True)
class ProbeDomain:
    """The probe guest as a libvirt domain.

    ``boot="bios"`` makes the probe the firmware (``<loader type='rom'>``,
    the command line in an fw_cfg entry): it runs at once on KVM here.
    ``boot="kernel"`` boots it as a multiboot kernel through SeaBIOS
    (``<kernel>`` + ``<cmdline>``), which is slow under emulation.
    virtio devices are legacy-only (``disable-modern``), as the probe drives
    the legacy I/O BAR.  ``console`` is a unix socket the test connects to
    for the probe's single-byte commands; ``console_log`` keeps all output.
    """

    name: str
    emulator: Path
    image: Path
    cmdline: str
    disk: Path
    console: Path
    console_log: Path
    disk_format: str = "raw"
    boot: str = "bios"
    memory_mib: int = 64
    on_crash: str = "destroy"
    watchdog_action: str | None = "reset"
    error_policy: str | None = None
    network: bool = True

    def xml(self) -> str:
        ET.register_namespace("qemu", QEMU_XMLNS)
        dom = ET.Element("domain", type="kvm")
        ET.SubElement(dom, "name").text = self.name
        ET.SubElement(dom, "memory", unit="MiB").text = str(self.memory_mib)
        ET.SubElement(dom, "vcpu").text = "1"
        self._os(dom)
        if self.boot == "bios":
            sysinfo = ET.SubElement(dom, "sysinfo", type="fwcfg")
            ET.SubElement(sysinfo, "entry", name="opt/frozen/cmdline").text = self.cmdline
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "destroy"
        ET.SubElement(dom, "on_crash").text = self.on_crash
        self._devices(dom)
        self._legacy_virtio(dom)
        ET.indent(dom)
        return ET.tostring(dom, encoding="unicode") + "\n"

    def _os(self, dom: ET.Element) -> None:
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
        if self.boot == "bios":
            ET.SubElement(os_el, "loader", type="rom", readonly="yes").text = str(self.image)
        elif self.boot == "kernel":
            ET.SubElement(os_el, "kernel").text = str(self.image)
            ET.SubElement(os_el, "cmdline").text = self.cmdline
        else:
            raise ValueError(f"unknown boot mode {self.boot!r}")

    def _devices(self, dom: ET.Element) -> None:
        devs = ET.SubElement(dom, "devices")
        ET.SubElement(devs, "emulator").text = str(self.emulator)
        disk = ET.SubElement(devs, "disk", type="file", device="disk")
        driver = ET.SubElement(disk, "driver", name="qemu", type=self.disk_format)
        if self.error_policy:
            driver.set("error_policy", self.error_policy)
            driver.set("rerror_policy", self.error_policy)
        ET.SubElement(disk, "source", file=str(self.disk))
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        if self.network:
            nic = ET.SubElement(devs, "interface", type="user")
            ET.SubElement(nic, "model", type="virtio")
            ET.SubElement(nic, "rom", enabled="no")
        serial = ET.SubElement(devs, "serial", type="unix")
        ET.SubElement(serial, "source", mode="bind", path=str(self.console))
        ET.SubElement(serial, "log", file=str(self.console_log), append="off")
        ET.SubElement(serial, "target", port="0")
        ET.SubElement(devs, "panic", model="isa")
        if self.watchdog_action:
            ET.SubElement(devs, "watchdog", model="ib700", action=self.watchdog_action)
        ET.SubElement(devs, "controller", type="usb", model="none")
        ET.SubElement(devs, "memballoon", model="none")

    def _legacy_virtio(self, dom: ET.Element) -> None:
        cmdline = ET.SubElement(dom, f"{{{QEMU_XMLNS}}}commandline")
        for device in ("virtio-blk-pci", "virtio-net-pci"):
            ET.SubElement(cmdline, f"{{{QEMU_XMLNS}}}arg", value="-global")
            ET.SubElement(cmdline, f"{{{QEMU_XMLNS}}}arg", value=f"{device}.disable-modern=on")


class Console:
    """The probe's serial port through the domain's unix socket."""

    def __init__(self, path: Path, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
            time.sleep(0.05)  # poll interval: QEMU creates the socket at start

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ProbeGuest:
    """A probe domain's files and its host side: disk, listener, console.

    The libvirt implementation of the rig protocol (``rig.GuestRig``).
    """

    domain: ProbeDomain
    marker: str
    listener: netns.UdpListener
    xml_path: Path

    @property
    def name(self) -> str:
        return self.domain.name

    def console_bytes(self) -> bytes:
        try:
            return self.domain.console_log.read_bytes()
        except FileNotFoundError:
            return b""

    def console_text(self) -> str:
        return self.console_bytes().decode(errors="replace")

    def records(self) -> list[int]:
        return [r.counter for r in console_records(self.console_bytes())]

    def last_record(self) -> int:
        recs = self.records()
        return recs[-1] if recs else 0

    def wait_record(self, n: int, timeout: float) -> int:
        """Wait until the console shows record ``n`` or a later one."""
        deadline = time.monotonic() + timeout
        while True:
            last = self.last_record()
            if last >= n:
                return last
            if time.monotonic() > deadline:
                tail = self.console_bytes()[-600:].decode(errors="replace")
                raise LibvirtdError(
                    f"{self.name}: no record {n} within {timeout:.0f} s "
                    f"(last {last}); console tail:\n{tail}"
                )
            time.sleep(0.05)  # poll interval on the console log

    def disk_view(self) -> bytes:
        return self.domain.disk.read_bytes()  # raw: the guest's view

    def command(self, c: bytes) -> None:
        """Send one probe command byte (see harness.guest CMD_*)."""
        with Console(self.domain.console) as con:
            con.write(c)


@contextlib.contextmanager
def probe_guest(
    daemon: Virtqemud,
    qemu_prefix: Path,
    workdir: Path,
    *,
    name: str = "vm",
    start: bool = True,
    first_record_timeout: float = 60.0,
    **domain_options: Any,
) -> Iterator[ProbeGuest]:
    """The probe guest as a transient domain on ``daemon``'s QEMU ``qemu_prefix``.

    Makes the disk, the UDP listener on loopback and the domain XML; with
    ``start`` it creates the domain and waits for the first record.  The
    domain is destroyed on the way out whatever happened.
    """
    daemon.check_domain_name(name)
    workdir.mkdir(parents=True, exist_ok=True)
    images = guest.build_probe_images(config.cache_root() / "probe")
    disk = workdir / "disk.raw"
    r = subprocess.run(
        [
            str(qemu_tool(qemu_prefix, "qemu-img")),
            "create",
            "-q",
            "-f",
            "raw",
            str(disk),
            str(DISK_SIZE),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise LibvirtdError(f"qemu-img create {disk}: {r.stderr.strip()}")
    marker = secrets.token_hex(8)
    with netns.UdpListener("127.0.0.1") as listener:
        cfg = guest.ProbeConfig(
            marker=marker, dst_ip=netns.USER_NET_HOST_IP, dst_port=listener.port, watchdog="ib700"
        )
        boot = domain_options.pop("boot", "bios")
        domain = ProbeDomain(
            name=name,
            emulator=system_binary(qemu_prefix),
            image=images.bios if boot == "bios" else images.elf,
            boot=boot,
            cmdline=cfg.cmdline(),
            disk=disk,
            console=daemon.run.sockdir / f"{name}.console",
            console_log=workdir / "console.log",
            **domain_options,
        )
        xml_path = workdir / f"{name}.xml"
        xml_path.write_text(domain.xml())
        probe = ProbeGuest(domain, marker, listener, xml_path)
        try:
            if start:
                daemon.virsh("create", str(xml_path))
                probe.wait_record(1, first_record_timeout)
            yield probe
        finally:
            with contextlib.suppress(LibvirtdError, subprocess.TimeoutExpired):
                if daemon.daemon_pid is not None:
                    daemon.virsh("destroy", name, check=False)


# -- libvirt-python against the prefix -----------------------------------------


def api_xml_dir(prefix: Path) -> Path:
    return prefix / "share" / "libvirt" / "api"


def prefix_stamp(prefix: Path) -> str:
    """What identifies the build in the prefix (the harness's cache key)."""
    stamp = prefix / build.STAMP
    if stamp.exists():
        return json.loads(stamp.read_text()).get("key", "")
    lib = Prefix(prefix).libdir / "libvirt.so.0"
    st = lib.stat() if lib.exists() else None
    return f"{lib}:{st.st_mtime_ns}:{st.st_size}" if st else str(prefix)


def build_libvirt_python(prefix: Path, target: Path, version: str = LIBVIRT_PYTHON_VERSION) -> Path:
    """Build libvirt-python from its PyPI sdist against ``prefix`` into ``target``.

    The extension gets an rpath to ``<prefix>/lib``.  Cached: a target whose
    stamp names the same prefix build and version is reused.  Returns the
    directory to put on ``sys.path``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # Tests run in parallel: one builds, the others wait and reuse.
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_libvirt_python(prefix, target, version)


def _build_libvirt_python(prefix: Path, target: Path, version: str) -> Path:
    stamp_file = target / ".frozen-libvirt-python.json"
    want = {"prefix": str(prefix), "build": prefix_stamp(prefix), "version": version}
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        if json.loads(stamp_file.read_text()) == want:
            return target
    if not (api_xml_dir(prefix) / "libvirt-api.xml").exists():
        raise LibvirtdError(
            f"{prefix} has no libvirt-api.xml, which libvirt-python is "
            "generated from: build libvirt with `frozen build`, which installs it"
        )
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    install = Prefix(prefix)
    env = install.env()
    env["PKG_CONFIG_PATH"] = os.pathsep.join(
        [str(install.libdir / "pkgconfig"), *filter(None, [env.get("PKG_CONFIG_PATH")])]
    )
    env["LDFLAGS"] = f"-Wl,-rpath,{install.libdir} " + env.get("LDFLAGS", "")
    log = target.parent / f"{target.name}-build.log"
    # No pip cache: a wheel cached from another prefix would link the wrong library.
    with log.open("w") as out:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--no-cache-dir",
                "--no-binary",
                "libvirt-python",
                "--target",
                str(target),
                f"libvirt-python=={version}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if r.returncode != 0:
        raise LibvirtdError(f"building libvirt-python {version} failed; see {log}")
    stamp_file.write_text(json.dumps(want))
    return target


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--supervise":
        sys.exit(_supervise(sys.argv[2]))
    sys.exit("usage: python -m harness.libvirtd --supervise SPEC")
