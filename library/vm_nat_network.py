#!/usr/bin/python
"""Ansible module vm_nat_network: the NAT bridge of KohakuRiver's standard (non-overlay) VM mode."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vm_nat_network
short_description: The NAT bridge VMs join in standard mode (10.200.0.1/24, MASQUERADE)
description:
  - KohakuRiver's standard mode puts a runner's VMs on a local bridge instead of the overlay. This
    module converges that bridge as one whole state; C(qemu_vm) with C(network=nat) attaches the
    VMs' TAPs to it and takes their addresses from its own address book on the runner.
  - The bridge I(name) (created when missing, never a link of another kind) holds exactly the
    gateway address, the first host of I(subnet); C(net.ipv4.ip_forward) is 1.
  - "Two chains netloom owns: C(NETLOOM-VMNAT) (table nat, from POSTROUTING) masquerades what
    leaves the subnet through any other interface; C(NETLOOM-VMNAT-FWD) (filter, from FORWARD,
    after Docker's DOCKER-USER jump) accepts what the VMs send and only replies towards them, and
    drops anything else forwarded into the bridge. Rules netloom did not write are never touched."
  - The subnet may not overlap a route this module does not own. On a runner with the overlay,
    10.0.0.0/8 goes to the hub, so the default subnet is refused there naming that route; standard
    mode is for runners without the overlay (or give a subnet outside the overlay plan).
  - A bridge of that name is renumbered only when netloom's record says this module made it and no
    VM's TAP is on it; C(state=absent) deletes it only then too. A bridge of that name that netloom
    has no record of making and that holds other addresses, or ports other than VM TAPs, fails,
    naming I(name).
  - Each real run records itself for netloom-restore's early boot phase (before the VMs' units
    start), so the bridge and chains come back after a reboot with no Ansible run.
    C(state=absent) removes the chains and the record, and the bridge when no TAP is left on it.
  - Check mode reports exactly what the real run would change, on a node never converged too;
    diff mode shows before and after.
version_added: "0.1.0"
author: netloom
requirements:
  - netloom's action plugins on the controller (the restore units are rendered there)
  - pyroute2, iptables on the node
options:
  name:
    description: The bridge's name.
    type: str
    default: netloom-vmnat
  subnet:
    description: The VMs' subnet; the bridge holds its first host as their gateway.
    type: str
    default: 10.200.0.0/24
  state:
    description: C(present) or C(absent).
    type: str
    choices: [present, absent]
    default: present
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
  - Run it before C(qemu_vm) with C(network=nat); the C(runner_vms) role does.
"""

EXAMPLES = r"""
- name: The NAT bridge for standard-mode VMs
  vm_nat_network:

- name: Another subnet
  vm_nat_network:
    subnet: 10.201.0.0/24

- name: Remove it (after its VMs)
  vm_nat_network:
    state: absent
"""

RETURN = r"""
bridge:
  description: The bridge's name.
  returned: always
  type: str
  sample: netloom-vmnat
gateway:
  description: The bridge's address, the VMs' gateway, with its prefix.
  returned: state=present
  type: str
  sample: 10.200.0.1/24
changes:
  description: What was changed (or would be, in check mode).
  returned: always
  type: list
  elements: str
  sample: ["create link netloom-vmnat", "create address 10.200.0.1/24 on netloom-vmnat"]
"""

import ipaddress
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import InputError, ifname, ipv4_network
from ansible.module_utils.netloom.iptables import OwnedChain, plan_chains
from ansible.module_utils.netloom.netlink import Snapshot, run_with_netlink
from ansible.module_utils.netloom.overlay import (
    OverlayManager,
    check_overlay_routes,
    describe_link,
    plan_addresses,
)
from ansible.module_utils.netloom.persist import RESTORE_OPTION, recorded_args
from ansible.module_utils.netloom.qemu import TAP_PREFIX as VM_TAP_PREFIX
from ansible.module_utils.netloom.sysctl import plan_sysctls

NAT_CHAIN = "NETLOOM-VMNAT"
FORWARD_CHAIN = "NETLOOM-VMNAT-FWD"


def nat_chains(subnet: str | None, bridge: str) -> list[OwnedChain]:
    """MASQUERADE out of the subnet, and forwarding only from the VMs and back to them."""
    forward: tuple[str, ...] = ()
    nat: tuple[str, ...] = ()
    if subnet is not None:
        forward = (f"-i {bridge} -s {subnet} -j ACCEPT",
                   f"-o {bridge} -d {subnet} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                   f"-o {bridge} -j DROP")
        nat = (f"-s {subnet} ! -d {subnet} ! -o {bridge} -j MASQUERADE",)
    return [OwnedChain("filter", FORWARD_CHAIN, ("FORWARD",), forward),
            OwnedChain("nat", NAT_CHAIN, ("POSTROUTING",), nat)]


class VmNatNetwork(OverlayManager):
    """Validate, read the links once, plan the bridge, address, sysctl and chains."""

    module_name = "vm_nat_network"
    restore_order = 25  # after the overlay (20), before dnat_rules (30)
    dump_routes = True

    def validate(self) -> None:
        self.bridge = ifname("name", self.params["name"])
        self.subnet = ipv4_network("subnet", self.params["subnet"])
        if self.subnet.prefixlen > 29:
            raise InputError("subnet", self.params["subnet"], "must hold a gateway and VMs (at most /29)")
        if not self.subnet.is_private:
            raise InputError("subnet", self.params["subnet"], "must be a private range: masqueraded VMs only")
        self.gateway = ipaddress.IPv4Interface(f"{self.subnet.network_address + 1}/{self.subnet.prefixlen}")

    def always_returned(self) -> dict[str, Any]:
        return {"bridge": self.bridge}

    def plan_present(self, snapshot: Snapshot) -> dict[str, Any]:
        bridge = snapshot.link(self.bridge)
        if bridge is not None and bridge.kind != "bridge":
            raise InputError("name", self.bridge, f"exists as a {bridge.kind or 'physical'} link, not a "
                                                  "bridge; netloom will not replace a link it does not own")
        # On a runner with the overlay, 10.0.0.0/8 goes to the hub: the default 10.200.0.0/24 is
        # then refused here, naming that route (standard mode is for runners without the overlay).
        check_overlay_routes(snapshot, "subnet", self.params["subnet"], self.subnet, {self.bridge},
                             what="the NAT subnet")
        stale = [interface for interface in snapshot.addresses_of(self.bridge) if interface != self.gateway]
        ports = [member.name for member in snapshot.ports_of(self.bridge)]
        foreign_ports = [member.name for member in snapshot.ports_of(self.bridge)
                         if not (member.kind == "tun" and member.name.startswith(VM_TAP_PREFIX))]
        if (stale or foreign_ports) and not self.owns_bridge():
            held = [*map(str, stale), *(f"port {name}" for name in foreign_ports)]
            raise InputError("name", self.bridge,
                             f"exists with {', '.join(held)} and netloom has no record of making "
                             "it: not netloom's NAT bridge; pick another name")
        if stale and ports:
            raise InputError("subnet", self.params["subnet"],
                             f"{self.bridge} holds {', '.join(map(str, stale))} and has ports "
                             f"({', '.join(ports)}): delete its VMs before renumbering it")
        self.plan.extend(plan_sysctls({"net.ipv4.ip_forward": "1"}))
        if bridge is None:
            self.plan.add(f"link {self.bridge}", "create", None, {"kind": "bridge", "up": True},
                          lambda: self.nl.add_bridge(self.bridge))
        elif not bridge.up:
            self.plan.add(f"link {self.bridge}", "update", describe_link(bridge, snapshot),
                          {"kind": "bridge", "up": True}, lambda: self.nl.set_link(self.bridge, up=True))
        plan_addresses(self.plan, self.nl, snapshot, self.bridge, [self.gateway], fresh=bridge is None)
        self.plan.extend(plan_chains(nat_chains(str(self.subnet), self.bridge)))
        return {"gateway": str(self.gateway)}

    def owns_bridge(self) -> bool:
        """Whether netloom's boot record says this module made a bridge of this name."""
        recorded = recorded_args(self.module_name, "main", self.restore_order)
        return recorded is not None and recorded.get("name") == self.bridge

    def plan_absent(self, snapshot: Snapshot) -> None:
        bridge = snapshot.link(self.bridge)
        # Ours: recorded, or holding exactly the gateway this module gives it (a bridge kept for its
        # VMs' TAPs by an earlier absent run, whose record went with that run).
        looks_ours = snapshot.addresses_of(self.bridge) == [self.gateway]
        if bridge is not None and not (self.owns_bridge() or looks_ours):
            self.module.warn(f"{self.bridge}: netloom has no record of making it: left alone")
        elif bridge is not None and bridge.kind == "bridge":
            ports = [member.name for member in snapshot.ports_of(self.bridge)]
            if ports:
                self.module.warn(f"{self.bridge} still has ports ({', '.join(ports)}), VMs' TAPs: the bridge "
                                 "is kept; delete those VMs first to remove it")
            else:
                self.plan.add(f"link {self.bridge}", "delete", describe_link(bridge, snapshot), None,
                              lambda: self.nl.delete_link(self.bridge))
        elif bridge is not None:
            self.module.warn(f"{self.bridge} is a {bridge.kind or 'physical'} link, not a bridge: left alone")
        self.plan.extend(plan_chains(nat_chains(None, self.bridge), "absent"))


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **RESTORE_OPTION,
            "name": {"type": "str", "default": "netloom-vmnat"},
            "subnet": {"type": "str", "default": "10.200.0.0/24"},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
        },
        supports_check_mode=True,
    )
    run_with_netlink(module, VmNatNetwork)


if __name__ == "__main__":
    main()
