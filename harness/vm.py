"""Launch one QEMU process and drive it over QMP.

Modelled on QEMU's python/qemu/machine with the ``qemu.qmp`` async client:
the launcher owns the process (started without a shell), listens on a private
unix socket for QMP and for the serial console *before* QEMU starts, so no
event and no console byte is ever missed, and always ends the process it
started: ``quit`` first, SIGKILL by PID when that does not work.

The QMP client runs on an asyncio loop in a private thread; the public API is
synchronous and every wait takes a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError
from qemu.qmp.message import Message

LOG = logging.getLogger(__name__)

# Upper bound for QEMU to connect its monitor and console after exec.
LAUNCH_TIMEOUT = 30.0
# Granularity of the process-state checks inside long waits.
_POLL = 0.05


class VMError(Exception):
    """Base class for launcher failures."""


class VMLaunchError(VMError):
    """QEMU did not start or did not connect its monitor."""


class VMTimeout(VMError):
    """A wait ran out of time."""


class VMDied(VMError):
    """QEMU exited while we were waiting for it."""


class VMMonitorLost(VMError):
    """The QMP connection broke while QEMU kept running."""


class VMCommandError(VMError):
    """QMP refused a command; carries QMP's error class and description."""

    def __init__(self, command: str, arguments: Mapping[str, Any], error_class: str, desc: str):
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.arguments = dict(arguments)
        self.error_class = error_class
        self.desc = desc


def qemu_tool(prefix: Path, name: str) -> Path:
    """Path of one program of a QEMU install prefix, e.g. ``qemu-img``."""
    return Path(prefix) / "bin" / name


def system_binary(prefix: Path) -> Path:
    return qemu_tool(prefix, "qemu-system-x86_64")


def event_matches(
    event: Mapping[str, Any], name: str | None, match: Mapping[str, Any] | None
) -> bool:
    """True when ``event`` has ``name`` and contains every item of ``match``.

    ``match`` is compared recursively against the whole event (so ``{"data":
    {"reason": "watchdog"}}`` matches a FROZEN event with that reason); a
    plain value must be equal, a mapping is matched as a subset.
    """
    if name is not None and event.get("event") != name:
        return False
    return match is None or _subset(match, event)


def _subset(pattern: Any, value: Any) -> bool:
    if isinstance(pattern, Mapping):
        if not isinstance(value, Mapping):
            return False
        return all(k in value and _subset(v, value[k]) for k, v in pattern.items())
    return bool(pattern == value)


def convert_keys(args: Mapping[str, Any]) -> dict[str, Any]:
    """Python keyword names to QMP names (``node_name`` -> ``node-name``)."""
    return {k.replace("_", "-"): v for k, v in args.items()}


@dataclass(frozen=True)
class VMPaths:
    """Where one VM keeps its sockets (short paths) and its logs."""

    sock_dir: Path
    log_dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.sock_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.sock_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.log_dir / "qemu.log"

    @property
    def qmp_log(self) -> Path:
        return self.log_dir / "qmp.log"


def build_command(
    binary: Path,
    paths: VMPaths,
    args: Sequence[str],
    *,
    name: str = "vm",
    accel: str | None = "kvm",
    firmware_dirs: Sequence[Path] = (),
    console: str = "serial",
) -> list[str]:
    """The QEMU argument vector: fixed plumbing first, then the caller's args.

    ``console`` selects which guest device feeds the captured console:
    ``serial`` (COM1), ``debugcon`` (port 0x402, where SeaBIOS logs) or
    ``none``.
    """
    cmd = [
        str(binary),
        "-name",
        name,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-chardev",
        f"socket,id=qmp,path={paths.qmp_socket}",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if console != "none":
        cmd += ["-chardev", f"socket,id=console,path={paths.console_socket}"]
        if console == "serial":
            cmd += ["-serial", "chardev:console"]
        elif console == "debugcon":
            cmd += ["-device", "isa-debugcon,iobase=0x402,chardev=console"]
        else:
            raise ValueError(f"unknown console kind {console!r}")
    if accel:
        cmd += ["-accel", accel]
    for d in firmware_dirs:
        cmd += ["-L", str(d)]
    cmd += list(args)
    return cmd


class _Recorder(EventListener):
    """Hands every QMP event to the VM, on the loop thread, as it arrives."""

    def __init__(self, sink: VM):
        super().__init__()
        self._sink = sink

    async def put(self, event: Message) -> None:
        self._sink._record_event(dict(event))


class _Console:
    """Accepts QEMU's console connection and copies its bytes to a log."""

    def __init__(self, sock_path: Path, log_path: Path):
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(sock_path))
        self._server.listen(1)
        self._conn: socket.socket | None = None
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="vm-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._server.settimeout(_POLL * 4)
        while self._conn is None and not self._closing:
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.settimeout(_POLL * 4)
            self._conn = conn
        while self._conn is not None and not self._closing:
            try:
                data = self._conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            self._log.write(data)
            self._log.flush()
            with self._cond:
                self._buf += data
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return self._buf.decode("utf-8", "replace")

    def wait(
        self, pattern: re.Pattern[str], start: int, deadline: float, alive: Any
    ) -> re.Match[str] | None:
        with self._cond:
            dead = False
            while True:
                m = pattern.search(self._buf.decode("utf-8", "replace"), start)
                if m:
                    return m
                if self._eof:
                    return None
                if not dead and not alive():
                    # Let the reader drain what QEMU wrote before exiting.
                    dead = True
                    deadline = min(deadline, time.monotonic() + 1.0)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, _POLL * 4))

    def write(self, data: bytes) -> None:
        if self._conn is None:
            raise VMError("console is not connected")
        self._conn.sendall(data)

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=5)
        for s in (self._conn, self._server):
            if s is not None:
                s.close()
        self._log.close()


class VM:
    """One QEMU process, its QMP monitor and its serial console.

    Use as a context manager, or call :meth:`launch` and :meth:`shutdown`.
    Logs (QEMU's stderr, the console, a QMP transcript) go to ``log_dir``; when
    no ``log_dir`` is given they go to the private temp dir, which is removed
    after a clean shutdown and kept (path logged) when anything failed.
    """

    def __init__(
        self,
        binary: Path,
        args: Sequence[str] = (),
        *,
        name: str = "vm",
        log_dir: Path | None = None,
        accel: str | None = "kvm",
        firmware_dirs: Sequence[Path] = (),
        console: str = "serial",
        pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
    ):
        self.binary = Path(binary)
        self.name = name
        self._extra_args = list(args)
        self._accel = accel
        self._firmware_dirs = list(firmware_dirs)
        self._console_kind = console
        self._pass_fds = tuple(pass_fds)
        self._env = dict(env) if env is not None else None
        self._sock_dir = Path(tempfile.mkdtemp(prefix=f"frozen-{name}-"))
        self._own_log_dir = log_dir is None
        log_path = Path(log_dir) if log_dir is not None else self._sock_dir
        log_path.mkdir(parents=True, exist_ok=True)
        self.paths = VMPaths(self._sock_dir, log_path)
        self.command = build_command(
            self.binary,
            self.paths,
            self._extra_args,
            name=name,
            accel=accel,
            firmware_dirs=self._firmware_dirs,
            console=console,
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._console: _Console | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._qmp: QMPClient | None = None
        self._qmp_log: Any = None
        self._events: list[dict[str, Any]] = []
        self._consumed: set[int] = set()
        self._ev_cond = threading.Condition()
        self._failed = False
        self._closed = False
        self.hard_killed = False
        self.exitcode: int | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> VM:
        self.launch()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None:
            self._failed = True
        self.shutdown()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise VMError("VM is not launched")
        return self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def launch(self, timeout: float = LAUNCH_TIMEOUT) -> None:
        """Start QEMU and wait until its monitor is connected and negotiated."""
        if self._proc is not None:
            raise VMError("VM already launched")
        try:
            self._launch(timeout)
        except BaseException:
            self._failed = True
            self.shutdown()
            raise

    def _launch(self, timeout: float) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{self.name}", daemon=True
        )
        self._loop_thread.start()
        self._qmp_log = open(self.paths.qmp_log, "a", encoding="utf-8")  # noqa: SIM115
        self._run(self._make_client(), timeout=10)
        if self._console_kind != "none":
            self._console = _Console(self.paths.console_socket, self.paths.console_log)
        self._stderr = open(self.paths.qemu_log, "ab")  # noqa: SIM115
        LOG.debug("launching %s", " ".join(self.command))
        self._stderr.write((" ".join(self.command) + "\n").encode())
        self._stderr.flush()
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            pass_fds=self._pass_fds,
            env=self._env,
            start_new_session=True,
        )
        assert self._qmp is not None
        fut = self._submit(self._qmp.accept())
        deadline = time.monotonic() + timeout
        while True:
            try:
                fut.result(timeout=_POLL)
                break
            except concurrent.futures.TimeoutError:
                pass
            except (QMPError, OSError, EOFError) as e:
                # Typically QEMU connected, then failed on a later option and
                # exited; its own message says why.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
                raise VMLaunchError(
                    f"QMP session failed ({e!r}), QEMU rc={self._proc.poll()}; "
                    f"see {self.paths.qemu_log}: {self._tail(self.paths.qemu_log)}"
                ) from e
            if self._proc.poll() is not None:
                fut.cancel()
                raise VMLaunchError(
                    f"QEMU exited with {self._proc.returncode} before QMP connected; "
                    f"see {self.paths.qemu_log}: {self._tail(self.paths.qemu_log)}"
                )
            if time.monotonic() > deadline:
                fut.cancel()
                raise VMLaunchError(f"QMP did not connect within {timeout} s")

    async def _make_client(self) -> None:
        self._qmp = QMPClient(self.name)
        self._qmp.register_listener(_Recorder(self))
        await self._qmp.start_server(str(self.paths.qmp_socket))

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """Quit QEMU softly, then kill it by PID; release everything. Idempotent."""
        if self._closed:
            return self.exitcode
        self._closed = True
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._soft_quit(timeout)
            if self._proc is not None and self._proc.poll() is None:
                LOG.warning("%s: QEMU pid %d did not quit, killing it", self.name, self._proc.pid)
                self.hard_killed = True
                self._failed = True
                self._proc.kill()
            if self._proc is not None:
                self.exitcode = self._proc.wait(timeout=timeout)
                if self.exitcode != 0:
                    self._failed = True
        finally:
            self._teardown()
        return self.exitcode

    def _soft_quit(self, timeout: float) -> None:
        assert self._proc is not None
        try:
            self.cmd("quit", timeout=min(timeout, 5.0))
        except (VMError, QMPError, OSError, EOFError) as e:
            # The monitor may close before the reply; the exit is what counts.
            LOG.debug("%s: quit: %r", self.name, e)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=timeout)

    def _teardown(self) -> None:
        if self._qmp is not None and self._loop is not None:
            try:
                self._run(self._qmp.disconnect(), timeout=5)
            except Exception as e:
                LOG.debug("%s: disconnect: %r", self.name, e)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5)
            if not self._loop.is_running():
                self._loop.close()
        if self._console is not None:
            self._console.close()
        for f in (self._stderr, self._qmp_log):
            if f is not None:
                f.close()
        if self._failed:
            LOG.warning("%s: logs kept in %s", self.name, self.paths.log_dir)
            if not self._own_log_dir:
                shutil.rmtree(self._sock_dir, ignore_errors=True)
        else:
            shutil.rmtree(self._sock_dir, ignore_errors=True)

    def wait_for_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself; returns its exit code."""
        if self._proc is None:
            raise VMError("VM is not launched")
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise VMTimeout(f"QEMU still running after {timeout} s") from e

    def mark_failed(self) -> None:
        """Keep the logs even if shutdown is clean (the caller saw a failure)."""
        self._failed = True

    # -- QMP ---------------------------------------------------------------

    def _submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        if self._loop is None:
            raise VMError("VM is not launched")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Any, timeout: float) -> Any:
        fut = self._submit(coro)
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError as e:
            fut.cancel()
            raise VMTimeout(f"no answer within {timeout} s") from e

    def cmd(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> Any:
        """Run a QMP command and return its result.

        ``kwargs`` are converted to QMP spelling (``node_name`` ->
        ``node-name``); pass ``args`` for names that must keep underscores.
        Raises :class:`VMCommandError` carrying QMP's error class and text.
        """
        arguments = dict(args or {})
        arguments.update(convert_keys(kwargs))
        if self._qmp is None:
            raise VMError("VM is not launched")
        self._log_qmp(">", name, arguments)
        try:
            result = self._run(self._qmp.execute(name, arguments or None), timeout)
        except ExecuteError as e:
            self._log_qmp("<!", name, {"class": e.error_class, "desc": str(e)})
            raise VMCommandError(name, arguments, e.error_class, str(e)) from e
        except VMTimeout as e:
            raise VMTimeout(f"{name}: {e}") from e
        except (QMPError, OSError, EOFError) as e:
            # qemu.qmp's own disconnect/EOF/state errors: QEMU went away during
            # (or before) the command; callers see one launcher error for it.
            self._log_qmp("<X", name, repr(e))
            raise self._lost(name, e) from e
        self._log_qmp("<", name, result)
        return result

    def _lost(self, name: str, e: BaseException) -> VMError:
        """The error for a monitor that broke: VMDied once the process is gone."""
        if self._proc is not None:
            # QEMU closes the monitor as it exits; give it a moment to be reaped.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=2.0)
        if not self.is_running():
            rc = self._proc.returncode if self._proc else None
            return VMDied(f"{name}: QEMU exited (rc={rc}) during the command ({e!r})")
        return VMMonitorLost(f"{name}: QMP connection lost, QEMU still running ({e!r})")

    def try_cmd(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> VMCommandError | None:
        """Run a command expected to be refused; return the refusal or None."""
        try:
            self.cmd(name, args, timeout=timeout, **kwargs)
        except VMCommandError as e:
            return e
        return None

    def hmp(self, command_line: str, timeout: float = 30.0) -> str:
        return str(
            self.cmd("human-monitor-command", {"command-line": command_line}, timeout=timeout)
        )

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def _log_qmp(self, tag: str, name: str, payload: Any) -> None:
        if self._qmp_log is not None:
            self._qmp_log.write(f"{time.time():.6f} {tag} {name} {payload!r}\n")
            self._qmp_log.flush()

    # -- events ------------------------------------------------------------

    def _record_event(self, event: dict[str, Any]) -> None:
        self._log_qmp("E", str(event.get("event")), event.get("data"))
        with self._ev_cond:
            self._events.append(event)
            self._ev_cond.notify_all()

    def events(
        self, name: str | None = None, match: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Every event received so far (optionally filtered), oldest first."""
        with self._ev_cond:
            return [e for e in self._events if event_matches(e, name, match)]

    def event_mark(self) -> int:
        """A mark for :meth:`event_wait`'s ``after``: events from now on."""
        with self._ev_cond:
            return len(self._events)

    def event_wait(
        self,
        name: str,
        timeout: float,
        match: Mapping[str, Any] | None = None,
        *,
        after: int = 0,
    ) -> dict[str, Any]:
        """Return the oldest not yet waited-for event matching name/match.

        Events are recorded from the moment the monitor connects, so an event
        that arrived before this call is found too; ``after`` (from
        :meth:`event_mark`) skips those that came before the mark.
        """
        deadline = time.monotonic() + timeout
        with self._ev_cond:
            while True:
                for i, e in enumerate(self._events):
                    if i >= after and i not in self._consumed and event_matches(e, name, match):
                        self._consumed.add(i)
                        return e
                if not self.is_running():
                    raise VMDied(
                        f"QEMU exited (rc={self._proc.returncode if self._proc else None})"
                        f" while waiting for event {name}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [e.get("event") for e in self._events]
                    raise VMTimeout(
                        f"no {name} event matching {match} within {timeout} s; seen: {seen}"
                    )
                self._ev_cond.wait(min(left, _POLL * 4))

    # -- console -----------------------------------------------------------

    def console_text(self) -> str:
        return self._console.text() if self._console is not None else ""

    def wait_for_console(
        self, pattern: str | re.Pattern[str], timeout: float, start: int = 0
    ) -> re.Match[str]:
        """Wait until the console output (from offset ``start``) matches."""
        if self._console is None:
            raise VMError("VM has no console")
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        m = self._console.wait(rx, start, time.monotonic() + timeout, self.is_running)
        if m is None:
            if not self.is_running():
                # The process may have printed its last words before exiting.
                m = rx.search(self._console.text(), start)
                if m:
                    return m
                raise VMDied(f"QEMU exited while waiting for {rx.pattern!r} on the console")
            raise VMTimeout(
                f"{rx.pattern!r} not on the console within {timeout} s;"
                f" tail: {self._console.text()[-300:]!r}"
            )
        return m

    def console_write(self, data: bytes) -> None:
        if self._console is None:
            raise VMError("VM has no console")
        self._console.write(data)

    @staticmethod
    def _tail(path: Path, n: int = 800) -> str:
        """QEMU's own output, without the command line logged on top."""
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        return text.partition("\n")[2].strip()[-n:]
