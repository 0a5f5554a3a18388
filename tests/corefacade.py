"""FsFacade over the overlay engine directly (no FUSE), so the behavioural cases
exercise the core exactly as the mount does, only faster and with tracebacks."""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from fsfacade import FacadeHelpers

from agentfs.errors import FsError
from agentfs.overlay.attrs import Attr
from agentfs.overlay.engine import Overlay

_ACC = os.O_RDONLY | os.O_WRONLY | os.O_RDWR


def _oserror(exc: FsError) -> OSError:
    return OSError(exc.errno, os.strerror(exc.errno))


def _stat(attr: Attr) -> Any:
    return SimpleNamespace(
        st_mode=attr.mode, st_ino=attr.ino, st_dev=0, st_nlink=attr.nlink, st_uid=attr.uid,
        st_gid=attr.gid, st_size=attr.size, st_atime=attr.atime_ns / 1e9,
        st_mtime=attr.mtime_ns / 1e9, st_ctime=attr.ctime_ns / 1e9, st_atime_ns=attr.atime_ns,
        st_mtime_ns=attr.mtime_ns, st_ctime_ns=attr.ctime_ns, st_blocks=attr.blocks,
        st_blksize=attr.blksize, st_rdev=attr.rdev)


@dataclass
class _Open:
    fh: int
    flags: int
    path: str
    pos: int = 0


class CoreFacade(FacadeHelpers):
    """Drives an `Overlay` with path calls; errors come out as OSError like os.* does."""

    supports_mmap = False

    def __init__(self, overlay: Overlay, uid: int = 0, gid: int = 0) -> None:
        self.ov = overlay
        self.uid, self.gid = uid, gid
        self._open: dict[int, _Open] = {}
        self._next = 1000

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if callable(attr) and not name.startswith("_"):
            def call(*args: Any, **kwargs: Any) -> Any:
                try:
                    return attr(*args, **kwargs)
                except FsError as exc:
                    raise _oserror(exc) from None
            return call
        return attr

    def real_path(self, path: str) -> str | None:
        return None

    # -- path resolution for calls that follow symlinks ---------------------
    def _follow(self, path: str, depth: int = 0) -> str:
        if depth > 40:
            raise FsError(errno.ELOOP)
        parts = [p for p in path.split("/") if p]
        done = ""
        for i, part in enumerate(parts):
            cur = posixpath.join(done, part) if done else part
            attr = self.ov.getattr(cur)
            if stat.S_ISLNK(attr.mode):
                target = self.ov.readlink(cur)
                if target.startswith("/"):
                    raise FsError(errno.EXDEV, "absolute symlink leaves the view")
                joined = posixpath.normpath(posixpath.join(done, target, *parts[i + 1:]))
                if joined.startswith(".."):
                    raise FsError(errno.EXDEV)
                return self._follow("" if joined == "." else joined, depth + 1)
            done = cur
        return done

    def _parent_followed(self, path: str) -> str:
        head, _, tail = path.rpartition("/")
        if not head:
            return tail
        parent = self._follow(head)
        if not stat.S_ISDIR(self.ov.getattr(parent).mode):
            raise FsError(errno.ENOTDIR)
        return posixpath.join(parent, tail)

    # -- handles ---------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        path = self._parent_followed(path)
        if flags & os.O_CREAT and flags & os.O_EXCL and self.ov.exists(path):
            raise FsError(errno.EEXIST)
        if self.ov.exists(path) and stat.S_ISLNK(self.ov.getattr(path).mode):
            if flags & os.O_NOFOLLOW:
                raise FsError(errno.ELOOP)
            try:
                path = self._follow(path)
            except FsError as exc:
                target = self.ov.readlink(path)
                if exc.errno != errno.ENOENT or not flags & os.O_CREAT or target.startswith("/"):
                    raise
                created = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
                if created.startswith(".."):
                    raise
                path = self._parent_followed(created)  # O_CREAT through a dangling link
        if flags & os.O_CREAT:
            if self.ov.exists(path) and flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            if not self.ov.exists(path):
                fh, _ = self.ov.create(path, flags, mode & ~0o022 & 0o7777, self.uid, self.gid)
                return self._register(fh, flags, path)
        attr = self.ov.getattr(path)
        if stat.S_ISDIR(attr.mode) and flags & _ACC != os.O_RDONLY:
            raise FsError(errno.EISDIR)
        if flags & os.O_DIRECTORY and not stat.S_ISDIR(attr.mode):
            raise FsError(errno.ENOTDIR)
        if flags & os.O_TRUNC and stat.S_ISREG(attr.mode) and flags & _ACC != os.O_RDONLY:
            self.ov.setattr(path, size=0)
        fh = self.ov.open(path, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
        return self._register(fh, flags, path)

    def _register(self, fh: int, flags: int, path: str) -> int:
        self.ov.lookup(path)  # hold an inode reference, as the kernel does for open files
        self._next += 1
        self._open[self._next] = _Open(fh, flags, path)
        return self._next

    def close(self, h: int) -> None:
        fh = self._open.pop(h).fh
        ino = self.ov.handle_ino(fh)
        self.ov.release(fh)
        self.ov.forget(ino, 1)

    def pread(self, h: int, size: int, offset: int) -> bytes:
        o = self._open[h]
        if o.flags & _ACC == os.O_WRONLY:
            raise FsError(errno.EBADF)
        return self.ov.read(o.fh, offset, size)

    def pwrite(self, h: int, data: bytes, offset: int) -> int:
        o = self._open[h]
        if o.flags & _ACC == os.O_RDONLY:
            raise FsError(errno.EBADF)
        if o.flags & os.O_APPEND:
            offset = self.ov.fh_attr(o.fh).size
        return self.ov.write(o.fh, offset, data)

    def read(self, h: int, size: int) -> bytes:
        o = self._open[h]
        data = self.pread(h, size, o.pos)
        o.pos += len(data)
        return data

    def write(self, h: int, data: bytes) -> int:
        o = self._open[h]
        if o.flags & os.O_APPEND:
            o.pos = self.ov.fh_attr(o.fh).size
        n = self.pwrite(h, data, o.pos)
        o.pos += n
        return n

    def fsync(self, h: int) -> None:
        self.ov.fsync(self._open[h].fh, False)

    def fdatasync(self, h: int) -> None:
        self.ov.fsync(self._open[h].fh, True)

    def ftruncate(self, h: int, length: int) -> None:
        o = self._open[h]
        if o.flags & _ACC == os.O_RDONLY:
            raise FsError(errno.EINVAL)
        self.ov.setattr(None, size=length, fh=o.fh)

    def fstat(self, h: int) -> Any:
        o = self._open[h]
        return _stat(self.ov.getattr_ino(self.ov.handle_ino(o.fh)))

    # -- metadata --------------------------------------------------------------
    def stat(self, path: str) -> Any:
        return _stat(self.ov.getattr(self._follow(path)))

    def lstat(self, path: str) -> Any:
        return _stat(self.ov.getattr(self._parent_followed(path)))

    def exists(self, path: str) -> bool:
        try:
            return self.ov.exists(self._parent_followed(path))
        except FsError:
            return False

    def listdir(self, path: str) -> list[str]:
        return sorted(self.ov.listdir(self._follow(path)))

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        self.ov.mkdir(self._parent_followed(path), mode & ~0o022, self.uid, self.gid)

    def rmdir(self, path: str) -> None:
        self.ov.rmdir(self._parent_followed(path))

    def unlink(self, path: str) -> None:
        self.ov.unlink(self._parent_followed(path))

    def rename(self, src: str, dst: str) -> None:
        self.ov.rename(self._parent_followed(src), self._parent_followed(dst))

    def rename2(self, src: str, dst: str, flags: int) -> None:
        self.ov.rename(self._parent_followed(src), self._parent_followed(dst), flags)

    def symlink(self, target: str, path: str) -> None:
        self.ov.symlink(self._parent_followed(path), target, self.uid, self.gid)

    def readlink(self, path: str) -> str:
        return self.ov.readlink(self._parent_followed(path))

    def link(self, src: str, dst: str) -> None:
        src = self._parent_followed(src)
        self.ov.getattr(src)  # linkat(2) resolves the source before the destination
        self.ov.link(src, self._parent_followed(dst))

    def mkfifo(self, path: str, mode: int = 0o644) -> None:
        self.ov.mknod(self._parent_followed(path), stat.S_IFIFO | (mode & ~0o022), 0,
                      self.uid, self.gid)

    def chmod(self, path: str, mode: int) -> None:
        self.ov.setattr(self._follow(path), mode=mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.ov.setattr(self._follow(path), uid=None if uid == -1 else uid,
                        gid=None if gid == -1 else gid)

    def utime(self, path: str, ns: tuple[int, int]) -> None:
        self.ov.setattr(self._parent_followed(path), atime_ns=ns[0], mtime_ns=ns[1])

    def truncate(self, path: str, length: int) -> None:
        path = self._follow(path)
        if stat.S_ISDIR(self.ov.getattr(path).mode):
            raise FsError(errno.EISDIR)
        self.ov.setattr(path, size=length)

    def access(self, path: str, mode: int) -> bool:
        try:
            return self.ov.access(self._follow(path), mode, self.uid, [self.gid])
        except FsError:
            return False

    def getxattr(self, path: str, name: str) -> bytes:
        return self.ov.getxattr(self._follow(path), name)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self.ov.setxattr(self._follow(path), name, value, flags)

    def listxattr(self, path: str) -> list[str]:
        return self.ov.listxattr(self._follow(path))

    def removexattr(self, path: str, name: str) -> None:
        self.ov.removexattr(self._follow(path), name)

    def statvfs(self, path: str) -> os.statvfs_result:
        self._follow(path)
        return self.ov.statfs()
