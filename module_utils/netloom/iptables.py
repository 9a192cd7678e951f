"""Netloom-owned iptables chains: read live state once per table, converge with one atomic restore.

Ownership model: netloom owns a chain by its declared name and owns the jumps into it by a
comment `netloom:<CHAIN>` on the jump rule in a built-in chain (or in Docker's DOCKER-USER,
the one foreign chain netloom hooks into; see EXTRA_HOOKS). Nothing else is read for
writing: Docker's chains (DOCKER, DOCKER-USER apart from our tagged jump, DOCKER-ISOLATION-*)
and every foreign rule are left byte-identical, and built-in chains are never flushed,
reordered or given a policy.

Callers pass rules in iptables-save form without the leading `-A CHAIN`, for example
`-d 10.88.0.1/32 -p tcp -m tcp --dport 9000 -j DNAT --to-destination 127.0.0.1:9000`.
`canonical_rule` also accepts the usual shorthands and rewrites them the way iptables-save
prints them (host addresses get /32, masks become prefix lengths, `-p tcp --dport` gets the
implicit `-m tcp`, long option aliases become short ones, `--syn` becomes its --tcp-flags
form, REJECT gets its default --reject-with, conntrack states are put in kernel order), so
desired and live rules compare equal. Anything beyond that (service names instead of port
numbers, abbreviated long options) must be given in iptables-save form, or the module will
rewrite the chain on every run.

Writes use ONE `iptables-restore --noflush` per table. Behaviour relied on, verified with
iptables 1.8.9 (nf_tables backend, Debian 12) and proven by tests/module/test_iptables_core.py:
- the whole input is one transaction: if any line fails, nothing is applied;
- with --noflush, declaring an existing user chain (`:NAME - [0:0]`) empties that chain and
  leaves every other chain alone, so re-declaring our chain and appending its rules replaces
  its contents atomically;
- `-X NAME` fails while NAME still has rules, so absent flushes (`-F`) before deleting;
- built-in chains are not declared by us at all (declaring one would reset its policy).
iptables-legacy-restore 1.8.9 was checked by hand to behave the same on the first three points.
Hook jumps are removed with `-D CHAIN <spec as saved>`, which deletes the first identical rule;
so duplicates are all deleted and one jump is re-inserted where the first correct one was.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from ansible.module_utils.netloom.common import ChangePlan, CommandError, InputError, run_command

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
# Non-built-in chains a netloom chain may also be hooked from: Docker's DOCKER-USER, the
# chain Docker leaves to the operator and evaluates before its own FORWARD rules. It exists
# only once Docker has started, so a jump into it is planned only when it is there.
EXTRA_HOOKS: dict[str, tuple[str, ...]] = {"filter": ("DOCKER-USER",)}
CHAIN_NAME_MAX = 28
_CHAIN_NAME_RE = re.compile(r"[A-Z0-9_-]+")  # fullmatch: `$` passes a trailing newline
COMMENT_PREFIX = "netloom:"
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# Long options iptables accepts and the short form iptables-save prints.
_ALIASES = {
    "--source": "-s", "--src": "-s", "--destination": "-d", "--dst": "-d",
    "--in-interface": "-i", "--out-interface": "-o", "--protocol": "-p",
    "--fragment": "-f", "--jump": "-j", "--goto": "-g", "--match": "-m",
    "--destination-port": "--dport", "--source-port": "--sport",
    "--destination-ports": "--dports", "--source-ports": "--sports",
}
# Base (IP header) options, printed by iptables-save first and in this order.
_BASE_ORDER = ("-s", "-d", "-i", "-o", "-p", "-f")
_BASE_WITH_VALUE = {"-s", "-d", "-i", "-o", "-p"}
# Options that make iptables load the protocol's match implicitly (`-p tcp --dport 80`).
_IMPLICIT_MATCH_OPTIONS = {
    "tcp": {"--dport", "--sport", "--tcp-flags", "--syn", "--tcp-option"},
    "udp": {"--dport", "--sport"},
    "icmp": {"--icmp-type"},
}
_PROTOCOL_NUMBERS = {"1": "icmp", "6": "tcp", "17": "udp", "47": "gre", "50": "esp",
                     "51": "ah", "132": "sctp"}
_CT_STATE_ORDER = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")
# Tokens that would turn a rule spec into another command inside the restore file.
_COMMAND_TOKENS = {"-A", "--append", "-I", "--insert", "-D", "--delete", "-R", "--replace",
                   "-N", "--new-chain", "-X", "--delete-chain", "-F", "--flush",
                   "-P", "--policy", "-E", "--rename-chain", "-Z", "--zero", "-t", "--table"}
# Options whose values iptables-save prints with xtables_save_string (quoted unless [A-Za-z0-9_-]+).
_STRING_OPTIONS = {"--comment", "--log-prefix", "--nflog-prefix"}
_SAVE_PLAIN_RE = re.compile(r"[A-Za-z0-9_-]+")
_RESTORE_PLAIN_RE = re.compile(r"[^\s\"]+")

Runner = Callable[..., str]


@dataclass(frozen=True)
class OwnedChain:
    """A chain netloom owns; each hook gets one jump tagged `netloom:<name>`."""

    table: str               # "filter" | "nat" | "mangle" | "raw"
    name: str                # e.g. "NETLOOM-OVERLAY-FWD"
    hooks: tuple[str, ...]   # built-in chains that jump to it, e.g. ("PREROUTING", "OUTPUT")
    rules: tuple[str, ...]   # iptables-save form without "-A NAME"


# ---- parsing and canonical form (pure) ----

def split_rule(text: str) -> list[str]:
    """Tokenise a rule exactly as iptables-restore does.

    Double quotes group, and inside them a backslash escapes any character; outside quotes
    backslashes and single quotes are ordinary characters (unlike a shell).
    """
    if "\n" in text or "\r" in text:
        raise ValueError("a rule must be a single line")
    tokens: list[str] = []
    current: list[str] = []
    quoted = escaped = started = False
    for char in text:
        if quoted:
            if escaped:
                current.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            else:
                current.append(char)
        elif char == '"':
            quoted = started = True
        elif char in " \t":
            if started:
                tokens.append("".join(current))
                current, started = [], False
        else:
            current.append(char)
            started = True
    if quoted:
        raise ValueError("cannot tokenise rule (unterminated double quote)")
    if started:
        tokens.append("".join(current))
    return tokens


def render_rule(tokens: tuple[str, ...] | list[str]) -> str:
    """Join tokens into iptables-restore syntax, quoting the way iptables-save prints them."""
    rendered = []
    for index, token in enumerate(tokens):
        is_string = index > 0 and tokens[index - 1] in _STRING_OPTIONS
        rendered.append(_quote(token, is_string))
    return " ".join(rendered)


def _quote(token: str, is_string: bool) -> str:
    """xtables_save_string's rule for string values; elsewhere quote only what would not survive."""
    plain = _SAVE_PLAIN_RE if is_string else _RESTORE_PLAIN_RE
    if plain.fullmatch(token):
        return token
    return '"' + re.sub(r"([\\\"'])", r"\\\1", token) + '"'


def _canonical_address(value: str) -> str:
    if "," in value:
        raise ValueError(f"{value!r}: one address per rule (iptables would expand a list into "
                         "several rules)")
    try:
        return str(ipaddress.IPv4Network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address or network (iptables needs an "
                         "address, not a host name)") from None


def _canonical_protocol(value: str) -> str:
    lowered = value.lower()
    return _PROTOCOL_NUMBERS.get(lowered, lowered)


def canonical_rule(text: str) -> tuple[str, ...]:
    """Return the rule as the token tuple iptables-save would print; ValueError if unusable.

    Applied to both desired rules and rules read from iptables-save, so equal rules compare
    equal whichever accepted spelling the caller used.
    """
    tokens = [_ALIASES.get(token, token) for token in split_rule(text)]
    if not tokens:
        raise ValueError("empty rule")
    bad = _COMMAND_TOKENS.intersection(tokens)
    if bad:
        raise ValueError(f"rule specs must not contain commands ({', '.join(sorted(bad))})")

    base: dict[str, list[str]] = {}
    rest: list[str] = []
    index = 0
    while index < len(tokens):
        negated = tokens[index] == "!" and index + 1 < len(tokens) and tokens[index + 1] in _BASE_ORDER
        option = tokens[index + 1] if negated else tokens[index]
        if option in _BASE_ORDER:
            if option in base:
                raise ValueError(f"{option} given twice")
            start = index + (2 if negated else 1)
            value: list[str] = []
            if option in _BASE_WITH_VALUE:
                if start >= len(tokens):
                    raise ValueError(f"{option} needs a value")
                value = [tokens[start]]
                start += 1
            base[option] = (["!"] if negated else []) + [option] + value
            index = start
            continue
        rest.append(tokens[index])
        if tokens[index] in _STRING_OPTIONS and index + 1 < len(tokens):
            rest.append(tokens[index + 1])  # a comment such as "-s" is text, not an option
            index += 1
        index += 1

    for option in ("-s", "-d"):
        if option in base:
            base[option][-1] = _canonical_address(base[option][-1])
            if base[option] == [option, "0.0.0.0/0"]:
                del base[option]
    protocol = ""
    if "-p" in base:
        base["-p"][-1] = _canonical_protocol(base["-p"][-1])
        if base["-p"] in (["-p", "all"], ["-p", "0"]):
            del base["-p"]
        elif base["-p"][0] != "!":
            protocol = base["-p"][-1]

    result: list[str] = []
    for option in _BASE_ORDER:
        result.extend(base.get(option, []))
    result.extend(_canonical_matches_and_target(rest, protocol))
    return tuple(result)


def _canonical_matches_and_target(tokens: list[str], protocol: str) -> list[str]:
    """Insert implicit protocol matches and rewrite option spellings iptables-save normalises."""
    out: list[str] = []
    loaded: set[str] = set()
    implicit = _IMPLICIT_MATCH_OPTIONS.get(protocol, set())
    target = ""
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in ("-m", "-j", "-g") and index + 1 < len(tokens):
            name = tokens[index + 1]
            if token == "-m":
                loaded.add(name)
            else:
                target = name
            out.extend([token, name])
            index += 2
            continue
        negated_option = tokens[index + 1] if token == "!" and index + 1 < len(tokens) else token
        if not target and negated_option in implicit and protocol not in loaded:
            out.extend(["-m", protocol])
            loaded.add(protocol)
        if token == "--syn":
            out.extend(["--tcp-flags", "FIN,SYN,RST,ACK", "SYN"])
        elif token in ("--ctstate", "--state") and index + 1 < len(tokens):
            states = tokens[index + 1].upper().split(",")
            ordered = [s for s in _CT_STATE_ORDER if s in states]
            ordered += [s for s in states if s not in _CT_STATE_ORDER]
            out.extend([token, ",".join(ordered)])
            index += 1
        elif token == "--to" and target in ("DNAT", "SNAT"):
            out.append("--to-destination" if target == "DNAT" else "--to-source")
        else:
            out.append(token)
        index += 1
    if target == "REJECT" and "--reject-with" not in out:
        out.extend(["--reject-with", "icmp-port-unreachable"])
    return out


def parse_save(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse iptables-save output into {table: {chain: [rule spec after "-A CHAIN "]}}.

    Chains keep their declaration order; rule specs are kept verbatim so they can be fed
    back to iptables-restore (`-D CHAIN <spec>`) exactly as the kernel reported them.
    """
    tables: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], {})
        elif current is None:
            raise ValueError(f"iptables-save line outside a table: {line!r}")
        elif line.startswith(":"):
            current.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            parts = line.split(None, 2)
            current.setdefault(parts[1], []).append(parts[2] if len(parts) > 2 else "")
        else:
            raise ValueError(f"unexpected iptables-save line: {line!r}")
    return tables


def jump_rule(name: str) -> tuple[str, ...]:
    """The tagged jump netloom places in a built-in chain."""
    return ("-m", "comment", "--comment", COMMENT_PREFIX + name, "-j", name)


def _is_tagged_for(spec: str, name: str) -> bool:
    """True when a live rule carries our `netloom:<name>` comment (whatever else it holds)."""
    try:
        tokens = split_rule(spec)
    except ValueError:
        return False
    wanted = COMMENT_PREFIX + name
    return any(tokens[i] == "--comment" and tokens[i + 1] == wanted for i in range(len(tokens) - 1))


def _safe_canonical(spec: str) -> tuple[str, ...]:
    """Canonical form of a live rule; a rule we cannot parse stays as its raw tokens (so differs)."""
    try:
        return canonical_rule(spec)
    except ValueError:
        return ("<unparsed>", spec)


# ---- validation ----

def hook_chains(table: str) -> tuple[str, ...]:
    """Chains of `table` that may jump to a netloom chain: the built-ins, then EXTRA_HOOKS."""
    return BUILTIN_CHAINS.get(table, ()) + EXTRA_HOOKS.get(table, ())


def validate_chain(chain: OwnedChain, field: str) -> tuple[tuple[str, ...], ...]:
    """Check one OwnedChain and return its rules in canonical form; raise InputError."""
    if chain.table not in BUILTIN_CHAINS:
        raise InputError(f"{field}.table", chain.table, f"must be one of {', '.join(BUILTIN_CHAINS)}")
    name = chain.name
    if not isinstance(name, str) or not _CHAIN_NAME_RE.fullmatch(name) or len(name) > CHAIN_NAME_MAX:
        raise InputError(f"{field}.name", name,
                         f"chain names are 1..{CHAIN_NAME_MAX} characters of A-Z 0-9 _ -")
    if name in BUILTIN_CHAINS[chain.table] or name.startswith("DOCKER"):
        raise InputError(f"{field}.name", name, "built-in and Docker chains are never owned by netloom")
    if isinstance(chain.hooks, str) or isinstance(chain.rules, str):
        raise InputError(field, chain, "hooks and rules must be tuples of strings")
    for hook in chain.hooks:
        if hook not in hook_chains(chain.table):
            raise InputError(f"{field}.hooks", hook, f"not a chain of table {chain.table} netloom hooks "
                             f"into ({', '.join(hook_chains(chain.table))})")
    if len(set(chain.hooks)) != len(chain.hooks):
        raise InputError(f"{field}.hooks", list(chain.hooks), "a hook is listed twice")
    canonical = []
    for position, rule in enumerate(chain.rules):
        try:
            canonical.append(canonical_rule(str(rule)))
        except ValueError as err:
            raise InputError(f"{field}.rules[{position}]", rule, str(err)) from None
    return tuple(canonical)


# ---- live state and planning ----

def find_tool(name: str) -> str:
    """Locate an sbin tool even when the module's PATH lacks /usr/sbin."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
    if not found:
        raise CommandError(f"{name} not found; install the iptables package")
    return found


def read_table(table: str, runner: Runner = run_command) -> dict[str, list[str]]:
    """One `iptables-save -t TABLE` call, parsed; an unused table reads as empty."""
    output = runner([find_tool("iptables-save"), "-t", table])
    try:
        return parse_save(output).get(table, {})
    except ValueError as err:
        raise CommandError(f"cannot parse iptables-save -t {table}: {err}") from None


def restore(table: str, lines: list[str], runner: Runner = run_command) -> None:
    """Apply lines to one table as a single iptables-restore --noflush transaction."""
    script = "\n".join([f"*{table}", *lines, "COMMIT", ""])
    runner([find_tool("iptables-restore"), "-w", "--noflush"], stdin=script)


def plan_chains(chains: list[OwnedChain], state: str = "present",
                runner: Runner = run_command) -> ChangePlan:
    """Plan (not apply) the convergence of netloom-owned chains and their tagged hook jumps.

    All chains are validated before anything is read. Each table is read once and, when it
    needs changes, rewritten by one iptables-restore call attached to the table's first step.
    """
    if state not in ("present", "absent"):
        raise InputError("state", state, "must be present or absent")
    validated: dict[str, list[tuple[OwnedChain, tuple[tuple[str, ...], ...]]]] = {}
    seen: set[tuple[str, str]] = set()
    for position, chain in enumerate(chains):
        rules = validate_chain(chain, f"chains[{position}]")
        if (chain.table, chain.name) in seen:
            raise InputError(f"chains[{position}].name", chain.name, f"declared twice in table {chain.table}")
        seen.add((chain.table, chain.name))
        validated.setdefault(chain.table, []).append((chain, rules))

    plan = ChangePlan()
    for table, entries in validated.items():
        live = read_table(table, runner)
        table_plan, lines = _plan_table(table, entries, live, state)
        if table_plan.steps:
            table_plan.steps[0].run = _restorer(table, lines, runner)
        plan.extend(table_plan)
    return plan


def _restorer(table: str, lines: list[str], runner: Runner) -> Callable[[], None]:
    return lambda: restore(table, lines, runner)


def _docker_user_end(rules: list[str]) -> int:
    """How many rules lead up to (and include) the last jump to Docker's DOCKER-USER; 0 without one.

    Our jumps go after it: DOCKER-USER is the operators' override point and must see a packet
    before any netloom chain accepts it. (Docker itself re-inserts that jump at position 1
    whenever it starts, so a jump placed first on a host without Docker ends up after it.)
    """
    end = 0
    for index, spec in enumerate(rules):
        if _safe_canonical(spec) == ("-j", "DOCKER-USER"):
            end = index + 1
    return end


def _jump_position(hook_rules: list[str], name: str) -> int:
    """Where our jump goes after all tagged copies are deleted: first, or where the first exact copy
    was, but never before Docker's DOCKER-USER jump.

    `-D CHAIN spec` always removes the first identical rule, so an extra copy cannot be deleted
    on its own; instead every tagged copy is deleted and one jump re-inserted at the first exact
    copy's position (counted without the tagged rules before it), which moves no other rule.
    """
    floor = _docker_user_end([spec for spec in hook_rules if not _is_tagged_for(spec, name)]) + 1
    tagged_before = 0
    for index, spec in enumerate(hook_rules):
        if _is_tagged_for(spec, name):
            if _safe_canonical(spec) == jump_rule(name):
                return max(index + 1 - tagged_before, floor)
            tagged_before += 1
    return floor


def _plan_table(table: str, entries: list[tuple[OwnedChain, tuple[tuple[str, ...], ...]]],
                live: dict[str, list[str]], state: str) -> tuple[ChangePlan, list[str]]:
    """Steps for one table and the restore lines that realise all of them at once.

    Lines are ordered so the transaction is valid: declare (and thereby flush) changed
    chains, append their rules, fix the jumps, and only then flush and delete chains.
    """
    plan = ChangePlan()
    declare: list[str] = []
    append: list[str] = []
    jumps: list[str] = []
    flush: list[str] = []
    delete: list[str] = []
    hooks = hook_chains(table)
    for chain, desired in entries:
        name = chain.name
        exists = name in live
        live_rules = live.get(name, [])
        live_canonical = [_safe_canonical(spec) for spec in live_rules]
        before_rules = [render_rule(rule) for rule in live_canonical] if exists else None
        key = f"iptables {table} {name}"
        if state == "present":
            if not exists or live_canonical != list(desired):
                declare.append(f":{name} - [0:0]")
                append.extend(f"-A {name} {render_rule(rule)}" for rule in desired)
                plan.add(key, "update" if exists else "create", before_rules,
                         [render_rule(rule) for rule in desired])
        elif exists:
            flush.append(f"-F {name}")
            delete.append(f"-X {name}")
            plan.add(key, "delete", before_rules, None)

        wanted_hooks = chain.hooks if state == "present" else ()
        jump = render_rule(jump_rule(name))
        for hook in hooks:
            if hook in wanted_hooks and hook not in live and hook not in BUILTIN_CHAINS[table]:
                raise CommandError(f"cannot hook {name} into {table} {hook}: {hook} does not exist "
                                   "(Docker creates DOCKER-USER when it starts)")
            hook_rules = live.get(hook, [])
            tagged = [spec for spec in hook_rules if _is_tagged_for(spec, name)]
            hook_key = f"iptables {table} {hook} -> {name}"
            if hook not in wanted_hooks:
                if tagged:
                    jumps.extend(f"-D {hook} {spec}" for spec in tagged)
                    plan.add(hook_key, "delete", tagged, None)
                continue
            if (len(tagged) == 1 and _safe_canonical(tagged[0]) == jump_rule(name)
                    and hook_rules.index(tagged[0]) >= _docker_user_end(hook_rules)):
                continue
            jumps.extend(f"-D {hook} {spec}" for spec in tagged)
            jumps.append(f"-I {hook} {_jump_position(hook_rules, name)} {jump}")
            plan.add(hook_key, "update" if tagged else "create", tagged or None, [jump])
    return plan, declare + append + jumps + flush + delete
