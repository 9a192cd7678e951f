"""The Edge Serverless Box inventory filters: CNI_SUBNET, conflist, WireGuard addresses and peers, relays."""
from __future__ import annotations

import json

import pytest

from filter_plugins.netloom import (
    FilterModule,
    netloom_edge_cni_reserved,
    netloom_edge_cni_subnet,
    netloom_edge_control_address,
    netloom_edge_peers,
    netloom_edge_relays,
    netloom_edge_wg_address,
)
from filter_plugins.netloom import netloom_edge_cni_conflist as cni_values
from plugin_utils.netloom_action import render_file, template_path

BASE = "10.88.0.0/16"


def netloom_edge_cni_conflist(*args: str) -> dict:
    """The conflist as edge_compute writes it: the filter's values through templates/cni."""
    return json.loads(render_file(template_path("cni/esb-workers.conflist.j2"), {"cni": cni_values(*args)}))


@pytest.mark.parametrize("value,index,expected", [
    ("", 1, "10.88.1.0/24"),
    (None, 2, "10.88.2.0/24"),
    ("", "255", "10.88.255.0/24"),
    ("10.88.7.0/24", 1, "10.88.7.0/24"),
    (" 10.88.8.0/30 ", None, "10.88.8.0/30"),
    ("10.88.0.0/16", None, "10.88.0.0/16"),
])
def test_cni_subnet_declared_or_derived_from_the_node_index(value, index, expected) -> None:
    assert netloom_edge_cni_subnet(value, BASE, index) == expected


@pytest.mark.parametrize("value,index,reason", [
    ("10.89.1.0/24", None, "outside the worker base"),
    ("10.88.1.0/31", None, "needs /30 or shorter"),
    ("10.88.1.1/32", None, "needs /30 or shorter"),
    ("10.88.1.1/24", None, "host bits"),
    ("esb-workers", None, "no IPv4 network"),
    ("", 256, "netloom_edge_node_index"),
    ("", -1, "netloom_edge_node_index"),
    ("", "", "not set"),
])
def test_bad_cni_subnet_is_refused_naming_the_variable(value, index, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        netloom_edge_cni_subnet(value, BASE, index)


def test_conflist_keeps_base_and_gateway_and_hands_out_only_the_node_block() -> None:
    conflist = netloom_edge_cni_conflist("10.88.1.0/24", BASE, "10.88.0.1", "esb-cni0", "esb-workers")
    bridge, portmap = conflist["plugins"]
    assert conflist["name"] == "esb-workers" and conflist["cniVersion"] == "1.0.0"
    assert bridge["type"] == "bridge" and bridge["bridge"] == "esb-cni0" and bridge["isGateway"] is True
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["ranges"] == [[
        {"subnet": BASE, "rangeStart": "10.88.1.1", "rangeEnd": "10.88.1.254", "gateway": "10.88.0.1"}]]
    assert portmap["type"] == "portmap"


def test_conflist_of_a_slash_30_has_two_worker_addresses() -> None:
    conflist = netloom_edge_cni_conflist("10.88.3.4/30", BASE, "10.88.0.1", "b", "n")
    ranges = conflist["plugins"][0]["ipam"]["ranges"]
    assert (ranges[0][0]["rangeStart"], ranges[0][0]["rangeEnd"]) == ("10.88.3.5", "10.88.3.6")


@pytest.mark.parametrize("cni_subnet,expected", [
    ("10.88.1.0/24", {"netloom-cni-network": "10.88.1.0", "netloom-cni-broadcast": "10.88.1.255"}),
    ("10.88.3.4/30", {"netloom-cni-network": "10.88.3.4", "netloom-cni-broadcast": "10.88.3.7"}),
    ("10.88.0.0/24", {"netloom-cni-broadcast": "10.88.0.255"}),  # 10.88.0.0 is the base's own
    ("10.88.255.0/24", {"netloom-cni-network": "10.88.255.0"}),  # 10.88.255.255 too
    ("10.88.0.0/16", {}),
])
def test_docker_reserves_the_node_block_edges_so_workers_start_at_one(cni_subnet, expected) -> None:
    assert netloom_edge_cni_reserved(cni_subnet, BASE, "10.88.0.1") == expected


def test_conflist_refuses_a_gateway_outside_the_base() -> None:
    with pytest.raises(ValueError, match="netloom_edge_gateway_ip"):
        netloom_edge_cni_conflist("10.88.1.0/24", BASE, "10.89.0.1", "b", "n")


def test_wireguard_addresses_control_first_then_nodes() -> None:
    assert netloom_edge_control_address("10.99.0.0/24") == "10.99.0.1/24"
    assert netloom_edge_control_address(" 10.50.0.0/16 ") == "10.50.0.1/16"
    assert netloom_edge_wg_address("10.99.0.0/24", 1) == "10.99.0.2/24"
    assert netloom_edge_wg_address("10.99.0.0/24", "2") == "10.99.0.3/24"
    assert netloom_edge_wg_address("10.50.0.0/16", 300) == "10.50.1.45/16"
    with pytest.raises(ValueError, match="no host address left"):
        netloom_edge_wg_address("10.99.0.0/24", 253)


@pytest.mark.parametrize("network,index,message", [
    ("10.99.0.0/24", 0, "netloom_edge_node_index: 0: node 0 would get the control node's address 10.99.0.1"),
    ("10.50.0.0/16", "0",
     "netloom_edge_node_index: '0': node 0 would get the control node's address 10.50.0.1"),
    ("10.99.0.0/24", -1, "netloom_edge_node_index: -1: no host address left"),
    ("10.99.0.0/24", "one", "netloom_edge_node_index: 'one': not an integer"),
    ("10.99.0.0/24", "", "netloom_edge_node_index: not set"),
    ("10.99.0.1/24", 1, "netloom_edge_wg_network: '10.99.0.1/24': not an IPv4 network"),
    ("10.99.0.0/31", 1, "netloom_edge_wg_network: '10.99.0.0/31': needs /30 or shorter"),
])
def test_bad_wireguard_numbering_is_refused_naming_the_variable_and_value(network, index, message) -> None:
    with pytest.raises(ValueError) as err:
        netloom_edge_wg_address(network, index)
    assert str(err.value).startswith(message)


def test_peers_are_the_published_entries_in_group_order() -> None:
    hostvars = {
        "c1": {"peer": {"public_key": "A=", "allowed_ips": ["10.99.0.2/32", "10.88.1.0/24"],
                        "key_pending": False}},
        "c2": {"peer": {"public_key": "B=", "allowed_ips": ["10.99.0.3/32"], "key_pending": "False"}},
        "silent": {},
    }
    peers = netloom_edge_peers(["c2", "c1"], hostvars, "peer")
    assert peers == [{"public_key": "B=", "allowed_ips": ["10.99.0.3/32"]},
                     {"public_key": "A=", "allowed_ips": ["10.99.0.2/32", "10.88.1.0/24"]}]
    with pytest.raises(ValueError, match="silent: peer is not set"):
        netloom_edge_peers(["c1", "silent"], hostvars, "peer")


def test_a_peer_whose_key_is_not_made_yet_is_left_out_only_in_check_mode() -> None:
    hostvars = {
        "c1": {"peer": {"public_key": "A=", "allowed_ips": ["10.99.0.2/32"], "key_pending": False}},
        "fresh": {"peer": {"public_key": "", "allowed_ips": ["10.99.0.3/32"], "key_pending": "True"}},
    }
    for check_mode in (True, "True"):
        peers = netloom_edge_peers(["c1", "fresh"], hostvars, "peer", check_mode)
        assert [peer["public_key"] for peer in peers] == ["A="]
    for check_mode in (False, "False"):
        with pytest.raises(ValueError, match="fresh: peer has no public key yet"):
            netloom_edge_peers(["c1", "fresh"], hostvars, "peer", check_mode)


def test_relays_get_mapped_addresses_and_default_health_checks() -> None:
    relays = [
        {"name": "s3", "bind": "127.0.0.1:9000", "backend_host": "s3-storage", "backend_port": 9000},
        {"name": "other", "bind": "127.0.0.1:9100", "backend_host": "elsewhere", "backend_port": 1,
         "health_check": {"enabled": False}},
    ]
    result = netloom_edge_relays(relays, {"s3-storage": "10.99.0.1"}, {"inter": "2s"})
    assert result[0]["backend_host"] == "10.99.0.1" and result[0]["health_check"] == {"inter": "2s"}
    assert result[1]["backend_host"] == "elsewhere" and result[1]["health_check"] == {"enabled": False}
    assert relays[0]["backend_host"] == "s3-storage", "the input is not modified"
    assert netloom_edge_relays(relays, None)[0] == relays[0]


def test_edge_filters_are_registered() -> None:
    filters = FilterModule().filters()
    for name in ("netloom_edge_cni_subnet", "netloom_edge_cni_conflist", "netloom_edge_cni_reserved",
                 "netloom_edge_wg_address",
                 "netloom_edge_control_address",
                 "netloom_edge_peers", "netloom_edge_relays"):
        assert name in filters
