"""qemu_vm's pure parts: names and MACs, the QEMU command line, the NoCloud seed, accelerator choice."""

from __future__ import annotations

import io
import ipaddress
import json
import pathlib

import pycdlib
import pytest
import yaml
from ansible.module_utils.netloom import qemu
from ansible.module_utils.netloom.common import InputError

from action_plugins.qemu_vm import ActionModule
from plugin_utils.netloom_action import module_argument_spec, normalised

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyMaterialForTestsOnly0000000000000 test@netloom"


def raw_args(**overrides: object) -> dict:
    return {
        "name": "web1",
        "base_image": "/var/lib/netloom/images/guest.qcow2",
        "kernel": "/var/lib/netloom/images/vmlinuz",
        "initrd": "/var/lib/netloom/images/initrd.img",
        "users": [{"name": "deploy", "ssh_keys": [KEY]}],
        "dns": ["192.0.2.53"],
        "shares": [{"tag": "data", "source": "/srv/data", "readonly": True}],
        **overrides,
    }


def params(**overrides: object) -> dict:
    result = normalised(module_argument_spec("qemu_vm"), raw_args(**overrides))
    assert result is not None
    return result


def test_tap_name_over_15_characters_is_refused_naming_the_field() -> None:
    assert qemu.tap_name(qemu.vm_name("name", "abcdefghij")) == "nlvm-abcdefghij"
    with pytest.raises(InputError) as err:
        qemu.vm_name("name", "abcdefghijk")
    assert err.value.field_name == "name" and "nlvm-abcdefghijk would be 16 characters" in str(err.value)


@pytest.mark.parametrize("bad", ["Web1", "-web", "web_1", "", "web\n", None, 7])
def test_bad_vm_names(bad: object) -> None:
    with pytest.raises(InputError, match="name="):
        qemu.vm_name("name", bad)


def test_mac_is_stable_per_name_and_in_qemus_prefix() -> None:
    mac = qemu.derived_mac("web1")
    assert mac == qemu.derived_mac("web1") and mac.startswith("52:54:00:")
    assert qemu.mac_address("mac", mac.upper()) == mac
    assert len({qemu.derived_mac(f"vm{index}") for index in range(200)}) == 200
    with pytest.raises(InputError, match="mac="):
        qemu.mac_address("mac", "02:00:00:00:00:01")


@pytest.mark.parametrize(
    ("field", "value"), [("memory_mb", 32), ("memory_mb", 2**21), ("vcpus", 0), ("vcpus", 256), ("mtu", 100)]
)
def test_out_of_range_sizes_name_the_field(field: str, value: int) -> None:
    with pytest.raises(InputError) as err:
        qemu.parse_spec(params(**{field: value}))
    assert err.value.field_name == field and err.value.value == value


def test_sizes_and_pci_addresses() -> None:
    assert qemu.size_bytes("disk_size", "2G") == 2 << 30
    assert qemu.size_bytes("disk_size", "512MiB") == 512 << 20
    assert qemu.pci_address("vfio[0]", "01:00.0") == "0000:01:00.0"
    for bad in ("0", "-1G", "ten", True):
        with pytest.raises(InputError, match="disk_size="):
            qemu.size_bytes("disk_size", bad)
    with pytest.raises(InputError, match=r"vfio\[0\]="):
        qemu.pci_address("vfio[0]", "0000:01:00")


def test_share_tags_are_unique_and_sources_absolute() -> None:
    with pytest.raises(InputError, match=r"shares\[1\].tag="):
        qemu.parse_shares("shares", [{"tag": "a", "source": "/a"}, {"tag": "a", "source": "/b"}])
    with pytest.raises(InputError, match=r"shares\[0\].source="):
        qemu.parse_shares("shares", [{"tag": "a", "source": "relative"}])


def test_command_line() -> None:
    spec = qemu.parse_spec(params())
    argv = qemu.qemu_argv(spec, "tcg")
    joined = " ".join(argv)
    assert argv[0] == qemu.QEMU_BINARY
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-m") + 1] == "512" and argv[argv.index("-smp") + 1] == "1"
    assert "tap,id=net0,ifname=nlvm-web1,script=no,downscript=no" in argv
    assert f"virtio-net-pci,netdev=net0,mac={qemu.derived_mac('web1')},host_mtu=1450,romfile=" in argv
    assert "unix:/run/netloom/vms/web1/qmp.sock,server=on,wait=off" in argv
    assert argv[argv.index("-pidfile") + 1] == "/run/netloom/vms/web1/qemu.pid"
    assert "file=/var/lib/netloom/vms/web1/disk.qcow2,id=disk0,if=virtio,format=qcow2,discard=unmap" in argv
    assert "file=/var/lib/netloom/vms/web1/seed.iso,if=virtio,format=raw,readonly=on" in argv
    assert argv[argv.index("-kernel") + 1] == "/var/lib/netloom/images/vmlinuz"
    assert argv[argv.index("-append") + 1] == "root=/dev/vda rw console=ttyS0"
    assert "local,id=fs0,path=/srv/data,security_model=mapped-xattr,readonly=on" in argv
    assert argv[argv.index("-sandbox") + 1] == qemu.SANDBOX
    assert "virtio-9p-pci,fsdev=fs0,mount_tag=data" in argv
    assert "-monitor" not in argv and "vfio" not in joined


def test_command_line_boot_from_disk_and_vfio() -> None:
    spec = qemu.parse_spec(params(kernel=None, initrd=None, shares=[], vfio=["0000:01:00.0"]))
    argv = qemu.qemu_argv(spec, "kvm")
    assert "-kernel" not in argv and "-append" not in argv
    assert argv[-2:] == ["-device", "vfio-pci,host=0000:01:00.0"]
    with pytest.raises(InputError, match="initrd="):
        qemu.parse_spec(params(kernel=None))


def test_unit_exec_start_quotes_words_for_systemd() -> None:
    assert qemu.systemd_quote("root=/dev/vda rw") == '"root=/dev/vda rw"'
    assert qemu.systemd_quote("a%b$c") == "a%%b$$c"
    spec = qemu.parse_spec(params(kernel_append="root=/dev/vda rw console=ttyS0 quiet"))
    text = qemu.unit_variables(spec)["exec_start"]
    assert '-append "root=/dev/vda rw console=ttyS0 quiet"' in text
    assert f"-accel {qemu.ACCEL_SLOT} " in text


def test_unit_stops_the_guest_over_qmp_within_stop_timeout() -> None:
    variables = qemu.unit_variables(qemu.parse_spec(params(stop_timeout=120)))
    assert variables["exec_stop"] == ("/usr/bin/python3 -I /var/lib/netloom/vms/vmstop.py "
                                      "/run/netloom/vms/web1/qmp.sock 120")
    assert variables["timeout_stop"] == 120 + qemu.STOP_GRACE_SECONDS


@pytest.mark.parametrize(("field", "value"), [
    ("kernel_append", "console=ttyS0\nExecStartPre=/bin/sh -c id"),
    ("kernel_append", "quiet\rx"),
    ("kernel", "/boot/vmlinuz\n"),
    ("bridge", "br\nx"),
    ("bridge", "a-bridge-name-too-long"),
    ("stop_timeout", 0),
])
def test_values_written_into_the_unit_are_refused_with_control_characters(field: str, value: object) -> None:
    with pytest.raises(InputError) as caught:
        qemu.parse_spec(params(**{field: value}))
    assert caught.value.field_name == field


def test_a_share_source_with_a_newline_is_refused() -> None:
    with pytest.raises(InputError) as caught:
        qemu.parse_shares("shares", [{"tag": "data", "source": "/srv/da\nta"}])
    assert caught.value.field_name == "shares[0].source"


@pytest.mark.parametrize("source", ["/", "/var", "/var/lib/netloom", "/var/lib/netloom/vms", "/etc/systemd",
                                    "/run/netloom", "/root/.ssh", "/usr/lib"])
def test_a_share_of_the_host_system_or_of_netloom_files_is_refused(source: str) -> None:
    """QEMU runs as root: a writable share of these would let the guest rewrite the host."""
    with pytest.raises(InputError) as caught:
        qemu.parse_shares("shares", [{"tag": "data", "source": source}])
    assert caught.value.field_name == "shares[0].source" and "share a folder of its own" in str(caught.value)


def test_a_folder_of_its_own_is_shared() -> None:
    shares = qemu.parse_shares("shares", [{"tag": "data", "source": "/srv/vmshare/"}])
    assert shares[0].source == "/srv/vmshare"


def rendered_seed(**overrides: object) -> dict[str, str]:
    files = ActionModule.rendered_args(raw_args(**overrides))["rendered"]
    address = ipaddress.IPv4Interface("10.1.255.254/16")
    gateway = ipaddress.IPv4Address("10.1.0.1")
    return {
        name: qemu.fill_slots(text, accel="tcg", address=address, gateway=gateway)
        for name, text in files.items()
    }


def test_nocloud_rendering() -> None:
    files = rendered_seed()
    meta = yaml.safe_load(files["meta-data"])
    assert meta == {"instance-id": "netloom-vm-web1", "local-hostname": "web1"}
    assert rendered_seed()["meta-data"] == files["meta-data"]  # stable instance-id
    assert files["user-data"].startswith("#cloud-config\n")
    user_data = yaml.safe_load(files["user-data"])
    assert user_data["users"] == [
        {
            "name": "deploy",
            "shell": "/bin/bash",
            "lock_passwd": True,
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "ssh_authorized_keys": [KEY],
        }
    ]
    assert user_data["ssh_pwauth"] is False
    network = yaml.safe_load(files["network-config"])
    assert network == {
        "version": 2,
        "ethernets": {
            "overlay0": {
                "match": {"macaddress": qemu.derived_mac("web1")},
                "set-name": "eth0",
                "mtu": 1450,
                "addresses": ["10.1.255.254/16"],
                "routes": [{"to": "0.0.0.0/0", "via": "10.1.0.1"}],
                "nameservers": {"addresses": ["192.0.2.53"]},
            }
        },
    }
    assert "ExecStart=/usr/bin/qemu-system-x86_64 " in files["unit"] and "-accel tcg " in files["unit"]


def test_user_data_cannot_be_injected_through_a_key_comment() -> None:
    with pytest.raises(InputError, match=r"users\[0\].ssh_keys\[0\]="):
        qemu.parse_users("users", [{"name": "deploy", "ssh_keys": [KEY + "\nruncmd: [reboot]"]}])
    quoted = KEY.replace("test@netloom", 'x" ]: {a: b}')
    files = rendered_seed(users=[{"name": "deploy", "ssh_keys": [quoted]}])
    assert yaml.safe_load(files["user-data"])["users"][0]["ssh_authorized_keys"] == [quoted]


def test_plugin_renders_nothing_for_bad_input() -> None:
    args = {"name": "abcdefghijk", "base_image": "/x.qcow2"}
    assert "rendered" not in ActionModule.rendered_args(args)


def test_seed_iso_has_volume_id_cidata_and_the_three_files(tmp_path: pathlib.Path) -> None:
    from library.qemu_vm import seed_iso

    files = {name: text for name, text in rendered_seed().items() if name != "unit"}
    path = tmp_path / "seed.iso"
    path.write_bytes(seed_iso(files))
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        for name, text in files.items():
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            assert out.getvalue().decode() == text
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
            assert out.getvalue().decode() == text
    finally:
        iso.close()


def test_accel_choice() -> None:
    broken = lambda: (False, f"a KVM guest fails here ({qemu.KVM_FAILURE})")  # noqa: E731
    working = lambda: (True, "a KVM guest ran")  # noqa: E731
    assert qemu.choose_accel("auto", broken) == (
        "tcg",
        f"TCG, because a KVM guest fails here ({qemu.KVM_FAILURE})",
    )
    assert qemu.choose_accel("auto", working) == ("kvm", "a KVM guest ran")
    assert qemu.choose_accel("tcg", working)[0] == "tcg"
    with pytest.raises(InputError, match="accel='kvm'"):
        qemu.choose_accel("kvm", broken)


def test_other_vms_records_feed_the_collision_check(tmp_path: pathlib.Path) -> None:
    for name, mac in (("web1", "52:54:00:00:00:01"), ("web2", "52:54:00:00:00:02")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vm.json").write_text(json.dumps({"mac": mac, "tap": qemu.tap_name(name)}))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vm.json").write_text("{")
    assert qemu.other_records("web1", str(tmp_path)) == {
        "web2": {"mac": "52:54:00:00:00:02", "tap": "nlvm-web2"}
    }


def test_vfio_checks_a_device_that_does_not_exist(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InputError, match="no such PCI device"):
        qemu.check_vfio("vfio[0]", "0000:7f:1f.7", str(tmp_path))
    device = tmp_path / "0000:01:00.0"
    device.mkdir()
    with pytest.raises(InputError, match="no IOMMU group"):
        qemu.check_vfio("vfio[0]", "0000:01:00.0", str(tmp_path))
    (device / "iommu_group").symlink_to(tmp_path)
    (tmp_path / "drivers" / "nvidia").mkdir(parents=True)
    (device / "driver").symlink_to(tmp_path / "drivers" / "nvidia")
    with pytest.raises(InputError, match="bound to nvidia, not vfio-pci"):
        qemu.check_vfio("vfio[0]", "0000:01:00.0", str(tmp_path))
