#!/usr/bin/python
"""Ansible module haproxy_relay: HAProxy TCP relays whose config is validated before it goes live."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: haproxy_relay
short_description: HAProxy TCP relays (local L4 proxy, registry relay), validated before they go live
description:
  - Writes a complete C(haproxy.cfg) for a list of TCP relays (one C(listen) section per relay,
    one bind, one server). The file is rendered on the controller by netloom's C(haproxy_relay)
    action plugin (C(action_plugins/), set in C(ansible.cfg)) from
    C(templates/haproxy/haproxy_relay.cfg.j2), or from the operator's own I(template), and handed
    to the module in I(rendered); the managed node needs no Jinja2. The plugin renders only from
    arguments that pass this module's validation, and the module validates every argument again
    before it uses the text. Called without the plugin, the module fails naming I(rendered).
  - Install is validate-then-swap. The text is written to a uniquely named temporary file next
    to I(path), checked with C(haproxy -c -f TEMP), the previous file is kept as C(PATH.prev)
    (I(backup)), and only then moved over I(path) with C(atomic_move). A config that C(haproxy -c)
    rejects never goes live; the module fails with HAProxy's message and I(path) is unchanged.
  - The live file is compared byte for byte with the rendering, so a hand-edited file is
    reported as drift and restored; an unchanged file is not rewritten and HAProxy is not reloaded.
  - A backend given by DNS name is resolved at start through libc (C(init-addr last,libc,none),
    C(/etc/hosts), then the system resolver), so a managed hosts block is enough and HAProxy
    starts, and C(haproxy -c) passes, before the name resolves (the server stays down until it
    does). With I(resolvers) enabled (default Docker's DNS 127.0.0.11:53, where HAProxy runs in
    a container) a C(resolvers) section also re-resolves the names at run time; on a host
    without such a DNS server set C(resolvers.enabled=false) (no section; names are then
    resolved again on reload). Backends given as IPv4 addresses need no resolution.
  - With I(manage_service=true) (needs systemd as PID 1) the module installs a unit drop-in
    (C(Environment=CONFIG=PATH) for Debian's unit, C(Restart=always)), enables the service,
    starts it when it is not running, and after a config change runs C(systemctl reload)
    (Debian's unit runs HAProxy in master-worker mode, so a reload hands the listeners to new
    workers while old workers finish their connections; nothing is dropped). A changed drop-in
    restarts the service instead, because the master only re-reads the unit on start.
  - C(state=absent) removes only what this module owns. The config file is removed (kept as
    C(PATH.prev) with I(backup)) only when its first line carries the netloom marker; a file
    without the marker is left alone with a warning, and then the service is not touched either.
    With I(manage_service) the service is stopped and disabled first and the drop-in removed.
  - "TLS decision for the registry relay: the default C(tls.mode=passthrough) relays the TCP
    stream untouched, so the registry terminates TLS itself with its certificate whose SAN
    holds the relay address (10.99.0.1) and no key lives on the relay. C(tls.mode=terminate)
    makes HAProxy terminate TLS at the bind with I(certificate) (one PEM with certificate and
    key, SAN holding the bind address) and talk plain TCP to a plain-HTTP backend."
version_added: "0.1.0"
author: netloom
requirements:
  - netloom's action plugins on the controller (C(action_plugins) in C(ansible.cfg))
  - haproxy (C(haproxy -c) for I(validate))
  - systemd as PID 1 for I(manage_service)
options:
  state:
    description: C(present) installs the relays; C(absent) removes the netloom-owned config.
    type: str
    choices: [present, absent]
    default: present
  path:
    description: The live config file. Its directory must exist.
    type: str
    default: /etc/haproxy/haproxy.cfg
  relays:
    description: The relays; required with C(state=present). Order is kept in the file.
    type: list
    elements: dict
    suboptions:
      name:
        description: HAProxy proxy name (letters, digits, C(-_.:)), unique among the relays.
        type: str
        required: true
      bind:
        description:
          - IPv4 C(address:port) to listen on, e.g. C(127.0.0.1:9000); C(0.0.0.0) listens on all
            addresses and so collides with any other bind on the same port.
        type: str
        required: true
      backend_host:
        description: IPv4 address or DNS name (resolved at run time through I(resolvers)).
        type: str
        required: true
      backend_port:
        description: Backend TCP port.
        type: int
        required: true
      mode:
        description: Proxy mode; relays are layer 4.
        type: str
        choices: [tcp]
        default: tcp
      transparent:
        description:
          - Bind even when the address is not (yet) on the host, e.g. the registry relay on
            10.99.0.1 before the WireGuard interface is up (HAProxy's C(transparent) bind option).
        type: bool
        default: false
      tls:
        description: TLS handling at the bind; without it the stream is passed through.
        type: dict
        suboptions:
          mode:
            description:
              - C(passthrough) relays TLS (or anything) untouched to the backend.
              - C(terminate) terminates TLS at the bind with I(certificate), backend plain TCP.
            type: str
            choices: [passthrough, terminate]
            default: passthrough
          certificate:
            description:
              - Absolute path of one PEM file holding the certificate (SAN = bind address)
                and its key; required for C(terminate). HAProxy checks it exists and parses.
            type: str
      health_check:
        description: TCP connect health check of the backend server.
        type: dict
        suboptions:
          enabled:
            description: Check the backend.
            type: bool
            default: true
          inter:
            description: Time between checks (HAProxy time, e.g. C(2s), C(500ms)).
            type: str
            default: 2s
          fall:
            description: Failed checks before the server is marked down.
            type: int
            default: 3
          rise:
            description: Passed checks before the server is marked up.
            type: int
            default: 2
  resolvers:
    description: DNS for backends given by name; rendered only when enabled and such a backend exists.
    type: dict
    suboptions:
      enabled:
        description:
          - Write a C(resolvers) section (run-time re-resolution). C(false) where no DNS server
            knows the names (a host with only C(/etc/hosts)); libc still resolves them at start.
        type: bool
        default: true
      name:
        description: Name of the C(resolvers) section.
        type: str
        default: docker
      nameservers:
        description: IPv4 C(address[:port]) list (port 53 when left out).
        type: list
        elements: str
        default: ["127.0.0.11:53"]
      resolve_retries:
        description: Queries sent before giving up on one resolution.
        type: int
        default: 3
      timeout_resolve:
        description: Time between two resolutions of a name.
        type: str
        default: 1s
      timeout_retry:
        description: Time before a query without answer is retried.
        type: str
        default: 1s
      hold:
        description:
          - How long the last answer is kept per response status
            (keys C(nx), C(other), C(refused), C(timeout), C(valid), C(obsolete)).
        type: dict
        default: {valid: 10s}
  timeouts:
    description: HAProxy C(timeout) values in C(defaults).
    type: dict
    suboptions:
      connect:
        description: Time to connect to a backend.
        type: str
        default: 5s
      client:
        description: Client-side inactivity timeout.
        type: str
        default: 30s
      server:
        description: Server-side inactivity timeout.
        type: str
        default: 30s
  maxconn:
    description: Global maximum of concurrent connections.
    type: int
    default: 4096
  log_target:
    description:
      - C(stdout) or C(stderr) (the journal when run by systemd, with the syslog level kept),
        an absolute syslog socket path such as C(/dev/log), or C(none).
    type: str
    default: stdout
  validate:
    description: Check the new config with C(haproxy -c) before it goes live (also in check mode).
    type: bool
    default: true
  backup:
    description: Keep the previous live file as C(PATH.prev) when it is replaced or removed.
    type: bool
    default: true
  manage_service:
    description: Manage the systemd unit (drop-in, enabled, running, reload on change).
    type: bool
    default: true
  service:
    description: The systemd unit name.
    type: str
    default: haproxy
  template:
    description:
      - The operator's own Jinja2 template for the config, used instead of
        C(templates/haproxy/haproxy_relay.cfg.j2). It is rendered on the controller (relative
        paths are found as C(ansible.builtin.template) finds C(src)) with the variables
        C(config) (the validated relays, resolvers, timeouts, maxconn, log_target) and
        C(marker) (keep it as the first line, or C(state=absent) will not remove the file),
        and the filter C(hq) (HAProxy quoting). Read by the action plugin only.
    type: str
  rendered:
    description:
      - Set by netloom's action plugin, not by hand. The files rendered on the controller,
        C(config) (the haproxy.cfg text) and C(dropin) (the unit drop-in, with I(manage_service)).
        Required with C(state=present).
    type: dict
    suboptions:
      config:
        description: The rendered haproxy.cfg.
        type: str
      dropin:
        description: The rendered systemd drop-in.
        type: str
notes:
  - Supports check mode and diff mode; both come from the same change plan as the real run.
    In check mode the new config is still checked with C(haproxy -c), on a private temporary file.
  - Addresses are IPv4 only.
  - The drop-in sets C(CONFIG) with C(Environment=); a C(CONFIG) set in C(/etc/default/haproxy)
    would override it (Debian ships that line commented out).
"""

EXAMPLES = r"""
- name: ESB local proxy in the runtime node (Docker DNS resolves the backends)
  haproxy_relay:
    relays:
      - {name: s3, bind: "127.0.0.1:9000", backend_host: s3-storage, backend_port: 9000}
      - {name: database, bind: "127.0.0.1:8001", backend_host: database, backend_port: 8000}
      - {name: victorialogs, bind: "127.0.0.1:9428", backend_host: victorialogs, backend_port: 9428}

- name: ESB registry relay on the gateway, TLS passed through to the registry
  haproxy_relay:
    path: /etc/haproxy/haproxy.cfg
    relays:
      - name: registry
        bind: "10.99.0.1:5010"
        transparent: true
        backend_host: esb-registry
        backend_port: 5010

- name: Registry relay terminating TLS (registry speaks plain HTTP behind it)
  haproxy_relay:
    relays:
      - name: registry
        bind: "10.99.0.1:5010"
        backend_host: esb-registry
        backend_port: 5000
        tls: {mode: terminate, certificate: /etc/haproxy/certs/registry-10.99.0.1.pem}
        health_check: {inter: 5s, fall: 2, rise: 1}
    timeouts: {server: 5m}

- name: Remove the relays netloom installed
  haproxy_relay:
    state: absent
"""

RETURN = r"""
path:
  description: The live config file.
  returned: always
  type: str
  sample: /etc/haproxy/haproxy.cfg
validated:
  description: C(haproxy -c) accepted the new config in this run (false when nothing was written).
  returned: always
  type: bool
  sample: true
reloaded:
  description: HAProxy was reloaded or restarted to pick up a changed config or drop-in.
  returned: always
  type: bool
  sample: false
backup_file:
  description: Where the previous file was kept in this run (C(PATH.prev)), else null.
  returned: always
  type: str
  sample: /etc/haproxy/haproxy.cfg.prev
changes:
  description: The planned (check mode) or executed steps.
  returned: always
  type: list
  elements: str
  sample: ["update /etc/haproxy/haproxy.cfg", "reload service haproxy"]
diff:
  description: Before/after text of each changed file and service state (diff mode).
  returned: when diff mode is on
  type: list
  elements: dict
"""

import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.netloom import haproxy
from ansible.module_utils.netloom.common import (
    ChangePlan,
    InputError,
    finish,
    guarded,
)
from ansible.module_utils.netloom.files import read_bytes, remove_dropin, remove_file, write_file
from ansible.module_utils.netloom.systemd import Unit, booted, daemon_reload, unit_name


def read_live(field_name: str, path: str) -> bytes | None:
    """The file's bytes, or None when absent; anything but a regular file is refused."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise InputError(field_name, path, "exists but is not a regular file")
    return read_bytes(path)


class HaproxyRelayManager:
    """Validate input, read the live file and unit state once, plan, and let `finish` run the plan."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.path = ""
        self.service: Unit | None = None
        self.dropin_path = ""
        self.backup_file: str | None = None
        self.validated = False
        self.reloaded = False

    # ---- input ----

    def validate_input(self) -> haproxy.RelayConfig | None:
        self.path = haproxy.config_path("path", self.params["path"])
        directory = os.path.dirname(self.path)
        if self.params["state"] == "present" and not os.path.isdir(directory):
            raise InputError("path", self.path,
                             f"directory {directory} does not exist (is haproxy installed?)")
        if self.params["manage_service"]:
            unit = unit_name("service", self.params["service"])
            if not booted():
                raise InputError("manage_service", True,
                                 "systemd is not PID 1 here (/run/systemd/system missing); "
                                 "set manage_service=false and run HAProxy another way")
            self.service = Unit(unit)
            self.dropin_path = self.service.dropin_path(haproxy.DROPIN_NAME)
        if self.params["state"] == "absent":
            return None
        config = haproxy.parse_config(self.params)
        # Every argument is valid; only now is the text rendered from them used.
        self.rendered_text("config")
        if self.service is not None:
            self.rendered_text("dropin")
        return config

    def rendered_text(self, key: str) -> str:
        """A file the action plugin rendered on the controller; without the plugin there is none."""
        text = (self.params["rendered"] or {}).get(key)
        if text is None:
            raise InputError(f"rendered.{key}", None,
                             "is rendered on the controller by netloom's haproxy_relay action plugin: "
                             "add netloom's action_plugins directory to ansible.cfg (action_plugins)")
        return text

    # ---- planning ----

    def run(self) -> None:
        config = self.validate_input()
        haproxy_bin = None
        if config is not None and self.params["validate"]:
            haproxy_bin = self.module.get_bin_path("haproxy", required=True)
        live = read_live("path", self.path)
        live_text = None if live is None else live.decode("utf-8", errors="replace")
        dropin = read_live("service", self.dropin_path) if self.service else None
        plan = ChangePlan()
        if config is None:
            self.plan_absent(plan, live_text, dropin)
        else:
            self.plan_present(plan, config, live, live_text, dropin, haproxy_bin)
        result: dict[str, Any] = {"path": self.path, "validated": self.validated,
                                  "reloaded": self.reloaded, "backup_file": self.backup_file}
        if self.module._diff:  # pylint: disable=protected-access
            result["diff"] = [{"before_header": step.key, "after_header": step.key,
                               "before": step.before or "", "after": step.after or ""}
                              for step in plan.steps]
        finish(self.module, plan, **result)

    def plan_present(self, plan: ChangePlan, config: haproxy.RelayConfig, live: bytes | None,
                     live_text: str | None, dropin: bytes | None, haproxy_bin: str | None) -> None:
        text = self.rendered_text("config")
        config_changed = live != text.encode("utf-8")
        if config_changed:
            missing = [path for path in config.referenced_files() if not os.path.exists(path)]
            if haproxy_bin and self.module.check_mode and missing:
                # On a never-converged node an earlier task makes these files; the real run
                # validates with them in place and refuses the config if they are still missing.
                self.module.warn(f"check mode: haproxy -c is left to the real run, {', '.join(missing)} "
                                 "does not exist yet")
            elif haproxy_bin and self.module.check_mode:
                self.warn_all(haproxy.check_text(haproxy_bin, text, config.backend_names))
            self.validated = haproxy_bin is not None
            backup = self.params["backup"] and live is not None
            self.backup_file = haproxy.backup_path(self.path) if backup else None

            def install() -> None:
                # haproxy -c checks the temp file beside the live one; a rejected config stops here.
                def check(temp: str) -> None:
                    self.warn_all(haproxy.check_config(haproxy_bin, temp, config.backend_names))

                write_file(self.module, self.path, text, keep_attrs=True,
                           check=check if haproxy_bin else None, backup=self.backup_file)

            plan.add(self.path, "create" if live is None else "update", live_text, text, install)
        if self.service is None:
            return
        dropin_text = self.rendered_text("dropin")
        dropin_changed = dropin != dropin_text.encode("utf-8")
        if dropin_changed:
            plan.add(self.dropin_path, "create" if dropin is None else "update",
                     None if dropin is None else dropin.decode("utf-8", errors="replace"), dropin_text,
                     lambda: self.install_dropin(dropin_text))
        self.plan_service(plan, self.service, "present", dropin_changed, config_changed)

    def plan_absent(self, plan: ChangePlan, live_text: str | None, dropin: bytes | None) -> None:
        if live_text is not None and not haproxy.owned(live_text):
            self.module.warn(f"{self.path} was not written by netloom (no marker line); "
                             "left in place, service untouched")
            return
        if self.service is not None and (live_text is not None or dropin is not None):
            self.plan_service(plan, self.service, "absent", False, False)
        if dropin is not None:
            plan.add(self.dropin_path, "delete", dropin.decode("utf-8", errors="replace"), None,
                     self.remove_dropin)
        if live_text is not None:
            backup = self.params["backup"]
            self.backup_file = haproxy.backup_path(self.path) if backup else None
            plan.add(self.path, "delete", live_text, None, lambda: remove_file(self.path, self.backup_file))

    def plan_service(self, plan: ChangePlan, service: Unit, state: str, dropin_changed: bool,
                     config_changed: bool) -> None:
        active, enabled = service.is_active(), service.is_enabled()
        state_names = {"start": ("stopped", "running"), "stop": ("running", "stopped"),
                       "enable": ("disabled", "enabled"), "disable": ("enabled", "disabled"),
                       "reload": ("running previous config", "running new config"),
                       "restart": ("running under previous unit settings", "restarted")}
        for verb in haproxy.service_actions(state, active, enabled, dropin_changed, config_changed):
            before, after = state_names[verb]
            plan.add(f"service {service.name}", verb, before, after, service.action(verb))
            self.reloaded = self.reloaded or verb in ("reload", "restart")

    # ---- step bodies (run only by `finish`, never in check mode) ----

    def warn_all(self, warnings: list[str]) -> None:
        for warning in warnings:
            self.module.warn(f"haproxy -c: {warning}")

    def install_dropin(self, text: str) -> None:
        write_file(self.module, self.dropin_path, text)
        daemon_reload()

    def remove_dropin(self) -> None:
        remove_dropin(self.dropin_path)
        daemon_reload()


def main() -> None:
    module = AnsibleModule(argument_spec=haproxy.ARGUMENT_SPEC, required_if=haproxy.REQUIRED_IF,
                           supports_check_mode=True)
    guarded(module, HaproxyRelayManager(module).run)


if __name__ == "__main__":
    main()
