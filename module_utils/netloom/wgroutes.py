"""Which WireGuard AllowedIPs may become kernel routes: a pure filter with reasons.

The ESB gateway routed every AllowedIPs CIDR it found and accepted any /32, so a peer
could pull 127.0.0.1/32, 0.0.0.0/32, 255.255.255.255/32 or a public host into the tunnel.
Here each CIDR gets an explicit verdict and a reason the operator can read in the result.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ansible.module_utils.netloom.constants import NO_HOST_NETWORKS

RFC1918 = tuple(ipaddress.IPv4Network(net) for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


@dataclass(frozen=True)
class Verdict:
    """The decision for one CIDR as written, and why."""

    cidr: str
    accepted: bool
    reason: str
    network: ipaddress.IPv4Network | None = None  # set when accepted

    def as_dict(self) -> dict[str, str]:
        return {"cidr": self.cidr, "reason": self.reason}


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse a CIDR strictly: host bits set is an error, not something to guess about."""
    return ipaddress.ip_network(text.strip(), strict=True)


def forbidden_reason(network: ipaddress.IPv4Network) -> str | None:
    """Why an IPv4 network may never be routed, or None when it is not forbidden."""
    if network.prefixlen == 0:
        return "default route (0.0.0.0/0) would send all traffic into the tunnel"
    # Never routable into a tunnel, whatever an allow list says. Checked before anything else.
    for block, what in NO_HOST_NETWORKS:
        if network.subnet_of(block):
            return f"inside {block} ({what})"
    return None


def classify(cidr: str, allow: Iterable[ipaddress.IPv4Address] = ()) -> Verdict:
    """Accept RFC1918 subnets/hosts and /32s of allow-listed addresses; refuse the rest with a reason."""
    text = str(cidr).strip()
    try:
        network = parse_cidr(text)
    except ValueError as err:
        return Verdict(text, False, f"not a CIDR ({err})")
    if network.version == 6:
        return Verdict(text, False, "IPv6 is not routed")
    forbidden = forbidden_reason(network)
    if forbidden:
        return Verdict(text, False, forbidden)
    if any(network.subnet_of(block) for block in RFC1918):
        kind = "host route" if network.prefixlen == 32 else "subnet"
        return Verdict(text, True, f"RFC1918 {kind}", network)
    if network.prefixlen == 32:
        if network.network_address in set(allow):
            return Verdict(text, True, "host route of an allow-listed address", network)
        return Verdict(text, False, "public host route not in the allow list")
    return Verdict(text, False, "not inside an RFC1918 range (10/8, 172.16/12, 192.168/16)")
