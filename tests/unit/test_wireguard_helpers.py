"""Pure WireGuard helpers: key checks, `wg show` parsing, peer comparison, the saved config."""
import base64
import dataclasses
import ipaddress

import pytest
from ansible.module_utils.netloom import wireguard
from ansible.module_utils.netloom.common import InputError
from ansible.module_utils.netloom.wireguard import (
    PeerSpec,
    address_reason,
    config_endpoints,
    network_reason,
    parse_allowed_ips,
    parse_dump,
    peer_differences,
    peer_set_args,
    peer_view,
    preshared_keys_text,
    redact_config,
    resolve_endpoint,
    sorted_networks,
    split_endpoint,
    userspace_failure,
    wg_key,
)

from plugin_utils.netloom_action import render_file, template_path

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()
SECRET = base64.b64encode(bytes(range(100, 132))).decode()
PSK = base64.b64encode(bytes(range(200, 232))).decode()

DUMP = (
    f"{SECRET}\t{KEY_A}\t51820\toff\n"
    f"{KEY_B}\t{PSK}\t192.0.2.2:51820\t10.99.0.2/32,10.88.2.0/24\t1700000000\t100\t200\t25\n"
    f"{KEY_A}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
)


def test_key_is_base64_of_32_bytes() -> None:
    assert wg_key("peers[0].public_key", f" {KEY_A}\n") == KEY_A
    short = base64.b64encode(bytes(31)).decode()
    for bad in (short, "not-a-key", KEY_A[:-2], ""):
        with pytest.raises(InputError) as err:
            wg_key("peers[0].public_key", bad)
        assert err.value.field_name == "peers[0].public_key"


def test_secret_key_value_never_appears_in_the_error() -> None:
    bad_secret = base64.b64encode(bytes(31)).decode()
    with pytest.raises(InputError) as err:
        wg_key("peers[2].preshared_key", bad_secret, secret=True)
    assert bad_secret not in str(err.value) and bad_secret != err.value.value
    assert "peers[2].preshared_key" in str(err.value)


def test_dump_is_parsed_with_none_and_off_normalised() -> None:
    state = parse_dump(DUMP)
    assert state.private_key == SECRET and state.public_key == KEY_A and state.listen_port == 51820
    peer = state.peers[KEY_B]
    assert peer.allowed_ips == ("10.88.2.0/24", "10.99.0.2/32")
    assert peer.endpoint == "192.0.2.2:51820" and peer.persistent_keepalive == 25
    assert peer.preshared_key == PSK and peer.latest_handshake == 1700000000
    idle = state.peers[KEY_A]
    assert idle.allowed_ips == () and idle.endpoint is None and idle.preshared_key is None
    assert idle.persistent_keepalive == 0
    assert SECRET not in repr(state) and PSK not in repr(state)


def test_allowed_ips_output_lists_every_cidr_and_skips_none() -> None:
    text = f"{KEY_B}\t10.99.0.2/32 10.88.2.0/24 ::/0\n{KEY_A}\t(none)\n\n"
    assert parse_allowed_ips(text) == ["10.99.0.2/32", "10.88.2.0/24", "::/0"]


DECLARED = PeerSpec(KEY_B, sorted_networks(["10.99.0.2/32", "10.88.2.0/24"]), 25, "192.0.2.2:51820",
                    frozenset(["192.0.2.2:51820"]), PSK)


def spec(**overrides: object) -> PeerSpec:
    return dataclasses.replace(DECLARED, **overrides)


def test_matching_peer_needs_no_change_whatever_the_allowed_ips_order() -> None:
    live = parse_dump(DUMP).peers[KEY_B]
    assert peer_differences(spec(), live) == []
    assert peer_differences(spec(allowed_ips=sorted_networks(["10.88.2.0/24", "10.99.0.2/32"])), live) == []


def test_unmanaged_endpoint_is_not_compared_but_a_declared_one_is() -> None:
    live = parse_dump(DUMP).peers[KEY_B]
    assert peer_differences(spec(endpoint=None, endpoint_forms=frozenset()), live) == []
    moved = spec(endpoint="192.0.2.3:51820", endpoint_forms=frozenset(["192.0.2.3:51820"]))
    assert peer_differences(moved, live) == ["endpoint"]
    assert peer_set_args(moved, ["endpoint"]) == (["peer", KEY_B, "endpoint", "192.0.2.3:51820"], None)


def test_keepalive_zero_equals_off_and_is_set_as_off() -> None:
    idle = parse_dump(DUMP).peers[KEY_A]
    plain = PeerSpec(KEY_A, (), 0)
    assert peer_differences(plain, idle) == []
    live = parse_dump(DUMP).peers[KEY_B]
    no_keepalive = spec(persistent_keepalive=0)
    assert peer_differences(no_keepalive, live) == ["persistent_keepalive"]
    assert peer_set_args(no_keepalive, ["persistent_keepalive"])[0][-2:] == ["persistent-keepalive", "off"]


def test_preshared_key_goes_through_stdin_and_is_removed_with_dev_null() -> None:
    live = parse_dump(DUMP).peers[KEY_B]
    rotated = spec(preshared_key=SECRET)
    assert peer_differences(rotated, live) == ["preshared_key"]
    args, stdin = peer_set_args(rotated, ["preshared_key"])
    assert args == ["peer", KEY_B, "preshared-key", "/dev/stdin"] and stdin == SECRET + "\n"
    dropped = spec(preshared_key=None)
    assert peer_set_args(dropped, peer_differences(dropped, live)) == (
        ["peer", KEY_B, "preshared-key", "/dev/null"], None)


def test_new_peer_sets_only_what_is_declared() -> None:
    assert peer_differences(PeerSpec(KEY_A, ("10.99.0.3/32",)), None) == ["allowed_ips"]
    assert peer_differences(spec(), None) == ["allowed_ips", "endpoint", "persistent_keepalive",
                                              "preshared_key"]
    args, _stdin = peer_set_args(PeerSpec(KEY_A, ()), ["allowed_ips"])
    assert args == ["peer", KEY_A, "allowed-ips", ""]


def test_peer_view_flags_the_preshared_key_without_its_value() -> None:
    view = peer_view(spec())
    assert view["preshared_key"] == "(hidden)" and PSK not in str(view)
    assert view["allowed_ips"] == ["10.88.2.0/24", "10.99.0.2/32"]


def render_config(**params: object) -> str:
    """The wg-quick config as the action plugin renders it on the controller."""
    base: dict[str, object] = {"name": "wg0", "config_dir": "/etc/wireguard", "addresses": ["10.99.0.1/24"],
                               "listen_port": 51820, "mtu": None, "peers": []}
    variables = wireguard.config_variables({**base, **params})
    return render_file(template_path(wireguard.CONFIG_TEMPLATE), variables, wireguard.TEMPLATE_FILTERS)


PEERS = [{"public_key": KEY_B, "allowed_ips": ["10.99.0.2/32", "10.88.2.0/24"], "endpoint": "192.0.2.2:51820",
          "persistent_keepalive": 25, "preshared_key": PSK},
         {"public_key": KEY_A, "allowed_ips": []}]


def test_config_is_wg_quick_format_and_holds_no_key() -> None:
    text = render_config(mtu=1420, peers=PEERS)
    assert text.splitlines()[1:8] == ["[Interface]", "Address = 10.99.0.1/24", "Table = off",
                                      "ListenPort = 51820", "MTU = 1420",
                                      "PostUp = wg set %i private-key /etc/wireguard/wg0.key",
                                      "PostUp = wg addconf %i /etc/wireguard/wg0.psk"]
    assert SECRET not in text and PSK not in text and "PrivateKey" not in text and "PresharedKey" not in text
    assert "AllowedIPs = 10.88.2.0/24, 10.99.0.2/32" in text
    assert "PersistentKeepalive = 25" in text and text.count("[Peer]") == 2
    assert f"PublicKey = {KEY_B}" in text
    assert "wg0.psk" not in render_config(peers=[dict(PEERS[0], preshared_key=None)]), "no psk: no PostUp"


def test_preshared_keys_live_in_their_own_file_in_wg_format() -> None:
    text = preshared_keys_text([spec(), PeerSpec(KEY_A, ())])
    assert text is not None and text.splitlines()[1:] == ["", "[Peer]", f"PublicKey = {KEY_B}",
                                                          f"PresharedKey = {PSK}",
                                                          "AllowedIPs = 10.88.2.0/24, 10.99.0.2/32"]
    assert preshared_keys_text([PeerSpec(KEY_A, ())]) is None


def test_redaction_hides_every_key_of_a_config_written_by_an_earlier_version() -> None:
    old = f"[Interface]\nPrivateKey = {SECRET}\n\n[Peer]\nPublicKey = {KEY_B}\nPresharedKey = {PSK}\n"
    shown = redact_config(old)
    assert SECRET not in shown and PSK not in shown
    assert "PrivateKey = (hidden)" in shown and "PresharedKey = (hidden)" in shown
    assert f"PublicKey = {KEY_B}" in shown


def test_paths_in_post_up_are_shell_quoted() -> None:
    assert "PostUp = wg set %i private-key '/etc/wire guard/wg0.key'" in render_config(
        config_dir="/etc/wire guard")


@pytest.mark.parametrize(("endpoint", "canonical"), [
    ("192.0.2.2:51820", "192.0.2.2:51820"),
    ("[2001:db8::0001]:51820", "[2001:db8::1]:51820"),
    ("localhost:51820", "localhost:51820"),
])
def test_endpoint_forms(endpoint: str, canonical: str) -> None:
    declared, forms = resolve_endpoint("peers[0].endpoint", endpoint)
    assert declared == canonical
    if canonical.startswith("localhost"):
        assert "127.0.0.1:51820" in forms
    else:
        assert forms == {canonical}


@pytest.mark.parametrize("endpoint", ["192.0.2.2", "192.0.2.2:0", "192.0.2.2:70000", ":51820",
                                      "2001:db8::1:51820", "[2001:db8::1]51820"])
def test_bad_endpoints_name_the_field(endpoint: str) -> None:
    with pytest.raises(InputError) as err:
        resolve_endpoint("peers[1].endpoint", endpoint)
    assert err.value.field_name == "peers[1].endpoint"


def test_a_roamed_endpoint_is_kept_unless_the_declaration_changed_or_policy_is_always() -> None:
    live = parse_dump(DUMP).peers[KEY_B]  # live endpoint 192.0.2.2:51820
    declared = spec(endpoint="203.0.113.5:51820", endpoint_forms=frozenset(["203.0.113.5:51820"]))
    # The config says the last run declared the same endpoint: the peer roamed, leave it.
    assert peer_differences(declared, live, "203.0.113.5:51820") == []
    # Declared endpoint changed since the last run, or no record of it: set it.
    assert peer_differences(declared, live, "203.0.113.4:51820") == ["endpoint"]
    assert peer_differences(declared, live, None) == ["endpoint"]
    assert peer_differences(dataclasses.replace(declared, endpoint_policy="always"), live,
                            "203.0.113.5:51820") == ["endpoint"]
    # A peer without any live endpoint gets the declared one whatever the record says.
    idle = parse_dump(DUMP).peers[KEY_A]
    fresh = PeerSpec(KEY_A, (), 0, "203.0.113.5:51820", frozenset(["203.0.113.5:51820"]))
    assert peer_differences(fresh, idle, "203.0.113.5:51820") == ["endpoint"]


def test_config_endpoints_are_read_per_peer() -> None:
    assert config_endpoints(render_config(peers=PEERS)) == {KEY_B: "192.0.2.2:51820"}
    ipv6 = dict(PEERS[0], endpoint="[2001:db8::0001]:51820")
    assert config_endpoints(render_config(peers=[ipv6])) == {KEY_B: "[2001:db8::1]:51820"}, "canonical form"
    assert config_endpoints(None) == {}
    assert config_endpoints("[Peer]\nEndpoint = 192.0.2.9:1\n") == {}, "no key before it: no owner"


@pytest.mark.parametrize(("text", "reason"), [
    ("0.0.0.0/32", "0.0.0.0/8"), ("127.0.0.0/8", "loopback"), ("127.1.0.0/16", "loopback"),
    ("169.254.0.0/16", "link-local"), ("224.0.0.0/4", "multicast"), ("255.255.255.255/32", "broadcast"),
    ("::1/128", "loopback"), ("ff02::/16", "multicast"),
    ("0.0.0.0/0", None), ("0.0.0.0/1", None), ("::/0", None), ("10.88.1.0/24", None), ("fe80::/64", None),
    ("203.0.113.7/32", None),
])
def test_allowed_ips_no_host_can_send_from_are_named(text: str, reason: str | None) -> None:
    found = network_reason(ipaddress.ip_network(text))
    assert (found is None) if reason is None else (reason in found)


def test_addresses_that_are_no_host_are_named() -> None:
    assert "loopback" in address_reason(ipaddress.ip_address("127.0.0.1"))
    assert "unspecified" in address_reason(ipaddress.ip_address("::"))
    assert address_reason(ipaddress.ip_address("192.0.2.2")) is None


@pytest.mark.parametrize("endpoint", ["0.0.0.0:51820", "127.0.0.1:51820", "224.0.0.1:51820",
                                      "255.255.255.255:51820", "[::1]:51820", "[ff02::1]:51820"])
def test_endpoints_that_are_no_host_are_refused_naming_field_and_value(endpoint: str) -> None:
    with pytest.raises(InputError) as err:
        resolve_endpoint("peers[0].endpoint", endpoint)
    assert err.value.field_name == "peers[0].endpoint" and err.value.value == endpoint
    assert "unicast host" in str(err.value)


# What wireguard-go v0.0.20220316 printed when its socket directory was read-only.
BANNER = "\n".join(["┌──────────────────────────────────────────────────────┐",
                    "│   Running wireguard-go is not required because this  │",
                    "└──────────────────────────────────────────────────────┘"])


def test_wireguard_go_failure_is_its_error_lines_not_its_banner() -> None:
    stdout = "ERROR: (wg0) 2026/11/27 05:52:05 UAPI listen error: remove /var/run/wireguard/wg0.sock: " \
             "read-only file system\n"
    assert userspace_failure(stdout, BANNER) == stdout.strip()
    assert userspace_failure("", "INFO: (wg0) starting\nfailed to open tun\n" + BANNER) == (
        "INFO: (wg0) starting; failed to open tun")
    assert userspace_failure("", BANNER) == "no error output"


@pytest.mark.parametrize("endpoint", ["gw.example\nPostUp = touch /tmp/pwned:51820", "gw example:51820",
                                      "gw;id:51820", "-gw.example:51820", "a..b:51820"])
def test_an_endpoint_host_that_is_no_dns_name_is_refused(endpoint: str) -> None:
    """The endpoint is written into the wg-quick config, which wg-quick runs through bash."""
    with pytest.raises(InputError) as info:
        split_endpoint("peers[0].endpoint", endpoint)
    assert info.value.field_name == "peers[0].endpoint"
    assert "neither an IP address nor a DNS name" in str(info.value)


def test_names_and_addresses_are_endpoint_hosts() -> None:
    assert split_endpoint("e", "gw-1.example.net:51820") == ("gw-1.example.net", 51820)
    assert split_endpoint("e", "[2001:db8::1]:51820") == ("2001:db8::1", 51820)
    assert split_endpoint("e", "192.0.2.1:51820") == ("192.0.2.1", 51820)
