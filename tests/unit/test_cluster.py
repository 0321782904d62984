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
