"""library/haproxy_relay.py run as Ansible runs it, against the real `haproxy -c`, and real traffic.

Config files live in pytest's temp directory (manage_service=false: this machine has no
systemd as PID 1; the lab's systemd nodes exercise the service part). The traffic tests
start HAProxy as a plain foreground process on 127.0.0.x (or in a throwaway netns) in
front of a Python HTTP server on loopback, and fetch through it.
"""
from __future__ import annotations

import http.server
import json
import os
import pathlib
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.netns import ROOT, Netns, run_module

HAPROXY = shutil.which("haproxy")
pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install -y haproxy)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="HAProxy's config (user haproxy, chroot) needs root"),
]

SEED = [
    {"name": "s3", "bind": "127.0.0.1:9000", "backend_host": "s3-storage", "backend_port": 9000},
    {"name": "database", "bind": "127.0.0.1:8001", "backend_host": "database", "backend_port": 8000},
    {"name": "victorialogs", "bind": "127.0.0.1:9428", "backend_host": "victorialogs", "backend_port": 9428},
]
BODY = b"netloom relay backend\n"


def args_for(path: pathlib.Path, relays: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"path": str(path), "relays": relays, "manage_service": False, **extra}


def make_certificate(path: pathlib.Path, ip: str) -> None:
    """A self-signed certificate whose SAN holds `ip`, certificate and key in one PEM file."""
    key, cert = path.parent / "key.tmp", path.parent / "cert.tmp"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=relay",
                    "-addext", f"subjectAltName=IP:{ip}"], check=True, capture_output=True)
    path.write_bytes(cert.read_bytes() + key.read_bytes())
    key.unlink()
    cert.unlink()


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def dir_listing(path: pathlib.Path) -> list[str]:
    return sorted(entry.name for entry in path.parent.iterdir())


# ---- file behaviour ----

def test_create_rerun_change_keeps_backup(tmp_path: pathlib.Path) -> None:
    live = tmp_path / "haproxy.cfg"
    first = run_module("haproxy_relay", args_for(live, SEED))
    assert first["changed"] and first["validated"] and first["changes"] == [f"create {live}"]
    assert first["backup_file"] is None and first["reloaded"] is False
    original = live.read_text()
    assert original.startswith("# Managed by netloom haproxy_relay")
    assert ("listen victorialogs\n    bind 127.0.0.1:9428\n"
            "    server victorialogs victorialogs:9428 ") in original

    again = run_module("haproxy_relay", args_for(live, SEED))
    assert again["changed"] is False and again["changes"] == [] and again["validated"] is False

    moved = [dict(SEED[0], bind="127.0.0.1:9001"), *SEED[1:]]
    changed = run_module("haproxy_relay", args_for(live, moved))
    assert changed["changed"] and changed["changes"] == [f"update {live}"]
    assert changed["backup_file"] == f"{live}.prev"
    assert "    bind 127.0.0.1:9001\n" in live.read_text()
    assert (tmp_path / "haproxy.cfg.prev").read_text() == original
    assert dir_listing(live) == ["haproxy.cfg", "haproxy.cfg.prev"]  # no temp file left behind

    no_backup = run_module("haproxy_relay", args_for(live, SEED, backup=False))
    assert no_backup["changed"] and no_backup["backup_file"] is None
    assert live.read_text() == original
    assert "9001" not in (tmp_path / "haproxy.cfg.prev").read_text()  # .prev untouched without backup


def test_owner_and_mode_of_the_live_file_are_kept(tmp_path: pathlib.Path) -> None:
    live = tmp_path / "haproxy.cfg"
    live.write_text("global\n")
    os.chmod(live, 0o640)
    os.chown(live, 0, int(subprocess.run(["getent", "group", "haproxy"], capture_output=True, text=True,
                                         check=True).stdout.split(":")[2]))
    before = live.stat()
    assert run_module("haproxy_relay", args_for(live, SEED))["changed"]
    after = live.stat()
    assert (after.st_mode & 0o7777, after.st_uid, after.st_gid) == (0o640, before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # replaced by rename, not rewritten in place


@pytest.mark.parametrize("certificate", ["missing", "not-a-pem"])
def test_config_rejected_by_haproxy_never_goes_live(tmp_path: pathlib.Path, certificate: str) -> None:
    """The module cannot know a certificate is unusable; `haproxy -c` does, and the live file stays."""
    live = tmp_path / "haproxy.cfg"
    assert run_module("haproxy_relay", args_for(live, SEED))["changed"]
    live_bytes = live.read_bytes()
    cert = tmp_path / "registry.pem"
    if certificate == "not-a-pem":
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    relays = [*SEED, {"name": "registry", "bind": "127.0.0.1:5010", "backend_host": "esb-registry",
                      "backend_port": 5010, "tls": {"mode": "terminate", "certificate": str(cert)}}]
    listing = dir_listing(live)

    if certificate == "missing":
        # Check mode on a node where an earlier task would make the certificate: the change is
        # reported and validation is left to the real run, which refuses the config below.
        preview = run_module("haproxy_relay", args_for(live, relays), check_mode=True)
        assert not preview.get("failed") and preview["changed"], preview
        assert any(str(cert) in str(warning) and "left to the real run" in str(warning)
                   for warning in preview.get("warnings", [])), preview
        assert live.read_bytes() == live_bytes and dir_listing(live) == listing
    for check_mode in ((False,) if certificate == "missing" else (True, False)):
        result = run_module("haproxy_relay", args_for(live, relays), check_mode=check_mode)
        assert result.get("failed"), result
        assert "haproxy -c rejected the rendered config (live file unchanged)" in result["msg"]
        assert str(cert) in result["msg"]  # haproxy's own words name the certificate
        assert live.read_bytes() == live_bytes
        assert dir_listing(live) == listing

    unchecked = run_module("haproxy_relay", args_for(live, relays, validate=False))
    assert unchecked["changed"] and unchecked["validated"] is False  # validate=false really skips it
    assert "ssl crt" in live.read_text()


def test_bad_input_fails_naming_field_and_changes_nothing(tmp_path: pathlib.Path) -> None:
    live = tmp_path / "haproxy.cfg"
    assert run_module("haproxy_relay", args_for(live, SEED))["changed"]
    live_bytes = live.read_bytes()
    clash = [*SEED, {"name": "other", "bind": "0.0.0.0:9000", "backend_host": "10.0.0.1", "backend_port": 1}]
    result = run_module("haproxy_relay", args_for(live, clash))
    assert result["failed"] and result["field"] == "relays[3].bind" and result["value"] == "0.0.0.0:9000"
    assert "collides with the bind 127.0.0.1:9000 of relay s3" in result["msg"]
    bad_name = [dict(SEED[0], name="s3 storage")]
    result = run_module("haproxy_relay", args_for(live, bad_name))
    assert result["failed"] and result["field"] == "relays[0].name"
    assert live.read_bytes() == live_bytes
    assert dir_listing(live) == ["haproxy.cfg"]


@pytest.mark.parametrize(("extra", "field", "value"), [
    # names ending in a newline: `^...$` patterns let them through to haproxy.cfg and systemd
    ({"relays": [dict(SEED[0], name="s3\n")]}, "relays[0].name", "s3\n"),
    ({"resolvers": {"name": "dns\n"}}, "resolvers.name", "dns\n"),
    ({"manage_service": True, "service": "haproxy\n"}, "service", "haproxy\n"),
    # addresses no host holds
    ({"relays": [dict(SEED[0], backend_host="255.255.255.255")]}, "relays[0].backend_host",
     "255.255.255.255"),
    ({"relays": [dict(SEED[0], backend_host="0.0.0.0")]}, "relays[0].backend_host", "0.0.0.0"),
    ({"relays": [dict(SEED[0], bind="224.0.0.9:9000")]}, "relays[0].bind", "224.0.0.9:9000"),
    ({"resolvers": {"nameservers": ["240.0.0.1:53"]}}, "resolvers.nameservers[0]", "240.0.0.1:53"),
])
def test_hostile_names_and_addresses_fail_naming_field_and_value(
        tmp_path: pathlib.Path, extra: dict[str, Any], field: str, value: str) -> None:
    live = tmp_path / "haproxy.cfg"
    assert run_module("haproxy_relay", args_for(live, SEED))["changed"]
    live_bytes = live.read_bytes()
    result = run_module("haproxy_relay", {**args_for(live, SEED), **extra})
    assert result.get("failed") is True, result
    assert result["field"] == field and result["value"] == value
    assert f"{field}={value!r}" in result["msg"]
    assert live.read_bytes() == live_bytes
    assert dir_listing(live) == ["haproxy.cfg"]


def test_hand_edited_config_is_restored(tmp_path: pathlib.Path) -> None:
    live = tmp_path / "haproxy.cfg"
    run_module("haproxy_relay", args_for(live, SEED))
    wanted = live.read_text()
    live.write_text(wanted.replace("timeout client 30s", "timeout client 1h"))
    result = run_module("haproxy_relay", args_for(live, SEED))
    assert result["changed"] and result["changes"] == [f"update {live}"]
    assert "timeout client 1h" in result["diff"][0]["before"]
    assert live.read_text() == wanted
    assert run_module("haproxy_relay", args_for(live, SEED))["changed"] is False


def test_check_mode_and_diff_come_from_the_same_plan(tmp_path: pathlib.Path) -> None:
    live = tmp_path / "haproxy.cfg"
    preview = run_module("haproxy_relay", args_for(live, SEED), check_mode=True)
    assert preview["changed"] and preview["validated"] and not live.exists()
    assert dir_listing(live) == []
    assert preview["diff"] == [{"before_header": str(live), "after_header": str(live),
                                "before": "", "after": preview["diff"][0]["after"]}]

    real = run_module("haproxy_relay", args_for(live, SEED))
    assert real["changes"] == preview["changes"]
    assert real["diff"] == preview["diff"]
    assert live.read_text() == preview["diff"][0]["after"]

    moved = [dict(SEED[0], backend_port=9100), *SEED[1:]]
    change_preview = run_module("haproxy_relay", args_for(live, moved), check_mode=True)
    assert change_preview["changed"] and change_preview["backup_file"] == f"{live}.prev"
    assert change_preview["diff"][0]["before"] == live.read_text()
    assert "server s3 s3-storage:9100 " in change_preview["diff"][0]["after"]
    assert "s3-storage:9100" not in live.read_text() and not (tmp_path / "haproxy.cfg.prev").exists()

    quiet = run_module("haproxy_relay", args_for(live, moved), diff=False)
    assert quiet["changed"] and "diff" not in quiet


def test_absent_removes_only_its_own_file(tmp_path: pathlib.Path) -> None:
    live = tmp_path / "haproxy.cfg"
    run_module("haproxy_relay", args_for(live, SEED))
    text = live.read_text()
    preview = run_module("haproxy_relay", {"path": str(live), "state": "absent", "manage_service": False},
                         check_mode=True)
    assert preview["changed"] and live.exists()
    removed = run_module("haproxy_relay", {"path": str(live), "state": "absent", "manage_service": False})
    assert removed["changed"] and removed["changes"] == [f"delete {live}"]
    assert not live.exists() and (tmp_path / "haproxy.cfg.prev").read_text() == text
    again = run_module("haproxy_relay", {"path": str(live), "state": "absent", "manage_service": False})
    assert again["changed"] is False

    live.write_text("global\n    maxconn 10\n")  # someone else's config
    foreign = run_module("haproxy_relay", {"path": str(live), "state": "absent", "manage_service": False})
    assert foreign["changed"] is False
    assert "not written by netloom" in str(foreign.get("warnings"))  # 2.19 warnings are structured
    assert live.read_text() == "global\n    maxconn 10\n"


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="systemd is PID 1 here")
def test_manage_service_without_systemd_fails_before_any_change(tmp_path: pathlib.Path) -> None:
    live = tmp_path / "haproxy.cfg"
    result = run_module("haproxy_relay", {"path": str(live), "relays": SEED})
    assert result["failed"] and result["field"] == "manage_service"
    assert "manage_service=false" in result["msg"]
    assert not live.exists()


def test_rendered_seed_configs_pass_haproxy(tmp_path: pathlib.Path) -> None:
    """The seed's local proxy and the registry relay (both TLS modes) as the real haproxy -c sees them."""
    cert = tmp_path / "certs dir" / "it's $HOME #1.pem"  # quoting: space, quote, $ and # in the path
    cert.parent.mkdir()
    make_certificate(cert, "10.99.0.1")
    local = run_module("haproxy_relay", args_for(tmp_path / "local.cfg", SEED))
    assert local["validated"] and not local.get("warnings")  # init-addr none: no "could not resolve"
    for mode in ("passthrough", "terminate"):
        tls = {"mode": mode, "certificate": str(cert) if mode == "terminate" else None}
        registry = [{"name": "registry", "bind": "10.99.0.1:5010", "transparent": True,
                     "backend_host": "esb-registry", "backend_port": 5010, "tls": tls}]
        result = run_module("haproxy_relay", args_for(tmp_path / f"gateway-{mode}.cfg", registry))
        assert result["validated"], result


# ---- real traffic ----

class Backend:
    """A Python HTTP server on loopback that answers every GET with BODY."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Backend:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class DnsResponder:
    """Minimal authoritative DNS on loopback: A `answer` for `name`, empty NOERROR otherwise."""

    def __init__(self, port: int, name: str, answer: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.name, self.answer = name.lower(), socket.inet_aton(answer)
        self.stop = threading.Event()
        self.queries = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.queries += 1
            self.sock.sendto(self.reply(query), peer)

    def reply(self, query: bytes) -> bytes:
        labels, offset = [], 12
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1:offset + 1 + length].decode().lower())
            offset += 1 + length
        qtype = struct.unpack("!H", query[offset + 1:offset + 3])[0]
        question = query[12:offset + 5]
        found = ".".join(labels) == self.name and qtype == 1
        header = query[:2] + struct.pack("!HHHHH", 0x8580, 1, int(found), 0, 0)
        answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + self.answer if found else b""
        return header + question + answer

    def __enter__(self) -> DnsResponder:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def start_haproxy(config: pathlib.Path, log: pathlib.Path, netns: str | None = None) -> subprocess.Popen:
    argv = [str(HAPROXY), "-db", "-f", str(config)]
    if netns:
        argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def stop_haproxy(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_listening(proc: subprocess.Popen, address: str, port: int, log: pathlib.Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"haproxy exited ({proc.returncode}): {log.read_text()}")
        try:
            socket.create_connection((address, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"haproxy is not listening on {address}:{port}: {log.read_text()}")


def fetch(url: str, context: ssl.SSLContext | None = None, seconds: float = 15) -> bytes:
    """GET through the relay, retrying while the backend is not up yet (DNS, health checks)."""
    handlers: list[Any] = [urllib.request.ProxyHandler({})]  # never an environment proxy
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    deadline = time.monotonic() + seconds
    while True:
        try:
            with opener.open(url, timeout=3) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def backend() -> Iterator[Backend]:
    with Backend() as server:
        yield server


def test_traffic_through_relays_plain_tls_and_dns(tmp_path: pathlib.Path, backend: Backend) -> None:
    """Plain, TLS-terminating and DNS-named relays, HAProxy started before the name resolves."""
    cert = tmp_path / "it's a $cert #1.pem"
    make_certificate(cert, "127.0.0.3")
    plain_port, tls_port, named_port = free_port("127.0.0.2"), free_port("127.0.0.3"), free_port("127.0.0.4")
    dns_port = free_port()
    fast_check = {"inter": "200ms", "fall": 2, "rise": 1}
    relays = [
        {"name": "plain", "bind": f"127.0.0.2:{plain_port}", "backend_host": "127.0.0.1",
         "backend_port": backend.port, "health_check": fast_check},
        {"name": "registry", "bind": f"127.0.0.3:{tls_port}", "backend_host": "127.0.0.1",
         "backend_port": backend.port, "tls": {"mode": "terminate", "certificate": str(cert)}},
        {"name": "named", "bind": f"127.0.0.4:{named_port}", "backend_host": "backend.netloom.test",
         "backend_port": backend.port, "health_check": fast_check},
    ]
    live = tmp_path / "haproxy.cfg"
    result = run_module("haproxy_relay", args_for(
        live, relays, resolvers={"name": "lab", "nameservers": [f"127.0.0.1:{dns_port}"],
                                 "timeout_resolve": "200ms", "timeout_retry": "200ms"}))
    assert result["changed"] and result["validated"], result

    log = tmp_path / "haproxy.log"
    proc = start_haproxy(live, log)
    try:
        wait_listening(proc, "127.0.0.2", plain_port, log)
        assert fetch(f"http://127.0.0.2:{plain_port}/") == BODY

        context = ssl.create_default_context(cafile=str(cert))  # verifies the SAN 127.0.0.3
        assert fetch(f"https://127.0.0.3:{tls_port}/", context) == BODY

        with pytest.raises(OSError):  # the name does not resolve yet: no backend
            fetch(f"http://127.0.0.4:{named_port}/", seconds=0)
        assert proc.poll() is None
        with DnsResponder(dns_port, "backend.netloom.test", "127.0.0.1") as dns:
            assert fetch(f"http://127.0.0.4:{named_port}/") == BODY
            assert dns.queries > 0
    finally:
        stop_haproxy(proc)
    logged = log.read_text()
    assert "plain plain/plain" in logged and "registry~ registry/registry" in logged  # tcplog to stdout


def test_transparent_bind_before_the_address_exists(tmp_path: pathlib.Path) -> None:
    """The registry relay's 10.99.0.1 appears only when WireGuard is up: `transparent` binds anyway."""
    relays = [{"name": "registry", "bind": "10.99.0.1:5010", "backend_host": "127.0.0.1",
               "backend_port": 8080, "transparent": True}]
    with Netns("nlhap") as ns:
        served = tmp_path / "www"
        served.mkdir()
        (served / "index.html").write_bytes(BODY)
        web = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns.name}", "python3", "-m", "http.server",
                                "--bind", "127.0.0.1", "--directory", str(served), "8080"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        strict, relaxed = tmp_path / "strict.cfg", tmp_path / "transparent.cfg"
        run_module("haproxy_relay", args_for(strict, [dict(relays[0], transparent=False)]))
        run_module("haproxy_relay", args_for(relaxed, relays))
        log = tmp_path / "haproxy.log"
        try:
            refused = subprocess.run(["nsenter", f"--net=/run/netns/{ns.name}", str(HAPROXY), "-db", "-f",
                                      str(strict)], capture_output=True, text=True, timeout=20)
            assert refused.returncode != 0 and "cannot bind socket" in refused.stdout + refused.stderr

            proc = start_haproxy(relaxed, log, netns=ns.name)
            try:
                deadline = time.monotonic() + 10
                while "10.99.0.1:5010" not in ns.sh("ss -ltnH"):
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)
                ns.sh("ip addr add 10.99.0.1/32 dev lo")
                body = ns.sh("curl -sS --noproxy '*' --retry 20 --retry-connrefused --retry-delay 1 "
                             "--max-time 30 http://10.99.0.1:5010/index.html")
                assert body.encode() == BODY
            finally:
                stop_haproxy(proc)
        finally:
            web.terminate()
            web.wait(timeout=10)


# ---- through Ansible: the action plugin renders on the controller, the node only writes ----

CUSTOM_TEMPLATE = """\
{{ marker }}; operator's own template
global
    maxconn {{ config.maxconn }}

defaults
    mode tcp
{% for name, value in config.timeouts.items() %}
    timeout {{ name }} {{ value }}
{% endfor %}
{% for relay in config.relays %}

listen {{ relay.name }}  # rendered on the controller
    bind {{ relay.bind }}
    server {{ relay.name }} {{ relay.backend_host }}:{{ relay.backend_port }}
{% endfor %}
"""
CUSTOM_RENDERED = """\
# Managed by netloom haproxy_relay; operator's own template
global
    maxconn 512

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

listen relay  # rendered on the controller
    bind 127.0.0.1:{port}
    server relay 192.0.2.80:8080
"""


@pytest.fixture(scope="module")
def node_python_without_jinja2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A managed node's interpreter with the standard library only: jinja2 cannot be imported."""
    venv = tmp_path_factory.mktemp("node") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import jinja2"], capture_output=True, text=True, check=False)
    assert probe.returncode != 0 and "No module named 'jinja2'" in probe.stderr
    return python


def ansible_adhoc(workdir: pathlib.Path, python: str, module_args: dict[str, Any],
                  check: bool = False) -> dict[str, Any]:
    """`ansible localhost -m haproxy_relay -a JSON` with the repository's ansible.cfg, run from `workdir`."""
    inventory = workdir / "hosts.ini"
    inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={python}\n")
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
           "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", "ANSIBLE_LOCAL_TEMP": str(workdir / "local-tmp"),
           "ANSIBLE_REMOTE_TEMP": str(workdir / "remote-tmp")}
    argv = [str(pathlib.Path(sys.executable).parent / "ansible"), "localhost", "-i", str(inventory),
            "-m", "haproxy_relay", "-a", json.dumps(module_args), *(["--check"] if check else [])]
    proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, check=False)
    _, arrow, result = proc.stdout.partition(" => ")  # "localhost | CHANGED => {...}"
    try:
        return json.loads(result) if arrow else {}
    except json.JSONDecodeError:
        raise AssertionError(f"ansible printed no result: {proc.stdout}{proc.stderr}") from None


def test_adhoc_run_renders_the_operators_template_on_the_controller(
        tmp_path: pathlib.Path, node_python_without_jinja2: str) -> None:
    """The node's Python cannot import jinja2, yet the config is the custom template's output:
    the action plugin rendered it on the controller (found relative to the run, as
    ansible.builtin.template finds `src`: in templates/) and the module only validated and wrote it."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "relay.cfg.j2").write_text(CUSTOM_TEMPLATE)
    live = tmp_path / "etc" / "haproxy.cfg"
    live.parent.mkdir()
    port = free_port()
    args = args_for(live, [{"name": "relay", "bind": f"127.0.0.1:{port}", "backend_host": "192.0.2.80",
                            "backend_port": 8080}], maxconn=512, template="relay.cfg.j2")

    preview = ansible_adhoc(tmp_path, node_python_without_jinja2, args, check=True)
    assert preview["changed"] and not live.exists(), preview
    first = ansible_adhoc(tmp_path, node_python_without_jinja2, args)
    assert first["changed"] and first["validated"] and first["changes"] == [f"create {live}"], first
    assert live.read_text() == CUSTOM_RENDERED.format(port=port)
    assert ansible_adhoc(tmp_path, node_python_without_jinja2, args)["changed"] is False

    # The module's own validation still runs on the node before the rendered text is used.
    bad = ansible_adhoc(tmp_path, node_python_without_jinja2, {**args, "maxconn": 0})
    assert bad["field"] == "maxconn" and live.read_text() == CUSTOM_RENDERED.format(port=port)


def test_without_the_action_plugin_the_module_names_the_missing_option(tmp_path: pathlib.Path) -> None:
    live = tmp_path / "haproxy.cfg"
    result = run_module("haproxy_relay", args_for(live, SEED), controller=False)
    assert result["failed"] and "rendered.config" in result["msg"] and "action_plugins" in result["msg"]
    assert not live.exists()
