"""Rendering (templates/haproxy, as the action plugin renders it) and input validation of haproxy.py.

Pure: no haproxy, no node files.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
from ansible.module_utils.netloom import haproxy
from ansible.module_utils.netloom.common import InputError
from ansible.module_utils.netloom.haproxy import (
    MARKER,
    RelayConfig,
    haproxy_quote,
    owned,
    parse_config,
    service_actions,
)

from plugin_utils.netloom_action import render_file, template_path


def render(config: RelayConfig) -> str:
    """haproxy.cfg as the controller renders it (action_plugins/haproxy_relay.py)."""
    return render_file(template_path(haproxy.CONFIG_TEMPLATE), haproxy.config_variables(config),
                       haproxy.TEMPLATE_FILTERS)


def dropin_text(path: str) -> str:
    return render_file(template_path(haproxy.DROPIN_TEMPLATE), haproxy.dropin_variables(path))


SEED_LOCAL_PROXY: dict[str, Any] = {"relays": [
    {"name": "s3", "bind": "127.0.0.1:9000", "backend_host": "s3-storage", "backend_port": 9000},
    {"name": "database", "bind": "127.0.0.1:8001", "backend_host": "database", "backend_port": 8000},
    {"name": "victorialogs", "bind": "127.0.0.1:9428", "backend_host": "victorialogs", "backend_port": 9428},
]}

SEED_LOCAL_PROXY_CFG = f"""\
{MARKER}; hand edits are overwritten on the next run.
global
    log stdout format short local0 info
    maxconn 4096
    user haproxy
    group haproxy
    chroot /var/lib/haproxy

resolvers docker
    nameserver ns1 127.0.0.11:53
    resolve_retries 3
    timeout resolve 1s
    timeout retry 1s
    hold valid 10s

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    timeout connect 5s
    timeout client 30s
    timeout server 30s

listen s3
    bind 127.0.0.1:9000
    server s3 s3-storage:9000 check inter 2s fall 3 rise 2 resolvers docker resolve-prefer ipv4 \
init-addr last,libc,none

listen database
    bind 127.0.0.1:8001
    server database database:8000 check inter 2s fall 3 rise 2 resolvers docker resolve-prefer ipv4 \
init-addr last,libc,none

listen victorialogs
    bind 127.0.0.1:9428
    server victorialogs victorialogs:9428 check inter 2s fall 3 rise 2 resolvers docker resolve-prefer ipv4 \
init-addr last,libc,none
"""


def relay(**overrides: Any) -> dict[str, Any]:
    base = {"name": "registry", "bind": "10.99.0.1:5010", "backend_host": "esb-registry",
            "backend_port": 5010}
    base.update(overrides)
    return base


def listen_section(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"listen {name}")
    return lines[start + 1:start + 3]


def test_seed_local_proxy_renders_exactly() -> None:
    assert render(parse_config(SEED_LOCAL_PROXY)) == SEED_LOCAL_PROXY_CFG


def test_registry_relay_passthrough_is_plain_tcp_to_the_registry() -> None:
    text = render(parse_config({"relays": [relay(transparent=True, tls={"mode": "passthrough"})]}))
    assert listen_section(text, "registry") == [
        "    bind 10.99.0.1:5010 transparent",
        "    server registry esb-registry:5010 check inter 2s fall 3 rise 2 resolvers docker "
        "resolve-prefer ipv4 init-addr last,libc,none",
    ]
    assert "ssl" not in text


def test_registry_relay_terminating_tls_names_the_certificate() -> None:
    config = parse_config({"relays": [relay(tls={"mode": "terminate",
                                                 "certificate": "/etc/haproxy/certs/registry.pem"})]})
    assert listen_section(render(config), "registry")[0] == (
        "    bind 10.99.0.1:5010 ssl crt /etc/haproxy/certs/registry.pem")


def test_ip_backend_needs_no_resolvers_and_overrides_apply() -> None:
    config = parse_config({
        "relays": [relay(backend_host="10.0.0.5", health_check={"enabled": False})],
        "timeouts": {"connect": "2s", "server": "5m"},
        "maxconn": 100,
        "log_target": "none",
    })
    text = render(config)
    assert "resolvers" not in text
    assert "init-addr" not in text
    assert listen_section(text, "registry")[1] == "    server registry 10.0.0.5:5010"
    assert "    timeout connect 2s\n    timeout client 30s\n    timeout server 5m\n" in text
    assert "    maxconn 100\n" in text
    assert " log" not in text and "tcplog" not in text


def test_resolvers_and_health_check_options() -> None:
    config = parse_config({
        "relays": [relay(health_check={"inter": "500ms", "fall": 1, "rise": 5})],
        "resolvers": {"name": "lab", "nameservers": ["192.0.2.53", "192.0.2.54:5353"],
                      "resolve_retries": 5, "hold": {"valid": "1m", "nx": "5s"}},
        "log_target": "/dev/log",
    })
    text = render(config)
    assert ("resolvers lab\n    nameserver ns1 192.0.2.53:53\n    nameserver ns2 192.0.2.54:5353\n"
            "    resolve_retries 5\n    timeout resolve 1s\n    timeout retry 1s\n"
            "    hold nx 5s\n    hold valid 1m\n") in text
    assert " check inter 500ms fall 1 rise 5 resolvers lab " in text
    assert "    log /dev/log local0 info\n" in text


@pytest.mark.parametrize(("value", "expected"), [
    ("/etc/haproxy/certs/registry.pem", "/etc/haproxy/certs/registry.pem"),
    ("/certs/my cert.pem", "'/certs/my cert.pem'"),
    ("/certs/$HOME.pem", "'/certs/$HOME.pem'"),          # no env expansion inside single quotes
    ("/certs/a#b.pem", "'/certs/a#b.pem'"),              # not a comment
    ("/certs/it's.pem", "'/certs/it'\\''s.pem'"),        # close, escaped quote, reopen
    ('/certs/"q".pem', "'/certs/\"q\".pem'"),
])
def test_haproxy_quote(value: str, expected: str) -> None:
    assert haproxy_quote(value) == expected


def test_certificate_path_is_quoted_in_the_config() -> None:
    config = parse_config({"relays": [relay(tls={"mode": "terminate", "certificate": "/c/it's $x #1.pem"})]})
    assert "    bind 10.99.0.1:5010 ssl crt '/c/it'\\''s $x #1.pem'\n" in render(config)


def test_names_are_normalised() -> None:
    config = parse_config({"relays": [relay(backend_host="ESB-Registry.", bind=" 10.99.0.1:5010 ")]})
    assert config.relays[0].backend_host == "esb-registry"
    assert config.relays[0].bind == "10.99.0.1:5010"
    assert config.relays[0].backend_is_name


def test_rendering_is_deterministic_and_marked() -> None:
    first = render(parse_config(copy.deepcopy(SEED_LOCAL_PROXY)))
    assert first == render(parse_config(copy.deepcopy(SEED_LOCAL_PROXY)))
    assert owned(first)
    assert not owned("global\n    maxconn 10\n")
    assert not owned(None)
    assert first.endswith("\n") and not first.endswith("\n\n")


TWO = [relay(name="a", bind="127.0.0.1:9000"), relay(name="b", bind="127.0.0.2:9000")]


@pytest.mark.parametrize(("params", "field", "value"), [
    ({"relays": []}, "relays", "[]"),
    ({"relays": [relay(name="")]}, "relays[0].name", ""),
    ({"relays": [relay(name=None)]}, "relays[0].name", "None"),
    ({"relays": [relay(name="my relay")]}, "relays[0].name", "my relay"),
    ({"relays": [relay(name="a/b")]}, "relays[0].name", "a/b"),
    ({"relays": [relay(name="a#b")]}, "relays[0].name", "a#b"),
    ({"relays": [TWO[0], relay(name="a", bind="127.0.0.3:1")]}, "relays[1].name", "a"),
    ({"relays": [TWO[0], relay(name="c", bind="127.0.0.1:9000")]}, "relays[1].bind", "127.0.0.1:9000"),
    ({"relays": [TWO[0], relay(name="c", bind="0.0.0.0:9000")]}, "relays[1].bind", "0.0.0.0:9000"),
    ({"relays": [relay(bind="127.0.0.1")]}, "relays[0].bind", "127.0.0.1"),
    ({"relays": [relay(bind="127.0.0.1:0")]}, "relays[0].bind", "127.0.0.1:0"),
    ({"relays": [relay(bind="127.0.0.1:65536")]}, "relays[0].bind", "127.0.0.1:65536"),
    ({"relays": [relay(bind="10.0.0.256:80")]}, "relays[0].bind", "10.0.0.256:80"),
    ({"relays": [relay(bind="localhost:80")]}, "relays[0].bind", "localhost:80"),
    ({"relays": [relay(backend_port=0)]}, "relays[0].backend_port", "0"),
    ({"relays": [relay(backend_port=70000)]}, "relays[0].backend_port", "70000"),
    ({"relays": [relay(backend_host="")]}, "relays[0].backend_host", ""),
    ({"relays": [relay(backend_host="999.1.1.1")]}, "relays[0].backend_host", "999.1.1.1"),
    ({"relays": [relay(backend_host="bad host")]}, "relays[0].backend_host", "bad host"),
    ({"relays": [relay(backend_host="-lead.example")]}, "relays[0].backend_host", "-lead.example"),
    ({"relays": [relay(backend_host="a..b")]}, "relays[0].backend_host", "a..b"),
    ({"relays": [relay(mode="http")]}, "relays[0].mode", "http"),
    ({"relays": [relay(tls={"mode": "terminate"})]}, "relays[0].tls.certificate", "None"),
    ({"relays": [relay(tls={"mode": "terminate", "certificate": "certs/x.pem"})]},
     "relays[0].tls.certificate", "certs/x.pem"),
    ({"relays": [relay(tls={"mode": "terminate", "certificate": "/x\n.pem"})]},
     "relays[0].tls.certificate", "/x\n.pem"),
    ({"relays": [relay(tls={"mode": "passthrough", "certificate": "/x.pem"})]},
     "relays[0].tls.certificate", "/x.pem"),
    ({"relays": [relay(tls={"mode": "offload"})]}, "relays[0].tls.mode", "offload"),
    ({"relays": [relay(health_check={"inter": "5 s"})]}, "relays[0].health_check.inter", "5 s"),
    ({"relays": [relay(health_check={"inter": "0s"})]}, "relays[0].health_check.inter", "0s"),
    ({"relays": [relay(health_check={"fall": 0})]}, "relays[0].health_check.fall", "0"),
    ({"relays": [relay()], "timeouts": {"client": "30 seconds"}}, "timeouts.client", "30 seconds"),
    ({"relays": [relay()], "timeouts": {"tunnel": "1h"}}, "timeouts", "tunnel"),
    ({"relays": [relay()], "resolvers": {"nameservers": []}}, "resolvers.nameservers", "[]"),
    ({"relays": [relay()], "resolvers": {"nameservers": ["dns.example:53"]}},
     "resolvers.nameservers[0]", "dns.example:53"),
    ({"relays": [relay()], "resolvers": {"nameservers": ["192.0.2.1", "192.0.2.1:53"]}},
     "resolvers.nameservers", "['192.0.2.1', '192.0.2.1:53']"),
    ({"relays": [relay()], "resolvers": {"name": "dns servers"}}, "resolvers.name", "dns servers"),
    ({"relays": [relay()], "resolvers": {"hold": {"forever": "1s"}}}, "resolvers.hold", "forever"),
    ({"relays": [relay()], "resolvers": {"hold": {"valid": "soon"}}}, "resolvers.hold.valid", "soon"),
    ({"relays": [relay()], "maxconn": -1}, "maxconn", "-1"),
    ({"relays": [relay()], "maxconn": 0}, "maxconn", "0"),
    ({"relays": [relay(mode="")]}, "relays[0].mode", ""),
    ({"relays": [relay()], "log_target": "syslog"}, "log_target", "syslog"),
    ({"relays": [relay()], "log_target": ""}, "log_target", ""),
    # names ending in a newline (`$` would have matched before it)
    ({"relays": [relay(name="s3\n")]}, "relays[0].name", "s3\n"),
    ({"relays": [relay()], "resolvers": {"name": "dns\n"}}, "resolvers.name", "dns\n"),
    ({"relays": [relay(backend_host="a\nb")]}, "relays[0].backend_host", "a\nb"),
    # addresses no host holds
    ({"relays": [relay(backend_host="0.0.0.0")]}, "relays[0].backend_host", "0.0.0.0"),
    ({"relays": [relay(backend_host="255.255.255.255")]}, "relays[0].backend_host", "255.255.255.255"),
    ({"relays": [relay(backend_host="224.0.0.1")]}, "relays[0].backend_host", "224.0.0.1"),
    ({"relays": [relay(bind="239.1.1.1:80")]}, "relays[0].bind", "239.1.1.1:80"),
    ({"relays": [relay(bind="0.0.0.1:80")]}, "relays[0].bind", "0.0.0.1:80"),
    ({"relays": [relay()], "resolvers": {"nameservers": ["0.0.0.0:53"]}},
     "resolvers.nameservers[0]", "0.0.0.0:53"),
])
def test_bad_input_names_field_and_value(params: dict[str, Any], field: str, value: str) -> None:
    with pytest.raises(InputError) as err:
        parse_config(params)
    assert err.value.field_name == field
    assert str(err.value.value) == value


def test_loopback_and_link_local_peers_are_fine() -> None:
    config = parse_config({"relays": [relay(name="a", backend_host="127.0.0.1"),
                                      relay(name="b", bind="127.0.0.1:9001", backend_host="169.254.169.254")],
                           "resolvers": {"nameservers": ["127.0.0.11"]}})
    assert [r.backend_host for r in config.relays] == ["127.0.0.1", "169.254.169.254"]
    assert config.resolvers.nameservers == ["127.0.0.11:53"]


def test_wildcard_bind_on_another_port_is_fine() -> None:
    config = parse_config({"relays": [relay(name="a", bind="0.0.0.0:9000"),
                                      relay(name="b", bind="127.0.0.1:9001")]})
    assert [r.bind for r in config.relays] == ["0.0.0.0:9000", "127.0.0.1:9001"]


@pytest.mark.parametrize(("state", "active", "enabled", "dropin_changed", "config_changed", "expected"), [
    ("present", True, True, False, False, []),
    ("present", True, True, False, True, ["reload"]),
    ("present", True, True, True, True, ["restart"]),
    ("present", False, True, False, False, ["start"]),       # stopped by hand: drift, start it
    ("present", False, False, True, True, ["enable", "start"]),
    ("present", True, False, False, False, ["enable"]),
    ("absent", True, True, False, False, ["stop", "disable"]),
    ("absent", False, False, False, False, []),
])
def test_service_actions(state: str, active: bool, enabled: bool, dropin_changed: bool,
                         config_changed: bool, expected: list[str]) -> None:
    assert service_actions(state, active, enabled, dropin_changed, config_changed) == expected


def test_dropin_points_the_unit_at_the_config_and_supervises_it() -> None:
    text = dropin_text("/etc/haproxy/haproxy.gateway.cfg")
    assert text.splitlines() == [MARKER, "[Service]", "Environment=CONFIG=/etc/haproxy/haproxy.gateway.cfg",
                                 "Restart=always", "RestartSec=2s"]


def test_without_a_dns_server_names_resolve_through_libc_only() -> None:
    """A compute host has no DNS server for the control names: no resolvers section at all, the
    names still resolve at start through libc (the managed /etc/hosts block)."""
    config = parse_config({**SEED_LOCAL_PROXY, "resolvers": {"enabled": False}})
    text = render(config)
    assert "resolvers" not in text
    assert listen_section(text, "s3")[1] == (
        "    server s3 s3-storage:9000 check inter 2s fall 3 rise 2 resolve-prefer ipv4 "
        "init-addr last,libc,none")
    assert config.backend_names == ["s3-storage", "database", "victorialogs"]
