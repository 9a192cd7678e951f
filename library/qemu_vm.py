#!/usr/bin/python
"""Ansible module qemu_vm: a QEMU VM on the runner's overlay, supervised by its own systemd unit."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: qemu_vm
short_description: QEMU VMs on a runner's overlay bridge, with a NoCloud seed and a systemd unit each
description:
  - One VM per call, converged to I(state). The VM's disk is a qcow2 overlay on I(base_image)
    (C(qemu-img create -b BASE -F qcow2), grown to I(disk_size)); its cloud-init seed is a NoCloud
    ISO (volume id C(cidata), made with pycdlib) holding C(meta-data) (instance-id
    C(netloom-vm-NAME), stable for the VM's life), C(user-data) (I(users) with their SSH keys, no
    passwords) and C(network-config) version 2 matching the VM's MAC with its static overlay address.
  - The seed and the unit are rendered on the controller by netloom's C(qemu_vm) action plugin from
    C(templates/cloud-init/) and C(templates/systemd/netloom-vm.service.j2) and handed over in
    I(rendered); values only the node knows (the address the runner's allocator gives, the
    accelerator) are filled in here. Called without the plugin, the module fails naming I(rendered).
  - The address comes from the runner's one overlay address allocator (key C(vm-NAME), owner kind
    C(vm)), which also serves the runner's containers; the gateway and prefix come from the overlay
    bridge's own address. I(address) asks for a fixed one, checked against the workload range and
    every address in use. C(state=absent) frees it.
  - The NIC is a TAP C(nlvm-NAME) on I(bridge) (the runner's overlay bridge C(kohaku-overlay)) with
    the MAC C(52:54:00) plus three bytes of sha256(NAME), so a VM keeps its MAC across runs. A TAP
    of that name that is not this VM's, or a MAC another VM of the node or a neighbour on the
    bridge holds, fails before any change; set I(mac) to choose another.
  - The VM runs as C(netloom-vm-NAME.service). The unit creates the TAP, runs QEMU (QMP socket and
    pidfile in C(/run/netloom/vms/NAME/), serial console in C(/var/lib/netloom/vms/NAME/serial.log))
    and deletes the TAP when QEMU ends. It outlives the Ansible connection, restarts a QEMU that
    died (C(Restart=on-failure)) and, enabled for C(state=running), starts the VM at boot.
  - The running state is read over QMP (C(query-status)), through the C(qemu.qmp) library. A paused
    VM is resumed (C(cont)); one in C(internal-error), C(guest-panicked) or C(shutdown) is restarted.
    A change of the unit, disk or seed of a running VM restarts it (graceful stop first).
  - Stop (C(state=stopped) or C(absent), or a restart) sends C(system_powerdown), waits for QEMU's
    C(SHUTDOWN) event up to I(stop_timeout) seconds, and only then kills QEMU and stops the unit.
    The result's I(stop) says C(powerdown) or C(killed). The unit stops the same way on its own
    (C(systemctl stop), node shutdown), through its C(ExecStop), which runs
    /var/lib/netloom/vms/vmstop.py (the same code, written there by the module; standard library
    and C(qemu.qmp) only), with
    C(TimeoutStopSec) = I(stop_timeout) + 30 s before systemd sends SIGTERM.
  - QEMU runs under its seccomp filter (C(-sandbox on,obsolete=deny,elevateprivileges=deny,
    spawn=deny,resourcecontrol=deny)); the unit creates the TAP before QEMU starts, so QEMU needs
    no privileged helper. 9p shares use C(security_model=mapped-xattr), so the guest's owners and
    modes (setuid bits too) are kept in extended attributes, never applied to the host files.
  - "I(accel=auto) uses KVM only when a KVM guest really runs: /dev/kvm must open and a probe guest
    must run without C(KVM internal error) (what nested KVM on the test machines gives); otherwise
    TCG, and I(accel_reason) says why. A VM started under KVM that stops with an internal error is
    switched to TCG and restarted. The choice is kept in the VM's record."
  - "9p shares (I(shares)) export host folders (C(-fsdev local), virtio-9p-pci); mount them in the
    guest with C(mount -t 9p -o trans=virtio TAG DIR). VFIO passthrough (I(vfio)) is validated up
    front (the device exists, is in an IOMMU group and is bound to vfio-pci) and passed as
    C(-device vfio-pci); it cannot be exercised on netloom's test machines (no IOMMU, no device)."
  - Check mode reports the same changes the real run would make (the address the allocator would
    give included) and changes nothing; diff mode shows before and after. Needs systemd as PID 1.
version_added: "0.1.0"
author: netloom
requirements:
  - netloom's action plugins on the controller (C(action_plugins) in C(ansible.cfg))
  - qemu-system-x86 and qemu-utils, python3-pycdlib, iproute2 on the node
  - the C(qemu.qmp) Python library on the node (not in Debian 12; the C(runner_vms) role installs it
    from a wheel the controller downloaded)
  - systemd as PID 1
options:
  name:
    description: The VM id, lower-case letters, digits and C(-); at most 10 characters (its TAP
      name C(nlvm-NAME) must fit the kernel's 15).
    type: str
    required: true
  state:
    description: C(running), C(stopped) (graceful power-down, unit disabled) or C(absent) (also
      removes the disk, seed, unit and the address reservation).
    type: str
    choices: [running, stopped, absent]
    default: running
  base_image:
    description: The qcow2 base image on the node (required unless C(state=absent)); never written.
    type: path
  disk_size:
    description: Virtual size of the VM's disk (C(10G), C(512M), bytes); default the base image's.
      Growing is allowed (cloud-init's resizefs grows the root file system); shrinking fails.
    type: str
  memory_mb:
    description: Guest memory in MiB (64..1048576).
    type: int
    default: 512
  vcpus:
    description: Guest vCPUs (1..255).
    type: int
    default: 1
  accel:
    description: C(auto) (KVM when it really works, else TCG), C(kvm) (fail when KVM does not
      work) or C(tcg).
    type: str
    choices: [auto, kvm, tcg]
    default: auto
  kernel:
    description: Direct kernel boot, the kernel on the node; without it the VM boots from its disk.
    type: path
  initrd:
    description: The initrd for I(kernel).
    type: path
  kernel_append:
    description: Kernel command line with I(kernel); default C(root=/dev/vda rw console=ttyS0).
    type: str
  network:
    description:
      - C(overlay) (KohakuRiver's VM mode) puts the VM on the runner's overlay bridge, with an
        address from the runner's overlay allocator; other runners' containers and VMs reach it.
      - C(nat) (standard mode) puts it on the NAT bridge C(netloom-vmnat) that C(vm_nat_network)
        converges (10.200.0.1/24 by default, MASQUERADE in a chain netloom owns), with an address
        from a book of their own on the runner (C(/var/lib/netloom/addresses-nat.json)).
        Run C(vm_nat_network) first; the C(runner_vms) role does.
    type: str
    choices: [overlay, nat]
    default: overlay
  bridge:
    description: The bridge the VM's TAP joins; its address is the VMs' gateway (10.N.0.1/16 on the
      overlay), from which the workload range is derived. Default C(kohaku-overlay), or
      C(netloom-vmnat) with C(network=nat).
    type: str
  subnet:
    description:
      - The bridge's subnet (the runner's overlay subnet, e.g. 10.1.0.0/16, as overlay_address takes
        it; or the NAT subnet). Checked against the bridge; lets check mode plan the VM (and the
        address it would take) on a runner whose bridge does not exist yet. A real run still needs
        the bridge.
    type: str
  mtu:
    description: MTU of the TAP and of the guest's NIC; default 1450 on the overlay (VXLAN's
      overhead) and 1500 with C(network=nat).
    type: int
  address:
    description: A fixed overlay address for the VM (in the runner's workload range and free);
      default the allocator's choice, kept for the VM's life.
    type: str
  mac:
    description: The VM's MAC (C(52:54:00:xx:xx:xx)); default derived from I(name).
    type: str
  users:
    description: Guest users cloud-init creates, with their SSH keys (no passwords).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: User name.
        type: str
        required: true
      ssh_keys:
        description: OpenSSH public key lines.
        type: list
        elements: str
        default: []
      sudo:
        description: Passwordless sudo.
        type: bool
        default: true
  dns:
    description: Name servers for the guest.
    type: list
    elements: str
    default: []
  shares:
    description: 9p shares (host folder to mount tag).
    type: list
    elements: dict
    default: []
    suboptions:
      tag:
        description: Mount tag (1..31 of letters, digits, C(_.-)).
        type: str
        required: true
      source:
        description: Existing folder on the node.
        type: path
        required: true
      readonly:
        description: Export read-only.
        type: bool
        default: false
  vfio:
    description: PCI addresses (C(0000:01:00.0)) to pass through; each must exist, be in an IOMMU
      group and be bound to vfio-pci. Not exercisable on netloom's test machines.
    type: list
    elements: str
    default: []
  stop_timeout:
    description: Seconds to wait for the guest to power down before the unit is stopped. A Debian
      guest under TCG on a loaded 2-core machine needed more than 90 s to shut down.
    type: int
    default: 300
  rendered:
    description:
      - Set by netloom's action plugin, not by hand. The seed files and the unit rendered on the
        controller, with the node's slots.
    type: dict
"""

EXAMPLES = r"""
- name: A VM on the runner's overlay, booted from its kernel under TCG when KVM does not work
  qemu_vm:
    name: web1
    base_image: /var/lib/netloom/images/debian-guest.qcow2
    kernel: /var/lib/netloom/images/vmlinuz
    initrd: /var/lib/netloom/images/initrd.img
    disk_size: 4G
    memory_mb: 768
    users:
      - name: deploy
        ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0... deploy@ops"]
    shares:
      - {tag: data, source: /srv/data, readonly: true}

- name: Power it down gracefully
  qemu_vm:
    name: web1
    state: stopped
    base_image: /var/lib/netloom/images/debian-guest.qcow2

- name: Delete it (disk, seed, unit, TAP, address)
  qemu_vm:
    name: web1
    state: absent
"""

RETURN = r"""
name:
  description: The VM id.
  returned: always
  type: str
status:
  description: QMP query-status after the run (C(running), C(paused), ...), C(stopped) when QEMU
    does not run, C(absent) after state=absent.
  returned: always
  type: str
address:
  description: The VM's overlay address with prefix.
  returned: state is running or stopped
  type: str
  sample: 10.1.255.254/16
mac:
  description: The VM's MAC.
  returned: state is running or stopped
  type: str
tap:
  description: The TAP name.
  returned: always
  type: str
unit:
  description: The systemd unit running the VM.
  returned: always
  type: str
accel:
  description: The accelerator the VM runs with (C(kvm) or C(tcg)).
  returned: state is running or stopped
  type: str
accel_reason:
  description: Why that accelerator (e.g. C(TCG, because a KVM guest fails here (KVM internal error))).
  returned: state is running or stopped
  type: str
stop:
  description: How a running VM was stopped in this run, C(powerdown) (SHUTDOWN event within
    stop_timeout) or C(killed); null when none was stopped.
  returned: always
  type: str
released_address:
  description: The address freed by state=absent.
  returned: state is absent
  type: str
changes:
  description: The planned or executed steps.
  returned: always
  type: list
  elements: str
"""

import inspect
import io
import ipaddress
import json
import os
import shutil
import time
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom import qemu, vmstop
from ansible.module_utils.netloom import systemd as systemd_util
from ansible.module_utils.netloom.allocator import (
    DEFAULT_NETWORK,
    OverlayAllocator,
    addressing_from_subnet,
    open_runner_allocator,
)
from ansible.module_utils.netloom.common import (
    ChangePlan,
    InputError,
    finish,
    guarded,
    ipv4_address,
    run_command,
)
from ansible.module_utils.netloom.files import read_text, write_file
from ansible.module_utils.netloom.netlink import Netlink, missing_pyroute2
from ansible.module_utils.netloom.overlay import describe_link

ARGUMENT_SPEC: dict[str, Any] = {
    "name": {"type": "str", "required": True},
    "state": {"type": "str", "choices": ["running", "stopped", "absent"], "default": "running"},
    "base_image": {"type": "path"},
    "disk_size": {"type": "str"},
    "memory_mb": {"type": "int", "default": 512},
    "vcpus": {"type": "int", "default": 1},
    "accel": {"type": "str", "choices": list(qemu.ACCELS), "default": "auto"},
    "kernel": {"type": "path"},
    "initrd": {"type": "path"},
    "kernel_append": {"type": "str"},
    "network": {"type": "str", "choices": list(qemu.NETWORKS), "default": "overlay"},
    "bridge": {"type": "str"},
    "subnet": {"type": "str"},
    "mtu": {"type": "int"},
    "address": {"type": "str"},
    "mac": {"type": "str"},
    "users": {
        "type": "list",
        "elements": "dict",
        "default": [],
        "options": {
            "name": {"type": "str", "required": True},
            "ssh_keys": {"type": "list", "elements": "str", "default": [], "no_log": False},
            "sudo": {"type": "bool", "default": True},
        },
    },
    "dns": {"type": "list", "elements": "str", "default": []},
    "shares": {
        "type": "list",
        "elements": "dict",
        "default": [],
        "options": {
            "tag": {"type": "str", "required": True},
            "source": {"type": "path", "required": True},
            "readonly": {"type": "bool", "default": False},
        },
    },
    "vfio": {"type": "list", "elements": "str", "default": []},
    "stop_timeout": {"type": "int", "default": 300},
    "rendered": {"type": "dict"},
}
REQUIRED_IF = [("state", "running", ("base_image",)), ("state", "stopped", ("base_image",))]
SEED_FILES = ("meta-data", "user-data", "network-config")
CRASHED = ("internal-error", "guest-panicked", "shutdown", "io-error")
KVM_SETTLE_SECONDS = 5.0
NAT_BOOK = "nat"  # standard-mode VMs' addresses: /var/lib/netloom/addresses-nat.json
DOCKER_SOCKET = "/var/run/docker.sock"


class QmpError(RuntimeError):
    """QMP did not answer as expected."""


class Qmp:
    """The VM's QMP socket, through qemu.qmp's synchronous client (never a hand-written protocol)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self) -> Any:
        return vmstop.connect(self.path, self.timeout)

    def status(self) -> str | None:
        """query-status's status, None when nothing answers on the socket."""
        if not os.path.exists(self.path):
            return None
        try:
            client = self._connect()
        except OSError:
            return None
        try:
            return str(client.cmd("query-status")["status"])
        finally:
            client.close()

    def command(self, name: str, **arguments: Any) -> None:
        client = self._connect()
        try:
            client.cmd(name, **arguments)
        except Exception as err:  # qemu.qmp's ExecuteError carries QEMU's own message
            raise QmpError(f"QMP {name}: {err}") from err
        finally:
            client.close()

    def powerdown(self, timeout: float) -> bool:
        """system_powerdown, then wait for the SHUTDOWN event (vmstop, as the unit's ExecStop)."""
        client = self._connect()
        try:
            return vmstop.powerdown(client, timeout)
        finally:
            client.close()


class VmManager:
    """Plans and converges one VM; check and real runs share the same plan."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.plan = ChangePlan()
        self.result: dict[str, Any] = {"stop": None}

    # ---- validation ----

    def validate(self) -> None:
        params = self.params
        self.spec = qemu.parse_spec(params)
        self.paths = self.spec.paths
        self.unit = systemd_util.Unit(self.spec.unit)
        self.result.update(name=self.spec.name, tap=self.spec.tap, unit=self.spec.unit)
        if params["state"] == "absent":
            return
        self.users = qemu.parse_users("users", params["users"])
        self.dns = [str(ipv4_address(f"dns[{index}]", value)) for index, value in enumerate(params["dns"])]
        self.base = self.check_base_image(params["base_image"])
        self.disk_size = qemu.size_bytes("disk_size", params["disk_size"]) if params["disk_size"] else None
        for path_field in ("kernel", "initrd"):
            if params[path_field] and not os.path.isfile(params[path_field]):
                raise InputError(path_field, params[path_field], "no such file on this node")
        for index, share in enumerate(self.spec.shares):
            if not os.path.isdir(share.source):
                raise InputError(f"shares[{index}].source", share.source, "no such folder on this node")
            # Where a symlink really leads, on the node (/var/run is /run on Debian).
            qemu.check_share_source(f"shares[{index}].source", os.path.realpath(share.source))
        for index, address in enumerate(self.spec.vfio):
            qemu.check_vfio(f"vfio[{index}]", address)
        rendered = params["rendered"] or {}
        missing = [key for key in ("unit", *SEED_FILES) if not isinstance(rendered.get(key), str)]
        if missing:
            raise InputError(
                "rendered",
                sorted(rendered),
                f"lacks {missing}: run the task through netloom's "
                "qemu_vm action plugin (action_plugins in ansible.cfg)",
            )

    def check_base_image(self, path: str) -> dict[str, Any]:
        if not os.path.isfile(path):
            raise InputError("base_image", path, "no such file on this node")
        info = image_info(path)
        if info.get("format") != "qcow2":
            raise InputError("base_image", path, f"is {info.get('format')}, not qcow2")
        return info

    # ---- live state ----

    def read(self, nl: Netlink) -> None:
        self.nl = nl
        self.snapshot = nl.dump()
        record_text = read_text(self.paths.record)
        self.record: dict[str, Any] = json.loads(record_text) if record_text else {}
        self.unit_text = read_text(self.paths.unit_file)
        self.active = systemd_util.booted() and self.unit_text is not None and self.unit.is_active()
        # Check mode on a runner the role has not prepared yet plans without QMP (no VM runs there);
        # absent needs none (a VM it cannot power down is killed).
        if vmstop.QEMUMonitorProtocol is None and self.params["state"] != "absent" \
                and (self.active or not self.module.check_mode):
            self.module.fail_json(
                msg="the Python library qemu.qmp is missing on this node; "
                "it is not in Debian 12: the runner_vms role installs it from the wheel "
                "the controller downloaded"
            )
        self.enabled = self.unit_text is not None and self.unit.is_enabled()
        self.status = qemu_status(self.paths.qmp, attempts=3) if self.active else None
        if self.params["state"] == "absent":
            return
        self.check_collisions()

    def check_collisions(self) -> None:
        """The TAP name and MAC must be this VM's alone on the node."""
        tap = self.snapshot.link(self.spec.tap)
        if tap is not None and self.unit_text is None:
            raise InputError(
                "name",
                self.spec.name,
                f"a link {self.spec.tap} exists on this node and is not this VM's TAP (no unit of this VM)",
            )
        for other, record in qemu.other_records(self.spec.name).items():
            if record.get("mac") == self.spec.mac:
                raise InputError(
                    "mac",
                    self.params["mac"] or self.spec.mac,
                    f"VM {other} on this node has MAC {self.spec.mac}; set `mac` to another one",
                )
        own = self.record.get("address", "").split("/")[0]
        if self.snapshot.link(self.spec.bridge) is not None:
            for neighbour in self.nl.neighbours(self.spec.bridge):
                if (neighbour.lladdr or "").lower() == self.spec.mac and str(neighbour.dst) != own:
                    raise InputError(
                        "mac",
                        self.params["mac"] or self.spec.mac,
                        f"{neighbour.dst} on {self.spec.bridge} has MAC {self.spec.mac}",
                    )

    # ---- planning ----

    def run(self) -> None:
        error = missing_pyroute2()
        if error:
            self.module.fail_json(msg=error)
        with Netlink() as nl:
            self.read(nl)
            if self.params["state"] == "absent":
                self.plan_absent(nl)
                return
            # From the live bridge; on a runner not converged yet, check mode plans with `subnet`.
            nat = self.params["network"] == "nat"
            recorded_network = self.record.get("network", "overlay") if self.record else None
            if recorded_network not in (None, self.params["network"]):
                raise InputError("network", self.params["network"],
                                 f"VM {self.spec.name} was made on the {recorded_network} network; delete it "
                                 "(state=absent) before moving it")
            docker_client = None if nat else docker_api()  # no Docker network holds NAT addresses
            try:
                allocator = open_runner_allocator(self.module, nl, docker_client, self.spec.bridge,
                                                  DEFAULT_NETWORK, subnet=self.params["subnet"],
                                                  book=NAT_BOOK if nat else None)
            except InputError as err:  # the allocator names the bridge overlay_bridge; here it is `bridge`
                if err.field_name != "overlay_bridge":
                    raise
                why = "has no IPv4 address on this runner (converge vm_nat_network first)" if nat \
                    else str(err).split(": ", 1)[1]
                raise InputError("bridge", self.spec.bridge, why) from None
            if allocator is None:  # required=True raises instead; kept for the type (as overlay_address)
                raise InputError("bridge", self.spec.bridge, "has no IPv4 address")
            addressing = allocator.addressing
            with allocator.locked():
                prefer = self.record.get("address")
                address = allocator.reserve(
                    self.plan,
                    f"vm-{self.spec.name}",
                    "vm",
                    fixed=self.params["address"],
                    field_name="address",
                    prefer=ipaddress.IPv4Address(prefer.split("/")[0]) if prefer else None,
                )
                self.require_systemd()
                self.plan_present(address, addressing.gateway, addressing.subnet.prefixlen)
                finish(self.module, self.plan, describe=self.late_result, **self.result)

    def require_systemd(self) -> None:
        """Checked after the input and the live state (those errors come first), before any change."""
        if not systemd_util.booted():
            self.module.fail_json(msg="qemu_vm needs systemd as PID 1: each VM runs as its own unit")

    def late_result(self) -> dict[str, Any]:
        """What the executed steps found out (how a VM stopped, its status, a KVM fallback)."""
        return {
            key: self.result[key] for key in ("stop", "status", "accel", "accel_reason") if key in self.result
        }

    def plan_present(
        self, address: ipaddress.IPv4Address, gateway: ipaddress.IPv4Address, prefix: int
    ) -> None:
        accel, why = self.accel()
        rendered = self.params["rendered"]
        unit_text = qemu.fill_slots(rendered["unit"], accel=accel)
        interface = ipaddress.IPv4Interface(f"{address}/{prefix}")
        seed = {
            name: qemu.fill_slots(rendered[name], address=interface, gateway=gateway) for name in SEED_FILES
        }
        record = {
            "name": self.spec.name,
            "tap": self.spec.tap,
            "mac": self.spec.mac,
            "bridge": self.spec.bridge,
            "network": self.params["network"],
            "address": f"{address}/{prefix}",
            "accel": accel,
            "accel_reason": why,
            "base_image": self.params["base_image"],
            "seed": seed,
        }
        self.result.update(address=f"{address}/{prefix}", mac=self.spec.mac, accel=accel, accel_reason=why)
        restart_needed = False
        if self.record != record:
            self.plan.add(
                f"record {self.paths.record}",
                "update" if self.record else "create",
                self.record or None,
                {k: v for k, v in record.items() if k != "seed"},
                lambda: write_file(
                    self.module,
                    self.paths.record,
                    json.dumps(record, indent=2, sort_keys=True) + "\n",
                    mode=0o600,
                    dir_mode=0o700,
                ),
            )
        if self.record.get("seed") != seed or not os.path.isfile(self.paths.seed):
            self.plan.add(
                f"seed {self.paths.seed}",
                "update" if os.path.isfile(self.paths.seed) else "create",
                self.record.get("seed"),
                seed,
                lambda: write_file(self.module, self.paths.seed, seed_iso(seed), mode=0o600, dir_mode=0o700),
            )
            restart_needed = True
        restart_needed |= self.plan_disk()
        self.plan_stop_helper()
        if self.unit_text != unit_text:

            def install_unit() -> None:
                write_file(self.module, self.paths.unit_file, unit_text)
                systemd_util.daemon_reload()

            self.plan.add(
                f"unit {self.spec.unit}",
                "update" if self.unit_text else "create",
                self.unit_text,
                unit_text,
                install_unit,
            )
            restart_needed |= self.unit_text is not None
        if self.params["state"] == "running":
            self.plan_running(restart_needed)
        else:
            self.plan_stopped()

    def plan_stop_helper(self) -> None:
        """The units' ExecStop (shared by the node's VMs): vmstop.py, written as this module has it."""
        path = qemu.stop_helper_path()
        text = inspect.getsource(vmstop)
        current = read_text(path)
        if current != text:
            self.plan.add(f"file {path}", "update" if current else "create", current, text,
                          lambda: write_file(self.module, path, text, mode=0o644, dir_mode=0o700))

    def plan_disk(self) -> bool:
        """Create the overlay, or grow it; whether the running VM must restart to see it."""
        disk = self.paths.disk
        size = self.disk_size or int(self.base["virtual-size"])
        if not os.path.isfile(disk):
            argv = [
                qemu.QEMU_IMG,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                self.params["base_image"],
                "-F",
                "qcow2",
                disk,
                str(size),
            ]

            def create() -> None:
                os.makedirs(os.path.dirname(disk), mode=0o700, exist_ok=True)
                run_command(argv)

            self.plan.add(
                f"disk {disk}", "create", None, {"backing": self.params["base_image"], "size": size}, create
            )
            return False
        info = image_info(disk)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if backing != self.params["base_image"]:
            raise InputError(
                "base_image",
                self.params["base_image"],
                f"the VM's disk is an overlay on {backing}; delete the VM to change its base",
            )
        current = int(info["virtual-size"])
        if size < current:
            raise InputError(
                "disk_size",
                self.params["disk_size"] or size,
                f"the disk is {current} bytes already; qcow2 disks are never shrunk",
            )
        if size > current:
            if self.active:
                self.plan.add(
                    f"disk {disk}",
                    "update",
                    {"size": current},
                    {"size": size},
                    lambda: Qmp(self.paths.qmp).command("block_resize", device="disk0", size=size),
                )
            else:
                self.plan.add(
                    f"disk {disk}",
                    "update",
                    {"size": current},
                    {"size": size},
                    lambda: run_command([qemu.QEMU_IMG, "resize", "-q", "-f", "qcow2", disk, str(size)]),
                )
        return False

    def accel(self) -> tuple[str, str]:
        requested = self.params["accel"]
        recorded = self.record.get("accel")
        if requested == "auto" and recorded in ("kvm", "tcg"):
            return recorded, self.record.get("accel_reason", "recorded")
        if requested == recorded == "kvm":
            return "kvm", self.record.get("accel_reason", "recorded")
        return qemu.choose_accel(requested)

    def plan_running(self, restart_needed: bool) -> None:
        if not self.enabled:
            self.plan.add(
                f"unit {self.spec.unit} enabled", "update", self.enabled, True, self.unit.action("enable")
            )
        tap_gone = self.snapshot.link(self.spec.tap) is None  # QEMU lost its NIC: only a restart helps
        if not self.active:
            self.plan.add(f"vm {self.spec.name}", "update", "stopped", "running", self.start)
        elif restart_needed or self.status in CRASHED or self.status is None or tap_gone:
            self.plan.add(f"vm {self.spec.name}", "update", self.status, "running (restarted)", self.restart)
        else:
            self.plan_tap()
            if self.status in ("paused", "suspended"):
                self.plan.add(
                    f"vm {self.spec.name}",
                    "update",
                    self.status,
                    "running",
                    lambda: Qmp(self.paths.qmp).command("cont"),
                )
        self.result["status"] = "running" if self.plan.changed or self.status == "running" else self.status

    def plan_tap(self) -> None:
        """A running VM's TAP back on its bridge, up, with its MTU, as the unit set it at start
        (someone detached it, or the bridge was made again): fixed in place, no restart."""
        tap = self.snapshot.link(self.spec.tap)
        bridge = self.snapshot.link(self.spec.bridge)
        if tap is None or bridge is None:
            return
        fixes: dict[str, Any] = {}
        if tap.master != bridge.index:
            fixes["master"] = self.spec.bridge
        if tap.mtu != self.spec.mtu:
            fixes["mtu"] = self.spec.mtu
        if not tap.up:
            fixes["up"] = True
        if fixes:
            self.plan.add(f"tap {self.spec.tap}", "update", describe_link(tap, self.snapshot),
                          {"kind": tap.kind, "mtu": self.spec.mtu, "up": True, "master": self.spec.bridge},
                          lambda: self.nl.set_link(self.spec.tap, **fixes))

    def plan_stopped(self) -> None:
        if self.active:
            self.plan.add(f"vm {self.spec.name}", "update", self.status, "stopped", self.stop)
        if self.enabled:
            self.plan.add(
                f"unit {self.spec.unit} enabled", "update", True, False, self.unit.action("disable")
            )
        self.result["status"] = "stopped"

    def plan_absent(self, nl: Netlink) -> None:
        self.require_systemd()
        if self.active:
            self.plan.add(f"vm {self.spec.name}", "delete", self.status, "stopped", self.stop)
        if self.unit_text is not None:

            def remove_unit() -> None:
                run_command(["systemctl", "disable", self.spec.unit], check=False)
                os.unlink(self.paths.unit_file)
                systemd_util.daemon_reload()

            self.plan.add(f"unit {self.spec.unit}", "delete", self.unit_text, None, remove_unit)
        # A running VM's TAP goes with its unit (ExecStopPost); one left behind by a crash is deleted.
        if self.snapshot.link(self.spec.tap) is not None and self.unit_text is not None and not self.active:
            self.plan.add(
                f"tap {self.spec.tap}", "delete", self.spec.tap, None, lambda: nl.delete_link(self.spec.tap)
            )
        if os.path.isdir(self.paths.state_dir):
            self.plan.add(
                f"vm files {self.paths.state_dir}",
                "delete",
                self.paths.state_dir,
                None,
                lambda: shutil.rmtree(self.paths.state_dir),
            )
        helper = qemu.stop_helper_path()
        if os.path.isfile(helper) and not qemu.other_records(self.spec.name):
            self.plan.add(f"file {helper}", "delete", helper, None, lambda: os.unlink(helper))
        self.result.update(status="absent", released_address=None)
        allocator = self.recorded_allocator(nl)
        if allocator is None:  # no record and no bridge: no allocator book to release from
            finish(self.module, self.plan, describe=self.late_result, **self.result)
            return
        with allocator.locked():
            released = allocator.release(self.plan, f"vm-{self.spec.name}")
            self.result["released_address"] = str(released) if released else None
            finish(self.module, self.plan, describe=self.late_result, **self.result)

    def recorded_allocator(self, nl: Netlink) -> OverlayAllocator | None:
        """The book the VM's address came from, as its record says (network, bridge, address):
        the address is released even when the bridge is already gone."""
        bridge = self.record.get("bridge") or self.spec.bridge
        book = NAT_BOOK if self.record.get("network", self.params["network"]) == "nat" else None
        if self.record.get("address"):  # the subnet it was given, even if the bridge was renumbered since
            subnet = ipaddress.IPv4Interface(self.record["address"]).network
            return OverlayAllocator(self.module, addressing_from_subnet(subnet), nl=nl, bridge=bridge,
                                    network=DEFAULT_NETWORK, book=book)
        return open_runner_allocator(self.module, nl, None, bridge, DEFAULT_NETWORK, required=False,
                                     book=book)

    # ---- actions (plan step bodies) ----

    def start(self) -> None:
        run_command(["systemctl", "start", self.spec.unit])
        self.wait_for_qmp()
        self.fall_back_from_kvm()

    def restart(self) -> None:
        if self.unit.is_active():
            self.stop()
        self.start()

    def stop(self) -> None:
        graceful = False
        if qemu_status(self.paths.qmp) in ("running", "paused"):
            try:
                graceful = Qmp(self.paths.qmp).powerdown(self.params["stop_timeout"])
            except Exception:  # QEMU went away mid-exchange: the unit stop below settles it
                graceful = False
        if not graceful:  # the unit's ExecStop would wait for a powerdown again: kill QEMU first
            run_command(["systemctl", "kill", "--signal=SIGKILL", self.spec.unit], check=False)
        run_command(["systemctl", "stop", self.spec.unit])
        self.result["stop"] = "powerdown" if graceful else "killed"

    def wait_for_qmp(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = qemu_status(self.paths.qmp)
            if status is not None:
                self.result["status"] = status
                return
            time.sleep(0.5)
        raise QmpError(
            f"no QMP answer on {self.paths.qmp} {timeout:.0f} s after starting {self.spec.unit} "
            f"(journalctl -u {self.spec.unit})"
        )

    def fall_back_from_kvm(self) -> None:
        """A VM under KVM that stops with an internal error runs under TCG from now on."""
        if self.result.get("accel") != "kvm" or self.params["accel"] != "auto":
            return
        deadline = time.monotonic() + KVM_SETTLE_SECONDS
        while time.monotonic() < deadline:
            if qemu_status(self.paths.qmp) == "internal-error":
                break
            time.sleep(0.5)
        else:
            return
        why = f"TCG, because the VM stopped under KVM with {qemu.KVM_FAILURE}"
        run_command(["systemctl", "stop", self.spec.unit])
        unit_text = qemu.fill_slots(self.params["rendered"]["unit"], accel="tcg")
        write_file(self.module, self.paths.unit_file, unit_text)
        systemd_util.daemon_reload()
        record = json.loads(read_text(self.paths.record) or "{}")
        record.update(accel="tcg", accel_reason=why)
        write_file(
            self.module, self.paths.record, json.dumps(record, indent=2, sort_keys=True) + "\n", mode=0o600
        )
        self.result.update(accel="tcg", accel_reason=why)
        run_command(["systemctl", "start", self.spec.unit])
        self.wait_for_qmp()


def docker_api() -> Any:
    """The runner's Docker engine (its containers hold overlay addresses too), when it has one."""
    if not os.path.exists(DOCKER_SOCKET):
        return None
    try:
        import docker
    except ImportError:
        return None
    return docker.APIClient(base_url=f"unix://{DOCKER_SOCKET}")


def qemu_status(path: str, attempts: int = 1) -> str | None:
    """The VM's QMP status; None when QEMU does not answer (not running, or going away).

    QMP serves one client at a time: reading an active unit's state asks a few times, a second
    apart, so a client that holds the socket for a moment does not get a healthy VM restarted.
    """
    for attempt in range(attempts):
        if attempt:
            time.sleep(1.0)
        try:
            return Qmp(path).status()
        except Exception:  # any failure of the QMP exchange means no usable answer from this QEMU
            continue
    return None


def image_info(path: str) -> dict[str, Any]:
    """qemu-img's view of an image (format, virtual size, backing file); -U: the VM may hold it."""
    return json.loads(run_command([qemu.QEMU_IMG, "info", "--output=json", "-U", path]))


def seed_iso(files: dict[str, str]) -> bytes:
    """The NoCloud ISO: volume id cidata, the files under Joliet and Rock Ridge names (cloud-init's)."""
    import pycdlib  # Debian's python3-pycdlib; imported here: state=absent does not need it

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name in SEED_FILES:
        data = files[name].encode()
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            "/" + name.upper().replace("-", "_") + ".;1",
            rr_name=name,
            joliet_path="/" + name,
        )
    buffer = io.BytesIO()
    iso.write_fp(buffer)
    iso.close()
    return buffer.getvalue()


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, required_if=REQUIRED_IF, supports_check_mode=True)
    manager = VmManager(module)

    def body() -> None:
        manager.validate()
        manager.run()

    guarded(module, body)


if __name__ == "__main__":
    main()
