"""Jinja2 filters that turn inventory data into module input.

Kept here (not in templates) so the shaping of inventory data is unit-tested and the
roles stay declarative.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def netloom_overlay_runners(hostnames: list[str], hostvars: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Runner entries for overlay_hub: name, underlay IP and the declared id if any.

    Fails loudly when a runner has no underlay address, instead of letting the module
    receive an empty string.
    """
    runners = []
    for name in hostnames:
        host = hostvars[name]
        underlay_ip = host.get("netloom_underlay_ip")
        if not underlay_ip:
            raise ValueError(f"runner {name}: netloom_underlay_ip is not set in the inventory")
        entry: dict[str, Any] = {"name": name, "underlay_ip": str(underlay_ip)}
        if host.get("overlay_runner_id") is not None:
            entry["id"] = int(host["overlay_runner_id"])
        runners.append(entry)
    return runners


def netloom_runner_of(runners: list[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    """The hub's resolved table entry for one runner; a clear error if the hub left it out."""
    for entry in runners:
        if entry.get("name") == name:
            return entry
    raise ValueError(f"runner {name} is missing from the hub's runner table; "
                     "is it in the runner group and was the hub play run?")


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {
            "netloom_overlay_runners": netloom_overlay_runners,
            "netloom_runner_of": netloom_runner_of,
        }
