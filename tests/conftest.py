"""Make `ansible.module_utils.netloom` importable in tests, as Ansible does on a node."""
import pathlib
import sys

import ansible.module_utils

ROOT = pathlib.Path(__file__).resolve().parents[1]
ansible.module_utils.__path__.append(str(ROOT / "module_utils"))
sys.path.insert(0, str(ROOT))
