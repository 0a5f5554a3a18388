"""From FUSE requests to audit events: who, what, the decision, the outcome.

The gate sets `PENDING` once a request has been checked; the error boundary calls
`finish` with the outcome, so every checked request yields exactly one event with its
errno and duration.  Metadata reads (stat, readdir, readlink, xattr reads) are recorded
only when the policy did something other than allow them: recording every lookup
would drown the log.  Reads and writes are counted per open handle and recorded once,
when the handle is released.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Final

from agentfs.audit.log import AuditLog
from agentfs.policy.guard import Verdict
from agentfs.proc import ProcNames

QUIET_OPS: Final = frozenset({"stat", "readdir", "readlink", "getxattr", "listxattr"})
_PROC_FRESH: Final = 2.0


@dataclass
class Pending:
    recorder: Recorder
    op: str
    path: str
    dst: str
    pid: int
    uid: int
    verdict: Verdict
    session: str
    policy_sha256: str
    started: float = field(default_factory=time.perf_counter)


@dataclass
class HandleIO:
    path: str
    pid: int
    uid: int
    session: str
    policy_sha256: str
    reads: int = 0
    read_bytes: int = 0
    writes: int = 0
    written: int = 0
    # a passed-through writer (mount.kernel.passthrough): its host fd, the file's
    # (size, mtime, ctime) at open, and whether they changed by release
    fd: int = -1
    before: tuple[int, int, int] | None = None
    unseen_write: bool = False


PENDING: Final[ContextVar[Pending | None]] = ContextVar("agentfs_audit_pending", default=None)


def finish_pending(errno_value: int) -> None:
    """The request begun in this task is over: record it with its outcome."""
    pending = PENDING.get()
    if pending is not None:
        PENDING.set(None)
        pending.recorder.finish(pending, errno_value)


class Recorder:
    """Audit events for one branch view."""

    def __init__(self, log: AuditLog, branch: str) -> None:
        self.log = log
        self.branch = branch
        self._proc = ProcNames(_PROC_FRESH).get

    @staticmethod
    def records(op: str, verdict: Verdict) -> bool:
        """Whether a request gets an event (quiet operations only when not allowed)."""
        if op not in QUIET_OPS:
            return True
        decided = verdict.decision
        return decided is not None and decided.decision != "allow"

    def finish(self, pending: Pending, errno_value: int) -> None:
        d = pending.verdict.decision
        decision = d.decision if d is not None else "allow"
        if pending.verdict.ticket is not None:
            decision = f"ask:{pending.verdict.ticket.answer or 'none'}"
        exe, cmdline = self._proc(pending.pid)
        self.log.emit_request(
            pending.session, self.branch, pending.pid, exe, cmdline, pending.uid,
            pending.op, pending.path, pending.dst, decision, (d.rule or "") if d else "",
            pending.policy_sha256, errno_value,
            int((time.perf_counter() - pending.started) * 1e6))

    def handle_closed(self, io: HandleIO) -> None:
        if not (io.reads or io.writes or io.unseen_write):
            return
        exe, cmdline = self._proc(io.pid)
        emit = self.log.emit_request
        if io.reads:
            emit(io.session, self.branch, io.pid, exe, cmdline, io.uid, "read", io.path, "",
                 "allow", "", io.policy_sha256, 0, 0, io.reads, io.read_bytes)
        if io.writes or io.unseen_write:  # passed through: 0 calls, 0 bytes (not counted)
            emit(io.session, self.branch, io.pid, exe, cmdline, io.uid, "write", io.path, "",
                 "allow", "", io.policy_sha256, 0, 0, io.writes, io.written)
