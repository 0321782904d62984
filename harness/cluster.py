"""A Pacemaker/corosync cluster of N nodes on one host, for end-to-end tests.

Each node is a process tree in its own namespaces, made by this module run
as ``--node SPEC``:

* a network namespace with one veth into a hub namespace, where a bridge
  joins all nodes: corosync's knet traffic never leaves namespaces the
  harness made;
* uts (its own host name, which Pacemaker takes as the node name), ipc,
  pid and mount namespaces (``unshare --fork --mount-proc``); the node's
  init is PID 1 there, so when it exits the kernel ends every process of
  the node -- corosync, Pacemaker's daemons, agents, virtqemud and QEMU --
  whatever state they are in;
* a tmpfs on /run and /dev/shm (libqb keeps its IPC rings in /dev/shm,
  pid files and HA_RSCTMP live in /run) and private directories bound over
  /etc/corosync, /var/lib/corosync, /var/lib/pacemaker, /var/log/pacemaker
  and /usr/lib/ocf/resource.d: nothing on the host is written.

The OCF root of every node is the system's (resource-agents from Debian:
Filesystem, the stock VirtualDomain as ``ocf:heartbeat:``) plus two
providers made from the pinned resource-agents tree: ``ocf:frozen:`` (the
series applied) and ``ocf:stock:`` (the same release unpatched), so one
cluster runs both agents side by side.

Each node runs its own virtqemud of the patched libvirt (harness.libvirtd)
inside the node's namespaces, with slave mount propagation so that QEMU
sees the filesystems the node's Filesystem resources mount later.  The
agents find it through a ``virsh`` wrapper first on Pacemaker's PATH that
sets the node's connection URI, as ``qemu:///system`` would on a real node.

STONITH is disabled: both "nodes" share one kernel, so there is nothing to
fence; a failed stop blocks the resource instead, which the tests see.
``two_node: 1`` keeps quorum with one node.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import config, libvirtd, netns
from harness.lifecycle import Started, children, reap_children
from harness.progress import say

CLUSTER_NAME = "frozen"
#: node i (from 1) has address SUBNET.i on the hub bridge
SUBNET = "10.213.0"
HUB_BRIDGE = "fbr0"
NODE_START_TIMEOUT = 60.0
ONLINE_TIMEOUT = 120.0
NODE_STOP_TIMEOUT = 15.0
TOOL_TIMEOUT = 60.0
SYSTEM_OCF = Path("/usr/lib/ocf")
HACLUSTER = ("hacluster", "haclient")
#: node-local dir (on the node's /run tmpfs) for the VMs' consoles
NODE_RUN = "/run/frozen"

#: private dir name -> system path bound over it in the node, owned by
#: hacluster where Pacemaker's daemons (which drop root) write
NODE_BINDS: dict[str, tuple[str, bool]] = {
    "etc-corosync": ("/etc/corosync", False),
    "lib-corosync": ("/var/lib/corosync", False),
    "lib-pacemaker": ("/var/lib/pacemaker", True),
    "log-pacemaker": ("/var/log/pacemaker", True),
    "ocf": ("/usr/lib/ocf/resource.d", False),
}
PACEMAKER_SUBDIRS = ("cib", "pengine", "blackbox", "cores")

COROSYNC_CONF = """\
totem {{
    version: 2
    cluster_name: {cluster}
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 3000
}}
nodelist {{
{nodes}}}
quorum {{
    provider: corosync_votequorum
    two_node: {two_node}
}}
logging {{
    to_logfile: yes
    logfile: /var/log/pacemaker/corosync.log
    to_stderr: no
    to_syslog: no
    timestamp: on
}}
"""

NODE_ENTRY = """\
    node {{
        ring0_addr: {address}
        name: {name}
        nodeid: {nodeid}
    }}
"""

VIRSH_WRAPPER = """\
#!/bin/sh
# The node's virsh: the patched libvirt, connected to this node's virtqemud.
export LD_LIBRARY_PATH={libdir}
export LIBVIRT_DEFAULT_URI='{uri}'
exec {virsh} "$@"
"""


class ClusterError(Exception):
    """The cluster did not come up, answer or go down as expected; names logs."""


def cluster_supported() -> str | None:
    """None when a cluster can run here, else the reason (a test fails on it)."""
    if os.geteuid() != 0:
        return "a cluster in namespaces needs root"
    for prog in (
        "corosync",
        "pacemakerd",
        "crm_mon",
        "cibadmin",
        "crm_attribute",
        "nsenter",
        "unshare",
        "ip",
    ):
        if shutil.which(prog) is None:
            return (
                f"{prog} is missing (Debian packages pacemaker, pacemaker-cli-utils, "
                "corosync, util-linux)"
            )
    if not (SYSTEM_OCF / "resource.d" / "heartbeat" / "Filesystem").exists():
        return "the Filesystem agent is missing (Debian package resource-agents)"
    with contextlib.suppress(KeyError):
        import grp
        import pwd

        pwd.getpwnam(HACLUSTER[0])
        grp.getgrnam(HACLUSTER[1])
        return netns.netns_supported()
    return "user hacluster or group haclient is missing (Debian package pacemaker)"


def corosync_conf(names: Sequence[str], addresses: Sequence[str]) -> str:
    nodes = "".join(
        NODE_ENTRY.format(address=a, name=n, nodeid=i)
        for i, (n, a) in enumerate(zip(names, addresses, strict=True), 1)
    )
    return COROSYNC_CONF.format(
        cluster=CLUSTER_NAME, nodes=nodes, two_node=1 if len(names) == 2 else 0
    )


# -- the node's init (runs as PID 1 of the node's namespaces) -----------------


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise ClusterError(f"mount {' '.join(args)}: {r.stderr.strip()}")


class _NodeInit:
    """Mounts the node's private dirs, runs corosync then pacemakerd, reaps.

    stdin commands: ``stop`` (pacemakerd, then corosync, SIGTERM then
    SIGKILL), end of stdin (the same).  Exiting ends the rest of the node.
    """

    def __init__(self, spec: dict[str, object]):
        self.spec = spec
        self.exited: dict[int, int] = {}

    def setup(self) -> None:
        # Cut off from the host (private), then shared within the node: the
        # node's virtqemud (a slave) sees what Filesystem resources mount.
        _mount("--make-rprivate", "/")
        _mount("--make-rshared", "/")
        _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")
        _mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm")
        for src, dst in self.spec["binds"]:  # type: ignore[attr-defined]
            _mount("--bind", src, dst)
        Path("/run/resource-agents").mkdir(mode=0o1755, exist_ok=True)
        # node-local files of the VMs (console socket and log): one domain
        # XML on shared storage names the same paths on every node
        Path(NODE_RUN).mkdir(mode=0o700, exist_ok=True)
        subprocess.run(["hostname", str(self.spec["name"])], check=True)

    def reap(self) -> None:
        reap_children(self.exited)

    def alive(self, pid: int) -> bool:
        self.reap()
        return pid not in self.exited

    def spawn(self, argv: list[str], log: str, env: dict[str, str] | None = None) -> int:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        return proc.pid

    def end(self, pid: int, timeout: float) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while self.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)  # poll interval while a daemon shuts down
            if not self.alive(pid):
                return

    def run(self) -> int:
        self.setup()
        log = str(self.spec["log"])
        corosync = self.spawn(["corosync", "-f"], log)
        deadline = time.monotonic() + NODE_START_TIMEOUT
        while subprocess.run(["corosync-cfgtool", "-s"], capture_output=True).returncode:
            if not self.alive(corosync) or time.monotonic() > deadline:
                print(
                    f"error corosync did not start (status {self.exited.get(corosync)})", flush=True
                )
                return 1
            time.sleep(0.2)  # poll interval while corosync starts
        env = {**os.environ, **self.spec["env"]}  # type: ignore[dict-item]
        pacemakerd = self.spawn(["pacemakerd", "-f"], log, env)
        print(f"ready corosync={corosync} pacemakerd={pacemakerd}", flush=True)
        while True:
            ready, _, _ = select.select([sys.stdin], [], [], 0.5)
            self.reap()
            if not ready:
                continue
            line = sys.stdin.readline().strip()
            if line in ("", "stop"):
                self.end(pacemakerd, float(self.spec["stop_timeout"]))  # type: ignore[arg-type]
                self.end(corosync, float(self.spec["stop_timeout"]))  # type: ignore[arg-type]
                print("stopped", flush=True)
                return 0


def _node_main(spec_json: str) -> int:
    try:
        return _NodeInit(json.loads(spec_json)).run()
    except ClusterError as e:
        print(f"error {e}", flush=True)
        return 1


# -- the nodes, seen from the test ----------------------------------------------


@dataclass
class Node:
    """One cluster node: its namespaces' init, its virtqemud, its private dirs."""

    name: str
    nodeid: int
    address: str
    netns: str
    root: Path
    daemon: libvirtd.Virtqemud | None = None
    init_pid: int | None = None
    _proc: subprocess.Popen[str] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.root / "log-pacemaker" / "node.log"

    def enter(self) -> list[str]:
        """Command prefix that runs a program inside this node."""
        if self.init_pid is None:
            raise ClusterError(f"{self.name} is not running")
        return ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", "--"]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = TOOL_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a program in the node (cluster tools talk over the node's IPC)."""
        proc = subprocess.run(
            [*self.enter(), *argv], capture_output=True, text=True, timeout=timeout, env=env
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{self.name}: {' '.join(argv)} failed ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def path(self, inside: Path) -> Path:
        """A path of the node's mount namespace, seen from the host."""
        if self.init_pid is None:
            raise ClusterError(f"{self.name} is not running")
        return Path(f"/proc/{self.init_pid}/root") / inside.relative_to("/")


@dataclass(frozen=True)
class NodeStatus:
    name: str
    online: bool


@dataclass(frozen=True)
class ResourceStatus:
    """One primitive in ``crm_mon --output-as=xml``."""

    id: str
    agent: str
    role: str
    active: bool
    failed: bool
    blocked: bool
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class ClusterStatus:
    nodes: tuple[NodeStatus, ...]
    resources: tuple[ResourceStatus, ...]
    failures: tuple[dict[str, str], ...]

    def resource(self, rid: str) -> ResourceStatus | None:
        return next((r for r in self.resources if r.id == rid), None)

    def started_on(self, rid: str) -> str | None:
        """The node where ``rid`` runs, None when it runs nowhere."""
        r = self.resource(rid)
        if r is None or r.role != "Started" or not r.active or r.failed or not r.nodes:
            return None
        return r.nodes[0]

    def online(self) -> list[str]:
        return [n.name for n in self.nodes if n.online]


def parse_crm_mon_xml(text: str) -> ClusterStatus:
    root = ET.fromstring(text)
    nodes = tuple(
        NodeStatus(n.get("name", ""), n.get("online") == "true")
        for n in root.iterfind("./nodes/node")
    )
    resources = tuple(
        ResourceStatus(
            id=r.get("id", ""),
            agent=r.get("resource_agent", ""),
            role=r.get("role", ""),
            active=r.get("active") == "true",
            failed=r.get("failed") == "true",
            blocked=r.get("blocked") == "true",
            nodes=tuple(n.get("name", "") for n in r.iterfind("node")),
        )
        for r in root.iter("resource")
    )
    failures = tuple(dict(f.attrib) for f in root.iterfind("./failures/failure"))
    return ClusterStatus(nodes, resources, failures)


@dataclass(frozen=True)
class Snapshot:
    """``crm_mon -1`` text at one moment, kept for the test's results."""

    label: str
    t: float
    text: str


@dataclass
class Cluster(Started):
    """N nodes in namespaces on this host; a context manager that always ends
    what it started: virtqemud and QEMU, Pacemaker, corosync, namespaces.

    ``agents`` maps an OCF provider name to an agent directory holding a
    ``VirtualDomain`` script (e.g. the pinned tree, patched and stock).
    """

    workdir: Path
    libvirt_prefix: Path
    agents: dict[str, Path]
    size: int = 2
    logdir: Path | None = None
    nodes: list[Node] = field(default_factory=list, init=False)
    snapshots: list[Snapshot] = field(default_factory=list, init=False)
    _hub: str | None = field(default=None, init=False, repr=False)
    _namespaces: list[str] = field(default_factory=list, init=False, repr=False)

    # bring-up

    def start(self) -> None:
        why = cluster_supported()
        if why:
            raise ClusterError(why)
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid() % 100000}{os.urandom(2).hex()}"
        names = [f"node{i}" for i in range(1, self.size + 1)]
        addresses = [f"{SUBNET}.{i}" for i in range(1, self.size + 1)]
        self._make_network(tag, names, addresses)
        conf = corosync_conf(names, addresses)
        for i, (name, addr) in enumerate(zip(names, addresses, strict=True), 1):
            node = Node(name, i, addr, f"fcl{tag}-{i}", self.workdir / name)
            self.nodes.append(node)
            node.daemon = libvirtd.Virtqemud(
                self.libvirt_prefix, node.root / "virtqemud", propagation="slave"
            )
            self._make_node_dirs(node, conf)
        for node in self.nodes:
            self._start_node(node)
            say(
                f"cluster: {node.name} up (corosync, pacemakerd) "
                f"after {time.monotonic() - t0:.1f} s"
            )
        for node in self.nodes:
            assert node.daemon is not None
            node.daemon.enter = node.enter()
            node.daemon.start()
        say(f"cluster: a virtqemud on every node after {time.monotonic() - t0:.1f} s")
        self.wait(lambda s: sorted(s.online()) == names, ONLINE_TIMEOUT, f"all of {names} online")
        say(f"cluster: {self.size} nodes online after {time.monotonic() - t0:.1f} s")
        self.snapshot("cluster online")

    def _make_network(self, tag: str, names: list[str], addresses: list[str]) -> None:
        """A hub namespace with a bridge; one veth from each node into it."""
        self._hub = f"fcl{tag}-hub"
        netns._ip("netns", "add", self._hub)
        self._namespaces.append(self._hub)
        hub = netns.Namespace(self._hub)
        hub.ip("link", "set", "lo", "up")
        hub.ip("link", "add", HUB_BRIDGE, "type", "bridge")
        hub.ip("link", "set", HUB_BRIDGE, "up")
        for i, addr in enumerate(addresses, 1):
            ns = f"fcl{tag}-{i}"
            netns._ip("netns", "add", ns)
            self._namespaces.append(ns)
            node = netns.Namespace(ns)
            node.ip("link", "set", "lo", "up")
            node.ip(
                "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self._hub
            )
            hub.ip("link", "set", f"p{i}", "master", HUB_BRIDGE, "up")
            node.ip("addr", "add", f"{addr}/24", "dev", "eth0")
            node.ip("link", "set", "eth0", "up")
        del names

    def _make_node_dirs(self, node: Node, conf: str) -> None:
        import grp
        import pwd

        uid, gid = pwd.getpwnam(HACLUSTER[0]).pw_uid, grp.getgrnam(HACLUSTER[1]).gr_gid
        for sub, (_target, hacluster) in NODE_BINDS.items():
            d = node.root / sub
            d.mkdir(parents=True, exist_ok=True)
            if hacluster:
                os.chown(d, uid, gid)
                d.chmod(0o770)
        for sub in PACEMAKER_SUBDIRS:
            d = node.root / "lib-pacemaker" / sub
            d.mkdir(exist_ok=True)
            os.chown(d, uid, gid)
            d.chmod(0o770)
        (node.root / "etc-corosync" / "corosync.conf").write_text(conf)
        # The system's providers (heartbeat: Filesystem, stock 4.12 agents)
        # plus ours; a copy, so the host's OCF dir is never written.
        ocf = node.root / "ocf"
        shutil.copytree(SYSTEM_OCF / "resource.d", ocf, symlinks=True, dirs_exist_ok=True)
        for provider, src in self.agents.items():
            dest = ocf / provider
            dest.mkdir(exist_ok=True)
            shutil.copy2(src / "VirtualDomain", dest / "VirtualDomain")
            (dest / "VirtualDomain").chmod(0o755)
        assert node.daemon is not None
        bindir = node.root / "bin"
        bindir.mkdir(exist_ok=True)
        wrapper = bindir / "virsh"
        wrapper.write_text(
            VIRSH_WRAPPER.format(
                libdir=node.daemon.install.libdir,
                uri=node.daemon.uri,
                virsh=node.daemon.install.virsh,
            )
        )
        wrapper.chmod(0o755)

    def _node_spec(self, node: Node) -> dict[str, object]:
        binds = [[str(node.root / sub), target] for sub, (target, _) in NODE_BINDS.items()]
        path = f"{node.root / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"
        return {
            "name": node.name,
            "binds": binds,
            "log": str(Path(NODE_BINDS["log-pacemaker"][0]) / "node.log"),
            "stop_timeout": NODE_STOP_TIMEOUT,
            "env": {
                "PATH": path,
                "PCMK_logfile": "/var/log/pacemaker/pacemaker.log",
                "PCMK_node_start_state": "online",
                "LC_ALL": "C",
            },
        }

    def _start_node(self, node: Node) -> None:
        spec = json.dumps(self._node_spec(node))
        cmd = [
            "nsenter",
            f"--net={netns.NETNS_RUN_DIR / node.netns}",
            "unshare",
            "--uts",
            "--ipc",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGKILL",
            sys.executable,
            "-m",
            "harness.cluster",
            "--node",
            spec,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(config.repo_root()), *filter(None, [env.get("PYTHONPATH")])]
        )
        node._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        line = self._reply(node, NODE_START_TIMEOUT)
        if not line.startswith("ready"):
            raise ClusterError(f"{node.name}: {line}; see {node.log}")
        # unshare's only child is the node's init (PID 1 inside).
        kids = children(node._proc.pid)
        if len(kids) != 1:
            raise ClusterError(f"{node.name}: expected one init under unshare, found {kids}")
        node.init_pid = kids[0]

    def _reply(self, node: Node, timeout: float) -> str:
        proc = node._proc
        assert proc is not None and proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if not line:
            raise ClusterError(
                f"{node.name}: no answer from the node's init in {timeout:.0f} s "
                f"(exit status {proc.poll()}); see {node.log}"
            )
        return line

    # tear-down

    def close(self) -> None:
        """End everything, by PID, whatever state it is in; keep the logs."""
        # Pacemaker must not stop (or recover) resources while everything
        # goes down: a stop against a virtqemud already gone fails slowly.
        if self.nodes and self.nodes[0].init_pid is not None:
            with contextlib.suppress(Exception):
                self.set_property("maintenance-mode", "true")
        for node in self.nodes:
            if node.daemon is not None:
                with contextlib.suppress(Exception):
                    node.daemon.close()
        for node in self.nodes:
            proc = node._proc
            if proc is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                if proc.poll() is None and proc.stdin is not None:
                    proc.stdin.write("stop\n")
                    proc.stdin.close()
        for node in self.nodes:
            proc, node._proc = node._proc, None
            if proc is None:
                continue
            try:
                proc.wait(timeout=3 * NODE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # --kill-child: unshare's death kills the init, and the
                # init's death every process of the node.
                for pid in [p for p in (node.init_pid, proc.pid) if p]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
            finally:
                if proc.stdout is not None:
                    proc.stdout.close()
                node.init_pid = None
        for ns in reversed(self._namespaces):
            with contextlib.suppress(netns.NetnsError):
                netns.delete_namespace(ns)
        self._namespaces.clear()
        if self.logdir is not None:
            self.keep_logs(self.logdir)

    def keep_logs(self, dest: Path, limit: int = 4_000_000) -> None:
        """Node logs, virtqemud logs and every crm_mon snapshot into ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            nd = dest / node.name
            nd.mkdir(exist_ok=True)
            for path in (node.root / "log-pacemaker").glob("*.log"):
                with contextlib.suppress(OSError):
                    (nd / path.name).write_bytes(path.read_bytes()[-limit:])
            if node.daemon is not None:
                vq = nd / "virtqemud"
                vq.mkdir(exist_ok=True)
                with contextlib.suppress(OSError):
                    node.daemon.copy_logs(vq)
        with (dest / "crm_mon.txt").open("w") as out:
            for snap in self.snapshots:
                out.write(f"=== {snap.label} (t={snap.t:.1f} s)\n{snap.text}\n")

    # the cluster's tools

    @property
    def dc(self) -> Node:
        """Any running node: cluster tools reach the CIB from all of them."""
        return self.nodes[0]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def crm_mon(self) -> str:
        return self.dc.run("crm_mon", "-1", "-r", "-f", "-t").stdout

    def status(self) -> ClusterStatus:
        return parse_crm_mon_xml(self.dc.run("crm_mon", "-1", "-r", "--output-as=xml").stdout)

    def snapshot(self, label: str) -> Snapshot:
        """Keep the ``crm_mon -1`` text now, labelled, for the results."""
        snap = Snapshot(label, time.monotonic(), self.crm_mon())
        self.snapshots.append(snap)
        return snap

    def wait(
        self,
        predicate: Callable[[ClusterStatus], bool],
        timeout: float,
        what: str,
        poll: float = 0.2,
        hopeless: Callable[[ClusterStatus], bool] | None = None,
    ) -> ClusterStatus:
        """Poll crm_mon until ``predicate`` holds; the last text in the error.

        ``hopeless`` ends the wait early (a resource that cannot start
        anywhere any more will not start by waiting)."""
        deadline = time.monotonic() + timeout
        while True:
            st = None
            with contextlib.suppress(ClusterError, ET.ParseError):
                st = self.status()
                if predicate(st):
                    return st
            if time.monotonic() > deadline or (st is not None and hopeless and hopeless(st)):
                text = ""
                with contextlib.suppress(ClusterError):
                    text = self.crm_mon()
                raise ClusterError(f"not {what} within {timeout:.0f} s; crm_mon:\n{text}")
            time.sleep(poll)

    def set_property(self, name: str, value: str, kind: str = "crm_config") -> None:
        self.dc.run("crm_attribute", "--type", kind, "--name", name, "--update", value)

    def cib_create(self, section: str, xml: str) -> None:
        self.dc.run("cibadmin", "--create", "-o", section, "--xml-text", xml)

    def cib_delete(self, xml: str) -> None:
        self.dc.run("cibadmin", "--delete", "--xml-text", xml)

    def resource(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dc.run("crm_resource", *args, check=check)

    def configure_defaults(self, **rsc_defaults: str) -> None:
        """The test cluster's settings: no STONITH (nothing to fence between
        namespaces of one kernel), quick rechecks, and resource defaults."""
        self.set_property("stonith-enabled", "false")
        self.set_property("cluster-recheck-interval", "30s")
        for name, value in rsc_defaults.items():
            self.set_property(name.replace("_", "-"), value, "rsc_defaults")


# -- CIB snippets -----------------------------------------------------------------


def nvpairs(parent: ET.Element, tag: str, owner: str, values: dict[str, str]) -> None:
    if not values:
        return
    attrs = ET.SubElement(parent, tag, id=f"{owner}-{tag}")
    for k, v in values.items():
        ET.SubElement(attrs, "nvpair", id=f"{owner}-{tag}-{k}", name=k, value=v)


def primitive(
    rid: str,
    provider: str,
    agent: str,
    params: dict[str, str],
    ops: Sequence[tuple[str, str, str]] = (),
    meta: dict[str, str] | None = None,
) -> ET.Element:
    """An OCF primitive; ``ops`` are (name, interval, timeout)."""
    el = ET.Element("primitive", id=rid, type=agent, provider=provider)
    el.set("class", "ocf")
    nvpairs(el, "instance_attributes", rid, params)
    nvpairs(el, "meta_attributes", rid, meta or {})
    if ops:
        ops_el = ET.SubElement(el, "operations")
        for name, interval, timeout in ops:
            ET.SubElement(
                ops_el,
                "op",
                id=f"{rid}-{name}-{interval}",
                name=name,
                interval=interval,
                timeout=timeout,
            )
    return el


def group(gid: str, *members: ET.Element, meta: dict[str, str] | None = None) -> str:
    """A group: members start in order on one node (ordering + colocation)."""
    el = ET.Element("group", id=gid)
    nvpairs(el, "meta_attributes", gid, meta or {})
    el.extend(members)
    return ET.tostring(el, encoding="unicode")


def location(cid: str, rsc: str, node: str, score: str) -> str:
    return ET.tostring(
        ET.Element("rsc_location", id=cid, rsc=rsc, node=node, score=score), encoding="unicode"
    )


@contextlib.contextmanager
def cluster(
    workdir: Path,
    libvirt_prefix: Path,
    agents: dict[str, Path],
    *,
    size: int = 2,
    logdir: Path | None = None,
) -> Iterator[Cluster]:
    with Cluster(workdir, libvirt_prefix, agents, size=size, logdir=logdir) as c:
        yield c


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--node":
        sys.exit(_node_main(sys.argv[2]))
    sys.exit("usage: python -m harness.cluster --node SPEC")
