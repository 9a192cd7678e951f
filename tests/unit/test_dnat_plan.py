"""dnat_rules: the rule set planned from the seed's variables (CNI_GW_IP, DNAT_*), pure logic."""
from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest
from ansible.module_utils.netloom.common import InputError
from ansible.module_utils.netloom.iptables import canonical_rule, render_rule

from tests.support.netns import ROOT

# library/ is not a package (Ansible loads modules by path), so load the module file the same way.
_SPEC = importlib.util.spec_from_file_location("library_dnat_rules", ROOT / "library" / "dnat_rules.py")
dnat = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = dnat  # dataclasses look their module up while the file executes
_SPEC.loader.exec_module(dnat)


def table(params: dict[str, Any]) -> list[tuple[str, str, str, int, str, int]]:
    return [(r.name, r.protocol, r.dest_ip, r.dest_port, r.to_ip, r.to_port) for r in dnat.plan_rules(params)]


def test_seed_defaults_give_the_three_local_proxy_rules() -> None:
    assert table({}) == [("s3", "tcp", "10.88.0.1", 9000, "127.0.0.1", 9000),
                         ("db", "tcp", "10.88.0.1", 8001, "127.0.0.1", 8001),
                         ("vl", "tcp", "10.88.0.1", 9428, "127.0.0.1", 9428)]


def test_empty_target_means_no_rule_and_null_too() -> None:
    assert [row[0] for row in table({"s3_ip": "", "vl_ip": None})] == ["db"]
    assert table({"s3_ip": "", "db_ip": " ", "vl_ip": ""}) == []


def test_seed_variables_map_onto_the_rules() -> None:
    rows = table({"gateway_ip": "10.88.0.254", "db_ip": "172.20.0.5", "db_dport": 18001, "db_port": 8000,
                  "vl_ip": ""})
    assert rows == [("s3", "tcp", "10.88.0.254", 9000, "127.0.0.1", 9000),
                    ("db", "tcp", "10.88.0.254", 18001, "172.20.0.5", 8000)]


def test_generic_rules_default_to_the_gateway_and_the_same_port() -> None:
    rows = table({"s3_ip": "", "db_ip": "", "vl_ip": "", "rules": [
        {"name": "registry", "dest_port": 5010, "to_ip": "127.0.0.1"},
        {"name": "dns", "protocol": "udp", "dest_ip": "10.99.0.1", "dest_port": 53, "to_ip": "127.0.0.11",
         "to_port": 5353},
        {"name": "off", "dest_port": 7000, "to_ip": ""}]})
    assert rows == [("registry", "tcp", "10.88.0.1", 5010, "127.0.0.1", 5010),
                    ("dns", "udp", "10.99.0.1", 53, "127.0.0.11", 5353)]


def test_rule_specs_are_already_in_iptables_save_form() -> None:
    for rule in dnat.plan_rules({"rules": [{"name": "u", "protocol": "udp", "dest_port": 53,
                                            "to_ip": "10.0.0.53"}]}):
        assert render_rule(canonical_rule(rule.spec())) == rule.spec()
    assert dnat.plan_rules({})[0].spec() == (
        '-d 10.88.0.1/32 -p tcp -m tcp --dport 9000 -m comment --comment "netloom-dnat:s3" '
        "-j DNAT --to-destination 127.0.0.1:9000")


def test_chains_follow_apply_output() -> None:
    rules = dnat.plan_rules({})
    guard, nat = dnat.owned_chains(rules, apply_output=True)
    assert (nat.table, nat.name, nat.hooks) == ("nat", "NETLOOM-DNAT", ("PREROUTING", "OUTPUT"))
    assert nat.rules == tuple(rule.spec() for rule in rules)
    assert dnat.owned_chains(rules, apply_output=False)[1].hooks == ("PREROUTING",)
    assert (guard.table, guard.hooks) == ("raw", ("PREROUTING",))
    assert guard.rules == (
        '-d 127.0.0.0/8 ! -i lo -m comment --comment "netloom: CVE-2020-8558 guard" -j DROP',)


def test_route_localnet_only_where_needed() -> None:
    local = dnat.plan_rules({})
    assert dnat.localnet_interfaces(local, ["esb-cni0"]) == ["esb-cni0"]
    remote = dnat.plan_rules({"s3_ip": "172.20.0.2", "db_ip": "172.20.0.3", "vl_ip": ""})
    assert dnat.localnet_interfaces(remote, ["esb-cni0"]) == []
    with pytest.raises(InputError) as info:
        dnat.localnet_interfaces(local, [])
    assert info.value.field_name == "localnet_interfaces" and "s3, db, vl" in str(info.value)
    for wide in ("all", "default"):
        with pytest.raises(InputError, match="CVE-2020-8558"):
            dnat.localnet_interfaces(local, [wide])
    with pytest.raises(InputError, match="twice"):
        dnat.localnet_interfaces(local, ["br0", "br0"])
    assert dnat.localnet_key("eth0.100") == "net.ipv4.conf.eth0/100.route_localnet"


@pytest.mark.parametrize(("params", "field", "reason"), [
    ({"s3_ip": "s3-storage"}, "s3_ip", "host name"),
    ({"db_ip": "database.internal"}, "db_ip", "host name"),
    ({"vl_ip": "10.0.0.300"}, "vl_ip", "not an IPv4"),
    ({"gateway_ip": "gateway"}, "gateway_ip", "host name"),
    ({"gateway_ip": "127.0.0.1"}, "gateway_ip", "127.0.0.0/8"),
    ({"s3_ip": "0.0.0.0"}, "s3_ip", "unicast"),
    ({"s3_ip": "224.0.0.1"}, "s3_ip", "unicast"),
    ({"db_dport": 0}, "db_dport", "between 1 and 65535"),
    ({"db_dport": 65536}, "db_dport", "between 1 and 65535"),
    ({"db_port": 70000}, "db_port", "between 1 and 65535"),
    ({"rules": [{"name": "x", "dest_port": 0, "to_ip": "127.0.0.1"}]}, "rules[0].dest_port", "between"),
    ({"rules": [{"name": "x", "dest_port": 80, "to_ip": "127.0.0.1", "to_port": 99999}]},
     "rules[0].to_port", "between"),
    ({"rules": [{"name": "x", "dest_port": 80, "to_ip": "web.local"}]}, "rules[0].to_ip", "host name"),
    ({"rules": [{"name": "Bad Name", "dest_port": 80, "to_ip": "127.0.0.1"}]}, "rules[0].name", "names"),
    ({"rules": [{"name": "s3", "dest_port": 80, "to_ip": "127.0.0.1"}]}, "rules[0].name", "already used"),
    ({"rules": [{"name": "a", "dest_port": 80, "to_ip": "127.0.0.1"},
                {"name": "a", "dest_port": 81, "to_ip": "127.0.0.1"}]}, "rules[1].name", "already used"),
    ({"rules": [{"name": "x", "protocol": "icmp", "dest_port": 80, "to_ip": "127.0.0.1"}]},
     "rules[0].protocol", "tcp or udp"),
    # duplicate (dest_ip, dest_port, protocol): with a seed rule, and between generic rules
    ({"rules": [{"name": "s3b", "dest_port": 9000, "to_ip": "127.0.0.2"}]}, "rules[0]", "rule s3"),
    ({"db_dport": 9000}, "db_ip", "rule s3"),
    ({"rules": [{"name": "a", "dest_ip": "10.99.0.1", "dest_port": 80, "to_ip": "127.0.0.1"},
                {"name": "b", "dest_ip": "10.99.0.1", "dest_port": 80, "to_ip": "127.0.0.2"}]},
     "rules[1]", "rule a"),
])
def test_bad_input_names_field_and_value(params: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InputError, match=reason) as info:
        dnat.plan_rules(params)
    assert info.value.field_name == field


def test_same_port_on_other_protocol_or_address_is_not_a_duplicate() -> None:
    rows = table({"rules": [
        {"name": "s3u", "protocol": "udp", "dest_port": 9000, "to_ip": "127.0.0.1"},
        {"name": "s3o", "dest_ip": "10.99.0.1", "dest_port": 9000, "to_ip": "127.0.0.1"}]})
    assert [row[0] for row in rows] == ["s3", "db", "vl", "s3u", "s3o"]
