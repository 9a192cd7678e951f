"""Action plugin of nginx_hostname_router: renders the pod's nginx config on the controller.

See plugin_utils/netloom_action.py. The config comes from templates/nginx/hostname_router.conf.j2,
rendered from the arguments as the module validates them (module_utils/netloom/pods.py).
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
from ansible.module_utils.netloom.common import InputError
from netloom_action import NetloomAction, module_argument_spec, normalised, render_file, template_path

MODULE = "nginx_hostname_router"


class ActionModule(NetloomAction):

    @classmethod
    def render(cls, args: Mapping[str, Any], template: str | None) -> dict[str, str] | None:
        code = module_argument_spec(MODULE)  # loads library/nginx_hostname_router.py
        params = normalised(code, args)
        if params is None or params["state"] == "absent":
            return None if params is None else {}
        parse = sys.modules[f"netloom_library_{MODULE}"].parse
        try:
            variables = parse(params)
        except InputError:
            return None
        return {"config": render_file(template_path("nginx/hostname_router.conf.j2"), variables)}
