"""The one kernel seam of every netloom module: links, addresses, routes, neighbours, FDB.

Reads come from iproute2's JSON output (`ip -j`, `bridge -j`): one whole-table dump per
object kind, all dumps of a read in one `ip -batch` process, turned into plain, normalised
dataclasses: modules compare values, never netlink messages or tool output. Writes go
through pyroute2's IPRoute (one socket per process, one request per change), with only APIs
present in both Debian 12's 0.7.2 and 0.9.x.

Why reads do not use pyroute2: bench/netlink_read measures reading a hub's 254 VXLAN links
with their addresses and routes. pyroute2 0.7.2 (Debian's) spends about 0.5 s importing the
package and decoding every attribute of every message, more than the whole no-op budget
(0.3 s). The `ip -j` dumps take a few hundredths of a second, as fast as the hand-written
netlink decoder netloom used before, so the decoder was removed: iproute2 is on every
Debian node and its JSON is a stable interface. A run that changes nothing never imports
pyroute2.
"""
from __future__ import annotations

import errno
import importlib.util
import ipaddress
import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ansible.module_utils.netloom.common import CommandError, guarded
from ansible.module_utils.netloom.constants import (
    MAIN_TABLE,
    NTF_SELF,
    NUD_NOARP,
    NUD_PERMANENT,
    RTN_UNICAST,
    RTNH_F_ONLINK,
    RTPROT_BOOT,
    SCOPE_NOWHERE,
    SCOPE_UNIVERSE,
)

# iproute2 reports a dump the kernel marked inconsistent (a concurrent change) on stderr.
_INTERRUPTED = "Dump was interrupted"
_DUMP_ATTEMPTS = 3

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def missing_pyroute2() -> str | None:
    """A message for fail_json when pyroute2 is not installed on the node, else None.

    Checked before anything is planned, without importing it (a no-op run never does).
    """
    if importlib.util.find_spec("pyroute2") is None:
        return "pyroute2 is required on the managed node (Debian: apt-get install python3-pyroute2)"
    return None


class RequestError(CommandError):
    """A netlink request the kernel refused; `code` is its errno (e.g. EOPNOTSUPP)."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


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
    address: str | None = None  # link-layer (MAC) address, lower case


@dataclass(frozen=True)
class Route:
    """An IPv4 unicast route: where it goes, and who set it (proto) in which table and scope."""

    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None
    oif: int | None
    priority: int = 0
    proto: int = RTPROT_BOOT
    table: int = MAIN_TABLE
    scope: int = SCOPE_UNIVERSE
    prefsrc: ipaddress.IPv4Address | None = None  # source address for locally sent packets
    onlink: bool = False  # the gateway is on the link without a route to it (RTNH_F_ONLINK)


@dataclass(frozen=True)
class Neighbour:
    """A neighbour (ARP/NDP) entry: `ip neigh ... lladdr MAC dev DEV nud STATE`."""

    oif: int
    dst: IPAddress
    lladdr: str | None
    state: tuple[str, ...]  # lower-case NUD names, e.g. ("permanent",)


@dataclass(frozen=True)
class FdbEntry:
    """A forwarding-database entry of a device (`bridge fdb`); dst is a VXLAN remote VTEP."""

    lladdr: str
    dst: IPAddress | None
    state: str     # "permanent", "static", "" (dynamic)
    self_: bool    # the device's own table (NTF_SELF), not its bridge master's


@dataclass
class Snapshot:
    """Links and addresses (and, when asked for, main-table IPv4 routes), read once."""

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

    def names(self) -> dict[int, str]:
        """Link index -> name."""
        return {link.index: link.name for link in self.links.values()}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# ---- reading: iproute2 JSON ----

def _run_json(tool: str, options: Sequence[str], commands: Sequence[str]) -> list[Any]:
    """Run read-only iproute2 commands in one `TOOL -j -batch -` process; each one's parsed JSON.

    A dump the kernel marks interrupted by a concurrent change is read again.
    """
    argv = [tool, "-j", *options, "-batch", "-"]
    script = "".join(f"{command}\n" for command in commands)
    for _attempt in range(_DUMP_ATTEMPTS):
        try:
            proc = subprocess.run(argv, input=script, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise CommandError(f"{tool} not found: install iproute2 on the node") from None
        if _INTERRUPTED in proc.stderr:
            continue
        if proc.returncode != 0:
            raise CommandError(f"{' '.join(argv)} ({'; '.join(commands)}) failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
        documents = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        if len(documents) != len(commands):
            raise CommandError(f"{' '.join(argv)} ({'; '.join(commands)}): expected {len(commands)} "
                               f"JSON documents, got {len(documents)}")
        return documents
    raise CommandError(f"{tool} {'; '.join(commands)}: kept being interrupted by concurrent changes")


def _ip(commands: Sequence[str], ipv4: bool = False) -> list[Any]:
    """`ip` reads with numbers for protocols, scopes and tables (-N) and link details (-d)."""
    return _run_json("ip", ["-N", "-d", *(["-4"] if ipv4 else [])], commands)


LINKS = "link show"
ADDRESSES = "addr show"


def routes_command(table: int) -> str:
    return f"route show table {table}"


def _ipv4_or_none(text: Any) -> ipaddress.IPv4Address | None:
    return ipaddress.IPv4Address(text) if text else None


def parse_links(entries: list[dict[str, Any]]) -> list[Link]:
    """`ip -j -d link show` as Links (masters named by iproute2 become indexes)."""
    index_of = {entry["ifname"]: entry["ifindex"] for entry in entries}
    links = []
    for entry in entries:
        info = entry.get("linkinfo", {})
        kind = info.get("info_kind", "")
        vxlan = None
        if kind == "vxlan":
            data = info.get("info_data", {})
            # The kernel has one attribute for a unicast remote and a multicast group.
            vxlan = Vxlan(vni=int(data.get("id", 0)), local=_ipv4_or_none(data.get("local")),
                          remote=_ipv4_or_none(data.get("remote") or data.get("group")),
                          port=int(data.get("port", 0)), learning=bool(data.get("learning", False)))
        links.append(Link(index=entry["ifindex"], name=entry["ifname"], kind=kind, mtu=entry["mtu"],
                          up="UP" in entry.get("flags", []),
                          master=index_of.get(entry["master"]) if "master" in entry else None,
                          vxlan=vxlan, address=entry.get("address")))
    return links


def parse_routes(entries: list[dict[str, Any]], table: int, index_of: dict[str, int]) -> list[Route]:
    """`ip -j -N -4 route show table T` as unicast Routes (iproute2 leaves defaults out)."""
    routes = []
    for entry in entries:
        if int(entry.get("type", RTN_UNICAST)) != RTN_UNICAST:
            continue
        dst = entry["dst"]
        routes.append(Route(dst=ipaddress.IPv4Network("0.0.0.0/0" if dst == "default" else dst),
                            gateway=_ipv4_or_none(entry.get("gateway")),
                            oif=index_of.get(entry["dev"]) if "dev" in entry else None,
                            priority=int(entry.get("metric", 0)),
                            proto=int(entry.get("protocol", RTPROT_BOOT)),
                            table=int(entry.get("table", table)),
                            scope=int(entry.get("scope", SCOPE_UNIVERSE)),
                            prefsrc=_ipv4_or_none(entry.get("prefsrc")),
                            onlink="onlink" in entry.get("flags", [])))
    return routes


def parse_addresses(entries: list[dict[str, Any]]) -> list[tuple[int, IPInterface, bool]]:
    """`ip -j addr show` as (link index, address, is secondary), IPv4 and IPv6."""
    found: list[tuple[int, IPInterface, bool]] = []
    for entry in entries:
        for info in entry.get("addr_info", []):
            if info.get("family") in ("inet", "inet6"):
                interface = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
                found.append((entry["ifindex"], interface, bool(info.get("secondary"))))
    return found


# ---- the seam ----

class Netlink:
    """The module's kernel seam: iproute2 JSON to read, one pyroute2 request per change."""

    def __init__(self) -> None:
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
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        ipr = self.ipr
        try:
            return getattr(ipr, method)(*args, **kwargs)
        except self._netlink_error as err:
            raise RequestError(f"netlink: {what}: {err}", getattr(err, "code", None)) from None

    # ---- reads ----

    def dump(self, routes: bool = False) -> Snapshot:
        """Read all links and IPv4 addresses (and main-table IPv4 routes) in one `ip` process."""
        results = _ip([LINKS, ADDRESSES] + ([routes_command(MAIN_TABLE)] if routes else []), ipv4=True)
        snapshot = Snapshot()
        for link in parse_links(results[0]):
            snapshot.links[link.name] = link
        for index, interface, secondary in parse_addresses(results[1]):
            if not isinstance(interface, ipaddress.IPv4Interface):
                continue
            snapshot.addresses.setdefault(index, []).append(interface)
            if secondary:
                snapshot.secondaries.add((index, interface))
        self._index = {name: link.index for name, link in snapshot.links.items()}
        if routes:
            snapshot.routes = parse_routes(results[2], MAIN_TABLE, self._index)
        return snapshot

    def link(self, name: str) -> Link | None:
        """One link read now (not from the last dump), None when it does not exist."""
        return next((link for link in self._read_links() if link.name == name), None)

    def _read_links(self) -> list[Link]:
        links = parse_links(_ip([LINKS])[0])
        self._index = {link.name: link.index for link in links}
        return links

    def addresses(self, name: str) -> list[IPInterface]:
        """The IPv4 and IPv6 addresses of one link, read now."""
        index = self.index_of(name)
        return [interface for owner, interface, _secondary in parse_addresses(_ip([ADDRESSES])[0])
                if owner == index]

    def routes(self, table: int = MAIN_TABLE) -> list[Route]:
        """The IPv4 unicast routes of one table (link indexes from a link read in the same process)."""
        links_json, routes_json = _ip([LINKS, routes_command(table)], ipv4=True)
        self._index = {link.name: link.index for link in parse_links(links_json)}
        return parse_routes(routes_json, table, self._index)

    def neighbours(self, device: str | None = None) -> list[Neighbour]:
        """Neighbour entries of every family, of one device or of all."""
        entries = _ip(["neigh show" + (f" dev {device}" if device else "")])[0]
        found = []
        for entry in entries:
            oif = self.index_of(device or entry["dev"])
            found.append(Neighbour(oif=oif, dst=ipaddress.ip_address(entry["dst"]),
                                   lladdr=entry.get("lladdr"),
                                   state=tuple(state.lower() for state in entry.get("state", []))))
        return found

    def fdb(self, device: str) -> list[FdbEntry]:
        """The forwarding-database entries of one device (a VXLAN link's remote VTEPs)."""
        entries = _run_json("bridge", [], [f"fdb show dev {device}"])[0]
        return [FdbEntry(lladdr=entry["mac"],
                         dst=ipaddress.ip_address(entry["dst"]) if "dst" in entry else None,
                         state=entry.get("state", ""), self_="self" in entry.get("flags", []))
                for entry in entries]

    def index_of(self, name: str) -> int:
        """Index of a link, from the last read; a link created since is found by one new read.

        Modules order their steps so all links are created before any address is added,
        which keeps this to one extra read however many links were created.
        """
        if name not in self._index:
            self._read_links()
        if name not in self._index:
            raise CommandError(f"netlink: link {name} does not exist")
        return self._index[name]

    # ---- links ----

    def add_link(self, name: str, kind: str, up: bool = True, **attributes: Any) -> None:
        """Create a link of `kind`, up unless asked otherwise (RequestError carries the kernel's errno)."""
        state = {"state": "up"} if up else {}
        self._call(f"add {kind} link {name}", "link", "add", ifname=name, kind=kind, **state, **attributes)

    def add_vxlan(self, name: str, vxlan: Vxlan, mtu: int, master: str | None = None,
                  address: str | None = None) -> None:
        """Create a VXLAN link already up, with its MTU (optionally bridge and MAC), in one request."""
        extra: dict[str, Any] = {}
        if master is not None:
            extra["master"] = self.index_of(master)
        if address is not None:
            extra["address"] = address
        if vxlan.remote is not None:  # without one (a mesh device), the FDB says where frames go
            extra["vxlan_group"] = str(vxlan.remote)
        self.add_link(name, "vxlan", vxlan_id=vxlan.vni, vxlan_local=_text(vxlan.local),
                      vxlan_port=vxlan.port, vxlan_learning=int(vxlan.learning), mtu=mtu, **extra)

    def add_bridge(self, name: str, mtu: int | None = None) -> None:
        self.add_link(name, "bridge", **({"mtu": mtu} if mtu else {}))

    def add_anchor(self, name: str, kind: str) -> str:
        """Create an up link that only holds local addresses; return the kind really used.

        A `dummy` is the right device; kernels without the dummy driver answer EOPNOTSUPP,
        and then a bridge with no ports serves instead (up, carrier on, local addresses work).
        """
        if kind == "dummy":
            try:
                self.add_link(name, "dummy")
                return "dummy"
            except RequestError as err:
                if err.code != errno.EOPNOTSUPP:
                    raise
        self.add_bridge(name)
        return "bridge"

    def set_link(self, name: str, mtu: int | None = None, master: str | None = None,
                 up: bool | None = None, address: str | None = None) -> None:
        changes: dict[str, Any] = {}
        if mtu is not None:
            changes["mtu"] = mtu
        if address is not None:
            changes["address"] = address
        if master is not None:
            changes["master"] = self.index_of(master)
        if up is not None:
            changes["state"] = "up" if up else "down"
        self._call(f"set link {name} {changes}", "link", "set", index=self.index_of(name), **changes)

    def delete_link(self, name: str) -> None:
        self._call(f"delete link {name}", "link", "del", index=self.index_of(name))
        self._index.pop(name, None)

    # ---- addresses ----

    def add_address(self, name: str, interface: IPInterface) -> None:
        self._call(f"add address {interface} to {name}", "addr", "add", index=self.index_of(name),
                   address=str(interface.ip), prefixlen=interface.network.prefixlen)

    def delete_address(self, name: str, interface: IPInterface) -> None:
        """Remove an address; one already gone (the kernel drops secondaries with their primary) is fine."""
        try:
            self._call(f"delete address {interface} from {name}", "addr", "del", index=self.index_of(name),
                       address=str(interface.ip), prefixlen=interface.network.prefixlen)
        except RequestError as err:
            if err.code != errno.EADDRNOTAVAIL:
                raise

    # ---- routes ----

    def replace_route(self, dst: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address | None = None,
                      device: str | None = None, proto: int | None = None, table: int = MAIN_TABLE,
                      scope: int | None = None, prefsrc: ipaddress.IPv4Address | None = None,
                      onlink: bool = False) -> None:
        """`ip route replace DST [via GW] [dev DEVICE] [onlink] [src SRC] [proto P] [table T] [scope S]`:
        idempotent, and errors are raised, not swallowed."""
        request: dict[str, Any] = {"dst": str(dst.network_address), "dst_len": dst.prefixlen, "table": table}
        if gateway is not None:
            request["gateway"] = str(gateway)
        if device is not None:
            request["oif"] = self.index_of(device)
        if proto is not None:
            request["proto"] = proto
        if scope is not None:
            request["scope"] = scope
        if prefsrc is not None:
            request["prefsrc"] = str(prefsrc)
        if onlink:
            request["flags"] = RTNH_F_ONLINK
        what = (f"replace route {dst}" + (f" via {gateway}" if gateway else "")
                + (f" dev {device}" if device else ""))
        self._call(what, "route", "replace", **request)

    def delete_route(self, route: Route) -> None:
        """Delete exactly this route: its table, protocol, device, gateway and metric must match."""
        request: dict[str, Any] = {"dst": str(route.dst.network_address), "dst_len": route.dst.prefixlen,
                                   "table": route.table, "proto": route.proto, "scope": SCOPE_NOWHERE}
        if route.gateway is not None:
            request["gateway"] = str(route.gateway)
        if route.oif is not None:
            request["oif"] = route.oif
        if route.priority:
            request["priority"] = route.priority
        self._call(f"delete route {route.dst}", "route", "del", **request)

    # ---- neighbours and forwarding database ----

    def _neighbour(self, command: str, device: str, dst: IPAddress, lladdr: str | None) -> None:
        request: dict[str, Any] = {"ifindex": self.index_of(device), "dst": str(dst), "state": NUD_PERMANENT}
        if lladdr is not None:
            request["lladdr"] = lladdr
        self._call(f"{command} neighbour {dst} dev {device}", "neigh", command, **request)

    def add_neighbour(self, device: str, dst: IPAddress, lladdr: str) -> None:
        """A static (permanent) neighbour entry; fails when one exists."""
        self._neighbour("add", device, dst, lladdr)

    def replace_neighbour(self, device: str, dst: IPAddress, lladdr: str) -> None:
        """`ip neigh replace DST lladdr MAC dev DEVICE nud permanent`."""
        self._neighbour("replace", device, dst, lladdr)

    def delete_neighbour(self, device: str, dst: IPAddress) -> None:
        self._neighbour("del", device, dst, None)

    def _fdb(self, command: str, device: str, lladdr: str, dst: IPAddress | None) -> None:
        # Explicit state and flags: pyroute2 0.7.2 fills them in for add/append/del only.
        request: dict[str, Any] = {"ifindex": self.index_of(device), "lladdr": lladdr,
                                   "state": NUD_PERMANENT | NUD_NOARP, "flags": NTF_SELF}
        if dst is not None:
            request["dst"] = str(dst)
        self._call(f"{command} fdb {lladdr} dev {device}" + (f" dst {dst}" if dst else ""),
                   "fdb", command, **request)

    def add_fdb(self, device: str, lladdr: str, dst: IPAddress, append: bool = False) -> None:
        """A permanent entry in the device's own table; `append` adds another remote for the same
        MAC (the all-zero MAC floods to every remote listed)."""
        self._fdb("append" if append else "add", device, lladdr, dst)

    def replace_fdb(self, device: str, lladdr: str, dst: IPAddress) -> None:
        self._fdb("replace", device, lladdr, dst)

    def delete_fdb(self, device: str, lladdr: str, dst: IPAddress | None = None) -> None:
        """Delete the entry for `lladdr` (with `dst`: only the one to that remote)."""
        self._fdb("del", device, lladdr, dst)


# ---- the modules' entry ----

class KernelManager(Protocol):
    def run(self) -> None: ...


def run_with_netlink(module: Any, manager: Callable[[Any, Netlink], KernelManager]) -> None:
    """Every kernel-touching module's entry: a clear failure without pyroute2, then the manager on
    one seam for the whole run, with InputError/CommandError reported by `guarded`."""
    missing = missing_pyroute2()
    if missing:
        module.fail_json(msg=missing)
    with Netlink() as nl:
        guarded(module, lambda: manager(module, nl).run())
