#!/usr/bin/python
"""Ansible module wireguard_routes: kernel routes for a WireGuard interface's safe AllowedIPs."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: wireguard_routes
short_description: Route the safe AllowedIPs of a WireGuard interface, and only those
description:
  - The ESB gateway's route correction as a converging module. It reads every AllowedIPs
    CIDR from the live interface (C(wg show NAME allowed-ips), so comments or blank lines in
    a config file cannot confuse it), filters each one, and installs C(replace) routes
    C(dev NAME) for the accepted ones.
  - "Refused: IPv6, 0.0.0.0/0, anything inside 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16,
    224.0.0.0/4 or 240.0.0.0/4 (so 0.0.0.0/32 and 255.255.255.255/32), and everything else
    that is not accepted. Accepted: RFC1918 subnets and host routes, and /32 host routes of
    addresses listed in I(allow). Every verdict comes with a reason in the result."
  - Installed routes carry routing protocol 250 (C(proto 250)). A route is this module's for
    the interface only when it is in the main table, has protocol 250 and leaves through the
    interface (C(dev) match); so two WireGuard interfaces never remove each other's routes.
    Routes via I(via_host) leave through the underlay, so they are claimed only inside
    I(via_host_cidr) by a run that declares I(via_host), or whose last recorded run did (so they
    are removed once I(via_host) is dropped). The module removes its routes no longer wanted
    and never touches any other route.
  - The kernel's connected route of the interface's own prefix (C(proto kernel scope link src))
    is left alone. AllowedIPs or I(extra_routes) equal to such a prefix, to a prefix connected on
    another interface, or to a prefix netloom routes for another interface are reported in
    C(skipped) with the reason and not written.
  - Reboot survival. The module records its arguments for netloom-restore (late phase, after
    C(wg-quick@NAME.service)), so the filtered routes come back at boot with no Ansible run.
    wireguard_interface writes its wg-quick config with C(Table = off), so wg-quick itself installs
    no route. I(state=absent) removes the owned routes and the record.
  - Check mode on a node where the interface does not exist yet (a never-converged node, where
    wireguard_interface would create it) succeeds. It reports C(pending), a pending step for the
    routes of the AllowedIPs (there are none live to read yet; the real run after the interface
    task installs them, so C(changed) is true), the I(extra_routes) and the record. A real run on
    a missing interface fails naming I(interface).
  - I(via_host) sends the accepted CIDRs inside I(via_host_cidr) (the workers' 10.88.0.0/16)
    through that host instead of the tunnel, like the seed's GATEWAY_WORKER_ROUTE_VIA_HOST.
  - I(extra_routes) declares further routes through the interface that are not AllowedIPs of
    any peer, such as the compute side's route to the control network (10.99.0.0/24); they
    pass the same filter, and one it refuses fails the task.
options:
  interface:
    description: The WireGuard interface.
    type: str
    default: wg0
  state:
    description: C(absent) removes every route this module owns for the interface.
    type: str
    choices: [present, absent]
    default: present
  allow:
    description: Public IPv4 addresses whose /32 host routes are accepted.
    type: list
    elements: str
    default: []
  extra_routes:
    description: Further IPv4 CIDRs to route through the interface.
    type: list
    elements: str
    default: []
  via_host:
    description:
      - Host name or IPv4 address. Accepted CIDRs inside I(via_host_cidr) are routed via it
        (resolved on the node; the task fails when it does not resolve).
    type: str
  via_host_cidr:
    description: The range that I(via_host) takes over.
    type: str
    default: 10.88.0.0/16
  rendered:
    description:
      - Set by netloom's action plugin of this module, not by hand. The netloom-restore units
        rendered on the controller from C(templates/systemd/netloom-restore-*.service.j2); they
        are recorded with the other arguments, so the boot replay writes the same units.
        Without the plugin the module fails naming this option.
    type: dict
    suboptions:
      restore_early:
        description: C(netloom-restore-early.service), with the node-side slots unfilled.
        type: str
      restore_late:
        description: C(netloom-restore-late.service), with the node-side slots unfilled.
        type: str
notes:
  - Supports check mode and diff mode from the same change plan as the real run.
  - I(interface) must be a WireGuard interface (kernel C(wireguard) or a wireguard-go C(tun)
    that C(wg) can read); any other link fails naming I(interface) and its value.
  - Needs C(wg) (wireguard-tools) and pyroute2 on the node.
author:
  - netloom
"""

EXAMPLES = r"""
- name: Gateway - route what the peers announce, worker subnets via the runtime node
  wireguard_routes:
    interface: wg0
    via_host: "{{ gateway_worker_route_via_host | default(omit) }}"
  register: wg_routes

- name: Show what was refused and why
  ansible.builtin.debug:
    var: wg_routes.refused

- name: Compute side - reach the control network through the tunnel
  wireguard_routes:
    interface: wg0
    extra_routes: [10.99.0.0/24]

- name: Remove the routes this module installed
  wireguard_routes:
    interface: wg0
    state: absent
"""

RETURN = r"""
accepted:
  description: Accepted CIDRs with the reason and where each is routed (C(dev) or C(via)).
  returned: when state is present
  type: list
  elements: dict
  sample: [{"cidr": "10.88.1.0/24", "reason": "RFC1918 subnet", "dev": "wg0"}]
refused:
  description: Refused AllowedIPs with the reason; nothing is routed for them.
  returned: when state is present
  type: list
  elements: dict
  sample: [{"cidr": "169.254.0.0/16", "reason": "inside 169.254.0.0/16 (link-local)"}]
skipped:
  description: Accepted CIDRs that are not routed because the route is not this module's to write.
  returned: when state is present
  type: list
  elements: dict
  sample: [{"cidr": "10.99.0.0/24", "reason": "connected prefix of wg0: the kernel's route (proto kernel,
            with src) is kept and already leads into the interface"}]
pending:
  description: Set in check mode when the interface does not exist yet; routes follow its creation.
  returned: in check mode when the interface does not exist
  type: str
installed:
  description: CIDRs whose route was (or in check mode would be) added or replaced.
  returned: always
  type: list
  elements: str
removed:
  description: CIDRs whose route owned by this module was (or would be) removed.
  returned: always
  type: list
  elements: str
via:
  description: The address I(via_host) resolved to, or null.
  returned: always
  type: str
changes:
  description: The steps taken (or that would be taken in check mode).
  returned: always
  type: list
  elements: str
"""

import contextlib
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import (
    ChangePlan,
    CommandError,
    InputError,
    finish,
    ifname,
    ipv4_address,
    ipv4_network,
    not_a_host_reason,
)
from ansible.module_utils.netloom.constants import (
    MAIN_TABLE,
    NETLOOM_ROUTE_PROTO,
    RTPROT_KERNEL,
    SCOPE_LINK,
    SCOPE_UNIVERSE,
)
from ansible.module_utils.netloom.netlink import Link, Netlink, Snapshot, run_with_netlink
from ansible.module_utils.netloom.netlink import Route as KernelRoute
from ansible.module_utils.netloom.persist import RESTORE_OPTION, plan_forget, plan_record, recorded_args
from ansible.module_utils.netloom.wgroutes import Verdict, classify, forbidden_reason
from ansible.module_utils.netloom.wireguard import WgTool, network_sort_key

MODULE_NAME = "wireguard_routes"
# Replayed in the late phase of netloom-restore, after wg-quick has brought the interface back.
RESTORE_ORDER = 40

ARGUMENT_SPEC: dict[str, Any] = {
    "interface": {"type": "str", "default": "wg0"},
    "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
    "allow": {"type": "list", "elements": "str", "default": []},
    "extra_routes": {"type": "list", "elements": "str", "default": []},
    "via_host": {"type": "str"},
    "via_host_cidr": {"type": "str", "default": "10.88.0.0/16"},
    **RESTORE_OPTION,  # the netloom-restore units, rendered by the action plugin
}


@dataclass(frozen=True)
class Route:
    """A main-table IPv4 route reduced to what this module compares: where it goes, who set it."""

    network: ipaddress.IPv4Network
    oif: int | None
    gateway: str | None
    proto: int

    def view(self, ifname_of: dict[int | None, str]) -> dict[str, Any]:
        """The route for diffs; ifname_of[None] names the interface a pending route will use."""
        shown: dict[str, Any] = {"cidr": str(self.network)}
        if self.gateway:
            shown["via"] = self.gateway
        if self.oif is not None or not self.gateway:
            shown["dev"] = ifname_of.get(self.oif, self.oif)
        shown["proto"] = self.proto
        return shown


def resolve_ipv4(field_name: str, host: str) -> str:
    """An IPv4 literal as is, a name through the node's resolver (as getent hosts would).

    The result must be a unicast host: a route via 0.0.0.0, 127.0.0.1 or a multicast address
    would fail in the kernel, or worse, succeed.
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET)
        except socket.gaierror as err:
            raise InputError(field_name, host, f"does not resolve to an IPv4 address on this node "
                                               f"({err.strerror})") from None
        address = ipaddress.IPv4Address(infos[0][4][0])
    reason = not_a_host_reason(address)
    if reason:
        raise InputError(field_name, host, f"cannot be a next hop: {address} is {reason}")
    return str(address)


class WireguardRoutes:
    """Plans and applies the routes for one interface from its live AllowedIPs."""

    def __init__(self, module: AnsibleModule, nl: Netlink) -> None:
        self.module = module
        self.nl = nl
        params = module.params
        self.name = ifname("interface", params["interface"])
        self.state = params["state"]
        self.allow = [self._allowed_host(f"allow[{i}]", item) for i, item in enumerate(params["allow"])]
        self.extra = [self._extra_route(f"extra_routes[{i}]", item)
                      for i, item in enumerate(params["extra_routes"])]
        self.via_cidr = ipv4_network("via_host_cidr", params["via_host_cidr"])
        self.via = resolve_ipv4("via_host", params["via_host"]) if params["via_host"] else None
        self.via_ranges = self._via_ranges()
        self.wg = WgTool()

    @staticmethod
    def _allowed_host(field_name: str, value: Any) -> ipaddress.IPv4Address:
        text = str(value).strip()
        address = ipv4_address(field_name, text[:-3] if text.endswith("/32") else text)
        reason = forbidden_reason(ipaddress.IPv4Network(address))
        if reason:
            raise InputError(field_name, value, f"can never be routed: {reason}")
        return address

    def _extra_route(self, field_name: str, value: Any) -> str:
        verdict = classify(str(value), self.allow)
        if not verdict.accepted:
            raise InputError(field_name, value, f"refused: {verdict.reason}")
        return str(verdict.network)

    def _via_ranges(self) -> list[ipaddress.IPv4Network]:
        """Ranges whose proto-250 via routes are this interface's: this run's and the last recorded run's.

        A via route leaves through the underlay, not this interface, so only the run that
        declared via_host (now or in the run recorded for this interface) may claim it; an
        interface that never declared via_host never deletes another's via routes.
        """
        ranges = [self.via_cidr] if self.via else []
        recorded = recorded_args(MODULE_NAME, self.name, RESTORE_ORDER) or {}
        if recorded.get("via_host"):
            with contextlib.suppress(ValueError):  # an entry this module did not write claims nothing
                ranges.append(ipaddress.IPv4Network(str(recorded.get("via_host_cidr"))))
        return ranges

    # ---- live state ----

    @staticmethod
    def read_routes(snapshot: Snapshot) -> dict[ipaddress.IPv4Network, Route]:
        """Main-table IPv4 routes with metric 0, the slot `ip route replace CIDR dev IF` writes."""
        return {route.dst: Route(route.dst, route.oif, str(route.gateway) if route.gateway else None,
                                 route.proto) for route in snapshot.routes if route.priority == 0}

    def connected(self, snapshot: Snapshot) -> set[ipaddress.IPv4Network]:
        """Prefixes of the interface's own IPv4 addresses: the kernel routes them (proto kernel, src)."""
        return {interface.network for interface in snapshot.addresses_of(self.name)
                if interface.network.prefixlen < 32}

    def owned(self, route: Route, index: int | None) -> bool:
        """Ours: netloom's protocol in the main table, and through this interface (or a claimed via range)."""
        if route.proto != NETLOOM_ROUTE_PROTO:
            return False
        if index is not None and route.oif == index:
            return True
        return route.gateway is not None and any(route.network.subnet_of(cidr) for cidr in self.via_ranges)

    def require_wireguard(self, link: Link) -> None:
        """A clear failure naming `interface` when it is not a WireGuard interface `wg` can read."""
        if link.kind not in ("wireguard", "tun"):
            raise InputError("interface", self.name,
                             f"is a {link.kind or 'plain'} link, not a WireGuard interface")
        if link.kind == "tun":
            try:
                self.wg.allowed_ips(self.name)
            except CommandError:
                raise InputError("interface", self.name, "is a tun link that `wg` cannot read: not a "
                                 "WireGuard interface, or its wireguard-go process is gone") from None

    # ---- plan ----

    def desired(self, verdicts: list[Verdict], index: int | None) -> dict[ipaddress.IPv4Network, Route]:
        wanted: dict[ipaddress.IPv4Network, Route] = {}
        networks = [verdict.network for verdict in verdicts if verdict.network is not None]
        networks += [ipaddress.IPv4Network(cidr) for cidr in self.extra]
        for network in networks:
            if self.via and network.subnet_of(self.via_cidr):
                wanted[network] = Route(network, None, self.via, NETLOOM_ROUTE_PROTO)
            else:
                wanted[network] = Route(network, index, None, NETLOOM_ROUTE_PROTO)
        return dict(sorted(wanted.items()))

    def skip_reason(self, network: ipaddress.IPv4Network, live: Route | None, index: int,
                    connected: set[ipaddress.IPv4Network], names: dict[int | None, str]) -> str | None:
        """Why a wanted route must not be written: it would take over a route that is not ours."""
        if network in connected:
            return (f"connected prefix of {self.name}: the kernel's route (proto kernel, with src) "
                    "is kept and already leads into the interface")
        if live is None:
            return None
        if live.proto == RTPROT_KERNEL:
            return f"connected on {names.get(live.oif, live.oif)}: the kernel's route is kept"
        if live.proto == NETLOOM_ROUTE_PROTO and not self.owned(live, index):
            where = f"via {live.gateway}" if live.gateway else f"through {names.get(live.oif, live.oif)}"
            return f"routed {where} by netloom for another interface: its route is left alone"
        return None

    @staticmethod
    def matches(wanted: Route, live: Route | None) -> bool:
        if live is None or live.proto != wanted.proto:
            return False
        if wanted.gateway:
            return live.gateway == wanted.gateway
        return live.gateway is None and live.oif == wanted.oif

    def _replace(self, route: Route) -> None:
        """`ip route replace CIDR (via GW | dev IF scope link) proto 250` in the main table."""
        if route.gateway:
            self.nl.replace_route(route.network, ipaddress.IPv4Address(route.gateway), proto=route.proto,
                                  table=MAIN_TABLE, scope=SCOPE_UNIVERSE)
        else:
            self.nl.replace_route(route.network, device=self.name, proto=route.proto, table=MAIN_TABLE,
                                  scope=SCOPE_LINK)

    def _delete(self, route: Route) -> None:
        """Matches on table, protocol, device and gateway, in any scope (as `ip route del`)."""
        self.nl.delete_route(KernelRoute(route.network, ipaddress.IPv4Address(route.gateway) if route.gateway
                                         else None, route.oif, proto=route.proto, table=MAIN_TABLE))

    def _target(self, route: Route) -> dict[str, str]:
        return {"via": route.gateway} if route.gateway else {"dev": self.name}

    def filter_allowed_ips(self, index: int) -> tuple[list[Verdict], dict[ipaddress.IPv4Network, Route]]:
        """Verdicts for the live AllowedIPs and the routes wanted for them and for extra_routes."""
        cidrs = sorted(set(self.wg.allowed_ips(self.name)), key=network_sort_key)
        verdicts = [classify(cidr, self.allow) for cidr in cidrs]
        return verdicts, self.desired(verdicts, index)

    def plan_pending(self, plan: ChangePlan, result: dict[str, Any]) -> dict[ipaddress.IPv4Network, Route]:
        """Check mode before wireguard_interface made the interface (a never-converged node).

        There are no live AllowedIPs to read yet. The real run, after the interface task, installs
        a route for each accepted AllowedIPs entry, so the plan shows that pending step (changed)
        plus the extra_routes, which are known now; nothing is applied in check mode.
        """
        pending = f"{self.name} does not exist yet: its AllowedIPs are read and routed once it is created"
        result["pending"] = pending
        result["accepted"] = [{"cidr": cidr, "reason": "declared in extra_routes", "dev": self.name}
                              for cidr in self.extra]
        result["refused"], result["skipped"] = [], []
        plan.add(f"routes for the AllowedIPs of {self.name}", "create", None, {"pending": pending})
        return self.desired([], None)

    def run(self) -> None:
        plan = ChangePlan()
        snapshot = self.nl.dump(routes=True)
        link = snapshot.link(self.name)
        index = link.index if link is not None else None
        names: dict[int | None, str] = {**snapshot.names(), None: self.name}
        live = self.read_routes(snapshot)
        result: dict[str, Any] = {"interface": self.name, "via": self.via}
        wanted: dict[ipaddress.IPv4Network, Route] = {}
        skipped: dict[ipaddress.IPv4Network, str] = {}
        if self.state == "present" and link is None:
            if not self.module.check_mode:
                raise InputError("interface", self.name,
                                 "does not exist: converge it with wireguard_interface first "
                                 "(at boot wg-quick creates it before the routes are replayed)")
            wanted = self.plan_pending(plan, result)
        elif self.state == "present":
            if index is None:  # set by validation for every state=present run
                raise AssertionError("index is missing")
            self.require_wireguard(link)
            if not link.up:
                raise CommandError(f"interface {self.name} is down; routes through it cannot be installed")
            verdicts, wanted = self.filter_allowed_ips(index)
            connected = self.connected(snapshot)
            for network in list(wanted):
                reason = self.skip_reason(network, live.get(network), index, connected, names)
                if reason:
                    skipped[network] = reason
                    del wanted[network]
            accepted = [{**verdict.as_dict(), **self._target(wanted[verdict.network])}
                        for verdict in verdicts if verdict.network in wanted]
            listed = {entry["cidr"] for entry in accepted}
            accepted += [{"cidr": cidr, "reason": "declared in extra_routes",
                          **self._target(wanted[ipaddress.IPv4Network(cidr)])}
                         for cidr in self.extra
                         if cidr not in listed and ipaddress.IPv4Network(cidr) in wanted]
            result["accepted"] = accepted
            result["refused"] = [verdict.as_dict() for verdict in verdicts if verdict.network is None]
            result["skipped"] = [{"cidr": str(network), "reason": reason}
                                 for network, reason in skipped.items()]
        installed, removed = [], []
        for network, route in wanted.items():
            current = live.get(network)
            if self.matches(route, current):
                continue
            plan.add(f"route {network}", "update" if current else "create",
                     current.view(names) if current else None, route.view(names),
                     lambda route=route: self._replace(route))
            installed.append(str(network))
        for network, route in live.items():
            if network not in wanted and network not in skipped and self.owned(route, index):
                plan.add(f"route {network}", "delete", route.view(names), None,
                         lambda route=route: self._delete(route))
                removed.append(str(network))
        if self.state == "present":
            plan_record(plan, self.module, MODULE_NAME, self.name, RESTORE_ORDER, ["late"],
                        after=[f"wg-quick@{self.name}.service"])
        else:
            plan_forget(plan, self.module, MODULE_NAME, self.name, RESTORE_ORDER)
        finish(self.module, plan, installed=installed, removed=removed, **result)


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run_with_netlink(module, WireguardRoutes)


if __name__ == "__main__":
    main()
