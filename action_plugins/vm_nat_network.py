"""Action plugin of vm_nat_network: the netloom-restore units, rendered on the controller.

See plugin_utils/netloom_action.py. The module records them with its other arguments, so the boot replay
writes the same units.
"""
from __future__ import annotations

import os
import sys

# The shared base lives in plugin_utils/ (an action plugin directory holds only plugins).
PLUGIN_UTILS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin_utils")
if PLUGIN_UTILS not in sys.path:
    sys.path.insert(0, PLUGIN_UTILS)
from netloom_action import NetloomAction


class ActionModule(NetloomAction):
    records_restore = True
