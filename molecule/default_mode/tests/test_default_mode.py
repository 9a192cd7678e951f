"""Verify KohakuRiver's Default mode after the overlay was turned off.

The overlay was converged first (prepare.yml); converge with netloom_overlay_enabled:
false must leave no overlay link, route, rule or Docker network behind, and the isolated
per-runner network must still work, with Docker NAT as the way out.
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
    node,
    topology_node,
)

OUTSIDE = "198.51.100.10"


def test_hub_has_no_overlay_left() -> None:
    hub = node("hub")
    links = {link["ifname"] for link in json.loads(hub.check_output("ip -j link show"))}
    assert not {name for name in links if name.startswith("vxkr")}
    assert "kohaku-host" not in links
    assert "netloom" not in hub.check_output("iptables-save")


@pytest.mark.parametrize("runner_name", ["runner1", "runner2"])
def test_runner_has_only_the_isolated_network(runner_name: str) -> None:
    runner = node(runner_name)
    links = {link["ifname"] for link in json.loads(runner.check_output("ip -j link show"))}
    assert "vxlan0" not in links and "kohaku-overlay" not in links
    assert runner.check_output("ip route show 10.0.0.0/8") == ""
    assert "netloom" not in runner.check_output("iptables-save")
    networks = runner.check_output("docker network ls --format '{{.Name}}'").split()
    assert "kohakuriver-overlay" not in networks
    default = json.loads(runner.check_output("docker network inspect kohakuriver-net"))[0]
    assert default["IPAM"]["Config"][0]["Subnet"] == "172.30.0.0/16"
    assert default["IPAM"]["Config"][0]["Gateway"] == "172.30.0.1"


def test_workload_reaches_its_runner_and_the_outside_through_docker_nat() -> None:
    runner = node("runner1")
    workload = HttpContainer(runner, "kohakuriver-net", "netloom-ok")
    try:
        assert workload.ip.startswith("172.30.")
        assert workload.run("ping -c 1 -W 2 172.30.0.1").rc == 0
        # Docker's own NAT: the outside node sees the runner's underlay address.
        assert workload.http_get(OUTSIDE) == "192.0.2.11"
        # No overlay: the hub's anchor address is not reachable from a workload.
        assert workload.run("ping -c 1 -W 2 10.0.0.1").rc != 0
    finally:
        workload.remove()


def test_check_mode_after_converge_reports_no_change() -> None:
    assert_check_mode_reports_no_change({"hub", "runner1", "runner2"})


def test_picture_shows_only_the_isolated_networks() -> None:
    """The picture play's JSON, drawn from live state with the declarations converge used
    (netloom_overlay_enabled=false), shows each runner's isolated Docker network and nothing of the
    overlay: no VXLAN link, bridge, netloom chain or restore entry of the overlay modules; no drift."""
    model = draw_topology({"netloom_overlay_enabled": False})
    assert_no_drift(model)
    assert model["edges"] == []
    for name in ("hub", "runner1", "runner2"):
        item = topology_node(model, name)
        assert item["vxlan"] == [] and item["chains"] == [], item
        assert not {"kohaku-host", "kohaku-overlay"} & set(by_name(item["bridges"])), item["bridges"]
        assert not [entry for entry in item["restore"] if str(entry["module"]).startswith("overlay_")], item
    for name in ("runner1", "runner2"):
        networks = by_name(topology_node(model, name)["docker_networks"])
        assert "kohakuriver-overlay" not in networks
        assert (networks["kohakuriver-net"]["subnet"], networks["kohakuriver-net"]["gateway"]) == (
            "172.30.0.0/16", "172.30.0.1")
