"""The change plan's failure report and the reboot-persistence helpers (pure logic)."""
from __future__ import annotations

import io
import json
import os
import pathlib
import zipfile

import pytest
from ansible.module_utils import basic
from ansible.module_utils.netloom import persist, restore
from ansible.module_utils.netloom.common import ChangePlan, InputError, PlanFailure, execute_plan, finish

from plugin_utils.netloom_action import restore_units


def failing_step() -> None:
    raise OSError("disk full")


def test_a_failed_step_reports_the_steps_done_before_it() -> None:
    done: list[str] = []
    plan = ChangePlan()
    plan.add("link a", "create", None, "a", lambda: done.append("a"))
    plan.add("link b", "create", None, "b", failing_step)
    plan.add("link c", "create", None, "c", lambda: done.append("c"))
    with pytest.raises(PlanFailure) as info:
        plan.execute()
    assert [step.key for step in info.value.done] == ["link a"]
    assert info.value.step.key == "link b"
    assert str(info.value) == "create link b failed: disk full"
    assert done == ["a"]


def run_finish(plan: ChangePlan, capsys: pytest.CaptureFixture[str], check_mode: bool = False) -> dict:
    """finish() on a real AnsibleModule, as a module process would call it; returns its JSON."""
    args = {"ANSIBLE_MODULE_ARGS": {"_ansible_check_mode": check_mode}}
    basic._ANSIBLE_ARGS = json.dumps(args).encode()
    basic._ANSIBLE_PROFILE = "legacy"
    module = basic.AnsibleModule(argument_spec={}, supports_check_mode=True)
    with pytest.raises(SystemExit):
        finish(module, plan)
    return json.loads(capsys.readouterr().out)


def test_finish_on_a_failed_plan_says_changed_and_what_was_done(capsys: pytest.CaptureFixture[str]) -> None:
    plan = ChangePlan()
    plan.add("link a", "create", None, "a", lambda: None)
    plan.add("iptables filter X", "update", None, "rules", failing_step)
    result = run_finish(plan, capsys)
    assert result["failed"] is True
    assert result["changed"] is True
    assert result["changes"] == ["create link a"]
    assert result["failed_step"] == "update iptables filter X"
    assert "disk full" in result["msg"]


def test_finish_when_the_first_step_fails_reports_no_change(capsys: pytest.CaptureFixture[str]) -> None:
    plan = ChangePlan()
    plan.add("link a", "create", None, "a", failing_step)
    result = run_finish(plan, capsys)
    assert result["failed"] is True and result["changed"] is False and result["changes"] == []


def test_execute_plan_adds_what_on_failure_says_and_finish_does_not_run_it_again(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A value made by an earlier step (a generated key) is in the failure result; a plan executed
    under a lock is then finished without running its steps a second time."""
    made: dict[str, str] = {}
    plan = ChangePlan()
    plan.add("ssh key", "create", None, "generated", lambda: made.update(key="PRIVATE"))
    plan.add("container c", "create", None, "c", failing_step)
    basic._ANSIBLE_ARGS = json.dumps({"ANSIBLE_MODULE_ARGS": {}}).encode()
    basic._ANSIBLE_PROFILE = "legacy"
    module = basic.AnsibleModule(argument_spec={}, supports_check_mode=True)
    with pytest.raises(SystemExit):
        execute_plan(module, plan, on_failure=lambda: {"ssh_private_key": made.get("key")})
    failed = json.loads(capsys.readouterr().out)
    assert failed["failed"] and failed["ssh_private_key"] == "PRIVATE"
    assert failed["changes"] == ["create ssh key"]
    runs: list[str] = []
    plan = ChangePlan()
    plan.add("link a", "create", None, "a", lambda: runs.append("a"))
    execute_plan(module, plan)
    with pytest.raises(SystemExit):
        finish(module, plan, executed=True)
    assert json.loads(capsys.readouterr().out)["changes"] == ["create link a"] and runs == ["a"]


def test_check_mode_runs_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    plan = ChangePlan()
    plan.add("link a", "create", None, "a", failing_step)
    result = run_finish(plan, capsys, check_mode=True)
    assert result["changed"] is True and result["changes"] == ["create link a"]
    assert not result.get("failed")


def test_entry_names_sort_by_order_and_refuse_odd_keys() -> None:
    assert persist.entry_name("overlay_hub", "main", 10) == "10-overlay_hub@main.json"
    for key in ("", "wg0\n", "a/b", "../x", "a b"):
        with pytest.raises(InputError):
            persist.entry_name("wireguard_routes", key, 40)


def test_payload_zip_depends_only_on_names_and_contents() -> None:
    files = [("b.py", b"2"), ("a.py", b"1")]
    first = persist._zip_bytes(files)
    assert first == persist._zip_bytes(list(reversed(files)))
    assert first != persist._zip_bytes([("a.py", b"1"), ("b.py", b"3")])
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert archive.namelist() == ["a.py", "b.py"]


def test_the_late_unit_waits_for_every_service_an_entry_names() -> None:
    entries = {"40-wireguard_routes@wg0.json": {"netloom_restore": {"after": ["wg-quick@wg0.service"]}},
               "40-wireguard_routes@wg1.json": {"netloom_restore": {"after": ["wg-quick@wg1.service"]}}}
    rendered = {"rendered": restore_units()}  # as the module's action plugin renders them
    texts = persist._unit_texts(entries, persist.unit_templates(rendered))
    after = next(line for line in texts[persist.LATE_UNIT].splitlines() if line.startswith("After="))
    assert after.split("=", 1)[1].split() == sorted(
        ["docker.service", "netloom-restore-early.service", "network-online.target",
         "wg-quick@wg0.service", "wg-quick@wg1.service"])
    assert "Before=docker.service" in texts[persist.EARLY_UNIT]


def test_the_runner_replays_only_the_entries_of_its_phase(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / restore.STATE_DIR / "entries"
    folder.mkdir(parents=True)
    for name, phases in (("10-a@main.json", ["early"]), ("30-b@main.json", ["early", "late"]),
                         ("40-c@wg0.json", ["late"])):
        (folder / name).write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {}, "netloom_restore": {
            "module": name, "import": f"ansible.legacy.{name}", "phases": phases}}))
    assert [os.path.basename(path) for path, _ in restore.entries(str(tmp_path), "early")] == [
        "10-a@main.json", "30-b@main.json"]
    assert [os.path.basename(path) for path, _ in restore.entries(str(tmp_path), "late")] == [
        "30-b@main.json", "40-c@wg0.json"]


def test_an_unreadable_entry_fails_alone_and_the_later_ones_still_run(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A broken entry must not stop the phase: the CVE-2020-8558 guard is replayed after it."""
    folder = tmp_path / restore.STATE_DIR / "entries"
    folder.mkdir(parents=True)
    (folder / "10-overlay_hub@main.json").write_text("{not json")
    record = {"module": "dnat_rules", "import": "ansible.legacy.dnat_rules", "phases": ["early"]}
    (folder / "30-dnat_rules@main.json").write_text(
        json.dumps({"ANSIBLE_MODULE_ARGS": {}, "netloom_restore": record}))
    assert restore.replay(str(tmp_path), "early") == 2  # the second has no payload here: it ran and failed
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("netloom-restore early: 10-overlay_hub@main.json: FAILED: unreadable")
    assert out[1].startswith("netloom-restore early: 30-dnat_rules@main.json: FAILED")
