"""KohakuRiver overlay address plan and runner-id resolution (pure logic, no I/O).

The plan `BASE/PREFIX/NODE_BITS/SUBNET_BITS` splits the overlay CIDR BASE/PREFIX into
2**NODE_BITS subnets of 2**SUBNET_BITS addresses; subnet N belongs to runner N and
subnet 0 to the hub. Every address the hub, a runner, Docker and VMs use is derived
here, so the three allocators the reference system had cannot disagree.
"""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ansible.module_utils.netloom.common import (
    InputError,
    int_range,
    ipv4_address,
    known_fields,
    unicast_host,
)
from ansible.module_utils.netloom.constants import NO_HOST_NETWORKS

# The hub's address on a runner subnet is offset+254 (the seed's 10.N.0.254); a subnet
# too small to hold it (SUBNET_BITS < 8) uses its last usable address instead.
HUB_HOST_OFFSET = 254
MIN_SUBNET_BITS = 2  # network, gateway, hub address and broadcast need 4 addresses
VNI_MAX = 16777215
STATE_VERSION = 1
_PLAN_RE = re.compile(r"\s*([0-9.]+)/(\d+)/(\d+)/(\d+)\s*")
# Runner names (inventory hostnames) go into the state file and messages: no white space,
# control characters or quotes; matched with fullmatch so a trailing newline is refused.
_RUNNER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,252}")


@dataclass(frozen=True)
class RunnerAddressing:
    """Everything one runner's subnet implies: its gateway, the hub's address and workload range."""

    runner_id: int
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    hub_address: ipaddress.IPv4Address
    first_workload: ipaddress.IPv4Address
    last_workload: ipaddress.IPv4Address

    @property
    def gateway_interface(self) -> ipaddress.IPv4Interface:
        """The runner bridge's address, e.g. 10.1.0.1/16."""
        return ipaddress.IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")

    @property
    def hub_interface(self) -> ipaddress.IPv4Interface:
        """The hub's address on this runner's VXLAN link, e.g. 10.1.0.254/16."""
        return ipaddress.IPv4Interface(f"{self.hub_address}/{self.subnet.prefixlen}")

    @property
    def workload_count(self) -> int:
        """Workload addresses: first..last minus the hub address inside that range."""
        span = int(self.last_workload) - int(self.first_workload) + 1
        if span <= 0:
            return 0
        return span - (1 if self.first_workload <= self.hub_address <= self.last_workload else 0)


@dataclass(frozen=True)
class AddressPlan:
    """A validated BASE/PREFIX/NODE_BITS/SUBNET_BITS plan."""

    base: ipaddress.IPv4Address
    prefix: int
    node_bits: int
    subnet_bits: int

    @classmethod
    def parse(cls, text: Any, field_name: str = "plan") -> AddressPlan:
        """Parse "10.0.0.0/8/8/16"."""
        match = _PLAN_RE.fullmatch(str(text))
        if not match:
            raise InputError(field_name, text, "expected BASE/PREFIX/NODE_BITS/SUBNET_BITS, "
                                               "e.g. 10.0.0.0/8/8/16")
        base, prefix, node_bits, subnet_bits = match.groups()
        return cls.build(base, prefix, node_bits, subnet_bits, field_name)

    @classmethod
    def from_value(cls, value: Any, field_name: str = "plan") -> AddressPlan:
        """Parse a plan given as a string or as fields {base, prefix, node_bits, subnet_bits}.

        `base` may carry the prefix itself ("10.0.0.0/8"), then `prefix` may be left out.
        """
        if isinstance(value, AddressPlan):
            return value
        if isinstance(value, str):
            return cls.parse(value, field_name)
        known_fields(field_name, value, ("base", "prefix", "node_bits", "subnet_bits"),
                     "give a string BASE/PREFIX/NODE_BITS/SUBNET_BITS "
                     "or a dict with base, prefix, node_bits, subnet_bits", "plan")
        for key in ("base", "node_bits", "subnet_bits"):
            if value.get(key) in (None, ""):
                raise InputError(f"{field_name}.{key}", value.get(key), "is required")
        base = str(value["base"]).strip()
        prefix = value.get("prefix")
        if "/" in base:
            base, _, base_prefix = base.partition("/")
            if prefix not in (None, "") and str(prefix) != base_prefix:
                raise InputError(f"{field_name}.prefix", prefix,
                                 f"disagrees with the prefix in base {value['base']}")
            prefix = base_prefix
        if prefix in (None, ""):
            raise InputError(f"{field_name}.prefix", prefix, "is required when base has no /PREFIX")
        return cls.build(base, prefix, value["node_bits"], value["subnet_bits"], field_name)

    @classmethod
    def build(cls, base: Any, prefix: Any, node_bits: Any, subnet_bits: Any,
              field_name: str = "plan") -> AddressPlan:
        """Validate the four numbers together; every failure names the field and the value."""
        address = ipv4_address(f"{field_name}.base", base)
        prefix_len = int_range(f"{field_name}.prefix", prefix, 0, 32 - 1 - MIN_SUBNET_BITS)
        nodes = int_range(f"{field_name}.node_bits", node_bits, 1, 32 - MIN_SUBNET_BITS)
        host_bits = int_range(f"{field_name}.subnet_bits", subnet_bits, MIN_SUBNET_BITS, 31)
        if prefix_len + nodes + host_bits != 32:
            raise InputError(field_name, f"{base}/{prefix}/{node_bits}/{subnet_bits}",
                             f"PREFIX+NODE_BITS+SUBNET_BITS must be 32, "
                             f"not {prefix_len}+{nodes}+{host_bits}={prefix_len + nodes + host_bits}")
        network = ipaddress.IPv4Network(f"{address}/{prefix_len}", strict=False)
        if network.network_address != address:
            raise InputError(f"{field_name}.base", base,
                             f"not aligned to /{prefix_len} (the network is {network})")
        text = f"{base}/{prefix}/{node_bits}/{subnet_bits}"
        if prefix_len == 0:
            raise InputError(field_name, text, "the overlay 0.0.0.0/0 is the default route: it would "
                                               "replace the node's default route and forward everything")
        # The overlay is routed, forwarded and masqueraded as a whole: any overlap with a range
        # no host holds would hijack loopback, link-local, multicast or reserved traffic.
        for reserved, what in NO_HOST_NETWORKS:
            if network.overlaps(reserved):
                raise InputError(field_name, text, f"the overlay {network} overlaps {reserved} ({what})")
        return cls(address, prefix_len, nodes, host_bits)

    def __str__(self) -> str:
        return f"{self.base}/{self.prefix}/{self.node_bits}/{self.subnet_bits}"

    @property
    def overlay(self) -> ipaddress.IPv4Network:
        """The whole overlay, BASE/PREFIX: what FORWARD accepts and runners route to the hub."""
        return ipaddress.IPv4Network(f"{self.base}/{self.prefix}")

    @property
    def subnet_prefix(self) -> int:
        return self.prefix + self.node_bits

    @property
    def max_runner_id(self) -> int:
        return (1 << self.node_bits) - 1

    @property
    def hub_anchor(self) -> ipaddress.IPv4Interface:
        """The hub's own address for workloads (10.0.0.1/8): base+1 over the whole overlay."""
        return ipaddress.IPv4Interface(f"{self.base + 1}/{self.prefix}")

    def underlay_address(self, field_name: str, value: Any) -> ipaddress.IPv4Address:
        """A node's underlay address: a unicast host outside the overlay.

        Inside the overlay, the route to the overlay would capture the VXLAN packets themselves.
        """
        address = unicast_host(field_name, value)
        if address in self.overlay:
            raise InputError(field_name, value, f"is inside the overlay {self.overlay}: the underlay "
                                                "must be a network outside the overlay")
        return address

    def check_runner_id(self, field_name: str, value: Any) -> int:
        """A runner id is 1..2**NODE_BITS-1; 0 is the hub's own subnet."""
        return int_range(field_name, value, 1, self.max_runner_id)

    def runner(self, runner_id: int) -> RunnerAddressing:
        """Addresses of runner N: subnet base+(N << SUBNET_BITS), gateway +1, hub +254."""
        runner_id = self.check_runner_id("runner_id", runner_id)
        offset = self.base + (runner_id << self.subnet_bits)
        subnet = ipaddress.IPv4Network(f"{offset}/{self.subnet_prefix}")
        last_usable = subnet.broadcast_address - 1
        hub = min(offset + HUB_HOST_OFFSET, last_usable)
        return RunnerAddressing(runner_id=runner_id, subnet=subnet, gateway=offset + 1,
                                hub_address=hub, first_workload=offset + 2, last_workload=last_usable)

    def runner_vni(self, vni_base: int, runner_id: int, field_name: str = "vni_base") -> int:
        """VNI of runner N is vni_base+N; it must stay inside 1..16777215."""
        value = int(vni_base) + int(runner_id)
        if not 1 <= value <= VNI_MAX:
            raise InputError(field_name, vni_base,
                             f"vni_base+{runner_id}={value} is outside the VXLAN range 1..{VNI_MAX}")
        return value


# ---- runner ids -------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerSpec:
    """One declared runner: its name, underlay address and an optional operator-chosen id."""

    name: str
    underlay_ip: ipaddress.IPv4Address
    declared_id: int | None = None


@dataclass(frozen=True)
class RunnerRecord:
    """A runner id recorded on the hub (state file), keyed by runner name."""

    name: str
    runner_id: int
    underlay_ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class ResolvedRunner:
    """A runner with its id and where that id came from (declared|recorded|link|allocated)."""

    name: str
    underlay_ip: ipaddress.IPv4Address
    runner_id: int
    source: str


def parse_runners(plan: AddressPlan, entries: Sequence[Any], field_name: str = "runners") -> list[RunnerSpec]:
    """Validate the declared runner list: names, underlay IPs and declared ids are unique."""
    specs: list[RunnerSpec] = []
    seen_names: dict[str, int] = {}
    seen_ips: dict[ipaddress.IPv4Address, int] = {}
    seen_ids: dict[int, int] = {}
    for position, entry in enumerate(entries):
        where = f"{field_name}[{position}]"
        known_fields(where, entry, ("name", "underlay_ip", "id"),
                     "each runner is a dict with name, underlay_ip and optional id", "runner")
        name = entry.get("name")
        if name in (None, ""):
            raise InputError(f"{where}.name", name, "is required")
        if not isinstance(name, str) or not _RUNNER_NAME_RE.fullmatch(name):
            raise InputError(f"{where}.name", name, "runner names are 1..253 characters of letters, "
                                                    "digits and _.:@- starting with a letter or digit")
        if name in seen_names:
            raise InputError(f"{where}.name", name, f"duplicates {field_name}[{seen_names[name]}]")
        seen_names[name] = position
        underlay = plan.underlay_address(f"{where}.underlay_ip", entry.get("underlay_ip"))
        if underlay in seen_ips:
            raise InputError(f"{where}.underlay_ip", str(underlay),
                             f"duplicates {field_name}[{seen_ips[underlay]}]")
        seen_ips[underlay] = position
        declared = None
        if entry.get("id") not in (None, ""):
            declared = plan.check_runner_id(f"{where}.id", entry["id"])
            if declared in seen_ids:
                raise InputError(f"{where}.id", declared, f"duplicates {field_name}[{seen_ids[declared]}]")
            seen_ids[declared] = position
        specs.append(RunnerSpec(name, underlay, declared))
    return specs


def resolve_runner_ids(plan: AddressPlan, specs: Sequence[RunnerSpec],
                       records: Sequence[RunnerRecord] = (),
                       link_remotes: Mapping[int, ipaddress.IPv4Address] | None = None,
                       keep_undeclared: bool = False,
                       blocked: Iterable[int] = (),
                       field_name: str = "runners") -> list[ResolvedRunner]:
    """Give every declared runner an id without ever renumbering one.

    Precedence: a declared id; the id recorded for the runner's name (or, for a renamed
    runner, for its underlay IP); the id of an existing link whose remote is the
    runner's underlay IP (interfaces are the source of truth); the lowest free id.
    With keep_undeclared (purge=false) ids of recorded runners and links that are not
    declared stay reserved. `blocked` ids (their link name is taken by something netloom
    does not own) are never allocated. A declared id that would take the id another declared
    runner holds is refused instead of silently renumbering that runner.
    """
    link_remotes = dict(link_remotes or {})
    declared_names = {spec.name for spec in specs}
    declared_ips = {spec.underlay_ip for spec in specs}
    by_name = {record.name: record for record in records}
    # A renamed runner reclaims its id by underlay IP, unless its old name is still declared.
    by_ip = {record.underlay_ip: record for record in records if record.name not in declared_names}
    position = {spec.name: index for index, spec in enumerate(specs)}
    taken: dict[int, str] = {}
    resolved: dict[str, ResolvedRunner] = {}

    def take(spec: RunnerSpec, runner_id: int, source: str) -> None:
        taken[runner_id] = spec.name
        resolved[spec.name] = ResolvedRunner(spec.name, spec.underlay_ip, runner_id, source)

    for spec in specs:
        if spec.declared_id is not None:
            take(spec, spec.declared_id, "declared")

    def claim(spec: RunnerSpec, runner_id: int, source: str) -> bool:
        """Keep an id the runner already holds; refuse a declared id that takes it away."""
        if not 1 <= runner_id <= plan.max_runner_id:
            return False
        holder = taken.get(runner_id)
        if holder is None:
            take(spec, runner_id, source)
            return True
        if resolved[holder].source == "declared":
            raise InputError(f"{field_name}[{position[holder]}].id", runner_id,
                             f"runner {spec.name} ({spec.underlay_ip}) already holds id {runner_id} "
                             f"({source}); declaring it for {holder} would renumber {spec.name}")
        return False

    undeclared = [spec for spec in specs if spec.declared_id is None]
    for spec in undeclared:
        record = by_name.get(spec.name) or by_ip.get(spec.underlay_ip)
        if record is not None:
            claim(spec, record.runner_id, "recorded")
    for spec in undeclared:
        if spec.name in resolved:
            continue
        for runner_id in sorted(rid for rid, remote in link_remotes.items() if remote == spec.underlay_ip):
            if claim(spec, runner_id, "link"):
                break
    pending = [spec for spec in undeclared if spec.name not in resolved]

    reserved = set(taken) | set(blocked)
    if keep_undeclared:
        reserved |= {record.runner_id for record in records
                     if record.name not in declared_names and record.underlay_ip not in declared_ips}
        reserved |= {rid for rid, remote in link_remotes.items() if remote not in declared_ips}

    free = (rid for rid in range(1, plan.max_runner_id + 1) if rid not in reserved)
    for spec in pending:
        runner_id = next(free, None)
        if runner_id is None:
            raise InputError(f"{field_name}[{position[spec.name]}]", spec.name,
                             f"no free runner id left: plan {plan} allows ids 1..{plan.max_runner_id}")
        resolved[spec.name] = ResolvedRunner(spec.name, spec.underlay_ip, runner_id, "allocated")

    return [resolved[spec.name] for spec in specs]


# ---- the hub's state file ------------------------------------------------------------


def parse_state(text: str, source: str = "state_file") -> list[RunnerRecord]:
    """Read the hub's runner records; a corrupt file is an error, never silently reset."""
    if not text.strip():
        return []
    try:
        data = json.loads(text)
        runners = data["runners"]
        return [RunnerRecord(str(name), int(entry["id"]), ipaddress.IPv4Address(entry["underlay_ip"]))
                for name, entry in runners.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(source, text[:200], f"not a netloom runner state file ({err})") from None


def render_state(records: Sequence[RunnerRecord]) -> str:
    """The state file's canonical JSON (sorted, so unchanged records mean unchanged bytes)."""
    runners = {record.name: {"id": record.runner_id, "underlay_ip": str(record.underlay_ip)}
               for record in sorted(records, key=lambda record: record.name)}
    return json.dumps({"version": STATE_VERSION, "runners": runners}, indent=2, sort_keys=True) + "\n"
