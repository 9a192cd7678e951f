"""HAProxy L4 relays (ESB's local proxy and registry relay): input model, rendering, safe install.

The Jinja2 template lives here as a string, not in templates/: Ansible ships only the module
and module_utils to a node, so the config is rendered on the node with Debian's
python3-jinja2 (the same engine the controller uses, so the template is ordinary Jinja2).
Install is "validate before it goes live": the text is written next to the live file,
checked with `haproxy -c`, the old file kept as PATH.prev, then swapped with os.replace,
so a rejected config never replaces a working one.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from ansible.module_utils.netloom.common import (
    CommandError,
    InputError,
    int_range,
    ipv4_address,
    not_a_host_reason,
    port,
)

try:
    import jinja2
except ImportError:  # reported by the module with the package to install, before any change
    jinja2 = None

MARKER = "# Managed by netloom haproxy_relay"
DEFAULT_PATH = "/etc/haproxy/haproxy.cfg"
DEFAULT_TIMEOUTS = {"connect": "5s", "client": "30s", "server": "30s"}
DEFAULT_RESOLVERS: dict[str, Any] = {
    "name": "docker",
    "nameservers": ["127.0.0.11:53"],  # Docker's embedded DNS
    "resolve_retries": 3,
    "timeout_resolve": "1s",
    "timeout_retry": "1s",
    "hold": {"valid": "10s"},
}
DEFAULT_HEALTH_CHECK: dict[str, Any] = {"enabled": True, "inter": "2s", "fall": 3, "rise": 2}
DEFAULT_MAXCONN = 4096
DEFAULT_LOG_TARGET = "stdout"
HOLD_STATUSES = ("nx", "other", "refused", "timeout", "valid", "obsolete")
TLS_MODES = ("passthrough", "terminate")

# Patterns are used with fullmatch: `$` would also match before a trailing newline.
# HAProxy: proxy, server and resolvers names are letters, digits, '-', '_', '.' and ':'.
_IDENT_RE = re.compile(r"[A-Za-z0-9_.:-]+")
# HAProxy time values: a positive integer with an optional unit (default milliseconds).
_DURATION_RE = re.compile(r"[1-9][0-9]*(us|ms|s|m|h|d)?")
# DNS label; '_' allowed because Docker resolves compose container names such as esb_registry_1.
_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# Characters a file path may hold unquoted in haproxy.cfg, and in a systemd unit line.
_PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9_./@+:=-]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Relay:
    """One TCP relay: a `listen` section with a single bind and a single server."""

    name: str
    bind_address: str
    bind_port: int
    backend_host: str
    backend_port: int
    backend_is_name: bool
    tls_mode: str
    tls_certificate: str | None
    transparent: bool
    check: dict[str, Any] | None

    @property
    def bind(self) -> str:
        return f"{self.bind_address}:{self.bind_port}"


@dataclass(frozen=True)
class Resolvers:
    name: str
    nameservers: list[str]
    resolve_retries: int
    timeout_resolve: str
    timeout_retry: str
    hold: list[tuple[str, str]]


@dataclass(frozen=True)
class RelayConfig:
    relays: list[Relay]
    resolvers: Resolvers
    timeouts: dict[str, str]
    maxconn: int
    log_target: str

    def referenced_files(self) -> list[str]:
        """Files the config names (TLS certificates), which haproxy -c opens."""
        return sorted({relay.tls_certificate for relay in self.relays if relay.tls_certificate})

    @property
    def resolvers_used(self) -> bool:
        """Only backends given by name need DNS at run time; IP backends never do."""
        return any(relay.backend_is_name for relay in self.relays)


# ---- validation: every function raises InputError naming the field and the value ----

def identifier(field_name: str, value: Any) -> str:
    text = "" if value is None else str(value)
    if not text:
        raise InputError(field_name, value, "must not be empty")
    if not _IDENT_RE.fullmatch(text):
        raise InputError(field_name, value,
                         "HAProxy names allow letters, digits and '-', '_', '.', ':' only")
    return text


def duration(field_name: str, value: Any) -> str:
    text = str(value).strip()
    if not _DURATION_RE.fullmatch(text):
        raise InputError(field_name, value,
                         "not an HAProxy time: a positive integer with unit us, ms, s, m, h or d")
    return text


# Addresses a relay can talk to although no remote host holds them: a local service on
# loopback (HAProxy itself, Docker's DNS 127.0.0.11) and link-local ones (a metadata service).
_LOCAL_PEERS = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv4Network("169.254.0.0/16"))


def peer_address(field_name: str, value: Any, address: ipaddress.IPv4Address,
                 wildcard: bool = False) -> str:
    """An address HAProxy can bind to or connect to (0.0.0.0 only as a bind `wildcard`)."""
    reason = not_a_host_reason(address)
    if (reason and not any(address in net for net in _LOCAL_PEERS)
            and not (wildcard and address == ipaddress.IPv4Address("0.0.0.0"))):
        raise InputError(field_name, value, f"cannot be used here: it is {reason}")
    return str(address)


def host(field_name: str, value: Any) -> tuple[str, bool]:
    """An IPv4 address or a DNS name; returns (host, is_name)."""
    text = str(value).strip().rstrip(".") if value is not None else ""
    if not text:
        raise InputError(field_name, value, "must not be empty")
    if re.fullmatch(r"[0-9.]+", text):  # all digits and dots: meant as an address, so it must be one
        return peer_address(field_name, value, ipv4_address(field_name, text)), False
    if len(text) > 253 or not all(_LABEL_RE.fullmatch(label) for label in text.split(".")):
        raise InputError(field_name, value, "not an IPv4 address or a DNS name")
    return text.lower(), True


def address_port(field_name: str, value: Any, default_port: int | None = None,
                 wildcard: bool = False) -> tuple[str, int]:
    """IPv4 'address:port' (the port may be left out when a default exists); errors show the whole value.

    The address must be one HAProxy can use (see peer_address); 0.0.0.0 only with `wildcard`.
    """
    text = "" if value is None else str(value).strip()
    address, sep, port_text = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise InputError(field_name, value, "needs address:port, e.g. 127.0.0.1:9000")
        address, port_text = text, str(default_port)
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError:
        raise InputError(field_name, value, f"{address!r} is not an IPv4 address") from None
    address = peer_address(field_name, value, parsed, wildcard)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InputError(field_name, value, "the port must be between 1 and 65535")
    return address, int(port_text)


def file_path(field_name: str, value: Any) -> str:
    text = "" if value is None else str(value)
    if not text.startswith("/"):
        raise InputError(field_name, value, "must be an absolute path")
    if _CONTROL_RE.search(text):
        raise InputError(field_name, value, "must not contain control characters")
    return text


def config_path(field_name: str, value: Any) -> str:
    """The live config path; it is also written into the systemd drop-in, so no quoting there."""
    text = file_path(field_name, value)
    if not _PLAIN_WORD_RE.fullmatch(text) or text.endswith("/"):
        raise InputError(field_name, value, "allows letters, digits and _./@+:=- only, and names a file")
    return text


def _bind_conflict(first: tuple[str, int], second: tuple[str, int]) -> bool:
    """Two binds collide on the same port when the addresses match or either is 0.0.0.0."""
    if first[1] != second[1]:
        return False
    return first[0] == second[0] or "0.0.0.0" in (first[0], second[0])


def _given(value: Any, default: Any) -> Any:
    """Ansible passes None for an option left out; only then does the default apply."""
    return default if value is None else value


def _merged(value: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    merged.update({key: item for key, item in (value or {}).items() if item is not None})
    return merged


def _parse_check(field_name: str, value: dict[str, Any] | None) -> dict[str, Any] | None:
    check = _merged(value, DEFAULT_HEALTH_CHECK)
    if not check["enabled"]:
        return None
    return {
        "inter": duration(f"{field_name}.inter", check["inter"]),
        "fall": int_range(f"{field_name}.fall", check["fall"], 1, 1000),
        "rise": int_range(f"{field_name}.rise", check["rise"], 1, 1000),
    }


def _parse_relay(field_name: str, value: Any) -> Relay:
    if not isinstance(value, dict):
        raise InputError(field_name, value, "each relay is a dict")
    name = identifier(f"{field_name}.name", value.get("name"))
    bind_address, bind_port = address_port(f"{field_name}.bind", value.get("bind"), wildcard=True)
    backend_host, is_name = host(f"{field_name}.backend_host", value.get("backend_host"))
    backend_port = port(f"{field_name}.backend_port", value.get("backend_port"))
    mode = _given(value.get("mode"), "tcp")
    if mode != "tcp":
        raise InputError(f"{field_name}.mode", mode, "only tcp relays are supported")
    tls = value.get("tls") or {}
    tls_mode = _given(tls.get("mode"), "passthrough")
    if tls_mode not in TLS_MODES:
        raise InputError(f"{field_name}.tls.mode", tls_mode, f"must be one of {', '.join(TLS_MODES)}")
    certificate = tls.get("certificate")
    if tls_mode == "terminate":
        certificate = file_path(f"{field_name}.tls.certificate", certificate)
    elif certificate:
        raise InputError(f"{field_name}.tls.certificate", certificate,
                         "only used with tls.mode=terminate (passthrough leaves TLS to the backend)")
    return Relay(
        name=name, bind_address=bind_address, bind_port=bind_port,
        backend_host=backend_host, backend_port=backend_port, backend_is_name=is_name,
        tls_mode=tls_mode, tls_certificate=certificate or None,
        transparent=bool(value.get("transparent")),
        check=_parse_check(f"{field_name}.health_check", value.get("health_check")),
    )


def _parse_resolvers(value: dict[str, Any] | None) -> Resolvers:
    merged = _merged(value, DEFAULT_RESOLVERS)
    nameservers = merged["nameservers"]
    if not isinstance(nameservers, list) or not nameservers:
        raise InputError("resolvers.nameservers", nameservers, "needs at least one address[:port]")
    servers = []
    for index, item in enumerate(nameservers):
        address, number = address_port(f"resolvers.nameservers[{index}]", item, default_port=53)
        servers.append(f"{address}:{number}")
    if len(set(servers)) != len(servers):
        raise InputError("resolvers.nameservers", nameservers, "lists a nameserver twice")
    hold = merged["hold"]
    if not isinstance(hold, dict):
        raise InputError("resolvers.hold", hold, "a dict of status: time")
    for status in hold:
        if status not in HOLD_STATUSES:
            raise InputError("resolvers.hold", status, f"status must be one of {', '.join(HOLD_STATUSES)}")
    return Resolvers(
        name=identifier("resolvers.name", merged["name"]),
        nameservers=servers,
        resolve_retries=int_range("resolvers.resolve_retries", merged["resolve_retries"], 1, 100),
        timeout_resolve=duration("resolvers.timeout_resolve", merged["timeout_resolve"]),
        timeout_retry=duration("resolvers.timeout_retry", merged["timeout_retry"]),
        hold=[(status, duration(f"resolvers.hold.{status}", hold[status]))
              for status in HOLD_STATUSES if status in hold],
    )


def log_target(field_name: str, value: Any) -> str:
    """stdout/stderr (the journal under systemd), none, or an absolute syslog socket path."""
    text = str(_given(value, DEFAULT_LOG_TARGET))
    if text in ("stdout", "stderr", "none"):
        return text
    return file_path(field_name, text)


def parse_config(params: dict[str, Any]) -> RelayConfig:
    """Validate all relay input at once, before anything is read or changed."""
    relays_in = params.get("relays")
    if not isinstance(relays_in, list) or not relays_in:
        raise InputError("relays", relays_in, "state=present needs at least one relay")
    relays = [_parse_relay(f"relays[{index}]", item) for index, item in enumerate(relays_in)]
    for index, relay in enumerate(relays):
        for earlier in relays[:index]:
            if relay.name == earlier.name:
                raise InputError(f"relays[{index}].name", relay.name, "is used by another relay")
            if _bind_conflict((relay.bind_address, relay.bind_port),
                              (earlier.bind_address, earlier.bind_port)):
                raise InputError(f"relays[{index}].bind", relay.bind,
                                 f"collides with the bind {earlier.bind} of relay {earlier.name}")
    timeouts = _merged(params.get("timeouts"), DEFAULT_TIMEOUTS)
    unknown = sorted(set(timeouts) - set(DEFAULT_TIMEOUTS))
    if unknown:
        raise InputError("timeouts", unknown[0], f"known timeouts: {', '.join(DEFAULT_TIMEOUTS)}")
    return RelayConfig(
        relays=relays,
        resolvers=_parse_resolvers(params.get("resolvers")),
        timeouts={key: duration(f"timeouts.{key}", timeouts[key]) for key in DEFAULT_TIMEOUTS},
        maxconn=int_range("maxconn", _given(params.get("maxconn"), DEFAULT_MAXCONN), 1, 1000000),
        log_target=log_target("log_target", params.get("log_target")),
    )


# ---- rendering ----

def haproxy_quote(value: Any) -> str:
    """One haproxy.cfg word: plain when safe, else single-quoted with ' written as '\\''.

    Single quotes also stop HAProxy's "$VAR" expansion and '#' comments; control
    characters are refused by validation because no quoting can carry a newline.
    """
    text = str(value)
    if _PLAIN_WORD_RE.fullmatch(text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


TEMPLATE = """\
{{ marker }}; hand edits are overwritten on the next run.
global
{% if config.log_target in ('stdout', 'stderr') %}
    log {{ config.log_target }} format short local0 info
{% elif config.log_target != 'none' %}
    log {{ config.log_target | hq }} local0 info
{% endif %}
    maxconn {{ config.maxconn }}
    user haproxy
    group haproxy
    chroot /var/lib/haproxy
{% if config.resolvers_used %}

resolvers {{ config.resolvers.name }}
{% for nameserver in config.resolvers.nameservers %}
    nameserver ns{{ loop.index }} {{ nameserver }}
{% endfor %}
    resolve_retries {{ config.resolvers.resolve_retries }}
    timeout resolve {{ config.resolvers.timeout_resolve }}
    timeout retry {{ config.resolvers.timeout_retry }}
{% for status, period in config.resolvers.hold %}
    hold {{ status }} {{ period }}
{% endfor %}
{% endif %}

defaults
    mode tcp
{% if config.log_target != 'none' %}
    log global
    option tcplog
    option dontlognull
{% endif %}
{% for name, value in config.timeouts.items() %}
    timeout {{ name }} {{ value }}
{% endfor %}
{% for relay in config.relays %}

listen {{ relay.name }}
    bind {{ relay.bind }}
{%- if relay.transparent %} transparent{% endif %}
{%- if relay.tls_mode == 'terminate' %} ssl crt {{ relay.tls_certificate | hq }}{% endif %}

    server {{ relay.name }} {{ relay.backend_host }}:{{ relay.backend_port }}
{%- if relay.check %} check inter {{ relay.check.inter }} fall {{ relay.check.fall }} \
rise {{ relay.check.rise }}{% endif %}
{%- if relay.backend_is_name %} resolvers {{ config.resolvers.name }} resolve-prefer ipv4 \
init-addr none{% endif %}

{% endfor %}
"""


def render(config: RelayConfig) -> str:
    """Render haproxy.cfg; StrictUndefined turns a template/model mismatch into an error."""
    if jinja2 is None:
        raise RuntimeError("jinja2 is not importable")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["hq"] = haproxy_quote
    return env.from_string(TEMPLATE).render(config=config, marker=MARKER)


def owned(text: str | None) -> bool:
    """A config is netloom's when its first line carries the marker (a hand edit may keep it)."""
    return bool(text) and text.startswith(MARKER)


# ---- install: temp file next to the live one, haproxy -c, backup, atomic swap ----

def check_config(haproxy_bin: str, path: str) -> list[str]:
    """Run `haproxy -c -f PATH`; raise CommandError with haproxy's alerts, else return its warnings."""
    proc = subprocess.run([haproxy_bin, "-c", "-f", path], capture_output=True, text=True, check=False)
    output = (proc.stderr + proc.stdout).splitlines()
    if proc.returncode != 0:
        alerts = [line for line in output if "[ALERT]" in line] or output
        raise CommandError("haproxy -c rejected the rendered config (live file unchanged): "
                           + " | ".join(line.strip() for line in alerts))
    return [line.strip() for line in output if "[WARNING]" in line]


def check_text(haproxy_bin: str, text: str) -> list[str]:
    """Check mode's `haproxy -c`: the same check on a private temp file, nothing near the live one."""
    with tempfile.TemporaryDirectory(prefix="netloom-haproxy-") as directory:
        temp = os.path.join(directory, "haproxy.cfg")
        with open(temp, "w", encoding="utf-8") as stream:
            stream.write(text)
        return check_config(haproxy_bin, temp)


def backup_path(path: str) -> str:
    return f"{path}.prev"


def install(path: str, text: str, haproxy_bin: str | None, backup: bool) -> list[str]:
    """Make `text` the live config at `path`; the live file changes only if haproxy accepts it.

    Returns haproxy's warnings. Owner and mode of an existing file are kept (new: root, 0644).
    """
    directory = os.path.dirname(path) or "."
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".netloom", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        if os.path.exists(path):
            stat = os.stat(path)
            os.chmod(temp, stat.st_mode & 0o7777)
            os.chown(temp, stat.st_uid, stat.st_gid)
        else:
            os.chmod(temp, 0o644)
        warnings = check_config(haproxy_bin, temp) if haproxy_bin else []
        if backup and os.path.exists(path):
            keep_backup(path)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return warnings


def keep_backup(path: str) -> None:
    """Copy the live file to PATH.prev atomically (copy to a temp name, then rename)."""
    prev = backup_path(path)
    temp = f"{prev}.netloom-tmp"
    shutil.copy2(path, temp)
    os.replace(temp, prev)


def remove(path: str, backup: bool) -> None:
    """Remove the live config; with backup it is renamed to PATH.prev (one atomic step)."""
    if backup:
        os.replace(path, backup_path(path))
    else:
        os.unlink(path)


# ---- systemd: pure decisions here, the systemctl calls in the module's service seam ----

def dropin_text(path: str) -> str:
    """The unit drop-in: point Debian's unit ($CONFIG) at our file and keep HAProxy supervised."""
    return (f"{MARKER}\n"
            "[Service]\n"
            f"Environment=CONFIG={path}\n"
            "Restart=always\n"
            "RestartSec=2s\n")


def service_actions(state: str, active: bool, enabled: bool, dropin_changed: bool,
                    config_changed: bool) -> list[str]:
    """systemctl verbs to run after the files are in place, in order.

    A changed config is a graceful `reload` (master-worker: new workers take the
    listeners, old ones finish their connections). A changed drop-in may change the
    file the master was started with, which only a `restart` picks up.
    """
    if state == "absent":
        return (["stop"] if active else []) + (["disable"] if enabled else [])
    actions = [] if enabled else ["enable"]
    if not active:
        actions.append("start")
    elif dropin_changed:
        actions.append("restart")
    elif config_changed:
        actions.append("reload")
    return actions
