"""Reboot survival, one mechanism for every module: record what was converged for netloom-restore.

A module whose kernel state nothing else brings back (links, addresses, routes, iptables
chains, sysctls) calls `plan_record` after planning its changes. That adds, to the same change
plan (so check mode, diff and `changed` show it), the steps that keep on the node:
- the module's arguments, as an entry under /var/lib/netloom/restore/entries (root only);
- the exact code that ran: the module's Ansible payload, normalised to a reproducible zip;
- the boot runner (restore.py) and two systemd units, `netloom-restore-early.service` (before
  Docker) and `netloom-restore-late.service` (after Docker and the named services), enabled.
  Their text comes from templates/systemd/netloom-restore-*.service.j2, rendered on the
  controller by the module's action plugin and passed in the option `rendered`
  (restore_early, restore_late); the module records it with its other arguments, so the boot
  replay (no controller) passes the same text again. What only the node knows is filled in
  here: PYTHON_SLOT (the interpreter running the module) and AFTER_SLOT (every unit any
  recorded entry waits for).
At boot the runner replays each entry through that code (see restore.py), so the boot path
is the module itself and cannot drift from it. `plan_forget` removes an entry (state=absent)
and, with the last entry, the runner, the units and the payloads.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import sys
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from ansible.module_utils.netloom import restore
from ansible.module_utils.netloom.common import ChangePlan, InputError
from ansible.module_utils.netloom.files import read_bytes, remove_file, write_file
from ansible.module_utils.netloom.systemd import booted, daemon_reload

UNIT_DIR = "etc/systemd/system"
# Entries and payloads are root's alone (0700 folders, 0600 files).
STATE_DIR_MODE = 0o700
RUNNER = "usr/lib/netloom/netloom-restore"
EARLY_UNIT = "netloom-restore-early.service"
LATE_UNIT = "netloom-restore-late.service"
WANTS_DIR = "multi-user.target.wants"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

# The unit texts' node-side slots (see the templates) and where the texts arrive.
PYTHON_SLOT = "@NETLOOM_PYTHON@"
AFTER_SLOT = "@NETLOOM_AFTER@"
RENDERED_OPTION = "rendered"
UNIT_TEMPLATE_KEYS = {EARLY_UNIT: "restore_early", LATE_UNIT: "restore_late"}


def persist_root() -> str:
    """Where the persistence lives: / on a node; tests point NETLOOM_PERSIST_ROOT at a scratch dir."""
    return os.environ.get("NETLOOM_PERSIST_ROOT") or "/"


def _path(*parts: str) -> str:
    return os.path.join(persist_root(), *parts)


def entry_name(module_name: str, key: str, order: int) -> str:
    """ORDER-MODULE@KEY.json: the runner replays entries in file-name order."""
    if not key or not set(key) <= _KEY_CHARS:
        raise InputError("restore key", key, "letters, digits and _.- only")
    return f"{order:02d}-{module_name}@{key}.json"


def _zip_bytes(files: Iterable[tuple[str, bytes]]) -> bytes:
    """A zip whose bytes depend only on the file names and contents (fixed dates, sorted)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in sorted(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _zip_holds(path: str, files: Iterable[tuple[str, bytes]]) -> bool:
    """Whether the zip at `path` is what _zip_bytes would write for `files`, read from its central
    directory (names, sizes, CRC-32, dates, modes, compression): a no-op run compresses nothing."""
    wanted = [(name, len(data), zlib.crc32(data), zipfile.ZIP_DEFLATED, ZIP_DATE, 0o644 << 16)
              for name, data in sorted(files)]
    try:
        with zipfile.ZipFile(path) as archive:
            stored = [(info.filename, info.file_size, info.CRC, info.compress_type, info.date_time,
                       info.external_attr) for info in archive.infolist()]
    except (OSError, zipfile.BadZipFile):
        return False
    return stored == wanted


def _payload_files(module_name: str) -> tuple[list[tuple[str, bytes]], str]:
    """The code of this run and the module's import name in it.

    Ansible's payload zip holds a library module as ansible/legacy/NAME.py; a module run from
    a checkout (the tests) gets the same tree built from disk, as ansible/modules/NAME.py.
    """
    basic = sys.modules["ansible.module_utils.basic"].__file__ or ""
    marker = ".zip" + os.sep
    if marker in basic:
        with zipfile.ZipFile(basic[:basic.index(marker) + 4]) as archive:
            # sitecustomize.py is AnsiballZ's per-run path shim, not module code.
            files = [(name, archive.read(name)) for name in archive.namelist()
                     if name != "sitecustomize.py" and not name.endswith("/")]
        for name, _ in files:
            parts = name[:-len(".py")].split("/")
            if parts[-1] == module_name and "module_utils" not in parts:
                return files, ".".join(parts)
        raise InputError("module", module_name, "its own code is not in the Ansible payload")
    import ansible.module_utils as module_utils  # only needed off the Ansible path

    files = [("ansible/__init__.py", b""), ("ansible/modules/__init__.py", b"")]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file:
        raise InputError("module", module_name, "cannot find the module's own code to record")
    with open(main_file, "rb") as handle:
        files.append((f"ansible/modules/{module_name}.py", handle.read()))
    seen: set[str] = set()
    for base in module_utils.__path__:
        for folder, dirs, names in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in names:
                if not name.endswith(".py"):
                    continue
                relative = os.path.relpath(os.path.join(folder, name), base)
                archived = f"ansible/module_utils/{relative}"
                if archived in seen:
                    continue
                seen.add(archived)
                with open(os.path.join(folder, name), "rb") as handle:
                    files.append((archived, handle.read()))
    return files, f"ansible.modules.{module_name}"


def _digest(data: bytes | None) -> str | None:
    return None if data is None else "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def _entries_dir() -> str:
    return _path(restore.STATE_DIR, "entries")


def _other_entries(skip: str) -> dict[str, dict[str, Any]]:
    """The recorded entries other than `skip` (file name -> content)."""
    found: dict[str, dict[str, Any]] = {}
    folder = _entries_dir()
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name == skip or not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                found[name] = json.load(handle)
        except (OSError, ValueError):
            continue  # a broken entry is replaced or removed by its own module's next run
    return found


def unit_templates(params: Mapping[str, Any]) -> dict[str, str]:
    """The two unit texts the action plugin rendered (unit name -> text with the node slots)."""
    rendered = params.get(RENDERED_OPTION) or {}
    texts = {unit: rendered.get(key) for unit, key in UNIT_TEMPLATE_KEYS.items()}
    missing = [key for unit, key in UNIT_TEMPLATE_KEYS.items() if not texts[unit]]
    if missing:
        raise InputError(f"{RENDERED_OPTION}.{missing[0]}", None,
                         "the netloom-restore unit is rendered on the controller by netloom's action "
                         "plugin of this module: add netloom's action_plugins directory to ansible.cfg")
    return {unit: str(text) for unit, text in texts.items()}


def _unit_texts(entries: Mapping[str, Mapping[str, Any]], templates: Mapping[str, str]) -> dict[str, str]:
    """Both units for the given entries; the late unit waits for every service an entry names."""
    after = {"netloom-restore-early.service", "docker.service", "network-online.target"}
    for entry in entries.values():
        after.update(entry.get("netloom_restore", {}).get("after", []))
    return {unit: text.replace(PYTHON_SLOT, sys.executable).replace(AFTER_SLOT, " ".join(sorted(after)))
            for unit, text in templates.items()}


def _plan_file(plan: ChangePlan, module: Any, key: str, path: str, wanted: bytes | None, mode: int = 0o644,
               shown: str = "text", dir_mode: int = 0o755) -> None:
    """One owned file to its wanted bytes (None: absent); diff shows text or a digest."""
    live = read_bytes(path)
    if live == wanted:
        return

    def view(data: bytes | None) -> Any:
        if data is None:
            return None
        return data.decode("utf-8", "replace") if shown == "text" else _digest(data)

    action = "create" if live is None else ("delete" if wanted is None else "update")
    run = ((lambda: remove_file(path)) if wanted is None
           else (lambda: write_file(module, path, wanted, mode, dir_mode=dir_mode)))
    plan.add(key, action, view(live), view(wanted), run)


def _plan_symlink(plan: ChangePlan, link: str, target: str | None) -> None:
    if os.path.islink(link):
        live: str | None = os.readlink(link)
    else:
        live = "(not a symlink)" if os.path.lexists(link) else None
    if live == target:
        return

    def apply() -> None:
        if os.path.lexists(link):
            os.unlink(link)
        if target is not None:
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(target, link)

    plan.add(f"restore unit link {os.path.relpath(link, persist_root())}",
             "delete" if target is None else "create", live, target, apply)


def _plan_units(plan: ChangePlan, module: Any, entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Runner and units for the entries that will exist; all removed when none is left."""
    steps_before = len(plan.steps)
    texts: Mapping[str, str | None]
    if entries:
        runner_source = inspect.getsource(restore).encode()
        _plan_file(plan, module, "restore runner", _path(RUNNER), b"#!/usr/bin/python3\n" + runner_source,
                   0o755)
        texts = _unit_texts(entries, unit_templates(module.params))
    else:
        _plan_file(plan, module, "restore runner", _path(RUNNER), None)
        texts = {EARLY_UNIT: None, LATE_UNIT: None}
    for unit, text in texts.items():
        unit_path = _path(UNIT_DIR, unit)
        _plan_file(plan, module, f"restore unit {unit}", unit_path, None if text is None else text.encode())
        _plan_symlink(plan, _path(UNIT_DIR, WANTS_DIR, unit), None if text is None else f"/{UNIT_DIR}/{unit}")
    if len(plan.steps) > steps_before and persist_root() == "/" and booted():
        plan.add("systemd daemon-reload", "update", None, None, daemon_reload)


def plan_record(plan: ChangePlan, module: Any, module_name: str, key: str, order: int,
                phases: Iterable[str], after: Iterable[str] = (),
                secret_options: Iterable[str] = (), params: Mapping[str, Any] | None = None) -> None:
    """Keep this run's arguments and code for netloom-restore (state=present).

    `order` sorts entries within a phase; `phases` are early and/or late; `after` names units
    the late phase must wait for (e.g. wg-quick@wg0.service). `params` are the arguments to
    replay (default: the module's own; they keep `rendered`, the unit texts). Options in
    `secret_options` are never written.
    """
    params = module.params if params is None else params
    unit_templates(module.params)  # refused before anything is planned when the plugin did not run
    name = entry_name(module_name, key, order)
    phases = sorted(set(phases))
    if not phases or not set(phases) <= set(restore.PHASES):
        raise InputError("restore phases", phases, f"one or more of {', '.join(restore.PHASES)}")
    skip = set(secret_options) | {"_ansible_check_mode", "_ansible_diff"}
    args = {option: value for option, value in sorted(params.items())
            if value is not None and option not in skip}
    files, import_name = _payload_files(module_name)
    entry = {"ANSIBLE_MODULE_ARGS": args,
             "netloom_restore": {"module": module_name, "import": import_name, "phases": phases,
                                 "after": sorted(set(after))}}
    entry_bytes = (json.dumps(entry, indent=2, sort_keys=True) + "\n").encode()
    payload_path = _path(restore.STATE_DIR, "payloads", f"{module_name}.zip")
    if not _zip_holds(payload_path, files):
        _plan_file(plan, module, f"restore payload {module_name}", payload_path, _zip_bytes(files),
                   mode=0o600, shown="digest", dir_mode=STATE_DIR_MODE)
    entry_path = os.path.join(_entries_dir(), name)
    live = read_bytes(entry_path)
    if live != entry_bytes:
        before = None
        if live is not None:
            try:
                before = json.loads(live).get("ANSIBLE_MODULE_ARGS")
            except ValueError:
                before = live.decode("utf-8", "replace")
        plan.add(f"restore entry {name}", "create" if live is None else "update", before, args,
                 lambda: write_file(module, entry_path, entry_bytes, 0o600, dir_mode=STATE_DIR_MODE))
    _plan_units(plan, module, {**_other_entries(name), name: entry})


def recorded_args(module_name: str, key: str, order: int) -> dict[str, Any] | None:
    """The arguments of this module's last recorded run for `key`, None when none is recorded.

    A module may read its own entry to know what it owned before this run (for example
    wireguard_routes' via_host routes after via_host was dropped).
    """
    live = read_bytes(os.path.join(_entries_dir(), entry_name(module_name, key, order)))
    try:
        args = json.loads(live).get("ANSIBLE_MODULE_ARGS") if live is not None else None
    except (ValueError, AttributeError):
        return None
    return args if isinstance(args, dict) else None


def plan_forget(plan: ChangePlan, module: Any, module_name: str, key: str, order: int) -> None:
    """Remove this module's entry (state=absent), and with the last entry everything else.

    The other entries' units are written again from this run's `rendered` unit texts.
    """
    name = entry_name(module_name, key, order)
    entry_path = os.path.join(_entries_dir(), name)
    live = read_bytes(entry_path)
    if live is not None:
        plan.add(f"restore entry {name}", "delete", live.decode("utf-8", "replace"), None,
                 lambda: remove_file(entry_path))
    others = _other_entries(name)
    if not any(entry.get("netloom_restore", {}).get("module") == module_name for entry in others.values()):
        _plan_file(plan, module, f"restore payload {module_name}",
                   _path(restore.STATE_DIR, "payloads", f"{module_name}.zip"), None, shown="digest")
    _plan_units(plan, module, others)


# The option every recording module has: the unit texts its action plugin rendered.
RESTORE_OPTION: dict[str, dict[str, Any]] = {
    RENDERED_OPTION: {"type": "dict",
                      "options": {"restore_early": {"type": "str"}, "restore_late": {"type": "str"}}},
}
