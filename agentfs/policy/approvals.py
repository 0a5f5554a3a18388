"""Pending `ask` decisions: one ticket per question, answered by a person.

A ticket is the question "may <process> do <op> on <path>?" that a rule with
``decision: ask`` raised.  The request that raised it waits (only that request: the
front end awaits the ticket); the same question from the same session while one is
pending joins the pending ticket instead of asking twice.  Answers can be remembered
for the asking process or its whole session, so a person is not asked again for
every chunk of the same work.  A session may have at most ``max_pending`` open
questions; beyond that the answer is the policy's on-timeout decision right away.

When no one can answer (`AskMode`), waiting out the timeout only stalls the agent.
In non-interactive mode (--non-interactive, CI true, AGENTFS_NON_INTERACTIVE=1) a
question is denied at once.  In auto mode, when no terminal started the mount and no
`agentfs prompts` client has looked lately, it is denied after `UNATTENDED_GRACE`
seconds unless a client looks meanwhile: at the instant of a question "nobody has
looked yet" cannot be told from "nobody is there" (the client polls twice a second;
a person may be typing `agentfs prompts`).  The ticket's reason says how to allow the
operation, and `on_refused` (the daemon's log and audit) hears of every refusal.

The broker knows nothing of trio or threads: waiting is the front end's business,
it registers a waker that `resolve` calls.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

log = logging.getLogger(__name__)

SCOPES: Final = ("once", "process", "session")
MAX_PENDING_TOTAL: Final = 32  # FUSE worker tasks must stay free for everyone else
NON_INTERACTIVE_ENV: Final = "AGENTFS_NON_INTERACTIVE"
UNATTENDED_GRACE: Final = 2.5   # seconds an unattended question waits for a listener
LISTENING_WINDOW: Final = 3.0   # a prompts client looked this recently: someone is there
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class AskMode:
    """Who can answer `ask` rules on this mount.

    *refuse*: why questions are denied at once ('' when they may wait); *hint*: what
    to drop to make them wait again.  *watched*: someone is known to be at hand (the
    mount was started from a terminal, or interactive mode was asked for), so a
    question waits for its timeout even when no prompts client has looked yet."""

    refuse: str = ""
    hint: str = ""
    watched: bool = True

    @property
    def name(self) -> str:
        return "non-interactive" if self.refuse else "interactive" if self.watched else "auto"


def controlling_terminal() -> bool:
    """Has this process a terminal a person could answer from?  (The daemon has none
    of its own: the CLI that starts it looks and passes the answer on.)"""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def ask_mode(flag: bool, environ: Mapping[str, str], terminal: bool = False) -> AskMode:
    """The mode from the daemon's --non-interactive flag and environment.

    The flag wins; then AGENTFS_NON_INTERACTIVE (1: refuse, 0: always wait, also under
    CI); then a true CI variable; else auto, watched when the CLI that started the
    daemon had a *terminal*."""
    if flag:
        return AskMode("--non-interactive was given", "drop --non-interactive")
    explicit = environ.get(NON_INTERACTIVE_ENV, "").strip().lower()
    if explicit in _TRUE:
        return AskMode(f"{NON_INTERACTIVE_ENV}={environ[NON_INTERACTIVE_ENV]}",
                       f"unset {NON_INTERACTIVE_ENV}")
    if explicit in _FALSE:
        return AskMode()
    ci = environ.get("CI", "").strip().lower()
    if ci in _TRUE:
        return AskMode(f"CI={environ['CI']} in the daemon's environment",
                       f"set {NON_INTERACTIVE_ENV}=0")
    return AskMode(watched=terminal)


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
    branch: str = ""
    policy_sha256: str = ""
    errno: int = errno.EACCES     # what a deny gives the caller
    unattended: bool = False      # nobody known to listen: `deadline` is the grace's end
    full_deadline: float = 0.0    # the policy's timeout, once someone listens
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

    def __init__(self, id_prefix: str, mode: AskMode | None = None,
                 on_refused: Callable[[Ticket], None] | None = None) -> None:
        self.prefix = id_prefix
        self.mode = mode or AskMode()
        self.on_refused = on_refused
        self._seq = itertools.count(1)
        self.pending: dict[str, Ticket] = {}
        self._by_question: dict[tuple[str, str, str, str], Ticket] = {}
        self._remembered: dict[tuple[Any, ...], str] = {}
        self._listened = float("-inf")  # monotonic time a prompts client last looked

    # -- who listens -------------------------------------------------------------------
    def listener_seen(self) -> None:
        """A prompts client looked (or someone answered): questions waiting out their
        grace get the policy's full timeout."""
        now = time.monotonic()
        self._listened = now
        for ticket in self.pending.values():
            if ticket.unattended:
                ticket.unattended = False
                ticket.deadline = ticket.full_deadline
                log.info("ask %s: a prompts client is listening, waiting up to %.0f s",
                         ticket.id, max(0.0, ticket.deadline - now))

    def _attended(self, now: float) -> bool:
        return self.mode.watched or now - self._listened < LISTENING_WINDOW

    def _refuse(self, ticket: Ticket, reason: str) -> None:
        ticket.resolve("deny", reason)
        log.warning("ask %s (%s %s, pid %s): %s", ticket.id, ticket.op, ticket.path,
                    ticket.pid, reason)
        if self.on_refused is not None:
            try:
                self.on_refused(ticket)
            except Exception:
                log.exception("recording the refusal of ask %s failed", ticket.id)

    # -- asking ------------------------------------------------------------------
    def remembered(self, rule: str, op: str, path: str, process: tuple[int, int],
                   session: str) -> str | None:
        return (self._remembered.get(("process", process, rule, op, path))
                or self._remembered.get(("session", session, rule, op, path)))

    def ask(self, rule: str, op: str, path: str, pid: int, exe: str, command: str,
            process: tuple[int, int], session: str, timeout: float, on_timeout: str,
            max_pending: int, branch: str = "", policy_sha256: str = "",
            deny_errno: int = errno.EACCES) -> Ticket:
        """The ticket to wait on: a pending one for the same question, or a new one
        (already answered with *on_timeout* when the session has too many open, and
        denied when no one can answer)."""
        question = (session, rule, op, path)
        existing = self._by_question.get(question)
        if existing is not None and existing.answer is None:
            existing.waiters += 1
            return existing
        now = time.monotonic()
        ticket = Ticket(id=f"{self.prefix}-{next(self._seq)}", rule=rule, op=op, path=path,
                        pid=pid, exe=exe, command=command, session=session, process=process,
                        created=time.time(), deadline=now + timeout, on_timeout=on_timeout,
                        waiters=1, branch=branch, policy_sha256=policy_sha256,
                        errno=deny_errno, full_deadline=now + timeout)
        if self.mode.refuse:
            self._refuse(ticket, f"ask rule {rule!r} denied at once: no one can answer "
                                 f"(non-interactive: {self.mode.refuse}); allow it with a "
                                 f"rule in the policy, or {self.mode.hint} and answer with "
                                 "`agentfs prompts`")
            return ticket
        if not self._attended(now) and timeout > UNATTENDED_GRACE:
            ticket.unattended = True
            ticket.deadline = now + UNATTENDED_GRACE
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
            if why == "timeout" and ticket.unattended:
                self._refuse(ticket, self._unattended_reason(ticket))
                return
            ticket.resolve(ticket.on_timeout if why == "timeout" else "deny", why)
            log.info("ask %s ended: %s", ticket.id, why)

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for ticket in [t for t in self.pending.values() if t.deadline <= now]:
            self._close(ticket)
            if ticket.unattended:
                self._refuse(ticket, self._unattended_reason(ticket))
                continue
            ticket.resolve(ticket.on_timeout, "timeout")
            log.info("ask %s timed out: %s", ticket.id, ticket.on_timeout)

    @staticmethod
    def _unattended_reason(ticket: Ticket) -> str:
        return (f"ask rule {ticket.rule!r} denied: no one can answer (no terminal started "
                f"the mount and no `agentfs prompts` client looked within "
                f"{UNATTENDED_GRACE:g} s); allow it with a rule in the policy, or keep "
                "`agentfs prompts` running (or mount with --non-interactive to be "
                "refused at once)")

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
