#!/usr/bin/python
"""Ansible module vps_container: a long-running KohakuRiver VPS container with SSH, snapshots and adoption."""
from __future__ import annotations

DOCUMENTATION = r"""
module: vps_container
short_description: A KohakuRiver VPS container kohakuriver-vps-ID with key-only SSH, snapshots and adoption
description:
  - Runs the long-running container C(kohakuriver-vps-ID) with restart policy C(unless-stopped), on the
    overlay network with an address from the runner's overlay address allocator (fixed or chosen) or
    on the default network, with the seed's mounts (C(/shared), logs, local temp) plus O(mounts).
  - SSH modes are V(disabled) (no port published, no key installed) or V(key) - a public key given in
    O(ssh_public_key), or, when none is given, a key pair generated on the node whose private key is
    returned once (run the task with C(no_log)). There is no password or empty-password mode. The key
    is written into the container as C(/root/.ssh/authorized_keys) through the Docker archive API,
    never through a shell string. The SSH port is published on O(ssh_bind_address) and returned.
  - O(state=stopped) takes a snapshot with C(docker commit) (image C(kohakuriver-vps-ID:snapshot-TIME)),
    keeps the last O(snapshots_keep) and removes the container; O(state=present) creates the container
    from the latest snapshot of the same base image when there is one, so the VPS's files come back.
  - The container is found by its labels (C(netloom.workload.kind=vps), C(netloom.workload.id=ID)), so
    after a dockerd restart or a reboot (Docker's C(unless-stopped) policy brings it back) it is
    adopted - the same container, started if it is not running - and never duplicated. A hash of the
    desired spec is kept in the label C(netloom.spec.hash) (one hash per field in C(netloom.spec.fields));
    a spec change recreates the VPS through a snapshot (so its files survive) and returns
    C(recreate_reason); cpus and memory are changed in place.
options:
  state:
    description:
      - V(present) runs the VPS (creating it, restored from its latest snapshot, when missing).
        V(stopped) snapshots it and removes the container. V(absent) removes the container, its
        overlay address, its local temp and (unless O(keep_snapshots)) its snapshots.
    type: str
    choices: [present, stopped, absent]
    default: present
  id:
    description:
      - The workload id. The container is named C(kohakuriver-KIND-ID); the id must be 1 to 63
        characters of a-z and 0-9 joined by single C(.), C(_) or C(-) (it also names snapshot images).
    type: raw
    required: true
  image:
    description:
      - Image on the runner's Docker. Required with O(state=present). Nothing is pulled (no registry
        is reachable), so an image missing on the runner fails before any change.
    type: str
  command:
    description: The command as an argv list (never a shell string). Left out, the image's command.
    type: raw
  env:
    description: Environment variables, a dict of NAME to value.
    type: raw
  cpus:
    description:
      - CPUs as C(docker run --cpus) takes them (V(0.5), V(2)). Changed on an existing container in
        place (C(docker update)), not by recreating it.
    type: raw
  memory:
    description:
      - Memory limit with binary units (V(512m), V(2g), V(1.5GiB) or bytes), at least 6 MiB. No swap
        is allowed beyond it. Changed in place like O(cpus).
    type: raw
  gpus:
    description: GPU device ids to request (C(--gpus device=...)), or V([all]).
    type: raw
  network:
    description:
      - V(overlay) puts the container on O(overlay_network) with an address from the runner's overlay
        address allocator (reachable from other runners); V(default) on O(default_network).
    type: str
    choices: [overlay, default]
    default: overlay
  address:
    description:
      - A fixed overlay address. It must be in the runner's workload range (offset+2 to broadcast-1),
        not the gateway or hub address, not inside the overlay network's Docker C(ip_range) (Docker's
        own handout range, by default the lower half 10.N.0.0/17 set by overlay_runner), and not in use
        on the overlay bridge or allocated to another key. Left out, the allocator chooses one outside
        that range (and keeps it across runs).
    type: str
  overlay_network:
    description: The Docker network on the overlay bridge.
    type: str
    default: kohakuriver-overlay
  overlay_bridge:
    description: The overlay bridge; its gateway address tells the allocator this runner's subnet.
    type: str
    default: kohaku-overlay
  subnet:
    description:
      - The runner's overlay subnet (e.g. 10.1.0.0/16), which the runner_workloads role passes. Checked
        against the bridge; lets check mode plan on a runner whose overlay is not converged yet. Left
        out, the bridge's gateway address gives it.
    type: str
  default_network:
    description: The Docker network used with O(network=default).
    type: str
    default: kohakuriver-net
  shared_dir:
    description: Host directory mounted at C(/shared) (the seed's shared data).
    type: path
    default: /var/lib/kohakuriver/shared
  logs_dir:
    description: Host directory whose subdirectory C(KIND-ID) is mounted at C(/kohakuriver/logs).
    type: path
    default: /var/lib/kohakuriver/logs
  temp_dir:
    description: Host directory whose subdirectory C(KIND-ID) is mounted at C(/local_temp) (local temp).
    type: path
    default: /var/lib/kohakuriver/tmp
  mounts:
    description: Extra bind mounts, each C(source) and C(target) (absolute paths) and C(read_only).
    type: list
    elements: raw
    default: []
  docker_host:
    description: Docker Engine API address. Left out, E(DOCKER_HOST), else C(unix:///var/run/docker.sock).
    type: str
  ssh_mode:
    description: V(key) (public-key logins only) or V(disabled) (no SSH port, no key).
    type: str
    choices: [key, disabled]
    default: key
  ssh_public_key:
    description:
      - One OpenSSH public key line (ssh-ed25519, ssh-rsa, ecdsa-sha2-*), checked by decoding it. Left
        out with O(ssh_mode=key), an ed25519 pair is generated on the node (C(ssh-keygen)) when the VPS is
        created and the private key is returned once in RV(ssh_private_key).
    type: str
  ssh_bind_address:
    description:
      - Host address the SSH port is published on (the runner's underlay address for the host's SSH proxy).
    type: str
    default: 127.0.0.1
  ssh_port:
    description: Host port for SSH; V(0) lets Docker choose one (returned in RV(vps)).
    type: int
    default: 0
  snapshots_keep:
    description: How many snapshots to keep; older ones are removed when a new one is taken.
    type: int
    default: 3
  snapshot_on_stop:
    description: Take a snapshot before the container is removed (O(state=stopped), or a recreate).
    type: bool
    default: true
  restore:
    description: Create the container from the latest snapshot of the same base image when there is one.
    type: bool
    default: true
  keep_snapshots:
    description: With O(state=absent), keep the VPS's snapshot images.
    type: bool
    default: false
requirements:
  - docker SDK for Python 5.0.3 or later (Debian's python3-docker)
  - pyroute2 (the overlay bridge is read through netloom's netlink seam)
  - ssh-keygen on the node (openssh-client) when a key is generated
notes:
  - Reboot survival is Docker's own restart policy (C(unless-stopped)) plus adoption by label - not
    netloom-restore, which would race dockerd for the same container.
  - Check mode computes the same plan (the same overlay address, the same snapshot to restore) and
    changes nothing; no key is generated.
  - The image must carry an SSH server started as its command; the lab's C(netloom-lab/vps) image
    (lab/workload_images/vps) runs C(sshd -D) with password logins off.
author:
  - netloom maintainers
"""

EXAMPLES = r"""
- name: A VPS on runner1's overlay with a generated key, SSH published on the underlay address
  vps_container:
    id: alice-1
    image: netloom-lab/vps:latest
    cpus: 1
    memory: 1g
    ssh_bind_address: 192.0.2.11
  register: vps
  no_log: true   # the generated private key is returned once

- name: Stop it (snapshot, keep the last 3) and create it again (restored from the snapshot)
  vps_container: {id: alice-1, image: "netloom-lab/vps:latest", state: stopped}
- vps_container: {id: alice-1, image: "netloom-lab/vps:latest", ssh_public_key: "{{ alice_key }}"}

- name: Remove it with its snapshots and free its address
  vps_container: {id: alice-1, state: absent}
"""

RETURN = r"""
vps:
  description: The VPS as it is after the run (in check mode, as it was).
  returned: always
  type: dict
  sample:
    name: kohakuriver-vps-alice-1
    container_id: 9c1e...
    status: running
    address: 10.1.255.254
    network: kohakuriver-overlay
    image: kohakuriver-vps-alice-1:snapshot-20261127T084500123456Z
    restored_from: kohakuriver-vps-alice-1:snapshot-20261127T084500123456Z
    adopted: true
    ssh: {host: 192.0.2.11, port: 32768}
ssh_public_key:
  description: The public key installed in the VPS (null with O(ssh_mode=disabled)).
  returned: always
  type: str
ssh_private_key:
  description:
    - The generated private key, only in the run that generated it; null otherwise. A secret - run
      the task with C(no_log). The key pair is generated before the container is created, and a
      run that fails after generating it still returns it (with RV(ssh_public_key)) in the failure
      result, since the public key may already be recorded in the container's label and the pair
      is never generated again.
  returned: when a key pair was generated (also in a failed run's result)
  type: str
snapshot:
  description: The snapshot image taken in this run, or null.
  returned: always
  type: str
snapshots:
  description: The VPS's snapshot images after the run, oldest first.
  returned: always
  type: list
  elements: str
recreate_reason:
  description: Why the container was recreated (which spec fields changed); null when it was not.
  returned: always
  type: str
  sample: "spec changed: image"
changes:
  description: The planned (or, in check mode, would-be) changes.
  returned: always
  type: list
  elements: str
"""

import datetime
import io
import os
import shutil
import tarfile
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import (
    InputError,
    execute_plan,
    finish,
    int_range,
    ipv4_address,
    run_command,
)
from ansible.module_utils.netloom.netlink import run_with_netlink
from ansible.module_utils.netloom.workload import (
    RESTORED_LABEL,
    SNAPSHOT_IMAGE_LABEL,
    SNAPSHOT_OF_LABEL,
    SNAPSHOT_TIME_LABEL,
    SSH_KEY_LABEL,
    container_status,
    ssh_public_key,
)
from ansible.module_utils.netloom.workload_docker import (
    WORKLOAD_OPTIONS,
    WorkloadManager,
    api,
    masked_spec,
    remove_tree,
)

SSH_PORT = "22/tcp"
RESTART_POLICY = "unless-stopped"


def authorized_keys_archive(public_key: str) -> bytes:
    """/root/.ssh (0700) and authorized_keys (0600), owned by root, as a tar for the archive API."""
    buffer = io.BytesIO()
    data = (public_key + "\n").encode()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = tarfile.TarInfo(".ssh")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(folder)
        entry = tarfile.TarInfo(".ssh/authorized_keys")
        entry.size, entry.mode = len(data), 0o600
        tar.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def generate_key_pair(comment: str) -> tuple[str, str]:
    """An ed25519 pair made by ssh-keygen on the node (argv, no shell); nothing is left on disk."""
    folder = tempfile.mkdtemp(prefix="netloom-vps-key-")
    try:
        path = os.path.join(folder, "key")
        run_command(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
        with open(path, encoding="ascii") as private, open(path + ".pub", encoding="ascii") as public:
            return private.read(), public.read().strip()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class VpsManager(WorkloadManager):
    """Plans one VPS container: create (restored), adopt, update, snapshot and stop, remove."""

    kind = "vps"

    def __init__(self, module: AnsibleModule, nl: Any) -> None:
        super().__init__(module, nl)
        params = self.params
        self.state = params["state"]
        self.repository = self.name  # snapshots: kohakuriver-vps-ID:snapshot-TIME
        self.temp_path = os.path.join(params["temp_dir"], self.address_key)
        self.keep = int_range("snapshots_keep", params["snapshots_keep"], 1, 1000)
        self.ssh_mode = params["ssh_mode"]
        self.public_key = None
        if params["ssh_public_key"] not in (None, ""):
            if self.ssh_mode == "disabled":
                raise InputError("ssh_public_key", params["ssh_public_key"],
                                 "is given with ssh_mode=disabled")
            self.public_key = ssh_public_key("ssh_public_key", params["ssh_public_key"])
        self.bind = str(ipv4_address("ssh_bind_address", params["ssh_bind_address"]))
        self.port = int_range("ssh_port", params["ssh_port"], 0, 65535)
        if self.state == "present":
            self.validate_spec()
        self.snapshots: list[dict[str, Any]] = []
        self.snapshot_taken: str | None = None
        self.restored_from: str | None = None
        self.private_key: str | None = None
        self.adopted = False

    def run(self) -> None:
        self.connect()
        if self.state == "present":
            self.check_image(self.image)
        self.find_owned()
        self.snapshots = self.list_snapshots()
        with self.locked():
            if self.state == "present":
                self.plan_present()
            elif self.container is not None:
                self.plan_snapshot_and_remove("state=" + self.state, self.params["snapshot_on_stop"]
                                              and self.state == "stopped")
            if self.state != "present" and self.allocator is not None:
                self.allocator.release(self.plan, self.address_key)
            if self.state == "absent":
                self.plan_absent()
            # A key generated before a later step failed is returned in the failure result too:
            # its public half may already be in a container label, so it is never generated again.
            execute_plan(self.module, self.plan, on_failure=self.generated_key)
            finish(self.module, self.plan, describe=self.report, executed=True,
                   recreate_reason=self.decision.reason if self.decision.action == "recreate" else None)

    def generated_key(self) -> dict[str, Any]:
        """The failure result's share of a key pair generated in this run (none: nothing)."""
        if self.private_key is None:
            return {}
        return {"ssh_private_key": self.private_key, "ssh_public_key": self.public_key}

    # ---- snapshots ----

    def list_snapshots(self) -> list[dict[str, Any]]:
        """This VPS's snapshot images, oldest first: (tag, base image, time)."""
        images = api("listing snapshots", self.client.images,
                     filters={"label": f"{SNAPSHOT_OF_LABEL}={self.ident}"})
        found = []
        for image in images:
            labels = image.get("Labels") or {}
            for tag in image.get("RepoTags") or []:
                if tag.startswith(self.repository + ":snapshot-"):
                    found.append({"tag": tag, "base": labels.get(SNAPSHOT_IMAGE_LABEL),
                                  "time": labels.get(SNAPSHOT_TIME_LABEL, ""), "labels": labels})
        return sorted(found, key=lambda item: (item["time"], item["tag"]))

    def plan_snapshot(self, base_image: str) -> None:
        """docker commit of the container (kept labels say whose and of which base image it is)."""
        container = self.require_container()
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        tag = f"snapshot-{stamp}"
        ref = container["Id"]
        changes = [f"LABEL {SNAPSHOT_OF_LABEL}={self.ident}", f"LABEL {SNAPSHOT_IMAGE_LABEL}={base_image}",
                   f"LABEL {SNAPSHOT_TIME_LABEL}={stamp}"]
        full = f"{self.repository}:{tag}"
        self.plan.add(f"snapshot {full}", "create", None, full,
                      lambda: api(f"committing {self.name}", self.client.commit, ref,
                                  repository=self.repository, tag=tag, changes=changes))
        labels = dict(container["Config"].get("Labels") or {})
        self.snapshots.append({"tag": full, "base": base_image, "time": stamp, "labels": labels})
        self.snapshot_taken = full
        for old in self.snapshots[:-self.keep]:
            self.plan.add(f"snapshot {old['tag']}", "delete", old["tag"], None,
                          lambda tag=old["tag"]: api(f"removing snapshot {tag}",
                                                     self.client.remove_image, tag))
        self.snapshots = self.snapshots[-self.keep:]

    def plan_snapshot_and_remove(self, reason: str, snapshot: bool) -> None:
        container = self.require_container()
        if snapshot:
            labels = container["Config"].get("Labels") or {}
            base = labels.get(SNAPSHOT_IMAGE_LABEL) if RESTORED_LABEL in labels else None
            self.plan_snapshot(base or self.base_image_of(container))
        self.plan_remove(reason)

    @staticmethod
    def base_image_of(container: dict[str, Any]) -> str:
        """The base image a VPS was made from (a restored one remembers it in its labels)."""
        labels = container["Config"].get("Labels") or {}
        return labels.get(SNAPSHOT_IMAGE_LABEL) or container["Config"]["Image"]

    def plan_absent(self) -> None:
        if not self.params["keep_snapshots"]:
            for snapshot in self.snapshots:
                self.plan.add(f"snapshot {snapshot['tag']}", "delete", snapshot["tag"], None,
                              lambda tag=snapshot["tag"]: api(f"removing snapshot {tag}",
                                                              self.client.remove_image, tag))
            self.snapshots = []
        if os.path.isdir(self.temp_path):
            self.plan.add(f"directory {self.temp_path}", "delete", self.temp_path, None,
                          lambda: remove_tree(self.temp_path))

    # ---- present ----

    def spec(self, network: str) -> dict[str, Any]:
        spec = self.base_spec(network)
        ssh = None
        if self.ssh_mode == "key":
            ssh = {"key": self.public_key or "generated", "bind": self.bind, "port": self.port}
        spec.update(restart=RESTART_POLICY, ssh=ssh)
        return spec

    def host_config_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"restart_policy": {"Name": RESTART_POLICY}}
        if self.ssh_mode == "key":
            extra["port_bindings"] = {22: (self.bind, self.port or None)}
        return extra

    def exposed_ports(self) -> list[int] | None:
        return [22] if self.ssh_mode == "key" else None

    def plan_present(self) -> None:
        network = self.network_name()
        self.reserve_address()
        spec = self.spec(network)
        self.decision = self.decide(spec)
        self.plan_directories()
        if self.decision.action == "keep":
            container = self.require_container()
            self.adopted = True
            self.plan_limits()
            status = container_status(container["State"])
            if status == "paused":
                self.plan.add(f"container {self.name}", "resume", "paused", "running",
                              lambda: api(f"resuming {self.name}", self.client.unpause, self.name))
            elif status not in ("running", "restarting"):
                self.plan_start()
            return
        old_key = None
        if self.container is not None:  # recreate through a snapshot: the VPS's files survive
            old_key = (self.container["Config"].get("Labels") or {}).get(SSH_KEY_LABEL)
            self.plan_snapshot_and_remove(self.decision.reason or "", self.params["snapshot_on_stop"])
        source = self.image
        latest = next((item for item in reversed(self.snapshots) if item["base"] == self.image), None)
        if self.params["restore"] and latest is not None:
            source = self.restored_from = latest["tag"]
            old_key = old_key or latest["labels"].get(SSH_KEY_LABEL)
        key = None
        if self.ssh_mode == "key":
            key = self.public_key or old_key  # a generated key is made once and then kept
            if key is None:
                self.plan.add(f"ssh key of {self.name}", "create", None, "ed25519 key pair (generated)",
                              self.generate)
        self.plan_vps_create(spec, source, key)

    def generate(self) -> None:
        self.private_key, self.public_key = generate_key_pair(self.name)

    def plan_vps_create(self, spec: dict[str, Any], source: str, key: str | None) -> None:
        extra = {SNAPSHOT_IMAGE_LABEL: self.image}
        if self.restored_from:
            extra[RESTORED_LABEL] = self.restored_from
        kwargs = self.create_kwargs(spec, source, extra)
        self.public_key = key or self.public_key

        def create() -> None:
            if self.ssh_mode == "key":
                kwargs["labels"][SSH_KEY_LABEL] = self.public_key
            created = api(f"creating {self.name}", self.client.create_container, **kwargs)
            self.result["container_id"] = created["Id"]
            if self.ssh_mode == "key":
                api(f"installing the SSH key in {self.name}", self.client.put_archive, created["Id"], "/root",
                    authorized_keys_archive(self.public_key or ""))

        self.plan.add(f"container {self.name}", "create", None,
                      {"image": source, "spec": masked_spec(spec), "cpus": self.cpus, "memory": self.memory},
                      create)
        self.plan_start(after=None)

    # ---- the result ----

    def report(self) -> dict[str, Any]:
        self.describe()
        live = self.container if self.module.check_mode else self.inspect(self.name)
        vps = dict(self.result, image=None, restored_from=None, adopted=self.adopted, ssh=None)
        if self.state != "present" and not self.module.check_mode:
            live = None
        if live is None:
            vps.update(container_id=None, status="absent", address=None, network=None)
        else:
            labels = live["Config"].get("Labels") or {}
            vps.update(image=live["Config"]["Image"], restored_from=labels.get(RESTORED_LABEL))
            self.public_key = labels.get(SSH_KEY_LABEL) or self.public_key
            bound = ((live["NetworkSettings"].get("Ports") or {}).get(SSH_PORT) or [None])[0]
            if bound:
                vps["ssh"] = {"host": bound.get("HostIp") or self.bind, "port": int(bound["HostPort"])}
        return {"vps": vps, "ssh_public_key": self.public_key if self.ssh_mode == "key" else None,
                "ssh_private_key": self.private_key, "snapshot": self.snapshot_taken,
                "snapshots": [item["tag"] for item in self.snapshots]}


def main() -> None:
    argument_spec: dict[str, Any] = {
        "state": {"type": "str", "choices": ["present", "stopped", "absent"], "default": "present"},
        **WORKLOAD_OPTIONS,
        "ssh_mode": {"type": "str", "choices": ["key", "disabled"], "default": "key"},
        "ssh_public_key": {"type": "str"},
        "ssh_bind_address": {"type": "str", "default": "127.0.0.1"},
        "ssh_port": {"type": "int", "default": 0},
        "snapshots_keep": {"type": "int", "default": 3},
        "snapshot_on_stop": {"type": "bool", "default": True},
        "restore": {"type": "bool", "default": True},
        "keep_snapshots": {"type": "bool", "default": False},
    }
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    run_with_netlink(module, VpsManager)


if __name__ == "__main__":
    main()
