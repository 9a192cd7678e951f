#!/usr/bin/python
"""Ansible module netloom_facts: what is really deployed on one node, read from live state."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: netloom_facts
short_description: Read what netloom really deployed on a node (links, routes, WireGuard, iptables, Docker)
description:
  - Read-only. Gathers the node's live networking state through the same seams the converging
    modules use, so a topology picture can be drawn from what exists rather than from the inventory
    (see C(playbooks/topology.yml)).
  - "C(links): every link with its kind, MTU, up state, master and IPv4 addresses, read from the kernel
    through netloom's netlink seam (C(ip -j) dumps). VXLAN links carry VNI, local and remote VTEP, port,
    learning and the underlay device (the link holding the local address); a VXLAN link without a remote
    (a mesh device) also carries its static FDB entries and permanent neighbours. Bridges list their ports.
    Routes are the main-table IPv4 routes other than connected ones and the default route, each with
    its protocol and C(netloom=true) for protocol 250 (the routes netloom's modules tag as their own)."
  - "C(wireguard): each interface C(wg show interfaces) lists, with its public key, listen port and
    peers (public key, endpoint, allowed IPs, latest handshake, keepalive). Private and preshared keys
    are never read into the result."
  - "C(iptables): the netloom-owned chains (C(NETLOOM-*)) of the raw, nat and filter tables from
    C(iptables-save), their tagged hook jumps, and the DNAT rules in them."
  - "C(docker): the Docker networks other than C(host) and C(none) (name, driver, bridge, subnet,
    gateway, labels) and the containers netloom's modules own: labelled C(netloom*), C(kohakuriver*)
    or C(pinacle*), or named C(kohakuriver-*) or C(pinacle-*) (name, image, state, addresses per
    network, published ports, those labels)."
  - "C(restore): the entries netloom-restore replays at boot, i.e. what netloom's modules declared on
    this node (module, key, phases and recorded arguments without rendered files)."
  - Each section degrades on its own. When a tool, the Docker SDK or the Docker engine is missing, the
    section says C(available=false) with the reason, and the other sections are still returned. The
    module never fails the play because of something it cannot read, and never changes anything.
version_added: "1.0.0"
author: netloom
options:
  sections:
    description: The sections to gather.
    type: list
    elements: str
    choices: [links, wireguard, iptables, docker, restore]
    default: [links, wireguard, iptables, docker, restore]
  docker_host:
    description:
      - Docker Engine API address. Left out, E(DOCKER_HOST) is used, else C(unix:///var/run/docker.sock).
    type: str
requirements:
  - iproute2 (C(ip), C(bridge)) for links and routes
  - wireguard-tools (C(wg)) for the wireguard section
  - iptables (C(iptables-save)) for the iptables section
  - docker SDK for Python 5.0.3 or later (Debian's python3-docker) for the docker section
notes:
  - Supports check mode (it changes nothing in either mode); C(changed) is always false.
  - Needs root for C(iptables-save), C(wg show) and the restore entries (0600 files).
"""

EXAMPLES = r"""
- name: Read what is deployed
  netloom_facts:
  register: facts

- name: Only links and routes (no Docker, no iptables)
  netloom_facts:
    sections: [links]

- name: Print the VXLAN links
  ansible.builtin.debug:
    msg: "{{ facts.netloom_facts.links.links | selectattr('kind', 'equalto', 'vxlan') | list }}"
"""

RETURN = r"""
netloom_facts:
  description: The node's live state; every section has C(available) and, when false, C(reason).
  returned: always
  type: dict
  contains:
    hostname:
      description: The node's host name.
      type: str
      sample: runner1
    links:
      description: C(links) (name, kind, mtu, up, master, addresses, vxlan, ports, fdb, neighbours) and
        C(routes) (dst, gateway, dev, metric, scope, proto, netloom) other than connected and default routes.
      type: dict
      sample:
        available: true
        links:
          - name: vxlan0
            kind: vxlan
            mtu: 1450
            up: true
            master: kohaku-overlay
            addresses: []
            vxlan: {vni: 101, local: 192.0.2.11, remote: 192.0.2.10, port: 4789, learning: false, dev: eth0}
        routes:
          - {dst: 10.0.0.0/8, gateway: 10.1.0.254, dev: kohaku-overlay, metric: 0, scope: 0, proto: 4,
             netloom: false}
    wireguard:
      description: C(interfaces), each with name, public_key, listen_port and peers (public_key, endpoint,
        allowed_ips, latest_handshake as a Unix time or 0, persistent_keepalive).
      type: dict
    iptables:
      description: C(chains) (table, name, rules), C(hooks) (table, chain, target, rule) and C(dnat)
        (table, chain, protocol, source, destination, dport, in_interface, to_destination).
      type: dict
    docker:
      description: C(networks) (name, id, driver, bridge, subnet, gateway, internal, labels) and
        C(containers) (name, id, image, state, status, labels, networks with ipv4_address and mac, ports).
      type: dict
    restore:
      description: C(entries) (file, module, key, phases, after, args) recorded by netloom-restore.
      type: dict
changed:
  description: Always false.
  returned: always
  type: bool
"""

import glob
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom import restore
from ansible.module_utils.netloom.common import run_command
from ansible.module_utils.netloom.constants import NETLOOM_ROUTE_PROTO, RTPROT_KERNEL
from ansible.module_utils.netloom.docker_network import docker_host_address
from ansible.module_utils.netloom.iptables import COMMENT_PREFIX, read_table, split_rule
from ansible.module_utils.netloom.netlink import Netlink, Snapshot
from ansible.module_utils.netloom.persist import persist_root
from ansible.module_utils.netloom.wireguard import WgTool

SECTIONS = ("links", "wireguard", "iptables", "docker", "restore")
IPTABLES_TABLES = ("raw", "nat", "filter")
OWNED_CHAIN_PREFIX = "NETLOOM"
# Containers netloom's modules own: by label prefix or by the name prefix their modules give them.
OWNED_LABEL_PREFIXES = ("netloom", "kohakuriver", "pinacle")
OWNED_NAME_PREFIXES = ("kohakuriver-", "pinacle-")
UNMANAGED_NETWORKS = ("host", "none")
# Recorded arguments never shown: the rendered unit texts (bulky) and anything key-like.
HIDDEN_ARG_WORDS = ("rendered", "private", "preshared", "secret", "password", "token")


def _owned_labels(labels: dict[str, str] | None) -> dict[str, str]:
    return {key: value for key, value in sorted((labels or {}).items())
            if key.lower().startswith(OWNED_LABEL_PREFIXES)}


def _public_args(args: Any) -> Any:
    """Recorded module arguments without rendered files and key material, at any depth."""
    if isinstance(args, dict):
        return {key: _public_args(value) for key, value in args.items()
                if not any(word in str(key).lower() for word in HIDDEN_ARG_WORDS)}
    if isinstance(args, list):
        return [_public_args(value) for value in args]
    return args


def dnat_view(table: str, chain: str, spec: str) -> dict[str, Any] | None:
    """The fields of a DNAT rule a picture needs, or None for any other rule."""
    tokens = split_rule(spec)
    if not any(tokens[i:i + 2] == ["-j", "DNAT"] for i in range(len(tokens) - 1)):
        return None
    view: dict[str, Any] = {"table": table, "chain": chain, "protocol": None, "source": None,
                            "destination": None, "dport": None, "in_interface": None, "to_destination": None}
    names = {"-p": "protocol", "-s": "source", "-d": "destination", "--dport": "dport",
             "-i": "in_interface", "--to-destination": "to_destination"}
    for index, token in enumerate(tokens[:-1]):
        if token in names:
            negated = index > 0 and tokens[index - 1] == "!"
            view[names[token]] = ("!" if negated else "") + tokens[index + 1]
    return view


class FactsGatherer:
    """Reads each asked-for section on its own; a section that cannot be read says why."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.sections: list[str] = module.params["sections"]
        self.snapshot: Snapshot | None = None

    def run(self) -> None:
        readers: dict[str, Callable[[], dict[str, Any]]] = {
            "links": self.links, "wireguard": self.wireguard, "iptables": self.iptables,
            "docker": self.docker, "restore": self.restore,
        }
        facts: dict[str, Any] = {"hostname": socket.gethostname()}
        for name in SECTIONS:
            if name in self.sections:
                facts[name] = self.section(readers[name])
        self.module.exit_json(changed=False, netloom_facts=facts)

    @staticmethod
    def section(reader: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        # A picture with one section marked unreadable is worth more than a failed play, so any
        # error of a reader (missing tool, daemon down, unexpected output) becomes its reason.
        try:
            return {"available": True, **reader()}
        except Exception as err:
            return {"available": False, "reason": f"{type(err).__name__}: {err}"}

    # ---- links and routes (the kernel seam) ----

    def links(self) -> dict[str, Any]:
        nl = Netlink()
        snapshot = nl.dump(routes=True)
        self.snapshot = snapshot
        names = snapshot.names()
        mesh_devices = [link.name for link in snapshot.links.values()
                        if link.vxlan is not None and link.vxlan.remote is None]
        neighbours = nl.neighbours() if mesh_devices else []
        links = []
        for link in sorted(snapshot.links.values(), key=lambda item: item.index):
            entry: dict[str, Any] = {
                "name": link.name, "kind": link.kind or None, "mtu": link.mtu, "up": link.up,
                "master": names.get(link.master) if link.master is not None else None,
                "addresses": [str(address) for address in snapshot.addresses_of(link.name)],
            }
            if link.vxlan is not None:
                underlay = snapshot.link_holding(link.vxlan.local) if link.vxlan.local else None
                entry["vxlan"] = {**link.vxlan.describe(), "dev": underlay.name if underlay else None}
            if link.kind == "bridge":
                entry["ports"] = [port.name for port in snapshot.ports_of(link.name)]
            if link.name in mesh_devices:
                entry["fdb"] = [{"mac": fdb.lladdr, "dst": str(fdb.dst)} for fdb in nl.fdb(link.name)
                                if fdb.dst is not None]
                entry["neighbours"] = [{"dst": str(neigh.dst), "mac": neigh.lladdr} for neigh in neighbours
                                       if neigh.oif == link.index and "permanent" in neigh.state]
            links.append(entry)
        # Connected routes follow from the addresses and the default route from the underlay; the
        # rest are what netloom (proto 250) or its modules' plain `route replace` (overlay_runner's
        # route to the hub) installed, or an operator's static routes: all of them are drawn.
        routes = [{"dst": str(route.dst), "gateway": str(route.gateway) if route.gateway else None,
                   "dev": names.get(route.oif) if route.oif is not None else None,
                   "metric": route.priority, "scope": route.scope, "proto": route.proto,
                   "netloom": route.proto == NETLOOM_ROUTE_PROTO}
                  for route in snapshot.routes
                  if route.proto != RTPROT_KERNEL and route.dst.prefixlen > 0]
        return {"links": links, "routes": routes}

    # ---- WireGuard (public data only) ----

    def wireguard(self) -> dict[str, Any]:
        wg = WgTool()
        interfaces = []
        for name in sorted(wg_interfaces(wg)):
            device = wg.dump(name)
            peers = [{"public_key": peer.public_key, "endpoint": peer.endpoint,
                      "allowed_ips": list(peer.allowed_ips), "latest_handshake": peer.latest_handshake,
                      "persistent_keepalive": peer.persistent_keepalive}
                     for _key, peer in sorted(device.peers.items())]
            addresses = (self.snapshot.addresses_of(name) if self.snapshot is not None
                         else Netlink().addresses(name))
            interfaces.append({"name": name, "public_key": device.public_key,
                               "listen_port": device.listen_port,
                               "addresses": [str(address) for address in addresses], "peers": peers})
        return {"interfaces": interfaces}

    # ---- iptables: netloom's chains only ----

    def iptables(self) -> dict[str, Any]:
        chains, hooks, dnat = [], [], []
        for table in IPTABLES_TABLES:
            for chain, rules in read_table(table).items():
                if chain.startswith(OWNED_CHAIN_PREFIX):
                    chains.append({"table": table, "name": chain, "rules": rules})
                    dnat.extend(view for view in (dnat_view(table, chain, spec) for spec in rules) if view)
                    continue
                for spec in rules:
                    if COMMENT_PREFIX in spec:
                        target = split_rule(spec)[-1]
                        hooks.append({"table": table, "chain": chain, "target": target, "rule": spec})
        return {"chains": chains, "hooks": hooks, "dnat": dnat}

    # ---- Docker ----

    def docker(self) -> dict[str, Any]:
        try:
            import docker
        except ImportError:
            raise RuntimeError("the docker SDK for Python is not installed "
                               "(Debian: python3-docker)") from None
        host = docker_host_address(self.module.params["docker_host"])
        if host.startswith("unix://") and not os.path.exists(host[len("unix://"):]):
            raise RuntimeError(f"no Docker engine: {host[len('unix://'):]} does not exist")
        client = docker.APIClient(base_url=host, version="auto", timeout=30)
        try:
            return {"networks": docker_networks(client), "containers": docker_containers(client)}
        finally:
            client.close()

    # ---- netloom-restore entries ----

    def restore(self) -> dict[str, Any]:
        folder = os.path.join(persist_root(), restore.STATE_DIR, "entries")
        entries = []
        for path in sorted(glob.glob(os.path.join(folder, restore.ENTRY_GLOB))):
            name = os.path.basename(path)
            key = name[:-len(".json")].split("@", 1)[1] if "@" in name else None
            try:
                with open(path, encoding="utf-8") as handle:
                    recorded = json.load(handle)
            except (OSError, ValueError) as err:
                entries.append({"file": name, "key": key, "error": str(err)})
                continue
            meta = recorded.get("netloom_restore", {})
            entries.append({"file": name, "module": meta.get("module"), "key": key,
                            "phases": meta.get("phases", []), "after": meta.get("after", []),
                            "args": _public_args(recorded.get("ANSIBLE_MODULE_ARGS", {}))})
        return {"entries": entries}


def wg_interfaces(wg: WgTool) -> list[str]:
    return run_command([wg.path, "show", "interfaces"]).split()


def docker_networks(client: Any) -> list[dict[str, Any]]:
    networks = []
    for network in client.networks():
        if network.get("Name") in UNMANAGED_NETWORKS:
            continue
        options = network.get("Options") or {}
        pools = (network.get("IPAM") or {}).get("Config") or []
        pool = next((p for p in pools if p.get("Subnet") and ":" not in p["Subnet"]), {})
        bridge = options.get("com.docker.network.bridge.name")
        if not bridge and network.get("Driver") == "bridge":
            bridge = "br-" + str(network.get("Id", ""))[:12]  # Docker's name for an unnamed bridge
        networks.append({"name": network.get("Name"), "id": str(network.get("Id", ""))[:12],
                         "driver": network.get("Driver"), "bridge": bridge, "subnet": pool.get("Subnet"),
                         "gateway": pool.get("Gateway"), "internal": bool(network.get("Internal")),
                         "labels": dict(sorted((network.get("Labels") or {}).items()))})
    return sorted(networks, key=lambda item: item["name"])


def docker_containers(client: Any) -> list[dict[str, Any]]:
    containers = []
    for container in client.containers(all=True):
        name = str((container.get("Names") or ["/"])[0]).lstrip("/")
        labels = _owned_labels(container.get("Labels"))
        if not labels and not name.startswith(OWNED_NAME_PREFIXES):
            continue
        attached = ((container.get("NetworkSettings") or {}).get("Networks") or {})
        networks = {net: {"ipv4_address": settings.get("IPAddress") or None,
                          "mac": settings.get("MacAddress") or None}
                    for net, settings in sorted(attached.items())}
        ports = sorted(({"private": port.get("PrivatePort"), "public": port.get("PublicPort"),
                         "type": port.get("Type"), "ip": port.get("IP")}
                        for port in container.get("Ports") or []),
                       key=lambda port: (port["private"] or 0, port["public"] or 0, str(port["ip"])))
        containers.append({"name": name, "id": str(container.get("Id", ""))[:12],
                           "image": container.get("Image"), "state": container.get("State"),
                           "status": container.get("Status"),
                           "labels": labels, "networks": networks, "ports": ports})
    return sorted(containers, key=lambda item: item["name"])


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "sections": {"type": "list", "elements": "str", "choices": list(SECTIONS),
                         "default": list(SECTIONS)},
            "docker_host": {"type": "str"},
        },
        supports_check_mode=True,
    )
    FactsGatherer(module).run()


if __name__ == "__main__":
    main()
