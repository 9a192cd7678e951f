"""Address plan arithmetic, its validation and runner-id resolution."""
from __future__ import annotations

import ipaddress
import pathlib

import pytest
import yaml
from ansible.module_utils.netloom.common import InputError
from ansible.module_utils.netloom.plan import (
    AddressPlan,
    RunnerRecord,
    parse_runners,
    parse_state,
    render_state,
    resolve_runner_ids,
)

IP = ipaddress.IPv4Address
SEED = AddressPlan.parse("10.0.0.0/8/8/16")


# ---- plan arithmetic ------------------------------------------------------------------

@pytest.mark.parametrize("runner_id, subnet, gateway, hub", [
    (1, "10.1.0.0/16", "10.1.0.1", "10.1.0.254"),
    (2, "10.2.0.0/16", "10.2.0.1", "10.2.0.254"),
    (255, "10.255.0.0/16", "10.255.0.1", "10.255.0.254"),
])
def test_seed_table(runner_id: int, subnet: str, gateway: str, hub: str) -> None:
    runner = SEED.runner(runner_id)
    assert str(runner.subnet) == subnet
    assert str(runner.gateway) == gateway
    assert str(runner.hub_address) == hub
    assert str(runner.gateway_interface) == f"{gateway}/16"
    assert str(runner.hub_interface) == f"{hub}/16"


def test_seed_plan_constants() -> None:
    assert str(SEED.overlay) == "10.0.0.0/8"
    assert str(SEED.hub_anchor) == "10.0.0.1/8"
    assert SEED.subnet_prefix == 16
    assert SEED.max_runner_id == 255
    assert SEED.runner_vni(100, 1) == 101
    assert SEED.runner_vni(100, 255) == 355
    assert str(SEED) == "10.0.0.0/8/8/16"


def test_seed_workload_range_excludes_hub() -> None:
    runner = SEED.runner(1)
    assert str(runner.first_workload) == "10.1.0.2"
    assert str(runner.last_workload) == "10.1.255.254"
    # 10.1.0.2 .. 10.1.255.254 is 65533 addresses; the hub's 10.1.0.254 is not a workload's.
    assert runner.workload_count == 65532


@pytest.mark.parametrize("runner_id, subnet, gateway, hub", [
    (1, "10.128.64.0/18", "10.128.64.1", "10.128.64.254"),
    (2, "10.128.128.0/18", "10.128.128.1", "10.128.128.254"),
    (63, "10.143.192.0/18", "10.143.192.1", "10.143.192.254"),
])
def test_12_6_14_plan(runner_id: int, subnet: str, gateway: str, hub: str) -> None:
    plan = AddressPlan.parse("10.128.0.0/12/6/14")
    runner = plan.runner(runner_id)
    assert (str(runner.subnet), str(runner.gateway), str(runner.hub_address)) == (subnet, gateway, hub)
    assert str(plan.overlay) == "10.128.0.0/12"
    assert str(plan.hub_anchor) == "10.128.0.1/12"
    assert plan.max_runner_id == 63
    assert runner.subnet.subnet_of(plan.overlay)


def test_subnets_of_all_runners_are_disjoint_and_inside_the_overlay() -> None:
    plan = AddressPlan.parse("10.128.0.0/12/6/14")
    subnets = [plan.runner(n).subnet for n in range(1, plan.max_runner_id + 1)]
    assert all(subnet.subnet_of(plan.overlay) for subnet in subnets)
    assert len({subnet.network_address for subnet in subnets}) == len(subnets)
    assert not any(a.overlaps(b) for i, a in enumerate(subnets) for b in subnets[i + 1:])
    anchor = plan.hub_anchor.ip
    assert not any(anchor in subnet for subnet in subnets)


def test_tiny_subnet_uses_last_usable_address_for_the_hub() -> None:
    plan = AddressPlan.parse("192.168.0.0/24/4/4")  # runner subnets are /28
    runner = plan.runner(1)
    assert str(runner.subnet) == "192.168.0.16/28"
    assert str(runner.gateway) == "192.168.0.17"
    assert str(runner.hub_address) == "192.168.0.30"  # offset+254 would be outside; broadcast-1
    assert str(runner.last_workload) == "192.168.0.30"
    assert runner.workload_count == 12  # .18 .. .29


def test_smallest_subnet_has_gateway_and_hub_but_no_workload() -> None:
    plan = AddressPlan.parse("192.168.0.0/24/6/2")
    runner = plan.runner(1)
    assert (str(runner.gateway), str(runner.hub_address)) == ("192.168.0.5", "192.168.0.6")
    assert runner.gateway != runner.hub_address
    assert runner.workload_count == 0


def test_plan_from_fields_equals_the_string_form() -> None:
    fields = AddressPlan.from_value({"base": "10.128.0.0", "prefix": 12, "node_bits": 6, "subnet_bits": 14})
    cidr = AddressPlan.from_value({"base": "10.128.0.0/12", "node_bits": "6", "subnet_bits": "14"})
    assert fields == cidr == AddressPlan.parse("10.128.0.0/12/6/14")


# ---- plan validation ---------------------------------------------------------------------

@pytest.mark.parametrize("text, field, fragment", [
    ("10.0.0.0/8/8/8", "plan", "must be 32"),
    ("10.0.0.0/8/16/16", "plan", "must be 32"),
    ("10.1.0.0/8/8/16", "plan.base", "not aligned"),
    ("10.0.0.300/8/8/16", "plan.base", "not an IPv4 address"),
    ("10.0.0.0/8/23/1", "plan.subnet_bits", "between 2 and 31"),
    ("10.0.0.0/8/24/0", "plan.subnet_bits", "between 2 and 31"),
    ("10.0.0.0/8/0/24", "plan.node_bits", "between 1"),
    ("10.0.0.0/8", "plan", "BASE/PREFIX/NODE_BITS/SUBNET_BITS"),
    ("garbage", "plan", "BASE/PREFIX/NODE_BITS/SUBNET_BITS"),
])
def test_bad_plans_name_field_and_value(text: str, field: str, fragment: str) -> None:
    with pytest.raises(InputError) as err:
        AddressPlan.parse(text)
    assert err.value.field_name == field
    assert fragment in str(err.value)


@pytest.mark.parametrize("text, fragment", [
    ("0.0.0.0/0/8/24", "is the default route"),
    ("0.0.0.0/8/8/16", "overlaps 0.0.0.0/8 (this network)"),
    ("0.0.0.0/4/8/20", "overlaps 0.0.0.0/8 (this network)"),
    ("127.0.0.0/8/8/16", "overlaps 127.0.0.0/8 (loopback)"),
    ("126.0.0.0/7/8/17", "overlaps 127.0.0.0/8 (loopback)"),
    ("169.254.0.0/16/4/12", "overlaps 169.254.0.0/16 (link-local)"),
    ("169.254.128.0/20/4/8", "overlaps 169.254.0.0/16 (link-local)"),
    ("224.0.0.0/8/8/16", "overlaps 224.0.0.0/4 (multicast)"),
    ("192.0.0.0/2/8/22", "overlaps 224.0.0.0/4 (multicast)"),
    ("240.0.0.0/8/8/16", "overlaps 240.0.0.0/4 (reserved and broadcast)"),
    ("255.255.0.0/16/8/8", "overlaps 240.0.0.0/4 (reserved and broadcast)"),
])
def test_plans_over_reserved_ranges_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(InputError) as err:
        AddressPlan.parse(text)
    assert err.value.field_name == "plan"
    assert err.value.value == text
    assert fragment in str(err.value)


def test_plans_next_to_reserved_ranges_are_fine() -> None:
    for text in ("1.0.0.0/8/8/16", "128.0.0.0/8/8/16", "169.253.0.0/16/4/12", "223.0.0.0/8/8/16",
                 "10.0.0.0/8/8/16", "172.16.0.0/12/4/16", "192.168.0.0/16/8/8"):
        assert str(AddressPlan.parse(text)) == text


@pytest.mark.parametrize("value, fragment", [
    ("10.20.0.10", "inside the overlay 10.0.0.0/8"),
    ("10.0.0.1", "inside the overlay 10.0.0.0/8"),
    ("0.0.0.0", "cannot be a unicast host"),
    ("255.255.255.255", "cannot be a unicast host"),
    ("127.0.0.1", "loopback"),
    ("224.0.0.1", "multicast"),
    ("169.254.1.1", "link-local"),
])
def test_underlay_addresses_are_unicast_hosts_outside_the_overlay(value: str, fragment: str) -> None:
    with pytest.raises(InputError) as err:
        SEED.underlay_address("underlay_ip", value)
    assert err.value.field_name == "underlay_ip"
    assert err.value.value == value
    assert fragment in str(err.value)
    assert str(SEED.underlay_address("underlay_ip", "192.168.50.10")) == "192.168.50.10"


def test_example_inventory_is_coherent() -> None:
    """The example's underlay lies outside its overlay, and every host passes the modules' checks."""
    root = pathlib.Path(__file__).resolve().parents[2] / "inventory" / "example"
    group_vars = yaml.safe_load((root / "group_vars" / "all.yml").read_text())
    plan = AddressPlan.parse(group_vars["netloom_overlay_plan"])
    groups = yaml.safe_load((root / "hosts.yml").read_text())["all"]["children"]
    hub = next(iter(groups["overlay_hub"]["hosts"].values()))
    plan.underlay_address("underlay_ip", hub["netloom_underlay_ip"])
    entries = [{"name": name, "underlay_ip": host["netloom_underlay_ip"]}
               for name, host in groups["overlay_runners"]["hosts"].items()]
    assert len(parse_runners(plan, entries)) == 3


@pytest.mark.parametrize("value, field", [
    ({"base": "10.0.0.0/8", "prefix": 9, "node_bits": 8, "subnet_bits": 16}, "plan.prefix"),
    ({"base": "10.0.0.0", "node_bits": 8, "subnet_bits": 16}, "plan.prefix"),
    ({"base": "10.0.0.0/8", "node_bits": 8}, "plan.subnet_bits"),
    ({"base": "10.0.0.0/8", "node_bits": 8, "subnet_bits": 16, "vni": 3}, "plan.vni"),
    (42, "plan"),
])
def test_bad_plan_fields(value: object, field: str) -> None:
    with pytest.raises(InputError) as err:
        AddressPlan.from_value(value)
    assert err.value.field_name == field


@pytest.mark.parametrize("runner_id", [0, 256, -1, "x"])
def test_runner_id_outside_the_plan(runner_id: object) -> None:
    with pytest.raises(InputError) as err:
        SEED.runner(runner_id)  # type: ignore[arg-type]
    assert err.value.field_name == "runner_id"


def test_vni_outside_the_vxlan_range() -> None:
    assert SEED.runner_vni(16777214, 1) == 16777215
    with pytest.raises(InputError) as err:
        SEED.runner_vni(16777215, 1)
    assert err.value.field_name == "vni_base"
    assert "16777216" in str(err.value)
    with pytest.raises(InputError):
        SEED.runner_vni(-5, 1)


# ---- declared runner list ------------------------------------------------------------------

def runners(*entries: tuple) -> list[dict]:
    out = []
    for entry in entries:
        name, underlay = entry[0], entry[1]
        item = {"name": name, "underlay_ip": underlay}
        if len(entry) > 2:
            item["id"] = entry[2]
        out.append(item)
    return out


@pytest.mark.parametrize("entries, field, fragment", [
    (runners(("a", "192.0.2.11"), ("a", "192.0.2.12")), "runners[1].name", "duplicates runners[0]"),
    (runners(("a", "192.0.2.11"), ("b", "192.0.2.11")), "runners[1].underlay_ip", "duplicates"),
    (runners(("a", "192.0.2.11", 3), ("b", "192.0.2.12", 3)), "runners[1].id", "duplicates"),
    (runners(("a", "192.0.2.11", 0)), "runners[0].id", "between 1 and 255"),
    (runners(("a", "192.0.2.11", 256)), "runners[0].id", "between 1 and 255"),
    (runners(("a", "192.0.2.999")), "runners[0].underlay_ip", "not an IPv4"),
    (runners(("a", "10.1.0.5")), "runners[0].underlay_ip", "inside the overlay"),
    (runners(("a", "0.0.0.0")), "runners[0].underlay_ip", "cannot be a unicast host"),
    (runners(("a", "127.0.0.1")), "runners[0].underlay_ip", "loopback"),
    (runners(("a", "224.0.0.1")), "runners[0].underlay_ip", "multicast"),
    (runners(("a\n", "192.0.2.11")), "runners[0].name", "runner names"),
    (runners(("a b", "192.0.2.11")), "runners[0].name", "runner names"),
    (runners((" a", "192.0.2.11")), "runners[0].name", "runner names"),
    ([{"name": 5, "underlay_ip": "192.0.2.11"}], "runners[0].name", "runner names"),
    ([{"name": "", "underlay_ip": "192.0.2.11"}], "runners[0].name", "required"),
    ([{"name": "a", "underlay_ip": "192.0.2.11", "ip": "x"}], "runners[0].ip", "unknown"),
    (["a"], "runners[0]", "dict"),
])
def test_bad_runner_lists(entries: list, field: str, fragment: str) -> None:
    with pytest.raises(InputError) as err:
        parse_runners(SEED, entries)
    assert err.value.field_name == field
    assert fragment in str(err.value)


# ---- id resolution ----------------------------------------------------------------------

def resolve(entries: list[dict], records=(), links=None, keep_undeclared=False) -> dict[str, tuple[int, str]]:
    specs = parse_runners(SEED, entries)
    resolved = resolve_runner_ids(SEED, specs, records, links, keep_undeclared)
    return {runner.name: (runner.runner_id, runner.source) for runner in resolved}


def test_lowest_free_ids_in_declaration_order() -> None:
    assert resolve(runners(("a", "192.0.2.11"), ("b", "192.0.2.12"))) == {
        "a": (1, "allocated"), "b": (2, "allocated")}


def test_declared_ids_win_and_allocation_skips_them() -> None:
    got = resolve(runners(("a", "192.0.2.11"), ("b", "192.0.2.12", 1)),
                  records=[RunnerRecord("b", 7, IP("192.0.2.12"))])
    assert got == {"a": (2, "allocated"), "b": (1, "declared")}


def test_recorded_ids_are_kept_whatever_the_order() -> None:
    records = [RunnerRecord("a", 5, IP("192.0.2.11")), RunnerRecord("b", 2, IP("192.0.2.12"))]
    got = resolve(runners(("c", "192.0.2.13"), ("b", "192.0.2.12"), ("a", "192.0.2.11")), records)
    assert got == {"a": (5, "recorded"), "b": (2, "recorded"), "c": (1, "allocated")}


def test_renamed_runner_reclaims_its_id_by_underlay_ip() -> None:
    got = resolve(runners(("new-name", "192.0.2.11")), records=[RunnerRecord("old", 4, IP("192.0.2.11"))])
    assert got == {"new-name": (4, "recorded")}


def test_runner_whose_ip_changed_keeps_its_id_by_name() -> None:
    got = resolve(runners(("a", "192.0.2.50")), records=[RunnerRecord("a", 4, IP("192.0.2.11"))])
    assert got == {"a": (4, "recorded")}


def test_ids_recovered_from_links_when_nothing_is_recorded() -> None:
    links = {9: IP("192.0.2.12"), 3: IP("192.0.2.99")}
    got = resolve(runners(("a", "192.0.2.11"), ("b", "192.0.2.12")), links=links)
    assert got == {"a": (1, "allocated"), "b": (9, "link")}


def test_record_beats_a_conflicting_link() -> None:
    links = {3: IP("192.0.2.12")}  # stale link to b on a's recorded id
    got = resolve(runners(("a", "192.0.2.11"), ("b", "192.0.2.12")),
                  records=[RunnerRecord("a", 3, IP("192.0.2.11"))], links=links)
    assert got == {"a": (3, "recorded"), "b": (1, "allocated")}


def test_declared_id_that_would_renumber_a_recorded_runner_is_refused() -> None:
    with pytest.raises(InputError) as err:
        resolve(runners(("a", "192.0.2.11"), ("b", "192.0.2.12", 3)),
                records=[RunnerRecord("a", 3, IP("192.0.2.11"))])
    assert err.value.field_name == "runners[1].id"
    assert "would renumber a" in str(err.value)


def test_declared_id_that_would_renumber_a_linked_runner_is_refused() -> None:
    with pytest.raises(InputError) as err:
        resolve(runners(("a", "192.0.2.11"), ("b", "192.0.2.12", 3)), links={3: IP("192.0.2.11")})
    assert err.value.field_name == "runners[1].id"


def test_removed_runner_id_is_free_again_when_purging() -> None:
    records = [RunnerRecord("gone", 1, IP("192.0.2.11")), RunnerRecord("b", 2, IP("192.0.2.12"))]
    got = resolve(runners(("b", "192.0.2.12"), ("c", "192.0.2.13")), records, links={1: IP("192.0.2.11")})
    assert got == {"b": (2, "recorded"), "c": (1, "allocated")}


def test_undeclared_runners_keep_their_ids_without_purge() -> None:
    records = [RunnerRecord("kept", 1, IP("192.0.2.11"))]
    got = resolve(runners(("c", "192.0.2.13")), records, links={2: IP("192.0.2.99")}, keep_undeclared=True)
    assert got == {"c": (3, "allocated")}


def test_blocked_ids_are_skipped_by_allocation_only() -> None:
    specs = parse_runners(SEED, runners(("a", "192.0.2.11"), ("b", "192.0.2.12", 2)))
    resolved = resolve_runner_ids(SEED, specs, blocked={1, 2, 3})
    got = [(r.name, r.runner_id, r.source) for r in resolved]
    assert got == [("a", 4, "allocated"), ("b", 2, "declared")]


def test_never_renumber_across_runs() -> None:
    first = resolve(runners(("a", "192.0.2.11"), ("b", "192.0.2.12"), ("c", "192.0.2.13")))
    records = [RunnerRecord(name, rid, IP(f"192.0.2.{10 + rid}")) for name, (rid, _) in first.items()]
    # a leaves, d joins, c is listed first: b and c keep theirs, d takes the freed 1.
    second = resolve(runners(("c", "192.0.2.13"), ("d", "192.0.2.14"), ("b", "192.0.2.12")), records)
    assert second == {"c": (3, "recorded"), "d": (1, "allocated"), "b": (2, "recorded")}


def test_plan_full_is_an_input_error() -> None:
    plan = AddressPlan.parse("10.0.0.0/8/2/22")
    specs = parse_runners(plan, runners(*[(f"r{i}", f"192.0.2.{i}") for i in range(1, 5)]))
    with pytest.raises(InputError) as err:
        resolve_runner_ids(plan, specs)
    assert err.value.field_name == "runners[3]"
    assert "no free runner id" in str(err.value)


def test_record_outside_a_changed_plan_is_ignored() -> None:
    got = resolve(runners(("a", "192.0.2.11")), records=[RunnerRecord("a", 900, IP("192.0.2.11"))])
    assert got == {"a": (1, "allocated")}


# ---- state file ------------------------------------------------------------------------------

def test_state_round_trip_is_canonical() -> None:
    records = [RunnerRecord("b", 2, IP("192.0.2.12")), RunnerRecord("a", 1, IP("192.0.2.11"))]
    text = render_state(records)
    assert sorted(parse_state(text), key=lambda r: r.name) == sorted(records, key=lambda r: r.name)
    assert render_state(list(reversed(records))) == text
    assert parse_state("") == []


def test_corrupt_state_is_an_error_not_a_reset() -> None:
    with pytest.raises(InputError) as err:
        parse_state('{"runners": {"a": {"id": "x"}}}', "state_file")
    assert err.value.field_name == "state_file"
