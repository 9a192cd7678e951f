"""Verify KohakuRiver's Default mode after the overlay was turned off.

The overlay was converged first (prepare.yml); converge with netloom_overlay_enabled:
false must leave no overlay link, route, rule or Docker network behind, and the isolated
per-runner network must still work, with Docker NAT as the way out.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import testinfra

INVENTORY = str(pathlib.Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
SCENARIO = pathlib.Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
IMAGE = "netloom-lab/busybox:latest"
RECAP = re.compile(r"^(\S+)\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def node(name: str) -> testinfra.host.Host:
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


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
    name = "nltest-default"
    runner.run(f"docker rm -f {name}")
    runner.check_output(f"docker run -d --name {name} --network kohakuriver-net {IMAGE} sleep 300")
    try:
        template = '{{(index .NetworkSettings.Networks "kohakuriver-net").IPAddress}}'
        address = runner.check_output(f"docker inspect -f '{template}' {name}")
        assert address.startswith("172.30.")
        assert runner.run(f"docker exec {name} ping -c 1 -W 2 172.30.0.1").rc == 0
        request = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 198.51.100.10 8080"
        reply = runner.run(f"docker exec {name} sh -c \"{request}\"")
        assert reply.rc == 0, reply.stderr
        assert reply.stdout.partition("\r\n\r\n")[2].strip() == "192.0.2.11"
        # No overlay: the hub's anchor address is not reachable from a workload.
        assert runner.run(f"docker exec {name} ping -c 1 -W 2 10.0.0.1").rc != 0
    finally:
        runner.run(f"docker rm -f {name}")


def test_check_mode_after_converge_reports_no_change() -> None:
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    playbook = pathlib.Path(sys.executable).parent / "ansible-playbook"
    argv = [str(playbook), "-i", INVENTORY, "--check", "--diff", str(SCENARIO / "converge.yml")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    recap = {host: (int(changed), int(unreachable), int(failed))
             for host, changed, unreachable, failed in RECAP.findall(proc.stdout)}
    assert {"hub", "runner1", "runner2"} <= set(recap), proc.stdout[-2000:]
    changed = {host: counts for host, counts in recap.items() if counts != (0, 0, 0)}
    assert not changed, f"check mode after converge reported changes: {changed}\n{proc.stdout[-4000:]}"
