"""Throwaway network namespaces and a runner for modules inside them."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import uuid
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "support" / "run_module.py"
# Module runs keep their reboot persistence (netloom-restore) here, one folder per netns.
PERSIST_ROOTS = pathlib.Path(tempfile.gettempdir()) / "netloom-persist"
# Prepended to every run_module_utils script: netloom's module_utils, passed as sys.argv[1],
# become importable as ansible.module_utils.netloom, as Ansible's module packaging makes them.
MODULE_UTILS_ON_PATH = """import sys
import ansible.module_utils
ansible.module_utils.__path__.append(sys.argv[1])
"""


def node_python() -> str:
    """The interpreter modules run with: NETLOOM_MODULE_PYTHON (e.g. the node's Python), else this one."""
    return os.environ.get("NETLOOM_MODULE_PYTHON", sys.executable)


def sh(cmd: str, netns: str | None = None, check: bool = True) -> str:
    """Run a shell command, inside `netns` (via nsenter, which keeps /sys intact)."""
    argv = ["bash", "-c", cmd]
    if netns:
        argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd!r} failed: {proc.stderr}{proc.stdout}")
    return proc.stdout


class Netns:
    """A named netns with loopback up; deleted (with all its links) on exit."""

    def __init__(self, prefix: str = "nltest") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.sh("ip link set lo up")
        return self

    def __exit__(self, *exc: Any) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)
        shutil.rmtree(persist_root(self.name), ignore_errors=True)

    def sh(self, cmd: str, check: bool = True) -> str:
        return sh(cmd, self.name, check)


def persist_root(netns: str | None) -> pathlib.Path:
    """Where a module run in `netns` keeps its reboot persistence (never the test machine's /)."""
    return PERSIST_ROOTS / (netns or "host")


def replay_boot(ns: Netns, phase: str = "early") -> subprocess.CompletedProcess[str]:
    """A boot's netloom-restore phase inside `ns`, with nothing but the recorded persistence."""
    root = persist_root(ns.name)
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns.name}", node_python(),
                           str(root / "usr/lib/netloom/netloom-restore"), phase],
                          env={**os.environ, "NETLOOM_PERSIST_ROOT": str(root)},
                          capture_output=True, text=True, check=False)


def controller_args(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments as netloom's action plugin of NAME passes them: plus the files it renders.

    Ansible runs the plugin on the controller before the module; a test runs the same code here.
    A `template` in the args must be an absolute path (the plugin finds relative ones).
    """
    plugin = ROOT / "action_plugins" / f"{name}.py"
    if not plugin.exists():
        return dict(args)
    spec = importlib.util.spec_from_file_location(f"netloom_action_{name}", plugin)
    assert spec and spec.loader
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return code.ActionModule.rendered_args(args, args.get("template"))


def run_module(name: str, args: dict[str, Any], netns: str | None = None,
               check_mode: bool = False, diff: bool = True, controller: bool = True) -> dict[str, Any]:
    """Execute library/NAME.py as one process (inside `netns`) and return its JSON result.

    With `controller` the args first go through the module's action plugin, as in an Ansible run.
    A failed module (fail_json) returns its result with failed=True instead of raising,
    so tests can assert on the message.
    """
    payload = controller_args(name, args) if controller else dict(args)
    payload["_ansible_check_mode"] = check_mode
    payload["_ansible_diff"] = diff
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({"ANSIBLE_MODULE_ARGS": payload}, handle)
        args_file = handle.name
    argv = [node_python(), str(RUNNER), str(ROOT / "library" / f"{name}.py"), args_file]
    if netns:
        argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    env = {**os.environ, "NETLOOM_PERSIST_ROOT": str(persist_root(netns))}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    finally:
        os.unlink(args_file)
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"module {name} printed no JSON: rc={proc.returncode} "
                             f"stdout={proc.stdout!r} stderr={proc.stderr!r}") from None
    return result


def run_module_ok(name: str, ns: Netns, args: dict[str, Any], check_mode: bool = False) -> dict[str, Any]:
    """run_module inside `ns` with diff on, for a run that must succeed."""
    result = run_module(name, args, netns=ns.name, check_mode=check_mode, diff=True)
    assert not result.get("failed"), result.get("msg")
    return result


def run_module_utils(ns: Netns, script: str, *args: str) -> Any:
    """Run a Python script that uses netloom's module_utils inside `ns` with the modules' interpreter.

    The script's own arguments start at sys.argv[2]; it prints one JSON document, returned parsed.
    """
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{ns.name}", node_python(), "-c",
                           MODULE_UTILS_ON_PATH + script, str(ROOT / "module_utils"), *args],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
