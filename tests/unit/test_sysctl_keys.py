"""sysctl key → /proc/sys path mapping, value normalisation and the persist file format."""
from __future__ import annotations

import pytest
from ansible.module_utils.netloom.common import InputError
from ansible.module_utils.netloom.sysctl import key_to_path, normalise_value, render_persist_file


@pytest.mark.parametrize(("key", "path"), [
    ("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"),
    ("net.ipv4.conf.br-1a2b.route_localnet", "/proc/sys/net/ipv4/conf/br-1a2b/route_localnet"),
    ("net.ipv4.conf.eth0/100.forwarding", "/proc/sys/net/ipv4/conf/eth0.100/forwarding"),
])
def test_dotted_keys_map_into_proc_sys(key: str, path: str) -> None:
    assert key_to_path(key) == path


@pytest.mark.parametrize("key", [
    "", "ip_forward", "net..ipv4", ".net.ipv4", "net.ipv4.", "net.ipv4.conf.//.x",
    "net.ipv4.conf./.x", "net/../../etc/passwd", "net.ipv4 .ip_forward", "net.ipv4.conf.*.x", 42,
    "net.ipv4.ip_forward\n", "net.ipv4.conf.eth0\n.route_localnet",
])
def test_keys_that_are_not_sysctl_names_are_refused(key: object) -> None:
    with pytest.raises(InputError) as info:
        key_to_path(key)  # type: ignore[arg-type]
    assert info.value.field_name == "sysctl key"


def test_values_are_compared_in_proc_sys_form() -> None:
    assert normalise_value("32768\t60999") == "32768 60999"
    assert normalise_value(1) == "1"
    assert normalise_value(True) == "1"
    assert normalise_value(" 1\n") == "1"
    with pytest.raises(InputError):
        normalise_value("1\n2")


def test_persist_file_is_sorted_and_complete() -> None:
    text = render_persist_file({"net.ipv4.ip_forward": "1", "net.ipv4.conf.br0.route_localnet": "1"})
    assert text.splitlines()[1:] == ["net.ipv4.conf.br0.route_localnet = 1", "net.ipv4.ip_forward = 1"]
    assert text.startswith("# Managed by netloom")
