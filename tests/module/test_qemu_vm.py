"""qemu_vm run as Ansible runs it, in a throwaway netns holding a runner's overlay bridge.

Every bad input of the issue must fail naming the field and the value, before anything changes:
no file under the state root, no link, no allocator book. This machine has no systemd as PID 1,
so a valid request ends at that check, after the input and the live state were checked, with
nothing changed either. The VM's life itself (boot, QMP, stop, reboot) is tested by the molecule
scenario `vms`, where the nodes run systemd.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.netns import Netns, run_module

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]


@pytest.fixture
def node(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Netns, pathlib.Path]]:
    """A netns with the runner bridge kohaku-overlay (10.1.0.1/16) and a state root of its own."""
    monkeypatch.setenv("NETLOOM_STATE_ROOT", str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    for image_format in ("qcow2", "raw"):
        image = str(tmp_path / f"base.{image_format}")
        subprocess.run(["qemu-img", "create", "-q", "-f", image_format, image, "64M"],
                       check=True)
    (tmp_path / "share").mkdir()
    with Netns("nlvm") as ns:
        ns.sh("ip link add kohaku-overlay type bridge && ip addr add 10.1.0.1/16 dev kohaku-overlay"
              " && ip link set kohaku-overlay up")
        yield ns, tmp_path


def vm_args(tmp_path: pathlib.Path, **extra: Any) -> dict[str, Any]:
    return {"name": "web1", "base_image": str(tmp_path / "base.qcow2"),
            "users": [{"name": "deploy", "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITest k"]}],
            "shares": [{"tag": "data", "source": str(tmp_path / "share")}], **extra}


def assert_nothing_changed(ns: Netns, tmp_path: pathlib.Path) -> None:
    assert list((tmp_path / "root").rglob("*.json")) == [], "a record or the allocator book was written"
    assert list((tmp_path / "root").rglob("*.qcow2")) == []
    links = {line.split(":")[1].strip().split("@")[0] for line in ns.sh("ip -o link show").splitlines()}
    assert links <= {"lo", "kohaku-overlay", "nlvm-web1"}, links


@pytest.mark.parametrize(("extra", "field"), [
    ({"base_image": "/nonexistent/base.qcow2"}, "base_image"),
    ({"base_image": "RAW"}, "base_image"),
    ({"name": "abcdefghijk"}, "name"),
    ({"memory_mb": 16}, "memory_mb"),
    ({"vcpus": 0}, "vcpus"),
    ({"vfio": ["0000:7f:1f.7"]}, "vfio[0]"),
    ({"shares": [{"tag": "data", "source": "/nonexistent/share"}]}, "shares[0].source"),
    ({"address": "10.2.0.5"}, "address"),
    ({"address": "10.1.0.1"}, "address"),
    ({"address": "10.1.0.254"}, "address"),
    ({"mac": "02:00:00:00:00:01"}, "mac"),
    ({"disk_size": "lots"}, "disk_size"),
])
def test_bad_input_fails_naming_the_field_before_any_change(node: tuple[Netns, pathlib.Path],
                                                            extra: dict[str, Any], field: str) -> None:
    ns, tmp_path = node
    if extra.get("base_image") == "RAW":
        extra = {"base_image": str(tmp_path / "base.raw")}
    for check_mode in (True, False):
        result = run_module("qemu_vm", vm_args(tmp_path, **extra), netns=ns.name, check_mode=check_mode)
        assert result.get("failed") and result.get("field") == field, result
        assert_nothing_changed(ns, tmp_path)


def test_a_share_that_is_a_symlink_into_a_protected_path_fails(node: tuple[Netns, pathlib.Path]) -> None:
    """The protected paths are checked where the share really leads, on the node."""
    ns, tmp_path = node
    (tmp_path / "runlink").symlink_to("/run")
    share = {"tag": "data", "source": str(tmp_path / "runlink")}
    result = run_module("qemu_vm", vm_args(tmp_path, shares=[share]), netns=ns.name)
    assert result.get("failed") and result["field"] == "shares[0].source" and "/run" in result["msg"], result
    assert_nothing_changed(ns, tmp_path)


def test_a_tap_name_taken_by_a_foreign_link_fails(node: tuple[Netns, pathlib.Path]) -> None:
    ns, tmp_path = node
    ns.sh("ip tuntap add dev nlvm-web1 mode tap")
    result = run_module("qemu_vm", vm_args(tmp_path), netns=ns.name)
    assert result.get("failed") and result["field"] == "name" and "nlvm-web1" in result["msg"], result
    assert_nothing_changed(ns, tmp_path)


def test_a_mac_held_by_another_vm_fails(node: tuple[Netns, pathlib.Path]) -> None:
    ns, tmp_path = node
    other = tmp_path / "root" / "var/lib/netloom/vms/web2"
    other.mkdir(parents=True)
    (other / "vm.json").write_text(json.dumps({"mac": "52:54:00:aa:bb:cc", "tap": "nlvm-web2"}))
    result = run_module("qemu_vm", vm_args(tmp_path, mac="52:54:00:aa:bb:cc"), netns=ns.name)
    assert result.get("failed") and result["field"] == "mac" and "VM web2" in result["msg"], result
    (other / "vm.json").unlink()
    assert_nothing_changed(ns, tmp_path)


def test_a_mac_a_neighbour_on_the_bridge_holds_fails(node: tuple[Netns, pathlib.Path]) -> None:
    ns, tmp_path = node
    ns.sh("ip neigh add 10.1.0.9 lladdr 52:54:00:aa:bb:cd dev kohaku-overlay nud permanent")
    result = run_module("qemu_vm", vm_args(tmp_path, mac="52:54:00:aa:bb:cd"), netns=ns.name)
    assert result.get("failed") and result["field"] == "mac" and "10.1.0.9" in result["msg"], result
    assert_nothing_changed(ns, tmp_path)


def test_an_address_in_use_on_the_bridge_fails(node: tuple[Netns, pathlib.Path]) -> None:
    ns, tmp_path = node
    ns.sh("ip neigh add 10.1.0.9 lladdr 02:00:00:00:00:09 dev kohaku-overlay nud permanent")
    result = run_module("qemu_vm", vm_args(tmp_path, address="10.1.0.9"), netns=ns.name)
    assert result.get("failed") and result["field"] == "address", result
    assert_nothing_changed(ns, tmp_path)


def test_valid_input_without_systemd_stops_before_any_change(node: tuple[Netns, pathlib.Path]) -> None:
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("platform limit: this machine runs systemd; the molecule scenario vms runs the VM")
    ns, tmp_path = node
    result = run_module("qemu_vm", vm_args(tmp_path), netns=ns.name)
    assert result.get("failed") and "needs systemd as PID 1" in result["msg"], result
    assert_nothing_changed(ns, tmp_path)


def test_check_mode_on_a_runner_without_its_bridge_plans_with_subnet(
        node: tuple[Netns, pathlib.Path]) -> None:
    """Never converged: no overlay bridge yet. Check mode with `subnet` gets past the allocator (it
    stops at the systemd check here, with nothing changed); without it, or in a real run, the
    missing bridge is the error, naming qemu_vm's field `bridge`."""
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("platform limit: this machine runs systemd; the molecule scenario vms runs the VM")
    ns, tmp_path = node
    ns.sh("ip link delete kohaku-overlay")
    planned = run_module("qemu_vm", vm_args(tmp_path, subnet="10.1.0.0/16"), netns=ns.name, check_mode=True)
    assert planned.get("failed") and "needs systemd as PID 1" in planned["msg"], planned
    for check_mode, extra in ((True, {}), (False, {"subnet": "10.1.0.0/16"})):
        result = run_module("qemu_vm", vm_args(tmp_path, **extra), netns=ns.name, check_mode=check_mode)
        assert result.get("failed") and result["field"] == "bridge", result
        assert "bridge='kohaku-overlay': has no IPv4 address" in result["msg"], result
    assert_nothing_changed(ns, tmp_path)


def test_standard_mode_takes_the_nat_bridge_and_its_own_book(node: tuple[Netns, pathlib.Path]) -> None:
    """network=nat: the TAP goes on vm_nat_network's bridge, the address comes from that bridge's
    subnet (an overlay address is refused), and without the bridge the error names the module
    that makes it."""
    ns, tmp_path = node
    missing = run_module("qemu_vm", vm_args(tmp_path, network="nat"), netns=ns.name)
    assert missing.get("failed") and missing["field"] == "bridge", missing
    assert "netloom-vmnat" in missing["msg"] and "vm_nat_network" in missing["msg"], missing
    ns.sh("ip link add netloom-vmnat type bridge && ip addr add 10.200.0.1/24 dev netloom-vmnat"
          " && ip link set netloom-vmnat up")
    overlay_address = run_module("qemu_vm", vm_args(tmp_path, network="nat", address="10.1.0.5"),
                                 netns=ns.name)
    assert overlay_address.get("failed") and overlay_address["field"] == "address", overlay_address
    assert "10.200.0.2..10.200.0.254" in overlay_address["msg"], overlay_address
    ns.sh("ip link delete netloom-vmnat")
    assert_nothing_changed(ns, tmp_path)


def test_qmp_client_drives_a_real_qemu(tmp_path: pathlib.Path) -> None:
    """The module's QMP calls against QEMU itself (TCG, firmware only): status, pause and resume,
    and a powerdown nothing answers (no guest OS) ends as not graceful within the timeout; the
    unit's ExecStop helper (vmstop.py run as a file) says the same by its exit code, and exits 0
    once QEMU is gone. QEMU runs under the unit's -sandbox filter."""
    from ansible.module_utils.netloom import qemu, vmstop

    from library.qemu_vm import Qmp, qemu_status

    socket = tmp_path / "qmp.sock"
    qemu_proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-nodefaults",
                                  "-no-user-config", "-display", "none", "-m", "64", "-sandbox", qemu.SANDBOX,
                                  "-qmp", f"unix:{socket},server=on,wait=off"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):  # QEMU listens on the socket within a moment of starting
            if qemu_status(str(socket)) is not None:
                break
            assert qemu_proc.poll() is None, qemu_proc.stderr.read() if qemu_proc.stderr else ""
            time.sleep(0.2)
        client = Qmp(str(socket))
        assert client.status() == "running"
        client.command("stop")
        assert client.status() == "paused"
        client.command("cont")
        assert client.status() == "running"
        assert client.powerdown(2.0) is False
        helper = subprocess.run([sys.executable, "-I", vmstop.__file__, str(socket), "2"],
                                capture_output=True, text=True, check=False)
        assert helper.returncode == 1 and "no SHUTDOWN within 2 s" in helper.stderr, helper
        assert qemu_proc.poll() is None
    finally:
        qemu_proc.kill()
        qemu_proc.wait()
    assert qemu_status(str(socket)) is None
    helper = subprocess.run([sys.executable, "-I", vmstop.__file__, str(socket), "2"],
                            capture_output=True, text=True, check=False)
    assert helper.returncode == 0 and "nothing to power down" in helper.stdout, helper
