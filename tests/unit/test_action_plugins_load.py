"""Every action plugin loads the way Ansible loads it: by path, in a fresh interpreter with nothing of
netloom's on sys.path (the tests' conftest makes module_utils importable; Ansible's controller does not)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOADER = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("netloom_plugin_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert hasattr(module, "ActionModule")
"""


@pytest.mark.parametrize("plugin", sorted(path.name for path in (ROOT / "action_plugins").glob("*.py")))
def test_plugin_loads_by_path_in_a_fresh_interpreter(plugin: str, tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([sys.executable, "-c", LOADER, str(ROOT / "action_plugins" / plugin)],
                          cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
