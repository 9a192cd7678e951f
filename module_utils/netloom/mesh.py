"""Direct mode of the KohakuRiver overlay: one mesh VXLAN device per runner, flannel-style.

Each direct-mode runner has one VXLAN device (learning off, no remote) whose MAC is derived from
its runner id, so no MAC has to be gathered from the peers. For every other direct-mode runner M:
a route to M's subnet via M's gateway address on the mesh device (onlink, source = this runner's
gateway), a permanent neighbour entry gateway(M) -> MAC(M), and a permanent FDB entry
MAC(M) -> M's underlay IP. State grows linearly with the peers; nothing is learned or flooded.
The hub link (vxlan0 on the bridge) stays: the hub anchor and hub-mode runners are reached
through it, so the more specific mesh routes only take the runner-to-runner traffic.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from ansible.module_utils.netloom.common import ChangePlan, InputError, vni
from ansible.module_utils.netloom.constants import NETLOOM_ROUTE_PROTO
from ansible.module_utils.netloom.netlink import FdbEntry, Neighbour, Netlink, Route, Snapshot
from ansible.module_utils.netloom.plan import AddressPlan

MAC_PREFIX = 0x026E  # locally administered, unicast ("n"); the runner id fills the other 4 bytes
# The hub's link to runner N (vxkrN). Derived, not kernel-chosen: after a hub reboot the link has
# the same MAC, so the runners' neighbour entries for 10.N.0.254 stay right and nothing is lost.
HUB_LINK_MAC_PREFIX = 0x026B  # locally administered, unicast ("k")


def _runner_mac(prefix: int, runner_id: int) -> str:
    raw = (prefix << 32 | runner_id).to_bytes(6, "big")
    return ":".join(f"{byte:02x}" for byte in raw)


def vtep_mac(runner_id: int) -> str:
    """The deterministic MAC of runner N's mesh device: 02:6e + N as 4 bytes."""
    return _runner_mac(MAC_PREFIX, runner_id)


def hub_link_mac(runner_id: int) -> str:
    """The deterministic MAC of the hub's link to runner N: 02:6b + N as 4 bytes."""
    return _runner_mac(HUB_LINK_MAC_PREFIX, runner_id)


@dataclass(frozen=True)
class MeshPeer:
    """Another direct-mode runner, as the mesh programs it."""

    runner_id: int
    name: str
    underlay_ip: ipaddress.IPv4Address
    subnet: ipaddress.IPv4Network
    vtep: ipaddress.IPv4Address  # its gateway address, the next hop of the route to its subnet
    mac: str

    def describe(self) -> dict[str, Any]:
        return {"id": self.runner_id, "name": self.name, "underlay_ip": str(self.underlay_ip),
                "subnet": str(self.subnet), "vtep": str(self.vtep), "mac": self.mac}


def check_mesh_vni(field_name: str, value: Any, plan: AddressPlan, vni_base: int) -> int:
    """The mesh VNI: a valid VNI that no hub link of the plan uses (vni_base+N, N = 0..max id)."""
    number = vni(field_name, value)
    first, last = int(vni_base), int(vni_base) + plan.max_runner_id
    if first <= number <= last:
        raise InputError(field_name, value, f"equals the hub VNI vni_base+{number - first} "
                                            f"(hub links use {first}..{last} with this plan)")
    return number


def parse_peers(field_name: str, entries: Any, plan: AddressPlan, runner_id: int,
                underlay_ip: ipaddress.IPv4Address, hub_ip: ipaddress.IPv4Address) -> list[MeshPeer]:
    """The direct-mode runners other than this one, validated as a whole before anything is read.

    Every entry needs an id and an underlay IP; ids and underlay IPs are unique (and distinct from
    the hub's); this runner may be listed (the same list serves every runner) but then with its
    own underlay IP.
    """
    if not isinstance(entries, list):
        raise InputError(field_name, entries, "must be a list of {id, underlay_ip, name} entries")
    peers: list[MeshPeer] = []
    seen_ids: dict[int, int] = {}
    seen_ips: dict[ipaddress.IPv4Address, int] = {hub_ip: -1}
    for position, entry in enumerate(entries):
        where = f"{field_name}[{position}]"
        if not isinstance(entry, dict):
            raise InputError(where, entry, "must be a dict with id and underlay_ip")
        if entry.get("id") in (None, ""):
            raise InputError(f"{where}.id", entry.get("id"), "every direct-mode runner needs its id")
        peer_id = plan.check_runner_id(f"{where}.id", entry["id"])
        if entry.get("underlay_ip") in (None, ""):
            raise InputError(f"{where}.underlay_ip", entry.get("underlay_ip"),
                             f"runner {entry.get('name') or peer_id} is in direct mode without an "
                             "underlay IP")
        address = plan.underlay_address(f"{where}.underlay_ip", entry["underlay_ip"])
        if peer_id in seen_ids:
            raise InputError(f"{where}.id", peer_id, f"listed twice (also {field_name}[{seen_ids[peer_id]}])")
        seen_ids[peer_id] = position
        if peer_id == runner_id:
            if address != underlay_ip:
                raise InputError(f"{where}.underlay_ip", str(address),
                                 f"is listed for this runner (id {runner_id}), whose underlay_ip is "
                                 f"{underlay_ip}")
            continue
        if address in seen_ips or address == underlay_ip:
            other = seen_ips.get(address)
            owner = ("the hub's underlay IP" if other == -1 else
                     f"also {field_name}[{other}]" if other is not None else "this runner's own underlay_ip")
            raise InputError(f"{where}.underlay_ip", str(address),
                             f"two runners with the same underlay IP ({owner})")
        seen_ips[address] = position
        addressing = plan.runner(peer_id)
        peers.append(MeshPeer(runner_id=peer_id, name=str(entry.get("name") or f"runner{peer_id}"),
                              underlay_ip=address, subnet=addressing.subnet, vtep=addressing.gateway,
                              mac=vtep_mac(peer_id)))
    return sorted(peers, key=lambda peer: peer.runner_id)


class MeshEntries:
    """Plan the routes, neighbours and FDB entries of the mesh device from what the kernel has.

    The device is owned by its declared name, so every route, IPv4 neighbour and FDB entry on it
    that no declared peer needs is stale and removed. `fresh`: the device is (re)created by an
    earlier step of the same plan, so it starts with none of them. `new_mac`: an earlier step
    changes the device's MAC, and the kernel then flushes its neighbour entries (permanent
    ones too), so they are all set again.
    """

    def __init__(self, plan: ChangePlan, nl: Netlink, snapshot: Snapshot, device: str,
                 source: ipaddress.IPv4Address, fresh: bool, new_mac: bool) -> None:
        self.plan = plan
        self.nl = nl
        self.device = device
        self.source = source
        link = None if fresh else snapshot.link(device)
        self.routes: list[Route] = []
        self.neighbours: list[Neighbour] = []
        self.fdb: list[FdbEntry] = []
        if link is not None:
            self.routes = [route for route in snapshot.routes if route.oif == link.index]
            self.neighbours = [] if new_mac else [entry for entry in nl.neighbours(device)
                                                  if isinstance(entry.dst, ipaddress.IPv4Address)]
            self.fdb = [entry for entry in nl.fdb(device) if entry.dst is not None]

    def converge(self, peers: list[MeshPeer]) -> None:
        self._routes(peers)
        self._neighbours(peers)
        self._fdb(peers)

    def _routes(self, peers: list[MeshPeer]) -> None:
        wanted = {peer.subnet: peer for peer in peers}
        for route in self.routes:
            if route.dst not in wanted:
                self.plan.add(f"mesh route {route.dst}", "delete", self._route_text(route), None,
                              lambda route=route: self.nl.delete_route(route))
        for subnet, peer in wanted.items():
            desired = f"{subnet} via {peer.vtep} dev {self.device} onlink src {self.source}"
            live = [route for route in self.routes if route.dst == subnet]
            if any(route.gateway == peer.vtep and route.onlink and route.prefsrc == self.source
                   and route.proto == NETLOOM_ROUTE_PROTO and route.priority == 0 for route in live):
                continue
            self.plan.add(f"mesh route {subnet}", "update" if live else "create",
                          [self._route_text(route) for route in live] or None, desired,
                          lambda peer=peer: self.nl.replace_route(
                              peer.subnet, peer.vtep, self.device, proto=NETLOOM_ROUTE_PROTO,
                              prefsrc=self.source, onlink=True))

    def _route_text(self, route: Route) -> str:
        via = f" via {route.gateway}" if route.gateway else ""
        return (f"{route.dst}{via} dev {self.device}{' onlink' if route.onlink else ''}"
                f"{f' src {route.prefsrc}' if route.prefsrc else ''} proto {route.proto}")

    def _neighbours(self, peers: list[MeshPeer]) -> None:
        wanted = {peer.vtep: peer for peer in peers}
        for entry in self.neighbours:
            if entry.dst not in wanted:
                self.plan.add(f"mesh neighbour {entry.dst}", "delete", _neighbour_text(entry), None,
                              lambda entry=entry: self.nl.delete_neighbour(self.device, entry.dst))
        for address, peer in wanted.items():
            live = [entry for entry in self.neighbours if entry.dst == address]
            if any(entry.lladdr == peer.mac and "permanent" in entry.state for entry in live):
                continue
            self.plan.add(f"mesh neighbour {address}", "update" if live else "create",
                          _neighbour_text(live[0]) if live else None,
                          f"{address} lladdr {peer.mac} permanent",
                          lambda peer=peer: self.nl.replace_neighbour(self.device, peer.vtep, peer.mac))

    def _fdb(self, peers: list[MeshPeer]) -> None:
        wanted = {peer.mac: peer for peer in peers}
        for entry in self.fdb:
            if entry.lladdr not in wanted:
                self.plan.add(f"mesh fdb {entry.lladdr} dst {entry.dst}", "delete", _fdb_text(entry), None,
                              lambda entry=entry: self.nl.delete_fdb(self.device, entry.lladdr, entry.dst))
        for mac, peer in wanted.items():
            live = [entry for entry in self.fdb if entry.lladdr == mac]
            if (len(live) == 1 and live[0].dst == peer.underlay_ip and live[0].state == "permanent"
                    and live[0].self_):
                continue
            wrong = [entry for entry in live if entry.dst != peer.underlay_ip]

            def apply(peer: MeshPeer = peer, wrong: list[FdbEntry] = wrong) -> None:
                for entry in wrong:
                    self.nl.delete_fdb(self.device, entry.lladdr, entry.dst)
                self.nl.replace_fdb(self.device, peer.mac, peer.underlay_ip)
            self.plan.add(f"mesh fdb {mac}", "update" if live else "create",
                          [_fdb_text(entry) for entry in live] or None,
                          f"{mac} dst {peer.underlay_ip} self permanent",
                          apply)


def _neighbour_text(entry: Neighbour) -> str:
    return f"{entry.dst} lladdr {entry.lladdr} {' '.join(entry.state)}".strip()


def _fdb_text(entry: FdbEntry) -> str:
    return f"{entry.lladdr} dst {entry.dst}{' self' if entry.self_ else ''} {entry.state}".strip()
