"""Policy enforcement for one branch view, independent of the FUSE binding.

Front ends describe each request as the operations it performs on which paths; the
guard answers with a `Verdict` (go ahead, fail with an errno, or wait for a ticket).
What it adds over a plain rule lookup is closing the side doors:

* an object is checked under *every* name it has (hard links made before or after
  the policy was loaded): `LinkNames`;
* an object may not be moved or linked to a name where it would be less protected
  (renaming `secrets/` to `public/`, or linking `id_rsa` to `notes.txt`): for
  directories every path below is compared, old place against new;
* symlinks and `..` never reach us: the kernel resolves them and asks for the real
  object, so the real path is what gets checked.

`read`/`write` are decided at open (a handle's rights are fixed there; a reload
affects the next open), so reads and writes themselves cost nothing.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from agentfs.errors import FsError
from agentfs.overlay.engine import Overlay
from agentfs.overlay.hostio import join
from agentfs.overlay.linknames import LinkNames
from agentfs.policy.approvals import ApprovalBroker, Ticket
from agentfs.policy.callers import CallerResolver
from agentfs.policy.engine import STRENGTH, PolicyEngine
from agentfs.policy.model import Caller, Decision
from agentfs.proc import start_time, thread_group

if TYPE_CHECKING:
    from agentfs.mount.sessions import Session, SessionTable
    from agentfs.policy.source import PolicySource

log = logging.getLogger(__name__)

MOVE_WALK_LIMIT: Final = 50_000
Check = tuple[str, str]  # (operation, path)


@dataclass(frozen=True)
class Verdict:
    errno: int = 0
    ticket: Ticket | None = None
    decision: Decision | None = None   # the strongest decision taken, for the audit
    op: str = ""
    path: str = ""


ALLOWED: Final = Verdict()


def open_ops(flags: int) -> list[str]:
    acc = flags & os.O_ACCMODE
    ops = []
    if acc in (os.O_RDONLY, os.O_RDWR):
        ops += ["open_read", "read"]
    if acc in (os.O_WRONLY, os.O_RDWR):
        ops += ["open_write", "write"]
    if flags & os.O_TRUNC:
        ops.append("truncate")
    return ops


class Guard:
    """Checks the requests of one view (one branch) against the policy in force."""

    def __init__(self, overlay: Overlay, source: PolicySource, broker: ApprovalBroker,
                 callers: CallerResolver, branch: str,
                 sessions: SessionTable | None = None) -> None:
        self.ov = overlay
        self.source = source
        self.broker = broker
        self.callers = callers
        self.branch = branch
        self.sessions = sessions
        self.links = LinkNames(overlay)

    # -- which policy, which caller ----------------------------------------------------
    def _session(self, pid: int) -> Session | None:
        return self.sessions.session_of(pid) if self.sessions is not None else None

    def engine_for(self, pid: int) -> PolicyEngine:
        return self._engine(self._session(pid))

    def _engine(self, session: Session | None) -> PolicyEngine:
        """The session's own policy (`exec --policy`), else the mount's."""
        if session is not None and session.policy is not None:
            return session.policy.engine
        return self.source.engine

    def caller_facts(self, pid: int) -> tuple[str, str]:
        """(session id, sha256 of the policy in force) for the audit."""
        session = self._session(pid)
        return (str(session.pid) if session is not None else "",
                self._engine(session).policy.sha256)

    def restricted(self, pid: int) -> frozenset[str]:
        return self.engine_for(pid).restricted

    def _caller(self, engine: PolicyEngine, pid: int, uid: int) -> tuple[Caller, str]:
        session = self._session(pid)
        sid = str(session.pid) if session is not None else ""
        return self.callers.resolve(pid, uid, self.branch, sid, engine.caller_keys), sid

    # -- the checks ----------------------------------------------------------------------
    def check(self, pid: int, uid: int, checks: Iterable[Check]) -> Verdict:
        """Decide plain (operation, path) checks: the strongest decision wins."""
        engine = self.engine_for(pid)
        todo = [c for c in checks if c[0] in engine.restricted]
        if not _may_restrict_any(engine, todo):
            return ALLOWED  # no rule could say anything but allow: no caller to resolve
        caller, sid = self._caller(engine, pid, uid)
        return self._decide(engine, caller, sid, pid, todo)

    def check_object(self, pid: int, uid: int, ops: Iterable[str], path: str) -> Verdict:
        """Operations on the object at *path*, checked under each of its names."""
        engine = self.engine_for(pid)
        wanted = [op for op in ops if op in engine.restricted]
        if not wanted:
            return ALLOWED
        todo = [(op, name) for name in self._names(path) for op in wanted]
        if not _may_restrict_any(engine, todo):
            return ALLOWED  # as in `check`: every open of an unprotected file
        caller, sid = self._caller(engine, pid, uid)
        return self._decide(engine, caller, sid, pid, todo)

    def check_rename(self, pid: int, uid: int, src: str, dst: str, exchange: bool
                     ) -> Verdict:
        engine = self.engine_for(pid)
        if not engine.restricted:
            return ALLOWED
        caller, sid = self._caller(engine, pid, uid)
        moved = self._laundering(engine, caller, src, dst)
        if moved is None and exchange:
            moved = self._laundering(engine, caller, dst, src)
        if moved is not None:
            return moved
        dst_exists = exchange or self.ov.exists(dst)
        todo: list[Check] = [("rename", src), ("rename", dst)]
        todo.append(("rename_over", dst) if dst_exists else ("create", dst))
        if exchange:
            todo.append(("rename_over", src))
        return self._decide(engine, caller, sid, pid,
                            [c for c in todo if c[0] in engine.restricted])

    def check_link(self, pid: int, uid: int, src: str, dst: str) -> Verdict:
        engine = self.engine_for(pid)
        if not engine.restricted:
            return ALLOWED
        caller, sid = self._caller(engine, pid, uid)
        moved = self._laundering(engine, caller, src, dst)
        if moved is not None:
            return moved
        todo = [(op, name) for name in self._names(src) for op in ("link", "open_read")]
        todo += [("link", dst), ("create", dst)]
        return self._decide(engine, caller, sid, pid,
                            [c for c in todo if c[0] in engine.restricted])

    # -- keeping the hard-link index current ------------------------------------------------
    def linked(self, ino: int, dst: str) -> None:
        self.links.linked(ino, dst)

    def renamed(self, src: str, dst: str, exchange: bool) -> None:
        if exchange:
            self.links.renamed(src, "\0swap")
            self.links.renamed(dst, src)
            self.links.renamed("\0swap", dst)
        else:
            self.links.renamed(src, dst)

    # -- internals ---------------------------------------------------------------------------
    def _names(self, path: str) -> set[str]:
        try:
            attr = self.ov.getattr(path)
        except FsError:
            return {path}
        if attr.nlink > 1 and not stat.S_ISDIR(attr.mode):
            return self.links.names(path, attr.ino)
        return {path}

    def _decide(self, engine: PolicyEngine, caller: Caller, sid: str, pid: int,
                todo: list[Check]) -> Verdict:
        worst: Decision | None = None
        worst_check: Check = ("", "")
        for op, path in todo:
            d = engine.decide(op, path, caller)
            if worst is None or STRENGTH[d.decision] > STRENGTH[worst.decision]:
                worst, worst_check = d, (op, path)
                if d.decision == "deny":
                    break
        if worst is None:
            return ALLOWED
        op, path = worst_check
        if worst.decision == "deny":
            log.info("denied %s %s (rule %s, pid %s, branch %s)", op, path,
                     worst.rule or "defaults", pid, self.branch)
            return Verdict(errno=worst.errno, decision=worst, op=op, path=path)
        if worst.decision == "ask":
            return self._ask(engine, worst, op, path, pid, sid)
        return Verdict(decision=worst, op=op, path=path)

    def _ask(self, engine: PolicyEngine, d: Decision, op: str, path: str, pid: int,
             sid: str) -> Verdict:
        tgid = thread_group(pid)
        process = (tgid, start_time(tgid) or 0)
        rule = d.rule or "defaults"
        known = self.broker.remembered(rule, op, path, process, sid)
        if known == "allow":
            return Verdict(decision=d, op=op, path=path)
        if known == "deny":
            return Verdict(errno=d.errno, decision=d, op=op, path=path)
        exe, command = self.callers.describe(tgid)
        approval = engine.policy.approval
        ticket = self.broker.ask(rule, op, path, pid, exe, command, process, sid,
                                 approval.timeout, approval.on_timeout,
                                 approval.max_pending, branch=self.branch,
                                 policy_sha256=engine.policy.sha256, deny_errno=d.errno)
        if ticket.answer == "deny":  # refused at once: no front end needs to wait
            return Verdict(errno=d.errno, ticket=ticket, decision=d, op=op, path=path)
        return Verdict(ticket=ticket, decision=d, op=op, path=path)

    def _laundering(self, engine: PolicyEngine, caller: Caller, src: str, dst: str
                    ) -> Verdict | None:
        """A denial if moving *src* to *dst* would leave something less protected."""
        try:
            is_dir = self.ov.getattr(src).mode & 0o170000 == stat.S_IFDIR
        except FsError:
            return None  # the operation itself will fail
        pairs: Iterable[tuple[str, str]] = [(src, dst)]
        if is_dir and engine.may_restrict_below(src):
            below = self._below(src)
            if below is None:
                log.info("denied moving %s: too large to check against the policy", src)
                return Verdict(errno=engine.policy.defaults.deny_errno, op="rename",
                               path=src)
            pairs = [(src, dst), *((join(src, rel), join(dst, rel)) for rel in below)]
        for old, new in pairs:
            if not engine.restricts(old):
                continue
            for op in engine.restricted:
                before = engine.decide(op, old, caller)
                if before.decision not in ("deny", "ask"):
                    continue
                after = engine.decide(op, new, caller)
                if STRENGTH[after.decision] < STRENGTH[before.decision]:
                    log.info("denied moving %s to %s: %s %s would lose rule %s", src, dst,
                             op, old, before.rule or "defaults")
                    return Verdict(errno=before.errno, decision=before, op=op, path=old)
        return None

    def _below(self, directory: str) -> list[str] | None:
        """Paths below *directory* (relative to it), or None past the walk limit."""
        out: list[str] = []
        todo = [""]
        while todo:
            rel = todo.pop()
            try:
                entries = self.ov.readdir(join(directory, rel))
            except FsError:
                continue
            for name, attr in entries:
                child = join(rel, name)
                out.append(child)
                if len(out) > MOVE_WALK_LIMIT:
                    return None
                if stat.S_ISDIR(attr.mode):
                    todo.append(child)
        return out


def _may_restrict_any(engine: PolicyEngine, todo: list[Check]) -> bool:
    """Could any of these checks be anything but allowed (for any caller)?"""
    may = engine.may_restrict
    return any(may(op, path) for op, path in todo)
