"""Shared base of netloom's action plugins: render a module's files on the controller, then run it.

Ansible ships a module and its module_utils to the node, but an action plugin runs on the
controller first (as `ansible.builtin.template` does). Each netloom module that writes a file
from a template has a thin plugin of the same name built on `NetloomAction`:

1. it renders the module's templates from the repository's `templates/` (or the operator's own
   file given as `template:`, found like the template module finds it) with the task's
   arguments, normalised by the module's own argument spec;
2. it calls the module with the results in the option `rendered` (a dict of file texts).

Nodes therefore need no Jinja2. The plugin renders only from arguments that pass the module's
argument spec and its pure validation (shared from module_utils); when they do not, it renders
nothing and lets the module report the error, naming the field, as it always did. The module
still validates every argument itself before it uses `rendered`, validates the rendered file
with the real tool (`haproxy -c`, `wg-quick strip`) and refuses to run without `rendered`.
Secrets are never rendered: WireGuard keys stay in their own 0600 files on the node.

Modules that record their run for netloom-restore also get the two restore units here (see
`RESTORE_UNITS`): they record them with their other arguments, so the boot replay, which runs
with no controller, passes the same texts again.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ansible.module_utils
import jinja2
from ansible import constants
from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.plugins.action import ActionBase

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES_DIR = os.path.join(REPO_DIR, "templates")
RENDERED_OPTION = "rendered"
# rendered key -> template under templates/, for every module that records for netloom-restore.
RESTORE_UNITS = {"restore_early": "systemd/netloom-restore-early.service.j2",
                 "restore_late": "systemd/netloom-restore-late.service.j2"}


def _use_netloom_module_utils() -> None:
    """Make ansible.module_utils.netloom importable here, as Ansible makes it on a node.

    The pure parts (validation, data model) are shared with the modules so the controller
    renders from exactly what the module accepts.
    """
    folders = [os.path.join(REPO_DIR, "module_utils"), *constants.DEFAULT_MODULE_UTILS_PATH]
    for folder in folders:
        if os.path.isdir(os.path.join(folder, "netloom")) and folder not in ansible.module_utils.__path__:
            ansible.module_utils.__path__.append(folder)


_use_netloom_module_utils()


def template_path(name: str) -> str:
    """A netloom template by its path under templates/."""
    return os.path.join(TEMPLATES_DIR, name)


def render_file(path: str, variables: Mapping[str, Any],
                filters: Mapping[str, Callable[..., Any]] | None = None) -> str:
    """Render one Jinja2 file: undefined names are errors, blocks trimmed, final newline kept."""
    folder, name = os.path.split(os.path.abspath(path))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(folder), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             autoescape=False)
    env.filters.update(filters or {})
    try:
        return env.get_template(name).render(**variables)
    except jinja2.TemplateError as err:
        raise AnsibleError(f"rendering {path} failed: {err}") from err


def restore_units() -> dict[str, str]:
    """The two netloom-restore units, with the node-only values left as persist.py's slots."""
    from ansible.module_utils.netloom import persist, restore

    variables = {"runner": persist.RUNNER, "entries_dir": os.path.join(restore.STATE_DIR, "entries")}
    return {key: render_file(template_path(name), variables) for key, name in RESTORE_UNITS.items()}


def module_argument_spec(name: str) -> dict[str, Any]:
    """The module's own ARGUMENT_SPEC, read from library/NAME.py (importing it runs no module code)."""
    import_name = f"netloom_library_{name}"
    if import_name not in sys.modules:
        path = os.path.join(REPO_DIR, "library", f"{name}.py")
        spec = importlib.util.spec_from_file_location(import_name, path)
        if spec is None or spec.loader is None:
            raise AnsibleError(f"cannot load {path}")
        code = importlib.util.module_from_spec(spec)
        sys.modules[import_name] = code  # dataclasses look their module up while it loads
        spec.loader.exec_module(code)
    return sys.modules[import_name].ARGUMENT_SPEC


def normalised(argument_spec: Mapping[str, Any], args: Mapping[str, Any],
               **spec_options: Any) -> dict[str, Any] | None:
    """The arguments as the module will see them (types, defaults), or None when they do not pass."""
    result = ArgumentSpecValidator(dict(argument_spec), **spec_options).validate(dict(args))
    return None if result.error_messages else result.validated_parameters


class NetloomAction(ActionBase):
    """Render on the controller, then run the module with `rendered` (see the file docstring).

    Subclasses set `records_restore` and/or implement `render` (with `accepts_template` when an
    operator may give their own main template).
    """

    TRANSFERS_FILES = False
    # Whether the module records its run for netloom-restore (and so writes the restore units).
    records_restore = False
    # Whether the module has the `template` option (the operator's own file for its main config).
    accepts_template = False

    @classmethod
    def render(cls, args: Mapping[str, Any], template: str | None) -> dict[str, str] | None:
        """The module's own files rendered from `args`; None when the arguments do not validate."""
        return {}

    @classmethod
    def rendered_args(cls, args: Mapping[str, Any], template: str | None = None) -> dict[str, Any]:
        """The module's arguments plus `rendered` (also what the tests use without a controller)."""
        if RENDERED_OPTION in args:
            raise AnsibleActionFail(f"{RENDERED_OPTION} is set by the action plugin, not by the task")
        files = cls.render(args, template)
        if files is None:
            return dict(args)  # the module refuses the arguments and names the field
        if cls.records_restore:
            files = {**files, **restore_units()}
        return {**args, RENDERED_OPTION: files} if files else dict(args)

    def run(self, tmp: str | None = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        del tmp  # ActionBase.run handles it
        args = dict(self._task.args)
        template = None
        if self.accepts_template and args.get("template"):
            # Found like ansible.builtin.template finds `src`: the role's/playbook's templates/
            # folders first, then relative to them; absolute paths as given.
            template = self._find_needle("templates", str(args["template"]))
        result.update(self._execute_module(module_name=self._task.action,
                                           module_args=self.rendered_args(args, template),
                                           task_vars=task_vars))
        return result
