"""Run one netloom module file the way Ansible runs it on a node: one process, args file.

Usage: python run_module.py library/NAME.py ARGS.json
The project's module_utils directory is added to ansible.module_utils first, which is
what Ansible's module packaging does for a configured `module_utils` path.
"""
import pathlib
import runpy
import sys

import ansible.module_utils

ROOT = pathlib.Path(__file__).resolve().parents[2]
ansible.module_utils.__path__.append(str(ROOT / "module_utils"))

module_path, args_path = sys.argv[1], sys.argv[2]
sys.argv = [module_path, args_path]
runpy.run_path(module_path, run_name="__main__")
