"""vm_nat_network (standard-mode VMs' NAT bridge) in throwaway namespaces, with real traffic.

A "VM" namespace on the bridge (a veth where a VM has its TAP) reaches an "outside" namespace
that has no route back to 10.200.0.0/24: only the MASQUERADE rule makes the reply come back.
"""
from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.netns import Netns, persist_root, replay_boot, run_module, run_module_ok

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

BRIDGE = "netloom-vmnat"
nat_run = functools.partial(run_module_ok, "vm_nat_network")


@pytest.fixture
def runner() -> Iterator[tuple[Netns, Netns, Netns]]:
    """runner (uplink 198.18.77.1/24 to outside), a VM namespace to plug in, and outside."""
    with Netns("vmnatr") as node, Netns("vmnatv") as vm, Netns("vmnato") as outside:
        node.sh(f"ip link add up0 type veth peer name eth0 netns {outside.name}"
                " && ip addr add 198.18.77.1/24 dev up0 && ip link set up0 up")
        outside.sh("ip addr add 198.18.77.2/24 dev eth0 && ip link set eth0 up")
        yield node, vm, outside


def plug_vm(node: Netns, vm: Netns, address: str = "10.200.0.5") -> None:
    node.sh(f"ip link add nlvm-t1 type veth peer name eth0 netns {vm.name}"
            f" && ip link set nlvm-t1 master {BRIDGE} up")
    vm.sh(f"ip addr add {address}/24 dev eth0 && ip link set eth0 up && ip route add default via 10.200.0.1")


def view(ns: Netns) -> str:
    """What the module owns, as the kernel and iptables-save show it."""
    rules = [line for table in ("filter", "nat") for line in ns.sh(f"iptables-save -t {table}").splitlines()
             if "VMNAT" in line]
    return "\n".join([ns.sh(f"ip -4 -br addr show dev {BRIDGE}", check=False), *rules,
                      ns.sh("sysctl -n net.ipv4.ip_forward")])


def test_a_vm_reaches_the_outside_through_masquerade_and_a_rerun_changes_nothing(
        runner: tuple[Netns, Netns, Netns]) -> None:
    node, vm, _outside = runner
    planned = nat_run(node, {}, check_mode=True)
    assert planned["changed"] and BRIDGE not in node.sh("ip -o link show")
    done = nat_run(node, {})
    assert done["changes"] == planned["changes"] and done["gateway"] == "10.200.0.1/24"
    plug_vm(node, vm)
    vm.sh("ping -c 2 -W 2 198.18.77.2")  # outside has no route to 10.200.0.0/24: NAT answers
    assert "10.200.0.1/24" in node.sh(f"ip -br addr show dev {BRIDGE}")
    again = nat_run(node, {})
    assert not again["changed"], again["changes"]
    assert not nat_run(node, {}, check_mode=True)["changed"]


def test_nothing_else_is_forwarded_into_the_bridge(runner: tuple[Netns, Netns, Netns]) -> None:
    node, vm, outside = runner
    nat_run(node, {})
    plug_vm(node, vm)
    outside.sh("ip route add 10.200.0.0/24 via 198.18.77.1")
    failed = subprocess.run(["ip", "netns", "exec", outside.name, "ping", "-c", "1", "-W", "1", "10.200.0.5"],
                            capture_output=True, check=False)
    assert failed.returncode != 0, "a host outside reached a NAT VM directly"
    vm.sh("ping -c 1 -W 2 198.18.77.2")  # the VM's own connection still gets its replies


def test_drift_is_repaired(runner: tuple[Netns, Netns, Netns]) -> None:
    node, _vm, _outside = runner
    nat_run(node, {})
    converged = view(node)
    node.sh(f"iptables -t nat -F NETLOOM-VMNAT && ip addr flush dev {BRIDGE} && ip link set {BRIDGE} down"
            " && sysctl -qw net.ipv4.ip_forward=0")
    repaired = nat_run(node, {})
    assert repaired["changed"] and view(node) == converged
    assert not nat_run(node, {})["changed"]


@pytest.mark.parametrize(("args", "field", "fragment"), [
    ({"subnet": "8.8.8.0/24"}, "subnet", "private"),
    ({"subnet": "10.200.0.0/30"}, "subnet", "/29"),
    ({"subnet": "198.18.77.0/25"}, "subnet", "overlaps the route 198.18.77.0/24"),
    ({"name": "up0"}, "name", "not a bridge"),
    ({"name": "bad:name"}, "name", "bad:name"),
])
def test_bad_input_fails_before_any_change(runner: tuple[Netns, Netns, Netns], args: dict[str, Any],
                                           field: str, fragment: str) -> None:
    node, _vm, _outside = runner
    before = view(node)
    for check_mode in (True, False):
        result = run_module("vm_nat_network", args, netns=node.name, check_mode=check_mode)
        assert result.get("failed") and result["field"] == field and fragment in result["msg"], result
    assert view(node) == before


def test_the_boot_replay_restores_the_bridge_and_chains(runner: tuple[Netns, Netns, Netns]) -> None:
    node, _vm, _outside = runner
    nat_run(node, {})
    converged = view(node)
    node.sh(f"ip link del {BRIDGE} && iptables -F && iptables -X && iptables -t nat -F && iptables -t nat -X"
            " && sysctl -qw net.ipv4.ip_forward=0")
    replayed = replay_boot(node)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert view(node) == converged


def test_absent_keeps_a_bridge_with_a_vm_and_removes_everything_after(
        runner: tuple[Netns, Netns, Netns]) -> None:
    node, vm, _outside = runner
    nat_run(node, {})
    plug_vm(node, vm)
    kept = nat_run(node, {"state": "absent"})
    assert f"delete link {BRIDGE}" not in kept["changes"] and BRIDGE in node.sh("ip -o link show")
    assert "VMNAT" not in node.sh("iptables-save")
    node.sh("ip link del nlvm-t1")
    removed = nat_run(node, {"state": "absent"})
    assert f"delete link {BRIDGE}" in removed["changes"] and BRIDGE not in node.sh("ip -o link show")
    assert not list((persist_root(node.name) / "var/lib/netloom/restore").glob("*vm_nat_network*"))
    assert not nat_run(node, {"state": "absent"})["changed"]


def test_a_foreign_bridge_of_that_name_is_never_taken_over(runner: tuple[Netns, Netns, Netns]) -> None:
    node, _vm, _outside = runner
    node.sh(f"ip link add {BRIDGE} type bridge && ip addr add 172.31.7.1/24 dev {BRIDGE}")
    before = view(node)
    refused = run_module("vm_nat_network", {}, netns=node.name)
    assert refused.get("failed") and refused["field"] == "name" and "no record" in refused["msg"], refused
    kept = nat_run(node, {"state": "absent"})
    assert f"delete link {BRIDGE}" not in kept["changes"] and view(node) == before


def test_on_a_runner_with_the_overlay_the_default_subnet_is_refused_naming_the_route(
        runner: tuple[Netns, Netns, Netns]) -> None:
    node, _vm, _outside = runner
    node.sh("ip link add kohaku-overlay type bridge && ip addr add 10.1.0.1/16 dev kohaku-overlay"
            " && ip link set kohaku-overlay up && ip route add 10.0.0.0/8 via 10.1.0.254")
    refused = run_module("vm_nat_network", {}, netns=node.name)
    assert refused.get("failed") and refused["field"] == "subnet", refused
    assert "the NAT subnet 10.200.0.0/24 overlaps the route 10.0.0.0/8" in refused["msg"], refused
    assert nat_run(node, {"subnet": "192.168.200.0/24"})["gateway"] == "192.168.200.1/24"


def test_a_foreign_bridge_with_a_port_and_no_address_is_not_taken_over(
        runner: tuple[Netns, Netns, Netns]) -> None:
    node, _vm, _outside = runner
    node.sh(f"ip link add {BRIDGE} type bridge && ip link add nic9 type veth peer name nic9p"
            f" && ip link set nic9 master {BRIDGE}")
    before = view(node)
    refused = run_module("vm_nat_network", {}, netns=node.name)
    assert refused.get("failed") and refused["field"] == "name" and "port nic9" in refused["msg"], refused
    assert view(node) == before and "VMNAT" not in node.sh("iptables-save")
