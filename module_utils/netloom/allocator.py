"""The one overlay address allocator of a runner: Docker containers, VMs and reservations alike.

The reference system had three allocators (hub, Docker IPAM, VMs) that ignored each other and
kept their reservations in memory. Here every workload address of runner N's subnet comes from
this one book, kept on the runner itself, so it survives runs, reboots and a new controller.

Where it lives: `<root>/var/lib/netloom/overlay-addresses.json` for the overlay, and
`addresses-<book>.json` beside it for a book the caller names (`nat`: the standard-mode VMs'
NAT bridge) (0600 in a 0700 folder, written
atomically through files.write_file); `<root>` is / on a node and NETLOOM_STATE_ROOT in tests
(as NETLOOM_PERSIST_ROOT for persist.py). Runs on one node are serialised by an exclusive
flock on `<root>/run/lock/netloom-overlay-addresses.lock`, held from the read of the book until
the run's plan has executed (`with allocator.locked(): ...` around the whole module body).

What is never handed out:
- the network, gateway (offset+1), hub (offset+254) and broadcast addresses;
- any address held by another key in the book (whatever its owner kind);
- any address live on the overlay bridge that the book does not explain: the bridge's own
  addresses, neighbour entries in a confirmed state (reachable, permanent, noarp, delay,
  probe; a stale or failed entry proves nothing), and every Docker endpoint on the overlay
  network, running or not (a stopped container's fixed IPAMConfig address included).
- any address inside the overlay Docker network's own `ip_range` (IPAM Config IPRange, read
  from Docker under the lock): Docker hands those out to containers started without a fixed
  address and knows nothing of VMs or reservations, so neither automatic allocation nor a fixed
  address (of any owner kind: a stopped container's fixed address there could be handed to
  another container before it starts again) may use them. overlay_runner gives the network the
  lower half of the runner's subnet by default; netloom's own containers always take an
  allocator address. A network without an ip_range lets Docker use the whole subnet: then
  automatic allocation still counts down from the top, away from Docker's bottom-up handout,
  but an address Docker hands out later is not guarded.
Automatic allocation counts down from the top of the workload range.

API (keys: 1..128 of letters, digits and _.:@-; owners: container | vm | reservation):

    from ansible.module_utils.netloom.allocator import OverlayAllocator, addressing_from_bridge

    allocator = OverlayAllocator(module, addressing, nl=nl, docker_client=client)
    with allocator.locked():                      # reads the book and the live bridge
        allocator.reconcile(plan)                 # free leaks that are certain (see below)
        address = allocator.reserve(plan, "vm-web1", "vm", fixed=None, field_name="address",
                                    prefer=None)  # prefer: the address its live workload holds
        ...                                       # plan the workload with `address`
        finish(module, plan, address=str(address))  # runs the plan (not in check mode)

    allocator.release(plan, "vm-web1")            # state=absent: returns the freed address
    allocator.lookup("vm-web1")                   # Allocation | None, read only

`reserve` and `release` change the in-memory book at once (so a second call in the same run
sees the first) and add one ChangePlan step that writes the book as it stands then; check mode
runs the same code and skips the steps, so it reports the same address and writes nothing.
Reserving a key again returns its recorded address (idempotent); a fixed address different from
the recorded one moves the key. A fixed address is validated: inside the workload range, not
the gateway or hub, not held by another key, not in use on the bridge; errors name the field
and the value (InputError). A key recorded with another owner kind is refused.

Reconcile frees an allocation only when its workload is certainly gone: a `container` key whose
labelled container (label netloom.address.key=KEY, any state) no longer exists while Docker
answered. Other owners are freed only through a checker the caller passes
(`alive={"vm": lambda key: bool | None}`; None means unknown and keeps the allocation).
Explicit reservations are released only by `release`.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ansible.module_utils.netloom.common import (
    ChangePlan,
    CommandError,
    InputError,
    ipv4_address,
    ipv4_network,
)
from ansible.module_utils.netloom.files import exclusive_lock, read_text, write_file
from ansible.module_utils.netloom.plan import HUB_HOST_OFFSET, RunnerAddressing

OWNER_KINDS = ("container", "vm", "reservation")
# Docker objects holding an allocation carry this label with their key: reconcile finds them.
ADDRESS_KEY_LABEL = "netloom.address.key"
STATE_FILE = "var/lib/netloom/overlay-addresses.json"
LOCK_FILE = "run/lock/netloom-overlay-addresses.lock"
STATE_VERSION = 1
STATE_MODE = 0o600
STATE_DIR_MODE = 0o700
DEFAULT_BRIDGE = "kohaku-overlay"
DEFAULT_NETWORK = "kohakuriver-overlay"
# Neighbour states that show a live holder; stale/failed/incomplete entries outlive their holder.
LIVE_NEIGHBOUR_STATES = frozenset({"reachable", "permanent", "noarp", "delay", "probe"})
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")


def state_root() -> str:
    """/ on a node; tests point NETLOOM_STATE_ROOT at a scratch directory."""
    return os.environ.get("NETLOOM_STATE_ROOT") or "/"


def addressing_from_subnet(subnet: ipaddress.IPv4Network, runner_id: int = 0) -> RunnerAddressing:
    """A runner's addresses from its subnet, as AddressPlan.runner derives them (gateway +1, hub
    +254 or the last usable address). runner_id is not implied by the subnet and only informs."""
    offset = subnet.network_address
    last = subnet.broadcast_address - 1
    return RunnerAddressing(runner_id=runner_id, subnet=subnet, gateway=offset + 1,
                            hub_address=min(offset + HUB_HOST_OFFSET, last),
                            first_workload=offset + 2, last_workload=last)


def addressing_from_bridge(interface: ipaddress.IPv4Interface, runner_id: int = 0) -> RunnerAddressing:
    """A runner's addresses from its bridge's gateway address (10.N.0.1/16): the bridge is the live
    truth of which subnet this runner has."""
    subnet = interface.network
    if interface.ip != subnet.network_address + 1:
        raise InputError("bridge address", str(interface),
                         f"the overlay bridge holds {interface}, not the gateway "
                         f"{subnet.network_address + 1} of {subnet}")
    return addressing_from_subnet(subnet, runner_id)


def open_runner_allocator(module: Any, nl: Any, docker_client: Any, bridge: str, network: str,
                          subnet: Any = None, required: bool = True,
                          book: str | None = None) -> OverlayAllocator | None:
    """The runner's allocator, addressed from the live bridge or from `subnet` (option `subnet`).

    With `subnet` given it must match the bridge when the bridge exists; while the bridge does not
    exist yet (overlay_runner converges it earlier in the same run) only check mode may go on, so
    check mode on a never-converged runner still reports the address the real run would take.
    Without a bridge or subnet: an InputError when `required`, else None.
    """
    gateway = [interface for interface in nl.dump().addresses_of(bridge) if interface.network.prefixlen < 31]
    live = addressing_from_bridge(gateway[0]) if gateway else None
    if subnet not in (None, ""):
        wanted = addressing_from_subnet(ipv4_network("subnet", subnet))
        if live is not None and live.subnet != wanted.subnet:
            raise InputError("subnet", subnet, f"the overlay bridge {bridge} holds {gateway[0]} "
                                               f"(subnet {live.subnet})")
        if live is None and required and not module.check_mode:
            raise InputError("overlay_bridge", bridge, "has no IPv4 address on this runner (converge "
                                                       "overlay_runner first)")
        if live is None:
            module.warn(f"check mode: {bridge} does not exist yet; planning with subnet {wanted.subnet}")
        live = wanted
    if live is None:
        if required:
            raise InputError("overlay_bridge", bridge, "has no IPv4 address on this runner (converge "
                                                       "overlay_runner first, or use the default network)")
        return None
    return OverlayAllocator(module, live, nl=nl, docker_client=docker_client, bridge=bridge, network=network,
                            book=book)


def allocation_key(field_name: str, value: Any) -> str:
    text = value if isinstance(value, str) else ""
    if not _KEY_RE.fullmatch(text):
        raise InputError(field_name, value, "an address key is 1..128 letters, digits and _.:@-, "
                                            "starting with a letter or digit")
    return text


def owner_kind(field_name: str, value: Any) -> str:
    if value not in OWNER_KINDS:
        raise InputError(field_name, value, f"owner kind must be one of {', '.join(OWNER_KINDS)}")
    return str(value)


@dataclass(frozen=True)
class Allocation:
    key: str
    owner: str
    address: ipaddress.IPv4Address

    def describe(self) -> dict[str, str]:
        return {"key": self.key, "owner": self.owner, "address": str(self.address)}


@dataclass(frozen=True)
class LiveUse:
    """Something live on the bridge holding an address; `key` when it is a labelled workload."""

    address: ipaddress.IPv4Address
    what: str
    key: str | None = None


class AddressBook:
    """The allocations of one runner subnet and the pure decisions on them (no I/O)."""

    def __init__(self, addressing: RunnerAddressing, allocations: Mapping[str, Allocation] | None = None,
                 in_use: list[LiveUse] | None = None,
                 docker_range: ipaddress.IPv4Network | None = None) -> None:
        self.addressing = addressing
        self.allocations: dict[str, Allocation] = dict(allocations or {})
        self.in_use = list(in_use or [])
        self.docker_range = docker_range  # Docker's own handout range on the overlay network

    # ---- the file ----

    @classmethod
    def parse(cls, addressing: RunnerAddressing, text: str | None, source: str) -> AddressBook:
        """Read the book; a corrupt file or one for another subnet is an error, never reset."""
        if text is None or not text.strip():
            return cls(addressing)
        try:
            data = json.loads(text)
            subnet = ipaddress.IPv4Network(data["subnet"])
            allocations = {}
            for key, entry in data["allocations"].items():
                allocations[key] = Allocation(allocation_key(f"{source} key", key),
                                              owner_kind(f"{source} {key}.owner", entry["owner"]),
                                              ipaddress.IPv4Address(entry["address"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(source, text[:200], f"not a netloom overlay address book ({err})") from None
        if subnet != addressing.subnet:
            raise InputError(source, str(subnet),
                             f"records allocations of subnet {subnet} but the overlay bridge is on "
                             f"{addressing.subnet}: the runner was renumbered; release or move the "
                             "workloads before reusing this book")
        return cls(addressing, allocations)

    def render(self) -> str:
        """Canonical JSON: unchanged allocations mean unchanged bytes."""
        allocations = {key: {"owner": item.owner, "address": str(item.address)}
                       for key, item in sorted(self.allocations.items())}
        return json.dumps({"version": STATE_VERSION, "subnet": str(self.addressing.subnet),
                           "allocations": allocations}, indent=2, sort_keys=True) + "\n"

    # ---- decisions ----

    def holder_of(self, address: ipaddress.IPv4Address, key: str) -> str | None:
        """Who other than `key` holds `address`, as a phrase; None when it is free for `key`."""
        for other in self.allocations.values():
            if other.address == address and other.key != key:
                return f"allocated to {other.owner} {other.key}"
        recorded = self.allocations.get(key)
        for use in self.in_use:
            if use.address != address:
                continue
            if use.key == key:
                continue
            if use.key is None and recorded is not None and recorded.address == address:
                continue  # the bridge sees our own workload there (an ARP entry, say)
            if use.key is not None and use.key in self.allocations \
                    and self.allocations[use.key].address == address:
                return f"allocated to {self.allocations[use.key].owner} {use.key}"
            return f"in use by {use.what}"
        return None

    def check_fixed(self, field_name: str, value: Any, key: str) -> ipaddress.IPv4Address:
        """A fixed address a workload asked for: in range, not gateway/hub, free for `key`."""
        address = ipv4_address(field_name, value)
        ranges = self.addressing
        if address == ranges.gateway:
            raise InputError(field_name, value, f"is the runner's gateway ({ranges.subnet})")
        if address == ranges.hub_address:
            raise InputError(field_name, value, f"is the hub's address on {ranges.subnet}")
        if not ranges.first_workload <= address <= ranges.last_workload:
            raise InputError(field_name, value, f"is outside this runner's workload range "
                                                f"{ranges.first_workload}..{ranges.last_workload}")
        if self.docker_range is not None and address in self.docker_range:
            raise InputError(field_name, value, f"is inside {self.docker_range}, the range Docker hands out "
                                                "on the overlay network to containers without a fixed "
                                                "address; choose an address outside it")
        holder = self.holder_of(address, key)
        if holder is not None:
            raise InputError(field_name, value, f"is {holder}")
        return address

    def candidates(self) -> Iterator[ipaddress.IPv4Address]:
        """Workload addresses from the top down, without the hub address and Docker's range."""
        ranges = self.addressing
        current = int(ranges.last_workload)
        while current >= int(ranges.first_workload):
            if self.docker_range is not None and ipaddress.IPv4Address(current) in self.docker_range:
                current = int(self.docker_range.network_address) - 1  # skip the whole range
                continue
            address = ipaddress.IPv4Address(current)
            if address != ranges.hub_address:
                yield address
            current -= 1

    def allowed(self, address: ipaddress.IPv4Address) -> bool:
        """In the workload range, not the hub, not in Docker's range."""
        ranges = self.addressing
        return address != ranges.hub_address and ranges.first_workload <= address <= ranges.last_workload \
            and (self.docker_range is None or address not in self.docker_range)

    def choose(self, key: str, owner: str, fixed: Any = None, field_name: str = "address",
               prefer: ipaddress.IPv4Address | None = None) -> Allocation:
        """The allocation `key` gets (not yet recorded): its recorded one, the fixed one, `prefer`
        (the address its running workload already has) when free for it, or the highest free one."""
        recorded = self.allocations.get(key)
        if recorded is not None and recorded.owner != owner:
            raise InputError("key", key, f"is recorded for owner kind {recorded.owner}, not {owner}")
        if fixed not in (None, ""):
            return Allocation(key, owner, self.check_fixed(field_name, fixed, key))
        if recorded is not None:
            return recorded
        ranges = self.addressing
        if prefer is not None and self.allowed(prefer) and self.holder_of(prefer, key) is None:
            return Allocation(key, owner, prefer)
        for address in self.candidates():
            if self.holder_of(address, key) is None:
                return Allocation(key, owner, address)
        outside = f", outside Docker's range {self.docker_range}" if self.docker_range is not None else ""
        raise InputError("key", key, f"no free overlay address left in {ranges.first_workload}.."
                                     f"{ranges.last_workload}{outside} ({ranges.workload_count} addresses, "
                                     f"{len(self.allocations)} allocated, the rest in use)")

    def record(self, allocation: Allocation) -> None:
        self.allocations[allocation.key] = allocation

    def forget(self, key: str) -> Allocation | None:
        return self.allocations.pop(key, None)

    def leaks(self, alive: Mapping[str, Callable[[str], bool | None]]) -> list[Allocation]:
        """Allocations whose workload a checker says is certainly gone (False, not None)."""
        gone = []
        for key, allocation in sorted(self.allocations.items()):
            checker = alive.get(allocation.owner)
            if allocation.owner != "reservation" and checker is not None and checker(key) is False:
                gone.append(allocation)
        return gone


class OverlayAllocator:
    """The book on the node: lock, read (file + live bridge + Docker), plan writes."""

    def __init__(self, module: Any, addressing: RunnerAddressing, nl: Any = None, docker_client: Any = None,
                 bridge: str = DEFAULT_BRIDGE, network: str = DEFAULT_NETWORK,
                 book: str | None = None) -> None:
        self.module = module
        self.addressing = addressing
        self.nl = nl
        self.client = docker_client
        self.bridge = bridge
        self.network = network
        self.book_name = book
        self.book = AddressBook(addressing)
        self.labelled_keys: set[str] | None = None  # None: Docker not asked or did not answer

    @property
    def state_path(self) -> str:
        """The overlay's book, whatever its bridge is called; a named `book` (standard-mode VMs'
        NAT network: "nat") is a file of its own, chosen by the caller, never by a bridge name."""
        if self.book_name is None:
            return os.path.join(state_root(), STATE_FILE)
        return os.path.join(state_root(), f"var/lib/netloom/addresses-{self.book_name}.json")

    @contextlib.contextmanager
    def locked(self) -> Iterator[OverlayAllocator]:
        """Hold the runner's allocator lock and read the book and live use under it."""
        with exclusive_lock(os.path.join(state_root(), LOCK_FILE)):
            self.load()
            yield self

    def load(self) -> None:
        book = AddressBook.parse(self.addressing, read_text(self.state_path), self.state_path)
        book.in_use = self._bridge_use() + self._docker_use()
        book.docker_range = self._docker_range()
        self.book = book

    def _docker_range(self) -> ipaddress.IPv4Network | None:
        """The overlay network's IPAM ip_range in this subnet; None without one (or no network yet)."""
        if self.client is None:
            return None
        try:
            network = self.client.inspect_network(self.network)
        except Exception as err:  # docker.errors.NotFound: not made yet (check mode before overlay_runner)
            if getattr(getattr(err, "response", None), "status_code", None) == 404:
                return None
            raise CommandError(f"inspecting the overlay network {self.network}: {err}") from None
        for config in (network.get("IPAM") or {}).get("Config") or []:
            text = config.get("IPRange")
            with contextlib.suppress(ValueError):
                if text and ipaddress.IPv4Network(text).subnet_of(self.addressing.subnet):
                    return ipaddress.IPv4Network(text)
        return None

    def _bridge_use(self) -> list[LiveUse]:
        if self.nl is None:
            return []
        subnet = self.addressing.subnet
        snapshot = self.nl.dump()
        if snapshot.link(self.bridge) is None:
            return []
        found = [LiveUse(interface.ip, f"an address of {self.bridge}")
                 for interface in snapshot.addresses_of(self.bridge) if interface.ip in subnet]
        for neighbour in self.nl.neighbours(self.bridge):
            if neighbour.dst.version == 4 and neighbour.dst in subnet \
                    and LIVE_NEIGHBOUR_STATES.intersection(neighbour.state):
                state = "/".join(neighbour.state)
                found.append(LiveUse(neighbour.dst, f"a neighbour on {self.bridge} "
                                                    f"({neighbour.lladdr or 'no MAC'}, {state})"))
        return found

    def _docker_use(self) -> list[LiveUse]:
        """Every container's address on the overlay network, stopped ones' fixed addresses too."""
        if self.client is None:
            return []
        try:
            containers = self.client.containers(all=True)
        except Exception as err:  # docker.errors.DockerException, requests errors: Docker unreachable
            raise CommandError(f"listing containers for the overlay address book: {err}") from None
        self.labelled_keys = set()
        found = []
        for container in containers:
            labels = container.get("Labels") or {}
            key = labels.get(ADDRESS_KEY_LABEL)
            if key:
                self.labelled_keys.add(key)
            endpoint = ((container.get("NetworkSettings") or {}).get("Networks") or {}).get(self.network)
            if not endpoint:
                continue
            name = (container.get("Names") or [container.get("Id", "?")[:12]])[0].lstrip("/")
            texts = {endpoint.get("IPAddress"), ((endpoint.get("IPAMConfig") or {}).get("IPv4Address"))}
            for text in sorted(t for t in texts if t):
                with contextlib.suppress(ValueError):
                    address = ipaddress.IPv4Address(text.split("/")[0])
                    if address in self.addressing.subnet:
                        found.append(LiveUse(address, f"container {name}", key))
        return found

    # ---- the API the modules call ----

    def lookup(self, key: str) -> Allocation | None:
        return self.book.allocations.get(key)

    def reserve(self, plan: ChangePlan, key: str, owner: str, fixed: Any = None,
                field_name: str = "address",
                prefer: ipaddress.IPv4Address | None = None) -> ipaddress.IPv4Address:
        """The address of `key` (recorded, fixed, `prefer` or newly chosen); plans the write when it
        changes. `prefer`: the address the key's workload already holds (a lost book is rebuilt)."""
        key = allocation_key("key", key)
        owner = owner_kind("owner", owner)
        recorded = self.lookup(key)
        allocation = self.book.choose(key, owner, fixed, field_name, prefer)
        if allocation != recorded:
            self.book.record(allocation)
            self._plan_write(plan, key, "update" if recorded else "create",
                             recorded.describe() if recorded else None, allocation.describe())
        return allocation.address

    def release(self, plan: ChangePlan, key: str) -> ipaddress.IPv4Address | None:
        """Free `key`'s address (state=absent of its workload); None when it held none."""
        allocation = self.book.forget(allocation_key("key", key))
        if allocation is None:
            return None
        self._plan_write(plan, key, "delete", allocation.describe(), None)
        return allocation.address

    def reconcile(self, plan: ChangePlan,
                  alive: Mapping[str, Callable[[str], bool | None]] | None = None) -> list[Allocation]:
        """Free the allocations whose workloads are certainly gone; returns them."""
        checkers: dict[str, Callable[[str], bool | None]] = dict(alive or {})
        if "container" not in checkers and self.labelled_keys is not None:
            labelled = self.labelled_keys
            checkers["container"] = lambda key: key in labelled
        freed = self.book.leaks(checkers)
        for allocation in freed:
            self.book.forget(allocation.key)
            self._plan_write(plan, allocation.key, "delete", allocation.describe(), None)
        return freed

    def _plan_write(self, plan: ChangePlan, key: str, action: str, before: Any, after: Any) -> None:
        text = self.book.render()  # the book as it stands after this change
        plan.add(f"overlay address {key}", action, before, after,
                 lambda: write_file(self.module, self.state_path, text, mode=STATE_MODE,
                                    dir_mode=STATE_DIR_MODE))
