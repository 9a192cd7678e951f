"""Pinacle pods, the pure parts: allocation, hostname parsing, the router config."""
from __future__ import annotations

import ipaddress
import re

import pytest
from ansible.module_utils.netloom import pods
from ansible.module_utils.netloom.common import InputError
from ansible.module_utils.netloom.constants import NO_HOST_NETWORKS

from plugin_utils.netloom_action import render_file, template_path

POOL = ipaddress.IPv4Network("10.249.0.0/16")
PORTS = range(30000, 40000)


def alloc(pod: str, subnet: str, port: int) -> pods.Allocation:
    return pods.Allocation(pod, ipaddress.IPv4Network(subnet), port)


# ---- allocation ----

def test_a_new_pod_gets_the_first_free_subnet_and_port() -> None:
    table = {"a": alloc("a", "10.249.0.0/24", 30000)}
    assert pods.allocate_subnet("b", "pool", POOL, table, []) == ipaddress.IPv4Network("10.249.1.0/24")
    assert pods.allocate_port("b", "port_range", PORTS, table, set()) == 30001


def test_a_deleted_pods_subnet_and_port_are_reused() -> None:
    table = {"a": alloc("a", "10.249.0.0/24", 30000), "b": alloc("b", "10.249.1.0/24", 30001)}
    del table["a"]  # pod a deleted: its allocation left the table
    assert pods.allocate_subnet("c", "pool", POOL, table, []) == ipaddress.IPv4Network("10.249.0.0/24")
    assert pods.allocate_port("c", "port_range", PORTS, table, set()) == 30000


def test_a_stopped_pod_keeps_its_allocation_from_the_state_file_alone() -> None:
    """Its objects were removed behind netloom's back: the recorded allocation stays reserved."""
    recorded = pods.parse_state(pods.render_state({"a": alloc("a", "10.249.0.0/24", 30000)}))
    table, notes = pods.reconcile([], recorded)
    assert table == {"a": alloc("a", "10.249.0.0/24", 30000)} and notes == []
    assert pods.allocate_port("b", "port_range", PORTS, table, set()) == 30001


def test_labels_win_over_the_state_file_and_missing_entries_are_recorded() -> None:
    recorded = {"a": alloc("a", "10.249.5.0/24", 30005)}
    labelled = [alloc("a", "10.249.0.0/24", 30000), alloc("b", "10.249.1.0/24", 30001)]
    table, notes = pods.reconcile(labelled, recorded)
    assert table == {"a": labelled[0], "b": labelled[1]}
    assert any("objects win" in note for note in notes)
    assert any("pod b: missing from the state file" in note for note in notes)


@pytest.mark.parametrize("foreign", [
    "10.249.0.0/24",      # a Docker network with the same subnet
    "10.249.0.128/25",    # a route inside the candidate (a string match would miss it)
    "10.249.0.0/23",      # a wider route covering it and the next one
    "10.249.0.7/32",      # a host route
])
def test_subnets_overlapping_a_foreign_network_or_route_are_skipped(foreign: str) -> None:
    subnet = pods.allocate_subnet("a", "pool", POOL, {}, [ipaddress.IPv4Network(foreign)])
    assert not subnet.overlaps(ipaddress.IPv4Network(foreign))
    assert subnet in list(POOL.subnets(new_prefix=24))


def test_a_port_a_foreign_listener_or_container_holds_is_never_handed_out() -> None:
    listeners = pods.listening_ports([
        "  sl  local_address rem_address   st\n"
        "   0: 00000000:7530 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n"   # 30000 LISTEN
        "   1: 0100007F:7531 0100007F:9C40 01 00000000:00000000 00:00000000 00000000\n",  # 30001 ESTABLISHED
        "  sl  local_address                         rem_address\n"
        "   0: 00000000000000000000000000000000:7532 00000000000000000000000000000000:0000 0A\n",  # 30002
    ])
    assert listeners == {30000, 30002}
    assert pods.allocate_port("a", "port_range", PORTS, {}, listeners | {30001}) == 30003


def test_exhausted_pool_and_range_say_which_and_how_many_are_used() -> None:
    small_pool = ipaddress.IPv4Network("10.249.0.0/23")
    table = {"a": alloc("a", "10.249.0.0/24", 30000)}
    with pytest.raises(pods.ExhaustedError) as raised:
        pods.allocate_subnet("b", "pool", small_pool, table, [ipaddress.IPv4Network("10.249.1.0/24")])
    assert raised.value.field_name == "pool" and "pool exhausted" in str(raised.value)
    assert "all 2 /24s are taken (1 by pods" in str(raised.value)
    with pytest.raises(pods.ExhaustedError) as raised:
        pods.allocate_port("b", "port_range", range(30000, 30002), table, {30001})
    assert raised.value.field_name == "port_range"
    assert "port range exhausted: 1 ports held by pods, 1 in use on the host" in str(raised.value)


@pytest.mark.parametrize(("function", "value"), [
    (pods.pod_id, "Pod_A"), (pods.pod_id, "-a"), (pods.pod_id, "abcdefghijkl"),  # pod-abcdefghijkl: 16
    (pods.slug, "a.b"), (pods.slug, ""), (pods.slug, "x" * 60),
])
def test_ids_and_slugs_that_cannot_form_a_dns_label_or_bridge_name_fail(function, value) -> None:
    with pytest.raises(InputError) as raised:
        function("id", value)
    assert raised.value.value == value


def test_eleven_character_id_makes_a_fifteen_character_bridge() -> None:
    assert pods.bridge_name(pods.pod_id("id", "abcdefghijk")) == "pod-abcdefghijk"


@pytest.mark.parametrize(("services", "field"), [
    ([{"port": 0}], "services[0].port"), ([{"port": 65536}], "services[0].port"),
    ([{"port": 80}], "services[0].port"), ([{"port": 3000}, {"port": 3000}], "services[1]"),
])
def test_bad_service_ports_fail_naming_the_entry(services, field) -> None:
    with pytest.raises(InputError) as raised:
        pods.services("services", services, 80)
    assert raised.value.field_name == field


def test_egress_modes() -> None:
    assert pods.egress("egress", "open") == ("open", [])
    mode, blocked = pods.egress("egress", "no-private")
    assert mode == "no-private" and "169.254.0.0/16" in blocked and "10.0.0.0/8" in blocked
    assert pods.egress("egress", ["192.0.2.0/24"]) == ("list", ["192.0.2.0/24"])
    with pytest.raises(InputError) as raised:
        pods.egress("egress", ["192.0.2.0/24", "not-a-cidr"])
    assert raised.value.field_name == "egress[1]"


# ---- hostname routing ----

@pytest.mark.parametrize(("host", "expected"), [
    ("localhost-3000.pod-a.localhost", ("3000", "a")),
    ("localhost-3000-pod-a.localhost", ("3000", "a")),
    ("LOCALHOST-8726.POD-my-pod.localhost:30000", ("8726", "my-pod")),
    ("localhost-8726-pod-my-pod.localhost", ("8726", "my-pod")),
    ("localhost-abc.pod-a.localhost", ("abc", "a")),
    ("localhost.pod-a.localhost", None),
    ("example.com", None),
])
def test_both_hostname_spellings_parse(host: str, expected) -> None:
    assert pods.parse_host(host) == expected


@pytest.mark.parametrize(("host", "answer"), [
    ("localhost-3000.pod-a.localhost", (200, 3000)),
    ("localhost-8726-pod-a.localhost", (200, 8726)),
    ("localhost-80.pod-a.localhost", (404, "80")),       # never back to nginx itself
    ("localhost-22.pod-a.localhost", (404, "22")),       # undeclared
    ("localhost-x1.pod-a.localhost", (404, "x1")),       # malformed
    ("localhost-3000.pod-b.localhost", (421, "b")),      # another pod
    ("127.0.0.1", (200, 3000)),                          # no pod hostname: the default port
])
def test_routing_decisions(host: str, answer) -> None:
    assert pods.route(host, "a", [3000, 8726]) == answer


def test_service_urls_have_a_default_list() -> None:
    declared = pods.services("services", None, 80)
    urls = pods.service_urls("a", declared, 30000)
    assert [u["name"] for u in urls] == ["app", "code", "kanban", "claude"]
    assert urls[0]["url"] == "http://localhost-3000.pod-a.localhost:30000/"
    assert pods.service_urls("a", declared[:1], 30000, "dash")[0]["url"] == \
        "http://localhost-3000-pod-a.localhost:30000/"


def render(slug: str = "a", ports: tuple[int, ...] = (3000, 8726, 8765)) -> str:
    declared = pods.services("services", [{"port": p} for p in ports], 80)
    return render_file(template_path("nginx/hostname_router.conf.j2"),
                       pods.router_variables(slug, declared, 3000, 80, 3600, True))


def test_router_config_routes_declared_ports_only_through_a_map_with_named_captures() -> None:
    text = render()
    upstream = text.split("$netloom_a_upstream {", 1)[1].split("}", 1)[0]
    assert re.findall(r'"(\d+)" netloom_a_(\d+);', upstream) == [("3000", "3000"), ("8726", "8726"),
                                                                   ("8765", "8765")]
    servers = re.findall(r"upstream netloom_a_(\d+) \{\s+server 127\.0\.0\.1:(\d+);", text)
    assert servers == [("3000", "3000"), ("8726", "8726"), ("8765", "8765")]
    assert "(?<netloom_a_port>" in text and "$1" not in text
    assert "proxy_pass http://$netloom_a_upstream;" in text
    for header in ("Host", "X-Real-IP", "X-Forwarded-For", "Upgrade"):
        assert f"proxy_set_header {header} " in text
    assert "map $http_upgrade $netloom_a_connection_upgrade" in text and "proxy_read_timeout 3600s;" in text
    assert "return 421" in text and "return 404" in text


def test_router_regex_matches_what_parse_host_matches() -> None:
    """The template's own-pod regex, run through Python's re (PCRE-compatible here), agrees."""
    text = render("my-pod")
    pattern = re.search(r'"~\*(\^localhost-.*?\$)" \$netloom_my_pod_port', text)[1]
    regex = re.compile(pattern.replace("(?<", "(?P<"), re.IGNORECASE)
    for host in ("localhost-3000.pod-my-pod.localhost", "localhost-3000-pod-my-pod.localhost",
                 "localhost-3000.pod-my-podx.localhost", "localhost-3000.pod-other.localhost"):
        parsed = pods.parse_host(host)
        assert bool(regex.match(host)) == (parsed is not None and parsed[1] == "my-pod")


def test_no_private_is_built_from_the_shared_constants() -> None:
    _, blocked = pods.egress("egress", "no-private")
    for network, _ in NO_HOST_NETWORKS:
        assert str(network) in blocked
    for cidr in ("172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15"):
        assert cidr in blocked


def test_pod_chains_never_share_a_name() -> None:
    """NETLOOM-POD-<id> and NETLOOM-PODIN-<id> cannot collide, whatever the two ids."""
    names = {pods.chain_name(pod) for pod in ("in-x", "x", "podin-x")}
    names |= {pods.input_chain_name(pod) for pod in ("in-x", "x", "podin-x")}
    assert len(names) == 6
    assert pods.input_rules("pod-a") == ("-i pod-a -m conntrack --ctstate NEW -j DROP",)
