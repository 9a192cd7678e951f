"""Verify qemu_vm on the lab by using the VM: SSH with the seeded key at its allocator address,
traffic to a container on the other runner, a 9p share, QMP state; after a killed QEMU and after
runner 1's reboot the same checks must pass again (the unit brought the VM back).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
pytest.register_assert_rewrite("labtest")
from labtest import (
    HttpContainer,
    assert_check_mode_reports_no_change,
    assert_no_drift,
    by_name,
    draw_topology,
    node_fixture,
    topology_node,
)

KEY = pathlib.Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "vm_key"
REMOTE_KEY = "/root/.ssh/netloom_vm_key"
BOOT_DEADLINE = 1200  # seconds: a TCG boot with cloud-init takes minutes on a loaded 2-core machine

runner1 = node_fixture("runner1")
runner2 = node_fixture("runner2")


@pytest.fixture(scope="module")
def vm(runner1) -> dict:
    record = json.loads(runner1.check_output("cat /var/lib/netloom/vms/t1/vm.json"))
    return {"address": record["address"].split("/")[0], "mac": record["mac"], "accel": record["accel"]}


@pytest.fixture(scope="module")
def ssh(runner2, vm):
    """Run a command in the VM over SSH from runner 2 (across the overlay) as the seeded user."""
    runner2.ansible("copy", f"src={KEY} dest={REMOTE_KEY} mode=0600", check=False)
    base = (
        f"ssh -i {REMOTE_KEY} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        f"-o ConnectTimeout=10 deploy@{vm['address']}"
    )
    deadline = time.monotonic() + BOOT_DEADLINE
    while True:
        # ssh's own 255 ("no route to host" while the guest boots) must not look like a failure
        # of testinfra's connection to runner 2, which raises on 255: echo the exit code instead.
        result = runner2.run(f"{base} cloud-init status --wait; echo vm-ssh-rc=$?")
        if "vm-ssh-rc=0" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(10)
    assert "vm-ssh-rc=0" in result.stdout, \
        f"no SSH to the VM at {vm['address']} within {BOOT_DEADLINE} s: {result.stdout} {result.stderr}"
    # Quoted once for runner 2's shell, so the guest's shell gets the command whole (&&, >, quotes).
    return lambda command: runner2.run(f"{base} {shlex.quote(command)}")


@pytest.fixture(scope="module")
def container(runner2):
    box = HttpContainer(runner2, "kohakuriver-overlay", "netloom-vm-ok")
    yield box
    box.remove()


def test_vm_runs_under_its_unit_and_qmp_says_running(runner1):
    assert runner1.service("netloom-vm-t1.service").is_running
    assert runner1.service("netloom-vm-t1.service").is_enabled
    status = runner1.check_output(
        'python3 -c "from qemu.qmp.legacy import QEMUMonitorProtocol as Q; '
        "q = Q('/run/netloom/vms/t1/qmp.sock'); q.connect(); "
        "print(q.cmd('query-status')['status'])\""
    )
    assert status == "running"
    tap = json.loads(runner1.check_output("ip -j -d link show nlvm-t1"))[0]
    assert tap["master"] == "kohaku-overlay" and tap["mtu"] == 1450


def test_guest_applied_the_seed_address_mac_and_key(ssh, vm):
    addresses = json.loads(ssh("ip -j addr show eth0").stdout)[0]
    assert addresses["address"] == vm["mac"]
    assert f"{vm['address']}/16" in {f"{a['local']}/{a['prefixlen']}" for a in addresses["addr_info"]}
    assert (
        ssh(
            "cat /run/cloud-init/instance-data.json >/dev/null && cloud-init query v1.instance_id"
        ).stdout.strip()
        == "netloom-vm-t1"
    )
    assert ssh("hostname").stdout.strip() == "t1"


def test_a_container_on_runner2_reaches_the_vm_and_the_vm_pings_it(ssh, vm, container):
    banner = container.run(f"sh -c 'echo | nc -w 10 {vm['address']} 22'")
    assert banner.stdout.startswith("SSH-2.0-OpenSSH"), banner.stdout + banner.stderr
    assert ssh(f"ping -c 2 -W 5 {container.ip}").rc == 0


def test_9p_share_is_visible_in_the_guest(ssh):
    result = ssh(
        "sudo sh -c 'mkdir -p /mnt/data && (mountpoint -q /mnt/data || "
        "mount -t 9p -o trans=virtio,version=9p2000.L,ro data /mnt/data) && cat /mnt/data/hello.txt'"
    )
    assert result.rc == 0 and result.stdout.strip() == "shared over 9p", result.stderr


def test_check_mode_after_converge_reports_no_change(ssh):
    del ssh  # after the boot: cloud-init changed nothing netloom owns
    assert_check_mode_reports_no_change({"hub", "runner1", "runner2"})


def test_the_picture_shows_the_vm_on_runner1s_overlay_bridge(vm):
    """The picture play, from live state: t1's TAP on kohaku-overlay, the overlay links, no drift."""
    model = draw_topology()
    taps = by_name(topology_node(model, "runner1")["taps"])
    assert set(taps) == {"nlvm-t1"}, taps
    assert taps["nlvm-t1"]["bridge"] == "kohaku-overlay" and taps["nlvm-t1"]["vm"] == "t1", taps
    assert taps["nlvm-t1"]["status"] == "ok", taps
    assert topology_node(model, "runner2")["taps"] == []
    assert_no_drift(model)
