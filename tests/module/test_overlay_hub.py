"""overlay_hub run as Ansible runs it (one process, args file) inside throwaway network namespaces."""
from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.kernel_view import addresses, kernel_state, links, vxlan
from tests.support.netns import Netns, run_module, run_module_ok, run_module_utils

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

PLAN = "10.0.0.0/8/8/16"
RUNNERS = [{"name": "r1", "underlay_ip": "192.0.2.11"},
           {"name": "r2", "underlay_ip": "192.0.2.12"},
           {"name": "r3", "underlay_ip": "192.0.2.13"}]
FOREIGN_RULE = "-A FORWARD -i u1 -m comment --comment admin-keep -j ACCEPT"
HUB_ENTRY = "10-overlay_hub@main.json"


def hub_rules(overlay: str = "10.0.0.0/8") -> list[str]:
    """The owned FORWARD chain as iptables -S prints it: overlay interfaces only, replies inbound,
    anything else forwarded into them dropped."""
    return ["-N NETLOOM-OVLHUB-FWD",
            f"-A NETLOOM-OVLHUB-FWD -s {overlay} -i vxkr+ -j ACCEPT",
            f"-A NETLOOM-OVLHUB-FWD -s {overlay} -i kohaku-host -j ACCEPT",
            *(f"-A NETLOOM-OVLHUB-FWD -d {overlay} -o {name} -m conntrack --ctstate RELATED,ESTABLISHED "
              "-j ACCEPT" for name in ("vxkr+", "kohaku-host")),
            "-A NETLOOM-OVLHUB-FWD -o vxkr+ -j DROP", "-A NETLOOM-OVLHUB-FWD -o kohaku-host -j DROP"]


@pytest.fixture
def hub(tmp_path: pathlib.Path) -> Iterator[Netns]:
    """A netns with an underlay veth (192.0.2.1/24, MTU 1500) and forwarding off."""
    with Netns("nlhub") as ns:
        ns.sh("ip link add u0 type veth peer name u1 && ip link set u0 up && ip link set u1 up"
              " && ip addr add 192.0.2.1/24 dev u0 && sysctl -qw net.ipv4.ip_forward=0")
        ns.state_file = str(tmp_path / "overlay" / "runners.json")  # type: ignore[attr-defined]
        yield ns


def args(ns: Netns, runners: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    base = {"plan": PLAN, "underlay_ip": "192.0.2.1", "state_file": ns.state_file,  # type: ignore[attr-defined]
            "runners": RUNNERS if runners is None else runners}
    base.update(extra)
    return base


hub_run = functools.partial(run_module_ok, "overlay_hub")


def test_create_check_diff_and_idempotence(hub: Netns) -> None:
    untouched = kernel_state(hub)
    preview = hub_run(hub, args(hub), check_mode=True)
    assert preview["changed"]
    assert "create link vxkr1" in preview["changes"]
    assert preview["diff"]["after"]["link vxkr2"]["remote"] == "192.0.2.12"
    assert preview["diff"]["after"]["addresses vxkr3"] == ["10.3.0.254/16"]
    assert kernel_state(hub) == untouched
    assert not os.path.exists(hub.state_file)  # type: ignore[attr-defined]

    result = hub_run(hub, args(hub))
    assert result["changed"]
    assert result["changes"] == preview["changes"]
    live = links(hub)
    for runner, number in zip(RUNNERS, (1, 2, 3), strict=True):
        link = live[f"vxkr{number}"]
        assert vxlan(link) == {"id": 100 + number, "remote": runner["underlay_ip"], "local": "192.0.2.1",
                               "port": 4789, "learning": False}
        assert link["mtu"] == 1450
        assert link["address"] == f"02:6b:00:00:00:{number:02x}"  # the same after a reboot
        assert "UP" in link["flags"]
        assert addresses(hub, f"vxkr{number}") == [f"10.{number}.0.254/16"]
    assert addresses(hub, "kohaku-host") == ["10.0.0.1/8"]
    assert live["kohaku-host"]["linkinfo"]["info_kind"] == result["anchor"]["kind"]
    assert "UP" in live["kohaku-host"]["flags"]
    assert hub.sh("sysctl -n net.ipv4.ip_forward").strip() == "1"
    assert hub.sh("iptables -S NETLOOM-OVLHUB-FWD").splitlines() == hub_rules()
    assert "-j NETLOOM-OVLHUB-FWD" in hub.sh("iptables -S FORWARD")
    table = {row["name"]: row for row in result["runners"]}
    assert table["r1"] == {"name": "r1", "id": 1, "source": "allocated", "vni": 101,
                           "underlay_ip": "192.0.2.11", "link": "vxkr1", "subnet": "10.1.0.0/16",
                           "gateway": "10.1.0.1", "hub_address": "10.1.0.254",
                           "workloads": {"first": "10.1.0.2", "last": "10.1.255.254", "count": 65532}}
    assert result["overlay"] == "10.0.0.0/8" and result["mtu"] == 1450
    recorded = json.loads(pathlib.Path(hub.state_file).read_text())  # type: ignore[attr-defined]
    assert recorded["runners"]["r2"] == {"id": 2, "underlay_ip": "192.0.2.12"}

    converged = kernel_state(hub)
    again = hub_run(hub, args(hub))
    assert not again["changed"], again["changes"]
    assert {row["source"] for row in again["runners"]} == {"recorded"}
    assert not hub_run(hub, args(hub), check_mode=True)["changed"]
    assert kernel_state(hub) == converged


def test_anchor_kind_follows_the_kernel(hub: Netns) -> None:
    result = run_module("overlay_hub", args(hub, runners=[]), netns=hub.name)
    kind = links(hub)["kohaku-host"]["linkinfo"]["info_kind"]
    assert result["anchor"] == {"name": "kohaku-host", "kind": kind, "address": "10.0.0.1/8"}
    warnings = json.dumps(result.get("warnings", []))
    if kind == "bridge":
        assert "no dummy link driver" in warnings
    else:
        assert "dummy" not in warnings


def test_drift_is_reported_in_check_mode_and_repaired(hub: Netns) -> None:
    hub_run(hub, args(hub))
    index_before = links(hub)["vxkr3"]["ifindex"]
    hub.sh("ip link del vxkr2")
    hub.sh("ip link set vxkr1 type vxlan remote 192.0.2.99")
    hub.sh("ip addr add 10.77.0.1/24 dev vxkr1")
    hub.sh("ip link set vxkr3 mtu 1400 && ip link set vxkr3 down")
    hub.sh("ip link set vxkr3 address 02:00:00:00:00:33")
    hub.sh("ip addr del 10.0.0.1/8 dev kohaku-host")
    hub.sh("iptables -D NETLOOM-OVLHUB-FWD 3")
    drifted = kernel_state(hub)

    preview = hub_run(hub, args(hub), check_mode=True)
    assert set(preview["changes"]) == {
        "update link vxkr1", "create link vxkr2", "update link vxkr3", "update addresses vxkr1",
        "create addresses vxkr2", "create addresses kohaku-host",
        "update iptables filter NETLOOM-OVLHUB-FWD"}
    assert preview["diff"]["before"]["link vxkr1"]["remote"] == "192.0.2.99"
    assert preview["diff"]["after"]["link vxkr1"]["remote"] == "192.0.2.11"
    assert kernel_state(hub) == drifted

    repaired = hub_run(hub, args(hub))
    assert repaired["changes"] == preview["changes"]
    live = links(hub)
    assert vxlan(live["vxkr1"])["remote"] == "192.0.2.11"
    assert addresses(hub, "vxkr1") == ["10.1.0.254/16"]
    assert vxlan(live["vxkr2"])["id"] == 102
    assert live["vxkr3"]["mtu"] == 1450 and "UP" in live["vxkr3"]["flags"]
    assert live["vxkr3"]["address"] == "02:6b:00:00:00:03"
    assert live["vxkr3"]["ifindex"] == index_before  # MTU and up fixed in place, not recreated
    assert addresses(hub, "kohaku-host") == ["10.0.0.1/8"]
    assert hub.sh("iptables -S NETLOOM-OVLHUB-FWD").splitlines() == hub_rules()
    assert not hub_run(hub, args(hub))["changed"]


def test_purge_keeps_ids_and_reuses_the_freed_one(hub: Netns) -> None:
    hub_run(hub, args(hub))
    kept_index = links(hub)["vxkr3"]["ifindex"]
    result = hub_run(hub, args(hub, runners=[RUNNERS[2], RUNNERS[0]]))
    assert set(result["changes"]) == {"delete link vxkr2", f"update file {hub.state_file}",  # type: ignore[attr-defined]
                                      f"update restore entry {HUB_ENTRY}"}
    assert {row["name"]: row["id"] for row in result["runners"]} == {"r1": 1, "r3": 3}
    assert "vxkr2" not in links(hub)
    assert links(hub)["vxkr3"]["ifindex"] == kept_index

    newcomer = {"name": "r4", "underlay_ip": "192.0.2.14"}
    result = hub_run(hub, args(hub, runners=[newcomer, RUNNERS[2], RUNNERS[0]]))
    assert {row["name"]: (row["id"], row["source"]) for row in result["runners"]} == {
        "r1": (1, "recorded"), "r3": (3, "recorded"), "r4": (2, "allocated")}
    assert vxlan(links(hub)["vxkr2"])["remote"] == "192.0.2.14"


def test_per_runner_calls_without_purge(hub: Netns) -> None:
    for runner in RUNNERS:
        result = hub_run(hub, args(hub, runners=[runner], purge=False))
        assert result["changed"]
    assert {f"vxkr{n}" for n in (1, 2, 3)} <= set(links(hub))
    again = [hub_run(hub, args(hub, runners=[runner], purge=False)) for runner in RUNNERS]
    assert not any(result["changed"] for result in again)
    assert [result["runners"][0]["id"] for result in again] == [1, 2, 3]
    # A one-runner call with purge (the default) removes the others.
    purged = hub_run(hub, args(hub, runners=[RUNNERS[1]]))
    assert {"delete link vxkr1", "delete link vxkr3"} <= set(purged["changes"])


def test_ids_are_recovered_from_links_when_the_state_file_is_lost(hub: Netns) -> None:
    hub_run(hub, args(hub, runners=[RUNNERS[0], {**RUNNERS[1], "id": 7}, RUNNERS[2]]))
    os.unlink(hub.state_file)  # type: ignore[attr-defined]
    result = hub_run(hub, args(hub, runners=list(reversed(RUNNERS))))
    assert {row["name"]: (row["id"], row["source"]) for row in result["runners"]} == {
        "r1": (1, "link"), "r2": (7, "link"), "r3": (2, "link")}
    assert result["changes"] == [f"create file {hub.state_file}",  # type: ignore[attr-defined]
                                 f"update restore entry {HUB_ENTRY}"]


def test_declared_id_may_not_renumber_another_runner(hub: Netns) -> None:
    hub_run(hub, args(hub))
    before = kernel_state(hub)
    result = run_module("overlay_hub", args(hub, runners=[RUNNERS[0], {**RUNNERS[2], "id": 1}]),
                        netns=hub.name)
    assert result["failed"]
    assert result["field"] == "runners[1].id"
    assert "would renumber r1" in result["msg"]
    assert kernel_state(hub) == before


def test_absent_removes_only_what_it_owns(hub: Netns) -> None:
    hub.sh("ip link add vxother type vxlan id 999 remote 192.0.2.50 dstport 4789")
    hub.sh("ip link add vxkrx type veth peer name vxkry")
    hub.sh(f"iptables {FOREIGN_RULE}")
    hub_run(hub, args(hub))
    preview = hub_run(hub, {"state": "absent", "state_file": hub.state_file}, check_mode=True)  # type: ignore[attr-defined]
    assert "vxkr1" in links(hub)
    result = hub_run(hub, {"state": "absent", "state_file": hub.state_file})  # type: ignore[attr-defined]
    assert result["changes"] == preview["changes"]
    remaining = set(links(hub))
    assert not {"vxkr1", "vxkr2", "vxkr3", "kohaku-host"} & remaining
    assert {"vxother", "vxkrx", "vxkry", "u0", "u1"} <= remaining
    rules = hub.sh("iptables -S")
    assert "NETLOOM" not in rules
    assert FOREIGN_RULE in rules
    assert not os.path.exists(hub.state_file)  # type: ignore[attr-defined]
    assert not hub_run(hub, {"state": "absent", "state_file": hub.state_file})["changed"]  # type: ignore[attr-defined]


def test_foreign_link_with_an_owned_name_is_not_replaced(hub: Netns) -> None:
    hub.sh("ip link add vxkr2 type veth peer name vxkr2p")
    before = kernel_state(hub)
    result = run_module("overlay_hub", args(hub, runners=[{**RUNNERS[0], "id": 2}]), netns=hub.name)
    assert result["failed"] and result["field"] == "runners[0]"
    assert "needs link vxkr2 (id 2, declared)" in result["msg"]
    assert kernel_state(hub) == before
    # Allocation steps around the foreign name instead.
    result = hub_run(hub, args(hub, runners=RUNNERS[:2]))
    assert [row["id"] for row in result["runners"]] == [1, 3]
    assert links(hub)["vxkr2"]["linkinfo"]["info_kind"] == "veth"


def test_explicit_mtu_and_the_12_6_14_plan(hub: Netns) -> None:
    result = hub_run(hub, args(hub, runners=RUNNERS[:1], plan={"base": "10.128.0.0/12", "node_bits": 6,
                                                              "subnet_bits": 14}, mtu=1400, vni_base=5000))
    assert result["runners"][0]["subnet"] == "10.128.64.0/18"
    assert addresses(hub, "vxkr1") == ["10.128.64.254/18"]
    assert addresses(hub, "kohaku-host") == ["10.128.0.1/12"]
    assert links(hub)["vxkr1"]["mtu"] == 1400
    assert vxlan(links(hub)["vxkr1"])["id"] == 5001
    assert hub.sh("iptables -S NETLOOM-OVLHUB-FWD").splitlines() == hub_rules("10.128.0.0/12")


@pytest.mark.parametrize("overrides, field, fragment", [
    ({"plan": "10.0.0.0/8/8/8"}, "plan", "must be 32"),
    ({"plan": "10.1.0.0/8/8/16"}, "plan.base", "not aligned"),
    ({"runners": [{**RUNNERS[0], "id": 0}]}, "runners[0].id", "between 1 and 255"),
    ({"runners": [{**RUNNERS[0], "id": 256}]}, "runners[0].id", "between 1 and 255"),
    ({"runners": [{"name": "a", "underlay_ip": "192.0.2.11", "id": 4},
                  {"name": "b", "underlay_ip": "192.0.2.12", "id": 4}]}, "runners[1].id", "duplicates"),
    ({"runners": [RUNNERS[0], {"name": "r1", "underlay_ip": "192.0.2.12"}]}, "runners[1].name", "duplicates"),
    ({"runners": [RUNNERS[0], {"name": "b", "underlay_ip": "192.0.2.11"}]}, "runners[1].underlay_ip",
     "duplicates"),
    ({"runners": [{"name": "a", "underlay_ip": "192.0.2.1"}]}, "runners[0].underlay_ip", "hub's own"),
    ({"vni_base": 16777215}, "vni_base", "outside the VXLAN range"),
    ({"link_prefix": "averylongprefix"}, "link_prefix", "1..15 characters"),
    ({"anchor_name": "kohaku-host-anchor"}, "anchor_name", "1..15 characters"),
    ({"mtu": 1200}, "mtu", "between 1280 and 1450"),
    ({"mtu": 1451}, "mtu", "between 1280 and 1450"),
    ({"underlay_ip": "192.0.2.77"}, "underlay_ip", "not an address of this node"),
    ({"port": 70000}, "port", "between 1 and 65535"),
])
def test_bad_input_fails_before_any_change(hub: Netns, overrides: dict[str, Any], field: str,
                                           fragment: str) -> None:
    before = kernel_state(hub)
    result = run_module("overlay_hub", args(hub, **overrides), netns=hub.name)
    assert result.get("failed"), result
    assert result["field"] == field
    assert fragment in result["msg"]
    assert kernel_state(hub) == before
    assert not os.path.exists(hub.state_file)  # type: ignore[attr-defined]


DUMP_SNAPSHOT = """
import json, sys
from ansible.module_utils.netloom.netlink import Netlink
with Netlink() as nl:
    snap = nl.dump(routes=True)
print(json.dumps({
    "links": {name: {"index": l.index, "kind": l.kind, "mtu": l.mtu, "up": l.up, "master": l.master,
                     "vxlan": l.vxlan.describe() if l.vxlan else None} for name, l in snap.links.items()},
    "addresses": {str(index): sorted(map(str, addrs)) for index, addrs in snap.addresses.items()},
    "routes": sorted(f"{r.dst} {r.gateway} {r.oif} {r.priority}" for r in snap.routes),
    "pyroute2_imported": "pyroute2" in sys.modules,
}))
"""


def test_netlink_dump_reads_what_ip_reports(hub: Netns) -> None:
    """The seam's reader against iproute2's view of the same kernel objects."""
    hub.sh("ip link add vxl type vxlan id 42 local 192.0.2.1 remote 192.0.2.9 dstport 8472 learning"
           " && ip link add vx6 type vxlan id 43 remote 2001:db8::9 dstport 4789"
           " && ip link add br9 mtu 1400 type bridge && ip link set vxl master br9 && ip link set br9 up"
           " && ip addr add 10.9.0.1/16 dev br9 && ip addr add 10.9.0.7/24 dev br9"
           " && ip route add 10.200.0.0/16 via 10.9.0.254 metric 7")
    got = run_module_utils(hub, DUMP_SNAPSHOT)
    assert not got["pyroute2_imported"]
    live = links(hub)
    assert set(got["links"]) == set(live)
    index_of = {name: link["ifindex"] for name, link in live.items()}
    for name, link in live.items():
        mine = got["links"][name]
        assert mine["index"] == link["ifindex"]
        assert mine["kind"] == link.get("linkinfo", {}).get("info_kind", "")
        assert mine["mtu"] == link["mtu"]
        assert mine["up"] == ("UP" in link["flags"])
        assert mine["master"] == (index_of[link["master"]] if "master" in link else None)
    assert got["links"]["vxl"]["vxlan"] == {"vni": 42, "local": "192.0.2.1", "remote": "192.0.2.9",
                                            "port": 8472, "learning": True}
    assert got["links"]["vx6"]["vxlan"]["remote"] is None  # an IPv6 remote is never "ours"
    assert got["addresses"][str(index_of["br9"])] == ["10.9.0.1/16", "10.9.0.7/24"]
    assert got["addresses"][str(index_of["u0"])] == ["192.0.2.1/24"]
    assert f"10.200.0.0/16 10.9.0.254 {index_of['br9']} 7" in got["routes"]
    assert f"10.9.0.0/16 None {index_of['br9']} 0" in got["routes"]
    assert not any(route.startswith("127.") for route in got["routes"])  # local table left out


def test_vni_used_by_a_foreign_vxlan_link_fails_before_any_change(hub: Netns) -> None:
    hub.sh("ip link add vxother type vxlan id 102 remote 192.0.2.50 dstport 4789")
    before = kernel_state(hub)
    result = run_module("overlay_hub", args(hub), netns=hub.name)
    assert result["failed"] and result["field"] == "vni_base"
    assert "needed by vxkr2 is already used by vxother" in result["msg"]
    assert kernel_state(hub) == before
    assert not run_module("overlay_hub", args(hub, port=8472), netns=hub.name).get("failed")
