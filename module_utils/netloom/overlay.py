"""What the two KohakuRiver overlay modules (overlay_hub, overlay_runner) share.

Both take the same address-plan, VXLAN and firewalld options, run the same way (validate,
one read of the kernel seam, plan present or absent, `finish`), start through the seam's
`run_with_netlink`, and plan links and addresses with the helpers below.
"""
from __future__ import annotations

import ipaddress
import os
import platform
from abc import ABC, abstractmethod
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import ChangePlan, CommandError, InputError, finish, int_range
from ansible.module_utils.netloom.netlink import Link, Netlink, Snapshot, Vxlan
from ansible.module_utils.netloom.persist import plan_forget, plan_record

# Argument specs of the options both modules take, documented alike in each module.
OVERLAY_OPTIONS: dict[str, dict[str, Any]] = {
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "plan": {"type": "raw"},
    "vni_base": {"type": "int", "default": 100},
    "port": {"type": "int", "default": 4789},
    "underlay_ip": {"type": "str"},
    "mtu": {"type": "int"},
    "firewalld": {"type": "str", "choices": ["auto", "never"], "default": "auto"},
}


def overlay_options(*names: str) -> dict[str, dict[str, Any]]:
    """The shared options' specs in the order named.

    The order is the module's: Ansible checks options in argument_spec order and reports the
    first bad one, so each module keeps its own order.
    """
    return {name: OVERLAY_OPTIONS[name] for name in names}


class OverlayManager(ABC):
    """Validate, read links/addresses (and routes) once, plan every change, let `finish` run it."""

    # Whether planning needs the IPv4 route table in the snapshot (one more dump).
    dump_routes = False
    # The module's name and its place in the early boot replay (netloom-restore).
    module_name = ""
    restore_order = 0

    def __init__(self, module: AnsibleModule, nl: Netlink) -> None:
        self.module = module
        self.params = module.params
        self.nl = nl
        self.plan = ChangePlan()

    @abstractmethod
    def validate(self) -> None:
        """Everything that needs no live state, checked before anything is read."""

    @abstractmethod
    def plan_present(self, snapshot: Snapshot) -> dict[str, Any]:
        """Plan the converged state; returns the results only state=present reports."""

    @abstractmethod
    def plan_absent(self, snapshot: Snapshot) -> None:
        """Plan the removal of what the module owns."""

    @abstractmethod
    def always_returned(self) -> dict[str, Any]:
        """Results reported with either state."""

    def restore_params(self) -> dict[str, Any]:
        """The arguments netloom-restore replays at boot: by default this run's own."""
        return self.params

    def require_for_present(self, *names: str) -> None:
        """Options that state=absent may leave out and state=present needs."""
        for name in names:
            if self.params[name] in (None, ""):
                raise InputError(name, self.params[name], "is required with state=present")

    def run(self) -> None:
        self.validate()
        snapshot = self.nl.dump(routes=self.dump_routes)
        if self.params["state"] == "absent":
            self.plan_absent(snapshot)
            plan_forget(self.plan, self.module, self.module_name, "main", self.restore_order)
            finish(self.module, self.plan, **self.always_returned())
            return
        result = self.plan_present(snapshot)
        plan_record(self.plan, self.module, self.module_name, "main", self.restore_order, ["early"],
                    params=self.restore_params())
        finish(self.module, self.plan, **self.always_returned(), **result)


# ---- planning helpers shared by the overlay modules ----

ANCHOR_KINDS = ("dummy", "bridge")
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
MIN_MTU = 1280


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
                         owned: set[str], what: str = "the overlay") -> None:
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
        raise InputError(field_name, value, f"{what} {overlay} overlaps the route {route.dst}{via}{dev}"
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
               mtu: int, master: str | None = None, address: str | None = None) -> bool:
    """Converge one VXLAN link: create it, recreate it when its tunnel identity differs, else fix in place.

    VNI, local, remote, port and learning define the tunnel: a difference means a new link
    (the kernel cannot change all of them in place). MTU, master, MAC `address` and up are fixed
    in place. Returns True when the link is (re)created, i.e. starts without addresses (and,
    for the mesh device, without neighbours and FDB entries).
    """
    current = snapshot.link(name)
    desired: dict[str, Any] = {"kind": "vxlan", "mtu": mtu, "up": True, **want.describe()}
    before = describe_link(current, snapshot)
    if master is not None:
        desired["master"] = master
    if address is not None:
        desired["address"] = address
        if before is not None and current is not None:
            before["address"] = current.address
    if current is not None and current.kind != "vxlan":
        raise CommandError(f"link {name} exists as a {current.kind or 'physical'} link, not a VXLAN "
                           "link netloom made; remove or rename it first")
    if current is None or current.vxlan != want:
        def recreate() -> None:
            if current is not None:
                nl.delete_link(name)
            nl.add_vxlan(name, want, mtu, master, address)
        plan.add(f"link {name}", "create" if current is None else "update", before, desired, recreate)
        return True
    master_index = snapshot.links[master].index if master in snapshot.links else None
    fixes: dict[str, Any] = {}
    if current.mtu != mtu:
        fixes["mtu"] = mtu
    if master is not None and (master_index is None or current.master != master_index):
        fixes["master"] = master
    if address is not None and current.address != address:
        fixes["address"] = address
    if not current.up:
        fixes["up"] = True
    if fixes:
        plan.add(f"link {name}", "update", before, desired,
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
