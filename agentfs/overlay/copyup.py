"""Copying lower objects into the top layer.

Data is copied into the layer's work area and renamed into place, so a crash at
any point leaves either the old view or the complete copy, never half a file.
Holes are preserved (SEEK_DATA/SEEK_HOLE), so a sparse 5 GiB file costs what its
data costs.  Ownership, mode, times and user xattrs travel with the copy.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Callable

from agentfs.overlay.hostio import HostDir
from agentfs.overlay.layers import MARKER

_tmp_names = itertools.count()
# the process's id, read once (a copy-up asked for it every time); a forked child
# (agentfs run, the test suite) reads its own
_ids: list[int] = []


def _reset_ids() -> None:
    _ids[:] = [os.getpid()]


_reset_ids()
os.register_at_fork(after_in_child=_reset_ids)


def temp_name() -> str:
    return f"tmp.{_ids[0]}.{next(_tmp_names)}"


def copy_data(src_fd: int, dst_fd: int, size: int, dense: bool = False) -> None:
    """Copy *size* bytes, skipping holes where the filesystem reports them.  *dense*:
    the caller knows the source has no holes (as many blocks as bytes), so there is
    nothing to look for."""
    offset = 0
    end = 0  # where the copied data ends
    while offset < size:
        if dense:
            data, hole = offset, size
        else:
            try:
                data = os.lseek(src_fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                data = offset
            try:
                hole = os.lseek(src_fd, data, os.SEEK_HOLE)
            except OSError:
                hole = size
        pos = data
        while pos < min(hole, size):
            want = min(hole, size) - pos
            try:
                n = os.copy_file_range(src_fd, dst_fd, want, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                chunk = os.pread(src_fd, min(want, 1 << 20), pos)
                n = os.pwrite(dst_fd, chunk, pos) if chunk else 0
            if n == 0:
                break
            pos += n
        end = pos
        if pos < min(hole, size):  # the source shrank meanwhile
            break
        offset = hole
    if end != size:  # a hole at the end, or a short copy: the size is still the source's
        os.ftruncate(dst_fd, size)


def copy_xattrs(src: HostDir, src_rel: str, dst: HostDir, dst_rel: str) -> None:
    """Copy user-visible xattrs (never our marker) from one object to another."""
    _copy_user_xattrs(lambda: src.listxattr(src_rel), lambda n: src.getxattr(src_rel, n),
                      lambda n, v: dst.setxattr(dst_rel, n, v))


def _copy_user_xattrs(names: Callable[[], list[str]], get: Callable[[str], bytes],
                      put: Callable[[str, bytes], None]) -> None:
    """The one loop behind copy_xattrs, whether objects are reached by path or fd."""
    try:
        listed = names()
    except OSError:
        return
    for name in listed:
        if name == MARKER or not name.startswith("user."):
            continue
        try:
            put(name, get(name))
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EPERM):
                raise


def clone_object(src: HostDir, src_rel: str, st: os.stat_result, dst: HostDir,
                 dst_rel: str, with_data: bool = True,
                 on_fd: Callable[[int, os.stat_result], None] | None = None) -> None:
    """Create a copy of one non-directory object at *dst_rel* (which must not exist).
    A regular file gets its metadata through its fd (no path walks); *on_fd* is then
    called with that fd and its fstat, before the times are set (to add a marker, say)."""
    if stat.S_ISREG(st.st_mode):
        os.close(clone_file(src, src_rel, st, dst, dst_rel, with_data, on_fd))
        return
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFLNK:
        dst.symlink(src.readlink(src_rel), dst_rel)
    elif kind == stat.S_IFDIR:
        dst.mkdir(dst_rel, 0o700)
    else:
        dst.mknod(dst_rel, st.st_mode, st.st_rdev)
    copy_metadata(src, src_rel, st, dst, dst_rel)


def clone_file(src: HostDir, src_rel: str, st: os.stat_result, dst: HostDir, dst_rel: str,
               with_data: bool = True,
               on_fd: Callable[[int, os.stat_result], None] | None = None) -> int:
    """`clone_object` of a regular file; returns the copy's fd, open for reading and
    writing (the caller closes it; a copy-up for a writer keeps it as the handle's)."""
    mode = stat.S_IMODE(st.st_mode)
    # created with its mode unless it has set-id bits (writing the data, or a chown,
    # could clear them: those are set last); the fstat shows what the umask (the
    # daemon has none, a CLI process may) and a set-gid directory left
    setid = mode & (stat.S_ISUID | stat.S_ISGID)
    fd = dst.open(dst_rel, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600 if setid else mode)
    try:
        fst = os.fstat(fd)
        owned = (fst.st_uid, fst.st_gid) == (st.st_uid, st.st_gid)
        final = owned and stat.S_IMODE(fst.st_mode) == mode
        if with_data and st.st_size:
            sfd = src.open_quiet(src_rel, os.O_RDONLY)
            try:
                copy_data(sfd, fd, st.st_size, dense=st.st_blocks * 512 >= st.st_size)
                _copy_user_xattrs(lambda: os.listxattr(sfd),
                                  lambda n: os.getxattr(sfd, n),
                                  lambda n, v: os.setxattr(fd, n, v))
            finally:
                os.close(sfd)
        else:  # nothing to read: the source by path, no open
            _copy_user_xattrs(lambda: src.listxattr(src_rel),
                              lambda n: src.getxattr(src_rel, n),
                              lambda n, v: os.setxattr(fd, n, v))
        if not final:
            _copy_owner_mode_fd(st, fd, owned)
        if on_fd is not None:
            on_fd(fd, fst)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_owner_mode_fd(st: os.stat_result, fd: int, owned: bool) -> None:
    """Owner, then mode (a chown clears set-uid bits), of a file this process just
    created (so it owns it; no chown when the owner is already right: *owned*)."""
    if not owned:
        with contextlib.suppress(PermissionError):  # an unprivileged daemon keeps its uid
            os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))


def copy_metadata(src: HostDir, src_rel: str, st: os.stat_result, dst: HostDir,
                  dst_rel: str) -> None:
    kind = stat.S_IFMT(st.st_mode)
    if kind != stat.S_IFLNK:
        copy_xattrs(src, src_rel, dst, dst_rel)
    with contextlib.suppress(PermissionError):  # an unprivileged daemon keeps its own uid
        dst.chown(dst_rel, st.st_uid, st.st_gid)
    if kind != stat.S_IFLNK:
        dst.chmod(dst_rel, stat.S_IMODE(st.st_mode))
    dst.utime(dst_rel, st.st_atime_ns, st.st_mtime_ns)
