"""Jinja2 filters that turn inventory data into module input.

Kept here (not in templates) so the shaping of inventory data is unit-tested and the
roles stay declarative.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any


def netloom_overlay_runners(hostnames: list[str], hostvars: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Runner entries for overlay_hub: name, underlay IP and the declared id if any.

    Fails loudly when a runner has no underlay address, instead of letting the module
    receive an empty string.
    """
    runners = []
    for name in hostnames:
        host = hostvars[name]
        underlay_ip = host.get("netloom_underlay_ip")
        if not underlay_ip:
            raise ValueError(f"runner {name}: netloom_underlay_ip is not set in the inventory")
        entry: dict[str, Any] = {"name": name, "underlay_ip": str(underlay_ip)}
        if host.get("overlay_runner_id") is not None:
            entry["id"] = int(host["overlay_runner_id"])
        runners.append(entry)
    return runners


def netloom_runner_of(runners: list[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    """The hub's resolved table entry for one runner; a clear error if the hub left it out."""
    for entry in runners:
        if entry.get("name") == name:
            return entry
    raise ValueError(f"runner {name} is missing from the hub's runner table; "
                     "is it in the runner group and was the hub play run?")


def netloom_mesh_peers(runners: list[Mapping[str, Any]], hostvars: Mapping[str, Any]) -> list[dict[str, Any]]:
    """overlay_runner's mesh_peers: the hub's resolved entries of the runners in direct mode.

    A runner's mode is its `netloom_overlay_mode` (hub unless set). The underlay IP is the
    hub's (the one its link to that runner uses); the module refuses an entry without one.
    """
    peers = []
    for entry in runners:
        mode = str(hostvars[entry["name"]].get("netloom_overlay_mode", "hub"))
        if mode not in ("hub", "direct"):
            raise ValueError(f"runner {entry['name']}: netloom_overlay_mode is {mode!r}, not hub or direct")
        if mode == "direct":
            peers.append({"id": int(entry["id"]), "underlay_ip": entry.get("underlay_ip"),
                          "name": entry["name"]})
    return peers


def netloom_edge_cni_subnet(value: str | None, base: str, index: Any = None) -> str:
    """A compute node's CNI_SUBNET: the declared one, else the /24 number `index` of the base.

    Checked here, before any task runs, so a bad inventory fails naming the variable:
    workers of the node take addresses only from it, inside the shared worker base.
    """
    base_net = ipaddress.IPv4Network(str(base))
    if value in (None, ""):
        if index is None or str(index).strip() == "":
            raise ValueError("netloom_edge_cni_subnet: not set, and no netloom_edge_node_index to derive it")
        number = int(index)
        blocks = 2 ** (24 - base_net.prefixlen) if base_net.prefixlen <= 24 else 0
        if not 0 <= number < blocks:
            raise ValueError(f"netloom_edge_node_index: {index!r}: needs 0..{blocks - 1} /24s of {base_net}")
        return str(ipaddress.IPv4Network((int(base_net.network_address) + (number << 8), 24)))
    try:
        subnet = ipaddress.IPv4Network(str(value).strip())
    except ValueError:
        raise ValueError(f"netloom_edge_cni_subnet: {value!r}: no IPv4 network (host bits set?)") from None
    if subnet.prefixlen > 30:
        raise ValueError(f"netloom_edge_cni_subnet: {value!r}: needs /30 or shorter")
    if not subnet.subnet_of(base_net):
        raise ValueError(f"netloom_edge_cni_subnet: {value!r}: outside the worker base {base_net}")
    return str(subnet)


def netloom_edge_cni_conflist(cni_subnet: str, base: str, gateway: str, bridge: str,
                              name: str) -> dict[str, Any]:
    """The values of the CNI conflist (templates/cni/esb-workers.conflist.j2): host-local range = CNI_SUBNET.

    The range keeps the base's mask and gateway (10.88.0.1 on every node), so a worker sees
    the same network as a Docker worker on the same bridge, yet only gets addresses of its node.
    """
    subnet = ipaddress.IPv4Network(cni_subnet)
    base_net = ipaddress.IPv4Network(base)
    gateway_ip = ipaddress.IPv4Address(gateway)
    if gateway_ip not in base_net:
        raise ValueError(f"netloom_edge_gateway_ip: {gateway!r}: outside the worker base {base_net}")
    # The block's own network and broadcast addresses are left out (Docker: netloom_edge_cni_reserved).
    first, last = subnet.network_address + 1, subnet.broadcast_address - 1
    return {"name": name, "bridge": bridge, "subnet": str(base_net), "range_start": str(first),
            "range_end": str(last), "gateway": str(gateway_ip)}


def netloom_edge_cni_reserved(cni_subnet: str, base: str, gateway: str) -> dict[str, str]:
    """Docker aux_addresses that keep workers off the CNI block's network and broadcast addresses.

    Docker's ip_range hands out every address of the range that is a host of the *subnet*
    (the base), so the first worker of 10.88.1.0/24 got 10.88.1.0. Reserving the block's first
    and last address makes Docker start at .1 and stop at .254, as the CNI conflist does.
    Addresses Docker reserves itself (the base's network/broadcast, the gateway) are left out.
    """
    subnet = ipaddress.IPv4Network(str(cni_subnet).strip())
    base_net = ipaddress.IPv4Network(str(base).strip())
    taken = {base_net.network_address, base_net.broadcast_address,
             ipaddress.IPv4Address(str(gateway).strip())}
    wanted = {"netloom-cni-network": subnet.network_address,
              "netloom-cni-broadcast": subnet.broadcast_address}
    return {name: str(address) for name, address in wanted.items() if address not in taken}


def netloom_edge_control_address(network: str) -> str:
    """The control node's WireGuard address: the first host of netloom_edge_wg_network, with its prefix."""
    try:
        net = ipaddress.IPv4Network(str(network).strip())
    except ValueError as err:
        raise ValueError(f"netloom_edge_wg_network: {network!r}: not an IPv4 network ({err})") from None
    if net.num_addresses < 4:
        raise ValueError(f"netloom_edge_wg_network: {network!r}: needs /30 or shorter "
                         "(the control node and compute nodes)")
    return f"{net.network_address + 1}/{net.prefixlen}"


def netloom_edge_wg_address(network: str, index: Any) -> str:
    """WireGuard address of compute node `index`: host number index+1 (host 1 is the control node).

    Node 0 is refused: it would get the control node's own address.
    """
    control = netloom_edge_control_address(network)
    net = ipaddress.IPv4Network(str(network).strip())
    if index is None or str(index).strip() == "":
        raise ValueError("netloom_edge_node_index: not set (and no netloom_edge_wg_address for this node)")
    try:
        number = int(str(index).strip())
    except ValueError:
        raise ValueError(f"netloom_edge_node_index: {index!r}: not an integer") from None
    if number == 0:
        raise ValueError(f"netloom_edge_node_index: {index!r}: node 0 would get the control node's address "
                         f"{control.split('/')[0]}; compute nodes are numbered from 1")
    if not 1 <= number < net.num_addresses - 3:
        raise ValueError(f"netloom_edge_node_index: {index!r}: no host address left in {net}")
    return f"{net.network_address + number + 1}/{net.prefixlen}"


# What wireguard_interface accepts for a peer; anything else a node publishes stays out.
PEER_FIELDS = ("public_key", "allowed_ips", "endpoint", "persistent_keepalive", "preshared_key",
               "endpoint_policy")


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "yes", "1")


def netloom_edge_peers(hostnames: list[str], hostvars: Mapping[str, Any], fact: str,
                       check_mode: Any = False) -> list[dict[str, Any]]:
    """The peer entries other nodes published about themselves (public key, endpoint, AllowedIPs).

    Only public data travels between hosts; a node that did not publish its entry (its key
    play did not run) is named instead of silently left out. A node whose key does not exist
    yet (never converged, run with --check: the key task was skipped) publishes
    `key_pending: true`; in check mode it is left out of the peers (its own play notes it),
    in a real run it is an error, since the real key task always makes the key.
    """
    peers = []
    for name in hostnames:
        entry = hostvars[name].get(fact)
        if entry and _flag(entry.get("key_pending", False)):
            if _flag(check_mode):
                continue
            raise ValueError(f"{name}: {fact} has no public key yet (key_pending); run its key play first")
        if not entry or not entry.get("public_key"):
            raise ValueError(f"{name}: {fact} is not set; run the edge key play for it first")
        peers.append({key: value for key, value in entry.items() if key in PEER_FIELDS})
    return peers


def netloom_edge_relays(relays: list[Mapping[str, Any]], hosts: Mapping[str, Any] | None,
                       health_check: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """haproxy_relay entries with each backend name the managed hosts block maps replaced by its address.

    HAProxy resolves names only through DNS `resolvers` (with init-addr none), never through
    /etc/hosts, and a host has no Docker DNS; so names that the hosts block maps are handed
    to HAProxy as the same addresses, and only unmapped names are left to the resolvers.
    A relay without its own health check gets `health_check`.
    """
    mapped = hosts or {}
    result = []
    for relay in relays:
        entry = dict(relay)
        address = mapped.get(str(entry.get("backend_host")))
        if address:
            entry["backend_host"] = str(address)
        if health_check and "health_check" not in entry:
            entry["health_check"] = dict(health_check)
        result.append(entry)
    return result

class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {
            "netloom_overlay_runners": netloom_overlay_runners,
            "netloom_runner_of": netloom_runner_of,
            "netloom_mesh_peers": netloom_mesh_peers,
            "netloom_edge_cni_subnet": netloom_edge_cni_subnet,
            "netloom_edge_cni_conflist": netloom_edge_cni_conflist,
            "netloom_edge_cni_reserved": netloom_edge_cni_reserved,
            "netloom_edge_control_address": netloom_edge_control_address,
            "netloom_edge_wg_address": netloom_edge_wg_address,
            "netloom_edge_peers": netloom_edge_peers,
            "netloom_edge_relays": netloom_edge_relays,
        }
