"""pyfuse3 front end: a thin adapter from FUSE requests to the overlay engine.

One error boundary (`_boundary`): engine errors become their errno, OSError its
errno, anything unexpected is logged with its traceback and answered with EIO, so
the mount never dies of a bug.  pyfuse3 runs every handler on one trio thread, so
the engine needs no locking here.

Kernel caching (pinned mode): the daemon is the only writer of a pinned branch,
so entries and attributes are cached for `CACHE_TIMEOUT` seconds, negative lookups
too, and file pages are kept across opens (keep_cache).  The writeback cache is off:
measured, it costs more than it saves.  Every written file gets an extra SETATTR
(the kernel flushing mtime at close), and large writes go through the page cache
first.  Off, create/untar are ~20% faster and 1 MiB writes 3x; only 4 KiB writes
lose ~15%.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final, ParamSpec, TypeVar

import pyfuse3

from agentfs.audit.recorder import Recorder, finish_pending
from agentfs.errors import FsError
from agentfs.mount.asking import settle
from agentfs.mount.boundary import errno_for
from agentfs.mount.gate import Gate
from agentfs.overlay.attrs import Attr
from agentfs.overlay.engine import Overlay
from agentfs.overlay.hostio import join
from agentfs.overlay.inodes import ROOT_INO
from agentfs.policy.guard import Guard, Verdict, open_ops

log = logging.getLogger(__name__)

CACHE_TIMEOUT: Final = 300.0
SHARED_ROOT_ATTR_TIMEOUT: Final = 1.0
RENAME_EXCHANGE: Final = 2
P = ParamSpec("P")
R = TypeVar("R")


def _boundary(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Errors to errnos, bugs to EIO (logged), and the audit event of a checked request
    finished with its outcome."""
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            result = await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            finish_pending(exc.errno)
            raise
        except Exception as exc:
            code = errno_for(exc, fn.__name__)
            finish_pending(code)
            raise pyfuse3.FUSEError(code) from None
        finish_pending(0)
        return result
    return wrapper


class InodeSpace:
    """How this view's inode numbers appear to the kernel (pinned mode: as they are)."""

    def export(self, local: int) -> int:
        return local

    def local(self, exported: int) -> int:
        return exported


class AgentfsOperations(pyfuse3.Operations):
    """FUSE operations for one overlay view.

    *shared_root*: the root directory is shared with other branches' views (per-process
    mode), so the root's attributes and the names directly under it must not be cached
    by the kernel; everything below belongs to this branch alone and is cached."""

    enable_writeback_cache = False

    def __init__(self, overlay: Overlay, cache_timeout: float = CACHE_TIMEOUT,
                 space: InodeSpace | None = None, shared_root: bool = False,
                 guard: Guard | None = None, recorder: Recorder | None = None) -> None:
        super().__init__()
        self.ov = overlay
        self.guard = guard
        self.gate = Gate(overlay, guard, recorder)
        self.timeout = cache_timeout
        self.space = space or InodeSpace()
        self.shared_root = shared_root
        self._dirs: dict[int, tuple[str, list[str], int]] = {}  # fh -> path, names, pid
        self._xattr_names: dict[int, frozenset[bytes]] = {}
        self._next_dir = 1

    # -- helpers ---------------------------------------------------------
    def _entry(self, attr: Attr, parent: int | None = None) -> pyfuse3.EntryAttributes:
        """*parent*: the local inode of the directory the entry was found in."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.space.export(attr.ino)
        e.generation = self.ov.inodes.next_generation(attr.ino)
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blocks = attr.blocks
        e.st_blksize = attr.blksize
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        if self.shared_root and (attr.ino == ROOT_INO or parent == ROOT_INO):
            e.entry_timeout = 0  # the name under the shared root means another branch
            if attr.ino == ROOT_INO:
                # Every path walk checks the root's permissions; asking each time
                # doubled the requests of a per-process mount.  Another branch's view
                # may see this root's times and link count for up to a second (its
                # own changes invalidate them at once).
                e.attr_timeout = SHARED_ROOT_ATTR_TIMEOUT
        return e

    def _path(self, inode: int, name: bytes | None = None) -> str:
        base = self.ov.inodes.path(self.space.local(inode))
        return base if name is None else join(base, os.fsdecode(name))

    # -- policy, trash, audit -------------------------------------------------
    async def _settle(self, verdict: Verdict, ctx: Any, path: str) -> None:
        if verdict.errno or verdict.ticket is not None:
            assert self.guard is not None
            await settle(verdict, self.guard.broker, _pid(ctx))
        self.gate.allowed(verdict, path)

    async def _check(self, ctx: Any, *checks: tuple[str, str]) -> None:
        verdict = self.gate.check(_pid(ctx), _uid(ctx), checks)
        await self._settle(verdict, ctx, checks[0][1])

    async def _check_object(self, ctx: Any, ops: list[str], path: str,
                            event: str | None = None) -> None:
        if ops:
            verdict = self.gate.check_object(_pid(ctx), _uid(ctx), ops, path, event)
            await self._settle(verdict, ctx, path)

    def _restricts(self, ctx: Any, op: str) -> bool:
        return self.gate.restricts(_pid(ctx), op)

    def _new(self, path: str, attr: Attr, parent: int | None = None
             ) -> pyfuse3.EntryAttributes:
        self.ov.inodes.remember(attr.ino, path)
        return self._entry(attr, parent)

    def drop_kernel_entry(self, path: str) -> None:
        """Make the kernel look *path* up again (it may hold a negative entry for it)."""
        if not path:
            return
        parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
        for ino, node in self.ov.inodes.nodes.items():
            if parent in node.paths:
                pyfuse3.invalidate_entry_async(self.space.export(ino), os.fsencode(name),
                                               ignore_enoent=True)
                return

    def drop_kernel_entries(self) -> None:
        """Make the kernel look every known name up again (after a policy reload that
        restricts stat, cached entries must not answer for the old policy)."""
        by_path = {p: ino for ino, node in self.ov.inodes.nodes.items() for p in node.paths}
        for path in by_path:
            if not path:
                continue
            parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
            parent_ino = by_path.get(parent)
            if parent_ino is not None:
                pyfuse3.invalidate_entry_async(self.space.export(parent_ino),
                                               os.fsencode(name), ignore_enoent=True)

    # -- namespace -------------------------------------------------------
    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        local_parent = self.space.local(parent_inode)
        if name == b".":
            return self._entry(self.ov.getattr_ino(local_parent))
        path = self._path(parent_inode, name)
        if name == b"..":
            parent = path.rsplit("/", 2)[0] if path.count("/") >= 2 else ""
            return self._new(parent, self.ov.getattr(parent))
        if self.gate.restricts_path(_pid(ctx), "stat", path):
            await self._check(ctx, ("stat", path))
        try:
            return self._entry(self.ov.lookup(path), local_parent)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = 0 if self.shared_root and local_parent == ROOT_INO \
                else self.timeout
            return neg

    @_boundary
    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            local = self.space.local(ino)
            self.ov.forget(local, count)
            if not self.ov.inodes.referenced(local):
                self._xattr_names.pop(ino, None)

    @_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        local = self.space.local(inode)
        if (self._restricts(ctx, "stat") and self.ov.inodes.has_path(local)
                and self.gate.restricts_path(_pid(ctx), "stat",
                                             path := self.ov.inodes.path(local))):
            await self._check(ctx, ("stat", path))
        return self._entry(self.ov.getattr_ino(local))

    @_boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        local = self.space.local(inode)
        path = self.ov.inodes.path(local) if self.ov.inodes.has_path(local) else None
        if path is not None and self.guard is not None:
            ops = [op for op, wanted in (
                ("chmod", fields.update_mode), ("chown", fields.update_uid or fields.update_gid),
                ("truncate", fields.update_size),
                ("utimens", fields.update_atime or fields.update_mtime)) if wanted]
            await self._check_object(ctx, ops, path)
        result = self.ov.setattr(
            path,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh, ino=local)
        return self._entry(result)

    @_boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        path = self._path(inode)
        await self._check(ctx, ("readlink", path))
        return os.fsencode(self.ov.readlink(path))

    @_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        path = self._path(parent_inode, name)
        await self._check(ctx, ("mknod", path))
        return self._new(path, self.ov.mknod(path, mode, rdev, ctx.uid, ctx.gid),
                         self.space.local(parent_inode))

    @_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = self._path(parent_inode, name)
        await self._check(ctx, ("mkdir", path))
        return self._new(path, self.ov.mkdir(path, mode, ctx.uid, ctx.gid),
                         self.space.local(parent_inode))

    @_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        path = self._path(parent_inode, name)
        await self._check(ctx, ("symlink", path))
        return self._new(path, self.ov.symlink(path, os.fsdecode(target), ctx.uid, ctx.gid),
                         self.space.local(parent_inode))

    @_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        dst = self._path(new_parent_inode, new_name)
        src = self._path(inode)
        await self._settle(self.gate.check_link(_pid(ctx), _uid(ctx), src, dst), ctx, dst)
        attr = self.ov.link(src, dst)
        self.gate.linked(attr.ino, dst)
        return self._new(dst, attr, self.space.local(new_parent_inode))

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._path(parent_inode, name)
        await self._check(ctx, ("unlink", path))
        self.ov.unlink(path)

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._path(parent_inode, name)
        await self._check(ctx, ("rmdir", path))
        self.ov.rmdir(path)

    @_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        src = self._path(parent_inode_old, name_old)
        dst = self._path(parent_inode_new, name_new)
        exchange = bool(flags & RENAME_EXCHANGE)
        await self._settle(self.gate.check_rename(_pid(ctx), _uid(ctx), src, dst, exchange),
                           ctx, dst)
        self.ov.rename(src, dst, flags)
        self.gate.renamed(src, dst, exchange)

    # -- files -------------------------------------------------------------
    @_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        path = self._path(inode)
        await self._check_object(ctx, open_ops(flags), path, "open")
        fh = self.ov.open(path, flags)
        self.gate.opened(fh, path, _pid(ctx), _uid(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        path = self._path(parent_inode, name)
        await self._check(ctx, ("create", path), ("open_write", path), ("write", path))
        fh, attr = self.ov.create(path, flags, mode, ctx.uid, ctx.gid)
        self.gate.opened(fh, path, _pid(ctx), _uid(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._new(
            path, attr, self.space.local(parent_inode))

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = self.ov.read(fh, off, size)
        self.gate.read(fh, len(data))
        return data

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        n = self.ov.write(fh, off, buf)
        self.gate.wrote(fh, n)
        return n

    async def flush(self, fh: int) -> None:
        """Data goes straight to the host file, so there is nothing to flush: ENOSYS
        tells the kernel never to send FLUSH again (one request less per close)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.ov.fsync(fh, datasync)

    @_boundary
    async def release(self, fh: int) -> None:
        self.ov.release(fh)
        self.gate.released(fh)

    # -- directories ------------------------------------------------------------
    @_boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        path = self._path(inode)
        await self._check(ctx, ("readdir", path))
        names = self.ov.listdir(path)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = (path, names, _pid(ctx))
        return fh

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        path, names, pid = self._dirs[fh]
        if start_id == 0:  # (re)start: a fresh snapshot, so rewinddir sees changes
            names = self.ov.listdir(path)
            self._dirs[fh] = (path, names, pid)
        restricted = self.gate.path_restricts(pid, "stat")
        for i in range(start_id, len(names)):
            child = join(path, names[i])
            try:
                attr = self.ov.getattr(child)
            except FsError:
                continue  # removed since the snapshot
            entry = self._entry(attr, ROOT_INO if not path else None)
            if restricted is not None and restricted(child):
                # pyfuse3 cannot send a name without its entry (the kernel front end
                # does): never cached, so a stat after this clock tick is a LOOKUP
                # that meets the policy
                entry.entry_timeout = entry.attr_timeout = 0
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), entry, i + 1):
                break
            self.ov.inodes.remember(attr.ino, child)

    @_boundary
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None  # directory changes are renames/creates on the host, already durable

    # -- misc -------------------------------------------------------------------
    @_boundary
    async def statfs(self, ctx: Any) -> Any:
        st = self.ov.statfs()
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    @_boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return self.ov.access(self._path(inode), mode, ctx.uid, [ctx.gid])

    # The kernel asks for security.capability before every write(2) and never caches
    # the answer; each inode's xattr names are remembered (the daemon is the only
    # writer), so a missing attribute costs no host call.
    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        names = self._xattr_names.get(inode)
        if names is None:
            names = frozenset(os.fsencode(n) for n in self.ov.listxattr(self._path(inode)))
            self._xattr_names[inode] = names
        if name not in names:
            raise FsError(errno.ENODATA)
        path = self._path(inode)
        await self._check_object(ctx, ["getxattr"], path)
        return self.ov.getxattr(path, os.fsdecode(name))

    @_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        path = self._path(inode)
        await self._check_object(ctx, ["setxattr"], path)
        self._xattr_names.pop(inode, None)
        self.ov.setxattr(path, os.fsdecode(name), value)

    @_boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        path = self._path(inode)
        await self._check_object(ctx, ["listxattr"], path)
        return [os.fsencode(n) for n in self.ov.listxattr(path)]

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        path = self._path(inode)
        await self._check_object(ctx, ["removexattr"], path)
        self._xattr_names.pop(inode, None)
        self.ov.removexattr(path, os.fsdecode(name))


def _pid(ctx: Any) -> int:
    return int(ctx.pid) if ctx is not None else 0


def _uid(ctx: Any) -> int:
    return int(ctx.uid) if ctx is not None else -1
