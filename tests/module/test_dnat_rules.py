"""dnat_rules run as a real module inside throwaway namespaces, with real traffic.

Topology per test: a "node" netns (the runtime node) with veth esbn0 = 10.88.0.1/16 towards a
"client" netns (a worker, 10.88.1.2/16) and veth othn0 = 10.77.0.1/24 towards a second client
that is NOT on a localnet interface. A python http.server bound to 127.0.0.1:9000 in the node
stands in for the local proxy.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.foreign_rules import DOCKER_NAT_RULES, add_foreign_rules
from tests.support.netns import Netns, run_module

pytestmark = [pytest.mark.netns]

FOREIGN = DOCKER_NAT_RULES + """*raw
-A PREROUTING -i othn0 -p udp -m udp --dport 4789 -j NOTRACK
COMMIT
"""
SEED_RULES = [
    '-d 10.88.0.1/32 -p tcp -m tcp --dport 9000 -m comment --comment "netloom-dnat:s3" '
    "-j DNAT --to-destination 127.0.0.1:9000",
    '-d 10.88.0.1/32 -p tcp -m tcp --dport 8001 -m comment --comment "netloom-dnat:db" '
    "-j DNAT --to-destination 127.0.0.1:8001",
    '-d 10.88.0.1/32 -p tcp -m tcp --dport 9428 -m comment --comment "netloom-dnat:vl" '
    "-j DNAT --to-destination 127.0.0.1:9428",
]
JUMP = '-m comment --comment "netloom:NETLOOM-DNAT" -j NETLOOM-DNAT'
GUARD_JUMP = '-m comment --comment "netloom:NETLOOM-LOCALNET-GUARD" -j NETLOOM-LOCALNET-GUARD'


@dataclass
class Lab:
    node: Netns
    client: Netns
    outsider: Netns
    sysctl_file: pathlib.Path

    def args(self, **extra: object) -> dict[str, object]:
        return {"localnet_interfaces": ["esbn0"], "sysctl_file": str(self.sysctl_file), **extra}

    def run(self, check_mode: bool = False, **extra: object) -> dict:
        return run_module("dnat_rules", self.args(**extra), netns=self.node.name, check_mode=check_mode)

    def saved(self) -> str:
        """iptables-save of the node without timestamps and counters."""
        lines = self.node.sh("iptables-save").splitlines()
        text = "\n".join(line for line in lines if not line.startswith("#"))
        return re.sub(r" \[\d+:\d+\]", "", text)

    def rules(self, table: str, chain: str) -> list[str]:
        prefix = f"-A {chain} "
        return [line[len(prefix):] for line in self.node.sh(f"iptables-save -t {table}").splitlines()
                if line.startswith(prefix)]

    def localnet(self, interface: str) -> str:
        return self.node.sh(f"cat /proc/sys/net/ipv4/conf/{interface}/route_localnet").strip()


@pytest.fixture
def lab(tmp_path: pathlib.Path) -> Iterator[Lab]:
    with Netns("nldnat") as node, Netns("nlcli") as client, Netns("nlout") as outsider:
        subprocess.run(["ip", "link", "add", "esbn0", "netns", node.name, "type", "veth", "peer", "name",
                        "esbc0", "netns", client.name], check=True)
        subprocess.run(["ip", "link", "add", "othn0", "netns", node.name, "type", "veth", "peer", "name",
                        "othc0", "netns", outsider.name], check=True)
        node.sh("ip addr add 10.88.0.1/16 dev esbn0 && ip link set esbn0 up && "
                "ip addr add 10.77.0.1/24 dev othn0 && ip link set othn0 up")
        client.sh("ip addr add 10.88.1.2/16 dev esbc0 && ip link set esbc0 up")
        outsider.sh("ip addr add 10.77.0.2/24 dev othc0 && ip link set othc0 up && "
                    "ip route add 10.88.0.0/16 via 10.77.0.1")
        add_foreign_rules(node, FOREIGN)
        yield Lab(node, client, outsider, tmp_path / "90-netloom-dnat.conf")


def test_create_rerun_change_remove_and_absent(lab: Lab) -> None:
    before = lab.saved()

    first = lab.run()
    assert first["changed"] is True, first
    assert lab.rules("nat", "NETLOOM-DNAT") == SEED_RULES
    assert lab.rules("nat", "PREROUTING")[0] == JUMP and lab.rules("nat", "OUTPUT")[0] == JUMP
    assert lab.rules("raw", "NETLOOM-LOCALNET-GUARD") == [first["guard"]]
    assert lab.rules("raw", "PREROUTING")[0] == GUARD_JUMP
    assert [lab.localnet(i) for i in ("esbn0", "othn0", "all", "default", "lo")] == ["1", "0", "0", "0", "0"]
    assert "net.ipv4.conf.esbn0.route_localnet = 1" in lab.sysctl_file.read_text()
    assert first["localnet_interfaces"] == ["esbn0"]
    assert [rule["name"] for rule in first["rules"]] == ["s3", "db", "vl"]

    second = lab.run()
    assert second["changed"] is False and second["changes"] == []

    changed = lab.run(s3_ip="127.0.0.2")
    assert changed["changes"] == ["update iptables nat NETLOOM-DNAT"]
    nat = lab.rules("nat", "NETLOOM-DNAT")
    assert nat[0].endswith("--to-destination 127.0.0.2:9000") and nat[1:] == SEED_RULES[1:]
    assert not any("127.0.0.1:9000" in rule for rule in nat)  # the old target is gone, not left behind

    removed = lab.run(vl_ip="", apply_output=False)
    assert removed["changes"] == ["update iptables nat NETLOOM-DNAT",
                                  "delete iptables nat OUTPUT -> NETLOOM-DNAT"]
    assert lab.rules("nat", "NETLOOM-DNAT") == SEED_RULES[:2]
    assert JUMP not in lab.rules("nat", "OUTPUT")
    assert lab.run(vl_ip="", apply_output=False)["changed"] is False

    # No local target any more: route_localnet, the guard and the persist file go.
    remote = lab.run(s3_ip="10.88.1.2", db_ip="", vl_ip="")
    assert lab.localnet("esbn0") == "0" and not lab.sysctl_file.exists()
    assert lab.rules("raw", "NETLOOM-LOCALNET-GUARD") == [] and remote["guard"] is None

    lab.run()
    gone = lab.run(state="absent")
    assert gone["changed"] is True
    assert lab.saved() == before  # Docker's chains, our former hooks' neighbours: byte-identical
    assert lab.localnet("esbn0") == "0" and not lab.sysctl_file.exists()
    assert lab.run(state="absent")["changed"] is False


def test_drift_is_repaired_and_a_dropped_interface_is_reset(lab: Lab) -> None:
    lab.run()
    expected = lab.saved()
    lab.node.sh("iptables -t nat -D NETLOOM-DNAT 2 && "
                "iptables -t nat -A NETLOOM-DNAT -p tcp --dport 22 -j DNAT --to-destination 127.0.0.1:22 && "
                "echo 0 > /proc/sys/net/ipv4/conf/esbn0/route_localnet")
    lab.sysctl_file.unlink()
    repaired = lab.run()
    assert repaired["changes"] == ["update iptables nat NETLOOM-DNAT",
                                   "update sysctl net.ipv4.conf.esbn0.route_localnet",
                                   f"create file {lab.sysctl_file}"]
    assert lab.saved() == expected and lab.localnet("esbn0") == "1"
    assert lab.run()["changed"] is False

    # The persist file records where route_localnet was set; an interface dropped from the list
    # is set back to 0 and the other one takes its place.
    moved = lab.run(localnet_interfaces=["othn0"])
    assert moved["changes"] == ["update sysctl net.ipv4.conf.esbn0.route_localnet",
                                "update sysctl net.ipv4.conf.othn0.route_localnet",
                                f"update file {lab.sysctl_file}"]
    assert (lab.localnet("esbn0"), lab.localnet("othn0")) == ("0", "1")


def test_check_mode_and_diff_come_from_the_same_plan(lab: Lab) -> None:
    before = lab.saved()
    preview = lab.run(check_mode=True)
    assert preview["changed"] is True
    assert lab.saved() == before and lab.localnet("esbn0") == "0" and not lab.sysctl_file.exists()
    assert preview["diff"]["after"]["iptables nat NETLOOM-DNAT"] == SEED_RULES
    assert preview["diff"]["before"]["sysctl net.ipv4.conf.esbn0.route_localnet"] == "0"
    assert preview["diff"]["after"]["sysctl net.ipv4.conf.esbn0.route_localnet"] == "1"

    real = lab.run()
    assert real["changes"] == preview["changes"]
    assert real["diff"] == preview["diff"]

    change = lab.run(check_mode=True, db_ip="172.20.0.5", db_port=8000)
    assert change["diff"]["before"]["iptables nat NETLOOM-DNAT"] == SEED_RULES
    after = change["diff"]["after"]["iptables nat NETLOOM-DNAT"]
    assert after[1].endswith("--to-destination 172.20.0.5:8000")
    assert lab.rules("nat", "NETLOOM-DNAT") == SEED_RULES
    assert lab.run(check_mode=True, state="absent")["changed"] is True
    assert lab.rules("nat", "NETLOOM-DNAT") == SEED_RULES and lab.localnet("esbn0") == "1"


@pytest.mark.parametrize(("args", "field"), [
    ({"s3_ip": "s3-storage"}, "s3_ip"),
    ({"db_dport": 70000}, "db_dport"),
    ({"rules": [{"name": "dup", "dest_port": 9428, "to_ip": "127.0.0.1"}]}, "rules[0]"),
    ({"localnet_interfaces": ["all"]}, "localnet_interfaces"),
    ({"localnet_interfaces": []}, "localnet_interfaces"),
    ({"localnet_interfaces": ["nosuch0"]}, "sysctl key"),
    ({"gateway_ip": "127.0.0.1"}, "gateway_ip"),
])
def test_bad_input_fails_naming_the_field_and_changes_nothing(lab: Lab, args: dict, field: str) -> None:
    before = lab.saved()
    result = lab.run(**args)
    assert result.get("failed") is True, result
    assert result["field"] == field
    assert lab.saved() == before and lab.localnet("esbn0") == "0" and not lab.sysctl_file.exists()


def fetch(ns: Netns, url: str) -> bool:
    """One HTTP GET from inside `ns` (2 s timeout); True when the server answered."""
    code = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2).read()"
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{ns.name}", sys.executable, "-c", code],
                          capture_output=True, timeout=20, check=False)
    return proc.returncode == 0


@pytest.fixture
def local_proxy(lab: Lab, tmp_path: pathlib.Path) -> Iterator[None]:
    """http.server on 127.0.0.1:9000 in the node netns, standing in for HAProxy."""
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab.node.name}", sys.executable, "-m",
                               "http.server", "9000", "--bind", "127.0.0.1", "--directory", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while "127.0.0.1:9000" not in lab.node.sh("ss -ltnH"):
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.1)
        yield
    finally:
        server.terminate()
        server.wait(timeout=10)


def guard_drops(lab: Lab) -> int:
    counters = lab.node.sh("iptables-save -c -t raw | grep -- '-A NETLOOM-LOCALNET-GUARD' || true")
    match = re.match(r"\[(\d+):", counters)
    return int(match.group(1)) if match else 0


@pytest.mark.usefixtures("local_proxy")
def test_real_traffic_reaches_the_local_proxy_and_the_guard_stops_direct_loopback(lab: Lab) -> None:
    gateway_url = "http://10.88.0.1:9000/"
    assert not fetch(lab.client, gateway_url)  # nothing listens on 10.88.0.1 before the DNAT

    assert lab.run()["changed"] is True
    assert fetch(lab.client, gateway_url)          # worker -> 10.88.0.1:9000 -> PREROUTING DNAT
    assert fetch(lab.node, gateway_url)            # the node's own traffic -> OUTPUT DNAT
    assert not fetch(lab.outsider, gateway_url)    # othn0 has no route_localnet: DNAT to 127 refused

    lab.run(apply_output=False)
    assert not fetch(lab.node, gateway_url) and fetch(lab.client, gateway_url)
    lab.run()

    # A neighbour on esbn0 sends straight to 127.0.0.1 (CVE-2020-8558): route its 127.0.0.1 via
    # the node (ahead of its own local table) and allow loopback destinations out of its veth.
    lab.client.sh("sysctl -qw net.ipv4.conf.esbc0.route_localnet=1 && "
                  "ip route add 127.0.0.1/32 via 10.88.0.1 dev esbc0 table 100 && "
                  "ip rule add pref 10 to 127.0.0.1/32 iif lo lookup 100 && "
                  "ip rule add pref 100 lookup local && ip rule del pref 0")
    direct_url = "http://127.0.0.1:9000/"
    dropped = guard_drops(lab)
    assert not fetch(lab.client, direct_url)
    assert guard_drops(lab) > dropped              # it was the guard that dropped it

    # Without the guard the same packet reaches the loopback-only server: the guard is what
    # protects it. The next run puts the guard back.
    lab.node.sh(f"iptables -t raw -D PREROUTING {GUARD_JUMP}")
    assert fetch(lab.client, direct_url)
    assert lab.run()["changes"] == ["create iptables raw PREROUTING -> NETLOOM-LOCALNET-GUARD"]
    assert not fetch(lab.client, direct_url)
    assert fetch(lab.client, gateway_url)          # and DNATed traffic still passes the guard
