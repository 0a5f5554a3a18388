"""Who is behind a FUSE request, as far as policy rules care (exe, comm, ancestors, env).

Only the facts some rule looks at are read from /proc, and each process's answer is
kept for `FRESH` seconds, so a burst of requests costs one look.  The same `Caller`
object is handed out while the answer is fresh and unchanged: decisions are cached
per caller object.  Known window: a process that execs another program is seen with
its old exe for at most `FRESH` seconds.
"""

from __future__ import annotations

import time
from typing import Final

from agentfs.policy.model import NOBODY, Caller
from agentfs.proc import ancestors_of, comm_of, command_line, environ_of, exe_of

FRESH: Final = 0.5
_CACHE_LIMIT: Final = 10_000


class CallerResolver:
    """Caller facts per request pid, read lazily and cached briefly."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, str, str, frozenset[str]],
                          tuple[float, Caller]] = {}

    def resolve(self, pid: int, uid: int, branch: str, session: str,
                keys: frozenset[str]) -> Caller:
        if not keys:
            return NOBODY
        key = (pid, uid, branch, session, keys)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < FRESH:
            return hit[1]
        caller = Caller(
            pid=pid,
            exe=exe_of(pid) if "exe" in keys else "",
            comm=comm_of(pid) if "comm" in keys else "",
            uid=uid,
            ancestors=ancestors_of(pid) if "ancestor" in keys else (),
            env=environ_of(pid) if "env" in keys else (),
            session=session, branch=branch)
        if hit is not None and _same(hit[1], caller):
            caller = hit[1]  # keep the interned object: its cached decisions stay valid
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = (now, caller)
        return caller

    def describe(self, pid: int) -> tuple[str, str]:
        """(exe, command line) for messages and prompts."""
        return exe_of(pid), command_line(pid)


def _same(a: Caller, b: Caller) -> bool:
    return (a.exe, a.comm, a.ancestors, a.env) == (b.exe, b.comm, b.ancestors, b.env)
