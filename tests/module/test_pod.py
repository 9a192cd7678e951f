"""pod and nginx_hostname_router against the machine's real dockerd, run as Ansible runs them.

Pods are named fxp<x> (networks pinacle-pod-fxp<x>, chains NETLOOM-POD-FXP<x> and NETLOOM-PODIN-FXP<x>),
take /24s from 10.252.8.0/22 and ports from 39120-39127, and use the lab's pod image
(lab/workload_images/pod, built once per recipe). Everything is removed afterwards.
"""
from __future__ import annotations

import json
import pathlib
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.netns import Netns, run_module
from tests.support.pod_client import get, websocket_echo

pytestmark = pytest.mark.docker

ROOT = pathlib.Path(__file__).resolve().parents[2]
POOL = "10.252.8.0/22"
PORTS = "39120-39127"
# What Debian's runsc answers here for any networked container (shared/LAB.md); any other failure fails.
RUNSC_NETWORK_ERROR = "cannot run with network enabled in root network namespace"
HOST_PORT = 39190  # a host listener pods must not reach (outside PORTS)
SERVICES = [{"name": "app", "port": 3000}, {"name": "code", "port": 8726}, {"name": "ws", "port": 8765}]


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr}{proc.stdout}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def image() -> str:
    sys.path.insert(0, str(ROOT / "lab"))
    import lab_image

    return lab_image.workload_image("pod", say=lambda message: None)


@pytest.fixture
def host(tmp_path: pathlib.Path, image: str) -> Iterator[Any]:
    """Runs pod / router modules with this test's state file; removes every pod it made."""

    class Host:
        state_file = str(tmp_path / "allocations.json")
        made: set[str] = set()

        def pod(self, pod_id: str, check_mode: bool = False, **args: Any) -> dict[str, Any]:
            self.made.add(pod_id)
            wanted = {"id": pod_id, "image": image, "pool": POOL, "port_range": PORTS,
                      "state_file": self.state_file, "services": SERVICES, **args}
            return run_module("pod", wanted, check_mode=check_mode)

        def ok(self, pod_id: str, **args: Any) -> dict[str, Any]:
            result = self.pod(pod_id, **args)
            assert not result.get("failed"), result.get("msg")
            return result

        def router(self, pod_id: str, port: int, check_mode: bool = False, **args: Any) -> dict[str, Any]:
            result = run_module("nginx_hostname_router",
                                {"slug": pod_id, "container": f"pinacle-pod-{pod_id}", "services": SERVICES,
                                 "external_port": port, **args}, check_mode=check_mode)
            assert not result.get("failed"), result.get("msg")
            return result

    yield Host()
    for pod_id in Host.made:
        run_module("pod", {"id": pod_id, "state": "absent", "pool": POOL, "port_range": PORTS,
                           "state_file": Host.state_file})
        docker("rm", "-f", f"pinacle-pod-{pod_id}", check=False)
        docker("network", "rm", f"pinacle-pod-{pod_id}", check=False)


def wait_for(check: Any) -> Any:
    """Retry a probe until it succeeds (services start within seconds); bounded by count."""
    last: Exception | None = None
    for _ in range(100):
        try:
            return check()
        except (OSError, ConnectionError, AssertionError) as err:
            last = err
            time.sleep(0.2)
    raise AssertionError(f"never succeeded: {last}")


def test_two_pods_route_by_hostname_and_are_isolated(host: Any) -> None:
    a = host.ok("fxpa", egress="no-private")["pod"]
    b = host.ok("fxpb")["pod"]
    assert a["subnet"] != b["subnet"] and a["port"] != b["port"]
    prefix = a["subnet"].removesuffix(".0/24")
    assert (a["gateway"], a["address"]) == (f"{prefix}.1", f"{prefix}.2")
    routed = host.router("fxpa", a["port"])
    assert routed["services"][0]["url"] == f"http://localhost-3000.pod-fxpa.localhost:{a['port']}/"
    host.router("fxpb", b["port"])

    def app(hostname: str, port: int = a["port"]) -> tuple[int, str]:
        return get("127.0.0.1", port, hostname)

    status, body = wait_for(lambda: app("localhost-3000.pod-fxpa.localhost"))
    assert status == 200 and json.loads(body)["service"] == "app" and json.loads(body)["pod"] == "fxpa"
    assert json.loads(body)["x_real_ip"] and json.loads(body)["x_forwarded_for"]
    status, body = app("localhost-8726-pod-fxpa.localhost")
    assert status == 200 and json.loads(body)["service"] == "code"
    status, body = app("localhost-22.pod-fxpa.localhost")
    assert status == 404 and "port 22" in body
    status, body = app("localhost-80.pod-fxpa.localhost")
    assert status == 404 and "port 80" in body
    assert app("localhost-3000.pod-fxpb.localhost")[0] == 421
    assert wait_for(lambda: websocket_echo("127.0.0.1", a["port"], "localhost-8765.pod-fxpa.localhost",
                                           "hello pod")) == "hello pod"
    status, body = wait_for(lambda: app("localhost-3000.pod-fxpb.localhost", b["port"]))
    assert status == 200 and json.loads(body)["pod"] == "fxpb"
    # pod a cannot reach pod b's address (nor b a's)
    probe = ["docker", "exec", "pinacle-pod-fxpa", "curl", "-s", "-m", "3", f"http://{b['address']}/"]
    assert subprocess.run(probe, capture_output=True, check=False).returncode != 0
    probe = ["docker", "exec", "pinacle-pod-fxpb", "curl", "-s", "-m", "3", f"http://{a['address']}/"]
    assert subprocess.run(probe, capture_output=True, check=False).returncode != 0
    # idempotent, and check mode after converge changes nothing
    for check_mode in (False, True):
        assert host.pod("fxpa", check_mode=check_mode, egress="no-private")["changed"] is False
        assert host.router("fxpa", a["port"], check_mode=check_mode)["changed"] is False
    chain = subprocess.run(["iptables", "-S", "NETLOOM-POD-FXPA"], capture_output=True, text=True).stdout
    assert "-d 10.0.0.0/8 -i pod-fxpa" in chain and "-d 169.254.0.0/16" in chain


def test_lifecycle_keeps_and_reuses_allocations(host: Any) -> None:
    a = host.ok("fxpa")["pod"]
    b = host.ok("fxpb")["pod"]
    stopped = host.ok("fxpa", state="stopped")
    assert stopped["pod"]["port"] == a["port"] and "stop container pinacle-pod-fxpa" in stopped["changes"]
    assert docker("inspect", "-f", "{{.State.Running}}", "pinacle-pod-fxpa") == "false"
    # while a is stopped its port is still a's
    c = host.ok("fxpc")["pod"]
    assert c["port"] not in (a["port"], b["port"]) and c["subnet"] not in (a["subnet"], b["subnet"])
    assert host.ok("fxpa", state="started")["pod"]["port"] == a["port"]
    host.ok("fxpc", state="absent")
    gone = host.ok("fxpa", state="absent")
    assert "delete iptables filter NETLOOM-POD-FXPA" in gone["changes"]
    assert docker("network", "ls", "-q", "-f", "name=^pinacle-pod-fxpa$") == ""
    assert "fxpa" not in json.loads(pathlib.Path(host.state_file).read_text())["pods"]
    d = host.ok("fxpd")["pod"]
    assert (d["port"], d["subnet"]) == (a["port"], a["subnet"])


def test_a_new_controller_finds_allocations_in_docker_labels(host: Any) -> None:
    a = host.ok("fxpa")["pod"]
    pathlib.Path(host.state_file).unlink()  # a new controller/host state file: only the labels are left
    again = host.ok("fxpa")
    assert again["pod"]["port"] == a["port"]
    assert any("missing from the state file" in note for note in again["repairs"])
    assert host.ok("fxpb")["pod"]["port"] != a["port"]


def test_foreign_listener_port_is_skipped_and_exhaustion_is_named(host: Any) -> None:
    listener = socket.socket()
    listener.bind(("0.0.0.0", 39120))
    listener.listen()
    try:
        a = host.ok("fxpa", port_range="39120-39121")["pod"]
        assert a["port"] == 39121
        result = host.pod("fxpb", port_range="39120-39121")
        assert result["failed"] and result["field"] == "port_range"
        assert "port range exhausted" in result["msg"]
        assert "1 ports held by pods" in result["msg"]
        assert docker("network", "ls", "-q", "-f", "name=^pinacle-pod-fxpb$") == ""
    finally:
        listener.close()


@pytest.mark.parametrize(("args", "field"), [
    ({"image": "netloom-lab/no-such-image:1"}, "image"),
    ({"services": [{"port": 80}]}, "services[0].port"),
    ({"services": [{"port": 70000}]}, "services[0].port"),
    ({"egress": ["10.0.0.0/8", "nope"]}, "egress[1]"),
])
def test_bad_input_fails_naming_the_field_and_changes_nothing(host: Any, args: dict, field: str) -> None:
    result = host.pod("fxpa", **args)
    assert result["failed"] and result["field"] == field
    assert docker("network", "ls", "-q", "-f", "name=^pinacle-pod-fxpa$") == ""
    assert not pathlib.Path(host.state_file).exists()


def test_updates_in_place_or_recreate_with_the_reason(host: Any) -> None:
    a = host.ok("fxpa")["pod"]
    cpus = host.ok("fxpa", cpus=0.5)
    assert cpus["update"]["action"] == "in-place" and "cpus" in cpus["update"]["reasons"][0]
    env = host.ok("fxpa", cpus=0.5, env={"MODE": "dev"})
    assert env["update"] == {"action": "recreate", "reasons": ["env changed"]}
    assert env["pod"]["port"] == a["port"]
    assert "MODE=dev" in docker("inspect", "-f", "{{json .Config.Env}}", "pinacle-pod-fxpa")


def test_drift_is_repaired(host: Any) -> None:
    a = host.ok("fxpa")["pod"]
    host.router("fxpa", a["port"])
    path = "/etc/nginx/conf.d/netloom-hostname-router.conf"
    docker("exec", "pinacle-pod-fxpa", "sh", "-c", f"echo '# hand edit' >> {path}")
    repaired = host.router("fxpa", a["port"])
    assert repaired["changed"] and repaired["reloaded"] and repaired["backup_file"] == f"{path}.prev"
    assert "# hand edit" in docker("exec", "pinacle-pod-fxpa", "cat", f"{path}.prev")
    docker("stop", "pinacle-pod-fxpa")
    assert host.ok("fxpa")["changes"] == ["start container pinacle-pod-fxpa"]
    docker("stop", "pinacle-pod-fxpa")
    docker("network", "rm", "pinacle-pod-fxpa")
    back = host.ok("fxpa")
    assert back["update"]["action"] == "recreate" and back["pod"]["port"] == a["port"]
    assert back["pod"]["subnet"] == a["subnet"]
    assert host.pod("fxpa")["changed"] is False


def test_gvisor_runtime_is_passed_through(host: Any) -> None:
    runtimes = json.loads(docker("info", "--format", "{{json .Runtimes}}"))
    if "runsc" not in runtimes:
        pytest.skip("platform limit: runsc is not configured as a Docker runtime on this machine "
                    "(Debian's runsc cannot start a networked container here, see shared/LAB.md)")
    result = host.pod("fxpg", runtime="runsc")
    if result.get("failed") and RUNSC_NETWORK_ERROR in result.get("msg", ""):
        pytest.skip(f"platform limit: runsc cannot start a networked container here: {result['msg'][:200]}")
    assert not result.get("failed"), result.get("msg")
    assert docker("inspect", "-f", "{{.HostConfig.Runtime}}", "pinacle-pod-fxpg") == "runsc"


def test_router_config_that_breaks_nginx_never_goes_live(host: Any) -> None:
    a = host.ok("fxpa")["pod"]
    host.router("fxpa", a["port"])
    path = "/etc/nginx/conf.d/netloom-hostname-router.conf"
    live = docker("exec", "pinacle-pod-fxpa", "cat", path)
    # A foreign file that clashes with the next config (same upstream name), but not with the live one.
    clash = "upstream netloom_fxpa_5000 { server 127.0.0.1:5000; }"
    docker("exec", "pinacle-pod-fxpa", "sh", "-c", f"echo '{clash}' > /etc/nginx/conf.d/clash.conf")
    result = run_module("nginx_hostname_router", {"slug": "fxpa", "container": "pinacle-pod-fxpa",
                                                  "services": [*SERVICES, {"name": "db", "port": 5000}],
                                                  "external_port": a["port"]})
    assert result["failed"] and "the previous file was put back" in result["msg"]
    assert result["failed_step"].startswith("update container pinacle-pod-fxpa") and not result["changed"]
    assert docker("exec", "pinacle-pod-fxpa", "cat", path) == live
    status, body = get("127.0.0.1", a["port"], "localhost-3000.pod-fxpa.localhost")
    assert status == 200 and json.loads(body)["service"] == "app"


def test_router_on_a_host_file(host: Any, tmp_path: pathlib.Path) -> None:
    """The same module onto this host (no container): validate, swap, keep .prev, remove by marker."""
    del host  # only for the image and the cleanup of pods (none here)
    path = tmp_path / "router.conf"
    args = {"slug": "fxph", "path": str(path), "default_server": False, "listen": 8080, "reload": False,
            "services": [{"name": "app", "port": 3000}]}
    first = run_module("nginx_hostname_router", args)
    assert not first.get("failed"), first.get("msg")
    assert first["changed"] and first["validated"]
    assert path.read_text().startswith("# netloom: nginx_hostname_router")
    assert run_module("nginx_hostname_router", args)["changed"] is False
    path.write_text(path.read_text() + "# hand edit\n")
    repaired = run_module("nginx_hostname_router", args)
    assert repaired["changed"] and "# hand edit" in pathlib.Path(f"{path}.prev").read_text()
    assert "# hand edit" not in path.read_text()
    gone = run_module("nginx_hostname_router", {**args, "state": "absent"})
    assert gone["changed"] and not path.exists()


def test_changing_services_recreates_nothing(host: Any) -> None:
    host.ok("fxpa")
    before = docker("inspect", "-f", "{{.Id}}", "pinacle-pod-fxpa")
    network = docker("network", "inspect", "-f", "{{.Id}}", "pinacle-pod-fxpa")
    changed = host.ok("fxpa", services=[*SERVICES, {"name": "db", "port": 5000}])
    assert changed["update"]["action"] == "none"
    # only the recorded arguments of the restore entries follow the new services
    assert all(change.startswith("update restore entry") for change in changed["changes"]), changed["changes"]
    assert docker("inspect", "-f", "{{.Id}}", "pinacle-pod-fxpa") == before
    assert docker("network", "inspect", "-f", "{{.Id}}", "pinacle-pod-fxpa") == network


def test_stopped_foreign_container_port_is_skipped(host: Any, image: str) -> None:
    name = "fixpods-stopped-publisher"
    docker("create", "--name", name, "-p", "127.0.0.1:39120:80", image)
    try:
        assert host.ok("fxpa")["pod"]["port"] == 39121
    finally:
        docker("rm", "-f", name, check=False)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.args


def other_host_address() -> str:
    """An address of this host on an interface that is not a pod's bridge (nor loopback)."""
    for line in subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        fields = line.split()
        if fields[1] != "lo" and not fields[1].startswith("pod-"):
            return fields[3].split("/")[0]
    raise AssertionError("this host has no IPv4 address but loopback")


def test_pod_cannot_reach_the_host_itself(host: Any) -> None:
    a = host.ok("fxpa")["pod"]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "0.0.0.0", str(HOST_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        other = other_host_address()
        curl = ["curl", "-s", "-o", "/dev/null", "-m", "3"]
        # control: the host itself reaches the listener (so the pod's failure below is the filter)
        wait_for(lambda: assert_ok(subprocess.run([*curl, f"http://{other}:{HOST_PORT}/"], check=False)))
        for address in (a["gateway"], other):
            probe = ["docker", "exec", "pinacle-pod-fxpa", *curl, f"http://{address}:{HOST_PORT}/"]
            assert subprocess.run(probe, capture_output=True, check=False).returncode != 0, address
        chain = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True).stdout
        assert "-j NETLOOM-PODIN-FXPA" in chain
    finally:
        server.terminate()
        server.wait()
    gone = host.ok("fxpa", state="absent")
    assert "delete iptables filter NETLOOM-PODIN-FXPA" in gone["changes"]
    assert "NETLOOM-PODIN-FXPA" not in subprocess.run(["iptables", "-S"], capture_output=True,
                                                        text=True).stdout


def test_concurrent_runs_get_distinct_allocations(host: Any) -> None:
    results: dict[str, dict[str, Any]] = {}
    threads = [threading.Thread(target=lambda pod_id=pod_id: results.update({pod_id: host.pod(pod_id)}))
               for pod_id in ("fxpa", "fxpb", "fxpc")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(not result.get("failed") for result in results.values()), results
    allocated = [(result["pod"]["subnet"], result["pod"]["port"]) for result in results.values()]
    assert len({subnet for subnet, _ in allocated}) == 3 and len({port for _, port in allocated}) == 3
    recorded = json.loads(pathlib.Path(host.state_file).read_text())["pods"]
    assert set(recorded) == {"fxpa", "fxpb", "fxpc"}


def test_early_restore_puts_the_chains_back_without_docker_changes(host: Any) -> None:
    host.ok("fxpa", egress="no-private")
    for hook, chain in (("DOCKER-USER", "NETLOOM-POD-FXPA"), ("INPUT", "NETLOOM-PODIN-FXPA")):
        jump = subprocess.run(["iptables", "-S", hook], capture_output=True, text=True).stdout
        rule = next(line for line in jump.splitlines() if f"-j {chain}" in line)
        subprocess.run(["iptables", *shlex.split(rule.replace("-A", "-D", 1))], check=True)
        subprocess.run(["iptables", "-F", chain], check=True)
        subprocess.run(["iptables", "-X", chain], check=True)
    restored = host.ok("fxpa", egress="no-private", chains_only=True)
    assert restored["changed"] and all("iptables" in change for change in restored["changes"])
    assert "-d 10.0.0.0/8 -i pod-fxpa" in subprocess.run(["iptables", "-S", "NETLOOM-POD-FXPA"],
                                                         capture_output=True, text=True).stdout
    assert "-i pod-fxpa" in subprocess.run(["iptables", "-S", "NETLOOM-PODIN-FXPA"],
                                            capture_output=True, text=True).stdout
    assert host.pod("fxpa", egress="no-private")["changed"] is False


def test_early_restore_before_docker_creates_docker_user_and_hooks_both_chains() -> None:
    """A boot before Docker, in a fresh netns: no DOCKER-USER yet; the replay makes it and hooks."""
    args = {"id": "fxpe", "image": "unused-before-docker", "pool": POOL, "egress": "no-private",
            "chains_only": True}
    with Netns("fxp") as ns:
        planned = run_module("pod", args, netns=ns.name, check_mode=True)
        assert planned["changed"] and "DOCKER-USER" not in ns.sh("iptables -S")
        done = run_module("pod", args, netns=ns.name)
        assert not done.get("failed"), done.get("msg")
        assert done["changes"][0] == "create iptables filter DOCKER-USER"
        assert "-j NETLOOM-POD-FXPE" in ns.sh("iptables -S DOCKER-USER")
        assert "-j NETLOOM-PODIN-FXPE" in ns.sh("iptables -S INPUT")
        assert "-d 169.254.0.0/16 -i pod-fxpe" in ns.sh("iptables -S NETLOOM-POD-FXPE")
        assert run_module("pod", args, netns=ns.name)["changed"] is False
