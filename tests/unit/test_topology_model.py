"""The topology model and its DOT, from recorded netloom_facts of a hub, two runners, edge and pod nodes.

The fixture (tests/unit/fixtures/topology/) records the shape netloom_facts returns; the module
tests check that shape against real kernels (tests/module/test_netloom_facts.py).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugin_utils"))
from netloom_topology import build_model, inventory_view, quote, render_dot

FIXTURES = ROOT / "tests" / "unit" / "fixtures" / "topology"


def recorded() -> tuple[dict[str, Any], dict[str, Any]]:
    facts = json.loads((FIXTURES / "facts.json").read_text())
    inventory = json.loads((FIXTURES / "inventory.json").read_text())
    return facts, inventory


def edges_of(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {edge["id"]: edge for edge in model["edges"]}


def drift_of(model: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {(item["status"], item["kind"], item["node"], item["name"]) for item in model["drift"]}


def node_of(model: dict[str, Any], name: str) -> dict[str, Any]:
    return next(node for node in model["nodes"] if node["name"] == name)


def test_hub_runner_link_is_paired_from_both_kernels() -> None:
    model = build_model(*recorded())
    edge = edges_of(model)["vxlan:hub|runner1:101"]
    assert edge["status"] == "ok" and edge["declared"] is True and edge["vni"] == 101
    assert edge["sides"] == {
        "hub": {"device": "vxkr1", "local": "192.0.2.10", "remote": "192.0.2.11", "up": True, "mtu": 1450},
        "runner1": {"device": "vxlan0", "local": "192.0.2.11", "remote": "192.0.2.10", "up": True,
                    "mtu": 1450}}


def test_declared_runner_without_its_vxlan_link_is_missing() -> None:
    model = build_model(*recorded())
    edge = edges_of(model)["vxlan:hub|runner2:102"]
    assert edge["status"] == "missing" and edge["sides"] == {} and edge["vni"] == 102
    assert edge["detail"] == "declared by the inventory; neither hub nor runner2 has it"
    assert ("missing", "vxlan", "hub", "vxlan:hub|runner2:102") in drift_of(model)
    assert ("missing", "bridge", "runner2", "kohaku-overlay") in drift_of(model)
    assert ("missing", "docker_network", "runner2", "kohakuriver-overlay") in drift_of(model)
    runner2 = node_of(model, "runner2")
    assert {"name": "kohaku-overlay", "kind": "bridge", "status": "missing", "addresses": [], "ports": [],
            "up": False} in runner2["bridges"]


def test_undeclared_link_and_one_sided_mesh_are_drift() -> None:
    model = build_model(*recorded())
    edges = edges_of(model)
    extra = edges["vxlan:address 192.0.2.13|hub:103"]
    assert extra["status"] == "extra" and extra["sides"]["hub"]["device"] == "vxkr3"
    mesh = edges["mesh:runner1|runner2"]
    assert mesh["status"] == "half" and set(mesh["sides"]) == {"runner1"} and mesh["vni"] == 4242
    assert model["summary"] == {"nodes": 7, "nodes_without_facts": [], "edges": 6, "missing": 6, "extra": 1,
                                "drift": True}


def test_wireguard_peers_are_paired_by_public_key() -> None:
    model = build_model(*recorded())
    edges = edges_of(model)
    for compute, allowed in (("edge-compute1", ["10.88.1.0/24", "10.99.0.2/32"]),
                             ("edge-compute2", ["10.88.2.0/24", "10.99.0.3/32"])):
        edge = edges[f"wireguard:{compute}|edge-control"]
        assert edge["status"] == "ok" and edge["declared"] is True
        assert edge["sides"]["edge-control"]["allowed_ips"] == allowed
        assert edge["sides"][compute]["endpoint"] == "192.0.2.20:51820"


def test_workloads_pods_and_dnat_come_from_the_facts() -> None:
    model = build_model(*recorded())
    runner1 = node_of(model, "runner1")
    assert [(c["kind"], c["name"], c["networks"]["kohakuriver-overlay"]["ipv4_address"])
            for c in runner1["containers"]] == [("task", "kohakuriver-task-7", "10.1.0.5"),
                                                ("vps", "kohakuriver-vps-3", "10.1.0.6")]
    assert runner1["taps"] == [{"name": "nlvm-vm1", "bridge": "kohaku-overlay", "vm": "vm1", "status": "ok"},
                               {"name": "nlvm-vm2", "bridge": None, "vm": "vm2", "status": "missing"}]
    assert ("missing", "link", "runner1", "nlvm-vm2") in drift_of(model)
    assert not any(item[3] == "nlvm-vm3" for item in drift_of(model))  # declared stopped: no TAP wanted
    pods = node_of(model, "podhost")["containers"]
    assert [(pod["name"], pod["status"], [port.get("public") for port in pod["ports"]]) for pod in pods] == [
        ("pinacle-pod-a", "ok", [30000]), ("pinacle-pod-b", "ok", [30001]), ("pinacle-pod-c", "missing", [])]
    compute = node_of(model, "edge-compute1")
    assert [(rule["dport"], rule["to_destination"]) for rule in compute["dnat"]] == [
        ("9000", "127.0.0.1:9000"), ("8000", "127.0.0.1:8001"), ("9428", "127.0.0.1:9428")]
    assert node_of(model, "hub")["unavailable"] == {
        "docker": "RuntimeError: no Docker engine: /var/run/docker.sock does not exist"}


def test_no_drift_when_the_live_state_matches_the_inventory() -> None:
    facts, inventory = recorded()
    hub_links = facts["hub"]["netloom_facts"]["links"]["links"]
    facts["hub"]["netloom_facts"]["links"]["links"] = [link for link in hub_links if link["name"] != "vxkr3"]
    del inventory["runner2"]
    del facts["runner2"]
    del inventory["runner1"]["vars"]["netloom_overlay_mode"]
    inventory["runner1"]["vars"]["netloom_vms"] = [{"name": "vm1"}]
    runner_links = facts["runner1"]["netloom_facts"]["links"]["links"]
    facts["runner1"]["netloom_facts"]["links"]["links"] = [link for link in runner_links
                                                           if link["name"] != "vxmesh"]
    inventory["podhost"]["vars"]["netloom_topology_expect"] = [{"kind": "container", "name": "pinacle-pod-a"}]
    model = build_model(facts, inventory)
    assert model["drift"] == []
    assert {edge["status"] for edge in model["edges"]} == {"ok"}
    assert model["summary"]["drift"] is False


def test_an_unreachable_node_is_missing_and_its_links_unverified() -> None:
    facts, inventory = recorded()
    facts["runner1"] = {"unreachable": True, "msg": "Failed to connect to the host via ssh"}
    model = build_model(facts, inventory)
    runner1 = node_of(model, "runner1")
    assert runner1["status"] == "missing"
    assert runner1["reason"] == "unreachable: Failed to connect to the host via ssh"
    edge = edges_of(model)["vxlan:hub|runner1:101"]
    assert edge["status"] == "unverified" and set(edge["sides"]) == {"hub"}
    assert ("missing", "node", "runner1", "runner1") in drift_of(model)
    facts["runner2"] = {"unreachable": True, "msg": "timed out"}
    edge = edges_of(build_model(facts, inventory))["vxlan:hub|runner2:102"]
    assert edge["status"] == "missing"  # the hub was read and does not have it
    assert edge["detail"] == "declared by the inventory; hub does not have it, runner2 could not be read"


def test_an_unreadable_section_leaves_declared_items_unverified_not_missing() -> None:
    facts, inventory = recorded()
    facts["runner2"]["netloom_facts"]["docker"] = {"available": False, "reason": "DockerException: down"}
    model = build_model(facts, inventory)
    drift = drift_of(model)
    assert ("unverified", "docker_network", "runner2", "kohakuriver-overlay") in drift
    assert ("missing", "docker_network", "runner2", "kohakuriver-overlay") not in drift


def test_a_declared_runner_id_checks_the_vni() -> None:
    facts, inventory = recorded()
    inventory["runner1"]["vars"]["overlay_runner_id"] = 5
    model = build_model(facts, inventory)
    edge = edges_of(model)["vxlan:hub|runner1:101"]
    assert edge["status"] == "extra" and edge["detail"] == "VNI 101, declared 105"


def test_an_unknown_expectation_kind_is_refused_naming_it() -> None:
    facts, inventory = recorded()
    inventory["podhost"]["vars"]["netloom_topology_expect"] = [{"kind": "pods", "name": "a"}]
    with pytest.raises(ValueError, match="podhost: netloom_topology_expect kind 'pods'"):
        build_model(facts, inventory)


def test_inventory_view_reads_groups_and_the_model_vars_only() -> None:
    groups = {"all": ["hub", "r1"], "ungrouped": [], "overlay_hub": ["hub"], "overlay_runners": ["r1"]}
    hostvars = {"hub": {"netloom_underlay_ip": "192.0.2.10", "ansible_host": "10.9.9.9"},
                "r1": {"netloom_underlay_ip": "192.0.2.11", "overlay_runner_id": 1}}
    assert inventory_view(["hub", "r1"], groups, hostvars) == {
        "hub": {"groups": ["overlay_hub"], "vars": {"netloom_underlay_ip": "192.0.2.10"}},
        "r1": {"groups": ["overlay_runners"],
               "vars": {"netloom_underlay_ip": "192.0.2.11", "overlay_runner_id": 1}}}


def test_quote_escapes_what_dot_would_read_as_syntax() -> None:
    assert quote('a "b" \\ c\nd') == '"a \\"b\\" \\\\ c\\nd"'


def test_dot_marks_missing_items_dashed_red() -> None:
    text = render_dot(build_model(*recorded()))
    missing_edge = next(line for line in text.splitlines() if "MISSING: declared by the inventory" in line)
    assert "style=dashed" in missing_edge and "#c00000" in missing_edge
    pod_c = next(line for line in text.splitlines() if "pod pinacle-pod-c" in line)
    assert "style=dashed" in pod_c


@pytest.mark.skipif(shutil.which("dot") is None,
                    reason="needs Graphviz's dot (scripts/bootstrap.sh installs graphviz)")
def test_dot_renders_to_svg_with_graphviz(tmp_path: pathlib.Path) -> None:
    facts, inventory = recorded()
    # Names with DOT syntax in them must not break the graph.
    evil = copy.deepcopy(facts["podhost"])
    evil["netloom_facts"]["docker"]["containers"][0]["name"] = 'pinacle-pod-"x" {y} \\ -- z'
    facts['pod "host"'] = evil
    inventory['pod "host"'] = {"groups": ["pod_hosts"], "vars": {}}
    # A node without facts is drawn as a dashed red cluster.
    facts["runner1"] = {"unreachable": True, "msg": "ssh: connect to host 192.0.2.11: No route to host"}
    dot_file = tmp_path / "topology.dot"
    dot_file.write_text(render_dot(build_model(facts, inventory)))
    proc = subprocess.run(["dot", "-Tsvg", str(dot_file)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "<svg" in proc.stdout and "runner2" in proc.stdout
    assert "pinacle&#45;pod&#45;&quot;x&quot; {y} \\ &#45;&#45; z" in proc.stdout
    assert "MISSING" in proc.stdout and "EXTRA" in proc.stdout and "no facts: unreachable: ssh" in proc.stdout


def test_the_filter_plugin_reads_registered_results_from_hostvars() -> None:
    path = ROOT / "filter_plugins" / "topology.py"
    spec = importlib.util.spec_from_file_location("netloom_topology_filters", path)
    assert spec and spec.loader
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    filters = plugin.FilterModule().filters()
    facts, inventory = recorded()
    groups: dict[str, list[str]] = {"all": sorted(inventory)}
    for host, entry in inventory.items():
        for group in entry["groups"]:
            groups.setdefault(group, []).append(host)
    hostvars = {host: {**entry["vars"], "netloom_topology_facts": facts[host]}
                for host, entry in inventory.items()}
    model = filters["netloom_topology_model"](sorted(inventory), groups, hostvars)
    assert model == build_model(facts, inventory)
    assert filters["netloom_topology_dot"](model) == render_dot(model)
