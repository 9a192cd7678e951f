"""The cluster topology, built on the controller from every node's netloom_facts, and drawn as DOT.

Pure Python (no Ansible, no I/O) so that the model is unit-tested from recorded facts. Two inputs:

- `facts`: inventory host -> what netloom_facts returned on it (the registered result or its
  `netloom_facts`), or a result without facts (unreachable, failed) whose message is kept;
- `inventory`: inventory host -> {"groups": [...], "vars": {...}}: what the inventory declares.

What is drawn comes from the facts alone: links are paired by what the kernels report (VNI,
local and remote VTEP addresses, FDB destinations, WireGuard public keys), never by names the
inventory expects. The inventory is used afterwards, to mark drift: an item it declares that the
facts do not show is added with status `missing` (drawn dashed red); a VXLAN link or mesh peer
the facts show and the inventory does not declare has status `extra` (drawn orange).
"""
from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

MODEL_VERSION = 1

# Group names and role defaults of netloom's roles, used when the inventory does not set them.
HUB_GROUP = "overlay_hub"
RUNNER_GROUP = "overlay_runners"
EDGE_GATEWAY_GROUP = "edge_gateway"
EDGE_COMPUTE_GROUP = "edge_compute"
ROLE_DEFAULTS: dict[str, Any] = {
    "netloom_overlay_enabled": True,
    "netloom_overlay_vni_base": 100,
    "overlay_runner_bridge": "kohaku-overlay",
    "overlay_runner_docker_network": "kohakuriver-overlay",
    "overlay_runner_default_network": "kohakuriver-net",
    "edge_compute_bridge": "esb-cni0",
    "edge_compute_docker_network": "esb-workers",
    "edge_compute_docker_enabled": True,
    "edge_compute_wg_interface": "wg0",
    "edge_gateway_wg_interface": "wg0",
}
# Inventory variables the model reads (the playbook passes only these).
INVENTORY_VARS = (
    "netloom_underlay_ip", "overlay_runner_id", "netloom_overlay_mode", "netloom_topology_expect",
    "netloom_vms",
    *ROLE_DEFAULTS,
)
DIRECT_MODE = "direct"
# What a container is: by the labels netloom's pod and workload modules set, else by the name prefix
# they give it.
CONTAINER_KINDS = (("pinacle-pod-", "pod"), ("kohakuriver-task-", "task"), ("kohakuriver-vps-", "vps"))
POD_LABEL = "netloom.pod"
WORKLOAD_KIND_LABEL = "netloom.workload.kind"
# qemu_vm's TAP on the runner's overlay bridge is nlvm-NAME, present while the VM runs.
VM_TAP_PREFIX = "nlvm-"
OK, MISSING, EXTRA, HALF, UNVERIFIED, EXTERNAL = "ok", "missing", "extra", "half", "unverified", "external"
EXPECT_KINDS = ("bridge", "link", "docker_network", "container", "iptables_chain")


# ---- reading the inputs ----

def node_facts(result: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(facts, None) from a registered netloom_facts result, or (None, why there are none)."""
    if not isinstance(result, Mapping):
        return None, "no netloom_facts result (host not in the play)"
    if isinstance(result.get("netloom_facts"), Mapping):
        return dict(result["netloom_facts"]), None
    if "links" in result or "hostname" in result:
        return dict(result), None
    if result.get("unreachable"):
        return None, f"unreachable: {result.get('msg', '')}".strip()
    if result.get("skipped"):
        return None, "skipped"
    return None, str(result.get("msg") or "netloom_facts returned nothing")


def _section(facts: Mapping[str, Any] | None, name: str) -> Mapping[str, Any] | None:
    """A section of a node's facts when it was read, else None."""
    section = (facts or {}).get(name)
    return section if isinstance(section, Mapping) and section.get("available") else None


def _var(inventory: Mapping[str, Any], host: str, name: str) -> Any:
    value = (inventory.get(host) or {}).get("vars", {}).get(name)
    return ROLE_DEFAULTS.get(name) if value is None else value


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _in_group(inventory: Mapping[str, Any], group: str) -> list[str]:
    return sorted(host for host, entry in inventory.items() if group in (entry or {}).get("groups", []))


def _addresses(facts: Mapping[str, Any] | None) -> set[str]:
    """Every IPv4 address a node holds (any link but loopback)."""
    links = _section(facts, "links") or {}
    found = set()
    for link in links.get("links", []):
        if link.get("name") == "lo":
            continue
        for address in link.get("addresses", []):
            found.add(str(ipaddress.ip_interface(address).ip))
    return found


# ---- the model ----

class TopologyBuilder:
    """Builds the JSON-able cluster model; see the module docstring for the inputs."""

    def __init__(self, facts: Mapping[str, Any], inventory: Mapping[str, Any]) -> None:
        self.inventory = {host: dict(entry or {}) for host, entry in inventory.items()}
        self.facts: dict[str, dict[str, Any] | None] = {}
        self.reasons: dict[str, str] = {}
        for host in sorted(set(facts) | set(self.inventory)):
            self.facts[host], reason = node_facts(facts.get(host))
            if reason:
                self.reasons[host] = reason
        self.owner_of: dict[str, str] = {}
        for host, host_facts in self.facts.items():
            for address in _addresses(host_facts):
                self.owner_of.setdefault(address, host)
            underlay = _var(self.inventory, host, "netloom_underlay_ip")
            if underlay and host_facts is None:
                self.owner_of.setdefault(str(underlay), host)
        self.edges: list[dict[str, Any]] = []
        self.drift: list[dict[str, Any]] = []

    def build(self) -> dict[str, Any]:
        nodes = [self.node(host) for host in self.facts]
        self.vxlan_edges()
        self.mesh_edges()
        self.wireguard_edges()
        self.declared_links()
        by_name = {node["name"]: node for node in nodes}
        self.declared_items(by_name)
        for edge in self.edges:
            if edge["status"] not in (OK, EXTERNAL):
                self.drift.append({"status": edge["status"], "kind": edge["kind"], "node": edge["a"],
                                   "name": edge["id"], "detail": edge.get("detail", "")})
        for item in self.drift:
            item["text"] = f"{item['status']}: {item['kind']} {item['name']} on {item['node']}" + (
                f" ({item['detail']})" if item.get("detail") else "")
        statuses = [edge["status"] for edge in self.edges] + [item["status"] for item in self.drift]
        return {
            "version": MODEL_VERSION,
            "nodes": nodes,
            "edges": sorted(self.edges, key=lambda edge: edge["id"]),
            "drift": sorted(self.drift, key=lambda item: (item["node"], item["kind"], item["name"])),
            "summary": {
                "nodes": len(nodes),
                "nodes_without_facts": sorted(self.reasons),
                "edges": len(self.edges),
                "missing": sum(1 for item in self.drift if item["status"] == MISSING),
                "extra": sum(1 for item in self.drift if item["status"] == EXTRA),
                "drift": bool(self.drift) or any(status not in (OK, EXTERNAL) for status in statuses),
            },
        }

    # ---- per node ----

    def node(self, host: str) -> dict[str, Any]:
        facts = self.facts[host]
        groups = sorted((self.inventory.get(host) or {}).get("groups", []))
        node: dict[str, Any] = {"name": host, "groups": groups, "status": OK if facts else MISSING,
                                "reason": self.reasons.get(host), "hostname": (facts or {}).get("hostname"),
                                "underlay_ip": _var(self.inventory, host, "netloom_underlay_ip"),
                                "unavailable": {}, "bridges": [], "vxlan": [], "taps": [], "wireguard": [],
                                "routes": [], "dnat": [], "chains": [], "docker_networks": [],
                                "containers": [], "restore": []}
        if facts is None:
            self.drift.append({"status": MISSING, "kind": "node", "node": host, "name": host,
                               "detail": self.reasons.get(host, "")})
            return node
        for name in ("links", "wireguard", "iptables", "docker", "restore"):
            section = facts.get(name)
            if isinstance(section, Mapping) and not section.get("available"):
                node["unavailable"][name] = str(section.get("reason", "unavailable"))
        links = _section(facts, "links") or {}
        kinds = {link["name"]: link.get("kind") for link in links.get("links", [])}
        for link in links.get("links", []):
            if link.get("kind") in ("bridge", "dummy"):
                # A port-less bridge or a dummy: an anchor holding addresses (the hub's 10.0.0.1/8).
                node["bridges"].append({"name": link["name"], "kind": link["kind"],
                                        "addresses": link.get("addresses", []),
                                        "ports": link.get("ports", []), "up": link.get("up"), "status": OK})
                taps = [port for port in link.get("ports", []) if kinds.get(port) == "tun"]
                node["taps"].extend({"name": tap, "bridge": link["name"], "vm": vm_of_tap(tap), "status": OK}
                                    for tap in taps)
            elif link.get("vxlan"):
                node["vxlan"].append({"name": link["name"], "master": link.get("master"),
                                      "up": link.get("up"), "mtu": link.get("mtu"),
                                      "addresses": link.get("addresses", []),
                                      **link["vxlan"], "fdb": [entry["dst"] for entry in link.get("fdb", [])],
                                      "mesh": link["vxlan"].get("remote") is None})
        node["routes"] = list(links.get("routes", []))
        if node["underlay_ip"] is None:
            locals_ = {vx.get("local") for vx in node["vxlan"] if vx.get("local")}
            node["underlay_ip"] = sorted(locals_)[0] if locals_ else None
        wireguard = _section(facts, "wireguard") or {}
        node["wireguard"] = [{"name": wg["name"], "public_key": wg.get("public_key"),
                              "listen_port": wg.get("listen_port"), "addresses": wg.get("addresses", []),
                              "peers": list(wg.get("peers", []))} for wg in wireguard.get("interfaces", [])]
        iptables = _section(facts, "iptables") or {}
        node["dnat"] = list(iptables.get("dnat", []))
        node["chains"] = [{"table": chain["table"], "name": chain["name"],
                           "rules": len(chain.get("rules", [])), "status": OK}
                          for chain in iptables.get("chains", [])]
        docker = _section(facts, "docker") or {}
        node["docker_networks"] = [{**network, "status": OK} for network in docker.get("networks", [])]
        node["containers"] = [{**container, "status": OK,
                               "kind": container_kind(container["name"], container.get("labels"))}
                              for container in docker.get("containers", [])]
        restore = _section(facts, "restore") or {}
        node["restore"] = [{"module": entry.get("module"), "key": entry.get("key")}
                           for entry in restore.get("entries", [])]
        return node

    # ---- links between nodes ----

    def _edge(self, kind: str, a: str, b: str, **fields: Any) -> dict[str, Any]:
        """The edge of `kind` between a and b, created once whichever side reports it first."""
        key = "|".join(sorted((a, b)))
        discriminator = fields.pop("discriminator", "")
        edge_id = f"{kind}:{key}" + (f":{discriminator}" if discriminator != "" else "")
        for edge in self.edges:
            if edge["id"] == edge_id:
                return edge
        edge = {"id": edge_id, "kind": kind, "a": a, "b": b, "status": OK, "declared": False, "sides": {},
                **fields}
        self.edges.append(edge)
        return edge

    def _peer(self, address: str | None) -> str | None:
        return self.owner_of.get(str(address)) if address else None

    def vxlan_edges(self) -> None:
        """Hub-and-spoke VXLAN links, paired by VNI and each side's remote being the other's address."""
        for host, facts in self.facts.items():
            for link in (_section(facts, "links") or {}).get("links", []):
                vxlan = link.get("vxlan") or {}
                remote = vxlan.get("remote")
                if not remote:
                    continue
                peer = self._peer(remote) or f"address {remote}"
                edge = self._edge("vxlan", host, peer, discriminator=vxlan.get("vni"), vni=vxlan.get("vni"),
                                  port=vxlan.get("port"))
                edge["sides"][host] = {"device": link["name"], "local": vxlan.get("local"), "remote": remote,
                                       "up": link.get("up"), "mtu": link.get("mtu")}
        self._settle("vxlan")

    def mesh_edges(self) -> None:
        """Direct-mode mesh links: a mesh device (no remote) with a static FDB entry to a peer's VTEP."""
        for host, facts in self.facts.items():
            for link in (_section(facts, "links") or {}).get("links", []):
                vxlan = link.get("vxlan") or {}
                if not vxlan or vxlan.get("remote"):
                    continue
                for entry in link.get("fdb", []):
                    peer = self._peer(entry.get("dst")) or f"address {entry.get('dst')}"
                    edge = self._edge("mesh", host, peer, vni=vxlan.get("vni"), port=vxlan.get("port"))
                    edge["sides"][host] = {"device": link["name"], "local": vxlan.get("local"),
                                           "remote": entry.get("dst"), "up": link.get("up")}
        self._settle("mesh")

    def wireguard_edges(self) -> None:
        """WireGuard peerings, paired by public keys (a peer key no node holds is an external peer)."""
        key_owner = {}
        for host, facts in self.facts.items():
            for wg in (_section(facts, "wireguard") or {}).get("interfaces", []):
                if wg.get("public_key"):
                    key_owner[wg["public_key"]] = (host, wg["name"])
        for host, facts in self.facts.items():
            for wg in (_section(facts, "wireguard") or {}).get("interfaces", []):
                for peer in wg.get("peers", []):
                    owner = key_owner.get(peer.get("public_key"))
                    other = owner[0] if owner else f"wg peer {str(peer.get('public_key'))[:8]}"
                    edge = self._edge("wireguard", host, other)
                    edge["sides"][host] = {"device": wg["name"], "endpoint": peer.get("endpoint"),
                                           "allowed_ips": peer.get("allowed_ips", []),
                                           "latest_handshake": peer.get("latest_handshake", 0)}
                    if owner is None:
                        edge["status"] = EXTERNAL
                        edge["detail"] = "peer key held by no node of the inventory"
        self._settle("wireguard")

    def _settle(self, kind: str) -> None:
        """One side only: `half` when the other node was read (so its side is really absent)."""
        for edge in self.edges:
            if edge["kind"] != kind or edge["status"] != OK:
                continue
            for end in (edge["a"], edge["b"]):
                if end not in self.facts:
                    edge["status"], edge["detail"] = EXTRA, f"peer {end} is not a node of the inventory"
                    break
                if end not in edge["sides"]:
                    verified = _section(self.facts[end], "wireguard" if kind == "wireguard" else "links")
                    edge["status"] = HALF if verified else UNVERIFIED
                    edge["detail"] = f"only {', '.join(sorted(edge['sides']))} has it; {end} " + (
                        "does not" if verified else "could not be read")
                    break

    # ---- drift against the inventory ----

    def declared_pairs(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(kind, a, b, extra fields) of every link the inventory declares."""
        pairs: list[tuple[str, str, str, dict[str, Any]]] = []
        inventory = self.inventory
        runners = [host for host in _in_group(inventory, RUNNER_GROUP)
                   if _truthy(_var(inventory, host, "netloom_overlay_enabled"))]
        for hub in _in_group(inventory, HUB_GROUP):
            for runner in runners:
                fields: dict[str, Any] = {}
                runner_id = _var(inventory, runner, "overlay_runner_id")
                if runner_id is not None:
                    fields["vni"] = int(_var(inventory, hub, "netloom_overlay_vni_base")) + int(runner_id)
                pairs.append(("vxlan", hub, runner, fields))
        direct = [host for host in runners if _var(inventory, host, "netloom_overlay_mode") == DIRECT_MODE]
        pairs.extend(("mesh", a, b, {}) for a, b in itertools.combinations(direct, 2))
        for gateway in _in_group(self.inventory, EDGE_GATEWAY_GROUP):
            pairs.extend(("wireguard", gateway, compute, {})
                         for compute in _in_group(self.inventory, EDGE_COMPUTE_GROUP))
        return pairs

    def declared_links(self) -> None:
        for kind, a, b, fields in self.declared_pairs():
            found = [edge for edge in self.edges if edge["kind"] == kind and {edge["a"], edge["b"]} == {a, b}]
            wanted_vni = fields.get("vni")
            for edge in found:
                edge["declared"] = True
                if wanted_vni is not None and edge.get("vni") != wanted_vni and edge["status"] == OK:
                    edge["status"], edge["detail"] = EXTRA, f"VNI {edge.get('vni')}, declared {wanted_vni}"
            if not found:
                edge = self._edge(kind, a, b, discriminator="" if wanted_vni is None else wanted_vni,
                                  vni=wanted_vni)
                section = "wireguard" if kind == "wireguard" else "links"
                read = [end for end in (a, b) if _section(self.facts.get(end), section) is not None]
                unread = [end for end in (a, b) if end not in read]
                if unread:
                    where = (f"{', '.join(read) or 'no side'} does not have it, "
                             f"{', '.join(unread)} could not be read")
                else:
                    where = f"neither {a} nor {b} has it"
                detail = f"declared by the inventory; {where}"
                edge.update(declared=True, status=MISSING if read else UNVERIFIED, detail=detail)
        for edge in self.edges:
            if not edge["declared"] and edge["status"] in (OK, HALF) and edge["kind"] in ("vxlan", "mesh"):
                edge["status"] = EXTRA
                edge["detail"] = "present, but the inventory does not declare it"

    def declared_items(self, nodes: Mapping[str, dict[str, Any]]) -> None:
        """Per-node items the inventory declares: role objects and `netloom_topology_expect`."""
        for host, node in nodes.items():
            for kind, name in self.expected_on(host):
                self._check_item(node, kind, name)

    def expected_on(self, host: str) -> list[tuple[str, str]]:
        groups = (self.inventory.get(host) or {}).get("groups", [])

        def var(name: str) -> Any:
            return _var(self.inventory, host, name)

        expected: list[tuple[str, str]] = []
        if RUNNER_GROUP in groups:
            expected.append(("docker_network", str(var("overlay_runner_default_network"))))
            if _truthy(var("netloom_overlay_enabled")):
                expected.append(("bridge", str(var("overlay_runner_bridge"))))
                expected.append(("docker_network", str(var("overlay_runner_docker_network"))))
        if EDGE_COMPUTE_GROUP in groups:
            expected.append(("bridge", str(var("edge_compute_bridge"))))
            expected.append(("link", str(var("edge_compute_wg_interface"))))
            expected.append(("iptables_chain", "NETLOOM-DNAT"))
            if _truthy(var("edge_compute_docker_enabled")):
                expected.append(("docker_network", str(var("edge_compute_docker_network"))))
        if EDGE_GATEWAY_GROUP in groups:
            expected.append(("link", str(var("edge_gateway_wg_interface"))))
        if RUNNER_GROUP in groups:
            expected.extend(("link", VM_TAP_PREFIX + str(vm.get("name"))) for vm in var("netloom_vms") or []
                            if vm.get("state", "running") == "running")
        for item in var("netloom_topology_expect") or []:
            kind, name = str(item.get("kind")), str(item.get("name"))
            if kind not in EXPECT_KINDS:
                raise ValueError(f"{host}: netloom_topology_expect kind {kind!r} is not one of "
                                 f"{', '.join(EXPECT_KINDS)}")
            expected.append((kind, name))
        return expected

    def _check_item(self, node: dict[str, Any], kind: str, name: str) -> None:
        section = {"bridge": "links", "link": "links", "docker_network": "docker", "container": "docker",
                   "iptables_chain": "iptables"}[kind]
        facts = self.facts.get(node["name"])
        if facts is None:
            return  # the node itself is already missing
        if _section(facts, section) is None:
            reason = node["unavailable"].get(section, "")
            self.drift.append({"status": UNVERIFIED, "kind": kind, "node": node["name"], "name": name,
                               "detail": f"{section} could not be read: {reason}"})
            return
        present = {
            "bridge": [bridge["name"] for bridge in node["bridges"]],
            "link": [link["name"] for link in (_section(facts, "links") or {}).get("links", [])],
            "docker_network": [network["name"] for network in node["docker_networks"]],
            "container": [container["name"] for container in node["containers"]],
            "iptables_chain": [chain["name"] for chain in node["chains"]],
        }[kind]
        if name in present:
            return
        self.drift.append({"status": MISSING, "kind": kind, "node": node["name"], "name": name,
                           "detail": "declared by the inventory, not on the node"})
        placeholder: dict[str, Any] = {"name": name, "status": MISSING}
        if kind == "bridge":
            node["bridges"].append({**placeholder, "kind": "bridge", "addresses": [], "ports": [],
                                    "up": False})
        elif kind == "docker_network":
            node["docker_networks"].append({**placeholder, "bridge": None, "subnet": None, "gateway": None,
                                            "labels": {}})
        elif kind == "container":
            node["containers"].append({**placeholder, "kind": container_kind(name), "image": None,
                                       "state": None, "networks": {}, "ports": [], "labels": {}})
        elif kind == "iptables_chain":
            node["chains"].append({**placeholder, "table": None, "rules": 0})
        elif kind == "link" and vm_of_tap(name):
            node["taps"].append({**placeholder, "bridge": None, "vm": vm_of_tap(name)})


def vm_of_tap(name: str) -> str | None:
    return name[len(VM_TAP_PREFIX):] if name.startswith(VM_TAP_PREFIX) else None


def container_kind(name: str, labels: Mapping[str, str] | None = None) -> str:
    labels = labels or {}
    if labels.get(POD_LABEL):
        return "pod"
    if labels.get(WORKLOAD_KIND_LABEL):
        return str(labels[WORKLOAD_KIND_LABEL])
    for prefix, kind in CONTAINER_KINDS:
        if name.startswith(prefix):
            return kind
    return "container"


def build_model(facts: Mapping[str, Any], inventory: Mapping[str, Any]) -> dict[str, Any]:
    """The cluster model (JSON-able) from every node's facts and the inventory's declarations."""
    return TopologyBuilder(facts, inventory).build()


def inventory_view(hosts: Iterable[str], groups: Mapping[str, Iterable[str]],
                   hostvars: Mapping[str, Any]) -> dict[str, Any]:
    """host -> {"groups", "vars"}: the part of Ansible's inventory the model reads."""
    view: dict[str, Any] = {}
    for host in hosts:
        member_of = sorted(group for group, members in groups.items()
                           if group not in ("all", "ungrouped") and host in members)
        variables = hostvars[host]
        picked = {}
        for name in INVENTORY_VARS:
            value = variables.get(name)
            if value is not None:
                picked[name] = value
        view[host] = {"groups": member_of, "vars": picked}
    return view


# ---- DOT ----

STYLES = {
    OK: 'color="#1f4e79"',
    MISSING: 'color="#c00000", fontcolor="#c00000", style=dashed, penwidth=2',
    EXTRA: 'color="#e07000", fontcolor="#e07000", style=bold',
    HALF: 'color="#c00000", fontcolor="#c00000", style=dashed',
    UNVERIFIED: 'color="#808080", fontcolor="#808080", style=dotted',
    EXTERNAL: 'color="#606060", style=dotted',
}
EDGE_COLORS = {"vxlan": "#1f4e79", "mesh": "#2e7d32", "wireguard": "#6a1b9a"}


def quote(text: Any) -> str:
    """A DOT quoted string: backslashes and quotes escaped, newlines as DOT's centred line break."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def _attrs(label: str, status: str = OK, extra: str = "") -> str:
    parts = [f"label={quote(label)}"]
    if status != OK:
        parts.append(STYLES[status])
    if extra:
        parts.append(extra)
    return "[" + ", ".join(parts) + "]"


def _port_text(port: Mapping[str, Any]) -> str:
    if port.get("public"):
        return f"{port.get('ip') or '0.0.0.0'}:{port['public']} -> {port.get('private')}/{port.get('type')}"
    return f"{port.get('private')}/{port.get('type')}"


def render_dot(model: Mapping[str, Any]) -> str:
    """The model as one Graphviz graph: a cluster per node, links between nodes as edges."""
    lines = ["graph netloom {",
             '  graph [rankdir=LR, compound=true, fontname="Helvetica", fontsize=11, nodesep=0.3, '
             f'label={quote(_legend(model))}, labelloc=t];',
             '  node [shape=box, fontname="Helvetica", fontsize=9, style=rounded];',
             '  edge [fontname="Helvetica", fontsize=8];']
    ids: dict[str, str] = {}

    def nid(*parts: Any) -> str:
        key = "\x1f".join(str(part) for part in parts)
        if key not in ids:
            ids[key] = f"n{len(ids)}"
        return ids[key]

    for index, node in enumerate(model.get("nodes", [])):
        lines.extend(_cluster(index, node, nid))
    endpoints = {node["name"] for node in model.get("nodes", [])}
    for edge in model.get("edges", []):
        for end in (edge["a"], edge["b"]):
            if end not in endpoints:
                endpoints.add(end)
                lines.append(f"  {nid('host', end)} {_attrs(end, EXTERNAL, 'shape=box, style=dashed')};")
        lines.append(_edge_line(edge, nid))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _legend(model: Mapping[str, Any]) -> str:
    summary = model.get("summary", {})
    return (f"netloom topology from live state: {summary.get('nodes', 0)} nodes, "
            f"{summary.get('edges', 0)} links, "
            f"{summary.get('missing', 0)} missing (dashed red), {summary.get('extra', 0)} extra (orange)")


def _cluster(index: int, node: Mapping[str, Any], nid: Any) -> list[str]:
    name = node["name"]
    status = node["status"]
    title = name + (f" ({', '.join(node['groups'])})" if node.get("groups") else "")
    if node.get("underlay_ip"):
        title += f"\nunderlay {node['underlay_ip']}"
    if node.get("reason"):
        title += f"\nno facts: {node['reason']}"
    for section, reason in sorted(node.get("unavailable", {}).items()):
        title += f"\n{section} unavailable: {reason[:80]}"
    lines = [f"  subgraph cluster_{index} {{",
             f"    label={quote(title)}; fontsize=10; style=rounded;"
             + (f" {STYLES[status].replace(', ', '; ')};" if status != OK else ' color="#1f4e79";')]
    host = nid("host", name)
    lines.append(f"    {host} {_attrs(name, status, 'shape=box3d, style=solid')};")
    for bridge in node.get("bridges", []):
        label = "\n".join([f"{bridge['kind']} {bridge['name']}", *bridge["addresses"]])
        lines.append(f"    {nid(name, 'link', bridge['name'])} {_attrs(label, bridge['status'])};")
    for vxlan in node.get("vxlan", []):
        label = f"{vxlan['name']}\nVNI {vxlan.get('vni')}" + (" mesh" if vxlan.get("mesh") else "")
        label += "".join(f"\n{address}" for address in vxlan.get("addresses", []))
        lines.append(f"    {nid(name, 'link', vxlan['name'])} {_attrs(label, OK, 'shape=ellipse')};")
        parent = nid(name, "link", vxlan["master"]) if vxlan.get("master") else host
        lines.append(f'    {parent} -- {nid(name, "link", vxlan["name"])} [color="#a0a0a0"];')
    for wg in node.get("wireguard", []):
        label = f"{wg['name']} (WireGuard)\n:{wg.get('listen_port')}\n{str(wg.get('public_key'))[:10]}..."
        label += "".join(f"\n{address}" for address in wg.get("addresses", []))
        lines.append(f"    {nid(name, 'link', wg['name'])} {_attrs(label, OK, 'shape=hexagon')};")
        lines.append(f'    {host} -- {nid(name, "link", wg["name"])} [color="#a0a0a0"];')
    for tap in node.get("taps", []):
        text = f"VM {tap['vm']}\ntap {tap['name']}" if tap.get("vm") else f"tap {tap['name']}"
        tap_label = _attrs(text, tap["status"], "shape=cds")
        lines.append(f"    {nid(name, 'link', tap['name'])} {tap_label};")
        parent = nid(name, "link", tap["bridge"]) if tap.get("bridge") else host
        lines.append(f"    {parent} -- {nid(name, 'link', tap['name'])} {_inner(tap['status'])};")
    bridges = {bridge["name"] for bridge in node.get("bridges", [])}
    for network in node.get("docker_networks", []):
        label = f"docker {network['name']}"
        if network.get("subnet"):
            label += f"\n{network['subnet']} gw {network.get('gateway')}"
        attrs = _attrs(label, network["status"], "shape=folder")
        lines.append(f"    {nid(name, 'net', network['name'])} {attrs};")
        bridge = network.get("bridge")
        target = nid(name, "link", bridge) if bridge in bridges else host
        lines.append(f"    {target} -- {nid(name, 'net', network['name'])} {_inner(network['status'])};")
    networks = {network["name"] for network in node.get("docker_networks", [])}
    for container in node.get("containers", []):
        label = f"{container['kind']} {container['name']}\n{container.get('state') or 'absent'}"
        attached_to = container.get("networks", {})
        label += "".join(f"\n{net}: {info.get('ipv4_address')}" for net, info in attached_to.items())
        label += "".join(f"\n{_port_text(port)}" for port in container.get("ports", []) if port.get("public"))
        cid = nid(name, "ctr", container["name"])
        lines.append(f"    {cid} {_attrs(label, container['status'], 'shape=component')};")
        attached = [net for net in container.get("networks", {}) if net in networks]
        for net in attached:
            lines.append(f"    {nid(name, 'net', net)} -- {cid};")
        if not attached:
            lines.append(f"    {host} -- {cid} {_inner(container['status'], 'style=dotted')};")
    notes = _notes(node)
    if notes:
        lines.append(f"    {nid(name, 'notes')} [label={quote(notes)}, shape=note, style=solid];")
        lines.append(f"    {host} -- {nid(name, 'notes')} [style=invis];")
    lines.append("  }")
    return lines


def _inner(status: str, ok_style: str = 'color="#a0a0a0"') -> str:
    """Attributes of an edge inside a node's cluster: grey, or the style of a drifted item."""
    return f"[{STYLES[status] if status != OK else ok_style}]"


def _notes(node: Mapping[str, Any]) -> str:
    """Routes, DNAT rules, owned chains and restore entries as one text box."""
    parts = []
    if node.get("routes"):
        parts.append("routes:")
        parts.extend(f"  {route['dst']}" + (f" via {route['gateway']}" if route.get("gateway") else "")
                     + (f" dev {route['dev']}" if route.get("dev") else "")
                     + (" proto 250" if route.get("netloom") else "") for route in node["routes"])
    if node.get("dnat"):
        parts.append("DNAT:")
        parts.extend(f"  {rule.get('destination') or '*'}:{rule.get('dport') or '*'}"
                     f"/{rule.get('protocol') or 'all'} -> {rule.get('to_destination')}"
                     for rule in node["dnat"])
    if node.get("chains"):
        parts.append("chains: " + ", ".join(
            chain["name"] + (" (MISSING)" if chain["status"] == MISSING else "") for chain in node["chains"]))
    if node.get("restore"):
        modules = sorted({str(entry["module"]) for entry in node["restore"]})
        parts.append("restored at boot: " + ", ".join(modules))
    return "\n".join(parts)


def _edge_line(edge: Mapping[str, Any], nid: Any) -> str:
    ends = []
    for end in (edge["a"], edge["b"]):
        side = edge.get("sides", {}).get(end)
        ends.append(nid(end, "link", side["device"]) if side else nid("host", end))
    label = {"vxlan": "VXLAN", "mesh": "mesh", "wireguard": "WireGuard"}[edge["kind"]]
    if edge.get("vni") is not None:
        label += f" VNI {edge['vni']}"
    sides = edge.get("sides", {})
    if edge["kind"] in ("vxlan", "mesh") and sides:
        label += "\n" + " <-> ".join(str(side.get("local")) for side in sides.values())
    if edge["kind"] == "wireguard":
        for end, side in sorted(sides.items()):
            allowed = ", ".join(side.get("allowed_ips", []))
            label += f"\n{end}: allows {allowed}"
            if not side.get("latest_handshake"):
                label += " (no handshake)"
    if edge["status"] != OK:
        label += f"\n{edge['status'].upper()}" + (f": {edge['detail']}" if edge.get("detail") else "")
    style = (STYLES[edge["status"]] if edge["status"] != OK
             else f'color="{EDGE_COLORS[edge["kind"]]}", penwidth=2')
    return f"  {ends[0]} -- {ends[1]} [label={quote(label)}, {style}];"
