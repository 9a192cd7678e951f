"""Verify direct mode (issue 11) on the lab by real traffic: runner1 and runner2 are meshed,
runner3 is left in hub mode.

Runs after converge, after the reboot of the hub and runner1 (netloom-restore alone), and
after the drift side effect was repaired by converge, so every assertion also proves those.
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

HUB = "100.127.20.10"
UNDERLAY = {1: "100.127.20.11", 2: "100.127.20.12", 3: "100.127.20.13"}
MESH = "kohaku-mesh"
MAC = {1: "02:6e:00:00:00:01", 2: "02:6e:00:00:00:02"}
EXCHANGES = 30  # TCP connections per measured path; each is at least 5 packets (both ways together)

hub = node_fixture("hub")
runner1 = node_fixture("runner1")
runner2 = node_fixture("runner2")
runner3 = node_fixture("runner3")


@pytest.fixture(scope="module")
def workloads(runner1, runner2, runner3):
    """A busybox HTTP container on each runner's overlay network."""
    started = {number: HttpContainer(host, "kohakuriver-overlay", f"runner{number}-ok")
               for number, host in ((1, runner1), (2, runner2), (3, runner3))}
    yield started
    for workload in started.values():
        workload.remove()


def hub_packets(hub, *runner_ids: int) -> int:
    """Packets received plus sent on the hub's links to these runners."""
    total = 0
    for runner_id in runner_ids:
        stats = json.loads(hub.check_output(f"ip -j -s link show vxkr{runner_id}"))[0]["stats64"]
        total += stats["rx"]["packets"] + stats["tx"]["packets"]
    return total


def exchange(source: HttpContainer, address: str) -> None:
    """EXCHANGES TCP connections from `source` to `address`:8080, each must succeed."""
    result = source.run(f"sh -c 'for i in $(seq {EXCHANGES}); do "
                        f"echo | nc -w 3 {address} 8080 > /dev/null || exit 1; done'")
    assert result.rc == 0, f"{source.name} -> {address}: {result.stdout}{result.stderr}"


def mesh_entries(host) -> dict:
    routes = json.loads(host.check_output("ip -j -N -4 route show dev kohaku-mesh"))
    neighbours = json.loads(host.check_output("ip -j -4 neigh show dev kohaku-mesh"))
    fdb = json.loads(host.check_output("bridge -j fdb show dev kohaku-mesh"))
    return {"routes": sorted((route["dst"], route.get("gateway"), route.get("prefsrc"), route["protocol"])
                             for route in routes),
            "neighbours": sorted((entry["dst"], entry.get("lladdr"), tuple(entry["state"]))
                                 for entry in neighbours),
            "fdb": sorted((entry["mac"], entry.get("dst"), entry.get("state")) for entry in fdb)}


@pytest.mark.parametrize(("own", "peer"), [(1, 2), (2, 1)])
def test_direct_runners_have_exactly_one_mesh_entry_set_per_peer(own, peer):
    host = node(f"runner{own}")
    link = json.loads(host.check_output(f"ip -j -d link show {MESH}"))[0]
    info = link["linkinfo"]["info_data"]
    tunnel = (info["id"], info.get("local"), info.get("remote"), info["learning"])
    assert tunnel == (1, UNDERLAY[own], None, False)
    assert link["address"] == MAC[own] and link["mtu"] == 1450
    assert mesh_entries(host) == {
        "routes": [(f"10.{peer}.0.0/16", f"10.{peer}.0.1", f"10.{own}.0.1", "250")],
        "neighbours": [(f"10.{peer}.0.1", MAC[peer], ("PERMANENT",))],
        "fdb": [(MAC[peer], UNDERLAY[peer], "permanent")]}
    assert host.check_output("iptables -S NETLOOM-OVLRUN-IN").splitlines() == [
        "-N NETLOOM-OVLRUN-IN",
        f"-A NETLOOM-OVLRUN-IN -s {HUB}/32 -p udp -m udp --dport 4789 -j RETURN",
        f"-A NETLOOM-OVLRUN-IN -s {UNDERLAY[peer]}/32 -p udp -m udp --dport 4789"
        " -j RETURN",
        "-A NETLOOM-OVLRUN-IN -p udp -m udp --dport 4789 -j DROP"]
    # The hub link stays for the hub anchor and the hub-mode runners.
    assert f"via 10.{own}.0.254 dev kohaku-overlay" in host.check_output("ip route show 10.0.0.0/8")


def test_the_hub_mode_runner_has_no_mesh(runner3):
    assert MESH not in runner3.check_output("ip -o link show")
    assert "NETLOOM-OVLRUN-IN" not in runner3.check_output("iptables -S")


def test_runner1_to_runner2_goes_direct_and_not_through_the_hub(hub, runner1, workloads):
    first, second = workloads[1], workloads[2]
    assert first.ip.startswith("10.1.") and second.ip.startswith("10.2.")
    assert f"dev {MESH}" in runner1.check_output(f"ip route get {second.ip}")
    before = hub_packets(hub, 1, 2)
    exchange(first, second.ip)
    exchange(second, first.ip)
    moved = hub_packets(hub, 1, 2) - before
    assert first.http_get(second.ip, "/index.html") == "runner2-ok"
    assert second.http_get(first.ip, "/index.html") == "runner1-ok"
    # 2 x EXCHANGES connections of at least 5 packets each crossed; the hub saw (almost) none.
    assert moved < EXCHANGES, f"the hub's vxkr1/vxkr2 counted {moved} packets during direct traffic"


def test_the_hub_mode_runner_reaches_both_direct_runners_through_the_hub(hub, runner3, workloads):
    third = workloads[3]
    for number in (1, 2):
        target = workloads[number]
        assert "dev kohaku-overlay" in runner3.check_output(f"ip route get {target.ip}")
        before = hub_packets(hub, 3)
        exchange(third, target.ip)
        # The control: the same exchange through the hub is counted there, packet by packet.
        assert hub_packets(hub, 3) - before >= 5 * EXCHANGES
        assert third.http_get(target.ip, "/index.html") == f"runner{number}-ok"
        assert target.http_get(third.ip, "/index.html") == "runner3-ok"


def test_containers_reach_the_hub_anchor(workloads):
    for workload in workloads.values():
        result = workload.run("ping -c 2 -W 2 10.0.0.1")
        assert result.rc == 0, result.stdout + result.stderr


def test_check_mode_after_converge_reports_no_change():
    assert_check_mode_reports_no_change({"hub", "runner1", "runner2", "runner3"})


def test_picture_shows_the_mesh_between_direct_runners_and_the_hub_links():
    """The picture play's JSON, drawn from live state, is what this scenario built: the hub's VXLAN
    link to every runner (VNI 100 + id), one mesh link runner1 <-> runner2 paired from both mesh
    devices' FDB entries, runner3 without a mesh device, the direct routes, and no drift."""
    hostvars = inventory_hostvars()
    model = draw_topology()
    assert_no_drift(model)
    hub_ip = hostvars["hub"]["netloom_underlay_ip"]
    underlay = {number: hostvars[f"runner{number}"]["netloom_underlay_ip"] for number in UNDERLAY}
    assert underlay == UNDERLAY and hub_ip == HUB
    hub_links = topology_edges(model, "vxlan")
    assert set(hub_links) == {frozenset(("hub", f"runner{number}")) for number in UNDERLAY}
    for number in UNDERLAY:
        edge = hub_links[frozenset(("hub", f"runner{number}"))]
        assert edge["status"] == "ok" and edge["vni"] == 100 + number
        assert edge["sides"]["hub"]["remote"] == underlay[number]
        assert edge["sides"][f"runner{number}"]["remote"] == hub_ip
    mesh = topology_edges(model, "mesh")
    assert set(mesh) == {frozenset(("runner1", "runner2"))}
    edge = mesh[frozenset(("runner1", "runner2"))]
    assert edge["status"] == "ok" and edge["declared"] and edge["vni"] == 1
    for own, peer in ((1, 2), (2, 1)):
        side = edge["sides"][f"runner{own}"]
        assert side == {"device": MESH, "local": underlay[own], "remote": underlay[peer], "up": True}
        runner = topology_node(model, f"runner{own}")
        device = by_name(runner["vxlan"])[MESH]
        assert (device["mesh"], device["remote"], device["local"], device["fdb"], device["mtu"]) == (
            True, None, underlay[own], [underlay[peer]], 1450)
        direct = [route for route in runner["routes"] if route["dev"] == MESH]
        assert [(route["dst"], route["gateway"], route["netloom"]) for route in direct] == [
            (f"10.{peer}.0.0/16", f"10.{peer}.0.1", True)]
    runner3 = topology_node(model, "runner3")
    assert [link["name"] for link in runner3["vxlan"]] == ["vxlan0"]
    assert not [route for route in runner3["routes"] if route["netloom"]]
