"""Who is calling: FUSE request pid -> thread group -> nearest bound ancestor -> branch.

A session binds a process (and everything it starts) to a branch.  Sessions are keyed
by (pid, process start time), so a recycled pid never inherits a stale binding.
Ancestors are found through /proc/<pid>/stat (parsed after the last ')', since the
command name may contain anything).  A process found to belong to a session is
remembered as a member, so it keeps its branch after being re-parented (double fork,
setsid).  Results are cached per pid and checked against the start time on each use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

from agentfs.policy.source import PolicySource
from agentfs.proc import command_line, parent_pid, start_time, thread_group

FRESH: Final = 0.5  # seconds an answer is trusted without looking at /proc again


@dataclass
class Session:
    pid: int
    start: int
    branch: str
    command: str
    created: float = field(default_factory=time.time)
    members: set[tuple[int, int]] = field(default_factory=set)
    policy: PolicySource | None = None   # its own policy (`exec --policy`), else the mount's


class SessionTable:
    def __init__(self) -> None:
        self.sessions: dict[tuple[int, int], Session] = {}
        self._members: dict[tuple[int, int], Session] = {}
        self._cache: dict[int, tuple[int | None, Session | None]] = {}
        self._fresh: dict[int, tuple[float, Session | None]] = {}

    def bind(self, pid: int, branch: str, policy: PolicySource | None = None) -> Session:
        pid = thread_group(pid)
        start = start_time(pid)
        if start is None:
            raise ValueError(f"no process {pid}")
        self.unbind(pid)
        session = Session(pid, start, branch, command_line(pid), policy=policy)
        self.sessions[(pid, start)] = session
        self._forget_answers()
        return session

    def unbind(self, pid: int) -> bool:
        start = start_time(pid)
        session = self.sessions.pop((pid, start), None) if start is not None else None
        if session is not None:
            for key in session.members:
                self._members.pop(key, None)
        self._forget_answers()
        return session is not None

    def session_of(self, pid: int) -> Session | None:
        """The session the calling process belongs to (None: unbound).

        The answer is cached per request pid; for FRESH seconds it is used as is (a pid
        cannot be recycled that fast: the kernel would have to wrap around pid_max),
        after that the process start time is checked again."""
        if pid <= 0 or not self.sessions:  # no session at all: nobody is bound (this
            return None                     # runs for nearly every request)
        now = time.monotonic()
        fresh = self._fresh.get(pid)
        if fresh is not None and now - fresh[0] < FRESH:
            return fresh[1]
        tgid = thread_group(pid)
        start = start_time(tgid)
        hit = self._cache.get(tgid)
        if hit is not None and hit[0] == start:
            self._fresh[pid] = (now, hit[1])
            return hit[1]
        found = None
        cur: int | None = tgid
        seen = 0
        while cur is not None and cur > 1 and seen < 4096:
            cur_start = start_time(cur)
            if cur_start is None:
                break
            key = (cur, cur_start)
            found = self.sessions.get(key) or self._members.get(key)
            if found is not None:
                break
            cur = parent_pid(cur)
            seen += 1
        if found is not None and start is not None and (tgid, start) not in self.sessions:
            found.members.add((tgid, start))
            self._members[(tgid, start)] = found
        self._cache[tgid] = (start, found)
        if len(self._fresh) > 10_000:
            self._fresh.clear()
        self._fresh[pid] = (now, found)
        return found

    def prune(self) -> list[Session]:
        """End sessions whose root and every known member are gone."""
        def alive(key: tuple[int, int]) -> bool:
            return start_time(key[0]) == key[1]
        ended = []
        for key, session in list(self.sessions.items()):
            live_members = {m for m in session.members if alive(m)}
            for gone in session.members - live_members:
                self._members.pop(gone, None)
            session.members = live_members
            if not alive(key) and not live_members:
                del self.sessions[key]
                ended.append(session)
        if ended:
            self._forget_answers()
        return ended

    def _forget_answers(self) -> None:
        self._cache.clear()
        self._fresh.clear()
