"""A faster request loop for pyfuse3, without leaving trio.

pyfuse3's worker loop goes through the trio scheduler at least twice per request:
it takes a `trio.Lock` (a checkpoint) and waits for the FUSE fd with
`trio.lowlevel.wait_readable` (an epoll registration, a scheduler pass and an
`epoll_wait`).  On a small-file workload that machinery costs more CPU than the
overlay itself.  pyfuse3 looks `trio` up as a module global at run time (its own
asyncio mode swaps it the same way), so we hand it a view of trio whose lock takes
the uncontended case without yielding and whose `wait_readable` first asks the
kernel directly, with a short blocking poll, whether the next request is already
there (it usually is, or arrives within microseconds, while a program is busy with
the filesystem).  Only when the fd stays quiet does the loop fall back to the real
trio wait.

Fairness: the other trio tasks (control socket, policy reload, the answers to
`ask` questions) must still run under a continuous stream of requests, so the fast
path yields to the scheduler for real at least every `YIELD_EVERY` seconds.
"""

from __future__ import annotations

import select
import time
import types
from typing import Any, Final

import pyfuse3
import trio

SPIN_MS: Final = 1          # how long the fast path blocks waiting for the next request
YIELD_EVERY: Final = 0.005  # seconds of fast-path work before a real checkpoint


class FastLock:
    """trio.Lock that does not yield when nobody else holds it."""

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        if not self._lock.locked():
            self._lock.acquire_nowait()
        else:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class _Readiness:
    """The fast `wait_readable`: poll the fd directly, fall back to trio."""

    def __init__(self) -> None:
        self._polls: dict[int, select.poll] = {}
        self._since_yield = time.monotonic()

    def _poller(self, fd: int) -> select.poll:
        poller = self._polls.get(fd)
        if poller is None:
            poller = self._polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        return poller

    async def wait_readable(self, fd: int) -> None:
        now = time.monotonic()
        if now - self._since_yield < YIELD_EVERY:
            try:
                ready = self._poller(fd).poll(SPIN_MS)
            except OSError:
                ready = []
            if ready:
                return
        self._since_yield = now
        await trio.lowlevel.wait_readable(fd)
        self._since_yield = time.monotonic()


def install() -> None:
    """Make pyfuse3's request loop use the fast lock and readiness check."""
    readiness = _Readiness()
    lowlevel = types.SimpleNamespace(**{name: getattr(trio.lowlevel, name)
                                        for name in dir(trio.lowlevel)
                                        if not name.startswith("__")})
    lowlevel.wait_readable = readiness.wait_readable
    shim: Any = types.SimpleNamespace(**{name: getattr(trio, name) for name in dir(trio)
                                         if not name.startswith("__")})
    shim.lowlevel = lowlevel
    shim.Lock = FastLock
    pyfuse3.trio = shim  # type: ignore[attr-defined]
