"""overlay_runner in direct mode (issue 11): three runners in network namespaces on one underlay."""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.kernel_view import addresses, fdb, links, neighbours, routes, vxlan
from tests.support.netns import Netns, replay_boot, run_module, run_module_ok, sh

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

PLAN = "10.0.0.0/8/8/16"
HUB = "192.0.2.1"
UNDERLAY = {1: "192.0.2.11", 2: "192.0.2.12", 3: "192.0.2.13"}
MAC = {1: "02:6e:00:00:00:01", 2: "02:6e:00:00:00:02", 3: "02:6e:00:00:00:03", 9: "02:6e:00:00:00:09"}
MESH = "kohaku-mesh"

runner_run = functools.partial(run_module_ok, "overlay_runner")


def peers(*ids: int) -> list[dict[str, Any]]:
    return [{"id": number, "name": f"runner{number}", "underlay_ip": UNDERLAY[number]} for number in ids]


def args(runner_id: int = 1, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"plan": PLAN, "runner_id": runner_id, "hub_underlay_ip": HUB,
                            "underlay_ip": UNDERLAY[runner_id], "overlay_mode": "direct",
                            "mesh_vni": 42, "mesh_peers": peers(1, 2, 3)}
    base.update(extra)
    return base


@pytest.fixture
def trio() -> Iterator[dict[int, Netns]]:
    """Three runner namespaces on one underlay bridge (in a fourth namespace); no hub is needed
    for runner-to-runner traffic in direct mode."""
    with Netns("meshu") as underlay, Netns("meshr") as r1, Netns("meshr") as r2, Netns("meshr") as r3:
        underlay.sh("ip link add underlay type bridge && ip link set underlay up")
        nodes = {1: r1, 2: r2, 3: r3}
        for number, ns in nodes.items():
            sh(f"ip link add u{number} type veth peer name eth0 netns {ns.name}"
               f" && ip link set u{number} master underlay up", underlay.name)
            ns.sh(f"ip link set eth0 up && ip addr add {UNDERLAY[number]}/24 dev eth0")
        yield nodes


def mesh_view(ns: Netns) -> dict[str, Any]:
    """The mesh device's routes, neighbours and FDB entries exactly as iproute2 lists them."""
    if MESH not in links(ns):
        return {}
    return {
        "routes": sorted((route["dst"], route.get("gateway"), route.get("prefsrc"), route["protocol"],
                          tuple(route.get("flags", []))) for route in routes(ns) if route.get("dev") == MESH),
        "neighbours": sorted((entry["dst"], entry.get("lladdr"), tuple(entry.get("state", [])))
                             for entry in neighbours(ns, MESH) if ":" not in entry["dst"]),
        "fdb": sorted((entry["mac"], entry.get("dst"), entry.get("state"), tuple(entry.get("flags", [])))
                      for entry in fdb(ns, MESH)),
    }


def view(ns: Netns) -> str:
    """All a run may touch, without operational states (a fresh bridge's carrier settles on its own),
    interface indexes and the random MACs of the bridge and vxlan0 (a reboot renews them)."""
    summary = [f"{name} {link['mtu']} {'UP' in link['flags']} {link.get('master')} "
               f"{link.get('address') if name == MESH else ''} "
               f"{vxlan(link) if 'vxlan' in str(link.get('linkinfo')) else ''} "
               f"{addresses(ns, name)}" for name, link in sorted(links(ns).items())]
    return "\n".join([*summary, str(mesh_view(ns)), ns.sh("ip route"), ns.sh("iptables -S"),
                      ns.sh("iptables -t nat -S"), ns.sh("sysctl -n net.ipv4.ip_forward")])


def expected_view(own: int, others: tuple[int, ...]) -> dict[str, Any]:
    return {
        "routes": sorted((f"10.{m}.0.0/16", f"10.{m}.0.1", f"10.{own}.0.1", "250", ("onlink",))
                         for m in others),
        "neighbours": sorted((f"10.{m}.0.1", MAC[m], ("PERMANENT",)) for m in others),
        "fdb": sorted((MAC[m], UNDERLAY[m], "permanent", ("self",)) for m in others),
    }


def test_three_direct_runners_program_exactly_the_mesh_and_carry_traffic(trio: dict[int, Netns]) -> None:
    for number, ns in trio.items():
        result = runner_run(ns, args(number))
        assert result["changed"] and result["overlay_mode"] == "direct"
        others = tuple(m for m in trio if m != number)
        assert mesh_view(ns) == expected_view(number, others)
        link = links(ns)[MESH]
        assert vxlan(link) == {"id": 42, "remote": None, "local": UNDERLAY[number], "port": 4789,
                               "learning": False}
        assert link["address"] == MAC[number] and link["mtu"] == 1450 and "UP" in link["flags"]
        assert "master" not in link
        assert result["mesh"] == {
            "device": MESH, "vni": 42, "mac": MAC[number], "vtep": f"10.{number}.0.1",
            "peers": [{"id": m, "name": f"runner{m}", "underlay_ip": UNDERLAY[m], "subnet": f"10.{m}.0.0/16",
                       "vtep": f"10.{m}.0.1", "mac": MAC[m]} for m in others]}
    # The hub link stays for the hub anchor and hub-mode runners.
    assert [line.split()[:5] for line in trio[1].sh("ip route show 10.0.0.0/8").splitlines()] == [
        ["10.0.0.0/8", "via", "10.1.0.254", "dev", "kohaku-overlay"]]
    # No hub exists here: runner1 reaches runner2's and runner3's gateways over the mesh alone.
    for m in (2, 3):
        assert " 0% packet loss" in trio[1].sh(f"ping -c2 -W2 10.{m}.0.1")
    assert " 0% packet loss" in trio[3].sh("ping -c2 -W2 -I 10.3.0.1 10.2.0.1")
    for number, ns in trio.items():
        converged = view(ns)
        assert not runner_run(ns, args(number))["changed"]
        assert not runner_run(ns, args(number), check_mode=True)["changed"]
        assert view(ns) == converged


def test_check_and_diff_on_a_fresh_node_match_the_real_run(trio: dict[int, Netns]) -> None:
    ns = trio[2]
    untouched = view(ns)
    preview = runner_run(ns, args(2), check_mode=True)
    assert view(ns) == untouched
    assert preview["diff"]["after"][f"link {MESH}"] == {
        "kind": "vxlan", "mtu": 1450, "up": True, "vni": 42, "local": UNDERLAY[2], "remote": None,
        "port": 4789, "learning": False, "address": MAC[2]}
    assert (preview["diff"]["after"]["mesh route 10.1.0.0/16"]
            == f"10.1.0.0/16 via 10.1.0.1 dev {MESH} onlink src 10.2.0.1")
    assert preview["diff"]["after"]["mesh neighbour 10.3.0.1"] == f"10.3.0.1 lladdr {MAC[3]} permanent"
    assert preview["diff"]["after"][f"mesh fdb {MAC[1]}"] == f"{MAC[1]} dst {UNDERLAY[1]} self permanent"
    assert preview["mesh"]["peers"][0]["id"] == 1
    result = runner_run(ns, args(2))
    assert result["changes"] == preview["changes"]
    assert mesh_view(ns) == expected_view(2, (1, 3))


def test_drift_is_repaired_deleted_fdb_changed_neighbour_stale_peer(trio: dict[int, Netns]) -> None:
    ns = trio[1]
    runner_run(ns, args(1))
    mesh_index = links(ns)[MESH]["ifindex"]
    ns.sh(f"bridge fdb del {MAC[2]} dev {MESH} dst {UNDERLAY[2]} self")
    ns.sh(f"ip neigh replace 10.3.0.1 lladdr 02:00:00:00:00:99 dev {MESH} nud permanent")
    ns.sh(f"bridge fdb replace {MAC[3]} dev {MESH} dst 192.0.2.99 self permanent")
    # A runner that is no longer declared: its route, neighbour and FDB entry must go.
    ns.sh(f"ip route add 10.9.0.0/16 via 10.9.0.1 dev {MESH} onlink proto 250"
          f" && ip neigh add 10.9.0.1 lladdr {MAC[9]} dev {MESH} nud permanent"
          f" && bridge fdb add {MAC[9]} dev {MESH} dst 192.0.2.19 self permanent")
    drifted = view(ns)
    preview = runner_run(ns, args(1), check_mode=True)
    assert set(preview["changes"]) == {
        "delete mesh route 10.9.0.0/16", "delete mesh neighbour 10.9.0.1",
        f"delete mesh fdb {MAC[9]} dst 192.0.2.19",
        "update mesh neighbour 10.3.0.1", f"create mesh fdb {MAC[2]}", f"update mesh fdb {MAC[3]}"}
    assert (preview["diff"]["before"]["mesh neighbour 10.3.0.1"]
            == "10.3.0.1 lladdr 02:00:00:00:00:99 permanent")
    assert view(ns) == drifted
    repaired = runner_run(ns, args(1))
    assert repaired["changes"] == preview["changes"]
    assert mesh_view(ns) == expected_view(1, (2, 3))
    assert links(ns)[MESH]["ifindex"] == mesh_index
    assert not runner_run(ns, args(1))["changed"]


def test_a_changed_vtep_mac_is_set_back_with_every_neighbour(trio: dict[int, Netns]) -> None:
    """The kernel flushes a device's neighbours (permanent ones too) when its MAC changes."""
    ns = trio[1]
    runner_run(ns, args(1))
    ns.sh(f"ip link set {MESH} address 02:6e:00:00:00:77")
    preview = runner_run(ns, args(1), check_mode=True)
    assert preview["changes"] == [f"update link {MESH}", "create mesh neighbour 10.2.0.1",
                                  "create mesh neighbour 10.3.0.1"]
    assert preview["diff"]["before"][f"link {MESH}"]["address"] == "02:6e:00:00:00:77"
    assert runner_run(ns, args(1))["changes"] == preview["changes"]
    assert links(ns)[MESH]["address"] == MAC[1]
    assert mesh_view(ns) == expected_view(1, (2, 3))
    assert not runner_run(ns, args(1))["changed"]


def test_a_peer_no_longer_declared_is_removed_and_hub_mode_removes_the_mesh(trio: dict[int, Netns]) -> None:
    ns = trio[1]
    runner_run(ns, args(1))
    shrunk = runner_run(ns, args(1, mesh_peers=peers(1, 2)))
    assert set(shrunk["changes"]) == {"delete mesh route 10.3.0.0/16", "delete mesh neighbour 10.3.0.1",
                                      f"delete mesh fdb {MAC[3]} dst {UNDERLAY[3]}",
                                      "update iptables filter NETLOOM-OVLRUN-IN",
                                      # the boot replay's record follows the new peer set
                                      "update restore entry 20-overlay_runner@main.json"}
    assert mesh_view(ns) == expected_view(1, (2,))
    assert ns.sh("iptables -S NETLOOM-OVLRUN-IN").splitlines() == [
        "-N NETLOOM-OVLRUN-IN",
        f"-A NETLOOM-OVLRUN-IN -s {HUB}/32 -p udp -m udp --dport 4789 -j RETURN",
        f"-A NETLOOM-OVLRUN-IN -s {UNDERLAY[2]}/32 -p udp -m udp --dport 4789 -j RETURN",
        "-A NETLOOM-OVLRUN-IN -p udp -m udp --dport 4789 -j DROP"]
    assert f"-i {MESH} -j ACCEPT" in ns.sh("iptables -S NETLOOM-OVLRUN-FWD").replace("-s 10.0.0.0/8 ", "")

    back = runner_run(ns, args(1, overlay_mode="hub"))
    assert f"delete link {MESH}" in back["changes"] and back["mesh"] is None
    assert MESH not in links(ns)
    assert "NETLOOM-OVLRUN-IN" not in ns.sh("iptables -S")
    assert MESH not in ns.sh("iptables -S NETLOOM-OVLRUN-FWD")
    assert not runner_run(ns, args(1, overlay_mode="hub"))["changed"]


def mesh_rx_packets(ns: Netns) -> int:
    return int(json.loads(ns.sh(f"ip -j -s link show {MESH}"))[0]["stats64"]["rx"]["packets"])


def test_vxlan_from_an_undeclared_underlay_host_is_dropped(trio: dict[int, Netns]) -> None:
    """The leftover of issue 11: runner3 is on the underlay but not a declared peer of runner1."""
    runner_run(trio[1], args(1, mesh_peers=peers(1, 2)))
    runner_run(trio[2], args(2, mesh_peers=peers(1, 2)))
    # runner3 forges runner2's tunnel towards runner1 (same VNI, runner2's MAC as source).
    trio[3].sh(f"ip link add forged address {MAC[2]} type vxlan id 42 local {UNDERLAY[3]} dstport 4789"
               " nolearning"
               f" && ip link set forged up && ip addr add 10.2.0.1/32 dev forged"
               f" && ip route add 10.1.0.0/16 via 10.1.0.1 dev forged onlink"
               f" && ip neigh add 10.1.0.1 lladdr {MAC[1]} dev forged nud permanent"
               f" && bridge fdb add {MAC[1]} dev forged dst {UNDERLAY[1]} self permanent")
    received = mesh_rx_packets(trio[1])
    trio[3].sh("ping -c2 -W1 -I 10.2.0.1 10.1.0.1", check=False)
    drop = trio[1].sh("iptables -S NETLOOM-OVLRUN-IN -v").splitlines()[-1]
    assert drop.endswith("-j DROP") and " -c 0 0 " not in drop
    assert mesh_rx_packets(trio[1]) == received
    assert " 0% packet loss" in trio[2].sh("ping -c2 -W2 10.1.0.1")

    # The VXLAN socket listens on every local address: frames sent to another address of
    # runner1 (not its underlay IP) are dropped as well.
    trio[1].sh("ip addr add 192.0.2.111/24 dev eth0")
    trio[3].sh(f"bridge fdb replace {MAC[1]} dev forged dst 192.0.2.111 self permanent")
    received = mesh_rx_packets(trio[1])
    trio[3].sh("ping -c2 -W1 -I 10.2.0.1 10.1.0.1", check=False)
    assert mesh_rx_packets(trio[1]) == received


@pytest.mark.parametrize(("overrides", "field", "fragment"), [
    ({"mesh_vni": 101}, "mesh_vni", "equals the hub VNI vni_base+1"),
    ({"mesh_vni": 100 + 255}, "mesh_vni", "equals the hub VNI"),
    ({"mesh_vni": 0}, "mesh_vni", "between 1 and 16777215"),
    ({"mesh_peers": [*peers(1, 2), {"id": 3, "underlay_ip": UNDERLAY[2]}]}, "mesh_peers[2].underlay_ip",
     "two runners with the same underlay IP"),
    ({"mesh_peers": [*peers(1, 2), {"id": 3, "underlay_ip": HUB}]}, "mesh_peers[2].underlay_ip",
     "same underlay IP (the hub's"),
    ({"mesh_name": "kohaku-mesh-device"}, "mesh_name", "1..15 characters"),
    ({"mesh_name": "vxlan0"}, "mesh_name", "must differ"),
    ({"mesh_peers": [*peers(1, 2), {"id": 3, "name": "runner3"}]}, "mesh_peers[2].underlay_ip",
     "runner3 is in direct mode without an underlay IP"),
    ({"mesh_peers": [*peers(1, 2), {"id": 3, "underlay_ip": ""}]}, "mesh_peers[2].underlay_ip",
     "without an underlay IP"),
    ({"mesh_peers": [*peers(1, 2), {"underlay_ip": UNDERLAY[3]}]}, "mesh_peers[2].id", "needs its id"),
    ({"mesh_peers": [*peers(1, 2), {"id": 2, "underlay_ip": UNDERLAY[3]}]}, "mesh_peers[2].id",
     "listed twice"),
    ({"mesh_peers": [{"id": 1, "underlay_ip": UNDERLAY[2]}]}, "mesh_peers[0].underlay_ip",
     "listed for this runner"),
    ({"mesh_peers": None}, "mesh_peers", "required with overlay_mode=direct"),
    ({"underlay_ip": None}, "underlay_ip", "required with state=present"),
])
def test_bad_input_fails_before_any_change(trio: dict[int, Netns], overrides: dict[str, Any], field: str,
                                           fragment: str) -> None:
    ns = trio[1]
    runner_run(ns, args(1, mesh_peers=peers(1, 2)))
    before = view(ns)
    result = run_module("overlay_runner", args(1, **overrides), netns=ns.name)
    assert result.get("failed"), result
    assert result["field"] == field
    assert fragment in result["msg"]
    assert view(ns) == before


def test_the_boot_replay_restores_a_wiped_mesh(trio: dict[int, Netns]) -> None:
    """Reboot survival: the recorded run, replayed by netloom-restore's early phase, alone."""
    ns = trio[1]
    runner_run(ns, args(1))
    converged = view(ns)
    # What a reboot leaves: no netloom link, chain or sysctl (this namespace has nothing else).
    ns.sh(f"ip link del {MESH} && ip link del vxlan0 && ip link del kohaku-overlay"
          " && iptables -F && iptables -X && iptables -t nat -F && iptables -t nat -X"
          " && sysctl -qw net.ipv4.ip_forward=0")
    replayed = replay_boot(ns)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert mesh_view(ns) == expected_view(1, (2, 3))
    assert view(ns) == converged
    assert not runner_run(ns, args(1))["changed"]


def test_absent_removes_the_mesh_and_its_chain(trio: dict[int, Netns]) -> None:
    ns = trio[1]
    runner_run(ns, args(1))
    removed = runner_run(ns, {"plan": PLAN, "state": "absent"})
    assert f"delete link {MESH}" in removed["changes"]
    assert MESH not in links(ns) and "NETLOOM-OVLRUN" not in ns.sh("iptables -S")
