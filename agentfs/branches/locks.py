"""One writer per branch: whoever serves or changes a branch holds its lock.

Two daemons serving one branch would each cache the branch's top layer and undo each
other's changes; a commit or discard under a running daemon would pull the layers out
from under it.  So a daemon holds an exclusive flock on the branch's lock file for as
long as it serves the branch (pinned, or a per-process view), and commit, discard and
offline trash restores take it for their duration.  The kernel drops a flock when its
holder dies, so a killed daemon never leaves a branch locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from agentfs.errors import UserError


def lock_path(store_root: Path, branch: str) -> Path:
    digest = hashlib.sha256(branch.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return store_root / "run" / f"branch-{digest}.lock"


def hold_branch(store_root: Path, branch: str, what: str) -> int:
    """Take *branch*'s lock for good (the fd is the lock; close it to let go).

    *what* says who holds it, for the message another taker gets."""
    path = lock_path(store_root, branch)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"branch {branch!r} is in use by {holder}; unmount it (or wait for "
                        "it to finish) first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{what} (pid {os.getpid()})".encode(), 0)
    return fd


@contextlib.contextmanager
def branch_held(store_root: Path, branch: str, what: str) -> Iterator[None]:
    fd = hold_branch(store_root, branch, what)
    try:
        yield
    finally:
        os.close(fd)
