"""task_container, vps_container and overlay_address against the machine's real dockerd.

Each test module run gets its own Docker networks: a stand-in overlay network whose bridge
(wlov<tag>) holds the gateway of a /24 from the benchmarking range 198.18.0.0/15 (never an
overlay address), with the hub address .254 reserved as on a runner, and a default network.
Workload ids carry the same tag; the allocator's book lives under a scratch
NETLOOM_STATE_ROOT. Everything is removed afterwards, whatever the outcome.
"""
from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.images import busybox_image
from tests.support.netns import run_module

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "lab"))
import lab_image  # the lab's image builder: the VPS image from Debian packages

from tests.module.test_docker_bridge_network import DockerLab, docker

pytestmark = pytest.mark.docker


class Lab:
    def __init__(self, root: pathlib.Path, busybox: str, vps: str) -> None:
        self.root = root
        self.busybox = busybox
        self.vps = vps
        self.tag = uuid.uuid4().hex[:6]
        self.docker = DockerLab(busybox)
        self.subnet = self.docker.subnet()
        self.overlay = f"wl-{self.tag}-ov"
        self.default = f"wl-{self.tag}-def"
        self.bridge = f"wlov{self.tag}"
        hub = str(self.subnet.network_address + 254)
        docker("network", "create", "--subnet", str(self.subnet), "--gateway", self.host(1),
               "--aux-address", f"kohaku-hub={hub}", "-o", f"com.docker.network.bridge.name={self.bridge}",
               self.overlay)
        self.docker.networks.append(self.overlay)
        docker("network", "create", self.default)
        self.docker.networks.append(self.default)

    def host(self, index: int) -> str:
        return str(self.subnet.network_address + index)

    def ident(self, name: str) -> str:
        return f"wl{self.tag}-{name}"

    def common(self) -> dict[str, Any]:
        return {"overlay_network": self.overlay, "overlay_bridge": self.bridge,
                "default_network": self.default,
                "shared_dir": str(self.root / "shared"), "logs_dir": str(self.root / "logs"),
                "temp_dir": str(self.root / "tmp")}

    def book(self) -> dict[str, Any]:
        path = self.root / "state/var/lib/netloom/overlay-addresses.json"
        return json.loads(path.read_text())["allocations"] if path.exists() else {}

    def cleanup(self) -> None:
        for kind in ("task", "vps"):
            for ref in docker("ps", "-aq", "--filter", f"name=kohakuriver-{kind}-wl{self.tag}").split():
                docker("rm", "-f", ref, check=False)
        for ref in docker("images", "-q", "--filter", f"reference=kohakuriver-vps-wl{self.tag}*").split():
            docker("rmi", "-f", ref, check=False)
        self.docker.cleanup()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root to reach dockerd")
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True,
                                                        check=False).returncode != 0:
        pytest.skip("needs a running dockerd (scripts/bootstrap.sh starts one)")
    root = tmp_path_factory.mktemp("workloads")
    made = Lab(root, busybox_image(), lab_image.workload_image("vps", say=lambda _: None))
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture(autouse=True)
def state_root(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETLOOM_STATE_ROOT", str(lab.root / "state"))


def task(lab: Lab, name: str, check_mode: bool = False, **args: Any) -> dict[str, Any]:
    payload = {"id": lab.ident(name), "image": lab.busybox, **lab.common(), **args}
    return run_module("task_container", payload, check_mode=check_mode, controller=False)


def vps(lab: Lab, name: str, check_mode: bool = False, **args: Any) -> dict[str, Any]:
    payload = {"id": lab.ident(name), "image": lab.vps, **lab.common(), **args}
    return run_module("vps_container", payload, check_mode=check_mode, controller=False)


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert not result.get("failed"), result.get("msg")
    return result


def containers(lab: Lab, kind: str, name: str) -> list[str]:
    return docker("ps", "-aq", "--filter", f"label=netloom.workload.id={lab.ident(name)}",
                  "--filter", f"label=netloom.workload.kind={kind}").split()


# ---- task_container ----

def test_task_on_a_fixed_overlay_address_is_reached_and_its_address_freed(lab: Lab) -> None:
    server = ok(task(lab, "srv", command=["sleep", "600"], address=lab.host(50), wait=False))
    assert server["changed"] and server["task"]["address"] == lab.host(50)
    assert server["task"]["status"] == "running"
    assert lab.book()[f"task-{lab.ident('srv')}"] == {"owner": "container", "address": lab.host(50)}
    client = ok(task(lab, "cli", command=["ping", "-c", "1", "-W", "2", lab.host(50)]))
    assert client["task"]["status"] == "completed", client["task"]
    assert client["task"]["address"] == lab.host(253)  # chosen from the top of the range
    again = ok(task(lab, "srv", command=["sleep", "600"], address=lab.host(50), wait=False))
    assert not again["changed"], again["changes"]
    check = ok(task(lab, "srv", check_mode=True, command=["sleep", "600"], address=lab.host(50), wait=False))
    assert not check["changed"]
    for name in ("srv", "cli"):
        gone = ok(task(lab, name, state="absent"))
        assert gone["changed"] and gone["task"]["status"] == "absent"
        assert containers(lab, "task", name) == []
        assert f"task-{lab.ident(name)}" not in lab.book()


def test_exit_code_status_and_logs(lab: Lab) -> None:
    result = ok(task(lab, "exit3", command=["sh", "-c", "echo out1; echo out2; echo err >&2; exit 3"],
                     network="default", tail_lines=1))
    info = result["task"]
    assert (info["status"], info["exit_code"], info["oom_killed"]) == ("failed", 3, False)
    assert (info["stdout_tail"], info["stderr_tail"]) == ("out2\n", "err\n")
    assert pathlib.Path(info["logs"]["stdout"]).read_text() == "out1\nout2\n"
    assert pathlib.Path(info["logs"]["stderr"]).read_text() == "err\n"
    # Task output may hold secrets: files 0640 in 0750 directories, not readable by others.
    for stream in ("stdout", "stderr"):
        assert stat.S_IMODE(os.stat(info["logs"][stream]).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(pathlib.Path(info["logs"]["stdout"]).parent).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(lab.root / "tmp" / f"task-{lab.ident('exit3')}").st_mode) == 0o750
    assert not ok(task(lab, "exit3", command=["sh", "-c", "echo out1; echo out2; echo err >&2; exit 3"],
                       network="default", tail_lines=1))["changed"]
    done = ok(task(lab, "exit0", command=["true"], network="default"))["task"]
    assert (done["status"], done["exit_code"]) == ("completed", 0)
    oom = ok(task(lab, "oom", command=["tail", "/dev/zero"], memory="16m", network="default"))["task"]
    assert (oom["status"], oom["exit_code"], oom["oom_killed"]) == ("oom", 137, True)
    for name in ("exit3", "exit0", "oom"):
        ok(task(lab, name, state="absent"))


def test_pause_resume_kill_and_in_place_limits(lab: Lab) -> None:
    args = {"command": ["sleep", "600"], "network": "default", "wait": False, "cpus": 0.5, "memory": "64m"}
    ok(task(lab, "long", **args))
    paused = ok(task(lab, "long", state="paused"))
    assert paused["changes"] == [f"pause container kohakuriver-task-{lab.ident('long')}"]
    assert paused["task"]["status"] == "paused"
    assert ok(task(lab, "long", **args))["task"]["status"] == "running"  # present resumes
    ref = containers(lab, "task", "long")
    updated = ok(task(lab, "long", **{**args, "cpus": 1, "memory": "128m"}))
    assert updated["changes"] == [f"update container kohakuriver-task-{lab.ident('long')} limits"]
    assert updated["recreate_reason"] is None and containers(lab, "task", "long") == ref
    host_config = json.loads(docker("inspect", ref[0]))[0]["HostConfig"]
    assert (host_config["CpuQuota"], host_config["Memory"]) == (100000, 128 * 1024 * 1024)
    killed = ok(task(lab, "long", state="killed"))["task"]
    assert (killed["status"], killed["exit_code"]) == ("killed", 137)
    recreated = ok(task(lab, "long", **{**args, "command": ["sleep", "1"], "wait": True}))
    assert recreated["recreate_reason"] == "spec changed: command"
    assert recreated["task"]["status"] == "completed" and containers(lab, "task", "long") != ref
    ok(task(lab, "long", state="absent"))


def test_the_allocator_lock_is_not_held_while_a_task_runs(lab: Lab) -> None:
    """A waiting task_container run must not block the runner's other workload modules."""
    outcome: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: outcome.update(
        task(lab, "waits", command=["sleep", "120"], wait_timeout=300)))
    waiting.start()
    try:
        while not containers(lab, "task", "waits") or json.loads(docker(
                "inspect", containers(lab, "task", "waits")[0]))[0]["State"]["Status"] != "running":
            assert waiting.is_alive(), outcome
            time.sleep(0.2)
        other = ok(address(lab, "lock-probe"))  # takes the same lock
        assert other["changed"] and waiting.is_alive()  # returned while the task still runs
        ok(address(lab, "lock-probe", state="absent"))
    finally:
        ok(task(lab, "waits", state="killed"))
        waiting.join()
    assert outcome["task"]["status"] == "killed", outcome
    ok(task(lab, "waits", state="absent"))


def test_diff_masks_environment_values(lab: Lab) -> None:
    result = ok(task(lab, "envs", check_mode=True, command=["true"], network="default",
                     env={"API_TOKEN": "s3cr3t-value", "MODE": "fast"}))
    spec = result["diff"]["after"][f"container kohakuriver-task-{lab.ident('envs')}"]["spec"]
    assert spec["env"] == {"API_TOKEN": "********", "MODE": "********"}
    # Only Ansible's own echo of the arguments (`invocation`, shown from -vvv on) holds the values.
    shown = {key: value for key, value in result.items() if key != "invocation"}
    assert "s3cr3t-value" not in json.dumps(shown)


@pytest.mark.parametrize("args, field", [
    ({"address": "GATEWAY"}, "address"),
    ({"address": "HUB"}, "address"),
    ({"address": "10.99.0.5"}, "address"),
    ({"address": "IN_USE"}, "address"),
    ({"memory": "lots"}, "memory"),
    ({"memory": "1k"}, "memory"),
    ({"cpus": "two"}, "cpus"),
    ({"cpus": 0}, "cpus"),
    ({"image": "wl-no-such-image:1"}, "image"),
    ({"id": "Bad ID"}, "id"),
    ({"id": "a" * 64}, "id"),
    ({"command": "sleep 5"}, "command"),
    ({"mounts": [{"source": "relative", "target": "/x"}]}, "mounts[0].source"),
    ({"mounts": [{"source": "/tmp", "target": "/shared"}]}, "mounts[0].target"),
])
def test_bad_task_input_fails_naming_the_field_and_changes_nothing(lab: Lab, args: dict[str, Any],
                                                                    field: str) -> None:
    holder = ok(task(lab, "holder", command=["sleep", "600"], address=lab.host(60), wait=False))
    before = (lab.book(), docker("ps", "-aq", "--filter", f"name=kohakuriver-task-wl{lab.tag}"))
    values = {"GATEWAY": lab.host(1), "HUB": lab.host(254), "IN_USE": holder["task"]["address"]}
    args = {key: values.get(value, value) if isinstance(value, str) else value for key, value in args.items()}
    payload = {"command": ["sleep", "5"], **args}
    result = task(lab, "bad", **payload) if "id" not in args else run_module(
        "task_container", {"image": lab.busybox, **lab.common(), **payload}, controller=False)
    assert result.get("failed") and result["field"] == field, result
    assert str(result["value"]) in result["msg"]
    assert (lab.book(), docker("ps", "-aq", "--filter", f"name=kohakuriver-task-wl{lab.tag}")) == before


def test_bad_ssh_key_fails_before_any_change(lab: Lab) -> None:
    for key in ("ssh-ed25519 AAAA", "ssh-ed25519 not-base64!", "ssh-dss AAAAB3NzaC1kc3MAAACBA", "hello"):
        result = vps(lab, "badkey", ssh_public_key=key)
        assert result.get("failed") and result["field"] == "ssh_public_key", result
    assert containers(lab, "vps", "badkey") == []


# ---- vps_container ----

def ssh(key_file: pathlib.Path, port: int, command: str) -> subprocess.CompletedProcess[str]:
    argv = ["ssh", "-i", str(key_file), "-p", str(port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "root@127.0.0.1", command]
    for _ in range(30):  # sshd makes its host keys at first start: retry until it answers
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 255:
            return proc
        time.sleep(0.5)
    return proc


def test_vps_ssh_snapshot_restore_adoption_and_removal(lab: Lab, tmp_path: pathlib.Path) -> None:
    created = ok(vps(lab, "box", memory="256m"))
    key = created["ssh_private_key"]
    assert key and "PRIVATE KEY" in key and created["ssh_public_key"].startswith("ssh-ed25519 ")
    address = created["vps"]["address"]
    assert ipaddress.IPv4Address(address) in lab.subnet
    key_file = tmp_path / "key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    port = created["vps"]["ssh"]["port"]
    written = ssh(key_file, port, "echo kept > /root/marker && cat /root/marker")
    assert written.returncode == 0 and written.stdout == "kept\n", written.stderr

    again = ok(vps(lab, "box", memory="256m"))
    assert not again["changed"] and again["ssh_private_key"] is None and again["vps"]["adopted"]
    assert not ok(vps(lab, "box", check_mode=True, memory="256m"))["changed"]

    ref = containers(lab, "vps", "box")
    docker("restart", ref[0])  # what a dockerd restart or a reboot does to it
    adopted = ok(vps(lab, "box", memory="256m"))
    assert containers(lab, "vps", "box") == ref and adopted["vps"]["container_id"] == json.loads(
        docker("inspect", ref[0]))[0]["Id"]

    stopped = ok(vps(lab, "box", state="stopped"))
    assert stopped["snapshot"] and stopped["snapshots"] == [stopped["snapshot"]]
    assert containers(lab, "vps", "box") == [] and f"vps-{lab.ident('box')}" not in lab.book()
    restored = ok(vps(lab, "box", memory="256m"))
    assert restored["vps"]["restored_from"] == stopped["snapshot"] and restored["ssh_private_key"] is None
    read = ssh(key_file, restored["vps"]["ssh"]["port"], "cat /root/marker")
    assert read.returncode == 0 and read.stdout == "kept\n", read.stderr

    for _ in range(3):  # keep the last 3
        ok(vps(lab, "box", state="stopped"))
        ok(vps(lab, "box", memory="256m"))
    snapshots = ok(vps(lab, "box", memory="256m"))["snapshots"]
    assert len(snapshots) == 3 and stopped["snapshot"] not in snapshots

    gone = ok(vps(lab, "box", state="absent"))
    assert gone["changed"] and gone["snapshots"] == [] and containers(lab, "vps", "box") == []
    assert docker("images", "-q", f"kohakuriver-vps-{lab.ident('box')}") == ""
    assert f"vps-{lab.ident('box')}" not in lab.book()


def test_a_generated_key_is_in_the_failure_result(lab: Lab, tmp_path: pathlib.Path) -> None:
    """The container is created with the public key in its label before the start fails (the SSH
    port is taken): the private key must come back in the failure result, as it is never made again."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = vps(lab, "portclash", network="default", ssh_port=port)
    try:
        assert failed.get("failed") and failed["failed_step"].startswith("start container"), failed
        key_file = tmp_path / "key"
        key_file.write_text(failed["ssh_private_key"])
        key_file.chmod(0o600)
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key_file)], capture_output=True, text=True,
                                 check=True).stdout.split()[:2]
        labels = json.loads(docker("inspect", containers(lab, "vps", "portclash")[0]))[0]["Config"]["Labels"]
        assert labels["netloom.vps.ssh-public-key"].split()[:2] == derived
        assert failed["ssh_public_key"].split()[:2] == derived
    finally:
        ok(vps(lab, "portclash", state="absent"))


def test_vps_with_a_given_key_and_ssh_disabled(lab: Lab, tmp_path: pathlib.Path) -> None:
    key_file = tmp_path / "given"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)], check=True)
    public = (tmp_path / "given.pub").read_text().strip()
    made = ok(vps(lab, "given", ssh_public_key=public, network="default"))
    assert made["ssh_private_key"] is None and made["ssh_public_key"] == public
    assert ssh(key_file, made["vps"]["ssh"]["port"], "true").returncode == 0
    changed = ok(vps(lab, "given", ssh_mode="disabled", network="default"))
    assert changed["recreate_reason"] == "spec changed: ssh" and changed["vps"]["ssh"] is None
    ok(vps(lab, "given", state="absent"))


# ---- overlay_address ----

def address(lab: Lab, key: str, check_mode: bool = False, **args: Any) -> dict[str, Any]:
    payload = {"key": key, "overlay_bridge": lab.bridge, "overlay_network": lab.overlay, **args}
    return run_module("overlay_address", payload, check_mode=check_mode, controller=False)


def test_overlay_address_reserve_release_and_reconcile(lab: Lab) -> None:
    # The VPS tests before this one left reachable neighbour entries on the test bridge for
    # the addresses of their (removed) containers; the allocator rightly counts a reachable
    # neighbour as live for its ~30 s, so start this test from a bridge nobody talked on.
    subprocess.run(["ip", "neigh", "flush", "dev", lab.bridge], check=True)
    first = ok(address(lab, "res-a"))
    assert first["changed"] and first["address"] == lab.host(253) and first["subnet"] == str(lab.subnet)
    assert not ok(address(lab, "res-a"))["changed"]
    assert ok(address(lab, "res-b", check_mode=True))["address"] == lab.host(252)
    assert "res-b" not in lab.book()
    hub = address(lab, "res-c", address=lab.host(254))
    assert hub.get("failed") and hub["field"] == "address" and "hub" in hub["msg"]
    container_owner = address(lab, "task-leaked", owner="container")  # only the workload modules
    assert container_owner.get("failed") and "owner" in container_owner["msg"], container_owner
    vm = ok(address(lab, "vm-a", owner="vm"))
    assert vm["address"] == lab.host(252) and not ok(address(lab, "vm-a", owner="vm"))["changed"]
    ok(address(lab, "vm-a", state="absent"))
    # A container key whose container is gone (left by an interrupted workload run): freed.
    book_path = lab.root / "state/var/lib/netloom/overlay-addresses.json"
    book = json.loads(book_path.read_text())
    book["allocations"]["task-leaked"] = {"owner": "container", "address": lab.host(252)}
    book_path.write_text(json.dumps(book))
    reconciled = ok(address(lab, "res-a"))
    assert reconciled["freed"] == [{"key": "task-leaked", "owner": "container", "address": lab.host(252)}]
    released = ok(address(lab, "res-a", state="absent"))
    assert released["changed"] and released["address"] == lab.host(253)
    assert not {"res-a", "task-leaked"} & set(lab.book())


def test_addresses_stay_out_of_the_overlay_networks_docker_range(lab: Lab, tmp_path: pathlib.Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A network with an ip_range (as overlay_runner makes it): Docker hands out its lower half,
    the allocator only the upper half, and a fixed address in Docker's half is refused."""
    monkeypatch.setenv("NETLOOM_STATE_ROOT", str(tmp_path))  # another subnet: a book of its own
    subnet = lab.docker.subnet()
    half = f"{subnet.network_address}/{subnet.prefixlen + 1}"
    network, bridge = f"wl-{lab.tag}-rng", f"wlrg{lab.tag}"
    docker("network", "create", "--subnet", str(subnet), "--gateway", str(subnet.network_address + 1),
           "--ip-range", half, "-o", f"com.docker.network.bridge.name={bridge}", network)
    lab.docker.networks.append(network)
    args = {"overlay_bridge": bridge, "overlay_network": network}
    refused = address(lab, "rng-fixed", address=str(subnet.network_address + 20), **args)
    assert refused.get("failed") and refused["field"] == "address" and half in refused["msg"], refused
    chosen = ok(address(lab, "rng-auto", **args))
    assert ipaddress.IPv4Address(chosen["address"]) not in ipaddress.IPv4Network(half)
    dynamic = docker("run", "-d", "--network", network, lab.busybox, "sleep", "600")
    try:
        inspect = json.loads(docker("inspect", dynamic))[0]["NetworkSettings"]["Networks"][network]
        assert ipaddress.IPv4Address(inspect["IPAddress"]) in ipaddress.IPv4Network(half)
    finally:
        docker("rm", "-f", dynamic, check=False)
    ok(address(lab, "rng-auto", state="absent", **args))
