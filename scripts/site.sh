#!/usr/bin/env bash
# Command 1 of the README: set everything up on a fresh Debian 12 machine and run the
# main job on the built-in lab: bring the lab up, then playbooks/site.yml against it.
# Idempotent: re-running converges the same lab again (and reports no change).
set -euo pipefail
cd "$(dirname "$0")/.."
topology=${NETLOOM_LAB_TOPOLOGY:-lab/topologies/overlay.yml}
bash scripts/bootstrap.sh
.venv/bin/python lab/netloom_lab.py up --topology "$topology" --inventory-file inventory/lab/hosts.yml
.venv/bin/ansible-playbook -i inventory/lab playbooks/site.yml "$@"
