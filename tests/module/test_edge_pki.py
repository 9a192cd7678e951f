"""roles/edge_gateway/tasks/pki.yml run by ansible-playbook on this machine (connection local).

The lab CA goes into the compute nodes' trust stores, so it must be name-constrained to the
registry; --check on a node that never ran must succeed and change nothing; a CA made by an
earlier version (no constraints) is re-issued with its key, and the registry certificate it
signed stays valid. Every certificate is checked with `openssl verify`, nothing is mocked.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tests.support.netns import ROOT

PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: /usr/bin/python3
    edge_gateway_pki_dir: {pki}
    edge_gateway_relay_ip: 10.99.0.1
    edge_gateway_cert_days: 2
  tasks:
    - name: The role's PKI tasks
      ansible.builtin.include_tasks: {tasks}
    - name: What the role publishes for the compute nodes
      ansible.builtin.debug:
        msg: "PUBLISHED {{{{ edge_gateway_ca_file.content | b64decode | replace('\\n', ' ') }}}}"
"""
SUBJECT = "/CN=netloom edge lab CA (localhost)"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not pathlib.Path("/usr/bin/python3").exists(),
                                reason="apt (python3-apt of the system Python) needs root")


def play(tmp_path: pathlib.Path, pki: pathlib.Path, check: bool = False) -> tuple[int, str]:
    """Run the PKI tasks; return the recap's changed count and the whole output."""
    book = tmp_path / "pki.yml"
    book.write_text(PLAYBOOK.format(pki=pki, tasks=ROOT / "roles/edge_gateway/tasks/pki.yml"))
    argv = [str(pathlib.Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(book)]
    proc = subprocess.run(argv + (["--check"] if check else []), capture_output=True, text=True, check=False,
                          cwd=ROOT, env={**os.environ, "ANSIBLE_NOCOLOR": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    recap = re.search(r"localhost\s+: ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0", output)
    assert recap, output
    return int(recap.group(1)), output


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def signed_for(pki: pathlib.Path, name: str, san: str) -> pathlib.Path:
    """A certificate for `san` signed by the lab CA's key: what a stolen CA key could make."""
    cert = pki.parent / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"), "-addext", f"subjectAltName={san}",
            "-keyout", str(pki.parent / f"{name}.key"), "-out", str(cert))
    return cert


def verifies(pki: pathlib.Path, cert: pathlib.Path) -> str:
    proc = openssl("verify", "-CAfile", str(pki / "ca.crt"), str(cert), check=False)
    return "OK" if proc.returncode == 0 else proc.stdout + proc.stderr


def test_check_mode_on_a_fresh_node_then_a_constrained_ca(tmp_path: pathlib.Path) -> None:
    pki = tmp_path / "pki"
    changed, output = play(tmp_path, pki, check=True)
    assert changed >= 3 and not pki.exists()  # directory, CA, registry certificate: reported, not made
    assert "PUBLISHED # check mode: the lab CA made by edge_gateway on its first real run" in output

    changed, output = play(tmp_path, pki)
    assert changed >= 3
    constraints = openssl("x509", "-in", str(pki / "ca.crt"), "-noout", "-ext", "nameConstraints").stdout
    assert [line.strip() for line in constraints.splitlines()] == [
        "X509v3 Name Constraints: critical", "Permitted:", "IP:10.99.0.1/255.255.255.255", "DNS:10.99.0.1"]
    assert "PUBLISHED -----BEGIN CERTIFICATE-----" in output
    assert verifies(pki, pki / "registry.crt") == "OK"
    # The CA vouches for nothing else, even with its key.
    assert "permitted subtree violation" in verifies(pki, signed_for(pki, "evil.example", "DNS:evil.example"))
    assert "permitted subtree violation" in verifies(pki, signed_for(pki, "other", "IP:192.0.2.7"))
    assert oct(pki.stat().st_mode & 0o777) == "0o700"

    assert play(tmp_path, pki)[0] == 0
    assert play(tmp_path, pki, check=True)[0] == 0


def test_an_unconstrained_ca_of_an_earlier_version_is_reissued_with_its_key(tmp_path: pathlib.Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir(mode=0o700)
    # What the role made before: an unconstrained CA and a registry certificate signed by it.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", SUBJECT,
            "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"))
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=10.99.0.1",
            "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
            "-addext", "subjectAltName=IP:10.99.0.1", "-keyout", str(pki / "registry.key"),
            "-out", str(pki / "registry.crt"))
    shutil.copy(pki / "registry.crt", tmp_path / "registry.before")
    assert verifies(pki, signed_for(pki, "evil.example", "DNS:evil.example")) == "OK"  # the hole

    assert play(tmp_path, pki, check=True)[0] >= 1
    assert "Name Constraints" not in openssl("x509", "-in", str(pki / "ca.crt"), "-noout", "-text").stdout

    assert play(tmp_path, pki)[0] >= 1
    assert "X509v3 Name Constraints: critical" in openssl("x509", "-in", str(pki / "ca.crt"), "-noout",
                                                          "-text").stdout
    assert (pki / "registry.crt").read_bytes() == (tmp_path / "registry.before").read_bytes()
    assert verifies(pki, pki / "registry.crt") == "OK"  # HAProxy's certificate needs no re-issue
    evil = signed_for(pki, "evil2.example", "DNS:evil2.example")
    assert "permitted subtree violation" in verifies(pki, evil)
    assert play(tmp_path, pki)[0] == 0
