"""The systemd seam: whether systemd runs this node, and the calls netloom makes to it."""
from __future__ import annotations

import os

from ansible.module_utils.netloom.common import run_command


def booted() -> bool:
    """Whether systemd is PID 1 here (a throwaway netns on a test machine is not)."""
    return os.path.isdir("/run/systemd/system")


def daemon_reload() -> None:
    run_command(["systemctl", "daemon-reload"])
