"""The daemon's own trio tasks (control socket, policy reload, retention) on a thread
of their own, for the front ends whose request loop is not trio (mfusepy, kernel)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import trio

from agentfs.mount.daemon import Daemon

log = logging.getLogger(__name__)


class Background:
    """The trio loop of the daemon's own tasks, on its own thread."""

    def __init__(self, daemon: Daemon, lock: threading.RLock) -> None:
        self.daemon, self.lock = daemon, lock
        self.token: trio.lowlevel.TrioToken | None = None
        self.scope: trio.CancelScope | None = None
        self.thread = threading.Thread(target=self._run, name="agentfs-control", daemon=True)

    def _guarded(self, call: Callable[[], Any]) -> Any:
        with self.lock:
            return call()

    def _run(self) -> None:
        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self.scope = scope
                async with trio.open_nursery() as nursery:
                    self.daemon.start_tasks(nursery, self._guarded)
        try:
            trio.run(main)
        except Exception:
            log.exception("the control loop failed")

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        if self.token is not None and self.scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self.scope.cancel)
        self.thread.join(timeout=10)
