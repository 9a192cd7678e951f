"""wireguard_interface and wireguard_routes on real WireGuard tunnels between two namespaces.

The module picks kernel WireGuard where `ip link add type wireguard` works and wireguard-go
otherwise; the lab machines have no wireguard kernel module, so there these are wireguard-go
tunnels, and the tests follow whichever implementation the kernel offers.

Two nodes, "gateway" and "compute", each a network namespace joined by a veth (192.0.2.1 and
192.0.2.2). wireguard-go keeps its control socket at /var/run/wireguard/NAME.sock, a path that
all namespaces of one machine share, so each node also gets its own mount namespace in which
/run/wireguard, /etc/hosts and /etc/resolv.conf are private, as they are on separate machines.
`run_module` (tests/support/netns.py) enters only the network namespace; it reaches the node's
mount namespace through NETLOOM_MODULE_PYTHON set to a two-line wrapper that keeps whatever
interpreter was chosen before (so the node's Python can still be tested this way).
Every wireguard-go process a test started is killed in teardown.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils.netloom.wireguard import DeviceState, parse_dump

from tests.support.netns import MODULE_UTILS_ON_PATH, ROOT, Netns, node_python, persist_root, run_module

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and links"),
    pytest.mark.skipif(not all(shutil.which(tool) for tool in ("wg", "wireguard-go", "unshare", "ping")),
                       reason="needs wireguard-tools, wireguard-go, unshare and ping"),
]

GW_UNDERLAY, CP_UNDERLAY = "192.0.2.1", "192.0.2.2"
GW_TUNNEL, CP_TUNNEL = "10.99.0.1", "10.99.0.2"


def _alive(pid: int) -> bool:
    """A process counts until every thread is gone (a reaped-late zombie does not count)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            state = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def _wait(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Node:
    """One simulated machine: a netns, a private mount namespace, a config directory."""

    label: str
    netns: Netns
    mount_ns: Path
    config_dir: Path

    def sh(self, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", f"--net=/run/netns/{self.netns.name}", f"--mount={self.mount_ns}",
                "bash", "-c", cmd]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.label}: {cmd!r} failed: {proc.stderr}{proc.stdout}")
        return proc

    def run(self, module: str, args: dict[str, Any], check_mode: bool = False) -> dict[str, Any]:
        result = run_module(module, args, netns=self.netns.name, check_mode=check_mode, diff=True)
        self.assert_no_secret(result)
        return result

    def interface(self, check_mode: bool = False, **args: Any) -> dict[str, Any]:
        base = {"name": "wg0", "config_dir": str(self.config_dir), "manage_service": False}
        return self.run("wireguard_interface", {**base, **args}, check_mode=check_mode)

    def routes(self, check_mode: bool = False, **args: Any) -> dict[str, Any]:
        return self.run("wireguard_routes", {"interface": "wg0", **args}, check_mode=check_mode)

    def assert_no_secret(self, result: dict[str, Any]) -> None:
        """No key material of this node may appear anywhere in a module result."""
        text = json.dumps(result)
        key_file = self.config_dir / "wg0.key"
        if key_file.exists():
            assert key_file.read_text().strip() not in text
        dump = self.sh("wg show wg0 dump", check=False)
        if dump.returncode == 0:
            state = parse_dump(dump.stdout)
            secrets = [state.private_key] + [peer.preshared_key for peer in state.peers.values()]
            for secret in filter(None, secrets):
                assert secret not in text

    def dump(self) -> DeviceState:
        return parse_dump(self.sh("wg show wg0 dump").stdout)

    def link_index(self) -> int:
        return int(self.sh("ip -o link show wg0").stdout.split(":", 1)[0])

    def routes_table(self) -> str:
        return self.sh("ip -4 route show table main").stdout

    def pings(self, address: str) -> bool:
        return any(self.sh(f"ping -n -q -c 1 -W 1 {address}", check=False).returncode == 0 for _ in range(5))

    def userspace_pids(self) -> list[int]:
        """wireguard-go processes living in this node's network namespace."""
        netns = os.stat(f"/run/netns/{self.netns.name}").st_ino
        pids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                if (Path(f"/proc/{entry}/comm").read_text().strip() == "wireguard-go"
                        and os.stat(f"/proc/{entry}/ns/net").st_ino == netns and _alive(int(entry))):
                    pids.append(int(entry))
            except FileNotFoundError:
                continue
        return pids

    def kill_userspace(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.userspace_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if _wait(lambda: not self.userspace_pids()):
                return
        raise AssertionError(f"{self.label}: wireguard-go survived SIGKILL")


@contextlib.contextmanager
def node(label: str, tmp_path: Path, mounts: Path, hosts: str) -> Iterator[Node]:
    home = tmp_path / label
    home.mkdir()
    (home / "hosts").write_text(f"127.0.0.1 localhost\n{hosts}")
    # Names that are not in /etc/hosts are asked of a resolver on the node's own loopback:
    # nothing listens there, so a lookup fails at once and nothing leaves the namespace.
    (home / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    with Netns(f"nlwg{label[:2]}") as netns:
        mount_ns = mounts / netns.name
        mount_ns.touch()
        setup = (f"mkdir -p /run/wireguard && mount -t tmpfs -o mode=0755 netloom-wg /run/wireguard"
                 f" && mount --bind {shlex.quote(str(home / 'hosts'))} /etc/hosts"
                 f" && mount --bind {shlex.quote(str(home / 'resolv.conf'))} /etc/resolv.conf")
        subprocess.run(["unshare", f"--mount={mount_ns}", "--propagation", "private", "sh", "-c", setup],
                       check=True)
        member = Node(label, netns, mount_ns, home / "etc-wireguard")
        try:
            yield member
        finally:
            member.kill_userspace()
            subprocess.run(["umount", str(mount_ns)], check=False)


@dataclass
class Lab:
    gw: Node
    cp: Node
    implementation: str  # what the module should choose on this kernel

    @property
    def userspace(self) -> bool:
        return self.implementation == "wireguard-go"


def expected_implementation(probe_node: Node) -> str:
    created = probe_node.sh("ip link add nlwgprobe type wireguard", check=False).returncode == 0
    if created:
        probe_node.sh("ip link del nlwgprobe")
    return "kernel" if created else "wireguard-go"


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    mounts = tmp_path / "mount-ns"
    mounts.mkdir()
    # A persistent mount namespace is pinned by bind-mounting it onto a file, which needs a
    # private mount above it (as `ip netns` does for /run/netns).
    subprocess.run(["mount", "--bind", str(mounts), str(mounts)], check=True)
    subprocess.run(["mount", "--make-private", str(mounts)], check=True)
    python = node_python()
    wrapper = tmp_path / "node-python"
    wrapper.write_text("#!/bin/sh\n"
                       f'exec nsenter --mount={shlex.quote(str(mounts))}/"$(ip netns identify)" -- '
                       f'{shlex.quote(python)} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("NETLOOM_MODULE_PYTHON", str(wrapper))
    try:
        with node("gateway", tmp_path, mounts, f"{CP_UNDERLAY} runtime-node\n") as gw, \
                node("compute", tmp_path, mounts, f"{GW_UNDERLAY} gateway\n") as cp:
            subprocess.run(["ip", "link", "add", "veth-gw", "netns", gw.netns.name, "type", "veth",
                            "peer", "name", "veth-cp", "netns", cp.netns.name], check=True)
            gw.sh(f"ip addr add {GW_UNDERLAY}/24 dev veth-gw && ip link set veth-gw up")
            cp.sh(f"ip addr add {CP_UNDERLAY}/24 dev veth-cp && ip link set veth-cp up")
            yield Lab(gw, cp, expected_implementation(gw))
    finally:
        subprocess.run(["umount", str(mounts)], check=False)


def new_public_key(some_node: Node) -> str:
    return some_node.sh("wg genkey | wg pubkey").stdout.strip()


def gateway_args(cp_public: str, extra_peers: list[dict[str, Any]] | None = None,
                 **more: Any) -> dict[str, Any]:
    peers = [{"public_key": cp_public, "allowed_ips": [f"{CP_TUNNEL}/32", "10.88.2.0/24"],
              "endpoint": f"{CP_UNDERLAY}:51820"}, *(extra_peers or [])]
    return {"addresses": [f"{GW_TUNNEL}/24"], "listen_port": 51820, "peers": peers, **more}


def compute_args(gw_public: str) -> dict[str, Any]:
    return {"addresses": [f"{CP_TUNNEL}/32"], "listen_port": 51820,
            "peers": [{"public_key": gw_public, "allowed_ips": [f"{GW_TUNNEL}/32"],
                       "endpoint": "gateway:51820", "persistent_keepalive": 25}]}


def build_tunnel(lab: Lab) -> tuple[str, str]:
    """Both sides converged and the compute side routed to the control network; returns public keys."""
    gw_public = lab.gw.interface(addresses=[f"{GW_TUNNEL}/24"], listen_port=51820)["public_key"]
    cp_public = lab.cp.interface(addresses=[f"{CP_TUNNEL}/32"], listen_port=51820)["public_key"]
    assert lab.gw.interface(**gateway_args(cp_public))["changed"]
    assert lab.cp.interface(**compute_args(gw_public))["changed"]
    assert not lab.cp.pings(GW_TUNNEL), "no route to the control network yet"
    routed = lab.cp.routes(extra_routes=["10.99.0.0/24"])
    assert routed["installed"] == ["10.99.0.0/24", f"{GW_TUNNEL}/32"]
    assert lab.cp.pings(GW_TUNNEL)
    return gw_public, cp_public


def test_tunnel_converges_carries_traffic_and_reruns_unchanged(lab: Lab) -> None:
    first = lab.gw.interface(check_mode=False, **gateway_args(new_public_key(lab.gw)))
    assert first["changed"] and first["implementation"] == lab.implementation
    assert first["changes"][:2] == ["create wg0 private key file " + str(lab.gw.config_dir / "wg0.key"),
                                    "create wg0 interface"]
    assert first["public_key"] == lab.gw.sh("wg show wg0 public-key").stdout.strip()
    assert lab.gw.interface(**gateway_args(first["peers"][0]["public_key"]))["changed"] is False

    gw_public, cp_public = build_tunnel(lab)
    assert gw_public == first["public_key"], "the key on disk is kept"
    assert lab.gw.pings(CP_TUNNEL)

    for again in (lab.gw.interface(**gateway_args(cp_public)), lab.cp.interface(**compute_args(gw_public)),
                  lab.cp.routes(extra_routes=["10.99.0.0/24"])):
        assert again["changed"] is False and again["changes"] == []

    live = lab.gw.dump()
    assert live.listen_port == 51820 and set(live.peers) == {cp_public}
    assert live.peers[cp_public].allowed_ips == ("10.88.2.0/24", "10.99.0.2/32")
    assert "10.99.0.1/24" in lab.gw.sh("ip -4 addr show dev wg0").stdout

    key_file, conf_file = lab.gw.config_dir / "wg0.key", lab.gw.config_dir / "wg0.conf"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 == stat.S_IMODE(conf_file.stat().st_mode)
    assert stat.S_IMODE(lab.gw.config_dir.stat().st_mode) == 0o700
    conf = conf_file.read_text()
    # No key material in the config (it is rendered on the controller): PostUp loads the 0600 key file.
    assert key_file.read_text().strip() not in conf and "PrivateKey" not in conf
    assert f"PostUp = wg set %i private-key {key_file}" in conf
    assert f"PublicKey = {cp_public}" in conf and "ListenPort = 51820" in conf
    # wg-quick's own parser accepts the saved file (strip drops the wg-quick-only keys).
    stripped = lab.gw.sh(f"wg-quick strip {shlex.quote(str(conf_file))}").stdout
    assert "Address" not in stripped and f"PublicKey = {cp_public}" in stripped


def test_peers_change_in_place_and_the_other_session_survives(lab: Lab) -> None:
    _, cp_public = build_tunnel(lab)
    index, pids = lab.gw.link_index(), lab.gw.userspace_pids()
    handshake = lab.gw.dump().peers[cp_public].latest_handshake
    assert handshake > 0 and len(pids) == (1 if lab.userspace else 0)
    conf_step = f"config {lab.gw.config_dir / 'wg0.conf'}"

    def untouched() -> None:
        assert lab.gw.link_index() == index and lab.gw.userspace_pids() == pids
        assert lab.gw.dump().peers[cp_public].latest_handshake == handshake
        assert lab.cp.pings(GW_TUNNEL)

    extra = new_public_key(lab.gw)
    added = lab.gw.interface(**gateway_args(cp_public, [{"public_key": extra,
                                                          "allowed_ips": ["10.88.3.0/24"]}]))
    assert added["changes"] == [f"create wg0 peer {extra}", f"update {conf_step}"]
    assert lab.gw.dump().peers[extra].allowed_ips == ("10.88.3.0/24",)
    untouched()

    psk = lab.gw.sh("wg genpsk").stdout.strip()
    changed_peer = {"public_key": extra, "allowed_ips": ["10.88.4.0/24", "10.88.3.0/24"],
                    "endpoint": "192.0.2.99:51820", "persistent_keepalive": 30, "preshared_key": psk}
    changed = lab.gw.interface(**gateway_args(cp_public, [changed_peer]))
    assert changed["changes"] == [f"update wg0 peer {extra}", f"update {conf_step}"]
    assert changed["diff"]["after"][f"wg0 peer {extra}"]["preshared_key"] == "(hidden)"
    assert psk not in json.dumps(changed)
    peer = lab.gw.dump().peers[extra]
    assert peer.allowed_ips == ("10.88.3.0/24", "10.88.4.0/24") and peer.persistent_keepalive == 30
    assert peer.endpoint == "192.0.2.99:51820" and peer.preshared_key == psk
    # The preshared key lives in the 0600 companion that the config's PostUp loads, not in the config.
    psk_file = lab.gw.config_dir / "wg0.psk"
    assert psk not in (lab.gw.config_dir / "wg0.conf").read_text()
    assert psk in psk_file.read_text() and stat.S_IMODE(psk_file.stat().st_mode) == 0o600
    assert f"PostUp = wg addconf %i {psk_file}" in (lab.gw.config_dir / "wg0.conf").read_text()
    untouched()
    assert lab.gw.interface(**gateway_args(cp_public, [changed_peer]))["changed"] is False

    keepalive_off = dict(changed_peer, persistent_keepalive=0, preshared_key=None)
    assert lab.gw.interface(**gateway_args(cp_public, [keepalive_off]))["changes"] == [
        f"update wg0 peer {extra}", f"update {conf_step}"]
    peer = lab.gw.dump().peers[extra]
    assert peer.persistent_keepalive == 0 and peer.preshared_key is None

    removed = lab.gw.interface(**gateway_args(cp_public))
    assert removed["changes"] == [f"delete wg0 peer {extra}", f"update {conf_step}"]
    assert set(lab.gw.dump().peers) == {cp_public}
    untouched()


def test_check_mode_reports_the_plan_and_changes_nothing(lab: Lab) -> None:
    # Not even a transient probe link: watch every link event while check mode runs.
    monitor = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab.gw.netns.name}", "ip", "monitor", "link"],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        fresh = lab.gw.interface(check_mode=True, **gateway_args(new_public_key(lab.gw)))
        time.sleep(0.3)
    finally:
        monitor.terminate()
    link_events = monitor.communicate(timeout=5)[0]
    assert link_events == "", f"check mode touched links: {link_events}"
    assert fresh["changed"] and "create wg0 interface" in fresh["changes"]
    assert fresh["public_key"] is None, "a key that would be generated is not reported"
    assert lab.gw.sh("ip link show wg0", check=False).returncode != 0
    assert not lab.gw.config_dir.exists() and lab.gw.userspace_pids() == []

    gw_public, cp_public = build_tunnel(lab)
    conf_before = (lab.gw.config_dir / "wg0.conf").read_bytes()
    dump_before, addresses_before = lab.gw.dump(), lab.gw.sh("ip addr show dev wg0").stdout
    extra = new_public_key(lab.gw)
    wanted = gateway_args(cp_public, [{"public_key": extra, "allowed_ips": ["10.88.3.0/24"]}],
                          mtu=1380, addresses=[f"{GW_TUNNEL}/24", "10.99.1.1/24"])
    preview = lab.gw.interface(check_mode=True, **wanted)
    assert preview["changed"] and preview["public_key"] == gw_public
    assert preview["changes"] == [f"create wg0 peer {extra}", "update wg0 mtu", "update wg0 addresses",
                                  f"update config {lab.gw.config_dir / 'wg0.conf'}"]
    diff = preview["diff"]
    assert diff["before"]["wg0 mtu"] == 1420 and diff["after"]["wg0 mtu"] == 1380
    assert diff["after"]["wg0 addresses"] == ["10.99.0.1/24", "10.99.1.1/24"]
    assert f"PublicKey = {extra}" in diff["after"][f"config {lab.gw.config_dir / 'wg0.conf'}"]
    # The config holds no key material at all, so no diff can show it.
    assert (lab.gw.config_dir / "wg0.key").read_text().strip() not in json.dumps(preview)
    assert "PrivateKey" not in diff["before"][f"config {lab.gw.config_dir / 'wg0.conf'}"]
    assert (lab.gw.config_dir / "wg0.conf").read_bytes() == conf_before
    assert lab.gw.dump() == dump_before and lab.gw.sh("ip addr show dev wg0").stdout == addresses_before

    applied = lab.gw.interface(**wanted)
    assert applied["changes"] == preview["changes"] and applied["diff"] == preview["diff"]
    assert "mtu 1380" in lab.gw.sh("ip link show wg0").stdout
    assert lab.gw.interface(**wanted)["changed"] is False

    route_preview = lab.gw.routes(check_mode=True)
    assert route_preview["installed"] == ["10.88.2.0/24", "10.88.3.0/24", "10.99.0.2/32"]
    assert "proto 250" not in lab.gw.routes_table()


def test_drift_is_repaired_by_the_next_run(lab: Lab) -> None:
    _, cp_public = build_tunnel(lab)
    key_file, conf_file = lab.gw.config_dir / "wg0.key", lab.gw.config_dir / "wg0.conf"
    conf = conf_file.read_text()

    lab.gw.sh(f"wg set wg0 peer {cp_public} remove && ip addr flush dev wg0 && ip link set wg0 mtu 1300")
    conf_file.write_text(conf.replace("ListenPort = 51820", "ListenPort = 1"))
    key_file.chmod(0o644)
    repaired = lab.gw.interface(**gateway_args(cp_public))
    assert repaired["changes"] == [f"update wg0 private key file {key_file}", f"create wg0 peer {cp_public}",
                                   "update wg0 addresses", f"update config {conf_file}"]
    assert conf_file.read_text() == conf and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert lab.gw.pings(CP_TUNNEL)
    assert lab.gw.interface(**gateway_args(cp_public))["changed"] is False  # mtu was never declared

    lab.cp.sh(f"ip route del {GW_TUNNEL}/32 dev wg0 && ip route replace 10.99.0.0/24 dev veth-cp")
    fixed = lab.cp.routes(extra_routes=["10.99.0.0/24"])
    assert fixed["installed"] == ["10.99.0.0/24", f"{GW_TUNNEL}/32"] and fixed["removed"] == []
    assert fixed["changes"] == ["update route 10.99.0.0/24", f"create route {GW_TUNNEL}/32"]
    assert lab.cp.pings(GW_TUNNEL)

    lab.gw.sh("ip link set wg0 down")
    assert lab.gw.interface(**gateway_args(cp_public))["changes"] == ["update wg0 link"]
    assert lab.gw.pings(CP_TUNNEL)


def test_routes_filter_allowed_ips_and_own_only_their_routes(lab: Lab) -> None:
    _, cp_public = build_tunnel(lab)
    other = new_public_key(lab.gw)
    risky = ["0.0.0.0/0", "::/0", "198.51.100.0/24", "198.51.100.7/32", "203.0.113.7/32", "10.88.3.0/24",
             "172.16.5.5/32"]
    with_risky = lab.gw.interface(**gateway_args(cp_public, [{"public_key": other, "allowed_ips": risky}]))
    assert with_risky["changed"]
    # wireguard_interface refuses AllowedIPs no host can send from; another tool may still set
    # them on the live interface, and the route filter must refuse them there.
    nonsense = ["127.0.0.1/32", "0.0.0.0/32", "255.255.255.255/32", "169.254.10.0/24", "224.0.0.0/24"]
    lab.gw.sh(f"wg set wg0 peer {other} allowed-ips {','.join(risky + nonsense)}")
    lab.gw.sh("ip route add 10.66.0.0/16 dev wg0 && ip route add 10.88.9.0/24 via 192.0.2.2 proto static")
    foreign = {"10.66.0.0/16 dev wg0", "10.88.9.0/24 via 192.0.2.2 dev veth-gw proto static"}

    args = {"allow": ["203.0.113.7"], "via_host": "runtime-node", "extra_routes": ["10.77.0.0/16"]}
    result = lab.gw.routes(**args)
    assert result["via"] == CP_UNDERLAY
    accepted = {entry["cidr"]: entry for entry in result["accepted"]}
    assert accepted == {
        "10.99.0.2/32": {"cidr": "10.99.0.2/32", "reason": "RFC1918 host route", "dev": "wg0"},
        "10.88.2.0/24": {"cidr": "10.88.2.0/24", "reason": "RFC1918 subnet", "via": CP_UNDERLAY},
        "10.88.3.0/24": {"cidr": "10.88.3.0/24", "reason": "RFC1918 subnet", "via": CP_UNDERLAY},
        "172.16.5.5/32": {"cidr": "172.16.5.5/32", "reason": "RFC1918 host route", "dev": "wg0"},
        "203.0.113.7/32": {"cidr": "203.0.113.7/32", "reason": "host route of an allow-listed address",
                           "dev": "wg0"},
        "10.77.0.0/16": {"cidr": "10.77.0.0/16", "reason": "declared in extra_routes", "dev": "wg0"},
    }
    refused = {entry["cidr"]: entry["reason"] for entry in result["refused"]}
    assert set(refused) == {"0.0.0.0/0", "::/0", "127.0.0.1/32", "0.0.0.0/32", "255.255.255.255/32",
                            "169.254.10.0/24", "224.0.0.0/24", "198.51.100.0/24", "198.51.100.7/32"}
    assert "loopback" in refused["127.0.0.1/32"] and "IPv6" in refused["::/0"]
    assert "broadcast" in refused["255.255.255.255/32"] and "allow list" in refused["198.51.100.7/32"]
    assert sorted(result["installed"]) == sorted(accepted) and result["removed"] == []

    table = lab.gw.routes_table()
    for line in ("10.99.0.2 dev wg0 proto 250 scope link",
                 "10.88.2.0/24 via 192.0.2.2 dev veth-gw proto 250",
                 "10.88.3.0/24 via 192.0.2.2 dev veth-gw proto 250",
                 "172.16.5.5 dev wg0 proto 250 scope link",
                 "203.0.113.7 dev wg0 proto 250 scope link",
                 "10.77.0.0/16 dev wg0 proto 250 scope link"):
        assert line in table
    assert "127.0.0.1" not in table and "0.0.0.0" not in table and "198.51.100" not in table
    assert lab.gw.routes(**args)["changed"] is False

    # Drift: a route deleted and one redirected by hand are restored; nothing else is touched.
    lab.gw.sh("ip route del 172.16.5.5/32 && ip route replace 10.88.3.0/24 dev wg0 proto static")
    drift = lab.gw.routes(**args)
    assert drift["changes"] == ["update route 10.88.3.0/24", "create route 172.16.5.5/32"]

    # A CIDR no peer announces any more, and the via_host override dropped: stale routes go.
    trimmed = [cidr for cidr in risky if cidr != "10.88.3.0/24"]
    lab.gw.interface(**gateway_args(cp_public, [{"public_key": other, "allowed_ips": trimmed}]))
    no_via = {"allow": ["203.0.113.7"], "extra_routes": ["10.77.0.0/16"]}
    table_before_preview = lab.gw.routes_table()
    preview = lab.gw.routes(check_mode=True, **no_via)
    assert preview["installed"] == ["10.88.2.0/24"] and preview["removed"] == ["10.88.3.0/24"]
    assert preview["diff"]["before"]["route 10.88.2.0/24"] == {"cidr": "10.88.2.0/24", "via": CP_UNDERLAY,
                                                                "dev": "veth-gw", "proto": 250}
    assert preview["diff"]["after"]["route 10.88.2.0/24"] == {"cidr": "10.88.2.0/24", "dev": "wg0",
                                                               "proto": 250}
    assert lab.gw.routes_table() == table_before_preview
    applied = lab.gw.routes(**no_via)
    assert applied["changes"] == preview["changes"]
    table = lab.gw.routes_table()
    assert "10.88.3.0/24" not in table and "10.88.2.0/24 dev wg0 proto 250 scope link" in table
    assert all(line in table for line in foreign)
    assert lab.gw.pings(CP_TUNNEL)

    gone = lab.gw.routes(state="absent")
    assert sorted(gone["removed"]) == sorted(["10.99.0.2/32", "10.88.2.0/24", "172.16.5.5/32",
                                              "203.0.113.7/32", "10.77.0.0/16"])
    table = lab.gw.routes_table()
    assert "proto 250" not in table and all(line in table for line in foreign)
    assert lab.gw.routes(state="absent")["changed"] is False


def test_bad_input_fails_naming_the_field_and_changes_nothing(lab: Lab) -> None:
    good = new_public_key(lab.gw)
    secret = lab.gw.sh("wg genkey").stdout.strip()
    short_secret = secret[:-4] + "===="
    cases = [
        ({"peers": [{"public_key": good}, {"public_key": "AAAA"}]}, "peers[1].public_key", "AAAA"),
        ({"peers": [{"public_key": good}, {"public_key": good}]}, "peers[1].public_key", good),
        ({"peers": [{"public_key": good, "allowed_ips": ["10.88.1.0/24", "10.1.2.300/24"]}]},
         "peers[0].allowed_ips[1]", "10.1.2.300/24"),
        ({"peers": [{"public_key": good, "allowed_ips": ["10.88.1.1/24"]}]}, "peers[0].allowed_ips[0]",
         "10.88.1.1/24"),
        ({"peers": [{"public_key": good, "allowed_ips": ["10.88.1.0/24"]},
                    {"public_key": new_public_key(lab.gw), "allowed_ips": ["10.88.1.0/24"]}]},
         "peers[1].allowed_ips[0]", "10.88.1.0/24"),
        ({"peers": [{"public_key": good, "endpoint": "no-such-host.invalid:51820"}]}, "peers[0].endpoint",
         "no-such-host.invalid:51820"),
        ({"peers": [{"public_key": good, "persistent_keepalive": 70000}]}, "peers[0].persistent_keepalive",
         "70000"),
        ({"listen_port": 70000}, "listen_port", "70000"),
        ({"addresses": ["10.99.0.1"]}, "addresses[0]", "10.99.0.1"),
        ({"name": "wg0-name-far-too-long"}, "name", "wg0-name-far-too-long"),
        ({"private_key": short_secret}, "private_key", "(hidden)"),
        ({"peers": [{"public_key": good, "preshared_key": short_secret}]}, "peers[0].preshared_key",
         "(hidden)"),
        ({"private_key": secret,
          "peers": [{"public_key": lab.gw.sh(f"echo {secret} | wg pubkey").stdout.strip()}]},
         "peers[0].public_key", None),
    ]
    for args, field, value in cases:
        result = lab.gw.interface(**args)
        assert result.get("failed"), (args, result)
        assert result["field"] == field, (field, result["msg"])
        if value is not None:
            assert result["value"] == value
        assert short_secret not in json.dumps(result) and secret not in json.dumps(result)
    assert lab.gw.sh("ip link show wg0", check=False).returncode != 0
    assert not lab.gw.config_dir.exists() and lab.gw.userspace_pids() == []

    no_interface = lab.gw.routes()
    assert no_interface["failed"] and "does not exist" in no_interface["msg"]
    build_tunnel(lab)
    for args, field in (({"extra_routes": ["8.8.8.8/32"]}, "extra_routes[0]"),
                        ({"extra_routes": ["10.1.0.0/15"]}, "extra_routes[0]"),
                        ({"allow": ["127.0.0.1"]}, "allow[0]"),
                        ({"via_host": "no-such-host.invalid"}, "via_host"),
                        ({"via_host": "127.0.0.1"}, "via_host"),
                        ({"via_host": "0.0.0.0"}, "via_host"),
                        ({"via_host_cidr": "10.88.0.1/16"}, "via_host_cidr")):
        table = lab.gw.routes_table()
        failed = lab.gw.routes(**args)
        assert failed["failed"] and failed["field"] == field, failed
        assert lab.gw.routes_table() == table


def test_state_absent_removes_interface_process_config_and_key(lab: Lab) -> None:
    _, cp_public = build_tunnel(lab)
    assert bool(lab.cp.userspace_pids()) is lab.userspace
    conf_path, key_path = lab.cp.config_dir / "wg0.conf", lab.cp.config_dir / "wg0.key"

    preview = lab.cp.interface(state="absent", check_mode=True)
    assert preview["changes"] == ["delete wg0 interface", f"delete config {conf_path}",
                                  f"delete wg0 private key file {key_path}"]
    assert bool(lab.cp.userspace_pids()) is lab.userspace and conf_path.exists()

    lab.cp.sh("ip route add 10.66.0.0/16 dev veth-cp")
    routes_gone = lab.cp.routes(state="absent")
    assert sorted(routes_gone["removed"]) == ["10.99.0.0/24", f"{GW_TUNNEL}/32"]
    assert "10.66.0.0/16 dev veth-cp" in lab.cp.routes_table()

    gone = lab.cp.interface(state="absent")
    assert gone["changes"] == preview["changes"] and gone["implementation"] == lab.implementation
    assert lab.cp.sh("ip link show wg0", check=False).returncode != 0
    assert lab.cp.userspace_pids() == []
    assert not conf_path.exists() and not key_path.exists()
    assert lab.cp.interface(state="absent")["changed"] is False
    assert lab.gw.interface(**gateway_args(cp_public))["changed"] is False, "the other node is untouched"


def test_absent_refuses_a_foreign_link_of_the_same_name(lab: Lab) -> None:
    lab.gw.sh("ip link add wg0 type veth peer name wg0-peer")
    result = lab.gw.interface(state="absent")
    assert result["failed"] and "not a WireGuard interface" in result["msg"]
    assert lab.gw.sh("ip link show wg0", check=False).returncode == 0


# ---- issue 6: boot routes, connected routes, ownership, check mode, roaming, bad input ----

def persist_dir(some_node: Node) -> Path:
    return persist_root(some_node.netns.name)


def node_python_in(some_node: Node, argv: list[str], env: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess[str]:
    """A program run inside the node's network and mount namespaces (as it would run on the node)."""
    enter = ["nsenter", f"--net=/run/netns/{some_node.netns.name}", f"--mount={some_node.mount_ns}"]
    return subprocess.run([*enter, *argv], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})


def test_wg_quick_at_boot_installs_no_route_and_the_replay_installs_only_filtered_ones(lab: Lab) -> None:
    gw_public, cp_public = build_tunnel(lab)
    wide = new_public_key(lab.gw)
    peers = [{"public_key": wide, "allowed_ips": ["0.0.0.0/0", "203.0.113.7/32", "10.88.3.0/24"]}]
    assert lab.gw.interface(**gateway_args(cp_public, peers))["changed"]
    routed = lab.gw.routes()
    assert sorted(routed["installed"]) == ["10.88.2.0/24", "10.88.3.0/24", "10.99.0.2/32"]
    assert {entry["cidr"] for entry in routed["refused"]} == {"0.0.0.0/0", "203.0.113.7/32"}
    assert "restore entry 40-wireguard_routes@wg0.json" in " ".join(routed["changes"])
    entry = json.loads((persist_dir(lab.gw) / "var/lib/netloom/restore/entries/40-wireguard_routes@wg0.json")
                       .read_text())
    assert entry["netloom_restore"]["module"] == "wireguard_routes"
    assert entry["netloom_restore"]["phases"] == ["late"]
    assert entry["netloom_restore"]["after"] == ["wg-quick@wg0.service"]
    late_unit = (persist_dir(lab.gw) / "etc/systemd/system/netloom-restore-late.service").read_text()
    assert "wg-quick@wg0.service" in late_unit.split("After=", 1)[1].splitlines()[0]

    conf = lab.gw.config_dir / "wg0.conf"
    assert "Table = off" in conf.read_text().split("[Peer]", 1)[0]
    lab.gw.sh(f"wg-quick strip {shlex.quote(str(conf))}")  # wg-quick's own parser accepts it

    # "Reboot": the interface and every route through it are gone; wg-quick@wg0 brings it back.
    lab.gw.kill_userspace()
    lab.gw.sh("ip link del wg0", check=False)
    assert "wg0" not in lab.gw.routes_table()
    up = node_python_in(lab.gw, ["wg-quick", "up", str(conf)],
                        {"WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"})
    assert up.returncode == 0, up.stderr
    all_routes = lab.gw.sh("ip -4 route show table all").stdout
    rules = lab.gw.sh("ip -4 rule show").stdout
    assert "default" not in all_routes and "0.0.0.0/0" not in all_routes and "203.0.113.7" not in all_routes
    assert "proto 250" not in all_routes and "10.88." not in all_routes
    assert "fwmark" not in rules and "suppress_prefixlength" not in rules, rules
    assert "10.99.0.0/24 dev wg0 proto kernel scope link src 10.99.0.1" in lab.gw.routes_table()

    root = persist_dir(lab.gw)
    replay = node_python_in(lab.gw, [sys.executable, str(root / "usr/lib/netloom/netloom-restore"), "late"],
                            {"NETLOOM_PERSIST_ROOT": str(root)})
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "40-wireguard_routes@wg0.json: changed" in replay.stdout
    table = lab.gw.routes_table()
    for line in ("10.99.0.2 dev wg0 proto 250 scope link", "10.88.2.0/24 dev wg0 proto 250 scope link",
                 "10.88.3.0/24 dev wg0 proto 250 scope link",
                 "10.99.0.0/24 dev wg0 proto kernel scope link src 10.99.0.1"):
        assert line in table
    all_routes = lab.gw.sh("ip -4 route show table all").stdout
    assert "default" not in all_routes and "203.0.113.7" not in all_routes
    assert lab.gw.pings(CP_TUNNEL)
    assert lab.gw.routes()["changed"] is False
    assert lab.gw.interface(**gateway_args(cp_public, peers))["changed"] is False, "the config rebuilt it all"
    assert gw_public == lab.gw.sh("wg show wg0 public-key").stdout.strip()


def test_the_connected_route_is_left_alone(lab: Lab) -> None:
    gw_public = lab.gw.interface(addresses=[f"{GW_TUNNEL}/24"], listen_port=51820)["public_key"]
    cp_public = lab.cp.interface(addresses=[f"{CP_TUNNEL}/24"], listen_port=51820)["public_key"]
    assert lab.gw.interface(**gateway_args(cp_public))["changed"]
    # As the edge roles declare it: the compute side allows the whole control network.
    cp_args = {"addresses": [f"{CP_TUNNEL}/24"], "listen_port": 51820,
               "peers": [{"public_key": gw_public, "allowed_ips": ["10.99.0.0/24"],
                          "endpoint": "gateway:51820", "persistent_keepalive": 25}]}
    assert lab.cp.interface(**cp_args)["changed"]
    kernel_route = f"10.99.0.0/24 dev wg0 proto kernel scope link src {CP_TUNNEL}"
    assert kernel_route in lab.cp.routes_table()

    for args in ({"extra_routes": ["10.99.0.0/24"]}, {}):
        result = lab.cp.routes(**args)
        assert not result.get("failed"), result
        assert result["installed"] == [] and result["removed"] == [] and result["accepted"] == []
        assert [entry["cidr"] for entry in result["skipped"]] == ["10.99.0.0/24"]
        assert "connected prefix of wg0" in result["skipped"][0]["reason"]
        assert not any(change.startswith(("create route", "update route")) for change in result["changes"])
        assert kernel_route in lab.cp.routes_table() and "proto 250" not in lab.cp.routes_table()
    assert lab.cp.pings(GW_TUNNEL)
    assert lab.cp.routes()["changed"] is False

    # A prefix connected on another interface is not taken over either.
    lab.cp.sh("ip link add nlside type veth peer name nlside-peer && ip addr add 10.55.0.1/24 dev nlside"
              " && ip link set nlside up")
    cp_args["peers"][0]["allowed_ips"] = ["10.99.0.0/24", "10.55.0.0/24"]
    lab.cp.interface(**cp_args)
    side = lab.cp.routes()
    assert {entry["cidr"]: entry["reason"] for entry in side["skipped"]}["10.55.0.0/24"].startswith(
        "connected on nlside")
    assert "10.55.0.0/24 dev nlside proto kernel" in lab.cp.routes_table() and side["installed"] == []

    gone = lab.cp.routes(state="absent")
    assert gone["removed"] == [] and kernel_route in lab.cp.routes_table()
    assert "delete restore entry 40-wireguard_routes@wg0.json" in gone["changes"]
    assert not (persist_dir(lab.cp) / "var/lib/netloom/restore/entries/40-wireguard_routes@wg0.json").exists()


def test_two_wireguard_interfaces_never_touch_each_others_routes(lab: Lab) -> None:
    build_tunnel(lab)
    wg1_peer = new_public_key(lab.gw)
    wg1 = lab.gw.run("wireguard_interface", {
        "name": "wg1", "config_dir": str(lab.gw.config_dir), "manage_service": False,
        "addresses": ["10.98.0.1/24"], "listen_port": 51821,
        "peers": [{"public_key": wg1_peer, "allowed_ips": ["10.77.0.0/24", "10.88.2.0/24"]}]})
    assert wg1["changed"] and wg1["implementation"] == lab.implementation
    if lab.userspace:
        assert len(lab.gw.userspace_pids()) == 2, "two wireguard-go interfaces in one netns"

    via = {"via_host": "runtime-node"}
    first = lab.gw.routes(**via)
    assert sorted(first["installed"]) == ["10.88.2.0/24", "10.99.0.2/32"]
    second = lab.gw.routes(interface="wg1")
    assert second["installed"] == ["10.77.0.0/24"] and second["removed"] == []
    skipped = {entry["cidr"]: entry["reason"] for entry in second["skipped"]}
    assert skipped == {"10.88.2.0/24": f"routed via {CP_UNDERLAY} by netloom for another interface: "
                                       "its route is left alone"}
    table = lab.gw.routes_table()
    assert "10.77.0.0/24 dev wg1 proto 250 scope link" in table
    assert f"10.88.2.0/24 via {CP_UNDERLAY} dev veth-gw proto 250" in table
    assert "10.99.0.2 dev wg0 proto 250 scope link" in table
    assert lab.gw.routes(**via)["changed"] is False and lab.gw.routes(interface="wg1")["changed"] is False

    # wg0 without via_host: its own via route becomes a dev route; wg1's route is not claimed.
    dev_only = lab.gw.routes()
    assert dev_only["changes"][:1] == ["update route 10.88.2.0/24"] and dev_only["removed"] == []
    assert "10.77.0.0/24 dev wg1 proto 250" in lab.gw.routes_table()
    # wg1 now finds a dev route of wg0 for 10.88.2.0/24 and leaves it.
    assert lab.gw.routes(interface="wg1")["changed"] is False

    gone = lab.gw.routes(interface="wg1", state="absent")
    assert gone["removed"] == ["10.77.0.0/24"]
    table = lab.gw.routes_table()
    assert "dev wg1 proto 250" not in table and "10.99.0.2 dev wg0 proto 250" in table
    assert "10.88.2.0/24 dev wg0 proto 250" in table
    assert sorted(lab.gw.routes(state="absent")["removed"]) == ["10.88.2.0/24", "10.99.0.2/32"]
    assert "proto 250" not in lab.gw.routes_table()


def test_check_mode_on_a_node_without_the_interface(lab: Lab) -> None:
    preview = lab.gw.routes(check_mode=True, extra_routes=["10.77.0.0/16"])
    assert not preview.get("failed"), preview
    assert preview["changed"] and "wg0 does not exist yet" in preview["pending"]
    assert preview["changes"][:2] == ["create routes for the AllowedIPs of wg0", "create route 10.77.0.0/16"]
    assert "create restore entry 40-wireguard_routes@wg0.json" in preview["changes"]
    route = {"cidr": "10.77.0.0/16", "dev": "wg0"}
    assert preview["diff"]["after"]["route 10.77.0.0/16"] == {**route, "proto": 250}
    assert preview["accepted"] == [{**route, "reason": "declared in extra_routes"}]
    assert not persist_dir(lab.gw).exists() and "proto 250" not in lab.gw.routes_table()

    real = lab.gw.routes(extra_routes=["10.77.0.0/16"])
    assert real["failed"] and real["field"] == "interface" and real["value"] == "wg0"
    assert "interface='wg0': does not exist" in real["msg"]
    assert not persist_dir(lab.gw).exists()

    # The interface's own check mode on the same fresh node: no key, no link, no files.
    fresh = lab.gw.interface(check_mode=True, **gateway_args(new_public_key(lab.gw)))
    assert fresh["changed"] and fresh["public_key"] is None
    assert not lab.gw.config_dir.exists()


def test_a_roamed_endpoint_is_left_and_a_changed_declaration_is_applied(lab: Lab) -> None:
    _, cp_public = build_tunnel(lab)
    # A peer that never sends, so only this test moves its live endpoint.
    far = new_public_key(lab.gw)
    declared = {"public_key": far, "allowed_ips": ["10.88.3.0/24"], "endpoint": "192.0.2.99:51820"}
    assert lab.gw.interface(**gateway_args(cp_public, [declared]))["changed"]
    assert lab.gw.dump().peers[far].endpoint == "192.0.2.99:51820"

    # The peer roams behind NAT: WireGuard learns a new live endpoint from its packets.
    lab.gw.sh(f"wg set wg0 peer {far} endpoint 198.51.100.20:40000")
    settled = lab.gw.interface(**gateway_args(cp_public, [declared]))
    assert settled["changed"] is False, settled["changes"]
    assert lab.gw.dump().peers[far].endpoint == "198.51.100.20:40000"

    moved = dict(declared, endpoint="192.0.2.98:51820")
    applied = lab.gw.interface(**gateway_args(cp_public, [moved]))
    assert applied["changes"] == [f"update wg0 peer {far}", f"update config {lab.gw.config_dir / 'wg0.conf'}"]
    assert lab.gw.dump().peers[far].endpoint == "192.0.2.98:51820"
    assert "Endpoint = 192.0.2.98:51820" in (lab.gw.config_dir / "wg0.conf").read_text()
    assert lab.gw.interface(**gateway_args(cp_public, [moved]))["changed"] is False

    lab.gw.sh(f"wg set wg0 peer {far} endpoint 198.51.100.21:40000")
    strict = dict(moved, endpoint_policy="always")
    assert lab.gw.interface(**gateway_args(cp_public, [strict]))["changes"] == [f"update wg0 peer {far}"]
    assert lab.gw.dump().peers[far].endpoint == "192.0.2.98:51820"
    assert lab.gw.interface(**gateway_args(cp_public, [strict]))["changed"] is False


def assert_refused(result: dict[str, Any], field: str, value: str) -> None:
    assert result.get("failed"), result
    assert result["field"] == field and result["value"] == value, result
    assert f"{field}={value!r}" in result["msg"], result["msg"]


def assert_gw_untouched(lab: Lab) -> None:
    assert lab.gw.sh("ip link show wg0", check=False).returncode != 0
    assert not lab.gw.config_dir.exists() and lab.gw.userspace_pids() == []
    assert not persist_dir(lab.gw).exists()


def test_names_ending_in_a_newline_are_refused(lab: Lab) -> None:
    cases = [({"name": "wg0\n"}, "name", "wg0\n"),
             ({"name": "wg:0"}, "name", "wg:0"),
             ({"config_dir": f"{lab.gw.config_dir}\n"}, "config_dir", f"{lab.gw.config_dir}\n"),
             ({"config_dir": "etc/wireguard"}, "config_dir", "etc/wireguard")]
    for args, field, value in cases:
        assert_refused(lab.gw.interface(**gateway_args(new_public_key(lab.gw)), **args), field, value)
        assert_gw_untouched(lab)
    table = lab.gw.routes_table()
    assert_refused(lab.gw.routes(interface="wg0\n"), "interface", "wg0\n")
    assert lab.gw.routes_table() == table and not persist_dir(lab.gw).exists()


def test_endpoints_addresses_and_allowed_ips_that_cannot_make_sense_are_refused(lab: Lab) -> None:
    key = new_public_key(lab.gw)
    endpoints = ["0.0.0.0:51820", "127.0.0.1:51820", "169.254.1.1:51820", "224.0.0.1:51820",
                 "255.255.255.255:51820", "[::1]:51820", "[ff02::1]:51820", "[::]:51820", "192.0.2.2:0"]
    for endpoint in endpoints:
        result = lab.gw.interface(peers=[{"public_key": key, "endpoint": endpoint}])
        assert_refused(result, "peers[0].endpoint", endpoint)
        assert_gw_untouched(lab)
    for cidr in ["127.0.0.1/32", "0.0.0.0/32", "224.0.0.0/4", "255.255.255.255/32", "169.254.0.0/16",
                 "::1/128", "ff02::/16", "10.88.1.0/33"]:
        result = lab.gw.interface(peers=[{"public_key": key, "allowed_ips": ["10.88.1.0/24", cidr]}])
        assert_refused(result, "peers[0].allowed_ips[1]", cidr)
        assert_gw_untouched(lab)
    for address in ["0.0.0.0/24", "127.0.0.2/8", "224.0.0.1/24", "255.255.255.255/32", "::1/128"]:
        assert_refused(lab.gw.interface(addresses=[address]), "addresses[0]", address)
        assert_gw_untouched(lab)


def test_routes_on_an_interface_that_is_not_wireguard_fail_naming_it(lab: Lab) -> None:
    lab.gw.sh("ip link add nlveth type veth peer name nlveth-peer && ip link set nlveth up"
              " && ip tuntap add mode tun name nltun && ip link set nltun up")
    for name, kind in (("nlveth", "is a veth link, not a WireGuard interface"),
                       ("nltun", "is a tun link that `wg` cannot read")):
        table = lab.gw.routes_table()
        result = lab.gw.routes(interface=name, extra_routes=["10.77.0.0/16"])
        assert_refused(result, "interface", name)
        assert kind in result["msg"] and "Unable to access interface" not in result["msg"]
        assert lab.gw.routes_table() == table and not persist_dir(lab.gw).exists()


def test_wireguard_go_failure_shows_its_error_not_its_banner(lab: Lab) -> None:
    # A read-only socket directory makes wireguard-go fail after printing its banner.
    lab.gw.sh("mount -o remount,ro /run/wireguard")
    script = MODULE_UTILS_ON_PATH + (
        "from ansible.module_utils.netloom.wireguard import start_userspace\n"
        "from ansible.module_utils.netloom.common import CommandError\n"
        "try:\n    start_userspace('wg0')\nexcept CommandError as err:\n    print(err)\n")
    # node_python() is the fixture's wrapper, which itself enters the node's mount namespace.
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{lab.gw.netns.name}", node_python(), "-c", script,
                           str(ROOT / "module_utils")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "wireguard-go wg0 failed (1): ERROR: (wg0)" in proc.stdout and "UAPI" in proc.stdout, proc.stdout
    assert "first class support" not in proc.stdout and "│" not in proc.stdout
    assert lab.gw.sh("ip link show wg0", check=False).returncode != 0


def test_wg_quick_loads_both_keys_from_their_own_files(lab: Lab) -> None:
    """The config holds no key; wg-quick's PostUp reads the private key and the preshared keys
    from their 0600 files, so the boot unit rebuilds the device with every secret in place."""
    gw_public, cp_public = build_tunnel(lab)
    psk = lab.gw.sh("wg genpsk").stdout.strip()
    peers = gateway_args(cp_public)["peers"]
    peers[0]["preshared_key"] = psk
    assert lab.gw.interface(**gateway_args(cp_public, [], peers=peers))["changed"]
    conf = lab.gw.config_dir / "wg0.conf"
    assert psk not in conf.read_text() and "PrivateKey" not in conf.read_text()

    lab.gw.kill_userspace()
    lab.gw.sh("ip link del wg0", check=False)
    up = node_python_in(lab.gw, ["wg-quick", "up", str(conf)],
                        {"WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"})
    assert up.returncode == 0, up.stderr
    live = lab.gw.dump()
    assert live.public_key == gw_public and live.peers[cp_public].preshared_key == psk
    again = lab.gw.interface(**gateway_args(cp_public, [], peers=peers))
    assert again["changed"] is False, again["changes"]


@pytest.mark.parametrize("bad_line,reason", [
    ("SaveConfig = maybe", "wg-quick strip rejected the rendered config (live file unchanged)"),
    ("NoSuchKey = 1", "the rendered config is not a WireGuard config (live file unchanged)"),
])
def test_a_config_wg_quick_rejects_never_goes_live(lab: Lab, tmp_path: Path, bad_line: str,
                                                  reason: str) -> None:
    """An operator's own template renders a config wg-quick (or wg) would refuse: nothing is written."""
    gw_public = lab.gw.interface(addresses=[f"{GW_TUNNEL}/24"], listen_port=51820)["public_key"]
    conf = lab.gw.config_dir / "wg0.conf"
    before = conf.read_bytes()
    broken = tmp_path / "broken.conf.j2"
    broken.write_text("[Interface]\nAddress = {{ interface.addresses | join(', ') }}\n" + bad_line + "\n")
    for check_mode in (True, False):
        result = lab.gw.interface(check_mode=check_mode, addresses=[f"{GW_TUNNEL}/24", "10.99.1.1/24"],
                                  listen_port=51820, template=str(broken))
        assert result.get("failed") and reason in result["msg"], result
        assert conf.read_bytes() == before
    assert "10.99.1.1" not in lab.gw.sh("ip addr show dev wg0").stdout, "nothing ran"
    assert gw_public == lab.gw.sh("wg show wg0 public-key").stdout.strip()


def test_without_the_action_plugin_the_module_names_the_missing_option(lab: Lab) -> None:
    args = {"name": "wg0", "config_dir": str(lab.gw.config_dir), "manage_service": False,
            "addresses": [f"{GW_TUNNEL}/24"]}
    result = run_module("wireguard_interface", args, netns=lab.gw.netns.name, controller=False)
    assert result["failed"] and "rendered.config" in result["msg"] and "action_plugins" in result["msg"]
    assert not lab.gw.config_dir.exists() and lab.gw.sh("ip link show wg0", check=False).returncode != 0
