"""netloom_facts on real kernel state in throwaway namespaces, and playbooks/topology.yml end to end.

The state is made by netloom's own modules (overlay_hub, overlay_runner) where they exist and by
hand for what no module on this branch makes yet (a mesh device with static FDB and neighbour
entries, a DNAT chain, a WireGuard peer), then read back through the module as Ansible runs it.
"""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.netns import ROOT, Netns, node_python, run_module, run_module_ok

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

PLAN = "10.0.0.0/8/8/16"
NO_DOCKER = "unix:///nonexistent/topo-docker.sock"
DNAT_RULE = "-d 10.88.0.1/32 -p tcp -m tcp --dport 9000 -j DNAT --to-destination 127.0.0.1:9000"


def underlay(ns: Netns, address: str) -> None:
    ns.sh(f"ip link add u0 type veth peer name u1 && ip link set u0 up && ip link set u1 up"
          f" && ip addr add {address}/24 dev u0")


def link(facts: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in facts["links"]["links"] if entry["name"] == name)


@pytest.fixture
def runner() -> Iterator[Netns]:
    """A runner converged by overlay_runner (id 1, hub 192.0.2.1), plus a mesh device and a DNAT chain."""
    with Netns("topofacts") as ns:
        underlay(ns, "192.0.2.11")
        run_module_ok("overlay_runner", ns, {"plan": PLAN, "runner_id": 1, "hub_underlay_ip": "192.0.2.1",
                                             "underlay_ip": "192.0.2.11"})
        ns.sh("ip link add topomesh type vxlan id 4242 local 192.0.2.11 dstport 4789 nolearning"
              " && ip link set topomesh up"
              " && bridge fdb append 00:00:00:00:00:00 dev topomesh dst 192.0.2.12"
              " && ip neigh add 10.2.0.0 lladdr 0e:00:00:00:00:02 dev topomesh nud permanent")
        ns.sh("iptables -t nat -N NETLOOM-DNAT"
              " && iptables -t nat -A PREROUTING -m comment --comment netloom:NETLOOM-DNAT -j NETLOOM-DNAT"
              f" && iptables -t nat -A NETLOOM-DNAT {DNAT_RULE}")
        yield ns


def test_facts_of_a_converged_runner(runner: Netns) -> None:
    result = run_module("netloom_facts", {"docker_host": NO_DOCKER}, netns=runner.name, check_mode=True)
    assert result["changed"] is False and not result.get("failed"), result
    facts = result["netloom_facts"]

    vxlan0 = link(facts, "vxlan0")
    assert vxlan0["vxlan"] == {"vni": 101, "local": "192.0.2.11", "remote": "192.0.2.1", "port": 4789,
                               "learning": False, "dev": "u0"}
    assert vxlan0["master"] == "kohaku-overlay" and vxlan0["up"] is True
    bridge = link(facts, "kohaku-overlay")
    assert bridge["kind"] == "bridge" and bridge["addresses"] == ["10.1.0.1/16"]
    assert bridge["ports"] == ["vxlan0"]
    mesh = link(facts, "topomesh")
    assert mesh["vxlan"]["remote"] is None and mesh["vxlan"]["vni"] == 4242
    assert {"mac": "00:00:00:00:00:00", "dst": "192.0.2.12"} in mesh["fdb"]
    assert mesh["neighbours"] == [{"dst": "10.2.0.0", "mac": "0e:00:00:00:00:02"}]
    assert "fdb" not in vxlan0  # a hub-and-spoke link's remote is its own attribute
    assert facts["links"]["routes"] == [{"dst": "10.0.0.0/8", "gateway": "10.1.0.254", "proto": 4,
                                         "dev": "kohaku-overlay", "metric": 0, "scope": 0, "netloom": False}]

    chains = {(chain["table"], chain["name"]) for chain in facts["iptables"]["chains"]}
    assert {("filter", "NETLOOM-OVLRUN-FWD"), ("nat", "NETLOOM-OVLRUN-NAT"),
            ("nat", "NETLOOM-DNAT")} <= chains
    hook = '-m comment --comment "netloom:NETLOOM-DNAT" -j NETLOOM-DNAT'
    assert {"table": "nat", "chain": "PREROUTING", "target": "NETLOOM-DNAT",
            "rule": hook} in facts["iptables"]["hooks"]
    assert facts["iptables"]["dnat"] == [{"table": "nat", "chain": "NETLOOM-DNAT", "protocol": "tcp",
                                          "source": None, "destination": "10.88.0.1/32", "dport": "9000",
                                          "in_interface": None, "to_destination": "127.0.0.1:9000"}]

    assert facts["docker"]["available"] is False
    assert "/nonexistent/topo-docker.sock does not exist" in facts["docker"]["reason"]
    entries = facts["restore"]["entries"]
    assert [(entry["module"], entry["phases"]) for entry in entries] == [("overlay_runner", ["early"])]
    assert entries[0]["args"]["runner_id"] == 1 and "rendered" not in entries[0]["args"]


def test_the_unit_fixture_has_the_shape_the_module_returns(runner: Netns) -> None:
    """tests/unit/fixtures/topology was written by hand: its entries carry exactly the real keys."""
    live = run_module("netloom_facts", {"docker_host": NO_DOCKER}, netns=runner.name)["netloom_facts"]
    recorded = json.loads((ROOT / "tests" / "unit" / "fixtures" / "topology" / "facts.json").read_text())
    fixture = recorded["runner1"]["netloom_facts"]
    assert set(fixture) == set(live)
    for name in ("vxlan0", "kohaku-overlay"):
        assert set(link(fixture, name)) == set(link(live, name))
        assert set(link(fixture, name).get("vxlan", {})) == set(link(live, name).get("vxlan", {}))
    assert set(link(fixture, "vxmesh")) == set(link(live, "topomesh"))
    assert set(fixture["links"]["routes"][0]) == set(live["links"]["routes"][0])
    assert set(fixture["iptables"]) == set(live["iptables"])
    assert set(fixture["restore"]["entries"][0]) == set(live["restore"]["entries"][0])


def test_sections_can_be_left_out(runner: Netns) -> None:
    result = run_module("netloom_facts", {"sections": ["links"]}, netns=runner.name)
    assert set(result["netloom_facts"]) == {"hostname", "links"}
    assert result["changed"] is False


def test_a_missing_tool_marks_only_its_section_unavailable(runner: Netns, tmp_path: pathlib.Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With `wg` off the PATH, the other sections are still read and the play is not failed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "bridge"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env_python = tmp_path / "python"
    env_python.write_text(f"#!/bin/sh\nPATH={shlex.quote(str(bin_dir))} "
                          f'exec {shlex.quote(node_python())} "$@"\n')
    env_python.chmod(0o755)
    monkeypatch.setenv("NETLOOM_MODULE_PYTHON", str(env_python))
    result = run_module("netloom_facts", {"docker_host": NO_DOCKER}, netns=runner.name)
    facts = result["netloom_facts"]
    assert not result.get("failed") and facts["links"]["available"] is True
    assert facts["wireguard"] == {"available": False, "reason": "CommandError: `wg` not found: install "
                                                                "wireguard-tools on the node"}
    assert facts["iptables"]["available"] is True and facts["restore"]["available"] is True


@pytest.mark.skipif(not (shutil.which("wireguard-go") and shutil.which("wg")),
                    reason="needs wireguard-go and wireguard-tools (scripts/bootstrap.sh installs them)")
def test_wireguard_peers_without_private_keys(tmp_path: pathlib.Path) -> None:
    name = f"topowg{uuid.uuid4().hex[:4]}"
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True).stdout.strip()
    peer_private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    peer = subprocess.run(["wg", "pubkey"], input=peer_private, capture_output=True, text=True,
                          check=True).stdout.strip()
    key_file = tmp_path / "key"
    key_file.write_text(private + "\n")
    with Netns("topowg") as ns:
        daemon = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns.name}", "wireguard-go", "-f", name],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _attempt in range(100):
                if ns.sh(f"ip link show {name}", check=False):
                    break
                subprocess.run(["sleep", "0.05"], check=True)
            ns.sh(f"wg set {name} listen-port 51999 private-key {key_file} peer {peer}"
                  f" allowed-ips 10.99.0.2/32,10.88.1.0/24 endpoint 192.0.2.22:51820 persistent-keepalive 25"
                  f" && ip addr add 10.99.0.1/24 dev {name} && ip link set {name} up")
            result = run_module("netloom_facts", {"sections": ["links", "wireguard"]}, netns=ns.name)
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)
    text = json.dumps(result)
    assert private not in text and peer_private not in text
    interface = next(wg for wg in result["netloom_facts"]["wireguard"]["interfaces"] if wg["name"] == name)
    assert interface == {"name": name, "public_key": public, "listen_port": 51999,
                         "addresses": ["10.99.0.1/24"],
                         "peers": [{"public_key": peer, "endpoint": "192.0.2.22:51820",
                                    "allowed_ips": ["10.88.1.0/24", "10.99.0.2/32"], "latest_handshake": 0,
                                    "persistent_keepalive": 25}]}


def topology_play(inventory: pathlib.Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [str(pathlib.Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
               str(ROOT / "playbooks" / "topology.yml"), *extra]
    return subprocess.run(command,
                          capture_output=True, text=True, check=False, cwd=ROOT,
                          env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")})


def test_topology_playbook_draws_live_state_and_marks_drift(tmp_path: pathlib.Path) -> None:
    """hub + runner1 converged by the modules, runner2 declared but bare: the picture shows the hub's
    link to runner1 paired from both kernels, and the declared link to runner2 as missing."""
    with Netns("topohub") as hub, Netns("topor1") as runner1, Netns("topor2") as runner2:
        underlay(hub, "192.0.2.1")
        underlay(runner1, "192.0.2.11")
        underlay(runner2, "192.0.2.12")
        runners = [{"name": "runner1", "underlay_ip": "192.0.2.11", "id": 1}]
        run_module_ok("overlay_hub", hub, {"plan": PLAN, "underlay_ip": "192.0.2.1", "runners": runners,
                                           "state_file": str(tmp_path / "runners.json")})
        run_module_ok("overlay_runner", runner1, {"plan": PLAN, "runner_id": 1, "underlay_ip": "192.0.2.11",
                                                  "hub_underlay_ip": "192.0.2.1"})
        hosts = {}
        for label, ns, address in (("hub", hub, "192.0.2.1"), ("runner1", runner1, "192.0.2.11"),
                                   ("runner2", runner2, "192.0.2.12")):
            wrapper = tmp_path / f"python-{label}"
            wrapper.write_text(f"#!/bin/sh\nexec nsenter --net=/run/netns/{ns.name} "
                               f'{shlex.quote(node_python())} "$@"\n')
            wrapper.chmod(0o755)
            hosts[label] = {"ansible_python_interpreter": str(wrapper), "netloom_underlay_ip": address}
        hosts["runner1"]["overlay_runner_id"] = 1
        hosts["runner2"]["overlay_runner_id"] = 2
        shared = {"ansible_connection": "local", "netloom_topology_docker_host": NO_DOCKER}
        inventory = {"all": {"vars": shared,
                             "children": {"overlay_hub": {"hosts": {"hub": hosts["hub"]}},
                                          "overlay_runners": {"hosts": {"runner1": hosts["runner1"],
                                                                        "runner2": hosts["runner2"]}}}}}
        (tmp_path / "inventory.json").write_text(json.dumps(inventory))
        out = tmp_path / "out"
        proc = topology_play(tmp_path / "inventory.json", "-e", f"netloom_topology_out={out}")
        strict = topology_play(tmp_path / "inventory.json", "-e", "netloom_topology_fail_on_drift=true",
                               "-e", f"netloom_topology_out={tmp_path / 'strict'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert strict.returncode != 0 and "missing: vxlan vxlan:hub|runner2:102 on hub" in strict.stdout
    assert (tmp_path / "strict" / "topology.json").exists()  # written before the drift fails the play
    assert f"{out}/topology.svg" in proc.stdout
    model = json.loads((out / "topology.json").read_text())
    edges = {edge["id"]: edge for edge in model["edges"]}
    linked = edges["vxlan:hub|runner1:101"]
    assert linked["status"] == "ok" and linked["declared"] is True
    devices = {end: side["device"] for end, side in linked["sides"].items()}
    assert devices == {"hub": "vxkr1", "runner1": "vxlan0"}
    assert edges["vxlan:hub|runner2:102"]["status"] == "missing"
    drift = {(item["status"], item["kind"], item["node"], item["name"]) for item in model["drift"]}
    assert ("missing", "bridge", "runner2", "kohaku-overlay") in drift
    assert ("unverified", "docker_network", "runner1", "kohakuriver-overlay") in drift
    assert (out / "topology.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (out / "topology.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'subgraph cluster_' in (out / "topology.dot").read_text()


def docker_cli(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.docker
def test_docker_networks_and_netloom_containers() -> None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True,
                                                        check=False).returncode != 0:
        pytest.skip("Docker engine not reachable: start it with `dockerd >/var/log/dockerd.log 2>&1 &`")
    from tests.support.images import busybox_image

    image = busybox_image()
    tag = uuid.uuid4().hex[:8]
    network, task, foreign = f"topo-{tag}", f"kohakuriver-task-topo{tag}", f"topo-foreign-{tag}"
    try:
        docker_cli("network", "create", "--label", "netloom.managed=true", "--label", f"netloom.test={tag}",
                   network)
        for name, labels in ((task, ["netloom.workload.kind=task", "other.label=x"]), (foreign, ["other=y"])):
            docker_cli("run", "-d", "--name", name, "--network", network, "-p", "127.0.0.1::8080",
                       *(arg for label in labels for arg in ("--label", label)), image, "sleep", "600")
        result = run_module("netloom_facts", {"sections": ["docker"]})
        host_port = int(docker_cli("port", task, "8080/tcp").rsplit(":", 1)[1])
        template = f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}'
        address = docker_cli("inspect", "-f", template, task)
        network_id = docker_cli("network", "inspect", "-f", "{{.Id}}", network)
    finally:
        for name in (task, foreign):
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        subprocess.run(["docker", "network", "rm", network], capture_output=True, check=False)
    docker = result["netloom_facts"]["docker"]
    assert docker["available"] is True and result["changed"] is False
    found = next(entry for entry in docker["networks"] if entry["name"] == network)
    assert found["bridge"] == f"br-{network_id[:12]}" and found["driver"] == "bridge"
    assert found["subnet"] and found["gateway"] and found["labels"]["netloom.test"] == tag
    names = [container["name"] for container in docker["containers"]]
    assert task in names and foreign not in names
    container = next(entry for entry in docker["containers"] if entry["name"] == task)
    assert container["state"] == "running" and container["image"] == image
    assert container["labels"] == {"netloom.workload.kind": "task"}
    assert container["networks"][network]["ipv4_address"] == address
    assert {"private": 8080, "public": host_port, "type": "tcp", "ip": "127.0.0.1"} in container["ports"]
