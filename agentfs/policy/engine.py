"""Deciding: in each policy layer the first matching rule by priority (then file order),
else that layer's defaults; then the layers' answers combined, top layer first.

Combining (deterministic, documented in README "Policy layers"): going down the stack,
a lower layer's answer replaces the one so far when it is stricter (deny > ask > audit,
soft_delete > allow), so any layer can add restrictions. It replaces it with a looser
answer only when the answer so far came from a rule or defaults marked `overridable`
and the lower answer comes from a rule of its own (a lower layer's defaults never relax
anything), and never below the strictest answer some layer above gave without
`overridable` (then that answer stands). Equal strength keeps the upper answer.

Decisions are cached per (operation, path, caller) until the policy is replaced, so the
cost per FUSE request is a dict lookup once a path has been seen.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from agentfs.policy.globs import may_match_below, normalize
from agentfs.policy.index import RuleIndex
from agentfs.policy.loader import parse_policy
from agentfs.policy.model import (
    NOBODY,
    OPS,
    READ_OPS,
    Approval,
    Caller,
    Decision,
    Defaults,
    Layer,
    Policy,
    Rule,
)

_CACHE_LIMIT = 100_000
STRENGTH = {"deny": 3, "ask": 2, "audit": 1, "soft_delete": 1, "allow": 0}
_REMEMBER_WIDTH = {"once": 0, "process": 1, "session": 2}


class _Answer:
    """One layer's answer to one question, and whether a lower layer may relax it."""

    __slots__ = ("decision", "layer", "relaxable", "rule")

    def __init__(self, decision: str, rule: Rule | None, relaxable: bool, layer: Layer
                 ) -> None:
        self.decision, self.rule, self.relaxable, self.layer = (decision, rule, relaxable,
                                                                layer)


class PolicyEngine:
    """A loaded policy (one file, or a stack of layers) plus what the hot path wants
    precomputed about it.

    ``restricted``: the operations some rule or default does not simply allow; a check
    of any other operation is skipped without a lookup.  ``caller_keys``: which facts
    about the caller any rule looks at (none: callers need not be resolved at all).
    ``policy``: the stack summed up as one Policy (its sha256 names the whole stack).
    """

    def __init__(self, policy: Policy | Sequence[Layer]) -> None:
        self._cache: dict[tuple[str, str, Caller], Decision] = {}
        self.replace(policy)

    def replace(self, policy: Policy | Sequence[Layer]) -> None:
        """Swap in a new policy (a reload); cached decisions are dropped."""
        layers = (Layer("", policy),) if isinstance(policy, Policy) else tuple(policy)
        if not layers:
            raise ValueError("a policy stack needs at least one layer")
        self.layers = layers
        self.policy = summarize(layers)
        self._cache.clear()
        self._may: dict[tuple[str, str], bool] = {}
        self._quiet: dict[tuple[str, str], bool] = {}  # see _quiet_below
        self._per_op: list[dict[str, RuleIndex]] = [{} for _ in layers]
        self._op_indexes: dict[str, list[RuleIndex]] = {}  # see _indexes
        # the operations some layer's defaults do not simply allow
        self._by_default = frozenset(
            op for layer in layers for op in OPS
            if (layer.policy.defaults.read if op in READ_OPS
                else layer.policy.defaults.write) != "allow")
        restricted = set(self._by_default)
        for rule in self.policy.rules:
            if rule.decision != "allow":
                restricted |= rule.ops
        self.restricted: frozenset[str] = frozenset(restricted)
        self.caller_keys: frozenset[str] = frozenset(
            key for rule in self.policy.rules for key, _ in rule.who)
        self.defaults_restrict = any(layer.policy.defaults.read != "allow"
                                     or layer.policy.defaults.write != "allow"
                                     for layer in layers)
        patterns = [r.path_regex.pattern for r in self.policy.rules if r.decision != "allow"]
        self._restricting = re.compile("|".join(f"(?:{p})" for p in patterns) or "(?!)",
                                       re.DOTALL)

    def restricts(self, path: str) -> bool:
        """Could any operation on *path* get something other than allow?"""
        return self.defaults_restrict or bool(self._restricting.fullmatch(normalize(path)))

    def may_restrict(self, op: str, path: str) -> bool:
        """Could *op* on *path* get something other than allow, for any caller?  The
        hot path's pre-check: False means allowed without resolving the caller.  Asks
        each layer's rule index (a few candidate rules, not one regex of all of them)."""
        if op not in self.restricted:
            return False
        parent, _, name = path.rpartition("/")
        if name not in ("", ".", "..") and self._quiet_below(op, parent) and not any(
                ix.restricts_segment(name) for ix in self._indexes(op)):
            # a lookup's usual case: only its own name had to be looked at, which costs
            # what a cache would; not remembered (listings ask for every entry: a cached
            # answer per path grew the daemon by 6 MB over a walk of 100,000 files)
            return False
        key = (op, path)
        hit = self._may.get(key)
        if hit is not None:
            return hit
        found = self._may_restrict(op, path)
        if len(self._may) >= _CACHE_LIMIT:
            self._may.clear()
        self._may[key] = found
        return found

    def _quiet_below(self, op: str, directory: str) -> bool:
        """Is *op* allowed by every layer's defaults and can no non-allow rule be a
        candidate for a path in *directory* unless that path's own name makes it one?
        Cached per directory, so a path costs one look at its last segment."""
        key = (op, directory)
        hit = self._quiet.get(key)
        if hit is not None:
            return hit
        segs = normalize(directory).split("/")
        quiet = op not in self._by_default and not any(
            ix.strict_always or any(ix.restricts_segment(seg) for seg in segs)
            for ix in self._indexes(op))
        if len(self._quiet) >= _CACHE_LIMIT:
            self._quiet.clear()
        self._quiet[key] = quiet
        return quiet

    def _may_restrict(self, op: str, path: str) -> bool:
        if op in self._by_default:
            return True
        norm = normalize(path)
        return any(ix.rules[j].decision != "allow" and ix.rules[j].path_regex.fullmatch(norm)
                   for ix in self._indexes(op) for j in ix.candidates(norm))

    def _indexes(self, op: str) -> list[RuleIndex]:
        """Every layer's rule index for *op*, top layer first."""
        found = self._op_indexes.get(op)
        if found is None:
            found = self._op_indexes[op] = [self._index(i, op)
                                            for i in range(len(self.layers))]
        return found

    def _index(self, i: int, op: str) -> RuleIndex:
        index = self._per_op[i].get(op)
        if index is None:
            index = self._per_op[i][op] = RuleIndex([r for r in self.layers[i].policy.rules
                                                     if op in r.ops])
        return index

    def may_restrict_below(self, directory: str) -> bool:
        """Could a non-allow rule (or default) apply to something below *directory*?"""
        if self.defaults_restrict:
            return True
        prefix = normalize(directory)
        return any(may_match_below(glob, prefix) for rule in self.policy.rules
                   if rule.decision != "allow" for glob in rule.paths)

    def decide(self, op: str, path: str, caller: Caller = NOBODY) -> Decision:
        """The decision, cached per (op, path, caller object): callers are interned by
        whoever resolves them, so the key hashes by identity."""
        key = (op, path, caller)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        decision = self._evaluate(op, normalize(path), caller, None)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    def explain(self, op: str, path: str, caller: Caller = NOBODY) -> Decision:
        """The decision with the trace of every rule tried (uncached)."""
        return self._evaluate(op, normalize(path), caller, [])

    def _evaluate(self, op: str, norm: str, caller: Caller, trace: list[str] | None
                  ) -> Decision:
        best: _Answer | None = None
        floor: _Answer | None = None   # the strictest answer a layer gave as final
        for i, layer in enumerate(self.layers):
            answer = self._answer(i, op, norm, caller, trace)
            if best is None:
                best = answer
            else:
                before = best
                stricter = STRENGTH[answer.decision] > STRENGTH[best.decision]
                looser = STRENGTH[answer.decision] < STRENGTH[best.decision]
                if stricter:
                    best = answer
                elif looser and best.relaxable and answer.rule is not None:
                    # relaxing never goes below what a layer above said as final
                    best = (floor if floor is not None
                            and STRENGTH[floor.decision] > STRENGTH[answer.decision]
                            else answer)
                if trace is not None:
                    trace.append(_combine_note(layer.origin, before, answer, best))
            if not answer.relaxable and (floor is None or STRENGTH[answer.decision]
                                         > STRENGTH[floor.decision]):
                floor = answer
        assert best is not None
        p = best.layer.policy
        rule = best.rule
        message = (rule.message.replace("{op}", op).replace("{path}", norm)
                   if rule is not None else "")
        return Decision(best.decision, rule.id if rule is not None else None,
                        p.defaults.deny_errno, message, self.policy.sha256,
                        tuple(trace) if trace is not None else (), best.layer.origin)

    def _answer(self, i: int, op: str, norm: str, caller: Caller, trace: list[str] | None
                ) -> _Answer:
        """Layer *i*'s answer: its first matching rule, else its defaults."""
        layer = self.layers[i]
        p = layer.policy
        prefix = f"[{layer.origin}] " if len(self.layers) > 1 else ""
        if trace is None:
            index = self._index(i, op)
            for j in index.candidates(norm):
                rule = index.rules[j]
                if rule.path_regex.fullmatch(norm) and (not rule.who
                                                        or not _who_mismatch(rule, caller)):
                    return _Answer(rule.decision, rule, rule.overridable, layer)
        else:
            for rule in p.rules:
                if op not in rule.ops:
                    trace.append(f"{prefix}{rule.id}: operation {op} not covered")
                    continue
                if not rule.path_regex.fullmatch(norm):
                    trace.append(f"{prefix}{rule.id}: path does not match {list(rule.paths)}")
                    continue
                failed = _who_mismatch(rule, caller)
                if failed:
                    trace.append(f"{prefix}{rule.id}: caller {failed}")
                    continue
                trace.append(f"{prefix}{rule.id}: matches -> {rule.decision}")
                return _Answer(rule.decision, rule, rule.overridable, layer)
        kind = "read" if op in READ_OPS else "write"
        default = p.defaults.read if op in READ_OPS else p.defaults.write
        if trace is not None:
            trace.append(f"{prefix}no rule matched -> defaults.{kind} = {default}")
        return _Answer(default, None, p.defaults.overridable, layer)


def _combine_note(origin: str, before: _Answer, answer: _Answer, best: _Answer) -> str:
    """One trace line: what layer *origin*'s answer did to the answer so far."""
    if best is answer:
        verb = ("tightens" if STRENGTH[answer.decision] > STRENGTH[before.decision]
                else "relaxes")
        return f"[{origin}] {verb} {before.decision} to {answer.decision}"
    if best is not before:  # a relaxation held at an upper layer's final answer
        return (f"[{origin}] relaxes {before.decision}, but {answer.decision} is below "
                f"[{best.layer.origin}]'s {best.decision} (not overridable): "
                f"{best.decision}")
    if STRENGTH[answer.decision] < STRENGTH[before.decision]:
        why = (f"[{before.layer.origin}] did not mark it overridable" if not before.relaxable
               else "only a rule can relax, not defaults")
        return f"[{origin}] {answer.decision} cannot relax {before.decision}: {why}"
    return f"[{origin}] {answer.decision} keeps {before.decision} (not stricter)"


def summarize(layers: Sequence[Layer]) -> Policy:
    """The stack as one Policy: every rule (top layer first), the strictest defaults
    and approval settings, and one sha256 for the whole stack (what the audit records)."""
    if len(layers) == 1:
        return layers[0].policy
    policies = [layer.policy for layer in layers]
    sha = hashlib.sha256("".join(f"{layer.origin}:{layer.policy.sha256}\n"
                                 for layer in layers).encode()).hexdigest()

    def strictest(values: Sequence[str]) -> str:
        return max(values, key=lambda v: STRENGTH[v])

    defaults = Defaults(read=strictest([p.defaults.read for p in policies]),
                        write=strictest([p.defaults.write for p in policies]),
                        on_error=strictest([p.defaults.on_error for p in policies]),
                        deny_errno=policies[0].defaults.deny_errno)
    set_approval = [p.approval for p in policies if "approval" in p.sections]
    approval = Approval()
    if set_approval:
        approval = Approval(timeout=min(a.timeout for a in set_approval),
                            on_timeout=strictest([a.on_timeout for a in set_approval]),
                            remember=min((a.remember for a in set_approval),
                                         key=lambda r: _REMEMBER_WIDTH[r]),
                            max_pending=min(a.max_pending for a in set_approval))
    return Policy(name=" + ".join(p.name for p in policies),
                  source=", ".join(f"{layer.origin}: {layer.policy.source}"
                                   for layer in layers),
                  sha256=sha, defaults=defaults, approval=approval,
                  rules=tuple(r for p in policies for r in p.rules),
                  sections=frozenset().union(*(p.sections for p in policies)))


def _who_mismatch(rule: Rule, caller: Caller) -> str:
    """'' when every caller predicate of *rule* holds, else which one failed.

    Per key: at least one of the positive values matches (they are alternatives) and
    none of the negated ones does (`exe: ["/usr/bin/*", "!/usr/bin/sudo"]`)."""
    for key, matchers in rule.who:
        values = _caller_values(key, caller)
        positive = [m for m in matchers if not m.negate]
        if positive and not any(m.matches(v) for m in positive for v in values):
            return f"{key} matches none of {[m.text for m in positive]}"
        for m in matchers:
            if m.negate and not all(m.matches(v) for v in values):
                return f"{key} matches {m.text[1:]!r}"
    return ""


def _caller_values(key: str, caller: Caller) -> list[str]:
    if key == "exe":
        return [caller.exe]
    if key == "comm":
        return [caller.comm]
    if key == "uid":
        return [str(caller.uid)]
    if key == "ancestor":
        return list(caller.ancestors)
    if key == "env":
        return [f"{k}={v}" for k, v in caller.env]
    if key == "session":
        return [caller.session]
    return [caller.branch]


DEFAULT_POLICY = """\
# agentfs default policy: secrets stay out of reach, everything else in the view is
# allowed (the base is never written anyway; the branch takes every change).
# Private keys and .env files may be created and written (a build may generate
# them) but not read, linked or moved; public CA bundles are not secrets.
version: 1
name: agentfs-default
defaults:
  read: allow
  write: allow
  on_error: deny
  deny_errno: EACCES
rules:
  - id: deny-ssh-gnupg
    priority: 100
    paths: ["**/.ssh", "**/.ssh/**", "**/.gnupg", "**/.gnupg/**"]
    ops: ["*"]
    decision: deny
    message: "secrets are off limits ({op} {path})"
  - id: deny-cloud-credentials
    priority: 100
    paths: ["**/.aws/credentials", "**/.config/gcloud/**", "**/.azure/**",
            "**/.netrc", "**/.docker/config.json", "**/.kube/config"]
    ops: ["*"]
    decision: deny
    message: "credentials are off limits ({op} {path})"
  - id: public-ca-bundles
    priority: 95
    paths: ["**/cacert.pem", "**/ca-bundle.pem", "**/ca-bundle.crt",
            "**/ca-certificates.crt", "**/certifi/*.pem", "**/.env.example",
            "**/.env.sample", "**/.env.template"]
    ops: ["*"]
    decision: allow
  - id: deny-private-keys
    priority: 90
    paths: ["**/*.pem", "**/*.key", "**/id_rsa*", "**/id_ed25519*", "**/id_ecdsa*"]
    ops: ["open_read", "read", "getxattr", "listxattr", "link", "rename", "rename_over"]
    decision: deny
    message: "private keys are off limits ({op} {path})"
  - id: deny-dotenv
    priority: 80
    paths: ["**/.env", "**/.env.*"]
    ops: ["open_read", "read", "getxattr", "listxattr", "link", "rename", "rename_over"]
    decision: deny
    message: "environment files hold secrets ({op} {path})"
"""


def default_policy() -> Policy:
    return parse_policy(DEFAULT_POLICY, "<default policy>", env={})
