"""mfusepy front end: the same engine behind libfuse's high-level, path-based API.

This is the binding FUSE-T on macOS offers; on Linux it runs against libfuse3 and is
tested like the pyfuse3 front end.  It is an adapter only: every decision is the
engine's, the guard's or the gate's.

libfuse calls in from several threads, and the engine is not thread-safe, so one lock
serialises every engine call.  A request that must wait for a person's answer (`ask`)
releases the lock while it waits, so everyone else goes on.  One error boundary turns
engine errors into their errno and a bug into a logged EIO.

mfusepy drops the flags of rename (RENAME_NOREPLACE / RENAME_EXCHANGE) and flattens
UTIME_NOW / UTIME_OMIT; `AgentfsFUSE` passes both through untouched.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import mfusepy

from agentfs.audit.recorder import Recorder, finish_pending
from agentfs.errors import FsError
from agentfs.mount.boundary import errno_for
from agentfs.mount.gate import Gate
from agentfs.overlay.attrs import Attr
from agentfs.overlay.engine import Overlay
from agentfs.overlay.hostio import split
from agentfs.policy.approvals import ApprovalBroker
from agentfs.policy.guard import Guard, Verdict, open_ops
from agentfs.proc import interrupted

log = logging.getLogger(__name__)

R = TypeVar("R")
POLL: Final = 0.05
UTIME_NOW: Final = (1 << 30) - 1
UTIME_OMIT: Final = (1 << 30) - 2
HIDDEN_PREFIX: Final = ".fuse_hidden"
ENTRY_TIMEOUT: Final = 1.0  # seconds; short, so restores and reloads show up quickly


def _boundary(fn: Callable[..., R]) -> Callable[..., R]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            code = errno_for(exc, fn.__name__)
            finish_pending(code)
            raise mfusepy.FuseOSError(code) from None
        finish_pending(0)
        return result
    return wrapper


def _rel(path: str | None) -> str:
    return (path or "/").lstrip("/")


def _caller() -> tuple[int, int, int]:
    """(pid, uid, gid) of the request being served on this thread."""
    uid, gid, pid = mfusepy.fuse_get_context()
    return pid, uid, gid


def _stat_dict(attr: Attr) -> dict[str, int]:
    return {"st_ino": attr.ino, "st_mode": attr.mode, "st_nlink": attr.nlink,
            "st_uid": attr.uid, "st_gid": attr.gid, "st_rdev": attr.rdev,
            "st_size": attr.size, "st_blocks": attr.blocks, "st_blksize": attr.blksize,
            "st_atime": attr.atime_ns, "st_mtime": attr.mtime_ns, "st_ctime": attr.ctime_ns}


class MfuseOperations(mfusepy.Operations):
    use_ns = True
    flag_nullpath_ok = True   # with hard_remove, an unlinked open file has no path
    flag_nopath = True        # fh operations need no path: the engine works by handle

    def __init__(self, overlay: Overlay, guard: Guard | None = None,
                 recorder: Recorder | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.ov = overlay
        self.guard = guard
        self.gate = Gate(overlay, guard, recorder)
        self.engine_lock = threading.RLock()
        self._dirs: dict[int, str] = {}
        self._fh_paths: dict[int, str] = {}
        self._hidden: dict[str, int] = {}  # libfuse's .fuse_hidden name -> inode
        self._dir_handles = itertools.count(1)
        self.on_ready = on_ready

    # -- policy --------------------------------------------------------------------------
    def _settle(self, verdict: Verdict, pid: int, path: str) -> None:
        """Go on, fail, or wait (without the lock) for a person's answer."""
        if verdict.errno:
            raise FsError(verdict.errno)
        ticket = verdict.ticket
        if ticket is not None:
            assert self.guard is not None
            self._wait(ticket, self.guard.broker, pid)
            if (ticket.answer or ticket.on_timeout) != "allow":
                raise FsError(verdict.decision.errno if verdict.decision else errno.EACCES)
        with self.engine_lock:
            self.gate.allowed(verdict, path)

    def _wait(self, ticket: Any, broker: ApprovalBroker, pid: int) -> None:
        answered = threading.Event()
        with self.engine_lock:
            ticket.add_waker(answered.set)
        while not answered.wait(POLL):
            if pid > 0 and interrupted(pid):
                with self.engine_lock:
                    broker.leave(ticket, "interrupted")
                raise FsError(errno.EINTR)
            if time.monotonic() >= ticket.deadline:
                with self.engine_lock:
                    if ticket.answer is None:
                        broker.leave(ticket, "timeout")
                return

    def _check(self, *checks: tuple[str, str]) -> None:
        pid, uid, _ = _caller()
        with self.engine_lock:
            verdict = self.gate.check(pid, uid, checks)
        self._settle(verdict, pid, checks[0][1])

    def _check_object(self, ops: list[str], path: str, event: str | None = None) -> None:
        pid, uid, _ = _caller()
        with self.engine_lock:
            verdict = self.gate.check_object(pid, uid, ops, path, event)
        self._settle(verdict, pid, path)

    def _restricts(self, op: str) -> bool:
        return self.gate.restricts(_caller()[0], op)

    # -- what the daemon asks of a view --------------------------------------------------
    def drop_kernel_entry(self, path: str) -> None:
        """Nothing to do: this front end lets the kernel keep entries for ENTRY_TIMEOUT."""

    def drop_kernel_entries(self) -> None:
        """Nothing to do: this front end lets the kernel keep entries for ENTRY_TIMEOUT."""

    # -- lifecycle -----------------------------------------------------------------------
    def init(self, path: str) -> None:
        if self.on_ready is not None:
            self.on_ready()

    # -- attributes ----------------------------------------------------------------------
    @_boundary
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        with self.engine_lock:
            if fh is not None:
                return _stat_dict(self.ov.fh_attr(fh))
            hidden = self._hidden.get(_rel(path))
            if hidden is not None:
                return _stat_dict(self.ov.getattr_ino(hidden))
        rel = _rel(path)
        if self.gate.restricts_path(_caller()[0], "stat", rel):
            self._check(("stat", rel))
        with self.engine_lock:
            return _stat_dict(self.ov.getattr(rel))

    @_boundary
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        return self._setattr(path, fh, ["chmod"], mode=stat.S_IMODE(mode))

    @_boundary
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        return self._setattr(path, fh, ["chown"], uid=None if uid < 0 else uid,
                             gid=None if gid < 0 else gid)

    @_boundary
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        return self._setattr(path, fh, ["truncate"], size=length)

    @_boundary
    def utimens(self, path: str | None, times: tuple[int | None, int | None] | None = None,
                fh: int | None = None) -> int:
        now = time.time_ns()
        atime, mtime = times if times is not None else (now, now)
        return self._setattr(path, fh, ["utimens"], atime_ns=atime, mtime_ns=mtime)

    def _setattr(self, path: str | None, fh: int | None, ops: list[str], **changes: Any
                 ) -> int:
        """By path, or by handle (f*() calls: libfuse passes no path with nopath); the
        policy is checked on the handle's path as it was opened."""
        rel = None if path is None else _rel(path)
        hidden = self._hidden.get(rel or "")
        if hidden is not None:  # an unlinked open file: by its inode
            with self.engine_lock:
                self.ov.setattr(None, fh=fh, ino=hidden, **changes)
            return 0
        checked = rel if rel is not None else self._fh_paths.get(fh or -1)
        if checked is not None:
            self._check_object(ops, checked)
        with self.engine_lock:
            self.ov.setattr(rel if fh is None else None, fh=fh, **changes)
        return 0

    # -- namespace -----------------------------------------------------------------------
    @_boundary
    def readlink(self, path: str) -> str:
        rel = _rel(path)
        self._check(("readlink", rel))
        with self.engine_lock:
            return self.ov.readlink(rel)

    @_boundary
    def mknod(self, path: str, mode: int, dev: int) -> int:
        rel = _rel(path)
        self._check(("mknod", rel))
        _, uid, gid = _caller()
        with self.engine_lock:
            self.ov.mknod(rel, mode, dev, uid, gid)
        return 0

    @_boundary
    def mkdir(self, path: str, mode: int) -> int:
        rel = _rel(path)
        self._check(("mkdir", rel))
        _, uid, gid = _caller()
        with self.engine_lock:
            self.ov.mkdir(rel, mode, uid, gid)
        return 0

    @_boundary
    def symlink(self, target: str, source: str) -> int:
        """*target*: the new link; *source*: what it points to (fusepy's naming)."""
        rel = _rel(target)
        self._check(("symlink", rel))
        _, uid, gid = _caller()
        with self.engine_lock:
            self.ov.symlink(rel, source, uid, gid)
        return 0

    @_boundary
    def link(self, target: str, source: str) -> int:
        """*target*: the new name; *source*: the existing file."""
        src, dst = _rel(source), _rel(target)
        pid, uid, _ = _caller()
        with self.engine_lock:
            verdict = self.gate.check_link(pid, uid, src, dst)
        self._settle(verdict, pid, dst)
        with self.engine_lock:
            attr = self.ov.link(src, dst)
            self.gate.linked(attr.ino, dst)
        return 0

    @_boundary
    def unlink(self, path: str) -> int:
        rel = _rel(path)
        with self.engine_lock:
            if self._hidden.pop(rel, None) is not None:
                return 0  # libfuse drops the hidden name at the last close: already gone
        self._check(("unlink", rel))
        with self.engine_lock:
            self.ov.unlink(rel)
        return 0

    @_boundary
    def rmdir(self, path: str) -> int:
        rel = _rel(path)
        self._check(("rmdir", rel))
        with self.engine_lock:
            self.ov.rmdir(rel)
        return 0

    @_boundary
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        src, dst = _rel(old), _rel(new)
        if not flags and split(dst)[1].startswith(HIDDEN_PREFIX):
            return self._hide(src, dst)
        exchange = bool(flags & 2)
        pid, uid, _ = _caller()
        with self.engine_lock:
            verdict = self.gate.check_rename(pid, uid, src, dst, exchange)
        self._settle(verdict, pid, dst)
        with self.engine_lock:
            self.ov.rename(src, dst, flags)
            self.gate.renamed(src, dst, exchange)
        return 0

    def _hide(self, src: str, hidden: str) -> int:
        """libfuse unlinks an open file by renaming it to .fuse_hidden*: unlink it for
        real (the engine keeps it alive for its handles, nlink 0, as POSIX wants) and
        answer for the hidden name by inode until libfuse drops it."""
        self._check(("unlink", src))
        with self.engine_lock:
            ino = self.ov.getattr(src).ino
            self.ov.unlink(src)
            self._hidden[hidden] = ino
        return 0

    # -- files ---------------------------------------------------------------------------
    @_boundary
    def open(self, path: str, flags: int) -> int:
        rel = _rel(path)
        self._check_object(open_ops(flags), rel, "open")
        pid, uid, _ = _caller()
        with self.engine_lock:
            fh = self.ov.open(rel, flags)
            self.gate.opened(fh, rel, pid, uid)
            self._fh_paths[fh] = rel
        return fh

    @_boundary
    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        rel = _rel(path)
        self._check(("create", rel), ("open_write", rel), ("write", rel))
        pid, uid, gid = _caller()
        with self.engine_lock:
            fh, _attr = self.ov.create(rel, flags, mode, uid, gid)
            self.gate.opened(fh, rel, pid, uid)
            self._fh_paths[fh] = rel
        return fh

    @_boundary
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        with self.engine_lock:
            data = self.ov.read(fh, offset, size)
            self.gate.read(fh, len(data))
        return data

    @_boundary
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        with self.engine_lock:
            n = self.ov.write(fh, offset, data)
            self.gate.wrote(fh, n)
        return n

    @_boundary
    def flush(self, path: str | None, fh: int) -> int:
        # data goes straight to the host file: ENOSYS stops the kernel sending FLUSH
        return -errno.ENOSYS

    @_boundary
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        with self.engine_lock:
            self.ov.fsync(fh, bool(datasync))
        return 0

    @_boundary
    def release(self, path: str | None, fh: int) -> int:
        with self.engine_lock:
            self.ov.release(fh)
            self.gate.released(fh)
            self._fh_paths.pop(fh, None)
        return 0

    # -- directories ---------------------------------------------------------------------
    @_boundary
    def opendir(self, path: str) -> int:
        """A handle naming the directory: with nopath, readdir gets no path."""
        rel = _rel(path)
        self._check(("readdir", rel))
        with self.engine_lock:
            if not stat.S_ISDIR(self.ov.getattr(rel).mode):
                raise FsError(errno.ENOTDIR)
            fh = next(self._dir_handles)
            self._dirs[fh] = rel
        return fh

    @_boundary
    def readdir(self, path: str | None, fh: int) -> list[Any]:
        with self.engine_lock:
            rel = self._dirs.get(fh, _rel(path))
            own = self.ov.getattr(rel)
            return [(".", {"st_mode": own.mode, "st_ino": own.ino}, 0),
                    ("..", {"st_mode": stat.S_IFDIR}, 0),
                    *((name, {"st_mode": a.mode, "st_ino": a.ino}, 0)
                      for name, a in self.ov.readdir(rel))]

    @_boundary
    def releasedir(self, path: str | None, fh: int) -> int:
        with self.engine_lock:
            self._dirs.pop(fh, None)
        return 0

    @_boundary
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        return 0

    # -- misc ----------------------------------------------------------------------------
    @_boundary
    def statfs(self, path: str) -> dict[str, int]:
        with self.engine_lock:
            st = self.ov.statfs()
        return {name: getattr(st, name) for name in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
            "f_favail", "f_namemax")}

    @_boundary
    def access(self, path: str, amode: int) -> int:
        _, uid, gid = _caller()
        with self.engine_lock:
            if not self.ov.access(_rel(path), amode, uid, [gid]):
                raise FsError(errno.EACCES)
        return 0

    @_boundary
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        rel = _rel(path)
        with self.engine_lock:
            if name not in self.ov.listxattr(rel):
                raise FsError(errno.ENODATA)
        self._check_object(["getxattr"], rel)
        with self.engine_lock:
            return self.ov.getxattr(rel, name)

    @_boundary
    def listxattr(self, path: str) -> list[str]:
        rel = _rel(path)
        self._check_object(["listxattr"], rel)
        with self.engine_lock:
            return self.ov.listxattr(rel)

    @_boundary
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0
                 ) -> int:
        rel = _rel(path)
        self._check_object(["setxattr"], rel)
        with self.engine_lock:
            self.ov.setxattr(rel, name, value, options)
        return 0

    @_boundary
    def removexattr(self, path: str, name: str) -> int:
        rel = _rel(path)
        self._check_object(["removexattr"], rel)
        with self.engine_lock:
            self.ov.removexattr(rel, name)
        return 0


class AgentfsFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with rename flags, UTIME_NOW/UTIME_OMIT and the file handle of
    f*() attribute calls (ftruncate, fchmod, ...) passed through."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return int(self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags) or 0)

    def _decode(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    @staticmethod
    def _fh(fip: Any) -> int | None:
        return int(fip.contents.fh) if fip else None

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return int(self.operations.truncate(self._decode(path), length, self._fh(fip)) or 0)

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return int(self.operations.chmod(self._decode(path), mode, self._fh(fip)) or 0)

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        uid = -1 if uid == 0xFFFFFFFF else uid
        gid = -1 if gid == 0xFFFFFFFF else gid
        return int(self.operations.chown(self._decode(path), uid, gid, self._fh(fip)) or 0)

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        decoded = self._decode(path)
        if not buf:
            return int(self.operations.utimens(decoded, None, self._fh(fip)) or 0)
        now = time.time_ns()

        def one(ts: Any) -> int | None:
            if ts.tv_nsec == UTIME_OMIT:
                return None
            if ts.tv_nsec == UTIME_NOW:
                return now
            return int(ts.tv_sec) * 1_000_000_000 + int(ts.tv_nsec)

        times = (one(buf.contents.actime), one(buf.contents.modtime))
        return int(self.operations.utimens(decoded, times, self._fh(fip)) or 0)
