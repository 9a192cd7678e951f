"""A netns's links, addresses and firewall as iproute2 and iptables report them, for module tests
to check what a module did (or that it changed nothing) without trusting the module's own reader."""
from __future__ import annotations

import json
from typing import Any

from tests.support.netns import Netns


def links(ns: Netns) -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in json.loads(ns.sh("ip -j -d link show"))}


def addresses(ns: Netns, name: str) -> list[str]:
    data = json.loads(ns.sh(f"ip -j -4 addr show dev {name}"))
    return [f"{a['local']}/{a['prefixlen']}" for a in data[0]["addr_info"]] if data else []


def vxlan(link: dict[str, Any]) -> dict[str, Any]:
    data = link["linkinfo"]["info_data"]
    return {"id": data["id"], "remote": data.get("remote"), "local": data.get("local"),
            "port": data["port"], "learning": data.get("learning")}


def kernel_state(ns: Netns, routes: bool = False) -> str:
    """Everything the module could touch (timers left out), to prove that a run changed nothing.

    `routes`: the route table too, for a module that sets routes.
    """
    summary = []
    for name, link in sorted(links(ns).items()):
        kind = link.get("linkinfo", {}).get("info_kind", "")
        # Admin state only: carrier flags of a fresh veth settle asynchronously.
        summary.append(f"{name} {link['ifindex']} {kind} {link['mtu']} {'UP' in link['flags']} "
                       f"{link.get('master')} {vxlan(link) if kind == 'vxlan' else ''}")
    tables = [ns.sh("ip -4 addr show")]
    if routes:
        tables.append(ns.sh("ip route"))
    tables += [ns.sh("iptables -S"), ns.sh("iptables -t nat -S"), ns.sh("sysctl -n net.ipv4.ip_forward")]
    return "\n".join([*summary, *tables])


def all_addresses(ns: Netns, name: str) -> list[str]:
    """IPv4 and IPv6 addresses of a link (link-local included), as iproute2 lists them."""
    data = json.loads(ns.sh(f"ip -j addr show dev {name}"))
    return sorted(f"{a['local']}/{a['prefixlen']}" for a in data[0]["addr_info"]) if data else []


def routes(ns: Netns, table: str = "main") -> list[dict[str, Any]]:
    """IPv4 routes of a table with numeric protocol, scope and type (`ip -j -N -d`)."""
    return json.loads(ns.sh(f"ip -j -N -d -4 route show table {table}"))


def neighbours(ns: Netns, name: str) -> list[dict[str, Any]]:
    return json.loads(ns.sh(f"ip -j neigh show dev {name}"))


def fdb(ns: Netns, name: str) -> list[dict[str, Any]]:
    return json.loads(ns.sh(f"bridge -j fdb show dev {name}"))
