"""KohakuRiver workloads (task and VPS containers) as plain data: validation, spec, status, decisions.

Both workload modules identify their containers by labels, never by name alone, and record a
hash of the desired spec in a label (as compose does), plus one short hash per spec field.
Recreation is decided from those labels and the spec of this run only: never from a diff
against Docker's normalised inspect output, whose defaults and spellings are what make
community.docker's docker_container "always changed". The two limits Docker changes on a
live container (cpus, memory) are left out of the hash and updated in place: their live
values are the exact integers netloom set (CpuQuota, Memory).
Nothing here talks to Docker, so every decision is unit tested.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import posixpath
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ansible.module_utils.netloom.allocator import ADDRESS_KEY_LABEL
from ansible.module_utils.netloom.common import InputError, known_fields
from ansible.module_utils.netloom.docker_network import MANAGED_LABEL, MANAGED_VALUE

KIND_LABEL = "netloom.workload.kind"
ID_LABEL = "netloom.workload.id"
HASH_LABEL = "netloom.spec.hash"
FIELDS_LABEL = "netloom.spec.fields"
SSH_KEY_LABEL = "netloom.vps.ssh-public-key"
RESTORED_LABEL = "netloom.vps.restored-from"
SNAPSHOT_OF_LABEL = "netloom.snapshot.of"
SNAPSHOT_IMAGE_LABEL = "netloom.snapshot.base-image"
SNAPSHOT_TIME_LABEL = "netloom.snapshot.created"
NAME_PREFIX = {"task": "kohakuriver-task-", "vps": "kohakuriver-vps-"}
# Mount points of the seed's three directories inside a workload container.
SHARED_TARGET = "/shared"
LOGS_TARGET = "/kohakuriver/logs"
TEMP_TARGET = "/local_temp"
CPU_PERIOD = 100000  # microseconds: --cpus=N is quota N*period, settable again by `docker update`
MAX_CPUS = 4096
MIN_MEMORY = 6 * 1024 * 1024  # Docker refuses less than 6 MiB
EXIT_KILLED = 137  # 128 + SIGKILL

# A workload id forms the container name and the snapshot repository, which Docker wants in
# lower case: [a-z0-9] runs joined by single . _ or -.
_ID_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
ID_MAX = 63
_MEMORY_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# An image reference as Docker's reference grammar spells it (name[:tag][@digest]), no spaces.
_IMAGE_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?::[0-9]+)?"
                       r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                       r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")
_GPU_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:.-]{0,127}")
SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                 "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")


# ---- validators ----

def workload_id(field_name: str, value: Any) -> str:
    text = value if isinstance(value, str) else str(value) if isinstance(value, int) else ""
    if isinstance(value, bool) or len(text) > ID_MAX or not _ID_RE.fullmatch(text):
        raise InputError(field_name, value, f"cannot form a container name: 1..{ID_MAX} of a-z 0-9 "
                                            "joined by single . _ or - (no upper case, spaces or /)")
    return text


def container_name(kind: str, ident: str) -> str:
    return NAME_PREFIX[kind] + ident


def image_ref(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not _IMAGE_RE.fullmatch(value):
        raise InputError(field_name, value, "not a Docker image reference (name[:tag][@sha256:digest])")
    return value


def parse_memory(field_name: str, value: Any) -> int | None:
    """Bytes from 512m, 1g, 1.5GiB, 268435456 (Docker's binary units); None when not given."""
    if value is None or value == "":
        return None
    match = None if isinstance(value, bool) else _MEMORY_RE.fullmatch(str(value).strip())
    if not match:
        raise InputError(field_name, value, "not a memory size: a number with an optional unit "
                                            "b, k, m, g, t (binary, e.g. 512m, 2g, 1.5GiB)")
    number, unit, suffix = match.groups()
    if suffix.lower() == "i":
        raise InputError(field_name, value, "not a memory size: write KiB/MiB/GiB or k/m/g")
    size = int(float(number) * _UNITS[unit.lower()])
    if size < MIN_MEMORY:
        raise InputError(field_name, value, f"{size} bytes is below Docker's minimum of 6 MiB")
    return size


def parse_cpus(field_name: str, value: Any) -> float | None:
    """CPUs as `docker run --cpus` takes them (0.5, 2); None when not given."""
    if value is None or value == "":
        return None
    try:
        cpus = float(str(value).strip())
    except ValueError:
        raise InputError(field_name, value, "not a number of CPUs (e.g. 0.5, 2)") from None
    if isinstance(value, bool) or not 0.01 <= cpus <= MAX_CPUS:
        raise InputError(field_name, value, f"CPUs must be between 0.01 and {MAX_CPUS}")
    return round(cpus, 3)


def cpu_quota(cpus: float | None) -> int:
    """CpuQuota for CPU_PERIOD; 0 means unlimited (what `docker update --cpu-quota 0` clears to)."""
    return 0 if cpus is None else round(cpus * CPU_PERIOD)


def environment(field_name: str, value: Any) -> dict[str, str]:
    if value in (None, ""):
        return {}
    if not isinstance(value, Mapping):
        raise InputError(field_name, value, "a dict of NAME: value")
    env = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            raise InputError(f"{field_name}.{name}", name, "not an environment variable name")
        if item is None or isinstance(item, (dict, list)):
            raise InputError(f"{field_name}.{name}", item, "a value must be a string or number")
        env[name] = "true" if item is True else "false" if item is False else str(item)
    return env


def command(field_name: str, value: Any) -> list[str] | None:
    """An argv list (no shell: nothing is ever spliced into a shell string)."""
    if value in (None, []):
        return None
    plain = (str, int, float)
    if not isinstance(value, list) or not all(isinstance(item, plain) and not isinstance(item, bool)
                                              for item in value):
        raise InputError(field_name, value, "a list of arguments (argv), e.g. [python3, train.py]")
    return [str(item) for item in value]


def absolute_path(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or ":" in value:
        raise InputError(field_name, value, "an absolute path without ':' is required")
    return posixpath.normpath(value)


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False

    def bind(self) -> str:
        return f"{self.source}:{self.target}:{'ro' if self.read_only else 'rw'}"

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "read_only": self.read_only}


def mounts(field_name: str, value: Any, seeded: Sequence[Mount] = ()) -> list[Mount]:
    """The seed's mounts then the extra ones; each target once."""
    found = list(seeded)
    for position, entry in enumerate(value or []):
        where = f"{field_name}[{position}]"
        known_fields(where, entry, ("source", "target", "read_only"),
                     "a mount is a dict with source, target, read_only", "mount")
        read_only = entry.get("read_only", False)
        if not isinstance(read_only, bool):
            raise InputError(f"{where}.read_only", read_only, "true or false")
        found.append(Mount(absolute_path(f"{where}.source", entry.get("source")),
                           absolute_path(f"{where}.target", entry.get("target")), read_only))
    targets: dict[str, int] = {}
    for position, mount in enumerate(found):
        if mount.target in targets:
            raise InputError(f"{field_name}[{position - len(seeded)}].target", mount.target,
                             "is mounted twice (the seed mounts /shared, the logs and the local temp)")
        targets[mount.target] = position
    return found


def gpus(field_name: str, value: Any) -> list[str]:
    """GPU device ids, or ["all"]; [] is none."""
    if value in (None, "", []):
        return []
    if not isinstance(value, list) or not all(isinstance(item, (str, int)) for item in value):
        raise InputError(field_name, value, "a list of GPU device ids (e.g. [0, 1]) or [all]")
    ids = [str(item) for item in value]
    if "all" in ids and len(ids) > 1:
        raise InputError(field_name, value, "all stands alone")
    for item in ids:
        if not _GPU_ID_RE.fullmatch(item):
            raise InputError(field_name, item, "not a GPU device id")
    return ids


def device_requests(ids: list[str]) -> list[dict[str, Any]]:
    """The Engine API's DeviceRequests for `--gpus`."""
    if not ids:
        return []
    request: dict[str, Any] = {"Driver": "", "Capabilities": [["gpu"]]}
    if ids == ["all"]:
        request["Count"] = -1
    else:
        request["DeviceIDs"] = ids
    return [request]


def ssh_public_key(field_name: str, value: Any) -> str:
    """One OpenSSH public key line, checked by decoding its blob; returns `type base64 [comment]`."""
    text = value.strip() if isinstance(value, str) else ""
    parts = text.split(None, 2)
    if "\n" in text or len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise InputError(field_name, value,
                         f"not an OpenSSH public key line ({', '.join(SSH_KEY_TYPES[:3])}, ...)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        embedded = blob[4:4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise InputError(field_name, value, "the key's base64 blob does not decode") from None
    if embedded != parts[0] or len(blob) < 4 + length + 16:
        raise InputError(field_name, value, f"the key blob is not a {parts[0]} key")
    return " ".join(parts)


# ---- spec and decisions ----

def spec_hash(spec: Mapping[str, Any]) -> str:
    """sha256 of the spec's canonical JSON: key order and spelling do not matter."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def field_hashes(spec: Mapping[str, Any]) -> dict[str, str]:
    return {name: spec_hash({name: value})[:16] for name, value in sorted(spec.items())}


def spec_labels(kind: str, ident: str, spec: Mapping[str, Any], address_key: str | None) -> dict[str, str]:
    labels = {MANAGED_LABEL: MANAGED_VALUE, KIND_LABEL: kind, ID_LABEL: ident, HASH_LABEL: spec_hash(spec),
              FIELDS_LABEL: json.dumps(field_hashes(spec), sort_keys=True, separators=(",", ":"))}
    if address_key:
        labels[ADDRESS_KEY_LABEL] = address_key
    return labels


@dataclass(frozen=True)
class Decision:
    """keep | recreate (`reason` says why); limits that differ are updated in place either way."""

    action: str
    reason: str | None = None


def decide(labels: Mapping[str, str], spec: Mapping[str, Any]) -> Decision:
    """Compare this run's spec (everything but the limits) with the one recorded in the labels."""
    if labels.get(HASH_LABEL) == spec_hash(spec):
        return Decision("keep")
    try:
        recorded = json.loads(labels.get(FIELDS_LABEL, ""))
        if not isinstance(recorded, dict):
            raise TypeError
    except (TypeError, ValueError):
        return Decision("recreate", "the container carries no readable spec labels")
    wanted = field_hashes(spec)
    changed = sorted(name for name in set(wanted) | set(recorded) if wanted.get(name) != recorded.get(name))
    if not changed:  # same fields, other hash: a label edited by hand
        return Decision("recreate", "the recorded spec hash does not match its fields")
    return Decision("recreate", f"spec changed: {', '.join(changed)}")


def limit_updates(host_config: Mapping[str, Any], cpus: float | None, memory: int | None) -> dict[str, Any]:
    """The limits to set with `docker update`: CpuQuota and Memory are integers netloom itself set
    (no daemon default or spelling to normalise), so they are compared as written. Returns
    update_container keyword arguments, empty when both hold."""
    quota, limit = cpu_quota(cpus), memory or 0
    if int(host_config.get("CpuQuota") or 0) == quota and int(host_config.get("Memory") or 0) == limit:
        return {}
    # memswap = memory: no swap beyond the limit (an OOM is an OOM); -1 lifts both.
    return {"cpu_period": CPU_PERIOD, "cpu_quota": quota,
            "mem_limit": limit or -1, "memswap_limit": limit or -1}


def exit_status(exit_code: int, oom_killed: bool) -> str:
    """The seed's mapping: 0 completed; 137 killed, or oom when Docker says OOMKilled; else failed."""
    if exit_code == 0:
        return "completed"
    if exit_code == EXIT_KILLED:
        return "oom" if oom_killed else "killed"
    return "failed"


def oom_in_kernel_log(records: Sequence[bytes], container_id: str) -> bool:
    """Whether the kernel log holds a memory-cgroup OOM kill in this container's cgroup.

    Docker 20.10 with cgroup v1 does not always set State.OOMKilled (containerd misses the
    event; seen on these machines while memory.oom_control counted the kill), but the kernel
    logs every memcg kill as `oom-kill:...,oom_memcg=/docker/<full id>,...`."""
    marker = b"oom_memcg="
    full_id = container_id.encode()
    return any(b"oom-kill:" in record and marker in record and full_id in record.split(marker, 1)[1]
               for record in records)


def container_status(state: Mapping[str, Any], kernel_oom: bool = False) -> str:
    """created | running | paused | restarting | completed | killed | oom | failed, from State
    (kernel_oom: the kernel log shows an OOM kill in the container's cgroup)."""
    status = state.get("Status", "")
    if state.get("Paused") or status == "paused":
        return "paused"
    if state.get("Restarting") or status == "restarting":
        return "restarting"
    if state.get("Running") or status == "running":
        return "running"
    if status == "created":
        return "created"
    return exit_status(int(state.get("ExitCode", 0)), bool(state.get("OOMKilled")) or kernel_oom)


def tail(text: str, lines: int) -> str:
    """The last `lines` lines of a log."""
    if lines <= 0:
        return ""
    kept = text.splitlines(keepends=True)[-lines:]
    return "".join(kept)
