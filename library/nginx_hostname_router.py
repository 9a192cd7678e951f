#!/usr/bin/python
"""Ansible module nginx_hostname_router: nginx routes localhost-PORT.pod-SLUG.localhost to pod services."""
from __future__ import annotations

DOCUMENTATION = r"""
module: nginx_hostname_router
short_description: nginx hostname routing to a Pinacle pod's declared services, in the pod or on a host
description:
  - Writes the nginx config of the seed's hostname routing. A request for
    C(localhost-PORT.pod-SLUG.localhost) or C(localhost-PORT-pod-SLUG.localhost) (both spellings)
    is proxied to C(127.0.0.1:PORT) with Host, X-Real-IP and X-Forwarded-For headers, HTTP/1.1 and
    WebSocket upgrade (the C(map $http_upgrade $connection_upgrade) idiom) and a long read timeout
    for idle editor sessions; any other Host goes to I(default_port).
  - Only declared ports are routed (an nginx C(map) with named regex captures). An undeclared or
    malformed port gets a 404 that names it; the router's own port can never be declared, so it
    never loops back to nginx. A Host naming another pod's slug gets 421 Misdirected Request.
  - The file is rendered on the controller from C(templates/nginx/hostname_router.conf.j2) by
    netloom's C(nginx_hostname_router) action plugin and passed in I(rendered).
  - Install is validate-then-swap, the same in a container (I(container), through the Docker API)
    and on a host. The new text is checked alone with C(nginx -t) (in a wrapper config); only then
    is it written beside the live file, the live file copied to C(PATH.prev) (I(backup)), and the
    new one renamed over it; C(nginx -t) of the whole configuration then runs before any reload,
    and if it fails the previous file is put back and nothing is reloaded. nginx is reloaded only
    when the file changed. A hand-edited file is drift, and it is replaced.
version_added: "0.1.0"
author: netloom
options:
  slug:
    description: The pod's slug (one DNS label) in C(pod-SLUG.localhost).
    type: str
    required: true
  services:
    description:
      - Declared services, each C({name, port}); only these ports are routed. Left out, the seed's
        default tabs C(app 3000), C(code 8726), C(kanban 3001), C(claude 2528).
      - A port outside 1..65535 or equal to I(listen) is refused.
    type: list
    elements: dict
  default_port:
    description: Port a Host that is no pod hostname goes to (must be declared, else 404).
    type: int
    default: 3000
  listen:
    description: The port nginx listens on (the pod's port 80).
    type: int
    default: 80
  default_server:
    description: Make this server nginx's default_server on I(listen).
    type: bool
    default: true
  read_timeout:
    description: proxy_read_timeout and proxy_send_timeout in seconds (idle WebSockets).
    type: int
    default: 3600
  external_port:
    description: The port clients use (the pod's external port), for the returned service URLs.
    type: int
  url_style:
    description: Spelling of the returned URLs, C(localhost-PORT.pod-SLUG) (dot) or C(-pod-) (dash).
    type: str
    choices: [dot, dash]
    default: dot
  container:
    description: Install into this running container through the Docker API. Left out, onto this host.
    type: str
  path:
    description: The config file.
    type: path
    default: /etc/nginx/conf.d/netloom-hostname-router.conf
  backup:
    description: Keep the replaced file as C(PATH.prev).
    type: bool
    default: true
  reload:
    description: Reload nginx when the file changed (in a container C(nginx -s reload); on a host
      C(systemctl reload nginx) when it runs under systemd, else C(nginx -s reload)).
    type: bool
    default: true
  state:
    description: C(absent) removes the file (only when it carries netloom's marker line) and reloads.
    type: str
    choices: [present, absent]
    default: present
  docker_host:
    description: Docker Engine API address (with I(container)). Left out, E(DOCKER_HOST) or the local socket.
    type: str
  rendered:
    description: Set by netloom's action plugin, not by hand; the files rendered on the controller.
    type: dict
    suboptions:
      config:
        description: The rendered nginx config.
        type: str
requirements:
  - nginx in the container or on the host (C(nginx -t))
  - python3-docker (with I(container))
notes:
  - Check mode reports the change and the reload without writing; diff mode shows old and new text.
"""

EXAMPLES = r"""
- name: Route pod a's services inside its container
  nginx_hostname_router:
    slug: a
    container: pinacle-pod-a
    external_port: 30000
    services:
      - {name: app, port: 3000}
      - {name: code, port: 8726}
      - {name: ws, port: 8765}

- name: The same router on a host's nginx
  nginx_hostname_router:
    slug: a
    path: /etc/nginx/conf.d/pod-a.conf
    default_server: false
"""

RETURN = r"""
path:
  description: The config file.
  returned: always
  type: str
services:
  description: Each declared service with its URL (a UI's tabs).
  returned: state=present
  type: list
  elements: dict
  sample: [{"name": "app", "port": 3000, "url": "http://localhost-3000.pod-a.localhost:30000/"}]
validated:
  description:
    - The new text passed C(nginx -t) alone (also in check mode); in a real run the whole
      configuration is checked again after the swap, and a failure there fails the run.
  returned: always
  type: bool
reloaded:
  description: nginx was (in check mode, would be) reloaded.
  returned: always
  type: bool
backup_file:
  description: Where the previous file was kept.
  returned: when a file was replaced with I(backup)
  type: str
changes:
  description: What was (or in check mode would be) changed.
  returned: always
  type: list
  elements: str
"""

import io
import posixpath
import shutil
import tarfile
import tempfile
import time
import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.netloom import pods
from ansible.module_utils.netloom.common import ChangePlan, CommandError, InputError, finish, guarded, port
from ansible.module_utils.netloom.docker_network import docker_host_address
from ansible.module_utils.netloom.files import read_bytes, remove_file, write_file
from ansible.module_utils.netloom.systemd import Unit, booted

try:
    import docker
    from docker.errors import DockerException, NotFound
except ImportError:
    DOCKER_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    DOCKER_IMPORT_ERROR = None

ARGUMENT_SPEC: dict[str, Any] = {
    "slug": {"type": "str", "required": True},
    "services": {"type": "list", "elements": "dict"},
    "default_port": {"type": "int", "default": pods.DEFAULT_PORT},
    "listen": {"type": "int", "default": pods.ROUTER_PORT},
    "default_server": {"type": "bool", "default": True},
    "read_timeout": {"type": "int", "default": 3600},
    "external_port": {"type": "int"},
    "url_style": {"type": "str", "choices": ["dot", "dash"], "default": "dot"},
    "container": {"type": "str"},
    "path": {"type": "path", "default": "/etc/nginx/conf.d/netloom-hostname-router.conf"},
    "backup": {"type": "bool", "default": True},
    "reload": {"type": "bool", "default": True},
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "docker_host": {"type": "str"},
    "rendered": {"type": "dict", "options": {"config": {"type": "str"}}},
}
TEMPLATE = "nginx/hostname_router.conf.j2"
NGINX_PID = "/run/nginx.pid"  # Debian's nginx.conf
PID_WAIT_TRIES, PID_WAIT_STEP_S = 100, 0.2


def parse(params: dict[str, Any]) -> dict[str, Any]:
    """Every argument checked; the template's variables (shared with the action plugin)."""
    listen = port("listen", params["listen"])
    declared = pods.services("services", params["services"], listen)
    default_port = port("default_port", params["default_port"])
    read_timeout = params["read_timeout"]
    if not 1 <= read_timeout <= 7 * 24 * 3600:
        raise InputError("read_timeout", read_timeout, "must be 1 s to 7 days")
    if params["external_port"] is not None:
        port("external_port", params["external_port"])
    path = params["path"]
    if not posixpath.isabs(path) or not path.endswith(".conf"):
        raise InputError("path", path, "must be an absolute path ending in .conf")
    return pods.router_variables(pods.slug("slug", params["slug"]), declared, default_port, listen,
                                 read_timeout, params["default_server"])


WRAPPER = "events {{}}\nhttp {{\n    include {candidate};\n}}\n"


def docker_api(module: AnsibleModule) -> Any:
    if DOCKER_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("docker (Debian: python3-docker)"),
                         exception=DOCKER_IMPORT_ERROR)
    host = docker_host_address(module.params["docker_host"])
    try:
        return docker.APIClient(base_url=host, version="auto")
    except DockerException as err:
        raise CommandError(f"Docker at {host}: {err}") from None


def container_running(module: AnsibleModule, name: str) -> bool:
    try:
        return bool(docker_api(module).inspect_container(name)["State"].get("Running"))
    except NotFound:
        return False


class HostTarget:
    """Files and commands on this host."""

    where = "host"

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module

    def read(self, path: str) -> bytes | None:
        return read_bytes(path)

    def write(self, path: str, data: bytes) -> None:
        write_file(self.module, path, data)

    def run(self, argv: list[str]) -> tuple[int, str]:
        rc, out, err = self.module.run_command(argv)
        return rc, (out + err).strip()

    def remove(self, path: str) -> None:
        remove_file(path)

    def reload(self) -> None:
        unit = Unit("nginx.service")
        if booted() and unit.is_active():
            unit.action("reload")()
            return
        rc, out = self.run(["nginx", "-s", "reload"])
        if rc != 0:
            raise CommandError(f"nginx -s reload failed: {out}")


class ContainerTarget:
    """Files and commands in a running container, through the Docker API (put_archive, exec)."""

    def __init__(self, module: AnsibleModule, name: str) -> None:
        self.api = docker_api(module)
        try:
            state = self.api.inspect_container(name)["State"]
        except NotFound:
            raise InputError("container", name, "no such container") from None
        if not state.get("Running"):
            raise InputError("container", name, "is not running")
        self.name = name
        self.where = f"container {name}"

    def run(self, argv: list[str]) -> tuple[int, str]:
        exec_id = self.api.exec_create(self.name, argv)["Id"]
        output = self.api.exec_start(exec_id).decode("utf-8", "replace")
        return self.api.exec_inspect(exec_id)["ExitCode"], output.strip()

    def read(self, path: str) -> bytes | None:
        try:
            stream, _ = self.api.get_archive(self.name, path)
        except NotFound:
            return None
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            member = archive.next()
            if member is None or not member.isfile():
                raise InputError("path", path, f"is not a regular file in {self.where}")
            handle = archive.extractfile(member)
            return handle.read() if handle else None

    def put(self, path: str, data: bytes) -> None:
        directory, name = posixpath.split(path)
        self.check(["mkdir", "-p", directory])
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            archive.addfile(info, io.BytesIO(data))
        self.api.put_archive(self.name, directory, buffer.getvalue())

    def write(self, path: str, data: bytes) -> None:
        """Beside the live file, then renamed over it: a reader sees the old or the new file."""
        directory, name = posixpath.split(path)
        temp = posixpath.join(directory, f".{name}.netloom")
        self.put(temp, data)
        self.check(["mv", "-f", temp, path])

    def check(self, argv: list[str]) -> str:
        rc, out = self.run(argv)
        if rc != 0:
            raise CommandError(f"{' '.join(argv)} in {self.where} failed ({rc}): {out}")
        return out

    def remove(self, path: str) -> None:
        self.check(["rm", "-f", path])

    def reload(self) -> None:
        """`nginx -s reload`, once nginx has written its pid file (a just-started pod's nginx may not yet)."""
        for _ in range(PID_WAIT_TRIES):
            if self.run(["test", "-s", NGINX_PID])[0] == 0:
                break
            time.sleep(PID_WAIT_STEP_S)
        else:
            raise CommandError(f"nginx in {self.where} has not written {NGINX_PID} within "
                               f"{PID_WAIT_TRIES * PID_WAIT_STEP_S:.0f} s: is it running?")
        self.check(["nginx", "-s", "reload"])


class RouterManager:
    """Validate, read the live file once, plan the swap and the reload; `finish` runs the plan."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.validated = False
        self.reloaded = False
        self.backup_file: str | None = None

    def run(self) -> None:
        present = self.params["state"] == "present"
        variables = parse(self.params) if present else None
        text = None
        if present:
            text = (self.params["rendered"] or {}).get("config")
            if text is None:
                raise InputError("rendered.config", None,
                                 "is rendered on the controller by netloom's nginx_hostname_router action "
                                 "plugin: add netloom's action_plugins directory to ansible.cfg")
        path = self.params["path"]
        name = self.params["container"]
        if name and present and self.module.check_mode and not container_running(self.module, name):
            # Check mode on a never-converged host: the pod task before this one would create it.
            self.module.warn(f"check mode: container {name} is not running yet; "
                             "nginx -t is left to the real run")
            plan = ChangePlan()
            plan.add(f"container {name}: {path}", "create", None, text)
            finish(self.module, plan, path=path, validated=False, reloaded=False, backup_file=None,
                   services=self.urls(variables))
            return
        target = ContainerTarget(self.module, name) if name else HostTarget(self.module)
        live = target.read(path)
        live_text = None if live is None else live.decode("utf-8", "replace")
        plan = ChangePlan()
        if present:
            if live != text.encode("utf-8"):
                self.backup_file = f"{path}.prev" if self.params["backup"] and live is not None else None
                self.check_alone(target, text)
                self.validated = True
                plan.add(f"{target.where}: {path}", "update" if live is not None else "create",
                         live_text, text, lambda: self.install(target, path, live, text))
                if self.params["reload"]:
                    self.reloaded = True
                    plan.add(f"{target.where}: nginx", "reload", "previous config", "new config",
                             target.reload)
        elif live is not None:
            if not live_text.startswith(pods.ROUTER_MARKER):
                self.module.warn(f"{path} in {target.where} has no netloom marker line: left in place")
            else:
                plan.add(f"{target.where}: {path}", "delete", live_text, None, lambda: target.remove(path))
                if self.params["reload"]:
                    self.reloaded = True
                    plan.add(f"{target.where}: nginx", "reload", "previous config", "without router",
                             target.reload)
        result: dict[str, Any] = {"path": path, "validated": self.validated, "reloaded": self.reloaded,
                                  "backup_file": self.backup_file}
        if variables is not None:
            result["services"] = self.urls(variables)
        finish(self.module, plan, **result)

    def urls(self, variables: dict[str, Any] | None) -> list[dict[str, Any]] | None:
        if variables is None:
            return None
        port = self.params["external_port"] or variables["listen"]
        return pods.service_urls(variables["slug"], variables["services"], port, self.params["url_style"])

    def check_alone(self, target: Any, text: str) -> None:
        """`nginx -t` of the new text alone (in a wrapper config), before anything is touched.

        The scratch folder is made by mkdtemp / `mktemp -d` (new, unpredictable name, 0700): a fixed
        name in /tmp could be pre-created or symlinked by another user, and nginx -t runs as root.
        """
        if isinstance(target, ContainerTarget):
            temp_dir = target.check(["mktemp", "-d", "/tmp/netloom-router-XXXXXXXXXX"])
        else:
            temp_dir = tempfile.mkdtemp(prefix="netloom-router-")
        candidate, wrapper = f"{temp_dir}/candidate.conf", f"{temp_dir}/nginx.conf"
        try:
            if isinstance(target, ContainerTarget):
                target.put(candidate, text.encode())
                target.put(wrapper, WRAPPER.format(candidate=candidate).encode())
            else:
                write_file(self.module, candidate, text)
                write_file(self.module, wrapper, WRAPPER.format(candidate=candidate))
            rc, out = target.run(["nginx", "-t", "-q", "-c", wrapper])
        finally:
            if isinstance(target, ContainerTarget):
                target.run(["rm", "-rf", temp_dir])
            else:
                shutil.rmtree(temp_dir, ignore_errors=True)
        if rc != 0:
            raise CommandError(f"nginx -t refused the rendered config in {target.where}: {out}")

    def install(self, target: Any, path: str, live: bytes | None, text: str) -> None:
        """Swap in the new file; if the whole config then fails nginx -t, put the old one back."""
        if self.backup_file is not None:
            target.write(self.backup_file, live)
        target.write(path, text.encode())
        rc, out = target.run(["nginx", "-t", "-q"])
        if rc != 0:
            if live is None:
                target.remove(path)
            else:
                target.write(path, live)
            raise CommandError(f"nginx -t of the whole configuration failed with the new {path} in "
                               f"{target.where}; the previous file was put back: {out}")


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    guarded(module, RouterManager(module).run)


if __name__ == "__main__":
    main()
