"""Someone else's iptables rules that netloom must leave byte for byte as they are."""
from __future__ import annotations

from tests.support.netns import Netns

# Docker's nat table: its chain, the jumps to it and its masquerade and port-publishing rules.
DOCKER_NAT_RULES = """*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
COMMIT
"""


def add_foreign_rules(ns: Netns, rules: str) -> None:
    """Load iptables-save text into `ns` next to what is there (iptables-restore --noflush)."""
    ns.sh(f"printf '%s' '{rules}' | iptables-restore --noflush")
