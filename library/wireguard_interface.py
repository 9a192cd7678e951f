#!/usr/bin/python
"""Ansible module wireguard_interface: one WireGuard interface, its peers and its saved config."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: wireguard_interface
short_description: Converge a WireGuard interface, its peers and its wg-quick config
description:
  - Creates and converges one WireGuard interface from data, as the ESB gateway and compute
    nodes use it (C(wg0) carrying 10.99.0.0/24 and the workers' 10.88.N.0/24 subnets).
  - Uses kernel WireGuard when C(ip link add type wireguard) works and starts C(wireguard-go)
    otherwise; an existing interface keeps its implementation.
  - The private key is generated on the node with C(wg genkey) when none exists and kept in
    I(config_dir)/NAME.key (mode 0600); only the public key is ever returned. A key already
    on the live interface is adopted rather than replaced.
  - Live state is read once (C(wg show NAME dump) and netlink) and compared normalised, and
    only what differs is changed. Peers are added, changed and removed in place with
    C(wg set); the interface is never recreated for a peer change, so other peers keep their
    sessions.
  - The running state is also saved to I(config_dir)/NAME.conf in wg-quick format (mode 0600,
    swapped in with C(atomic_move) after C(wg-quick strip) accepted it). The config is rendered
    on the controller by netloom's C(wireguard_interface) action plugin (C(action_plugins/) in
    C(ansible.cfg)) from C(templates/wireguard/wg-quick.conf.j2), or the operator's own
    I(template), and handed over in I(rendered); the module validates every argument itself
    before using it and fails naming I(rendered) without the plugin. The config holds no key
    material - its C(PostUp) loads the private key from I(config_dir)/NAME.key and any
    preshared keys from I(config_dir)/NAME.psk (both 0600, written on the node).
    With systemd, C(wg-quick@NAME) is enabled so that config brings the
    interface back at boot, with a drop-in selecting wireguard-go where the kernel lacks
    WireGuard. The config has C(Table = off), so wg-quick installs no route at all (no policy
    routing for 0.0.0.0/0, no public /32); routes come only from the wireguard_routes module,
    through its filter, which netloom-restore replays after wg-quick at boot.
  - I(state=absent) stops the unit, removes the interface (and its wireguard-go process), the
    config, the preshared keys file and the key file.
  - To choose the implementation for a new interface the module creates and at once deletes a
    probe WireGuard link when the wireguard kernel module is not loaded; in check mode it creates
    nothing and predicts the answer with C(modprobe -n wireguard).
options:
  name:
    description: Interface name.
    type: str
    default: wg0
  state:
    description: Whether the interface exists.
    type: str
    choices: [present, absent]
    default: present
  addresses:
    description:
      - Addresses of the interface in CIDR form (IPv4 or IPv6), for example C(10.99.0.1/24).
      - The list is exclusive; other addresses are removed (IPv6 link-local ones are left).
    type: list
    elements: str
    default: []
  listen_port:
    description: UDP port to listen on (1-65535). Not managed when omitted.
    type: int
  mtu:
    description: Interface MTU (68-65535). Not managed when omitted.
    type: int
  private_key:
    description:
      - Private key (base64 of 32 bytes). When omitted, the key in I(config_dir)/NAME.key is
        used, else the live interface's key, else a new one is generated on the node.
    type: str
  peers:
    description: The complete list of peers; peers not listed are removed.
    type: list
    elements: dict
    default: []
    suboptions:
      public_key:
        description: Peer public key (base64 of 32 bytes); unique within the list.
        type: str
        required: true
      allowed_ips:
        description:
          - CIDRs routed to this peer, IPv4 or IPv6, without host bits. A CIDR may belong to one
            peer only. CIDRs wholly inside a range no host holds (0.0.0.0/8, 127/8, 169.254/16,
            224/4, 240/4, ::1, ff00::/8) are refused; 0.0.0.0/0 and ::/0 are allowed (routes come
            only from wireguard_routes, which filters them).
        type: list
        elements: str
        default: []
      endpoint:
        description:
          - C(host:port) or C([IPv6]:port). A host name must resolve on the node. When omitted
            the endpoint the peer roams from is left alone.
          - A literal address must be a unicast host address (not 0.0.0.0/8, 127/8, 169.254/16,
            multicast, 240/4 and broadcast, ::, ::1 or ff00::/8).
        type: str
      endpoint_policy:
        description:
          - How the declared I(endpoint) is kept on the live peer.
          - C(on_change) sets it when the peer is created, has no endpoint, or the declared
            endpoint changed since the last run (the saved config records what was declared).
            A live endpoint that differs only because the peer roamed (behind NAT, or from a
            new address) is left alone, so the task settles. A hand-set endpoint is not told
            apart from a roamed one.
          - C(always) resets any other live endpoint to the declared one on every run.
        type: str
        choices: [on_change, always]
        default: on_change
      persistent_keepalive:
        description: Keepalive interval in seconds; 0 turns it off.
        type: int
        default: 0
      preshared_key:
        description: Optional preshared key (base64 of 32 bytes).
        type: str
  config_dir:
    description:
      - Absolute directory for NAME.conf and NAME.key (created with mode 0700); no control characters.
    type: path
    default: /etc/wireguard
  manage_service:
    description:
      - Whether to enable C(wg-quick@NAME) (and, for wireguard-go, its environment drop-in)
        under systemd.
      - Default is to do so when systemd runs on the node; C(true) fails on a node without it.
    type: bool
  template:
    description:
      - The operator's own Jinja2 template for NAME.conf instead of
        C(templates/wireguard/wg-quick.conf.j2), rendered on the controller (relative paths are
        found as C(ansible.builtin.template) finds C(src)) with the variable C(interface) (name,
        addresses, listen_port, mtu, key_path, preshared_keys_path, peers) and the filter
        C(shell_quote). Read by the action plugin only.
    type: str
  rendered:
    description:
      - Set by netloom's action plugin, not by hand. C(config) is the rendered NAME.conf
        (required with C(state=present)), C(dropin) the wireguard-go unit drop-in.
    type: dict
    suboptions:
      config:
        description: The rendered wg-quick config (no key material).
        type: str
      dropin:
        description: The rendered C(wg-quick@NAME) drop-in for wireguard-go.
        type: str
notes:
  - Supports check mode and diff mode; both are computed from the same change plan as the
    real run. The diff never contains key material.
  - Needs C(wg) and C(wg-quick) (wireguard-tools) on the node, and C(wireguard-go) where the
    kernel has no WireGuard, and pyroute2; netloom's action plugins on the controller.
author:
  - netloom
"""

EXAMPLES = r"""
- name: Gateway side of the ESB tunnel
  wireguard_interface:
    name: wg0
    addresses: [10.99.0.1/24]
    listen_port: 51820
    peers:
      - public_key: "{{ hostvars['compute1'].wg_public_key }}"
        allowed_ips: [10.99.0.2/32, 10.88.1.0/24]
        endpoint: compute1.example.internal:51820
        persistent_keepalive: 25
  register: wg

- name: Compute side, pointing back at the gateway
  wireguard_interface:
    name: wg0
    addresses: [10.99.0.2/32]
    peers:
      - public_key: "{{ hostvars['gateway'].wg_public_key }}"
        allowed_ips: [10.99.0.0/24]
        endpoint: 192.0.2.1:51820
        preshared_key: "{{ vault_wg_psk }}"

- name: Remove the interface, its config, key and service
  wireguard_interface:
    name: wg0
    state: absent
"""

RETURN = r"""
name:
  description: Interface name.
  returned: always
  type: str
public_key:
  description: Public key of the interface; null in check mode when a key would be generated.
  returned: when state is present
  type: str
implementation:
  description: C(kernel) or C(wireguard-go).
  returned: when state is present, or when an interface was removed
  type: str
listen_port:
  description: Declared listen port, or the live one when not declared (null before creation).
  returned: when state is present
  type: int
peers:
  description: The declared peers, normalised; the preshared key is only flagged as C((hidden)).
  returned: when state is present
  type: list
  elements: dict
config_path:
  description: Path of the wg-quick config file.
  returned: always
  type: str
key_path:
  description: Path of the private key file.
  returned: always
  type: str
service_managed:
  description: Whether the wg-quick systemd unit was managed.
  returned: always
  type: bool
changes:
  description: The steps taken (or that would be taken in check mode), as C(action key).
  returned: always
  type: list
  elements: str
  sample: ["create wg0 interface", "create wg0 peer Lz4...=", "update wg0 addresses"]
"""

import errno
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom.common import (
    ChangePlan,
    CommandError,
    InputError,
    command_succeeds,
    finish,
    ifname,
    int_range,
    port,
)
from ansible.module_utils.netloom.files import SECRET_MODE, file_mode, read_text, remove_file, write_file
from ansible.module_utils.netloom.netlink import Netlink, RequestError, run_with_netlink
from ansible.module_utils.netloom.systemd import booted
from ansible.module_utils.netloom.wireguard import (
    ENDPOINT_POLICIES,
    DeviceState,
    InterfaceSpec,
    PeerSpec,
    WgQuickUnit,
    WgTool,
    address_reason,
    check_config,
    config_endpoints,
    key_path,
    network_reason,
    peer_differences,
    peer_set_args,
    peer_view,
    preshared_keys_path,
    preshared_keys_text,
    redact_config,
    resolve_endpoint,
    sorted_networks,
    start_userspace,
    stop_userspace,
    userspace_pids,
    wg_key,
)

KIND_IMPLEMENTATION = {"wireguard": "kernel", "tun": "wireguard-go"}

ARGUMENT_SPEC: dict[str, Any] = {
    "name": {"type": "str", "default": "wg0"},
    "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
    "addresses": {"type": "list", "elements": "str", "default": []},
    "listen_port": {"type": "int"},
    "mtu": {"type": "int"},
    "private_key": {"type": "str", "no_log": True},
    "peers": {
        "type": "list", "elements": "dict", "default": [],
        "options": {
            "public_key": {"type": "str", "required": True, "no_log": False},
            "allowed_ips": {"type": "list", "elements": "str", "default": []},
            "endpoint": {"type": "str"},
            "persistent_keepalive": {"type": "int", "default": 0},
            "preshared_key": {"type": "str", "no_log": True},
            "endpoint_policy": {"type": "str", "default": "on_change", "choices": list(ENDPOINT_POLICIES)},
        },
    },
    "config_dir": {"type": "path", "default": "/etc/wireguard"},
    "manage_service": {"type": "bool"},
    "template": {"type": "str"},
    "rendered": {"type": "dict", "options": {"config": {"type": "str"}, "dropin": {"type": "str"}}},
}


@dataclass(frozen=True)
class KeyChoice:
    """The private key to use, its public key, and whether it is generated by this run."""

    private: str = field(repr=False)
    public: str
    generated: bool

    @property
    def shown(self) -> str:
        """The public key as diffs show it: a key generated in check mode would be thrown away."""
        return "(generated on the node)" if self.generated else self.public


@dataclass(frozen=True)
class LinkState:
    """The interface as netlink reports it."""

    index: int
    implementation: str
    mtu: int
    up: bool
    addresses: tuple[str, ...]


def interface_address(field_name: str, value: Any) -> str:
    text = str(value).strip()
    if "/" not in text:
        raise InputError(field_name, value, "needs a prefix length, e.g. 10.99.0.1/24")
    try:
        address = ipaddress.ip_interface(text)
    except ValueError as err:
        raise InputError(field_name, value, f"not an address/prefix ({err})") from None
    reason = address_reason(address.ip)
    if reason:
        raise InputError(field_name, value, f"cannot be an interface address: it is {reason}")
    return str(address)


def allowed_network(field_name: str, value: Any) -> str:
    try:
        network = ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as err:
        raise InputError(field_name, value, f"not a CIDR without host bits ({err})") from None
    reason = network_reason(network)
    if reason:
        raise InputError(field_name, value, f"no peer can send from it: it is {reason}")
    return str(network)


def config_dir(field_name: str, value: Any) -> str:
    """An absolute directory without control characters: a newline would end up in file names."""
    text = str(value)
    if not text.startswith("/"):
        raise InputError(field_name, value, "must be an absolute path")
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise InputError(field_name, value, "must not contain control characters (newline, tab...)")
    return os.path.normpath(text)


def validate_peers(raw_peers: list[dict[str, Any]]) -> tuple[PeerSpec, ...]:
    """Every peer field checked; duplicates are refused because `wg` would silently merge them."""
    peers: list[PeerSpec] = []
    key_owner: dict[str, int] = {}
    cidr_owner: dict[str, str] = {}
    for index, raw in enumerate(raw_peers):
        where = f"peers[{index}]"
        public_key = wg_key(f"{where}.public_key", raw["public_key"])
        if public_key in key_owner:
            raise InputError(f"{where}.public_key", public_key,
                             f"duplicate of peers[{key_owner[public_key]}].public_key")
        key_owner[public_key] = index
        cidrs = []
        for position, item in enumerate(raw["allowed_ips"] or []):
            field_name = f"{where}.allowed_ips[{position}]"
            cidr = allowed_network(field_name, item)
            if cidr in cidr_owner:
                raise InputError(field_name, item, f"already allowed for {cidr_owner[cidr]}")
            cidr_owner[cidr] = where
            cidrs.append(cidr)
        endpoint, forms = (None, frozenset())
        if raw.get("endpoint"):
            endpoint, forms = resolve_endpoint(f"{where}.endpoint", raw["endpoint"])
        keepalive = int_range(f"{where}.persistent_keepalive", raw.get("persistent_keepalive") or 0, 0, 65535)
        psk = raw.get("preshared_key")
        preshared_key = wg_key(f"{where}.preshared_key", psk, secret=True) if psk else None
        peers.append(PeerSpec(public_key, sorted_networks(cidrs), keepalive, endpoint, forms, preshared_key,
                              raw.get("endpoint_policy") or "on_change"))
    return tuple(peers)


class WireguardInterface:
    """Plans and applies one interface: key, link, wg settings, peers, addresses, config, unit."""

    def __init__(self, module: AnsibleModule, nl: Netlink) -> None:
        self.module = module
        self.nl = nl
        params = module.params
        self.name = ifname("name", params["name"])
        self.state = params["state"]
        directory = config_dir("config_dir", params["config_dir"])
        self.config_path = os.path.join(directory, f"{self.name}.conf")
        self.key_path = key_path(directory, self.name)
        self.preshared_keys_path = preshared_keys_path(directory, self.name)
        self.manage_service = self._service_wanted(params["manage_service"])
        self.spec = self._validate(params) if self.state == "present" else None
        self.private_key = (wg_key("private_key", params["private_key"], secret=True)
                            if params["private_key"] else None)
        # Every argument is valid; only now are the files rendered from them on the controller used.
        rendered = params["rendered"] or {}
        self.config_text = rendered.get("config")
        self.dropin_text = rendered.get("dropin")
        if self.state == "present" and self.config_text is None:
            raise InputError("rendered.config", None,
                             "is rendered on the controller by netloom's wireguard_interface action plugin: "
                             "add netloom's action_plugins directory to ansible.cfg (action_plugins)")
        self.wg = WgTool()

    def _service_wanted(self, requested: bool | None) -> bool:
        if requested and not booted():
            raise InputError("manage_service", requested, "systemd is not running on this node")
        return booted() if requested is None else requested

    def _validate(self, params: dict[str, Any]) -> InterfaceSpec:
        addresses: list[str] = []
        for position, item in enumerate(params["addresses"] or []):
            address = interface_address(f"addresses[{position}]", item)
            if address in addresses:
                raise InputError(f"addresses[{position}]", item, "listed twice")
            addresses.append(address)
        listen_port = None if params["listen_port"] is None else port("listen_port", params["listen_port"])
        mtu = None if params["mtu"] is None else int_range("mtu", params["mtu"], 68, 65535)
        return InterfaceSpec(self.name, tuple(addresses), listen_port, mtu, validate_peers(params["peers"]))

    # ---- live state ----

    def read_link(self) -> LinkState | None:
        link = self.nl.link(self.name)
        if link is None:
            return None
        if link.kind not in KIND_IMPLEMENTATION:
            raise CommandError(f"{self.name} exists as a {link.kind or 'plain'} link, "
                               "not a WireGuard interface")
        addresses = [str(address) for address in self.nl.addresses(self.name)
                     if not (address.version == 6 and address.ip.is_link_local)]
        return LinkState(link.index, KIND_IMPLEMENTATION[link.kind], link.mtu, link.up, tuple(addresses))

    def read_device(self, link: LinkState) -> DeviceState:
        try:
            return self.wg.dump(self.name)
        except CommandError as err:
            raise CommandError(f"{self.name} is a {link.implementation} link but `wg` cannot read it "
                               f"(for wireguard-go: is its process running?): {err}") from None

    def kernel_wireguard(self) -> bool:
        """True when `ip link add type wireguard` works here: module loaded, or a probe link succeeds.

        Check mode must not create even a transient link, so there the answer is predicted from
        whether modprobe could load the module (`modprobe -n`, which loads nothing).
        """
        if os.path.isdir("/sys/module/wireguard"):
            return True
        if self.module.check_mode:
            return command_succeeds(["modprobe", "-n", "-q", "wireguard"])
        probe = f"nlwgprobe{os.getpid() % 100000}"
        try:
            self.nl.add_link(probe, "wireguard", up=False)
        except RequestError as err:
            if err.code == errno.EOPNOTSUPP:
                return False
            raise CommandError(f"probing kernel WireGuard failed: {err}") from None
        self.nl.delete_link(probe)
        return True

    # ---- key ----

    def _file_key(self) -> str | None:
        content = read_text(self.key_path)
        if content is None:
            return None
        try:
            return wg_key(self.key_path, content, secret=True)
        except InputError:
            if self.private_key:
                return None
            raise CommandError(f"{self.key_path} does not hold a WireGuard private key: "
                               "fix or remove it, or pass private_key") from None

    def choose_key(self, device: DeviceState | None) -> KeyChoice:
        """The key to use: input, key file, the live interface's (adopted), else one generated here."""
        for key in (self.private_key, self._file_key(), device.private_key if device else None):
            if key:
                return KeyChoice(key, self.wg.pubkey(key), False)
        key = self.wg.genkey()
        return KeyChoice(key, self.wg.pubkey(key), True)

    # ---- plan ----

    def plan_present(self, plan: ChangePlan, link: LinkState | None, device: DeviceState | None,
                     implementation: str, key: KeyChoice) -> None:
        spec = self.spec
        if spec is None:  # set by validation for every state=present run
            raise AssertionError("spec is missing")
        self._plan_key_file(plan, key)
        if link is None:
            plan.add(f"{self.name} interface", "create", None, {"implementation": implementation},
                     lambda: self._create(implementation))
        live_public = device.public_key if device else None
        if live_public != key.public:
            plan.add(f"{self.name} private_key", "update" if live_public else "create",
                     {"public_key": live_public} if live_public else None, {"public_key": key.shown},
                     lambda: self.wg.set(self.name, ["private-key", "/dev/stdin"], stdin=key.private + "\n"))
        if spec.listen_port is not None and (device is None or device.listen_port != spec.listen_port):
            plan.add(f"{self.name} listen_port", "update" if device else "create",
                     device.listen_port if device else None,
                     spec.listen_port,
                     lambda: self.wg.set(self.name, ["listen-port", str(spec.listen_port)]))
        self._plan_peers(plan, device.peers if device else {})
        if spec.mtu is not None and (link is None or link.mtu != spec.mtu):
            plan.add(f"{self.name} mtu", "update", link.mtu if link else None, spec.mtu,
                     lambda: self.nl.set_link(self.name, mtu=spec.mtu))
        self._plan_addresses(plan, link.addresses if link else ())
        if link is None or not link.up:
            plan.add(f"{self.name} link", "update", {"up": False}, {"up": True},
                     lambda: self.nl.set_link(self.name, up=True))
        if self.config_text is None:  # set by validation for every state=present run
            raise AssertionError("self.config_text is missing")
        self._plan_config(plan, self.config_text, preshared_keys_text(spec.peers))

    def _plan_key_file(self, plan: ChangePlan, key: KeyChoice) -> None:
        content, mode = read_text(self.key_path), file_mode(self.key_path)
        step_key = f"{self.name} private key file {self.key_path}"
        if content is not None and content.strip() == key.private:
            if mode != SECRET_MODE:
                plan.add(step_key, "update", {"mode": oct(mode or 0)}, {"mode": "0o600"},
                         lambda: os.chmod(self.key_path, SECRET_MODE))
            return
        before = None
        if content is not None:
            old_key = self._file_key()
            before = {"public_key": self.wg.pubkey(old_key) if old_key else "(not a valid key)"}
        plan.add(step_key, "update" if content is not None else "create", before,
                 {"public_key": key.shown}, lambda: self._write_secret(self.key_path, key.private + "\n"))

    def _plan_peers(self, plan: ChangePlan, live_peers: dict[str, Any]) -> None:
        """Removals first (they may free allowed IPs the others take), then adds and updates."""
        spec = self.spec
        if spec is None:  # set by validation for every state=present run
            raise AssertionError("spec is missing")
        wanted = {peer.public_key for peer in spec.peers}
        last_declared = config_endpoints(read_text(self.config_path))
        for public_key, live in live_peers.items():
            if public_key not in wanted:
                plan.add(f"{self.name} peer {public_key}", "delete", peer_view(live), None,
                         lambda key=public_key: self.wg.set(self.name, ["peer", key, "remove"]))
        for peer in spec.peers:
            live = live_peers.get(peer.public_key)
            fields = peer_differences(peer, live, last_declared.get(peer.public_key))
            if not fields:
                continue
            args, stdin = peer_set_args(peer, fields)
            plan.add(f"{self.name} peer {peer.public_key}", "update" if live else "create",
                     peer_view(live) if live else None, peer_view(peer),
                     lambda args=args, stdin=stdin: self.wg.set(self.name, args, stdin=stdin))

    def _plan_addresses(self, plan: ChangePlan, live: tuple[str, ...]) -> None:
        """Stale addresses go first: removing a primary address later would take new secondaries."""
        spec = self.spec
        if spec is None:  # set by validation for every state=present run
            raise AssertionError("spec is missing")
        if set(live) == set(spec.addresses):
            return
        stale = [address for address in live if address not in spec.addresses]
        missing = [address for address in spec.addresses if address not in live]

        def apply() -> None:
            for text in stale:
                self.nl.delete_address(self.name, ipaddress.ip_interface(text))
            for text in missing:
                self.nl.add_address(self.name, ipaddress.ip_interface(text))

        plan.add(f"{self.name} addresses", "update", sorted(live), list(spec.addresses), apply)

    def _write_secret(self, path: str, text: str) -> None:
        """0600 from the first byte, in a 0700 config_dir."""
        write_file(self.module, path, text, SECRET_MODE, dir_mode=0o700)

    def _plan_config(self, plan: ChangePlan, wanted: str | None, preshared_keys: str | None = None) -> None:
        """The saved config (and its preshared-keys companion) follows the declaration.

        One step, as the config is one thing to wg-quick; the diff shows the config with any old
        key lines hidden, never the companion. A config `wg-quick strip` rejects is not written.
        """
        content, mode = read_text(self.config_path), file_mode(self.config_path)
        psk_content, psk_mode = read_text(self.preshared_keys_path), file_mode(self.preshared_keys_path)
        step_key = f"config {self.config_path}"
        if wanted is None:
            if content is not None or psk_content is not None:
                plan.add(step_key, "delete", redact_config(content or ""), None, self._remove_config)
            return
        same = content == wanted and psk_content == preshared_keys
        secure = mode == SECRET_MODE and (psk_content is None or psk_mode == SECRET_MODE)
        if same and secure:
            return
        if same:
            plan.add(step_key, "update", {"mode": oct(mode or 0)}, {"mode": "0o600"}, self._secure_config)
            return

        def write() -> None:
            self._write_secret(self.config_path, wanted)  # refused by check before it goes live
            if preshared_keys is None:
                remove_file(self.preshared_keys_path)
            else:
                self._write_secret(self.preshared_keys_path, preshared_keys)

        check_config(self.name, wanted)  # also in check mode: a config wg-quick rejects fails the task
        plan.add(step_key, "update" if content is not None else "create",
                 None if content is None else redact_config(content), redact_config(wanted), write)

    def _secure_config(self) -> None:
        for path in (self.config_path, self.preshared_keys_path):
            if os.path.exists(path):
                os.chmod(path, SECRET_MODE)

    def _remove_config(self) -> None:
        remove_file(self.config_path)
        remove_file(self.preshared_keys_path)

    def _create(self, implementation: str) -> None:
        if implementation == "kernel":
            self.nl.add_link(self.name, "wireguard", up=False)
        else:
            start_userspace(self.name)

    def _delete_link(self) -> None:
        if self.nl.link(self.name) is not None:
            self.nl.delete_link(self.name)

    def _remove_interface(self, implementation: str) -> None:
        if implementation == "kernel":
            self._delete_link()
        else:
            stop_userspace(self.name, lambda: self.nl.link(self.name) is not None, self._delete_link)

    def plan_absent(self, plan: ChangePlan, link: LinkState | None) -> None:
        if self.manage_service:
            WgQuickUnit(self.module, self.name, None).plan(plan, None)
        if link is not None:
            plan.add(f"{self.name} interface", "delete", {"implementation": link.implementation}, None,
                     lambda: self._remove_interface(link.implementation))
        elif userspace_pids(self.name):
            plan.add(f"{self.name} wireguard-go process", "delete", {"running": True}, None,
                     lambda: stop_userspace(self.name, lambda: False, self._delete_link))
        self._plan_config(plan, None)
        if read_text(self.key_path) is not None:
            plan.add(f"{self.name} private key file {self.key_path}", "delete", {"present": True}, None,
                     lambda: remove_file(self.key_path))

    # ---- entry ----

    def run(self) -> None:
        plan = ChangePlan()
        link = self.read_link()
        base_result = {"name": self.name, "config_path": self.config_path,
                       "key_path": self.key_path, "service_managed": self.manage_service}
        if self.state == "absent":
            self.plan_absent(plan, link)
            if link is not None:
                base_result["implementation"] = link.implementation
            finish(self.module, plan, **base_result)
            return
        spec = self.spec
        if spec is None:  # set by validation for every state=present run
            raise AssertionError("spec is missing")
        device = self.read_device(link) if link else None
        implementation = link.implementation if link else (
            "kernel" if self.kernel_wireguard() else "wireguard-go")
        key = self.choose_key(device)
        for index, peer in enumerate(spec.peers):
            if peer.public_key == key.public:
                raise InputError(f"peers[{index}].public_key", peer.public_key,
                                 "is this interface's own public key")
        self.plan_present(plan, link, device, implementation, key)
        if self.manage_service:
            WgQuickUnit(self.module, self.name, self.dropin_text).plan(plan, implementation)
        listen_port = spec.listen_port if spec.listen_port is not None else (
            device.listen_port if device else None)
        finish(self.module, plan, public_key=None if key.generated and self.module.check_mode else key.public,
               implementation=implementation, listen_port=listen_port,
               peers=[peer_view(peer) for peer in spec.peers], **base_result)


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run_with_netlink(module, WireguardInterface)


if __name__ == "__main__":
    main()
