"""The kernel front end's adapter: FUSE requests, as the kernel sends them, to the
gate, the guard and the overlay engine, exactly as the pyfuse3 front end does.

Every handler has one signature, ``(n, unique, nodeid, uid, gid, pid)``, reads its
arguments from the session's request buffer and returns the whole reply message.
Handlers run on the request loop's thread under `engine_lock` (the daemon's own
tasks run on a trio thread and take the same lock); a large READ finishes its pread
without it (`session.Unlocked`).

Policy: a check that comes back ALLOWED goes straight on.  A check that asks a
person (`ask`) must not hold up everybody else: the rest of the request becomes a
continuation that a thread of its own runs once the answer (or the timeout, or an
interrupt: FUSE_INTERRUPT or a signal pending on the asking thread) is in; that thread
takes the engine lock, finishes the request and writes its reply.

Kernel caching: the daemon is the only writer of the branch (of each view's, per
process: there the shared root, the names under it and its listing are not cached), so
entries, attributes and negative lookups are cached for CACHE_TIMEOUT, file pages are
kept across opens (FOPEN_KEEP_CACHE), and directory listings are cached by the kernel
(FOPEN_CACHE_DIR), and a small base file's content is stored into the kernel's pages
when it is opened for reading (NOTIFY_STORE, `_store_small`): its reads never come
here.  Changes made through the mount invalidate them in the kernel; a
change the daemon makes on its own (trash restore) is announced with inval_entry +
inval_inode of the parent.  Files the branch owns are passed through to their host
files where the kernel can (`kernel.passthrough`: no READ/WRITE requests for them);
otherwise the writeback cache is on.
"""

from __future__ import annotations

import bisect
import contextvars
import ctypes
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from agentfs.audit.recorder import PENDING, Recorder, finish_pending
from agentfs.errors import FsError
from agentfs.mount.boundary import errno_for
from agentfs.mount.gate import Gate
from agentfs.mount.kernel import proto as p
from agentfs.mount.kernel.passthrough import Backings
from agentfs.mount.kernel.session import Reply, RequestBuffer, Session, Unlocked
from agentfs.overlay.attrs import Attr
from agentfs.overlay.engine import Overlay
from agentfs.overlay.hostio import join, split
from agentfs.overlay.inodes import ROOT_INO
from agentfs.policy.approvals import ApprovalBroker, Ticket
from agentfs.policy.guard import ALLOWED, Guard, Verdict, open_ops
from agentfs.proc import interrupted

log = logging.getLogger(__name__)

CACHE_TIMEOUT: Final = 300    # seconds, as the pyfuse3 front end (fuse3_ops.CACHE_TIMEOUT)
SHARED_ROOT_ATTR_TIMEOUT: Final = 1  # per-process: as fuse3_ops.SHARED_ROOT_ATTR_TIMEOUT
POLL: Final = 0.05            # how often a waiting request looks for a pending signal
NS: Final = 1_000_000_000
M32: Final = 0xFFFFFFFF
RENAME_EXCHANGE: Final = 2
DIR_OPEN_FLAGS: Final = p.FOPEN_CACHE_DIR | p.FOPEN_KEEP_CACHE
_ACCMODE: Final = os.O_ACCMODE
_WRITEBACK_TIMES: Final = p.FATTR_MTIME | p.FATTR_CTIME | p.FATTR_FH | p.FATTR_LOCKOWNER
_LOST_TIMES: Final = p.FATTR_ATIME | p.FATTR_MTIME | p.FATTR_CTIME | p.FATTR_LOCKOWNER

# READs of at least this many bytes read without the engine lock (session.Unlocked); a
# smaller one is quicker done under it than handed over (a dup, a close, a lock more)
UNLOCKED_READ: Final = 128 * 1024
STORE_LIMIT: Final = 128 * 1024  # files up to this size go to the kernel at open
STORE_KNOB: Final = "AGENTFS_FUSE_STORE"  # =0: never (for measuring, see _store_small)
READ_AHEAD: Final = 4 << 20  # what a sequential large READ asks the host to read next
# what a request asked of a person goes on to: a whole reply, never an Unlocked one
# (only READ returns those, and a READ asks nobody)
Answer = bytes | list[Any] | None


class Listing:
    """One open directory's snapshot, ordered by a cookie derived from each name.

    The kernel's readdir cache (FOPEN_CACHE_DIR) is filled by whichever reader is at
    its end, so it can continue one handle's listing with another handle's entries
    from the same offset.  Offsets that were indexes into per-handle snapshots then
    repeated or dropped names whenever two snapshots listed the names in another
    order (the engine's cached listing keeps new names at its end, a fresh one has the
    host's order).  A cookie that belongs to the name, not to its position (like
    ext4's hash cookies), means "resume after this name" in every snapshot, so no
    unchanged name is repeated or lost."""

    __slots__ = ("cookies", "names", "nodeid", "path", "taken")

    def __init__(self, nodeid: int, path: str) -> None:
        self.nodeid = nodeid
        self.path = path
        self.names: list[str] = []
        self.cookies: list[int] = []
        self.taken = False

    def take(self, names: list[str]) -> None:
        keyed = sorted((_cookie(name), name) for name in names)
        self.cookies = [c for c, _ in keyed]
        self.names = [n for _, n in keyed]
        self.taken = True

    def resume(self, offset: int) -> int:
        """Index of the first entry after the one whose cookie is *offset*."""
        return bisect.bisect_right(self.cookies, offset) if offset else 0


def _cookie(name: str) -> int:
    """A positive 63-bit offset for *name*, stable for the daemon's lifetime (0 means
    the start, and the kernel stores offsets as signed 64-bit)."""
    return (hash(name) & 0x7FFF_FFFF_FFFF_FFFF) or 1


class _Waiter:
    """A request waiting for a person's answer."""

    __slots__ = ("event", "interrupted", "pid", "unique")

    def __init__(self, unique: int, pid: int) -> None:
        self.unique, self.pid = unique, pid
        self.event = threading.Event()
        self.interrupted = False


def _kill_suid(mode: int) -> int | None:
    """The mode without set-uid (and set-gid, if group-executable), or None if
    there is nothing to drop (what a write by a caller without CAP_FSETID does)."""
    if not stat.S_ISREG(mode):
        return None
    drop = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
    return mode & ~drop & 0o7777 if mode & drop else None


def _cstr(buf: RequestBuffer, start: int, n: int) -> str:
    """The NUL-terminated string at *start* in a request of *n* bytes in *buf*."""
    end = buf.find(b"\0", start, n)
    return buf[start:n if end < 0 else end].decode("utf-8", "surrogateescape")


def _same(ino: int) -> int:
    return ino


def forget_each(buf: RequestBuffer, mv: memoryview, forget: Callable[[int, int], None]
                ) -> None:
    """BATCH_FORGET: *forget*(node, count) for each node in the request; one that fails
    is logged and the rest are still forgotten (the request gets no reply)."""
    count = p.BATCH_FORGET_IN.unpack_from(buf, 40)[0]
    for node, nlookup in p.FORGET_ONE.iter_unpack(mv[48:48 + 16 * count]):
        try:
            forget(node, nlookup)
        except Exception:
            log.exception("forget of node %d", node)


class KernelOperations:
    """One branch view behind the kernel protocol: the whole mount (pinned), or one
    of the views of a per-process mount (see kernel/perprocess.py).

    A view of a per-process mount is given *export* and *local* (its inode numbers to
    the kernel's node ids and back: nodes of all views share one number space, while
    st_ino stays the branch's own, so `git status` finds the numbers its index holds),
    *dir_handles* (where its directory handle numbers start: handles of the shared root
    must say whose they are), *shared_root* (the root and the names right under it
    mean another branch for another caller: never cached) and the mount's *lock*."""

    def __init__(self, overlay: Overlay, guard: Guard | None = None,
                 recorder: Recorder | None = None, cache_timeout: int = CACHE_TIMEOUT,
                 export: Callable[[int], int] = _same, local: Callable[[int], int] = _same,
                 dir_handles: int = 1, shared_root: bool = False,
                 lock: threading.RLock | None = None) -> None:
        self.ov = overlay
        self.guard = guard
        self.gate = Gate(overlay, guard, recorder)
        self.engine_lock = lock or threading.RLock()
        self.timeout = int(cache_timeout)
        self.export, self.local = export, local
        self.shared_root = shared_root
        self.session: Session | None = None
        self.buf: RequestBuffer = bytearray()
        self.mv = memoryview(self.buf)
        self._dirs: dict[int, Listing] = {}
        self._xattr_names: dict[int, frozenset[bytes]] = {}
        self._next_dir = dir_handles
        self._waiting: dict[int, _Waiter] = {}
        self._read_ends: dict[int, int] = {}  # fh: where its last large READ ended
        self._stored: set[int] = set()  # node ids whose data the kernel got at open
        self._store = os.environ.get(STORE_KNOB, "") != "0"
        self._threads: set[threading.Thread] = set()
        self._setxattr_ext = False
        self._killpriv_v2 = False
        self.backings = Backings()
        self._libc: ctypes.CDLL | None = None

    # -- wiring ----------------------------------------------------------------------------
    def attach(self, session: Session) -> None:
        """Serve *session*'s requests: fill its dispatch table."""
        self.join(session)
        session.on_interrupt = self.interrupt
        session.on_init = self.init_flags
        session.bind = self.use_buffer
        self.handlers(session.table)

    def join(self, session: Session) -> None:
        """Reply and notify through *session* (a per-process mount's router dispatches)."""
        self.session = session
        self.buf = session.buf
        self.mv = memoryview(session.buf)

    # opcode -> handler method
    HANDLERS: Final[dict[int, str]] = {
        p.LOOKUP: "lookup",
        p.FORGET: "forget",
        p.BATCH_FORGET: "batch_forget",
        p.GETATTR: "getattr",
        p.SETATTR: "setattr",
        p.READLINK: "readlink",
        p.SYMLINK: "symlink",
        p.MKNOD: "mknod",
        p.MKDIR: "mkdir",
        p.UNLINK: "unlink",
        p.RMDIR: "rmdir",
        p.RENAME: "rename",
        p.RENAME2: "rename2",
        p.LINK: "link",
        p.OPEN: "open",
        p.READ: "read",
        p.WRITE: "write",
        p.STATFS: "statfs",
        p.RELEASE: "release",
        p.FSYNC: "fsync",
        p.SETXATTR: "setxattr",
        p.GETXATTR: "getxattr",
        p.LISTXATTR: "listxattr",
        p.REMOVEXATTR: "removexattr",
        p.OPENDIR: "opendir",
        p.READDIR: "readdir",
        p.READDIRPLUS: "readdirplus",
        p.RELEASEDIR: "releasedir",
        p.ACCESS: "access",
        p.CREATE: "create",
        p.FALLOCATE: "fallocate",
        p.COPY_FILE_RANGE: "copy_file_range",
    }

    def handlers(self, t: list[Any]) -> None:
        """This view's handler of each opcode, into table *t*."""
        for opcode, name in self.HANDLERS.items():
            t[opcode] = getattr(self, name)
        # FLUSH and FSYNCDIR are answered ENOSYS: both did nothing here (data goes
        # straight to the host file, directory changes are durable renames/creates), and
        # after one ENOSYS the kernel stops sending them: a round trip less per close.
        # The kernel still writes dirty pages back before close returns.
        # LSEEK (SEEK_DATA/SEEK_HOLE) stays ENOSYS: the kernel does not write dirty
        # pages back before asking, so with the writeback cache the host file's holes
        # would be wrong; the kernel's fallback (all data up to the size) is right.

    def init_flags(self, flags: int) -> None:
        """What INIT agreed on (this view may be made after it)."""
        self._setxattr_ext = bool(flags & p.SETXATTR_EXT)
        self._killpriv_v2 = bool(flags & p.HANDLE_KILLPRIV_V2)
        if self.session is not None and self.session.passthrough:
            self.backings.enable(self.session.fd)

    def shutdown(self) -> None:
        """The loop is over: end every wait for an answer (EINTR) and let them finish."""
        with self.engine_lock:
            for waiter in self._waiting.values():
                waiter.interrupted = True
                waiter.event.set()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    # -- what the daemon asks of a view ------------------------------------------------------
    def drop_kernel_entry(self, path: str) -> None:
        """Make the kernel look *path* up again (it may hold a negative entry for it) and
        list its directory again (a cached listing lacks it)."""
        if not path or self.session is None:
            return
        parent, name = split(path)
        for ino, node in self.ov.inodes.nodes.items():
            if parent in node.paths:
                self.session.notify_inval_entry(self.export(ino), os.fsencode(name))
                self.session.notify_inval_inode(self.export(ino))
                return

    def drop_kernel_entries(self) -> None:
        """Make the kernel look every known name up again (after a policy reload that
        restricts stat, cached entries must not answer for the old policy)."""
        if self.session is None:
            return
        by_path = {q: ino for ino, node in self.ov.inodes.nodes.items() for q in node.paths}
        for path in by_path:
            if not path:
                continue
            parent, name = split(path)
            parent_ino = by_path.get(parent)
            if parent_ino is not None:
                self.session.notify_inval_entry(self.export(parent_ino), os.fsencode(name))

    def use_buffer(self, buf: RequestBuffer, mv: memoryview) -> None:
        """The next handlers read their request from *buf* (another request thread's)."""
        self.buf = buf
        self.mv = mv

    # -- request helpers -----------------------------------------------------------------------
    def _name(self, start: int, n: int) -> str:
        """The NUL-terminated name at *start* in the request."""
        return _cstr(self.buf, start, n)

    def _two_names(self, start: int, n: int) -> tuple[str, str]:
        buf = self.buf
        mid = buf.find(b"\0", start, n)
        end = buf.find(b"\0", mid + 1, n)
        return (buf[start:mid].decode("utf-8", "surrogateescape"),
                buf[mid + 1:n if end < 0 else end].decode("utf-8", "surrogateescape"))

    def _path(self, nodeid: int) -> str:
        return self.ov.inodes.path(nodeid)

    def _entry_timeout(self, path: str) -> int:
        """No caching of the shared root's own entry and of the names right under it."""
        return 0 if self.shared_root and "/" not in path else self.timeout

    def _entry(self, unique: int, a: Attr, path: str) -> bytes:
        t = self._entry_timeout(path)
        asec, ans = divmod(a.atime_ns, NS)
        msec, mns = divmod(a.mtime_ns, NS)
        csec, cns = divmod(a.ctime_ns, NS)
        return p.ENTRY_OUT.pack(144, 0, unique, self.export(a.ino),
                                self.ov.inodes.generation(a.ino), t, t, 0, 0, a.ino, a.size,
                                a.blocks, asec, msec, csec, ans, mns, cns, a.mode, a.nlink,
                                a.uid, a.gid, a.rdev & M32, a.blksize, 0)

    def _negative(self, unique: int, path: str) -> bytes:
        return p.ENTRY_OUT.pack(144, 0, unique, 0, 0, self._entry_timeout(path), 0, 0, 0, 0,
                                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)

    def _attr(self, unique: int, a: Attr) -> bytes:
        asec, ans = divmod(a.atime_ns, NS)
        msec, mns = divmod(a.mtime_ns, NS)
        csec, cns = divmod(a.ctime_ns, NS)
        t = SHARED_ROOT_ATTR_TIMEOUT if self.shared_root and a.ino == ROOT_INO else self.timeout
        return p.ATTR_OUT.pack(120, 0, unique, t, 0, 0, a.ino, a.size, a.blocks,
                               asec, msec, csec, ans, mns, cns, a.mode, a.nlink, a.uid, a.gid,
                               a.rdev & M32, a.blksize, 0)

    def _new(self, unique: int, path: str, attr: Attr) -> bytes:
        """A new object's entry: the kernel now holds a reference to it."""
        self.ov.inodes.remember(attr.ino, path)
        return self._entry(unique, attr, path)

    @staticmethod
    def _ok(unique: int) -> bytes:
        return p.OUT_HEADER.pack(16, 0, unique)

    @staticmethod
    def _data(unique: int, data: bytes) -> bytes | list[Any]:
        if len(data) < 65536:
            return p.OUT_HEADER.pack(16 + len(data), 0, unique) + data
        return [p.OUT_HEADER.pack(16 + len(data), 0, unique), data]

    # -- policy ---------------------------------------------------------------------------------
    def _go(self, verdict: Verdict, path: str, unique: int, pid: int,
            then: Callable[[], Answer]) -> Reply:
        """Go on (*then*), fail, or hand the rest of the request to a waiting thread."""
        if verdict is ALLOWED:
            return then()
        if verdict.errno:
            raise FsError(verdict.errno)
        if verdict.ticket is None:
            self.gate.allowed(verdict, path)
            return then()
        assert self.guard is not None
        waiter = _Waiter(unique, pid)
        verdict.ticket.add_waker(waiter.event.set)
        self._waiting[unique] = waiter
        context = contextvars.copy_context()  # the caller and the audit event go along
        PENDING.set(None)                      # finished by the waiting thread
        thread = threading.Thread(target=context.run, name=f"agentfs-ask-{unique}",
                                  args=(self._finish_asked, waiter, verdict, path, then),
                                  daemon=True)
        self._threads.add(thread)
        thread.start()
        return None

    def _finish_asked(self, waiter: _Waiter, verdict: Verdict, path: str,
                      then: Callable[[], Answer]) -> None:
        ticket = verdict.ticket
        assert ticket is not None and self.guard is not None and self.session is not None
        reply: Answer
        try:
            self._wait(waiter, ticket, self.guard.broker)
        except FsError as exc:
            with self.engine_lock:
                finish_pending(exc.errno)
            reply = p.OUT_HEADER.pack(16, -exc.errno, waiter.unique)
        else:
            with self.engine_lock:
                try:
                    if (ticket.answer or ticket.on_timeout) != "allow":
                        raise FsError(verdict.decision.errno if verdict.decision
                                      else errno.EACCES)
                    self.gate.allowed(verdict, path)
                    reply = then()
                except Exception as exc:
                    code = errno_for(exc, "asked request")
                    finish_pending(code)
                    reply = p.OUT_HEADER.pack(16, -code, waiter.unique)
                else:
                    finish_pending(0)
        with self.engine_lock:
            self._waiting.pop(waiter.unique, None)
            self._threads.discard(threading.current_thread())
        if reply is not None:
            self.session.reply(reply)

    def _wait(self, waiter: _Waiter, ticket: Ticket, broker: ApprovalBroker) -> None:
        """Until the answer, the deadline (the policy's on-timeout decision) or an
        interrupt (FsError EINTR)."""
        while True:
            answered = waiter.event.wait(POLL)
            if answered and not waiter.interrupted:
                return
            if waiter.interrupted or (waiter.pid > 0 and interrupted(waiter.pid)):
                with self.engine_lock:
                    if ticket.answer is None:
                        broker.leave(ticket, "interrupted")
                raise FsError(errno.EINTR)
            if time.monotonic() >= ticket.deadline:
                with self.engine_lock:
                    if ticket.answer is None:
                        broker.leave(ticket, "timeout")
                return

    def interrupt(self, unique: int) -> None:
        """FUSE_INTERRUPT: the asking thread got a signal; only a waiting request can
        be cut short (everything else is answered before the next request is read)."""
        waiter = self._waiting.get(unique)
        if waiter is not None:
            waiter.interrupted = True
            waiter.event.set()

    # -- namespace ------------------------------------------------------------------------------
    def lookup(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        name = self._name(40, n)
        ov = self.ov
        if name == ".":
            return self._entry(unique, ov.getattr_ino(nodeid), ov.inodes.path(nodeid))
        path = join(ov.inodes.path(nodeid), name)
        if name == "..":
            parent = path.rsplit("/", 2)[0] if path.count("/") >= 2 else ""
            return self._new(unique, parent, ov.getattr(parent))
        if self.gate.restricts_path(pid, "stat", path):
            return self._go(self.gate.check(pid, uid, (("stat", path),)), path, unique, pid,
                            lambda: self._lookup(unique, path))
        return self._lookup(unique, path)

    def _lookup(self, unique: int, path: str) -> bytes:
        attr = self.ov.lookup_or_none(path)
        return (self._negative(unique, path) if attr is None
                else self._entry(unique, attr, path))

    def forget_node(self, nodeid: int, count: int) -> None:
        self.ov.forget(nodeid, count)
        if not self.ov.inodes.referenced(nodeid):
            self._xattr_names.pop(nodeid, None)
            self._stored.discard(nodeid)
            self.backings.forget(nodeid)

    def forget(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        self.forget_node(nodeid, p.FORGET_IN.unpack_from(self.buf, 40)[0])
        return None

    def batch_forget(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                     ) -> Reply:
        forget_each(self.buf, self.mv, self.forget_node)
        return None

    def getattr(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        ov = self.ov
        if (self.gate.restricts(pid, "stat") and ov.inodes.has_path(nodeid)
                and self.gate.restricts_path(pid, "stat", path := ov.inodes.path(nodeid))):
            return self._go(self.gate.check(pid, uid, (("stat", path),)), path, unique, pid,
                            lambda: self._attr(unique, ov.getattr_ino(nodeid)))
        return self._attr(unique, ov.getattr_ino(nodeid))

    def setattr(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        (valid, _, fh, size, _, atime, mtime, _, atimens, mtimens, _, mode, _, new_uid,
         new_gid, _) = p.SETATTR_IN.unpack_from(self.buf, 40)
        ov = self.ov
        if valid & ~_LOST_TIMES == 0 and ov.lost(nodeid):
            # the writeback of a removed file's times: what the engine would answer
            return p.OUT_HEADER.pack(16, -errno.ENOENT, unique)
        path = ov.inodes.path(nodeid) if ov.inodes.has_path(nodeid) else None
        now = time.time_ns() if valid & (p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW) else 0
        atime_ns = (atime * NS + atimens if valid & p.FATTR_ATIME
                    else now if valid & p.FATTR_ATIME_NOW else None)
        mtime_ns = (mtime * NS + mtimens if valid & p.FATTR_MTIME
                    else now if valid & p.FATTR_MTIME_NOW else None)
        handle = fh if valid & p.FATTR_FH else None

        def then() -> bytes:
            result = ov.setattr(
                path, mode=mode if valid & p.FATTR_MODE else None,
                uid=new_uid if valid & p.FATTR_UID else None,
                gid=new_gid if valid & p.FATTR_GID else None,
                size=size if valid & p.FATTR_SIZE else None,
                atime_ns=atime_ns, mtime_ns=mtime_ns, fh=handle, ino=nodeid)
            if valid & p.FATTR_KILL_SUIDGID and self._killpriv_v2:
                killed = _kill_suid(result.mode)
                if killed is not None:
                    result = ov.setattr(path, mode=killed, fh=handle, ino=nodeid)
            return self._attr(unique, result)

        if valid & ~_WRITEBACK_TIMES == 0 and valid & p.FATTR_FH and self.ov.writable(fh):
            # the writeback cache handing over the times of writes made through a handle
            # the policy allowed at open: bookkeeping of those writes, not a new request
            return then()
        if path is not None and self.guard is not None:
            ops = [op for op, wanted in (
                ("chmod", valid & p.FATTR_MODE),
                ("chown", valid & (p.FATTR_UID | p.FATTR_GID)),
                ("truncate", valid & p.FATTR_SIZE),
                ("utimens", atime_ns is not None or mtime_ns is not None)) if wanted]
            if ops:
                return self._go(self.gate.check_object(pid, uid, ops, path), path, unique,
                                pid, then)
        return then()

    def readlink(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                 ) -> Reply:
        path = self._path(nodeid)
        return self._go(self.gate.check(pid, uid, (("readlink", path),)), path, unique, pid,
                        lambda: self._data(unique, os.fsencode(self.ov.readlink(path))))

    def symlink(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        name, target = self._two_names(40, n)
        path = join(self._path(nodeid), name)
        return self._go(self.gate.check(pid, uid, (("symlink", path),)), path, unique, pid,
                        lambda: self._new(unique, path,
                                          self.ov.symlink(path, target, uid, gid)))

    def mknod(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        mode, rdev, _, _ = p.MKNOD_IN.unpack_from(self.buf, 40)
        path = join(self._path(nodeid), self._name(56, n))
        return self._go(self.gate.check(pid, uid, (("mknod", path),)), path, unique, pid,
                        lambda: self._new(unique, path,
                                          self.ov.mknod(path, mode, rdev, uid, gid)))

    def mkdir(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        mode = p.MKDIR_IN.unpack_from(self.buf, 40)[0]
        path = join(self._path(nodeid), self._name(48, n))
        return self._go(self.gate.check(pid, uid, (("mkdir", path),)), path, unique, pid,
                        lambda: self._new(unique, path, self.ov.mkdir(path, mode, uid, gid)))

    def link(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        old = self.local(p.LINK_IN.unpack_from(self.buf, 40)[0])
        dst = join(self._path(nodeid), self._name(48, n))
        src = self._path(old)

        def then() -> bytes:
            attr = self.ov.link(src, dst)
            self.gate.linked(attr.ino, dst)
            return self._new(unique, dst, attr)

        return self._go(self.gate.check_link(pid, uid, src, dst), dst, unique, pid, then)

    def unlink(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        path = join(self._path(nodeid), self._name(40, n))

        def then() -> bytes:
            self.ov.unlink(path)
            return self._ok(unique)

        return self._go(self.gate.check(pid, uid, (("unlink", path),)), path, unique, pid,
                        then)

    def rmdir(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        path = join(self._path(nodeid), self._name(40, n))

        def then() -> bytes:
            self.ov.rmdir(path)
            return self._ok(unique)

        return self._go(self.gate.check(pid, uid, (("rmdir", path),)), path, unique, pid,
                        then)

    def rename(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        newdir = self.local(p.RENAME_IN.unpack_from(self.buf, 40)[0])
        return self._rename(unique, nodeid, newdir, 0, *self._two_names(48, n), uid, pid)

    def rename2(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        newdir, flags, _ = p.RENAME2_IN.unpack_from(self.buf, 40)
        return self._rename(unique, nodeid, self.local(newdir), flags,
                            *self._two_names(56, n), uid, pid)

    def _rename(self, unique: int, olddir: int, newdir: int, flags: int, old: str, new: str,
                uid: int, pid: int) -> Reply:
        src = join(self._path(olddir), old)
        dst = join(self._path(newdir), new)
        exchange = bool(flags & RENAME_EXCHANGE)

        def then() -> bytes:
            self.ov.rename(src, dst, flags)
            self.gate.renamed(src, dst, exchange)
            return self._ok(unique)

        return self._go(self.gate.check_rename(pid, uid, src, dst, exchange), dst, unique,
                        pid, then)

    # -- files ------------------------------------------------------------------------------------
    def open(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        flags, open_flags = p.OPEN_IN.unpack_from(self.buf, 40)
        path = self._path(nodeid)

        def then() -> bytes:
            fh = self.ov.open(path, flags)
            self.gate.opened(fh, path, pid, uid)
            if flags & _ACCMODE != os.O_RDONLY and nodeid not in self._xattr_names:
                self._remember_xattrs(nodeid, fh)
            if open_flags & p.OPEN_KILL_SUIDGID and self._killpriv_v2:
                self._kill_suid_fh(fh, nodeid)
            mode, backing = self._io_mode(fh, nodeid)
            if mode == p.FOPEN_KEEP_CACHE and flags & (_ACCMODE | os.O_DIRECT) == os.O_RDONLY:
                self._store_small(fh, nodeid)
            return p.OPEN_OUT.pack(32, 0, unique, fh, mode, backing)

        ops = open_ops(flags)
        if not ops:
            return then()
        return self._go(self.gate.check_object(pid, uid, ops, path, "open"), path, unique,
                        pid, then)

    def _io_mode(self, fh: int, nodeid: int) -> tuple[int, int]:
        """(open flags, backing id) of new handle *fh*: passed through to its host file
        when that is the branch's own (kernel.passthrough), else kernel-cached.  Not a
        writer of a set-uid/set-gid file: the kernel writes a passed-through file with
        the daemon's privilege, so the bits a write by another user must drop would stay
        (through the daemon, the write's KILL_SUIDGID flag drops them)."""
        h = self.ov.handles[fh]
        may_pass = h.on_top and self.backings.on
        st = (os.fstat(h.fd) if may_pass and h.flags & _ACCMODE != os.O_RDONLY
              else None)  # a writer's: its mode now, its size and times for the audit
        if st is not None and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            may_pass = False
        flags, backing = self.backings.open_flags(fh, nodeid, h.fd, may_pass)
        if backing:
            self.gate.passed_through(fh, h.fd, st)
        return flags, backing

    def _store_small(self, fh: int, nodeid: int) -> None:
        """A small file of a frozen layer, opened for reading (a cached-mode handle, not
        O_DIRECT: the caller checks): its whole content goes into the kernel's page
        cache now (NOTIFY_STORE, before the OPEN reply), so its reads take no READ
        request.  Reading a tree (grep, compileall) paid a
        round trip per file for what is one pread here: side by side on the bench
        (AGENTFS_BENCH_ENV=AGENTFS_FUSE_STORE=0 for the old way), grep -r over 3,000
        base files 780 -> 637 ms, its daemon's context switches 20,000 -> 13,500.
        Only while this is the inode's one open handle (see `Session.store_now`); the
        data never changes (a copy-up gives the writer another file), and the kernel
        keeps it until it forgets the inode (`_stored` until then: larger files are
        marked too, and skipped).  The audit counts the stored bytes as the handle's
        read.  *nodeid* is the view's own (per process, the kernel knows it as
        `export(nodeid)`)."""
        if not self._store or nodeid in self._stored or self.session is None:
            return
        h = self.ov.handles[fh]
        if h.on_top or self.backings.cached_opens(nodeid) != 1:
            return  # tried again at a later open
        self._stored.add(nodeid)
        size = os.fstat(h.fd).st_size
        if not 0 < size <= STORE_LIMIT:
            return
        data = os.pread(h.fd, size, 0)
        if data and self.session.store_now(self.export(nodeid), data):
            self.gate.read(fh, len(data))

    def _kill_suid_fh(self, fh: int, nodeid: int) -> None:
        """A write or O_TRUNC by a caller without CAP_FSETID (HANDLE_KILLPRIV_V2): drop
        set-uid/set-gid, and make the kernel forget the mode it caches (neither reply
        carries attributes)."""
        killed = _kill_suid(self.ov.fh_attr(fh).mode)
        if killed is not None:
            self.ov.setattr(None, mode=killed, fh=fh)
            if self.session is not None:
                self.session.drop_attributes_now(self.export(nodeid))

    def create(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        flags, mode, _, _ = p.CREATE_IN.unpack_from(self.buf, 40)
        path = join(self._path(nodeid), self._name(56, n))

        def then() -> bytes:
            fh, a = self.ov.create(path, flags, mode, uid, gid)
            self.gate.opened(fh, path, pid, uid)
            gen = self.ov.inodes.remember(a.ino, path)
            self._remember_xattrs(a.ino, fh)
            t = self._entry_timeout(path)
            asec, ans = divmod(a.atime_ns, NS)
            msec, mns = divmod(a.mtime_ns, NS)
            csec, cns = divmod(a.ctime_ns, NS)
            return p.CREATE_OUT.pack(160, 0, unique, self.export(a.ino), gen, t, t, 0, 0,
                                     a.ino, a.size,
                                     a.blocks, asec, msec, csec, ans, mns, cns, a.mode,
                                     a.nlink, a.uid, a.gid, a.rdev & M32, a.blksize, 0, fh,
                                     *self._io_mode(fh, a.ino))

        return self._go(self.gate.check(pid, uid, (("create", path), ("open_write", path),
                                                   ("write", path))), path, unique, pid, then)

    def read(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        fh, offset, size, _, _, _, _ = p.READ_IN.unpack_from(self.buf, 40)
        if size < UNLOCKED_READ:
            data = self.ov.read(fh, offset, size)
            self.gate.read(fh, len(data))
            return self._data(unique, data)
        last_end = self._read_ends.get(fh, 0)
        sequential = last_end - READ_AHEAD <= offset <= last_end + READ_AHEAD
        self._read_ends[fh] = offset + size
        fd = os.dup(self.ov.read_fd(fh))  # a copy-up may close the handle's own meanwhile
        return Unlocked(lambda: self._read_unlocked(fd, fh, offset, size, unique,
                                                    sequential))

    def _read_unlocked(self, fd: int, fh: int, offset: int, size: int, unique: int,
                       sequential: bool) -> bytes | list[Any]:
        """A large READ, without the engine lock (session.Unlocked).

        Sequential: the kernel sends a file's readahead as several READs at once, and
        the request threads' preads, arriving out of order, kept the host's readahead
        from ramping up (a cold 64 MiB base file: 72 ms on 8 threads, 53 on one);
        asking for the next READ_AHEAD bytes explicitly keeps the disk busy (54 ms, and
        steadier).  (Reading into a per-thread buffer instead of a new bytes object
        made no difference: 56 against 55 ms.)"""
        try:
            if sequential:
                os.posix_fadvise(fd, offset + size, READ_AHEAD, os.POSIX_FADV_WILLNEED)
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        with self.engine_lock:
            self.gate.read(fh, len(data))
        return self._data(unique, data)

    def write(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        fh, offset, size, write_flags, _, _, _ = p.WRITE_IN.unpack_from(self.buf, 40)
        written = self.ov.write(fh, offset, self.mv[80:80 + size])  # type: ignore[arg-type]
        self.gate.wrote(fh, written)
        if write_flags & p.WRITE_KILL_SUIDGID and self._killpriv_v2:
            self._kill_suid_fh(fh, nodeid)
        return p.WRITE_OUT.pack(24, 0, unique, written, 0)

    def fsync(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        fh, flags, _ = p.FSYNC_IN.unpack_from(self.buf, 40)
        self.ov.fsync(fh, bool(flags & p.FSYNC_FDATASYNC))
        return p.OUT_HEADER.pack(16, 0, unique)

    def release(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        fh = p.RELEASE_IN.unpack_from(self.buf, 40)[0]
        self._read_ends.pop(fh, None)
        self.backings.released(fh)
        self.gate.released(fh)  # first: a passed-through handle's audit looks at its fd
        self.ov.release(fh)
        return p.OUT_HEADER.pack(16, 0, unique)

    def _writable_fd(self, fh: int) -> int:
        handle = self.ov.handles.get(fh)
        if handle is None or handle.flags & _ACCMODE == os.O_RDONLY:
            raise FsError(errno.EBADF)
        return handle.fd

    def fallocate(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                  ) -> Reply:
        fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(self.buf, 40)
        fd = self._writable_fd(fh)
        if mode == 0:
            os.posix_fallocate(fd, offset, length)
        else:
            if self._libc is None:
                self._libc = ctypes.CDLL(None, use_errno=True)
                self._libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                                 ctypes.c_longlong, ctypes.c_longlong]
            if self._libc.fallocate(fd, mode, offset, length) != 0:
                raise FsError(ctypes.get_errno() or errno.EIO)
        return p.OUT_HEADER.pack(16, 0, unique)

    def copy_file_range(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                        ) -> Reply:
        fh_in, off_in, node_out, fh_out, off_out, length, flags = \
            p.COPY_FILE_RANGE_IN.unpack_from(self.buf, 40)
        if flags:
            raise FsError(errno.EINVAL)
        self.local(node_out)  # EXDEV when it is another view's: the kernel copies itself
        source = self.ov.handles.get(fh_in)
        if source is None:
            raise FsError(errno.EBADF)
        copied = os.copy_file_range(source.fd, self._writable_fd(fh_out), length, off_in,
                                    off_out)
        self.gate.read(fh_in, copied)
        self.gate.wrote(fh_out, copied)
        return p.WRITE_OUT.pack(24, 0, unique, copied, 0)

    # -- directories ----------------------------------------------------------------------------
    def opendir(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        path = self._path(nodeid)

        def then() -> bytes:
            # no listing yet: a directory the kernel has cached is never read, and the
            # first READDIR's snapshot must not be older than what the kernel's cache
            # records for it (the directory's version when that READDIR is sent)
            fh = self._next_dir
            self._next_dir += 1
            self._dirs[fh] = Listing(nodeid, path)
            # the shared root's listing is another one for another branch: not cached
            flags = 0 if self.shared_root and nodeid == ROOT_INO else DIR_OPEN_FLAGS
            return p.OPEN_OUT.pack(32, 0, unique, fh, flags, 0)

        return self._go(self.gate.check(pid, uid, (("readdir", path),)), path, unique, pid,
                        then)

    def _listing(self, fh: int, offset: int) -> tuple[str, list[str], list[int], int]:
        """The handle's snapshot, its cookies, and where *offset* resumes in it."""
        listing = self._dirs[fh]
        if offset == 0 or not listing.taken:  # (re)start: a fresh snapshot
            # where the directory is now (renamed since the open?); removed: ENOENT, as
            # a plain directory reads once it is gone (not the listing of whatever
            # has its old name now)
            paths = self.ov.inodes.paths_or_none(listing.nodeid)
            if not paths:
                raise FsError(errno.ENOENT)
            listing.path = paths[0]
            listing.take(self.ov.listdir(listing.path))
        return listing.path, listing.names, listing.cookies, listing.resume(offset)

    def readdir(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        fh, offset, size, _, _, _, _ = p.READ_IN.unpack_from(self.buf, 40)
        path, names, cookies, start = self._listing(fh, offset)
        getattr_ = self.ov.getattr
        pack = p.DIRENT.pack
        pad = p.PADDING
        parts = [b""]
        room = size
        for i in range(start, len(names)):
            name = names[i]
            try:
                a = getattr_(join(path, name))
            except FsError:
                continue  # removed since the snapshot
            raw = name.encode("utf-8", "surrogateescape")
            length = 24 + len(raw)
            padded = (length + 7) & ~7
            if padded > room:
                break
            room -= padded
            parts.append(pack(a.ino, cookies[i], len(raw), (a.mode >> 12) & 0xF) + raw
                         + pad[padded - length])
        parts[0] = p.OUT_HEADER.pack(16 + size - room, 0, unique)
        return b"".join(parts)

    def readdirplus(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                    ) -> Reply:
        fh, offset, size, _, _, _, _ = p.READ_IN.unpack_from(self.buf, 40)
        path, names, cookies, start = self._listing(fh, offset)
        ov = self.ov
        getattr_ = ov.getattr
        remember = ov.inodes.remember
        pack = p.DIRENTPLUS.pack
        pad = p.PADDING
        t = 0 if self.shared_root and not path else self.timeout  # see _entry_timeout
        export = self.export
        restricted = self.gate.path_restricts(pid, "stat")
        held = ov.inodes.held
        parts = [b""]
        room = size
        for i in range(start, len(names)):
            name = names[i]
            child = join(path, name)
            try:
                a = getattr_(child)
            except FsError:
                continue  # removed since the snapshot
            raw = name.encode("utf-8", "surrogateescape")
            length = 152 + len(raw)
            padded = (length + 7) & ~7
            if padded > room:
                break
            room -= padded
            if held(a.ino, child) or (restricted is not None and restricted(child)):
                # the name only (as READDIR gives it): node id 0 makes no dentry.  For a
                # name the kernel holds already (looked up: `git status` lstats every
                # file before it lists a directory) that saves the entry's attributes
                # and a reference to forget later; a denied name's stat comes back as a
                # LOOKUP and meets the policy (with the entry, `ls -la` showed a denied
                # name's attributes)
                parts.append(pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                  0, 0, a.ino, cookies[i], len(raw), (a.mode >> 12) & 0xF)
                             + raw + pad[padded - length])
                continue
            asec, ans = divmod(a.atime_ns, NS)
            msec, mns = divmod(a.mtime_ns, NS)
            csec, cns = divmod(a.ctime_ns, NS)
            gen = remember(a.ino, child)  # the kernel counts a lookup for every entry
            parts.append(pack(export(a.ino), gen, t, t, 0, 0, a.ino, a.size, a.blocks, asec,
                              msec, csec,
                              ans, mns, cns, a.mode, a.nlink, a.uid, a.gid, a.rdev & M32,
                              a.blksize, 0, a.ino, cookies[i], len(raw), (a.mode >> 12) & 0xF)
                         + raw + pad[padded - length])
        parts[0] = p.OUT_HEADER.pack(16 + size - room, 0, unique)
        return b"".join(parts)

    def releasedir(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                   ) -> Reply:
        self._dirs.pop(p.RELEASE_IN.unpack_from(self.buf, 40)[0], None)
        return p.OUT_HEADER.pack(16, 0, unique)

    # -- misc -------------------------------------------------------------------------------------
    def statfs(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        st = self.ov.statfs()
        return p.STATFS_OUT.pack(96, 0, unique, st.f_blocks, st.f_bfree, st.f_bavail,
                                 st.f_files, st.f_ffree, st.f_bsize, st.f_namemax, st.f_frsize,
                                 0)

    def access(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        mask = p.ACCESS_IN.unpack_from(self.buf, 40)[0]
        if not self.ov.access(self._path(nodeid), mask, uid, [gid]):
            raise FsError(errno.EACCES)
        return p.OUT_HEADER.pack(16, 0, unique)

    # The kernel asks for security.capability before writes unless HANDLE_KILLPRIV_V2
    # is on; each inode's xattr names are remembered (the daemon is the only writer),
    # so a missing attribute costs no host call.
    def getxattr(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                 ) -> Reply:
        size = p.GETXATTR_IN.unpack_from(self.buf, 40)[0]
        end = self.buf.find(b"\0", 48, n)
        raw = bytes(self.buf[48:n if end < 0 else end])
        names = self._xattr_names.get(nodeid)
        if names is None:
            names = frozenset(os.fsencode(x) for x in self.ov.listxattr(self._path(nodeid)))
            self._xattr_names[nodeid] = names
        if raw not in names:  # the common case (security.capability): no exception
            return p.OUT_HEADER.pack(16, -errno.ENODATA, unique)
        path = self._path(nodeid)

        def then() -> Answer:
            return self._sized(unique, size, self.ov.getxattr(path, os.fsdecode(raw)))

        return self._go(self.gate.check_object(pid, uid, ["getxattr"], path), path, unique,
                        pid, then)

    def _remember_xattrs(self, nodeid: int, fh: int) -> None:
        """A file about to be written: the kernel asks for security.capability before
        the first write, so its xattr names are read now, through the open handle."""
        self._xattr_names[nodeid] = frozenset(os.fsencode(x) for x in self.ov.fh_xattrs(fh))

    def _sized(self, unique: int, size: int, value: bytes) -> Answer:
        """An xattr value or name list: its size when asked with size 0, ERANGE when it
        does not fit."""
        if size == 0:
            return p.GETXATTR_OUT.pack(24, 0, unique, len(value), 0)
        if len(value) > size:
            raise FsError(errno.ERANGE)
        return self._data(unique, value)

    def listxattr(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                  ) -> Reply:
        size = p.GETXATTR_IN.unpack_from(self.buf, 40)[0]
        path = self._path(nodeid)
        return self._go(self.gate.check_object(pid, uid, ["listxattr"], path), path, unique,
                        pid, lambda: self._sized(unique, size, b"".join(
                            os.fsencode(x) + b"\0" for x in self.ov.listxattr(path))))

    def setxattr(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                 ) -> Reply:
        size, flags = p.SETXATTR_IN.unpack_from(self.buf, 40)
        start = 56 if self._setxattr_ext else 48
        end = self.buf.find(b"\0", start, n)
        name = self.buf[start:end].decode("utf-8", "surrogateescape")
        value = bytes(self.buf[end + 1:end + 1 + size])
        path = self._path(nodeid)

        def then() -> bytes:
            self._xattr_names.pop(nodeid, None)
            self.ov.setxattr(path, name, value, flags)
            return self._ok(unique)

        return self._go(self.gate.check_object(pid, uid, ["setxattr"], path), path, unique,
                        pid, then)

    def removexattr(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                    ) -> Reply:
        name = self._name(40, n)
        path = self._path(nodeid)

        def then() -> bytes:
            self._xattr_names.pop(nodeid, None)
            self.ov.removexattr(path, name)
            return self._ok(unique)

        return self._go(self.gate.check_object(pid, uid, ["removexattr"], path), path, unique,
                        pid, then)
