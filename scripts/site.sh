#!/usr/bin/env bash
# Command 1 of the README: set everything up on a fresh Debian 12 machine and run the main job
# on the built-in lab `cluster` (every node role: KohakuRiver hub and runners with a task
# container and a VPS, ESB control and compute nodes, a Pinacle pod host with two pods):
# bring the lab up, converge playbooks/site.yml, check each system by real traffic
# (playbooks/smoke.yml), draw the picture of what is deployed (playbooks/topology.yml) and print
# what to try. Idempotent: re-running converges the same lab again (and reports no change).
# NETLOOM_LAB_TOPOLOGY=lab/topologies/FILE.yml picks another lab; extra arguments go to site.yml.
# Take the lab down with: .venv/bin/python lab/netloom_lab.py down --topology <the same file>
set -euo pipefail
cd "$(dirname "$0")/.."
topology=${NETLOOM_LAB_TOPOLOGY:-lab/topologies/cluster.yml}
inventory=inventory/lab/hosts.yml
step() { printf '\n== %s\n' "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

step "bootstrap (packages, dockerd, .venv, lab image)"
NETLOOM_BOOTSTRAP_GUEST=0 bash scripts/bootstrap.sh  # no VM in the default cluster: no guest build
step "lab up: $topology"
.venv/bin/python lab/netloom_lab.py up --topology "$topology" --inventory-file "$inventory"
step "lab stand-ins (ESB control services)"
.venv/bin/ansible-playbook -i "$inventory" playbooks/lab_stand_ins.yml \
  || fail "the ESB stand-in services did not start (playbooks/lab_stand_ins.yml)"
step "converge playbooks/site.yml"
.venv/bin/ansible-playbook -i "$inventory" playbooks/site.yml "$@" \
  || fail "playbooks/site.yml did not converge (see the failed task above)"
step "smoke checks by real traffic (playbooks/smoke.yml)"
.venv/bin/ansible-playbook -i "$inventory" playbooks/smoke.yml \
  || fail "a smoke check failed: the SMOKE FAILED message above names the system and the traffic that did not pass"
step "picture of what is deployed (playbooks/topology.yml)"
.venv/bin/ansible-playbook -i "$inventory" playbooks/topology.yml \
  || fail "playbooks/topology.yml could not draw the picture"
step "summary"
cat .cache/site/summary.txt
printf '\nTake the lab down: .venv/bin/python lab/netloom_lab.py down --topology %s\n' "$topology"
