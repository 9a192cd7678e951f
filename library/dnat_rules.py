#!/usr/bin/python
"""Ansible module dnat_rules: Edge Serverless Box DNAT from the CNI gateway to the local proxy."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: dnat_rules
short_description: DNAT of a node's gateway ports to local or backend addresses (Edge Serverless Box)
description:
  - "Converges a node's complete DNAT set in one call. The seed's rules (Edge Serverless Box
    runtime node) are I(gateway_ip):9000 to I(s3_ip):9000, I(gateway_ip):I(db_dport) to
    I(db_ip):I(db_port) and I(gateway_ip):9428 to I(vl_ip):9428, TCP; I(rules) adds any others.
    An empty target (C('')) means no rule for that service."
  - "All rules live in the netloom-owned nat chain C(NETLOOM-DNAT), hooked into PREROUTING
    (traffic from workers on the CNI bridge) and, with I(apply_output), OUTPUT (traffic of the
    node's own network namespace). Each rule is
    C(-d GW/32 -p tcp -m tcp --dport PORT -m comment --comment netloom-dnat:NAME -j DNAT
    --to-destination IP:PORT). The chain is rewritten atomically (one iptables-restore) whenever
    it differs, so a changed target replaces the old rule and a removed one disappears; hand-made
    changes inside the chain are drift and are repaired. Jumps are tagged C(netloom:NETLOOM-DNAT)
    and inserted at the top of PREROUTING/OUTPUT only when missing; other rules (Docker's
    C(DOCKER) chains included) are never touched."
  - "DNAT to 127.0.0.0/8 needs C(route_localnet=1) on the interface the packet arrives on. It is
    set only on I(localnet_interfaces) (the ingress interfaces, e.g. the CNI bridge), never on
    C(all) or C(default), and only when some target is in 127.0.0.0/8. Traffic that the node
    itself sends (OUTPUT) does not need it: the gateway address is local, so it travels over lo.
    A failed write fails the module."
  - "CVE-2020-8558 guard: C(route_localnet=1) alone would let any neighbour on that interface
    reach every service bound to 127.0.0.1 by sending packets addressed to 127.0.0.1. Whenever
    route_localnet is in use, the netloom-owned raw chain C(NETLOOM-LOCALNET-GUARD), hooked into
    raw PREROUTING, holds C(-d 127.0.0.0/8 ! -i lo -j DROP) (commented). The raw table sees the
    destination a packet arrived with, before conntrack and NAT: our DNATed traffic still carries
    I(gateway_ip) there and passes, while a packet that arrives on any interface other than lo
    already addressed to 127.0.0.0/8 (which no legitimate sender does) is dropped before
    conntrack state is created for it and before route_localnet is consulted. The guard is put in
    place before route_localnet is enabled and removed only after it is disabled."
  - "Persistence: the module writes the route_localnet values to I(sysctl_file) (a whole file it
    owns, replaced atomically); at boot systemd-sysctl applies it, and its udev hook applies the
    per-interface lines when the interface (e.g. the CNI bridge) appears. The module does NOT
    persist iptables rules: they are in the kernel only and are gone after a reboot. Re-run the
    module at boot (the role's boot-time converge, e.g. a systemd oneshot that runs the playbook
    after the CNI bridge exists) to restore them. netfilter-persistent is not used because it
    would also save and restore Docker's rules, which Docker recreates itself."
  - "The interfaces listed in I(sysctl_file) are the module's record of where it set
    route_localnet: one dropped from I(localnet_interfaces) is set back to 0. Without
    I(sysctl_file) that record does not exist and such an interface keeps its value."
  - "C(state=absent) sets route_localnet back to 0 on I(localnet_interfaces) and on those
    recorded in I(sysctl_file), removes that file, then removes both netloom chains and their
    jumps, and nothing else."
version_added: "0.1.0"
author: netloom
requirements:
  - iptables (iptables-save, iptables-restore; the nf_tables or legacy backend)
options:
  state:
    description: C(present) converges the DNAT set; C(absent) removes everything this module owns.
    type: str
    choices: [present, absent]
    default: present
  gateway_ip:
    description:
      - The address workers send to (C(CNI_GW_IP)); the destination of the seed's rules and the
        default I(rules[].dest_ip). An IPv4 address outside 127.0.0.0/8.
    type: str
    default: 10.88.0.1
  s3_ip:
    description: Target of port 9000 (C(DNAT_S3_IP)); C('') means no S3 rule. An IPv4 address, no host name.
    type: str
    default: 127.0.0.1
  db_ip:
    description: Target of port I(db_dport) (C(DNAT_DB_IP)); C('') means no DB rule.
    type: str
    default: 127.0.0.1
  vl_ip:
    description: Target of port 9428 (C(DNAT_VL_IP), VictoriaLogs); C('') means no logs rule.
    type: str
    default: 127.0.0.1
  db_dport:
    description: Port workers use for the database on I(gateway_ip) (C(DNAT_DB_DPORT)).
    type: int
    default: 8001
  db_port:
    description:
      - Port the DB rule sends to (C(DNAT_DB_PORT)). Omitted, it is I(db_dport), as in the
        seed's local-proxy mode (127.0.0.1:8001, where HAProxy forwards to database:8000). Set it
        (the seed's backend default is 8000) when I(db_ip) is the database itself.
    type: int
  apply_output:
    description: Also DNAT the node's own traffic (OUTPUT hook), as C(DNAT_APPLY_OUTPUT=1).
    type: bool
    default: true
  rules:
    description: Further DNAT rules; the seed's names C(s3), C(db), C(vl) are reserved.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Unique name (lowercase letters, digits, C(_-), up to 32), kept in the rule's comment.
        type: str
        required: true
      protocol:
        description: Transport protocol.
        type: str
        choices: [tcp, udp]
        default: tcp
      dest_ip:
        description: Destination address to match; defaults to I(gateway_ip).
        type: str
      dest_port:
        description: Destination port to match, 1..65535.
        type: int
        required: true
      to_ip:
        description: IPv4 address to DNAT to (not a host name); C('') means no rule.
        type: str
        required: true
      to_port:
        description: Port to DNAT to, 1..65535; defaults to I(dest_port).
        type: int
  localnet_interfaces:
    description:
      - Interfaces that receive traffic DNATed to 127.0.0.0/8 (the CNI bridge); they get
        C(net.ipv4.conf.IF.route_localnet=1). Required when a target is in 127.0.0.0/8 (the
        default); C(all) and C(default) are refused. Each must exist.
    type: list
    elements: str
    default: []
  sysctl_file:
    description: Persist file for the route_localnet values (owned as a whole); C('') persists nothing.
    type: str
    default: /etc/sysctl.d/90-netloom-dnat.conf
notes:
  - Supports check mode and diff mode; both come from the same plan as the real run.
  - Network namespaces are independent; run the module in the namespace whose traffic it should
    DNAT (for Edge Serverless Box, the runtime node's).
"""

EXAMPLES = r"""
- name: The seed's DNAT on a runtime node (local proxy on 127.0.0.1)
  dnat_rules:
    gateway_ip: 10.88.0.1
    localnet_interfaces: [esb-cni0]

- name: No logs rule, the database straight to its backend, plus a registry rule, no OUTPUT hook
  dnat_rules:
    vl_ip: ""
    db_ip: 172.20.0.5
    db_port: 8000
    apply_output: false
    localnet_interfaces: [esb-cni0]
    rules:
      - name: registry
        dest_ip: 10.99.0.1
        dest_port: 5010
        to_ip: 127.0.0.1

- name: Remove every netloom DNAT rule, the guard and route_localnet
  dnat_rules:
    state: absent
    localnet_interfaces: [esb-cni0]
"""

RETURN = r"""
rules:
  description: The DNAT rules in place (or, in check mode, that would be), seed rules first.
  returned: state=present
  type: list
  elements: dict
  sample: [{name: s3, protocol: tcp, dest_ip: 10.88.0.1, dest_port: 9000, to_ip: 127.0.0.1, to_port: 9000}]
localnet_interfaces:
  description: Interfaces with route_localnet=1 set by this module (empty when no target is local).
  returned: state=present
  type: list
  elements: str
  sample: [esb-cni0]
guard:
  description: The CVE-2020-8558 guard rule in raw C(NETLOOM-LOCALNET-GUARD), or null when not needed.
  returned: state=present
  type: str
  sample: '-d 127.0.0.0/8 ! -i lo -m comment --comment "netloom: CVE-2020-8558 guard" -j DROP'
changes:
  description: One line per change made (or, in check mode, that would be made).
  returned: always
  type: list
  elements: str
  sample: ["create iptables raw NETLOOM-LOCALNET-GUARD", "create iptables nat NETLOOM-DNAT",
           "update sysctl net.ipv4.conf.esb-cni0.route_localnet"]
"""

import ipaddress
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import ChangePlan, InputError, finish, guarded, ifname, port
from ansible.module_utils.netloom.iptables import OwnedChain, plan_chains
from ansible.module_utils.netloom.sysctl import (
    plan_persist_file_removal,
    plan_sysctls,
    read_persist_file,
)

NAT_CHAIN = "NETLOOM-DNAT"
GUARD_CHAIN = "NETLOOM-LOCALNET-GUARD"
GUARD_RULE = '-d 127.0.0.0/8 ! -i lo -m comment --comment "netloom: CVE-2020-8558 guard" -j DROP'
COMMENT_PREFIX = "netloom-dnat:"
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
SEED_PORTS = {"s3": 9000, "vl": 9428}
# The seed's variables and defaults (CNI_GW_IP, DNAT_*_IP in local-proxy mode, DNAT_DB_DPORT, ...).
SEED_DEFAULTS: dict[str, Any] = {"gateway_ip": "10.88.0.1", "s3_ip": "127.0.0.1", "db_ip": "127.0.0.1",
                                 "vl_ip": "127.0.0.1", "db_dport": 8001, "db_port": None,
                                 "apply_output": True, "rules": []}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_LOCALNET_KEY_RE = re.compile(r"^net\.ipv4\.conf\.([^.]+)\.route_localnet$")


@dataclass(frozen=True)
class DnatRule:
    """One DNAT: packets to dest_ip:dest_port/protocol go to to_ip:to_port."""

    name: str
    protocol: str
    dest_ip: str
    dest_port: int
    to_ip: str
    to_port: int

    def spec(self) -> str:
        """The rule in iptables-save form, so it compares equal to what the kernel reports."""
        return (f"-d {self.dest_ip}/32 -p {self.protocol} -m {self.protocol} --dport {self.dest_port} "
                f'-m comment --comment "{COMMENT_PREFIX}{self.name}" '
                f"-j DNAT --to-destination {self.to_ip}:{self.to_port}")

    @property
    def to_loopback(self) -> bool:
        return ipaddress.IPv4Address(self.to_ip) in LOOPBACK


# ---- validation and rule planning (pure) ----

def _address(field: str, value: Any) -> ipaddress.IPv4Address:
    """An IPv4 address; a host name is refused with the reason (iptables resolves once, at insert)."""
    text = str(value).strip()
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        if re.fullmatch(r"[A-Za-z0-9.-]+", text) and re.search(r"[A-Za-z]", text):
            raise InputError(field, value, "is a host name; DNAT needs an IPv4 address (let the local "
                             "proxy on 127.0.0.1 resolve names)") from None
        raise InputError(field, value, "not an IPv4 address") from None
    if address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        raise InputError(field, value, "not a usable unicast address")
    return address


def destination_ip(field: str, value: Any) -> str:
    address = _address(field, value)
    if address in LOOPBACK:
        raise InputError(field, value, "packets arriving for 127.0.0.0/8 are dropped by the guard; "
                         "match the gateway address instead")
    return str(address)


def target_ip(field: str, value: Any) -> str | None:
    """A DNAT target, or None for an empty value (the seed's "no rule for it")."""
    if value is None or str(value).strip() == "":
        return None
    return str(_address(field, value))


def plan_rules(params: dict[str, Any]) -> list[DnatRule]:
    """The full rule set from the seed variables and the generic rules; InputError on bad input.

    Options missing from `params` take the seed's defaults (SEED_DEFAULTS).
    """
    params = {**SEED_DEFAULTS, **params}
    gateway = destination_ip("gateway_ip", params["gateway_ip"])
    db_dport = port("db_dport", params["db_dport"])
    db_port = db_dport if params["db_port"] is None else port("db_port", params["db_port"])
    seeds = [("s3", "s3_ip", SEED_PORTS["s3"], SEED_PORTS["s3"]),
             ("db", "db_ip", db_dport, db_port),
             ("vl", "vl_ip", SEED_PORTS["vl"], SEED_PORTS["vl"])]
    rules: list[DnatRule] = []
    fields: list[str] = []
    for name, field, dport, to_port in seeds:
        target = target_ip(field, params[field])
        if target is not None:
            rules.append(DnatRule(name, "tcp", gateway, dport, target, to_port))
            fields.append(field)

    extra = params["rules"] or []
    if not isinstance(extra, list):
        raise InputError("rules", extra, "must be a list of rules")
    names = {name for name, _, _, _ in seeds}
    for index, item in enumerate(extra):
        field = f"rules[{index}]"
        if not isinstance(item, dict):
            raise InputError(field, item, "must be a dict")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InputError(f"{field}.name", name, "names are 1..32 of a-z 0-9 _ - (starting alphanumeric)")
        if name in names:
            raise InputError(f"{field}.name", name, "name already used (s3, db and vl are the seed's)")
        names.add(name)
        protocol = item.get("protocol") or "tcp"
        if protocol not in ("tcp", "udp"):
            raise InputError(f"{field}.protocol", protocol, "must be tcp or udp")
        dest_ip = gateway if item.get("dest_ip") in (None, "") else destination_ip(f"{field}.dest_ip",
                                                                                    item["dest_ip"])
        dest_port = port(f"{field}.dest_port", item.get("dest_port"))
        to_port = dest_port if item.get("to_port") is None else port(f"{field}.to_port", item["to_port"])
        target = target_ip(f"{field}.to_ip", item.get("to_ip"))
        if target is not None:
            rules.append(DnatRule(name, protocol, dest_ip, dest_port, target, to_port))
            fields.append(field)

    seen: dict[tuple[str, int, str], str] = {}
    for rule, field in zip(rules, fields, strict=True):
        key = (rule.dest_ip, rule.dest_port, rule.protocol)
        if key in seen:
            raise InputError(field, asdict(rule), f"{rule.protocol} {rule.dest_ip}:{rule.dest_port} is "
                             f"already DNATed by rule {seen[key]}")
        seen[key] = rule.name
    return rules


def interface_names(interfaces: list[Any]) -> list[str]:
    """Validated ingress interface names; all/default are refused (they would open every interface)."""
    names = [ifname("localnet_interfaces", name) for name in interfaces]
    for name in names:
        if name in ("all", "default"):
            raise InputError("localnet_interfaces", name, "route_localnet is set per ingress interface, "
                             "never on all/default (CVE-2020-8558)")
    if len(set(names)) != len(names):
        raise InputError("localnet_interfaces", interfaces, "an interface is listed twice")
    return names


def localnet_interfaces(rules: list[DnatRule], interfaces: list[Any]) -> list[str]:
    """Interfaces that need route_localnet: the given ones, and only when a target is loopback."""
    names = interface_names(interfaces)
    loopback = [rule.name for rule in rules if rule.to_loopback]
    if not loopback:
        return []
    if not names:
        raise InputError("localnet_interfaces", interfaces,
                         f"rules {', '.join(loopback)} DNAT to 127.0.0.0/8, which needs route_localnet "
                         "on the interfaces that traffic arrives on (e.g. the CNI bridge)")
    return names


def localnet_key(interface: str) -> str:
    """sysctl key of an interface's route_localnet (a "." in the name is written "/")."""
    return f"net.ipv4.conf.{interface.replace('.', '/')}.route_localnet"


def owned_chains(rules: list[DnatRule], apply_output: bool) -> tuple[OwnedChain, OwnedChain]:
    hooks = ("PREROUTING", "OUTPUT") if apply_output else ("PREROUTING",)
    return (OwnedChain("raw", GUARD_CHAIN, ("PREROUTING",), (GUARD_RULE,)),
            OwnedChain("nat", NAT_CHAIN, hooks, tuple(rule.spec() for rule in rules)))


# ---- the module ----

class DnatRules:
    """Validate everything, read iptables and /proc/sys once, plan, and let `finish` apply."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.plan = ChangePlan()

    def run(self) -> None:
        params = self.params
        sysctl_file = params["sysctl_file"] or None
        if sysctl_file is not None and not os.path.isabs(sysctl_file):
            raise InputError("sysctl_file", sysctl_file, "must be an absolute path")
        recorded = self.recorded_interfaces(sysctl_file)
        if params["state"] == "absent":
            self.absent(sysctl_file, recorded)
            return
        rules = plan_rules(params)
        interfaces = localnet_interfaces(rules, params["localnet_interfaces"])
        if params["localnet_interfaces"] and not interfaces:
            self.module.warn("no target is in 127.0.0.0/8, so route_localnet is not set on "
                             f"{', '.join(params['localnet_interfaces'])}")
        guard, nat = owned_chains(rules, params["apply_output"])
        # The guard goes in before route_localnet is enabled, so there is no unguarded moment.
        self.plan.extend(plan_chains([guard], "present" if interfaces else "absent"))
        self.plan.extend(plan_chains([nat]))
        self.plan.extend(self.reset_localnet([name for name in recorded if name not in interfaces]))
        if interfaces:
            self.plan.extend(plan_sysctls({localnet_key(name): "1" for name in interfaces}, sysctl_file))
        elif sysctl_file is not None:
            self.plan.extend(plan_persist_file_removal(sysctl_file))
        finish(self.module, self.plan, rules=[asdict(rule) for rule in rules],
               localnet_interfaces=interfaces, guard=GUARD_RULE if interfaces else None)

    def absent(self, sysctl_file: str | None, recorded: list[str]) -> None:
        given = interface_names(self.params["localnet_interfaces"])
        self.plan.extend(self.reset_localnet(sorted(set(given) | set(recorded))))
        if sysctl_file is not None:
            self.plan.extend(plan_persist_file_removal(sysctl_file))
        guard, nat = owned_chains([], self.params["apply_output"])
        self.plan.extend(plan_chains([guard, nat], "absent"))
        finish(self.module, self.plan)

    @staticmethod
    def recorded_interfaces(sysctl_file: str | None) -> list[str]:
        """Interfaces whose route_localnet an earlier run persisted (the module's own record)."""
        if sysctl_file is None:
            return []
        found = []
        for key, value in read_persist_file(sysctl_file).items():
            match = _LOCALNET_KEY_RE.match(key)
            if not match or value != "1":
                continue
            try:  # a hand-edited record must not turn into a path outside /proc/sys/net/ipv4/conf
                found.append(ifname(sysctl_file, match.group(1).replace("/", ".")))
            except InputError:
                continue
        return found

    @staticmethod
    def reset_localnet(interfaces: list[str]) -> ChangePlan:
        """route_localnet back to 0 where we had set it; interfaces that are gone need nothing."""
        present = [name for name in interfaces if os.path.isdir(f"/proc/sys/net/ipv4/conf/{name}")]
        return plan_sysctls({localnet_key(name): "0" for name in present})


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "gateway_ip": {"type": "str", "default": SEED_DEFAULTS["gateway_ip"]},
            "s3_ip": {"type": "str", "default": SEED_DEFAULTS["s3_ip"]},
            "db_ip": {"type": "str", "default": SEED_DEFAULTS["db_ip"]},
            "vl_ip": {"type": "str", "default": SEED_DEFAULTS["vl_ip"]},
            "db_dport": {"type": "int", "default": SEED_DEFAULTS["db_dport"]},
            "db_port": {"type": "int"},
            "apply_output": {"type": "bool", "default": SEED_DEFAULTS["apply_output"]},
            "rules": {"type": "list", "elements": "dict", "default": [], "options": {
                "name": {"type": "str", "required": True},
                "protocol": {"type": "str", "choices": ["tcp", "udp"], "default": "tcp"},
                "dest_ip": {"type": "str"},
                "dest_port": {"type": "int", "required": True},
                "to_ip": {"type": "str", "required": True},
                "to_port": {"type": "int"},
            }},
            "localnet_interfaces": {"type": "list", "elements": "str", "default": []},
            "sysctl_file": {"type": "str", "default": "/etc/sysctl.d/90-netloom-dnat.conf"},
        },
        supports_check_mode=True,
    )
    guarded(module, DnatRules(module).run)


if __name__ == "__main__":
    main()
