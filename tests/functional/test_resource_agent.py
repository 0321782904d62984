"""Pacemaker's VirtualDomain agent with the frozen series, run for real.

The agent (resource-agents 4.16.0 with patches/resource-agents applied by the
harness) is invoked directly with the OCF environment, against a private
virtqemud of the patched libvirt and the probe guest on the patched QEMU on
KVM.  The cluster flow: start -> monitor running; a freeze (virsh, and a
guest panic with on_crash=freeze) -> monitor NOT_RUNNING; stop succeeds and
leaves the domain frozen with its memory; start without frozen_dump_dir
refuses (OCF_ERR_INSTALLED: node-local), with it writes the dump and runs a
fresh instance on the same disk;
stop_failure_action=freeze freezes a domain whose shutdown fails.  The OCF
return code of every step is logged and kept in ``ocf-codes.json``.

The baseline runs the unpatched agent on the same frozen domain: monitor
fails with a generic error and stop destroys the domain, memory and all.

``ResourceAgentStandIn`` runs the agent against a stand-in ``virsh`` (a
script that keeps the domain's state in a file and logs every call), for
what a real libvirt cannot be made to do on demand: a freeze that hangs,
a shutdown that never completes, a dump directory an attacker prepared.

``ResourceAgentOcft`` runs resource-agents' ocft (``ocft make`` and
``ocft test``, a private copy whose cases dir and OCF root are the test's)
on the project's config tests/ocft/VirtualDomain: resource-agents' own
VirtualDomain cases plus the frozen paths, against the same stand-ins.
``ResourceAgentOcftStock`` is its negative control: the unpatched agent
passes the ordinary cases and fails every frozen one.

Environment: FROZEN_LIBVIRT and FROZEN_QEMU (install prefixes).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # running from a checkout without installing
    sys.path.insert(0, str(REPO))

from frozen_test import CleanupTest, require_prefix  # noqa: E402

from harness import config, guest, libvirtd, patches  # noqa: E402

OCF_SUCCESS = 0
OCF_ERR_GENERIC = 1
OCF_ERR_INSTALLED = 5
OCF_ERR_CONFIGURED = 6
OCF_NOT_RUNNING = 7
AGENT_TIMEOUT = 120.0
#: CRM operation timeout for stop: the graceful shutdown is given this
#: minus 5 s before the agent destroys (or freezes) the domain.
STOP_TIMEOUT_MS = 10000

#: ocf-*.in placeholders -> values for a private OCF root (no install)
SUBSTITUTIONS = {
    "@AWK@": "awk",
    "@EGREP@": "grep -E",
    "@IFCONFIG_A_OPT@": "",
    "@MAILCMD@": "mail",
    "@PING@": "ping",
    "@SHELL@": "/bin/sh",
    "@TEST@": "test",
    "@SSH@": "ssh",
    "@prefix@": "/usr",
    "@exec_prefix@": "/usr",
    "@INITDIR@": "/etc/init.d",
    "@sysconfdir@": "/etc",
    "@localstatedir@": "/var",
    "@HA_VARRUNDIR@": "/run",
    "@libexecdir@": "/usr/libexec",
    "@datadir@": "/usr/share",
    "@sbindir@": "/usr/sbin",
}
GENERATED = ("ocf-shellfuncs", "ocf-binaries", "ocf-directories")
COPIED = ("ocf-returncodes", "ocf-rarun", "ocf-distro", "ra-api-1.dtd")


def ocf_root(tree: Path, dest: Path, rsctmp: Path) -> Path:
    """A private OCF root from a resource-agents source tree; returns the agent."""
    lib = dest / "lib" / "heartbeat"
    agents = dest / "resource.d" / "heartbeat"
    lib.mkdir(parents=True, exist_ok=True)
    agents.mkdir(parents=True, exist_ok=True)
    values = {**SUBSTITUTIONS, "@OCF_ROOT_DIR@": str(dest), "@HA_RSCTMPDIR@": str(rsctmp)}
    for name in GENERATED:
        text = (tree / "heartbeat" / f"{name}.in").read_text()
        for key, value in values.items():
            text = text.replace(key, value)
        left = re.findall(r"@[A-Za-z_]+@", text)
        if left:
            raise RuntimeError(f"{name}.in: unsubstituted {sorted(set(left))}")
        (lib / name).write_text(text)
    for name in COPIED:
        shutil.copy2(tree / "heartbeat" / name, lib / name)
    agent = agents / "VirtualDomain"
    shutil.copy2(tree / "heartbeat" / "VirtualDomain", agent)
    agent.chmod(0o755)
    return agent


def prepared_tree(variant: str) -> patches.Tree:
    """resource-agents with (or, for "stock", without) the series applied.

    Tests run in parallel; the lock keeps them from building one tree twice.
    """
    lock_path = config.cache_root() / f".resource-agents-{variant}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return patches.prepare("resource-agents", variant)


@dataclass(frozen=True)
class Result:
    action: str
    rc: int
    output: str


class AgentTest(CleanupTest):
    """Shared set-up: builds, KVM, the agent, a private virtqemud.

    :avocado: disable
    """

    timeout = 600
    variant = "frozen"

    def setUp(self) -> None:
        self.libvirt_prefix = require_prefix(self, "FROZEN_LIBVIRT", "patched libvirt")
        self.qemu_prefix = require_prefix(self, "FROZEN_QEMU", "patched QEMU")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            self.fail("/dev/kvm is missing or not accessible: these tests need KVM")
        self.work = Path(self.workdir)
        tree = prepared_tree(self.variant)
        self.rsctmp = self.work / "rsctmp"
        self.rsctmp.mkdir()
        self.agent = ocf_root(tree.path, self.work / "ocf", self.rsctmp)
        self.codes: list[dict[str, object]] = []
        self.daemon = libvirtd.Virtqemud(self.libvirt_prefix, self.work / "virtqemud")
        self.daemon.__enter__()
        self.addCleanup(self._keep_logs)
        self.addCleanup(self.daemon.close)

    def _keep_logs(self) -> None:
        logdir = Path(self.logdir)
        (logdir / "ocf-codes.json").write_text(json.dumps(self.codes, indent=1))
        self.daemon.copy_logs(logdir)

    def ocf(
        self, action: str, config: Path, step: str, interval_ms: int = 0, **params: str
    ) -> Result:
        """Run the agent once, as Pacemaker would; record the return code."""
        env = self.daemon.install.env()
        env.update(
            {
                "OCF_ROOT": str(self.agent.parents[2]),
                "OCF_RESOURCE_INSTANCE": "vm-probe",
                "OCF_RESOURCE_TYPE": "VirtualDomain",
                "HA_RSCTMP": str(self.rsctmp),
                "PATH": f"{self.libvirt_prefix / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
                "OCF_RESKEY_config": str(config),
                "OCF_RESKEY_hypervisor": self.daemon.uri,
                "OCF_RESKEY_CRM_meta_interval": str(interval_ms),
                "OCF_RESKEY_CRM_meta_timeout": str(STOP_TIMEOUT_MS),
                "OCF_RESKEY_autoset_utilization_cpu": "false",
                "OCF_RESKEY_autoset_utilization_hv_memory": "false",
                "OCF_RESKEY_autoset_utilization_host_memory": "false",
            }
        )
        env.update({f"OCF_RESKEY_{k}": v for k, v in params.items()})
        proc = subprocess.run(
            [str(self.agent), action],
            env=env,
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT,
        )
        output = proc.stdout + proc.stderr
        self.log.info("OCF %-28s %-13s rc=%d", step, action, proc.returncode)
        for line in output.splitlines():
            if action != "meta-data":
                self.log.debug("    %s", line)
        self.codes.append({"step": step, "action": action, "rc": proc.returncode, "params": params})
        return Result(action, proc.returncode, output)

    def domstate(self, name: str) -> str:
        """``virsh domstate --reason``, or "absent" when there is no such domain."""
        r = self.daemon.virsh("domstate", "--reason", name, check=False)
        if r.returncode == 0:
            return r.stdout.strip()
        if "failed to get domain" in r.stderr.lower():
            return "absent"
        raise AssertionError(f"virsh domstate {name}: {r.stderr.strip()}")

    def wait_state(self, name: str, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while not (state := self.domstate(name)).startswith(prefix):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: state {state!r}, expected {prefix!r}")
            time.sleep(0.1)  # poll interval
        return state

    def qemu_pid(self, name: str) -> int:
        pidfile = self.daemon.run.private("run") / "qemu" / f"{name}.pid"
        return int(pidfile.read_text().strip())

    def dump_has_marker(self, probe: libvirtd.ProbeGuest) -> bool:
        dump = self.work / f"check-{time.monotonic_ns()}.core"
        self.daemon.virsh("dump", "--memory-only", probe.name, str(dump))
        try:
            return guest.marker_tag(probe.marker) in dump.read_bytes()
        finally:
            dump.unlink(missing_ok=True)


class ResourceAgentFrozen(AgentTest):
    """:avocado: enable"""

    def test_meta_data_and_validate(self) -> None:
        with libvirtd.probe_guest(
            self.daemon, self.qemu_prefix, self.work / "g", start=False
        ) as probe:
            cfg = probe.xml_path
            md = self.ocf("meta-data", cfg, "meta-data")
            self.assertEqual(md.rc, OCF_SUCCESS)
            for param in ("frozen_dump_dir", "stop_failure_action"):
                self.assertIn(f'<parameter name="{param}"', md.output)
            dtd = self.agent.parents[2] / "lib" / "heartbeat" / "ra-api-1.dtd"
            xml = self.work / "meta-data.xml"
            xml.write_text(md.output)
            lint = subprocess.run(
                ["xmllint", "--noout", "--dtdvalid", str(dtd), str(xml)],
                capture_output=True,
                text=True,
            )
            self.assertEqual(lint.returncode, 0, lint.stderr)
            dumps = self.work / "dumps"
            dumps.mkdir()
            checks = [
                (
                    "validate ok",
                    {"frozen_dump_dir": str(dumps), "stop_failure_action": "freeze"},
                    OCF_SUCCESS,
                ),
                ("validate bad action", {"stop_failure_action": "pause"}, OCF_ERR_CONFIGURED),
                ("validate relative dir", {"frozen_dump_dir": "dumps"}, OCF_ERR_CONFIGURED),
                (
                    "validate missing dir",
                    {"frozen_dump_dir": str(self.work / "nope")},
                    OCF_ERR_INSTALLED,
                ),
            ]
            for step, params, want in checks:
                self.assertEqual(self.ocf("validate-all", cfg, step, **params).rc, want, step)
            # start refuses a bad configuration before touching anything
            r = self.ocf("start", cfg, "start, bad action", stop_failure_action="pause")
            self.assertEqual(r.rc, OCF_ERR_CONFIGURED)
            self.assertEqual(self.domstate(probe.name), "absent")
            # ... but monitor (and stop) never fail validation on the new
            # parameters: an invalid environment would make stop succeed
            # without stopping and a probe report a running domain stopped.
            for step, params in (
                ("monitor, missing dir", {"frozen_dump_dir": "nope"}),
                ("monitor, bad action", {"stop_failure_action": "pause"}),
            ):
                r = self.ocf("monitor", cfg, step, interval_ms=10000, **params)
                self.assertEqual(r.rc, OCF_NOT_RUNNING, step)

    def test_cluster_flow(self) -> None:
        dumps = self.work / "dumps"
        dumps.mkdir()
        with libvirtd.probe_guest(
            self.daemon, self.qemu_prefix, self.work / "g", start=False, on_crash="freeze"
        ) as probe:
            cfg, name = probe.xml_path, probe.name
            self.assertEqual(self.ocf("monitor", cfg, "probe before start").rc, OCF_NOT_RUNNING)

            # start -> running
            self.assertEqual(self.ocf("start", cfg, "start").rc, OCF_SUCCESS)
            probe.wait_record(3, 60)
            self.assertEqual(self.ocf("monitor", cfg, "monitor running", 10000).rc, OCF_SUCCESS)

            # virsh freeze -> NOT_RUNNING; stop leaves it frozen with memory
            self.daemon.virsh("freeze", name)
            self._frozen_is_stopped(probe, "user")

            # start without frozen_dump_dir refuses and keeps the domain
            r = self.ocf("start", cfg, "start over frozen, no dir")
            self.assertEqual(r.rc, OCF_ERR_INSTALLED)
            self.assertIn("frozen", r.output)
            self.assertEqual(self.domstate(name), "frozen (user)")

            # with frozen_dump_dir: dump, destroy, a fresh instance on the same disk
            self._restart_with_dump(probe, dumps, expected_dumps=1)

            # guest panic with on_crash=freeze -> NOT_RUNNING, stop keeps it
            probe.command(guest.CMD_PANIC)
            self.wait_state(name, "frozen")
            self._frozen_is_stopped(probe, "panicked")
            self._restart_with_dump(probe, dumps, expected_dumps=2)

            # a shutdown that fails: stop_failure_action=freeze freezes
            r = self.ocf("stop", cfg, "stop, failure action freeze", stop_failure_action="freeze")
            self.assertEqual(r.rc, OCF_SUCCESS, r.output)
            self.assertEqual(self.domstate(name), "frozen (user)")
            self.assertTrue(self.dump_has_marker(probe))
            self.assertEqual(
                self.ocf("monitor", cfg, "monitor after freeze-stop", 10000).rc, OCF_NOT_RUNNING
            )
            self._restart_with_dump(probe, dumps, expected_dumps=3)

            # the default is unchanged: the domain is destroyed
            r = self.ocf("stop", cfg, "stop, default action")
            self.assertEqual(r.rc, OCF_SUCCESS, r.output)
            self.assertEqual(self.domstate(name), "absent")
            self.assertEqual(
                self.ocf("monitor", cfg, "monitor after destroy", 10000).rc, OCF_NOT_RUNNING
            )

    def _frozen_is_stopped(self, probe: libvirtd.ProbeGuest, reason: str) -> None:
        cfg, name = probe.xml_path, probe.name
        pid = self.qemu_pid(name)
        r = self.ocf("monitor", cfg, f"monitor frozen ({reason})", 10000)
        self.assertEqual(r.rc, OCF_NOT_RUNNING, r.output)
        self.assertIn(f"frozen ({reason})", r.output)
        self.assertIn("memory preserved", r.output)
        self.assertEqual(self.ocf("monitor", cfg, f"probe frozen ({reason})").rc, OCF_NOT_RUNNING)
        r = self.ocf("stop", cfg, f"stop frozen ({reason})")
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        self.assertEqual(self.domstate(name), f"frozen ({reason})")
        self.assertEqual(self.qemu_pid(name), pid, "stop replaced the QEMU process")
        self.assertTrue(self.dump_has_marker(probe), "the marker is not in the frozen memory")

    def _restart_with_dump(
        self, probe: libvirtd.ProbeGuest, dumps: Path, expected_dumps: int
    ) -> None:
        cfg, name = probe.xml_path, probe.name
        old_pid = self.qemu_pid(name)
        disk_before = probe.domain.disk.read_bytes()
        r = self.ocf("start", cfg, "start over frozen, dump dir", frozen_dump_dir=str(dumps))
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        cores = sorted(dumps.glob(f"{name}-frozen-*.core"))
        self.assertEqual(len(cores), expected_dumps, cores)
        self.assertIn(guest.marker_tag(probe.marker), cores[-1].read_bytes())
        self.assertTrue(self.domstate(name).startswith("running"))
        self.assertNotEqual(self.qemu_pid(name), old_pid, "no fresh QEMU")
        probe.wait_record(3, 60)
        self.assertNotEqual(
            probe.domain.disk.read_bytes(),
            disk_before,
            "the fresh instance did not write to the disk",
        )
        self.assertEqual(self.ocf("monitor", cfg, "monitor fresh instance", 10000).rc, OCF_SUCCESS)


class ResourceAgentBaseline(AgentTest):
    """The unpatched agent on a frozen domain.

    :avocado: enable
    """

    variant = "stock"

    def test_stock_agent_on_frozen_domain(self) -> None:
        with libvirtd.probe_guest(self.daemon, self.qemu_prefix, self.work / "g") as probe:
            cfg, name = probe.xml_path, probe.name
            self.daemon.virsh("suspend", name)
            r = self.ocf("monitor", cfg, "stock monitor paused", 10000)
            self.assertEqual(r.rc, OCF_SUCCESS, "stock agent: paused counts as running")
            self.daemon.virsh("resume", name)
            self.daemon.virsh("freeze", name)
            self.wait_state(name, "frozen")
            r = self.ocf("monitor", cfg, "stock monitor frozen", 10000)
            self.assertEqual(r.rc, OCF_ERR_GENERIC, r.output)
            self.assertIn("unknown status", r.output)
            r = self.ocf("stop", cfg, "stock stop frozen")
            self.assertEqual(r.rc, OCF_SUCCESS, r.output)
            self.assertEqual(self.domstate(name), "absent", "stock stop kept the domain")


#: A stand-in virsh: the domain's "state (reason)" in $STANDIN/state (no
#: file: no domain); behaviour switches are files in $STANDIN; every call
#: is appended to $STANDIN/calls as one JSON list.
STANDIN_VIRSH = r"""#!/usr/bin/env python3
import json, os, sys, time
d = os.environ["STANDIN"]
args = [a for a in sys.argv[1:] if not a.startswith("--connect") and a not in ("--quiet", "-q")]
with open(os.path.join(d, "calls"), "a") as f:
    f.write(json.dumps(args) + "\n")
state_file = os.path.join(d, "state")
def state():
    try:
        return open(state_file).read().strip()
    except FileNotFoundError:
        return None
def put(s):
    if s is None:
        os.unlink(state_file)
    else:
        open(state_file, "w").write(s)
cmd, rest = (args[0], args[1:]) if args else ("", [])
st = state()
if cmd == "uri":
    print("qemu:///system")
elif st is None and cmd in ("domstate", "dominfo", "dumpxml", "destroy", "shutdown",
                           "freeze", "dump"):
    sys.exit(print("error: failed to get domain 'vm'", file=sys.stderr) or 1)
elif cmd == "domstate":
    print(st if "--reason" in rest else st.split(" (")[0])
elif cmd == "list":
    print("vm" if st else "")
elif cmd == "create" and st is not None:
    sys.exit(print("error: operation failed: domain 'vm' already exists", file=sys.stderr) or 1)
elif cmd == "create":
    put("running (booted)")
    print("Domain 'vm' created")
elif cmd == "destroy":
    put(None)
elif cmd == "shutdown":
    if os.path.exists(os.path.join(d, "shutdown-works")):
        put(None)
elif cmd == "freeze":
    if os.path.exists(os.path.join(d, "freeze-hangs")):
        time.sleep(600)
    put("frozen (user)")
elif cmd == "dump":
    if os.path.exists(os.path.join(d, "dump-hangs")):
        open(rest[-1], "w").write("partial")
        time.sleep(600)
    with open(rest[-1], "w") as f:
        f.write("core of vm\n")
elif cmd == "dominfo":
    kib = 1 << 40 if os.path.exists(os.path.join(d, "huge-memory")) else 65536
    print(f"CPU(s):         1\nMax memory:     {kib} KiB\nUsed memory:    {kib} KiB")
elif cmd == "dumpxml":
    print("<domain><name>vm</name></domain>")
"""

STANDIN_XML = "<domain type='kvm'>\n  <name>vm</name>\n</domain>\n"

#: Stand-ins for the cluster tools the agent calls (one script, by the name
#: it is called as): crm_attribute and crm_resource keep node attributes,
#: node utilization and resource utilization in $STANDIN/cib.json; crm_node
#: says "node1"; virt-xml-validate accepts everything.  Calls are logged
#: to $STANDIN/calls like the stand-in virsh's.
STANDIN_CRM = r"""#!/usr/bin/env python3
import json, os, sys
d = os.environ["STANDIN"]
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.path.join(d, "calls"), "a") as f:
    f.write(json.dumps([tool, *args]) + "\n")
if tool == "crm_node":
    sys.exit(print("node1"))
if tool == "pacemakerd":
    sys.exit(print("Pacemaker 2.1.5"))
if tool == "virt-xml-validate":
    sys.exit(0)
path = os.path.join(d, "cib.json")
try:
    cib = json.load(open(path))
except FileNotFoundError:
    cib = {}
opts, flags, i = {}, set(), 0
longs = {"-t": "--type", "-N": "--node", "-n": "--name", "-v": "--update", "-r": "--resource",
         "-p": "--set-parameter", "-g": "--get-parameter", "-G": "--query", "-D": "--delete",
         "-z": "--utilization", "-Q": "--quiet", "-q": "--quiet"}
while i < len(args):
    a = args[i]
    if "=" in a and a.startswith("--"):
        k, v = a.split("=", 1)
        opts[k] = v
    elif longs.get(a, a) in ("--type", "--node", "--name", "--update", "--resource",
                             "--set-parameter", "--get-parameter", "--parameter-value",
                             "--delete-parameter"):
        opts[longs.get(a, a)] = args[i + 1]
        i += 1
    else:
        flags.add(longs.get(a, a))
    i += 1
if tool == "crm_resource":  # the resource's own utilization: accepted, kept
    key = "rsc-util"
    name = (opts.get("--get-parameter") or opts.get("--set-parameter")
            or opts.get("--delete-parameter"))
    value = opts.get("--update") or opts.get("--parameter-value")
else:
    key = ("util:" if "--utilization" in flags else "attr:") + opts.get("--node", "")
    name, value = opts.get("--name"), opts.get("--update")
table = cib.setdefault(key, {})
if "--query" in flags or "--get-parameter" in opts:
    if name not in table:
        print("Error performing operation: No such device or address", file=sys.stderr)
        sys.exit(6)
    sys.exit(print(table[name]))
if "--delete" in flags or "--delete-parameter" in opts:
    table.pop(name, None)
elif value is not None:
    table[name] = value
json.dump(cib, open(path, "w"))
"""
#: the agent manages the resource's memory utilization
UTILIZATION = {"autoset_utilization_host_memory": "true", "autoset_utilization_hv_memory": "true"}
STANDIN_CRM_TOOLS = ("crm_attribute", "crm_resource", "crm_node", "pacemakerd", "virt-xml-validate")


def make_standin(standin: Path) -> Path:
    """The stand-in virsh and cluster tools in ``standin/bin``."""
    bindir = standin / "bin"
    bindir.mkdir(parents=True)
    (bindir / "virsh").write_text(STANDIN_VIRSH)
    (bindir / "virsh").chmod(0o755)
    (bindir / "crm-standin").write_text(STANDIN_CRM)
    (bindir / "crm-standin").chmod(0o755)
    for tool in STANDIN_CRM_TOOLS:
        (bindir / tool).symlink_to("crm-standin")
    return standin


class ResourceAgentStandIn(CleanupTest):
    """The agent's frozen paths against a stand-in virsh (no KVM needed).

    :avocado: enable
    """

    timeout = 300
    variant = "frozen"

    def setUp(self) -> None:
        self.work = Path(self.workdir)
        tree = prepared_tree(self.variant)
        self.rsctmp = self.work / "rsctmp"
        self.rsctmp.mkdir()
        self.agent = ocf_root(tree.path, self.work / "ocf", self.rsctmp)
        self.standin = make_standin(self.work / "standin")
        self.config = self.work / "vm.xml"
        self.config.write_text(STANDIN_XML)

    def set_state(self, state: str | None) -> None:
        path = self.standin / "state"
        if state is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(state)

    def state(self) -> str | None:
        path = self.standin / "state"
        return path.read_text().strip() if path.exists() else None

    def calls(self) -> list[list[str]]:
        path = self.standin / "calls"
        calls = (
            [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        )
        path.unlink(missing_ok=True)
        return calls

    def ocf(
        self,
        action: str,
        timeout_ms: int = STOP_TIMEOUT_MS,
        run_timeout: float = AGENT_TIMEOUT,
        **params: str,
    ) -> tuple[Result, float]:
        """Run the agent once; returns its result and how long it took."""
        env = dict(os.environ)
        env.update(
            {
                "STANDIN": str(self.standin),
                "PATH": f"{self.standin / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
                "OCF_ROOT": str(self.agent.parents[2]),
                "OCF_RESOURCE_INSTANCE": "vm-standin",
                "OCF_RESOURCE_TYPE": "VirtualDomain",
                "HA_RSCTMP": str(self.rsctmp),
                "OCF_RESKEY_config": str(self.config),
                "OCF_RESKEY_CRM_meta_interval": "0",
                "OCF_RESKEY_CRM_meta_timeout": str(timeout_ms),
                "OCF_RESKEY_autoset_utilization_cpu": "false",
                "OCF_RESKEY_autoset_utilization_hv_memory": "false",
                "OCF_RESKEY_autoset_utilization_host_memory": "false",
            }
        )
        env.update({f"OCF_RESKEY_{k}": v for k, v in params.items()})
        t0 = time.monotonic()
        # Its own session: on a timeout the whole tree (a hung stand-in
        # virsh included) is ended, not only the agent's shell.
        proc = subprocess.Popen(
            [str(self.agent), action],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            self.fail(f"{action} {params} still ran after {run_timeout:.0f} s: {err!r}")
        took = time.monotonic() - t0
        self.log.info(
            "OCF stand-in %-10s %s rc=%d in %.1f s", action, params, proc.returncode, took
        )
        for line in (out + err).splitlines():
            self.log.debug("    %s", line)
        return Result(action, proc.returncode, out + err), took

    def test_status_one_domstate_call(self) -> None:
        """A frozen domain's state and reason come from one virsh call."""
        self.set_state("frozen (panicked)")
        self.calls()
        r, _ = self.ocf("monitor")
        self.assertEqual(r.rc, OCF_NOT_RUNNING, r.output)
        self.assertIn("frozen (panicked)", r.output)
        domstate = [c for c in self.calls() if c[:1] == ["domstate"]]
        self.assertEqual(domstate, [["domstate", "--reason", "vm"]])
        # every other state still reads as before
        for state, rc in (
            ("running (booted)", OCF_SUCCESS),
            ("paused (user)", OCF_SUCCESS),
            ("shut off (destroyed)", OCF_NOT_RUNNING),
            (None, OCF_NOT_RUNNING),
        ):
            self.set_state(state)
            self.assertEqual(self.ocf("monitor")[0].rc, rc, state)

    def test_start_over_frozen_is_node_local(self) -> None:
        """Without frozen_dump_dir, start over a frozen domain is a hard,
        node-local error: the resource moves instead of retrying here."""
        self.set_state("frozen (panicked)")
        r, _ = self.ocf("start")
        self.assertEqual(r.rc, OCF_ERR_INSTALLED, r.output)
        self.assertEqual(self.state(), "frozen (panicked)")

    def test_freeze_stop_within_timeout(self) -> None:
        """A shutdown that never completes and a freeze that hangs: stop
        still ends (destroy) within the stop timeout."""
        self.set_state("running (booted)")
        (self.standin / "freeze-hangs").touch()
        timeout_ms = 12000
        r, took = self.ocf(
            "stop", timeout_ms=timeout_ms, run_timeout=60, stop_failure_action="freeze"
        )
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        self.assertLess(took, timeout_ms / 1000, f"stop took {took:.1f} s")
        names = [c[0] for c in self.calls()]
        self.assertIn("shutdown", names)
        self.assertIn("freeze", names)
        self.assertEqual(names[-2:], ["destroy", "domstate"], names)
        self.assertIsNone(self.state())
        # a freeze that works keeps the domain frozen, also within budget
        (self.standin / "freeze-hangs").unlink()
        self.set_state("running (booted)")
        r, took = self.ocf("stop", timeout_ms=timeout_ms, stop_failure_action="freeze")
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        self.assertLess(took, timeout_ms / 1000)
        self.assertEqual(self.state(), "frozen (user)")

    def dumps(self) -> list[Path]:
        return sorted(self.dump_dir.glob("vm-frozen-*.core"))

    @property
    def dump_dir(self) -> Path:
        d = self.work / "dumps"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def test_dump_dir_checked_only_when_frozen(self) -> None:
        """A missing (unmounted) dump dir does not fail a start with
        nothing frozen; with a frozen domain it is a node-local error."""
        missing = str(self.work / "not-mounted")
        r, _ = self.ocf("start", frozen_dump_dir=missing)
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        self.set_state("frozen (panicked)")
        r, _ = self.ocf("start", frozen_dump_dir=missing)
        self.assertEqual(r.rc, OCF_ERR_INSTALLED, r.output)
        self.assertEqual(self.state(), "frozen (panicked)")

    def test_dump_dir_refuses_unsafe(self) -> None:
        """Group/world-writable dirs, links and a full disk: no dump, the
        frozen domain stays, start fails node-locally."""
        shared = self.work / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        link = self.work / "link"
        link.symlink_to(self.dump_dir)
        for name, path in (("world-writable", shared), ("symlink", link)):
            self.set_state("frozen (panicked)")
            r, _ = self.ocf("start", frozen_dump_dir=str(path))
            self.assertEqual(r.rc, OCF_ERR_INSTALLED, f"{name}: {r.output}")
            self.assertEqual(self.state(), "frozen (panicked)", name)
            self.assertEqual(list(path.iterdir()), [], f"{name}: a dump was written")
        (self.standin / "huge-memory").touch()
        r, _ = self.ocf("start", frozen_dump_dir=str(self.dump_dir))
        self.assertEqual(r.rc, OCF_ERR_INSTALLED, r.output)
        self.assertIn("free", r.output)
        self.assertEqual(self.dumps(), [])

    def test_dumps_unique_and_retained(self) -> None:
        """Three replacements within seconds: three distinct files were
        written, the newest two kept (frozen_dump_keep=2), none readable
        by others."""
        seen = set()
        for _ in range(3):
            self.set_state("frozen (panicked)")
            r, _ = self.ocf("start", frozen_dump_dir=str(self.dump_dir), frozen_dump_keep="2")
            self.assertEqual(r.rc, OCF_SUCCESS, r.output)
            self.assertEqual(self.state(), "running (booted)")
            dumps = self.dumps()
            seen.update(dumps)
            for d in dumps:
                self.assertEqual(d.stat().st_mode & 0o077, 0, f"{d} readable by others")
        self.assertEqual(len(seen), 3, "dump file names are not unique")
        self.assertEqual(len(self.dumps()), 2)

    def test_dump_bounded_by_start_timeout(self) -> None:
        """A dump that hangs ends within the start timeout; its partial
        file is removed and the frozen domain kept."""
        (self.standin / "dump-hangs").touch()
        self.set_state("frozen (panicked)")
        r, took = self.ocf(
            "start", timeout_ms=12000, run_timeout=60, frozen_dump_dir=str(self.dump_dir)
        )
        self.assertEqual(r.rc, OCF_ERR_INSTALLED, r.output)
        self.assertLess(took, 12.0)
        self.assertEqual(self.dumps(), [])
        self.assertEqual(self.state(), "frozen (panicked)")

    def cib(self) -> dict[str, dict[str, str]]:
        path = self.standin / "cib.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def set_capacity(self, mib: int) -> None:
        cib = self.cib()
        cib["util:node1"] = {"host_memory": str(mib), "hv_memory": str(mib)}
        (self.standin / "cib.json").write_text(json.dumps(cib))

    def capacity(self) -> tuple[int, int]:
        util = self.cib().get("util:node1", {})
        return int(util["host_memory"]), int(util["hv_memory"])

    def test_frozen_config_not_saved(self) -> None:
        """save_config_on_stop: a monitor of a frozen (stale) domain leaves
        the config file alone; a running domain's is still saved."""
        self.set_state("frozen (panicked)")
        self.calls()
        r, _ = self.ocf("monitor", save_config_on_stop="true")
        self.assertEqual(r.rc, OCF_NOT_RUNNING, r.output)
        self.assertEqual(self.config.read_text(), STANDIN_XML, "a frozen domain's config was saved")
        # (update_emulator_cache reads the live XML; save_config the inactive)
        self.assertNotIn(["dumpxml", "--inactive"], [c[:2] for c in self.calls()])
        # the parameter still works for a running domain
        self.set_state("running (booted)")
        r, _ = self.ocf("monitor", save_config_on_stop="true")
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        self.assertNotEqual(self.config.read_text(), STANDIN_XML, "save_config_on_stop is inert")

    def test_frozen_memory_held_on_node(self) -> None:
        """A frozen domain's memory (64 MiB) comes off the node's capacity
        while it exists, once however often stop and monitor see it, and
        goes back when start replaces it or a probe finds it gone."""
        self.set_capacity(1024)
        self.set_state("frozen (panicked)")
        r, _ = self.ocf("stop", **UTILIZATION)
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        self.assertEqual(self.state(), "frozen (panicked)")
        self.assertEqual(self.capacity(), (960, 960), "the frozen memory is still counted free")
        self.ocf("stop", **UTILIZATION)
        self.ocf("monitor", **UTILIZATION)
        self.assertEqual(self.capacity(), (960, 960), "held twice")
        r, _ = self.ocf("start", frozen_dump_dir=str(self.dump_dir), **UTILIZATION)
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        self.assertEqual(self.capacity(), (1024, 1024), "not given back after the replacement")
        self.assertNotIn("frozen-held-vm-standin", self.cib().get("attr:node1", {}))
        # a reboot ends the frozen QEMU and clears HA_RSCTMP: the probe
        # still gives the memory back
        self.set_state("frozen (user)")
        self.ocf("stop", **UTILIZATION)
        self.assertEqual(self.capacity(), (960, 960))
        for f in self.rsctmp.glob("*frozen-held*"):
            f.unlink()
        self.set_state(None)
        r, _ = self.ocf("monitor", **UTILIZATION)
        self.assertEqual(r.rc, OCF_NOT_RUNNING, r.output)
        self.assertEqual(self.capacity(), (1024, 1024), "a probe did not give it back")
        # stop_failure_action=freeze leaves a frozen domain too
        self.set_state("running (booted)")
        r, _ = self.ocf("stop", timeout_ms=12000, stop_failure_action="freeze", **UTILIZATION)
        self.assertEqual((r.rc, self.state()), (OCF_SUCCESS, "frozen (user)"), r.output)
        self.assertEqual(self.capacity(), (960, 960))


class ResourceAgentStandInStock(ResourceAgentStandIn):
    """Negative control: the unpatched agent fails the stand-in checks.

    :avocado: enable
    """

    variant = "stock"

    def test_status_one_domstate_call(self) -> None:
        self.set_state("frozen (panicked)")
        r, _ = self.ocf("monitor")
        self.assertEqual(r.rc, OCF_ERR_GENERIC, "stock agent knows the frozen state")

    def test_start_over_frozen_is_node_local(self) -> None:
        self.set_state("frozen (panicked)")
        r, _ = self.ocf("start")
        self.assertNotEqual(r.rc, OCF_ERR_INSTALLED, r.output)

    def test_freeze_stop_within_timeout(self) -> None:
        # stock has no stop_failure_action: a hung shutdown is destroyed
        # after the timeout minus 5 s, the memory lost
        self.set_state("running (booted)")
        r, _ = self.ocf("stop", timeout_ms=12000, stop_failure_action="freeze")
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        self.assertNotIn("freeze", [c[0] for c in self.calls()])
        self.assertIsNone(self.state())

    def _stock_start_over_frozen(self, **params: str) -> None:
        # stock knows no frozen_dump_dir: start over a frozen domain fails
        # (generic error), no dump, whatever the directory
        self.set_state("frozen (panicked)")
        r, _ = self.ocf("start", **params)
        self.assertEqual(r.rc, OCF_ERR_GENERIC, r.output)
        self.assertNotIn("dump", [c[0] for c in self.calls()])

    def test_dump_dir_checked_only_when_frozen(self) -> None:
        self._stock_start_over_frozen(frozen_dump_dir=str(self.work / "not-mounted"))

    def test_dump_dir_refuses_unsafe(self) -> None:
        self._stock_start_over_frozen(frozen_dump_dir="/tmp")

    def test_dumps_unique_and_retained(self) -> None:
        self._stock_start_over_frozen(frozen_dump_dir=str(self.dump_dir))
        self.assertEqual(self.dumps(), [])

    def test_dump_bounded_by_start_timeout(self) -> None:
        self._stock_start_over_frozen(frozen_dump_dir=str(self.dump_dir))

    def test_frozen_config_not_saved(self) -> None:
        # stock saves the stale frozen domain's definition on every monitor
        self.set_state("frozen (panicked)")
        self.ocf("monitor", save_config_on_stop="true")
        self.assertNotEqual(self.config.read_text(), STANDIN_XML)

    def test_frozen_memory_held_on_node(self) -> None:
        # stock: the stop destroys the domain (memory freed, nothing to hold)
        # and never touches the node's capacity
        self.set_capacity(1024)
        self.set_state("frozen (panicked)")
        r, _ = self.ocf("stop", **UTILIZATION)
        self.assertEqual(r.rc, OCF_SUCCESS, r.output)
        self.assertIsNone(self.state())
        self.assertEqual(self.capacity(), (1024, 1024))


OCFT_SYSTEM = Path("/usr/share/resource-agents/ocft")
#: the project's ocft config for the patched agent
OCFT_CONFIG = REPO / "tests" / "ocft" / "VirtualDomain"
OCFT_CASE_RX = re.compile(r"^Starting 'VirtualDomain' case \d+ '(.*)':$")
OCFT_ANSI_RX = re.compile(r"\x1b\[\d+m")


def private_ocft(dest: Path, ocf_root_dir: Path) -> Path:
    """resource-agents' ocft, its case library and helpers, copied so that
    its cases dir and OCF root are the test's, not /var/lib and /usr/lib."""
    tool = shutil.which("ocft")
    if tool is None:
        raise AssertionError("ocft is missing (Debian package resource-agents)")
    lib = dest / "share"
    shutil.copytree(OCFT_SYSTEM, lib)
    cases = dest / "cases"
    cases.mkdir()
    sub = {
        "/usr/share/resource-agents/ocft": str(lib),
        "/var/lib/resource-agents/ocft/cases": str(cases),
        "/usr/lib/ocf/resource.d/heartbeat": str(ocf_root_dir / "resource.d" / "heartbeat"),
        "/usr/lib/ocf/lib/heartbeat": str(ocf_root_dir / "lib" / "heartbeat"),
        "OCF_ROOT=/usr/lib/ocf": f"OCF_ROOT={ocf_root_dir}",
    }
    for path in (Path(tool), lib / "caselib"):
        text = path.read_text()
        for old, new in sub.items():
            text = text.replace(old, new)
        out = dest / "ocft" if path.name == "ocft" else path
        out.write_text(text)
        out.chmod(0o755)
    return dest / "ocft"


def ocft_results(output: str) -> dict[str, bool]:
    """case name -> passed, from ``ocft test -v`` output (colours removed).

    A case fails with "FAILED" (an unexpected return code) or "ERROR:" (a
    Bash check that failed, or a hung agent)."""
    results: dict[str, bool] = {}
    name = None
    for line in output.splitlines():
        m = OCFT_CASE_RX.search(line)
        if m:
            name = m.group(1)
            results[name] = True
        elif name is not None and ("FAILED" in line or line.startswith("ERROR:")):
            results[name] = False
    return results


class ResourceAgentOcft(CleanupTest):
    """resource-agents' ocft on the patched agent: the project's config
    (tests/ocft/VirtualDomain: the upstream cases plus the frozen paths)
    made with ``ocft make`` and run with ``ocft test``, against the
    stand-in virsh and cluster tools (no KVM).  Every case must pass.

    :avocado: enable
    """

    timeout = 600
    variant = "frozen"

    def run_ocft(self) -> dict[str, bool]:
        work = Path(self.workdir)
        tree = prepared_tree(self.variant)
        rsctmp = work / "rsctmp"
        rsctmp.mkdir()
        agent = ocf_root(tree.path, work / "ocf", rsctmp)
        ocft = private_ocft(work / "ocft", agent.parents[2])
        standin = make_standin(work / "standin")
        (standin / "vm.xml.orig").write_text(STANDIN_XML)
        (standin / "vm.xml").write_text(STANDIN_XML)
        configs = work / "configs"
        configs.mkdir()
        shutil.copy2(OCFT_CONFIG, configs / "VirtualDomain")
        env = dict(os.environ)
        env.update(
            {
                "STANDIN": str(standin),
                "PATH": f"{standin / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
                "HA_RSCTMP": str(rsctmp),
            }
        )
        make = subprocess.run(
            [str(ocft), "make", "-d", str(configs), "VirtualDomain"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(make.returncode, 0, make.stdout + make.stderr)
        test = subprocess.run(
            [str(ocft), "test", "-v", "VirtualDomain"],
            env=env,
            capture_output=True,
            text=True,
            timeout=self.timeout - 60,
        )
        out = OCFT_ANSI_RX.sub("", test.stdout + test.stderr)
        (Path(self.logdir) / "ocft.txt").write_text(out)
        results = ocft_results(out)
        for name, ok in results.items():
            self.log.info("ocft %-6s %s", "PASSED" if ok else "FAILED", name)
        (Path(self.logdir) / "ocft.json").write_text(json.dumps(results, indent=1))
        cases = OCFT_CONFIG.read_text().count('\nCASE "')
        self.assertEqual(len(results), cases, f"ocft ran {len(results)} of {cases} cases:\n{out}")
        return results

    def test_ocft(self) -> None:
        results = self.run_ocft()
        failed = [n for n, ok in results.items() if not ok]
        self.assertEqual(failed, [], "ocft cases failed; see ocft.txt")


class ResourceAgentOcftStock(ResourceAgentOcft):
    """Negative control: the unpatched agent passes the upstream cases and
    fails every frozen-path case of the same config.

    :avocado: enable
    """

    variant = "stock"

    def test_ocft(self) -> None:
        results = self.run_ocft()
        frozen = {n: ok for n, ok in results.items() if n.startswith("frozen:")}
        ordinary = {n: ok for n, ok in results.items() if not n.startswith("frozen:")}
        self.assertTrue(frozen)
        self.assertEqual([n for n, ok in ordinary.items() if not ok], [], ordinary)
        self.assertEqual([n for n, ok in frozen.items() if ok], [], "stock passed a frozen case")


#: ocf-tester probes migrate_to and migrate_from last; VirtualDomain's
#: migrate_from waits for the domain forever when it is absent (stock
#: too), so this wrapper answers both "unimplemented" (rc 3): skipped.
OCF_TESTER_WRAPPER = """#!/bin/sh
case "$1" in
    migrate_to|migrate_from) exit 3 ;;
esac
exec {agent} "$@"
"""


class ResourceAgentOcfTester(AgentTest):
    """resource-agents' own ocf-tester on the patched agent, on KVM: meta-data
    against ra-api-1.dtd, validate-all, monitor, start, double start, stop,
    double stop, restart.  The migration probes are skipped (see the
    wrapper).

    :avocado: enable
    """

    def test_ocf_tester(self) -> None:
        tester = shutil.which("ocf-tester")
        if tester is None:
            self.fail("ocf-tester is missing (Debian package resource-agents)")
        # ocf-tester also runs the agent as "nobody": the OCF root must be
        # where nobody can reach it (not under /root)
        public = Path(tempfile.mkdtemp(prefix="frozen-ocf-"))
        self.addCleanup(shutil.rmtree, public, True)
        public.chmod(0o755)
        root = public / "ocf"
        shutil.copytree(self.agent.parents[2], root)
        agent = root / "resource.d" / "heartbeat" / "VirtualDomain"
        wrapper = agent.with_name("VirtualDomain-ocf-tester")
        wrapper.write_text(OCF_TESTER_WRAPPER.format(agent=agent))
        wrapper.chmod(0o755)
        with libvirtd.probe_guest(
            self.daemon, self.qemu_prefix, self.work / "g", start=False, on_crash="freeze"
        ) as probe:
            env = self.daemon.install.env()
            env.update(
                {
                    "OCF_ROOT": str(root),
                    "HA_RSCTMP": str(self.rsctmp),
                    "PATH": f"{self.libvirt_prefix / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
                }
            )
            params = {
                "config": str(probe.xml_path),
                "hypervisor": self.daemon.uri,
                "force_stop": "true",  # the probe guest ignores ACPI shutdown
                "autoset_utilization_cpu": "false",
                "autoset_utilization_hv_memory": "false",
                "autoset_utilization_host_memory": "false",
            }
            argv = [tester, "-v", "-n", "vm-probe"]
            for k, v in params.items():
                argv += ["-o", f"{k}={v}"]
            proc = subprocess.run(
                [*argv, str(wrapper)],
                env=env,
                capture_output=True,
                text=True,
                timeout=AGENT_TIMEOUT * 3,
            )
            out = proc.stdout + proc.stderr
            (Path(self.logdir) / "ocf-tester.txt").write_text(out)
            self.assertEqual(proc.returncode, 0, out[-3000:])
            self.assertIn("passed all tests", out)
            self.assertEqual(self.domstate(probe.name), "absent")
