"""The kernel seam (module_utils/netloom/netlink.py) against iproute2's view of the same objects.

Each test writes through the seam and reads the result back with `ip -j`/`bridge -j`, and reads
objects made with `ip`/`bridge` through the seam, inside a throwaway network namespace with the
modules' interpreter (so Debian's pyroute2 0.7.2 with NETLOOM_MODULE_PYTHON).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests.support.kernel_view import addresses, all_addresses, fdb, links, neighbours, routes, vxlan
from tests.support.netns import Netns, node_python, run_module, run_module_utils

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

SEAM = """
import ipaddress, json, sys
from ansible.module_utils.netloom.common import CommandError
from ansible.module_utils.netloom.netlink import Netlink, Vxlan
ip, net, iface = ipaddress.ip_address, ipaddress.ip_network, ipaddress.ip_interface
"""


@pytest.fixture
def ns() -> Iterator[Netns]:
    """A netns with an underlay veth u0 (192.0.2.1/24)."""
    with Netns("nlseam") as namespace:
        namespace.sh("ip link add u0 type veth peer name u1 && ip link set u0 up && ip link set u1 up"
                     " && ip addr add 192.0.2.1/24 dev u0")
        yield namespace


def test_links_and_addresses_written_and_read(ns: Netns) -> None:
    got = run_module_utils(ns, SEAM + """
with Netlink() as nl:
    nl.add_bridge("br7", 1400)
    nl.add_vxlan("vx7", Vxlan(77, ip("192.0.2.1"), ip("192.0.2.9"), 8472, False), 1400, master="br7")
    nl.add_link("br8", "bridge")
    nl.set_link("br8", mtu=1300, up=False)
    for text in ("10.7.0.1/16", "10.7.0.9/16", "fd00:7::1/64"):
        nl.add_address("br7", iface(text))
    nl.delete_address("br7", iface("10.7.0.9/16"))
    nl.delete_address("br7", iface("10.7.0.9/16"))  # already gone: fine
    snap = nl.dump()
    print(json.dumps({
        "links": {name: [l.index, l.kind, l.mtu, l.up, l.master, l.vxlan.describe() if l.vxlan else None]
                  for name, l in snap.links.items()},
        "v4": sorted(map(str, snap.addresses_of("br7"))),
        "all": sorted(map(str, nl.addresses("br7"))),
        "holder": snap.link_holding(ip("192.0.2.1")).name,
        "ports": [l.name for l in snap.ports_of("br7")],
    }))
    nl.delete_link("br8")
""")
    live = links(ns)
    assert "br8" not in live
    index_of = {name: link["ifindex"] for name, link in live.items()}
    assert set(got["links"]) == set(live) | {"br8"}
    for name, link in live.items():
        assert got["links"][name][:5] == [link["ifindex"], link.get("linkinfo", {}).get("info_kind", ""),
                                          link["mtu"], "UP" in link["flags"],
                                          index_of.get(link.get("master"))]
    assert got["links"]["br8"][2:4] == [1300, False]
    assert (live["br7"]["mtu"], live["vx7"]["mtu"], live["vx7"]["master"]) == (1400, 1400, "br7")
    assert vxlan(live["vx7"]) == {"id": 77, "remote": "192.0.2.9", "local": "192.0.2.1", "port": 8472,
                                  "learning": False}
    assert got["links"]["vx7"][5] == {"vni": 77, "local": "192.0.2.1", "remote": "192.0.2.9", "port": 8472,
                                      "learning": False}
    assert got["v4"] == addresses(ns, "br7") == ["10.7.0.1/16"]
    assert got["all"] == all_addresses(ns, "br7")
    assert "fd00:7::1/64" in got["all"]
    assert (got["holder"], got["ports"]) == ("u0", ["vx7"])


def test_routes_with_proto_table_and_scope(ns: Netns) -> None:
    ns.sh("ip link add br9 type bridge && ip link set br9 up && ip addr add 10.9.0.1/24 dev br9"
          " && ip route add 10.60.0.0/16 via 10.9.0.254 metric 7"
          " && ip route add blackhole 10.61.0.0/16")
    got = run_module_utils(ns, SEAM + """
with Netlink() as nl:
    nl.dump()
    nl.replace_route(net("10.50.0.0/16"), device="br9", proto=250, table=100, scope=253)
    nl.replace_route(net("10.51.0.0/16"), ip("10.9.0.254"), proto=250)
    nl.replace_route(net("10.52.0.0/16"), ip("10.9.0.254"), "br9")
    try:
        nl.replace_route(net("10.53.0.0/16"), ip("10.200.0.1"), "br9")
        error = None
    except CommandError as err:
        error = str(err)
    def shown(table):
        return sorted([str(r.dst), str(r.gateway), r.oif, r.priority, r.proto, r.table, r.scope]
                      for r in nl.routes(table))
    before = {"main": shown(254), "100": shown(100)}
    gone = [r for r in nl.routes(254) if str(r.dst) == "10.60.0.0/16"][0]
    nl.delete_route(gone)
    nl.delete_route([r for r in nl.routes(100)][0])
    print(json.dumps({"before": before, "error": error, "index": nl.index_of("br9"),
                      "after": {"main": shown(254), "100": shown(100)}}))
""")
    index = got["index"]
    assert got["error"] and "replace route 10.53.0.0/16 via 10.200.0.1 dev br9" in got["error"]
    assert ["10.50.0.0/16", "None", index, 0, 250, 100, 253] in got["before"]["100"]
    assert ["10.51.0.0/16", "10.9.0.254", index, 0, 250, 254, 0] in got["before"]["main"]
    assert ["10.52.0.0/16", "10.9.0.254", index, 0, 4, 254, 0] in got["before"]["main"]  # pyroute2: static
    assert ["10.60.0.0/16", "10.9.0.254", index, 7, 3, 254, 0] in got["before"]["main"]
    assert ["10.9.0.0/24", "None", index, 0, 2, 254, 253] in got["before"]["main"]
    assert not any(route[0] == "10.61.0.0/16" for route in got["before"]["main"])  # blackhole: not unicast
    # What iproute2 lists after the deletes is exactly what the seam read.
    for table, key in (("main", "main"), ("100", "100")):
        listed = sorted([r["dst"] if "/" in r["dst"] else f"{r['dst']}/32", r.get("gateway", "None"),
                         index if r.get("dev") == "br9" else None, r.get("metric", 0),
                         int(r.get("protocol", 3)), int(r.get("table", 254)), int(r.get("scope", 0))]
                        for r in routes(ns, table) if r.get("type", "1") == "1")
        listed = [entry for entry in listed if entry[2] is not None]
        assert [entry for entry in got["after"][key] if entry[2] == index] == listed
    assert routes(ns, "100") == []
    assert not any(r["dst"] == "10.60.0.0/16" for r in routes(ns))


def test_neighbours_added_replaced_deleted(ns: Netns) -> None:
    ns.sh("ip link add vx5 type vxlan id 5 local 192.0.2.1 dstport 4789 nolearning && ip link set vx5 up"
          " && ip neigh add 10.5.0.9 lladdr 02:00:00:00:05:09 dev vx5 nud permanent")
    got = run_module_utils(ns, SEAM + """
with Netlink() as nl:
    before = [[str(n.dst), n.lladdr, list(n.state)] for n in nl.neighbours("vx5")]
    nl.add_neighbour("vx5", ip("10.5.0.2"), "02:00:00:00:05:02")
    nl.replace_neighbour("vx5", ip("10.5.0.3"), "02:00:00:00:05:03")
    nl.replace_neighbour("vx5", ip("10.5.0.3"), "02:00:00:00:05:33")
    nl.replace_neighbour("vx5", ip("fd00:5::3"), "02:00:00:00:05:36")
    nl.delete_neighbour("vx5", ip("10.5.0.9"))
    try:
        nl.add_neighbour("vx5", ip("10.5.0.2"), "02:00:00:00:05:22")
        error = None
    except CommandError as err:
        error = str(err)
    after = sorted([str(n.dst), n.lladdr, list(n.state), n.oif] for n in nl.neighbours("vx5"))
    print(json.dumps({"before": before, "after": after, "error": error, "index": nl.index_of("vx5"),
                      "all": sorted(str(n.dst) for n in nl.neighbours())}))
""")
    assert got["before"] == [["10.5.0.9", "02:00:00:00:05:09", ["permanent"]]]
    assert got["error"] and "add neighbour 10.5.0.2 dev vx5" in got["error"]
    listed = sorted([n["dst"], n["lladdr"], [state.lower() for state in n["state"]], got["index"]]
                    for n in neighbours(ns, "vx5"))
    assert got["after"] == listed == [["10.5.0.2", "02:00:00:00:05:02", ["permanent"], got["index"]],
                                      ["10.5.0.3", "02:00:00:00:05:33", ["permanent"], got["index"]],
                                      ["fd00:5::3", "02:00:00:00:05:36", ["permanent"], got["index"]]]
    assert {"10.5.0.2", "10.5.0.3", "fd00:5::3"} <= set(got["all"])


def test_fdb_entries_of_a_vxlan_link(ns: Netns) -> None:
    ns.sh("ip link add vx6 type vxlan id 6 local 192.0.2.1 dstport 4789 nolearning && ip link set vx6 up"
          " && bridge fdb append 00:00:00:00:00:00 dev vx6 dst 192.0.2.50")
    got = run_module_utils(ns, SEAM + """
with Netlink() as nl:
    before = [[e.lladdr, str(e.dst), e.state, e.self_] for e in nl.fdb("vx6")]
    nl.add_fdb("vx6", "00:00:00:00:00:00", ip("192.0.2.11"), append=True)
    nl.add_fdb("vx6", "00:00:00:00:00:00", ip("192.0.2.12"), append=True)
    nl.add_fdb("vx6", "02:00:00:00:06:01", ip("192.0.2.11"))
    nl.replace_fdb("vx6", "02:00:00:00:06:01", ip("192.0.2.12"))
    nl.replace_fdb("vx6", "02:00:00:00:06:02", ip("192.0.2.13"))
    nl.delete_fdb("vx6", "00:00:00:00:00:00", ip("192.0.2.50"))
    try:
        nl.add_fdb("vx6", "02:00:00:00:06:02", ip("192.0.2.11"))
        error = None
    except CommandError as err:
        error = str(err)
    after = sorted([e.lladdr, str(e.dst), e.state, e.self_] for e in nl.fdb("vx6"))
    print(json.dumps({"before": before, "after": after, "error": error}))
""")
    assert got["before"] == [["00:00:00:00:00:00", "192.0.2.50", "permanent", True]]
    assert got["error"] and "add fdb 02:00:00:00:06:02 dev vx6 dst 192.0.2.11" in got["error"]
    listed = sorted([e["mac"], e.get("dst", "None"), e.get("state", ""), "self" in e.get("flags", [])]
                    for e in fdb(ns, "vx6"))
    assert got["after"] == listed == [["00:00:00:00:00:00", "192.0.2.11", "permanent", True],
                                      ["00:00:00:00:00:00", "192.0.2.12", "permanent", True],
                                      ["02:00:00:00:06:01", "192.0.2.12", "permanent", True],
                                      ["02:00:00:00:06:02", "192.0.2.13", "permanent", True]]


def test_a_node_without_pyroute2_fails_clearly_and_changes_nothing(ns: Netns,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry wrapper names the missing package; -S leaves out site-packages, PYTHONPATH gives
    only Ansible (its module side needs nothing else), as on a node without python3-pyroute2."""
    python = node_python()
    site = subprocess.run([python, "-c", "import ansible, os; print(os.path.dirname(os.path.dirname("
                           "ansible.__file__)))"], capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as only_ansible:
        pathlib.Path(only_ansible, "ansible").symlink_to(pathlib.Path(site, "ansible"))
        wrapper = pathlib.Path(only_ansible, "python")
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={only_ansible} exec {python} -S \"$@\"\n")
        wrapper.chmod(0o755)
        monkeypatch.setenv("NETLOOM_MODULE_PYTHON", str(wrapper))
        before = links(ns)
        result = run_module("overlay_runner", {"plan": "10.0.0.0/8/8/16", "runner_id": 1,
                                               "hub_underlay_ip": "192.0.2.2", "underlay_ip": "192.0.2.1"},
                            netns=ns.name)
    assert result["failed"] and "pyroute2 is required on the managed node" in result["msg"]
    assert links(ns) == before
