"""`policy show --effective`: the merged policy of a stack, every rule with its origin.

The same data goes to `--json` and to the control socket (a mount's `policy show`), so
what is printed is what the engine holds, not a re-reading of files that may have
changed since.
"""

from __future__ import annotations

from typing import Any

from agentfs.policy.engine import PolicyEngine
from agentfs.policy.model import ERRNOS, OP_CLASSES, Rule

_ERRNO_NAMES = {number: name for name, number in ERRNOS.items()}


def effective(engine: PolicyEngine) -> dict[str, Any]:
    """The stack as data: layers top first, rules in the order each layer tries them,
    combined defaults and approval settings."""
    p = engine.policy
    return {
        "sha256": p.sha256,
        "layers": [{"origin": layer.origin, "path": layer.policy.source,
                    "name": layer.policy.name, "sha256": layer.policy.sha256,
                    "defaults": {"read": layer.policy.defaults.read,
                                 "write": layer.policy.defaults.write,
                                 "on_error": layer.policy.defaults.on_error,
                                 "deny_errno": _ERRNO_NAMES[layer.policy.defaults.deny_errno],
                                 "overridable": layer.policy.defaults.overridable},
                    "rules": [_rule(rule, layer.policy.source) for rule in layer.policy.rules]}
                   for layer in engine.layers],
        "combined": {"defaults": {"read": p.defaults.read, "write": p.defaults.write,
                                  "on_error": p.defaults.on_error},
                     "approval": {"timeout": p.approval.timeout,
                                  "on_timeout": p.approval.on_timeout,
                                  "remember": p.approval.remember,
                                  "max_pending": p.approval.max_pending}},
    }


def _rule(rule: Rule, source: str) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rule.id, "origin": rule.origin, "at": f"{source}:{rule.line}",
                           "priority": rule.priority, "paths": list(rule.paths),
                           "ops": ops_text(rule.ops), "decision": rule.decision,
                           "overridable": rule.overridable}
    if rule.who:
        out["who"] = {key: [m.text for m in matchers] for key, matchers in rule.who}
    if rule.message:
        out["message"] = rule.message
    return out


def ops_text(ops: frozenset[str]) -> list[str]:
    """Operations as written: the largest classes that fit, then single operations."""
    out: list[str] = []
    left = set(ops)
    for name in ("*", "@read", "@write", "@destructive", "@namespace"):
        members = OP_CLASSES[name]
        if members <= left:
            out.append(name)
            left -= members
    return out + sorted(left)


def render(data: dict[str, Any]) -> list[str]:
    """The human form of `effective()`."""
    lines = [f"effective policy {data['sha256'][:12]}: {len(data['layers'])} layer(s), "
             "top first; a lower layer may tighten any answer and relax only what is "
             "marked overridable"]
    for n, layer in enumerate(data["layers"], 1):
        d = layer["defaults"]
        lines.append(f"{n}. {layer['origin']}: {layer['name']} from {layer['path']} "
                     f"(sha256 {layer['sha256'][:12]})")
        lines.append(f"   defaults: read {d['read']}, write {d['write']}, on_error "
                     f"{d['on_error']}, deny_errno {d['deny_errno']}"
                     + (" (overridable)" if d["overridable"] else ""))
        for rule in layer["rules"]:
            who = "".join(f" {key}={','.join(vals)}" for key, vals in rule.get("who", {}).items())
            lines.append(f"   [{rule['priority']:>4}] {rule['id']}: {rule['decision']} "
                         f"{' '.join(rule['ops'])} on {', '.join(rule['paths'])}{who}"
                         + (" (overridable)" if rule["overridable"] else "")
                         + f"  <- {rule['at']}")
        if not layer["rules"]:
            lines.append("   (no rules)")
    c = data["combined"]
    lines.append(f"when no rule matches: read {c['defaults']['read']}, write "
                 f"{c['defaults']['write']}, on_error {c['defaults']['on_error']}")
    a = c["approval"]
    lines.append(f"approval: timeout {a['timeout']:g}s, on_timeout {a['on_timeout']}, "
                 f"remember {a['remember']}, max_pending {a['max_pending']}")
    return lines
