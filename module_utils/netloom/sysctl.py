"""Kernel parameters through /proc/sys: write only what differs, optionally persist as one file.

Keys use sysctl's dotted notation; as in sysctl.d(5), a "/" inside a component stands for a
literal "." (so `net.ipv4.conf.eth0/100.forwarding` is /proc/sys/net/ipv4/conf/eth0.100/forwarding).
Network keys are per network namespace: the process's own netns is the one configured.

The persist file (e.g. /etc/sysctl.d/90-netloom-dnat.conf) is owned as a whole: it holds
exactly the given values, is replaced atomically (files.write_file), and differs per caller; two callers must
not share one file or they will rewrite each other's content on every run.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from ansible.module_utils.netloom.common import ChangePlan, CommandError, InputError
from ansible.module_utils.netloom.files import write_file

PROC_SYS = "/proc/sys"
_COMPONENT_RE = re.compile(r"[A-Za-z0-9_@:+/-]+")  # fullmatch: `$` passes a trailing newline
PERSIST_HEADER = "# Managed by netloom: this whole file is rewritten; edit the inventory instead.\n"


def key_to_path(key: str, root: str = PROC_SYS) -> str:
    """Map a dotted key to its /proc/sys path; InputError for anything that could escape it."""
    parts = key.split(".") if isinstance(key, str) else []
    if len(parts) < 2 or not all(_COMPONENT_RE.fullmatch(part) for part in parts):
        raise InputError("sysctl key", key, "not a dotted sysctl name such as net.ipv4.ip_forward "
                         "(letters, digits and _@:+-/ between dots)")
    names = [part.replace("/", ".") for part in parts]
    if any(name in (".", "..") for name in names):
        raise InputError("sysctl key", key, "path traversal is not a sysctl name")
    return os.path.join(root, *names)


def normalise_value(value: object) -> str:
    """Collapse whitespace the way /proc/sys prints multi-field values (tabs become spaces)."""
    if isinstance(value, bool):
        value = int(value)
    text = str(value)
    if "\n" in text.strip() or "\r" in text:
        raise InputError("sysctl value", value, "must be a single line")
    return " ".join(text.split())


def render_persist_file(values: dict[str, str]) -> str:
    """The full persist-file content for the given (already normalised) values, sorted by key."""
    return PERSIST_HEADER + "".join(f"{key} = {values[key]}\n" for key in sorted(values))


def read_persist_file(path: str) -> dict[str, str]:
    """The values a persist file written by `plan_sysctls` holds ({} when there is none).

    Lets a caller find what it set on an earlier run (for example route_localnet on an
    interface it no longer lists) and undo exactly that.
    """
    values: dict[str, str] = {}
    for line in (_read_file(path) or "").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")) and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = " ".join(value.split())
    return values


def plan_persist_file_removal(path: str) -> ChangePlan:
    """Delete a persist file (state=absent); nothing to do when it is already gone."""
    plan = ChangePlan()
    existing = _read_file(path)
    if existing is not None:
        plan.add(f"file {path}", "delete", existing, None, _file_remover(path))
    return plan


def _file_remover(path: str) -> Callable[[], None]:
    def remove() -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise CommandError(f"cannot remove {path}: {err}") from None
    return remove


def plan_sysctls(values: dict[str, str], persist_file: str | None = None,
                 root: str = PROC_SYS, module: Any = None) -> ChangePlan:
    """Plan one write per differing key, plus the persist file when its content differs.

    The persist file is written with `module`'s atomic_move, so a persist_file needs the module.

    Every key is validated and must exist before anything is planned, so a typo fails the
    run instead of being silently persisted for the next boot.
    """
    desired: dict[str, str] = {}
    paths: dict[str, str] = {}
    for key, value in values.items():
        path = key_to_path(key, root)
        if not os.path.isfile(path):
            raise InputError("sysctl key", key, f"{path} does not exist here (wrong name, or the "
                             "interface is not created yet)")
        desired[key] = normalise_value(value)
        paths[key] = path
    if persist_file is not None:
        if not os.path.isabs(persist_file) or not persist_file.endswith(".conf"):
            raise InputError("persist_file", persist_file, "must be an absolute path ending in .conf")
        if not os.path.isdir(os.path.dirname(persist_file)):
            raise InputError("persist_file", persist_file, "its directory does not exist")
        if module is None:
            raise ValueError("plan_sysctls: a persist_file is written through the module (atomic_move)")

    plan = ChangePlan()
    for key, value in desired.items():
        current = _read(paths[key])
        if current != value:
            plan.add(f"sysctl {key}", "update", current, value, _writer(paths[key], value))
    if persist_file is not None:
        content = render_persist_file(desired)
        existing = _read_file(persist_file)
        if existing != content:
            plan.add(f"file {persist_file}", "update" if existing is not None else "create",
                     existing, content, lambda: write_file(module, persist_file, content))
    return plan


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return " ".join(handle.read().split())
    except OSError as err:
        raise CommandError(f"cannot read {path}: {err}") from None


def _read_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CommandError(f"cannot read {path}: {err}") from None


def _writer(path: str, value: str) -> Callable[[], None]:
    def write() -> None:
        try:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(value + "\n")
        except OSError as err:
            raise CommandError(f"cannot write {value!r} to {path}: {err}") from None
    return write
