"""The AllowedIPs route filter: every verdict and its reason, from a table."""
import ipaddress

import pytest
from ansible.module_utils.netloom.wgroutes import classify

ALLOW = [ipaddress.IPv4Address("203.0.113.7")]

# cidr, accepted, words the reason must contain
TABLE = [
    # accepted: RFC1918 subnets and hosts, allow-listed public hosts
    ("10.88.1.0/24", True, "RFC1918 subnet"),
    ("10.88.0.0/16", True, "RFC1918 subnet"),
    ("10.0.0.0/8", True, "RFC1918 subnet"),
    ("172.16.0.0/12", True, "RFC1918 subnet"),
    ("172.31.255.0/24", True, "RFC1918 subnet"),
    ("192.168.10.0/24", True, "RFC1918 subnet"),
    ("10.99.0.2/32", True, "RFC1918 host route"),
    ("192.168.1.1/32", True, "RFC1918 host route"),
    ("203.0.113.7/32", True, "allow-listed"),
    # refused: dangerous whatever the allow list says
    ("0.0.0.0/0", False, "default route"),
    ("0.0.0.0/32", False, "0.0.0.0/8"),
    ("0.1.2.3/32", False, "0.0.0.0/8"),
    ("127.0.0.1/32", False, "loopback"),
    ("127.0.0.0/8", False, "loopback"),
    ("169.254.0.0/16", False, "link-local"),
    ("169.254.169.254/32", False, "link-local"),
    ("224.0.0.0/4", False, "multicast"),
    ("239.1.1.1/32", False, "multicast"),
    ("255.255.255.255/32", False, "broadcast"),
    ("240.0.0.0/4", False, "reserved"),
    # refused: IPv6 of any kind
    ("::/0", False, "IPv6"),
    ("fd00::/64", False, "IPv6"),
    ("::1/128", False, "IPv6"),
    # refused: public ranges and hosts not allowed, RFC1918 supersets that reach beyond it
    ("198.51.100.9/32", False, "public host route not in the allow list"),
    ("8.8.8.8/32", False, "public host route not in the allow list"),
    ("198.51.100.0/24", False, "not inside an RFC1918 range"),
    ("100.64.0.0/10", False, "not inside an RFC1918 range"),
    ("10.0.0.0/7", False, "not inside an RFC1918 range"),
    ("172.0.0.0/8", False, "not inside an RFC1918 range"),
    ("0.0.0.0/1", False, "not inside an RFC1918 range"),
    # refused: garbage
    ("garbage", False, "not a CIDR"),
    ("10.88.1.0/33", False, "not a CIDR"),
    ("10.88.1.1/24", False, "host bits set"),
    ("300.1.1.1/32", False, "not a CIDR"),
    ("", False, "not a CIDR"),
]


@pytest.mark.parametrize(("cidr", "accepted", "reason"), TABLE)
def test_verdict_and_reason(cidr: str, accepted: bool, reason: str) -> None:
    verdict = classify(cidr, ALLOW)
    assert verdict.accepted is accepted, verdict
    assert reason in verdict.reason
    assert verdict.cidr == cidr
    assert (verdict.network is not None) is accepted


def test_allow_list_only_lifts_public_host_routes() -> None:
    """An allow-listed address still cannot make its /24, or a forbidden address, routable."""
    assert not classify("203.0.113.7/32").accepted
    assert not classify("203.0.113.0/24", ALLOW).accepted
    loopback = [ipaddress.IPv4Address("127.0.0.1")]
    assert "loopback" in classify("127.0.0.1/32", loopback).reason
    broadcast = [ipaddress.IPv4Address("255.255.255.255")]
    assert not classify("255.255.255.255/32", broadcast).accepted


def test_whitespace_around_a_cidr_is_tolerated_and_the_network_normalised() -> None:
    verdict = classify(" 10.88.1.0/24\n")
    assert verdict.accepted and verdict.cidr == "10.88.1.0/24"
    assert verdict.network == ipaddress.IPv4Network("10.88.1.0/24")
    assert verdict.as_dict() == {"cidr": "10.88.1.0/24", "reason": "RFC1918 subnet"}
