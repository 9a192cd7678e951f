#!/usr/bin/python
"""Ansible module overlay_runner: a KohakuRiver runner's side of the VXLAN overlay."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: overlay_runner
short_description: KohakuRiver VXLAN overlay on a runner (bridge, vxlan0, route to the hub, NAT)
description:
  - Converges Runner N of a KohakuRiver hub-and-spoke VXLAN overlay. N comes from the hub play
    (the C(runners) table returned by C(overlay_hub)); it is required here.
  - "Bridge I(bridge_name) (C(kohaku-overlay)) with the gateway address of runner N's subnet
    (C(offset+1/(PREFIX+NODE_BITS)), e.g. 10.1.0.1/16) and I(mtu), up; other IPv4 addresses on
    it are removed. Docker later attaches its network to this bridge (bridge name option), so
    the bridge is never deleted or recreated once it exists: MTU and addresses are fixed in place."
  - "I(vxlan_name) (C(vxlan0)): VNI I(vni_base)+N, remote I(hub_underlay_ip), local I(underlay_ip),
    UDP I(port), learning off, I(mtu), enslaved to the bridge, up. A vxlan0 whose VNI, remote,
    local, port or learning differ is recreated (the bridge and its other ports stay)."
  - Route to the overlay CIDR via the hub's address on this subnet (C(offset+254)) on the bridge,
    set with route replace; a failure fails the module.
  - C(net.ipv4.ip_forward=1); netloom-owned chains C(NETLOOM-OVLRUN-FWD) (FORWARD, after Docker's
    C(DOCKER-USER) jump so operators keep their override point - accepts packets coming in on the
    bridge or vxlan0 from the overlay, and towards them only replies, so a neighbour that routes the
    overlay via this runner reaches no unpublished container port) and C(NETLOOM-OVLRUN-NAT)
    (POSTROUTING MASQUERADE from the overlay to anything outside it, leaving through a
    non-overlay interface); the bridge and vxlan0 in firewalld's trusted zone (runtime and
    permanent, one firewall-cmd call per plane) when firewalld runs.
  - Refused before any change - a plan touching 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/4,
    240.0.0.0/4 or the default route; underlay addresses that are not unicast hosts or lie inside
    the overlay; an overlay overlapping a route netloom does not own on this node (its own are the
    routes through the bridge and vxlan0); a I(bridge_name) or I(vxlan_name) that is the underlay
    interface, and a bridge with addresses outside the overlay or ports other than vxlan0 and veths.
  - The converged state is recorded for C(netloom-restore), which replays this module at boot
    (early, before Docker) so the bridge, vxlan0, the address, the route, the chains and ip_forward
    survive a reboot; C(state=absent) removes that record. A run that fails part-way reports
    C(changed), the steps done (C(changes)) and C(failed_step).
  - "Direct mode (I(overlay_mode=direct)): runner-to-runner traffic skips the hub. One more VXLAN
    link I(mesh_name) (VNI I(mesh_vni), local I(underlay_ip), no remote, learning off, MAC
    C(02:6e) + the runner id as 4 bytes, I(mtu), up, not on the bridge). For every other runner M in
    I(mesh_peers) - a route to M's subnet via M's gateway address on the mesh link (onlink, source
    this runner's gateway, proto 250), a permanent neighbour entry for that address with M's MAC and
    a permanent FDB entry sending M's MAC to M's underlay IP. Routes, IPv4 neighbours and FDB entries
    on the mesh link that no declared peer needs are removed. vxlan0 and the route to the hub stay, so
    the hub anchor and hub-mode runners are still reached through the hub (a cluster can move runner
    by runner; the hub's routes are the same for both kinds)."
  - "In direct mode the mesh link is an overlay interface of C(NETLOOM-OVLRUN-FWD) and of firewalld's
    trusted zone, and netloom-owned C(NETLOOM-OVLRUN-IN) (INPUT) accepts UDP I(port) to any local address
    only from the hub and the declared peers (a VXLAN link decapsulates whatever arrives with its
    VNI, so an undeclared underlay host could otherwise inject frames). Hub mode removes the mesh
    link and that chain."
  - Links this module does not own (Docker's veths on the bridge, anything else) are never touched.
  - C(state=absent) removes vxlan0, the chains and their jumps and the firewalld entries, and the
    bridge when nothing else is attached to it. A bridge that still has other ports (a Docker
    network) is left in place, with a warning, and only the overlay route is removed from it.
version_added: "0.1.0"
author: netloom
requirements:
  - pyroute2 (0.7.2 as in Debian 12, or newer) on the managed node
  - iptables (iptables-save, iptables-restore)
options:
  state:
    description: C(present) converges the runner; C(absent) removes what this module owns.
    type: str
    choices: [present, absent]
    default: present
  plan:
    description:
      - The address plan, C(BASE/PREFIX/NODE_BITS/SUBNET_BITS) or a dict with C(base), C(prefix),
        C(node_bits), C(subnet_bits); the same as the hub's. Required with C(state=present).
    type: raw
  runner_id:
    description: This runner's id, 1..2**NODE_BITS-1, as resolved by the hub. Required with C(state=present).
    type: int
  hub_underlay_ip:
    description: The hub's underlay IPv4 address (VXLAN remote). Required with C(state=present).
    type: str
  underlay_ip:
    description: This runner's underlay IPv4 address (VXLAN local); must be configured on this node.
    type: str
  vni_base:
    description: VNI of this runner is I(vni_base)+I(runner_id), within 1..16777215.
    type: int
    default: 100
  port:
    description: VXLAN UDP destination port.
    type: int
    default: 4789
  mtu:
    description:
      - MTU of vxlan0 and the bridge. Default - the underlay device's MTU minus 50.
        An explicit value must be 1280..underlay MTU - 50.
    type: int
  vxlan_name:
    description: Name of the VXLAN link to the hub.
    type: str
    default: vxlan0
  bridge_name:
    description: Name of the overlay bridge (Docker's network attaches to it by this name).
    type: str
    default: kohaku-overlay
  firewalld:
    description:
      - C(auto) puts the bridge and vxlan0 in firewalld's trusted zone when firewalld runs.
      - C(never) leaves firewalld alone.
    type: str
    choices: [auto, never]
    default: auto
  overlay_mode:
    description:
      - C(hub) - everything goes through the hub (KohakuRiver's hub and spokes).
      - C(direct) - also a mesh VXLAN link straight to the other direct-mode runners (I(mesh_peers)).
    type: str
    choices: [hub, direct]
    default: hub
  mesh_name:
    description:
      - Name of the mesh VXLAN link (direct mode); removed by name in hub mode and with C(state=absent).
    type: str
    default: kohaku-mesh
  mesh_vni:
    description:
      - VNI of the mesh link, 1..16777215; it must not be a hub VNI of the plan
        (I(vni_base)..I(vni_base)+2**NODE_BITS-1).
    type: int
    default: 1
  mesh_peers:
    description:
      - The direct-mode runners, the whole set (the same list on every runner; this runner may be
        in it, with its own underlay IP). Required with I(overlay_mode=direct).
      - Ids and underlay IPs must be unique and an underlay IP may not be the hub's.
    type: list
    elements: dict
    suboptions:
      id:
        description: The runner's id (from the hub's table); needed.
        type: int
      underlay_ip:
        description: The runner's underlay IPv4 address (its VXLAN endpoint); needed.
        type: str
      name:
        description: The runner's name, for the returned peer table.
        type: str
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
  - Supports check mode and diff mode.
"""

EXAMPLES = r"""
- name: Runner 1 in direct mode, meshed with runners 1..3 (all in direct mode)
  overlay_runner:
    plan: 10.0.0.0/8/8/16
    runner_id: 1
    hub_underlay_ip: 192.0.2.1
    underlay_ip: 192.0.2.11
    overlay_mode: direct
    mesh_peers:
      - {id: 1, underlay_ip: 192.0.2.11, name: runner1}
      - {id: 2, underlay_ip: 192.0.2.12, name: runner2}
      - {id: 3, underlay_ip: 192.0.2.13, name: runner3}

- name: Converge runner 1 of the seed plan
  overlay_runner:
    plan: 10.0.0.0/8/8/16
    runner_id: 1
    hub_underlay_ip: 192.0.2.1
    underlay_ip: 192.0.2.11
  register: overlay

- name: Use the hub's resolved table
  overlay_runner:
    plan: "{{ netloom_overlay_plan }}"
    runner_id: "{{ (hostvars[hub].overlay_hub_runners | selectattr('name', 'equalto', inventory_hostname)
                    | first).id }}"
    hub_underlay_ip: "{{ hostvars[hub].netloom_underlay_ip }}"
    underlay_ip: "{{ netloom_underlay_ip }}"

- name: Remove the runner's overlay (after the Docker network on the bridge is removed)
  overlay_runner:
    plan: 10.0.0.0/8/8/16
    state: absent
"""

RETURN = r"""
runner:
  description: This runner's addressing.
  returned: state=present
  type: dict
  sample: {id: 1, vni: 101, subnet: 10.1.0.0/16, gateway: 10.1.0.1, hub_address: 10.1.0.254,
           workloads: {first: 10.1.0.2, last: 10.1.255.254, count: 65532}}
overlay:
  description: The overlay CIDR routed to the hub.
  returned: state=present
  type: str
  sample: 10.0.0.0/8
mtu:
  description: MTU of vxlan0 and the bridge (for the Docker network on the bridge).
  returned: state=present
  type: int
  sample: 1450
bridge:
  description: Name of the overlay bridge.
  returned: always
  type: str
  sample: kohaku-overlay
vxlan:
  description: Name of the VXLAN link.
  returned: always
  type: str
  sample: vxlan0
overlay_mode:
  description: The mode converged (C(hub) or C(direct)).
  returned: always
  type: str
  sample: direct
mesh:
  description: Direct mode - the mesh link and the peer table (None in hub mode).
  returned: state=present
  type: dict
  sample: {device: kohaku-mesh, vni: 1, mac: "02:6e:00:00:00:01", vtep: 10.1.0.1,
           peers: [{id: 2, name: runner2, underlay_ip: 192.0.2.12, subnet: 10.2.0.0/16, vtep: 10.2.0.1,
                    mac: "02:6e:00:00:00:02"}]}
changes:
  description: One line per change made (or, in check mode, that would be made).
  returned: always
  type: list
  elements: str
  sample: ["create link kohaku-overlay", "create link vxlan0", "create route 10.0.0.0/8"]
"""

import ipaddress
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import InputError, ifname, port
from ansible.module_utils.netloom.firewalld import plan_trusted_interfaces
from ansible.module_utils.netloom.iptables import OwnedChain, plan_chains
from ansible.module_utils.netloom.mesh import MeshEntries, MeshPeer, check_mesh_vni, parse_peers, vtep_mac
from ansible.module_utils.netloom.netlink import Link, Snapshot, Vxlan, run_with_netlink
from ansible.module_utils.netloom.overlay import (
    OverlayManager,
    check_overlay_routes,
    check_vni_free,
    describe_link,
    overlay_mtu,
    overlay_options,
    plan_addresses,
    plan_vxlan,
    underlay_link,
)
from ansible.module_utils.netloom.persist import RESTORE_OPTION
from ansible.module_utils.netloom.plan import AddressPlan
from ansible.module_utils.netloom.qemu import TAP_PREFIX as VM_TAP_PREFIX
from ansible.module_utils.netloom.sysctl import plan_sysctls

FORWARD_CHAIN = "NETLOOM-OVLRUN-FWD"
NAT_CHAIN = "NETLOOM-OVLRUN-NAT"
INPUT_CHAIN = "NETLOOM-OVLRUN-IN"


def vxlan_input_chain(underlay_ip: str | None, port: int, senders: list[str]) -> OwnedChain:
    """Direct mode: VXLAN to this runner only from the hub and the declared peers.

    A VXLAN device decapsulates whatever arrives on its port with its VNI, whoever sent it; with
    a mesh, any host on the underlay could inject frames into the overlay as a peer. The kernel's
    VXLAN socket listens on every local address, not only the underlay IP, so the match is the
    UDP port to any local address (INPUT sees only those): every other sender is dropped before
    decapsulation. Without `underlay_ip` (hub mode, absent) the chain is not wanted.
    """
    rules: tuple[str, ...] = ()
    if underlay_ip is not None:
        match = f"-p udp -m udp --dport {port}"
        rules = (*(f"-s {sender}/32 {match} -j RETURN" for sender in senders), f"{match} -j DROP")
    return OwnedChain("filter", INPUT_CHAIN, ("INPUT",), rules)


def owned_chains(overlay: str | None, bridge: str, vxlan: str, mesh: str | None = None) -> list[OwnedChain]:
    """The runner's chains; without a plan (absent) their rules do not matter.

    FORWARD accepts what comes in on the overlay interfaces from the overlay, and towards them
    only replies; a connection to a published port (DNATed by Docker) returns to Docker's own
    rules; anything else forwarded into the bridge is dropped. So a neighbour on the underlay
    that routes the overlay via this runner reaches no unpublished container port, whatever
    Docker's FORWARD policy is (it is ACCEPT when ip_forward was already 1 as Docker started,
    which the boot replay makes the normal case). vxlan0 is a port of the bridge, so routed
    traffic shows the bridge; vxlan0 is listed for the moments it is not enslaved. MASQUERADE
    covers overlay traffic leaving through a non-overlay interface. In direct mode the `mesh`
    device is an overlay interface too (traffic from the direct peers comes in on it).
    """
    forward: tuple[str, ...] = ()
    nat: tuple[str, ...] = ()
    if overlay is not None:
        overlay_links = (bridge, vxlan) if mesh is None else (bridge, vxlan, mesh)
        forward = (*(f"-i {name} -s {overlay} -j ACCEPT" for name in overlay_links),
                   *(f"-o {name} -d {overlay} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
                     for name in overlay_links),
                   f"-o {bridge} -m conntrack --ctstate DNAT -j RETURN",
                   f"-o {bridge} -j DROP")
        nat = (f"-s {overlay} ! -d {overlay} ! -o {bridge} -j MASQUERADE",)
    return [OwnedChain("filter", FORWARD_CHAIN, ("FORWARD",), forward),
            OwnedChain("nat", NAT_CHAIN, ("POSTROUTING",), nat)]


class OverlayRunner(OverlayManager):
    """Validate, read links/addresses/routes/iptables once, plan every change, let `finish` run it."""

    module_name = "overlay_runner"
    restore_order = 20

    dump_routes = True

    def validate(self) -> None:
        """Everything that needs no live state, checked before anything is read."""
        params = self.params
        self.bridge = ifname("bridge_name", params["bridge_name"])
        self.vxlan = ifname("vxlan_name", params["vxlan_name"])
        if self.bridge == self.vxlan:
            raise InputError("vxlan_name", self.vxlan, "must differ from bridge_name")
        self.mesh = ifname("mesh_name", params["mesh_name"])
        if self.mesh in (self.bridge, self.vxlan):
            raise InputError("mesh_name", self.mesh, "must differ from bridge_name and vxlan_name")
        self.direct = params["overlay_mode"] == "direct"
        self.address_plan = AddressPlan.from_value(params["plan"]) if params["plan"] is not None else None
        if params["state"] == "absent":
            return
        self.require_for_present("plan", "runner_id", "hub_underlay_ip", "underlay_ip")
        address_plan = AddressPlan.from_value(params["plan"])
        self.runner_id = address_plan.check_runner_id("runner_id", params["runner_id"])
        self.addressing = address_plan.runner(self.runner_id)
        self.overlay = address_plan.overlay
        self.vni = address_plan.runner_vni(params["vni_base"], self.runner_id)
        self.port = port("port", params["port"])
        self.hub_ip = address_plan.underlay_address("hub_underlay_ip", params["hub_underlay_ip"])
        self.underlay_ip = address_plan.underlay_address("underlay_ip", params["underlay_ip"])
        if self.hub_ip == self.underlay_ip:
            raise InputError("hub_underlay_ip", str(self.hub_ip), "is this runner's own underlay_ip")
        self.peers: list[MeshPeer] = []
        if self.direct:
            self.mesh_vni = check_mesh_vni("mesh_vni", params["mesh_vni"], address_plan, params["vni_base"])
            if params["mesh_peers"] is None:
                raise InputError("mesh_peers", None, "is required with overlay_mode=direct (the direct-mode "
                                                     "runners, this one included or not)")
            self.peers = parse_peers("mesh_peers", params["mesh_peers"], address_plan, self.runner_id,
                                     self.underlay_ip, self.hub_ip)

    def always_returned(self) -> dict[str, Any]:
        return {"bridge": self.bridge, "vxlan": self.vxlan, "overlay_mode": self.params["overlay_mode"]}

    def plan_present(self, snapshot: Snapshot) -> dict[str, Any]:
        addressing = self.addressing
        overlay = self.overlay
        underlay = underlay_link(snapshot, "underlay_ip", self.underlay_ip)
        mtu = overlay_mtu("mtu", self.params["mtu"], underlay)
        self.check_links_are_ours(snapshot, underlay)
        bridge = snapshot.link(self.bridge)
        if bridge is not None and bridge.kind != "bridge":
            raise InputError("bridge_name", self.bridge, f"exists as a {bridge.kind or 'physical'} link, "
                                                         "not a bridge; netloom will not replace a link it "
                                                         "does not own")
        owned = {self.bridge, self.vxlan, self.mesh}
        check_overlay_routes(snapshot, "plan", self.params["plan"], overlay, owned)

        check_vni_free(snapshot, "vni_base", {self.vni: self.vxlan}, self.port, owned)
        if self.direct:
            check_vni_free(snapshot, "mesh_vni", {self.mesh_vni: self.mesh}, self.port, owned)

        self.plan.extend(plan_sysctls({"net.ipv4.ip_forward": "1"}))
        desired_bridge = {"kind": "bridge", "mtu": mtu, "up": True}
        if bridge is None:
            self.plan.add(f"link {self.bridge}", "create", None, desired_bridge,
                          lambda: self.nl.add_bridge(self.bridge, mtu))
        else:
            fixes: dict[str, Any] = {}
            if bridge.mtu != mtu:
                fixes["mtu"] = mtu
            if not bridge.up:
                fixes["up"] = True
            if fixes:
                self.plan.add(f"link {self.bridge}", "update", describe_link(bridge, snapshot),
                              desired_bridge, lambda: self.nl.set_link(self.bridge, **fixes))
        want = Vxlan(vni=self.vni, local=self.underlay_ip, remote=self.hub_ip, port=self.port, learning=False)
        plan_vxlan(self.plan, self.nl, snapshot, self.vxlan, want, mtu, master=self.bridge)
        removed = plan_addresses(self.plan, self.nl, snapshot, self.bridge, [addressing.gateway_interface],
                                 fresh=bridge is None)
        self.plan_route(snapshot, overlay, addressing.hub_address,
                        rebuilt=any(addressing.hub_address in interface.network for interface in removed))
        mesh = self.plan_mesh(snapshot, mtu) if self.direct else self.plan_mesh_absent(snapshot)
        overlay_links = [self.bridge, self.vxlan, self.mesh] if self.direct else [self.bridge, self.vxlan]
        senders = [str(self.hub_ip), *(str(peer.underlay_ip) for peer in self.peers)]
        self.plan.extend(plan_chains(owned_chains(str(overlay), self.bridge, self.vxlan,
                                                  self.mesh if self.direct else None)))
        input_chain = vxlan_input_chain(str(self.underlay_ip), self.port, senders)
        self.plan.extend(plan_chains([input_chain], "present" if self.direct else "absent"))
        if self.params["firewalld"] == "auto":
            self.plan.extend(plan_trusted_interfaces(overlay_links, "present"))
            if not self.direct:
                self.plan.extend(plan_trusted_interfaces([self.mesh], "absent"))
        return {
            "mesh": mesh,
            "runner": {
                "id": self.runner_id, "vni": self.vni, "subnet": str(addressing.subnet),
                "gateway": str(addressing.gateway), "hub_address": str(addressing.hub_address),
                "workloads": {"first": str(addressing.first_workload),
                              "last": str(addressing.last_workload), "count": addressing.workload_count},
            },
            "overlay": str(overlay), "mtu": mtu,
        }

    def plan_mesh(self, snapshot: Snapshot, mtu: int) -> dict[str, Any]:
        """The mesh device and, per other direct-mode runner, its route, neighbour and FDB entry.

        Returns the peer table (what the play shows as the mesh).
        """
        current = snapshot.link(self.mesh)
        if current is not None and current.kind != "vxlan":
            raise InputError("mesh_name", self.mesh, f"exists as a {current.kind or 'physical'} link, not a "
                                                     "VXLAN link netloom made; pick another mesh_name")
        mac = vtep_mac(self.runner_id)
        want = Vxlan(vni=self.mesh_vni, local=self.underlay_ip, remote=None, port=self.port, learning=False)
        fresh = plan_vxlan(self.plan, self.nl, snapshot, self.mesh, want, mtu, address=mac)
        new_mac = current is not None and current.address != mac
        entries = MeshEntries(self.plan, self.nl, snapshot, self.mesh, self.addressing.gateway, fresh,
                              new_mac)
        entries.converge(self.peers)
        return {"device": self.mesh, "vni": self.mesh_vni, "mac": mac, "vtep": str(self.addressing.gateway),
                "peers": [peer.describe() for peer in self.peers]}

    def plan_mesh_absent(self, snapshot: Snapshot) -> None:
        """Hub mode: a mesh device left from direct mode goes (its routes, neighbours, FDB with it)."""
        current = snapshot.link(self.mesh)
        if current is None:
            return
        if current.kind != "vxlan":
            self.module.warn(f"{self.mesh} is a {current.kind or 'physical'} link, not netloom's mesh "
                             "VXLAN link: left alone")
            return
        self.plan.add(f"link {self.mesh}", "delete", describe_link(current, snapshot), None,
                      lambda: self.nl.delete_link(self.mesh))

    def check_links_are_ours(self, snapshot: Snapshot, underlay: Link) -> None:
        """Refuse, before any change, a bridge_name or vxlan_name that names someone else's link.

        The bridge is netloom's (or Docker's network on it) when it holds no address outside
        the overlay and its ports are vxlan_name, veths (containers) and qemu_vm's TAPs
        (nlvm-NAME); the underlay's own
        interface, or a bridge with a NIC or foreign addresses, would be taken over.
        """
        named = (("bridge_name", self.bridge), ("vxlan_name", self.vxlan), ("mesh_name", self.mesh))
        for field, name in named:
            if name == underlay.name:
                raise InputError(field, name, f"is the interface holding underlay_ip {self.underlay_ip}: "
                                              "netloom would take the node's underlay over")
        foreign = [str(interface) for interface in snapshot.addresses_of(self.bridge)
                   if interface.ip not in self.overlay]
        ports = [f"{port.name} ({port.kind or 'physical'})" for port in snapshot.ports_of(self.bridge)
                 if port.name != self.vxlan and port.kind != "veth"
                 and not (port.kind == "tun" and port.name.startswith(VM_TAP_PREFIX))]
        if foreign or ports:
            what = [f"addresses outside the overlay: {', '.join(foreign)}"] if foreign else []
            what += [f"ports netloom does not own: {', '.join(ports)}"] if ports else []
            raise InputError("bridge_name", self.bridge, f"exists with {'; '.join(what)}: not the overlay "
                                                         "bridge; pick another bridge_name")
        vxlan = snapshot.link(self.vxlan)
        if vxlan is not None and vxlan.kind != "vxlan":
            raise InputError("vxlan_name", self.vxlan, f"exists as a {vxlan.kind or 'physical'} link, not a "
                                                       "VXLAN link netloom made; pick another vxlan_name")

    def plan_route(self, snapshot: Snapshot, overlay: ipaddress.IPv4Network,
                   hub_address: ipaddress.IPv4Address, rebuilt: bool) -> None:
        """Overlay CIDR via the hub's address on the bridge, metric 0, by route replace.

        `rebuilt`: an earlier step removes the address the route's gateway is reached through,
        and the kernel drops the route with it, so the route is set again after it.
        """
        bridge = snapshot.link(self.bridge)
        bridge_index = bridge.index if bridge else None
        current = [route for route in snapshot.routes_to(overlay) if route.priority == 0]
        matches = [route for route in current if route.gateway == hub_address and route.oif == bridge_index]
        if matches and not rebuilt:
            return
        before = [f"{route.dst} via {route.gateway} oif {route.oif}" for route in current] or None
        self.plan.add(f"route {overlay}", "update" if current else "create", before,
                      f"{overlay} via {hub_address} dev {self.bridge}",
                      lambda: self.nl.replace_route(overlay, hub_address, self.bridge))

    def plan_absent(self, snapshot: Snapshot) -> None:
        self.plan_mesh_absent(snapshot)
        vxlan = snapshot.link(self.vxlan)
        if vxlan is not None:
            if vxlan.kind == "vxlan":
                self.plan.add(f"link {self.vxlan}", "delete", describe_link(vxlan, snapshot), None,
                              lambda: self.nl.delete_link(self.vxlan))
            else:
                self.module.warn(f"{self.vxlan} is a {vxlan.kind or 'physical'} link, not netloom's VXLAN "
                                 "link: left alone")
        bridge = snapshot.link(self.bridge)
        if bridge is not None and bridge.kind == "bridge":
            others = [member.name for member in snapshot.ports_of(self.bridge) if member.name != self.vxlan]
            if not others:
                self.plan.add(f"link {self.bridge}", "delete", describe_link(bridge, snapshot), None,
                              lambda: self.nl.delete_link(self.bridge))
            else:
                self.module.warn(f"{self.bridge} still has ports ({', '.join(others)}), e.g. a Docker "
                                 "network: the bridge is kept; remove that network first to remove it")
                if self.address_plan is not None:
                    overlay = self.address_plan.overlay
                    for route in snapshot.routes_to(overlay):
                        if route.oif == bridge.index:
                            self.plan.add(f"route {overlay}", "delete", f"{overlay} via {route.gateway}",
                                          None, lambda route=route: self.nl.delete_route(route))
        elif bridge is not None:
            self.module.warn(f"{self.bridge} is a {bridge.kind or 'physical'} link, not a bridge: left alone")
        self.plan.extend(plan_chains([*owned_chains(None, self.bridge, self.vxlan),
                                      vxlan_input_chain(None, 0, [])], "absent"))
        if self.params["firewalld"] == "auto":
            self.plan.extend(plan_trusted_interfaces([self.bridge, self.vxlan, self.mesh], "absent"))


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **RESTORE_OPTION,  # the netloom-restore units, rendered by the action plugin
            **overlay_options("state", "plan"),
            "runner_id": {"type": "int"},
            "hub_underlay_ip": {"type": "str"},
            **overlay_options("underlay_ip", "vni_base", "port", "mtu"),
            "vxlan_name": {"type": "str", "default": "vxlan0"},
            "bridge_name": {"type": "str", "default": "kohaku-overlay"},
            **overlay_options("firewalld"),
            "overlay_mode": {"type": "str", "choices": ["hub", "direct"], "default": "hub"},
            "mesh_name": {"type": "str", "default": "kohaku-mesh"},
            "mesh_vni": {"type": "int", "default": 1},
            "mesh_peers": {"type": "list", "elements": "dict", "options": {
                # Required, but checked by parse_peers, whose failures name the entry and the value.
                "id": {"type": "int"},
                "underlay_ip": {"type": "str"},
                "name": {"type": "str"}}},
        },
        supports_check_mode=True,
    )
    run_with_netlink(module, OverlayRunner)


if __name__ == "__main__":
    main()
