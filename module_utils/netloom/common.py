"""Shared core of every netloom module: input errors, the change plan, the run loop.

Every module follows one shape: validate all input (raising InputError), read live
state once, compute a ChangePlan of ordered steps (each with before/after and the
callable that performs it), then either report the plan (check mode) or execute it.
Because check mode, diff mode, `changed` and the real run all come from the same
plan, they cannot disagree.
"""
from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ansible.module_utils.netloom.constants import NO_HOST_NETWORKS

IFNAME_MAX = 15
# What the kernel and every tool netloom feeds a name to accept: no ":" (the kernel refuses
# it), no "/", no white space or control characters. Matched with fullmatch, never `$`.
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


class InputError(ValueError):
    """Bad input, reported with the offending field and value before anything changes."""

    def __init__(self, field_name: str, value: Any, reason: str) -> None:
        super().__init__(f"{field_name}={value!r}: {reason}")
        self.field_name = field_name
        self.value = value


class CommandError(RuntimeError):
    """A system command failed; carries its output so the operator sees why."""


@dataclass
class Step:
    """One change: a key naming the object, its state before and after, how to do it."""

    key: str
    action: str  # create | update | delete
    before: Any
    after: Any
    run: Callable[[], None] | None = None


class PlanFailure(RuntimeError):
    """A step failed while the plan ran; the steps before it were done and stay done."""

    def __init__(self, step: Step, done: list[Step], cause: BaseException) -> None:
        super().__init__(f"{step.action} {step.key} failed: {cause}")
        self.step = step
        self.done = done


@dataclass
class ChangePlan:
    """Ordered steps; the single source for `changed`, diff and execution."""

    steps: list[Step] = field(default_factory=list)

    def add(self, key: str, action: str, before: Any, after: Any,
            run: Callable[[], None] | None = None) -> None:
        self.steps.append(Step(key, action, before, after, run))

    def extend(self, other: ChangePlan) -> None:
        self.steps.extend(other.steps)

    @property
    def changed(self) -> bool:
        return bool(self.steps)

    def execute(self) -> None:
        """Run the steps in order; the first failure raises PlanFailure naming what was done."""
        done: list[Step] = []
        for step in self.steps:
            try:
                if step.run is not None:
                    step.run()
            except Exception as err:  # any failure ends the run and is reported
                raise PlanFailure(step, done, err) from err
            done.append(step)

    def summary(self) -> list[str]:
        return [f"{step.action} {step.key}" for step in self.steps]

    def diff(self) -> dict[str, dict[str, Any]]:
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        for step in self.steps:
            if step.before is not None:
                before[step.key] = step.before
            if step.after is not None:
                after[step.key] = step.after
        return {"before": before, "after": after}


def run_command(argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    """Run a command without a shell (no quoting bugs); raise CommandError with its stderr."""
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def command_succeeds(argv: list[str]) -> bool:
    """Whether a probing command exits 0 (a missing program counts as no)."""
    try:
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        return False


def finish(module: Any, plan: ChangePlan, describe: Callable[[], dict[str, Any]] | None = None,
           **result: Any) -> None:
    """Execute the plan unless in check mode and exit with changed, diff and the steps.

    describe: called after the plan ran (or would have, in check mode) for results only the
    changed node can tell, such as the id of a container the plan created.

    A step that fails ends the run with fail_json that still says what was changed: `changed`
    is true when any step before it was done, `changes` lists those steps and `failed_step`
    names the one that failed, so an operator knows what the node now holds.
    """
    if not module.check_mode:
        try:
            plan.execute()
        except PlanFailure as err:
            module.fail_json(msg=str(err), changed=bool(err.done),
                             changes=[f"{step.action} {step.key}" for step in err.done],
                             failed_step=f"{err.step.action} {err.step.key}",
                             planned=plan.summary())
    payload: dict[str, Any] = {"changed": plan.changed, "changes": plan.summary()}
    if module._diff:  # pylint: disable=protected-access
        payload["diff"] = plan.diff()
    payload.update(result)
    if describe is not None:
        payload.update(describe())
    module.exit_json(**payload)


def guarded(module: Any, body: Callable[[], None]) -> None:
    """Run a module body; turn InputError/CommandError into fail_json with a clear message."""
    try:
        body()
    except InputError as err:
        module.fail_json(msg=str(err), field=err.field_name, value=str(err.value))
    except CommandError as err:
        module.fail_json(msg=str(err))


# ---- validators: each returns the normalised value or raises InputError ----

def ipv4_address(field_name: str, value: Any) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value).strip())
    except ValueError:
        raise InputError(field_name, value, "not an IPv4 address") from None


def not_a_host_reason(address: ipaddress.IPv4Address) -> str | None:
    """Why an address cannot be a unicast host (None when it can)."""
    for network, what in NO_HOST_NETWORKS:
        if address in network:
            return f"in {network} ({what})"
    return None


def unicast_host(field_name: str, value: Any) -> ipaddress.IPv4Address:
    """An IPv4 address a real host can hold: an underlay address, a VXLAN remote, a peer."""
    address = ipv4_address(field_name, value)
    reason = not_a_host_reason(address)
    if reason:
        raise InputError(field_name, value, f"cannot be a unicast host address: it is {reason}")
    return address


def ipv4_network(field_name: str, value: Any, strict: bool = True) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(str(value).strip(), strict=strict)
    except ValueError as err:
        raise InputError(field_name, value, f"not an IPv4 CIDR ({err})") from None


def ipv4_interface(field_name: str, value: Any) -> ipaddress.IPv4Interface:
    text = str(value).strip()
    if "/" not in text:
        raise InputError(field_name, value, "needs a prefix length, e.g. 10.0.0.1/8")
    try:
        return ipaddress.IPv4Interface(text)
    except ValueError as err:
        raise InputError(field_name, value, f"not an IPv4 address/prefix ({err})") from None


def ifname(field_name: str, value: Any) -> str:
    text = str(value)
    if not text or len(text) > IFNAME_MAX:
        raise InputError(field_name, value, f"interface names are 1..{IFNAME_MAX} characters")
    if not _IFNAME_RE.fullmatch(text) or text in (".", ".."):
        raise InputError(field_name, value, "interface names allow letters, digits and _.- only")
    return text


def int_range(field_name: str, value: Any, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(field_name, value, "not an integer") from None
    if isinstance(value, bool) or not low <= number <= high:
        raise InputError(field_name, value, f"must be between {low} and {high}")
    return number


def port(field_name: str, value: Any) -> int:
    return int_range(field_name, value, 1, 65535)


def vni(field_name: str, value: Any) -> int:
    return int_range(field_name, value, 1, 16777215)
