"""Every template in templates/, rendered as the controller renders it, checked by the real tool.

haproxy -c -f for the HAProxy config, wg-quick strip (plus the wg key check the module runs) for
the wg-quick config, systemd-analyze verify for units and drop-ins (it needs no systemd as PID 1),
and a JSON parse for the CNI conflist (no CNI tool on a node). A new template without a case here
fails test_every_template_has_a_case.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest
from ansible.module_utils.netloom import haproxy, persist, pods, wireguard

from filter_plugins.netloom import netloom_edge_cni_conflist
from plugin_utils.netloom_action import TEMPLATES_DIR, render_file, restore_units, template_path

SEED_RELAYS = {"relays": [
    {"name": "s3", "bind": "127.0.0.1:9000", "backend_host": "s3-storage", "backend_port": 9000},
    {"name": "database", "bind": "127.0.0.1:8001", "backend_host": "database", "backend_port": 8000},
    {"name": "victorialogs", "bind": "127.0.0.1:9428", "backend_host": "victorialogs", "backend_port": 9428},
    {"name": "registry", "bind": "10.99.0.1:5010", "transparent": True, "backend_host": "192.0.2.10",
     "backend_port": 5000, "health_check": {"enabled": False}},
]}
KEY = "4BeHHXkD0nfIaV7Zwd/V4Ajwn6ZBVHrnCsJjNRXUgkA="


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (scripts/bootstrap.sh installs it)")
    return subprocess.run(argv, capture_output=True, text=True, check=False, env={**os.environ, **env})


def verify_units(folder: pathlib.Path, unit: str, own_files: list[pathlib.Path]) -> None:
    """systemd-analyze verify UNIT with `folder` as the unit path: rc 0 and no word about our files."""
    proc = run(["systemd-analyze", "verify", "--man=no", str(folder / unit)],
               SYSTEMD_UNIT_PATH=f"{folder}:", SYSTEMD_LOG_LEVEL="notice")
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if any(str(path) in line for path in own_files)]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def check_haproxy_config(tmp_path: pathlib.Path) -> None:
    for resolvers in ({}, {"enabled": False}, {"nameservers": ["127.0.0.11:53", "192.0.2.53"]}):
        config = haproxy.parse_config({**SEED_RELAYS, "resolvers": resolvers})
        text = render_file(template_path(haproxy.CONFIG_TEMPLATE), haproxy.config_variables(config),
                           haproxy.TEMPLATE_FILTERS)
        path = tmp_path / "haproxy.cfg"
        path.write_text(text)
        proc = run(["haproxy", "-c", "-f", str(path)])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert ("resolvers docker" in text) == (resolvers != {"enabled": False} and "name" not in resolvers)
        assert "server s3 s3-storage:9000 " in text and "init-addr last,libc,none" in text


def dropin_case(template: str, unit_source: str, unit: str, variables: dict[str, object],
                file_name: str) -> Callable[[pathlib.Path], None]:
    """A drop-in is verified with the unit it extends, as the node's systemd would load them."""
    def check(tmp_path: pathlib.Path) -> None:
        if not os.path.exists(unit_source):
            pytest.skip(f"{unit_source} is not installed (scripts/bootstrap.sh installs its package)")
        shutil.copy(unit_source, tmp_path / os.path.basename(unit_source))
        dropin = tmp_path / f"{os.path.basename(unit_source)}.d" / file_name
        dropin.parent.mkdir()
        dropin.write_text(render_file(template_path(template), variables))
        verify_units(tmp_path, unit, [dropin])
    return check


def check_restore_units(tmp_path: pathlib.Path) -> None:
    entries = {"40-wireguard_routes@wg0.json": {"netloom_restore": {"after": ["wg-quick@wg0.service"]}}}
    texts = persist._unit_texts(entries, persist.unit_templates({"rendered": restore_units()}))
    paths = []
    for unit, text in texts.items():
        assert persist.PYTHON_SLOT not in text and persist.AFTER_SLOT not in text
        assert f"ExecStart={sys.executable} /{persist.RUNNER} " in text
        (tmp_path / unit).write_text(text)
        paths.append(tmp_path / unit)
    for unit in texts:
        verify_units(tmp_path, unit, paths)


def check_wg_quick_config(tmp_path: pathlib.Path) -> None:
    params = {"name": "wg0", "config_dir": "/etc/wireguard", "addresses": ["10.99.0.2/24"],
              "listen_port": 51820, "mtu": 1420,
              "peers": [{"public_key": KEY, "allowed_ips": ["10.99.0.0/24", "10.88.0.0/16"],
                         "endpoint": "192.0.2.1:51820", "persistent_keepalive": 25, "preshared_key": KEY},
                        {"public_key": KEY.replace("4", "5"), "allowed_ips": []}]}
    text = render_file(template_path(wireguard.CONFIG_TEMPLATE), wireguard.config_variables(params),
                       wireguard.TEMPLATE_FILTERS)
    path = tmp_path / "wg0.conf"
    path.write_text(text)
    path.chmod(0o600)
    proc = run(["wg-quick", "strip", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert wireguard.stripped_config_problem(proc.stdout) is None
    assert "Table = off" in text and "PostUp = wg set %i private-key /etc/wireguard/wg0.key" in text
    assert KEY not in text.replace(f"PublicKey = {KEY}", ""), "no key material but public keys"


def check_cni_conflist(tmp_path: pathlib.Path) -> None:
    del tmp_path  # nothing to write: the conflist is JSON and parsed as such
    values = netloom_edge_cni_conflist("10.88.1.0/24", "10.88.0.0/16", "10.88.0.1", "esb-cni0", "esb-workers")
    conflist = json.loads(render_file(template_path("cni/esb-workers.conflist.j2"), {"cni": values}))
    assert [plugin["type"] for plugin in conflist["plugins"]] == ["bridge", "portmap"]
    assert conflist["plugins"][0]["ipam"]["ranges"][0][0]["rangeStart"] == "10.88.1.1"


def check_nginx_router(tmp_path: pathlib.Path) -> None:
    """The pod router alone under a wrapper config, as the module checks it: nginx -t accepts it."""
    variables = pods.router_variables("pod-a", pods.services("services", None, 80), 3000, 80, 3600, True)
    text = render_file(template_path("nginx/hostname_router.conf.j2"), variables)
    (tmp_path / "router.conf").write_text(text)
    (tmp_path / "nginx.conf").write_text(f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
                                         f"http {{\n    include {tmp_path}/router.conf;\n}}\n")
    proc = run(["nginx", "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")])
    assert proc.returncode == 0, proc.stderr
    assert text.startswith(pods.ROUTER_MARKER) and "$1" not in text


def check_vm_unit(tmp_path: pathlib.Path) -> None:
    from ansible.module_utils.netloom import qemu

    images = "/var/lib/netloom/images"
    spec = qemu.parse_spec({"name": "web1", "memory_mb": 512, "vcpus": 1, "mtu": 1450,
                            "kernel": f"{images}/vmlinuz", "initrd": f"{images}/initrd.img",
                            "kernel_append": "root=/dev/vda rw console=ttyS0",
                            "shares": [{"tag": "data", "source": "/srv/data"}]})
    unit_text = render_file(template_path("systemd/netloom-vm.service.j2"), qemu.unit_variables(spec))
    text = qemu.fill_slots(unit_text, accel="tcg")
    unit = tmp_path / spec.unit
    unit.write_text(text)
    verify_units(tmp_path, unit.name, [unit])
    assert '-append "root=/dev/vda rw console=ttyS0"' in text and "RuntimeDirectory=netloom/vms/web1" in text


def check_nocloud_seed(tmp_path: pathlib.Path) -> None:
    """The seed files parse as YAML (cloud-init's own parser is yaml.safe_load); content: test_qemu_vm."""
    import yaml
    from ansible.module_utils.netloom import qemu

    del tmp_path
    spec = qemu.parse_spec({"name": "web1", "memory_mb": 512, "vcpus": 1, "mtu": 1450})
    users = qemu.parse_users("users", [{"name": "deploy", "ssh_keys": ["ssh-ed25519 AAAA k"], "sudo": True}])
    for name in ("meta-data", "user-data", "network-config"):
        text = render_file(template_path(f"cloud-init/{name}.j2"), qemu.seed_variables(spec, users, []))
        assert isinstance(yaml.safe_load(text), dict)


CASES: dict[str, Callable[[pathlib.Path], None]] = {
    "systemd/netloom-vm.service.j2": check_vm_unit,
    "cloud-init/meta-data.j2": check_nocloud_seed,
    "cloud-init/user-data.j2": check_nocloud_seed,
    "cloud-init/network-config.j2": check_nocloud_seed,
    "haproxy/haproxy_relay.cfg.j2": check_haproxy_config,
    "systemd/haproxy-relay.conf.j2": dropin_case(
        haproxy.DROPIN_TEMPLATE, "/lib/systemd/system/haproxy.service", "haproxy.service",
        haproxy.dropin_variables("/etc/haproxy/haproxy.cfg"), haproxy.DROPIN_NAME),
    "systemd/wireguard-go.conf.j2": dropin_case(
        wireguard.DROPIN_TEMPLATE, "/lib/systemd/system/wg-quick@.service", "wg-quick@wg0.service", {},
        wireguard.USERSPACE_DROPIN),
    "systemd/netloom-restore-early.service.j2": check_restore_units,
    "systemd/netloom-restore-late.service.j2": check_restore_units,
    "wireguard/wg-quick.conf.j2": check_wg_quick_config,
    "cni/esb-workers.conflist.j2": check_cni_conflist,
    "nginx/hostname_router.conf.j2": check_nginx_router,
}


def test_every_template_has_a_case() -> None:
    found = sorted(str(path.relative_to(TEMPLATES_DIR)) for path in pathlib.Path(TEMPLATES_DIR).rglob("*.j2"))
    assert found == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_template_renders_and_the_real_tool_accepts_it(name: str, tmp_path: pathlib.Path) -> None:
    CASES[name](tmp_path)


def test_systemd_analyze_catches_a_broken_unit(tmp_path: pathlib.Path) -> None:
    """The unit check can fail: an unknown key in a unit is reported."""
    unit = tmp_path / "netloom-broken.service"
    unit.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\nNoSuchKey=1\n")
    with pytest.raises(AssertionError, match="NoSuchKey"):
        verify_units(tmp_path, unit.name, [unit])
