"""docker_bridge_network against the machine's real dockerd, run as Ansible runs it.

Every test gets its own names (nltest-dbn-<id>-...), /24 subnets from the benchmarking
range 198.18.0.0/15 that no Docker network or host address uses, and containers from the
locally imported busybox image; all of it is removed afterwards, whatever the outcome.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.images import busybox_image
from tests.support.netns import run_module

pytestmark = pytest.mark.docker

MODULE = "docker_bridge_network"
TEST_RANGE = ipaddress.IPv4Network("198.18.0.0/15")


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr}{proc.stdout}")
    return proc.stdout.strip()


def sh(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


def used_networks() -> list[ipaddress.IPv4Network]:
    """Subnets of all Docker networks plus every IPv4 address and route on the host."""
    used = []
    for net_id in docker("network", "ls", "-q").split():
        for pool in json.loads(docker("network", "inspect", net_id))[0]["IPAM"]["Config"] or []:
            subnet = ipaddress.ip_network(pool["Subnet"], strict=False)
            if subnet.version == 4:
                used.append(subnet)
    for entry in json.loads(sh("ip", "-4", "-j", "addr")):
        for addr in entry.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    for route in json.loads(sh("ip", "-4", "-j", "route")):
        if route["dst"] != "default":
            used.append(ipaddress.IPv4Network(route["dst"] if "/" in route["dst"] else f"{route['dst']}/32"))
    return used


class DockerLab:
    """Names, subnets, containers and bridges of one test; `cleanup` removes all of them."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.tag = uuid.uuid4().hex[:8]
        self.networks: list[str] = []
        self.bridges: list[str] = []
        self.taken: list[ipaddress.IPv4Network] = []

    def network_name(self, suffix: str = "net") -> str:
        name = f"nltest-dbn-{self.tag}-{suffix}"
        self.networks.append(name)
        return name

    def subnet(self) -> ipaddress.IPv4Network:
        used = used_networks() + self.taken
        candidates = list(TEST_RANGE.subnets(new_prefix=24))
        random.shuffle(candidates)
        for candidate in candidates:
            if not any(candidate.overlaps(other) for other in used):
                self.taken.append(candidate)
                return candidate
        raise AssertionError(f"no free /24 left in {TEST_RANGE}")

    def bridge(self) -> str:
        name = f"nltb{self.tag}"
        self.bridges.append(name)
        sh("ip", "link", "add", name, "type", "bridge")
        sh("ip", "link", "set", name, "up")
        return name

    def container(self, suffix: str, network: str, ip: str | None = None, aliases: tuple[str, ...] = (),
                  start: bool = True) -> str:
        name = f"nltest-dbn-{self.tag}-{suffix}"
        argv = ["run", "-d"] if start else ["create"]
        argv += ["--name", name, "--label", f"netloom.test={self.tag}", "--network", network]
        if ip:
            argv += ["--ip", ip]
        for alias in aliases:
            argv += ["--network-alias", alias]
        docker(*argv, self.image, "sleep", "600")
        return name

    def cleanup(self) -> None:
        for container in docker("ps", "-aq", "--filter", f"label=netloom.test={self.tag}").split():
            docker("rm", "-f", container, check=False)
        for network in self.networks:
            docker("network", "rm", network, check=False)
        for bridge in self.bridges:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


def inspect_network(name: str) -> dict[str, Any] | None:
    found = json.loads(docker("network", "inspect", name, check=False) or "[]")
    return found[0] if found else None


def endpoint(container: str, network: str) -> dict[str, Any]:
    return json.loads(docker("inspect", container))[0]["NetworkSettings"]["Networks"][network]


def dbn(args: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return run_module(MODULE, args, **kwargs)


def warnings_of(result: dict[str, Any]) -> list[str]:
    """Warning texts, whether plain strings or ansible-core 2.19's structured warnings."""
    texts = []
    for warning in result.get("warnings", []):
        texts.append(warning if isinstance(warning, str) else warning.get("event", warning).get("msg", ""))
    return texts


def host(subnet: ipaddress.IPv4Network, index: int) -> str:
    return str(subnet.network_address + index)


@pytest.fixture(scope="module")
def image() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to reach dockerd and create bridges")
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True,
                                                        check=False).returncode != 0:
        pytest.skip("Docker engine not reachable: start it with `dockerd >/var/log/dockerd.log 2>&1 &`")
    return busybox_image()


@pytest.fixture
def lab(image: str) -> Iterator[DockerLab]:
    lab = DockerLab(image)
    try:
        yield lab
    finally:
        lab.cleanup()


def test_create_then_second_run_changes_nothing(lab: DockerLab) -> None:
    name, subnet = lab.network_name(), lab.subnet()
    args = {"name": name, "subnet": str(subnet), "gateway": host(subnet, 1), "labels": {"team": "gpu"}}
    first = dbn(args)
    assert first["changed"] and first["changes"] == [f"create network {name}"]
    live = inspect_network(name)
    assert live is not None and first["network"]["id"] == live["Id"]
    assert live["Labels"] == {"netloom.managed": "true", "team": "gpu"}
    assert live["IPAM"]["Config"] == [{"Subnet": str(subnet), "Gateway": host(subnet, 1)}]
    assert first["network"]["config"]["subnet"] == str(subnet)
    assert (first["recreated"], first["reconnected"]) == (False, [])
    again = dbn(args)
    assert not again["changed"] and again["changes"] == [] and again["differences"] == []
    assert again["network"]["id"] == live["Id"]
    assert again["network"]["config"] == first["network"]["config"]


def test_check_mode_reports_the_creation_and_creates_nothing(lab: DockerLab) -> None:
    name, subnet = lab.network_name(), lab.subnet()
    args = {"name": name, "subnet": str(subnet), "mtu": 1400}
    result = dbn(args, check_mode=True, diff=True)
    assert result["changed"] and result["changes"] == [f"create network {name}"]
    assert result["diff"]["before"] == {}
    assert result["diff"]["after"][f"network {name}"]["mtu"] == 1400
    assert result["network"]["id"] is None
    assert inspect_network(name) is None


def test_changed_field_recreates_and_reconnects_containers_at_their_addresses(lab: DockerLab) -> None:
    name, subnet = lab.network_name(), lab.subnet()
    args = {"name": name, "subnet": str(subnet), "gateway": host(subnet, 1), "mtu": 1500}
    assert dbn(args)["changed"]
    # web gets the second address Docker hands out; reconnected without asking for it, it
    # would get the first (freed with filler), so keeping it proves the address was carried.
    filler = lab.container("filler", name)
    web = lab.container("web", name, aliases=("web-alias",))            # running, address from Docker
    docker("rm", "-f", filler)
    idle = lab.container("idle", name, ip=host(subnet, 9), start=False)  # never started, fixed address
    web_ip = endpoint(web, name)["IPAddress"]
    assert web_ip == host(subnet, 3)
    old_id = inspect_network(name)["Id"]
    wanted = dict(args, mtu=1400)

    preview = dbn(wanted, check_mode=True, diff=True)
    planned = [f"disconnect container {idle} on network {name}",
               f"disconnect container {web} on network {name}",
               f"delete network {name}", f"create network {name}",
               f"connect container {idle} on network {name}",
               f"connect container {web} on network {name}"]
    assert preview["changed"] and preview["changes"] == planned
    assert preview["differences"] == [{"field": "mtu", "current": 1500, "wanted": 1400}]
    assert preview["diff"]["before"][f"network {name}"]["mtu"] == 1500
    assert preview["diff"]["after"][f"network {name}"]["mtu"] == 1400
    assert preview["diff"]["after"][f"container {web} on network {name}"] == {
        "ipv4_address": web_ip, "aliases": ["web-alias"]}
    assert inspect_network(name)["Id"] == old_id, "check mode changed the network"

    result = dbn(wanted)
    assert result["changed"] and result["changes"] == planned
    assert result["recreated"] and result["reconnected"] == [idle, web]
    live = inspect_network(name)
    assert live["Id"] != old_id and result["network"]["id"] == live["Id"]
    assert live["Options"]["com.docker.network.driver.mtu"] == "1400"
    after = endpoint(web, name)
    assert after["IPAddress"] == web_ip and "web-alias" in after["Aliases"]
    assert after["NetworkID"] == live["Id"]
    # Reconnecting gives the container a new interface (eth1...): find it by its address.
    ifnames = [line.split()[1] for line in docker("exec", web, "ip", "-o", "-4", "addr", "show").splitlines()
               if line.split()[3].startswith(f"{web_ip}/")]
    assert len(ifnames) == 1 and docker("exec", web, "cat", f"/sys/class/net/{ifnames[0]}/mtu") == "1400"
    docker("exec", web, "ping", "-c", "1", "-W", "2", host(subnet, 1))
    docker("start", idle)
    assert endpoint(idle, name)["IPAddress"] == host(subnet, 9)
    assert not dbn(wanted)["changed"]


def test_container_that_cannot_keep_its_address_is_readdressed_with_a_warning(lab: DockerLab) -> None:
    name, old_subnet, new_subnet = lab.network_name(), lab.subnet(), lab.subnet()
    assert dbn({"name": name, "subnet": str(old_subnet)})["changed"]
    web = lab.container("web", name)
    result = dbn({"name": name, "subnet": str(new_subnet)})
    assert result["changed"] and result["reconnected"] == [web]
    assert any(web in warning and "cannot keep" in warning for warning in warnings_of(result)), result
    assert ipaddress.IPv4Address(endpoint(web, name)["IPAddress"]) in new_subnet


def test_failed_re_create_restores_the_previous_network_and_its_containers(lab: DockerLab) -> None:
    name, subnet = lab.network_name(), lab.subnet()
    args = {"name": name, "subnet": str(subnet), "gateway": host(subnet, 1)}
    assert dbn(args)["changed"]
    web = lab.container("web", name, aliases=("web-alias",))
    web_ip = endpoint(web, name)["IPAddress"]
    # netloom passes free-form driver options through; Docker rejects this one only at create time.
    broken = dict(args, driver_options={"com.docker.network.bridge.host_binding_ipv4": "bogus"})
    result = dbn(broken)
    assert result.get("failed"), result
    assert "host_binding_ipv4" in result["msg"] and "previous network was restored" in result["msg"]
    live = inspect_network(name)
    assert live["Labels"] == {"netloom.managed": "true"}
    assert live["IPAM"]["Config"] == [{"Subnet": str(subnet), "Gateway": host(subnet, 1)}]
    after = endpoint(web, name)
    assert after["NetworkID"] == live["Id"] and after["IPAddress"] == web_ip
    assert "web-alias" in after["Aliases"]
    assert not dbn(args)["changed"]


def test_recreate_never_fails_listing_every_difference_and_changes_nothing(lab: DockerLab) -> None:
    name, subnet = lab.network_name(), lab.subnet()
    args = {"name": name, "subnet": str(subnet), "gateway": host(subnet, 1)}
    assert dbn(args)["changed"]
    web = lab.container("web", name)
    old_id = inspect_network(name)["Id"]
    result = dbn(dict(args, gateway=host(subnet, 2), masquerade=False, recreate="never"))
    assert result.get("failed"), result
    assert result["differences"] == [
        {"field": "masquerade", "current": True, "wanted": False},
        {"field": "gateway", "current": host(subnet, 1), "wanted": host(subnet, 2)},
    ]
    assert "masquerade" in result["msg"] and "gateway" in result["msg"]
    assert inspect_network(name)["Id"] == old_id
    assert endpoint(web, name)["NetworkID"] == old_id


def test_kohakuriver_shape_on_a_pre_existing_bridge(lab: DockerLab) -> None:
    name, subnet, bridge = lab.network_name(), lab.subnet(), lab.bridge()
    args = {"name": name, "bridge_name": bridge, "subnet": str(subnet), "gateway": host(subnet, 1),
            "aux_addresses": {"kohaku-hub": host(subnet, 2)}, "icc": True, "masquerade": False, "mtu": 1450}
    result = dbn(args)
    assert result["changed"], result
    live = inspect_network(name)
    assert live["Options"]["com.docker.network.bridge.name"] == bridge
    assert live["IPAM"]["Config"][0]["AuxiliaryAddresses"] == {"kohaku-hub": host(subnet, 2)}
    bridge_addrs = json.loads(sh("ip", "-4", "-j", "addr", "show", "dev", bridge))[0]["addr_info"]
    assert f"{host(subnet, 1)}/24" in {f"{a['local']}/{a['prefixlen']}" for a in bridge_addrs}
    # Docker allocates in order: the reserved hub address is skipped.
    web = lab.container("web", name)
    assert endpoint(web, name)["IPAddress"] == host(subnet, 3)
    assert json.loads(sh("ip", "-j", "link", "show", "master", bridge)), "no veth on the existing bridge"
    docker("exec", web, "ping", "-c", "1", "-W", "2", host(subnet, 1))
    assert f"-s {subnet} ! -o {bridge} -j MASQUERADE" not in sh("iptables", "-t", "nat", "-S", "POSTROUTING")
    assert not dbn(args)["changed"]

    removed = dbn({"name": name, "state": "absent", "force": True})
    assert removed["changed"]
    assert removed["changes"] == [f"disconnect container {web} on network {name}", f"delete network {name}"]
    assert inspect_network(name) is None
    assert json.loads(sh("ip", "-j", "link", "show", "dev", bridge)), "Docker deleted the pre-existing bridge"


def test_network_not_made_by_netloom_is_refused_unless_adopted(lab: DockerLab) -> None:
    name, subnet = lab.network_name(), lab.subnet()
    docker("network", "create", "--subnet", str(subnet), name)
    foreign_id = inspect_network(name)["Id"]
    for args in ({"name": name, "subnet": str(subnet)}, {"name": name, "state": "absent"}):
        refused = dbn(args)
        assert refused.get("failed") and refused["field"] == "name", refused
        assert "adopt" in refused["msg"] and "netloom.managed" in refused["msg"]
        assert inspect_network(name)["Id"] == foreign_id
    adopted = dbn({"name": name, "subnet": str(subnet), "adopt": True})
    assert adopted["changed"] and adopted["recreated"]
    assert adopted["differences"] == [
        {"field": "labels", "current": {}, "wanted": {"netloom.managed": "true"}}]
    assert inspect_network(name)["Labels"] == {"netloom.managed": "true"}
    assert not dbn({"name": name, "subnet": str(subnet)})["changed"]


def test_absent_refuses_attached_containers_unless_forced(lab: DockerLab) -> None:
    name, subnet = lab.network_name(), lab.subnet()
    assert dbn({"name": name, "subnet": str(subnet)})["changed"]
    web = lab.container("web", name)
    refused = dbn({"name": name, "state": "absent"})
    assert refused.get("failed") and refused["field"] == "force" and web in refused["msg"]
    assert endpoint(web, name)["IPAddress"]
    preview = dbn({"name": name, "state": "absent", "force": True}, check_mode=True)
    assert preview["changed"] and inspect_network(name) is not None
    removed = dbn({"name": name, "state": "absent", "force": True})
    assert removed["changed"] and removed["network"] == {"id": None, "name": name, "config": None}
    assert inspect_network(name) is None
    assert json.loads(docker("inspect", web))[0]["State"]["Running"], "the container itself was touched"
    assert not dbn({"name": name, "state": "absent"})["changed"]


def test_ip_range_hands_out_addresses_from_the_range(lab: DockerLab) -> None:
    name, subnet = lab.network_name(), lab.subnet()
    ip_range = list(subnet.subnets(new_prefix=25))[1]
    args = {"name": name, "subnet": str(subnet), "gateway": host(subnet, 1), "ip_range": str(ip_range)}
    assert dbn(args)["changed"]
    web = lab.container("web", name)
    assert ipaddress.IPv4Address(endpoint(web, name)["IPAddress"]) in ip_range
    assert not dbn(args)["changed"]


def test_subnet_overlapping_another_network_is_refused_before_anything_is_removed(lab: DockerLab) -> None:
    first, second = lab.network_name("a"), lab.network_name("b")
    subnet_a, subnet_b = lab.subnet(), lab.subnet()
    assert dbn({"name": first, "subnet": str(subnet_a)})["changed"]
    assert dbn({"name": second, "subnet": str(subnet_b)})["changed"]
    second_id = inspect_network(second)["Id"]
    result = dbn({"name": second, "subnet": str(subnet_a)})
    assert result.get("failed") and result["field"] == "subnet" and first in result["msg"]
    assert inspect_network(second)["Id"] == second_id


@pytest.mark.parametrize("bad,field", [
    ({"subnet": "198.18.0.1/24"}, "subnet"),
    ({"subnet": "198.18.0.0/24", "gateway": "198.18.1.1"}, "gateway"),
    ({"subnet": "198.18.0.0/24", "ip_range": "198.18.0.0/23"}, "ip_range"),
    ({"subnet": "198.18.0.0/24", "gateway": "198.18.0.1", "aux_addresses": {"hub": "198.18.0.1"}},
     "aux_addresses.hub"),
    ({"bridge_name": "a-name-too-long16"}, "bridge_name"),
    ({"mtu": 67}, "mtu"),
    ({"mtu": 65536}, "mtu"),
    ({"name": ""}, "name"),
])
def test_bad_input_fails_naming_field_and_value_and_creates_nothing(lab: DockerLab, bad: dict[str, Any],
                                                                    field: str) -> None:
    name = lab.network_name()
    args = dict({"name": name}, **bad)
    result = dbn(args)
    assert result.get("failed"), result
    assert result["field"] == field
    given = bad.get(field.split(".")[0])
    expected = given[field.split(".")[1]] if isinstance(given, dict) else given
    assert result["value"] == str(expected)
    assert inspect_network(name) is None
