"""Deciding: first matching rule by priority (then file order), else the defaults.

Decisions are cached per (operation, path, caller) until the policy is replaced, so the
cost per FUSE request is a dict lookup once a path has been seen.
"""

from __future__ import annotations

import re

from agentfs.policy.globs import may_match_below, normalize
from agentfs.policy.index import RuleIndex
from agentfs.policy.loader import parse_policy
from agentfs.policy.model import NOBODY, OPS, READ_OPS, Caller, Decision, Policy, Rule

_CACHE_LIMIT = 100_000
STRENGTH = {"deny": 3, "ask": 2, "audit": 1, "soft_delete": 1, "allow": 0}


class PolicyEngine:
    """A loaded policy plus what the hot path wants precomputed about it.

    ``restricted``: the operations some rule or default does not simply allow; a check
    of any other operation is skipped without a lookup.  ``caller_keys``: which facts
    about the caller any rule looks at (none: callers need not be resolved at all).
    """

    def __init__(self, policy: Policy) -> None:
        self._cache: dict[tuple[str, str, Caller], Decision] = {}
        self.replace(policy)

    def replace(self, policy: Policy) -> None:
        """Swap in a new policy (a reload); cached decisions are dropped."""
        self.policy = policy
        self._cache.clear()
        self._per_op: dict[str, RuleIndex] = {}
        restricted = {op for op in OPS
                      if (policy.defaults.read if op in READ_OPS else policy.defaults.write)
                      != "allow"}
        for rule in policy.rules:
            if rule.decision != "allow":
                restricted |= rule.ops
        self.restricted: frozenset[str] = frozenset(restricted)
        self.caller_keys: frozenset[str] = frozenset(
            key for rule in policy.rules for key, _ in rule.who)
        self.defaults_restrict = (policy.defaults.read != "allow"
                                  or policy.defaults.write != "allow")
        patterns = [r.path_regex.pattern for r in policy.rules if r.decision != "allow"]
        self._restricting = re.compile("|".join(f"(?:{p})" for p in patterns) or "(?!)",
                                       re.DOTALL)

    def restricts(self, path: str) -> bool:
        """Could any operation on *path* get something other than allow?"""
        return self.defaults_restrict or bool(self._restricting.fullmatch(normalize(path)))

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
        decision = self._evaluate(op, normalize(path), caller)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    def _evaluate(self, op: str, norm: str, caller: Caller) -> Decision:
        """First matching rule among the candidates the index offers (in priority
        order); the defaults if none."""
        index = self._per_op.get(op)
        if index is None:
            index = self._per_op[op] = RuleIndex([r for r in self.policy.rules if op in r.ops])
        p = self.policy
        for i in index.candidates(norm):
            rule = index.rules[i]
            if rule.path_regex.fullmatch(norm) and (not rule.who
                                                    or not _who_mismatch(rule, caller)):
                message = rule.message.replace("{op}", op).replace("{path}", norm)
                return Decision(rule.decision, rule.id, p.defaults.deny_errno, message,
                                p.sha256)
        default = p.defaults.read if op in READ_OPS else p.defaults.write
        return Decision(default, None, p.defaults.deny_errno, "", p.sha256)

    def explain(self, op: str, path: str, caller: Caller = NOBODY) -> Decision:
        """The decision with the trace of every rule tried (uncached)."""
        norm = normalize(path)
        trace: list[str] = []
        p = self.policy
        for rule in p.rules:
            if op not in rule.ops:
                trace.append(f"{rule.id}: operation {op} not covered")
                continue
            if not rule.path_regex.fullmatch(norm):
                trace.append(f"{rule.id}: path does not match {list(rule.paths)}")
                continue
            failed = _who_mismatch(rule, caller)
            if failed:
                trace.append(f"{rule.id}: caller {failed}")
                continue
            trace.append(f"{rule.id}: matches -> {rule.decision}")
            message = rule.message.replace("{op}", op).replace("{path}", norm)
            return Decision(rule.decision, rule.id, p.defaults.deny_errno, message,
                            p.sha256, tuple(trace))
        default = p.defaults.read if op in READ_OPS else p.defaults.write
        trace.append(f"no rule matched -> defaults.{'read' if op in READ_OPS else 'write'}"
                     f" = {default}")
        return Decision(default, None, p.defaults.deny_errno, "", p.sha256, tuple(trace))


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
