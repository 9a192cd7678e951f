"""Verify the Edge Serverless Box lab by real traffic, not by reading config back.

Runs after converge and again after the side effect broke things (a DNAT rule deleted,
the HAProxy config edited by hand, a route and a WireGuard peer removed on the control
node) and converge repaired them, so every assertion here also proves the repair.
"""
from __future__ import annotations

import base64
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
    inventory_hostvars,
    node,
    node_fixture,
    topology_edges,
    topology_node,
)

CA = "/etc/docker/certs.d/10.99.0.1:5010/ca.crt"

# Sends one hand-made TCP SYN out of an interface to a given MAC and IP (what a neighbour
# can do: put any destination address in a frame addressed to the node), then reports
# whether anything answered from that address and port. Python's stdlib only (the node
# has no scapy): AF_PACKET to send and to listen.
PROBE = r'''
import os, socket, struct, sys, time
iface, dst_mac, src_ip, dst_ip, dst_port = sys.argv[1:6]
dst_port = int(dst_port)
def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF
src_port = 40000 + os.getpid() % 20000
src, dst = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
tcp = struct.pack("!HHIIBBHHH", src_port, dst_port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
tcp = tcp[:16] + struct.pack("!H", checksum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst)
ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
my_mac = open(f"/sys/class/net/{iface}/address").read().strip()
macs = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(my_mac.replace(":", ""))
frame = macs + b"\x08\x00" + ip + tcp
listener = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
listener.bind((iface, 0))
listener.settimeout(0.2)
sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sender.bind((iface, 0))
sender.send(frame)
answer = "none"
deadline = time.time() + 3
while time.time() < deadline and answer == "none":
    try:
        packet = listener.recv(65535)
    except socket.timeout:
        continue
    if len(packet) < 54 or packet[23] != 6 or packet[26:30] != dst:
        continue
    header = (packet[14] & 0x0F) * 4
    sport, dport = struct.unpack("!HH", packet[14 + header:18 + header])
    flags = packet[14 + header + 13]
    if sport == dst_port and dport == src_port:
        answer = "synack" if flags & 0x12 == 0x12 else "rst" if flags & 0x04 else f"flags={flags}"
print(answer)
'''

control = node_fixture("control")
compute1 = node_fixture("compute1")
adjacent = node_fixture("adjacent")


def start_worker(host, network: str = "esb-workers") -> HttpContainer:
    """A busybox container on a compute node's worker network, serving :8080; the caller removes it."""
    return HttpContainer(host, network, "worker-ok")


@pytest.fixture(scope="module")
def worker1(compute1):
    worker = start_worker(compute1)
    yield worker
    worker.remove()


@pytest.mark.parametrize("compute_name,index", [("compute1", 1), ("compute2", 2)])
def test_worker_reaches_control_services_through_dnat_and_local_proxy(compute_name, index):
    host = node(compute_name)
    worker = start_worker(host)
    try:
        assert worker.ip.startswith(f"10.88.{index}."), worker.ip
        for port, service in ((9000, "s3-storage"), (8001, "database"), (9428, "victorialogs")):
            # busybox wget -T crashes (SIGSEGV) in this busybox build; bound it with timeout instead.
            reply = worker.run(f"timeout 10 wget -q -O- http://10.88.0.1:{port}/health")
            assert reply.rc == 0, f"{port}: {reply.stderr}"
            assert reply.stdout.strip() == service
    finally:
        worker.remove()
    # The path really is DNAT to the local proxy: netloom's chain matched and HAProxy listens on loopback.
    rules = host.check_output("iptables -t nat -S NETLOOM-DNAT")
    assert "--to-destination 127.0.0.1:9000" in rules
    listening = host.check_output("ss -Hltn")
    assert "127.0.0.1:9000" in listening and "127.0.0.1:8001" in listening


def test_gateway_reaches_worker_through_wg0(control, worker1):
    assert "dev wg0" in control.check_output(f"ip route get {worker1.ip}")
    reply = control.run(f"curl -sS -m 5 http://{worker1.ip}:8080/index.html")
    assert reply.rc == 0, reply.stderr
    assert reply.stdout.strip() == "worker-ok"


def test_worker_reaches_gateway_through_wireguard(compute1, control, worker1):
    assert "dev wg0" in compute1.check_output("ip route get 10.99.0.1")
    before = json.loads(control.check_output("ip -j -s link show wg0"))[0]["stats64"]["rx"]["packets"]
    ping = worker1.run("ping -c 3 -W 2 10.99.0.1")
    assert ping.rc == 0, ping.stdout + ping.stderr
    after = json.loads(control.check_output("ip -j -s link show wg0"))[0]["stats64"]["rx"]["packets"]
    assert after - before >= 3


def test_registry_relay_tls_verifies_against_the_ca(compute1):
    # An empty CA path, so only the CA file given decides (curl also reads /etc/ssl/certs).
    empty = compute1.check_output("mktemp -d")
    try:
        with_ca = compute1.run(f"curl -sS -m 5 --capath {empty} --cacert {CA} https://10.99.0.1:5010/health")
        assert with_ca.rc == 0, with_ca.stderr
        assert with_ca.stdout.strip() == "esb-registry"
        # A client that trusts another CA only is refused: the verification is real.
        other = compute1.run(f"curl -sS -m 5 --capath {empty} --cacert /etc/ssl/certs/ISRG_Root_X1.pem "
                             "https://10.99.0.1:5010/health")
        assert other.rc != 0 and "certificate" in other.stderr
    finally:
        compute1.run(f"rmdir {empty}")
    # The system store trusts the CA too (update-ca-certificates ran).
    system = compute1.run("curl -sS -m 5 https://10.99.0.1:5010/v2/")
    assert system.rc == 0, system.stderr


def probe(adjacent, compute, dst_ip: str, port: int) -> str:
    """Send a crafted SYN from adjacent to the compute node's MAC and dst_ip:port; what came back."""
    compute_if = compute.ansible.get_variables()["netloom_underlay_interface"]
    adjacent_vars = adjacent.ansible.get_variables()
    mac = compute.check_output(f"cat /sys/class/net/{compute_if}/address")
    script = base64.b64encode(PROBE.encode()).decode()
    return adjacent.check_output(
        f"python3 -c \"import base64; exec(base64.b64decode('{script}'))\" "
        f"{adjacent_vars['netloom_underlay_interface']} {mac} {adjacent_vars['netloom_underlay_ip']} "
        f"{dst_ip} {port}")


def guard_drops(compute) -> int:
    out = compute.check_output("iptables -t raw -L NETLOOM-LOCALNET-GUARD -v -x -n")
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if "DROP" in line)


def test_adjacent_host_cannot_reach_a_loopback_service_of_the_compute_node(adjacent, compute1):
    """CVE-2020-8558: a neighbour frames a packet to 127.0.0.1 with the compute node's MAC.

    The control probe (same crafted SYN to the node's underlay address and sshd) must be
    answered, so silence for 127.0.0.1:9000, where HAProxy listens, means the packet was
    dropped, and the guard's counter shows netloom's rule is what dropped it.
    """
    compute_ip = compute1.ansible.get_variables()["netloom_underlay_ip"]
    assert probe(adjacent, compute1, compute_ip, 22) == "synack"
    before = guard_drops(compute1)
    assert probe(adjacent, compute1, "127.0.0.1", 9000) == "none"
    assert guard_drops(compute1) > before
    assert compute1.check_output("cat /proc/sys/net/ipv4/conf/all/route_localnet") == "0"
    assert compute1.check_output("cat /proc/sys/net/ipv4/conf/esb-cni0/route_localnet") == "1"


def test_allowed_ips_that_fail_the_filter_never_become_routes(control):
    """The extra peer's 0.0.0.0/0 and public /32 are in WireGuard, never in the routing (wg-quick at
    boot has Table = off; the route module refuses them), after converge and after a reboot."""
    assert "1.2.3.4/32" in control.check_output("wg show wg0 allowed-ips")
    routes = control.check_output("ip -4 route show table all")
    assert "1.2.3.4" not in routes
    assert not [line for line in routes.splitlines() if line.startswith("default") and "wg0" in line], routes
    rules = control.check_output("ip -4 rule show")
    assert "suppress_prefixlength" not in rules and "fwmark" not in rules, rules
    owned = control.check_output("ip -4 route show dev wg0 proto 250")
    assert "10.88.1.0/24" in owned and "10.88.2.0/24" in owned, owned


def test_check_mode_after_converge_reports_no_change():
    """--check --diff of the converge playbook: every host's recap says changed=0."""
    assert_check_mode_reports_no_change({"control", "compute1", "compute2"})


def test_picture_shows_the_wireguard_star_the_dnat_and_the_worker_bridges():
    """The picture play's JSON, drawn from live state, is what this scenario built: control's wg0
    peered with each compute node (paired by public key, each side allowing what the roles declare),
    the extra peer as external, each compute node's worker bridge and network, its DNAT of the
    gateway ports to the local proxy, control's routes to the workers, and no drift."""
    hostvars = inventory_hostvars()
    model = draw_topology()
    assert_no_drift(model)
    control_ip = hostvars["control"]["netloom_underlay_ip"]
    control_node = topology_node(model, "control")
    control_wg = by_name(control_node["wireguard"])["wg0"]
    assert (control_wg["addresses"], control_wg["listen_port"]) == (["10.99.0.1/24"], 51820)
    links = topology_edges(model, "wireguard")
    extra_key = hostvars["control"]["edge_gateway_extra_peers"][0]["public_key"]
    external = [edge for edge in links.values() if edge["status"] == "external"]
    assert len(external) == 1 and set(external[0]["sides"]) == {"control"}
    assert set(external[0]["sides"]["control"]["allowed_ips"]) == {"0.0.0.0/0", "1.2.3.4/32"}
    assert extra_key in [peer["public_key"] for peer in control_wg["peers"]]
    control_routes = {route["dst"]: route for route in control_node["routes"] if route["netloom"]}
    for compute_name in ("compute1", "compute2"):
        index = int(hostvars[compute_name]["netloom_edge_node_index"])
        compute_ip = hostvars[compute_name]["netloom_underlay_ip"]
        compute = topology_node(model, compute_name)
        compute_wg = by_name(compute["wireguard"])["wg0"]
        assert compute_wg["addresses"] == [f"10.99.0.{index + 1}/24"]
        edge = links[frozenset(("control", compute_name))]
        assert edge["status"] == "ok" and edge["declared"] and set(edge["sides"]) == {"control", compute_name}
        gateway_side, compute_side = edge["sides"]["control"], edge["sides"][compute_name]
        assert gateway_side["device"] == "wg0" and gateway_side["endpoint"] == f"{compute_ip}:51820"
        assert set(gateway_side["allowed_ips"]) == {f"10.99.0.{index + 1}/32", f"10.88.{index}.0/24"}
        assert compute_side["device"] == "wg0" and compute_side["endpoint"] == f"{control_ip}:51820"
        assert compute_side["allowed_ips"] == ["10.99.0.0/24"]
        assert control_routes[f"10.88.{index}.0/24"]["dev"] == "wg0"
        assert "10.88.0.1/16" in by_name(compute["bridges"])["esb-cni0"]["addresses"]
        workers = by_name(compute["docker_networks"])["esb-workers"]
        assert (workers["bridge"], workers["subnet"], workers["gateway"]) == (
            "esb-cni0", "10.88.0.0/16", "10.88.0.1")
        assert "NETLOOM-DNAT" in [chain["name"] for chain in compute["chains"]]
        dnat = {(rule["destination"], rule["protocol"], rule["dport"], rule["to_destination"])
                for rule in compute["dnat"] if rule["chain"] == "NETLOOM-DNAT"}
        wanted = {("10.88.0.1/32", "tcp", port, f"127.0.0.1:{port}") for port in ("9000", "8001", "9428")}
        assert wanted <= dnat, dnat
        assert {rule[3].split(":")[0] for rule in dnat} == {"127.0.0.1"}, dnat
    assert not topology_node(model, "adjacent")["wireguard"]
