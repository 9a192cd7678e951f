#!/usr/bin/python
"""Ansible module task_container: a KohakuRiver command task in a container, run, watched and signalled."""
from __future__ import annotations

DOCUMENTATION = r"""
module: task_container
short_description: A KohakuRiver command task container kohakuriver-task-ID, with status, exit code and logs
description:
  - Runs a command task as the container C(kohakuriver-task-ID) on the runner's Docker, on the overlay
    network with an address from the runner's one overlay address allocator (fixed or chosen), or on
    the default network. The seed's mounts (shared data at C(/shared), the task's logs directory,
    its local temp) plus O(mounts), environment, cpus, memory and GPU requests.
  - The container is found by its labels (C(netloom.workload.kind=task), C(netloom.workload.id=ID)),
    never by name alone, and carries a hash of the desired spec in C(netloom.spec.hash) (as compose
    does) with one hash per field in C(netloom.spec.fields). A spec change recreates the task (it
    runs again) and returns C(recreate_reason); cpus and memory change in place. A finished task
    whose spec is unchanged is not run again.
  - The container is kept after it exits (unlike the seed's C(--rm)) so its status can be read again;
    the full stdout and stderr are saved as C(stdout.log) and C(stderr.log) in the task's logs
    directory when it has exited. O(state=absent) removes it and frees its overlay address.
  - Status is mapped from the exit code as the seed does - 0 V(completed); 137 V(killed), or V(oom)
    when Docker reports OOMKilled; anything else V(failed) - or is V(created), V(running), V(paused).
  - Docker 20.10 on cgroup v1 can miss the OOM event (OOMKilled stays false although the kernel killed
    the task in its memory cgroup), so an exit 137 also counts as V(oom) when the kernel log
    (C(/dev/kmsg)) records a memory-cgroup OOM kill in the container's cgroup.
options:
  state:
    description:
      - V(present) runs the task (creates and starts it; resumes it when paused). V(paused) pauses a
        running task, V(killed) kills it (SIGKILL), V(absent) removes it.
    type: str
    choices: [present, paused, killed, absent]
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
  wait:
    description:
      - Wait for the task to exit (up to O(wait_timeout) seconds) and return its status, exit code and
        output. Without it the task runs detached; a later run reports and saves its result.
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait; a task still running then is reported V(running) with a warning.
    type: int
    default: 3600
  tail_lines:
    description: How many of the last lines of stdout and stderr to return.
    type: int
    default: 20
requirements:
  - docker SDK for Python 5.0.3 or later (Debian's python3-docker)
  - pyroute2 (the overlay bridge is read through netloom's netlink seam)
notes:
  - Check mode computes the same plan (and the same overlay address) and changes nothing; it does
    not wait.
  - The task's logs directory is kept by O(state=absent) (it holds the task's results); its local
    temp directory is removed.
author:
  - netloom maintainers
"""

EXAMPLES = r"""
- name: Train on runner1 with a fixed overlay address, 2 CPUs, 4 GiB and GPU 0; wait for it
  task_container:
    id: "1234"
    image: trainer:1
    command: [python3, train.py, --epochs, "3"]
    address: 10.1.0.50
    cpus: 2
    memory: 4g
    gpus: ["0"]
    env: {DATASET: /shared/data}

- name: Start a task detached on the default network
  task_container:
    id: sweep-7
    image: trainer:1
    command: [sleep, "600"]
    network: default
    wait: false

- name: Pause it, then kill it
  task_container: {id: sweep-7, state: paused}
- task_container: {id: sweep-7, state: killed}

- name: Remove it and free its address
  task_container: {id: sweep-7, state: absent}
"""

RETURN = r"""
task:
  description: The task as it is after the run (in check mode, as it was).
  returned: always
  type: dict
  sample:
    name: kohakuriver-task-1234
    container_id: 3f2c9a...
    status: completed
    exit_code: 0
    oom_killed: false
    address: 10.1.0.50
    network: kohakuriver-overlay
    stdout_tail: "epoch 3 done\n"
    stderr_tail: ""
    logs:
      stdout: /var/lib/kohakuriver/logs/task-1234/stdout.log
      stderr: /var/lib/kohakuriver/logs/task-1234/stderr.log
recreate_reason:
  description: Why the container was recreated (which spec fields changed); null when it was not.
  returned: always
  type: str
  sample: "spec changed: command"
changes:
  description: The planned (or, in check mode, would-be) changes.
  returned: always
  type: list
  elements: str
  sample: ["create overlay address task-1234", "create container kohakuriver-task-1234",
           "start container kohakuriver-task-1234"]
"""

import errno
import os
import stat
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import CommandError, InputError, execute_plan, finish, int_range
from ansible.module_utils.netloom.files import read_bytes, write_file
from ansible.module_utils.netloom.netlink import run_with_netlink
from ansible.module_utils.netloom.workload import EXIT_KILLED, container_status, oom_in_kernel_log, tail
from ansible.module_utils.netloom.workload_docker import WORKLOAD_OPTIONS, WorkloadManager, api, remove_tree

FINISHED = ("completed", "killed", "oom", "failed")
LOG_STREAMS = ("stdout", "stderr")
# Task output may hold secrets: readable by root and the group, not by others.
LOG_MODE = 0o640
LOG_DIR_MODE = 0o750


def file_mode(path: str) -> int | None:
    """A file's permission bits; None when it does not exist."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None


def write_log(module: AnsibleModule, path: str, data: bytes) -> None:
    write_file(module, path, data, mode=LOG_MODE, dir_mode=LOG_DIR_MODE)


def kernel_log() -> list[bytes]:
    """The kernel log's records (/dev/kmsg, non-blocking); [] where it cannot be read."""
    records: list[bytes] = []
    try:
        handle = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return records
    try:
        while True:
            try:
                records.append(os.read(handle, 8192))
            except BlockingIOError:
                return records
            except OSError as err:
                if err.errno != errno.EPIPE:  # EPIPE: records overwritten while reading, go on
                    return records
    finally:
        os.close(handle)


class TaskManager(WorkloadManager):
    """Plans one task container: run, resume, pause, kill or remove it; reports its outcome."""

    kind = "task"

    def __init__(self, module: AnsibleModule, nl: Any) -> None:
        super().__init__(module, nl)
        self.state = self.params["state"]
        self.wait = self.params["wait"]
        self.wait_timeout = int_range("wait_timeout", self.params["wait_timeout"], 1, 7 * 24 * 3600)
        self.tail_lines = int_range("tail_lines", self.params["tail_lines"], 0, 100000)
        self.logs_path = os.path.join(self.params["logs_dir"], self.address_key)
        self.temp_path = os.path.join(self.params["temp_dir"], self.address_key)
        self.started = False  # set when this run started the container
        if self.state == "present":
            self.validate_spec()

    def run(self) -> None:
        self.connect()
        if self.state == "present":
            self.check_image(self.image)
        self.find_owned()
        # The runner-wide allocator lock covers the plan (address, create, start) only: waiting
        # for the task to exit happens after it is released, so other workloads are not blocked.
        with self.locked():
            if self.state == "present":
                self.plan_present()
            elif self.state == "absent":
                self.plan_absent()
            else:
                self.plan_signal()
            execute_plan(self.module, self.plan)
        finish(self.module, self.plan, describe=self.report, executed=True,
               recreate_reason=self.decision.reason if self.decision.action == "recreate" else None)

    # ---- planning ----

    def plan_present(self) -> None:
        network = self.network_name()
        self.reserve_address()
        spec = self.base_spec(network)
        self.decision = self.decide(spec)
        self.plan_directories()
        if self.decision.action != "keep":
            if self.decision.action == "recreate":
                self.plan_remove(self.decision.reason or "")
            self.plan_create(spec, self.image)
            # after None: the diff keeps the create step's spec under the same key
            self.plan.add(f"container {self.name}", "start", None, None, self.start)
            return
        container = self.require_container()
        self.plan_limits()
        status = container_status(container["State"])
        if status == "paused":
            self.plan.add(f"container {self.name}", "resume", "paused", "running",
                          lambda: api(f"resuming {self.name}", self.client.unpause, self.name))
        elif status == "created":
            self.plan.add(f"container {self.name}", "start", "created", "running", self.start)
        elif status in FINISHED:
            self.plan_logs()

    def plan_signal(self) -> None:
        if self.container is None:
            raise InputError("state", self.state, f"task {self.ident} does not exist on this runner")
        status = container_status(self.container["State"])
        if self.state == "paused":
            if status == "running":
                self.plan.add(f"container {self.name}", "pause", "running", "paused",
                              lambda: api(f"pausing {self.name}", self.client.pause, self.name))
            elif status != "paused":
                raise InputError("state", self.state,
                                 f"task {self.ident} is {status}: only a running task pauses")
            return
        if status in ("running", "paused", "restarting"):
            self.plan.add(f"container {self.name}", "kill", status, "killed", lambda: self.kill(status))
        elif status in FINISHED:
            self.plan_logs()

    def plan_absent(self) -> None:
        if self.container is not None:
            self.plan_remove("state=absent")
        if self.allocator is not None:
            self.allocator.release(self.plan, self.address_key)
        if os.path.isdir(self.temp_path):
            self.plan.add(f"directory {self.temp_path}", "delete", self.temp_path, None,
                          lambda: remove_tree(self.temp_path))

    # ---- steps ----

    def kill(self, status: str) -> None:
        if status == "paused":  # Docker refuses to kill a paused container
            api(f"resuming {self.name}", self.client.unpause, self.name)
        api(f"killing {self.name}", self.client.kill, self.name)
        self.save_logs()

    def start(self) -> None:
        """Start only: the wait comes after the plan, outside the allocator lock (see report)."""
        api(f"starting {self.name}", self.client.start, self.name)
        self.started = True

    def wait_for_exit(self) -> None:
        try:
            self.client.wait(self.name, timeout=self.wait_timeout)
        except Exception as err:  # requests' ReadTimeout/ConnectionError: still running
            if "timed out" not in str(err).lower() and "timeout" not in type(err).__name__.lower():
                raise CommandError(f"waiting for {self.name}: {err}") from None
            self.module.warn(f"{self.name} still runs after {self.wait_timeout} s; it goes on detached")
            return
        self.save_logs()

    def logs(self, ref: str | None = None) -> dict[str, bytes]:
        return {stream: api(f"reading the {stream} of {self.name}", self.client.logs, ref or self.name,
                            stdout=stream == "stdout", stderr=stream == "stderr")
                for stream in LOG_STREAMS}

    def log_file(self, stream: str) -> str:
        return os.path.join(self.logs_path, f"{stream}.log")

    def plan_logs(self) -> None:
        """A finished task's full output kept under its logs mount (written once it has exited);
        a log file left readable by others (older netloom wrote 0644) is narrowed to LOG_MODE."""
        for stream, data in self.logs().items():
            path = self.log_file(stream)
            if read_bytes(path) != data or file_mode(path) != LOG_MODE:
                self.plan.add(f"file {path}", "update", None, f"{len(data)} bytes, mode {LOG_MODE:04o}",
                              lambda path=path, data=data: write_log(self.module, path, data))

    def save_logs(self) -> None:
        for stream, data in self.logs().items():
            path = self.log_file(stream)
            if read_bytes(path) != data or file_mode(path) != LOG_MODE:
                write_log(self.module, path, data)

    # ---- the result ----

    def report(self) -> dict[str, Any]:
        """Wait (lock released) for a task this run started or found running, then describe it."""
        if self.state == "present" and self.wait and not self.module.check_mode:
            live = self.inspect(self.name)
            if live is not None and container_status(live["State"]) == "running":
                self.wait_for_exit()  # waiting for an already running task is not a change
            elif live is not None and self.started:
                self.save_logs()  # it exited before the wait began
        self.describe()
        task = dict(self.result, exit_code=None, oom_killed=None, stdout_tail=None, stderr_tail=None,
                    logs={stream: self.log_file(stream) for stream in LOG_STREAMS})
        live = self.container if self.module.check_mode else self.inspect(self.name)
        if live is not None and task["status"] in FINISHED:
            state = live["State"]
            kernel_oom = not state.get("OOMKilled") and state.get("ExitCode") == EXIT_KILLED \
                and oom_in_kernel_log(kernel_log(), live["Id"])
            task["status"] = container_status(state, kernel_oom)
            task["exit_code"] = state.get("ExitCode")
            task["oom_killed"] = bool(state.get("OOMKilled")) or kernel_oom
            # Docker's own `tail` counts lines of both streams before it filters one: tail here.
            for stream, data in self.logs(live["Id"]).items():
                task[f"{stream}_tail"] = tail(data.decode("utf-8", "replace"), self.tail_lines)
        if live is None or (self.state == "absent" and not self.module.check_mode):
            task.update(container_id=None, status="absent", address=None, network=None)
        return {"task": task}


def main() -> None:
    argument_spec: dict[str, Any] = {
        "state": {"type": "str", "choices": ["present", "paused", "killed", "absent"], "default": "present"},
        **WORKLOAD_OPTIONS,
        "wait": {"type": "bool", "default": True},
        "wait_timeout": {"type": "int", "default": 3600},
        "tail_lines": {"type": "int", "default": 20},
    }
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    run_with_netlink(module, TaskManager)


if __name__ == "__main__":
    main()
