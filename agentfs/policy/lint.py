"""`policy lint`: rules that can never decide because an earlier rule always does.

Rule B is shadowed by an earlier rule A (higher priority, or same priority and earlier
in the file) when A has no caller predicates, covers every operation of B, and one of
A's globs matches each of B's globs read as a literal path (so `**` covers everything
and `**/*.pem` covers `keys/*.pem`).  This is conservative: it reports only sure cases.
"""

from __future__ import annotations

from agentfs.policy.globs import compile_glob
from agentfs.policy.model import Policy, Rule


def _covers(a: Rule, b: Rule) -> bool:
    if a.who or not b.ops <= a.ops:
        return False
    return all(any(compile_glob(pa).fullmatch(pb.lstrip("/")) for pa in a.paths)
               for pb in b.paths)


def shadowed(policy: Policy) -> list[tuple[Rule, Rule]]:
    """(shadowed rule, the earlier rule that shadows it), in file order."""
    out = []
    rules = list(policy.rules)  # already in decision order
    for i, b in enumerate(rules):
        for a in rules[:i]:
            if _covers(a, b):
                out.append((b, a))
                break
    return sorted(out, key=lambda pair: pair[0].order)
