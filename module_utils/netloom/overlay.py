"""What the two KohakuRiver overlay modules (overlay_hub, overlay_runner) share.

Both take the same address-plan, VXLAN and firewalld options, run the same way (validate,
one netlink dump, plan present or absent, `finish`) and start the same way (a clear
failure without pyroute2, then one netlink session for the whole run).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import ChangePlan, InputError, finish, guarded
from ansible.module_utils.netloom.netlink import Netlink, Snapshot, missing_pyroute2
from ansible.module_utils.netloom.persist import plan_forget, plan_record

# Argument specs of the options both modules take, documented alike in each module.
OVERLAY_OPTIONS: dict[str, dict[str, Any]] = {
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "plan": {"type": "raw"},
    "vni_base": {"type": "int", "default": 100},
    "port": {"type": "int", "default": 4789},
    "underlay_ip": {"type": "str"},
    "mtu": {"type": "int"},
    "firewalld": {"type": "str", "choices": ["auto", "never"], "default": "auto"},
}


def overlay_options(*names: str) -> dict[str, dict[str, Any]]:
    """The shared options' specs in the order named.

    The order is the module's: Ansible checks options in argument_spec order and reports the
    first bad one, so each module keeps its own order.
    """
    return {name: OVERLAY_OPTIONS[name] for name in names}


@dataclass(frozen=True)
class RecordedRun:
    """The part of a module run that plan_record keeps: the arguments the boot replay uses."""

    params: dict[str, Any]


class OverlayManager(ABC):
    """Validate, read links/addresses (and routes) once, plan every change, let `finish` run it."""

    # Whether planning needs the IPv4 route table in the snapshot (one more dump).
    dump_routes = False
    # The module's name and its place in the early boot replay (netloom-restore).
    module_name = ""
    restore_order = 0

    def __init__(self, module: AnsibleModule, nl: Netlink) -> None:
        self.module = module
        self.params = module.params
        self.nl = nl
        self.plan = ChangePlan()

    @abstractmethod
    def validate(self) -> None:
        """Everything that needs no live state, checked before anything is read."""

    @abstractmethod
    def plan_present(self, snapshot: Snapshot) -> dict[str, Any]:
        """Plan the converged state; returns the results only state=present reports."""

    @abstractmethod
    def plan_absent(self, snapshot: Snapshot) -> None:
        """Plan the removal of what the module owns."""

    @abstractmethod
    def always_returned(self) -> dict[str, Any]:
        """Results reported with either state."""

    def restore_params(self) -> dict[str, Any]:
        """The arguments netloom-restore replays at boot: by default this run's own."""
        return self.params

    def require_for_present(self, *names: str) -> None:
        """Options that state=absent may leave out and state=present needs."""
        for name in names:
            if self.params[name] in (None, ""):
                raise InputError(name, self.params[name], "is required with state=present")

    def run(self) -> None:
        self.validate()
        snapshot = self.nl.dump(routes=self.dump_routes)
        if self.params["state"] == "absent":
            self.plan_absent(snapshot)
            plan_forget(self.plan, self.module_name, "main", self.restore_order)
            finish(self.module, self.plan, **self.always_returned())
            return
        result = self.plan_present(snapshot)
        plan_record(self.plan, RecordedRun(self.restore_params()), self.module_name, "main",
                    self.restore_order, ["early"])
        finish(self.module, self.plan, **self.always_returned(), **result)


def run_with_netlink(module: AnsibleModule, manager: type[OverlayManager]) -> None:
    """Fail clearly when pyroute2 is missing, else run the manager on one netlink session."""
    missing = missing_pyroute2()
    if missing:
        module.fail_json(msg=missing)
    with Netlink() as nl:
        guarded(module, manager(module, nl).run)
