"""Waiting for a person's answer inside one FUSE request (trio front end).

Only the request that asked waits; pyfuse3 serves every request in its own trio task,
so everybody else goes on.  The wait ends with the answer, at the ticket's deadline
(the policy's on-timeout decision; a deny when nobody listened), or when the asking
thread gets a signal: the kernel then sends FUSE_INTERRUPT, which pyfuse3 does not
surface, so the thread's pending signals are looked at every `POLL` seconds and the
wait ends with EINTR.
"""

from __future__ import annotations

import errno
import time
from typing import Final

import trio

from agentfs.errors import FsError
from agentfs.policy.approvals import ApprovalBroker
from agentfs.policy.guard import Verdict
from agentfs.proc import interrupted

POLL: Final = 0.05


async def settle(verdict: Verdict, broker: ApprovalBroker, tid: int) -> None:
    """Return if the request may go on, raise FsError if not (after waiting if asked)."""
    if verdict.errno:
        raise FsError(verdict.errno)
    ticket = verdict.ticket
    if ticket is None:
        return
    deny_errno = verdict.decision.errno if verdict.decision else errno.EACCES
    if ticket.answer is None:
        answered = trio.Event()
        ticket.add_waker(answered.set)
        # the deadline is read again at every poll: a question waiting out the short
        # grace of an unattended mount gets the full timeout once a prompts client looks
        while not answered.is_set():
            left = ticket.deadline - time.monotonic()
            if left <= 0:
                break
            with trio.move_on_after(min(POLL, left)):
                await answered.wait()
            if not answered.is_set() and tid > 0 and interrupted(tid):
                broker.leave(ticket, "interrupted")
                raise FsError(errno.EINTR)
        if ticket.answer is None:
            broker.leave(ticket, "timeout")
    if (ticket.answer or ticket.on_timeout) != "allow":
        raise FsError(deny_errno)
