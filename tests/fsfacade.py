"""A tiny filesystem facade so one behavioural test suite can drive several targets.

Every target (a plain directory, the overlay engine without FUSE, a real FUSE mount) is
wrapped in an object satisfying :class:`FsFacade`.  All paths are relative and
'/'-separated with no leading slash; ``''`` names the root of the view.  Failures must
surface as :class:`OSError` carrying the errno a plain ext4 directory would give, so the
implementations can be compared errno-for-errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol, runtime_checkable

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276}


@runtime_checkable
class FsFacade(Protocol):
    """The operations a behavioural case may perform on a view."""

    supports_mmap: bool

    def real_path(self, path: str) -> str | None: ...

    # handle-based I/O
    def open(self, path: str, flags: int, mode: int = 0o644) -> int: ...
    def close(self, h: int) -> None: ...
    def pread(self, h: int, size: int, offset: int) -> bytes: ...
    def pwrite(self, h: int, data: bytes, offset: int) -> int: ...
    def read(self, h: int, size: int) -> bytes: ...
    def write(self, h: int, data: bytes) -> int: ...
    def fsync(self, h: int) -> None: ...
    def fdatasync(self, h: int) -> None: ...
    def ftruncate(self, h: int, length: int) -> None: ...
    def fstat(self, h: int) -> os.stat_result: ...

    # path-based metadata
    def stat(self, path: str) -> os.stat_result: ...
    def lstat(self, path: str) -> os.stat_result: ...
    def exists(self, path: str) -> bool: ...

    # namespace
    def listdir(self, path: str) -> list[str]: ...
    def mkdir(self, path: str, mode: int = 0o777) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def rename2(self, src: str, dst: str, flags: int) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def readlink(self, path: str) -> str: ...
    def link(self, src: str, dst: str) -> None: ...
    def mkfifo(self, path: str, mode: int = 0o644) -> None: ...

    # attributes
    def chmod(self, path: str, mode: int) -> None: ...
    def chown(self, path: str, uid: int, gid: int) -> None: ...
    def utime(self, path: str, ns: tuple[int, int]) -> None: ...
    def truncate(self, path: str, length: int) -> None: ...
    def access(self, path: str, mode: int) -> bool: ...

    # xattrs
    def getxattr(self, path: str, name: str) -> bytes: ...
    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None: ...
    def listxattr(self, path: str) -> list[str]: ...
    def removexattr(self, path: str, name: str) -> None: ...

    def statvfs(self, path: str) -> os.statvfs_result: ...

    # convenience (FacadeHelpers)
    def read_file(self, path: str) -> bytes: ...
    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None: ...


class FacadeHelpers(ABC):
    """Convenience calls built only on primitive facade methods, so every facade gets them."""

    @abstractmethod
    def open(self, path: str, flags: int, mode: int = 0o644) -> int: ...

    @abstractmethod
    def close(self, h: int) -> None: ...

    @abstractmethod
    def pread(self, h: int, size: int, offset: int) -> bytes: ...

    @abstractmethod
    def pwrite(self, h: int, data: bytes, offset: int) -> int: ...

    def read_file(self, path: str) -> bytes:
        """Read a whole file with pread until EOF (tolerates short reads)."""
        h = self.open(path, os.O_RDONLY)
        try:
            chunks: list[bytes] = []
            offset = 0
            while True:
                chunk = self.pread(h, 1 << 20, offset)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                offset += len(chunk)
        finally:
            self.close(h)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or truncate ``path`` and write ``data`` (tolerates short writes)."""
        h = self.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            offset = 0
            while offset < len(view):
                n = self.pwrite(h, bytes(view[offset:]), offset)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write of {path!r} at {offset}")
                offset += n
        finally:
            self.close(h)


def _load_renameat2() -> Callable[..., int] | None:
    """Resolve glibc's renameat2 wrapper; None means fall back to the raw syscall."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fn = libc.renameat2
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def renameat2(src: str, dst: str, flags: int) -> None:
    """renameat2(2) on absolute/cwd-relative paths; raises OSError with the kernel errno."""
    bsrc, bdst = os.fsencode(src), os.fsencode(dst)
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, bsrc, _AT_FDCWD, bdst, flags)
    else:
        nr = _SYS_RENAMEAT2.get(os.uname().machine)
        if nr is None:
            raise OSError(errno.ENOSYS, "renameat2 unavailable on this architecture")
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(
            ctypes.c_long(nr),
            ctypes.c_int(_AT_FDCWD),
            ctypes.c_char_p(bsrc),
            ctypes.c_int(_AT_FDCWD),
            ctypes.c_char_p(bdst),
            ctypes.c_uint(flags),
        )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


class OsFacade(FacadeHelpers):
    """Facade over a real directory (plain dir, or a FUSE mountpoint) using ``os`` calls.

    Handles are the real file descriptors, so O_APPEND and file positions behave exactly as
    the kernel implements them.
    """

    supports_mmap: bool = True

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def _p(self, path: str) -> str:
        if path.startswith("/"):
            raise ValueError(f"facade paths must be relative: {path!r}")
        if ".." in path.split("/"):
            raise ValueError(f"facade paths must not contain '..': {path!r}")
        return self.root if path == "" else os.path.join(self.root, path)

    def real_path(self, path: str) -> str | None:
        return self._p(path)

    # handle-based I/O
    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(self._p(path), flags | os.O_CLOEXEC, mode)

    def close(self, h: int) -> None:
        os.close(h)

    def pread(self, h: int, size: int, offset: int) -> bytes:
        return os.pread(h, size, offset)

    def pwrite(self, h: int, data: bytes, offset: int) -> int:
        return os.pwrite(h, data, offset)

    def read(self, h: int, size: int) -> bytes:
        return os.read(h, size)

    def write(self, h: int, data: bytes) -> int:
        return os.write(h, data)

    def fsync(self, h: int) -> None:
        os.fsync(h)

    def fdatasync(self, h: int) -> None:
        os.fdatasync(h)

    def ftruncate(self, h: int, length: int) -> None:
        os.ftruncate(h, length)

    def fstat(self, h: int) -> os.stat_result:
        return os.fstat(h)

    # path-based metadata
    def stat(self, path: str) -> os.stat_result:
        return os.stat(self._p(path))

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(self._p(path))

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._p(path))

    # namespace
    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self._p(path)))

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        os.mkdir(self._p(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rename(self, src: str, dst: str) -> None:
        os.rename(self._p(src), self._p(dst))

    def rename2(self, src: str, dst: str, flags: int) -> None:
        renameat2(self._p(src), self._p(dst), flags)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._p(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self._p(path))

    def link(self, src: str, dst: str) -> None:
        # link(2) semantics: a symlink source is linked itself, not its target.
        os.link(self._p(src), self._p(dst), follow_symlinks=False)

    def mkfifo(self, path: str, mode: int = 0o644) -> None:
        os.mkfifo(self._p(path), mode)

    # attributes
    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._p(path), uid, gid)

    def utime(self, path: str, ns: tuple[int, int]) -> None:
        os.utime(self._p(path), ns=ns, follow_symlinks=False)

    def truncate(self, path: str, length: int) -> None:
        os.truncate(self._p(path), length)

    def access(self, path: str, mode: int) -> bool:
        return os.access(self._p(path), mode)

    # xattrs
    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._p(path), name)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        os.setxattr(self._p(path), name, value, flags)

    def listxattr(self, path: str) -> list[str]:
        return sorted(os.listxattr(self._p(path)))

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self._p(path), name)

    def statvfs(self, path: str) -> os.statvfs_result:
        return os.statvfs(self._p(path))


class TrackingFacade(FacadeHelpers):
    """Delegating wrapper that remembers open handles so a failed case cannot leak them.

    Leaked handles would keep FUSE mounts busy (EBUSY on unmount) and skew later cases.
    """

    def __init__(self, inner: FsFacade) -> None:
        self.inner = inner
        self.supports_mmap = inner.supports_mmap
        self.open_handles: set[int] = set()

    def close_all(self) -> None:
        """Close every handle the case left open, ignoring errors."""
        for h in sorted(self.open_handles):
            with contextlib.suppress(OSError):
                self.inner.close(h)
        self.open_handles.clear()

    def real_path(self, path: str) -> str | None:
        return self.inner.real_path(path)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        h = self.inner.open(path, flags, mode)
        self.open_handles.add(h)
        return h

    def close(self, h: int) -> None:
        self.open_handles.discard(h)
        self.inner.close(h)

    def pread(self, h: int, size: int, offset: int) -> bytes:
        return self.inner.pread(h, size, offset)

    def pwrite(self, h: int, data: bytes, offset: int) -> int:
        return self.inner.pwrite(h, data, offset)

    def read(self, h: int, size: int) -> bytes:
        return self.inner.read(h, size)

    def write(self, h: int, data: bytes) -> int:
        return self.inner.write(h, data)

    def fsync(self, h: int) -> None:
        self.inner.fsync(h)

    def fdatasync(self, h: int) -> None:
        self.inner.fdatasync(h)

    def ftruncate(self, h: int, length: int) -> None:
        self.inner.ftruncate(h, length)

    def fstat(self, h: int) -> os.stat_result:
        return self.inner.fstat(h)

    def stat(self, path: str) -> os.stat_result:
        return self.inner.stat(path)

    def lstat(self, path: str) -> os.stat_result:
        return self.inner.lstat(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        self.inner.mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        self.inner.rmdir(path)

    def unlink(self, path: str) -> None:
        self.inner.unlink(path)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)

    def rename2(self, src: str, dst: str, flags: int) -> None:
        self.inner.rename2(src, dst, flags)

    def symlink(self, target: str, path: str) -> None:
        self.inner.symlink(target, path)

    def readlink(self, path: str) -> str:
        return self.inner.readlink(path)

    def link(self, src: str, dst: str) -> None:
        self.inner.link(src, dst)

    def mkfifo(self, path: str, mode: int = 0o644) -> None:
        self.inner.mkfifo(path, mode)

    def chmod(self, path: str, mode: int) -> None:
        self.inner.chmod(path, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.inner.chown(path, uid, gid)

    def utime(self, path: str, ns: tuple[int, int]) -> None:
        self.inner.utime(path, ns)

    def truncate(self, path: str, length: int) -> None:
        self.inner.truncate(path, length)

    def access(self, path: str, mode: int) -> bool:
        return self.inner.access(path, mode)

    def getxattr(self, path: str, name: str) -> bytes:
        return self.inner.getxattr(path, name)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self.inner.setxattr(path, name, value, flags)

    def listxattr(self, path: str) -> list[str]:
        return self.inner.listxattr(path)

    def removexattr(self, path: str, name: str) -> None:
        self.inner.removexattr(path, name)

    def statvfs(self, path: str) -> os.statvfs_result:
        return self.inner.statvfs(path)


def pread_all(fs: FsFacade, h: int, size: int, offset: int) -> bytes:
    """pread that tolerates short reads (a short read is legal, lost bytes are not)."""
    out = bytearray()
    while len(out) < size:
        chunk = fs.pread(h, size - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def pwrite_all(fs: FsFacade, h: int, data: bytes, offset: int) -> None:
    """pwrite that loops on short writes."""
    done = 0
    while done < len(data):
        n = fs.pwrite(h, data[done:], offset + done)
        assert n > 0, "pwrite returned 0"
        done += n


_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61}


def getdents(fd: int, size: int) -> list[str]:
    """One getdents64(2) call on directory *fd* with a *size*-byte buffer: the names
    it returns ([] at the end).  For tests that read a directory in small steps."""
    import platform
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    n = libc.syscall(_SYS_GETDENTS64[platform.machine()], fd, buf, size)
    if n < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    names, pos, raw = [], 0, buf.raw[:n]
    while pos < n:
        reclen = int.from_bytes(raw[pos + 16:pos + 18], "little")
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        if name not in (b".", b".."):
            names.append(os.fsdecode(name))
        pos += reclen
    return names
