"""HAProxy L4 relays (ESB's local proxy and registry relay): input model, validation, safe install.

The config is rendered on the controller (action_plugins/haproxy_relay.py) from
templates/haproxy/haproxy_relay.cfg.j2 with the `RelayConfig` this file builds from the
module's arguments, so the controller renders from exactly what the module accepts and the
node needs no Jinja2. On the node the module validates the arguments again, checks the
rendered text with `haproxy -c` while it is still a private temp file beside the live one,
keeps the old file as PATH.prev and swaps the new one in with `atomic_move`, so a rejected
config never replaces a working one.
"""
from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
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

MARKER = "# Managed by netloom haproxy_relay"
DEFAULT_PATH = "/etc/haproxy/haproxy.cfg"
DEFAULT_TIMEOUTS = {"connect": "5s", "client": "30s", "server": "30s"}
DEFAULT_RESOLVERS: dict[str, Any] = {
    "enabled": True,
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
    enabled: bool
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

    @property
    def backend_names(self) -> list[str]:
        """Backends given by DNS name (resolved by libc at start, by resolvers at run time)."""
        return [relay.backend_host for relay in self.relays if relay.backend_is_name]

    def referenced_files(self) -> list[str]:
        """Files the config names (TLS certificates), which haproxy -c opens."""
        return sorted({relay.tls_certificate for relay in self.relays if relay.tls_certificate})

    @property
    def resolvers_used(self) -> bool:
        """A resolvers section only where a DNS server is declared and a backend is a name.

        Names always resolve at start through libc (init-addr last,libc,none: /etc/hosts, then
        the system resolver); the section re-resolves them at run time. IP backends need neither.
        """
        return self.resolvers.enabled and any(relay.backend_is_name for relay in self.relays)


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
        enabled=bool(merged["enabled"]),
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


# The templates this module's files come from (under templates/, rendered on the controller).
CONFIG_TEMPLATE = "haproxy/haproxy_relay.cfg.j2"
DROPIN_TEMPLATE = "systemd/haproxy-relay.conf.j2"
DROPIN_NAME = "netloom-haproxy-relay.conf"
# Filters the templates may use (also in an operator's own template).
TEMPLATE_FILTERS = {"hq": haproxy_quote}


def owned(text: str | None) -> bool:
    """A config is netloom's when its first line carries the marker (a hand edit may keep it)."""
    return bool(text) and text.startswith(MARKER)


# ---- install: temp file next to the live one, haproxy -c, backup, atomic swap ----

def check_config(haproxy_bin: str, path: str, names: Iterable[str] = ()) -> list[str]:
    """Run `haproxy -c -f PATH`; raise CommandError with haproxy's alerts, else return its warnings.

    A backend `names` entry that does not resolve yet is no warning: init-addr ends in `none`,
    so HAProxy runs and the server is down until the name resolves (hosts block, DNS).
    """
    proc = subprocess.run([haproxy_bin, "-c", "-f", path], capture_output=True, text=True, check=False)
    output = (proc.stderr + proc.stdout).splitlines()
    if proc.returncode != 0:
        alerts = [line for line in output if "[ALERT]" in line] or output
        raise CommandError("haproxy -c rejected the rendered config (live file unchanged): "
                           + " | ".join(line.strip() for line in alerts))
    expected = tuple(f"could not resolve address '{name}'" for name in names)
    return [line.strip() for line in output
            if "[WARNING]" in line and not any(text in line for text in expected)]


def check_text(haproxy_bin: str, text: str, names: Iterable[str] = ()) -> list[str]:
    """Check mode's `haproxy -c`: the same check on a private temp file, nothing near the live one."""
    with tempfile.TemporaryDirectory(prefix="netloom-haproxy-") as directory:
        temp = os.path.join(directory, "haproxy.cfg")
        with open(temp, "w", encoding="utf-8") as stream:
            stream.write(text)
        return check_config(haproxy_bin, temp, names)


def backup_path(path: str) -> str:
    return f"{path}.prev"


# ---- systemd: pure decisions here, the systemctl calls in the module's service seam ----

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


# ---- the module's arguments (shared with the action plugin, which renders from them) ----

_HEALTH = DEFAULT_HEALTH_CHECK
_RESOLVERS = DEFAULT_RESOLVERS
ARGUMENT_SPEC: dict[str, Any] = dict(
    state=dict(type="str", choices=["present", "absent"], default="present"),
    path=dict(type="str", default=DEFAULT_PATH),
    relays=dict(type="list", elements="dict", options=dict(
        name=dict(type="str", required=True),
        bind=dict(type="str", required=True),
        backend_host=dict(type="str", required=True),
        backend_port=dict(type="int", required=True),
        mode=dict(type="str", choices=["tcp"], default="tcp"),
        transparent=dict(type="bool", default=False),
        tls=dict(type="dict", options=dict(
            mode=dict(type="str", choices=list(TLS_MODES), default="passthrough"),
            certificate=dict(type="str"),  # not "path": that would expand $VARS in it
        )),
        health_check=dict(type="dict", options=dict(
            enabled=dict(type="bool", default=_HEALTH["enabled"]),
            inter=dict(type="str", default=_HEALTH["inter"]),
            fall=dict(type="int", default=_HEALTH["fall"]),
            rise=dict(type="int", default=_HEALTH["rise"]),
        )),
    )),
    resolvers=dict(type="dict", options=dict(
        enabled=dict(type="bool", default=_RESOLVERS["enabled"]),
        name=dict(type="str", default=_RESOLVERS["name"]),
        nameservers=dict(type="list", elements="str", default=_RESOLVERS["nameservers"]),
        resolve_retries=dict(type="int", default=_RESOLVERS["resolve_retries"]),
        timeout_resolve=dict(type="str", default=_RESOLVERS["timeout_resolve"]),
        timeout_retry=dict(type="str", default=_RESOLVERS["timeout_retry"]),
        hold=dict(type="dict", default=_RESOLVERS["hold"]),
    )),
    timeouts=dict(type="dict", options=dict(
        connect=dict(type="str", default=DEFAULT_TIMEOUTS["connect"]),
        client=dict(type="str", default=DEFAULT_TIMEOUTS["client"]),
        server=dict(type="str", default=DEFAULT_TIMEOUTS["server"]),
    )),
    maxconn=dict(type="int", default=DEFAULT_MAXCONN),
    log_target=dict(type="str", default=DEFAULT_LOG_TARGET),
    validate=dict(type="bool", default=True),
    backup=dict(type="bool", default=True),
    manage_service=dict(type="bool", default=True),
    service=dict(type="str", default="haproxy"),
    template=dict(type="str"),
    rendered=dict(type="dict", options=dict(
        config=dict(type="str"),
        dropin=dict(type="str"),
    )),
)
REQUIRED_IF = [("state", "present", ["relays"])]


def config_variables(config: RelayConfig) -> dict[str, Any]:
    """What the config template sees (an operator's own template too)."""
    return {"config": config, "marker": MARKER}


def dropin_variables(path: str) -> dict[str, Any]:
    """What the drop-in template sees: Debian's unit reads $CONFIG, so it points at our file."""
    return {"path": path, "marker": MARKER}
