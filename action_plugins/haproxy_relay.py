"""Action plugin of haproxy_relay: renders haproxy.cfg and the unit drop-in on the controller.

See plugin_utils/netloom_action.py. The config comes from templates/haproxy/haproxy_relay.cfg.j2, or from
the task's `template` (the operator's own file, with the same variables: `config`, the validated
relays model, and `marker`, which must stay the first line for state=absent to remove the file).
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
from ansible.module_utils.netloom import haproxy
from ansible.module_utils.netloom.common import InputError
from netloom_action import NetloomAction, normalised, render_file, template_path


class ActionModule(NetloomAction):
    accepts_template = True

    @classmethod
    def render(cls, args: Mapping[str, Any], template: str | None) -> dict[str, str] | None:
        params = normalised(haproxy.ARGUMENT_SPEC, args, required_if=haproxy.REQUIRED_IF)
        if params is None or params["state"] == "absent":
            return None if params is None else {}
        try:
            path = haproxy.config_path("path", params["path"])
            config = haproxy.parse_config(params)
        except InputError:
            return None
        files = {"config": render_file(template or template_path(haproxy.CONFIG_TEMPLATE),
                                       haproxy.config_variables(config), haproxy.TEMPLATE_FILTERS)}
        if params["manage_service"]:
            files["dropin"] = render_file(template_path(haproxy.DROPIN_TEMPLATE),
                                          haproxy.dropin_variables(path))
        return files
