"""FUSE passthrough (Linux 6.9 and later): the kernel reads and writes a file the branch
owns straight from its host file, with no request to the daemon.

Only files in the top layer are passed through: their host file *is* the branch's file.
A base file is read through the daemon (kernel-cached, FOPEN_KEEP_CACHE) because a
writer's copy-up must move every open handle to the copy (`Overlay._repoint_handles`),
and the kernel's backing file of a handle cannot be moved.

The kernel keeps one backing file per inode and refuses a mix of modes: while an inode
has a passed-through open, every open must name the same backing (else EIO), and while
it has a cached open, none may be passed through.  `Backings` keeps both counts per
node id, so an inode's opens never disagree: the first open of a top file registers
its host fd (FUSE_DEV_IOC_BACKING_OPEN) and later ones reuse the id until the last of
them is released (the kernel has dropped its files by then: it releases a file's I/O
mode before it sends RELEASE).  A cached open while an inode is passed through cannot
happen for a top file; an open of a base file during a writer's passthrough (the top
copy gone, from outside) is given the same backing, which is what the kernel demands.

Passthrough and the writeback cache exclude each other (the kernel refuses both), so a
mount with passthrough has no writeback cache: writes to base files (copy-up makes them
top files at open) and to cached-mode handles go through the daemon as they come.
Needs CAP_SYS_ADMIN in the initial user namespace; AGENTFS_FUSE_PASSTHROUGH=0 turns it
off (for measuring: the writeback cache is then used again).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from typing import Final

from agentfs.mount.kernel import proto as p

log = logging.getLogger(__name__)

CAP_SYS_ADMIN: Final = 21
MAX_STACK_DEPTH: Final = 1  # backing files on a plain filesystem; agentfs stackable once
SINCE: Final = (6, 9)       # the first Linux with FUSE passthrough
OFF_KNOB: Final = "AGENTFS_FUSE_PASSTHROUGH"


def wanted() -> bool:
    """Whether to ask the kernel for passthrough: allowed (AGENTFS_FUSE_PASSTHROUGH is
    not 0) and possible (the daemon may register backing files)."""
    return not turned_off() and may_register()


def turned_off() -> bool:
    return os.environ.get(OFF_KNOB, "") == "0"


def kernel_release() -> tuple[int, int]:
    """(major, minor) of the running Linux, (0, 0) when unreadable."""
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def may_register() -> bool:
    """CAP_SYS_ADMIN in the initial user namespace, which FUSE_DEV_IOC_BACKING_OPEN
    checks: the effective set has it and this is not a user namespace."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            caps = next((int(line.split()[1], 16) for line in fh
                         if line.startswith("CapEff:")), 0)
        with open("/proc/self/uid_map", encoding="ascii") as fh:
            initial = fh.read().split() == ["0", "0", "4294967295"]
    except (OSError, ValueError):
        return False
    return initial and bool(caps >> CAP_SYS_ADMIN & 1)


class Backings:
    """The passthrough state of one view's open files (see the module docstring).
    Runs under the engine lock, as every handler does."""

    def __init__(self) -> None:
        self.dev_fd = -1  # the connection's /dev/fuse fd
        self.on = False   # new top-file opens are passed through
        self._passed: dict[int, list[int]] = {}  # node id -> [backing id, open handles]
        self._cached: dict[int, int] = {}        # node id -> open cached-mode handles
        self._handles: dict[int, tuple[int, bool]] = {}  # fh -> (node id, passed through)
        self._stale: set[int] = set()  # nodes written past the kernel's page cache

    def enable(self, dev_fd: int) -> None:
        self.dev_fd, self.on = dev_fd, True

    def open_flags(self, fh: int, nodeid: int, fd: int, may_pass: bool) -> tuple[int, int]:
        """(open flags, backing id) for the reply to a new handle *fh* of *nodeid*, whose
        host file is open as *fd*; *may_pass*: passthrough is on, the host file is the
        branch's own and the handle may bypass the daemon (a node already passed
        through is regardless)."""
        entry = self._passed.get(nodeid)
        if entry is None and may_pass and not self._cached.get(nodeid):
            backing = self._register(fd)
            if backing > 0:
                entry = self._passed[nodeid] = [backing, 0]
        if entry is not None:
            entry[1] += 1
            self._handles[fh] = (nodeid, True)
            self._stale.add(nodeid)
            return p.FOPEN_PASSTHROUGH, entry[0]
        self._cached[nodeid] = self._cached.get(nodeid, 0) + 1
        self._handles[fh] = (nodeid, False)
        if nodeid in self._stale:  # pages cached before a passthrough write are old
            self._stale.discard(nodeid)
            return 0, 0
        return p.FOPEN_KEEP_CACHE, 0

    def cached_opens(self, nodeid: int) -> int:
        """How many cached-mode handles of *nodeid* are open."""
        return self._cached.get(nodeid, 0)

    def nodes(self) -> set[int]:
        """The node ids with passed-through open handles."""
        return set(self._passed)

    def released(self, fh: int) -> None:
        got = self._handles.pop(fh, None)
        if got is None:
            return
        nodeid, passed = got
        if not passed:
            left = self._cached.pop(nodeid, 1) - 1
            if left:
                self._cached[nodeid] = left
            return
        entry = self._passed[nodeid]
        entry[1] -= 1
        if entry[1] == 0:
            del self._passed[nodeid]
            self._unregister(entry[0])

    def forget(self, nodeid: int) -> None:
        """The kernel dropped the inode: its pages went with it."""
        self._stale.discard(nodeid)

    def _register(self, fd: int) -> int:
        """The backing id of host fd *fd*, 0 when the kernel refuses (passthrough is then
        off for this mount: one refusal is logged, not one per open)."""
        arg = bytearray(p.BACKING_MAP.pack(fd, 0, 0))
        try:
            return fcntl.ioctl(self.dev_fd, p.BACKING_OPEN, arg)
        except OSError as exc:
            log.warning("FUSE passthrough refused (%s): reads and writes go through the "
                        "daemon from now on", exc)
            self.on = False
            return 0

    def _unregister(self, backing: int) -> None:
        try:
            fcntl.ioctl(self.dev_fd, p.BACKING_CLOSE, bytearray(p.BACKING_ID.pack(backing)))
        except OSError as exc:
            log.warning("FUSE passthrough: closing backing %d failed: %s", backing, exc)
