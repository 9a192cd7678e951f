"""Every module's DOCUMENTATION, EXAMPLES and RETURN render with ansible-doc."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = sorted(p.stem for p in (ROOT / "library").glob("*.py"))
ANSIBLE_DOC = str(pathlib.Path(sys.executable).parent / "ansible-doc")


@pytest.mark.parametrize("name", MODULES)
def test_ansible_doc_renders(name: str) -> None:
    text = subprocess.run([ANSIBLE_DOC, "-M", "library", name], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert text.returncode == 0, text.stderr
    assert "OPTIONS" in text.stdout and "EXAMPLES" in text.stdout and "RETURN VALUES" in text.stdout
    raw = subprocess.run([ANSIBLE_DOC, "-M", "library", "--json", name], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    doc = json.loads(raw.stdout)[name]
    assert doc["doc"]["short_description"]
    assert doc["examples"].strip()
    assert doc["return"], f"{name} documents no return values"
