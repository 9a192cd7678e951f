"""The overlay's hardening, run as Ansible runs the modules, in throwaway network namespaces.

- firewall scope: FORWARD accepts only overlay interfaces, and never lets a neighbour that routes
  the overlay through a runner open connections to its workloads; the jump stays behind DOCKER-USER;
- address-plan safety and every class of bad input refused before anything changes;
- reboot survival: a wiped kernel comes back from netloom-restore alone;
- a run that fails part-way says what it did.
"""
from __future__ import annotations

import contextlib
import io
import os
import pathlib
import subprocess
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.foreign_rules import add_foreign_rules
from tests.support.kernel_view import addresses, kernel_state, links, vxlan
from tests.support.netns import Netns, persist_root, replay_boot, run_module, run_module_ok, sh

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

PLAN = "10.0.0.0/8/8/16"
HUB_ENTRY = "10-overlay_hub@main.json"
RUNNER_ENTRY = "20-overlay_runner@main.json"
NOT_HOSTS = ["0.0.0.0", "255.255.255.255", "127.0.0.1", "224.0.0.1", "169.254.1.1"]
BAD_PLANS = ["0.0.0.0/0/8/24", "127.0.0.0/8/8/16", "224.0.0.0/8/8/16", "169.254.0.0/16/4/12"]
# The restore steps a first run adds (netloom-restore's runner, units and their enable links).
RESTORE_COMMON = ["create restore runner",
                  "create restore unit netloom-restore-early.service",
                  "create restore unit link etc/systemd/system/multi-user.target.wants/"
                  "netloom-restore-early.service",
                  "create restore unit netloom-restore-late.service",
                  "create restore unit link etc/systemd/system/multi-user.target.wants/"
                  "netloom-restore-late.service"]


def hub_args(state_file: pathlib.Path, **extra: Any) -> dict[str, Any]:
    base = {"plan": PLAN, "underlay_ip": "192.0.2.1", "state_file": str(state_file),
            "runners": [{"name": "r1", "underlay_ip": "192.0.2.11"}]}
    base.update(extra)
    return base


def runner_args(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"plan": PLAN, "runner_id": 1, "hub_underlay_ip": "192.0.2.1",
                            "underlay_ip": "192.0.2.11"}
    base.update(extra)
    return base


@pytest.fixture
def pair(tmp_path: pathlib.Path) -> Iterator[tuple[Netns, Netns, pathlib.Path]]:
    """A hub (u0 192.0.2.1/24) and a runner (eth0 192.0.2.11/24) on one veth, forwarding off."""
    with Netns("nlhub") as hub, Netns("nlrun") as runner:
        sh(f"ip link add u0 type veth peer name eth0 netns {runner.name} && ip link set u0 up"
           " && ip addr add 192.0.2.1/24 dev u0 && sysctl -qw net.ipv4.ip_forward=0", hub.name)
        runner.sh("ip link set eth0 up && ip addr add 192.0.2.11/24 dev eth0"
                  " && sysctl -qw net.ipv4.ip_forward=0")
        yield hub, runner, tmp_path / "hub" / "runners.json"


def files_under(root: pathlib.Path) -> list[str]:
    """Every file and symlink below a persistence root (directories alone do not count)."""
    if not root.exists():
        return []
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")
                  if path.is_file() or path.is_symlink())


def view(ns: Netns) -> str:
    """What the overlay converges, without what a rebuild renumbers (ifindex) or timing (carrier)."""
    summary = []
    for name, link in sorted(links(ns).items()):
        kind = link.get("linkinfo", {}).get("info_kind", "")
        summary.append(f"{name} {kind} {link['mtu']} {'UP' in link['flags']} {link.get('master')} "
                       f"{vxlan(link) if kind == 'vxlan' else ''} {addresses(ns, name)}")
    routes = ns.sh("ip -4 route show table main").replace(" linkdown", "")
    return "\n".join([*summary, routes, ns.sh("iptables -S"), ns.sh("iptables -t nat -S"),
                      ns.sh("sysctl -n net.ipv4.ip_forward")])


# ---- reboot survival -----------------------------------------------------------------------


def test_check_mode_on_a_fresh_node_lists_the_restore_steps_and_creates_nothing(
        pair: tuple[Netns, Netns, pathlib.Path]) -> None:
    hub, runner, state_file = pair
    for ns, module, args, entry in ((hub, "overlay_hub", hub_args(state_file), HUB_ENTRY),
                                    (runner, "overlay_runner", runner_args(), RUNNER_ENTRY)):
        untouched = kernel_state(ns, routes=True)
        preview = run_module_ok(module, ns, args, check_mode=True)
        name = module
        assert preview["changes"][-7:] == [f"create restore payload {name}", f"create restore entry {entry}",
                                           *RESTORE_COMMON]
        assert preview["diff"]["after"][f"restore entry {entry}"]["plan"] == PLAN
        assert kernel_state(ns, routes=True) == untouched
        assert not persist_root(ns.name).exists()
    assert not state_file.exists()


def test_replay_restores_a_wiped_overlay_and_absent_forgets_it(
        pair: tuple[Netns, Netns, pathlib.Path]) -> None:
    hub, runner, state_file = pair
    hub_first = run_module_ok("overlay_hub", hub, hub_args(state_file))
    runner_first = run_module_ok("overlay_runner", runner, runner_args())
    for result, name, entry in ((hub_first, "overlay_hub", HUB_ENTRY),
                                (runner_first, "overlay_runner", RUNNER_ENTRY)):
        assert result["changes"][-7:] == [f"create restore payload {name}", f"create restore entry {entry}",
                                          *RESTORE_COMMON]
    assert " 0% packet loss" in runner.sh("ping -c1 -W2 -I 10.1.0.1 10.0.0.1")
    converged = {ns.name: view(ns) for ns in (hub, runner)}

    # A reboot as the kernel sees it: netloom's links, chains and ip_forward are gone.
    hub.sh("ip link del vxkr1 && ip link del kohaku-host"
           " && iptables -D FORWARD -m comment --comment netloom:NETLOOM-OVLHUB-FWD -j NETLOOM-OVLHUB-FWD"
           " && iptables -F NETLOOM-OVLHUB-FWD && iptables -X NETLOOM-OVLHUB-FWD"
           " && sysctl -qw net.ipv4.ip_forward=0")
    runner.sh("ip link del vxlan0 && ip link del kohaku-overlay"
              " && iptables -D FORWARD -m comment --comment netloom:NETLOOM-OVLRUN-FWD -j NETLOOM-OVLRUN-FWD"
              " && iptables -F NETLOOM-OVLRUN-FWD && iptables -X NETLOOM-OVLRUN-FWD"
              " && iptables -t nat -D POSTROUTING -m comment --comment netloom:NETLOOM-OVLRUN-NAT"
              " -j NETLOOM-OVLRUN-NAT && iptables -t nat -F NETLOOM-OVLRUN-NAT"
              " && iptables -t nat -X NETLOOM-OVLRUN-NAT && sysctl -qw net.ipv4.ip_forward=0")
    assert "kohaku" not in hub.sh("ip link") + runner.sh("ip link")
    assert "10.0.0.0/8" not in runner.sh("ip route")

    for ns, entry in ((hub, HUB_ENTRY), (runner, RUNNER_ENTRY)):
        booted = replay_boot(ns)
        assert booted.returncode == 0, booted.stdout + booted.stderr
        assert f"netloom-restore early: {entry}: changed" in booted.stdout
        assert view(ns) == converged[ns.name]
    assert " 0% packet loss" in runner.sh("ping -c1 -W2 -I 10.1.0.1 10.0.0.1")
    assert not run_module_ok("overlay_hub", hub, hub_args(state_file))["changed"]
    assert not run_module_ok("overlay_runner", runner, runner_args())["changed"]

    for ns, module, args, entry in ((runner, "overlay_runner", {"state": "absent"}, RUNNER_ENTRY),
                                    (hub, "overlay_hub", {"state": "absent", "state_file": str(state_file)},
                                     HUB_ENTRY)):
        gone = run_module_ok(module, ns, args)
        assert f"delete restore entry {entry}" in gone["changes"]
        assert files_under(persist_root(ns.name)) == []
        assert not run_module_ok(module, ns, args)["changed"]


# ---- a partial failure ---------------------------------------------------------------------


@contextlib.contextmanager
def read_only_dir(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """An empty read-only file system at `path`: reads work, the first write fails (EROFS)."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_failure_mid_plan_reports_what_was_done(pair: tuple[Netns, Netns, pathlib.Path],
                                                  tmp_path: pathlib.Path) -> None:
    hub, _, _ = pair
    with read_only_dir(tmp_path / "ro") as folder:
        state_file = folder / "runners.json"
        planned = run_module_ok("overlay_hub", hub, hub_args(state_file), check_mode=True)["changes"]
        failed = run_module("overlay_hub", hub_args(state_file), netns=hub.name)
        assert failed["failed"]
        assert failed["changed"] is True
        failed_step = f"create file {state_file}"
        assert failed["failed_step"] == failed_step
        assert failed["changes"] == planned[:planned.index(failed_step)]
        assert failed["changes"] == ["update sysctl net.ipv4.ip_forward", "create link kohaku-host",
                                     "create link vxkr1", "create addresses kohaku-host",
                                     "create addresses vxkr1", "create iptables filter NETLOOM-OVLHUB-FWD",
                                     "create iptables filter FORWARD -> NETLOOM-OVLHUB-FWD"]
        assert "Read-only file system" in failed["msg"]
        # What the report says was done is what the kernel holds; nothing after the failure ran.
        assert vxlan(links(hub)["vxkr1"])["remote"] == "192.0.2.11"
        assert addresses(hub, "kohaku-host") == ["10.0.0.1/8"]
        assert hub.sh("sysctl -n net.ipv4.ip_forward").strip() == "1"
        assert files_under(persist_root(hub.name)) == []
    finished = run_module_ok("overlay_hub", hub, hub_args(state_file))
    assert finished["changes"][0] == failed_step
    assert f"create restore entry {HUB_ENTRY}" in finished["changes"]


# ---- firewall scope ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["ACCEPT", "DROP"])
def test_a_neighbour_routing_the_overlay_via_a_runner_gets_no_new_connection_through(
        tmp_path: pathlib.Path, policy: str) -> None:
    """Whatever Docker's FORWARD policy is (ACCEPT when ip_forward was already 1 as it started):
    replies and overlay-initiated traffic pass our chain, a neighbour's new connection to a
    workload is dropped by it, and a published (DNATed) port is left to the rules after it."""
    with Netns("nlrun") as runner, Netns("nlnbr") as neighbour, Netns("nlwrk") as workload:
        sh(f"ip link add eth0 type veth peer name n0 netns {neighbour.name}", runner.name)
        runner.sh("ip link set eth0 up && ip addr add 192.0.2.11/24 dev eth0"
                  f" && iptables -P FORWARD {policy}")
        neighbour.sh("ip link set n0 up && ip addr add 192.0.2.50/24 dev n0"
                     " && ip route add 10.1.0.0/16 via 192.0.2.11")
        run_module_ok("overlay_runner", runner, runner_args())
        runner.sh(f"ip link add ws0 type veth peer name w0 netns {workload.name}"
                  " && ip link set ws0 master kohaku-overlay up")
        workload.sh("ip link set w0 up && ip addr add 10.1.0.5/16 dev w0"
                    " && ip route add default via 10.1.0.1")

        # The workload reaches the underlay (masqueraded) and the replies come back in.
        assert " 0% packet loss" in workload.sh("ping -c1 -W2 192.0.2.50")
        # The neighbour's echo request to the workload is new traffic arriving on the underlay.
        assert "100% packet loss" in neighbour.sh("ping -c1 -W1 10.1.0.5", check=False)
        counters = runner.sh("iptables -S NETLOOM-OVLRUN-FWD -v")
        assert "-s 10.0.0.0/8 -i kohaku-overlay -c 1 " in counters  # the workload's request
        assert "-o kohaku-overlay -m conntrack --ctstate RELATED,ESTABLISHED -c 1 " in counters  # its reply
        # the neighbour's request
        assert "-o kohaku-overlay -c 1 " in counters and counters.rstrip().endswith("-j DROP")

        # A published port: Docker DNATs it; our chain returns it to the rules after it (here the
        # policy stands in for Docker's accept of a published port).
        runner.sh("iptables -t nat -A PREROUTING -d 192.0.2.11/32 -p icmp -j DNAT --to-destination 10.1.0.5")
        published = neighbour.sh("ping -c1 -W1 192.0.2.11", check=False)
        assert ("100% packet loss" if policy == "DROP" else " 0% packet loss") in published
        assert "--ctstate DNAT -c 1 " in runner.sh("iptables -S NETLOOM-OVLRUN-FWD -v")


def test_a_neighbour_routing_the_overlay_via_the_hub_is_dropped_there(
        pair: tuple[Netns, Netns, pathlib.Path]) -> None:
    """The hub has no Docker (FORWARD policy ACCEPT): its own chain drops what it must not forward."""
    hub, runner, state_file = pair
    with Netns("nlnbr") as neighbour:
        sh(f"ip link add n1 type veth peer name n0 netns {neighbour.name} && ip link set n1 up"
           " && ip addr add 198.51.100.1/24 dev n1", hub.name)
        neighbour.sh("ip link set n0 up && ip addr add 198.51.100.50/24 dev n0"
                     " && ip route add 10.1.0.0/16 via 198.51.100.1")
        run_module_ok("overlay_hub", hub, hub_args(state_file))
        run_module_ok("overlay_runner", runner, runner_args())
        assert "100% packet loss" in neighbour.sh("ping -c1 -W1 10.1.0.1", check=False)
        assert "-A NETLOOM-OVLHUB-FWD -o vxkr+ -c 1 " in hub.sh("iptables -S NETLOOM-OVLHUB-FWD -v")
        assert hub.sh("iptables -S FORWARD").splitlines() == [
            "-P FORWARD ACCEPT",
            '-A FORWARD -m comment --comment "netloom:NETLOOM-OVLHUB-FWD" -j NETLOOM-OVLHUB-FWD']


def test_the_jump_stays_behind_docker_user(tmp_path: pathlib.Path) -> None:
    with Netns("nlhub") as hub:
        hub.sh("ip link add u0 type veth peer name u1 && ip link set u0 up"
               " && ip addr add 192.0.2.1/24 dev u0")
        add_foreign_rules(hub, "*filter\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\n"
                               "-A DOCKER-USER -j RETURN\nCOMMIT\n")
        args = hub_args(tmp_path / "runners.json")
        run_module_ok("overlay_hub", hub, args)
        jump = '-A FORWARD -m comment --comment "netloom:NETLOOM-OVLHUB-FWD" -j NETLOOM-OVLHUB-FWD'
        assert hub.sh("iptables -S FORWARD").splitlines()[1:] == ["-A FORWARD -j DOCKER-USER", jump]
        # Docker restarting puts DOCKER-USER first again: still in order, nothing to do.
        hub.sh("iptables -D FORWARD -j DOCKER-USER && iptables -I FORWARD 1 -j DOCKER-USER")
        assert not run_module_ok("overlay_hub", hub, args)["changed"]
        # A jump moved in front of DOCKER-USER is put back behind it.
        hub.sh(f"iptables {jump.replace('-A', '-D', 1)} && iptables {jump.replace('-A', '-I', 1)}")
        moved = run_module_ok("overlay_hub", hub, args)
        assert moved["changes"] == ["update iptables filter FORWARD -> NETLOOM-OVLHUB-FWD"]
        assert hub.sh("iptables -S FORWARD").splitlines()[1:] == ["-A FORWARD -j DOCKER-USER", jump]


# ---- bad input, each class refused before any change ----------------------------------------


def assert_refused(ns: Netns, module: str, args: dict[str, Any], field: str, value: Any,
                   fragment: str) -> None:
    """Failed, naming the field and the value, and the netns and the persistence untouched."""
    before = kernel_state(ns, routes=True)
    result = run_module(module, args, netns=ns.name)
    assert result.get("failed"), result
    assert result.get("field") == field, result["msg"]
    assert repr(value) in result["msg"] or str(value) in result["msg"], result["msg"]
    assert fragment in result["msg"], result["msg"]
    assert not result.get("changed")
    assert kernel_state(ns, routes=True) == before
    assert not persist_root(ns.name).exists()


HUB_BAD = [
    ({"anchor_name": "kohaku-host\n"}, "anchor_name", "kohaku-host\n", "interface names allow"),
    ({"anchor_name": "kohaku:host"}, "anchor_name", "kohaku:host", "interface names allow"),
    ({"link_prefix": "vxkr\n"}, "link_prefix", "vxkr\n", "letters, digits"),
    ({"link_prefix": "vx:kr"}, "link_prefix", "vx:kr", "letters, digits"),
    ({"runners": [{"name": "r1\n", "underlay_ip": "192.0.2.11"}]}, "runners[0].name", "r1\n", "runner names"),
    *(({"underlay_ip": ip}, "underlay_ip", ip, "cannot be a unicast host") for ip in NOT_HOSTS),
    *(({"runners": [{"name": "r1", "underlay_ip": ip}]}, "runners[0].underlay_ip", ip,
       "cannot be a unicast host") for ip in NOT_HOSTS),
    *(({"plan": plan}, "plan", plan, "the default route" if plan.startswith("0.0.0.0/0") else "overlaps")
      for plan in BAD_PLANS),
    ({"plan": "192.0.0.0/16/8/8"}, "underlay_ip", "192.0.2.1", "inside the overlay 192.0.0.0/16"),
    ({"runners": [{"name": "r1", "underlay_ip": "10.9.0.1"}]}, "runners[0].underlay_ip", "10.9.0.1",
     "inside the overlay"),
    ({"anchor_name": "u0"}, "anchor_name", "u0", "holds underlay_ip 192.0.2.1"),
]


@pytest.mark.parametrize("overrides, field, value, fragment", HUB_BAD)
def test_hub_bad_input_changes_nothing(tmp_path: pathlib.Path, overrides: dict[str, Any], field: str,
                                       value: Any, fragment: str) -> None:
    with Netns("nlhub") as hub:
        hub.sh("ip link add u0 type veth peer name u1 && ip link set u0 up && ip addr add 192.0.2.1/24 dev u0"
               " && sysctl -qw net.ipv4.ip_forward=0")
        assert_refused(hub, "overlay_hub", hub_args(tmp_path / "runners.json", **overrides), field, value,
                       fragment)
        assert not (tmp_path / "runners.json").exists()


def test_hub_refuses_a_foreign_anchor_and_an_overlapping_route(tmp_path: pathlib.Path) -> None:
    with Netns("nlhub") as hub:
        hub.sh("ip link add u0 type veth peer name u1 && ip link set u0 up && ip addr add 192.0.2.1/24 dev u0"
               " && sysctl -qw net.ipv4.ip_forward=0 && ip route add 10.5.0.0/16 via 192.0.2.254")
        assert_refused(hub, "overlay_hub", hub_args(tmp_path / "runners.json"), "plan", PLAN,
                       "overlaps the route 10.5.0.0/16 via 192.0.2.254 dev u0")
        hub.sh("ip route del 10.5.0.0/16 && ip link add kohaku-host type bridge"
               " && ip addr add 172.31.9.1/24 dev kohaku-host")
        assert_refused(hub, "overlay_hub", hub_args(tmp_path / "runners.json"), "anchor_name", "kohaku-host",
                       "addresses outside the overlay (172.31.9.1/24)")


RUNNER_BAD = [
    ({"bridge_name": "kohaku-overlay\n"}, "bridge_name", "kohaku-overlay\n", "interface names allow"),
    ({"bridge_name": "kohaku:overlay"}, "bridge_name", "kohaku:overlay", "interface names allow"),
    ({"vxlan_name": "vxlan0\n"}, "vxlan_name", "vxlan0\n", "interface names allow"),
    ({"vxlan_name": "vx:0"}, "vxlan_name", "vx:0", "interface names allow"),
    *(({"underlay_ip": ip}, "underlay_ip", ip, "cannot be a unicast host") for ip in NOT_HOSTS),
    *(({"hub_underlay_ip": ip}, "hub_underlay_ip", ip, "cannot be a unicast host") for ip in NOT_HOSTS),
    *(({"plan": plan}, "plan", plan, "the default route" if plan.startswith("0.0.0.0/0") else "overlaps")
      for plan in BAD_PLANS),
    ({"plan": "192.0.0.0/16/8/8"}, "hub_underlay_ip", "192.0.2.1", "inside the overlay 192.0.0.0/16"),
    ({"hub_underlay_ip": "10.0.0.9"}, "hub_underlay_ip", "10.0.0.9", "inside the overlay 10.0.0.0/8"),
    ({"bridge_name": "ubr"}, "bridge_name", "ubr", "holding underlay_ip 192.0.2.11"),
    ({"vxlan_name": "ubr"}, "vxlan_name", "ubr", "holding underlay_ip 192.0.2.11"),
    ({"bridge_name": "other0"}, "bridge_name", "other0", "addresses outside the overlay: 172.31.0.1/24"),
    ({"bridge_name": "nic0"}, "bridge_name", "nic0", "ports netloom does not own: vxo (vxlan): not the"),
    ({"bridge_name": "tapbr"}, "bridge_name", "tapbr", "ports netloom does not own: tap0 (tun)"),
    ({"vxlan_name": "other0"}, "vxlan_name", "other0", "exists as a bridge link"),
    ({"bridge_name": "u0"}, "bridge_name", "u0", "exists as a veth link, not a bridge"),
]


@pytest.mark.parametrize("overrides, field, value, fragment", RUNNER_BAD)
def test_runner_bad_input_changes_nothing(overrides: dict[str, Any], field: str, value: Any,
                                          fragment: str) -> None:
    """The underlay on a bridge (ubr, port u0) with a default route; a foreign bridge with an address
    (other0) and one with a port that is neither vxlan0 nor a veth (nic0)."""
    with Netns("nlrun") as runner:
        runner.sh("ip link add u0 type veth peer name u1 && ip link add ubr type bridge"
                  " && ip link set u0 master ubr && ip link set u0 up && ip link set u1 up"
                  " && ip link set ubr up"
                  " && ip addr add 192.0.2.11/24 dev ubr && ip route add default via 192.0.2.254"
                  " && ip link add other0 type bridge && ip addr add 172.31.0.1/24 dev other0"
                  " && ip link add nic0 type bridge && ip link add vxo type vxlan id 999 dstport 4789"
                  " && ip link set vxo master nic0"
                  " && ip tuntap add dev nlvm-t9 mode tap && ip link set nlvm-t9 master nic0"
                  " && ip link add tapbr type bridge && ip tuntap add dev tap0 mode tap"
                  " && ip link set tap0 master tapbr"
                  " && sysctl -qw net.ipv4.ip_forward=0")
        assert_refused(runner, "overlay_runner", runner_args(**overrides), field, value, fragment)
        assert runner.sh("ip route show default").startswith("default via 192.0.2.254 dev ubr")


def test_runner_refuses_an_overlay_over_a_foreign_route() -> None:
    with Netns("nlrun") as runner:
        runner.sh("ip link add u0 type veth peer name u1 && ip link set u0 up"
                  " && ip addr add 192.0.2.11/24 dev u0 && ip route add 10.0.0.0/8 via 192.0.2.254"
                  " && sysctl -qw net.ipv4.ip_forward=0")
        assert_refused(runner, "overlay_runner", runner_args(), "plan", PLAN,
                       "overlaps the route 10.0.0.0/8 via 192.0.2.254 dev u0")


def test_a_changed_restore_payload_is_drift_that_the_next_run_repairs(
        pair: tuple[Netns, Netns, pathlib.Path]) -> None:
    """The no-op compares the stored payload by its zip directory (no re-compression); a payload
    whose code differs (here a member rewritten, the zip still valid) is still found and rewritten."""
    hub, _runner, state_file = pair
    run_module_ok("overlay_hub", hub, hub_args(state_file))
    payload = persist_root(hub.name) / "var/lib/netloom/restore/payloads/overlay_hub.zip"
    original = payload.read_bytes()
    assert not run_module_ok("overlay_hub", hub, hub_args(state_file))["changed"]
    with zipfile.ZipFile(io.BytesIO(original)) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(payload, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            archive.writestr(info, data + b"\n# edited on the node\n" if info.filename.endswith(
                "overlay_hub.py") else data)
    repaired = run_module_ok("overlay_hub", hub, hub_args(state_file))
    assert repaired["changes"] == ["update restore payload overlay_hub"]
    assert payload.read_bytes() == original
    assert not run_module_ok("overlay_hub", hub, hub_args(state_file))["changed"]
