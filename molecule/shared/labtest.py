"""What the molecule scenarios' testinfra verifiers share: the lab's nodes, busybox containers
serving HTTP on a node's Docker network, the converge playbook run again in check mode, and the
picture play (playbooks/topology.yml) run against the scenario's inventory.

A verifier imports it after putting this directory on sys.path (it is not a package).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest
import testinfra

INVENTORY = str(pathlib.Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
SCENARIO = pathlib.Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
PROJECT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = "netloom-lab/busybox:latest"
RECAP = re.compile(r"^(\S+)\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def node(name: str) -> testinfra.host.Host:
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


def node_fixture(name: str) -> Callable[[], testinfra.host.Host]:
    """A module-scoped fixture named `name` giving that lab node; assign it to that name in a test file."""

    @pytest.fixture(scope="module", name=name)
    def lab_node() -> testinfra.host.Host:
        """The lab node of that name, reached over the scenario's Ansible inventory."""
        return node(name)

    return lab_node


class HttpContainer:
    """A busybox container on a node's Docker network serving `body` as /index.html on :8080."""

    def __init__(self, host: testinfra.host.Host, network: str, body: str) -> None:
        self.host = host
        self.name = f"nltest-{uuid.uuid4().hex[:6]}"
        host.check_output(
            f"docker run -d --name {self.name} --network {network} {IMAGE} "
            f"sh -c 'echo {body} > /tmp/index.html; httpd -f -p 8080 -h /tmp'")
        template = f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}'
        self.ip = host.check_output(f"docker inspect -f '{template}' {self.name}")

    def run(self, command: str) -> testinfra.backend.base.CommandResult:
        return self.host.run(f"docker exec {self.name} {command}")

    def http_get(self, address: str, path: str = "/") -> str:
        """Body of an HTTP/1.0 GET sent with busybox nc (Debian's static busybox wget crashes)."""
        request = f"printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {address} 8080"
        result = self.host.run(f"docker exec {self.name} sh -c \"{request}\"")
        assert result.rc == 0, f"GET {address}:8080{path} failed: {result.stderr}"
        head, _, body = result.stdout.partition("\r\n\r\n")
        assert head.startswith("HTTP/1."), f"no HTTP reply from {address}: {result.stdout!r}"
        return body.strip()

    def remove(self) -> None:
        self.host.run(f"docker rm -f {self.name}")


def run_ansible(tool: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """An Ansible command line tool of this virtualenv against the scenario's inventory, with the
    environment molecule gave the verifier (its ansible.cfg: library, module_utils, plugin paths)."""
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    argv = [str(pathlib.Path(sys.executable).parent / tool), "-i", INVENTORY, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=timeout)


def assert_check_mode_reports_no_change(hosts: set[str]) -> None:
    """Run the scenario's converge playbook with --check --diff: every host (at least `hosts`)
    must end with changed=0, unreachable=0, failed=0 in the recap."""
    proc = run_ansible("ansible-playbook", "--check", "--diff", str(SCENARIO / "converge.yml"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    recap = {host: (int(changed), int(unreachable), int(failed))
             for host, changed, unreachable, failed in RECAP.findall(proc.stdout)}
    assert hosts <= set(recap), proc.stdout[-4000:]
    changed = {host: counts for host, counts in recap.items() if counts != (0, 0, 0)}
    assert not changed, f"check mode after converge reported (changed, unreachable, failed): {changed}\n" \
        f"{proc.stdout[-6000:]}"


def inventory_hostvars() -> dict[str, dict]:
    """Every host's variables as the scenario's inventory declares them (ansible-inventory --list),
    so that a verifier compares live state with the inventory instead of retyping its values."""
    proc = run_ansible("ansible-inventory", "--list", timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)["_meta"]["hostvars"]


def draw_topology(extra_vars: dict | None = None) -> dict:
    """Run the picture play (playbooks/topology.yml) against the scenario's nodes and return its model.

    Writes into MOLECULE_EPHEMERAL_DIRECTORY/topology, emptied first so that every verify run
    shows only what it gathered itself; topology.json, .svg and .png must be there and non-empty.
    Not cached: scenarios verify again after side effects, and each verify reads live state anew.
    `extra_vars` are what the scenario's converge passed to its playbook (e.g. Default mode's
    netloom_overlay_enabled=false), so that the model's drift is judged against the same declarations.
    """
    out = pathlib.Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "topology"
    shutil.rmtree(out, ignore_errors=True)
    args = [str(PROJECT / "playbooks" / "topology.yml"), "-e", json.dumps({"netloom_topology_out": str(out)})]
    if extra_vars:
        args += ["-e", json.dumps(extra_vars)]
    proc = run_ansible("ansible-playbook", *args)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    for name in ("topology.json", "topology.svg", "topology.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"the picture play did not write {path}"
    return json.loads((out / "topology.json").read_text())


def topology_node(model: dict, name: str) -> dict:
    """One node of the topology model, by inventory name."""
    found = [item for item in model["nodes"] if item["name"] == name]
    assert len(found) == 1, f"{name} is not one model node: {[item['name'] for item in model['nodes']]}"
    return found[0]


def topology_edges(model: dict, kind: str) -> dict[frozenset[str], dict]:
    """The model's links of one kind (vxlan, mesh, wireguard), keyed by their two ends."""
    return {frozenset((edge["a"], edge["b"])): edge for edge in model["edges"] if edge["kind"] == kind}


def by_name(items: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in items}


def assert_no_drift(model: dict) -> None:
    """Every node was read, every declared item and link is there, nothing undeclared drawn."""
    summary = model["summary"]
    assert summary["nodes_without_facts"] == [], summary
    assert not summary["drift"] and summary["missing"] == 0 and summary["extra"] == 0, \
        [item["text"] for item in model["drift"]]
    assert model["drift"] == []
    assert all(edge["status"] in ("ok", "external") for edge in model["edges"]), model["edges"]
    for item in model["nodes"]:
        assert item["status"] == "ok", item
