"""Callback for bench/fanout: wall time of every task and the per-host recap, as JSON.

Ansible's profile_tasks lives in ansible.posix, which netloom does not install; this is the
little of it the benchmark needs. It writes to the file named by FANOUT_TIMER_FILE.
"""
from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: fanout_timer
type: aggregate
short_description: bench/fanout's task timer
description: Writes each task's wall time and the play recap to FANOUT_TIMER_FILE as JSON.
requirements: [enabled in ANSIBLE_CALLBACKS_ENABLED]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "fanout_timer"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._tasks: list[list] = []
        self._current: list | None = None

    def _close(self) -> None:
        if self._current is not None:
            self._current[1] = time.monotonic() - self._current[1]
            self._tasks.append(self._current)
            self._current = None

    def v2_playbook_on_task_start(self, task, is_conditional) -> None:
        self._close()
        self._current = [task.get_name(), time.monotonic()]

    def v2_playbook_on_handler_task_start(self, task) -> None:
        self.v2_playbook_on_task_start(task, False)

    def v2_playbook_on_stats(self, stats) -> None:
        self._close()
        hosts = {host: stats.summarize(host) for host in sorted(stats.processed)}
        with open(os.environ["FANOUT_TIMER_FILE"], "w", encoding="utf-8") as out:
            json.dump({"tasks": self._tasks, "hosts": hosts}, out)
