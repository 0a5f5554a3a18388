"""Removing what the view no longer needs, off the request path.

A directory removed from the top layer (rmdir, or a rename over an empty one) still
holds the whiteouts of the lower names that were deleted inside it; while the kernel
holds the directory it waits in ``work/orphans`` (see `Overlay._drop_dir`).  Once it
is forgotten nothing can reach it any more, but removing it means an unlink per
whiteout: `rm -rf` of a 3,000-file base tree spent a sixth of its time doing that in
FORGET requests.  The engine hands such names to a `Reaper` instead, whose thread
removes them once requests have stopped coming for a moment (or when many are
waiting), at a lower CPU priority.

Nothing here is ever visible: the names are inside ``work/``, which the next mount
empties anyway, so a daemon killed before the reaper got to them loses nothing and
leaves nothing visible.  `close` removes whatever is still waiting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import threading
import time
from typing import Final

log = logging.getLogger(__name__)

IDLE: Final = 0.5      # seconds without a new name before the thread starts removing
BATCH: Final = 20_000  # ... or this many waiting names (a bound on memory, not a pace)
NICE: Final = 10       # the thread's CPU priority (Linux: per thread)


class Reaper:
    """Removes names inside one directory (an fd) in the background."""

    def __init__(self, dir_fd: int) -> None:
        self._fd = os.dup(dir_fd)
        self._names: list[str] = []
        self._cond = threading.Condition()
        self._last = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None

    def discard(self, name: str) -> None:
        """*name* (a file or a whole tree in the directory) is garbage."""
        with self._cond:
            if self._closed:
                self._remove(name)
                return
            self._names.append(name)
            self._last = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="agentfs-reaper",
                                                daemon=True)
                self._thread.start()
            elif len(self._names) >= BATCH:
                self._cond.notify()

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while True:
            with self._cond:
                while not self._names and not self._closed:
                    self._cond.wait()
                while not self._closed and len(self._names) < BATCH:
                    left = self._last + IDLE - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return  # close removes the rest
                batch, self._names = self._names, []
            for name in batch:
                self._remove(name)

    def _remove(self, name: str) -> None:
        try:
            st = os.lstat(name, dir_fd=self._fd)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=self._fd)
            else:
                os.unlink(name, dir_fd=self._fd)
        except FileNotFoundError:
            pass
        except OSError as exc:  # junk in work/: the next mount clears it
            log.warning("could not remove work/%s: %s", name, exc)

    def close(self) -> None:
        """Stop the thread and remove everything still waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cond:
            batch, self._names = self._names, []
        for name in batch:
            self._remove(name)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
