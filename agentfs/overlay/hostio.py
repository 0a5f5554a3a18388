"""The single door to host files: dirfd-relative, never-follow access.

Every byte the overlay reads from or writes to the base or a layer goes through
`HostDir`.  Paths are relative to the directory's root and are resolved with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` (Linux >= 5.6), or a
component-by-component ``O_NOFOLLOW`` walk elsewhere, so a symlink planted in the
base or a layer can never make the daemon touch anything outside its roots.
The final component is always operated on with ``follow_symlinks=False`` or
``O_NOFOLLOW``.

Concurrency: a HostDir keeps a small cache of parent-directory fds.  It is not
thread-safe by itself; the engine serialises calls (see overlay/view.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import sys
from collections import OrderedDict
from typing import Final

O_PATH: Final = getattr(os, "O_PATH", 0)
_RESOLVE_NO_MAGICLINKS: Final = 0x02
_RESOLVE_NO_SYMLINKS: Final = 0x04
_RESOLVE_BENEATH: Final = 0x08
_SYS_OPENAT2: Final = 437
_SYS_RENAMEAT2: Final = 316 if os.uname().machine == "x86_64" else 276
RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2
_DIR_CACHE_SIZE: Final = 256
_LONG_PATH: Final = 4000  # bytes; PATH_MAX is 4096 with the NUL

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_have_openat2 = hasattr(os, "O_PATH")


def _openat2(dirfd: int, rel: str, flags: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0,
                   _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(rel), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return int(fd)


def renameat2(src_dirfd: int, src: str, dst_dirfd: int, dst: str, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE (Linux only)."""
    if flags == 0:
        os.rename(src, dst, src_dir_fd=src_dirfd, dst_dir_fd=dst_dirfd)
        return
    res = _libc.syscall(_SYS_RENAMEAT2, src_dirfd, os.fsencode(src), dst_dirfd,
                        os.fsencode(dst), flags)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src)


def split(rel: str) -> tuple[str, str]:
    """'a/b/c' -> ('a/b', 'c'); 'c' -> ('', 'c')."""
    head, _, tail = rel.rpartition("/")
    return head, tail


def join(parent: str, name: str) -> str:
    """Interned: the same path reaches the engine in request after request (a
    listing, then a lookup, then a getattr) and is kept by several caches; one
    string object serves them all."""
    return sys.intern(f"{parent}/{name}" if parent else name)


def read_all(fd: int, chunk_size: int = 1 << 20) -> bytes:
    """Everything left to read from *fd* (which stays open)."""
    chunks = []
    while chunk := os.read(fd, chunk_size):
        chunks.append(chunk)
    return b"".join(chunks)


class HostDir:
    """A directory tree on the host, reachable only beneath its root fd."""

    def __init__(self, path: str) -> None:
        self.path = path
        flags = (O_PATH or os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        self.dev = os.fstat(self.fd).st_dev
        self._dirs: OrderedDict[str, int] = OrderedDict()

    def close(self) -> None:
        """Release the root and cached fds; closing twice is harmless (views share layers)."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- directory fds -------------------------------------------------
    def dirfd(self, rel_dir: str) -> int:
        """An fd for directory *rel_dir* (cached); ENOTDIR/ENOENT/ELOOP if not one."""
        if not rel_dir:
            return self.fd
        fd = self._dirs.get(rel_dir)
        if fd is not None:
            self._dirs.move_to_end(rel_dir)
            return fd
        fd = self._open_dir(rel_dir)
        self._dirs[rel_dir] = fd
        if len(self._dirs) > _DIR_CACHE_SIZE:
            _, old = self._dirs.popitem(last=False)
            os.close(old)
        return fd

    def _open_dir(self, rel_dir: str) -> int:
        raw = os.fsencode(rel_dir)
        if len(raw) >= _LONG_PATH:
            # too long for one system call (PATH_MAX): the rest from the (cached) fd of
            # a prefix, which is itself beneath the root; a tree reached through
            # directory fds may go deeper than PATH_MAX, and so may a layer's copy
            cut = raw.find(b"/", len(raw) - _LONG_PATH // 2)
            if cut > 0:
                return self._open_dir_at(self.dirfd(os.fsdecode(raw[:cut])),
                                         os.fsdecode(raw[cut + 1:]))
        return self._open_dir_at(self.fd, rel_dir)

    @staticmethod
    def _open_dir_at(root: int, rel_dir: str) -> int:
        flags = (O_PATH or os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW
        if _have_openat2:
            try:
                return _openat2(root, rel_dir, flags)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
        fd = os.dup(root)
        try:
            for part in rel_dir.split("/"):
                nfd = os.open(part, flags | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def forget(self, rel: str) -> None:
        """Drop cached fds for *rel* and everything below (after rename/rmdir)."""
        prefix = rel + "/"
        for key in [k for k in self._dirs if k == rel or k.startswith(prefix)]:
            os.close(self._dirs.pop(key))

    def at(self, rel: str) -> tuple[int, str]:
        """(dirfd, final name) for *rel*; the final name is never followed."""
        head, tail = split(rel)
        return self.dirfd(head), tail

    def proc_path(self, rel: str) -> str:
        """A /proc path naming *rel* without following a final symlink's target."""
        dfd, name = self.at(rel)
        return f"/proc/self/fd/{dfd}/{name}" if name else f"/proc/self/fd/{dfd}"

    # -- metadata ------------------------------------------------------
    def lstat(self, rel: str) -> os.stat_result:
        if not rel:
            return os.stat(self.fd)
        dfd, name = self.at(rel)
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)

    def try_lstat(self, rel: str) -> os.stat_result | None:
        try:
            return self.lstat(rel)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink where a directory was expected
                return None
            raise

    def chmod(self, rel: str, mode: int, kind: int | None = None) -> None:
        """chmod that never follows a final symlink.  *kind*: the object's file type as
        the caller knows it (only this process writes a layer), saving the lstat."""
        if kind is None:
            kind = stat.S_IFMT(self.lstat(rel).st_mode)
        if kind == stat.S_IFLNK:
            return  # symlink modes are meaningless on Linux
        if not rel:
            os.chmod(self.proc_path(rel), mode)  # the root fd is O_PATH: no fchmod
            return
        dfd, name = self.at(rel)
        os.chmod(name, mode, dir_fd=dfd)  # not a symlink: nothing to follow

    def chown(self, rel: str, uid: int, gid: int) -> None:
        if not rel:
            os.chown(self.proc_path(rel), uid, gid)
            return
        dfd, name = self.at(rel)
        os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)

    def utime(self, rel: str, atime_ns: int, mtime_ns: int) -> None:
        if not rel:
            os.utime(self.proc_path(rel), ns=(atime_ns, mtime_ns))
            return
        dfd, name = self.at(rel)
        os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)

    # -- xattrs (via /proc/self/fd so no path is re-walked) --------------
    def getxattr(self, rel: str, name: str) -> bytes:
        return os.getxattr(self.proc_path(rel), name, follow_symlinks=False)

    def try_getxattr(self, rel: str, name: str) -> bytes | None:
        try:
            return self.getxattr(rel, name)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                return None
            raise

    def setxattr(self, rel: str, name: str, value: bytes, flags: int = 0) -> None:
        os.setxattr(self.proc_path(rel), name, value, flags, follow_symlinks=False)

    def listxattr(self, rel: str) -> list[str]:
        return os.listxattr(self.proc_path(rel), follow_symlinks=False)

    def removexattr(self, rel: str, name: str) -> None:
        os.removexattr(self.proc_path(rel), name, follow_symlinks=False)

    # -- data and namespace ----------------------------------------------
    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        dfd, name = self.at(rel)
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)

    def open_dir(self, rel: str) -> int:
        """A readable fd for listing directory *rel* (our own listing is not an access)."""
        return self.open_quiet(rel, os.O_RDONLY | os.O_DIRECTORY)

    def open_quiet(self, rel: str, flags: int) -> int:
        """open() with O_NOATIME where permitted, for reads the user did not ask for."""
        noatime = getattr(os, "O_NOATIME", 0)
        try:
            if not rel:
                return os.open(".", flags | noatime | os.O_CLOEXEC, dir_fd=self.fd)
            return self.open(rel, flags | noatime)
        except PermissionError:
            if not noatime:
                raise
            if not rel:
                return os.open(".", flags | os.O_CLOEXEC, dir_fd=self.fd)
            return self.open(rel, flags)

    def listdir(self, rel: str) -> list[os.DirEntry[str]]:
        fd = self.open_dir(rel)
        try:
            with os.scandir(fd) as it:
                return list(it)
        finally:
            os.close(fd)

    def mkdir(self, rel: str, mode: int) -> None:
        dfd, name = self.at(rel)
        os.mkdir(name, mode, dir_fd=dfd)

    def rmdir(self, rel: str) -> None:
        dfd, name = self.at(rel)
        os.rmdir(name, dir_fd=dfd)
        self.forget(rel)

    def unlink(self, rel: str) -> None:
        dfd, name = self.at(rel)
        os.unlink(name, dir_fd=dfd)

    def symlink(self, target: str, rel: str) -> None:
        dfd, name = self.at(rel)
        os.symlink(target, name, dir_fd=dfd)

    def readlink(self, rel: str) -> str:
        dfd, name = self.at(rel)
        return os.readlink(name, dir_fd=dfd)

    def mknod(self, rel: str, mode: int, rdev: int) -> None:
        dfd, name = self.at(rel)
        os.mknod(name, mode, rdev, dir_fd=dfd)

    def link_to(self, src_rel: str, dst: HostDir, dst_rel: str) -> None:
        sfd, sname = self.at(src_rel)
        dfd, dname = dst.at(dst_rel)
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def rename_to(self, src_rel: str, dst: HostDir, dst_rel: str, flags: int = 0,
                  dirs: bool = True) -> None:
        """*dirs* False: the caller knows neither name is a directory (a file renamed
        to a free name or over a file), so no cached directory fd can be affected."""
        sfd, sname = self.at(src_rel)
        dfd, dname = dst.at(dst_rel)
        renameat2(sfd, sname, dfd, dname, flags)
        if dirs:
            self.forget(src_rel)
            dst.forget(dst_rel)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(f"/proc/self/fd/{self.fd}")

    def remove_tree(self, rel: str) -> None:
        """rm -r of *rel* inside this root (used for work-area junk only)."""
        st = self.try_lstat(rel)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            for entry in self.listdir(rel):
                self.remove_tree(join(rel, entry.name))
            self.rmdir(rel)
        else:
            self.unlink(rel)
