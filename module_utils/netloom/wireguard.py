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
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ansible.module_utils.netloom.common import (
    ChangePlan,
    CommandError,
    InputError,
    not_a_host_reason,
    port,
    run_command,
)

KEY_BYTES = 32
HIDDEN = "(hidden)"
USERSPACE_SOCKET_DIR = "/var/run/wireguard"
SYSTEMD_UNIT_DIR = "/etc/systemd/system"
USERSPACE_DROPIN = "netloom-wireguard-go.conf"
CONFIG_HEADER = "# Managed by netloom (wireguard_interface); local edits are overwritten.\n"
# How a declared endpoint is kept: `on_change` sets it when the peer is new, has no endpoint, or
# the declaration changed since the last run (a peer behind NAT that roamed is left alone);
# `always` resets any other live endpoint on every run.
ENDPOINT_POLICIES = ("on_change", "always")
# IPv4 ranges that no host holds (common.not_a_host_reason names them).
_NOT_A_HOST = tuple(ipaddress.IPv4Network(net) for net in
                    ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"))
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
    blocks = _NOT_A_HOST if network.version == 4 else tuple(block for block, _ in _NOT_A_HOST_V6)
    return reason if any(network.subnet_of(block) for block in blocks) else None  # type: ignore[arg-type]


def network_sort_key(text: str) -> tuple[int, int, int]:
    network = ipaddress.ip_network(text)
    return network.version, int(network.network_address), network.prefixlen


def sorted_networks(texts: Iterable[str]) -> tuple[str, ...]:
    """Allowed IPs compared as an ordered tuple: `wg` lists them in insertion order."""
    return tuple(sorted({str(ipaddress.ip_network(text)) for text in texts}, key=network_sort_key))


def format_endpoint(host: str, port_number: int) -> str:
    return f"[{host}]:{port_number}" if ":" in host else f"{host}:{port_number}"


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


def render_config(spec: InterfaceSpec, private_key: str) -> str:
    """wg-quick format, so `wg-quick up <name>` (the systemd unit at boot) rebuilds the same device."""
    lines = [CONFIG_HEADER.rstrip("\n"), "[Interface]", f"PrivateKey = {private_key}"]
    if spec.addresses:
        lines.append(f"Address = {', '.join(spec.addresses)}")
    # wg-quick must install no route at boot (no policy routing for 0.0.0.0/0, no public /32):
    # routes come only from wireguard_routes, through its filter.
    lines.append("Table = off")
    if spec.listen_port is not None:
        lines.append(f"ListenPort = {spec.listen_port}")
    if spec.mtu is not None:
        lines.append(f"MTU = {spec.mtu}")
    for peer in spec.peers:
        lines += ["", "[Peer]", f"PublicKey = {peer.public_key}"]
        if peer.preshared_key:
            lines.append(f"PresharedKey = {peer.preshared_key}")
        if peer.allowed_ips:
            lines.append(f"AllowedIPs = {', '.join(peer.allowed_ips)}")
        if peer.endpoint:
            lines.append(f"Endpoint = {peer.endpoint}")
        if peer.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return "\n".join(lines) + "\n"


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


# ---- files holding secrets ----

def read_private_file(path: str) -> tuple[str | None, int | None]:
    """Content and permission bits of a file, or (None, None) when it does not exist."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(), os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return None, None


def write_private_file(path: str, content: str) -> None:
    """Write atomically with mode 0600 from the first byte: a reader sees old or new, never half."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    handle_fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(handle_fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o600)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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

def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def userspace_dropin() -> str:
    return ("# Managed by netloom (wireguard_interface): no kernel WireGuard on this node.\n"
            "[Service]\nEnvironment=WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go\n")


class WgQuickUnit:
    """`wg-quick@<name>`: enabled so the saved config brings the interface back at boot.

    The module itself keeps the running interface converged; the unit is only the boot
    path, plus a drop-in that makes wg-quick use wireguard-go where the kernel lacks it.
    """

    def __init__(self, name: str, unit_dir: str = SYSTEMD_UNIT_DIR) -> None:
        self.unit = f"wg-quick@{name}.service"
        self.dropin_path = os.path.join(unit_dir, f"{self.unit}.d", USERSPACE_DROPIN)

    def enabled(self) -> bool:
        return run_command(["systemctl", "is-enabled", self.unit], check=False).strip() == "enabled"

    def _write_dropin(self) -> None:
        os.makedirs(os.path.dirname(self.dropin_path), mode=0o755, exist_ok=True)
        write_private_file(self.dropin_path, userspace_dropin())
        os.chmod(self.dropin_path, 0o644)
        run_command(["systemctl", "daemon-reload"])

    def _remove_dropin(self) -> None:
        remove_file(self.dropin_path)
        with contextlib.suppress(OSError):  # the .d directory goes too unless something else is in it
            os.rmdir(os.path.dirname(self.dropin_path))
        run_command(["systemctl", "daemon-reload"])

    def _enable(self) -> None:
        run_command(["systemctl", "enable", self.unit])

    def _disable(self) -> None:
        """--now also stops a unit that brought the interface up at boot (wg-quick down)."""
        run_command(["systemctl", "disable", "--now", self.unit])

    def plan(self, plan: ChangePlan, implementation: str | None) -> None:
        """Steps for the unit: present with an implementation, or absent when it is None.

        On removal the unit is stopped first, while its drop-in still describes how it runs.
        """
        current, _mode = read_private_file(self.dropin_path)
        enabled = self.enabled()
        step_key = f"systemd drop-in {self.dropin_path}"
        if implementation is None and enabled:
            plan.add(f"service {self.unit}", "update", {"enabled": True}, {"enabled": False}, self._disable)
        if implementation == "wireguard-go" and current != userspace_dropin():
            plan.add(step_key, "create" if current is None else "update", current, userspace_dropin(),
                     self._write_dropin)
        elif implementation != "wireguard-go" and current is not None:
            plan.add(step_key, "delete", current, None, self._remove_dropin)
        if implementation and not enabled:
            plan.add(f"service {self.unit}", "update", {"enabled": False}, {"enabled": True}, self._enable)
