"""The one I/O seam between netloom modules and kernel link/address/route state.

Everything goes through a single pyroute2 IPRoute socket per process: reads are whole-table
dumps turned into plain, normalised dataclasses (so modules compare values, never netlink
messages), and writes are single requests. No per-link queries: a hub with 254 runners is
read in three dumps, and a link's index is learnt from a dump, not asked for one by one.
Works with Debian 12's pyroute2 0.7.2 and with 0.9.x (only APIs present in both are used).
"""
from __future__ import annotations

import errno
import ipaddress
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ansible.module_utils.netloom.common import ChangePlan, CommandError, InputError, int_range

try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
except ImportError:  # reported by the module through missing_pyroute2()
    IPRoute = None
    NetlinkError = OSError

IFF_UP = 0x1
MAIN_TABLE = 254
RTN_UNICAST = 1
AF_INET = 2
ANCHOR_KINDS = ("dummy", "bridge")


def missing_pyroute2() -> str | None:
    """A message for fail_json when pyroute2 is not importable on the node, else None."""
    if IPRoute is None:
        return "pyroute2 is required on the managed node (Debian: apt-get install python3-pyroute2)"
    return None


@dataclass(frozen=True)
class Vxlan:
    """The VXLAN attributes netloom manages; remote is the unicast peer (IFLA_VXLAN_GROUP)."""

    vni: int
    local: ipaddress.IPv4Address | None
    remote: ipaddress.IPv4Address | None
    port: int
    learning: bool

    def describe(self) -> dict[str, Any]:
        return {"vni": self.vni, "local": _text(self.local), "remote": _text(self.remote),
                "port": self.port, "learning": self.learning}


@dataclass(frozen=True)
class Link:
    """One network interface as the kernel reports it."""

    index: int
    name: str
    kind: str          # "" for links without IFLA_LINKINFO (e.g. physical NICs, lo)
    mtu: int
    up: bool           # administratively up (IFF_UP)
    master: int | None
    vxlan: Vxlan | None = None


@dataclass(frozen=True)
class Route:
    """An IPv4 unicast route of the main table."""

    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    oif: int | None
    priority: int


@dataclass
class Snapshot:
    """Links, IPv4 addresses and (when asked for) main-table routes, read once."""

    links: dict[str, Link] = field(default_factory=dict)
    addresses: dict[int, list[ipaddress.IPv4Interface]] = field(default_factory=dict)
    routes: list[Route] = field(default_factory=list)

    def link(self, name: str) -> Link | None:
        return self.links.get(name)

    def addresses_of(self, name: str) -> list[ipaddress.IPv4Interface]:
        link = self.links.get(name)
        return list(self.addresses.get(link.index, [])) if link else []

    def link_holding(self, address: ipaddress.IPv4Address) -> Link | None:
        """The link that has `address` configured (to check an underlay IP is on this node)."""
        by_index = {link.index: link for link in self.links.values()}
        for index, interfaces in self.addresses.items():
            if any(interface.ip == address for interface in interfaces):
                return by_index.get(index)
        return None

    def ports_of(self, name: str) -> list[Link]:
        """Links enslaved to `name` (a bridge's ports)."""
        link = self.links.get(name)
        if link is None:
            return []
        return sorted((other for other in self.links.values() if other.master == link.index),
                      key=lambda other: other.name)

    def routes_to(self, dst: ipaddress.IPv4Network) -> list[Route]:
        return [route for route in self.routes if route.dst == dst]


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _address(value: Any) -> ipaddress.IPv4Address | None:
    if not value:
        return None
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:  # an IPv6 VXLAN endpoint is not one of ours; compare as "different"
        return None


def _attrs(msg: Any, wanted: frozenset[str]) -> dict[str, Any]:
    """The wanted attributes of a netlink message, in one pass.

    pyroute2's get_attr() scans and decodes the whole attribute list on every call, which
    for 254 links costs more than the dump itself; one pass over msg["attrs"] does not.
    """
    found: dict[str, Any] = {}
    for nla in msg["attrs"]:
        if nla[0] in wanted:
            found[nla[0]] = nla[1]
    return found


_LINK_ATTRS = frozenset(("IFLA_IFNAME", "IFLA_MTU", "IFLA_MASTER", "IFLA_LINKINFO"))
_INFO_ATTRS = frozenset(("IFLA_INFO_KIND", "IFLA_INFO_DATA"))
_VXLAN_ATTRS = frozenset(("IFLA_VXLAN_ID", "IFLA_VXLAN_LOCAL", "IFLA_VXLAN_GROUP", "IFLA_VXLAN_PORT",
                          "IFLA_VXLAN_LEARNING"))
_ADDR_ATTRS = frozenset(("IFA_LOCAL", "IFA_ADDRESS"))
_ROUTE_ATTRS = frozenset(("RTA_TABLE", "RTA_DST", "RTA_GATEWAY", "RTA_OIF", "RTA_PRIORITY"))


def _vxlan_of(data: Any) -> Vxlan:
    attrs = _attrs(data, _VXLAN_ATTRS)
    return Vxlan(
        vni=int(attrs.get("IFLA_VXLAN_ID") or 0),
        local=_address(attrs.get("IFLA_VXLAN_LOCAL")),
        remote=_address(attrs.get("IFLA_VXLAN_GROUP")),
        port=int(attrs.get("IFLA_VXLAN_PORT") or 0),
        learning=bool(attrs.get("IFLA_VXLAN_LEARNING")),
    )


def _link_of(msg: Any) -> Link:
    attrs = _attrs(msg, _LINK_ATTRS)
    kind = ""
    vxlan = None
    if attrs.get("IFLA_LINKINFO") is not None:
        info = _attrs(attrs["IFLA_LINKINFO"], _INFO_ATTRS)
        kind = info.get("IFLA_INFO_KIND") or ""
        if kind == "vxlan" and info.get("IFLA_INFO_DATA") is not None:
            vxlan = _vxlan_of(info["IFLA_INFO_DATA"])
    return Link(index=int(msg["index"]), name=attrs["IFLA_IFNAME"], kind=kind,
                mtu=int(attrs.get("IFLA_MTU") or 0), up=bool(msg["flags"] & IFF_UP),
                master=attrs.get("IFLA_MASTER") or None, vxlan=vxlan)


def dummy_supported() -> bool:
    """Whether `dummy` links can be created: the driver is loaded/built in, or loadable.

    Used to predict the anchor's kind in check mode; the real run still falls back to a
    bridge if creation fails.
    """
    if os.path.isdir("/sys/module/dummy"):
        return True
    module_dir = os.path.join("/lib/modules", platform.release(), "kernel/drivers/net")
    try:
        return any(name.startswith("dummy.ko") for name in os.listdir(module_dir))
    except OSError:
        return False


class Netlink:
    """One IPRoute socket for the module's whole run: one dump to read, one request per change."""

    def __init__(self) -> None:
        self._ipr: Any = None
        self._index: dict[str, int] = {}

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            if IPRoute is None:
                raise CommandError(missing_pyroute2() or "pyroute2 is missing")
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.ipr, method)(*args, **kwargs)
        except NetlinkError as err:
            raise CommandError(f"netlink: {what}: {err}") from None

    # ---- reads ----

    def dump(self, routes: bool = False) -> Snapshot:
        """Read all links and IPv4 addresses (and main-table IPv4 routes) in whole-table dumps."""
        snapshot = Snapshot()
        for msg in self._call("dump links", "get_links"):
            link = _link_of(msg)
            snapshot.links[link.name] = link
        self._index = {name: link.index for name, link in snapshot.links.items()}
        for msg in self._call("dump addresses", "get_addr", family=AF_INET):
            attrs = _attrs(msg, _ADDR_ATTRS)
            local = attrs.get("IFA_LOCAL") or attrs.get("IFA_ADDRESS")
            interface = ipaddress.IPv4Interface(f"{local}/{msg['prefixlen']}")
            snapshot.addresses.setdefault(int(msg["index"]), []).append(interface)
        if routes:
            snapshot.routes = list(self._routes())
        return snapshot

    def _routes(self) -> Iterable[Route]:
        for msg in self._call("dump routes", "get_routes", family=AF_INET):
            attrs = _attrs(msg, _ROUTE_ATTRS)
            table = attrs.get("RTA_TABLE") or msg["table"]
            if table != MAIN_TABLE or msg["type"] != RTN_UNICAST:
                continue
            dst = attrs.get("RTA_DST") or "0.0.0.0"
            yield Route(dst=ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False),
                        gateway=_address(attrs.get("RTA_GATEWAY")),
                        oif=attrs.get("RTA_OIF"), priority=int(attrs.get("RTA_PRIORITY") or 0))

    def index_of(self, name: str) -> int:
        """Index of a link, from the last dump; a link created since is found by one new dump.

        Modules order their steps so all links are created before any address is added,
        which keeps this to one extra dump however many links were created.
        """
        if name not in self._index:
            self._index = {_attrs(msg, _LINK_ATTRS)["IFLA_IFNAME"]: int(msg["index"])
                           for msg in self._call("dump links", "get_links")}
        if name not in self._index:
            raise CommandError(f"netlink: link {name} does not exist")
        return self._index[name]

    # ---- link mutations ----

    def add_vxlan(self, name: str, vxlan: Vxlan, mtu: int, master: str | None = None) -> None:
        """Create a VXLAN link already up, with its MTU and (optionally) its bridge, in one request."""
        extra: dict[str, Any] = {}
        if master is not None:
            extra["master"] = self.index_of(master)
        self._call(f"add vxlan link {name}", "link", "add", ifname=name, kind="vxlan",
                   vxlan_id=vxlan.vni, vxlan_local=_text(vxlan.local), vxlan_group=_text(vxlan.remote),
                   vxlan_port=vxlan.port, vxlan_learning=int(vxlan.learning), mtu=mtu, state="up", **extra)

    def add_bridge(self, name: str, mtu: int | None = None) -> None:
        extra = {"mtu": mtu} if mtu else {}
        self._call(f"add bridge {name}", "link", "add", ifname=name, kind="bridge", state="up", **extra)

    def add_anchor(self, name: str, kind: str) -> str:
        """Create an up link that only holds local addresses; return the kind really used.

        A `dummy` is the right device; kernels without the dummy driver answer EOPNOTSUPP,
        and then a bridge with no ports serves instead (up, carrier on, local addresses work).
        """
        if kind == "dummy":
            try:
                self.ipr.link("add", ifname=name, kind="dummy", state="up")
                return "dummy"
            except NetlinkError as err:
                if err.code != errno.EOPNOTSUPP:
                    raise CommandError(f"netlink: add dummy link {name}: {err}") from None
        self.add_bridge(name)
        return "bridge"

    def set_link(self, name: str, mtu: int | None = None, master: str | None = None,
                 up: bool | None = None) -> None:
        changes: dict[str, Any] = {}
        if mtu is not None:
            changes["mtu"] = mtu
        if master is not None:
            changes["master"] = self.index_of(master)
        if up is not None:
            changes["state"] = "up" if up else "down"
        self._call(f"set link {name} {changes}", "link", "set", index=self.index_of(name), **changes)

    def delete_link(self, name: str) -> None:
        self._call(f"delete link {name}", "link", "del", index=self.index_of(name))
        self._index.pop(name, None)

    # ---- addresses and routes ----

    def add_address(self, name: str, interface: ipaddress.IPv4Interface) -> None:
        self._call(f"add address {interface} to {name}", "addr", "add", index=self.index_of(name),
                   address=str(interface.ip), prefixlen=interface.network.prefixlen)

    def delete_address(self, name: str, interface: ipaddress.IPv4Interface) -> None:
        self._call(f"delete address {interface} from {name}", "addr", "del", index=self.index_of(name),
                   address=str(interface.ip), prefixlen=interface.network.prefixlen)

    def replace_route(self, dst: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address, device: str) -> None:
        """`ip route replace DST via GW dev DEVICE`: idempotent, and errors are raised, not swallowed."""
        self._call(f"replace route {dst} via {gateway} dev {device}", "route", "replace",
                   dst=str(dst.network_address), dst_len=dst.prefixlen, gateway=str(gateway),
                   oif=self.index_of(device))

    def delete_route(self, route: Route) -> None:
        extra: dict[str, Any] = {}
        if route.gateway is not None:
            extra["gateway"] = str(route.gateway)
        if route.oif is not None:
            extra["oif"] = route.oif
        if route.priority:
            extra["priority"] = route.priority
        self._call(f"delete route {route.dst}", "route", "del", dst=str(route.dst.network_address),
                   dst_len=route.dst.prefixlen, **extra)


# ---- planning helpers shared by the overlay modules ----

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
MIN_MTU = 1280


def underlay_link(snapshot: Snapshot, field_name: str, address: ipaddress.IPv4Address) -> Link:
    """The link holding this node's underlay address; InputError when the address is not here."""
    link = snapshot.link_holding(address)
    if link is None:
        here = sorted({str(i.ip) for interfaces in snapshot.addresses.values() for i in interfaces})
        raise InputError(field_name, str(address),
                         f"is not an address of this node (its IPv4 addresses: {', '.join(here) or 'none'})")
    return link


def overlay_mtu(field_name: str, requested: Any, underlay: Link) -> int:
    """Underlay MTU - 50 by default; an explicit MTU must lie in 1280..underlay MTU - 50."""
    ceiling = underlay.mtu - VXLAN_OVERHEAD
    if ceiling < MIN_MTU:
        raise InputError(field_name, requested if requested is not None else ceiling,
                         f"underlay {underlay.name} has MTU {underlay.mtu}, which leaves {ceiling} "
                         f"for VXLAN; at least {MIN_MTU + VXLAN_OVERHEAD} is needed")
    if requested is None:
        return ceiling
    return int_range(field_name, requested, MIN_MTU, ceiling)


def describe_link(link: Link | None, snapshot: Snapshot) -> dict[str, Any] | None:
    """A link's managed attributes as plain data, for diffs."""
    if link is None:
        return None
    by_index = {other.index: other.name for other in snapshot.links.values()}
    described: dict[str, Any] = {"kind": link.kind, "mtu": link.mtu, "up": link.up}
    if link.master is not None:
        described["master"] = by_index.get(link.master, link.master)
    if link.vxlan is not None:
        described.update(link.vxlan.describe())
    return described


def plan_vxlan(plan: ChangePlan, nl: Netlink, snapshot: Snapshot, name: str, want: Vxlan,
               mtu: int, master: str | None = None) -> bool:
    """Converge one VXLAN link: create it, recreate it when its tunnel identity differs, else fix in place.

    VNI, local, remote, port and learning define the tunnel: a difference means a new link
    (the kernel cannot change all of them in place). MTU, master and up are fixed in place.
    Returns True when the link is (re)created, i.e. starts without addresses.
    """
    current = snapshot.link(name)
    desired: dict[str, Any] = {"kind": "vxlan", "mtu": mtu, "up": True, **want.describe()}
    if master is not None:
        desired["master"] = master
    if current is not None and current.kind != "vxlan":
        raise CommandError(f"link {name} exists as a {current.kind or 'physical'} link, not a VXLAN "
                           "link netloom made; remove or rename it first")
    if current is None or current.vxlan != want:
        def recreate() -> None:
            if current is not None:
                nl.delete_link(name)
            nl.add_vxlan(name, want, mtu, master)
        plan.add(f"link {name}", "create" if current is None else "update",
                 describe_link(current, snapshot), desired, recreate)
        return True
    master_index = snapshot.links[master].index if master in snapshot.links else None
    fixes: dict[str, Any] = {}
    if current.mtu != mtu:
        fixes["mtu"] = mtu
    if master is not None and (master_index is None or current.master != master_index):
        fixes["master"] = master
    if not current.up:
        fixes["up"] = True
    if fixes:
        plan.add(f"link {name}", "update", describe_link(current, snapshot), desired,
                 lambda: nl.set_link(name, **fixes))
    return False


def plan_addresses(plan: ChangePlan, nl: Netlink, snapshot: Snapshot, name: str,
                   desired: list[ipaddress.IPv4Interface],
                   fresh: bool = False) -> list[ipaddress.IPv4Interface]:
    """Make a link's IPv4 addresses exactly `desired`: stale ones are removed, missing ones added.

    `fresh` means the link is (re)created by an earlier step and so starts with none.
    Returns the stale addresses the plan removes (routes through them go with them).
    """
    live = snapshot.addresses_of(name)
    current = [] if fresh else live
    stale = [interface for interface in current if interface not in desired]
    missing = [interface for interface in desired if interface not in current]
    if not stale and not missing:
        return []

    def apply() -> None:
        for interface in stale:
            nl.delete_address(name, interface)
        for interface in missing:
            nl.add_address(name, interface)
    plan.add(f"addresses {name}", "update" if live else "create",
             sorted(str(i) for i in live) or None, [str(i) for i in desired], apply)
    return stale
