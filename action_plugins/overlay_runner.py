"""Action plugin of overlay_runner: the netloom-restore units, rendered on the controller.

See _netloom_action.py. The module records them with its other arguments, so the boot replay
writes the same units.
"""
from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # the shared base beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _netloom_action import NetloomAction


class ActionModule(NetloomAction):
    records_restore = True
