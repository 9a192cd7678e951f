#!/usr/bin/python
"""Ansible module pod: one Pinacle pod on a pod host (its network, its port, its container)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: pod
short_description: A Pinacle pod's lifecycle, with its own bridge network and one external port
description:
  - One pod on a pod host, through the Docker Engine API. The pod gets its own bridge network
    C(pinacle-pod-ID) (Linux bridge C(pod-ID)) with a /24 from I(pool), gateway .1, the pod .2,
    and one external port from I(port_range) published to the pod's port 80 on I(bind_address).
  - Allocation is persistent and exact. The pod's subnet and port are kept in labels on its
    network and container and in a host state file (I(state_file)); every run reconciles the two
    (live objects win; a recorded allocation without objects stays reserved, because freeing it is
    certain only when the pod is deleted here), like Kubernetes repairs its NodePort allocator.
    So a pod keeps its subnet and port across stop/start, re-runs, reboots and a new controller,
    and a deleted pod's subnet and port go to the next new pod.
  - A new subnet overlaps no Docker network, no host route and no host address (CIDR arithmetic);
    a new port is one nothing on the host listens on (/proc/net/tcp, tcp6) or publishes (any
    container, stopped ones included, by their C(HostConfig.PortBindings)). An existing pod's subnet or
    port that something else took meanwhile is an error. Runs on one host are serialised by an
    exclusive flock on C(/run/lock/netloom-pods.lock), held from reading labels and state file until
    the plan has run, so concurrent runs never hand out the same subnet or port.
  - Isolation and egress are rules in a chain netloom owns, C(NETLOOM-POD-ID), hooked from Docker's
    DOCKER-USER; new connections from the pod's bridge to the rest of I(pool) (other pods) are
    dropped, and with I(egress) so are new connections to private, link-local and metadata
    addresses (C(no-private), i.e. RFC1918, loopback, link-local and metadata, multicast, reserved,
    100.64.0.0/10, 192.0.0.0/24, 198.18.0.0/15) or to the listed CIDRs. Replies to connections made to
    the pod pass.
  - The host itself is out of reach too. Traffic to the host's own addresses (the pod's gateway, every
    other local address, sshd, ...) is not forwarded, so a second owned chain, C(NETLOOM-PODIN-ID),
    hooked from INPUT, drops new connections arriving from the pod's bridge. The pod needs nothing
    from the host on INPUT but replies (its DNS is Docker's embedded resolver inside its own
    namespace). Both chains are removed with the pod.
  - Updates. A changed I(cpus) is applied in place (C(docker update)); a changed image, env,
    volumes, runtime, bind address or a lost network means recreating the container. I(services)
    only shape the router's map (nginx_hostname_router), so changing them recreates nothing. The
    result's C(update) says which and why.
  - Reboot survival. The container has restart policy C(unless-stopped) (Docker brings a
    started pod back, a stopped one stays stopped) and keeps its network and published port.
    The chains, which a reboot loses, are put back by netloom-restore-early, BEFORE Docker starts
    and restarts the pod (a replay with I(chains_only); it creates an empty DOCKER-USER, which
    Docker keeps and jumps to), so a pod is never up unfiltered; netloom-restore-late (after
    Docker) then replays the whole module with its recorded arguments.
version_added: "0.1.0"
author: netloom
options:
  id:
    description: Pod id; one DNS label of at most 11 characters (its bridge is C(pod-ID), 15 at most).
    type: str
    required: true
  slug:
    description: The pod's slug in its hostnames (C(pod-SLUG.localhost)); defaults to I(id).
    type: str
  state:
    description:
      - C(present) and C(started) run the pod; C(stopped) keeps everything, container stopped, port and
        subnet held; C(absent) removes the container, network, chain, its allocation and its persistence.
    type: str
    choices: [present, started, stopped, absent]
    default: present
  image:
    description: Image of the pod container (must already be on the host). Required unless I(state=absent).
    type: str
  services:
    description:
      - Declared services C({name, port}) (the router routes only these); validated here, used by
        nginx_hostname_router; a change recreates nothing.
      - Left out, the seed's default tabs.
    type: list
    elements: dict
  env:
    description: Environment of the pod container.
    type: dict
    default: {}
  volumes:
    description: Binds C(SOURCE:TARGET[:ro|rw]).
    type: list
    elements: str
    default: []
  runtime:
    description: OCI runtime, e.g. C(runsc) for gVisor (must be configured in dockerd).
    type: str
  cpus:
    description: CPU limit (applied in place).
    type: float
  pool:
    description: Where pod subnets (/24 each) come from.
    type: str
    default: 10.249.0.0/16
  port_range:
    description: External ports, C(LOW-HIGH).
    type: str
    default: 30000-39999
  bind_address:
    description: Host address the external port is published on.
    type: str
    default: 0.0.0.0
  egress:
    description: C(open), C(no-private), or a list of CIDRs the pod may not open connections to.
    type: raw
    default: open
  state_file:
    description: The host's allocation state file.
    type: path
    default: /var/lib/netloom/pods/allocations.json
  docker_host:
    description: Docker Engine API address. Left out, E(DOCKER_HOST) or the local socket.
    type: str
  chains_only:
    description:
      - Converge only the pod's two iptables chains, without Docker, allocation or state file.
      - Set by netloom-restore-early's replay (before Docker runs), not by hand.
    type: bool
    default: false
  rendered:
    description: Set by netloom's action plugin (the netloom-restore units), not by hand.
    type: dict
    suboptions:
      restore_early:
        description: netloom-restore-early.service text.
        type: str
      restore_late:
        description: netloom-restore-late.service text.
        type: str
requirements:
  - python3-docker (Debian 12's 5.0.3 or newer)
  - iptables
notes:
  - Check mode reports the same plan (including the allocation a new pod would get) and changes nothing.
"""

EXAMPLES = r"""
- name: Pod a, private addresses blocked
  pod:
    id: a
    image: netloom-lab/pod:latest
    services: [{name: app, port: 3000}, {name: code, port: 8726}]
    egress: no-private

- name: Stop it (keeps its port and subnet)
  pod:
    id: a
    state: stopped
    image: netloom-lab/pod:latest
"""

RETURN = r"""
pod:
  description: The pod's allocation and objects.
  returned: always
  type: dict
  sample: {"id": "a", "slug": "a", "network": "pinacle-pod-a", "subnet": "10.249.0.0/24",
           "gateway": "10.249.0.1",
           "address": "10.249.0.2", "port": 30000, "bind_address": "0.0.0.0", "container": "pinacle-pod-a",
           "chain": "NETLOOM-POD-A", "input_chain": "NETLOOM-PODIN-A", "running": true}
update:
  description: What happened to the container and why (action none, create, in-place, recreate, remove).
  returned: always
  type: dict
  sample: {"action": "in-place", "reasons": ["cpus 1.0 -> 2.0"]}
repairs:
  description: What reconciling labels and state file found (and fixed in the state file).
  returned: always
  type: list
  elements: str
changes:
  description: Steps done (or, in check mode, that would be done).
  returned: always
  type: list
  elements: str
"""

import contextlib
import hashlib
import ipaddress
import json
import os
import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.netloom import persist, pods
from ansible.module_utils.netloom.allocator import state_root
from ansible.module_utils.netloom.common import (
    ChangePlan,
    CommandError,
    InputError,
    finish,
    guarded,
    run_command,
)
from ansible.module_utils.netloom.docker_network import create_request, docker_host_address
from ansible.module_utils.netloom.files import exclusive_lock, read_text, write_file
from ansible.module_utils.netloom.iptables import OwnedChain, find_tool, plan_chains, read_table
from ansible.module_utils.netloom.netlink import Netlink

try:
    import docker
    from docker.errors import DockerException, NotFound
except ImportError:
    DOCKER_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    DOCKER_IMPORT_ERROR = None

ARGUMENT_SPEC: dict[str, Any] = {
    "id": {"type": "str", "required": True},
    "slug": {"type": "str"},
    "state": {"type": "str", "choices": ["present", "started", "stopped", "absent"], "default": "present"},
    "image": {"type": "str"},
    "services": {"type": "list", "elements": "dict"},
    "env": {"type": "dict", "default": {}},
    "volumes": {"type": "list", "elements": "str", "default": []},
    "runtime": {"type": "str"},
    "cpus": {"type": "float"},
    "pool": {"type": "str", "default": pods.DEFAULT_POOL},
    "port_range": {"type": "str", "default": pods.DEFAULT_PORT_RANGE},
    "bind_address": {"type": "str", "default": "0.0.0.0"},
    "egress": {"type": "raw", "default": "open"},
    "state_file": {"type": "path", "default": pods.STATE_FILE},
    "docker_host": {"type": "str"},
    "chains_only": {"type": "bool", "default": False},
    **persist.RESTORE_OPTION,
}
RESTORE_ORDER = 60
# One host-wide lock for every pod run: Docker labels and the state file are shared by all pods.
LOCK_FILE = "run/lock/netloom-pods.lock"
CPU_PERIOD = 100000


class PodManager:
    """Validate, read Docker/kernel/state file once, reconcile, allocate, plan; `finish` runs the plan."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.p = module.params
        self.api: Any = None
        self.update: dict[str, Any] = {"action": "none", "reasons": []}

    # ---- input ----

    def validate(self) -> None:
        p = self.p
        self.id = pods.pod_id("id", p["id"])
        self.slug = pods.slug("slug", p["slug"] if p["slug"] is not None else p["id"])
        self.present = p["state"] != "absent"
        self.pool = pods.pool("pool", p["pool"])
        self.ports = pods.port_range("port_range", p["port_range"])
        pods.services("services", p["services"], pods.ROUTER_PORT)  # for the router; checked here too
        self.egress_mode, self.blocked = pods.egress("egress", p["egress"])
        try:
            self.bind = str(ipaddress.IPv4Address(p["bind_address"]))
        except ValueError:
            raise InputError("bind_address", p["bind_address"], "must be an IPv4 address") from None
        for index, bind in enumerate(p["volumes"]):
            parts = bind.split(":")
            if (
                len(parts) not in (2, 3)
                or not parts[1].startswith("/")
                or (len(parts) == 3 and parts[2] not in ("ro", "rw"))
            ):
                raise InputError(f"volumes[{index}]", bind, "must be SOURCE:/TARGET[:ro|rw]")
        if p["cpus"] is not None and not 0.01 <= p["cpus"] <= 1024:
            raise InputError("cpus", p["cpus"], "must be 0.01 to 1024")
        for key, value in p["env"].items():
            if not str(key) or "=" in str(key):
                raise InputError(f"env.{key}", value, "not an environment variable name")
        if self.present and not p["image"]:
            raise InputError("image", None, f"is required with state={p['state']}")
        self.network = pods.network_name(self.id)
        self.bridge = pods.bridge_name(self.id)
        self.chain = pods.chain_name(self.id)
        self.input_chain = pods.input_chain_name(self.id)

    # ---- reading ----

    def connect(self) -> None:
        if DOCKER_IMPORT_ERROR is not None:
            self.module.fail_json(
                msg=missing_required_lib("docker (Debian: python3-docker)"), exception=DOCKER_IMPORT_ERROR
            )
        host = docker_host_address(self.p["docker_host"])
        try:
            self.api = docker.APIClient(base_url=host, version="auto")
            self.api.ping()
        except DockerException as err:
            raise CommandError(f"cannot reach Docker at {host}: {err}") from None

    def inspect(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return getattr(self.api, f"inspect_{kind}")(name)
        except NotFound:
            return None

    def read(self) -> None:
        self.image_id = None
        if self.present:
            image = self.inspect("image", self.p["image"])
            if image is None:
                raise InputError(
                    "image", self.p["image"], "is not on the host (docker images): load or build it first"
                )
            self.image_id = image["Id"]
        self.live_network = self.inspect("network", self.network)
        self.live_container = self.inspect("container", self.network)
        for kind, live in (("network", self.live_network), ("container", self.live_container)):
            labels = (
                (live or {}).get("Labels")
                if kind == "network"
                else ((live or {}).get("Config") or {}).get("Labels")
            )
            if live is not None and (labels or {}).get(pods.LABEL_POD) != self.id:
                raise InputError(
                    "id", self.id, f"{kind} {self.network} exists but is not netloom's pod {self.id}"
                )
        networks = self.api.networks()
        containers = self.api.containers(all=True)
        labelled = [a for a in (pods.from_labels(n.get("Labels")) for n in networks) if a]
        labelled += [a for a in (pods.from_labels(c.get("Labels")) for c in containers) if a]
        self.recorded_text = read_text(self.p["state_file"])
        self.table, self.repairs = pods.reconcile(labelled, pods.parse_state(self.recorded_text))
        # What a pod subnet must not overlap: every other Docker network, every host route and address.
        foreign: list[ipaddress.IPv4Network] = []
        for network in networks:
            if network.get("Name") == self.network or (network.get("Labels") or {}).get(pods.LABEL_POD):
                continue
            for config in (network.get("IPAM") or {}).get("Config") or []:
                try:
                    foreign.append(ipaddress.IPv4Network(config.get("Subnet", ""), strict=False))
                except ValueError:
                    continue  # IPv6 or empty
        with Netlink() as netlink:
            snapshot = netlink.dump(routes=True)
        own_index = snapshot.links[self.bridge].index if self.bridge in snapshot.links else None
        foreign += [
            route.dst for route in snapshot.routes if route.dst.prefixlen > 0 and route.oif != own_index
        ]
        for index, interfaces in snapshot.addresses.items():
            if index != own_index:
                foreign += [interface.network for interface in interfaces if interface.network.prefixlen < 32]
        self.foreign = foreign
        # What a port must not be: a listener or a published port of anything but this pod.
        own_port = pods.from_labels(((self.live_container or {}).get("Config") or {}).get("Labels"))
        busy = pods.listening_ports(read_text(path) or "" for path in ("/proc/net/tcp", "/proc/net/tcp6"))
        for container in containers:
            if (container.get("Labels") or {}).get(pods.LABEL_POD) == self.id:
                continue
            busy.update(
                entry["PublicPort"] for entry in container.get("Ports") or [] if entry.get("PublicPort")
            )
            if container.get("State") != "running":  # the list shows Ports of running containers only
                busy.update(self.bound_ports(container["Id"]))
        if own_port is not None and self.live_container and self.live_container["State"].get("Running"):
            busy.discard(own_port.port)  # its own docker-proxy listens there
        self.busy = busy

    def bound_ports(self, container_id: str) -> set[int]:
        """Host ports a (stopped) container publishes when it starts: its HostConfig.PortBindings."""
        live = self.inspect("container", container_id) or {}
        bindings = (live.get("HostConfig") or {}).get("PortBindings") or {}
        return {
            int(entry["HostPort"])
            for entries in bindings.values()
            for entry in entries or []
            if str(entry.get("HostPort") or "").isdigit()
        }

    # ---- planning ----

    def allocate(self) -> pods.Allocation:
        known = self.table.get(self.id)
        if known is None:
            subnet = pods.allocate_subnet(self.id, "pool", self.pool, self.table, self.foreign)
            number = pods.allocate_port(self.id, "port_range", self.ports, self.table, self.busy)
            return pods.Allocation(self.id, subnet, number)
        conflict = pods.foreign_conflict(known.subnet, self.foreign)
        if conflict:
            raise InputError(
                "pool",
                str(self.pool),
                f"pod {self.id}'s subnet {known.subnet} now overlaps {conflict} "
                "on the host: remove that or delete the pod",
            )
        if known.port in self.busy:
            raise InputError(
                "port_range",
                self.p["port_range"],
                f"pod {self.id}'s port {known.port} is now used by something else on the host",
            )
        return known

    def labels(self, allocation: pods.Allocation) -> dict[str, str]:
        """The network's and container's identity labels; services are not among them (they only
        shape the router's map, so changing them must not recreate the network or the container)."""
        return {
            pods.LABEL_POD: self.id,
            pods.LABEL_SLUG: self.slug,
            pods.LABEL_SUBNET: str(allocation.subnet),
            pods.LABEL_PORT: str(allocation.port),
        }

    def container_spec(self, allocation: pods.Allocation) -> dict[str, Any]:
        """What the container is created from; a change of any of it means recreating."""
        return {
            "image": self.image_id,
            "env": {str(k): str(v) for k, v in sorted(self.p["env"].items())},
            "volumes": list(self.p["volumes"]),
            "runtime": self.p["runtime"],
            "bind": self.bind,
            "labels": self.labels(allocation),
            "address": str(allocation.subnet[2]),
        }

    def run(self) -> None:
        self.validate()
        if self.p["chains_only"]:
            self.run_chains_only()
            return
        self.connect()
        # Read labels and state file, allocate, write: all under one lock, or two runs hand out
        # the same subnet and port and one state file update is lost.
        with exclusive_lock(os.path.join(state_root(), LOCK_FILE)):
            self.converge()

    def run_chains_only(self) -> None:
        """netloom-restore-early: the pod's chains before Docker starts (and restarts the pod).

        DOCKER-USER does not exist yet then; it is created empty, and Docker keeps an existing
        DOCKER-USER (it only adds its FORWARD jump to it), so the pod's filter is in place before
        Docker starts the container. No Docker, no allocation, no state file here.
        """
        plan = ChangePlan()
        if self.present and "DOCKER-USER" not in read_table("filter"):
            plan.add("iptables filter DOCKER-USER", "create", None, [],
                     lambda: run_command([find_tool("iptables"), "-w", "-N", "DOCKER-USER"]))
            plan.add(f"iptables filter {self.chain} {self.input_chain}", "create", None, "pod chains",
                     lambda: plan_chains(self.chains(), "present").execute())
        else:
            plan.extend(plan_chains(self.chains(), "present" if self.present else "absent"))
        finish(self.module, plan, pod={"id": self.id, "chain": self.chain, "input_chain": self.input_chain},
               update=self.update, repairs=[])

    def converge(self) -> None:
        self.read()
        plan = ChangePlan()
        allocation = self.allocate() if self.present else self.table.get(self.id)
        result_pod: dict[str, Any] = {
            "id": self.id,
            "slug": self.slug,
            "network": self.network,
            "container": self.network,
            "chain": self.chain,
            "input_chain": self.input_chain,
        }
        if self.present:
            network_ok = self.plan_network(plan, allocation)
            self.plan_container(plan, allocation, network_ok)
            result_pod.update(
                {
                    "subnet": str(allocation.subnet),
                    "gateway": str(allocation.subnet[1]),
                    "address": str(allocation.subnet[2]),
                    "port": allocation.port,
                    "bind_address": self.bind,
                    "running": self.p["state"] != "stopped",
                }
            )
        else:
            self.plan_absent(plan)
            result_pod["running"] = False
        self.plan_chain(plan)
        table = dict(self.table)
        if self.present:
            table[self.id] = allocation
        else:
            table.pop(self.id, None)
        wanted_state = pods.render_state(table)
        if wanted_state != self.recorded_text:
            path = self.p["state_file"]
            plan.add(
                f"state file {path}",
                "update" if self.recorded_text else "create",
                self.recorded_text,
                wanted_state,
                lambda: write_file(self.module, path, wanted_state, 0o600, dir_mode=0o700),
            )
        # Early: the chains alone, before Docker restarts the pod; late: the whole pod again.
        early = {**self.p, "chains_only": True}
        if self.present:
            persist.plan_record(plan, self.module, "pod", f"{self.id}.chains", RESTORE_ORDER,
                                phases=["early"], params=early)
            persist.plan_record(
                plan, self.module, "pod", self.id, RESTORE_ORDER, phases=["late"], after=["docker.service"]
            )
        else:
            persist.plan_forget(plan, self.module, "pod", f"{self.id}.chains", RESTORE_ORDER)
            persist.plan_forget(plan, self.module, "pod", self.id, RESTORE_ORDER)
        finish(self.module, plan, pod=result_pod, update=self.update, repairs=self.repairs)

    def plan_network(self, plan: ChangePlan, allocation: pods.Allocation) -> bool:
        """Network to its wanted config; False when it is (re)created (the container must follow)."""
        live = self.live_network
        wanted = {
            "subnet": str(allocation.subnet),
            "gateway": str(allocation.subnet[1]),
            "bridge": self.bridge,
            "labels": self.labels(allocation),
        }
        current = None
        if live is not None:
            config = ((live.get("IPAM") or {}).get("Config") or [{}])[0]
            current = {
                "subnet": config.get("Subnet"),
                "gateway": config.get("Gateway"),
                "bridge": (live.get("Options") or {}).get("com.docker.network.bridge.name"),
                "labels": {
                    k: v for k, v in (live.get("Labels") or {}).items() if k in wanted["labels"]
                },
            }
            if current == wanted:
                return True
            plan.add(f"network {self.network}", "delete", current, None, self.remove_network)
        plan.add(f"network {self.network}", "create", None, wanted, lambda: self.create_network(allocation))
        return False

    def create_network(self, allocation: pods.Allocation) -> None:
        request = create_request({
            "subnet": str(allocation.subnet),
            "gateway": str(allocation.subnet[1]),
            "bridge_name": self.bridge,
            "labels": self.labels(allocation),
        })
        self.api.create_network(self.network, check_duplicate=True, **request)

    def remove_network(self) -> None:
        self.remove_container()  # a network with an endpoint cannot be removed
        self.api.remove_network(self.network)

    def remove_container(self) -> None:
        with contextlib.suppress(NotFound):  # already removed with its network
            self.api.remove_container(self.network, force=True)

    def plan_container(self, plan: ChangePlan, allocation: pods.Allocation, network_ok: bool) -> None:
        live = self.live_container
        spec = self.container_spec(allocation)
        spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        want_running = self.p["state"] != "stopped"
        reasons = []
        if live is None:
            self.update = {"action": "create", "reasons": ["no container"]}
        else:
            live_labels = live["Config"].get("Labels") or {}
            if live_labels.get(pods.LABEL_SPEC) != spec_hash:
                reasons += self.spec_reasons(live, spec)
            if not network_ok:
                reasons.append(f"network {self.network} was missing or changed (recreated)")
            elif self.network not in (live["NetworkSettings"].get("Networks") or {}):
                reasons.append(f"container is not attached to {self.network}")
            if reasons:
                self.update = {"action": "recreate", "reasons": reasons}
                plan.add(f"container {self.network}", "delete", live_labels, None, self.remove_container)
        if live is None or reasons:
            plan.add(
                f"container {self.network}",
                "create",
                None,
                {**spec, "running": want_running},
                lambda: self.create_container(allocation, spec, spec_hash, want_running),
            )
            return
        cpus = self.p["cpus"]
        live_quota = live["HostConfig"].get("CpuQuota") or 0
        wanted_quota = int(cpus * CPU_PERIOD) if cpus is not None else live_quota
        if wanted_quota != live_quota:
            self.update = {"action": "in-place", "reasons": [f"cpus {live_quota / CPU_PERIOD} -> {cpus}"]}
            plan.add(
                f"container {self.network} cpus",
                "update",
                live_quota / CPU_PERIOD,
                cpus,
                lambda: self.api.update_container(
                    self.network, cpu_period=CPU_PERIOD, cpu_quota=wanted_quota
                ),
            )
        running = bool(live["State"].get("Running"))
        if running != want_running:
            plan.add(
                f"container {self.network}",
                "start" if want_running else "stop",
                "running" if running else "stopped",
                "running" if want_running else "stopped",
                (lambda: self.api.start(self.network))
                if want_running
                else (lambda: self.api.stop(self.network, timeout=10)),
            )

    def spec_reasons(self, live: dict[str, Any], spec: dict[str, Any]) -> list[str]:
        """Which recreate-only settings differ, compared with what the container really has."""
        config, host = live["Config"], live["HostConfig"]
        env = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
        binding = ((host.get("PortBindings") or {}).get("80/tcp") or [{}])[0]
        reasons = []
        if live.get("Image") != spec["image"]:
            reasons.append(f"image {live.get('Image', '')[:19]} -> {spec['image'][:19]}")
        if any(env.get(key) != value for key, value in spec["env"].items()):
            reasons.append("env changed")
        if sorted(host.get("Binds") or []) != sorted(spec["volumes"]):
            reasons.append(f"volumes {host.get('Binds') or []} -> {spec['volumes']}")
        if (host.get("Runtime") or "runc") != (spec["runtime"] or "runc"):
            reasons.append(f"runtime {host.get('Runtime')} -> {spec['runtime']}")
        if (
            binding.get("HostIp", "") not in (spec["bind"], "")
            or binding.get("HostPort") != spec["labels"][pods.LABEL_PORT]
        ):
            reasons.append(
                f"published {binding.get('HostIp')}:{binding.get('HostPort')} -> "
                f"{spec['bind']}:{spec['labels'][pods.LABEL_PORT]}"
            )
        labels = config.get("Labels") or {}
        changed = [key for key, value in spec["labels"].items() if labels.get(key) != value]
        if changed:
            reasons.append(f"labels {', '.join(changed)} changed")
        return reasons or ["container settings changed"]

    def create_container(
        self, allocation: pods.Allocation, spec: dict[str, Any], spec_hash: str, running: bool
    ) -> None:
        host_config = self.api.create_host_config(
            port_bindings={80: (self.bind, allocation.port)},
            binds=spec["volumes"] or None,
            restart_policy={"Name": "unless-stopped"},
            runtime=spec["runtime"],
            cpu_period=CPU_PERIOD if self.p["cpus"] else None,
            cpu_quota=int(self.p["cpus"] * CPU_PERIOD) if self.p["cpus"] else None,
        )
        networking = self.api.create_networking_config(
            {self.network: self.api.create_endpoint_config(ipv4_address=spec["address"])}
        )
        self.api.create_container(
            self.p["image"],
            name=self.network,
            hostname=f"pod-{self.slug}",
            environment={**spec["env"], "POD_ID": self.id, "POD_SLUG": self.slug},
            labels={**spec["labels"], pods.LABEL_SPEC: spec_hash},
            ports=[80],
            host_config=host_config,
            networking_config=networking,
        )
        if running:
            self.api.start(self.network)

    def plan_absent(self, plan: ChangePlan) -> None:
        self.update = {"action": "none", "reasons": []}
        if self.live_container is not None:
            self.update = {"action": "remove", "reasons": ["state=absent"]}
            plan.add(f"container {self.network}", "delete", "exists", None, self.remove_container)
        if self.live_network is not None:
            plan.add(
                f"network {self.network}",
                "delete",
                "exists",
                None,
                lambda: self.api.remove_network(self.network),
            )

    def chains(self) -> list[OwnedChain]:
        """The pod's forward filter (other pods, egress) and its input filter (the host itself).

        Forwarded traffic never covers the host's own addresses (the pod's gateway, every other
        local address and its services): those packets take INPUT, so new connections from the
        pod's bridge are dropped there; replies to the host's own connections still pass. DNS is
        Docker's embedded resolver at 127.0.0.11 in the pod's own namespace, not the host.
        """
        rules = (
            f"-d {self.pool} -i {self.bridge} ! -o {self.bridge} -m conntrack --ctstate NEW -j DROP",
            *pods.egress_rules(self.bridge, self.blocked),
        )
        return [
            OwnedChain("filter", self.chain, ("DOCKER-USER",), rules),
            OwnedChain("filter", self.input_chain, ("INPUT",), pods.input_rules(self.bridge)),
        ]

    def plan_chain(self, plan: ChangePlan) -> None:
        plan.extend(plan_chains(self.chains(), "present" if self.present else "absent"))


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    guarded(module, PodManager(module).run)


if __name__ == "__main__":
    main()
