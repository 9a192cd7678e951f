"""Verify the KohakuRiver overlay on the lab by real traffic, not by reading config back.

Runs after converge and again after the side effect broke things and converge repaired
them, so every assertion here also proves the repair.
"""
from __future__ import annotations

import json
import pathlib
import sys

import pytest

# The verifiers' shared helpers live in molecule/shared (see labtest.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
pytest.register_assert_rewrite("labtest")
from labtest import (
    HttpContainer,
    assert_check_mode_reports_no_change,
    assert_no_drift,
    by_name,
    draw_topology,
    inventory_hostvars,
    node,
    node_fixture,
    topology_edges,
    topology_node,
)

OUTSIDE = "198.51.100.10"

hub = node_fixture("hub")
runner1 = node_fixture("runner1")
runner2 = node_fixture("runner2")


def link(host, name: str) -> dict:
    out = host.check_output(f"ip -j -d addr show dev {name}")
    return json.loads(out)[0]


def start_workload(host, network: str = "kohakuriver-overlay") -> HttpContainer:
    """A busybox container on a runner's overlay network; the caller removes it."""
    return HttpContainer(host, network, "netloom-ok")


@pytest.fixture(scope="module")
def workloads(runner1, runner2):
    first, second = start_workload(runner1), start_workload(runner2)
    yield first, second
    first.remove()
    second.remove()


def test_hub_has_one_vxlan_link_per_runner(hub):
    for runner_id, remote in ((1, "192.0.2.11"), (2, "192.0.2.12")):
        data = link(hub, f"vxkr{runner_id}")
        info = data["linkinfo"]["info_data"]
        assert info["id"] == 100 + runner_id
        assert info["remote"] == remote
        assert info["local"] == "192.0.2.10"
        assert info["port"] == 4789
        assert data["mtu"] == 1450
        addrs = {(a["local"], a["prefixlen"]) for a in data["addr_info"] if a["family"] == "inet"}
        assert addrs == {(f"10.{runner_id}.0.254", 16)}
    anchor = link(hub, "kohaku-host")
    assert ("10.0.0.1", 8) in {(a["local"], a["prefixlen"]) for a in anchor["addr_info"]}
    assert hub.check_output("cat /proc/sys/net/ipv4/ip_forward") == "1"


@pytest.mark.parametrize("runner_name,runner_id", [("runner1", 1), ("runner2", 2)])
def test_runner_bridge_and_networks(runner_name, runner_id):
    runner = node(runner_name)
    bridge = link(runner, "kohaku-overlay")
    assert {(a["local"], a["prefixlen"]) for a in bridge["addr_info"] if a["family"] == "inet"} == {
        (f"10.{runner_id}.0.1", 16)}
    vxlan = link(runner, "vxlan0")
    assert vxlan["master"] == "kohaku-overlay"
    assert vxlan["linkinfo"]["info_data"]["remote"] == "192.0.2.10"
    assert vxlan["linkinfo"]["info_data"]["id"] == 100 + runner_id
    route = runner.check_output("ip route show 10.0.0.0/8")
    assert f"via 10.{runner_id}.0.254" in route
    overlay = json.loads(runner.check_output("docker network inspect kohakuriver-overlay"))[0]
    config = overlay["IPAM"]["Config"][0]
    assert config["Subnet"] == f"10.{runner_id}.0.0/16"
    assert config["Gateway"] == f"10.{runner_id}.0.1"
    assert f"10.{runner_id}.0.254" in config.get("AuxiliaryAddresses", {}).values()
    assert overlay["Options"]["com.docker.network.bridge.name"] == "kohaku-overlay"
    default = json.loads(runner.check_output("docker network inspect kohakuriver-net"))[0]
    assert default["IPAM"]["Config"][0]["Subnet"] == "172.30.0.0/16"
    assert default["IPAM"]["Config"][0]["Gateway"] == "172.30.0.1"


def test_container_on_runner1_reaches_container_on_runner2(workloads):
    first, second = workloads
    assert first.ip.startswith("10.1.") and second.ip.startswith("10.2.")
    assert first.http_get(second.ip, "/index.html") == "netloom-ok"
    assert second.http_get(first.ip, "/index.html") == "netloom-ok"


def test_container_reaches_the_hub_anchor(workloads):
    first, second = workloads
    for workload in (first, second):
        result = workload.run("ping -c 2 -W 2 10.0.0.1")
        assert result.rc == 0, result.stdout + result.stderr


def test_container_reaches_outside_through_runner_nat(workloads):
    first, second = workloads
    for workload, underlay in ((first, "192.0.2.11"), (second, "192.0.2.12")):
        assert workload.http_get(OUTSIDE) == underlay


def test_default_network_is_isolated_per_runner(runner1):
    workload = start_workload(runner1, network="kohakuriver-net")
    try:
        assert workload.ip.startswith("172.30.")
        assert workload.run("ping -c 1 -W 2 172.30.0.1").rc == 0
    finally:
        workload.remove()


def test_check_mode_after_converge_reports_no_change():
    assert_check_mode_reports_no_change({"hub", "runner1", "runner2"})


def test_picture_shows_the_hub_and_spoke_overlay_that_was_built():
    """The picture play's JSON, drawn from live state, is the overlay this scenario built: one
    VXLAN link per runner paired from both kernels (VNI 100 + id, each side's remote the other's
    underlay address), the runners' bridges and Docker networks, and no drift."""
    hostvars = inventory_hostvars()
    model = draw_topology()
    assert_no_drift(model)
    hub_ip = hostvars["hub"]["netloom_underlay_ip"]
    hub_node = topology_node(model, "hub")
    assert hub_node["underlay_ip"] == hub_ip
    assert "10.0.0.1/8" in by_name(hub_node["bridges"])["kohaku-host"]["addresses"]
    links = topology_edges(model, "vxlan")
    assert set(links) == {frozenset(("hub", "runner1")), frozenset(("hub", "runner2"))}
    hub_links = by_name(hub_node["vxlan"])
    for runner_name in ("runner1", "runner2"):
        runner_id = int(hostvars[runner_name]["overlay_runner_id"])
        runner_ip = hostvars[runner_name]["netloom_underlay_ip"]
        edge = links[frozenset(("hub", runner_name))]
        assert edge["status"] == "ok" and edge["declared"] and edge["vni"] == 100 + runner_id
        assert edge["sides"] == {
            "hub": {"device": f"vxkr{runner_id}", "local": hub_ip, "remote": runner_ip, "up": True,
                    "mtu": 1450},
            runner_name: {"device": "vxlan0", "local": runner_ip, "remote": hub_ip, "up": True, "mtu": 1450}}
        assert hub_links[f"vxkr{runner_id}"]["addresses"] == [f"10.{runner_id}.0.254/16"]
        runner = topology_node(model, runner_name)
        assert runner["underlay_ip"] == runner_ip
        vxlan0 = by_name(runner["vxlan"])["vxlan0"]
        assert (vxlan0["vni"], vxlan0["remote"], vxlan0["master"], vxlan0["mesh"]) == (
            100 + runner_id, hub_ip, "kohaku-overlay", False)
        bridge = by_name(runner["bridges"])["kohaku-overlay"]
        assert bridge["addresses"] == [f"10.{runner_id}.0.1/16"] and "vxlan0" in bridge["ports"]
        networks = by_name(runner["docker_networks"])
        overlay = networks["kohakuriver-overlay"]
        assert (overlay["bridge"], overlay["subnet"], overlay["gateway"]) == (
            "kohaku-overlay", f"10.{runner_id}.0.0/16", f"10.{runner_id}.0.1")
        assert (networks["kohakuriver-net"]["subnet"], networks["kohakuriver-net"]["gateway"]) == (
            "172.30.0.0/16", "172.30.0.1")
        routes = {route["dst"]: route for route in runner["routes"]}
        assert routes["10.0.0.0/8"]["gateway"] == f"10.{runner_id}.0.254"
    assert not topology_node(model, "outside")["vxlan"]


def test_underlay_neighbour_routing_the_overlay_cannot_reach_unpublished_ports(workloads):
    """A node on the underlay that routes runner 1's subnet via runner 1 gets nothing through:
    the overlay's FORWARD accepts only traffic on overlay interfaces."""
    first, _ = workloads
    outside = node("outside")
    outside.check_output("ip route replace 10.1.0.0/16 via 192.0.2.11")
    try:
        probe = outside.run(f"nc -z -w 3 {first.ip} 8080")
        assert probe.rc != 0, f"outside reached {first.ip}:8080 through runner1: {probe.stdout}{probe.stderr}"
    finally:
        outside.run("ip route del 10.1.0.0/16 via 192.0.2.11")
