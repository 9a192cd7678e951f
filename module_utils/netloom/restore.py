"""netloom-restore: replay the last converged state at boot, through the modules themselves.

This file is the boot-time runner (stdlib only). Every module that converges kernel state
which nothing else brings back after a reboot (links, addresses, routes, iptables chains,
sysctls) records, on each successful real run, an entry: its arguments as Ansible gave them
and the exact code that ran (the module's payload zip). At boot, systemd runs this file once
per phase, and it runs each recorded module again with `python3 -m IMPORT_NAME ARGS.json`
(IMPORT_NAME is ansible.legacy.NAME, where Ansible packs a library module), Ansible's own way
to run a module by hand. The node converges through the same code the last Ansible run used,
so the boot path can never drift from the modules.

Phases: `early` runs before Docker starts (no container can send before the overlay, the
DNAT rules and the CVE-2020-8558 guard are back); `late` runs after Docker and wg-quick
(interfaces they create, such as a worker bridge or wg0, exist by then).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

# Paths below the persistence root (/ on a node; tests point NETLOOM_PERSIST_ROOT elsewhere).
STATE_DIR = "var/lib/netloom/restore"
ENTRY_GLOB = "*.json"
PHASES = ("early", "late")


# A replay that hangs must not hold Docker back for ever (the early phase runs before it).
ENTRY_TIMEOUT_S = 300


def entries(root: str, phase: str) -> list[tuple[str, dict | None]]:
    """The recorded entries of one phase, in file-name order (ORDER-MODULE@KEY.json).

    An entry that cannot be read is returned as None, so it is reported as failed and the
    entries after it (the CVE-2020-8558 guard among them) still run.
    """
    found: list[tuple[str, dict | None]] = []
    for path in sorted(glob.glob(os.path.join(root, STATE_DIR, "entries", ENTRY_GLOB))):
        try:
            with open(path, encoding="utf-8") as handle:
                entry = json.load(handle)
            record = entry["netloom_restore"]
            if phase in record["phases"]:
                found.append((path, {"module": record["module"], "import": record["import"]}))
        except (OSError, ValueError, KeyError, TypeError):
            found.append((path, None))
    return found


def replay_one(root: str, path: str, record: dict | None, python: str) -> dict:
    """Run one entry's module from its recorded payload; its JSON result, or why it failed."""
    if record is None:
        return {"failed": True, "msg": "unreadable restore entry (not netloom's JSON)"}
    payload = os.path.join(root, STATE_DIR, "payloads", f"{record['module']}.zip")
    env = {**os.environ, "PYTHONPATH": payload}
    try:
        proc = subprocess.run([python, "-m", record["import"], path], env=env, capture_output=True,
                              text=True, check=False, timeout=ENTRY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"failed": True, "msg": f"no result within {ENTRY_TIMEOUT_S} s"}
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        return {"failed": True, "msg": (proc.stderr or proc.stdout).strip()[-2000:]}
    if proc.returncode != 0:
        result["failed"] = True
    return result


def replay(root: str, phase: str, python: str = sys.executable) -> int:
    """Run every entry of a phase, each reported; the number of failures is returned."""
    failures = 0
    for path, record in entries(root, phase):
        result = replay_one(root, path, record, python)
        failed = bool(result.get("failed"))
        failures += failed
        status = "FAILED" if failed else ("changed" if result.get("changed") else "ok")
        detail = result.get("msg") if failed else ", ".join(result.get("changes", []))
        print(f"netloom-restore {phase}: {os.path.basename(path)}: {status}"
              + (f": {detail}" if detail else ""), flush=True)
    return failures


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in PHASES:
        print(f"usage: {argv[0]} {'|'.join(PHASES)}", file=sys.stderr)
        return 2
    root = os.environ.get("NETLOOM_PERSIST_ROOT", "/")
    return 1 if replay(root, argv[1]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
