"""Action plugin of qemu_vm: renders the VM's NoCloud seed and its systemd unit on the controller.

See plugin_utils/netloom_action.py. meta-data, user-data and network-config come from
templates/cloud-init/, the unit from templates/systemd/netloom-vm.service.j2, all from the
arguments as the module validates them (module_utils/netloom/qemu.py). The node fills in what
only it knows: the address its allocator gives, the gateway, the accelerator.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

PLUGIN_UTILS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin_utils")
if PLUGIN_UTILS not in sys.path:
    sys.path.insert(0, PLUGIN_UTILS)
# Imported first (plain imports sort before from-imports): it makes ansible.module_utils.netloom importable.
import netloom_action  # noqa: F401
from ansible.module_utils.netloom import qemu
from ansible.module_utils.netloom.common import InputError
from netloom_action import NetloomAction, module_argument_spec, normalised, render_file, template_path

UNIT_TEMPLATE = "systemd/netloom-vm.service.j2"
SEED_TEMPLATES = {
    "meta-data": "cloud-init/meta-data.j2",
    "user-data": "cloud-init/user-data.j2",
    "network-config": "cloud-init/network-config.j2",
}


class ActionModule(NetloomAction):
    @classmethod
    def render(cls, args: Mapping[str, Any], template: str | None) -> dict[str, str] | None:
        params = normalised(module_argument_spec("qemu_vm"), args)
        if params is None or params["state"] == "absent":
            return None if params is None else {}
        try:
            spec = qemu.parse_spec(params)
            users = qemu.parse_users("users", params["users"])
        except InputError:
            return None
        files = {"unit": render_file(template_path(UNIT_TEMPLATE), qemu.unit_variables(spec))}
        variables = qemu.seed_variables(spec, users, params["dns"])
        for key, name in SEED_TEMPLATES.items():
            files[key] = render_file(template_path(name), variables)
        return files
