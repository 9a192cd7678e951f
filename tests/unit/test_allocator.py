"""The overlay address allocator: exhaustion, reuse, reserved addresses, reconcile, the book on disk."""
from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import stat

import pytest
from ansible.module_utils import basic
from ansible.module_utils.netloom.allocator import (
    AddressBook,
    Allocation,
    LiveUse,
    OverlayAllocator,
    addressing_from_bridge,
)
from ansible.module_utils.netloom.common import ChangePlan, InputError
from ansible.module_utils.netloom.plan import AddressPlan

IP = ipaddress.IPv4Address
SEED = AddressPlan.parse("10.0.0.0/8/8/16").runner(1)
# A /29 per runner: .0 network, .1 gateway, .2-.5 workloads, .6 hub (last usable), .7 broadcast.
TINY = AddressPlan.parse("10.0.0.0/8/21/3").runner(1)


def fill(book: AddressBook, count: int, owner: str = "container") -> list[Allocation]:
    made = []
    for number in range(count):
        allocation = book.choose(f"k{number}", owner)
        book.record(allocation)
        made.append(allocation)
    return made


def test_tiny_range_is_what_the_plan_says() -> None:
    assert (str(TINY.subnet), TINY.gateway, TINY.hub_address) == \
        ("10.0.0.8/29", IP("10.0.0.9"), IP("10.0.0.14"))
    assert (TINY.first_workload, TINY.last_workload, TINY.workload_count) == \
        (IP("10.0.0.10"), IP("10.0.0.14"), 4)


def test_automatic_allocation_counts_down_and_never_gives_gateway_or_hub() -> None:
    book = AddressBook(TINY)
    given = [allocation.address for allocation in fill(book, 4)]
    assert given == [IP("10.0.0.13"), IP("10.0.0.12"), IP("10.0.0.11"), IP("10.0.0.10")]
    assert TINY.gateway not in given and TINY.hub_address not in given


def test_exhaustion_names_the_key_and_the_range() -> None:
    book = AddressBook(TINY)
    fill(book, 4)
    with pytest.raises(InputError) as err:
        book.choose("one-more", "vm")
    assert err.value.field_name == "key" and err.value.value == "one-more"
    assert "10.0.0.10..10.0.0.14" in str(err.value)


def test_seed_hub_address_in_the_middle_of_the_range_is_skipped() -> None:
    book = AddressBook(SEED, in_use=[])
    addresses = list(book.candidates())
    assert IP("10.1.0.254") not in addresses and IP("10.1.0.1") not in addresses
    assert addresses[0] == IP("10.1.255.254") and addresses[-1] == IP("10.1.0.2")
    assert len(addresses) == SEED.workload_count


def test_reuse_same_key_same_address_and_freed_address_is_handed_out_again() -> None:
    book = AddressBook(TINY)
    first = book.choose("task-a", "container")
    book.record(first)
    assert book.choose("task-a", "container") == first
    book.forget("task-a")
    assert book.choose("task-b", "vm").address == first.address


def test_key_recorded_for_another_owner_is_refused() -> None:
    book = AddressBook(TINY, {"x": Allocation("x", "vm", IP("10.0.0.13"))})
    with pytest.raises(InputError, match="owner kind vm"):
        book.choose("x", "container")


def test_live_use_on_the_bridge_is_skipped_but_a_workloads_own_address_is_not_in_use() -> None:
    in_use = [LiveUse(IP("10.0.0.13"), "a neighbour on kohaku-overlay"),
              LiveUse(IP("10.0.0.12"), "container kohakuriver-task-1", "task-1")]
    book = AddressBook(TINY, in_use=in_use)
    assert book.choose("task-1", "container", fixed="10.0.0.12").address == IP("10.0.0.12")
    assert book.choose("other", "container").address == IP("10.0.0.11")
    recorded = AddressBook(TINY, {"vm-1": Allocation("vm-1", "vm", IP("10.0.0.13"))}, in_use=in_use)
    assert recorded.choose("vm-1", "vm").address == IP("10.0.0.13")  # its own ARP entry


@pytest.mark.parametrize("fixed, reason", [
    ("10.0.0.9", "gateway"),
    ("10.0.0.14", "hub"),
    ("10.0.0.15", "outside"),
    ("10.9.0.5", "outside"),
    ("10.0.0.300", "not an IPv4 address"),
    ("10.0.0.13", "in use by a neighbour"),
    ("10.0.0.12", "allocated to vm vm-1"),
])
def test_fixed_address_validation_names_field_and_value(fixed: str, reason: str) -> None:
    book = AddressBook(TINY, {"vm-1": Allocation("vm-1", "vm", IP("10.0.0.12"))},
                       in_use=[LiveUse(IP("10.0.0.13"), "a neighbour on kohaku-overlay")])
    with pytest.raises(InputError, match=reason) as err:
        book.choose("task-9", "container", fixed=fixed, field_name="network.address")
    assert err.value.field_name == "network.address" and err.value.value == fixed


def test_reconcile_frees_only_what_is_certainly_gone() -> None:
    book = AddressBook(TINY, {
        "gone": Allocation("gone", "container", IP("10.0.0.13")),
        "here": Allocation("here", "container", IP("10.0.0.12")),
        "vm-unknown": Allocation("vm-unknown", "vm", IP("10.0.0.11")),
        "held": Allocation("held", "reservation", IP("10.0.0.10")),
    })
    leaks = book.leaks({"container": lambda key: key == "here", "vm": lambda key: None,
                        "reservation": lambda key: False})
    assert [allocation.key for allocation in leaks] == ["gone"]
    assert book.leaks({}) == []


def test_book_round_trip_and_corrupt_or_foreign_books_are_errors() -> None:
    book = AddressBook(TINY, {"a": Allocation("a", "vm", IP("10.0.0.13"))})
    again = AddressBook.parse(TINY, book.render(), "book")
    assert again.allocations == book.allocations and again.render() == book.render()
    with pytest.raises(InputError, match="not a netloom overlay address book"):
        AddressBook.parse(TINY, "{", "book")
    with pytest.raises(InputError, match="renumbered"):
        AddressBook.parse(SEED, book.render(), "book")


def test_addressing_from_bridge_matches_the_plan() -> None:
    assert addressing_from_bridge(ipaddress.IPv4Interface("10.1.0.1/16"), 1) == SEED
    with pytest.raises(InputError, match="not the gateway"):
        addressing_from_bridge(ipaddress.IPv4Interface("10.1.0.7/16"))


# ---- the book on disk, through a real AnsibleModule's atomic_move ----

@pytest.fixture
def module(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> basic.AnsibleModule:
    monkeypatch.setenv("NETLOOM_STATE_ROOT", str(tmp_path))
    monkeypatch.setattr(basic, "_ANSIBLE_ARGS", json.dumps({"ANSIBLE_MODULE_ARGS": {}}).encode())
    monkeypatch.setattr(basic, "_ANSIBLE_PROFILE", "legacy")
    return basic.AnsibleModule(argument_spec={})


def test_plan_writes_the_book_only_when_executed(module: basic.AnsibleModule, tmp_path: pathlib.Path) -> None:
    allocator = OverlayAllocator(module, TINY)
    plan = ChangePlan()
    with allocator.locked():
        address = allocator.reserve(plan, "task-1", "container")
    path = tmp_path / "var/lib/netloom/overlay-addresses.json"
    assert address == IP("10.0.0.13") and plan.summary() == ["create overlay address task-1"]
    assert not path.exists()  # check mode stops here: same answer, nothing written
    plan.execute()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    second = ChangePlan()
    with allocator.locked():
        assert allocator.reserve(second, "task-1", "container") == address
        assert allocator.reserve(second, "task-2", "vm") == IP("10.0.0.12")
        assert allocator.release(second, "task-1") == address
        assert allocator.release(second, "never") is None
    assert second.summary() == ["create overlay address task-2", "delete overlay address task-1"]
    second.execute()
    stored = json.loads(path.read_text())["allocations"]
    assert stored == {"task-2": {"owner": "vm", "address": "10.0.0.12"}}


def test_reconcile_without_docker_keeps_container_allocations(module: basic.AnsibleModule) -> None:
    allocator = OverlayAllocator(module, TINY)
    plan = ChangePlan()
    with allocator.locked():
        allocator.reserve(plan, "c1", "container")
        assert allocator.reconcile(plan) == []  # Docker not asked: not certain, nothing freed
        freed = allocator.reconcile(plan, {"container": lambda key: False})
    assert [allocation.key for allocation in freed] == ["c1"]


def test_a_lost_book_keeps_the_address_a_live_workload_holds() -> None:
    book = AddressBook(TINY, in_use=[LiveUse(IP("10.0.0.11"), "container kohakuriver-vps-a", "vps-a")])
    assert book.choose("vps-a", "container", prefer=IP("10.0.0.11")).address == IP("10.0.0.11")
    assert book.choose("other", "container", prefer=IP("10.0.0.11")).address == IP("10.0.0.13")
