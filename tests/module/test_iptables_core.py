"""module_utils/netloom/iptables.py against the real kernel, in throwaway network namespaces.

The core is called inside the netns by a short Python process (nsenter + the node's
Python, as a module would run), so every rule below was really applied by iptables-restore.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.foreign_rules import DOCKER_NAT_RULES, add_foreign_rules
from tests.support.netns import Netns, run_module_utils

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

CALL_CORE = """
import json, sys
from ansible.module_utils.netloom.common import PlanFailure
from ansible.module_utils.netloom.iptables import OwnedChain, plan_chains
request = json.loads(sys.argv[2])
chains = [OwnedChain(c["table"], c["name"], tuple(c["hooks"]), tuple(c["rules"])) for c in request["chains"]]
plan = plan_chains(chains, request["state"])
try:
    plan.execute()
except PlanFailure as err:
    print(json.dumps({"error": str(err), "changes": plan.summary()}))
else:
    print(json.dumps({"changes": plan.summary(), "diff": plan.diff()}))
"""

CALL_PLAN_ONLY = """
import json, sys
from ansible.module_utils.netloom.common import CommandError
from ansible.module_utils.netloom.iptables import OwnedChain, plan_chains
request = json.loads(sys.argv[2])
chains = [OwnedChain(c["table"], c["name"], tuple(c["hooks"]), tuple(c["rules"])) for c in request["chains"]]
try:
    plan = plan_chains(chains, request["state"])
except CommandError as err:
    print(json.dumps({"error": str(err)}))
else:
    print(json.dumps({"changes": plan.summary()}))
"""

FWD = {"table": "filter", "name": "NETLOOM-TEST-FWD", "hooks": ["FORWARD"],
       "rules": ["-s 10.0.0.0/8 -j ACCEPT", "-p tcp -d 10.1.1.1 --dport 80 -j ACCEPT"]}
DNAT = {"table": "nat", "name": "NETLOOM-TEST-DNAT", "hooks": ["PREROUTING", "OUTPUT"],
        "rules": ["-p tcp -d 10.88.0.1 --dport 9000 -j DNAT --to-destination 127.0.0.1:9000"]}
JUMP_FWD = '-m comment --comment "netloom:NETLOOM-TEST-FWD" -j NETLOOM-TEST-FWD'

# Someone else's rules (Docker's chains and a hand-made rule) that must never change.
FOREIGN = """*filter
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i eth9 -m comment --comment "admin: keep" -j ACCEPT
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-USER -j RETURN
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j RETURN
COMMIT
""" + DOCKER_NAT_RULES


def core(ns: Netns, chains: list[dict[str, Any]], state: str = "present") -> dict[str, Any]:
    return run_module_utils(ns, CALL_CORE, json.dumps({"chains": chains, "state": state}))


def saved(ns: Netns) -> str:
    """iptables-save without the timestamp comments and counters, so runs compare byte for byte."""
    text = ns.sh("iptables-save")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return re.sub(r" \[\d+:\d+\]", "", text)


def without_ours(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "NETLOOM-TEST" not in line)


def chain_rules(ns: Netns, table: str, chain: str) -> list[str]:
    prefix = f"-A {chain} "
    return [line[len(prefix):] for line in ns.sh(f"iptables-save -t {table}").splitlines()
            if line.startswith(prefix)]


@pytest.fixture
def ns() -> Iterator[Netns]:
    with Netns("nlipt") as namespace:
        add_foreign_rules(namespace, FOREIGN)
        yield namespace


def test_create_rerun_and_absent_leave_foreign_rules_byte_identical(ns: Netns) -> None:
    before = saved(ns)

    first = core(ns, [FWD, DNAT])
    assert first["changes"] == [
        "create iptables filter NETLOOM-TEST-FWD", "create iptables filter FORWARD -> NETLOOM-TEST-FWD",
        "create iptables nat NETLOOM-TEST-DNAT", "create iptables nat PREROUTING -> NETLOOM-TEST-DNAT",
        "create iptables nat OUTPUT -> NETLOOM-TEST-DNAT"]
    assert chain_rules(ns, "filter", "NETLOOM-TEST-FWD") == [
        "-s 10.0.0.0/8 -j ACCEPT", "-d 10.1.1.1/32 -p tcp -m tcp --dport 80 -j ACCEPT"]
    assert chain_rules(ns, "nat", "NETLOOM-TEST-DNAT") == [
        "-d 10.88.0.1/32 -p tcp -m tcp --dport 9000 -j DNAT --to-destination 127.0.0.1:9000"]
    # Our jump comes right after Docker's DOCKER-USER jump (the operators' override point);
    # everything else in FORWARD keeps its order.
    forward = chain_rules(ns, "filter", "FORWARD")
    foreign_forward = chain_rules_before(before, "FORWARD")
    assert foreign_forward[0] == "-j DOCKER-USER"
    assert forward == [foreign_forward[0], JUMP_FWD, *foreign_forward[1:]]
    assert chain_rules(ns, "nat", "OUTPUT")[0] == \
        '-m comment --comment "netloom:NETLOOM-TEST-DNAT" -j NETLOOM-TEST-DNAT'
    assert without_ours(saved(ns)) == before

    assert core(ns, [FWD, DNAT])["changes"] == []

    gone = core(ns, [FWD, DNAT], state="absent")
    assert gone["changes"] == [
        "delete iptables filter NETLOOM-TEST-FWD", "delete iptables filter FORWARD -> NETLOOM-TEST-FWD",
        "delete iptables nat NETLOOM-TEST-DNAT", "delete iptables nat PREROUTING -> NETLOOM-TEST-DNAT",
        "delete iptables nat OUTPUT -> NETLOOM-TEST-DNAT"]
    assert saved(ns) == before
    assert core(ns, [FWD, DNAT], state="absent")["changes"] == []


def chain_rules_before(text: str, chain: str) -> list[str]:
    prefix = f"-A {chain} "
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


def test_drift_is_repaired_and_then_stable(ns: Netns) -> None:
    core(ns, [FWD])
    expected = saved(ns)

    ns.sh("iptables -D NETLOOM-TEST-FWD 1")
    assert core(ns, [FWD])["changes"] == ["update iptables filter NETLOOM-TEST-FWD"]
    assert saved(ns) == expected

    ns.sh("iptables -A NETLOOM-TEST-FWD -s 192.0.2.7 -j DROP")
    repaired = core(ns, [FWD])
    assert repaired["changes"] == ["update iptables filter NETLOOM-TEST-FWD"]
    assert "-s 192.0.2.7/32 -j DROP" in repaired["diff"]["before"]["iptables filter NETLOOM-TEST-FWD"]
    assert saved(ns) == expected

    ns.sh(f"iptables -D FORWARD {JUMP_FWD}")
    assert core(ns, [FWD])["changes"] == ["create iptables filter FORWARD -> NETLOOM-TEST-FWD"]
    assert saved(ns) == expected

    # A jump in front of DOCKER-USER is moved back behind it.
    ns.sh(f"iptables -D FORWARD {JUMP_FWD} && iptables -I FORWARD 1 {JUMP_FWD}")
    assert core(ns, [FWD])["changes"] == ["update iptables filter FORWARD -> NETLOOM-TEST-FWD"]
    assert saved(ns) == expected

    # Extra copies of our jump (one appended at the end) are removed, the first one kept.
    ns.sh(f"iptables -A FORWARD {JUMP_FWD}")
    assert core(ns, [FWD])["changes"] == ["update iptables filter FORWARD -> NETLOOM-TEST-FWD"]
    assert saved(ns) == expected

    assert core(ns, [FWD])["changes"] == []


def test_dropped_hook_loses_its_jump_and_changed_rules_replace_old_ones(ns: Netns) -> None:
    core(ns, [DNAT])
    moved = dict(DNAT, hooks=["PREROUTING"],
                 rules=["-p tcp -d 10.88.0.1 --dport 9000 -j DNAT --to-destination 127.0.0.1:9100"])
    result = core(ns, [moved])
    assert result["changes"] == ["update iptables nat NETLOOM-TEST-DNAT",
                                 "delete iptables nat OUTPUT -> NETLOOM-TEST-DNAT"]
    assert chain_rules(ns, "nat", "NETLOOM-TEST-DNAT") == [
        "-d 10.88.0.1/32 -p tcp -m tcp --dport 9000 -j DNAT --to-destination 127.0.0.1:9100"]
    assert not any("NETLOOM" in rule for rule in chain_rules(ns, "nat", "OUTPUT"))
    assert core(ns, [moved])["changes"] == []


def test_a_chain_hooked_from_docker_user_only_once_docker_made_it(ns: Netns) -> None:
    accept = {"table": "filter", "name": "NETLOOM-TEST-EDGE", "hooks": ["DOCKER-USER"],
              "rules": ["-i wg0 -o esb-cni0 -p tcp --dport 8080 -j ACCEPT"]}
    jump = '-m comment --comment "netloom:NETLOOM-TEST-EDGE" -j NETLOOM-TEST-EDGE'
    before = saved(ns)
    assert core(ns, [accept])["changes"] == ["create iptables filter NETLOOM-TEST-EDGE",
                                             "create iptables filter DOCKER-USER -> NETLOOM-TEST-EDGE"]
    assert chain_rules(ns, "filter", "DOCKER-USER") == [jump, "-j RETURN"]  # ahead of Docker's RETURN
    assert without_ours(saved(ns)) == before
    assert core(ns, [accept])["changes"] == []
    assert core(ns, [accept], state="absent")["changes"] == [
        "delete iptables filter NETLOOM-TEST-EDGE", "delete iptables filter DOCKER-USER -> NETLOOM-TEST-EDGE"]
    assert saved(ns) == before

    # Without Docker there is no DOCKER-USER: planning says so instead of making Docker's chain.
    ns.sh("iptables -D FORWARD -j DOCKER-USER && iptables -F DOCKER-USER && iptables -X DOCKER-USER")
    missing = run_module_utils(ns, CALL_PLAN_ONLY, json.dumps({"chains": [accept], "state": "present"}))
    assert "DOCKER-USER does not exist" in missing["error"]
    assert "DOCKER-USER" not in saved(ns)


def test_a_rule_iptables_rejects_changes_nothing_in_that_table(ns: Netns) -> None:
    core(ns, [FWD])
    before = saved(ns)
    broken = dict(FWD, rules=["-s 10.0.0.0/8 -j ACCEPT", "-p tcp --dport 80 -j NO-SUCH-CHAIN"])
    result = core(ns, [broken])
    assert "iptables-restore" in result["error"]
    assert saved(ns) == before


def test_noflush_redeclare_flushes_only_that_chain_and_a_failed_line_aborts_all(ns: Netns) -> None:
    """The iptables-restore behaviour plan_chains relies on (iptables-nft here)."""
    ns.sh("iptables -N NETLOOM-TEST-A && iptables -A NETLOOM-TEST-A -s 192.0.2.1 -j ACCEPT "
          "&& iptables -A NETLOOM-TEST-A -s 192.0.2.2 -j ACCEPT")
    before = saved(ns)
    ns.sh("printf '*filter\\n:NETLOOM-TEST-A - [0:0]\\n-A NETLOOM-TEST-A -s 192.0.2.3 -j ACCEPT\\nCOMMIT\\n'"
          " | iptables-restore -w --noflush")
    assert chain_rules(ns, "filter", "NETLOOM-TEST-A") == ["-s 192.0.2.3/32 -j ACCEPT"]
    assert without_ours(saved(ns)) == without_ours(before)  # DOCKER*, FORWARD untouched

    # -X of a chain that still has rules fails, and the failure undoes the earlier lines too.
    failing = ns.sh("printf '*filter\\n-A NETLOOM-TEST-A -s 192.0.2.4 -j ACCEPT\\n-X NETLOOM-TEST-A\\n"
                    "COMMIT\\n' | iptables-restore -w --noflush; echo rc=$?")
    assert "rc=0" not in failing
    assert chain_rules(ns, "filter", "NETLOOM-TEST-A") == ["-s 192.0.2.3/32 -j ACCEPT"]
