#!/usr/bin/python
"""Ansible module overlay_hub: the KohakuRiver VXLAN hub (one L3 VXLAN link per runner)."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: overlay_hub
short_description: KohakuRiver VXLAN overlay hub (anchor address, one VXLAN link per runner)
description:
  - Converges the Host of a KohakuRiver hub-and-spoke VXLAN overlay in one call for ALL runners.
  - The address plan C(BASE/PREFIX/NODE_BITS/SUBNET_BITS) (seed C(10.0.0.0/8/8/16)) gives runner N
    the subnet C(BASE + (N << SUBNET_BITS)), its gateway C(+1) and the hub's address C(+254) on it.
  - Creates the anchor link I(anchor_name) holding the hub address C(BASE+1/PREFIX) (10.0.0.1/8),
    where workloads reach Host services. It is a C(dummy) link; on kernels without the dummy
    driver a bridge with no ports (up, carrier on) is used instead and a warning says so.
  - Creates one VXLAN link C(LINK_PREFIX + N) per runner (VNI I(vni_base)+N, local I(underlay_ip),
    remote = the runner's underlay IP, UDP I(port), learning off, I(mtu)) holding the hub address
    of that runner's subnet. The hub is pure L3 (no bridge); the kernel routes between runners.
    Its MAC is derived from the runner id (C(02:6b) + N as four bytes), so after a hub reboot
    the runners' neighbour entries for the hub address are still right.
  - A link whose VNI, local, remote, port or learning differ is recreated; MTU, MAC and up are
    fixed in place; stale IPv4 addresses on owned links are removed. Links of runners no longer
    declared are removed when I(purge) is true.
  - Runner ids - declared ids win; otherwise the id recorded in I(state_file) for the runner's name
    (or, for a renamed runner, its underlay IP); otherwise the id of an existing link whose remote
    is the runner's underlay IP (interfaces are the source of truth); otherwise the lowest free id.
    A runner is never renumbered - a declared id that would take another runner's id fails.
  - Sets C(net.ipv4.ip_forward=1) and, in the netloom-owned chain C(NETLOOM-OVLHUB-FWD) (jumped to
    from FORWARD, after Docker's C(DOCKER-USER) jump when there is one, so operators keep their
    override point), accepts forwarding of packets that come in on an overlay interface
    (C(LINK_PREFIX+) and the anchor) from the overlay CIDR, towards those interfaces replies
    (conntrack RELATED,ESTABLISHED), and drops anything else forwarded to them, so a neighbour that
    routes the overlay through the hub cannot open connections to workloads. Puts the VXLAN links
    into the firewalld C(trusted) zone (runtime and permanent, one firewall-cmd call per plane)
    when firewalld runs.
  - The plan must not touch 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/4 or 240.0.0.0/4
    (nor be the default route), underlay addresses must be unicast hosts outside the overlay, and
    the overlay must not overlap a route of this node that netloom does not own (routes through
    the anchor and the VXLAN links are its own); each refusal names the field, the value and
    the conflicting range or route.
  - The converged state is recorded for C(netloom-restore), which replays this module at boot
    (early, before Docker) so links, addresses, owned chains and ip_forward survive a reboot;
    C(state=absent) removes that record.
  - All input is validated, and live state (links, addresses, routes, iptables, the state file) read
    once, before anything changes. Check mode and diff come from the same change plan as the real run.
    A run that fails part-way reports C(changed), the steps done (C(changes)) and C(failed_step).
  - C(state=absent) removes every link named C(LINK_PREFIX + N) of kind vxlan, the anchor, the
    owned chain and its jump, their firewalld zone entries, the state file and the boot-restore
    record - nothing else.
    C(net.ipv4.ip_forward) is left as it is (other things may rely on it).
version_added: "0.1.0"
author: netloom
requirements:
  - pyroute2 (0.7.2 as in Debian 12, or newer) on the managed node
  - iptables (iptables-save, iptables-restore)
options:
  state:
    description: C(present) converges the hub; C(absent) removes what this module owns.
    type: str
    choices: [present, absent]
    default: present
  plan:
    description:
      - The address plan, C(BASE/PREFIX/NODE_BITS/SUBNET_BITS) (the three numbers sum to 32,
        SUBNET_BITS >= 2), or a dict with C(base), C(prefix), C(node_bits), C(subnet_bits)
        (C(base) may be a CIDR, then C(prefix) may be left out). Required with C(state=present).
    type: raw
  vni_base:
    description: VNI of runner N is I(vni_base)+N; it must stay within 1..16777215.
    type: int
    default: 100
  port:
    description: VXLAN UDP destination port.
    type: int
    default: 4789
  underlay_ip:
    description: The hub's underlay IPv4 address (VXLAN local); must be configured on this node.
    type: str
  mtu:
    description:
      - MTU of the VXLAN links. Default - the MTU of the underlay device holding I(underlay_ip)
        minus 50 (VXLAN overhead). An explicit value must be 1280..underlay MTU - 50.
    type: int
  anchor_name:
    description: Name of the anchor link holding C(BASE+1/PREFIX).
    type: str
    default: kohaku-host
  link_prefix:
    description: VXLAN links are named I(link_prefix) + runner id; the longest name must fit 15 characters.
    type: str
    default: vxkr
  runners:
    description: All runners of the overlay (one call converges them all).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description:
          - Runner name (its inventory hostname), unique; letters, digits and C(_.:@-), starting
            with a letter or digit.
        type: str
        required: true
      underlay_ip:
        description: The runner's underlay IPv4 address (VXLAN remote); unique.
        type: str
        required: true
      id:
        description: Runner id 1..2**NODE_BITS-1 (0 is the hub); resolved as described above when left out.
        type: int
  purge:
    description:
      - Remove the VXLAN links (and records) of runners that are not in I(runners).
      - C(false) lets a play add runners one call at a time; then ids of undeclared recorded
        runners and links stay reserved.
    type: bool
    default: true
  state_file:
    description: JSON file on the hub recording each runner's id (keyed by runner name, with its underlay IP).
    type: path
    default: /var/lib/netloom/overlay/runners.json
  firewalld:
    description:
      - C(auto) puts the VXLAN links in firewalld's trusted zone when firewalld runs.
      - C(never) leaves firewalld alone.
    type: str
    choices: [auto, never]
    default: auto
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
  - Deleting VXLAN links is the kernel's cost (about 20 ms each); creating them is fast.
"""

EXAMPLES = r"""
- name: Converge the hub for every runner of the inventory group
  overlay_hub:
    plan: 10.0.0.0/8/8/16
    underlay_ip: 192.0.2.1
    runners:
      - {name: runner1, underlay_ip: 192.0.2.11}
      - {name: runner2, underlay_ip: 192.0.2.12, id: 2}
  register: hub

- name: Show runner 1's subnet
  ansible.builtin.debug:
    msg: "{{ (hub.runners | selectattr('name', 'equalto', 'runner1') | first).subnet }}"

- name: Add runners one call at a time (a loop must not purge the others)
  overlay_hub:
    plan: {base: 10.128.0.0/12, node_bits: 6, subnet_bits: 14}
    underlay_ip: 192.0.2.1
    purge: false
    runners: [{name: "{{ item.name }}", underlay_ip: "{{ item.ip }}"}]
  loop: "{{ extra_runners }}"

- name: Remove the hub
  overlay_hub:
    state: absent
"""

RETURN = r"""
runners:
  description: The resolved runner table, ordered by id, for the runner plays.
  returned: state=present
  type: list
  elements: dict
  sample:
    - {name: runner1, id: 1, source: allocated, vni: 101, underlay_ip: 192.0.2.11, link: vxkr1,
       subnet: 10.1.0.0/16, gateway: 10.1.0.1, hub_address: 10.1.0.254,
       workloads: {first: 10.1.0.2, last: 10.1.255.254, count: 65532}}
anchor:
  description: The anchor link, its address and the link kind used (C(dummy), or C(bridge) as fallback).
  returned: always
  type: dict
  sample: {name: kohaku-host, kind: bridge, address: 10.0.0.1/8}
overlay:
  description: The overlay CIDR (BASE/PREFIX).
  returned: state=present
  type: str
  sample: 10.0.0.0/8
mtu:
  description: MTU of the VXLAN links.
  returned: state=present
  type: int
  sample: 1450
changes:
  description: One line per change made (or, in check mode, that would be made).
  returned: always
  type: list
  elements: str
  sample: ["create link vxkr1", "create addresses vxkr1"]
"""

import os
import re
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import CommandError, InputError, ifname, port
from ansible.module_utils.netloom.files import write_file
from ansible.module_utils.netloom.firewalld import plan_trusted_interfaces
from ansible.module_utils.netloom.iptables import OwnedChain, plan_chains
from ansible.module_utils.netloom.mesh import hub_link_mac
from ansible.module_utils.netloom.netlink import Link, Netlink, Snapshot, Vxlan, run_with_netlink
from ansible.module_utils.netloom.overlay import (
    ANCHOR_KINDS,
    OverlayManager,
    check_overlay_routes,
    check_vni_free,
    describe_link,
    dummy_supported,
    overlay_mtu,
    overlay_options,
    plan_addresses,
    plan_vxlan,
    underlay_link,
)
from ansible.module_utils.netloom.persist import RESTORE_OPTION
from ansible.module_utils.netloom.plan import (
    AddressPlan,
    ResolvedRunner,
    RunnerRecord,
    parse_runners,
    parse_state,
    render_state,
    resolve_runner_ids,
)
from ansible.module_utils.netloom.sysctl import plan_sysctls

HUB_CHAIN = "NETLOOM-OVLHUB-FWD"


class OverlayHub(OverlayManager):
    """Validate, read links/addresses/iptables/state file once, plan every change, let `finish` run it."""

    module_name = "overlay_hub"
    restore_order = 10

    dump_routes = True

    def __init__(self, module: AnsibleModule, nl: Netlink) -> None:
        super().__init__(module, nl)
        self.anchor: dict[str, Any] = {"name": self.params["anchor_name"]}
        self.kept_table: list[RunnerRecord] = []

    # ---- input ----

    def validate(self) -> None:
        """Everything that needs no live state, checked before anything is read."""
        params = self.params
        self.anchor_name = ifname("anchor_name", params["anchor_name"])
        prefix = str(params["link_prefix"])
        if not re.fullmatch(r"[A-Za-z_.-][A-Za-z0-9_.-]*", prefix) or prefix[-1].isdigit():
            raise InputError("link_prefix", prefix, "letters, digits and _.- not ending in a digit")
        self.link_prefix = prefix
        self.link_re = re.compile(rf"{re.escape(prefix)}([1-9][0-9]*)")
        if self.link_re.fullmatch(self.anchor_name):
            raise InputError("anchor_name", self.anchor_name, f"collides with the link names {prefix}N")
        if params["state"] == "absent":
            self.address_plan = (AddressPlan.from_value(params["plan"])
                                 if params["plan"] is not None else None)
            return
        self.require_for_present("plan", "underlay_ip")
        self.address_plan = AddressPlan.from_value(params["plan"])
        ifname("link_prefix", f"{prefix}{self.address_plan.max_runner_id}")
        self.port = port("port", params["port"])
        self.underlay_ip = self.address_plan.underlay_address("underlay_ip", params["underlay_ip"])
        if params["vni_base"] < 0:
            raise InputError("vni_base", params["vni_base"], "must not be negative")
        self.specs = parse_runners(self.address_plan, params["runners"])
        for position, spec in enumerate(self.specs):
            if spec.underlay_ip == self.underlay_ip:
                raise InputError(f"runners[{position}].underlay_ip", str(spec.underlay_ip),
                                 "is the hub's own underlay_ip")
            if spec.declared_id is not None:
                self.address_plan.runner_vni(params["vni_base"], spec.declared_id)

    def owned_links(self, snapshot: Snapshot) -> dict[int, Link]:
        """VXLAN links named LINK_PREFIX+N: the only links this module manages besides the anchor."""
        owned = {}
        for name, link in snapshot.links.items():
            match = self.link_re.fullmatch(name)
            if match and link.kind == "vxlan":
                owned[int(match.group(1))] = link
        return owned

    def read_records(self) -> tuple[str | None, list[RunnerRecord]]:
        path = self.params["state_file"]
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            return None, []
        except OSError as err:
            raise CommandError(f"cannot read state_file {path}: {err}") from None
        return text, parse_state(text, "state_file")

    # ---- planning ----

    def always_returned(self) -> dict[str, Any]:
        return {"anchor": self.anchor}

    def plan_present(self, snapshot: Snapshot) -> dict[str, Any]:
        params = self.params
        address_plan = self.address_plan
        underlay = underlay_link(snapshot, "underlay_ip", self.underlay_ip)
        mtu = overlay_mtu("mtu", params["mtu"], underlay)
        state_text, records = self.read_records()
        owned = self.owned_links(snapshot)
        self.check_anchor_is_ours(snapshot, underlay)
        check_overlay_routes(snapshot, "plan", params["plan"], address_plan.overlay,
                             {self.anchor_name, *(link.name for link in owned.values())})
        remotes = {rid: link.vxlan.remote for rid, link in owned.items()
                   if link.vxlan is not None and link.vxlan.remote is not None}
        foreign = {int(match.group(1)) for name, link in snapshot.links.items()
                   if link.kind != "vxlan" and (match := self.link_re.fullmatch(name))}
        resolved = sorted(resolve_runner_ids(address_plan, self.specs, records, remotes,
                                             keep_undeclared=not params["purge"], blocked=foreign),
                          key=lambda runner: runner.runner_id)
        vnis = {runner.runner_id: address_plan.runner_vni(params["vni_base"], runner.runner_id)
                for runner in resolved}
        position = {spec.name: index for index, spec in enumerate(self.specs)}
        for runner in resolved:
            name = f"{self.link_prefix}{runner.runner_id}"
            clash = snapshot.link(name)
            if clash is not None and clash.kind != "vxlan":
                raise InputError(f"runners[{position[runner.name]}]", runner.name,
                                 f"needs link {name} (id {runner.runner_id}, {runner.source}), which exists "
                                 f"as a {clash.kind or 'physical'} link netloom does not own")

        check_vni_free(snapshot, "vni_base", {vni: f"{self.link_prefix}{rid}" for rid, vni in vnis.items()},
                       self.port, {link.name for link in owned.values()})

        self.plan.extend(plan_sysctls({"net.ipv4.ip_forward": "1"}))
        anchor_fresh = self.plan_anchor(snapshot)
        wanted_ids = {runner.runner_id for runner in resolved}
        purged = sorted(rid for rid in owned if rid not in wanted_ids) if params["purge"] else []
        for rid in purged:
            self.plan_delete_link(snapshot, owned[rid])
        fresh: dict[int, bool] = {}
        for runner in resolved:
            want = Vxlan(vni=vnis[runner.runner_id], local=self.underlay_ip, remote=runner.underlay_ip,
                         port=self.port, learning=False)
            fresh[runner.runner_id] = plan_vxlan(self.plan, self.nl, snapshot,
                                                 f"{self.link_prefix}{runner.runner_id}", want, mtu,
                                                 address=hub_link_mac(runner.runner_id))
        # Addresses after all links exist: the new links' indexes are then learnt in one dump.
        plan_addresses(self.plan, self.nl, snapshot, self.anchor_name, [address_plan.hub_anchor],
                       fresh=anchor_fresh)
        for runner in resolved:
            plan_addresses(self.plan, self.nl, snapshot, f"{self.link_prefix}{runner.runner_id}",
                           [address_plan.runner(runner.runner_id).hub_interface],
                           fresh=fresh[runner.runner_id])
        overlay = str(address_plan.overlay)
        self.plan.extend(plan_chains([OwnedChain("filter", HUB_CHAIN, ("FORWARD",), self.forward_rules())]))
        if params["firewalld"] == "auto":
            links = [f"{self.link_prefix}{runner.runner_id}" for runner in resolved]
            self.plan.extend(plan_trusted_interfaces(links, "present"))
            if purged:
                self.plan.extend(plan_trusted_interfaces([owned[rid].name for rid in purged], "absent"))
        self.plan_state_file(state_text, records, resolved)
        return {"runners": [self.describe_runner(runner, vnis[runner.runner_id]) for runner in resolved],
                "overlay": overlay, "mtu": mtu}

    def forward_rules(self) -> tuple[str, ...]:
        """FORWARD accepts for the overlay's own interfaces only (the vxkrN links and the anchor).

        Anything from the overlay is forwarded; towards the overlay only replies, and the rest is
        dropped: a neighbour on the underlay that routes the overlay through this hub cannot open
        connections to workloads. The drop is the hub's own (a runner leaves it to Docker's
        FORWARD policy and published ports): the hub has no Docker, so its FORWARD policy is
        usually ACCEPT, and it serves workloads itself, never through FORWARD.
        """
        overlay = self.address_plan.overlay
        interfaces = (f"{self.link_prefix}+", self.anchor_name)
        return (*(f"-i {name} -s {overlay} -j ACCEPT" for name in interfaces),
                *(f"-o {name} -d {overlay} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
                  for name in interfaces),
                *(f"-o {name} -j DROP" for name in interfaces))

    def check_anchor_is_ours(self, snapshot: Snapshot, underlay: Link) -> None:
        """Refuse, before any change, an anchor_name that is the underlay or holds foreign addresses."""
        if underlay.name == self.anchor_name or self.link_re.fullmatch(underlay.name):
            field = "anchor_name" if underlay.name == self.anchor_name else "link_prefix"
            raise InputError(field, self.params[field],
                             f"{underlay.name} holds underlay_ip {self.underlay_ip}: netloom would take the "
                             "node's underlay over")
        foreign = [str(interface) for interface in snapshot.addresses_of(self.anchor_name)
                   if interface.ip not in self.address_plan.overlay]
        if foreign:
            raise InputError("anchor_name", self.anchor_name,
                             f"exists with addresses outside the overlay ({', '.join(foreign)}): not "
                             "netloom's anchor; pick another anchor_name")

    def plan_anchor(self, snapshot: Snapshot) -> bool:
        """Create the anchor, or keep an existing dummy/portless bridge up; True when it is new."""
        name = self.anchor_name
        current = snapshot.link(name)
        self.anchor["address"] = str(self.address_plan.hub_anchor)
        if current is None:
            kind = "dummy" if dummy_supported() else "bridge"
            self.anchor["kind"] = kind
            if kind == "bridge":
                self.warn_bridge_anchor()

            def create() -> None:
                used = self.nl.add_anchor(name, kind)
                if used != self.anchor["kind"]:
                    self.anchor["kind"] = used
                    self.warn_bridge_anchor()
            self.plan.add(f"link {name}", "create", None, {"kind": kind, "up": True}, create)
            return True
        if current.kind not in ANCHOR_KINDS or snapshot.ports_of(name):
            raise CommandError(f"anchor_name {name} exists as a {current.kind or 'physical'} link"
                               f"{' with ports' if snapshot.ports_of(name) else ''}; netloom's anchor is a "
                               "dummy (or a bridge with no ports): pick another anchor_name or remove it")
        self.anchor["kind"] = current.kind
        if not current.up:
            self.plan.add(f"link {name}", "update", describe_link(current, snapshot),
                          {"kind": current.kind, "up": True}, lambda: self.nl.set_link(name, up=True))
        return False

    def warn_bridge_anchor(self) -> None:
        self.module.warn(f"this kernel has no dummy link driver: the anchor {self.anchor_name} is a "
                         "bridge with no ports instead (up, holds the hub address; no traffic is bridged)")

    def plan_delete_link(self, snapshot: Snapshot, link: Link) -> None:
        self.plan.add(f"link {link.name}", "delete", describe_link(link, snapshot), None,
                      lambda: self.nl.delete_link(link.name))

    def restore_params(self) -> dict[str, Any]:
        """What netloom-restore replays: with purge=false, every runner this hub keeps.

        One call per runner (purge=false) declares only that runner, while the node holds them
        all; the record therefore lists the whole kept table with its ids, so the replay at boot
        brings back every link, and the next identical call finds the record unchanged.
        """
        if self.params["purge"]:
            return self.params
        table = [{"name": record.name, "underlay_ip": str(record.underlay_ip), "id": record.runner_id}
                 for record in sorted(self.kept_table, key=lambda record: record.runner_id)]
        return {**self.params, "runners": table}

    def plan_state_file(self, state_text: str | None, records: list[RunnerRecord],
                        resolved: list[ResolvedRunner]) -> None:
        path = self.params["state_file"]
        kept: list[RunnerRecord] = []
        if not self.params["purge"]:
            names = {runner.name for runner in resolved}
            ips = {runner.underlay_ip for runner in resolved}
            kept = [record for record in records
                    if record.name not in names and record.underlay_ip not in ips]
        desired = kept + [RunnerRecord(runner.name, runner.runner_id, runner.underlay_ip)
                          for runner in resolved]
        self.kept_table = desired
        content = render_state(desired)
        if content == state_text:
            return

        self.plan.add(f"file {path}", "update" if state_text is not None else "create",
                      state_text, content, lambda: write_file(self.module, path, content))

    def describe_runner(self, runner: ResolvedRunner, vni: int) -> dict[str, Any]:
        addressing = self.address_plan.runner(runner.runner_id)
        return {
            "name": runner.name, "id": runner.runner_id, "source": runner.source, "vni": vni,
            "underlay_ip": str(runner.underlay_ip), "link": f"{self.link_prefix}{runner.runner_id}",
            "subnet": str(addressing.subnet), "gateway": str(addressing.gateway),
            "hub_address": str(addressing.hub_address),
            "workloads": {"first": str(addressing.first_workload), "last": str(addressing.last_workload),
                          "count": addressing.workload_count},
        }

    def plan_absent(self, snapshot: Snapshot) -> None:
        owned = self.owned_links(snapshot)
        for rid in sorted(owned):
            self.plan_delete_link(snapshot, owned[rid])
        anchor = snapshot.link(self.anchor_name)
        if anchor is not None:
            self.anchor["kind"] = anchor.kind
            if anchor.kind in ANCHOR_KINDS and not snapshot.ports_of(self.anchor_name):
                self.plan_delete_link(snapshot, anchor)
            else:
                self.module.warn(f"{self.anchor_name} is a {anchor.kind or 'physical'} link with ports or "
                                 "of a foreign kind, not netloom's anchor: left alone")
        # Removing a chain needs its name only; its rules do not matter.
        self.plan.extend(plan_chains([OwnedChain("filter", HUB_CHAIN, ("FORWARD",), ())], "absent"))
        if self.params["firewalld"] == "auto" and owned:
            self.plan.extend(plan_trusted_interfaces([owned[rid].name for rid in sorted(owned)], "absent"))
        state_text, _ = self.read_records()
        if state_text is not None:
            path = self.params["state_file"]
            self.plan.add(f"file {path}", "delete", state_text, None, lambda: os.unlink(path))


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **RESTORE_OPTION,  # the netloom-restore units, rendered by the action plugin
            **overlay_options("state", "plan", "vni_base", "port", "underlay_ip", "mtu"),
            "anchor_name": {"type": "str", "default": "kohaku-host"},
            "link_prefix": {"type": "str", "default": "vxkr"},
            "runners": {"type": "list", "elements": "dict", "default": [], "options": {
                "name": {"type": "str", "required": True},
                "underlay_ip": {"type": "str", "required": True},
                "id": {"type": "int"},
            }},
            "purge": {"type": "bool", "default": True},
            "state_file": {"type": "path", "default": "/var/lib/netloom/overlay/runners.json"},
            **overlay_options("firewalld"),
        },
        supports_check_mode=True,
    )
    run_with_netlink(module, OverlayHub)


if __name__ == "__main__":
    main()
