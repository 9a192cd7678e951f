"""The inventory-shaping filters used by the roles."""
from __future__ import annotations

import pytest

from filter_plugins.netloom import (
    FilterModule,
    netloom_mesh_peers,
    netloom_overlay_runners,
    netloom_runner_of,
)

HOSTVARS = {
    "r1": {"netloom_underlay_ip": "192.0.2.11", "overlay_runner_id": "3"},
    "r2": {"netloom_underlay_ip": "192.0.2.12"},
    "broken": {"netloom_underlay_ip": ""},
}


def test_runner_entries_keep_declared_ids_as_integers() -> None:
    assert netloom_overlay_runners(["r1", "r2"], HOSTVARS) == [
        {"name": "r1", "underlay_ip": "192.0.2.11", "id": 3},
        {"name": "r2", "underlay_ip": "192.0.2.12"},
    ]


def test_runner_without_underlay_address_is_named() -> None:
    with pytest.raises(ValueError, match="broken: netloom_underlay_ip"):
        netloom_overlay_runners(["broken"], HOSTVARS)


def test_runner_of_finds_entry_or_says_who_is_missing() -> None:
    table = [{"name": "r1", "id": 1}, {"name": "r2", "id": 2}]
    assert netloom_runner_of(table, "r2") == {"name": "r2", "id": 2}
    with pytest.raises(ValueError, match="r9 is missing"):
        netloom_runner_of(table, "r9")


def test_filters_are_registered() -> None:
    assert {"netloom_overlay_runners", "netloom_runner_of"} <= set(FilterModule().filters())


def test_mesh_peers_are_the_direct_mode_runners_of_the_hub_table() -> None:
    table = [{"name": "r1", "id": 1, "underlay_ip": "192.0.2.11"},
             {"name": "r2", "id": 2, "underlay_ip": "192.0.2.12"},
             {"name": "r3", "id": 3, "underlay_ip": "192.0.2.13"}]
    hostvars = {"r1": {"netloom_overlay_mode": "direct"}, "r2": {}, "r3": {"netloom_overlay_mode": "direct"}}
    assert netloom_mesh_peers(table, hostvars) == [
        {"id": 1, "underlay_ip": "192.0.2.11", "name": "r1"},
        {"id": 3, "underlay_ip": "192.0.2.13", "name": "r3"}]
    with pytest.raises(ValueError, match="r2: netloom_overlay_mode is 'mesh'"):
        netloom_mesh_peers(table, {**hostvars, "r2": {"netloom_overlay_mode": "mesh"}})
