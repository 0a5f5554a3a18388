"""Loading policy files: strict YAML, every error as `file:line: reason`.

The document is composed into YAML nodes (not plain dicts) so every key and value keeps
its line number; unknown keys, bad globs, unknown operations or decisions, duplicate
rule ids and undefined ${VARS} are all refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import yaml

from agentfs.errors import UserError
from agentfs.policy.globs import GlobError, compile_glob, compile_globs
from agentfs.policy.model import (
    DECISIONS,
    ERRNOS,
    OP_CLASSES,
    OPS,
    WHO_KEYS,
    Approval,
    Defaults,
    Policy,
    Rule,
    ValueMatcher,
)
from agentfs.units import parse_duration

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOP_KEYS = {"version", "name", "vars", "defaults", "approval", "rules", "include_default"}
_RULE_KEYS = {"id", "priority", "paths", "ops", "decision", "message", "who", "overridable"}


class PolicyError(UserError):
    """A policy file problem, located as file:line."""


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node | None, reason: str) -> PolicyError:
        line = node.start_mark.line + 1 if node is not None else 1
        return PolicyError(f"{self.source}:{line}: {reason}")

    def mapping(self, node: yaml.Node, what: str, allowed: set[str]
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key not in allowed:
                raise self.fail(key_node, f"unknown key {key!r} in {what} "
                                          f"(known: {', '.join(sorted(allowed))})")
            if key in out:
                raise self.fail(key_node, f"duplicate key {key!r} in {what}")
            out[key] = (key_node, value_node)
        return out

    def scalar(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        return str(node.value)

    def strings(self, node: yaml.Node, what: str) -> list[tuple[yaml.Node, str]]:
        if isinstance(node, yaml.ScalarNode):
            return [(node, str(node.value))]
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, f"{what} must be a non-empty list")
        return [(n, self.scalar(n, what)) for n in node.value]


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}:1: not valid YAML: the file is not UTF-8 text") from None
    return parse_policy(text, str(path))


def parse_policy(text: str, source: str = "<policy>", env: dict[str, str] | None = None
                 ) -> Policy:
    ctx = _Ctx(source)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise PolicyError(f"{source}:{line}: not valid YAML: "
                          f"{getattr(exc, 'problem', exc)}") from None
    if root is None:
        raise PolicyError(f"{source}:1: the policy is empty")
    top = ctx.mapping(root, "the policy", _TOP_KEYS)
    if "version" not in top or ctx.scalar(top["version"][1], "version") != "1":
        raise ctx.fail(top.get("version", (root, root))[1], "version: 1 is required")
    variables = dict(env if env is not None else os.environ)
    file_vars: dict[str, str] = {}
    if "vars" in top:
        vars_node = top["vars"][1]
        if not isinstance(vars_node, yaml.MappingNode):
            raise ctx.fail(vars_node, "vars must be a mapping")
        for key_node, value_node in vars_node.value:
            value = _expand(ctx, value_node, ctx.scalar(value_node, "a var"), variables)
            variables[str(key_node.value)] = file_vars[str(key_node.value)] = value
    defaults = _defaults(ctx, top["defaults"][1]) if "defaults" in top else None
    if defaults is None:
        raise ctx.fail(root, "a 'defaults' section is required (read, write, ...)")
    approval = _approval(ctx, top["approval"][1]) if "approval" in top else Approval()
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    if "rules" in top:
        rules_node = top["rules"][1]
        if not isinstance(rules_node, yaml.SequenceNode):
            raise ctx.fail(rules_node, "rules must be a list")
        for order, node in enumerate(rules_node.value):
            rule = _rule(ctx, node, order, variables)
            if rule.id in seen:
                raise ctx.fail(node, f"duplicate rule id {rule.id!r} "
                                     f"(first at line {seen[rule.id]})")
            seen[rule.id] = rule.line
            rules.append(rule)
    name = ctx.scalar(top["name"][1], "name") if "name" in top else Path(source).stem
    return Policy(name=name, source=source, sha256=hashlib.sha256(text.encode()).hexdigest(),
                  defaults=defaults, approval=approval,
                  rules=tuple(sorted(rules, key=lambda r: r.sort_key)), vars=file_vars,
                  sections=frozenset(k for k in ("approval",) if k in top),
                  include_default=_flag(ctx, top["include_default"][1], "include_default")
                  if "include_default" in top else False)


def _expand(ctx: _Ctx, node: yaml.Node, value: str, variables: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in variables:
            return variables[name]
        if default is not None:
            return default
        raise ctx.fail(node, f"undefined variable ${{{name}}} (define it under vars: or "
                             "give a default with ${NAME:-value})")
    return _VAR.sub(sub, value)


def _decision(ctx: _Ctx, node: yaml.Node, what: str) -> str:
    value = ctx.scalar(node, what)
    if value not in DECISIONS:
        raise ctx.fail(node, f"unknown decision {value!r} for {what} "
                             f"(one of {', '.join(DECISIONS)})")
    return value


def _defaults(ctx: _Ctx, node: yaml.Node) -> Defaults:
    m = ctx.mapping(node, "defaults", {"read", "write", "on_error", "deny_errno",
                                       "overridable"})
    for required in ("read", "write"):
        if required not in m:
            raise ctx.fail(node, f"defaults.{required} is required")
    errno_name = ctx.scalar(m["deny_errno"][1], "deny_errno") if "deny_errno" in m else "EACCES"
    if errno_name not in ERRNOS:
        raise ctx.fail(m["deny_errno"][1], f"deny_errno must be one of {', '.join(ERRNOS)}")
    return Defaults(read=_decision(ctx, m["read"][1], "defaults.read"),
                    write=_decision(ctx, m["write"][1], "defaults.write"),
                    on_error=_decision(ctx, m["on_error"][1], "defaults.on_error")
                    if "on_error" in m else "deny",
                    deny_errno=ERRNOS[errno_name],
                    overridable=_flag(ctx, m["overridable"][1], "defaults.overridable")
                    if "overridable" in m else False)


def _approval(ctx: _Ctx, node: yaml.Node) -> Approval:
    m = ctx.mapping(node, "approval", {"timeout", "on_timeout", "remember", "max_pending"})
    out = Approval()
    timeout, on_timeout, remember, max_pending = (out.timeout, out.on_timeout, out.remember,
                                                  out.max_pending)
    if "timeout" in m:
        try:
            timeout = parse_duration(ctx.scalar(m["timeout"][1], "timeout"))
        except ValueError as exc:
            raise ctx.fail(m["timeout"][1], str(exc)) from None
    if "on_timeout" in m:
        on_timeout = _decision(ctx, m["on_timeout"][1], "approval.on_timeout")
    if "remember" in m:
        remember = ctx.scalar(m["remember"][1], "remember")
        if remember not in ("once", "process", "session"):
            raise ctx.fail(m["remember"][1], "remember must be once, process or session")
    if "max_pending" in m:
        try:
            max_pending = int(ctx.scalar(m["max_pending"][1], "max_pending"))
        except ValueError:
            raise ctx.fail(m["max_pending"][1], "max_pending must be a number") from None
    return Approval(timeout, on_timeout, remember, max_pending)


def _rule(ctx: _Ctx, node: yaml.Node, order: int, variables: dict[str, str]) -> Rule:
    m = ctx.mapping(node, "a rule", _RULE_KEYS)
    for required in ("id", "paths", "ops", "decision"):
        if required not in m:
            raise ctx.fail(node, f"a rule needs '{required}'")
    rule_id = ctx.scalar(m["id"][1], "id")
    paths = []
    for pnode, raw in ctx.strings(m["paths"][1], "paths"):
        pattern = _expand(ctx, pnode, raw, variables)
        try:
            compile_glob(pattern)
        except GlobError as exc:
            raise ctx.fail(pnode, f"bad glob: {exc}") from None
        paths.append(pattern)
    ops: set[str] = set()
    for onode, op in ctx.strings(m["ops"][1], "ops"):
        if op in OP_CLASSES:
            ops |= OP_CLASSES[op]
        elif op in OPS:
            ops.add(op)
        else:
            raise ctx.fail(onode, f"unknown operation {op!r} (operations: "
                                  f"{', '.join(sorted(OPS))}; classes: "
                                  f"{', '.join(OP_CLASSES)})")
    priority = 0
    if "priority" in m:
        try:
            priority = int(ctx.scalar(m["priority"][1], "priority"))
        except ValueError:
            raise ctx.fail(m["priority"][1], "priority must be a whole number") from None
    who: list[tuple[str, tuple[ValueMatcher, ...]]] = []
    if "who" in m:
        for key, (knode, vnode) in ctx.mapping(m["who"][1], "who", set(WHO_KEYS)).items():
            matchers = []
            for valnode, value in ctx.strings(vnode, f"who.{key}"):
                matchers.append(_value_matcher(ctx, valnode,
                                               _expand(ctx, valnode, value, variables)))
            who.append((key, tuple(matchers)))
            del knode
    return Rule(id=rule_id, priority=priority, order=order, line=node.start_mark.line + 1,
                paths=tuple(paths), path_regex=compile_globs(paths), ops=frozenset(ops),
                decision=_decision(ctx, m["decision"][1], f"rule {rule_id}"),
                message=ctx.scalar(m["message"][1], "message") if "message" in m else "",
                who=tuple(who),
                overridable=_flag(ctx, m["overridable"][1], f"rule {rule_id}: overridable")
                if "overridable" in m else False)


def _flag(ctx: _Ctx, node: yaml.Node, what: str) -> bool:
    value = ctx.scalar(node, what).lower()
    if value not in ("true", "false", "yes", "no"):
        raise ctx.fail(node, f"{what} must be true or false")
    return value in ("true", "yes")


def _value_matcher(ctx: _Ctx, node: yaml.Node, text: str) -> ValueMatcher:
    negate = text.startswith("!")
    body = text[1:] if negate else text
    try:
        if body.startswith("~"):
            regex = re.compile(body[1:])
        else:
            regex = re.compile(_plain_glob(body), re.DOTALL)
    except re.error as exc:
        raise ctx.fail(node, f"bad pattern {text!r}: {exc}") from None
    return ValueMatcher(text, negate, regex)


def _plain_glob(text: str) -> str:
    """fnmatch-style for caller values (exe paths included: '*' crosses '/')."""
    out = []
    for c in text:
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
    return "".join(out)

