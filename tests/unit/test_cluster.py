"""Unit tests for harness.cluster and harness.failover: configuration text,
CIB snippets, crm_mon parsing and the failover table (no cluster needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from harness import cluster, failover

CRM_MON_XML = """\
<pacemaker-result api-version="2.22" request="crm_mon -1 -r --output-as=xml">
  <nodes>
    <node name="node1" id="1" online="true" standby="false" type="member"/>
    <node name="node2" id="2" online="false" standby="false" type="member"/>
  </nodes>
  <resources>
    <group id="g-vm" number_resources="2" managed="true" disabled="false">
      <resource id="fs-vm" resource_agent="ocf:heartbeat:Filesystem" role="Started"
                active="true" orphaned="false" blocked="false" managed="true" failed="false"
                failure_ignored="false" nodes_running_on="1">
        <node name="node1" id="1" cached="true"/>
      </resource>
      <resource id="vm-vm" resource_agent="ocf:frozen:VirtualDomain" role="Stopped"
                active="false" orphaned="false" blocked="false" managed="true" failed="false"
                failure_ignored="false" nodes_running_on="0"/>
    </group>
  </resources>
  <failures>
    <failure op_key="vm-vm_monitor_2000" node="node1" exitstatus="not running"
             exitreason="Virtual domain vm is frozen (panicked), memory preserved"
             exitcode="7" call="13" status="complete" interval="2000" task="monitor"/>
  </failures>
  <status code="0" message="OK"/>
</pacemaker-result>
"""


def test_corosync_conf_two_nodes() -> None:
    text = cluster.corosync_conf(["node1", "node2"], ["10.213.0.1", "10.213.0.2"])
    assert "transport: knet" in text
    assert "crypto_cipher: none" in text
    assert "two_node: 1" in text
    assert text.count("node {") == 2
    assert "ring0_addr: 10.213.0.2\n        name: node2\n        nodeid: 2" in text


def test_corosync_conf_three_nodes_has_no_two_node() -> None:
    text = cluster.corosync_conf(["a", "b", "c"], ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert "two_node: 0" in text
    assert text.count("nodeid:") == 3


def test_parse_crm_mon_xml() -> None:
    st = cluster.parse_crm_mon_xml(CRM_MON_XML)
    assert st.online() == ["node1"]
    assert st.started_on("fs-vm") == "node1"
    assert st.started_on("vm-vm") is None
    assert st.started_on("absent") is None
    vm = st.resource("vm-vm")
    assert vm is not None and vm.agent == "ocf:frozen:VirtualDomain" and not vm.active
    assert st.failures[0]["exitcode"] == "7"


def test_group_is_ordered_filesystem_first() -> None:
    svc = failover.Service(
        "vm",
        *(Path(p) for p in ("/s/fs.img", "/s/mnt", "/s/vm.xml")),
        marker="ab",
        console=Path("/run/frozen/vm.sock"),
        console_log=Path("/run/frozen/vm.log"),
    )
    el = ET.fromstring(failover.service_group(svc, "frozen", meta={"migration-threshold": "1"}))
    assert el.tag == "group" and el.get("id") == "g-vm"
    prims = el.findall("primitive")
    assert [p.get("id") for p in prims] == ["fs-vm", "vm-vm"]
    assert [(p.get("class"), p.get("provider"), p.get("type")) for p in prims] == [
        ("ocf", "heartbeat", "Filesystem"),
        ("ocf", "frozen", "VirtualDomain"),
    ]
    fs_params = {n.get("name"): n.get("value") for n in prims[0].iter("nvpair")}
    assert fs_params["options"] == "loop"
    assert fs_params["force_unmount"] == "false"
    meta = el.find("meta_attributes/nvpair")
    assert meta is not None and meta.get("name") == "migration-threshold"
    # every id in a CIB must be unique
    ids = [e.get("id") for e in el.iter() if e.get("id")]
    assert len(ids) == len(set(ids))


def test_location_snippet() -> None:
    el = ET.fromstring(cluster.location("loc", "g", "node1", "100"))
    assert el.attrib == {"id": "loc", "rsc": "g", "node": "node1", "score": "100"}


def test_table() -> None:
    row = failover.FailoverResult(
        trigger="panic",
        agent="frozen",
        on_crash="freeze",
        monitor_rc=7,
        failed_node_state="frozen (panicked)",
        memory_kept=True,
        same_qemu=True,
        fs_released=True,
        recovered_on="node2",
        disk_opened_on_node2=True,
        node2_records=5,
        failover_s=2.7,
        crm_mon_before="",
        crm_mon_after="",
    )
    lines = failover.table([row]).splitlines()
    assert lines[0].split()[:3] == ["trigger", "agent", "action"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == [
        "panic",
        "frozen",
        "freeze",
        "7",
        "frozen",
        "(panicked)",
        "yes",
        "yes",
        "yes",
        "yes",
        "2.7",
    ]
    assert "crm_mon_before" not in row.row()


def test_cluster_supported_names_a_reason_or_none() -> None:
    why = cluster.cluster_supported()
    assert why is None or (isinstance(why, str) and why)


def _row(**kw: object) -> failover.FailoverResult:
    base: dict[str, object] = {
        "trigger": "ioerror",
        "agent": "frozen",
        "on_crash": "disk:freeze",
        "monitor_rc": 7,
        "failed_node_state": "frozen (I/O error)",
        "memory_kept": True,
        "same_qemu": True,
        "fs_released": True,
        "recovered_on": "node2",
        "disk_opened_on_node2": True,
        "node2_records": 3,
        "failover_s": 4.25,
        "crm_mon_before": "",
        "crm_mon_after": "",
    }
    base.update(kw)
    return failover.FailoverResult(**base)  # type: ignore[arg-type]


def test_nbd_disk_xml_keeps_the_policy_and_sets_the_geometry() -> None:
    xml = (
        "<domain><devices><disk type='file' device='disk'>"
        "<driver name='qemu' type='raw' error_policy='freeze' rerror_policy='freeze'/>"
        "<source file='/m/disk.raw'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    disk = ET.fromstring(failover.nbd_disk_xml(xml, Path("/run/frozen/d.nbd"))).find(
        "./devices/disk"
    )
    assert disk is not None and disk.get("type") == "network"
    drv, src, geo = disk.find("driver"), disk.find("source"), disk.find("geometry")
    assert drv is not None and drv.get("error_policy") == "freeze"
    assert src is not None and src.get("protocol") == "nbd" and src.get("name") == "disk"
    host = src.find("host")
    assert host is not None and host.get("socket") == "/run/frozen/d.nbd"
    assert geo is not None and (geo.get("cyls"), geo.get("heads"), geo.get("secs")) == (
        "2",
        "16",
        "63",
    )


def test_nbd_script_arms_on_a_read_and_fails_writes() -> None:
    text = failover.nbd_script(Path("/q"), Path("/m/disk.raw"), Path("/run/frozen/d.nbd"))
    assert text.startswith("#!/bin/sh\n")
    assert "exec '/q/bin/qemu-storage-daemon'" in text
    assert '"set-state":[{"event":"read_aio","state":1,"new_state":2}]' in text
    assert '"errno":5' in text and '"iotype":"write"' in text
    assert "addr.path=/run/frozen/d.nbd" in text and "writable=on" in text


def test_verification_table_and_verdict() -> None:
    rows = (
        _row(),
        _row(
            agent="stock",
            on_crash="disk:stop",
            memory_kept=True,
            recovered_on="node1",
            disk_opened_on_node2=False,
            node2_records=0,
            failover_s=None,
        ),
    )
    v = failover.ClusterVerification(rows, Path("/logs"))
    lines = failover.verification_table(v).splitlines()
    assert lines[0].split() == [
        "trigger",
        "agent",
        "action",
        "memory",
        "kept",
        "node2",
        "serving",
        "failover",
        "s",
    ]
    assert lines[2].split() == ["ioerror", "frozen", "freeze", "yes", "yes", "4.2"]
    assert lines[3].split() == ["ioerror", "stock", "stop", "yes", "no", "-"]
    assert v.ok
    assert not failover.ClusterVerification((_row(memory_kept=False),), Path("/l")).ok
    assert not failover.ClusterVerification((), Path("/l")).ok
