"""dnat_rules run as a real module inside throwaway namespaces, with real traffic.

Topology per test: a "node" netns (the runtime node) with veth esbn0 = 10.88.0.1/16 towards a
"client" netns (a worker, 10.88.1.2/16) and veth othn0 = 10.77.0.1/24 towards a second client
that is NOT on a localnet interface. A python http.server bound to 127.0.0.1:9000 in the node
stands in for the local proxy.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.foreign_rules import DOCKER_NAT_RULES, add_foreign_rules
from tests.support.netns import RUNNER, Netns, controller_args, node_python, persist_root, run_module

pytestmark = [pytest.mark.netns]

FOREIGN = DOCKER_NAT_RULES + """*raw
-A PREROUTING -i othn0 -p udp -m udp --dport 4789 -j NOTRACK
COMMIT
*filter
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""
TARGETS = [("s3", 9000), ("db", 8001), ("vl", 9428)]


def dnat(name: str, port: int, ingress: str | None = None, target: str = "127.0.0.1") -> str:
    match_in = f"-i {ingress} " if ingress else ""
    return (f"-d 10.88.0.1/32 {match_in}-p tcp -m tcp --dport {port} "
            f'-m comment --comment "netloom-dnat:{name}" -j DNAT --to-destination {target}:{port}')


PRE_RULES = [dnat(name, port, "esbn0") for name, port in TARGETS]
OUT_RULES = [dnat(name, port) for name, port in TARGETS]
JUMP = '-m comment --comment "netloom:NETLOOM-DNAT" -j NETLOOM-DNAT'
OUT_JUMP = '-m comment --comment "netloom:NETLOOM-DNAT-OUT" -j NETLOOM-DNAT-OUT'
GUARD_JUMP = '-m comment --comment "netloom:NETLOOM-LOCALNET-GUARD" -j NETLOOM-LOCALNET-GUARD'
FWD_JUMP = '-m comment --comment "netloom:NETLOOM-EDGE-FWD" -j NETLOOM-EDGE-FWD'
FWD_RULE = ('-i wg0 -o esbn0 -p tcp -m tcp --dport 8080 -m comment --comment "netloom-fwd:workers" '
            "-j ACCEPT")
ENTRY = "30-dnat_rules@main.json"
RESTORE_CREATED = [
    "create restore payload dnat_rules",
    f"create restore entry {ENTRY}",
    "create restore runner",
    "create restore unit netloom-restore-early.service",
    "create restore unit link etc/systemd/system/multi-user.target.wants/netloom-restore-early.service",
    "create restore unit netloom-restore-late.service",
    "create restore unit link etc/systemd/system/multi-user.target.wants/netloom-restore-late.service",
]
RESTORE_DELETED = [f"delete restore entry {ENTRY}", "delete restore payload dnat_rules",
                   *[step.replace("create ", "delete ") for step in RESTORE_CREATED[2:]]]
ENTRY_UPDATED = f"update restore entry {ENTRY}"
GUARD_CREATED = ["create iptables raw NETLOOM-LOCALNET-GUARD",
                 "create iptables raw PREROUTING -> NETLOOM-LOCALNET-GUARD"]
NAT_CREATED = ["create iptables nat NETLOOM-DNAT", "create iptables nat PREROUTING -> NETLOOM-DNAT",
               "create iptables nat NETLOOM-DNAT-OUT", "create iptables nat OUTPUT -> NETLOOM-DNAT-OUT"]
LOCALNET_ON = "update sysctl net.ipv4.conf.esbn0.route_localnet"


@dataclass
class Lab:
    node: Netns
    client: Netns
    outsider: Netns

    @property
    def persist(self) -> pathlib.Path:
        return persist_root(self.node.name)

    @property
    def legacy_file(self) -> pathlib.Path:
        """Where earlier versions persisted route_localnet (below the test's persistence root)."""
        return self.persist / "etc/sysctl.d/90-netloom-dnat.conf"

    def args(self, **extra: object) -> dict[str, object]:
        return {"localnet_interfaces": ["esbn0"], **extra}

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

    def all_localnet(self) -> str:
        return self.node.sh("grep . /proc/sys/net/ipv4/conf/*/route_localnet")

    def persisted(self) -> list[str]:
        return sorted(str(path.relative_to(self.persist)) for path in self.persist.rglob("*")
                      if path.is_file()) if self.persist.exists() else []

    def replay(self, phase: str) -> subprocess.CompletedProcess[str]:
        """The boot runner as the restore unit runs it, inside the node's netns."""
        runner = self.persist / "usr/lib/netloom/netloom-restore"
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.node.name}", node_python(), str(runner),
                               phase], env={**os.environ, "NETLOOM_PERSIST_ROOT": str(self.persist)},
                              capture_output=True, text=True, check=False)

    def run_with_readonly(self, paths: list[str], **extra: object) -> dict[str, Any]:
        """Run the module in its own mount namespace where `paths` (under /proc/sys) are read-only.

        Planning reads them as usual; the write to them fails with EROFS, as a real kernel
        refusal would: a failure injected between steps without faking any component.
        """
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump({"ANSIBLE_MODULE_ARGS": {**controller_args("dnat_rules", self.args(**extra)),
                                               "_ansible_check_mode": False,
                                               "_ansible_diff": True}}, handle)
            args_file = handle.name
        mounts = " && ".join(f"mount --bind {p} {p} && mount -o remount,ro,bind {p}" for p in paths)
        script = f'{mounts} && exec "$@"'
        argv = ["nsenter", f"--net=/run/netns/{self.node.name}", "unshare", "--mount", "bash", "-c", script,
                "runner", node_python(), str(RUNNER), str(pathlib.Path(RUNNER).parents[2] / "library" /
                                                          "dnat_rules.py"), args_file]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  env={**os.environ, "NETLOOM_PERSIST_ROOT": str(self.persist)})
        finally:
            os.unlink(args_file)
        return json.loads(proc.stdout)


@pytest.fixture
def lab() -> Iterator[Lab]:
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
        yield Lab(node, client, outsider)


def test_create_rerun_change_remove_and_absent(lab: Lab) -> None:
    before = lab.saved()

    first = lab.run()
    assert first["changed"] is True, first
    assert first["changes"] == GUARD_CREATED + NAT_CREATED + [LOCALNET_ON, *RESTORE_CREATED]
    assert lab.rules("nat", "NETLOOM-DNAT") == PRE_RULES
    assert lab.rules("nat", "NETLOOM-DNAT-OUT") == OUT_RULES
    assert lab.rules("nat", "PREROUTING")[0] == JUMP and lab.rules("nat", "OUTPUT")[0] == OUT_JUMP
    assert lab.rules("raw", "NETLOOM-LOCALNET-GUARD") == [first["guard"]]
    assert lab.rules("raw", "PREROUTING")[0] == GUARD_JUMP
    assert [lab.localnet(i) for i in ("esbn0", "othn0", "all", "default", "lo")] == ["1", "0", "0", "0", "0"]
    assert first["localnet_interfaces"] == ["esbn0"] and first["ingress_interfaces"] == ["esbn0"]
    assert first["pending_interfaces"] == []
    assert [rule["name"] for rule in first["rules"]] == ["s3", "db", "vl"]
    assert not lab.legacy_file.exists()  # no sysctl.d persistence: the restore entry replays it all
    entry = json.loads((lab.persist / "var/lib/netloom/restore/entries" / ENTRY).read_text())
    assert entry["netloom_restore"]["phases"] == ["early", "late"]
    assert entry["ANSIBLE_MODULE_ARGS"]["localnet_interfaces"] == ["esbn0"]

    second = lab.run()
    assert second["changed"] is False and second["changes"] == []

    changed = lab.run(s3_ip="127.0.0.2")
    assert changed["changes"] == ["update iptables nat NETLOOM-DNAT", "update iptables nat NETLOOM-DNAT-OUT",
                                  ENTRY_UPDATED]
    nat = lab.rules("nat", "NETLOOM-DNAT")
    assert nat[0].endswith("--to-destination 127.0.0.2:9000") and nat[1:] == PRE_RULES[1:]
    assert not any("127.0.0.1:9000" in rule for rule in nat)  # the old target is gone, not left behind

    removed = lab.run(vl_ip="", apply_output=False)
    assert removed["changes"] == ["update iptables nat NETLOOM-DNAT", "delete iptables nat NETLOOM-DNAT-OUT",
                                  "delete iptables nat OUTPUT -> NETLOOM-DNAT-OUT", ENTRY_UPDATED]
    assert lab.rules("nat", "NETLOOM-DNAT") == PRE_RULES[:2]
    assert OUT_JUMP not in lab.rules("nat", "OUTPUT")
    assert lab.run(vl_ip="", apply_output=False)["changed"] is False

    # No local target any more: route_localnet is reset first, then the guard goes.
    remote = lab.run(s3_ip="10.88.1.2", db_ip="", vl_ip="")
    assert remote["changes"] == ["update iptables nat NETLOOM-DNAT", "create iptables nat NETLOOM-DNAT-OUT",
                                 "create iptables nat OUTPUT -> NETLOOM-DNAT-OUT", LOCALNET_ON,
                                 "delete iptables raw NETLOOM-LOCALNET-GUARD",
                                 "delete iptables raw PREROUTING -> NETLOOM-LOCALNET-GUARD", ENTRY_UPDATED]
    assert lab.localnet("esbn0") == "0"
    assert lab.rules("raw", "NETLOOM-LOCALNET-GUARD") == [] and remote["guard"] is None
    assert lab.rules("nat", "NETLOOM-DNAT") == [dnat("s3", 9000, "esbn0", "10.88.1.2")]

    lab.run()
    gone = lab.run(state="absent")
    assert gone["changed"] is True
    assert gone["changes"] == [LOCALNET_ON, "delete iptables nat NETLOOM-DNAT",
                               "delete iptables nat PREROUTING -> NETLOOM-DNAT",
                               "delete iptables nat NETLOOM-DNAT-OUT",
                               "delete iptables nat OUTPUT -> NETLOOM-DNAT-OUT",
                               "delete iptables raw NETLOOM-LOCALNET-GUARD",
                               "delete iptables raw PREROUTING -> NETLOOM-LOCALNET-GUARD", *RESTORE_DELETED]
    assert lab.saved() == before  # Docker's chains, our former hooks' neighbours: byte-identical
    assert lab.localnet("esbn0") == "0" and lab.persisted() == []
    assert lab.run(state="absent")["changed"] is False


def test_drift_is_repaired_and_a_dropped_interface_is_reset(lab: Lab) -> None:
    lab.run()
    expected = lab.saved()
    lab.node.sh("iptables -t nat -D NETLOOM-DNAT 2 && "
                "iptables -t nat -A NETLOOM-DNAT -p tcp --dport 22 -j DNAT --to-destination 127.0.0.1:22 && "
                "echo 0 > /proc/sys/net/ipv4/conf/esbn0/route_localnet")
    repaired = lab.run()
    assert repaired["changes"] == ["update iptables nat NETLOOM-DNAT", LOCALNET_ON]
    assert lab.saved() == expected and lab.localnet("esbn0") == "1"
    assert lab.run()["changed"] is False

    # The restore entry records where route_localnet was set; an interface dropped from the list
    # is set back to 0 and the other one takes its place.
    moved = lab.run(localnet_interfaces=["othn0"])
    othn0_on = "update sysctl net.ipv4.conf.othn0.route_localnet"
    assert moved["changes"] == ["update iptables nat NETLOOM-DNAT", othn0_on, LOCALNET_ON, ENTRY_UPDATED]
    assert (lab.localnet("esbn0"), lab.localnet("othn0")) == ("0", "1")
    assert lab.rules("nat", "NETLOOM-DNAT") == [dnat(name, port, "othn0") for name, port in TARGETS]


def test_legacy_sysctl_file_is_a_record_and_is_removed(lab: Lab) -> None:
    """A node converged by an earlier version: its sysctl.d file names where route_localnet is on."""
    lab.node.sh("echo 1 > /proc/sys/net/ipv4/conf/othn0/route_localnet")
    lab.legacy_file.parent.mkdir(parents=True)
    lab.legacy_file.write_text("# Managed by netloom\nnet.ipv4.conf.othn0.route_localnet = 1\n")
    result = lab.run()
    assert "update sysctl net.ipv4.conf.othn0.route_localnet" in result["changes"]
    assert f"delete file {lab.legacy_file}" in result["changes"]
    assert lab.localnet("othn0") == "0" and not lab.legacy_file.exists()
    assert lab.run()["changed"] is False


def test_ingress_interfaces_are_separate_from_localnet(lab: Lab) -> None:
    result = lab.run(s3_ip="10.88.1.2", db_ip="", vl_ip="", localnet_interfaces=[],
                     ingress_interfaces=["esbn0", "othn0"], apply_output=False)
    assert result["localnet_interfaces"] == [] and result["guard"] is None
    assert lab.rules("nat", "NETLOOM-DNAT") == [dnat("s3", 9000, "esbn0", "10.88.1.2"),
                                                dnat("s3", 9000, "othn0", "10.88.1.2")]
    assert lab.localnet("esbn0") == "0" and lab.rules("raw", "NETLOOM-LOCALNET-GUARD") == []


def test_check_mode_and_diff_come_from_the_same_plan(lab: Lab) -> None:
    before = lab.saved()
    preview = lab.run(check_mode=True)
    assert preview["changed"] is True
    assert lab.saved() == before and lab.localnet("esbn0") == "0" and lab.persisted() == []
    assert preview["diff"]["after"]["iptables nat NETLOOM-DNAT"] == PRE_RULES
    assert preview["diff"]["before"][f"sysctl {LOCALNET_ON.split()[-1]}"] == "0"
    assert preview["diff"]["after"][f"sysctl {LOCALNET_ON.split()[-1]}"] == "1"
    changes = preview["changes"]
    assert changes.index("create iptables raw NETLOOM-LOCALNET-GUARD") < changes.index(LOCALNET_ON)

    real = lab.run()
    assert real["changes"] == preview["changes"]
    assert real["diff"] == preview["diff"]

    change = lab.run(check_mode=True, db_ip="172.20.0.5", db_port=8000)
    assert change["diff"]["before"]["iptables nat NETLOOM-DNAT"] == PRE_RULES
    after = change["diff"]["after"]["iptables nat NETLOOM-DNAT"]
    assert after[1].endswith("--to-destination 172.20.0.5:8000")
    assert lab.rules("nat", "NETLOOM-DNAT") == PRE_RULES
    assert lab.run(check_mode=True, state="absent")["changed"] is True
    assert lab.rules("nat", "NETLOOM-DNAT") == PRE_RULES and lab.localnet("esbn0") == "1"


def test_check_mode_and_run_on_a_node_without_the_bridge_then_the_late_replay(lab: Lab) -> None:
    """A fresh node: the CNI bridge (here esb-cni0) comes only when Docker starts."""
    before = lab.saved()
    args = {"localnet_interfaces": ["esb-cni0"]}
    preview = lab.run(check_mode=True, **args)
    assert not preview.get("failed"), preview
    assert preview["pending_interfaces"] == ["esb-cni0"] and preview["guard"]
    assert any("esb-cni0 does not exist yet" in str(warning) for warning in preview["warnings"])
    assert preview["changes"] == GUARD_CREATED + NAT_CREATED + RESTORE_CREATED
    assert lab.saved() == before and lab.persisted() == []

    real = lab.run(**args)
    assert real["changes"] == preview["changes"]
    assert lab.rules("raw", "NETLOOM-LOCALNET-GUARD") == [real["guard"]]
    assert lab.rules("nat", "NETLOOM-DNAT") == [dnat(name, port, "esb-cni0") for name, port in TARGETS]

    # Docker creates the bridge; the late boot replay (or the next run) sets route_localnet on it.
    lab.node.sh("ip link add esb-cni0 type bridge")
    late = lab.replay("late")
    assert late.returncode == 0, late.stdout + late.stderr
    assert f"{ENTRY}: changed: update sysctl net.ipv4.conf.esb-cni0.route_localnet" in late.stdout
    assert lab.localnet("esb-cni0") == "1"
    assert lab.run(**args)["changed"] is False


def test_boot_replay_restores_the_guard_before_route_localnet(lab: Lab) -> None:
    lab.run(forward_accept=[flow()])
    converged = lab.saved()
    # A reboot: a fresh kernel (no rules, route_localnet 0), and no bridge before Docker starts.
    lab.node.sh("for table in raw nat filter; do iptables -t $table -F && iptables -t $table -X; done && "
                "ip link del esbn0")
    assert "NETLOOM" not in lab.saved()

    early = lab.replay("early")
    assert early.returncode == 0, early.stdout + early.stderr
    assert lab.rules("raw", "NETLOOM-LOCALNET-GUARD") and lab.rules("nat", "NETLOOM-DNAT") == PRE_RULES
    assert lab.rules("nat", "NETLOOM-DNAT-OUT") == OUT_RULES
    assert lab.rules("filter", "NETLOOM-EDGE-FWD") == [FWD_RULE]  # made; DOCKER-USER does not exist yet

    # Docker starts: it makes the bridge and DOCKER-USER; the late replay finishes the job.
    subprocess.run(["ip", "link", "add", "esbn0", "netns", lab.node.name, "type", "veth", "peer", "name",
                    "esbc0", "netns", lab.client.name], check=True)
    lab.node.sh("ip addr add 10.88.0.1/16 dev esbn0 && ip link set esbn0 up")
    add_foreign_rules(lab.node, FOREIGN)
    late = lab.replay("late")
    assert late.returncode == 0, late.stdout + late.stderr
    assert lab.localnet("esbn0") == "1"
    assert lab.saved() == converged
    assert lab.run(forward_accept=[flow()])["changed"] is False


def test_a_failed_route_localnet_write_leaves_the_guard_in_place(lab: Lab) -> None:
    """Enabling: the guard is installed first, so a failure at the sysctl step leaves it guarded."""
    result = lab.run_with_readonly(["/proc/sys/net/ipv4/conf/esbn0"])
    assert result["failed"] is True and result["changed"] is True
    assert result["failed_step"] == LOCALNET_ON
    assert result["changes"] == GUARD_CREATED + NAT_CREATED
    assert "Read-only file system" in result["msg"]
    assert lab.rules("raw", "NETLOOM-LOCALNET-GUARD") and lab.localnet("esbn0") == "0"
    assert lab.run()["changes"] == [LOCALNET_ON, *RESTORE_CREATED]


def test_a_failed_route_localnet_reset_keeps_the_guard(lab: Lab) -> None:
    """Disabling: route_localnet is reset before the guard goes, so a failed reset keeps the guard."""
    lab.run()
    remote = {"s3_ip": "10.88.1.2", "db_ip": "", "vl_ip": ""}
    result = lab.run_with_readonly(["/proc/sys/net/ipv4/conf/esbn0"], **remote)
    assert result["failed"] is True and result["failed_step"] == LOCALNET_ON
    assert result["planned"].index(LOCALNET_ON) < result["planned"].index(
        "delete iptables raw NETLOOM-LOCALNET-GUARD")
    assert lab.localnet("esbn0") == "1" and lab.rules("raw", "NETLOOM-LOCALNET-GUARD")
    assert lab.rules("raw", "PREROUTING")[0] == GUARD_JUMP

    retried = lab.run(**remote)
    assert LOCALNET_ON in retried["changes"]
    assert lab.localnet("esbn0") == "0" and lab.rules("raw", "NETLOOM-LOCALNET-GUARD") == []


def test_route_localnet_the_module_did_not_set_keeps_the_guard(lab: Lab) -> None:
    lab.run()
    lab.node.sh("echo 1 > /proc/sys/net/ipv4/conf/othn0/route_localnet")
    remote = {"s3_ip": "10.88.1.2", "db_ip": "", "vl_ip": ""}
    kept = lab.run(**remote)
    assert lab.localnet("esbn0") == "0" and lab.localnet("othn0") == "1"  # not ours: left alone
    assert kept["guard"] and lab.rules("raw", "NETLOOM-LOCALNET-GUARD")
    assert any("route_localnet=1 on othn0" in str(warning) for warning in kept["warnings"])

    gone = lab.run(state="absent")
    assert lab.rules("raw", "NETLOOM-LOCALNET-GUARD") and gone["guard"]
    lab.node.sh("echo 0 > /proc/sys/net/ipv4/conf/othn0/route_localnet")
    assert lab.run(state="absent")["changes"] == ["delete iptables raw NETLOOM-LOCALNET-GUARD",
                                                  "delete iptables raw PREROUTING -> NETLOOM-LOCALNET-GUARD"]


def test_forward_accept_is_hooked_from_docker_user_and_removed(lab: Lab) -> None:
    flows = [flow()]
    result = lab.run(forward_accept=flows)
    assert result["forward_hook_pending"] is False
    assert lab.rules("filter", "NETLOOM-EDGE-FWD") == [FWD_RULE]
    assert lab.rules("filter", "DOCKER-USER") == [FWD_JUMP, "-j RETURN"]
    assert lab.run(forward_accept=flows)["changed"] is False

    dropped = lab.run()
    assert dropped["changes"] == ["delete iptables filter NETLOOM-EDGE-FWD",
                                  "delete iptables filter DOCKER-USER -> NETLOOM-EDGE-FWD", ENTRY_UPDATED]
    assert lab.rules("filter", "DOCKER-USER") == ["-j RETURN"]

    # Before Docker made DOCKER-USER: the chain is made, the jump waits for a later run.
    lab.node.sh("iptables -D FORWARD -j DOCKER-USER && iptables -F DOCKER-USER && iptables -X DOCKER-USER")
    pending = lab.run(forward_accept=flows)
    assert pending["forward_hook_pending"] is True and lab.rules("filter", "NETLOOM-EDGE-FWD") == [FWD_RULE]
    lab.node.sh("iptables -N DOCKER-USER && iptables -A DOCKER-USER -j RETURN")
    hooked = lab.run(forward_accept=flows)
    assert hooked["changes"] == ["create iptables filter DOCKER-USER -> NETLOOM-EDGE-FWD"]
    lab.run(state="absent")
    assert lab.rules("filter", "DOCKER-USER") == ["-j RETURN"] and "NETLOOM-EDGE-FWD" not in lab.saved()


def flow(**overrides: Any) -> dict[str, Any]:
    flow_args: dict[str, Any] = {"name": "workers", "in_interface": "wg0", "out_interface": "esbn0",
                                 "dest_port": 8080}
    return {**flow_args, **overrides}


def assert_refused(lab: Lab, args: dict[str, Any], field: str, value: Any) -> None:
    """Failed, naming the field and the value, and nothing changed: iptables, /proc/sys, persistence."""
    tables, localnet = lab.saved(), lab.all_localnet()
    result = lab.run(**args)
    assert result.get("failed") is True, result
    assert result["field"] == field, result["msg"]
    assert f"{field}={value!r}" in result["msg"]
    assert lab.saved() == tables and lab.all_localnet() == localnet and lab.persisted() == []


@pytest.mark.parametrize(("args", "field", "value"), [
    ({"rules": [{"name": "web\n", "dest_port": 80, "to_ip": "127.0.0.1"}]}, "rules[0].name", "web\n"),
    ({"localnet_interfaces": ["esbn0\n"]}, "localnet_interfaces[0]", "esbn0\n"),
    ({"ingress_interfaces": ["esbn0\n"]}, "ingress_interfaces[0]", "esbn0\n"),
    ({"localnet_interfaces": ["esbn0:1"]}, "localnet_interfaces[0]", "esbn0:1"),
    ({"forward_accept": [flow(name="w\n")]}, "forward_accept[0].name", "w\n"),
    ({"forward_accept": [flow(in_interface="wg0\n")]}, "forward_accept[0].in_interface", "wg0\n"),
])
def test_names_ending_in_a_newline_or_with_a_colon_are_refused(lab: Lab, args: dict, field: str,
                                                               value: Any) -> None:
    assert_refused(lab, args, field, value)


@pytest.mark.parametrize(("args", "field", "value"), [
    ({"gateway_ip": "0.0.0.0"}, "gateway_ip", "0.0.0.0"),
    ({"gateway_ip": "255.255.255.255"}, "gateway_ip", "255.255.255.255"),
    ({"gateway_ip": "224.0.0.1"}, "gateway_ip", "224.0.0.1"),
    ({"gateway_ip": "169.254.1.1"}, "gateway_ip", "169.254.1.1"),
    ({"gateway_ip": "127.0.0.1"}, "gateway_ip", "127.0.0.1"),
    ({"rules": [{"name": "r", "dest_ip": "127.0.0.1", "dest_port": 80, "to_ip": "127.0.0.1"}]},
     "rules[0].dest_ip", "127.0.0.1"),
    ({"s3_ip": "0.0.0.0"}, "s3_ip", "0.0.0.0"),
    ({"db_ip": "255.255.255.255"}, "db_ip", "255.255.255.255"),
    ({"rules": [{"name": "r", "dest_port": 80, "to_ip": "239.1.1.1"}]}, "rules[0].to_ip", "239.1.1.1"),
])
def test_addresses_no_host_can_hold_are_refused(lab: Lab, args: dict, field: str, value: Any) -> None:
    assert_refused(lab, args, field, value)


@pytest.mark.parametrize(("args", "field", "value"), [
    # the user's field, never an internal chains[N].rules[M]
    ({"rules": [{"name": "ok", "dest_port": 81, "to_ip": "127.0.0.1"},
                {"name": "Bad Name", "dest_port": 80, "to_ip": "127.0.0.1"}]}, "rules[1].name", "Bad Name"),
    ({"s3_ip": "s3-storage"}, "s3_ip", "s3-storage"),
    ({"db_dport": 70000}, "db_dport", 70000),
    ({"localnet_interfaces": ["all"]}, "localnet_interfaces[0]", "all"),
    ({"localnet_interfaces": []}, "localnet_interfaces", []),
    ({"s3_ip": "10.88.1.2", "db_ip": "", "vl_ip": "", "localnet_interfaces": []}, "ingress_interfaces", None),
    ({"forward_accept": [flow(dest_port=0)]}, "forward_accept[0].dest_port", 0),
    ({"sysctl_file": "relative.conf"}, "sysctl_file", "relative.conf"),
])
def test_errors_name_the_field_the_user_wrote(lab: Lab, args: dict, field: str, value: Any) -> None:
    assert_refused(lab, args, field, value)


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


def packets(lab: Lab, table: str, chain: str) -> int:
    """Packets matched by the first rule of a chain (iptables-save -c counters)."""
    counters = lab.node.sh(f"iptables-save -c -t {table} | grep -- '-A {chain} ' || true")
    match = re.match(r"\[(\d+):", counters)
    return int(match.group(1)) if match else 0


@pytest.mark.usefixtures("local_proxy")
def test_real_traffic_reaches_the_local_proxy_and_the_guard_stops_direct_loopback(lab: Lab) -> None:
    gateway_url = "http://10.88.0.1:9000/"
    assert not fetch(lab.client, gateway_url)  # nothing listens on 10.88.0.1 before the DNAT

    assert lab.run()["changed"] is True
    assert fetch(lab.client, gateway_url)          # worker -> 10.88.0.1:9000 -> PREROUTING DNAT
    assert fetch(lab.node, gateway_url)            # the node's own traffic -> OUTPUT DNAT
    matched = packets(lab, "nat", "NETLOOM-DNAT")
    assert not fetch(lab.outsider, gateway_url)    # othn0 is no ingress interface: no DNAT at all
    assert packets(lab, "nat", "NETLOOM-DNAT") == matched

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
    dropped = packets(lab, "raw", "NETLOOM-LOCALNET-GUARD")
    assert not fetch(lab.client, direct_url)
    assert packets(lab, "raw", "NETLOOM-LOCALNET-GUARD") > dropped  # it was the guard that dropped it

    # Without the guard the same packet reaches the loopback-only server: the guard is what
    # protects it. The next run puts the guard back.
    lab.node.sh(f"iptables -t raw -D PREROUTING {GUARD_JUMP}")
    assert fetch(lab.client, direct_url)
    assert lab.run()["changes"] == ["create iptables raw PREROUTING -> NETLOOM-LOCALNET-GUARD"]
    assert not fetch(lab.client, direct_url)
    assert fetch(lab.client, gateway_url)          # and DNATed traffic still passes the guard
