"""Lab topology files: parse and check them completely before anything touches Docker.

A topology is plain YAML data (format in lab/README.md). Everything `up` derives from it
(the node's routes/sysctls script, the Ansible inventory, Molecule's instance config) is
rendered here by pure functions, so the whole format is unit-tested without Docker.
"""
from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lab_image  # the lab's modules live side by side
import yaml

LAB_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}$")  # part of every docker object name
NODE_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?$")  # a hostname label
NETWORK_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,30}[a-z0-9])?$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # Ansible group and variable names
SYSCTL_KEY = re.compile(r"^net(?:\.[A-Za-z0-9_-]+)+$")
# `mgmt` is the lab's own SSH network; the group names are Ansible's built-in ones.
RESERVED_NETWORKS = frozenset({"mgmt"})
RESERVED_GROUPS = frozenset({"all", "ungrouped"})
# Host variables the lab writes itself for every node.
LAB_VARS = frozenset({"netloom_underlay_ip", "netloom_underlay_interface", "netloom_lab"})

TOP_KEYS = {"name", "description", "networks", "defaults", "nodes"}
NETWORK_KEYS = {"subnet", "gateway"}
DEFAULT_KEYS = {"routes", "sysctls", "vars"}
NODE_KEYS = {"groups", "networks", "docker", "routes", "sysctls", "vars", "services", "images"}
ROUTE_KEYS = {"to", "via", "dev", "state"}
SERVICE_KINDS = {"echo"}
ECHO_KEYS = {"address", "port"}


class TopologyError(Exception):
    """A topology value that cannot work, named by its place in the file."""

    def __init__(self, where: str, value: Any, reason: str) -> None:
        super().__init__(f"{where}: {value!r}: {reason}")
        self.where = where
        self.value = value
        self.reason = reason


@dataclass(frozen=True)
class Network:
    name: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address  # reserved by Docker's IPAM; never an address on the host


@dataclass(frozen=True)
class Route:
    to: str  # "default" or a normalised CIDR
    via: ipaddress.IPv4Address | None = None
    dev: str | None = None  # a topology network name, rendered as the node's interface on it
    present: bool = True


@dataclass(frozen=True)
class Echo:
    address: ipaddress.IPv4Address
    port: int

    @property
    def unit(self) -> str:
        return f"netloom-lab-echo@{self.address}:{self.port}.service"


@dataclass(frozen=True)
class Node:
    name: str
    groups: tuple[str, ...]
    addresses: dict[str, ipaddress.IPv4Address]  # network name -> address, in file order
    docker: bool
    routes: tuple[Route, ...]
    sysctls: dict[str, str]
    vars: dict[str, Any]
    echo: tuple[Echo, ...]
    images: tuple[str, ...] = ()  # workload images loaded into the node's own dockerd

    @property
    def underlay(self) -> str:
        """The node's first network: what `netloom_underlay_*` describe."""
        return next(iter(self.addresses))


@dataclass(frozen=True)
class Topology:
    name: str
    description: str
    networks: dict[str, Network]
    nodes: dict[str, Node]

    @property
    def groups(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for node in self.nodes.values():
            for group in node.groups:
                members.setdefault(group, []).append(node.name)
        return members


def load(path: Path) -> Topology:
    """Read and validate a topology file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise TopologyError(str(path), str(path), f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise TopologyError(str(path), str(path), f"not valid YAML: {exc}") from None
    return parse(data)


def parse(data: Any) -> Topology:
    """Validate topology data (as loaded from YAML) into a `Topology`, or raise TopologyError."""
    top = _mapping("topology", data, TOP_KEYS)
    name = top.get("name")
    if not isinstance(name, str) or not LAB_NAME.match(name):
        raise TopologyError("name", name, "must match [a-z][a-z0-9-]{0,19}")
    description = top.get("description", "")
    if not isinstance(description, str):
        raise TopologyError("description", description, "must be a string")
    networks = _networks(top.get("networks"))
    defaults = _mapping("defaults", top.get("defaults", {}), DEFAULT_KEYS)
    default_routes = _routes("defaults.routes", defaults.get("routes", []))
    default_sysctls = _sysctls("defaults.sysctls", defaults.get("sysctls", {}))
    default_vars = _vars("defaults.vars", defaults.get("vars", {}))
    raw_nodes = top.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        raise TopologyError("nodes", raw_nodes, "must be a non-empty mapping of node name to node")
    nodes = {}
    for node_name, spec in raw_nodes.items():
        node = _node(str(node_name), spec, networks, default_routes, default_sysctls, default_vars)
        nodes[node.name] = node
    _check_unique_addresses(nodes)
    return Topology(name, description, networks, nodes)


def _mapping(where: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TopologyError(where, value, "must be a mapping")
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise TopologyError(where, unknown, f"unknown keys (known: {', '.join(sorted(allowed))})")
    return value


def _address(where: str, value: Any) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError:
        raise TopologyError(where, value, "not an IPv4 address") from None


def _networks(value: Any) -> dict[str, Network]:
    if not isinstance(value, dict) or not value:
        raise TopologyError("networks", value, "must be a non-empty mapping of network name to network")
    networks: dict[str, Network] = {}
    for raw_name, spec in value.items():
        name = str(raw_name)
        where = f"networks.{name}"
        if not NETWORK_NAME.match(name) or name in RESERVED_NETWORKS:
            raise TopologyError("networks", name,
                                "network names match [a-z][a-z0-9-]* and 'mgmt' is reserved")
        spec = _mapping(where, spec, NETWORK_KEYS)
        try:
            subnet = ipaddress.IPv4Network(str(spec.get("subnet")))
        except ValueError:
            raise TopologyError(f"{where}.subnet", spec.get("subnet"),
                                "not an IPv4 network (host bits must be 0)") from None
        if subnet.prefixlen > 29:
            raise TopologyError(f"{where}.subnet", str(subnet), "needs at least a /29")
        gateway = _address(f"{where}.gateway", spec["gateway"]) if "gateway" in spec else subnet[1]
        if not _usable(gateway, subnet):
            raise TopologyError(f"{where}.gateway", str(gateway), f"not a host address of {subnet}")
        for other in networks.values():
            if subnet.overlaps(other.subnet):
                raise TopologyError(f"{where}.subnet", str(subnet), f"overlaps network {other.name}")
        networks[name] = Network(name, subnet, gateway)
    return networks


def _usable(address: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network) -> bool:
    return address in subnet and address not in (subnet.network_address, subnet.broadcast_address)


def _routes(where: str, value: Any) -> list[Route]:
    if not isinstance(value, list):
        raise TopologyError(where, value, "must be a list of routes")
    routes = []
    for index, raw in enumerate(value):
        spot = f"{where}[{index}]"
        raw = _mapping(spot, raw, ROUTE_KEYS)
        to = raw.get("to")
        if to != "default":
            try:
                to = str(ipaddress.IPv4Network(str(to)))
            except ValueError:
                raise TopologyError(f"{spot}.to", to, "must be 'default' or an IPv4 network") from None
        state = raw.get("state", "present")
        if state not in ("present", "absent"):
            raise TopologyError(f"{spot}.state", state, "must be present or absent")
        via = _address(f"{spot}.via", raw["via"]) if "via" in raw else None
        dev = raw.get("dev")
        if dev is not None and not isinstance(dev, str):
            raise TopologyError(f"{spot}.dev", dev, "must be a network name")
        if state == "present" and via is None and dev is None:
            raise TopologyError(spot, raw, "a present route needs via or dev")
        if state == "absent" and (via or dev):
            raise TopologyError(spot, raw, "an absent route names only `to` (every route to it is removed)")
        routes.append(Route(to, via, dev, state == "present"))
    return routes


def _sysctls(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TopologyError(where, value, "must be a mapping of sysctl name to value")
    sysctls = {}
    for key, raw in value.items():
        if not isinstance(key, str) or not SYSCTL_KEY.match(key):
            raise TopologyError(where, key, "only net.* sysctls (per network namespace) can be set in a node")
        if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).strip():
            raise TopologyError(f"{where}.{key}", raw, "must be an integer or a non-empty string")
        sysctls[key] = str(raw)
    return sysctls


def _vars(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TopologyError(where, value, "must be a mapping of variable name to value")
    for key in value:
        if not isinstance(key, str) or not IDENTIFIER.match(key) or key.startswith("ansible_"):
            raise TopologyError(where, key, "must be an Ansible variable name, not ansible_*")
        if key in LAB_VARS:
            raise TopologyError(where, key, "is set by the lab itself")
    return dict(value)


def _node(name: str, spec: Any, networks: dict[str, Network], default_routes: list[Route],
          default_sysctls: dict[str, str], default_vars: dict[str, Any]) -> Node:
    where = f"nodes.{name}"
    if not NODE_NAME.match(name):
        raise TopologyError("nodes", name, "node names are hostnames: [a-z][a-z0-9-]*, at most 32 characters")
    spec = _mapping(where, spec if spec is not None else {}, NODE_KEYS)
    groups = spec.get("groups", [])
    if not isinstance(groups, list):
        raise TopologyError(f"{where}.groups", groups, "must be a list of group names")
    for group in groups:
        if not isinstance(group, str) or not IDENTIFIER.match(group) or group in RESERVED_GROUPS:
            raise TopologyError(f"{where}.groups", group, "must be an Ansible group name (not all/ungrouped)")
    addresses = _node_addresses(where, spec.get("networks"), networks)
    docker = spec.get("docker", False)
    if not isinstance(docker, bool):
        raise TopologyError(f"{where}.docker", docker, "must be true or false")
    own_routes = _routes(f"{where}.routes", spec.get("routes", []))
    # A node's own route to a destination replaces the default one to the same destination.
    own_targets = {route.to for route in own_routes}
    routes = [(f"defaults.routes[{index}] (for node {name})", route)
              for index, route in enumerate(default_routes) if route.to not in own_targets]
    routes += [(f"{where}.routes[{index}]", route) for index, route in enumerate(own_routes)]
    for spot, route in routes:
        _check_route(spot, route, addresses, networks)
    sysctls = {**default_sysctls, **_sysctls(f"{where}.sysctls", spec.get("sysctls", {}))}
    host_vars = {**default_vars, **_vars(f"{where}.vars", spec.get("vars", {}))}
    echo = _services(f"{where}.services", spec.get("services", {}), addresses)
    images = _images(f"{where}.images", spec.get("images", []), docker)
    return Node(name, tuple(dict.fromkeys(groups)), addresses, docker, tuple(route for _, route in routes),
                sysctls, host_vars, echo, images)


def _images(where: str, value: Any, docker: bool) -> tuple[str, ...]:
    """Workload image names: each must have a recipe, and the node must run its own dockerd."""
    if not isinstance(value, list):
        raise TopologyError(where, value, "must be a list of workload image names")
    if value and not docker:
        raise TopologyError(where, value, "images are loaded into the node's own dockerd: set docker: true")
    known = lab_image.workload_names()
    for name in value:
        if not isinstance(name, str) or name not in known:
            raise TopologyError(where, name,
                                f"no recipe lab/workload_images/{name}/ (known: {', '.join(known)})")
    if len(set(value)) != len(value):
        raise TopologyError(where, value, "an image is listed twice")
    return tuple(value)


def _node_addresses(where: str, value: Any, networks: dict[str, Network]) -> dict[str, ipaddress.IPv4Address]:
    if not isinstance(value, dict) or not value:
        raise TopologyError(f"{where}.networks", value,
                            "must map at least one network to the node's address on it "
                            "(the first is its underlay)")
    addresses = {}
    for net_name, raw in value.items():
        if net_name not in networks:
            raise TopologyError(f"{where}.networks", net_name, "no such network")
        network = networks[net_name]
        address = _address(f"{where}.networks.{net_name}", raw)
        if not _usable(address, network.subnet):
            raise TopologyError(f"{where}.networks.{net_name}", str(address),
                                f"not a host address of {network.subnet}")
        if address == network.gateway:
            raise TopologyError(f"{where}.networks.{net_name}", str(address),
                                f"is the network's reserved gateway "
                                f"(set networks.{net_name}.gateway to move it)")
        addresses[net_name] = address
    return addresses


def _check_route(where: str, route: Route, addresses: dict[str, ipaddress.IPv4Address],
                 networks: dict[str, Network]) -> None:
    if route.dev is not None and route.dev not in addresses:
        raise TopologyError(f"{where}.dev", route.dev, "the node is not on that network")
    if route.via is not None:
        on_link = [name for name in addresses if route.via in networks[name].subnet]
        if not on_link:
            raise TopologyError(f"{where}.via", str(route.via), "not on any of the node's networks")
        if route.via in addresses.values():
            raise TopologyError(f"{where}.via", str(route.via), "is the node's own address")


def _services(where: str, value: Any, addresses: dict[str, ipaddress.IPv4Address]) -> tuple[Echo, ...]:
    services = _mapping(where, value, SERVICE_KINDS)
    raw_echo = services.get("echo", [])
    entries = [raw_echo] if isinstance(raw_echo, dict) else raw_echo
    if not isinstance(entries, list):
        raise TopologyError(f"{where}.echo", raw_echo, "must be a mapping or a list of mappings")
    echo = []
    for index, raw in enumerate(entries):
        spot = f"{where}.echo[{index}]"
        raw = _mapping(spot, raw, ECHO_KEYS)
        address = _address(f"{spot}.address", raw.get("address"))
        if address not in addresses.values():
            raise TopologyError(f"{spot}.address", str(address), "not one of the node's addresses")
        port = raw.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise TopologyError(f"{spot}.port", port, "must be a TCP port 1-65535")
        entry = Echo(address, port)
        if entry in echo:
            raise TopologyError(spot, raw, "declared twice")
        echo.append(entry)
    return tuple(echo)


def _check_unique_addresses(nodes: dict[str, Node]) -> None:
    seen: dict[tuple[str, ipaddress.IPv4Address], str] = {}
    for node in nodes.values():
        for net_name, address in node.addresses.items():
            owner = seen.setdefault((net_name, address), node.name)
            if owner != node.name:
                raise TopologyError(f"nodes.{node.name}.networks.{net_name}", str(address),
                                    f"already used by node {owner}")


def render_network_script(topology: Topology, node: Node, interfaces: dict[str, str]) -> str:
    """The node's sysctls and routes as an idempotent shell script (network name -> ifname given).

    It runs at every `up` and at every boot of the node (netloom-lab-network.service), so
    the state it sets also survives a container restart.
    """
    lines = [f"# Written by lab/netloom_lab.py up: node {node.name} of lab {topology.name}.", "set -e"]
    for key, value in node.sysctls.items():
        lines.append(f"sysctl -q -w {shlex.quote(f'{key}={value}')}")
    for route in node.routes:
        target = "0.0.0.0/0" if route.to == "default" else route.to
        if not route.present:
            lines.append(f"ip -4 route flush exact {target}")
            continue
        words = ["ip", "-4", "route", "replace", route.to]
        if route.via is not None:
            words += ["via", str(route.via)]
        if route.dev is not None:
            words += ["dev", interfaces[route.dev]]
        lines.append(" ".join(shlex.quote(word) for word in words))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class NodeAccess:
    """How the controller reaches a running node, learnt from Docker and from the node itself."""

    ssh_port: int
    interfaces: dict[str, str]  # network name -> interface name inside the node
    host_keys: tuple[str, ...] = ()  # the node's SSH host public keys ("TYPE BASE64")


def render_known_hosts(access: dict[str, NodeAccess]) -> str:
    """known_hosts lines for the lab's nodes at their published ports (read from the nodes via Docker)."""
    return "".join(f"[127.0.0.1]:{node.ssh_port} {key}\n"
                   for _, node in sorted(access.items()) for key in node.host_keys)


def ssh_common_args(known_hosts: Path) -> str:
    """Host keys are checked against the file the lab wrote; nothing else is trusted."""
    return f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"


def render_inventory(topology: Topology, access: dict[str, NodeAccess], key_file: Path,
                     known_hosts: Path) -> dict[str, Any]:
    """The Ansible YAML inventory of a running lab; `netloom_lab` marks whose file it is."""
    hosts = {}
    for node in topology.nodes.values():
        node_access = access[node.name]
        hosts[node.name] = {
            "ansible_host": "127.0.0.1",
            "ansible_port": node_access.ssh_port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key_file),
            "ansible_ssh_common_args": ssh_common_args(known_hosts),
            "ansible_python_interpreter": "/usr/bin/python3",
            "netloom_underlay_ip": str(node.addresses[node.underlay]),
            "netloom_underlay_interface": node_access.interfaces[node.underlay],
            **node.vars,
        }
    children = {group: {"hosts": {name: None for name in members}}
                for group, members in topology.groups.items()}
    return {"all": {"vars": {"netloom_lab": topology.name}, "hosts": hosts, "children": children}}


def render_molecule_instances(topology: Topology, access: dict[str, NodeAccess],
                              key_file: Path) -> list[dict[str, Any]]:
    """Molecule's delegated-driver instance config: one entry per node."""
    return [{"instance": name, "address": "127.0.0.1", "user": "root",
             "port": access[name].ssh_port, "identity_file": str(key_file)}
            for name in topology.nodes]
