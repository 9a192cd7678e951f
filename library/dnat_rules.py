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
  - "All rules live in netloom-owned nat chains: C(NETLOOM-DNAT), hooked into PREROUTING, holds
    one rule per DNAT and ingress interface (traffic arriving on I(ingress_interfaces), e.g. from
    workers on the CNI bridge), C(-d GW/32 -i IF -p tcp -m tcp --dport PORT -m comment --comment
    netloom-dnat:NAME -j DNAT --to-destination IP:PORT); with I(apply_output), C(NETLOOM-DNAT-OUT),
    hooked into OUTPUT, holds the same rules without C(-i) (traffic of the node's own network
    namespace). Each chain is rewritten atomically (one iptables-restore) whenever it differs, so a
    changed target replaces the old rule and a removed one disappears; hand-made changes inside
    the chains are drift and are repaired. Jumps are tagged C(netloom:CHAIN) and inserted at the
    top of PREROUTING/OUTPUT only when missing; other rules (Docker's C(DOCKER) chains included)
    are never touched."
  - "DNAT to 127.0.0.0/8 needs C(route_localnet=1) on the interface the packet arrives on. It is
    set only on I(localnet_interfaces) (the ingress interfaces, e.g. the CNI bridge), never on
    C(all) or C(default), and only when some target is in 127.0.0.0/8. Traffic that the node
    itself sends (OUTPUT) does not need it: the gateway address is local, so it travels over lo.
    A listed interface that does not exist yet (the CNI bridge before Docker creates it) is not
    an error: it is returned in C(pending_interfaces) with a warning, the guard and the DNAT go
    in, and route_localnet is set by the first run (or boot replay) that finds it."
  - "CVE-2020-8558 guard: C(route_localnet=1) alone would let any neighbour on that interface
    reach every service bound to 127.0.0.1 by sending packets addressed to 127.0.0.1. The
    netloom-owned raw chain C(NETLOOM-LOCALNET-GUARD), hooked into raw PREROUTING, holds
    C(-d 127.0.0.0/8 ! -i lo -j DROP) (commented). The raw table sees the destination a packet
    arrived with, before conntrack and NAT: our DNATed traffic still carries I(gateway_ip) there
    and passes, while a packet that arrives on any interface other than lo already addressed to
    127.0.0.0/8 (which no legitimate sender does) is dropped before route_localnet is consulted.
    The guard is in place whenever any interface of the node has (or, after this run, will have)
    route_localnet=1, whoever set it: the module reads every
    C(/proc/sys/net/ipv4/conf/*/route_localnet) (C(all) and C(default) included). The plan puts
    the guard in before route_localnet is enabled, and removes it only after every reset."
  - "Reboot survival: a real run records itself for netloom-restore (the module's arguments and
    code under /var/lib/netloom/restore, replayed at boot by C(netloom-restore-early.service),
    before Docker, and C(netloom-restore-late.service), after it). The early replay puts the
    guard and the DNAT back before any worker can send; the late replay, once Docker has made
    the CNI bridge and DOCKER-USER, sets route_localnet on it and hooks I(forward_accept). The
    guard and route_localnet are thus restored by one mechanism, in the right order: nothing is
    written to sysctl.d, because systemd-sysctl would enable route_localnet at boot before the
    guard exists."
  - "The recorded arguments are also the module's record of where it set route_localnet: an
    interface dropped from I(localnet_interfaces) is set back to 0. An interface with
    route_localnet=1 that the module has no record of is left as it is, with a warning, and
    keeps the guard in place."
  - "With I(forward_accept), the netloom-owned filter chain C(NETLOOM-EDGE-FWD), hooked from
    Docker's C(DOCKER-USER) (the chain Docker evaluates before its own FORWARD rules and leaves
    to the operator), accepts exactly the listed flows, e.g. the gateway invoking workers on
    their port 8080 through wg0. While Docker has not created DOCKER-USER yet, the chain is
    made and the jump is left for a later run (C(forward_hook_pending), a warning)."
  - "C(state=absent) sets route_localnet back to 0 on I(localnet_interfaces) and on the recorded
    ones, then removes the netloom chains and their jumps (the guard only when no interface keeps
    route_localnet=1, with a warning otherwise), the restore entry and the earlier sysctl.d file
    I(sysctl_file), and nothing else."
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
        default I(rules[].dest_ip). An IPv4 address a host can hold (not 0/8, 127/8,
        169.254/16, multicast or 240/4).
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
        description: Destination address to match (a unicast host address); defaults to I(gateway_ip).
        type: str
      dest_port:
        description: Destination port to match, 1..65535.
        type: int
        required: true
      to_ip:
        description:
          - IPv4 address to DNAT to (not a host name); C('') means no rule. 127.0.0.0/8 (a local
            proxy) and 169.254.0.0/16 (e.g. a metadata service) are valid targets; 0.0.0.0/8,
            multicast and 240.0.0.0/4 are not.
        type: str
        required: true
      to_port:
        description: Port to DNAT to, 1..65535; defaults to I(dest_port).
        type: int
  localnet_interfaces:
    description:
      - Interfaces that receive traffic DNATed to 127.0.0.0/8 (the CNI bridge); they get
        C(net.ipv4.conf.IF.route_localnet=1). Required when a target is in 127.0.0.0/8 (the
        default); C(all) and C(default) are refused. One that does not exist yet is pending.
    type: list
    elements: str
    default: []
  ingress_interfaces:
    description:
      - Interfaces whose arriving traffic PREROUTING DNATs (each rule gets C(-i IF)). Omitted, they
        are I(localnet_interfaces). Required when there is any rule; need not exist yet.
    type: list
    elements: str
  forward_accept:
    description:
      - Forwarded flows to accept in C(NETLOOM-EDGE-FWD), hooked from Docker's C(DOCKER-USER)
        (C([]) removes the chain and its jump).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Unique name (lowercase letters, digits, C(_-), up to 32), kept in the rule's comment.
        type: str
        required: true
      in_interface:
        description: Interface the flow arrives on (e.g. C(wg0)).
        type: str
        required: true
      out_interface:
        description: Interface the flow leaves on (e.g. the CNI bridge).
        type: str
        required: true
      protocol:
        description: Transport protocol.
        type: str
        choices: [tcp, udp]
        default: tcp
      dest_port:
        description: Destination port, 1..65535 (e.g. the workers' 8080).
        type: int
        required: true
  sysctl_file:
    description:
      - The sysctl.d file in which earlier netloom versions persisted route_localnet. It is read
        once as a record of where route_localnet was set, then deleted (systemd-sysctl applying
        it at boot, before the guard exists, is the hole the restore units close). C('') skips it.
      - Omitted, C(/etc/sysctl.d/90-netloom-dnat.conf).
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
  - Supports check mode and diff mode; both come from the same plan as the real run, even on a
    node where the CNI bridge and Docker's chains do not exist yet.
  - Network namespaces are independent; run the module in the namespace whose traffic it should
    DNAT (for Edge Serverless Box, the runtime node's).
"""

EXAMPLES = r"""
- name: The seed's DNAT on a runtime node (local proxy on 127.0.0.1), gateway reaches workers' :8080
  dnat_rules:
    gateway_ip: 10.88.0.1
    localnet_interfaces: [esb-cni0]
    forward_accept:
      - {name: gateway-workers, in_interface: wg0, out_interface: esb-cni0, dest_port: 8080}

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

- name: Remove every netloom DNAT rule, the guard, route_localnet and the boot replay
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
pending_interfaces:
  description: Interfaces of I(localnet_interfaces) that do not exist yet; route_localnet is set when they do.
  returned: state=present
  type: list
  elements: str
  sample: [esb-cni0]
ingress_interfaces:
  description: Interfaces PREROUTING DNATs traffic from.
  returned: state=present
  type: list
  elements: str
  sample: [esb-cni0]
guard:
  description: The CVE-2020-8558 guard rule in raw C(NETLOOM-LOCALNET-GUARD), or null when not needed.
  returned: always
  type: str
  sample: '-d 127.0.0.0/8 ! -i lo -m comment --comment "netloom: CVE-2020-8558 guard" -j DROP'
forward_hook_pending:
  description: True when I(forward_accept) is set but DOCKER-USER does not exist yet (no jump yet).
  returned: state=present
  type: bool
  sample: false
changes:
  description: One line per change made (or, in check mode, that would be made).
  returned: always
  type: list
  elements: str
  sample: ["create iptables raw NETLOOM-LOCALNET-GUARD", "create iptables nat NETLOOM-DNAT",
           "update sysctl net.ipv4.conf.esb-cni0.route_localnet"]
"""

import glob
import ipaddress
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import (
    ChangePlan,
    InputError,
    finish,
    guarded,
    ifname,
    not_a_host_reason,
    port,
    unicast_host,
)
from ansible.module_utils.netloom.iptables import OwnedChain, canonical_rule, plan_chains, read_table
from ansible.module_utils.netloom.persist import (
    RESTORE_OPTION,
    persist_root,
    plan_forget,
    plan_record,
    recorded_args,
)
from ansible.module_utils.netloom.sysctl import plan_persist_file_removal, plan_sysctls, read_persist_file

MODULE_NAME = "dnat_rules"
RESTORE_KEY = "main"
# After the overlay modules (10, 20); in both phases: early puts the guard and the DNAT back
# before Docker starts, late sets route_localnet on the bridge Docker has made by then.
RESTORE_ORDER = 30
RESTORE_PHASES = ("early", "late")
NAT_CHAIN = "NETLOOM-DNAT"
NAT_OUT_CHAIN = "NETLOOM-DNAT-OUT"
GUARD_CHAIN = "NETLOOM-LOCALNET-GUARD"
FORWARD_CHAIN = "NETLOOM-EDGE-FWD"
FORWARD_HOOK = "DOCKER-USER"
GUARD_RULE = '-d 127.0.0.0/8 ! -i lo -m comment --comment "netloom: CVE-2020-8558 guard" -j DROP'
COMMENT_PREFIX = "netloom-dnat:"
FORWARD_COMMENT_PREFIX = "netloom-fwd:"
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
CONF_DIR = "/proc/sys/net/ipv4/conf"
LEGACY_SYSCTL_FILE = "etc/sysctl.d/90-netloom-dnat.conf"
SEED_PORTS = {"s3": 9000, "vl": 9428}
# The seed's variables and defaults (CNI_GW_IP, DNAT_*_IP in local-proxy mode, DNAT_DB_DPORT, ...).
SEED_DEFAULTS: dict[str, Any] = {"gateway_ip": "10.88.0.1", "s3_ip": "127.0.0.1", "db_ip": "127.0.0.1",
                                 "vl_ip": "127.0.0.1", "db_dport": 8001, "db_port": None,
                                 "apply_output": True, "rules": []}
# Used with fullmatch: `$` would also accept a name ending in a newline.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_LOCALNET_KEY_RE = re.compile(r"net\.ipv4\.conf\.([^.]+)\.route_localnet")


@dataclass(frozen=True)
class DnatRule:
    """One DNAT: packets to dest_ip:dest_port/protocol go to to_ip:to_port."""

    name: str
    protocol: str
    dest_ip: str
    dest_port: int
    to_ip: str
    to_port: int

    def spec(self, ingress: str | None = None) -> str:
        """The rule in iptables-save form (with `-i` for PREROUTING), as the kernel reports it."""
        match_in = f"-i {ingress} " if ingress else ""
        return (f"-d {self.dest_ip}/32 {match_in}-p {self.protocol} -m {self.protocol} "
                f'--dport {self.dest_port} -m comment --comment "{COMMENT_PREFIX}{self.name}" '
                f"-j DNAT --to-destination {self.to_ip}:{self.to_port}")

    @property
    def to_loopback(self) -> bool:
        return ipaddress.IPv4Address(self.to_ip) in LOOPBACK


@dataclass(frozen=True)
class ForwardAccept:
    """One forwarded flow accepted from DOCKER-USER: in_interface -> out_interface, protocol/port."""

    name: str
    in_interface: str
    out_interface: str
    protocol: str
    dest_port: int

    def spec(self) -> str:
        return (f"-i {self.in_interface} -o {self.out_interface} -p {self.protocol} -m {self.protocol} "
                f'--dport {self.dest_port} -m comment --comment "{FORWARD_COMMENT_PREFIX}{self.name}" '
                "-j ACCEPT")


# ---- validation and rule planning (pure) ----

def _address(field: str, value: Any) -> ipaddress.IPv4Address:
    """An IPv4 address; a host name is refused with the reason (iptables resolves once, at insert)."""
    text = str(value).strip()
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        if re.fullmatch(r"[A-Za-z0-9.-]+", text) and re.search(r"[A-Za-z]", text):
            raise InputError(field, value, "is a host name; DNAT needs an IPv4 address (let the local "
                             "proxy on 127.0.0.1 resolve names)") from None
        raise InputError(field, value, "not an IPv4 address") from None


def destination_ip(field: str, value: Any) -> str:
    """An address packets arrive for: a unicast host address (127/8 would meet the guard)."""
    _address(field, value)
    return str(unicast_host(field, value))


def target_ip(field: str, value: Any) -> str | None:
    """A DNAT target, or None for an empty value (the seed's "no rule for it").

    Loopback (a local proxy) and link-local (e.g. a metadata service) are real targets; the
    other addresses no host can hold are refused.
    """
    if value is None or str(value).strip() == "":
        return None
    address = _address(field, value)
    reason = not_a_host_reason(address)
    if reason and address not in LOOPBACK and address not in LINK_LOCAL:
        raise InputError(field, value, f"cannot be a DNAT target: it is {reason}")
    return str(address)


def named_flow(field: str, item: Any, taken: set[str], taken_reason: str) -> tuple[str, str]:
    """The name (unique among `taken`, which it joins) and protocol of one rules[N] or
    forward_accept[N] entry."""
    if not isinstance(item, dict):
        raise InputError(field, item, "must be a dict")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InputError(f"{field}.name", name, "names are 1..32 of a-z 0-9 _ - (starting alphanumeric)")
    if name in taken:
        raise InputError(f"{field}.name", name, taken_reason)
    taken.add(name)
    protocol = item.get("protocol") or "tcp"
    if protocol not in ("tcp", "udp"):
        raise InputError(f"{field}.protocol", protocol, "must be tcp or udp")
    return name, protocol


def _checked(field: str, spec: str) -> None:
    """The rule as iptables will see it, so any problem is reported under the caller's field."""
    try:
        canonical_rule(spec)
    except ValueError as err:
        raise InputError(field, spec, str(err)) from None


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
        name, protocol = named_flow(field, item, names, "name already used (s3, db and vl are the seed's)")
        dest_ip = (gateway if item.get("dest_ip") in (None, "")
                   else destination_ip(f"{field}.dest_ip", item["dest_ip"]))
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
        _checked(field, rule.spec())
    return rules


def interface_names(field: str, interfaces: list[Any]) -> list[str]:
    """Validated interface names; all/default are refused (they would open every interface)."""
    if not isinstance(interfaces, list):
        raise InputError(field, interfaces, "must be a list of interface names")
    names = [ifname(f"{field}[{index}]", name) for index, name in enumerate(interfaces)]
    for index, name in enumerate(names):
        if name in ("all", "default"):
            raise InputError(f"{field}[{index}]", name, "route_localnet and DNAT are per ingress "
                             "interface, never all/default (CVE-2020-8558)")
    if len(set(names)) != len(names):
        raise InputError(field, interfaces, "an interface is listed twice")
    return names


def localnet_interfaces(rules: list[DnatRule], interfaces: list[Any]) -> list[str]:
    """Interfaces that need route_localnet: the given ones, and only when a target is loopback."""
    names = interface_names("localnet_interfaces", interfaces)
    loopback = [rule.name for rule in rules if rule.to_loopback]
    if not loopback:
        return []
    if not names:
        raise InputError("localnet_interfaces", interfaces,
                         f"rules {', '.join(loopback)} DNAT to 127.0.0.0/8, which needs route_localnet "
                         "on the interfaces that traffic arrives on (e.g. the CNI bridge)")
    return names


def ingress_interfaces(rules: list[DnatRule], params: dict[str, Any]) -> list[str]:
    """Interfaces PREROUTING matches with -i: the given ones, else the localnet ones."""
    given = params.get("ingress_interfaces")
    field = "ingress_interfaces" if given is not None else "localnet_interfaces"
    names = interface_names(field, given if given is not None else params.get("localnet_interfaces") or [])
    if rules and not names:
        raise InputError("ingress_interfaces", given, "the DNAT of arriving traffic needs the interfaces "
                         "it arrives on (e.g. the CNI bridge); none given")
    return names


def forward_accepts(items: Any) -> list[ForwardAccept]:
    """The validated forward_accept flows; each error names forward_accept[N].FIELD."""
    if not isinstance(items, list):
        raise InputError("forward_accept", items, "must be a list of flows")
    flows: list[ForwardAccept] = []
    names: set[str] = set()
    for index, item in enumerate(items):
        field = f"forward_accept[{index}]"
        name, protocol = named_flow(field, item, names, "name already used")
        flow = ForwardAccept(name, ifname(f"{field}.in_interface", item.get("in_interface")),
                             ifname(f"{field}.out_interface", item.get("out_interface")), protocol,
                             port(f"{field}.dest_port", item.get("dest_port")))
        _checked(field, flow.spec())
        flows.append(flow)
    return flows


def localnet_key(interface: str) -> str:
    """sysctl key of an interface's route_localnet (a "." in the name is written "/")."""
    return f"net.ipv4.conf.{interface.replace('.', '/')}.route_localnet"


def owned_chains(rules: list[DnatRule],
                 ingress: tuple[str, ...] | list[str] = ()) -> tuple[OwnedChain, OwnedChain, OwnedChain]:
    """Guard (raw), PREROUTING DNAT with one rule per ingress interface, OUTPUT DNAT without -i."""
    prerouting = tuple(rule.spec(name) for rule in rules for name in ingress)
    output = tuple(rule.spec() for rule in rules)
    return (OwnedChain("raw", GUARD_CHAIN, ("PREROUTING",), (GUARD_RULE,)),
            OwnedChain("nat", NAT_CHAIN, ("PREROUTING",), prerouting),
            OwnedChain("nat", NAT_OUT_CHAIN, ("OUTPUT",), output))


def forward_chain(flows: list[ForwardAccept], hooked: bool) -> OwnedChain:
    return OwnedChain("filter", FORWARD_CHAIN, (FORWARD_HOOK,) if hooked else (),
                      tuple(flow.spec() for flow in flows))


def localnet_after(live: dict[str, str], enable: list[str], reset: list[str]) -> list[str]:
    """Interfaces (all/default included, lo excluded) with route_localnet=1 once the plan has run."""
    values = {**live, **{name: "1" for name in enable}, **{name: "0" for name in reset}}
    return sorted(name for name, value in values.items() if value == "1" and name != "lo")


def _valid_ifname(name: Any) -> bool:
    try:
        return ifname("record", name) not in ("all", "default")
    except InputError:
        return False


# ---- live state ----

def live_localnet() -> dict[str, str]:
    """route_localnet of every interface of this network namespace (all and default included)."""
    values: dict[str, str] = {}
    for path in glob.glob(f"{CONF_DIR}/*/route_localnet"):
        try:
            with open(path, encoding="utf-8") as handle:
                values[os.path.basename(os.path.dirname(path))] = handle.read().strip()
        except OSError:
            continue  # the interface went away while we read
    return values


# ---- the module ----

class DnatRules:
    """Validate everything, read iptables and /proc/sys once, plan, and let `finish` apply."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.plan = ChangePlan()

    def run(self) -> None:
        params = self.params
        legacy_file = self.legacy_sysctl_file()
        if params["state"] == "absent":
            given = interface_names("localnet_interfaces", params["localnet_interfaces"])
            interface_names("ingress_interfaces", params["ingress_interfaces"] or [])
            forward_accepts(params["forward_accept"])
            self.absent(given, legacy_file)
            return
        rules = plan_rules(params)
        interfaces = localnet_interfaces(rules, params["localnet_interfaces"])
        ingress = ingress_interfaces(rules, params)
        flows = forward_accepts(params["forward_accept"])
        if params["localnet_interfaces"] and not interfaces:
            self.module.warn("no target is in 127.0.0.0/8, so route_localnet is not set on "
                             f"{', '.join(params['localnet_interfaces'])}")

        live = live_localnet()
        existing = [name for name in interfaces if name in live]
        pending = [name for name in interfaces if name not in live]
        if pending:
            self.module.warn(f"{', '.join(pending)} does not exist yet: the guard and the DNAT are in "
                             "place, route_localnet is set when it exists (next run or boot replay)")
        recorded = self.recorded_interfaces(legacy_file)
        reset = [name for name in recorded if name not in interfaces and name in live]
        still_on = localnet_after(live, existing, reset)
        guard_needed = bool(interfaces) or bool(still_on)
        self.warn_foreign(still_on, interfaces)

        guard, nat, nat_out = owned_chains(rules, ingress)
        hooked = bool(flows) and self.forward_hook_exists()
        if flows and not hooked:
            self.module.warn(f"{FORWARD_HOOK} does not exist yet (Docker has not started): "
                             f"{FORWARD_CHAIN} is made, its jump comes with the next run or boot replay")
        # The guard goes in before route_localnet is enabled and out only after every reset,
        # so no interface ever has route_localnet=1 without it, even when a step fails.
        if guard_needed:
            self.plan.extend(plan_chains([guard]))
        wanted = {nat: bool(rules), nat_out: bool(rules) and params["apply_output"],
                  forward_chain(flows, hooked): bool(flows)}
        self.plan.extend(plan_chains([chain for chain, keep in wanted.items() if keep]))
        self.plan.extend(plan_chains([chain for chain, keep in wanted.items() if not keep], "absent"))
        self.plan.extend(plan_sysctls({localnet_key(name): "1" for name in existing}))
        self.plan.extend(plan_sysctls({localnet_key(name): "0" for name in reset}))
        if not guard_needed:
            self.plan.extend(plan_chains([guard], "absent"))
        if legacy_file is not None:
            self.plan.extend(plan_persist_file_removal(legacy_file))
        plan_record(self.plan, self.module, MODULE_NAME, RESTORE_KEY, RESTORE_ORDER, RESTORE_PHASES)
        finish(self.module, self.plan, rules=[asdict(rule) for rule in rules],
               localnet_interfaces=interfaces, pending_interfaces=pending, ingress_interfaces=ingress,
               guard=GUARD_RULE if guard_needed else None,
               forward_hook_pending=bool(flows) and not hooked)

    def absent(self, given: list[str], legacy_file: str | None) -> None:
        live = live_localnet()
        reset = [name for name in sorted(set(given) | set(self.recorded_interfaces(legacy_file)))
                 if name in live]
        still_on = localnet_after(live, [], reset)
        self.warn_foreign(still_on, [])
        self.plan.extend(plan_sysctls({localnet_key(name): "0" for name in reset}))
        guard, nat, nat_out = owned_chains([])
        chains = [nat, nat_out, forward_chain([], False)] + ([] if still_on else [guard])
        self.plan.extend(plan_chains(chains, "absent"))
        if legacy_file is not None:
            self.plan.extend(plan_persist_file_removal(legacy_file))
        plan_forget(self.plan, self.module, MODULE_NAME, RESTORE_KEY, RESTORE_ORDER)
        finish(self.module, self.plan, guard=GUARD_RULE if still_on else None)

    def warn_foreign(self, still_on: list[str], ours: list[str]) -> None:
        """Say why the guard stays: route_localnet=1 where this module has no record of setting it."""
        foreign = [name for name in still_on if name not in ours]
        if foreign:
            self.module.warn(f"route_localnet=1 on {', '.join(foreign)}, which this module did not set "
                             "(or has no record of): left as it is, and the CVE-2020-8558 guard stays")

    def legacy_sysctl_file(self) -> str | None:
        """The sysctl.d file of earlier versions (under the persistence root when not given)."""
        given = self.params["sysctl_file"]
        if given is None:
            return os.path.join(persist_root(), LEGACY_SYSCTL_FILE)
        if given == "":
            return None
        if not os.path.isabs(given):
            raise InputError("sysctl_file", given, "must be an absolute path")
        return given

    @staticmethod
    def recorded_interfaces(legacy_file: str | None) -> list[str]:
        """Where an earlier run set route_localnet: its restore entry, and an earlier sysctl.d file."""
        found: list[str] = []
        args = recorded_args(MODULE_NAME, RESTORE_KEY, RESTORE_ORDER)
        if args is not None:
            listed = args.get("localnet_interfaces")
            listed = listed if isinstance(listed, list) else []
            try:  # the interfaces that run set: listed, and only when a target was loopback
                seeds = {key: args[key] for key in SEED_DEFAULTS if key in args}
                found.extend(localnet_interfaces(plan_rules(seeds), listed))
            except InputError:  # input this version refuses: count every valid listed name
                found.extend(name for name in listed if _valid_ifname(name))
        for key, value in (read_persist_file(legacy_file) if legacy_file else {}).items():
            match = _LOCALNET_KEY_RE.fullmatch(key)
            name = match.group(1).replace("/", ".") if match and value == "1" else ""
            if _valid_ifname(name):  # a hand-edited record must not become a path outside conf/
                found.append(name)
        return list(dict.fromkeys(found))

    def forward_hook_exists(self) -> bool:
        return FORWARD_HOOK in read_table("filter")


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **RESTORE_OPTION,  # the netloom-restore units, rendered by the action plugin
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
            "ingress_interfaces": {"type": "list", "elements": "str"},
            "forward_accept": {"type": "list", "elements": "dict", "default": [], "options": {
                "name": {"type": "str", "required": True},
                "in_interface": {"type": "str", "required": True},
                "out_interface": {"type": "str", "required": True},
                "protocol": {"type": "str", "choices": ["tcp", "udp"], "default": "tcp"},
                "dest_port": {"type": "int", "required": True},
            }},
            "sysctl_file": {"type": "str"},
        },
        supports_check_mode=True,
    )
    guarded(module, DnatRules(module).run)


if __name__ == "__main__":
    main()
