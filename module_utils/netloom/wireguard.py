"""WireGuard plumbing shared by the wireguard_interface and wireguard_routes modules.

Live WireGuard state is read and changed only through the `wg` tool, because it is the one
interface that speaks to kernel devices (generic netlink) and wireguard-go devices (the UAPI
socket under /var/run/wireguard) alike. Secrets (private and preshared keys) are passed to
`wg` on stdin, never on a command line, and never leave this module in a result or diff.
Links, addresses and routes both modules read and change through the kernel seam
(netlink.py), which is also their entry (`run_with_netlink`).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ansible.module_utils.netloom import systemd
from ansible.module_utils.netloom.common import (
    ChangePlan,
    CommandError,
    InputError,
    not_a_host_reason,
    port,
    run_command,
)
from ansible.module_utils.netloom.constants import NO_HOST_NETWORKS
from ansible.module_utils.netloom.files import read_text, remove_dropin, remove_file, write_file

KEY_BYTES = 32
HIDDEN = "(hidden)"
USERSPACE_SOCKET_DIR = "/var/run/wireguard"
USERSPACE_DROPIN = "netloom-wireguard-go.conf"
# The templates this module's files come from (under templates/, rendered on the controller).
CONFIG_TEMPLATE = "wireguard/wg-quick.conf.j2"
DROPIN_TEMPLATE = "systemd/wireguard-go.conf.j2"
# wg-quick runs PostUp with `eval`: paths are shell-quoted (config_dir may hold spaces).
TEMPLATE_FILTERS = {"shell_quote": shlex.quote}
PRESHARED_KEYS_HEADER = ("# Managed by netloom (wireguard_interface): preshared keys, loaded by the "
                         "config's PostUp.\n")
# How a declared endpoint is kept: `on_change` sets it when the peer is new, has no endpoint, or
# the declaration changed since the last run (a peer behind NAT that roamed is left alone);
# `always` resets any other live endpoint on every run.
ENDPOINT_POLICIES = ("on_change", "always")
# IPv6 ranges that can never be a peer's endpoint or an interface or peer address.
_NOT_A_HOST_V6 = (
    (ipaddress.IPv6Network("::/128"), "the unspecified address (::)"),
    (ipaddress.IPv6Network("::1/128"), "the loopback address (::1)"),
    (ipaddress.IPv6Network("ff00::/8"), "a multicast address (ff00::/8)"),
)
# wireguard-go prints a boxed banner on stderr on every start; its real errors are the other lines.
_BANNER_CHARS = "┌│└"


# ---- validation and normalisation ----

def wg_key(field_name: str, value: object, secret: bool = False) -> str:
    """A WireGuard key is base64 of exactly 32 bytes; a secret's value is never echoed back."""
    text = str(value).strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise InputError(field_name, HIDDEN if secret else value,
                         f"not a WireGuard key (base64 of {KEY_BYTES} bytes, 44 characters)")
    return text


def address_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address cannot be a host's (an endpoint or an interface address), None when it can."""
    if address.version == 4:
        return not_a_host_reason(address)  # type: ignore[arg-type]
    for network, reason in _NOT_A_HOST_V6:
        if address in network:
            return reason
    return None


def network_reason(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str | None:
    """Why a peer's AllowedIPs entry cannot make sense: it lies wholly in a range no host holds."""
    reason = address_reason(network.network_address)
    if reason is None:
        return None
    blocks = NO_HOST_NETWORKS if network.version == 4 else _NOT_A_HOST_V6
    return reason if any(network.subnet_of(block) for block, _ in blocks) else None  # type: ignore[arg-type]


def network_sort_key(text: str) -> tuple[int, int, int]:
    network = ipaddress.ip_network(text)
    return network.version, int(network.network_address), network.prefixlen


def sorted_networks(texts: Iterable[str]) -> tuple[str, ...]:
    """Allowed IPs compared as an ordered tuple: `wg` lists them in insertion order."""
    return tuple(sorted({str(ipaddress.ip_network(text)) for text in texts}, key=network_sort_key))


def format_endpoint(host: str, port_number: int) -> str:
    return f"[{host}]:{port_number}" if ":" in host else f"{host}:{port_number}"


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def split_endpoint(field_name: str, value: object) -> tuple[str, int]:
    """Split host:port or [v6]:port; the host may be a name, resolved later on the node."""
    text = str(value).strip()
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise InputError(field_name, value, "expected [IPv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise InputError(field_name, value, "expected host:port (IPv6 as [address]:port)")
    if not host:
        raise InputError(field_name, value, "endpoint host is empty")
    if not _is_address(host) and (len(host) > 253 or not _HOSTNAME_RE.fullmatch(host)):
        # The endpoint goes into the wg-quick config: a name is letters, digits, '-' and '.' only.
        raise InputError(field_name, value, "endpoint host is neither an IP address nor a DNS name")
    try:
        return host, port(field_name, port_text)
    except InputError as err:
        raise InputError(field_name, value, f"port {port_text!r}: {str(err).split(': ', 1)[1]}") from None


def resolve_endpoint(field_name: str, value: object) -> tuple[str, frozenset[str]]:
    """Declared endpoint (canonical when literal) and every ip:port form `wg` may show for it."""
    host, port_number = split_endpoint(field_name, value)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        reason = address_reason(literal)
        if reason:
            raise InputError(field_name, value, f"an endpoint must be a unicast host address: it is {reason}")
        canonical = format_endpoint(str(literal), port_number)
        return canonical, frozenset([canonical])
    try:
        infos = socket.getaddrinfo(host, port_number, type=socket.SOCK_DGRAM)
    except socket.gaierror as err:
        raise InputError(field_name, value, f"host does not resolve on this node ({err.strerror})") from None
    forms = frozenset(format_endpoint(str(ipaddress.ip_address(info[4][0].split("%")[0])), port_number)
                      for info in infos)
    return format_endpoint(host, port_number), forms


# ---- desired and live state ----

@dataclass(frozen=True)
class PeerSpec:
    """One declared peer; endpoint None means 'not managed' (a roaming peer's is learned)."""

    public_key: str
    allowed_ips: tuple[str, ...]
    persistent_keepalive: int = 0
    endpoint: str | None = None
    endpoint_forms: frozenset[str] = frozenset()
    preshared_key: str | None = field(default=None, repr=False)
    endpoint_policy: str = "on_change"


@dataclass(frozen=True)
class PeerState:
    """One peer as `wg show <if> dump` reports it."""

    public_key: str
    allowed_ips: tuple[str, ...]
    persistent_keepalive: int
    endpoint: str | None
    preshared_key: str | None = field(default=None, repr=False)
    latest_handshake: int = 0


@dataclass(frozen=True)
class DeviceState:
    """Interface half of `wg show <if> dump`."""

    private_key: str | None = field(repr=False)
    public_key: str | None
    listen_port: int
    peers: dict[str, PeerState]


def _none(text: str) -> str | None:
    return None if text == "(none)" else text


def _keepalive(text: str) -> int:
    return 0 if text == "off" else int(text)


def parse_dump(text: str) -> DeviceState:
    """Parse `wg show <if> dump`: one tab-separated interface line, then one line per peer."""
    lines = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not lines or len(lines[0]) != 4:
        raise CommandError(f"unexpected `wg show dump` output: {len(lines)} lines")
    private_key, public_key, listen_port, _fwmark = lines[0]
    peers: dict[str, PeerState] = {}
    for fields in lines[1:]:
        if len(fields) != 8:
            raise CommandError(f"unexpected peer line in `wg show dump` ({len(fields)} fields)")
        pub, psk, endpoint, allowed, handshake, _rx, _tx, keepalive = fields
        allowed_ips = () if allowed == "(none)" else sorted_networks(allowed.split(","))
        peers[pub] = PeerState(pub, allowed_ips, _keepalive(keepalive), _none(endpoint), _none(psk),
                               int(handshake))
    return DeviceState(_none(private_key), _none(public_key), int(listen_port), peers)


def parse_allowed_ips(text: str) -> list[str]:
    """Every CIDR from `wg show <if> allowed-ips` (one peer per line: key, then CIDRs or (none))."""
    cidrs: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        cidrs.extend(item for item in fields[1:] if item != "(none)")
    return cidrs


def peer_view(peer: PeerSpec | PeerState) -> dict[str, object]:
    """A peer for results and diffs: everything but the preshared key, which is only flagged."""
    return {
        "public_key": peer.public_key,
        "allowed_ips": list(peer.allowed_ips),
        "endpoint": peer.endpoint,
        "persistent_keepalive": peer.persistent_keepalive,
        "preshared_key": HIDDEN if peer.preshared_key else None,
    }


def endpoint_due(spec: PeerSpec, live: PeerState, last_declared: str | None) -> bool:
    """Whether the declared endpoint must be set on a live peer.

    With policy `on_change` a live endpoint that differs only because the peer roamed (NAT, a
    new address) is left alone: the endpoint is set when the peer has none, or when the
    declaration differs from `last_declared` (the endpoint the saved config holds, i.e. what
    the last run set). Otherwise every run would reset the roamed endpoint and never settle.
    """
    if not spec.endpoint or live.endpoint in spec.endpoint_forms:
        return False
    if spec.endpoint_policy == "always" or live.endpoint is None:
        return True
    return last_declared != spec.endpoint


def peer_differences(spec: PeerSpec, live: PeerState | None, last_declared: str | None = None) -> list[str]:
    """Fields to set so the live peer matches the declaration (for a new peer: every declared one)."""
    if live is None:
        fields = ["allowed_ips"]
        fields += ["endpoint"] if spec.endpoint else []
        fields += ["persistent_keepalive"] if spec.persistent_keepalive else []
        fields += ["preshared_key"] if spec.preshared_key else []
        return fields
    fields = []
    if spec.allowed_ips != live.allowed_ips:
        fields.append("allowed_ips")
    if endpoint_due(spec, live, last_declared):
        fields.append("endpoint")
    if spec.persistent_keepalive != live.persistent_keepalive:
        fields.append("persistent_keepalive")
    if spec.preshared_key != live.preshared_key:
        fields.append("preshared_key")
    return fields


def peer_set_args(spec: PeerSpec, fields: list[str]) -> tuple[list[str], str | None]:
    """`wg set` arguments for the given fields, and the stdin carrying the preshared key if any."""
    args = ["peer", spec.public_key]
    stdin = None
    if "allowed_ips" in fields:
        args += ["allowed-ips", ",".join(spec.allowed_ips)]
    if "endpoint" in fields:
        args += ["endpoint", str(spec.endpoint)]
    if "persistent_keepalive" in fields:
        args += ["persistent-keepalive", str(spec.persistent_keepalive or "off")]
    if "preshared_key" in fields:
        if spec.preshared_key:
            args += ["preshared-key", "/dev/stdin"]
            stdin = spec.preshared_key + "\n"
        else:
            args += ["preshared-key", "/dev/null"]
    return args, stdin


# ---- the persisted (wg-quick) config ----

@dataclass(frozen=True)
class InterfaceSpec:
    """Everything declared about one interface except its private key."""

    name: str
    addresses: tuple[str, ...]
    listen_port: int | None
    mtu: int | None
    peers: tuple[PeerSpec, ...]


def key_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.key")


def preshared_keys_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.psk")


def config_variables(params: Mapping[str, Any]) -> dict[str, Any]:
    """What the wg-quick template sees, from the module's (argument-spec normalised) parameters.

    Runs on the controller (action plugin). Addresses, AllowedIPs and literal endpoints get the
    canonical forms the module compares with; names stay names (they resolve on the node).
    Raises InputError or ValueError on input the module will refuse, naming the field.
    No key material: the key files' paths only, and whether there are preshared keys.
    """
    name = str(params["name"])
    directory = os.path.normpath(str(params["config_dir"]))
    peers = []
    for index, raw in enumerate(params.get("peers") or []):
        endpoint = None
        if raw.get("endpoint"):
            host, port_number = split_endpoint(f"peers[{index}].endpoint", raw["endpoint"])
            with contextlib.suppress(ValueError):
                host = str(ipaddress.ip_address(host))
            endpoint = format_endpoint(host, port_number)
        peers.append({
            "public_key": str(raw["public_key"]).strip(),
            "allowed_ips": sorted_networks(str(ipaddress.ip_network(str(item).strip(), strict=True))
                                           for item in raw.get("allowed_ips") or []),
            "endpoint": endpoint,
            "persistent_keepalive": int(raw.get("persistent_keepalive") or 0),
        })
    with_psk = any(raw.get("preshared_key") for raw in params.get("peers") or [])
    return {"interface": {
        "name": name,
        "addresses": [str(ipaddress.ip_interface(str(item).strip()))
                      for item in params.get("addresses") or []],
        "listen_port": params.get("listen_port"),
        "mtu": params.get("mtu"),
        "key_path": key_path(directory, name),
        "preshared_keys_path": preshared_keys_path(directory, name) if with_psk else None,
        "peers": peers,
    }}


def preshared_keys_text(peers: Iterable[PeerSpec]) -> str | None:
    """The 0600 companion of the config that PostUp loads with `wg addconf`; None without any.

    `wg addconf` replaces a listed peer's AllowedIPs, so each peer's are repeated here.
    """
    lines = [PRESHARED_KEYS_HEADER.rstrip("\n")]
    for peer in peers:
        if peer.preshared_key:
            lines += ["", "[Peer]", f"PublicKey = {peer.public_key}", f"PresharedKey = {peer.preshared_key}"]
            if peer.allowed_ips:
                lines.append(f"AllowedIPs = {', '.join(peer.allowed_ips)}")
    return "\n".join(lines) + "\n" if len(lines) > 1 else None


def check_config(name: str, text: str) -> None:
    """`wg-quick strip` on the text: wg-quick's own parser must accept what the boot unit reads.

    wg-quick takes the interface name from the file name, so the check copy is NAME.conf in a
    private directory.
    """
    with tempfile.TemporaryDirectory(prefix="netloom-wg-") as directory:
        path = os.path.join(directory, f"{name}.conf")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        proc = subprocess.run(["wg-quick", "strip", path], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CommandError("wg-quick strip rejected the rendered config (live file unchanged): "
                           + (proc.stderr or proc.stdout).strip().replace(path, f"{name}.conf"))
    problem = stripped_config_problem(proc.stdout)
    if problem:
        raise CommandError(f"the rendered config is not a WireGuard config (live file unchanged): {problem}")


# What `wg setconf` accepts per section; wg-quick strip passes anything else through unchecked.
_WG_KEYS = {"interface": {"privatekey", "listenport", "fwmark"},
            "peer": {"publickey", "presharedkey", "allowedips", "endpoint", "persistentkeepalive"}}


def stripped_config_problem(text: str) -> str | None:
    """Why `wg setconf` would refuse wg-quick's stripped config (one [Interface] first, known keys)."""
    section = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        header = line.lower()
        if header in ("[interface]", "[peer]"):
            if (header == "[interface]") != (section is None):
                return f"line {number}: {line} out of place (one [Interface], first, then [Peer]s)"
            section = header[1:-1]
            continue
        key, sep, _value = line.partition("=")
        if section is None or not sep or key.strip().lower() not in _WG_KEYS[section]:
            return f"line {number}: {line!r} is not a key of {f'[{section}]' if section else 'any section'}"
    return None if section else "no [Interface] section"


def config_endpoints(text: str | None) -> dict[str, str]:
    """Peer public key -> Endpoint as the saved config holds them: what the last run declared."""
    endpoints: dict[str, str] = {}
    public_key = None
    for line in (text or "").splitlines():
        name, sep, value = line.partition("=")
        name, value = name.strip().lower(), value.strip()
        if line.strip().lower() == "[peer]":
            public_key = None
        elif sep and name == "publickey":
            public_key = value
        elif sep and name == "endpoint" and public_key:
            endpoints[public_key] = value
    return endpoints


def redact_config(text: str) -> str:
    """The config as shown in a diff: key material replaced, everything else verbatim."""
    out = []
    for line in text.splitlines():
        name = line.split("=", 1)[0].strip().lower()
        out.append(f"{line.split('=', 1)[0].rstrip()} = {HIDDEN}"
                   if "=" in line and name in ("privatekey", "presharedkey") else line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


# ---- the wg tool ----

class WgTool:
    """The `wg` command from wireguard-tools; the module fails clearly when it is missing."""

    def __init__(self) -> None:
        path = shutil.which("wg")
        if path is None:
            raise CommandError("`wg` not found: install wireguard-tools on the node")
        self.path = path

    def dump(self, name: str) -> DeviceState:
        return parse_dump(run_command([self.path, "show", name, "dump"]))

    def allowed_ips(self, name: str) -> list[str]:
        return parse_allowed_ips(run_command([self.path, "show", name, "allowed-ips"]))

    def set(self, name: str, args: list[str], stdin: str | None = None) -> None:
        run_command([self.path, "set", name, *args], stdin=stdin)

    def genkey(self) -> str:
        return run_command([self.path, "genkey"]).strip()

    def pubkey(self, private_key: str) -> str:
        return run_command([self.path, "pubkey"], stdin=private_key + "\n").strip()


# ---- wireguard-go processes ----

def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def userspace_socket(name: str) -> str:
    return os.path.join(USERSPACE_SOCKET_DIR, f"{name}.sock")


def userspace_pids(name: str) -> list[int]:
    """wireguard-go processes serving `name` in this network namespace (another netns may reuse it)."""
    own_netns = os.stat("/proc/self/ns/net")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", encoding="utf-8") as handle:
                if handle.read().strip() != "wireguard-go":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            netns = os.stat(f"/proc/{entry}/ns/net")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if name.encode() in argv and (netns.st_dev, netns.st_ino) == (own_netns.st_dev, own_netns.st_ino):
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    """True while any thread of the process runs: a Go process's leader can be a zombie first."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", encoding="utf-8") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return False


def start_userspace(name: str) -> None:
    """Start wireguard-go, which daemonises once its TUN device and UAPI socket exist.

    A new session keeps it alive after Ansible's connection closes; without LOG_LEVEL its
    daemon half writes to /dev/null, so it holds none of our pipes open.
    """
    binary = shutil.which("wireguard-go")
    if binary is None:
        raise CommandError("no kernel WireGuard on this node and wireguard-go is not installed")
    env = {key: value for key, value in os.environ.items() if key != "LOG_LEVEL"}
    proc = subprocess.run([binary, name], capture_output=True, text=True, env=env,
                          start_new_session=True, check=False)
    if proc.returncode != 0:
        raise CommandError(f"wireguard-go {name} failed ({proc.returncode}): "
                           f"{userspace_failure(proc.stdout, proc.stderr)}")


def userspace_failure(stdout: str, stderr: str) -> str:
    """wireguard-go's real error: its ERROR lines (on stdout), never the banner box on stderr."""
    lines = [line.strip() for line in (stdout + "\n" + stderr).splitlines()
             if line.strip() and line.strip()[0] not in _BANNER_CHARS]
    errors = [line for line in lines if line.startswith("ERROR")]
    return "; ".join((errors or lines)[-5:]) or "no error output"


def stop_userspace(name: str, link_exists: Callable[[], bool], delete_link: Callable[[], None]) -> None:
    """Stop wireguard-go as wg-quick does (remove its socket; it exits and its TUN goes).

    If it does not go in time, delete the link and finally terminate the processes by pid.
    """
    pids = userspace_pids(name)
    remove_file(userspace_socket(name))
    if not wait_until(lambda: not link_exists()):
        delete_link()
    if not wait_until(lambda: not any(_alive(pid) for pid in pids)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: not any(_alive(pid) for pid in pids)):
            raise CommandError(f"wireguard-go for {name} (pids {pids}) did not exit")


# ---- boot persistence through systemd (the seam behind `manage_service`) ----

class WgQuickUnit:
    """`wg-quick@<name>`: enabled so the saved config brings the interface back at boot.

    The module itself keeps the running interface converged; the unit is only the boot
    path, plus a drop-in (templates/systemd/wireguard-go.conf.j2, rendered on the controller)
    that makes wg-quick use wireguard-go where the kernel lacks it.
    """

    def __init__(self, module: Any, name: str, dropin: str | None, unit_dir: str = systemd.UNIT_DIR) -> None:
        self.module = module
        self.unit = systemd.Unit(f"wg-quick@{name}.service")
        self.dropin = dropin
        self.dropin_path = self.unit.dropin_path(USERSPACE_DROPIN, unit_dir)

    def _write_dropin(self, text: str) -> None:
        write_file(self.module, self.dropin_path, text)
        systemd.daemon_reload()

    def _remove_dropin(self) -> None:
        remove_dropin(self.dropin_path)
        systemd.daemon_reload()

    def plan(self, plan: ChangePlan, implementation: str | None) -> None:
        """Steps for the unit: present with an implementation, or absent when it is None.

        On removal the unit is stopped first (--now: wg-quick down), while its drop-in still
        describes how it runs.
        """
        current = read_text(self.dropin_path)
        enabled = self.unit.is_enabled()
        step_key = f"systemd drop-in {self.dropin_path}"
        if implementation is None and enabled:
            plan.add(f"service {self.unit.name}", "update", {"enabled": True}, {"enabled": False},
                     self.unit.action("disable", "--now"))
        wanted = self.dropin if implementation == "wireguard-go" else None
        if wanted is not None and current != wanted:
            plan.add(step_key, "create" if current is None else "update", current, wanted,
                     lambda: self._write_dropin(wanted))
        elif wanted is None and current is not None:
            plan.add(step_key, "delete", current, None, self._remove_dropin)
        if implementation and not enabled:
            plan.add(f"service {self.unit.name}", "update", {"enabled": False}, {"enabled": True},
                     self.unit.action("enable"))
