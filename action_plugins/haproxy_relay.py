"""Action plugin of haproxy_relay: renders haproxy.cfg and the unit drop-in on the controller.

See _netloom_action.py. The config comes from templates/haproxy/haproxy_relay.cfg.j2, or from
the task's `template` (the operator's own file, with the same variables: `config`, the validated
relays model, and `marker`, which must stay the first line for state=absent to remove the file).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # the shared base beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _netloom_action import NetloomAction, normalised, render_file, template_path
from ansible.module_utils.netloom import haproxy
from ansible.module_utils.netloom.common import InputError


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
