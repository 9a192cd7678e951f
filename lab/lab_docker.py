"""Lab runtime on the local Docker engine: networks, one systemd container per node, node set-up.

Everything the lab creates carries the label `netloom.lab=<lab>`, so `down` removes exactly
that. `up` compares what exists with what the topology asks for (a hash of each object's
creation parameters is kept in a label) and creates, starts or recreates only what is
missing or different; the per-node set-up (key, dockerd, routes, sysctls, echo service) is
idempotent and runs every time, so it also repairs drift.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import ipaddress
import json
import os
import posixpath
import shlex
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import lab_image
import lab_topology
import yaml
from lab_topology import Node, NodeAccess, Topology

REPO = Path(__file__).resolve().parents[1]
STATE_DIR = REPO / ".lab"
KEY_FILE = STATE_DIR / "ssh" / "id_ed25519"
DEFAULT_INVENTORY = REPO / "inventory" / "lab" / "hosts.yml"
WORKLOAD_IMAGE = "netloom-lab/busybox:latest"

LABEL_LAB = "netloom.lab"
LABEL_NODE = "netloom.lab.node"
LABEL_NETWORK = "netloom.lab.network"
LABEL_SPEC = "netloom.lab.spec"
MGMT = "mgmt"
# The lab's SSH networks are /24s from here: outside Docker's default address pools, the
# project's own ranges (10/8 overlay, 172.30/16 runner network) and the test ranges.
MGMT_POOL = ipaddress.IPv4Network("172.16.0.0/16")
BOOT_TIMEOUT = 180.0
DOCKERD_TIMEOUT = 90.0

# systemd as PID 1 with its own dockerd inside (verified on these hosts): --privileged and
# --cap-add ALL fail on these hosts, this explicit set works.
NODE_CAPS = ("SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "SYS_MODULE", "SYS_RAWIO", "SYS_NICE", "MKNOD",
             "AUDIT_CONTROL", "DAC_READ_SEARCH", "IPC_LOCK", "IPC_OWNER", "LEASE", "LINUX_IMMUTABLE",
             "MAC_ADMIN", "MAC_OVERRIDE", "NET_BROADCAST", "SYSLOG")

# Import the workload image into a node's own dockerd from the node's busybox-static:
# no registry is reachable, and the image then matches the node's architecture and libc-free.
WORKLOAD_SCRIPT = f"""set -e
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/etc" "$work/tmp" "$work/root"
chmod 1777 "$work/tmp"
cp /bin/busybox "$work/bin/busybox"
"$work/bin/busybox" --install "$work/bin"
echo 'root:x:0:0:root:/root:/bin/sh' > "$work/etc/passwd"
echo 'root:x:0:' > "$work/etc/group"
tar -C "$work" -c . | docker import -c 'CMD ["sh"]' - {WORKLOAD_IMAGE} >/dev/null
"""


class LabError(Exception):
    """The lab cannot be brought to the requested state; the message says what and why."""


def connect() -> docker.DockerClient:
    """A Docker SDK client that negotiates the API version (dockerd 20.10 speaks 1.41)."""
    try:
        client = docker.from_env(version="auto", timeout=600)
        client.ping()
    except docker.errors.DockerException as exc:
        raise LabError(f"cannot reach the Docker engine ({exc}); scripts/bootstrap.sh starts it") from None
    return client


def spec_hash(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pick_management_subnet(used: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first /24 of MGMT_POOL that no Docker network and no host route uses."""
    taken = list(used)
    for candidate in MGMT_POOL.subnets(new_prefix=24):
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise LabError(f"no free /24 left in {MGMT_POOL} for the lab's SSH network")


def ensure_key() -> bytes:
    """The lab's SSH key (made once, kept in .lab/ssh/); returns the public key."""
    if not KEY_FILE.exists():
        KEY_FILE.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "netloom-lab",
                        "-f", str(KEY_FILE)], check=True)
    return Path(f"{KEY_FILE}.pub").read_bytes()


def write_yaml(path: Path, data: Any, header: str) -> None:
    """Replace `path` atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    os.replace(temporary, path)


def inventory_owner(path: Path) -> str | None:
    """The lab that wrote this inventory file (its `netloom_lab` variable), or None."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    try:
        return data["all"]["vars"]["netloom_lab"]
    except (KeyError, TypeError):
        return None


@dataclass
class Names:
    """Docker object names of one lab: all prefixed `netloom-<lab>-`."""

    lab: str

    def network(self, network: str) -> str:
        return f"netloom-{self.lab}-{network}"

    def container(self, node: str) -> str:
        return f"netloom-{self.lab}-{node}"

    def volume(self, node: str) -> str:
        return f"netloom-{self.lab}-{node}-docker"


class Lab:
    """One lab (a topology) on the local Docker engine."""

    def __init__(self, client: docker.DockerClient, topology: Topology, say: Callable[[str], None]) -> None:
        self.client = client
        self.topology = topology
        self.names = Names(topology.name)
        self._say = say
        self._say_lock = threading.Lock()
        self.record_file = STATE_DIR / "labs" / f"{topology.name}.json"
        self.workloads: dict[str, str] = {}  # workload image name -> hash tag on the host engine

    def say(self, message: str) -> None:
        with self._say_lock:
            self._say(f"{self.topology.name}: {message}")

    def lock(self):
        return lab_image.file_lock(STATE_DIR / "locks" / f"lab-{self.topology.name}.lock")

    def lab_filter(self, **extra: str) -> dict[str, list[str]]:
        labels = [f"{LABEL_LAB}={self.topology.name}"] + [f"{key}={value}" for key, value in extra.items()]
        return {"label": labels}

    # ---- up --------------------------------------------------------------------------------

    def up(self, inventory_file: Path, molecule_config: Path | None) -> dict[str, NodeAccess]:
        with self.lock():
            self._check_inventory_target(inventory_file)
            public_key = ensure_key()
            tag = lab_image.ensure_image(self.client, STATE_DIR, self.say)
            image_id = self.client.images.get(tag).id
            self.workloads = {name: lab_image.workload_image(name, self.client, STATE_DIR, self.say)
                              for node in self.topology.nodes.values() for name in node.images}
            self._remove_stray_containers()
            networks = self._ensure_networks()
            self._sync_firewall(networks)
            containers = {name: self._ensure_container(node, image_id, networks)
                          for name, node in self.topology.nodes.items()}
            self._remove_stray_networks_and_volumes()
            lab_image.prune_old_images(self.client, tag, self.say)
            access = self._bring_up_nodes(containers, public_key)
            self._write_inventories(inventory_file, access)
            if molecule_config is not None:
                instances = lab_topology.render_molecule_instances(self.topology, access, KEY_FILE)
                header = f"# Molecule instance config of lab {self.topology.name} (lab/netloom_lab.py up).\n"
                write_yaml(molecule_config, instances, header)
                self.say(f"molecule instance config: {molecule_config}")
            return access

    def _check_inventory_target(self, path: Path) -> None:
        """Never overwrite an inventory that is not ours or belongs to another lab that is up."""
        if not path.exists():
            return
        owner = inventory_owner(path)
        if owner is None:
            raise LabError(f"{path} exists and was not written by the lab: pass another --inventory-file")
        if owner != self.topology.name and self.client.containers.list(all=True, filters={
                "label": f"{LABEL_LAB}={owner}"}):
            raise LabError(f"{path} is the inventory of lab {owner}, which is up: pass another "
                           f"--inventory-file (or bring {owner} down first)")

    def _remove_stray_containers(self) -> None:
        for container in self.client.containers.list(all=True, filters=self.lab_filter()):
            if container.labels.get(LABEL_NODE) not in self.topology.nodes:
                container.remove(force=True)
                self.say(f"container {container.name}: removed (node no longer in the topology)")

    def _network_specs(self) -> dict[str, dict[str, Any]]:
        """What each network must be; the SSH network's subnet is chosen only when it is created."""
        specs: dict[str, dict[str, Any]] = {
            # The only network with an address on the host (docker-proxy forwards the SSH
            # port to it); no NAT, and the FORWARD rules below drop anything routed from it.
            MGMT: {"internal": False, "options": {"com.docker.network.bridge.enable_ip_masquerade": "false"}},
        }
        for network in self.topology.networks.values():
            # Internal and without an address on the host's bridge: the host must not get a
            # route into a lab subnet (this machine's own uplink may use 192.0.2.0/24).
            specs[network.name] = {"internal": True,
                                   "options": {"com.docker.network.bridge.inhibit_ipv4": "true"},
                                   "subnet": str(network.subnet), "gateway": str(network.gateway)}
        return specs

    def _ensure_networks(self) -> dict[str, Any]:
        networks = {}
        for name, spec in self._network_specs().items():
            docker_name = self.names.network(name)
            wanted = spec_hash(spec)
            existing = self.client.networks.list(names=[docker_name])
            existing = [net for net in existing if net.name == docker_name]
            if existing:
                network = existing[0]
                if network.attrs.get("Labels", {}).get(LABEL_LAB) != self.topology.name:
                    raise LabError(f"docker network {docker_name} exists but was not made by lab "
                                   f"{self.topology.name}: remove or rename it")
                if network.attrs["Labels"].get(LABEL_SPEC) == wanted:
                    networks[name] = network
                    continue
                self._remove_network(network, "its settings changed")
            networks[name] = self._create_network(name, docker_name, spec, wanted)
        return networks

    def _remove_network(self, network: Any, why: str) -> None:
        network.reload()
        for container_id in network.attrs.get("Containers") or {}:
            container = self.client.containers.get(container_id)
            if container.labels.get(LABEL_LAB) != self.topology.name:
                raise LabError(f"docker network {network.name} must be recreated ({why}) but container "
                               f"{container.name}, which is not the lab's, uses it")
            container.remove(force=True)
            self.say(f"container {container.name}: removed (its network {network.name} is recreated)")
        network.remove()
        self.say(f"network {network.name}: removed ({why})")

    def _create_network(self, name: str, docker_name: str, spec: dict[str, Any], wanted: str) -> Any:
        subnet = spec.get("subnet") or str(pick_management_subnet(self._used_subnets()))
        gateway = spec.get("gateway")
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet, gateway=gateway)])
        labels = {LABEL_LAB: self.topology.name, LABEL_NETWORK: name, LABEL_SPEC: wanted}
        try:
            network = self.client.networks.create(docker_name, driver="bridge", internal=spec["internal"],
                                                  options=spec["options"], ipam=ipam, labels=labels,
                                                  check_duplicate=True)
        except docker.errors.APIError as exc:
            raise LabError(f"cannot create docker network {docker_name} ({subnet}): {exc.explanation} "
                           "(subnets of labs that are up at the same time must not overlap)") from None
        self.say(f"network {docker_name}: created ({subnet})")
        return network

    def _used_subnets(self) -> list[ipaddress.IPv4Network]:
        used = []
        for network in self.client.networks.list():
            for pool in (network.attrs.get("IPAM") or {}).get("Config") or []:
                try:
                    used.append(ipaddress.IPv4Network(pool.get("Subnet", ""), strict=False))
                except ValueError:  # IPv6 pools
                    continue
        routes = json.loads(subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"],
                                           capture_output=True, text=True, check=True).stdout or "[]")
        for route in routes:
            destination = route.get("dst", "")
            if destination and destination != "default":
                used.append(ipaddress.IPv4Network(destination, strict=False))
        return used

    def _bridge(self, network: Any) -> str:
        options = network.attrs.get("Options") or {}
        return options.get("com.docker.network.bridge.name") or f"br-{network.id[:12]}"

    def _firewall_comment(self) -> str:
        return f"netloom-lab:{self.topology.name}"

    def _sync_firewall(self, networks: dict[str, Any]) -> None:
        """The lab's rules at the top of Docker's DOCKER-USER chain (made to be extended so).

        Lab networks are internal, and with br_netfilter Docker's isolation rules would drop
        bridged traffic to another subnet (a node routing through the `outside` node): accept
        what stays on a lab bridge. Drop whatever a node routes through the SSH network, so
        nothing from the lab can leave the machine through the host.
        """
        comment = ["-m", "comment", "--comment", self._firewall_comment()]
        wanted = []
        for name, network in networks.items():
            bridge = self._bridge(network)
            if name == MGMT:
                wanted.append(["-i", bridge, "!", "-o", bridge, *comment, "-j", "DROP"])
            else:
                wanted.append(["-i", bridge, "-o", bridge, *comment, "-j", "ACCEPT"])
        current = self._firewall_rules()
        for rule in current:
            if rule not in wanted:
                _iptables(["-D", "DOCKER-USER", *rule])
        for rule in reversed(wanted):
            if rule not in current:
                _iptables(["-I", "DOCKER-USER", "1", *rule])
        if wanted != current:
            self.say(f"DOCKER-USER: {len(wanted)} rules (comment {self._firewall_comment()})")

    def _firewall_rules(self) -> list[list[str]]:
        rules = []
        for line in _iptables(["-S", "DOCKER-USER"]).splitlines():
            words = shlex.split(line)
            if words[:2] == ["-A", "DOCKER-USER"] and self._firewall_comment() in words:
                rules.append(words[2:])
        return rules

    def _container_spec(self, node: Node, image_id: str, networks: dict[str, Any]) -> tuple[dict, dict]:
        volumes = {"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}}
        if node.docker:  # overlay2 on a volume instead of vfs on the container's overlay
            volumes[self.names.volume(node.name)] = {"bind": "/var/lib/docker", "mode": "rw"}
        kwargs = {
            "image": image_id, "name": self.names.container(node.name), "hostname": node.name,
            "cap_add": list(NODE_CAPS), "security_opt": ["seccomp=unconfined", "apparmor=unconfined"],
            "devices": ["/dev/net/tun:/dev/net/tun:rwm"], "cgroupns": "host", "volumes": volumes,
            "tmpfs": {"/run": "", "/run/lock": ""}, "environment": {"container": "docker"},
            "ports": {"22/tcp": ("127.0.0.1",)}, "network": self.names.network(MGMT),
            "stop_signal": "SIGRTMIN+3", "detach": True,
            # back after a dockerd restart, but a node someone stopped stays stopped until `up`
            "restart_policy": {"Name": "unless-stopped"},
        }
        attachments = {self.names.network(net): str(address) for net, address in node.addresses.items()}
        wanted = spec_hash({"create": kwargs, "attach": attachments,
                            "networks": {name: net.id for name, net in networks.items()}})
        kwargs["labels"] = {LABEL_LAB: self.topology.name, LABEL_NODE: node.name, LABEL_SPEC: wanted}
        return kwargs, attachments

    def _ensure_container(self, node: Node, image_id: str, networks: dict[str, Any]) -> Any:
        kwargs, attachments = self._container_spec(node, image_id, networks)
        try:
            container = self.client.containers.get(kwargs["name"])
        except docker.errors.NotFound:
            container = None
        if container is not None:
            if container.labels.get(LABEL_LAB) != self.topology.name:
                raise LabError(f"container {container.name} exists but was not made by lab "
                               f"{self.topology.name}")
            if self._is_current(container, kwargs["labels"][LABEL_SPEC], attachments):
                if container.status != "running":
                    container.start()
                    self.say(f"container {container.name}: started")
                return container
            container.remove(force=True)
            self.say(f"container {container.name}: removed (image, settings or networks changed)")
        if node.docker:
            self._ensure_volume(node)
        container = self.client.containers.create(**kwargs)
        try:
            for network_name, address in attachments.items():
                self.client.networks.get(network_name).connect(container, ipv4_address=address)
            container.start()
        except docker.errors.APIError as exc:
            container.remove(force=True)
            raise LabError(f"cannot start node {node.name}: {exc.explanation}") from None
        self.say(f"container {container.name}: created")
        return container

    def _is_current(self, container: Any, wanted: str, attachments: dict[str, str]) -> bool:
        if container.labels.get(LABEL_SPEC) != wanted:
            return False
        connected = container.attrs["NetworkSettings"]["Networks"]
        if self.names.network(MGMT) not in connected:
            return False
        for network_name, address in attachments.items():
            settings = connected.get(network_name) or {}
            if (settings.get("IPAMConfig") or {}).get("IPv4Address") != address:
                return False
        return True

    def _ensure_volume(self, node: Node) -> None:
        name = self.names.volume(node.name)
        try:
            self.client.volumes.get(name)
        except docker.errors.NotFound:
            self.client.volumes.create(name, labels={LABEL_LAB: self.topology.name, LABEL_NODE: node.name})

    def _remove_stray_networks_and_volumes(self) -> None:
        wanted_networks = {self.names.network(name) for name in self._network_specs()}
        for network in self.client.networks.list(filters=self.lab_filter()):
            if network.name not in wanted_networks:
                self._remove_network(network, "no longer in the topology")
        wanted_volumes = {self.names.volume(node.name)
                          for node in self.topology.nodes.values() if node.docker}
        for volume in self.client.volumes.list(filters=self.lab_filter()):
            if volume.name not in wanted_volumes:
                volume.remove(force=True)
                self.say(f"volume {volume.name}: removed (its node no longer runs dockerd)")

    def _bring_up_nodes(self, containers: dict[str, Any], public_key: bytes) -> dict[str, NodeAccess]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(containers)) as pool:
            futures = {name: pool.submit(NodeSetup(self, self.topology.nodes[name], container).run,
                                         public_key)
                       for name, container in containers.items()}
            errors = [future.exception() for future in futures.values() if future.exception()]
        if errors:
            raise LabError("\n".join(str(error) for error in errors))
        return {name: future.result() for name, future in futures.items()}

    def _write_inventories(self, inventory_file: Path, access: dict[str, NodeAccess]) -> None:
        """Write the requested inventory and refresh the lab's other ones (SSH ports may have moved)."""
        known_hosts = STATE_DIR / "ssh" / f"known_hosts-{self.topology.name}"
        known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        known_hosts.write_text(lab_topology.render_known_hosts(access))
        inventory = lab_topology.render_inventory(self.topology, access, KEY_FILE, known_hosts)
        header = (f"# Inventory of lab {self.topology.name}, written by lab/netloom_lab.py up; "
                  "removed by its `down`.\n")
        paths = [inventory_file.resolve()]
        for known in self._recorded_inventories():
            if known not in paths and known.exists() and inventory_owner(known) == self.topology.name:
                paths.append(known)
        for path in paths:
            write_yaml(path, inventory, header)
            self.say(f"inventory: {path}")
        self._record_inventories(paths)

    def _recorded_inventories(self) -> list[Path]:
        try:
            return [Path(path) for path in json.loads(self.record_file.read_text())["inventories"]]
        except (OSError, ValueError, KeyError):
            return []

    def _record_inventories(self, paths: list[Path]) -> None:
        self.record_file.parent.mkdir(parents=True, exist_ok=True)
        record = {"inventories": [str(path) for path in paths]}
        self.record_file.write_text(json.dumps(record, indent=2) + "\n")

    # ---- restart ---------------------------------------------------------------------------

    def restart(self, nodes: list[str], inventory_file: Path, molecule_config: Path | None) -> None:
        """Reboot nodes: a clean systemd shutdown, a new network namespace and a real boot.

        Nothing of netloom's is re-applied here: whatever a node holds afterwards came back by
        itself. `up` then only waits for the boot and refreshes the inventories (SSH ports move).
        """
        unknown = sorted(set(nodes) - set(self.topology.nodes))
        if unknown:
            raise LabError(f"lab {self.topology.name} has no node {', '.join(unknown)}")
        with self.lock():
            for name in nodes:
                container = self.client.containers.get(self.names.container(name))
                container.restart(timeout=60)
                self.say(f"node {name}: restarted")
        self.up(inventory_file, molecule_config)

    # ---- down ------------------------------------------------------------------------------

    def down(self, inventory_file: Path) -> None:
        with self.lock():
            for container in self.client.containers.list(all=True, filters=self.lab_filter()):
                container.remove(force=True)
                self.say(f"container {container.name}: removed")
            for network in self.client.networks.list(filters=self.lab_filter()):
                self._remove_network(network, "lab down")
            for volume in self.client.volumes.list(filters=self.lab_filter()):
                volume.remove(force=True)
                self.say(f"volume {volume.name}: removed")
            for rule in self._firewall_rules():
                _iptables(["-D", "DOCKER-USER", *rule])
                self.say(f"DOCKER-USER: removed {' '.join(rule)}")
            for path in {inventory_file.resolve(), *self._recorded_inventories()}:
                if path.exists() and inventory_owner(path) == self.topology.name:
                    path.unlink()
                    self.say(f"inventory {path}: removed")
            self.record_file.unlink(missing_ok=True)


def _iptables(args: list[str]) -> str:
    result = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"iptables {' '.join(args)}: {result.stderr.strip()} "
                       "(the DOCKER-USER chain exists while dockerd runs with iptables enabled)")
    return result.stdout


class NodeSetup:
    """Bring one started node container to its configured state (runs in a worker thread)."""

    def __init__(self, lab: Lab, node: Node, container: Any) -> None:
        self.lab = lab
        self.node = node
        self.container = container

    def run(self, public_key: bytes) -> NodeAccess:
        self.container.reload()
        port = int(self.container.attrs["NetworkSettings"]["Ports"]["22/tcp"][0]["HostPort"])
        self.put_file("/root/.ssh/authorized_keys", public_key, 0o600, directory_mode="0700")
        self.wait_for_boot(port)
        if self.node.docker:
            self.start_dockerd()
        interfaces = self.interfaces()
        script = lab_topology.render_network_script(self.lab.topology, self.node, interfaces)
        self.put_file("/etc/netloom-lab/network.sh", script.encode(), 0o644, directory_mode="0755")
        self.check(["systemctl", "restart", "netloom-lab-network.service"],
                   explain=["journalctl", "-u", "netloom-lab-network.service", "-n", "20", "--no-pager"])
        self.sync_echo()
        return NodeAccess(port, interfaces, self.host_keys())

    def host_keys(self) -> tuple[str, ...]:
        """The node's SSH host public keys, read through Docker (a channel the controller trusts)."""
        output = self.check(["sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"])
        keys = tuple(" ".join(line.split()[:2]) for line in output.splitlines() if line.strip())
        if not keys:
            raise LabError(f"node {self.node.name}: no SSH host keys in /etc/ssh")
        return keys

    def exec(self, argv: list[str]) -> tuple[int, str]:
        try:
            result = self.container.exec_run(argv)
        except docker.errors.APIError as exc:
            raise LabError(f"node {self.node.name}: {exc.explanation}") from None
        return result.exit_code, result.output.decode(errors="replace")

    def check(self, argv: list[str], explain: list[str] | None = None) -> str:
        code, output = self.exec(argv)
        if code != 0:
            detail = self.exec(explain)[1] if explain else ""
            raise LabError(f"node {self.node.name}: `{shlex.join(argv)}` failed (exit {code}): "
                           f"{output.strip()}\n{detail}".rstrip())
        return output

    def put_file(self, path: str, content: bytes, mode: int, directory_mode: str) -> None:
        directory, name = posixpath.split(path)
        self.check(["install", "-d", "-m", directory_mode, directory])
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), mode, int(time.time())
            archive.addfile(info, io.BytesIO(content))
        self.container.put_archive(directory, buffer.getvalue())

    def wait_for_boot(self, port: int) -> None:
        """Until systemd has finished booting and sshd answers on the published port."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = self.exec(["systemctl", "is-system-running"])[1].strip()
            if state in ("running", "degraded") and _ssh_answers(port):
                break
            time.sleep(0.5)
        else:
            raise LabError(f"node {self.node.name}: not ready after {BOOT_TIMEOUT:.0f} s "
                           f"(systemd: {state or 'no answer'}, sshd on 127.0.0.1:{port}: no banner)")
        if state == "degraded":
            failed = self.exec(["systemctl", "--failed", "--plain", "--no-legend"])[1].strip()
            self.lab.say(f"node {self.node.name}: systemd degraded: {failed}")

    def start_dockerd(self) -> None:
        """The node's own dockerd, enabled so a restarted node starts it again; plus the workload image."""
        self.check(["systemctl", "enable", "--now", "docker.socket", "docker.service"])
        deadline = time.monotonic() + DOCKERD_TIMEOUT
        while self.exec(["docker", "info", "--format", "{{.ServerVersion}}"])[0] != 0:
            if time.monotonic() > deadline:
                journal = self.exec(["journalctl", "-u", "docker", "-n", "15", "--no-pager"])[1]
                raise LabError(f"node {self.node.name}: dockerd did not answer within "
                               f"{DOCKERD_TIMEOUT:.0f} s: {journal}")
            time.sleep(0.5)
        if self.exec(["docker", "image", "inspect", WORKLOAD_IMAGE])[0] != 0:
            self.check(["sh", "-c", WORKLOAD_SCRIPT])
            self.lab.say(f"node {self.node.name}: imported {WORKLOAD_IMAGE} into its dockerd")
        for name in self.node.images:
            self.load_workload(self.lab.workloads[name])

    def load_workload(self, tag: str) -> None:
        """`docker save | docker exec -i NODE docker load`, unless the node has that image id already."""
        image_id = self.lab.client.images.get(tag).id
        code, node_id = self.exec(["docker", "image", "inspect", "--format", "{{.Id}}", tag])
        if code == 0 and node_id.strip() == image_id:
            return
        latest = f"{tag.rpartition(':')[0]}:latest"
        save = subprocess.Popen(["docker", "save", tag, latest],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        load = subprocess.run(["docker", "exec", "-i", self.container.name, "docker", "load", "-q"],
                              stdin=save.stdout, capture_output=True, check=False)
        save.stdout.close()
        save_error = save.stderr.read().decode(errors="replace")
        save.stderr.close()
        if save.wait() != 0 or load.returncode != 0:
            raise LabError(f"node {self.node.name}: loading {tag} failed: {save_error.strip()} "
                           f"{load.stderr.decode(errors='replace').strip()}")
        self.lab.say(f"node {self.node.name}: loaded {tag} into its dockerd")

    def interfaces(self) -> dict[str, str]:
        """Which interface Docker gave the node on each lab network (found by its address)."""
        by_address = {}
        for link in json.loads(self.check(["ip", "-j", "-4", "addr", "show"])):
            for info in link.get("addr_info", []):
                by_address[info.get("local")] = link["ifname"]
        interfaces = {}
        for network, address in self.node.addresses.items():
            if str(address) not in by_address:
                raise LabError(f"node {self.node.name}: no interface has {address} (network {network})")
            interfaces[network] = by_address[str(address)]
        return interfaces

    def sync_echo(self) -> None:
        """Run the declared echo services, and stop the lab's echo units the topology no longer has."""
        wanted = [echo.unit for echo in self.node.echo]
        listed = self.check(["systemctl", "list-units", "--all", "--plain", "--no-legend",
                             "netloom-lab-echo@*"]).split("\n")
        running = {line.split()[0] for line in listed if line.strip()}
        _, enabled = self.exec(["ls", "/etc/systemd/system/multi-user.target.wants/"])
        enabled_units = {name for name in enabled.split() if name.startswith("netloom-lab-echo@")}
        for unit in sorted((running | enabled_units) - set(wanted)):
            self.check(["systemctl", "disable", "--now", unit])
            self.lab.say(f"node {self.node.name}: {unit} stopped (not in the topology)")
        for echo in self.node.echo:
            self.check(["systemctl", "enable", "--now", echo.unit])
            url = f"http://{echo.address}:{echo.port}/"
            deadline = time.monotonic() + 15
            while self.exec(["curl", "-sf", "--max-time", "2", url])[0] != 0:
                if time.monotonic() > deadline:
                    raise LabError(f"node {self.node.name}: {echo.unit} does not answer on {url}: "
                                   + self.exec(["journalctl", "-u", echo.unit, "-n", "10", "--no-pager"])[1])
                time.sleep(0.3)


def _ssh_answers(port: int) -> bool:
    """docker-proxy accepts at once; only sshd itself sends the SSH banner."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(2)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


@dataclass(frozen=True)
class NodeStatus:
    lab: str
    node: str
    state: str
    ssh: str
    addresses: str


def status(client: docker.DockerClient, lab: str | None) -> list[NodeStatus]:
    """Every lab node container (or one lab's), with its container/systemd state and SSH port."""
    label = f"{LABEL_LAB}={lab}" if lab else LABEL_LAB
    rows = []
    for container in client.containers.list(all=True, filters={"label": label}):
        state = container.status
        if state == "running":
            result = container.exec_run(["systemctl", "is-system-running"])
            state = f"running/{result.output.decode(errors='replace').strip() or 'unknown'}"
        bindings = (container.attrs["NetworkSettings"].get("Ports") or {}).get("22/tcp") or []
        ssh = f"127.0.0.1:{bindings[0]['HostPort']}" if bindings else "-"
        prefix = f"netloom-{container.labels[LABEL_LAB]}-"
        addresses = []
        for name, settings in container.attrs["NetworkSettings"]["Networks"].items():
            static = (settings.get("IPAMConfig") or {}).get("IPv4Address")
            address = static or settings.get("IPAddress") or "?"
            addresses.append(f"{name.removeprefix(prefix)}={address}")
        rows.append(NodeStatus(container.labels[LABEL_LAB], container.labels.get(LABEL_NODE, "?"), state, ssh,
                               " ".join(addresses)))
    return sorted(rows, key=lambda row: (row.lab, row.node))
