"""Docker bridge network normalisation and comparison, without Docker."""
from __future__ import annotations

from typing import Any

import pytest
from ansible.module_utils.netloom.common import InputError
from ansible.module_utils.netloom.docker_network import (
    Attachment,
    address_conflicts,
    attachment_of,
    create_request,
    default_gateway,
    differences,
    is_managed,
    kept_address,
    live_config,
    network_name,
    reconnect_order,
    wanted_config,
)

OVERLAY = {
    "name": "kohakuriver-overlay", "bridge_name": "kohaku-overlay", "subnet": "10.3.0.0/16",
    "gateway": "10.3.0.1", "aux_addresses": {"kohaku-hub": "10.3.0.254"}, "icc": True,
    "masquerade": False, "mtu": 1450,
}

# `docker network inspect` of the network above as Docker 20.10 returns it.
OVERLAY_INSPECT: dict[str, Any] = {
    "Name": "kohakuriver-overlay",
    "Id": "3c17734ed709115e5cf2f41f1811d4553fe4fa50c79037e48ebaeffd7df1339f",
    "Driver": "bridge",
    "EnableIPv6": False,
    "IPAM": {"Driver": "default", "Options": {}, "Config": [{
        "Subnet": "10.3.0.0/16", "Gateway": "10.3.0.1", "AuxiliaryAddresses": {"kohaku-hub": "10.3.0.254"},
    }]},
    "Internal": False,
    "Containers": {},
    "Options": {
        "com.docker.network.bridge.enable_icc": "true",
        "com.docker.network.bridge.enable_ip_masquerade": "false",
        "com.docker.network.bridge.name": "kohaku-overlay",
        "com.docker.network.driver.mtu": "1450",
    },
    "Labels": {"netloom.managed": "true"},
}


def as_docker_stores(name: str, request: dict[str, Any]) -> dict[str, Any]:
    """What `docker network inspect` shows for a network created with `request`."""
    ipam = request["ipam"] or {"Driver": "default", "Config": [{"Subnet": "172.18.0.0/16",
                                                                "Gateway": "172.18.0.1"}]}
    return {"Name": name, "Driver": request["driver"], "Options": dict(request["options"]), "IPAM": ipam,
            "Internal": request["internal"], "Labels": dict(request["labels"])}


def test_kohakuriver_overlay_normalises_to_one_config() -> None:
    assert wanted_config(OVERLAY) == {
        "driver": "bridge", "bridge_name": "kohaku-overlay", "mtu": 1450, "icc": True, "masquerade": False,
        "driver_options": {}, "internal": False, "subnet": "10.3.0.0/16", "gateway": "10.3.0.1",
        "ip_range": None, "aux_addresses": {"kohaku-hub": "10.3.0.254"}, "extra_pools": [],
        "labels": {"netloom.managed": "true"},
    }


def test_live_network_equal_to_wanted_has_no_differences() -> None:
    assert live_config(OVERLAY_INSPECT) == wanted_config(OVERLAY)
    assert differences(live_config(OVERLAY_INSPECT), wanted_config(OVERLAY)) == []


@pytest.mark.parametrize("params", [
    OVERLAY,
    {"name": "kohakuriver-net", "subnet": "172.30.0.0/16", "gateway": "172.30.0.1"},
    {"name": "esb-1", "subnet": "10.60.0.0/16", "ip_range": "10.60.128.0/17", "internal": True,
     "labels": {"esb.role": "worker", "flag": True}, "driver_options": {"com.example.x": 7}},
    {"name": "auto-pool"},
])
def test_what_the_module_creates_compares_equal_when_read_back(params: dict[str, Any]) -> None:
    wanted = wanted_config(params)
    stored = as_docker_stores(params["name"], create_request(wanted))
    assert differences(live_config(stored), wanted) == []


def test_friendly_options_and_driver_options_are_the_same_thing() -> None:
    via_driver_options = wanted_config({"driver_options": {
        "com.docker.network.bridge.name": "kohaku-overlay", "com.docker.network.driver.mtu": "1450",
        "com.docker.network.bridge.enable_icc": "1",
        "com.docker.network.bridge.enable_ip_masquerade": False}})
    friendly = wanted_config({"bridge_name": "kohaku-overlay", "mtu": 1450, "icc": True, "masquerade": False})
    assert via_driver_options == friendly


def test_live_boolean_spellings_and_missing_options_use_dockers_defaults() -> None:
    live = live_config({"Driver": "bridge", "Options": {
        "com.docker.network.bridge.enable_icc": "0",
        "com.docker.network.bridge.host_binding_ipv4": "0.0.0.0"}})
    assert (live["icc"], live["masquerade"], live["mtu"], live["bridge_name"]) == (False, True, None, None)
    assert live["driver_options"] == {"com.docker.network.bridge.host_binding_ipv4": "0.0.0.0"}
    assert wanted_config({})["icc"] is True


def test_live_value_netloom_cannot_parse_is_kept_and_differs() -> None:
    live = live_config({"Driver": "bridge", "Options": {"com.docker.network.driver.mtu": "0"}})
    assert live["mtu"] == "0"
    assert differences(live, wanted_config({"mtu": 1500, "labels": {}}))[0] == {
        "field": "mtu", "current": "0", "wanted": 1500}


def test_every_differing_field_is_listed_in_order_with_both_values() -> None:
    live = live_config(OVERLAY_INSPECT)
    wanted = wanted_config(dict(OVERLAY, mtu=1400, gateway="10.3.0.2", ip_range="10.3.128.0/17",
                                labels={"team": "gpu"}))
    assert differences(live, wanted) == [
        {"field": "mtu", "current": 1450, "wanted": 1400},
        {"field": "gateway", "current": "10.3.0.1", "wanted": "10.3.0.2"},
        {"field": "ip_range", "current": None, "wanted": "10.3.128.0/17"},
        {"field": "labels", "current": {"netloom.managed": "true"},
         "wanted": {"netloom.managed": "true", "team": "gpu"}},
    ]


def test_subnet_and_gateway_left_out_accept_what_docker_chose() -> None:
    live = live_config(as_docker_stores("n", create_request(wanted_config({}))))
    assert live["subnet"] == "172.18.0.0/16"
    assert differences(live, wanted_config({})) == []
    assert [d["field"] for d in differences(live, wanted_config({"subnet": "172.19.0.0/16"}))] == ["subnet"]


def test_unlabelled_network_differs_by_the_ownership_label() -> None:
    foreign = dict(OVERLAY_INSPECT, Labels={})
    assert not is_managed(foreign) and is_managed(OVERLAY_INSPECT)
    assert [d["field"] for d in differences(live_config(foreign), wanted_config(OVERLAY))] == ["labels"]


def test_driver_and_extra_pools_differ() -> None:
    inspect = dict(OVERLAY_INSPECT, Driver="macvlan", IPAM={"Config": [
        {"Subnet": "fd00:1::/64"}, {"Subnet": "10.3.0.0/16", "Gateway": "10.3.0.1",
                                    "AuxiliaryAddresses": {"kohaku-hub": "10.3.0.254"}}]})
    live = live_config(inspect)
    assert live["subnet"] == "10.3.0.0/16"
    assert [d["field"] for d in differences(live, wanted_config(OVERLAY))] == ["driver", "extra_pools"]


def test_create_request_is_the_engine_api_shape() -> None:
    request = create_request(wanted_config(dict(OVERLAY, ip_range="10.3.128.0/17")))
    assert request == {
        "driver": "bridge",
        "options": {"com.docker.network.bridge.enable_icc": "true",
                    "com.docker.network.bridge.enable_ip_masquerade": "false",
                    "com.docker.network.bridge.name": "kohaku-overlay",
                    "com.docker.network.driver.mtu": "1450"},
        "ipam": {"Driver": "default", "Options": {}, "Config": [
            {"Subnet": "10.3.0.0/16", "Gateway": "10.3.0.1", "IPRange": "10.3.128.0/17",
             "AuxiliaryAddresses": {"kohaku-hub": "10.3.0.254"}}]},
        "internal": False,
        "labels": {"netloom.managed": "true"},
    }
    assert create_request(wanted_config({}))["ipam"] is None


@pytest.mark.parametrize("params,field,value", [
    ({"subnet": "10.3.0.1/16"}, "subnet", "10.3.0.1/16"),
    ({"subnet": "10.3.0.0/33"}, "subnet", "10.3.0.0/33"),
    ({"subnet": "fd00::/64"}, "subnet", "fd00::/64"),
    ({"subnet": "10.3.0.0/16", "gateway": "10.4.0.1"}, "gateway", "10.4.0.1"),
    ({"subnet": "10.3.0.0/16", "gateway": "10.3.0.0"}, "gateway", "10.3.0.0"),
    ({"subnet": "10.3.0.0/16", "gateway": "10.3.0.300"}, "gateway", "10.3.0.300"),
    ({"subnet": "10.3.0.0/16", "ip_range": "10.4.0.0/24"}, "ip_range", "10.4.0.0/24"),
    ({"subnet": "10.3.0.0/16", "ip_range": "10.3.0.0/15"}, "ip_range", "10.3.0.0/15"),
    ({"subnet": "10.3.0.0/16", "ip_range": "10.3.0.1/24"}, "ip_range", "10.3.0.1/24"),
    ({"subnet": "10.3.0.0/16", "aux_addresses": {"hub": "10.9.0.254"}}, "aux_addresses.hub", "10.9.0.254"),
    ({"subnet": "10.3.0.0/16", "gateway": "10.3.0.1", "aux_addresses": {"hub": "10.3.0.1"}},
     "aux_addresses.hub", "10.3.0.1"),
    ({"subnet": "10.3.0.0/16", "aux_addresses": {"a": "10.3.0.9", "b": "10.3.0.9"}},
     "aux_addresses.b", "10.3.0.9"),
    ({"gateway": "10.3.0.1"}, "gateway", "10.3.0.1"),
    ({"ip_range": "10.3.0.0/24"}, "ip_range", "10.3.0.0/24"),
    ({"aux_addresses": {"hub": "10.3.0.254"}}, "aux_addresses", {"hub": "10.3.0.254"}),
    ({"bridge_name": "kohaku-overlay-01"}, "bridge_name", "kohaku-overlay-01"),
    ({"bridge_name": "bad name"}, "bridge_name", "bad name"),
    ({"mtu": 67}, "mtu", "67"),
    ({"mtu": 65536}, "mtu", "65536"),
    ({"driver_options": {"com.docker.network.driver.mtu": "big"}},
     "driver_options.com.docker.network.driver.mtu", "big"),
    ({"driver_options": {"com.docker.network.bridge.enable_icc": "yes"}},
     "driver_options.com.docker.network.bridge.enable_icc", "yes"),
    ({"mtu": 1450, "driver_options": {"com.docker.network.driver.mtu": "1450"}}, "mtu", 1450),
    ({"labels": {"netloom.managed": "false"}}, "labels.netloom.managed", "false"),
])
def test_bad_input_names_the_field_and_value(params: dict[str, Any], field: str, value: Any) -> None:
    with pytest.raises(InputError) as err:
        wanted_config(params)
    assert err.value.field_name == field
    assert str(err.value.value) == str(value)


@pytest.mark.parametrize("name", ["", "   ", "my net", "bridge", "host", "none", None])
def test_bad_network_names(name: Any) -> None:
    with pytest.raises(InputError) as err:
        network_name(name)
    assert err.value.field_name == "name"


def test_gateway_may_sit_inside_ip_range_and_aux_addresses_inside_the_range() -> None:
    config = wanted_config({"subnet": "10.60.0.0/16", "ip_range": "10.60.0.0/24", "gateway": "10.60.0.1",
                            "aux_addresses": {"hub": "10.60.0.2"}})
    assert (config["gateway"], config["aux_addresses"]) == ("10.60.0.1", {"hub": "10.60.0.2"})


def test_conflicts_with_other_networks_are_refused_but_not_with_itself() -> None:
    wanted = wanted_config(OVERLAY)
    own = {"kohakuriver-overlay": live_config(OVERLAY_INSPECT)}
    address_conflicts("kohakuriver-overlay", wanted, own)
    with pytest.raises(InputError) as err:
        address_conflicts("kohakuriver-overlay", wanted, {"other": {"subnet": "10.0.0.0/8"}})
    assert err.value.field_name == "subnet" and "other" in str(err.value)
    with pytest.raises(InputError) as err:
        address_conflicts("kohakuriver-overlay", wanted, {"other": {"bridge_name": "kohaku-overlay"}})
    assert err.value.field_name == "bridge_name"
    address_conflicts("kohakuriver-overlay", wanted, {"host": {"subnet": None, "bridge_name": None},
                                                      "near": {"subnet": "10.4.0.0/16", "bridge_name": "x"}})


def container(networks: dict[str, Any], cid: str = "5e0f84a9bf4e58d5bf26baa5614ba25f") -> dict[str, Any]:
    return {"Id": cid, "Name": "/web", "NetworkSettings": {"Networks": networks}}


def test_running_container_attachment_keeps_live_address_and_user_aliases() -> None:
    found = attachment_of(container({"net": {"IPAMConfig": None, "IPAddress": "10.3.0.7", "NetworkID": "n1",
                                             "Aliases": ["web-alias", "5e0f84a9bf4e"]}}), "net", "n1")
    assert found == Attachment("5e0f84a9bf4e58d5bf26baa5614ba25f", "web", "10.3.0.7", ["web-alias"])
    assert found.describe("10.3.0.7") == {"ipv4_address": "10.3.0.7", "aliases": ["web-alias"]}


def test_stopped_container_attachment_keeps_requested_address() -> None:
    never_ran = attachment_of(container({"net": {"IPAMConfig": {"IPv4Address": "10.3.0.9"}, "IPAddress": "",
                                                 "NetworkID": "", "Aliases": None}}), "net", "n1")
    stopped = attachment_of(container({"net": {"IPAMConfig": None, "IPAddress": "", "NetworkID": "n1",
                                               "Aliases": None}}), "net", "n1")
    assert (never_ran.ipv4_address, never_ran.aliases) == ("10.3.0.9", [])
    assert stopped.ipv4_address is None


def test_containers_on_another_network_or_an_earlier_one_of_the_same_name_are_not_attached() -> None:
    assert attachment_of(container({"other": {"NetworkID": "n1"}}), "net", "n1") is None
    stale = container({"net": {"NetworkID": "n0-removed", "IPAddress": ""}})
    assert attachment_of(stale, "net", "n1") is None


def test_default_gateway_is_first_address_of_range_or_subnet() -> None:
    assert default_gateway({"subnet": "10.3.0.0/16"}) == "10.3.0.1"
    assert default_gateway({"subnet": "10.3.0.0/16", "ip_range": "10.3.128.0/17"}) == "10.3.128.0"
    assert default_gateway({"subnet": "10.3.0.0/16", "ip_range": "10.3.0.0/24"}) == "10.3.0.1"
    assert default_gateway({"subnet": "10.3.0.0/16", "gateway": "10.3.0.9"}) == "10.3.0.9"
    assert default_gateway({"subnet": None}) is None


@pytest.mark.parametrize("address,kept", [
    ("10.3.0.7", "10.3.0.7"),
    ("10.4.0.7", None),          # outside the new subnet
    ("10.3.0.1", None),          # now the gateway
    ("10.3.0.254", None),        # now reserved for the hub
    ("10.3.255.255", None),      # broadcast
    (None, None),                # had no address: Docker assigns one, as before
])
def test_kept_address(address: str | None, kept: str | None) -> None:
    assert kept_address(address, wanted_config(OVERLAY)) == kept


def test_no_address_can_be_requested_without_a_configured_subnet() -> None:
    assert kept_address("172.18.0.5", wanted_config({})) is None


def test_containers_keeping_their_address_reconnect_first() -> None:
    attachments = [Attachment("1", "a-moved", "10.9.0.5"), Attachment("2", "b-kept", "10.3.0.5"),
                   Attachment("3", "c-dynamic", None), Attachment("4", "d-kept", "10.3.0.4")]
    order = reconnect_order(attachments, wanted_config(OVERLAY))
    assert [(a.name, address) for a, address in order] == [
        ("b-kept", "10.3.0.5"), ("d-kept", "10.3.0.4"), ("a-moved", None), ("c-dynamic", None)]
