"""A real Pacemaker/corosync cluster fails a frozen VM over.

Two nodes on this host (harness.cluster: network, uts, ipc, mount and pid
namespaces; one virtqemud of the patched libvirt per node; STONITH off).
The service is a group: a Filesystem resource loop-mounting an ext4 image
from shared storage, then the probe guest as a VirtualDomain resource whose
disk is on that filesystem.  The guest fails on node 1; each row of the
failover table is one trigger x agent x action, all on the same cluster:

* ``ocf:frozen:VirtualDomain`` (the series), on_crash=freeze: monitor rc 7,
  the agent's stop keeps the frozen domain (same QEMU, marker in memory),
  the Filesystem stop unmounts under the live frozen QEMU, the group starts
  on node 2 and its guest writes to the same disk;
* ``ocf:stock:VirtualDomain`` (the same release unpatched), on_crash=freeze:
  the negative control of every check above -- monitor fails with a
  generic error and stop destroys the domain: memory lost;
* the stock agent with on_crash=preserve and on_crash=destroy on stock
  QEMU: today's choices, both of which lose the memory.
* a watchdog expiry with ``<watchdog action='freeze'/>``, frozen agent and
  stock agent (negative control), the same checks as the panic.

``test_io_error_failover``: a disk I/O error with ``error_policy='freeze'``
(the disk served by a node-local qemu-storage-daemon through blkdebug; see
its docstring for why there and not device-mapper), frozen agent, stock
agent, and error_policy='stop' on stock QEMU.

``test_same_node_recovery`` leaves migration-threshold at its default
(frozen_dump_dir set: dump and restart on node 1; unset: OCF_ERR_INSTALLED
and the group moves), ``test_stop_failure_freeze`` moves the group while
the guest ignores the shutdown (stop_failure_action=freeze freezes it).

The table (failover seconds, memory kept, disk opened on node 2) and the
``crm_mon`` text before and after each failover go to the test's results:
``failover.json``, ``failover.txt``, ``cluster/crm_mon.txt``.

Environment: FROZEN_LIBVIRT, FROZEN_QEMU, FROZEN_QEMU_STOCK.  Missing KVM,
root, namespaces or Pacemaker fail the test: they are not a reason to skip.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # running from a checkout without installing
    sys.path.insert(0, str(REPO))

from frozen_test import CleanupTest, require_prefix  # noqa: E402

from harness import cluster, failover  # noqa: E402


class ClusterTest(CleanupTest):
    """Builds, KVM, both agents, a two-node cluster.

    :avocado: disable
    """

    timeout = 1500

    def setUp(self) -> None:
        self.libvirt_prefix = require_prefix(self, "FROZEN_LIBVIRT", "patched libvirt")
        self.qemu = {
            v: require_prefix(self, v, what)
            for v, what in (
                ("FROZEN_QEMU", "patched QEMU"),
                ("FROZEN_QEMU_STOCK", "unpatched QEMU"),
            )
        }
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            self.fail("/dev/kvm is missing or not accessible: the cluster tests need KVM")
        why = cluster.cluster_supported()
        if why:
            self.fail(f"cannot run a cluster here: {why}")
        self.work = Path(self.workdir)
        self.agents = failover.agent_dirs()
        # Short: console sockets and QEMU's paths under it stay well below
        # the 107-byte limit of a unix socket path.
        self.shared = Path(tempfile.mkdtemp(prefix="frozen-cl-"))
        self.addCleanup(shutil.rmtree, self.shared, True)

    def cluster(self) -> cluster.Cluster:
        return cluster.Cluster(
            self.work / "cluster",
            self.libvirt_prefix,
            self.agents,
            logdir=Path(self.logdir) / "cluster",
        )


class ClusterFailover(ClusterTest):
    """:avocado: enable"""

    def test_panic_failover_table(self) -> None:
        results: list[failover.FailoverResult] = []
        try:
            with self.cluster() as cl:
                cl.configure_defaults()
                qemu = {"frozen": self.qemu["FROZEN_QEMU"], "stock": self.qemu["FROZEN_QEMU_STOCK"]}
                for r in failover.failover_table(cl, self.shared, qemu, self.work):
                    results.append(r)
                    self.log.info("%s", json.dumps(r.row()))
                    self.log.info("crm_mon before:\n%s", r.crm_mon_before)
                    self.log.info("crm_mon after:\n%s", r.crm_mon_after)
        finally:
            self._keep(results)
        frozen, stock_freeze, preserve, destroy, wdt, wdt_stock = results

        # the series: rc 7, the frozen domain kept with its memory, storage
        # handed over, the service on node 2 on the same disk
        self.assertEqual(frozen.monitor_rc, 7, frozen.row())
        self.assertEqual(frozen.failed_node_state, "frozen (panicked)")
        self.assertTrue(frozen.memory_kept, "the frozen domain lost the marker")
        self.assertTrue(frozen.same_qemu, "stop replaced or ended the frozen QEMU")
        self.assertTrue(frozen.fs_released, "the filesystem stayed mounted on node1")
        self.assertEqual(frozen.recovered_on, "node2")
        self.assertTrue(frozen.disk_opened_on_node2, frozen.row())
        self.assertIsNotNone(frozen.failover_s)

        # the watchdog: the same promises, reason "watchdog"
        self.assertEqual(wdt.monitor_rc, 7, wdt.row())
        self.assertEqual(wdt.failed_node_state, "frozen (watchdog)")
        self.assertTrue(wdt.memory_kept and wdt.same_qemu and wdt.fs_released, wdt.row())
        self.assertTrue(wdt.disk_opened_on_node2, wdt.row())
        self.assertFalse(wdt_stock.memory_kept, wdt_stock.row())

        # negative control: the same checks go red with the stock agent
        self.assertEqual(stock_freeze.monitor_rc, 1, stock_freeze.row())
        self.assertFalse(stock_freeze.memory_kept, "stock agent kept a frozen domain")
        self.assertEqual(stock_freeze.failed_node_state, "absent")

        # today's choices: both lose the memory; the service still moves.
        # on_crash=destroy: rc 7, or 1 when the monitor races libvirt
        # removing the domain (stock misreads "domain not found: no domain
        # with matching uuid" as an unknown status)
        for r, rcs in ((preserve, (1,)), (destroy, (1, 7))):
            self.assertIn(r.monitor_rc, rcs, r.row())
            self.assertFalse(r.memory_kept, r.row())
            self.assertEqual(r.recovered_on, "node2", r.row())
            self.assertTrue(r.disk_opened_on_node2, r.row())

    def test_io_error_failover(self) -> None:
        """A disk I/O error on node1 with error_policy='freeze': the guest's
        disk is served over NBD by a node-local qemu-storage-daemon in the
        group (Filesystem, then the daemon, then the VM: the disk file
        stays on the Filesystem resource), through blkdebug.  The device
        mapper is not used: this kernel has none, and a dm or loop device
        of the one kernel both nodes share would fail on node 2 as well;
        the daemon is node-local, so only node 1's path to the disk fails,
        as with a storage path lost on one node.  The test arms blkdebug
        with one read through node 1's export; the guest's next write
        fails, QEMU freezes, monitor rc 7, node 2 opens the same file and
        writes.  Negative controls: the stock agent destroys the frozen
        domain (memory lost); today's error_policy='stop' on stock QEMU
        keeps the memory in a paused domain that the stock agent reports
        as running, so the cluster never fails over."""
        results: list[failover.FailoverResult] = []
        capacity = []
        try:
            with self.cluster() as cl:
                cl.configure_defaults()
                # node1's memory capacity (placement-strategy stays default:
                # nothing is placed by it): the frozen domain's 64 MiB must
                # come off it, by the agent's stop (patch 0009)
                util = ("--type", "nodes", "--node", "node1", "--utilization")
                util += ("--name", "host_memory")
                cl.dc.run("crm_attribute", *util, "--update", "4096")
                qemu = {"frozen": self.qemu["FROZEN_QEMU"], "stock": self.qemu["FROZEN_QEMU_STOCK"]}
                for r in failover.io_error_table(cl, self.shared, qemu, self.work):
                    results.append(r)
                    capacity.append(cl.dc.run("crm_attribute", *util, "--query", "--quiet").stdout)
                    self.log.info("%s", json.dumps(r.row()))
                    self.log.info("node1 host_memory capacity: %s", capacity[-1].strip())
                    self.log.info("crm_mon before:\n%s", r.crm_mon_before)
                    self.log.info("crm_mon after:\n%s", r.crm_mon_after)
        finally:
            self._keep(results, "io-error")
        frozen, stock, stop = results
        self.assertEqual([c.strip() for c in capacity], ["4032"] * 3, "node1's capacity")

        self.assertEqual(frozen.monitor_rc, 7, frozen.row())
        self.assertEqual(frozen.failed_node_state, "frozen (I/O error)", frozen.row())
        self.assertTrue(frozen.memory_kept, "the frozen domain lost the marker")
        self.assertTrue(frozen.same_qemu, "stop replaced or ended the frozen QEMU")
        self.assertTrue(frozen.fs_released, "the filesystem stayed mounted on node1")
        self.assertEqual(frozen.recovered_on, "node2", frozen.row())
        self.assertTrue(frozen.disk_opened_on_node2, frozen.row())
        self.assertIsNotNone(frozen.failover_s)

        self.assertEqual(stock.monitor_rc, 1, stock.row())
        self.assertEqual(stock.failed_node_state, "absent", stock.row())
        self.assertFalse(stock.memory_kept, stock.row())
        self.assertTrue(stock.disk_opened_on_node2, stock.row())

        self.assertTrue(stop.failed_node_state.startswith("paused"), stop.row())
        self.assertIsNone(stop.failover_s, stop.row())
        self.assertEqual(stop.recovered_on, "node1", stop.row())
        self.assertFalse(stop.disk_opened_on_node2, stop.row())

    def test_same_node_recovery(self) -> None:
        """migration-threshold at its default: Pacemaker restarts where the
        guest failed.  With frozen_dump_dir the agent dumps, destroys and
        restarts on node1; without it start fails with OCF_ERR_INSTALLED
        and the group moves to node2, the frozen domain kept; the stock
        agent (negative control) restarts on node1 and loses the memory."""
        dumps = self.work / "dumps"
        dumps.mkdir(mode=0o700)
        rows = (("frozen", dumps), ("frozen", None), ("stock", dumps))
        results: list[failover.SameNodeResult] = []
        try:
            with self.cluster() as cl:
                cl.configure_defaults()
                for i, (provider, dump_dir) in enumerate(rows):
                    svc = failover.make_service(
                        self.shared,
                        self.qemu["FROZEN_QEMU"],
                        f"s{i}{provider[:2]}",
                        on_crash="freeze",
                    )
                    r = failover.run_same_node(
                        cl, svc, provider, workdir=self.work, dump_dir=dump_dir
                    )
                    results.append(r)
                    self.log.info("%s", json.dumps(r.row()))
                    self.log.info("crm_mon before:\n%s", r.crm_mon_before)
                    self.log.info("crm_mon after:\n%s", r.crm_mon_after)
        finally:
            (Path(self.logdir) / "same-node.json").write_text(
                json.dumps([r.__dict__ for r in results], indent=1)
            )
        with_dir, without_dir, stock = results

        self.assertEqual(with_dir.monitor_rc, 7, with_dir.row())
        self.assertEqual(with_dir.recovered_on, "node1", with_dir.row())
        self.assertIsNone(with_dir.start_rc_node1, with_dir.row())
        self.assertTrue(with_dir.node1_state.startswith("running"), with_dir.row())
        self.assertEqual(with_dir.dumps, 1, with_dir.row())
        self.assertTrue(with_dir.dump_has_marker, "the dump lacks the failed guest's memory")
        self.assertIsNotNone(with_dir.recovery_s)

        self.assertEqual(without_dir.monitor_rc, 7, without_dir.row())
        self.assertEqual(without_dir.start_rc_node1, 5, without_dir.row())
        self.assertEqual(without_dir.recovered_on, "node2", without_dir.row())
        self.assertEqual(without_dir.node1_state, "frozen (panicked)")
        self.assertTrue(without_dir.frozen_memory_kept, without_dir.row())

        # negative control: the stock agent restarts here, memory gone
        self.assertEqual(stock.monitor_rc, 1, stock.row())
        self.assertFalse(stock.frozen_memory_kept, stock.row())
        self.assertFalse(stock.dump_has_marker, stock.row())

    def test_stop_failure_freeze(self) -> None:
        """A move while the guest ignores the shutdown: with
        stop_failure_action=freeze the stop freezes the domain (memory
        kept) within the stop timeout and the group starts on node2; the
        stock agent (negative control) destroys it."""
        results: list[failover.FailoverResult] = []
        try:
            with self.cluster() as cl:
                cl.configure_defaults()
                for r in failover.stop_failure_table(
                    cl, self.shared, self.qemu["FROZEN_QEMU"], self.work
                ):
                    results.append(r)
                    self.log.info("%s", json.dumps(r.row()))
                    self.log.info("crm_mon before:\n%s", r.crm_mon_before)
                    self.log.info("crm_mon after:\n%s", r.crm_mon_after)
        finally:
            self._keep(results, "stop-failure")
        frozen, stock = results
        self.assertEqual(frozen.failed_node_state, "frozen (user)", frozen.row())
        self.assertTrue(frozen.memory_kept and frozen.same_qemu, frozen.row())
        self.assertTrue(frozen.fs_released, frozen.row())
        self.assertTrue(frozen.disk_opened_on_node2, frozen.row())
        # the stop timeout is 30 s: half for the shutdown, then the freeze
        self.assertLess(frozen.failover_s or 99.0, 30.0 + 15.0, frozen.row())
        self.assertEqual(stock.failed_node_state, "absent", stock.row())
        self.assertFalse(stock.memory_kept, stock.row())
        self.assertTrue(stock.disk_opened_on_node2, stock.row())

    def _keep(self, results: list[failover.FailoverResult], name: str = "failover") -> None:
        logdir = Path(self.logdir)
        (logdir / f"{name}.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
        text = failover.table(results)
        (logdir / f"{name}.txt").write_text(text + "\n")
        self.log.info("failover table:\n%s", text)
