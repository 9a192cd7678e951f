"""What task_container and vps_container share on the node: Docker, the overlay address, the plan.

One run: validate every option (InputError names the field and the value), connect to Docker,
check the image is on the runner, find the workload's containers by label, take the runner's
allocator lock and reserve the overlay address (module_utils/netloom/allocator.py), build the
spec, then plan create / recreate / update / start / stop as ChangePlan steps, so check mode
and the real run come from the same code. Requests go through the docker SDK's low-level
APIClient, which Debian's python3-docker 5.0.3 and PyPI's 7.x both offer.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import traceback
from typing import Any

from ansible.module_utils.basic import missing_required_lib
from ansible.module_utils.netloom.allocator import (
    DEFAULT_BRIDGE,
    DEFAULT_NETWORK,
    OverlayAllocator,
    open_runner_allocator,
)
from ansible.module_utils.netloom.common import ChangePlan, CommandError, InputError
from ansible.module_utils.netloom.docker_network import docker_host_address
from ansible.module_utils.netloom.workload import (
    CPU_PERIOD,
    ID_LABEL,
    KIND_LABEL,
    LOGS_TARGET,
    SHARED_TARGET,
    TEMP_TARGET,
    Decision,
    Mount,
    command,
    container_name,
    container_status,
    cpu_quota,
    decide,
    device_requests,
    environment,
    gpus,
    image_ref,
    limit_updates,
    mounts,
    parse_cpus,
    parse_memory,
    spec_labels,
    workload_id,
)

try:
    import docker
    from docker.errors import DockerException, NotFound
except ImportError:
    DOCKER_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    DOCKER_IMPORT_ERROR = None

DIR_MODE = 0o750  # workload directories (logs, local temp) may hold secrets
ENV_MASK = "********"
DEFAULT_NETWORK_FALLBACK = "kohakuriver-net"

# Argument specs both modules take (each module documents them).
WORKLOAD_OPTIONS: dict[str, dict[str, Any]] = {
    "id": {"type": "raw", "required": True},
    "image": {"type": "str"},
    "command": {"type": "raw"},
    "env": {"type": "raw", "no_log": False},
    "cpus": {"type": "raw"},
    "memory": {"type": "raw"},
    "gpus": {"type": "raw"},
    "network": {"type": "str", "choices": ["overlay", "default"], "default": "overlay"},
    "address": {"type": "str"},
    "overlay_network": {"type": "str", "default": DEFAULT_NETWORK},
    "overlay_bridge": {"type": "str", "default": DEFAULT_BRIDGE},
    "subnet": {"type": "str"},
    "default_network": {"type": "str", "default": DEFAULT_NETWORK_FALLBACK},
    "shared_dir": {"type": "path", "default": "/var/lib/kohakuriver/shared"},
    "logs_dir": {"type": "path", "default": "/var/lib/kohakuriver/logs"},
    "temp_dir": {"type": "path", "default": "/var/lib/kohakuriver/tmp"},
    "mounts": {"type": "list", "elements": "raw", "default": []},
    "docker_host": {"type": "str"},
}


def api(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """One Docker call; an engine error becomes a CommandError saying what was being done."""
    try:
        return call(*args, **kwargs)
    except DockerException as err:
        raise CommandError(f"{what}: {err}") from None


class WorkloadManager:
    """Validation, lookup by label, the overlay address and the container steps of one workload."""

    kind = ""  # task | vps

    def __init__(self, module: Any, nl: Any) -> None:
        self.module = module
        self.nl = nl
        self.params = module.params
        self.plan = ChangePlan()
        self.ident = workload_id("id", self.params["id"])
        self.name = container_name(self.kind, self.ident)
        self.address_key = f"{self.kind}-{self.ident}"
        self.client: Any = None
        self.allocator: OverlayAllocator | None = None
        self.container: dict[str, Any] | None = None  # inspect of the owned container
        self.address: ipaddress.IPv4Address | None = None
        self.decision = Decision("keep")
        self.result: dict[str, Any] = {"name": self.name, "container_id": None, "status": "absent",
                                       "address": None, "network": None}

    # ---- validation ----

    def validate_spec(self) -> None:
        """Options that only matter when the workload is (re)created."""
        params = self.params
        if params["image"] in (None, ""):
            raise InputError("image", params["image"], f"is required with state={params['state']}")
        self.image = image_ref("image", params["image"])
        self.command = command("command", params["command"])
        self.env = environment("env", params["env"])
        self.cpus = parse_cpus("cpus", params["cpus"])
        self.memory = parse_memory("memory", params["memory"])
        self.gpus = gpus("gpus", params["gpus"])
        work = f"{self.kind}-{self.ident}"
        self.logs_path = os.path.join(params["logs_dir"], work)
        self.temp_path = os.path.join(params["temp_dir"], work)
        seeded = [Mount(params["shared_dir"], SHARED_TARGET), Mount(self.logs_path, LOGS_TARGET),
                  Mount(self.temp_path, TEMP_TARGET)]
        self.mounts = mounts("mounts", params["mounts"], seeded)
        if params["address"] and params["network"] != "overlay":
            raise InputError("address", params["address"], "a fixed address needs network=overlay")

    # ---- reading ----

    def connect(self) -> None:
        if DOCKER_IMPORT_ERROR is not None:
            self.module.fail_json(msg=missing_required_lib("docker (Debian: python3-docker)"),
                                  exception=DOCKER_IMPORT_ERROR)
        host = docker_host_address(self.params["docker_host"])
        self.client = api(f"connecting to Docker at {host}", docker.APIClient, base_url=host, version="auto")

    def inspect(self, ref: str) -> dict[str, Any] | None:
        try:
            return self.client.inspect_container(ref)
        except NotFound:
            return None
        except DockerException as err:
            raise CommandError(f"inspecting container {ref}: {err}") from None

    def check_image(self, image: str) -> dict[str, Any]:
        try:
            return self.client.inspect_image(image)
        except NotFound:
            raise InputError("image", image, "is not on this runner's Docker (no registry is pulled from: "
                                             "load or build it on the node first)") from None
        except DockerException as err:
            raise CommandError(f"inspecting image {image}: {err}") from None

    def find_owned(self) -> None:
        """The workload's container, found by its labels (adoption after a dockerd restart or reboot).

        A container holding the name without the labels is not ours: refused. More than one
        labelled container (left by an interrupted run) is reduced to the one with the name.
        """
        listed = api(f"listing {self.name}", self.client.containers, all=True,
                     filters={"label": [f"{KIND_LABEL}={self.kind}", f"{ID_LABEL}={self.ident}"]})
        owned = [self.inspect(item["Id"]) for item in listed]
        owned = [item for item in owned if item is not None]
        by_name = self.inspect(self.name)
        if by_name is not None and by_name["Id"] not in {item["Id"] for item in owned}:
            raise InputError("id", self.ident,
                             f"a container named {self.name} exists that netloom does not own "
                             f"(no labels {KIND_LABEL}={self.kind}, {ID_LABEL}={self.ident})")
        owned.sort(key=lambda item: (item["Name"].lstrip("/") != self.name, item.get("Created", "")))
        if owned:
            self.container = owned[0]
        for extra in owned[1:]:
            ref = extra["Id"]
            self.plan.add(f"container {extra['Name'].lstrip('/')}", "delete", {"id": ref[:12]}, None,
                          lambda ref=ref: api(f"removing duplicate {ref[:12]}", self.client.remove_container,
                                              ref, force=True))

    def open_allocator(self) -> OverlayAllocator | None:
        """The runner's allocator; None when the runner has no overlay and none is needed (the default
        network, or a removal)."""
        needed = self.params["network"] == "overlay" and self.params["state"] == "present"
        return open_runner_allocator(self.module, self.nl, self.client, self.params["overlay_bridge"],
                                     self.params["overlay_network"], self.params["subnet"], needed)

    def locked(self) -> Any:
        """The allocator lock for the rest of the run (nothing to lock without an overlay)."""
        self.allocator = self.open_allocator()
        return self.allocator.locked() if self.allocator is not None else contextlib.nullcontext()

    def require_container(self) -> dict[str, Any]:
        """The owned container, where the plan depends on one having been found."""
        if self.container is None:
            raise CommandError(f"{self.name}: planned a change of a container that was not found")
        return self.container

    def current_address(self) -> ipaddress.IPv4Address | None:
        if self.container is None:
            return None
        networks = self.container["NetworkSettings"].get("Networks") or {}
        endpoint = networks.get(self.params["overlay_network"]) or {}
        text = endpoint.get("IPAddress") or (endpoint.get("IPAMConfig") or {}).get("IPv4Address")
        return ipaddress.IPv4Address(text) if text else None

    def reserve_address(self) -> None:
        """Reserve (network=overlay) or release (default network) this workload's overlay address."""
        if self.allocator is None:
            return
        self.allocator.reconcile(self.plan)
        if self.params["network"] == "overlay":
            self.address = self.allocator.reserve(self.plan, self.address_key, "container",
                                                  fixed=self.params["address"], prefer=self.current_address())
        else:
            self.allocator.release(self.plan, self.address_key)

    def network_name(self) -> str:
        overlay = self.params["network"] == "overlay"
        name = self.params["overlay_network"] if overlay else self.params["default_network"]
        try:
            self.client.inspect_network(name)
        except NotFound:
            field = "overlay_network" if overlay else "default_network"
            if not self.module.check_mode:
                raise InputError(field, name, "no such Docker network on this runner") from None
            self.module.warn(f"check mode: Docker network {name} does not exist yet "
                             "(overlay_runner makes it)")
        except DockerException as err:
            raise CommandError(f"inspecting network {name}: {err}") from None
        return name

    # ---- the spec and the steps ----

    def base_spec(self, network: str) -> dict[str, Any]:
        return {"image": self.image, "command": self.command, "env": self.env, "gpus": self.gpus,
                "network": {"name": network, "address": str(self.address) if self.address else None},
                "mounts": [mount.describe() for mount in self.mounts]}

    def plan_directories(self) -> None:
        """The seed's three directories; 0750, as task output and temp files may hold secrets."""
        for mount in self.mounts[:3]:
            if not os.path.isdir(mount.source):
                path = mount.source
                self.plan.add(f"directory {path}", "create", None, f"{path} (mode {DIR_MODE:04o})",
                              lambda path=path: make_directory(path))

    def create_kwargs(self, spec: dict[str, Any], image: str, extra_labels: dict[str, str]) -> dict[str, Any]:
        """create_container's arguments for the spec (the limits as `docker update` sets them)."""
        network = spec["network"]["name"]
        host_config: dict[str, Any] = {
            "binds": [mount.bind() for mount in self.mounts],
            "network_mode": network,
            "device_requests": device_requests(self.gpus) or None,
            "cpu_period": CPU_PERIOD if self.cpus else None,
            "cpu_quota": cpu_quota(self.cpus) or None,
            "mem_limit": self.memory,
            "memswap_limit": self.memory,
        }
        host_config.update(self.host_config_extra())
        endpoint = self.client.create_endpoint_config(ipv4_address=spec["network"]["address"]) \
            if spec["network"]["address"] else self.client.create_endpoint_config()
        labels = spec_labels(self.kind, self.ident, spec,
                             self.address_key if spec["network"]["address"] else None)
        labels.update(extra_labels)
        return {"image": image, "command": self.command, "name": self.name, "environment": self.env,
                "labels": labels, "detach": True, "ports": self.exposed_ports(),
                "host_config": self.client.create_host_config(
                    **{key: value for key, value in host_config.items() if value is not None}),
                "networking_config": self.client.create_networking_config({network: endpoint})}

    def host_config_extra(self) -> dict[str, Any]:
        return {}

    def exposed_ports(self) -> list[int] | None:
        return None

    def plan_create(self, spec: dict[str, Any], image: str, extra_labels: dict[str, str] | None = None,
                    before: Any = None) -> None:
        """Create the container (not started: a VPS gets its keys first)."""
        kwargs = self.create_kwargs(spec, image, extra_labels or {})

        def create() -> None:
            created = api(f"creating {self.name}", self.client.create_container, **kwargs)
            self.result["container_id"] = created["Id"]

        self.plan.add(f"container {self.name}", "create", before,
                      {"image": image, "spec": masked_spec(spec), "cpus": self.cpus, "memory": self.memory},
                      create)

    def plan_remove(self, reason: str) -> None:
        container = self.require_container()
        ref = container["Id"]
        self.plan.add(f"container {self.name}", "delete", {"id": ref[:12], "reason": reason}, None,
                      lambda: api(f"removing {self.name}", self.client.remove_container, ref, force=True))

    def plan_limits(self) -> None:
        """cpus/memory changed on a kept container: `docker update`, no recreate."""
        container = self.require_container()
        updates = limit_updates(container["HostConfig"], self.cpus, self.memory)
        if not updates:
            return
        ref = container["Id"]
        live = container["HostConfig"]
        self.plan.add(f"container {self.name} limits", "update",
                      {"cpu_quota": live.get("CpuQuota"), "memory": live.get("Memory")},
                      {"cpu_quota": updates["cpu_quota"], "memory": updates["mem_limit"]},
                      lambda: api(f"updating {self.name}", self.client.update_container, ref, **updates))

    def plan_start(self, after: str | None = "running") -> None:
        """after=None right after a create step: the diff keeps the create step's spec under the
        same key (a later step's `after` replaces an earlier one's)."""
        self.plan.add(f"container {self.name}", "start", None, after,
                      lambda: api(f"starting {self.name}", self.client.start, self.name))

    def decide(self, spec: dict[str, Any]) -> Decision:
        if self.container is None:
            return Decision("create")
        return decide(self.container["Config"].get("Labels") or {}, spec)

    def describe(self) -> None:
        """Fill the result from the container as it is now (after the plan ran)."""
        live = self.inspect(self.name) if not self.module.check_mode else self.container
        if live is None:
            return
        networks = live["NetworkSettings"].get("Networks") or {}
        self.result.update(container_id=live["Id"], status=container_status(live["State"]),
                           network=next(iter(networks), None))
        overlay = networks.get(self.params["overlay_network"])
        if overlay:
            self.result["address"] = overlay.get("IPAddress") or \
                (overlay.get("IPAMConfig") or {}).get("IPv4Address") or None


def make_directory(path: str) -> None:
    """A workload directory, DIR_MODE whatever the umask (makedirs applies it)."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)


def masked_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as diff and results show it: env names kept, values masked (they may be secrets)."""
    shown = dict(spec)
    if shown.get("env"):
        shown["env"] = {name: ENV_MASK for name in shown["env"]}
    return shown


def remove_tree(path: str) -> None:
    """A workload's own directory (its local temp); one already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
