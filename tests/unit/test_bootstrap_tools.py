"""Every command the tests and the lab run comes from a package scripts/bootstrap.sh installs.

A machine that happens to have a tool proves nothing for a fresh Debian 12 machine: the
package that provides each tool here must be in bootstrap's list or be part of a bare
Debian (Priority: required, what debootstrap's minbase variant installs).
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Every command the tests, the molecule verifiers and the lab tool run on this machine.
TEST_TOOLS = (
    "ip", "ss", "iptables", "iptables-save", "iptables-restore", "nsenter", "unshare", "mount", "umount",
    "ping", "sysctl", "wg", "wg-quick", "wireguard-go", "haproxy", "nginx", "curl", "docker", "dockerd",
    "debootstrap", "ssh", "ssh-keygen", "busybox", "openssl", "getent", "ldd", "iperf3", "tar", "mktemp",
    "cat", "systemd-analyze",
    "bridge",  # overlay_runner direct mode: the mesh's FDB (tests/module/test_overlay_mesh.py)
    "dot",  # playbooks/topology.yml renders the picture
    "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "chroot",  # qemu_vm tests and the guest image
)


def bootstrap_packages() -> set[str]:
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    match = re.search(r"^packages=\(([^)]*)\)", text, re.MULTILINE)
    assert match, "scripts/bootstrap.sh has no packages=( ... ) list"
    return set(match.group(1).split())


def required_packages() -> set[str]:
    """Packages of Priority required: what a bare (minbase) Debian already has."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Priority}\n"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.endswith(" required")}


def providing_package(path: str) -> str | None:
    """The Debian package that installed `path` (usrmerge: /usr/bin/x may be recorded as /bin/x)."""
    real = os.path.realpath(path)
    candidates = {path, real}
    for name in list(candidates):
        if name.startswith("/usr/"):
            candidates.add(name[len("/usr"):])
        else:
            candidates.add("/usr" + name)
    for candidate in sorted(candidates):
        proc = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return proc.stdout.split(":", 1)[0].split(",")[0].strip()
    return None


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="platform limit: not a Debian machine")
@pytest.mark.parametrize("tool", TEST_TOOLS)
def test_tool_comes_from_a_bootstrap_package(tool: str) -> None:
    found = [os.path.join(folder, tool) for folder in ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
             if os.path.isfile(os.path.join(folder, tool))]
    assert found, f"{tool} is not installed from Debian here: add its package to scripts/bootstrap.sh"
    package = providing_package(found[0])
    assert package, f"{found[0]} belongs to no Debian package"
    allowed = bootstrap_packages() | required_packages()
    assert package in allowed, (f"{tool} comes from package {package}, which scripts/bootstrap.sh does not "
                                "install and a bare Debian does not have")
