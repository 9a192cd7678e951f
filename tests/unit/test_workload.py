"""Workload spec logic: exit-code mapping, memory/cpus parsing, spec hashing and the recreate decision."""
from __future__ import annotations

import base64
import struct

import pytest
from ansible.module_utils.netloom.common import InputError
from ansible.module_utils.netloom.workload import (
    FIELDS_LABEL,
    HASH_LABEL,
    container_status,
    decide,
    exit_status,
    field_hashes,
    limit_updates,
    mounts,
    oom_in_kernel_log,
    parse_cpus,
    parse_memory,
    spec_hash,
    spec_labels,
    ssh_public_key,
    tail,
    workload_id,
)

MIB = 1024 * 1024


@pytest.mark.parametrize("code, oom, status", [
    (0, False, "completed"), (0, True, "completed"), (137, False, "killed"), (137, True, "oom"),
    (1, False, "failed"), (3, True, "failed"), (143, False, "failed"), (255, False, "failed"),
])
def test_exit_code_mapping(code: int, oom: bool, status: str) -> None:
    assert exit_status(code, oom) == status


def test_container_status_from_state() -> None:
    assert container_status({"Status": "running", "Running": True}) == "running"
    assert container_status({"Status": "paused", "Running": True, "Paused": True}) == "paused"
    assert container_status({"Status": "created"}) == "created"
    assert container_status({"Status": "exited", "ExitCode": 137, "OOMKilled": True}) == "oom"
    assert container_status({"Status": "exited", "ExitCode": 137}, kernel_oom=True) == "oom"
    assert container_status({"Status": "exited", "ExitCode": 137}) == "killed"


def test_oom_evidence_is_this_containers_memcg_only() -> None:
    ours, other = "a" * 64, "b" * 64
    record = (f"6,1,2,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={ours},"
              f"mems_allowed=0,oom_memcg=/docker/{ours},task_memcg=/docker/{ours},task=tail").encode()
    assert oom_in_kernel_log([b"6,1,1,-;unrelated", record], ours)
    assert not oom_in_kernel_log([record], other)
    assert not oom_in_kernel_log([f"6,1,1,-;started {ours}".encode()], ours)


@pytest.mark.parametrize("value, size", [
    ("512m", 512 * MIB), ("512M", 512 * MIB), ("1g", 1024 * MIB), ("1.5GiB", 1536 * MIB), ("64MB", 64 * MIB),
    ("7340032", 7 * MIB), (7340032, 7 * MIB), ("8192k", 8 * MIB), (" 16m ", 16 * MIB),
    (None, None), ("", None),
])
def test_memory_parsing(value: object, size: int | None) -> None:
    assert parse_memory("memory", value) == size


@pytest.mark.parametrize("value", ["lots", "12x", "-5m", "1 2m", "5m", "1024", "1.5Gi", True, "m"])
def test_bad_memory_names_the_field(value: object) -> None:
    with pytest.raises(InputError) as err:
        parse_memory("memory", value)
    assert err.value.field_name == "memory" and err.value.value == value


@pytest.mark.parametrize("value, cpus", [("0.5", 0.5), (2, 2.0), (1.25, 1.25), ("0.01", 0.01), (None, None)])
def test_cpus_parsing(value: object, cpus: float | None) -> None:
    assert parse_cpus("cpus", value) == cpus


@pytest.mark.parametrize("value", ["two", 0, "0.001", -1, 5000, True, "nan"])
def test_bad_cpus_names_the_field(value: object) -> None:
    with pytest.raises(InputError) as err:
        parse_cpus("cpus", value)
    assert err.value.field_name == "cpus"


def test_spec_hash_ignores_key_order_and_sees_every_value() -> None:
    spec = {"image": "a:1", "command": ["x", "y"], "env": {"A": "1", "B": "2"}}
    reordered = {"env": {"B": "2", "A": "1"}, "command": ["x", "y"], "image": "a:1"}
    assert spec_hash(spec) == spec_hash(reordered)
    assert spec_hash(spec) != spec_hash({**spec, "command": ["y", "x"]})
    assert spec_hash(spec) != spec_hash({**spec, "env": {"A": "1", "B": "3"}})
    assert set(field_hashes(spec)) == {"image", "command", "env"}


def test_decide_keep_recreate_with_reason() -> None:
    spec = {"image": "a:1", "command": ["x"], "ssh": None}
    labels = spec_labels("task", "t1", spec, "task-t1")
    assert decide(labels, spec).action == "keep"
    changed = decide(labels, {**spec, "image": "a:2", "command": ["y"]})
    assert (changed.action, changed.reason) == ("recreate", "spec changed: command, image")
    added = decide(labels, {**spec, "gpus": ["0"]})
    assert added.reason == "spec changed: gpus"
    assert decide({}, spec).reason == "the container carries no readable spec labels"
    forged = {**labels, HASH_LABEL: "0" * 64}
    assert decide(forged, spec).reason == "the recorded spec hash does not match its fields"
    assert decide({**labels, FIELDS_LABEL: "[]"}, {**spec, "image": "b"}).action == "recreate"


def test_limits_are_updated_in_place_only_when_they_differ() -> None:
    live = {"CpuQuota": 50000, "Memory": 64 * MIB}
    assert limit_updates(live, 0.5, 64 * MIB) == {}
    assert limit_updates(live, 1, 64 * MIB) == {"cpu_period": 100000, "cpu_quota": 100000,
                                               "mem_limit": 64 * MIB, "memswap_limit": 64 * MIB}
    assert limit_updates({"CpuQuota": 0, "Memory": 0}, None, None) == {}
    assert limit_updates(live, None, None)["mem_limit"] == -1


@pytest.mark.parametrize("value", ["1234", "train-7", "a.b_c-d", "x" * 63, 42])
def test_workload_ids(value: object) -> None:
    assert workload_id("id", value) == str(value)


@pytest.mark.parametrize("value", ["", "Bad", "a b", "a/b", "-a", "a-", "a..b", "x" * 64, None, True, "a\n"])
def test_bad_workload_ids_cannot_form_a_name(value: object) -> None:
    with pytest.raises(InputError) as err:
        workload_id("id", value)
    assert err.value.field_name == "id"


def key_line(kind: str, body: bytes = b"\x01" * 32) -> str:
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", len(body)) + body
    return f"{kind} {base64.b64encode(blob).decode()} someone@example"


def test_ssh_public_keys() -> None:
    line = key_line("ssh-ed25519")
    assert ssh_public_key("ssh_public_key", "  " + line + "\n") == line
    for bad in ("ssh-ed25519 AAAA", key_line("ssh-rsa").replace("ssh-rsa", "ssh-ed25519", 1),
                "ssh-ed25519 !!!", line + "\n" + line, "hello", key_line("ssh-dss"), None):
        with pytest.raises(InputError) as err:
            ssh_public_key("ssh_public_key", bad)
        assert err.value.field_name == "ssh_public_key"


def test_mounts_extra_and_seeded_targets_unique() -> None:
    seeded = mounts("mounts", [], [])
    assert seeded == []
    extra = mounts("mounts", [{"source": "/data/", "target": "/data", "read_only": True}])
    assert extra[0].bind() == "/data:/data:ro"
    with pytest.raises(InputError) as err:
        mounts("mounts", [{"source": "/a", "target": "/x"}, {"source": "/b", "target": "/x"}])
    assert err.value.field_name == "mounts[1].target"
    with pytest.raises(InputError, match="unknown mount field"):
        mounts("mounts", [{"source": "/a", "target": "/x", "mode": "rw"}])


def test_tail_keeps_the_last_lines() -> None:
    assert tail("a\nb\nc\n", 2) == "b\nc\n"
    assert tail("a\nb", 5) == "a\nb"
    assert tail("a\n", 0) == ""


def test_diff_shows_env_names_with_masked_values() -> None:
    from ansible.module_utils.netloom.workload_docker import ENV_MASK, masked_spec

    spec = {"image": "busybox", "env": {"TOKEN": "s3cr3t", "MODE": "1"}, "command": None}
    shown = masked_spec(spec)
    assert shown["env"] == {"TOKEN": ENV_MASK, "MODE": ENV_MASK} and ENV_MASK == "********"
    assert spec["env"]["TOKEN"] == "s3cr3t" and shown["image"] == "busybox"  # the hashed spec is kept
    assert masked_spec({"env": {}}) == {"env": {}}
