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


def test_prerouting_rules_match_each_ingress_interface_and_output_none() -> None:
    rules = dnat.plan_rules({})
    guard, nat, nat_out = dnat.owned_chains(rules, ["esb-cni0", "eth1"])
    assert (nat.table, nat.name, nat.hooks) == ("nat", "NETLOOM-DNAT", ("PREROUTING",))
    assert nat.rules == tuple(rule.spec(name) for rule in rules for name in ("esb-cni0", "eth1"))
    assert nat.rules[1] == ('-d 10.88.0.1/32 -i eth1 -p tcp -m tcp --dport 9000 -m comment --comment '
                            '"netloom-dnat:s3" -j DNAT --to-destination 127.0.0.1:9000')
    assert (nat_out.name, nat_out.hooks) == ("NETLOOM-DNAT-OUT", ("OUTPUT",))
    assert nat_out.rules == tuple(rule.spec() for rule in rules)
    assert all("-i " not in spec for spec in nat_out.rules)
    for spec in nat.rules + nat_out.rules:  # already in iptables-save form: no rewrite on every run
        assert render_rule(canonical_rule(spec)) == spec
    assert (guard.table, guard.hooks) == ("raw", ("PREROUTING",))
    assert guard.rules == (
        '-d 127.0.0.0/8 ! -i lo -m comment --comment "netloom: CVE-2020-8558 guard" -j DROP',)


def test_ingress_interfaces_default_to_the_localnet_ones_and_are_required() -> None:
    rules = dnat.plan_rules({})
    assert dnat.ingress_interfaces(rules, {"localnet_interfaces": ["esb-cni0"]}) == ["esb-cni0"]
    assert dnat.ingress_interfaces(rules, {"localnet_interfaces": ["esb-cni0"],
                                           "ingress_interfaces": ["eth1"]}) == ["eth1"]
    assert dnat.ingress_interfaces([], {"localnet_interfaces": []}) == []
    with pytest.raises(InputError) as info:
        dnat.ingress_interfaces(rules, {"localnet_interfaces": [], "ingress_interfaces": []})
    assert info.value.field_name == "ingress_interfaces"
    with pytest.raises(InputError) as info:
        dnat.ingress_interfaces(rules, {"ingress_interfaces": ["eth1", "all"]})
    assert info.value.field_name == "ingress_interfaces[1]"


def test_forward_accept_flows_and_their_chain() -> None:
    flows = dnat.forward_accepts([{"name": "workers", "in_interface": "wg0", "out_interface": "esb-cni0",
                                   "dest_port": 8080}])
    chain = dnat.forward_chain(flows, hooked=True)
    assert (chain.table, chain.name, chain.hooks) == ("filter", "NETLOOM-EDGE-FWD", ("DOCKER-USER",))
    assert chain.rules == ('-i wg0 -o esb-cni0 -p tcp -m tcp --dport 8080 -m comment --comment '
                           '"netloom-fwd:workers" -j ACCEPT',)
    assert render_rule(canonical_rule(chain.rules[0])) == chain.rules[0]
    assert dnat.forward_chain(flows, hooked=False).hooks == ()
    with pytest.raises(InputError) as info:
        dnat.forward_accepts([{"name": "a", "in_interface": "wg0", "out_interface": "x", "dest_port": 1},
                              {"name": "a", "in_interface": "wg0", "out_interface": "x", "dest_port": 2}])
    assert info.value.field_name == "forward_accept[1].name"


def test_localnet_after_the_plan_sees_every_interface_but_lo() -> None:
    live = {"lo": "1", "all": "0", "default": "0", "eth0": "1", "esb-cni0": "0"}
    assert dnat.localnet_after(live, ["esb-cni0"], ["eth0"]) == ["esb-cni0"]
    assert dnat.localnet_after(live, [], ["eth0"]) == []
    assert dnat.localnet_after({**live, "all": "1"}, [], ["eth0"]) == ["all"]
    assert dnat.localnet_after(live, [], []) == ["eth0"]


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
    ({"s3_ip": "0.0.0.0"}, "s3_ip", "0.0.0.0/8"),
    ({"s3_ip": "224.0.0.1"}, "s3_ip", "multicast"),
    ({"vl_ip": "255.255.255.255"}, "vl_ip", "240.0.0.0/4"),
    ({"gateway_ip": "169.254.0.1"}, "gateway_ip", "link-local"),
    ({"gateway_ip": "0.0.0.0"}, "gateway_ip", "unicast host"),
    ({"rules": [{"name": "x", "dest_ip": "224.0.0.5", "dest_port": 80, "to_ip": "127.0.0.1"}]},
     "rules[0].dest_ip", "multicast"),
    ({"rules": [{"name": "x\n", "dest_port": 80, "to_ip": "127.0.0.1"}]}, "rules[0].name", "names"),
    ({"rules": [{"name": "ok", "dest_port": 80, "to_ip": "127.0.0.1"},
                {"name": "x y", "dest_port": 81, "to_ip": "127.0.0.1"}]}, "rules[1].name", "names"),
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


def test_loopback_and_link_local_targets_are_real_targets() -> None:
    rows = table({"s3_ip": "127.0.0.5", "db_ip": "", "vl_ip": "", "rules": [
        {"name": "metadata", "dest_port": 80, "to_ip": "169.254.169.254"}]})
    assert [row[4] for row in rows] == ["127.0.0.5", "169.254.169.254"]


def test_same_port_on_other_protocol_or_address_is_not_a_duplicate() -> None:
    rows = table({"rules": [
        {"name": "s3u", "protocol": "udp", "dest_port": 9000, "to_ip": "127.0.0.1"},
        {"name": "s3o", "dest_ip": "10.99.0.1", "dest_port": 9000, "to_ip": "127.0.0.1"}]})
    assert [row[0] for row in rows] == ["s3", "db", "vl", "s3u", "s3o"]
