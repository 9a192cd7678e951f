"""The one I/O seam between netloom modules and kernel link/address/route state.

Reads are whole-table rtnetlink dumps (links, IPv4 addresses, IPv4 routes) turned into
plain, normalised dataclasses, so modules compare values, never netlink messages. No
per-link queries: a hub with 254 runners is read in two dumps, and the index of a link
created later is learnt from one more dump, not asked for one by one.

Writes go through pyroute2's IPRoute (one socket per process, one request per change),
with only APIs present in both Debian 12's 0.7.2 and 0.9.x.

Why the dumps do not use pyroute2: measured on a hub with 254 VXLAN links, pyroute2 0.7.2
and 0.9.7 both spend about 0.2 s decoding every attribute of every message, and importing
the package costs 0.15-0.3 s more (its __init__ imports every protocol it knows). The
reader below asks the kernel for the same dumps on a plain AF_NETLINK socket and decodes
only the handful of attributes netloom compares: about 0.01 s, and a run that changes
nothing never imports pyroute2. Its layouts are the kernel's stable UAPI (linux/rtnetlink.h,
linux/if_link.h, linux/if_addr.h).
"""
from __future__ import annotations

import errno
import importlib.util
import ipaddress
import os
import platform
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ansible.module_utils.netloom.common import ChangePlan, CommandError, InputError, int_range

IFF_UP = 0x1
MAIN_TABLE = 254
RTN_UNICAST = 1
AF_INET = 2
ANCHOR_KINDS = ("dummy", "bridge")

# rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h).
NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x10, 0x300
RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE = 18, 22, 26
IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_LINKINFO = 3, 4, 10, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_GROUP, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT = 1, 2, 4, 7, 15
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_SECONDARY = 0x01
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
NLA_TYPE_MASK = 0x3FFF
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_U32 = struct.Struct("=I")
_BE16 = struct.Struct("!H")
_DUMP_ATTEMPTS = 3


def missing_pyroute2() -> str | None:
    """A message for fail_json when pyroute2 is not installed on the node, else None.

    Checked before anything is planned, without importing it (a no-op run never does).
    """
    if importlib.util.find_spec("pyroute2") is None:
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
    secondaries: set[tuple[int, ipaddress.IPv4Interface]] = field(default_factory=set)
    routes: list[Route] = field(default_factory=list)

    def link(self, name: str) -> Link | None:
        return self.links.get(name)

    def addresses_of(self, name: str) -> list[ipaddress.IPv4Interface]:
        link = self.links.get(name)
        return list(self.addresses.get(link.index, [])) if link else []

    def is_secondary(self, name: str, interface: ipaddress.IPv4Interface) -> bool:
        """A secondary address: another address of the same subnet on the link came first."""
        link = self.links.get(name)
        return link is not None and (link.index, interface) in self.secondaries

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


# ---- reading: rtnetlink dumps decoded with struct ----

def _nlattrs(buf: bytes, offset: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (start, end) of its payload, for the attributes in buf[offset:end]."""
    found: dict[int, tuple[int, int]] = {}
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", buf, offset)
        if length < 4:
            break
        found[kind & NLA_TYPE_MASK] = (offset + 4, offset + length)
        offset += (length + 3) & ~3
    return found


def _string(buf: bytes, span: tuple[int, int] | None) -> str:
    return buf[span[0]:span[1]].split(b"\0", 1)[0].decode() if span else ""


def _u32(buf: bytes, span: tuple[int, int] | None) -> int | None:
    return _U32.unpack_from(buf, span[0])[0] if span else None


def _ipv4(buf: bytes, span: tuple[int, int] | None) -> ipaddress.IPv4Address | None:
    """An IPv4 attribute; absent or of another length (an IPv6 endpoint) reads as None."""
    if span is None or span[1] - span[0] != 4:
        return None
    return ipaddress.IPv4Address(buf[span[0]:span[1]])


def _parse_link(body: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body, 0)
    attrs = _nlattrs(body, _IFINFOMSG.size, len(body))
    kind = ""
    vxlan = None
    if IFLA_LINKINFO in attrs:
        info = _nlattrs(body, *attrs[IFLA_LINKINFO])
        kind = _string(body, info.get(IFLA_INFO_KIND))
        if kind == "vxlan" and IFLA_INFO_DATA in info:
            data = _nlattrs(body, *info[IFLA_INFO_DATA])
            port = data.get(IFLA_VXLAN_PORT)
            learning = data.get(IFLA_VXLAN_LEARNING)
            vxlan = Vxlan(vni=_u32(body, data.get(IFLA_VXLAN_ID)) or 0,
                          local=_ipv4(body, data.get(IFLA_VXLAN_LOCAL)),
                          remote=_ipv4(body, data.get(IFLA_VXLAN_GROUP)),
                          port=_BE16.unpack_from(body, port[0])[0] if port else 0,
                          learning=bool(body[learning[0]]) if learning else False)
    return Link(index=index, name=_string(body, attrs.get(IFLA_IFNAME)), kind=kind,
                mtu=_u32(body, attrs.get(IFLA_MTU)) or 0, up=bool(flags & IFF_UP),
                master=_u32(body, attrs.get(IFLA_MASTER)) or None, vxlan=vxlan)


def _parse_address(body: bytes) -> tuple[int, ipaddress.IPv4Interface, bool] | None:
    family, prefixlen, flags, _scope, index = _IFADDRMSG.unpack_from(body, 0)
    if family != AF_INET:
        return None
    attrs = _nlattrs(body, _IFADDRMSG.size, len(body))
    local = _ipv4(body, attrs.get(IFA_LOCAL)) or _ipv4(body, attrs.get(IFA_ADDRESS))
    if local is None:
        return None
    return index, ipaddress.IPv4Interface(f"{local}/{prefixlen}"), bool(flags & IFA_F_SECONDARY)


def _parse_route(body: bytes) -> Route | None:
    family, dst_len, _src_len, _tos, table, _proto, _scope, kind, _flags = _RTMSG.unpack_from(body, 0)
    attrs = _nlattrs(body, _RTMSG.size, len(body))
    table = _u32(body, attrs.get(RTA_TABLE)) or table
    if family != AF_INET or table != MAIN_TABLE or kind != RTN_UNICAST:
        return None
    dst = _ipv4(body, attrs.get(RTA_DST)) or ipaddress.IPv4Address(0)
    return Route(dst=ipaddress.IPv4Network(f"{dst}/{dst_len}", strict=False),
                 gateway=_ipv4(body, attrs.get(RTA_GATEWAY)), oif=_u32(body, attrs.get(RTA_OIF)),
                 priority=_u32(body, attrs.get(RTA_PRIORITY)) or 0)


class RtnlReader:
    """Whole-table rtnetlink dumps on one AF_NETLINK socket; yields each message's body."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, 0))
            self._sock = sock
        return self._sock

    def dump(self, what: str, msg_type: int, header: bytes) -> list[bytes]:
        """All messages of one dump; a dump the kernel marks interrupted (a concurrent change) is redone."""
        for _attempt in range(_DUMP_ATTEMPTS):
            bodies, interrupted = self._dump_once(what, msg_type, header)
            if not interrupted:
                return bodies
        raise CommandError(f"netlink: dump {what}: kept being interrupted by concurrent changes")

    def _dump_once(self, what: str, msg_type: int, header: bytes) -> tuple[list[bytes], bool]:
        sock = self._socket()
        self._seq += 1
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(header), msg_type, NLM_F_REQUEST | NLM_F_DUMP,
                                 self._seq, 0) + header)
        bodies: list[bytes] = []
        interrupted = False
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise CommandError(f"netlink: dump {what}: malformed message")
                body = data[offset + _NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3
                if seq != self._seq:
                    continue
                interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                if kind == NLMSG_DONE:
                    return bodies, interrupted
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body, 0)[0]
                    if code:
                        raise CommandError(f"netlink: dump {what}: {os.strerror(code)}")
                    continue
                bodies.append(body)

    def links(self) -> Iterator[Link]:
        for body in self.dump("links", RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            yield _parse_link(body)

    def addresses(self) -> Iterator[tuple[int, ipaddress.IPv4Interface, bool]]:
        """(link index, address, is secondary) for every IPv4 address."""
        for body in self.dump("addresses", RTM_GETADDR, _IFADDRMSG.pack(AF_INET, 0, 0, 0, 0)):
            parsed = _parse_address(body)
            if parsed is not None:
                yield parsed

    def routes(self) -> Iterator[Route]:
        for body in self.dump("routes", RTM_GETROUTE, _RTMSG.pack(AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)):
            parsed = _parse_route(body)
            if parsed is not None:
                yield parsed


class Netlink:
    """The module's kernel seam: dumps to read, one pyroute2 request per change."""

    def __init__(self) -> None:
        self._reader = RtnlReader()
        self._ipr: Any = None
        self._netlink_error: type[Exception] = OSError
        self._index: dict[str, int] = {}

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def ipr(self) -> Any:
        """pyroute2's IPRoute, imported and opened on the first change only."""
        if self._ipr is None:
            try:
                from pyroute2 import IPRoute
                from pyroute2.netlink.exceptions import NetlinkError
            except ImportError:
                raise CommandError(missing_pyroute2() or "pyroute2 cannot be imported") from None
            self._netlink_error = NetlinkError
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        self._reader.close()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        ipr = self.ipr
        try:
            return getattr(ipr, method)(*args, **kwargs)
        except self._netlink_error as err:
            raise CommandError(f"netlink: {what}: {err}") from None

    # ---- reads ----

    def dump(self, routes: bool = False) -> Snapshot:
        """Read all links and IPv4 addresses (and main-table IPv4 routes) in whole-table dumps."""
        snapshot = Snapshot()
        try:
            for link in self._reader.links():
                snapshot.links[link.name] = link
            for index, interface, secondary in self._reader.addresses():
                snapshot.addresses.setdefault(index, []).append(interface)
                if secondary:
                    snapshot.secondaries.add((index, interface))
            if routes:
                snapshot.routes = list(self._reader.routes())
        except OSError as err:
            raise CommandError(f"netlink: dump: {err}") from None
        self._index = {name: link.index for name, link in snapshot.links.items()}
        return snapshot

    def index_of(self, name: str) -> int:
        """Index of a link, from the last dump; a link created since is found by one new dump.

        Modules order their steps so all links are created before any address is added,
        which keeps this to one extra dump however many links were created.
        """
        if name not in self._index:
            try:
                self._index = {link.name: link.index for link in self._reader.links()}
            except OSError as err:
                raise CommandError(f"netlink: dump links: {err}") from None
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
            except self._netlink_error as err:
                if getattr(err, "code", None) != errno.EOPNOTSUPP:
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
        """Remove an address; one already gone (the kernel drops secondaries with their primary) is fine."""
        ipr = self.ipr
        try:
            ipr.addr("del", index=self.index_of(name), address=str(interface.ip),
                     prefixlen=interface.network.prefixlen)
        except self._netlink_error as err:
            if getattr(err, "code", None) != errno.EADDRNOTAVAIL:
                raise CommandError(f"netlink: delete address {interface} from {name}: {err}") from None

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


def check_vni_free(snapshot: Snapshot, field_name: str, wanted: dict[int, str], port: int,
                   owned: set[str]) -> None:
    """Fail before any change when a VXLAN link netloom does not own already uses a wanted VNI.

    The kernel refuses a second VXLAN device with the same VNI and UDP port, which would
    otherwise surface half-way through a run. `wanted` maps VNI -> the link that needs it.
    """
    for link in snapshot.links.values():
        if link.vxlan is None or link.name in owned or link.vxlan.port != port:
            continue
        if link.vxlan.vni in wanted:
            raise InputError(field_name, link.vxlan.vni,
                             f"VNI {link.vxlan.vni} (port {port}) needed by {wanted[link.vxlan.vni]} is "
                             f"already used by {link.name}, a VXLAN link netloom does not own")


def check_overlay_routes(snapshot: Snapshot, field_name: str, value: Any, overlay: ipaddress.IPv4Network,
                         owned: set[str]) -> None:
    """Refuse an overlay that overlaps a route netloom does not own on this node, before any change.

    Routes through the `owned` links (their connected routes, the runner's overlay route on its
    bridge) are netloom's. The default route overlaps everything and is never in the way: the
    overlay's more specific route takes precedence only for the overlay.
    """
    names = {link.index: link.name for link in snapshot.links.values()}
    owned_indexes = {link.index for name, link in snapshot.links.items() if name in owned}
    for route in snapshot.routes:
        if route.dst.prefixlen == 0 or route.oif in owned_indexes or not route.dst.overlaps(overlay):
            continue
        via = f" via {route.gateway}" if route.gateway is not None else ""
        dev = f" dev {names.get(route.oif, route.oif)}" if route.oif is not None else ""
        raise InputError(field_name, value, f"the overlay {overlay} overlaps the route {route.dst}{via}{dev}"
                                            f"{f' metric {route.priority}' if route.priority else ''}, "
                                            "which netloom does not own on this node")


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
    Removing a stale primary address makes the kernel drop the secondaries of its subnet
    (unless promote_secondaries is set), so a desired address that is such a secondary is
    removed and added again. Returns the addresses removed (routes through them go too).
    """
    live = snapshot.addresses_of(name)
    current = [] if fresh else live
    stale = [interface for interface in current if interface not in desired]
    stale_primaries = [interface for interface in stale if not snapshot.is_secondary(name, interface)]
    entangled = [interface for interface in current
                 if interface in desired and snapshot.is_secondary(name, interface)
                 and any(primary.network == interface.network for primary in stale_primaries)]
    missing = [interface for interface in desired if interface not in current]
    if not stale and not missing:
        return []
    removed = stale + entangled
    added = missing + entangled

    def apply() -> None:
        for interface in removed:
            nl.delete_address(name, interface)
        for interface in added:
            nl.add_address(name, interface)
    plan.add(f"addresses {name}", "update" if live else "create",
             sorted(str(i) for i in live) or None, [str(i) for i in desired], apply)
    return removed
