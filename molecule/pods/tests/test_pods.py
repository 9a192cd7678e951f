"""Verify Pinacle pods on the lab by real traffic from outside the pods.

Runs after converge, again after the pod host's reboot (nothing re-applied), and after the side
effect broke things and converge repaired them, so every assertion also proves the repair.
The client runs on the `outside` node against the pod host's published ports.
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
    assert_check_mode_reports_no_change,
    assert_no_drift,
    by_name,
    draw_topology,
    inventory_hostvars,
    node_fixture,
    topology_node,
)

POD_HOST = "192.168.251.10"
OUTSIDE_PUBLIC = "192.88.99.10"
OUTSIDE_PRIVATE = "192.168.251.254"  # a lab node's RFC1918 address
CLIENT = pathlib.Path(__file__).resolve().parents[3] / "tests" / "support" / "pod_client.py"

podhost = node_fixture("podhost")
outside = node_fixture("outside")


@pytest.fixture(scope="module")
def pods(podhost) -> dict[str, dict]:
    """Each pod's labels and address, read from the pod host's Docker."""
    found = {}
    for pod in ("a", "b"):
        data = json.loads(podhost.check_output(f"docker inspect pinacle-pod-{pod}"))[0]
        assert data["State"]["Running"], f"pod {pod} is not running"
        labels = data["Config"]["Labels"]
        found[pod] = {"port": int(labels["netloom.pod.port"]), "subnet": labels["netloom.pod.subnet"],
                      "address": data["NetworkSettings"]["Networks"][f"pinacle-pod-{pod}"]["IPAddress"]}
    return found


@pytest.fixture(scope="module")
def client(outside):
    """The stdlib pod client, copied to the outside node."""
    outside.run("install -d -m 0755 /tmp/netloom-pods")
    text = CLIENT.read_text()
    result = outside.run(f"cat > /tmp/netloom-pods/pod_client.py <<'NETLOOM_EOF'\n{text}NETLOOM_EOF")
    assert result.rc == 0, result.stderr

    def run(*args: str):
        return outside.run("python3 /tmp/netloom-pods/pod_client.py " + " ".join(args))

    return run


def get(client, port: int, host: str) -> tuple[int, str]:
    result = client("get", POD_HOST, str(port), host)
    assert result.rc == 0, result.stderr
    status, _, body = result.stdout.partition("\n")
    return int(status), body


def test_pods_have_their_own_subnets_and_ports(pods):
    assert pods["a"]["subnet"] != pods["b"]["subnet"] and pods["a"]["port"] != pods["b"]["port"]
    for pod in pods.values():
        assert pod["address"] == pod["subnet"].replace(".0/24", ".2")
        assert 30000 <= pod["port"] <= 39999


@pytest.mark.parametrize(("hostname", "service"), [
    ("localhost-3000.pod-a.localhost", "app"),
    ("localhost-8726.pod-a.localhost", "code"),
    ("localhost-8726-pod-a.localhost", "code"),
])
def test_hostnames_reach_the_declared_services(client, pods, hostname, service):
    status, body = get(client, pods["a"]["port"], hostname)
    assert status == 200, body
    answer = json.loads(body)
    assert (answer["service"], answer["pod"]) == (service, "a")
    assert answer["x_real_ip"] == answer["x_forwarded_for"] == "192.168.251.254"


def test_websocket_echo_through_nginx(client, pods):
    result = client("ws", POD_HOST, str(pods["a"]["port"]), "localhost-8765.pod-a.localhost", "hello-pod-a")
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == "hello-pod-a"


def test_undeclared_port_gets_404_naming_it_and_80_never_loops(client, pods):
    for port in ("5432", "80", "x1"):
        status, body = get(client, pods["a"]["port"], f"localhost-{port}.pod-a.localhost")
        assert status == 404 and f"port {port} " in body


def test_another_pods_slug_gets_421(client, pods):
    assert get(client, pods["a"]["port"], "localhost-3000.pod-b.localhost")[0] == 421
    status, body = get(client, pods["b"]["port"], "localhost-3000.pod-b.localhost")
    assert status == 200 and json.loads(body)["pod"] == "b"


def test_pods_cannot_reach_each_other(podhost, pods):
    for source, target in (("a", "b"), ("b", "a")):
        result = podhost.run(f"docker exec pinacle-pod-{source} curl -s -m 3 http://{pods[target]['address']}/")
        assert result.rc != 0, f"pod {source} reached pod {target}"
    # ...while the host reaches both (the addresses are live)
    for pod in pods.values():
        assert podhost.run(f"curl -s -m 3 -o /dev/null http://{pod['address']}/").rc == 0


def echo_from(podhost, pod: str, address: str):
    return podhost.run(f"docker exec pinacle-pod-{pod} curl -s -m 3 http://{address}:8080/")


def test_no_private_egress_reaches_the_internet_but_not_private_addresses(podhost):
    public = echo_from(podhost, "a", OUTSIDE_PUBLIC)
    assert public.rc == 0 and public.stdout.strip() == POD_HOST  # masqueraded by the pod host
    assert echo_from(podhost, "a", OUTSIDE_PRIVATE).rc != 0
    # pod b has open egress: the same private address answers it
    assert echo_from(podhost, "b", OUTSIDE_PRIVATE).rc == 0
    rules = podhost.check_output("iptables -S NETLOOM-POD-A")
    assert "-d 169.254.0.0/16 -i pod-a" in rules


def test_check_mode_after_converge_reports_no_change():
    assert_check_mode_reports_no_change({"podhost"})


def test_picture_shows_each_pod_with_its_network_and_external_port(pods):
    """The picture play's JSON, drawn from live state, is what this scenario built: exactly the
    declared pods, each running on its own Docker network (its subnet, the pod at .2) with its
    external port published to the pod's router on :80, as Docker reports them; and no drift."""
    declared = sorted(pod["id"] for pod in inventory_hostvars()["podhost"]["pod_host_pods"])
    model = draw_topology()
    assert_no_drift(model)
    podhost = topology_node(model, "podhost")
    containers = by_name(podhost["containers"])
    assert sorted(containers) == [f"pinacle-pod-{pod}" for pod in declared]
    networks = by_name(podhost["docker_networks"])
    for pod in declared:
        name = f"pinacle-pod-{pod}"
        container = containers[name]
        assert (container["kind"], container["state"]) == ("pod", "running")
        assert container["labels"]["netloom.pod"] == pod
        assert container["labels"]["netloom.pod.subnet"] == pods[pod]["subnet"]
        assert list(container["networks"]) == [name]
        assert container["networks"][name]["ipv4_address"] == pods[pod]["address"]
        assert networks[name]["subnet"] == pods[pod]["subnet"]
        assert networks[name]["gateway"] == pods[pod]["subnet"].replace(".0/24", ".1")
        # One binding (Docker may list it once per address family).
        published = {(port["private"], port["public"], port["type"])
                     for port in container["ports"] if port["public"]}
        assert published == {(80, pods[pod]["port"], "tcp")}, container["ports"]
    assert len({networks[f"pinacle-pod-{pod}"]["subnet"] for pod in declared}) == len(declared)
