"""What every front end does around an engine call, whatever the FUSE binding:
ask the policy, note the caller for the trash, begin the audit event, count I/O.

The binding-specific part is only how a front end waits for a person's answer
(`asking.settle` in trio, a thread wait in the mfusepy front end)."""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Iterable

from agentfs.audit.recorder import PENDING, HandleIO, Pending, Recorder
from agentfs.context import CALLER
from agentfs.errors import FsError
from agentfs.overlay.engine import Overlay
from agentfs.policy.guard import ALLOWED, Guard, Verdict


class Gate:
    def __init__(self, overlay: Overlay, guard: Guard | None, recorder: Recorder | None
                 ) -> None:
        self.ov = overlay
        self.guard = guard
        self.recorder = recorder
        self.io: dict[int, HandleIO] = {}

    def restricts(self, pid: int, op: str) -> bool:
        return self.guard is not None and op in self.guard.restricted(pid)

    def restricts_path(self, pid: int, op: str, path: str) -> bool:
        """Could *op* on *path* be anything but allowed?  False skips the whole check
        (caller, decision, audit note): a path no restricting rule's glob matches
        under allowing defaults is allowed, and an allowed stat is not audited."""
        if self.guard is None:
            return False
        return self.guard.engine_for(pid).may_restrict(op, path)

    def path_restricts(self, pid: int, op: str) -> Callable[[str], bool] | None:
        """`restricts_path(pid, op, ·)` for the many paths of one request (a listing's
        entries): the caller's policy found once; None when nothing can restrict *op*."""
        if self.guard is None:
            return None
        engine = self.guard.engine_for(pid)
        return None if op not in engine.restricted else functools.partial(
            engine.may_restrict, op)

    def begin(self, pid: int, uid: int, op: str, path: str, verdict: Verdict,
              dst: str = "") -> Verdict:
        """Note who asks what (for the trash and the audit) before the request runs."""
        CALLER.set((pid, uid))
        if self.recorder is not None:
            if self.recorder.log.refuses():
                raise FsError(errno.EIO)  # strict audit: nothing happens unrecorded
            if not self.recorder.records(op, verdict):
                PENDING.set(None)
                return verdict
            sid, sha = self.guard.caller_facts(pid) if self.guard is not None else ("", "")
            PENDING.set(Pending(self.recorder, op, path, dst, pid, uid, verdict, sid, sha))
        return verdict

    def check(self, pid: int, uid: int, checks: Iterable[tuple[str, str]]) -> Verdict:
        checks = list(checks)
        verdict = self.guard.check(pid, uid, checks) if self.guard is not None else ALLOWED
        return self.begin(pid, uid, checks[0][0], checks[0][1], verdict)

    def check_object(self, pid: int, uid: int, ops: list[str], path: str,
                     event: str | None = None) -> Verdict:
        verdict = (self.guard.check_object(pid, uid, ops, path) if self.guard is not None
                   else ALLOWED)
        return self.begin(pid, uid, event or ops[0], path, verdict)

    def check_rename(self, pid: int, uid: int, src: str, dst: str, exchange: bool) -> Verdict:
        verdict = (self.guard.check_rename(pid, uid, src, dst, exchange)
                   if self.guard is not None else ALLOWED)
        return self.begin(pid, uid, "rename", src, verdict, dst)

    def check_link(self, pid: int, uid: int, src: str, dst: str) -> Verdict:
        verdict = (self.guard.check_link(pid, uid, src, dst) if self.guard is not None
                   else ALLOWED)
        return self.begin(pid, uid, "link", src, verdict, dst)

    def allowed(self, verdict: Verdict, path: str) -> None:
        """The request may go on: what an allowed decision still asks for."""
        if (verdict.decision is not None and verdict.decision.decision == "soft_delete"
                and verdict.op == "truncate"):
            self.ov.preserve(path)

    # -- after the engine call ---------------------------------------------------------------
    def linked(self, ino: int, dst: str) -> None:
        if self.guard is not None:
            self.guard.linked(ino, dst)

    def renamed(self, src: str, dst: str, exchange: bool) -> None:
        if self.guard is not None:
            self.guard.renamed(src, dst, exchange)

    def opened(self, fh: int, path: str, pid: int, uid: int) -> None:
        if self.recorder is not None:
            sid, sha = self.guard.caller_facts(pid) if self.guard is not None else ("", "")
            self.io[fh] = HandleIO(path, pid, uid, sid, sha)

    def passed_through(self, fh: int, fd: int, st: os.stat_result | None) -> None:
        """The kernel does *fh*'s reads and writes itself (FUSE passthrough): none can be
        counted.  A writer's file (host fd *fd*, *st* its fstat at open; None for a
        reader) is looked at again at release, so the audit still records that the
        handle wrote."""
        io = self.io.get(fh)
        if io is not None and st is not None:
            io.fd, io.before = fd, _written_stamp(st)

    def read(self, fh: int, n: int) -> None:
        io = self.io.get(fh)
        if io is not None:
            io.reads += 1
            io.read_bytes += n

    def wrote(self, fh: int, n: int) -> None:
        io = self.io.get(fh)
        if io is not None:
            io.writes += 1
            io.written += n

    def released(self, fh: int) -> None:
        """*fh* is closing (its host fd is still open)."""
        io = self.io.pop(fh, None)
        if io is not None and self.recorder is not None:
            if io.before is not None:
                try:
                    io.unseen_write = _written_stamp(os.fstat(io.fd)) != io.before
                except OSError:
                    io.unseen_write = True
            self.recorder.handle_closed(io)


def _written_stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What a write changes: size, mtime and ctime."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns
