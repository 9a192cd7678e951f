"""Interfaces in a firewalld zone (by default `trusted`), in the runtime AND the permanent plane.

firewalld keeps two configurations: runtime (what filters now) and permanent (what is
loaded at the next reload or boot). Changing only the runtime one is the fault the
reference systems had: the overlay stopped working after `firewall-cmd --reload`. Each
plane is read and corrected on its own, so drift in either one is repaired.

When firewalld is not installed, or `firewall-cmd --state` says it is not running (exit
code 252, firewalld's NOT_RUNNING), the plan is empty: on such hosts the iptables rules alone
decide, and there is nothing to keep in step. Any other failure of firewall-cmd is an error:
reading it as "not running" would silently leave the overlay outside the trusted zone.
Interfaces are added with --change-interface, which also moves an interface out of
another zone (where --add-interface would fail with ZONE_CONFLICT). firewall-cmd takes
--change-interface and --remove-interface repeatedly (argparse action "append", since
firewalld 0.9 at least), so each plane is changed by one call for all its interfaces.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable

from ansible.module_utils.netloom.common import ChangePlan, CommandError, InputError, ifname

_ZONE_RE = re.compile(r"^[A-Za-z0-9_-]{1,17}$")
_SBIN_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin")
PLANES = ("runtime", "permanent")
NOT_RUNNING = 252  # firewall-cmd's exit code when it cannot reach firewalld (firewall.errors)

Runner = Callable[..., str]


class FirewallCmdError(CommandError):
    """firewall-cmd exited non-zero; the exit code tells "not running" from real failures."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def run_firewall_cmd(argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    """Run firewall-cmd without a shell; a failure raises FirewallCmdError with the exit code."""
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise FirewallCmdError(f"{' '.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}", proc.returncode)
    return proc.stdout


def firewall_cmd() -> str | None:
    """Path of firewall-cmd, or None when firewalld is not installed."""
    return shutil.which("firewall-cmd") or shutil.which("firewall-cmd", path=os.pathsep.join(_SBIN_DIRS))


def is_running(tool: str, runner: Runner = run_firewall_cmd) -> bool:
    """`firewall-cmd --state` prints "running" (rc 0) or "not running" (rc 252); anything else fails."""
    try:
        output = runner([tool, "--state"])
    except FirewallCmdError as err:
        if err.returncode == NOT_RUNNING:
            return False
        raise CommandError(f"cannot tell whether firewalld runs: {err}") from None
    if output.strip() != "running":
        raise CommandError(f"cannot tell whether firewalld runs: {tool} --state printed {output.strip()!r}")
    return True


def plan_trusted_interfaces(interfaces: list[str], state: str = "present", zone: str = "trusted",
                            runner: Runner = run_firewall_cmd, tool: str | None = None) -> ChangePlan:
    """Plan the zone membership of `interfaces` in both planes; empty when firewalld is not running.

    present adds the missing interfaces, absent removes the listed ones that are in the zone;
    interfaces nobody listed are never touched. `runner` and `tool` exist so the planning can be
    unit-tested with a recorded firewall-cmd (firewalld cannot run in the test lab).
    """
    if state not in ("present", "absent"):
        raise InputError("state", state, "must be present or absent")
    if not isinstance(zone, str) or not _ZONE_RE.match(zone):
        raise InputError("zone", zone, "firewalld zone names are 1..17 characters of A-Z a-z 0-9 _ -")
    wanted = [ifname("interfaces", name) for name in interfaces]
    if len(set(wanted)) != len(wanted):
        raise InputError("interfaces", interfaces, "an interface is listed twice")

    plan = ChangePlan()
    tool = tool or firewall_cmd()
    if tool is None or not is_running(tool, runner):
        return plan
    for plane in PLANES:
        prefix = [tool, "--permanent"] if plane == "permanent" else [tool]
        current = runner([*prefix, f"--zone={zone}", "--list-interfaces"]).split()
        if state == "present":
            changes = [name for name in wanted if name not in current]
            after = current + changes
            option = "--change-interface"
        else:
            changes = [name for name in wanted if name in current]
            after = [name for name in current if name not in changes]
            option = "--remove-interface"
        if changes:
            argv = [*prefix, f"--zone={zone}", *(f"{option}={name}" for name in changes)]
            plan.add(f"firewalld {plane} zone {zone}", "update", sorted(current), sorted(after),
                     _applier(argv, runner))
    return plan


def _applier(argv: list[str], runner: Runner) -> Callable[[], None]:
    return lambda: runner(argv)
