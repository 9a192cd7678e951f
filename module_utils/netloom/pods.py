"""Pinacle pods as plain data: names, allocations, egress rules, hostname routing.

Everything here is pure (no Docker, no kernel), so the decisions that went wrong in the
original (overlapping subnets, ports handed out twice, nginx routing any port) are unit
tested on their own. library/pod.py and library/nginx_hostname_router.py read live state,
call these functions and plan the changes.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ansible.module_utils.netloom.common import IFNAME_MAX, InputError, int_range, ipv4_network, port
from ansible.module_utils.netloom.constants import NO_HOST_NETWORKS

NETWORK_PREFIX = "pinacle-pod-"
BRIDGE_PREFIX = "pod-"  # the Linux bridge of pod ID is pod-ID: at most 15 characters
CHAIN_PREFIX = "NETLOOM-POD-"
INPUT_CHAIN_PREFIX = "NETLOOM-PODIN-"  # never a CHAIN_PREFIX name: that has "-" after POD
DEFAULT_POOL = "10.249.0.0/16"
DEFAULT_PORT_RANGE = "30000-39999"
STATE_FILE = "/var/lib/netloom/pods/allocations.json"

LABEL_POD = "netloom.pod"
LABEL_SLUG = "netloom.pod.slug"
LABEL_SUBNET = "netloom.pod.subnet"
LABEL_PORT = "netloom.pod.port"
LABEL_SPEC = "netloom.pod.spec"
LABEL_SERVICES = "netloom.pod.services"

ROUTER_PORT = 80
DEFAULT_PORT = 3000
# The seed's default tabs: what a pod gets when it declares no services.
DEFAULT_SERVICES = (
    {"name": "app", "port": 3000},
    {"name": "code", "port": 8726},
    {"name": "kanban", "port": 3001},
    {"name": "claude", "port": 2528},
)
# Addresses `egress: no-private` blocks: RFC1918, every range no unicast host holds
# (constants.NO_HOST_NETWORKS: this-network, loopback, link-local with cloud metadata
# 169.254.169.254, multicast, reserved), shared address space (RFC 6598), IETF protocol
# assignments (RFC 6890) and the benchmarking range (RFC 2544).
PRIVATE_NETWORKS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    *(str(network) for network, _ in NO_HOST_NETWORKS),
    "100.64.0.0/10",
    "192.0.0.0/24",
    "198.18.0.0/15",
)

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def pod_id(field_name: str, value: Any) -> str:
    """A pod id: a DNS label short enough that its bridge name pod-ID fits in 15 characters."""
    text = str(value) if value is not None else ""
    if not _DNS_LABEL.fullmatch(text):
        raise InputError(field_name, value, "must be a DNS label: a-z, 0-9 and inner '-'")
    if len(BRIDGE_PREFIX + text) > IFNAME_MAX:
        raise InputError(
            field_name,
            value,
            f"too long: its bridge {BRIDGE_PREFIX}{text} would exceed "
            f"{IFNAME_MAX} characters (at most {IFNAME_MAX - len(BRIDGE_PREFIX)})",
        )
    return text


def slug(field_name: str, value: Any) -> str:
    """A pod slug: one DNS label (it appears in pod-SLUG.localhost)."""
    text = str(value) if value is not None else ""
    if not _DNS_LABEL.fullmatch(text) or len(text) > 59:  # "pod-" + slug is one label (63)
        raise InputError(
            field_name, value, "must be a DNS label of at most 59 characters: a-z, 0-9, inner '-'"
        )
    return text


def network_name(pod: str) -> str:
    return NETWORK_PREFIX + pod


def bridge_name(pod: str) -> str:
    return BRIDGE_PREFIX + pod


def chain_name(pod: str) -> str:
    return CHAIN_PREFIX + pod.upper()


def input_chain_name(pod: str) -> str:
    return INPUT_CHAIN_PREFIX + pod.upper()


def port_range(field_name: str, value: Any) -> range:
    """'LOW-HIGH' (inclusive) as a range of TCP ports."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(value))
    if not match:
        raise InputError(field_name, value, "must be LOW-HIGH, e.g. 30000-39999")
    low, high = port(field_name, int(match[1])), port(field_name, int(match[2]))
    if low > high:
        raise InputError(field_name, value, "LOW must not be above HIGH")
    return range(low, high + 1)


def pool(field_name: str, value: Any) -> ipaddress.IPv4Network:
    network = ipv4_network(field_name, value)
    if network.prefixlen > 24:
        raise InputError(field_name, value, "must hold at least one /24")
    return network


def services(field_name: str, value: Any, router_port: int) -> list[dict[str, Any]]:
    """Declared services: names unique, ports 1..65535, none on the router's own port."""
    entries = list(DEFAULT_SERVICES) if value is None else value
    if not isinstance(entries, list):
        raise InputError(field_name, value, "must be a list of {name, port}")
    result: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        where = f"{field_name}[{index}]"
        if not isinstance(entry, Mapping) or set(entry) - {"name", "port"} or "port" not in entry:
            raise InputError(where, entry, "must be a mapping with port and an optional name")
        number = int_range(f"{where}.port", entry["port"], 1, 65535)
        if number == router_port:
            raise InputError(
                f"{where}.port",
                entry["port"],
                "is the router's own port: routing it would send nginx to itself",
            )
        name = str(entry.get("name") or f"port-{number}")
        if not _DNS_LABEL.fullmatch(name):
            raise InputError(f"{where}.name", name, "must be a DNS label")
        if any(other["port"] == number or other["name"] == name for other in result):
            raise InputError(where, entry, "declares a port or name twice")
        result.append({"name": name, "port": number})
    return result


def egress(field_name: str, value: Any) -> tuple[str, list[str]]:
    """(mode, blocked CIDRs): open, no-private, or a list of CIDRs to block."""
    if value in (None, "open"):
        return "open", []
    if value == "no-private":
        return "no-private", list(PRIVATE_NETWORKS)
    if not isinstance(value, list):
        raise InputError(field_name, value, "must be open, no-private or a list of CIDRs to block")
    blocked = []
    for index, entry in enumerate(value):
        blocked.append(str(ipv4_network(f"{field_name}[{index}]", entry)))
    return "list", blocked


def egress_rules(bridge: str, blocked: Iterable[str]) -> tuple[str, ...]:
    """Rules of the pod's own chain (hooked from DOCKER-USER): drop new traffic from its bridge
    to blocked networks; replies to connections made to the pod still flow."""
    rules = []
    for cidr in blocked:
        rules.append(f"-d {cidr} -i {bridge} -m conntrack --ctstate NEW -j DROP")
    return tuple(rules)


def input_rules(bridge: str) -> tuple[str, ...]:
    """Rules of the pod's INPUT chain: no new connection from its bridge to the host itself (any of
    its addresses, any service); replies to connections the host opened still pass."""
    return (f"-i {bridge} -m conntrack --ctstate NEW -j DROP",)


# ---- allocation ----


@dataclass(frozen=True)
class Allocation:
    pod: str
    subnet: ipaddress.IPv4Network
    port: int

    def describe(self) -> dict[str, Any]:
        return {"pod": self.pod, "subnet": str(self.subnet), "port": self.port}


class ExhaustedError(InputError):
    """The pool or the port range has no free entry left."""


def parse_state(text: str | None) -> dict[str, Allocation]:
    """The host state file: {"pods": {ID: {"subnet": CIDR, "port": N}}}; unreadable entries are dropped."""
    if not text:
        return {}
    try:
        data = json.loads(text)
        entries = data["pods"]
    except (ValueError, KeyError, TypeError):
        return {}
    result = {}
    for pod, entry in entries.items() if isinstance(entries, dict) else []:
        try:
            result[pod] = Allocation(pod, ipaddress.IPv4Network(entry["subnet"]), int(entry["port"]))
        except (ValueError, KeyError, TypeError):
            continue
    return result


def render_state(allocations: Mapping[str, Allocation]) -> str:
    pods = {pod: {"subnet": str(a.subnet), "port": a.port} for pod, a in sorted(allocations.items())}
    return json.dumps({"pods": pods}, indent=2, sort_keys=True) + "\n"


def from_labels(labels: Mapping[str, str] | None) -> Allocation | None:
    """The allocation a pod's Docker object carries in its labels, if complete."""
    labels = labels or {}
    try:
        return Allocation(
            labels[LABEL_POD], ipaddress.IPv4Network(labels[LABEL_SUBNET]), int(labels[LABEL_PORT])
        )
    except (KeyError, ValueError):
        return None


def reconcile(
    labelled: Iterable[Allocation], recorded: Mapping[str, Allocation]
) -> tuple[dict[str, Allocation], list[str]]:
    """One allocation table from Docker labels (what is in use) and the state file (what was given).

    Like Kubernetes' NodePort repair: live objects win; a recorded allocation with no object is
    kept (a pod whose objects were removed behind netloom's back gets the same subnet and port
    back), since freeing it is certain only when its pod is deleted through netloom. Returns the
    table and notes on what was repaired.
    """
    table: dict[str, Allocation] = {}
    notes = []
    for allocation in labelled:
        known = table.get(allocation.pod)
        if known is not None and known != allocation:
            notes.append(
                f"pod {allocation.pod}: its objects' labels disagree ({known.describe()} vs "
                f"{allocation.describe()}); kept the first"
            )
            continue
        table[allocation.pod] = allocation
    for pod, allocation in recorded.items():
        if pod not in table:
            table[pod] = allocation
        elif table[pod] != allocation:
            notes.append(
                f"pod {pod}: state file said {allocation.describe()}, its objects say "
                f"{table[pod].describe()}; the objects win"
            )
    for pod in table:
        if pod not in recorded:
            notes.append(f"pod {pod}: missing from the state file; recorded from its labels")
    return table, notes


def allocate_subnet(
    pod: str,
    field_name: str,
    network_pool: ipaddress.IPv4Network,
    table: Mapping[str, Allocation],
    foreign: Iterable[ipaddress.IPv4Network],
) -> ipaddress.IPv4Network:
    """The first /24 of the pool that overlaps no other pod's subnet and no foreign network or route."""
    others = [a.subnet for p, a in table.items() if p != pod]
    taken = [*others, *foreign]
    for candidate in network_pool.subnets(new_prefix=24):
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    used = sum(1 for net in others if net.overlaps(network_pool))
    raise ExhaustedError(
        field_name,
        str(network_pool),
        f"pool exhausted: all {2 ** (24 - network_pool.prefixlen)} /24s are taken "
        f"({used} by pods, the rest overlap host networks or routes)",
    )


def allocate_port(
    pod: str, field_name: str, ports: range, table: Mapping[str, Allocation], busy: Iterable[int]
) -> int:
    """The lowest port of the range no other pod holds and nothing on the host listens on or publishes."""
    held = {a.port for p, a in table.items() if p != pod}
    taken = held | set(busy)
    for candidate in ports:
        if candidate not in taken:
            return candidate
    raise ExhaustedError(
        field_name,
        f"{ports.start}-{ports.stop - 1}",
        f"port range exhausted: {len(held & set(ports))} ports held by pods, "
        f"{len((taken - held) & set(ports))} in use on the host",
    )


def foreign_conflict(subnet: ipaddress.IPv4Network, foreign: Iterable[ipaddress.IPv4Network]) -> str | None:
    for net in foreign:
        if subnet.overlaps(net):
            return str(net)
    return None


def listening_ports(proc_net_texts: Iterable[str]) -> set[int]:
    """TCP ports in LISTEN state from /proc/net/tcp and tcp6 texts (any local address)."""
    found = set()
    for text in proc_net_texts:
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return found


# ---- hostname routing ----

_HOST_RE = re.compile(
    r"^localhost-(?P<port>[^.-]{1,32})[.-]pod-(?P<slug>[a-z0-9-]+)\.localhost$", re.IGNORECASE
)


def parse_host(host: str) -> tuple[str, str] | None:
    """(port text, slug) of localhost-PORT.pod-SLUG.localhost or localhost-PORT-pod-SLUG.localhost.

    The same pattern the nginx template uses (the port part is anything but '.' and '-', so a
    malformed port is still recognised and answered with a 404 naming it).
    """
    match = _HOST_RE.match(host.split(":", 1)[0] if not host.startswith("[") else host)
    return (match["port"], match["slug"].lower()) if match else None


def route(
    host: str, pod_slug: str, declared: Iterable[int], default_port: int = DEFAULT_PORT
) -> tuple[int, Any]:
    """What the router answers for a Host: (200, port), (404, port text) or (421, other slug)."""
    parsed = parse_host(host)
    ports = set(declared)
    if parsed is None:
        return (200, default_port) if default_port in ports else (404, str(default_port))
    port_text, host_slug = parsed
    if host_slug != pod_slug:
        return 421, host_slug
    if port_text.isdigit() and int(port_text) in ports:
        return 200, int(port_text)
    return 404, port_text


def service_urls(
    pod_slug: str, declared: Iterable[Mapping[str, Any]], external_port: int | None, style: str = "dot"
) -> list[dict[str, Any]]:
    """The URL of each declared service (a UI's tabs)."""
    separator = "." if style == "dot" else "-"
    suffix = f":{external_port}" if external_port and external_port != 80 else ""
    return [
        {
            "name": s["name"],
            "port": s["port"],
            "url": f"http://localhost-{s['port']}{separator}pod-{pod_slug}.localhost{suffix}/",
        }
        for s in declared
    ]


def router_variables(
    pod_slug: str,
    declared: list[dict[str, Any]],
    default_port: int,
    listen: int,
    read_timeout: int,
    default_server: bool,
) -> dict[str, Any]:
    """What templates/nginx/hostname_router.conf.j2 renders: already validated values only."""
    return {
        "slug": pod_slug,
        "slug_regex": re.escape(pod_slug),
        "services": declared,
        "default_port": default_port,
        "listen": listen,
        "read_timeout": read_timeout,
        "default_server": default_server,
        "var": "netloom_" + re.sub(r"[^a-z0-9]", "_", pod_slug),
        "marker": ROUTER_MARKER,
    }


ROUTER_MARKER = "# netloom: nginx_hostname_router"
