#!/usr/bin/python
"""Ansible module docker_bridge_network: one Docker bridge network, converged field by field."""
from __future__ import annotations

DOCUMENTATION = r"""
module: docker_bridge_network
short_description: A Docker bridge network, compared field by field and recreated only when it must be
description:
  - Converges one Docker bridge network through the Docker Engine API (docker SDK for Python,
    5.0.3 as in Debian 12's python3-docker up to 7.x).
  - The live network and the wanted one are normalised and compared field by field - driver,
    O(bridge_name), O(mtu), O(icc), O(masquerade), the other O(driver_options), O(internal),
    O(subnet), O(gateway), O(ip_range), O(aux_addresses), extra IPAM pools and O(labels).
  - Docker cannot change a network in place. When any compared field differs and O(recreate=auto),
    the containers attached to it (running or stopped) are disconnected, the network is removed and
    created again, and every container is reconnected with the IPv4 address and aliases it had. A
    container whose address no longer fits (outside a new subnet, or now the gateway or an auxiliary
    address) is reconnected with an address Docker assigns, and the module warns about it. If the
    new network cannot be created, the previous one is restored and its containers reconnected.
  - Before anything is removed, the new subnet is checked against every other Docker network's
    subnet and the bridge name against every other network's bridge, which Docker would refuse.
  - The module stamps the label C(netloom.managed=true) on the network and only modifies or removes
    networks that carry it. An existing network of the same name without the label is refused
    unless O(adopt=true).
  - Check mode and diff mode report the same plan the real run executes.
version_added: "0.1.0"
options:
  name:
    description: Name of the Docker network. Docker's predefined networks (bridge, host, none) are refused.
    type: str
    required: true
  state:
    description:
      - V(present) creates or converges the network; V(absent) removes it.
      - V(absent) refuses while containers are attached unless O(force=true), which disconnects them first.
    type: str
    choices: [present, absent]
    default: present
  subnet:
    description:
      - IPv4 subnet in CIDR form, for example V(10.1.0.0/16). Left out, Docker picks one from its
        address pools and whatever it picked is accepted.
    type: str
  gateway:
    description:
      - Gateway address inside O(subnet). Left out, Docker picks one (the first address of O(ip_range),
        else of O(subnet)) and whatever it picked is accepted.
    type: str
  ip_range:
    description:
      - CIDR inside O(subnet) from which Docker hands out container addresses. Containers may still be
        given explicit addresses outside it.
    type: str
  aux_addresses:
    description:
      - Addresses inside O(subnet) that Docker must never hand out, as a mapping of name to IPv4
        address, for example the overlay hub's address on the runner's bridge.
      - They must differ from O(gateway) and from each other.
    type: dict
  bridge_name:
    description:
      - Linux bridge of the network (driver option C(com.docker.network.bridge.name)), at most 15
        characters. Docker uses an existing bridge of that name, adds the gateway address to it if
        missing, and does not delete it (nor that address) when the network is removed.
      - Left out, Docker creates a bridge C(br-<network id>) itself.
    type: str
  mtu:
    description: MTU of the network (driver option C(com.docker.network.driver.mtu)), 68 to 65535.
    type: int
  icc:
    description:
      - Whether containers on the network may talk to each other (C(com.docker.network.bridge.enable_icc)).
      - Left out, Docker's default (true) is wanted.
    type: bool
  masquerade:
    description:
      - Whether traffic from the network leaving the host is masqueraded
        (C(com.docker.network.bridge.enable_ip_masquerade)). Left out, Docker's default (true) is wanted.
    type: bool
  driver_options:
    description:
      - Other bridge driver options, as a mapping of option to value (values are compared as Docker
        stores them, as strings; booleans become V(true)/V(false)).
      - The four options above may be given here under their Docker names instead; giving one both ways
        is an error.
    type: dict
  internal:
    description: Whether the network is internal (no route out of the host).
    type: bool
    default: false
  labels:
    description:
      - Labels of the network. C(netloom.managed=true) is always added; any other value for it is an error.
    type: dict
  recreate:
    description:
      - V(auto) recreates the network when a compared field differs, reconnecting its containers.
      - V(never) instead fails, listing every difference (field, current, wanted), and changes nothing.
    type: str
    choices: [auto, never]
    default: auto
  adopt:
    description:
      - Take over an existing network of this name that lacks the C(netloom.managed=true) label.
        Labels cannot be added in place, so with O(state=present) the adopted network is recreated
        (with O(recreate=auto)); with O(state=absent) it is removed.
    type: bool
    default: false
  force:
    description: With O(state=absent), disconnect the attached containers instead of refusing.
    type: bool
    default: false
  docker_host:
    description:
      - Docker Engine API address. Left out, E(DOCKER_HOST) is used, else C(unix:///var/run/docker.sock).
    type: str
requirements:
  - docker SDK for Python 5.0.3 or later (Debian's python3-docker)
notes:
  - Recreating a network briefly disconnects its containers. Legacy links and fixed MAC addresses of
    the endpoints are not carried over; IPv4 addresses and aliases are.
  - The returned C(network.config) has O(gateway) V(null) when Docker chose the gateway, because Docker
    does not record it in the network then.
author:
  - netloom maintainers
"""

EXAMPLES = r"""
- name: KohakuRiver overlay network on the existing bridge kohaku-overlay, hub address reserved
  docker_bridge_network:
    name: kohakuriver-overlay
    bridge_name: kohaku-overlay
    subnet: 10.1.0.0/16
    gateway: 10.1.0.1
    aux_addresses:
      kohaku-hub: 10.1.0.254
    icc: true
    masquerade: false
    mtu: 1450

- name: The default isolated network
  docker_bridge_network:
    name: kohakuriver-net
    subnet: 172.30.0.0/16
    gateway: 172.30.0.1

- name: A worker network that hands out addresses from one part of its subnet only
  docker_bridge_network:
    name: esb-worker-1
    subnet: 10.60.0.0/16
    ip_range: 10.60.128.0/17
    labels:
      esb.role: worker

- name: Fail instead of recreating when the live network differs
  docker_bridge_network:
    name: kohakuriver-net
    subnet: 172.30.0.0/16
    gateway: 172.30.0.1
    recreate: never

- name: Remove the network, disconnecting whatever is still attached
  docker_bridge_network:
    name: kohakuriver-overlay
    state: absent
    force: true
"""

RETURN = r"""
network:
  description: The network after the run (in check mode, as it would be).
  returned: always
  type: dict
  contains:
    id:
      description: Docker's network id; null when absent, or in check mode when it would be (re)created.
      type: str
    name:
      description: The network's name.
      type: str
    config:
      description:
        - The normalised config (driver, bridge_name, mtu, icc, masquerade, driver_options, internal,
          subnet, gateway, ip_range, aux_addresses, extra_pools, labels); null when absent.
      type: dict
  sample:
    id: 3c17734ed709115e5cf2f41f1811d4553fe4fa50c79037e48ebaeffd7df1339f
    name: kohakuriver-net
    config:
      driver: bridge
      bridge_name: null
      mtu: null
      icc: true
      masquerade: true
      driver_options: {}
      internal: false
      subnet: 172.30.0.0/16
      gateway: 172.30.0.1
      ip_range: null
      aux_addresses: {}
      extra_pools: []
      labels: {netloom.managed: "true"}
recreated:
  description: Whether the network was (in check mode, would be) removed and created again.
  returned: always
  type: bool
reconnected:
  description: Names of the containers reconnected (in check mode, to be reconnected) after recreation.
  returned: always
  type: list
  elements: str
differences:
  description: Every compared field that differed, with its current and wanted value.
  returned: always; also on failure with O(recreate=never)
  type: list
  elements: dict
  sample: [{field: mtu, current: 1500, wanted: 1450}]
changes:
  description: The steps taken (or, in check mode, to be taken), in order.
  returned: always
  type: list
  elements: str
  sample: ["disconnect container web on network kohakuriver-net", "delete network kohakuriver-net",
           "create network kohakuriver-net", "connect container web on network kohakuriver-net"]
"""

import traceback
from functools import partial
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.netloom.common import ChangePlan, CommandError, InputError, finish, guarded
from ansible.module_utils.netloom.docker_network import (
    MANAGED_LABEL,
    MANAGED_VALUE,
    Attachment,
    address_conflicts,
    attachment_of,
    create_request,
    differences,
    docker_host_address,
    is_managed,
    live_config,
    network_name,
    reconnect_order,
    wanted_config,
)

try:
    import docker
    from docker.errors import DockerException, NotFound
except ImportError:
    DOCKER_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    DOCKER_IMPORT_ERROR = None


class BridgeNetworkManager:
    """Plans (and, through `finish`, performs) the convergence of one Docker bridge network."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        params = module.params
        self.name = network_name(params["name"])
        self.present = params["state"] == "present"
        self.wanted = wanted_config(params) if self.present else None
        self.plan = ChangePlan()
        # Filled in by the create step when it runs, so the result shows the real new network.
        self.network: dict[str, Any] = {"id": None, "name": self.name, "config": None}
        self.recreated = False
        self.reconnected: list[str] = []
        self.differences: list[dict[str, Any]] = []
        self.client: Any = None

    def run(self) -> None:
        if DOCKER_IMPORT_ERROR is not None:
            self.module.fail_json(msg=missing_required_lib("docker (Debian: python3-docker)"),
                                  exception=DOCKER_IMPORT_ERROR)
        host = docker_host_address(self.module.params["docker_host"])
        self.client = self._api(f"connecting to Docker at {host}", docker.APIClient,
                                base_url=host, version="auto")
        inspect = self._inspect()
        if inspect is not None:
            self._check_owner(inspect)
        if self.present:
            self._plan_present(inspect)
        else:
            self._plan_absent(inspect)
        finish(self.module, self.plan, network=self.network, recreated=self.recreated,
               reconnected=self.reconnected, differences=self.differences)

    # ---- reading ----

    @staticmethod
    def _api(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except DockerException as err:
            raise CommandError(f"{what}: {err}") from None

    def _inspect(self) -> dict[str, Any] | None:
        try:
            inspect = self.client.inspect_network(self.name)
        except NotFound:
            return None
        except DockerException as err:
            raise CommandError(f"inspecting network {self.name}: {err}") from None
        # Docker also resolves a name as an id prefix; only an exact name is this network.
        return inspect if inspect.get("Name") == self.name else None

    def _check_owner(self, inspect: dict[str, Any]) -> None:
        if is_managed(inspect) or self.module.params["adopt"]:
            return
        consequence = ("take it over (it is recreated with the label)" if self.present
                       else "remove it anyway")
        raise InputError("name", self.name,
                         f"a Docker network of this name exists but is not managed by netloom (no label "
                         f"{MANAGED_LABEL}={MANAGED_VALUE}); set adopt: true to {consequence}")

    def _attachments(self, network_id: str) -> list[Attachment]:
        """Every container on the network, stopped ones included: removing it would strand them too."""
        # By id alone Docker misses containers that never ran: they only know the network's name.
        listed = self._api(f"listing containers on network {self.name}", self.client.containers,
                           all=True, filters={"network": [self.name, network_id]})
        found = []
        for summary in listed:
            container = self._api(f"inspecting container {summary['Id'][:12]}",
                                  self.client.inspect_container, summary["Id"])
            attachment = attachment_of(container, self.name, network_id)
            if attachment is not None:
                found.append(attachment)
        return sorted(found, key=lambda attachment: attachment.name)

    def _refuse_conflicts(self, own_id: str | None) -> None:
        listed = self._api("listing Docker networks", self.client.networks)
        others = {net["Name"]: live_config(net) for net in listed if net.get("Id") != own_id}
        address_conflicts(self.name, self.wanted or {}, others)

    # ---- planning ----

    def _network_key(self) -> str:
        return f"network {self.name}"

    def _attachment_key(self, attachment: Attachment) -> str:
        return f"container {attachment.name} on network {self.name}"

    def _plan_present(self, inspect: dict[str, Any] | None) -> None:
        wanted = self.wanted or {}
        if inspect is None:
            self._refuse_conflicts(None)
            self.plan.add(self._network_key(), "create", None, wanted,
                          run=partial(self._create, wanted, None))
            self.network["config"] = wanted
            return
        current = live_config(inspect)
        self.network.update(id=inspect["Id"], config=current)
        self.differences = differences(current, wanted)
        if not self.differences:
            return
        if self.module.params["recreate"] == "never":
            listing = "; ".join(f"{diff['field']} (current {diff['current']!r}, wanted {diff['wanted']!r})"
                                for diff in self.differences)
            self.module.fail_json(msg=f"network {self.name} differs from the wanted config and "
                                      f"recreate=never, so nothing was changed: {listing}",
                                  differences=self.differences, network=self.network)
        self._refuse_conflicts(inspect["Id"])
        attachments = self._attachments(inspect["Id"])
        order = reconnect_order(attachments, wanted)
        for attachment in attachments:
            self.plan.add(self._attachment_key(attachment), "disconnect",
                          attachment.describe(attachment.ipv4_address), None,
                          run=partial(self._disconnect, attachment, inspect["Id"]))
        self.plan.add(self._network_key(), "delete", current, None,
                      run=partial(self._remove, inspect["Id"]))
        self.plan.add(self._network_key(), "create", None, wanted,
                      run=partial(self._create, wanted, (current, attachments)))
        for attachment, address in order:
            if attachment.ipv4_address is not None and address is None:
                self.module.warn(f"container {attachment.name} cannot keep {attachment.ipv4_address} on the "
                                 f"new network {self.name}; Docker assigns it an address")
            self.plan.add(self._attachment_key(attachment), "connect", None, attachment.describe(address),
                          run=partial(self._connect, attachment, address))
        self.recreated = True
        self.reconnected = [attachment.name for attachment, _ in order]
        self.network.update(id=None, config=wanted)

    def _plan_absent(self, inspect: dict[str, Any] | None) -> None:
        if inspect is None:
            return
        attachments = self._attachments(inspect["Id"])
        if attachments and not self.module.params["force"]:
            names = ", ".join(attachment.name for attachment in attachments)
            raise InputError("force", False, f"containers are attached to network {self.name} ({names}); "
                                             "set force: true to disconnect them and remove it")
        for attachment in attachments:
            self.plan.add(self._attachment_key(attachment), "disconnect",
                          attachment.describe(attachment.ipv4_address), None,
                          run=partial(self._disconnect, attachment, inspect["Id"]))
        self.plan.add(self._network_key(), "delete", live_config(inspect), None,
                      run=partial(self._remove, inspect["Id"]))

    # ---- steps (run only by finish, never in check mode) ----

    def _disconnect(self, attachment: Attachment, network_id: str) -> None:
        self._api(f"disconnecting {attachment.name} from {self.name}",
                  self.client.disconnect_container_from_network, attachment.container_id, network_id)

    def _remove(self, network_id: str) -> None:
        self._api(f"removing network {self.name}", self.client.remove_network, network_id)

    def _connect(self, attachment: Attachment, address: str | None) -> None:
        self._api(f"connecting {attachment.name} to {self.name}", self.client.connect_container_to_network,
                  attachment.container_id, self.name, ipv4_address=address,
                  aliases=attachment.aliases or None)

    def _create(self, config: dict[str, Any],
                previous: tuple[dict[str, Any], list[Attachment]] | None) -> None:
        try:
            created = self._api(f"creating network {self.name}", self.client.create_network, self.name,
                                **create_request(config))
        except CommandError as err:
            if previous is None:
                raise
            raise CommandError(f"{err}; {self._restore(*previous)}") from None
        inspect = self._api(f"inspecting network {self.name}", self.client.inspect_network, created["Id"])
        self.network.update(id=created["Id"], config=live_config(inspect))

    def _restore(self, config: dict[str, Any], attachments: list[Attachment]) -> str:
        """Put the removed network and its containers back after a failed re-create."""
        try:
            self._api(f"restoring network {self.name}", self.client.create_network, self.name,
                      **create_request(config))
            for attachment, address in reconnect_order(attachments, config):
                self._connect(attachment, address)
        except CommandError as err:
            names = ", ".join(attachment.name for attachment in attachments) or "none"
            return f"restoring the previous network failed too ({err}); attached containers: {names}"
        return f"the previous network was restored and {len(attachments)} container(s) reconnected"


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "subnet": {"type": "str"},
            "gateway": {"type": "str"},
            "ip_range": {"type": "str"},
            "aux_addresses": {"type": "dict"},
            "bridge_name": {"type": "str"},
            "mtu": {"type": "int"},
            "icc": {"type": "bool"},
            "masquerade": {"type": "bool"},
            "driver_options": {"type": "dict"},
            "internal": {"type": "bool", "default": False},
            "labels": {"type": "dict"},
            "recreate": {"type": "str", "choices": ["auto", "never"], "default": "auto"},
            "adopt": {"type": "bool", "default": False},
            "force": {"type": "bool", "default": False},
            "docker_host": {"type": "str"},
        },
        supports_check_mode=True,
    )
    guarded(module, lambda: BridgeNetworkManager(module).run())


if __name__ == "__main__":
    main()
