"""Jinja2 filters of playbooks/topology.yml: the cluster model from every node's netloom_facts, and its DOT.

The model itself lives in plugin_utils/netloom_topology.py (pure Python, unit-tested from recorded
facts); these filters only hand it Ansible's inventory and the registered results.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

PLUGIN_UTILS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin_utils")
if PLUGIN_UTILS not in sys.path:
    sys.path.insert(0, PLUGIN_UTILS)
from netloom_topology import build_model, inventory_view, render_dot


def netloom_topology_model(hosts: list[str], groups: Mapping[str, list[str]], hostvars: Mapping[str, Any],
                           result_var: str = "netloom_topology_facts") -> dict[str, Any]:
    """The cluster model: `hosts` are the inventory hosts to draw, each with its registered `result_var`."""
    facts = {host: hostvars[host].get(result_var) for host in hosts}
    return build_model(facts, inventory_view(hosts, groups, hostvars))


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"netloom_topology_model": netloom_topology_model, "netloom_topology_dot": render_dot}
