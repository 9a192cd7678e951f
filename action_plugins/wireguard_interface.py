"""Action plugin of wireguard_interface: renders the wg-quick config and the wireguard-go drop-in.

See plugin_utils/netloom_action.py. The config comes from templates/wireguard/wg-quick.conf.j2, or from the
task's `template` (the operator's own file, with the same variable `interface`). Neither holds
key material: the private key stays in its 0600 file on the node and is loaded by PostUp.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

# The shared base lives in plugin_utils/ (an action plugin directory holds only plugins).
PLUGIN_UTILS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin_utils")
if PLUGIN_UTILS not in sys.path:
    sys.path.insert(0, PLUGIN_UTILS)
# Imported first (plain imports sort before from-imports): it makes ansible.module_utils.netloom importable.
import netloom_action  # noqa: F401
from ansible.module_utils.netloom import wireguard
from ansible.module_utils.netloom.common import InputError
from netloom_action import (
    NetloomAction,
    module_argument_spec,
    normalised,
    render_file,
    template_path,
)


class ActionModule(NetloomAction):
    accepts_template = True

    @classmethod
    def render(cls, args: Mapping[str, Any], template: str | None) -> dict[str, str] | None:
        params = normalised(module_argument_spec("wireguard_interface"), args)
        if params is None or params["state"] == "absent":
            return None if params is None else {}
        try:
            variables = wireguard.config_variables(params)
        except (InputError, ValueError):
            return None
        return {"config": render_file(template or template_path(wireguard.CONFIG_TEMPLATE), variables,
                                      wireguard.TEMPLATE_FILTERS),
                "dropin": render_file(template_path(wireguard.DROPIN_TEMPLATE), {})}
