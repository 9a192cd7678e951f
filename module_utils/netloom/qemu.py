"""QEMU VMs of a runner: names, paths, the command line, accelerator choice (shared by module and plugin).

One VM `NAME` owns, on its node:
- `/var/lib/netloom/vms/NAME/`: `disk.qcow2` (overlay on the base image), `seed.iso` (NoCloud,
  volume id cidata) and the seed's source files, `vm.json` (its TAP, MAC and address, read by
  the collision checks of the other VMs), `serial.log`;
- `/run/netloom/vms/NAME/`: `qmp.sock` and `qemu.pid` (systemd's RuntimeDirectory);
- the unit `netloom-vm-NAME.service` (Restart=on-failure: a killed QEMU comes back) that creates
  the TAP `nlvm-NAME` on the bridge before QEMU starts and deletes it after QEMU ends.

The pure parts (validation, MAC and TAP derivation, the command line) run on the controller
too: the action plugin renders the unit and the seed from the same values the module checks.
"""

from __future__ import annotations

import glob
import hashlib
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ansible.module_utils.netloom.common import IFNAME_MAX, InputError, ifname, int_range

STATE_DIR = "var/lib/netloom/vms"  # under the node's root: / (NETLOOM_STATE_ROOT in tests, as the allocator)
RUN_ROOT = "/run/netloom/vms"
UNIT_PREFIX = "netloom-vm-"
TAP_PREFIX = "nlvm-"
OVERLAY_BRIDGE = "kohaku-overlay"
NAT_BRIDGE = "netloom-vmnat"  # standard mode: vm_nat_network's bridge (10.200.0.1/24, MASQUERADE)
NETWORKS = ("overlay", "nat")
# The TAP's MTU by network: the overlay's VXLAN leaves 1450 of the underlay's 1500.
DEFAULT_MTU = {"overlay": 1450, "nat": 1500}
MAC_PREFIX = "52:54:00"
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
QEMU_IMG = "/usr/bin/qemu-img"
# Slots the action plugin leaves in the rendered files; only the node knows their values.
ACCEL_SLOT = "@NETLOOM_VM_ACCEL@"
ADDRESS_SLOT = "@NETLOOM_VM_ADDRESS@"
GATEWAY_SLOT = "@NETLOOM_VM_GATEWAY@"
MEMORY_MB = (64, 1048576)
VCPUS = (1, 255)
ACCELS = ("auto", "kvm", "tcg")
KVM_FAILURE = "KVM internal error"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
_MAC_RE = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")
_TAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,31}")
_PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# A control character (newline above all) in a value written into the unit would end its ExecStart line.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
STOP_TIMEOUT = (1, 3600)
# The unit's ExecStop: qemu_vm writes module_utils/netloom/vmstop.py here (stdlib + qemu.qmp only).
STOP_HELPER = "vmstop.py"
STOP_GRACE_SECONDS = 30  # TimeoutStopSec = stop_timeout + this: systemd kills only after the helper gave up
# QEMU's seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec, no scheduler
# changes. The unit creates the TAP before QEMU starts, so QEMU needs none of them.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def vm_name(field_name: str, value: Any) -> str:
    """The VM id: lower-case letters, digits and '-', short enough for its TAP name."""
    text = value if isinstance(value, str) else ""
    if not _NAME_RE.fullmatch(text):
        raise InputError(
            field_name,
            value,
            "a VM name is lower-case letters, digits and '-', starting with a letter or digit",
        )
    tap = TAP_PREFIX + text
    if len(tap) > IFNAME_MAX:
        raise InputError(
            field_name,
            value,
            f"its TAP name {tap} would be {len(tap)} characters; "
            f"interface names hold {IFNAME_MAX} "
            f"(names of at most {IFNAME_MAX - len(TAP_PREFIX)})",
        )
    return text


def tap_name(name: str) -> str:
    return TAP_PREFIX + name


def derived_mac(name: str) -> str:
    """52:54:00 plus three bytes of sha256(name): the same VM gets the same MAC on every run."""
    digest = hashlib.sha256(name.encode()).digest()
    return f"{MAC_PREFIX}:{digest[0]:02x}:{digest[1]:02x}:{digest[2]:02x}"


def mac_address(field_name: str, value: Any) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else ""
    if not _MAC_RE.fullmatch(text):
        raise InputError(
            field_name, value, "a VM MAC is 52:54:00:xx:xx:xx (QEMU's locally administered prefix)"
        )
    return text


def plain_text(field_name: str, value: Any) -> str:
    """A value that goes into the unit file verbatim: no control characters (no newline injection)."""
    text = str(value)
    if _CONTROL_RE.search(text):
        raise InputError(field_name, value, "control characters (newline, tab, ...) are not allowed")
    return text


def size_bytes(field_name: str, value: Any) -> int:
    """ "10G", "512M", "2GiB" or a byte count."""
    match = _SIZE_RE.fullmatch(str(value).strip())
    if isinstance(value, bool) or not match:
        raise InputError(field_name, value, "a size like 10G, 512M or a number of bytes")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size <= 0:
        raise InputError(field_name, value, "must be more than 0")
    return size


def pci_address(field_name: str, value: Any) -> str:
    text = str(value).strip().lower()
    if len(text) == 7:  # 01:00.0 -> 0000:01:00.0
        text = "0000:" + text
    if not _PCI_RE.fullmatch(text):
        raise InputError(field_name, value, "a PCI address like 0000:01:00.0")
    return text


@dataclass(frozen=True)
class Share:
    """A 9p share: host folder exported under a mount tag."""

    tag: str
    source: str
    readonly: bool


@dataclass(frozen=True)
class VmSpec:
    """Everything the command line and the seed depend on, validated."""

    name: str
    memory_mb: int
    vcpus: int
    mac: str
    bridge: str
    mtu: int
    kernel: str | None
    initrd: str | None
    append: str
    shares: tuple[Share, ...]
    vfio: tuple[str, ...]
    stop_timeout: int

    @property
    def tap(self) -> str:
        return tap_name(self.name)

    @property
    def unit(self) -> str:
        return f"{UNIT_PREFIX}{self.name}.service"

    @property
    def paths(self) -> VmPaths:
        return VmPaths(self.name)


def vms_root() -> str:
    return os.path.join(os.environ.get("NETLOOM_STATE_ROOT") or "/", STATE_DIR)


@dataclass(frozen=True)
class VmPaths:
    name: str

    @property
    def state_dir(self) -> str:
        return os.path.join(vms_root(), self.name)

    @property
    def run_dir(self) -> str:
        return os.path.join(RUN_ROOT, self.name)

    @property
    def disk(self) -> str:
        return os.path.join(self.state_dir, "disk.qcow2")

    @property
    def seed(self) -> str:
        return os.path.join(self.state_dir, "seed.iso")

    @property
    def record(self) -> str:
        return os.path.join(self.state_dir, "vm.json")

    @property
    def serial_log(self) -> str:
        return os.path.join(self.state_dir, "serial.log")

    @property
    def qmp(self) -> str:
        return os.path.join(self.run_dir, "qmp.sock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.run_dir, "qemu.pid")

    @property
    def unit_file(self) -> str:
        return f"/etc/systemd/system/{UNIT_PREFIX}{self.name}.service"


def parse_shares(field_name: str, value: Iterable[Mapping[str, Any]] | None) -> tuple[Share, ...]:
    shares: list[Share] = []
    for index, entry in enumerate(value or []):
        tag = entry.get("tag")
        if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
            raise InputError(
                f"{field_name}[{index}].tag", tag, "a 9p mount tag is 1..31 of letters, digits and _.-"
            )
        if tag in {share.tag for share in shares}:
            raise InputError(f"{field_name}[{index}].tag", tag, "used by another share of this VM")
        source = entry.get("source")
        if not isinstance(source, str) or not os.path.isabs(source) or "," in source:
            raise InputError(f"{field_name}[{index}].source", source, "an absolute path without ','")
        plain_text(f"{field_name}[{index}].source", source)
        check_share_source(f"{field_name}[{index}].source", os.path.normpath(source))
        shares.append(Share(tag, os.path.normpath(source), bool(entry.get("readonly", False))))
    return tuple(shares)


# QEMU runs as root: a share of (or above) these would hand the guest the host's system, or
# netloom's own files (the units' ExecStop helper, other VMs' disks), to read or rewrite.
PROTECTED_PATHS = ("/etc", "/usr", "/boot", "/bin", "/sbin", "/lib", "/lib64", "/proc", "/sys", "/dev",
                   "/run", "/root", "/var/lib/netloom", "/var/lib/docker")


def check_share_source(field_name: str, source: str) -> None:
    """Refuse / and any folder that is, holds or lies inside a protected system or netloom path."""
    for protected in PROTECTED_PATHS:
        if source == "/" or source == protected or protected.startswith(source + "/") \
                or source.startswith(protected + "/"):
            shared = protected if source != "/" else "/"
            raise InputError(field_name, source, f"shares {shared} with the guest (QEMU runs as root): "
                                                 "share a folder of its own")


def default_bridge(network: str) -> str:
    """The runner's overlay bridge, or in standard mode vm_nat_network's NAT bridge."""
    return NAT_BRIDGE if network == "nat" else OVERLAY_BRIDGE


def parse_spec(params: Mapping[str, Any]) -> VmSpec:
    """The pure validation of the options (no node access): same on controller and node."""
    name = vm_name("name", params["name"])
    kernel = params.get("kernel")
    initrd = params.get("initrd")
    for key, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None and not os.path.isabs(str(path)):
            raise InputError(key, path, "an absolute path on the node")
        if path is not None:
            plain_text(key, path)
    if initrd and not kernel:
        raise InputError("initrd", initrd, "an initrd needs `kernel` (direct kernel boot)")
    mac = mac_address("mac", params["mac"]) if params.get("mac") else derived_mac(name)
    network = params.get("network") or "overlay"
    if network not in NETWORKS:
        raise InputError("network", network, f"must be one of {', '.join(NETWORKS)}")
    return VmSpec(
        name=name,
        memory_mb=int_range("memory_mb", params["memory_mb"], *MEMORY_MB),
        vcpus=int_range("vcpus", params["vcpus"], *VCPUS),
        mac=mac,
        bridge=ifname("bridge", params.get("bridge") or default_bridge(network)),
        mtu=int_range("mtu", params.get("mtu") or DEFAULT_MTU[network], 576, 9000),
        kernel=str(kernel) if kernel else None,
        initrd=str(initrd) if initrd else None,
        append=plain_text("kernel_append", params.get("kernel_append") or ""),
        shares=parse_shares("shares", params.get("shares")),
        vfio=tuple(
            pci_address(f"vfio[{index}]", value) for index, value in enumerate(params.get("vfio") or [])
        ),
        stop_timeout=int_range("stop_timeout", params.get("stop_timeout", 300), *STOP_TIMEOUT),
    )


def qemu_argv(spec: VmSpec, accel: str) -> list[str]:
    """The QEMU command line: no defaults, no display, QMP and serial in the VM's own files."""
    paths = spec.paths
    argv = [
        QEMU_BINARY,
        "-name",
        f"guest={spec.name},process=qemu-{spec.name}",
        "-machine",
        "q35",
        "-accel",
        accel,
        "-cpu",
        "max",
        "-m",
        str(spec.memory_mb),
        "-smp",
        str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-drive",
        f"file={paths.disk},id=disk0,if=virtio,format=qcow2,discard=unmap",
        "-drive",
        f"file={paths.seed},if=virtio,format=raw,readonly=on",
        "-netdev",
        f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
        "-device",
        f"virtio-net-pci,netdev=net0,mac={spec.mac},host_mtu={spec.mtu},romfile=",
        "-chardev",
        f"file,id=serial0,path={paths.serial_log},append=on",
        "-serial",
        "chardev:serial0",
        "-qmp",
        f"unix:{paths.qmp},server=on,wait=off",
        "-pidfile",
        paths.pidfile,
        "-sandbox",
        SANDBOX,
    ]
    if spec.kernel:
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        argv += ["-append", spec.append or "root=/dev/vda rw console=ttyS0"]
    for index, share in enumerate(spec.shares):
        readonly = ",readonly=on" if share.readonly else ""
        argv += [
            "-fsdev",
            f"local,id=fs{index},path={share.source},security_model=mapped-xattr{readonly}",
            "-device",
            f"virtio-9p-pci,fsdev=fs{index},mount_tag={share.tag}",
        ]
    for address in spec.vfio:
        argv += ["-device", f"vfio-pci,host={address}"]
    return argv


def systemd_quote(word: str) -> str:
    """One ExecStart word: quoted when it holds a space or a quote; '%' and '$' kept literal."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_variables(spec: VmSpec) -> dict[str, Any]:
    """What templates/systemd/netloom-vm.service.j2 renders (accel left as a node slot)."""
    return {
        "name": spec.name,
        "tap": spec.tap,
        "bridge": spec.bridge,
        "mtu": spec.mtu,
        "run_dir": os.path.relpath(spec.paths.run_dir, "/run"),
        "exec_start": " ".join(systemd_quote(word) for word in qemu_argv(spec, ACCEL_SLOT)),
        "exec_stop": " ".join(systemd_quote(word) for word in stop_argv(spec)),
        "timeout_stop": spec.stop_timeout + STOP_GRACE_SECONDS,
    }


def stop_helper_path() -> str:
    return os.path.join(vms_root(), STOP_HELPER)


def stop_argv(spec: VmSpec) -> list[str]:
    """The unit's ExecStop: system_powerdown over QMP and wait up to stop_timeout (vmstop.py)."""
    return ["/usr/bin/python3", "-I", stop_helper_path(), spec.paths.qmp, str(spec.stop_timeout)]


# ---- the NoCloud seed ----


@dataclass(frozen=True)
class GuestUser:
    name: str
    ssh_keys: tuple[str, ...]
    sudo: bool


def parse_users(field_name: str, value: Iterable[Mapping[str, Any]] | None) -> tuple[GuestUser, ...]:
    users: list[GuestUser] = []
    for index, entry in enumerate(value or []):
        name = entry.get("name")
        if not isinstance(name, str) or not _USER_RE.fullmatch(name):
            raise InputError(
                f"{field_name}[{index}].name", name, "a user name like deploy ([a-z_][a-z0-9_-]*)"
            )
        keys = []
        for key_index, key in enumerate(entry.get("ssh_keys") or []):
            text = str(key).strip()
            if (
                "\n" in text
                or len(text.split()) < 2
                or not text.split()[0].startswith(("ssh-", "ecdsa-", "sk-"))
            ):
                raise InputError(
                    f"{field_name}[{index}].ssh_keys[{key_index}]",
                    key,
                    "one OpenSSH public key line (type, key, optional comment)",
                )
            keys.append(text)
        users.append(GuestUser(name, tuple(keys), bool(entry.get("sudo", True))))
    return tuple(users)


def seed_variables(spec: VmSpec, users: tuple[GuestUser, ...], dns: Iterable[str]) -> dict[str, Any]:
    """What the three NoCloud templates render; address and gateway are node slots."""
    return {
        "instance_id": f"netloom-vm-{spec.name}",
        "hostname": spec.name,
        "users": [{"name": user.name, "ssh_keys": list(user.ssh_keys), "sudo": user.sudo} for user in users],
        "mac": spec.mac,
        "mtu": spec.mtu,
        "address": ADDRESS_SLOT,
        "gateway": GATEWAY_SLOT,
        "dns": list(dns),
    }


def fill_slots(
    text: str,
    accel: str | None = None,
    address: ipaddress.IPv4Interface | None = None,
    gateway: ipaddress.IPv4Address | None = None,
) -> str:
    """The rendered text with the node's values (address with its prefix, e.g. 10.1.255.254/16)."""
    for slot, value in ((ACCEL_SLOT, accel), (ADDRESS_SLOT, address), (GATEWAY_SLOT, gateway)):
        if value is not None:
            text = text.replace(slot, str(value))
    return text


# ---- accelerator ----


def kvm_usable(probe_seconds: float = 4.0) -> tuple[bool, str]:
    """Whether a KVM guest really runs here, and why not.

    /dev/kvm opening is not enough: with broken nested virtualisation QEMU aborts at vCPU reset
    or the guest stops with "KVM internal error". So run the firmware for a few seconds under
    KVM with the VM's machine and CPU model and watch for that (or any exit).
    """
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable"
    # The VM's own machine and CPU model: on the test machines `-cpu max` under nested KVM
    # aborts at vCPU reset ("failed to set MSR"), which a probe with the default CPU does not see.
    argv = [QEMU_BINARY, "-machine", "q35", "-accel", "kvm", "-cpu", "max", "-nodefaults", "-no-user-config",
            "-display", "none", "-m", "32", "-serial", "none", "-monitor", "none", "-no-reboot"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=probe_seconds, check=False)
    except subprocess.TimeoutExpired as timeout:
        output = (
            (timeout.stderr or b"").decode(errors="replace")
            if isinstance(timeout.stderr, bytes)
            else (timeout.stderr or "")
        )
        if KVM_FAILURE in output:
            return False, f"a KVM guest fails here ({KVM_FAILURE})"
        return True, "a KVM guest ran"
    output = proc.stderr + proc.stdout
    if KVM_FAILURE in output:
        return False, f"a KVM guest fails here ({KVM_FAILURE})"
    return False, f"QEMU with KVM exited {proc.returncode}: {output.strip()[-300:]}"


def choose_accel(requested: str, probe: Any = kvm_usable) -> tuple[str, str]:
    """(accel, why). auto: KVM when a KVM guest really runs, TCG otherwise; kvm: KVM or fail."""
    if requested == "tcg":
        return "tcg", "tcg requested"
    works, why = probe()
    if works:
        return "kvm", why
    if requested == "kvm":
        raise InputError("accel", requested, f"KVM is not usable here: {why}")
    return "tcg", f"TCG, because {why}"


# ---- what the other VMs of the node hold (collision checks) ----


def other_records(name: str, root: str | None = None) -> dict[str, dict[str, Any]]:
    """vm.json of every other VM on this node: name -> {tap, mac, address}."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(root or vms_root(), "*", "vm.json"))):
        other = os.path.basename(os.path.dirname(path))
        if other == name:
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                found[other] = json.load(handle)
        except (OSError, ValueError):
            continue  # a half-written record of a VM being created: its unit owns the names anyway
    return found


def check_vfio(field_name: str, address: str, sysfs: str = "/sys/bus/pci/devices") -> None:
    """A VFIO device must exist, sit in an IOMMU group and be bound to vfio-pci."""
    device = os.path.join(sysfs, address)
    if not os.path.isdir(device):
        raise InputError(field_name, address, "no such PCI device on this node")
    if not os.path.exists(os.path.join(device, "iommu_group")):
        raise InputError(field_name, address, "the device is in no IOMMU group (IOMMU off?)")
    driver = os.path.join(device, "driver")
    bound = os.path.basename(os.path.realpath(driver)) if os.path.exists(driver) else None
    if bound != "vfio-pci":
        raise InputError(field_name, address, f"bound to {bound or 'no driver'}, not vfio-pci")
