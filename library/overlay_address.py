#!/usr/bin/python
"""Ansible module overlay_address: reserve or release a runner overlay address by key."""
from __future__ import annotations

DOCUMENTATION = r"""
module: overlay_address
short_description: Reserve or release an overlay address by key in the runner's one address allocator
description:
  - Every workload address of a KohakuRiver runner (Docker containers, VMs, explicit reservations)
    comes from one allocator kept on the runner in C(/var/lib/netloom/overlay-addresses.json)
    (root only, written atomically, runs serialised by a lock). This module is the seed's IP
    reservation - reserve an address by key (fixed or chosen), or release it.
  - The runner's subnet is read from the overlay bridge's gateway address (10.N.0.1/16). Never handed
    out - the gateway, the hub address (offset+254), addresses of other keys, addresses live on the
    bridge (its own, confirmed neighbour entries) and every Docker endpoint on the overlay network.
    Nor anything inside the overlay network's Docker C(ip_range) (IPAM IPRange, read from Docker) -
    Docker hands those out to containers without a fixed address and knows nothing of VMs or
    reservations, so a fixed address there is refused too. Chosen addresses count down from the top.
  - Each run also frees leaks that are certain, i.e. a C(container) key whose labelled container
    (C(netloom.address.key=KEY)) no longer exists. Reservations are only freed by O(state=absent).
options:
  key:
    description: The allocation key, 1 to 128 letters, digits and C(_.:@-) starting with a letter or digit.
    type: str
    required: true
  state:
    description: V(present) reserves (keeping the recorded address), V(absent) releases.
    type: str
    choices: [present, absent]
    default: present
  owner:
    description:
      - Owner kind recorded with the key. V(reservation) keys are never freed by reconciliation;
        V(vm) keys are kept until released. C(container) keys belong to task_container and
        vps_container, which label their containers with the key; reserved here, with no labelled
        container, reconciliation would free such a key on every run, so it is not offered.
    type: str
    choices: [reservation, vm]
    default: reservation
  address:
    description:
      - A fixed address (inside the workload range, not the gateway or hub, not in use). Left out,
        the recorded address or the highest free one.
    type: str
  overlay_bridge:
    description: The overlay bridge whose gateway address gives the runner's subnet.
    type: str
    default: kohaku-overlay
  subnet:
    description:
      - The runner's overlay subnet (e.g. 10.1.0.0/16). Checked against the bridge; lets check mode plan
        on a runner whose overlay is not converged yet. Left out, the bridge's address gives it.
    type: str
  overlay_network:
    description: The Docker network on the overlay bridge (its endpoints count as in use).
    type: str
    default: kohakuriver-overlay
  docker_host:
    description: Docker Engine API address. Left out, E(DOCKER_HOST), else C(unix:///var/run/docker.sock).
    type: str
requirements:
  - pyroute2, docker SDK for Python 5.0.3 or later (Debian's python3-docker)
notes:
  - Check mode reports the address the real run would reserve and writes nothing.
author:
  - netloom maintainers
"""

EXAMPLES = r"""
- name: Reserve an address for a service that is not a container
  overlay_address:
    key: monitoring
  register: reserved

- name: Reserve a fixed address
  overlay_address:
    key: gateway-vip
    address: 10.1.0.10

- name: Release it
  overlay_address:
    key: gateway-vip
    state: absent
"""

RETURN = r"""
address:
  description: The key's address (the one released with O(state=absent); null when it held none).
  returned: always
  type: str
  sample: 10.1.255.254
subnet:
  description: The runner's overlay subnet.
  returned: always
  type: str
  sample: 10.1.0.0/16
freed:
  description: Allocations freed by reconciliation in this run (their containers are gone).
  returned: always
  type: list
  elements: dict
  sample: [{key: task-17, owner: container, address: 10.1.255.253}]
changes:
  description: The planned (or, in check mode, would-be) changes.
  returned: always
  type: list
  elements: str
  sample: ["create overlay address monitoring"]
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.netloom.allocator import (
    DEFAULT_BRIDGE,
    DEFAULT_NETWORK,
    allocation_key,
    open_runner_allocator,
)
from ansible.module_utils.netloom.common import ChangePlan, InputError, finish
from ansible.module_utils.netloom.docker_network import docker_host_address
from ansible.module_utils.netloom.netlink import Netlink, run_with_netlink
from ansible.module_utils.netloom.workload_docker import api

# Owner kinds this module records: a `container` key here would have no labelled container, so
# reconciliation would free it and the next run reserve it again (never idempotent).
MODULE_OWNERS = ("reservation", "vm")

try:
    import docker
except ImportError:
    DOCKER_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    DOCKER_IMPORT_ERROR = None


class AddressManager:
    """Reserve or release one key under the runner's allocator lock."""

    def __init__(self, module: AnsibleModule, nl: Netlink) -> None:
        self.module = module
        self.params = module.params
        self.nl = nl
        self.key = allocation_key("key", self.params["key"])
        self.plan = ChangePlan()

    def run(self) -> None:
        if DOCKER_IMPORT_ERROR is not None:
            self.module.fail_json(msg=missing_required_lib("docker (Debian: python3-docker)"),
                                  exception=DOCKER_IMPORT_ERROR)
        host = docker_host_address(self.params["docker_host"])
        client = api(f"connecting to Docker at {host}", docker.APIClient, base_url=host, version="auto")
        allocator = open_runner_allocator(self.module, self.nl, client, self.params["overlay_bridge"],
                                          self.params["overlay_network"], self.params["subnet"])
        if allocator is None:  # required=True raises instead; kept for the type
            raise InputError("overlay_bridge", self.params["overlay_bridge"], "has no IPv4 address")
        addressing = allocator.addressing
        with allocator.locked():
            freed = allocator.reconcile(self.plan)
            if self.params["state"] == "present":
                address = allocator.reserve(self.plan, self.key, self.params["owner"],
                                            fixed=self.params["address"])
            else:
                recorded = allocator.lookup(self.key)
                allocator.release(self.plan, self.key)
                address = recorded.address if recorded else None
            finish(self.module, self.plan, address=str(address) if address else None,
                   subnet=str(addressing.subnet), freed=[item.describe() for item in freed])


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "key": {"type": "str", "required": True, "no_log": False},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "owner": {"type": "str", "choices": list(MODULE_OWNERS), "default": "reservation"},
            "address": {"type": "str"},
            "overlay_bridge": {"type": "str", "default": DEFAULT_BRIDGE},
            "subnet": {"type": "str"},
            "overlay_network": {"type": "str", "default": DEFAULT_NETWORK},
            "docker_host": {"type": "str"},
        },
        supports_check_mode=True,
    )
    run_with_netlink(module, AddressManager)


if __name__ == "__main__":
    main()
