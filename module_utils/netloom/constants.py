"""Kernel numbers netloom compares or writes, in one place (linux/rtnetlink.h, linux/neighbour.h),
so every module reads the same value under the same name. A link's up state (IFF_UP) needs no
number: the seam reads it from iproute2's flags."""
from __future__ import annotations

import ipaddress

# Routing tables (rtm_table).
MAIN_TABLE = 254

# Routing protocols (rtm_protocol): who installed a route.
RTPROT_KERNEL = 2  # the kernel's connected routes
RTPROT_BOOT = 3    # the default of `ip route add`
# Routes netloom's own modules install carry this protocol (`ip route ... proto 250`), so a
# module finds its own routes again and leaves everyone else's alone.
NETLOOM_ROUTE_PROTO = 250

# Route scopes (rtm_scope).
SCOPE_UNIVERSE = 0
SCOPE_LINK = 253
SCOPE_NOWHERE = 255  # in a delete request: match any scope, as `ip route del` does

RTN_UNICAST = 1  # route type (rtm_type)
RTNH_F_ONLINK = 4  # route flag: the gateway is on the link (`ip route ... onlink`)

# Neighbour states and flags (ndm_state, ndm_flags).
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02

# IPv4 ranges no unicast host ever holds, with what each is: never an underlay address, a VXLAN
# remote, an endpoint or a tunnel route, and never part of an overlay.
NO_HOST_NETWORKS = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "this network"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved and broadcast"),
)
