"""firewalld planning with an injected firewall-cmd runner.

firewalld cannot run in the test lab (no D-Bus system bus or systemd in the test process),
so this is the one place netloom tests with a fake command runner: it answers the
firewall-cmd calls the planner makes from an in-memory runtime and permanent configuration
and records the changing calls, which are then checked against real firewall-cmd syntax
(--change-interface and --remove-interface may be repeated in one call: firewall-cmd declares
them with argparse action "append"). Like the real tool it exits 252 when firewalld is not
running, and a given exit code for --state simulates any other failure.
"""
from __future__ import annotations

import pytest
from ansible.module_utils.netloom.common import CommandError, InputError
from ansible.module_utils.netloom.firewalld import FirewallCmdError, plan_trusted_interfaces

TOOL = "/usr/bin/firewall-cmd"


class FirewallCmd:
    """In-memory firewall-cmd: --state, --list-interfaces, --change/--remove-interface per plane."""

    def __init__(self, running: bool, runtime: dict[str, list[str]], permanent: dict[str, list[str]],
                 state_code: int | None = None) -> None:
        self.running = running
        self.planes = {"runtime": runtime, "permanent": permanent}
        self.changes: list[list[str]] = []
        self.calls = 0
        # --state's exit code when it is not 0 (running) or 252 (not running): a broken firewall-cmd.
        self.state_code = state_code

    def __call__(self, argv: list[str], stdin: str | None = None, check: bool = True) -> str:
        assert argv[0] == TOOL
        self.calls += 1
        args = argv[1:]
        if args == ["--state"]:
            if self.state_code is not None:
                raise FirewallCmdError(f"{TOOL} --state failed ({self.state_code}): Authorization failed.",
                                       self.state_code)
            if not self.running:
                raise FirewallCmdError(f"{TOOL} --state failed (252): not running", 252)
            return "running\n"
        assert self.running, "only --state may be called when firewalld is not running"
        plane = "permanent" if args[0] == "--permanent" else "runtime"
        args = args[1:] if plane == "permanent" else args
        zone = args[0].removeprefix("--zone=")
        zones = self.planes[plane]
        if args[1] == "--list-interfaces":
            return " ".join(zones.get(zone, [])) + "\n"
        self.changes.append(argv)
        for arg in args[1:]:
            option, name = arg.split("=", 1)
            for members in zones.values():
                if name in members:
                    members.remove(name)
            if option == "--change-interface":
                zones.setdefault(zone, []).append(name)
            else:
                assert option == "--remove-interface"
        return "success\n"


def test_not_running_is_a_no_op() -> None:
    fake = FirewallCmd(False, {}, {})
    assert plan_trusted_interfaces(["vxlan0"], runner=fake, tool=TOOL).steps == []
    assert fake.calls == 1


@pytest.mark.parametrize("code", [1, 2, 254])
def test_a_failing_firewall_cmd_is_an_error_not_not_running(code: int) -> None:
    fake = FirewallCmd(True, {}, {}, state_code=code)
    with pytest.raises(CommandError, match=f"cannot tell whether firewalld runs: .*failed \\({code}\\)"):
        plan_trusted_interfaces(["vxlan0"], runner=fake, tool=TOOL)
    assert fake.changes == []


def test_odd_state_output_is_an_error() -> None:
    with pytest.raises(CommandError, match="printed 'maybe'"):
        plan_trusted_interfaces(["vxlan0"], runner=lambda argv, **_: "maybe\n", tool=TOOL)


def test_one_call_per_plane_for_all_interfaces() -> None:
    names = [f"vxkr{number}" for number in range(1, 255)]
    fake = FirewallCmd(True, {"trusted": []}, {"trusted": []})
    plan = plan_trusted_interfaces(names, runner=fake, tool=TOOL)
    plan.execute()
    assert fake.changes == [[TOOL, "--zone=trusted", *(f"--change-interface={name}" for name in names)],
                            [TOOL, "--permanent", "--zone=trusted",
                             *(f"--change-interface={name}" for name in names)]]
    assert fake.calls == 1 + 2 + 2  # --state, one listing and one change per plane
    assert sorted(fake.planes["permanent"]["trusted"]) == sorted(names)


def test_each_plane_gets_only_its_own_difference_and_second_run_is_clean() -> None:
    fake = FirewallCmd(True, {"trusted": ["vxlan0"], "public": ["eth0", "br0"]},
                       {"trusted": [], "public": ["eth0"]})
    plan = plan_trusted_interfaces(["vxlan0", "br0"], runner=fake, tool=TOOL)
    assert plan.summary() == ["update firewalld runtime zone trusted",
                              "update firewalld permanent zone trusted"]
    assert plan.diff() == {
        "before": {"firewalld runtime zone trusted": ["vxlan0"], "firewalld permanent zone trusted": []},
        "after": {"firewalld runtime zone trusted": ["br0", "vxlan0"],
                  "firewalld permanent zone trusted": ["br0", "vxlan0"]}}
    assert fake.changes == []  # planning changes nothing
    plan.execute()
    assert fake.changes == [
        [TOOL, "--zone=trusted", "--change-interface=br0"],
        [TOOL, "--permanent", "--zone=trusted", "--change-interface=vxlan0", "--change-interface=br0"]]
    assert fake.planes["runtime"]["public"] == ["eth0"]  # moved out of public, eth0 untouched
    assert plan_trusted_interfaces(["vxlan0", "br0"], runner=fake, tool=TOOL).steps == []


def test_permanent_drift_alone_is_repaired() -> None:
    fake = FirewallCmd(True, {"trusted": ["wg0"]}, {"trusted": []})
    plan = plan_trusted_interfaces(["wg0"], runner=fake, tool=TOOL)
    assert plan.summary() == ["update firewalld permanent zone trusted"]


def test_absent_removes_only_listed_interfaces_in_both_planes() -> None:
    fake = FirewallCmd(True, {"trusted": ["vxlan0", "docker0"]}, {"trusted": ["vxlan0", "docker0"]})
    plan = plan_trusted_interfaces(["vxlan0", "wg9"], state="absent", runner=fake, tool=TOOL)
    plan.execute()
    assert fake.changes == [[TOOL, "--zone=trusted", "--remove-interface=vxlan0"],
                            [TOOL, "--permanent", "--zone=trusted", "--remove-interface=vxlan0"]]
    assert fake.planes["runtime"]["trusted"] == ["docker0"]
    assert plan_trusted_interfaces(["vxlan0"], state="absent", runner=fake, tool=TOOL).steps == []


def test_other_zone_is_supported() -> None:
    fake = FirewallCmd(True, {}, {})
    plan = plan_trusted_interfaces(["br0"], zone="internal", runner=fake, tool=TOOL)
    plan.execute()
    assert fake.planes["runtime"] == {"internal": ["br0"]}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"interfaces": ["this-name-is-too-long0"]}, "interfaces"),
    ({"interfaces": ["eth0;reboot"]}, "interfaces"),
    ({"interfaces": ["br0", "br0"]}, "interfaces"),
    ({"interfaces": ["br0"], "zone": "trusted --panic-on"}, "zone"),
    ({"interfaces": ["br0"], "state": "maybe"}, "state"),
])
def test_bad_input_fails_before_any_command(kwargs: dict, field: str) -> None:
    fake = FirewallCmd(True, {}, {})
    with pytest.raises(InputError) as info:
        plan_trusted_interfaces(runner=fake, tool=TOOL, **kwargs)
    assert info.value.field_name == field
    assert fake.changes == []
