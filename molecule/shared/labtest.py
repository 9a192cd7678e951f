"""What the molecule scenarios' testinfra verifiers share: the lab's nodes, busybox containers
serving HTTP on a node's Docker network, and the converge playbook run again in check mode.

A verifier imports it after putting this directory on sys.path (it is not a package).
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest
import testinfra

INVENTORY = str(pathlib.Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
SCENARIO = pathlib.Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
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


def assert_check_mode_reports_no_change(hosts: set[str]) -> None:
    """Run the scenario's converge playbook with --check --diff: every host (at least `hosts`)
    must end with changed=0, unreachable=0, failed=0 in the recap."""
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    playbook = pathlib.Path(sys.executable).parent / "ansible-playbook"
    argv = [str(playbook), "-i", INVENTORY, "--check", "--diff", str(SCENARIO / "converge.yml")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    recap = {host: (int(changed), int(unreachable), int(failed))
             for host, changed, unreachable, failed in RECAP.findall(proc.stdout)}
    assert hosts <= set(recap), proc.stdout[-4000:]
    changed = {host: counts for host, counts in recap.items() if counts != (0, 0, 0)}
    assert not changed, f"check mode after converge reported (changed, unreachable, failed): {changed}\n" \
        f"{proc.stdout[-6000:]}"
