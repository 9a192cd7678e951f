"""module_utils/netloom/sysctl.py against the real /proc/sys of a throwaway network namespace."""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.netns import Netns, run_module_utils

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

CALL_CORE = """
import json, sys
from ansible.module_utils import basic
from ansible.module_utils.netloom.common import InputError
from ansible.module_utils.netloom.sysctl import plan_sysctls
request = json.loads(sys.argv[2])
basic._ANSIBLE_ARGS = json.dumps({"ANSIBLE_MODULE_ARGS": {}}).encode()  # the writer's atomic_move
basic._ANSIBLE_PROFILE = "legacy"
module = basic.AnsibleModule(argument_spec={})
try:
    plan = plan_sysctls(request["values"], request["persist_file"], module=module)
except InputError as err:
    print(json.dumps({"error": str(err), "field": err.field_name}))
else:
    plan.execute()
    print(json.dumps({"changes": plan.summary(), "diff": plan.diff()}))
"""


def core(ns: Netns, values: dict[str, Any], persist_file: str | None) -> dict[str, Any]:
    return run_module_utils(ns, CALL_CORE, json.dumps({"values": values, "persist_file": persist_file}))


@pytest.fixture
def ns() -> Iterator[Netns]:
    with Netns("nlsysctl") as namespace:
        namespace.sh("ip link add nlv0 type veth peer name nlv1 && echo 0 > /proc/sys/net/ipv4/ip_forward")
        yield namespace


VALUES = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.nlv0.route_localnet": 1,
          "net.ipv4.ip_local_port_range": "40000 50000"}


def test_writes_only_differences_persists_atomically_and_repairs_drift(ns: Netns,
                                                                       tmp_path: pathlib.Path) -> None:
    host_range = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    assert host_range.split() != ["40000", "50000"]
    persist = tmp_path / "90-netloom-test.conf"
    assert ns.sh("cat /proc/sys/net/ipv4/conf/nlv0/route_localnet").strip() == "0"

    first = core(ns, VALUES, str(persist))
    assert first["changes"] == ["update sysctl net.ipv4.ip_forward",
                                "update sysctl net.ipv4.conf.nlv0.route_localnet",
                                "update sysctl net.ipv4.ip_local_port_range",
                                f"create file {persist}"]
    assert ns.sh("cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/conf/nlv0/route_localnet "
                 "/proc/sys/net/ipv4/conf/nlv1/route_localnet").split() == ["1", "1", "0"]
    assert ns.sh("cat /proc/sys/net/ipv4/ip_local_port_range").split() == ["40000", "50000"]
    assert persist.read_text().splitlines()[1:] == [
        "net.ipv4.conf.nlv0.route_localnet = 1", "net.ipv4.ip_forward = 1",
        "net.ipv4.ip_local_port_range = 40000 50000"]
    assert oct(persist.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == [persist.name]  # no temporary file left

    assert core(ns, VALUES, str(persist))["changes"] == []

    ns.sh("echo 0 > /proc/sys/net/ipv4/conf/nlv0/route_localnet")
    persist.write_text(persist.read_text() + "kernel.panic = 1\n")
    repaired = core(ns, VALUES, str(persist))
    assert repaired["changes"] == ["update sysctl net.ipv4.conf.nlv0.route_localnet",
                                   f"update file {persist}"]
    assert repaired["diff"]["before"]["sysctl net.ipv4.conf.nlv0.route_localnet"] == "0"
    assert "kernel.panic" not in persist.read_text()

    # The namespace's values never leak into the host's.
    assert pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text() == host_range


def test_unknown_key_fails_before_anything_is_written(ns: Netns, tmp_path: pathlib.Path) -> None:
    persist = tmp_path / "90-netloom-test.conf"
    result = core(ns, {"net.ipv4.ip_forward": "1", "net.ipv4.conf.nosuch0.route_localnet": "1"},
                  str(persist))
    assert result["field"] == "sysctl key" and "nosuch0" in result["error"]
    assert ns.sh("cat /proc/sys/net/ipv4/ip_forward").strip() == "0"
    assert not persist.exists()
    bad_file = core(ns, {"net.ipv4.ip_forward": "1"}, "relative.conf")
    assert bad_file["field"] == "persist_file"
