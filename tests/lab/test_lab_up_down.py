"""A whole (small) lab through the real CLI: up, reach it as Ansible does, re-run, repair, down.

Needs root and the local dockerd; builds the node image first if the engine lacks it (a few
minutes, once). Uses its own lab name and subnets from 100.64.0.0/10 (shared address space),
so it runs next to the overlay lab and the module tests' 198.18.0.0/15 networks.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CLI = [sys.executable, str(REPO / "lab" / "netloom_lab.py")]
LAB = "labtest"
WORKLOAD = "netloom-lab/busybox:latest"
ECHO_URL = "http://100.127.11.10:8080/"
TOPOLOGY = {
    "name": LAB,
    "networks": {"lan": {"subnet": "100.127.10.0/24"}, "wan": {"subnet": "100.127.11.0/24"}},
    "nodes": {
        "client": {"groups": ["clients"], "docker": True, "networks": {"lan": "100.127.10.10"},
                   "routes": [{"to": "default", "via": "100.127.10.254"}], "vars": {"client_id": 1}},
        "edge": {"groups": ["edges"], "networks": {"lan": "100.127.10.254", "wan": "100.127.11.10"},
                 "routes": [{"to": "default", "state": "absent"}], "sysctls": {"net.ipv4.ip_forward": 0},
                 "services": {"echo": {"address": "100.127.11.10", "port": 8080}}},
    },
}

pytestmark = pytest.mark.docker


def engine() -> docker.DockerClient:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (iptables, docker)")
    try:
        client = docker.from_env(version="auto")
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"no Docker engine: {exc}")
    return client


def lab_cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, f"netloom_lab.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result


def node_exec(client: docker.DockerClient, node: str, command: str) -> tuple[int, str]:
    result = client.containers.get(f"netloom-{LAB}-{node}").exec_run(["sh", "-c", command])
    return result.exit_code, result.output.decode()


def lab_objects(client: docker.DockerClient) -> dict[str, list[str]]:
    selector = {"label": f"netloom.lab={LAB}"}
    return {"containers": [c.name for c in client.containers.list(all=True, filters=selector)],
            "networks": [n.name for n in client.networks.list(filters=selector)],
            "volumes": [v.name for v in client.volumes.list(filters=selector)]}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    client = engine()
    work = tmp_path_factory.mktemp("lab")
    topology = work / "labtest.yml"
    topology.write_text(yaml.safe_dump(TOPOLOGY))
    paths = {"topology": topology, "inventory": work / "inventory" / "hosts.yml",
             "molecule": work / "instance_config.yml"}
    first = lab_cli("up", "--topology", str(topology), "--inventory-file", str(paths["inventory"]),
                    "--molecule-instance-config", str(paths["molecule"]))
    yield {"client": client, "first_up": first.stdout, **paths}
    subprocess.run([*CLI, "down", "--topology", str(topology), "--inventory-file", str(paths["inventory"])],
                   check=False, capture_output=True, timeout=300)


def up_again(lab: dict[str, Any]) -> str:
    return lab_cli("up", "--topology", str(lab["topology"]), "--inventory-file", str(lab["inventory"])).stdout


def test_inventory_and_molecule_config_describe_the_nodes(lab: dict[str, Any]) -> None:
    inventory = yaml.safe_load(lab["inventory"].read_text())["all"]
    assert inventory["vars"] == {"netloom_lab": LAB}
    assert inventory["children"] == {"clients": {"hosts": {"client": None}},
                                     "edges": {"hosts": {"edge": None}}}
    client_vars = inventory["hosts"]["client"]
    assert client_vars["netloom_underlay_ip"] == "100.127.10.10"
    assert client_vars["client_id"] == 1
    interface = client_vars["netloom_underlay_interface"]
    _, links = node_exec(lab["client"], "client", f"ip -j -4 addr show dev {interface}")
    assert [info["local"] for info in json.loads(links)[0]["addr_info"]] == ["100.127.10.10"]
    instances = yaml.safe_load(lab["molecule"].read_text())
    assert [(i["instance"], i["port"]) for i in instances] == [
        (name, inventory["hosts"][name]["ansible_port"]) for name in ("client", "edge")]


def test_ansible_reaches_every_node_over_ssh(lab: dict[str, Any]) -> None:
    result = subprocess.run([str(REPO / ".venv" / "bin" / "ansible"), "-i", str(lab["inventory"]), "all",
                             "-m", "ansible.builtin.command", "-a", "hostname"],
                            capture_output=True, text=True, check=False, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client | CHANGED | rc=0 >>\nclient\n" in result.stdout
    assert "edge | CHANGED | rc=0 >>\nedge\n" in result.stdout


def test_routes_sysctls_and_echo_through_the_edge_node(lab: dict[str, Any]) -> None:
    client = lab["client"]
    assert node_exec(client, "client", "ip -4 route show default")[1].strip().startswith(
        "default via 100.127.10.254")
    assert node_exec(client, "edge", "ip -4 route show default") == (0, "")
    assert node_exec(client, "edge", "cat /proc/sys/net/ipv4/ip_forward") == (0, "0\n")
    # The client's packet crosses the lan bridge to the edge node, which answers from its wan address.
    assert node_exec(client, "client", f"curl -s --max-time 5 {ECHO_URL}") == (0, "100.127.10.10\n")


def test_docker_node_runs_the_workload_image_and_others_do_not_run_dockerd(lab: dict[str, Any]) -> None:
    client = lab["client"]
    code, output = node_exec(client, "client", f"docker run --rm {WORKLOAD} ip -o link show lo")
    assert code == 0 and "lo:" in output, output
    states = node_exec(client, "edge", "systemctl is-active docker haproxy nginx")[1]
    assert states.split() == ["inactive"] * 3


def test_up_again_changes_nothing(lab: dict[str, Any]) -> None:
    client = lab["client"]
    before = {c.name: c.id for c in client.containers.list(filters={"label": f"netloom.lab={LAB}"})}
    inventory = lab["inventory"].read_text()
    output = up_again(lab)
    after = {c.name: c.id for c in client.containers.list(filters={"label": f"netloom.lab={LAB}"})}
    assert after == before
    assert "created" not in output and "removed" not in output and "imported" not in output, output
    assert lab["inventory"].read_text() == inventory


def test_up_repairs_drift(lab: dict[str, Any]) -> None:
    client = lab["client"]
    node_exec(client, "client", "ip route del default; docker rmi netloom-lab/busybox:latest")
    node_exec(client, "edge", "systemctl stop netloom-lab-echo@100.127.11.10:8080.service")
    output = up_again(lab)
    assert "node client: imported netloom-lab/busybox:latest" in output
    assert node_exec(client, "client", f"curl -s --max-time 5 {ECHO_URL}") == (0, "100.127.10.10\n")


def test_up_starts_a_stopped_node_and_updates_its_ssh_port(lab: dict[str, Any]) -> None:
    client = lab["client"]
    client.containers.get(f"netloom-{LAB}-edge").stop(timeout=5)
    output = up_again(lab)
    assert f"container netloom-{LAB}-edge: started" in output
    assert node_exec(client, "client", f"curl -s --max-time 5 {ECHO_URL}") == (0, "100.127.10.10\n")
    bound = client.containers.get(f"netloom-{LAB}-edge").attrs["NetworkSettings"]["Ports"]["22/tcp"][0]
    inventory = yaml.safe_load(lab["inventory"].read_text())
    assert inventory["all"]["hosts"]["edge"]["ansible_port"] == int(bound["HostPort"])


def test_down_removes_everything_the_lab_made(lab: dict[str, Any]) -> None:
    client = lab["client"]
    assert lab_objects(client)["volumes"] == [f"netloom-{LAB}-client-docker"]
    lab_cli("down", "--topology", str(lab["topology"]), "--inventory-file", str(lab["inventory"]))
    assert lab_objects(client) == {"containers": [], "networks": [], "volumes": []}
    assert not lab["inventory"].exists()
    rules = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True,
                           check=True).stdout
    assert f"netloom-lab:{LAB}" not in rules
    again = lab_cli("down", "--topology", str(lab["topology"]), "--inventory-file", str(lab["inventory"]))
    assert "removed" not in again.stdout
