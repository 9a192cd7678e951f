"""overlay_runner run as Ansible runs it, inside throwaway network namespaces; plus hub+runners traffic."""
from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.kernel_view import addresses, kernel_state, links, vxlan
from tests.support.netns import Netns, run_module, run_module_ok, run_module_utils, sh

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

PLAN = "10.0.0.0/8/8/16"
FOREIGN_RULE = "-A FORWARD -i u0 -m comment --comment admin-keep -j ACCEPT"
REPLIES = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
RUNNER_FORWARD = ["-N NETLOOM-OVLRUN-FWD",
                  "-A NETLOOM-OVLRUN-FWD -s 10.0.0.0/8 -i kohaku-overlay -j ACCEPT",
                  "-A NETLOOM-OVLRUN-FWD -s 10.0.0.0/8 -i vxlan0 -j ACCEPT",
                  f"-A NETLOOM-OVLRUN-FWD -d 10.0.0.0/8 -o kohaku-overlay {REPLIES}",
                  f"-A NETLOOM-OVLRUN-FWD -d 10.0.0.0/8 -o vxlan0 {REPLIES}",
                  "-A NETLOOM-OVLRUN-FWD -o kohaku-overlay -m conntrack --ctstate DNAT -j RETURN",
                  "-A NETLOOM-OVLRUN-FWD -o kohaku-overlay -j DROP"]
MASQUERADE = "-A NETLOOM-OVLRUN-NAT -s 10.0.0.0/8 ! -d 10.0.0.0/8 ! -o kohaku-overlay -j MASQUERADE"


@pytest.fixture
def runner() -> Iterator[Netns]:
    """A netns with an underlay veth (192.0.2.11/24, MTU 1500) and forwarding off."""
    with Netns("nlrun") as ns:
        ns.sh("ip link add u0 type veth peer name u1 && ip link set u0 up && ip link set u1 up"
              " && ip addr add 192.0.2.11/24 dev u0 && sysctl -qw net.ipv4.ip_forward=0")
        yield ns


def args(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"plan": PLAN, "runner_id": 1, "hub_underlay_ip": "192.0.2.1",
                            "underlay_ip": "192.0.2.11"}
    base.update(extra)
    return base


runner_run = functools.partial(run_module_ok, "overlay_runner")


def overlay_routes(ns: Netns) -> list[str]:
    return [line.strip() for line in ns.sh("ip route show 10.0.0.0/8").splitlines()]


def test_create_check_diff_and_idempotence(runner: Netns) -> None:
    untouched = kernel_state(runner, routes=True)
    preview = runner_run(runner, args(), check_mode=True)
    assert preview["changed"]
    assert preview["diff"]["after"]["link vxlan0"] == {
        "kind": "vxlan", "mtu": 1450, "up": True, "vni": 101, "local": "192.0.2.11", "remote": "192.0.2.1",
        "port": 4789, "learning": False, "master": "kohaku-overlay"}
    assert preview["diff"]["after"]["route 10.0.0.0/8"] == "10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay"
    assert kernel_state(runner, routes=True) == untouched

    result = runner_run(runner, args())
    assert result["changes"] == preview["changes"]
    live = links(runner)
    assert live["kohaku-overlay"]["linkinfo"]["info_kind"] == "bridge"
    assert live["kohaku-overlay"]["mtu"] == 1450
    assert vxlan(live["vxlan0"]) == {"id": 101, "remote": "192.0.2.1", "local": "192.0.2.11",
                                     "port": 4789, "learning": False}
    assert live["vxlan0"]["master"] == "kohaku-overlay" and live["vxlan0"]["mtu"] == 1450
    assert "UP" in live["vxlan0"]["flags"] and "UP" in live["kohaku-overlay"]["flags"]
    assert addresses(runner, "kohaku-overlay") == ["10.1.0.1/16"]
    assert overlay_routes(runner)[0].startswith("10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay")
    assert runner.sh("sysctl -n net.ipv4.ip_forward").strip() == "1"
    assert runner.sh("iptables -S NETLOOM-OVLRUN-FWD").splitlines() == RUNNER_FORWARD
    nat = runner.sh("iptables -t nat -S NETLOOM-OVLRUN-NAT").splitlines()
    assert nat == ["-N NETLOOM-OVLRUN-NAT", MASQUERADE]
    assert result["runner"] == {"id": 1, "vni": 101, "subnet": "10.1.0.0/16", "gateway": "10.1.0.1",
                                "hub_address": "10.1.0.254",
                                "workloads": {"first": "10.1.0.2", "last": "10.1.255.254", "count": 65532}}
    assert result["mtu"] == 1450

    converged = kernel_state(runner, routes=True)
    assert not runner_run(runner, args())["changed"]
    assert not runner_run(runner, args(), check_mode=True)["changed"]
    assert kernel_state(runner, routes=True) == converged


def test_drift_is_repaired_without_touching_the_bridge_or_its_ports(runner: Netns) -> None:
    runner_run(runner, args())
    # A workload veth as Docker would attach it: not ours, must stay enslaved and untouched.
    runner.sh("ip link add ws0 type veth peer name ws0p && ip link set ws0 master kohaku-overlay up")
    # A qemu_vm TAP (nlvm-NAME, as its unit attaches it): netloom's own VM port, left alone.
    runner.sh("ip tuntap add dev nlvm-t1 mode tap && ip link set nlvm-t1 mtu 1450 master kohaku-overlay up")
    bridge_index = links(runner)["kohaku-overlay"]["ifindex"]
    runner.sh("ip link set vxlan0 type vxlan remote 192.0.2.99")
    runner.sh("ip addr add 10.77.0.1/24 dev kohaku-overlay")
    runner.sh("ip route del 10.0.0.0/8")
    runner.sh("ip link set kohaku-overlay mtu 1400")
    runner.sh("iptables -t nat -F NETLOOM-OVLRUN-NAT")
    drifted = kernel_state(runner, routes=True)

    preview = runner_run(runner, args(), check_mode=True)
    assert set(preview["changes"]) == {
        "update link kohaku-overlay", "update link vxlan0", "update addresses kohaku-overlay",
        "create route 10.0.0.0/8", "update iptables nat NETLOOM-OVLRUN-NAT"}
    assert preview["diff"]["before"]["link vxlan0"]["remote"] == "192.0.2.99"
    assert kernel_state(runner, routes=True) == drifted

    repaired = runner_run(runner, args())
    assert repaired["changes"] == preview["changes"]
    live = links(runner)
    assert live["kohaku-overlay"]["ifindex"] == bridge_index
    assert live["kohaku-overlay"]["mtu"] == 1450
    assert vxlan(live["vxlan0"])["remote"] == "192.0.2.1"
    assert live["vxlan0"]["master"] == "kohaku-overlay"
    assert live["ws0"]["master"] == "kohaku-overlay"
    assert live["nlvm-t1"]["master"] == "kohaku-overlay"
    assert addresses(runner, "kohaku-overlay") == ["10.1.0.1/16"]
    assert overlay_routes(runner)[0].startswith("10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay")
    assert "MASQUERADE" in runner.sh("iptables -t nat -S NETLOOM-OVLRUN-NAT")
    assert not runner_run(runner, args())["changed"]


def test_a_wrong_bridge_prefix_is_replaced_and_the_route_set_again(runner: Netns) -> None:
    runner_run(runner, args())
    # The /24 still reaches the hub address, so the kernel keeps the route until the /24 goes.
    runner.sh("ip addr del 10.1.0.1/16 dev kohaku-overlay && ip addr add 10.1.0.1/24 dev kohaku-overlay"
              " && ip route add 10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay")
    result = runner_run(runner, args())
    assert {"update addresses kohaku-overlay", "update route 10.0.0.0/8"} <= set(result["changes"])
    assert addresses(runner, "kohaku-overlay") == ["10.1.0.1/16"]
    assert overlay_routes(runner)[0].startswith("10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay")
    assert not runner_run(runner, args())["changed"]


def test_runner_id_change_recreates_vxlan0_and_readdresses_the_bridge(runner: Netns) -> None:
    runner_run(runner, args())
    bridge_index = links(runner)["kohaku-overlay"]["ifindex"]
    result = runner_run(runner, args(runner_id=2))
    assert vxlan(links(runner)["vxlan0"])["id"] == 102
    assert links(runner)["kohaku-overlay"]["ifindex"] == bridge_index
    assert addresses(runner, "kohaku-overlay") == ["10.2.0.1/16"]
    assert overlay_routes(runner)[0].startswith("10.0.0.0/8 via 10.2.0.254 dev kohaku-overlay")
    assert result["runner"]["subnet"] == "10.2.0.0/16"


def test_absent_keeps_a_bridge_with_foreign_ports_and_foreign_things(runner: Netns) -> None:
    runner.sh(f"iptables {FOREIGN_RULE}")
    runner.sh("ip link add other0 type bridge")
    runner_run(runner, args())
    runner.sh("ip link add ws0 type veth peer name ws0p && ip link set ws0 master kohaku-overlay up")
    result = runner_run(runner, {"plan": PLAN, "state": "absent"})
    assert "kohaku-overlay still has ports (ws0)" in json.dumps(result.get("warnings"))
    live = links(runner)
    assert "vxlan0" not in live
    assert live["ws0"]["master"] == "kohaku-overlay"
    assert {"other0", "u0", "u1", "ws0p"} <= set(live)
    assert overlay_routes(runner) == []
    assert "NETLOOM" not in runner.sh("iptables -S") + runner.sh("iptables -t nat -S")
    assert FOREIGN_RULE in runner.sh("iptables -S")

    runner.sh("ip link del ws0")
    result = runner_run(runner, {"state": "absent"})
    assert result["changes"] == ["delete link kohaku-overlay"]
    assert "kohaku-overlay" not in links(runner)
    assert not runner_run(runner, {"state": "absent"})["changed"]


def test_foreign_link_named_like_the_bridge_is_not_replaced(runner: Netns) -> None:
    runner.sh("ip link add kohaku-overlay type veth peer name ko-peer")
    before = kernel_state(runner, routes=True)
    result = run_module("overlay_runner", args(), netns=runner.name)
    assert result["failed"] and "not a bridge" in result["msg"]
    assert kernel_state(runner, routes=True) == before


@pytest.mark.parametrize("overrides, field, fragment", [
    ({"plan": "10.0.0.0/8/8/17"}, "plan", "must be 32"),
    ({"plan": None}, "plan", "required"),
    ({"runner_id": 0}, "runner_id", "between 1 and 255"),
    ({"runner_id": 256}, "runner_id", "between 1 and 255"),
    ({"runner_id": 64, "plan": "10.128.0.0/12/6/14"}, "runner_id", "between 1 and 63"),
    ({"vni_base": 16777200, "runner_id": 20}, "vni_base", "outside the VXLAN range"),
    ({"mtu": 1279}, "mtu", "between 1280 and 1450"),
    ({"mtu": 9000}, "mtu", "between 1280 and 1450"),
    ({"underlay_ip": "192.0.2.12"}, "underlay_ip", "not an address of this node"),
    ({"hub_underlay_ip": "192.0.2.11"}, "hub_underlay_ip", "own underlay_ip"),
    ({"hub_underlay_ip": "hub.example"}, "hub_underlay_ip", "not an IPv4 address"),
    ({"bridge_name": "kohaku-overlay-bridge"}, "bridge_name", "1..15 characters"),
    ({"vxlan_name": "kohaku-overlay"}, "vxlan_name", "must differ"),
])
def test_bad_input_fails_before_any_change(runner: Netns, overrides: dict[str, Any], field: str,
                                           fragment: str) -> None:
    before = kernel_state(runner, routes=True)
    result = run_module("overlay_runner", args(**overrides), netns=runner.name)
    assert result.get("failed"), result
    assert result["field"] == field
    assert fragment in result["msg"]
    assert kernel_state(runner, routes=True) == before


def test_underlay_mtu_sets_the_default(runner: Netns) -> None:
    runner.sh("ip link set u0 mtu 1400")
    result = runner_run(runner, args())
    assert result["mtu"] == 1350
    assert links(runner)["vxlan0"]["mtu"] == 1350


def test_hub_and_two_runners_carry_traffic(tmp_path: pathlib.Path) -> None:
    """The real topology: runner1 reaches the hub anchor and runner2's subnet through the hub."""
    with Netns("nlhub") as hub, Netns("nlrun") as first, Netns("nlrun") as second:
        hub.sh("ip link add underlay type bridge && ip link set underlay up"
               " && ip addr add 192.0.2.1/24 dev underlay")
        runners = []
        for number, ns in ((11, first), (12, second)):
            sh(f"ip link add u{number} type veth peer name eth0 netns {ns.name}"
               f" && ip link set u{number} master underlay up", hub.name)
            ns.sh(f"ip link set eth0 up && ip addr add 192.0.2.{number}/24 dev eth0")
            runners.append({"name": ns.name, "underlay_ip": f"192.0.2.{number}"})
        table = run_module("overlay_hub", {"plan": PLAN, "underlay_ip": "192.0.2.1", "runners": runners,
                                           "state_file": str(tmp_path / "runners.json")}, netns=hub.name)
        assert not table.get("failed"), table.get("msg")
        for row, ns in zip(table["runners"], (first, second), strict=True):
            result = runner_run(ns, {"plan": PLAN, "runner_id": row["id"], "hub_underlay_ip": "192.0.2.1",
                                     "underlay_ip": row["underlay_ip"]})
            assert result["runner"]["gateway"] == row["gateway"]
        # A workload in runner2's subnet, behind its bridge, as a container would be.
        second.sh("ip link add ws0 type veth peer name ws0p && ip link set ws0 master kohaku-overlay up"
                  f" && ip netns add {second.name}-w && ip link set ws0p netns {second.name}-w")
        try:
            sh("ip link set ws0p up && ip addr add 10.2.0.5/16 dev ws0p && ip route add default via 10.2.0.1",
               f"{second.name}-w")
            assert " 0% packet loss" in first.sh("ping -c2 -W2 -I 10.1.0.1 10.0.0.1")
            assert " 0% packet loss" in first.sh("ping -c2 -W2 -I 10.1.0.1 10.2.0.5")
        finally:
            sh(f"ip netns del {second.name}-w")


ROUTE_REPLACE = """
import ipaddress, json
from ansible.module_utils.netloom.common import CommandError
from ansible.module_utils.netloom.netlink import Netlink
with Netlink() as nl:
    nl.dump()
    try:
        nl.replace_route(ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Address("10.1.0.254"), "u0")
    except CommandError as err:
        print(json.dumps({"error": str(err)}))
    else:
        print(json.dumps({"error": None}))
"""


def test_route_errors_are_raised_not_swallowed(runner: Netns) -> None:
    """The reference system ignored a failed `ip route add`; the seam turns it into a module failure."""
    got = run_module_utils(runner, ROUTE_REPLACE)
    assert got["error"] and "replace route 10.0.0.0/8 via 10.1.0.254 dev u0" in got["error"]
    assert "unreachable" in got["error"].lower()
    assert overlay_routes(runner) == []


def test_vni_used_by_a_foreign_vxlan_link_fails_before_any_change(runner: Netns) -> None:
    runner.sh("ip link add vxother type vxlan id 101 remote 192.0.2.50 dstport 4789")
    before = kernel_state(runner, routes=True)
    result = run_module("overlay_runner", args(), netns=runner.name)
    assert result["failed"] and result["field"] == "vni_base"
    assert "already used by vxother" in result["msg"]
    assert kernel_state(runner, routes=True) == before


def test_a_stale_primary_address_does_not_take_the_gateway_with_it(runner: Netns) -> None:
    """The gateway as a secondary behind a stale primary of the same subnet: the kernel would drop
    it with that primary, so the module re-adds it, and the route through it."""
    runner_run(runner, args())
    runner.sh("sysctl -qw net.ipv4.conf.kohaku-overlay.promote_secondaries=0"
              " && ip addr del 10.1.0.1/16 dev kohaku-overlay"
              " && ip addr add 10.1.0.9/16 dev kohaku-overlay && ip addr add 10.1.0.1/16 dev kohaku-overlay"
              " && ip route replace 10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay")
    assert "secondary" in runner.sh("ip addr show dev kohaku-overlay to 10.1.0.1")
    result = runner_run(runner, args())
    assert {"update addresses kohaku-overlay", "update route 10.0.0.0/8"} <= set(result["changes"])
    assert addresses(runner, "kohaku-overlay") == ["10.1.0.1/16"]
    assert overlay_routes(runner)[0].startswith("10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay")
    assert not runner_run(runner, args())["changed"]
