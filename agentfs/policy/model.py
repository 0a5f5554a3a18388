"""The policy model: operations, decisions, rules, and what a caller looks like."""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from typing import Final

OPS: Final = frozenset({
    "open_read", "open_write", "read", "write", "truncate", "create", "mkdir", "mknod",
    "symlink", "link", "unlink", "rmdir", "rename", "rename_over", "chmod", "chown",
    "utimens", "setxattr", "removexattr", "getxattr", "listxattr", "readdir", "stat",
    "readlink"})
READ_OPS: Final = frozenset({"open_read", "read", "getxattr", "listxattr", "readdir", "stat",
                             "readlink"})
OP_CLASSES: Final = {
    "@read": READ_OPS,
    "@write": OPS - READ_OPS,
    "@destructive": frozenset({"unlink", "rmdir", "rename_over", "truncate"}),
    "@namespace": frozenset({"create", "mkdir", "rename", "rename_over", "link", "symlink",
                             "mknod"}),
    "*": OPS,
}
DECISIONS: Final = ("allow", "deny", "ask", "audit", "soft_delete")
ERRNOS: Final = {"EACCES": errno.EACCES, "EPERM": errno.EPERM, "EROFS": errno.EROFS,
                 "ENOENT": errno.ENOENT}
WHO_KEYS: Final = ("exe", "comm", "ancestor", "uid", "env", "session", "branch")


@dataclass(frozen=True, eq=False)
class Caller:
    """What rules can know about the process behind a request.

    Compared and hashed by identity: the resolver hands out one object per process
    state, which makes it a cheap decision-cache key."""

    pid: int = 0
    exe: str = ""
    comm: str = ""
    uid: int = -1
    ancestors: tuple[str, ...] = ()     # exe paths of the parents, nearest first
    env: tuple[tuple[str, str], ...] = ()
    session: str = ""
    branch: str = ""


NOBODY: Final = Caller()


@dataclass(frozen=True)
class ValueMatcher:
    """One `who` value: a glob, a regex (leading '~'), negated with a leading '!'."""

    text: str
    negate: bool
    regex: re.Pattern[str]

    def matches(self, value: str) -> bool:
        return bool(self.regex.fullmatch(value)) != self.negate


@dataclass(frozen=True)
class Rule:
    id: str
    priority: int
    order: int
    line: int
    paths: tuple[str, ...]
    path_regex: re.Pattern[str]
    ops: frozenset[str]
    decision: str
    message: str = ""
    who: tuple[tuple[str, tuple[ValueMatcher, ...]], ...] = ()
    overridable: bool = False    # a lower policy layer may relax what this rule decides
    origin: str = ""             # the policy layer it came from (organisation, project, ...)

    @property
    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.order)


@dataclass(frozen=True)
class Defaults:
    read: str = "allow"
    write: str = "allow"
    on_error: str = "deny"
    deny_errno: int = errno.EACCES
    overridable: bool = False    # a lower layer's rules may relax these defaults


@dataclass(frozen=True)
class Approval:
    timeout: float = 60.0
    on_timeout: str = "deny"
    remember: str = "session"
    max_pending: int = 5


@dataclass(frozen=True)
class Policy:
    name: str
    source: str
    sha256: str
    defaults: Defaults
    approval: Approval
    rules: tuple[Rule, ...]
    vars: dict[str, str] = field(default_factory=dict)
    sections: frozenset[str] = frozenset({"approval"})  # optional top sections the file set
    include_default: bool = False  # a layer: put the built-in default (relaxable) above it


@dataclass(frozen=True)
class Layer:
    """One policy file in a stack of them, and where in the stack it sits."""

    origin: str                  # organisation | project | user | session | builtin
    policy: Policy


@dataclass(frozen=True)
class Decision:
    decision: str
    rule: str | None             # None: the defaults decided
    errno: int
    message: str
    policy_sha256: str
    trace: tuple[str, ...] = ()  # rules tried, for `policy check`
    origin: str = ""             # the policy layer whose rule or defaults decided

    @property
    def allowed(self) -> bool:
        return self.decision in ("allow", "audit", "soft_delete")
