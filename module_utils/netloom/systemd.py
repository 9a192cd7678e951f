"""The one systemd helper: whether systemd runs this node, and the systemctl calls netloom makes.

Modules plan with `Unit.is_active`/`is_enabled` and put `Unit.action(verb)` into their change
plan, so the calls run only in a real run and in plan order.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable

from ansible.module_utils.netloom.common import InputError, run_command

UNIT_DIR = "/etc/systemd/system"
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.@-]+")  # fullmatch: `$` would pass a trailing newline


def booted() -> bool:
    """Whether systemd is PID 1 here (a throwaway netns on a test machine is not)."""
    return os.path.isdir("/run/systemd/system")


def daemon_reload() -> None:
    run_command(["systemctl", "daemon-reload"])


def unit_name(field_name: str, value: str, suffix: str = ".service") -> str:
    """A unit name with its suffix (`haproxy` -> `haproxy.service`); errors name the field."""
    text = "" if value is None else str(value)
    base = text[: -len(suffix)] if text.endswith(suffix) else text
    if not base or not _UNIT_RE.fullmatch(base):
        raise InputError(field_name, value, "not a systemd unit name")
    return base + suffix


class Unit:
    """One systemd unit, by its full name (e.g. `wg-quick@wg0.service`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def dropin_path(self, file_name: str, unit_dir: str = UNIT_DIR) -> str:
        return os.path.join(unit_dir, f"{self.name}.d", file_name)

    def is_active(self) -> bool:
        state = run_command(["systemctl", "is-active", self.name], check=False).strip()
        return state in ("active", "reloading")

    def is_enabled(self) -> bool:
        return run_command(["systemctl", "is-enabled", self.name], check=False).strip() == "enabled"

    def action(self, verb: str, *flags: str) -> Callable[[], None]:
        """`systemctl VERB [FLAGS] UNIT` as a plan step body (e.g. ("disable", "--now"))."""
        return lambda: run_command(["systemctl", verb, *flags, self.name])
