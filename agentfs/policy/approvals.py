"""Pending `ask` decisions: one ticket per question, answered by a person.

A ticket is the question "may <process> do <op> on <path>?" that a rule with
``decision: ask`` raised.  The request that raised it waits (only that request: the
front end awaits the ticket); the same question from the same session while one is
pending joins the pending ticket instead of asking twice.  Answers can be remembered
for the asking process or its whole session, so a person is not asked again for
every chunk of the same work.  A session may have at most ``max_pending`` open
questions; beyond that the answer is the policy's on-timeout decision right away.

The broker knows nothing of trio or threads: waiting is the front end's business,
it registers a waker that `resolve` calls.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

log = logging.getLogger(__name__)

SCOPES: Final = ("once", "process", "session")
MAX_PENDING_TOTAL: Final = 32  # FUSE worker tasks must stay free for everyone else


@dataclass
class Ticket:
    id: str
    rule: str
    op: str
    path: str
    pid: int
    exe: str
    command: str
    session: str          # "" outside sessions: the mount is the session
    process: tuple[int, int]
    created: float
    deadline: float
    on_timeout: str
    answer: str | None = None     # "allow" | "deny"
    reason: str = ""
    waiters: int = 0
    _wakers: list[Callable[[], None]] = field(default_factory=list)

    def add_waker(self, wake: Callable[[], None]) -> None:
        if self.answer is not None:
            wake()
        else:
            self._wakers.append(wake)

    def resolve(self, answer: str, reason: str) -> None:
        if self.answer is not None:
            return
        self.answer, self.reason = answer, reason
        wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "rule": self.rule, "op": self.op, "path": self.path,
                "pid": self.pid, "exe": self.exe, "command": self.command,
                "session": self.session, "waiters": self.waiters,
                "age": round(time.time() - self.created, 1),
                "expires_in": round(max(0.0, self.deadline - time.monotonic()), 1)}


class ApprovalBroker:
    """All open questions of one mount, and the answers people chose to remember."""

    def __init__(self, id_prefix: str) -> None:
        self.prefix = id_prefix
        self._seq = itertools.count(1)
        self.pending: dict[str, Ticket] = {}
        self._by_question: dict[tuple[str, str, str, str], Ticket] = {}
        self._remembered: dict[tuple[Any, ...], str] = {}

    # -- asking ------------------------------------------------------------------
    def remembered(self, rule: str, op: str, path: str, process: tuple[int, int],
                   session: str) -> str | None:
        return (self._remembered.get(("process", process, rule, op, path))
                or self._remembered.get(("session", session, rule, op, path)))

    def ask(self, rule: str, op: str, path: str, pid: int, exe: str, command: str,
            process: tuple[int, int], session: str, timeout: float, on_timeout: str,
            max_pending: int) -> Ticket:
        """The ticket to wait on: a pending one for the same question, or a new one
        (already answered with *on_timeout* when the session has too many open)."""
        question = (session, rule, op, path)
        existing = self._by_question.get(question)
        if existing is not None and existing.answer is None:
            existing.waiters += 1
            return existing
        now = time.monotonic()
        ticket = Ticket(id=f"{self.prefix}-{next(self._seq)}", rule=rule, op=op, path=path,
                        pid=pid, exe=exe, command=command, session=session, process=process,
                        created=time.time(), deadline=now + timeout, on_timeout=on_timeout,
                        waiters=1)
        open_here = sum(1 for t in self.pending.values() if t.session == session)
        if open_here >= max_pending or len(self.pending) >= MAX_PENDING_TOTAL:
            log.warning("ask %s %s from pid %s: too many open questions, answering %s",
                        op, path, pid, on_timeout)
            ticket.resolve(on_timeout, "too many pending questions")
            return ticket
        self.pending[ticket.id] = ticket
        self._by_question[question] = ticket
        log.info("ask %s: %s %s (rule %s, pid %s %s)", ticket.id, op, path, rule, pid, exe)
        return ticket

    def leave(self, ticket: Ticket, why: str) -> None:
        """One waiter stopped waiting (timeout or interrupt); the last one closes it."""
        ticket.waiters -= 1
        if ticket.waiters <= 0 and ticket.answer is None:
            self._close(ticket)
            ticket.resolve(ticket.on_timeout if why == "timeout" else "deny", why)
            log.info("ask %s ended: %s", ticket.id, why)

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for ticket in [t for t in self.pending.values() if t.deadline <= now]:
            self._close(ticket)
            ticket.resolve(ticket.on_timeout, "timeout")
            log.info("ask %s timed out: %s", ticket.id, ticket.on_timeout)

    # -- answering -----------------------------------------------------------------
    def answer(self, ticket_id: str, allow: bool, remember: str = "once") -> Ticket:
        if remember not in SCOPES:
            raise ValueError(f"remember must be one of {', '.join(SCOPES)}")
        ticket = self.pending.get(ticket_id)
        if ticket is None:
            raise KeyError(ticket_id)
        verdict = "allow" if allow else "deny"
        if remember == "process":
            self._remembered[("process", ticket.process, ticket.rule, ticket.op,
                              ticket.path)] = verdict
        elif remember == "session":
            self._remembered[("session", ticket.session, ticket.rule, ticket.op,
                              ticket.path)] = verdict
        self._close(ticket)
        ticket.resolve(verdict, f"answered ({remember})")
        log.info("ask %s answered %s (remember %s)", ticket.id, verdict, remember)
        return ticket

    def forget(self) -> None:
        """A new policy: remembered answers were given to the old one."""
        self._remembered.clear()

    def _close(self, ticket: Ticket) -> None:
        self.pending.pop(ticket.id, None)
        question = (ticket.session, ticket.rule, ticket.op, ticket.path)
        if self._by_question.get(question) is ticket:
            del self._by_question[question]
