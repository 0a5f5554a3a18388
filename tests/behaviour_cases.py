"""Reusable behavioural cases: every case asserts what a plain ext4 directory does.

Each case is a class with two halves:

* ``setup_base(base_dir)`` writes the content the case needs with plain ``os`` calls into a
  real directory.  For the overlay this directory becomes the read-only base, so it must be
  deterministic (the owner checksums it before and after the case); for the plain-directory
  target it is simply the directory the facade points at.
* ``run(fs)`` performs operations only through the :class:`~fsfacade.FsFacade` and asserts
  exact outcomes (errnos, contents, sizes, nlink, listings).

The cases concentrate on what copy-on-write overlays typically get wrong: copy-up while
handles are open, whiteouts and opaque directories, renames of directories that live in the
base, hard links across copy-up, inode stability, and readdir merging.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import ClassVar

import pytest
from fsfacade import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    FsFacade,
    TrackingFacade,
    getdents,
    pread_all,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: A fixed, clearly-in-the-past timestamp given to base entries so time changes are visible.
OLD_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09
OLDER_NS = 999_000_000 * 1_000_000_000

IS_ROOT = os.geteuid() == 0


# --------------------------------------------------------------------------- helpers


def current_umask() -> int:
    """The process umask (needed to predict the mode of newly created entries)."""
    old = os.umask(0)
    os.umask(old)
    return old


def expect_errno(code: int, fn: Callable[..., object], *args: object) -> None:
    """Assert that ``fn(*args)`` raises OSError with exactly ``code``."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        fn(*args)
    except OSError as e:
        assert e.errno == code, (
            f"{name}{args!r}: expected {errno.errorcode[code]}, "
            f"got {errno.errorcode.get(e.errno or 0, e.errno)} ({e})"
        )
        return
    raise AssertionError(f"{name}{args!r}: expected {errno.errorcode[code]}, but it succeeded")


def bfile(base: str, rel: str, data: bytes, mode: int = 0o644, mtime_ns: int | None = None) -> str:
    """Write a base file (creating parents) with an exact mode and optional fixed times."""
    path = os.path.join(base, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def bdir(base: str, rel: str, mode: int = 0o755) -> str:
    """Create a base directory (and parents) with an exact mode."""
    path = os.path.join(base, rel)
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    return path


def pattern(n: int, salt: int = 0) -> bytes:
    """Deterministic, non-repeating-looking content so misplaced bytes are caught."""
    return bytes((i * 7 + salt * 13 + (i >> 8)) & 0xFF for i in range(n))


def user_xattrs(fs: FsFacade, path: str) -> list[str]:
    """Only user.* names: security.* labels differ between systems."""
    return sorted(n for n in fs.listxattr(path) if n.startswith("user."))


def imode(fs: FsFacade, path: str) -> int:
    return stat.S_IMODE(fs.lstat(path).st_mode)


# --------------------------------------------------------------------------- framework


class Case:
    """One behavioural scenario; subclasses override ``setup_base`` and ``run``."""

    requires_root: ClassVar[bool] = False
    requires_real_path: ClassVar[bool] = False
    requires_mmap: ClassVar[bool] = False
    #: The view's real path must be searchable by other users (see NonRootPermissions);
    #: fixtures should then place the view outside 0700 directories such as pytest's tmp.
    needs_world_access: ClassVar[bool] = False

    def setup_base(self, base_dir: str) -> None:
        """Populate the (future read-only) base directory; default: nothing."""

    def run(self, fs: FsFacade) -> None:
        raise NotImplementedError


CASES: list[type[Case]] = []


def register(cls: type[Case]) -> type[Case]:
    CASES.append(cls)
    return cls


MakeFs = Callable[[Callable[[str], None]], FsFacade]


def run_case(case: type[Case], make_fs: MakeFs) -> None:
    """Run one case.

    ``make_fs(setup_base)`` must create a base directory, call ``setup_base(base_dir)`` on it,
    build the view on top and return a facade for it (the caller's fixture owns cleanup).
    Handles left open by a failing case are closed here so mounts can be unmounted.
    """
    if case.requires_root and not IS_ROOT:
        pytest.skip("needs root")
    inst = case()
    fs = TrackingFacade(make_fs(inst.setup_base))
    if case.requires_real_path and fs.real_path("") is None:
        pytest.skip("facade has no real paths")
    if case.requires_mmap and not fs.supports_mmap:
        pytest.skip("facade does not support mmap")
    try:
        inst.run(fs)
    finally:
        fs.close_all()


# --------------------------------------------------------------------------- reading


@register
class ReadBaseFiles(Case):
    """Base content must be readable verbatim, at any offset, sequentially and by pread."""

    data = pattern(25_600, 1)

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "a.txt", b"hello base\n")
        bfile(base_dir, "d/e/f.bin", self.data)
        bfile(base_dir, "empty", b"")
        bdir(base_dir, "emptydir")

    def run(self, fs: FsFacade) -> None:
        assert fs.listdir("") == ["a.txt", "d", "empty", "emptydir"]
        assert fs.listdir("d") == ["e"]
        assert fs.listdir("d/e") == ["f.bin"]
        assert fs.listdir("emptydir") == []
        assert fs.read_file("a.txt") == b"hello base\n"
        assert fs.stat("a.txt").st_size == 11
        assert fs.read_file("d/e/f.bin") == self.data
        assert fs.read_file("empty") == b""
        assert fs.stat("empty").st_size == 0
        assert stat.S_ISDIR(fs.stat("emptydir").st_mode)
        assert stat.S_ISREG(fs.stat("a.txt").st_mode)
        h = fs.open("d/e/f.bin", os.O_RDONLY)
        assert pread_all(fs, h, 50, 100) == self.data[100:150]
        assert fs.pread(h, 10, len(self.data)) == b""
        assert fs.pread(h, 10, len(self.data) + 12345) == b""
        assert pread_all(fs, h, 100, len(self.data) - 10) == self.data[-10:]
        got = bytearray()
        while chunk := fs.read(h, 4000):
            got += chunk
        assert bytes(got) == self.data
        assert fs.fstat(h).st_size == len(self.data)
        fs.close(h)


# --------------------------------------------------------------------------- writing


@register
class OverwriteBaseFileInPlace(Case):
    """Partial overwrite of a base file keeps the rest, keeps size, bumps mtime."""

    data = b"0123456789" * 10

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", self.data, mtime_ns=OLD_NS)

    def run(self, fs: FsFacade) -> None:
        assert fs.stat("f").st_mtime_ns == OLD_NS
        h = fs.open("f", os.O_WRONLY)
        assert fs.pwrite(h, b"ABC", 10) == 3
        fs.close(h)
        expected = self.data[:10] + b"ABC" + self.data[13:]
        assert fs.read_file("f") == expected
        st = fs.stat("f")
        assert st.st_size == 100
        assert st.st_mtime_ns > OLD_NS
        h = fs.open("f", os.O_WRONLY)
        assert fs.pwrite(h, b"XYZ", 98) == 3
        fs.close(h)
        assert fs.read_file("f") == expected[:98] + b"XYZ"
        assert fs.stat("f").st_size == 101


@register
class WriteFileReplacesBaseContent(Case):
    """O_CREAT|O_TRUNC on a base file replaces content but keeps the existing mode."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", pattern(1000), mode=0o640)
        bfile(base_dir, "d/g", pattern(5000, 2))

    def run(self, fs: FsFacade) -> None:
        fs.write_file("f", b"short", mode=0o600)
        assert fs.read_file("f") == b"short"
        assert fs.stat("f").st_size == 5
        assert imode(fs, "f") == 0o640
        fs.write_file("d/g", b"")
        assert fs.read_file("d/g") == b""
        assert fs.stat("d/g").st_size == 0
        fs.write_file("d/g", b"again")
        assert fs.read_file("d/g") == b"again"


@register
class CreateNewFiles(Case):
    """New files get the requested mode (minus umask), the caller's owner, nlink 1."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "d/base", b"base child")

    def run(self, fs: FsFacade) -> None:
        um = current_umask()
        for path in ("new", "d/new"):
            h = fs.open(path, os.O_CREAT | os.O_WRONLY, 0o640)
            assert fs.write(h, b"fresh " + path.encode()) == 6 + len(path)
            fs.close(h)
            st = fs.stat(path)
            assert stat.S_ISREG(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o640 & ~um
            assert st.st_nlink == 1
            assert st.st_uid == os.geteuid()
            assert st.st_gid == os.getegid()
            assert fs.read_file(path) == b"fresh " + path.encode()
        h = fs.open("empty", os.O_CREAT | os.O_RDWR, 0o600)
        fs.close(h)
        assert fs.stat("empty").st_size == 0
        assert imode(fs, "empty") == 0o600 & ~um
        assert fs.listdir("") == ["d", "empty", "new"]
        assert fs.listdir("d") == ["base", "new"]
        assert fs.read_file("d/base") == b"base child"


@register
class OExclOnExisting(Case):
    """O_CREAT|O_EXCL fails with EEXIST on base files, new files, dirs and dangling links."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"base f")
        bdir(base_dir, "dir")
        os.symlink("nowhere", os.path.join(base_dir, "dl"))

    def run(self, fs: FsFacade) -> None:
        excl = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        expect_errno(errno.EEXIST, fs.open, "f", excl, 0o644)
        assert fs.read_file("f") == b"base f"
        h = fs.open("n", excl, 0o644)
        fs.close(h)
        expect_errno(errno.EEXIST, fs.open, "n", excl, 0o644)
        expect_errno(errno.EEXIST, fs.open, "dir", excl, 0o644)
        expect_errno(errno.EEXIST, fs.open, "dl", excl, 0o644)
        assert not fs.exists("nowhere")
        fs.unlink("f")
        h = fs.open("f", excl, 0o644)
        assert fs.fstat(h).st_size == 0
        fs.close(h)
        assert fs.read_file("f") == b""
        assert fs.listdir("") == ["dir", "dl", "f", "n"]


@register
class OTruncBaseFile(Case):
    """O_TRUNC on a base file empties it immediately, visible via fstat and stat."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", pattern(4096))

    def run(self, fs: FsFacade) -> None:
        h = fs.open("f", os.O_RDWR | os.O_TRUNC)
        assert fs.fstat(h).st_size == 0
        assert fs.stat("f").st_size == 0
        assert fs.pread(h, 100, 0) == b""
        assert fs.write(h, b"new") == 3
        assert fs.pread(h, 10, 0) == b"new"
        fs.close(h)
        assert fs.read_file("f") == b"new"


@register
class OAppendWrites(Case):
    """O_APPEND writes always land at the current end, across handles."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"abc")

    def run(self, fs: FsFacade) -> None:
        h1 = fs.open("f", os.O_WRONLY | os.O_APPEND)
        assert fs.write(h1, b"def") == 3
        assert fs.write(h1, b"gh") == 2
        assert fs.read_file("f") == b"abcdefgh"
        h2 = fs.open("f", os.O_RDWR | os.O_APPEND)
        plain = fs.open("f", os.O_WRONLY)
        fs.write(h1, b"1")
        fs.write(h2, b"2")
        fs.pwrite(plain, b"X", 0)
        fs.write(h1, b"3")
        assert fs.read_file("f") == b"Xbcdefgh123"
        fs.pwrite(plain, b"-----------------", 0)  # grows the file past the append point
        fs.write(h2, b"!")
        assert fs.read_file("f") == b"-----------------!"
        for h in (h1, h2, plain):
            fs.close(h)
        h = fs.open("new", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fs.write(h, b"one")
        fs.write(h, b"two")
        fs.close(h)
        assert fs.read_file("new") == b"onetwo"


@register
class PwriteOnAppendHandle(Case):
    """Linux quirk: pwrite on an O_APPEND descriptor ignores the offset and appends."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"abc")

    def run(self, fs: FsFacade) -> None:
        h = fs.open("f", os.O_WRONLY | os.O_APPEND)
        assert fs.pwrite(h, b"X", 0) == 1
        fs.close(h)
        assert fs.read_file("f") == b"abcX"


@register
class SequentialReadWrite(Case):
    """read()/write() share one file position per handle."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "b", b"0123456789")

    def run(self, fs: FsFacade) -> None:
        h = fs.open("n", os.O_RDWR | os.O_CREAT, 0o644)
        fs.write(h, b"hello")
        fs.write(h, b" world")
        assert fs.read(h, 10) == b""
        assert fs.pread(h, 100, 0) == b"hello world"
        fs.close(h)
        h = fs.open("n", os.O_RDONLY)
        assert fs.read(h, 5) == b"hello"
        assert fs.read(h, 100) == b" world"
        assert fs.read(h, 100) == b""
        fs.close(h)
        h = fs.open("b", os.O_RDWR)
        assert fs.read(h, 3) == b"012"
        assert fs.write(h, b"XX") == 2
        assert fs.read(h, 2) == b"56"
        fs.close(h)
        assert fs.read_file("b") == b"012XX56789"


@register
class TwoHandlesSeeEachOther(Case):
    """Writes/truncates through one handle are visible through another on the same file."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"original content")

    def run(self, fs: FsFacade) -> None:
        for path in ("f", "new"):
            if path == "new":
                fs.write_file("new", b"original content")
            h1 = fs.open(path, os.O_RDWR)
            h2 = fs.open(path, os.O_RDWR)
            fs.pwrite(h1, b"ORIG", 0)
            assert fs.pread(h2, 100, 0) == b"ORIGinal content"
            fs.pwrite(h2, b"!", 16)
            assert fs.fstat(h1).st_size == 17
            assert fs.pread(h1, 100, 0) == b"ORIGinal content!"
            fs.ftruncate(h2, 4)
            assert fs.pread(h1, 100, 0) == b"ORIG"
            assert fs.fstat(h1).st_size == 4
            fs.close(h1)
            fs.close(h2)
            assert fs.read_file(path) == b"ORIG"


@register
class ReadOnlyHandleBeforeCopyUp(Case):
    """A read-only handle opened on a base file must see later writes from other handles.

    Classic overlay bug: the reader keeps the lower file while the writer copies up.
    """

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"A" * 8192)
        bfile(base_dir, "other", b"other content")

    def run(self, fs: FsFacade) -> None:
        hr = fs.open("f", os.O_RDONLY)
        assert fs.pread(hr, 10, 0) == b"A" * 10
        hw = fs.open("f", os.O_WRONLY | os.O_TRUNC)
        fs.write(hw, b"B" * 100)
        fs.close(hw)
        assert pread_all(fs, hr, 8192, 0) == b"B" * 100
        assert fs.fstat(hr).st_size == 100
        fs.write_file("f", b"C" * 50)
        assert pread_all(fs, hr, 8192, 0) == b"C" * 50
        # Replacing the name by rename leaves the open handle on the old inode.
        fs.rename("other", "f")
        assert fs.read_file("f") == b"other content"
        assert pread_all(fs, hr, 8192, 0) == b"C" * 50
        fs.close(hr)


@register
class HandleAndOpenErrors(Case):
    """Access-mode and file-type errors on open handles and open flags."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"base")
        bdir(base_dir, "d")
        os.symlink("f", os.path.join(base_dir, "sl"))

    def run(self, fs: FsFacade) -> None:
        h = fs.open("f", os.O_RDONLY)
        expect_errno(errno.EBADF, fs.pwrite, h, b"x", 0)
        expect_errno(errno.EBADF, fs.write, h, b"x")
        expect_errno(errno.EINVAL, fs.ftruncate, h, 0)
        fs.close(h)
        assert fs.read_file("f") == b"base"
        h = fs.open("f", os.O_WRONLY)
        expect_errno(errno.EBADF, fs.pread, h, 1, 0)
        expect_errno(errno.EBADF, fs.read, h, 1)
        fs.close(h)
        expect_errno(errno.EISDIR, fs.open, "d", os.O_WRONLY)
        expect_errno(errno.EISDIR, fs.open, "d", os.O_RDWR)
        expect_errno(errno.ENOTDIR, fs.open, "f", os.O_RDONLY | os.O_DIRECTORY)
        expect_errno(errno.ELOOP, fs.open, "sl", os.O_RDONLY | os.O_NOFOLLOW)
        expect_errno(errno.ENOTDIR, fs.open, "f/x", os.O_RDONLY)
        expect_errno(errno.ENOENT, fs.open, "missing", os.O_RDONLY)
        h = fs.open("d", os.O_RDONLY | os.O_DIRECTORY)
        assert stat.S_ISDIR(fs.fstat(h).st_mode)
        expect_errno(errno.EISDIR, fs.read, h, 10)
        fs.close(h)
        h = fs.open("f", os.O_RDONLY)
        expect_errno(errno.EINVAL, fs.pread, h, 1, -1)
        fs.close(h)


# --------------------------------------------------------------------------- sizes


@register
class TruncateGrowShrink(Case):
    """truncate/ftruncate shrink to a prefix and grow with zeros, on base and new files."""

    data = pattern(1000)

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", self.data)
        bdir(base_dir, "d")

    def run(self, fs: FsFacade) -> None:
        fs.truncate("f", 10)
        assert fs.read_file("f") == self.data[:10]
        fs.truncate("f", 20)
        assert fs.read_file("f") == self.data[:10] + bytes(10)
        h = fs.open("f", os.O_RDWR)
        fs.ftruncate(h, 5000)
        assert fs.fstat(h).st_size == 5000
        assert pread_all(fs, h, 10, 4990) == bytes(10)
        assert pread_all(fs, h, 20, 0) == self.data[:10] + bytes(10)
        fs.ftruncate(h, 0)
        assert fs.pread(h, 10, 0) == b""
        fs.pwrite(h, b"xy", 3)
        assert fs.pread(h, 10, 0) == b"\0\0\0xy"
        fs.close(h)
        fs.write_file("n", b"abcdef")
        fs.truncate("n", 2)
        assert fs.read_file("n") == b"ab"
        expect_errno(errno.ENOENT, fs.truncate, "missing", 0)
        expect_errno(errno.EISDIR, fs.truncate, "d", 0)
        expect_errno(errno.EINVAL, fs.truncate, "n", -1)


@register
class SparseFileAt5GiB(Case):
    """Huge sparse files keep holes: exact size, zeros in the hole, few blocks allocated.

    Also checks a sparse *base* file stays sparse after copy-up (no materialised hole).
    """

    base_hole = 256 * MiB

    def setup_base(self, base_dir: str) -> None:
        path = bfile(base_dir, "basesparse", b"head")
        with open(path, "r+b") as f:
            f.seek(self.base_hole)
            f.write(b"mid")
            f.truncate(2 * self.base_hole)

    def run(self, fs: FsFacade) -> None:
        off = 5 * GiB
        h = fs.open("sparse", os.O_RDWR | os.O_CREAT, 0o644)
        assert fs.pwrite(h, b"tail", off) == 4
        st = fs.fstat(h)
        assert st.st_size == off + 4
        assert st.st_blocks * 512 < 1 * MiB
        assert pread_all(fs, h, 4096, 0) == bytes(4096)
        assert pread_all(fs, h, 4096, 2 * GiB + 123) == bytes(4096)
        assert pread_all(fs, h, 8, off - 4) == bytes(4) + b"tail"
        assert fs.pread(h, 8, off + 4) == b""
        fs.close(h)
        assert fs.stat("sparse").st_size == off + 4

        h = fs.open("basesparse", os.O_RDWR)
        assert fs.fstat(h).st_size == 2 * self.base_hole
        fs.pwrite(h, b"HEAD", 0)
        assert pread_all(fs, h, 7, self.base_hole - 2) == b"\0\0mid\0\0"
        fs.ftruncate(h, off)
        st = fs.fstat(h)
        assert st.st_size == off
        assert st.st_blocks * 512 < 16 * MiB
        assert pread_all(fs, h, 8, 0) == b"HEAD\0\0\0\0"
        assert pread_all(fs, h, 16, off - 16) == bytes(16)
        fs.close(h)


@register
class LargeOffsets(Case):
    """Writes near 1 TiB and reads far past EOF behave exactly."""

    def run(self, fs: FsFacade) -> None:
        tib = 1 << 40
        h = fs.open("big", os.O_RDWR | os.O_CREAT, 0o644)
        assert fs.pwrite(h, b"x", tib) == 1
        assert fs.fstat(h).st_size == tib + 1
        assert fs.pread(h, 10, tib) == b"x"
        assert pread_all(fs, h, 4, tib - 2) == b"\0\0x"
        assert fs.pread(h, 10, tib + 1) == b""
        assert fs.pread(h, 10, 1 << 41) == b""
        assert fs.pread(h, 10, (1 << 62)) == b""
        expect_errno(errno.EINVAL, fs.pwrite, h, b"y", -1)
        fs.ftruncate(h, 3)
        assert fs.pread(h, 10, 0) == b"\0\0\0"
        fs.close(h)


# --------------------------------------------------------------------------- unlink / rmdir


@register
class UnlinkBaseThenRecreate(Case):
    """A deleted base name is gone everywhere; recreating it starts empty (no old data)."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"old base content")
        bfile(base_dir, "d/g", b"base g")

    def run(self, fs: FsFacade) -> None:
        fs.unlink("f")
        assert not fs.exists("f")
        expect_errno(errno.ENOENT, fs.stat, "f")
        expect_errno(errno.ENOENT, fs.lstat, "f")
        expect_errno(errno.ENOENT, fs.open, "f", os.O_RDONLY)
        expect_errno(errno.ENOENT, fs.unlink, "f")
        assert fs.listdir("") == ["d"]
        h = fs.open("f", os.O_RDWR | os.O_CREAT, 0o644)
        assert fs.fstat(h).st_size == 0
        assert fs.pread(h, 100, 0) == b""
        fs.write(h, b"new")
        fs.close(h)
        assert fs.read_file("f") == b"new"
        fs.unlink("d/g")
        fs.mkdir("d/g")
        assert stat.S_ISDIR(fs.stat("d/g").st_mode)
        assert fs.listdir("d/g") == []
        assert fs.listdir("") == ["d", "f"]


@register
class UnlinkThenListdir(Case):
    """Listings drop deleted base and new entries and show renames exactly once."""

    def setup_base(self, base_dir: str) -> None:
        for n in ("a", "b", "c"):
            bfile(base_dir, f"d/{n}", n.encode())
        bfile(base_dir, "d/sub/x", b"x")

    def run(self, fs: FsFacade) -> None:
        fs.unlink("d/b")
        assert fs.listdir("d") == ["a", "c", "sub"]
        fs.write_file("d/e", b"e")
        assert fs.listdir("d") == ["a", "c", "e", "sub"]
        fs.unlink("d/e")
        assert fs.listdir("d") == ["a", "c", "sub"]
        fs.unlink("d/a")
        fs.rename("d/c", "d/z")
        assert fs.listdir("d") == ["sub", "z"]
        assert fs.read_file("d/z") == b"c"


@register
class RmdirNonEmptyBaseDir(Case):
    """rmdir sees base children (ENOTEMPTY) until every base and new child is gone."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "d/x", b"x")
        bfile(base_dir, "d/y", b"y")
        bfile(base_dir, "d/s/z", b"z")

    def run(self, fs: FsFacade) -> None:
        expect_errno(errno.ENOTEMPTY, fs.rmdir, "d")
        fs.unlink("d/x")
        fs.unlink("d/y")
        expect_errno(errno.ENOTEMPTY, fs.rmdir, "d")
        expect_errno(errno.ENOTEMPTY, fs.rmdir, "d/s")
        fs.unlink("d/s/z")
        expect_errno(errno.ENOTEMPTY, fs.rmdir, "d")
        fs.rmdir("d/s")
        fs.write_file("d/new", b"n")
        expect_errno(errno.ENOTEMPTY, fs.rmdir, "d")
        fs.unlink("d/new")
        assert fs.listdir("d") == []
        fs.rmdir("d")
        assert not fs.exists("d")
        expect_errno(errno.ENOENT, fs.listdir, "d")
        expect_errno(errno.ENOENT, fs.stat, "d/x")
        expect_errno(errno.ENOENT, fs.rmdir, "d")
        assert fs.listdir("") == []


@register
class RmdirWithRecreatedChild(Case):
    """A base child deleted and recreated counts as a child; a recreated dir is empty."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "d/x", b"base x")
        bfile(base_dir, "d2/sub/k", b"k")

    def run(self, fs: FsFacade) -> None:
        fs.unlink("d/x")
        fs.write_file("d/x", b"new x")
        expect_errno(errno.ENOTEMPTY, fs.rmdir, "d")
        assert fs.listdir("d") == ["x"]
        assert fs.read_file("d/x") == b"new x"
        fs.unlink("d/x")
        fs.rmdir("d")
        fs.unlink("d2/sub/k")
        fs.rmdir("d2/sub")
        fs.mkdir("d2/sub")
        assert fs.listdir("d2/sub") == []
        expect_errno(errno.ENOTEMPTY, fs.rmdir, "d2")
        fs.rmdir("d2/sub")
        fs.rmdir("d2")
        assert fs.listdir("") == []


@register
class MkdirOverDeletedBaseDir(Case):
    """mkdir at the name of a removed base dir yields an empty dir (no resurrected children)."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "d/x", b"base x")
        bfile(base_dir, "d/s/y", b"base y")

    def run(self, fs: FsFacade) -> None:
        fs.unlink("d/s/y")
        fs.rmdir("d/s")
        fs.unlink("d/x")
        fs.rmdir("d")
        fs.mkdir("d", 0o755)
        assert fs.listdir("d") == []
        assert imode(fs, "d") == 0o755 & ~current_umask()
        expect_errno(errno.ENOENT, fs.stat, "d/x")
        expect_errno(errno.ENOENT, fs.stat, "d/s")
        expect_errno(errno.ENOENT, fs.open, "d/s/y", os.O_RDONLY)
        fs.write_file("d/x", b"new x")
        assert fs.read_file("d/x") == b"new x"
        fs.mkdir("d/s")
        assert fs.listdir("d/s") == []
        assert fs.listdir("d") == ["s", "x"]


@register
class RenameDirThenReuseOldName(Case):
    """After moving a base dir away its old name is free; new entries there are unrelated."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "d/x", b"base x")
        bfile(base_dir, "d/s/y", b"base y")
        bfile(base_dir, "d2/z", b"z")

    def run(self, fs: FsFacade) -> None:
        fs.rename("d", "e")
        fs.mkdir("d")
        assert fs.listdir("d") == []
        assert fs.listdir("e") == ["s", "x"]
        fs.write_file("d/x", b"new x")
        assert fs.read_file("e/x") == b"base x"
        assert fs.read_file("d/x") == b"new x"
        assert fs.read_file("e/s/y") == b"base y"
        fs.rename("d2", "f2")
        fs.write_file("d2", b"now a file")
        assert stat.S_ISREG(fs.lstat("d2").st_mode)
        assert fs.read_file("d2") == b"now a file"
        assert fs.listdir("f2") == ["z"]
        assert fs.listdir("") == ["d", "d2", "e", "f2"]


@register
class NamespaceErrors(Case):
    """Errno values for wrong-type and missing-name operations."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"f")
        bfile(base_dir, "d/x", b"x")
        bdir(base_dir, "ed")

    def run(self, fs: FsFacade) -> None:
        expect_errno(errno.EISDIR, fs.unlink, "d")
        expect_errno(errno.EISDIR, fs.unlink, "ed")
        expect_errno(errno.ENOTDIR, fs.rmdir, "f")
        expect_errno(errno.EEXIST, fs.mkdir, "f")
        expect_errno(errno.EEXIST, fs.mkdir, "d")
        expect_errno(errno.ENOENT, fs.mkdir, "missing/sub")
        expect_errno(errno.ENOTDIR, fs.mkdir, "f/sub")
        expect_errno(errno.ENOTDIR, fs.listdir, "f")
        expect_errno(errno.ENOENT, fs.listdir, "missing")
        expect_errno(errno.ENOTDIR, fs.stat, "f/x")
        expect_errno(errno.ENOENT, fs.unlink, "missing")
        expect_errno(errno.ENOENT, fs.rmdir, "missing")
        expect_errno(errno.ENOENT, fs.open, "missing/x", os.O_CREAT | os.O_WRONLY, 0o644)
        expect_errno(errno.ENOTDIR, fs.open, "f/x", os.O_CREAT | os.O_WRONLY, 0o644)
        expect_errno(errno.EINVAL, fs.readlink, "f")
        expect_errno(errno.ENOENT, fs.readlink, "missing")
        expect_errno(errno.EEXIST, fs.symlink, "t", "f")
        expect_errno(errno.EEXIST, fs.symlink, "t", "d")
        expect_errno(errno.EEXIST, fs.link, "d/x", "f")
        expect_errno(errno.ENOENT, fs.link, "missing", "g")
        expect_errno(errno.ENOENT, fs.rename, "missing", "g")
        expect_errno(errno.ENOENT, fs.rename, "f", "missing/g")
        expect_errno(errno.EEXIST, fs.mkfifo, "f")
        assert not fs.exists("g")
        assert fs.listdir("") == ["d", "ed", "f"]


# --------------------------------------------------------------------------- rename


@register
class RenameFileToNewName(Case):
    """Renaming moves content and keeps mtime; the old name is gone."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"base f", mtime_ns=OLD_NS)
        bdir(base_dir, "d")

    def run(self, fs: FsFacade) -> None:
        fs.rename("f", "g")
        expect_errno(errno.ENOENT, fs.stat, "f")
        assert fs.read_file("g") == b"base f"
        assert fs.stat("g").st_mtime_ns == OLD_NS
        fs.rename("g", "d/h")
        assert fs.listdir("") == ["d"]
        assert fs.listdir("d") == ["h"]
        assert fs.read_file("d/h") == b"base f"
        fs.write_file("n", b"new")
        fs.rename("n", "d/n2")
        assert fs.read_file("d/n2") == b"new"
        assert fs.listdir("d") == ["h", "n2"]
        fs.rename("d/h", "d/h")  # same name: no-op
        assert fs.read_file("d/h") == b"base f"


@register
class RenameFileOverExisting(Case):
    """Rename replaces base and new targets atomically; the source name disappears."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "a", b"AAA")
        bfile(base_dir, "b", b"BBBB")
        bfile(base_dir, "c", b"CC")

    def run(self, fs: FsFacade) -> None:
        fs.rename("a", "b")
        assert fs.read_file("b") == b"AAA"
        assert not fs.exists("a")
        fs.write_file("n", b"NNNNN")
        fs.rename("n", "b")
        assert fs.read_file("b") == b"NNNNN"
        fs.write_file("m", b"M")
        fs.rename("c", "m")
        assert fs.read_file("m") == b"CC"
        assert fs.listdir("") == ["b", "m"]
        assert fs.stat("b").st_nlink == 1
        assert fs.stat("m").st_nlink == 1


@register
class RenameDirWithBaseSubtree(Case):
    """A renamed base dir brings its whole subtree; the old name is ENOENT at every depth."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "d/x", b"base x")
        bfile(base_dir, "d/s/y", b"base y")
        bfile(base_dir, "d/s/t/z", pattern(3000))
        os.symlink("x", os.path.join(base_dir, "d/l"))
        bdir(base_dir, "other")

    def run(self, fs: FsFacade) -> None:
        fs.rename("d", "e")
        assert fs.listdir("") == ["e", "other"]
        assert fs.listdir("e") == ["l", "s", "x"]
        assert fs.listdir("e/s") == ["t", "y"]
        assert fs.listdir("e/s/t") == ["z"]
        assert fs.read_file("e/x") == b"base x"
        assert fs.read_file("e/s/y") == b"base y"
        assert fs.read_file("e/s/t/z") == pattern(3000)
        assert fs.readlink("e/l") == "x"
        assert fs.read_file("e/l") == b"base x"
        for gone in ("d", "d/x", "d/s", "d/s/t/z", "d/l"):
            expect_errno(errno.ENOENT, fs.lstat, gone)
        expect_errno(errno.ENOENT, fs.listdir, "d")
        fs.write_file("e/s/t/z", b"changed")
        fs.mkdir("e/new")
        fs.rename("e", "other/e")
        assert fs.listdir("other/e") == ["l", "new", "s", "x"]
        assert fs.read_file("other/e/s/t/z") == b"changed"
        assert fs.read_file("other/e/s/y") == b"base y"
        assert fs.listdir("") == ["other"]


@register
class RenameDirIntoItself(Case):
    """Moving a directory below itself is EINVAL and leaves the tree intact."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "d/s/t/f", b"f")

    def run(self, fs: FsFacade) -> None:
        expect_errno(errno.EINVAL, fs.rename, "d", "d/x")
        expect_errno(errno.EINVAL, fs.rename, "d", "d/s/x")
        expect_errno(errno.EINVAL, fs.rename, "d/s", "d/s/t/u")
        expect_errno(errno.EINVAL, fs.rename2, "d", "d/s/x", RENAME_NOREPLACE)
        fs.rename("d", "d")
        assert fs.listdir("d/s/t") == ["f"]
        assert fs.listdir("") == ["d"]
        fs.rename("d", "e")
        expect_errno(errno.EINVAL, fs.rename, "e", "e/s/x")
        assert fs.read_file("e/s/t/f") == b"f"


@register
class RenameDirOverDir(Case):
    """Dir over non-empty dir is ENOTEMPTY; over empty (incl. emptied base) dir it works."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "a/x", b"x")
        bfile(base_dir, "b/y", b"y")
        bdir(base_dir, "c")
        bfile(base_dir, "e/z", b"z")

    def run(self, fs: FsFacade) -> None:
        expect_errno(errno.ENOTEMPTY, fs.rename, "a", "b")
        fs.rename("a", "c")
        assert fs.listdir("c") == ["x"]
        assert not fs.exists("a")
        expect_errno(errno.ENOTEMPTY, fs.rename, "c", "e")
        fs.unlink("e/z")
        fs.rename("c", "e")
        assert fs.listdir("e") == ["x"]
        assert not fs.exists("e/z")
        fs.mkdir("n")
        fs.write_file("n/k", b"k")
        expect_errno(errno.ENOTEMPTY, fs.rename, "n", "b")
        expect_errno(errno.ENOTEMPTY, fs.rename, "b", "n")
        fs.mkdir("m")
        fs.rename("b", "m")
        assert fs.listdir("m") == ["y"]
        assert fs.listdir("") == ["e", "m", "n"]


@register
class RenameTypeMismatch(Case):
    """File over dir is EISDIR, dir over file ENOTDIR; symlinks are replaced, not followed."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"f")
        bfile(base_dir, "d/x", b"x")
        bdir(base_dir, "ed")
        os.symlink("ed", os.path.join(base_dir, "sl"))

    def run(self, fs: FsFacade) -> None:
        expect_errno(errno.EISDIR, fs.rename, "f", "d")
        expect_errno(errno.EISDIR, fs.rename, "f", "ed")
        expect_errno(errno.ENOTDIR, fs.rename, "d", "f")
        expect_errno(errno.ENOTDIR, fs.rename, "ed", "f")
        expect_errno(errno.ENOTDIR, fs.rename, "ed", "sl")
        fs.write_file("g", b"g")
        fs.rename("g", "sl")
        assert stat.S_ISREG(fs.lstat("sl").st_mode)
        assert fs.read_file("sl") == b"g"
        assert stat.S_ISDIR(fs.lstat("ed").st_mode)
        assert fs.listdir("") == ["d", "ed", "f", "sl"]


@register
class RenameNoReplace(Case):
    """RENAME_NOREPLACE refuses any existing target (even dangling links) but not freed names."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "a", b"A")
        bfile(base_dir, "b", b"B")
        bdir(base_dir, "d")
        os.symlink("nowhere", os.path.join(base_dir, "dl"))

    def run(self, fs: FsFacade) -> None:
        expect_errno(errno.EEXIST, fs.rename2, "a", "b", RENAME_NOREPLACE)
        expect_errno(errno.EEXIST, fs.rename2, "a", "d", RENAME_NOREPLACE)
        expect_errno(errno.EEXIST, fs.rename2, "a", "dl", RENAME_NOREPLACE)
        expect_errno(errno.EEXIST, fs.rename2, "d", "a", RENAME_NOREPLACE)
        assert fs.read_file("a") == b"A"
        assert fs.read_file("b") == b"B"
        fs.rename2("a", "c", RENAME_NOREPLACE)
        assert fs.read_file("c") == b"A"
        fs.unlink("b")
        fs.rename2("c", "b", RENAME_NOREPLACE)
        assert fs.read_file("b") == b"A"
        fs.rename2("d", "e", RENAME_NOREPLACE)
        assert fs.listdir("") == ["b", "dl", "e"]


@register
class RenameExchangeFiles(Case):
    """RENAME_EXCHANGE swaps two names atomically (contents and inodes swap)."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "a", b"AAA")
        bfile(base_dir, "b", b"BBBB")

    def run(self, fs: FsFacade) -> None:
        ino_a, ino_b = fs.stat("a").st_ino, fs.stat("b").st_ino
        fs.rename2("a", "b", RENAME_EXCHANGE)
        assert fs.read_file("a") == b"BBBB"
        assert fs.read_file("b") == b"AAA"
        assert fs.stat("a").st_ino == ino_b
        assert fs.stat("b").st_ino == ino_a
        expect_errno(errno.ENOENT, fs.rename2, "a", "missing", RENAME_EXCHANGE)
        expect_errno(errno.ENOENT, fs.rename2, "missing", "a", RENAME_EXCHANGE)
        fs.write_file("n", b"new")
        fs.rename2("n", "a", RENAME_EXCHANGE)
        assert fs.read_file("n") == b"BBBB"
        assert fs.read_file("a") == b"new"
        fs.rename2("n", "a", RENAME_EXCHANGE)
        assert fs.read_file("a") == b"BBBB"
        assert fs.listdir("") == ["a", "b", "n"]
        expect_errno(errno.EINVAL, fs.rename2, "a", "b", RENAME_EXCHANGE | RENAME_NOREPLACE)


@register
class RenameExchangeFileAndDir(Case):
    """RENAME_EXCHANGE of a file and a base dir swaps types and keeps the dir's children."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"file content")
        bfile(base_dir, "d/x", b"child x")
        bfile(base_dir, "p/q", b"q")
        bdir(base_dir, "r/s")

    def run(self, fs: FsFacade) -> None:
        fs.rename2("f", "d", RENAME_EXCHANGE)
        assert stat.S_ISDIR(fs.lstat("f").st_mode)
        assert stat.S_ISREG(fs.lstat("d").st_mode)
        assert fs.listdir("f") == ["x"]
        assert fs.read_file("f/x") == b"child x"
        assert fs.read_file("d") == b"file content"
        fs.rename2("p/q", "r/s", RENAME_EXCHANGE)
        assert fs.read_file("r/s") == b"q"
        assert fs.listdir("p/q") == []
        assert fs.listdir("") == ["d", "f", "p", "r"]


@register
class RenameAndBack(Case):
    """Rename then rename back restores the exact original view."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"base f")
        bfile(base_dir, "d/x", b"x")
        bfile(base_dir, "d/s/y", b"y")

    def run(self, fs: FsFacade) -> None:
        fs.rename("f", "g")
        fs.rename("g", "f")
        assert fs.read_file("f") == b"base f"
        fs.rename("d", "e")
        fs.rename("e", "d")
        assert fs.listdir("") == ["d", "f"]
        assert fs.listdir("d") == ["s", "x"]
        assert fs.read_file("d/s/y") == b"y"
        expect_errno(errno.ENOENT, fs.stat, "e")
        fs.write_file("d/x", b"X2")
        fs.rename("d", "e")
        fs.rename("e", "d")
        assert fs.read_file("d/x") == b"X2"


@register
class RenameBaseDirTwice(Case):
    """a->b->c for a base dir, then modifying children works and a, b stay gone."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "a/x", b"base x")
        bfile(base_dir, "a/s/y", b"base y")

    def run(self, fs: FsFacade) -> None:
        fs.rename("a", "b")
        fs.rename("b", "c")
        fs.write_file("c/x", b"new x")
        h = fs.open("c/s/y", os.O_WRONLY)
        fs.pwrite(h, b"Y", 5)
        fs.close(h)
        assert fs.read_file("c/x") == b"new x"
        assert fs.read_file("c/s/y") == b"base Y"
        assert fs.listdir("") == ["c"]
        for gone in ("a", "a/x", "b", "b/x", "b/s/y"):
            expect_errno(errno.ENOENT, fs.lstat, gone)
        fs.mkdir("a")
        assert fs.listdir("a") == []


@register
class RenameOverDeletedBaseName(Case):
    """Renaming onto a name whose base entry was deleted shows only the moved entry."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "a", b"A")
        bfile(base_dir, "b", b"B")
        bfile(base_dir, "d/x", b"x")
        bfile(base_dir, "e/y", b"y")

    def run(self, fs: FsFacade) -> None:
        fs.unlink("a")
        fs.rename("b", "a")
        assert fs.read_file("a") == b"B"
        fs.unlink("d/x")
        fs.rmdir("d")
        fs.rename("e", "d")
        assert fs.listdir("d") == ["y"]
        assert fs.listdir("") == ["a", "d"]


@register
class RenameParentOfOpenFile(Case):
    """Handles keep working after their parent dir or the file itself is renamed."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "d/x", b"base")

    def run(self, fs: FsFacade) -> None:
        h = fs.open("d/x", os.O_RDWR)
        fs.pwrite(h, b"1", 0)
        hn = fs.open("d/n", os.O_RDWR | os.O_CREAT, 0o644)
        fs.write(hn, b"before ")
        fs.rename("d", "e")
        fs.pwrite(h, b"2", 1)
        fs.write(hn, b"after")
        assert fs.fstat(h).st_size == 4
        assert fs.read_file("e/x") == b"12se"
        assert fs.read_file("e/n") == b"before after"
        fs.rename("e/x", "e/y")
        fs.pwrite(h, b"!", 4)
        fs.close(h)
        fs.close(hn)
        assert fs.read_file("e/y") == b"12se!"
        assert fs.listdir("e") == ["n", "y"]


@register
class RenameHardlinkOntoTwin(Case):
    """rename(a, b) where a and b are the same inode is a no-op: both names survive."""

    def setup_base(self, base_dir: str) -> None:
        p = bfile(base_dir, "h1", b"pair")
        os.link(p, os.path.join(base_dir, "h2"))

    def run(self, fs: FsFacade) -> None:
        fs.rename("h1", "h2")
        assert fs.listdir("") == ["h1", "h2"]
        assert fs.stat("h1").st_nlink == 2
        fs.write_file("n1", b"new")
        fs.link("n1", "n2")
        fs.rename("n1", "n2")
        assert fs.listdir("") == ["h1", "h2", "n1", "n2"]
        assert fs.stat("n2").st_nlink == 2


# --------------------------------------------------------------------------- readdir


@register
class ReaddirMergedListing(Case):
    """The merged listing equals a model after mixed creates, deletes and renames."""

    def setup_base(self, base_dir: str) -> None:
        for i in range(20):
            bfile(base_dir, f"d/f{i:02d}", f"f{i}".encode())
        for i in range(3):
            bdir(base_dir, f"d/s{i}")

    def run(self, fs: FsFacade) -> None:
        model = {f"f{i:02d}" for i in range(20)} | {f"s{i}" for i in range(3)}
        fs.unlink("d/f03")
        fs.unlink("d/f07")
        model -= {"f03", "f07"}
        fs.write_file("d/n1", b"1")
        fs.write_file("d/n2", b"2")
        fs.mkdir("d/s9")
        model |= {"n1", "n2", "s9"}
        fs.rmdir("d/s1")
        fs.rename("d/f10", "d/g10")
        fs.unlink("d/n2")
        fs.write_file("d/f03", b"recreated")
        fs.rename("d/s2", "d/s1")
        model -= {"s1", "f10", "n2", "s2"}
        model |= {"g10", "f03", "s1"}
        assert fs.listdir("d") == sorted(model)
        assert fs.listdir("d") == sorted(model)
        for name in model:
            is_dir = stat.S_ISDIR(fs.lstat(f"d/{name}").st_mode)
            assert is_dir == name.startswith("s"), name
        assert fs.read_file("d/f03") == b"recreated"
        assert fs.read_file("d/g10") == b"f10"


@register
class ReaddirWhileDeleting(Case):
    """Deleting entries during one readdir pass: survivors appear exactly once, no dups.

    Uses os.scandir on the real path (the facade has no streaming readdir).  Long names and
    many entries force several getdents batches so offset/cookie handling is exercised.
    """

    requires_real_path = True
    n = 300

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}-{i:03d}-" + "x" * 40 for i in range(self.n)]

    def setup_base(self, base_dir: str) -> None:
        for name in self.names("base"):
            bfile(base_dir, f"d/{name}", b"b")

    def run(self, fs: FsFacade) -> None:
        for name in self.names("new"):
            fs.write_file(f"d/{name}", b"n")
        everything = sorted(self.names("base") + self.names("new"))
        to_delete = everything[1::3]
        survivors = set(everything) - set(to_delete)
        real = fs.real_path("d")
        assert real is not None
        seen: Counter[str] = Counter()
        pending = list(to_delete)
        with os.scandir(real) as it:
            for entry in it:
                seen[entry.name] += 1
                if pending:
                    fs.unlink(f"d/{pending.pop()}")
                if pending:
                    fs.unlink(f"d/{pending.pop(0)}")
        assert not pending, "iteration ended before all deletions happened"
        dups = sorted(n for n, c in seen.items() if c > 1)
        assert not dups, f"entries returned twice: {dups[:5]}"
        missing = sorted(survivors - set(seen))
        assert not missing, f"surviving entries never returned: {missing[:5]}"
        unknown = set(seen) - set(everything)
        assert not unknown, f"garbage entries: {sorted(unknown)[:5]}"
        assert fs.listdir("d") == sorted(survivors)


# --------------------------------------------------------------------------- links


@register
class Symlinks(Case):
    """readlink round trips; stat follows, lstat does not; writes via links hit the target."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"target content")
        bdir(base_dir, "d")
        os.symlink("f", os.path.join(base_dir, "bl"))
        os.symlink("missing", os.path.join(base_dir, "bd"))

    def run(self, fs: FsFacade) -> None:
        fs.symlink("f", "rel")
        assert fs.readlink("rel") == "f"
        lst = fs.lstat("rel")
        assert stat.S_ISLNK(lst.st_mode)
        assert lst.st_size == 1
        assert stat.S_ISREG(fs.stat("rel").st_mode)
        assert fs.stat("rel").st_size == 14
        assert fs.read_file("rel") == b"target content"
        fs.symlink("/abs/nowhere/x", "abs")
        assert fs.readlink("abs") == "/abs/nowhere/x"
        assert stat.S_ISLNK(fs.lstat("abs").st_mode)
        assert fs.lstat("abs").st_size == len("/abs/nowhere/x")
        fs.symlink("../f", "d/up")
        assert fs.read_file("d/up") == b"target content"
        fs.symlink("nothere", "dang")
        expect_errno(errno.ENOENT, fs.stat, "dang")
        assert fs.exists("dang")
        assert stat.S_ISLNK(fs.lstat("dang").st_mode)
        # base symlinks
        assert fs.readlink("bl") == "f"
        h = fs.open("bl", os.O_WRONLY | os.O_TRUNC)
        fs.write(h, b"via link")
        fs.close(h)
        assert fs.read_file("f") == b"via link"
        assert stat.S_ISLNK(fs.lstat("bl").st_mode)
        assert fs.readlink("bd") == "missing"
        expect_errno(errno.ENOENT, fs.stat, "bd")
        fs.write_file("missing", b"now here")
        assert fs.read_file("bd") == b"now here"
        fs.symlink("d", "dl")
        assert fs.listdir("dl") == ["up"]
        fs.unlink("bl")
        assert fs.read_file("f") == b"via link"
        assert fs.listdir("") == ["abs", "bd", "d", "dang", "dl", "f", "missing", "rel"]


@register
class OpenThroughSymlinks(Case):
    """O_CREAT follows dangling links (creating the target); O_EXCL/O_NOFOLLOW do not."""

    def setup_base(self, base_dir: str) -> None:
        os.symlink("created_by_open", os.path.join(base_dir, "bd"))
        os.symlink("l2", os.path.join(base_dir, "l1"))
        os.symlink("l1", os.path.join(base_dir, "l2"))

    def run(self, fs: FsFacade) -> None:
        expect_errno(errno.EEXIST, fs.open, "bd", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        assert not fs.exists("created_by_open")
        h = fs.open("bd", os.O_CREAT | os.O_WRONLY, 0o644)
        fs.write(h, b"made")
        fs.close(h)
        assert fs.read_file("created_by_open") == b"made"
        assert stat.S_ISLNK(fs.lstat("bd").st_mode)
        expect_errno(errno.ELOOP, fs.open, "bd", os.O_RDONLY | os.O_NOFOLLOW)
        expect_errno(errno.ELOOP, fs.stat, "l1")
        expect_errno(errno.ELOOP, fs.open, "l1", os.O_RDONLY)
        assert stat.S_ISLNK(fs.lstat("l1").st_mode)


@register
class HardLinkBaseFile(Case):
    """Linking a base file: shared inode and nlink; writes visible under both names."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"data")
        bdir(base_dir, "d")

    def run(self, fs: FsFacade) -> None:
        fs.link("f", "g")
        sf, sg = fs.stat("f"), fs.stat("g")
        assert sf.st_nlink == 2 and sg.st_nlink == 2
        assert sf.st_ino == sg.st_ino
        h = fs.open("g", os.O_WRONLY)
        fs.pwrite(h, b"DA", 0)
        fs.close(h)
        assert fs.read_file("f") == b"DAta"
        fs.link("g", "d/h")
        assert fs.stat("f").st_nlink == 3
        assert fs.stat("d/h").st_ino == sf.st_ino
        fs.unlink("f")
        assert fs.stat("g").st_nlink == 2
        fs.unlink("d/h")
        assert fs.stat("g").st_nlink == 1
        assert fs.read_file("g") == b"DAta"
        expect_errno(errno.EPERM, fs.link, "d", "d2")
        expect_errno(errno.EEXIST, fs.link, "g", "d")
        fs.write_file("n", b"new")
        fs.link("n", "n2")
        assert fs.stat("n2").st_nlink == 2
        assert fs.listdir("") == ["d", "g", "n", "n2"]


@register
class HardLinkPairInBase(Case):
    """Names sharing an inode in the base stay one inode after writing via one of them."""

    def setup_base(self, base_dir: str) -> None:
        p = bfile(base_dir, "p1", b"pair data")
        os.link(p, os.path.join(base_dir, "p2"))
        os.makedirs(os.path.join(base_dir, "sub"))
        os.link(p, os.path.join(base_dir, "sub/p3"))

    def run(self, fs: FsFacade) -> None:
        ino = fs.stat("p1").st_ino
        assert fs.read_file("p2") == b"pair data"
        for n in ("p1", "p2", "sub/p3"):
            assert fs.stat(n).st_nlink == 3
            assert fs.stat(n).st_ino == ino
        h = fs.open("p1", os.O_WRONLY)
        fs.pwrite(h, b"PAIR", 0)
        fs.close(h)
        for n in ("p1", "p2", "sub/p3"):
            assert fs.read_file(n) == b"PAIR data", n
            assert fs.stat(n).st_ino == ino, n
            assert fs.stat(n).st_nlink == 3, n
        fs.unlink("p2")
        assert fs.stat("p1").st_nlink == 2
        fs.truncate("sub/p3", 4)
        assert fs.read_file("p1") == b"PAIR"
        assert fs.stat("p1").st_size == 4


@register
class InodeStability(Case):
    """st_ino survives copy-up (write, chmod) and rename; st_dev is one device for the view."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"data")
        bfile(base_dir, "d/x", b"x")

    def run(self, fs: FsFacade) -> None:
        ino = fs.stat("f").st_ino
        ino_d, ino_x = fs.stat("d").st_ino, fs.stat("d/x").st_ino
        h = fs.open("f", os.O_RDONLY)
        assert fs.fstat(h).st_ino == ino
        fs.close(h)
        h = fs.open("f", os.O_RDWR)
        fs.pwrite(h, b"D", 0)
        assert fs.fstat(h).st_ino == ino
        fs.close(h)
        assert fs.stat("f").st_ino == ino
        fs.chmod("f", 0o600)
        assert fs.stat("f").st_ino == ino
        fs.rename("f", "g")
        assert fs.stat("g").st_ino == ino
        fs.write_file("d/new", b"n")
        assert fs.stat("d").st_ino == ino_d
        fs.rename("d", "e")
        assert fs.stat("e").st_ino == ino_d
        assert fs.stat("e/x").st_ino == ino_x
        fs.write_file("e/x", b"X")
        assert fs.stat("e/x").st_ino == ino_x
        inos = {fs.stat(p).st_ino for p in ("", "g", "e", "e/x", "e/new")}
        assert len(inos) == 5, "distinct entries must have distinct inode numbers"
        devs = {fs.stat(p).st_dev for p in ("", "g", "e", "e/x", "e/new")}
        assert len(devs) == 1


# --------------------------------------------------------------------------- attributes


@register
class Fifo(Case):
    """mkfifo creates a FIFO node (base ones show up too); it can be renamed and removed."""

    def setup_base(self, base_dir: str) -> None:
        bdir(base_dir, "d")
        os.mkfifo(os.path.join(base_dir, "bf"), 0o600)

    def run(self, fs: FsFacade) -> None:
        fs.mkfifo("p", 0o644)
        st = fs.lstat("p")
        assert stat.S_ISFIFO(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o644 & ~current_umask()
        assert st.st_size == 0
        fs.mkfifo("d/p")
        assert stat.S_ISFIFO(fs.lstat("d/p").st_mode)
        expect_errno(errno.EEXIST, fs.mkfifo, "p")
        assert stat.S_ISFIFO(fs.lstat("bf").st_mode)
        assert imode(fs, "bf") == 0o600
        fs.rename("bf", "d/bf2")
        assert stat.S_ISFIFO(fs.lstat("d/bf2").st_mode)
        fs.unlink("p")
        assert fs.listdir("") == ["d"]
        assert fs.listdir("d") == ["bf2", "p"]


@register
class ChmodModes(Case):
    """chmod sets exact bits (incl. special bits), follows symlinks, keeps content and mtime."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"content", mode=0o644, mtime_ns=OLD_NS)
        bfile(base_dir, "d/x", b"x")
        os.symlink("f", os.path.join(base_dir, "sl"))

    def run(self, fs: FsFacade) -> None:
        fs.chmod("f", 0o600)
        assert imode(fs, "f") == 0o600
        assert fs.read_file("f") == b"content"
        assert fs.stat("f").st_mtime_ns == OLD_NS
        fs.chmod("f", 0o4755)
        assert imode(fs, "f") == 0o4755
        fs.chmod("d", 0o700)
        assert imode(fs, "d") == 0o700
        assert fs.listdir("d") == ["x"]
        fs.chmod("d", 0o1777)
        assert imode(fs, "d") == 0o1777
        lmode = imode(fs, "sl")
        fs.chmod("sl", 0o640)
        assert imode(fs, "f") == 0o640
        assert imode(fs, "sl") == lmode
        fs.write_file("n", b"n")
        fs.chmod("n", 0o2751)
        assert imode(fs, "n") == 0o2751
        expect_errno(errno.ENOENT, fs.chmod, "missing", 0o644)


@register
class Chown(Case):
    """chown (root) sets ids on base/new files, -1 keeps a field, symlinks are followed."""

    requires_root = True

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"content")
        os.symlink("f", os.path.join(base_dir, "sl"))
        bdir(base_dir, "d")

    def run(self, fs: FsFacade) -> None:
        fs.chown("f", 1234, 5678)
        st = fs.stat("f")
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert fs.read_file("f") == b"content"
        fs.chown("f", -1, -1)
        st = fs.stat("f")
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        fs.chown("f", -1, 99)
        st = fs.stat("f")
        assert (st.st_uid, st.st_gid) == (1234, 99)
        fs.chown("sl", 4321, 4321)
        st = fs.stat("f")
        assert (st.st_uid, st.st_gid) == (4321, 4321)
        assert fs.lstat("sl").st_uid == 0
        fs.chown("d", 7, 8)
        assert (fs.stat("d").st_uid, fs.stat("d").st_gid) == (7, 8)
        fs.write_file("n", b"n")
        fs.chown("n", 1, 2)
        assert (fs.stat("n").st_uid, fs.stat("n").st_gid) == (1, 2)


@register
class ChownClearsSetuid(Case):
    """chown of a regular file clears set-uid/set-gid bits (even for root); dirs keep them."""

    requires_root = True

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"x", mode=0o6755)
        bdir(base_dir, "d", mode=0o2755)

    def run(self, fs: FsFacade) -> None:
        assert imode(fs, "f") == 0o6755
        fs.chown("f", 1000, 1000)
        assert imode(fs, "f") == 0o755
        fs.chown("d", 1000, 1000)
        assert imode(fs, "d") == 0o2755


@register
class UtimeNanoseconds(Case):
    """utime with ns round-trips exactly; on a symlink it touches the link, not the target."""

    at, mt = 1_234_567_890_123_456_789, 1_500_000_000_987_654_321

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"content", mtime_ns=OLD_NS)
        bdir(base_dir, "d")
        os.symlink("f", os.path.join(base_dir, "sl"))

    def run(self, fs: FsFacade) -> None:
        fs.utime("f", (self.at, self.mt))
        st = fs.stat("f")
        assert (st.st_atime_ns, st.st_mtime_ns) == (self.at, self.mt)
        assert fs.read_file("f") == b"content"
        fs.utime("d", (self.mt, self.at))
        st = fs.stat("d")
        assert (st.st_atime_ns, st.st_mtime_ns) == (self.mt, self.at)
        fs.utime("sl", (OLDER_NS + 1, OLDER_NS + 2))
        lst = fs.lstat("sl")
        assert (lst.st_atime_ns, lst.st_mtime_ns) == (OLDER_NS + 1, OLDER_NS + 2)
        assert fs.stat("f").st_mtime_ns == self.mt
        fs.write_file("n", b"n")
        fs.utime("n", (5, 4_000_000_001))
        st = fs.stat("n")
        assert (st.st_atime_ns, st.st_mtime_ns) == (5, 4_000_000_001)
        future = (1 << 33) * 1_000_000_000 + 7
        fs.utime("n", (future, future))
        assert fs.stat("n").st_mtime_ns == future
        expect_errno(errno.ENOENT, fs.utime, "missing", (1, 1))


@register
class Xattrs(Case):
    """user.* xattrs: set/get/list/remove with exact errnos for CREATE/REPLACE/missing."""

    def setup_base(self, base_dir: str) -> None:
        bdir(base_dir, "d")

    def run(self, fs: FsFacade) -> None:
        fs.write_file("n", b"n")
        for p in ("n", "d"):
            assert user_xattrs(fs, p) == []
            fs.setxattr(p, "user.a", b"1")
            assert fs.getxattr(p, "user.a") == b"1"
            fs.setxattr(p, "user.empty", b"")
            assert fs.getxattr(p, "user.empty") == b""
            fs.setxattr(p, "user.bin", bytes(range(256)))
            assert fs.getxattr(p, "user.bin") == bytes(range(256))
            fs.setxattr(p, "user.big", pattern(1500))
            assert fs.getxattr(p, "user.big") == pattern(1500)
            assert user_xattrs(fs, p) == ["user.a", "user.big", "user.bin", "user.empty"]
            expect_errno(errno.EEXIST, fs.setxattr, p, "user.a", b"2", os.XATTR_CREATE)
            expect_errno(errno.ENODATA, fs.setxattr, p, "user.zz", b"2", os.XATTR_REPLACE)
            fs.setxattr(p, "user.a", b"22", os.XATTR_REPLACE)
            assert fs.getxattr(p, "user.a") == b"22"
            fs.removexattr(p, "user.a")
            expect_errno(errno.ENODATA, fs.getxattr, p, "user.a")
            expect_errno(errno.ENODATA, fs.removexattr, p, "user.a")
            expect_errno(errno.ENODATA, fs.getxattr, p, "user.never")
            assert user_xattrs(fs, p) == ["user.big", "user.bin", "user.empty"]
        assert fs.read_file("n") == b"n"
        expect_errno(errno.ENOENT, fs.getxattr, "missing", "user.a")


@register
class XattrsOnBaseFile(Case):
    """Base xattrs are visible, survive copy-up, and can be changed/removed; mtime untouched."""

    def setup_base(self, base_dir: str) -> None:
        p = bfile(base_dir, "f", b"content")
        os.setxattr(p, "user.base", b"from base")
        os.utime(p, ns=(OLD_NS, OLD_NS))
        d = bdir(base_dir, "d")
        os.setxattr(d, "user.dirattr", b"dir value")

    def run(self, fs: FsFacade) -> None:
        assert fs.getxattr("f", "user.base") == b"from base"
        assert user_xattrs(fs, "f") == ["user.base"]
        fs.setxattr("f", "user.new", b"new")
        assert user_xattrs(fs, "f") == ["user.base", "user.new"]
        assert fs.stat("f").st_mtime_ns == OLD_NS
        h = fs.open("f", os.O_WRONLY)
        fs.pwrite(h, b"C", 0)
        fs.close(h)
        assert fs.getxattr("f", "user.base") == b"from base"
        assert fs.getxattr("f", "user.new") == b"new"
        fs.removexattr("f", "user.base")
        expect_errno(errno.ENODATA, fs.getxattr, "f", "user.base")
        assert user_xattrs(fs, "f") == ["user.new"]
        assert fs.getxattr("d", "user.dirattr") == b"dir value"
        fs.removexattr("d", "user.dirattr")
        assert user_xattrs(fs, "d") == []
        fs.rename("f", "g")
        assert fs.getxattr("g", "user.new") == b"new"


@register
class FsyncAndStatvfs(Case):
    """fsync/fdatasync succeed on every kind of handle; statvfs reports sane numbers."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"base")
        bdir(base_dir, "d")

    def run(self, fs: FsFacade) -> None:
        h = fs.open("f", os.O_RDWR)
        fs.pwrite(h, b"B", 0)
        fs.fsync(h)
        fs.fdatasync(h)
        fs.close(h)
        h = fs.open("n", os.O_WRONLY | os.O_CREAT, 0o644)
        fs.write(h, b"x")
        fs.fsync(h)
        fs.fdatasync(h)
        fs.close(h)
        h = fs.open("f", os.O_RDONLY)
        fs.fsync(h)
        fs.close(h)
        h = fs.open("d", os.O_RDONLY | os.O_DIRECTORY)
        fs.fsync(h)
        fs.close(h)
        assert fs.read_file("f") == b"Base"
        for p in ("", "d", "f"):
            sv = fs.statvfs(p)
            assert sv.f_bsize > 0 and sv.f_frsize > 0
            assert sv.f_blocks > 0
            assert 0 <= sv.f_bavail <= sv.f_bfree <= sv.f_blocks
            assert 0 <= sv.f_ffree <= sv.f_files
            assert sv.f_namemax >= 255


@register
class AccessAsRoot(Case):
    """access() for root: R/W always granted, X only when some x bit is set (files)."""

    requires_root = True

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "rw", b"", mode=0o644)
        bfile(base_dir, "none", b"", mode=0o000)
        bfile(base_dir, "ux", b"", mode=0o100)
        bdir(base_dir, "dnone", mode=0o000)

    def run(self, fs: FsFacade) -> None:
        assert fs.access("rw", os.F_OK)
        assert fs.access("rw", os.R_OK | os.W_OK)
        assert not fs.access("rw", os.X_OK)
        assert fs.access("none", os.R_OK | os.W_OK)
        assert not fs.access("none", os.X_OK)
        assert fs.access("ux", os.X_OK)
        assert fs.access("dnone", os.R_OK | os.W_OK | os.X_OK)
        assert not fs.access("missing", os.F_OK)
        fs.chmod("rw", 0o750)
        assert fs.access("rw", os.X_OK)
        fs.write_file("n", b"", mode=0o600)
        assert not fs.access("n", os.X_OK)
        assert fs.access("n", os.R_OK | os.W_OK)


# --------------------------------------------------------------------------- mmap


@register
class MmapSharedWrite(Case):
    """MAP_SHARED stores through the real path are visible through the facade (new + base)."""

    requires_real_path = True
    requires_mmap = True

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "bm", b"a" * 4096)

    def run(self, fs: FsFacade) -> None:
        fs.write_file("m", bytes(8192))
        for path, size in (("m", 8192), ("bm", 4096)):
            real = fs.real_path(path)
            assert real is not None
            fd = os.open(real, os.O_RDWR)
            try:
                with mmap.mmap(fd, size, mmap.MAP_SHARED) as mm:
                    mm[100:105] = b"hello"
                    mm.flush()
            finally:
                os.close(fd)
            got = fs.read_file(path)
            assert len(got) == size
            assert got[100:105] == b"hello"
        assert fs.read_file("bm")[:100] == b"a" * 100


@register
class MmapReadBaseFile(Case):
    """A read-only mapping of a base file shows its content."""

    requires_real_path = True
    requires_mmap = True
    data = pattern(3 * 4096 + 17, 5)

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "b", self.data)

    def run(self, fs: FsFacade) -> None:
        real = fs.real_path("b")
        assert real is not None
        fd = os.open(real, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
                assert mm[:] == self.data
        finally:
            os.close(fd)


@register
class MmapSeesLaterWrites(Case):
    """A shared read mapping of a base file made *before* a write sees the written data."""

    requires_real_path = True
    requires_mmap = True

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "b", b"o" * 8192)

    def run(self, fs: FsFacade) -> None:
        real = fs.real_path("b")
        assert real is not None
        fd = os.open(real, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
                assert mm[:4] == b"oooo"
                h = fs.open("b", os.O_WRONLY)
                fs.pwrite(h, b"NEW!", 4096)
                fs.close(h)
                assert mm[4096:4100] == b"NEW!"
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- open-unlinked


@register
class UnlinkOpenFile(Case):
    """An unlinked open file stays readable and writable; its name is free immediately."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "f", b"base data")

    def run(self, fs: FsFacade) -> None:
        h = fs.open("f", os.O_RDWR)
        hr = fs.open("f", os.O_RDONLY)
        fs.unlink("f")
        assert not fs.exists("f")
        assert fs.listdir("") == []
        assert fs.pread(h, 100, 0) == b"base data"
        fs.pwrite(h, b"BASE", 0)
        assert fs.pread(h, 100, 0) == b"BASE data"
        assert fs.pread(hr, 100, 0) == b"BASE data"
        assert fs.fstat(h).st_nlink == 0
        fs.write_file("f", b"new")
        assert fs.read_file("f") == b"new"
        assert fs.pread(h, 100, 0) == b"BASE data"
        fs.ftruncate(h, 2)
        assert fs.pread(hr, 100, 0) == b"BA"
        fs.close(h)
        fs.close(hr)
        n = fs.open("tmp", os.O_RDWR | os.O_CREAT, 0o644)
        fs.unlink("tmp")
        fs.write(n, b"anonymous")
        assert fs.pread(n, 100, 0) == b"anonymous"
        assert fs.fstat(n).st_size == 9
        fs.close(n)
        assert fs.listdir("") == ["f"]


# --------------------------------------------------------------------------- names


@register
class NameLengths(Case):
    """255-byte names work (incl. multi-byte UTF-8); 256 bytes is ENAMETOOLONG everywhere."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "b" * 255, b"long base")
        bfile(base_dir, "f", b"f")

    def run(self, fs: FsFacade) -> None:
        n255 = "n" * 255
        fs.write_file(n255, b"ok")
        assert fs.read_file(n255) == b"ok"
        assert fs.read_file("b" * 255) == b"long base"
        u255 = "é" * 127 + "x"
        assert len(u255.encode()) == 255
        fs.write_file(u255, b"u")
        fs.mkdir("m" * 255)
        fs.rename(n255, "r" * 255)
        assert fs.listdir("") == sorted(["b" * 255, "f", u255, "m" * 255, "r" * 255])
        for long in ("x" * 256, "é" * 128):
            flags = os.O_CREAT | os.O_WRONLY
            expect_errno(errno.ENAMETOOLONG, fs.open, long, flags, 0o644)
            expect_errno(errno.ENAMETOOLONG, fs.mkdir, long)
            expect_errno(errno.ENAMETOOLONG, fs.stat, long)
            expect_errno(errno.ENAMETOOLONG, fs.symlink, "f", long)
            expect_errno(errno.ENAMETOOLONG, fs.rename, "f", long)
            expect_errno(errno.ENAMETOOLONG, fs.link, "f", long)
        assert len(fs.listdir("")) == 5


@register
class OddNames(Case):
    """Names with spaces, newlines, unicode (NFC vs NFD distinct) and overlay-ish prefixes."""

    names: ClassVar[list[str]] = [
        "with space",
        " leading",
        "trailing ",
        "new\nline",
        "tab\tname",
        "ünïcödé",
        "日本語",
        "emoji-😀",
        "nfc-\u00e9",
        "nfd-e\u0301",
        "-dash",
        "..dots",
        "...",
        ".hidden",
        ".wh.foo",
        ".wh..wh..opq",
        "back\\slash",
        "quote'\"",
        "star*?[x]",
        "%percent#hash",
    ]
    base_names: ClassVar[list[str]] = ["base name", "bäse", ".wh.base"]

    def setup_base(self, base_dir: str) -> None:
        for n in self.base_names:
            bfile(base_dir, n, n.encode())
        bfile(base_dir, "dir with space/inner file", b"inner")

    def run(self, fs: FsFacade) -> None:
        for n in self.names:
            fs.write_file(n, n.encode())
        expected = sorted([*self.names, *self.base_names, "dir with space"])
        assert fs.listdir("") == expected
        for n in self.names + self.base_names:
            assert fs.read_file(n) == n.encode(), repr(n)
        assert fs.read_file("nfc-\u00e9") != fs.read_file("nfd-e\u0301")
        assert fs.listdir("dir with space") == ["inner file"]
        fs.rename("new\nline", "renamed\nname")
        fs.rename("bäse", "日本語-2")
        fs.unlink(".wh.base")
        assert not fs.exists(".wh.base")
        assert fs.read_file("renamed\nname") == b"new\nline"
        assert fs.read_file("日本語-2") == "bäse".encode()


# --------------------------------------------------------------------------- permissions

_PERM_SCRIPT = r"""
import json, os, sys
out = []
for op, path in json.loads(sys.argv[1]):
    try:
        if op == "read":
            fd = os.open(path, os.O_RDONLY)
            os.read(fd, 1)
            os.close(fd)
        elif op == "write":
            os.close(os.open(path, os.O_WRONLY))
        elif op == "create":
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        elif op == "stat":
            os.stat(path)
        elif op == "unlink":
            os.unlink(path)
        elif op == "listdir":
            os.listdir(path)
        out.append(0)
    except OSError as e:
        out.append(e.errno)
print(json.dumps(out))
"""


def _world_can_exec(path: str) -> bool:
    """True if 'other' has x on the file and search permission on every ancestor."""
    path = os.path.abspath(path)
    if not os.path.isfile(path) or not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    return _world_traversable(os.path.dirname(path))


def _world_traversable(directory: str) -> bool:
    """True if 'other' may search every directory from / down to ``directory``."""
    d = os.path.abspath(directory)
    while True:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(d)
        if parent == d:
            return True
        d = parent


def _unprivileged_python() -> str | None:
    candidates = [sys.executable, os.path.realpath(sys.executable)]
    candidates += ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
    for c in candidates:
        if os.path.exists(c) and _world_can_exec(os.path.realpath(c)) and _world_can_exec(c):
            return c
    return None


@register
class NonRootPermissions(Case):
    """uid 65534 gets EACCES on 0600 root files and read-only dirs, but can read 0644 files."""

    requires_root = True
    requires_real_path = True
    needs_world_access = True

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "secret", b"s", mode=0o600)
        bfile(base_dir, "public", b"p", mode=0o644)
        bdir(base_dir, "rodir", mode=0o755)

    def run(self, fs: FsFacade) -> None:
        root = fs.real_path("")
        assert root is not None
        if not _world_traversable(root):
            pytest.skip(f"{root} is not searchable by other users")
        py = _unprivileged_python()
        if py is None:
            pytest.skip("no python interpreter executable by uid 65534")
        fs.write_file("newsecret", b"n", mode=0o600)
        fs.chmod("newsecret", 0o600)
        ops = [
            ("stat", "public"),
            ("read", "public"),
            ("stat", "secret"),
            ("read", "secret"),
            ("read", "newsecret"),
            ("write", "public"),
            ("create", "rodir/x"),
            ("create", "x"),
            ("unlink", "public"),
            ("listdir", "rodir"),
        ]
        req = [(op, os.path.join(root, p)) for op, p in ops]
        proc = subprocess.run(
            [py, "-I", "-c", _PERM_SCRIPT, json.dumps(req)],
            user=65534,
            group=65534,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        got = dict(zip(ops, json.loads(proc.stdout), strict=True))
        acc = errno.EACCES
        expected = {
            ("stat", "public"): 0,
            ("read", "public"): 0,
            ("stat", "secret"): 0,
            ("read", "secret"): acc,
            ("read", "newsecret"): acc,
            ("write", "public"): acc,
            ("create", "rodir/x"): acc,
            ("create", "x"): acc if not imode(fs, "") & stat.S_IWOTH else 0,
            ("unlink", "public"): acc if not imode(fs, "") & stat.S_IWOTH else 0,
            ("listdir", "rodir"): 0,
        }
        assert got == expected
        assert not fs.exists("rodir/x")


# --------------------------------------------------------------------------- dir metadata


@register
class DirMtimeUpdates(Case):
    """Dir mtime changes on entry create/delete/rename but not on content writes or reads."""

    def setup_base(self, base_dir: str) -> None:
        bfile(base_dir, "d/x", b"x")
        bfile(base_dir, "d/y", b"y")
        os.utime(os.path.join(base_dir, "d"), ns=(OLD_NS, OLD_NS))

    def run(self, fs: FsFacade) -> None:
        def reset() -> None:
            fs.utime("d", (OLD_NS, OLD_NS))

        assert fs.stat("d").st_mtime_ns == OLD_NS
        fs.listdir("d")
        fs.read_file("d/x")
        h = fs.open("d/y", os.O_WRONLY)
        fs.pwrite(h, b"Y", 0)
        fs.close(h)
        fs.chmod("d/x", 0o600)
        assert fs.stat("d").st_mtime_ns == OLD_NS, "content/attr change touched parent mtime"
        steps: list[tuple[str, Callable[[], None]]] = [
            ("create", lambda: fs.write_file("d/new", b"n")),
            ("unlink base", lambda: fs.unlink("d/x")),
            ("rename within", lambda: fs.rename("d/new", "d/renamed")),
            ("mkdir", lambda: fs.mkdir("d/s")),
            ("rmdir", lambda: fs.rmdir("d/s")),
            ("move out", lambda: fs.rename("d/y", "moved")),
        ]
        for what, step in steps:
            reset()
            step()
            assert fs.stat("d").st_mtime_ns > OLD_NS, what


@register
class DirNlink(Case):
    """ext4 directory link counts: 2 + number of subdirectories, tracked through changes."""

    def setup_base(self, base_dir: str) -> None:
        bdir(base_dir, "d/s1")
        bdir(base_dir, "d/s2")
        bfile(base_dir, "d/f", b"f")

    def run(self, fs: FsFacade) -> None:
        assert fs.stat("d").st_nlink == 4
        assert fs.stat("d/s1").st_nlink == 2
        fs.mkdir("d/s3")
        assert fs.stat("d").st_nlink == 5
        assert fs.stat("d/s3").st_nlink == 2
        fs.rmdir("d/s1")
        assert fs.stat("d").st_nlink == 4
        fs.rename("d/s2", "s2")
        assert fs.stat("d").st_nlink == 3
        fs.write_file("d/g", b"g")
        assert fs.stat("d").st_nlink == 3


@register
class CopyUpPreservesMetadata(Case):
    """Opening for write keeps mtime, mode, owner, xattrs; a write changes only mtime/data."""

    def setup_base(self, base_dir: str) -> None:
        p = bfile(base_dir, "f", b"0123456789", mode=0o640)
        os.setxattr(p, "user.k", b"v")
        if IS_ROOT:
            os.chown(p, 1234, 2345)
        os.utime(p, ns=(OLD_NS, OLD_NS))

    def run(self, fs: FsFacade) -> None:
        st0 = fs.stat("f")
        assert st0.st_mtime_ns == OLD_NS
        if IS_ROOT:
            assert (st0.st_uid, st0.st_gid) == (1234, 2345)
        h = fs.open("f", os.O_RDWR)
        st1 = fs.fstat(h)
        assert st1.st_mtime_ns == OLD_NS
        fs.close(h)
        st1 = fs.stat("f")
        assert st1.st_mtime_ns == OLD_NS
        assert (st1.st_mode, st1.st_uid, st1.st_gid, st1.st_size, st1.st_nlink) == (
            st0.st_mode,
            st0.st_uid,
            st0.st_gid,
            st0.st_size,
            st0.st_nlink,
        )
        h = fs.open("f", os.O_RDWR)
        fs.pwrite(h, b"X", 9)
        fs.close(h)
        st2 = fs.stat("f")
        assert st2.st_mtime_ns > OLD_NS
        assert (st2.st_mode, st2.st_uid, st2.st_gid, st2.st_size) == (
            st0.st_mode,
            st0.st_uid,
            st0.st_gid,
            10,
        )
        assert fs.getxattr("f", "user.k") == b"v"
        assert fs.read_file("f") == b"012345678X"


@register
class ReusedInodeNumbers(Case):
    """A directory removed while a program still has it open, then new directories: the
    host filesystem tends to give a new directory the freed inode number, and a view
    that let it made the kernel take the new one for the removed one (mkdir failed
    with ESTALE) or, told it was new, fail the removed one's reader with EIO.  The
    removed directory must stay an object of its own, as on a plain disk."""

    requires_real_path = True

    def setup_base(self, base_dir: str) -> None:
        os.mkdir(os.path.join(base_dir, "top"))

    def run(self, fs: FsFacade) -> None:
        for i in range(30):
            fs.mkdir(f"top/d{i}")
            fs.mkdir(f"top/d{i}/inner")
            fd = os.open(fs.real_path(f"top/d{i}/inner"), os.O_RDONLY | os.O_DIRECTORY)
            try:
                fs.rmdir(f"top/d{i}/inner")
                fs.rmdir(f"top/d{i}")
                fs.mkdir(f"top/e{i}")
                fs.mkdir(f"top/e{i}/sub")
                assert fs.listdir(f"top/e{i}") == ["sub"]
                assert stat.S_ISDIR(fs.stat(f"top/e{i}/sub").st_mode)
                # the removed directory, still open, reads as a plain one does (ENOENT;
                # a mount that let the host reuse its number said EIO here)
                with pytest.raises(OSError) as gone:
                    getdents(fd, 4096)
                assert gone.value.errno == errno.ENOENT
                # (fstat is not compared: libfuse's path API, under mfusepy, answers
                # ESTALE for a removed directory before asking the file system)
            finally:
                os.close(fd)
        assert sorted(fs.listdir("top")) == sorted(f"e{i}" for i in range(30))


@register
class HardLinkOutlivesTheNameInUse(Case):
    """A file with two hard links, written through one name, that name removed, then
    the other name looked up: the same file, with everything written so far (a front
    end that announced it as a new object made the kernel drop its inode, and with
    the writeback cache the data not yet written back)."""

    requires_real_path = True

    def setup_base(self, base_dir: str) -> None:
        os.mkdir(os.path.join(base_dir, "h"))
        with open(os.path.join(base_dir, "h", "x"), "wb") as f:
            f.write(b"base\n")
        os.link(os.path.join(base_dir, "h", "x"), os.path.join(base_dir, "h", "y"))

    def run(self, fs: FsFacade) -> None:
        fd = os.open(fs.real_path("h/x"), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"more\n")
            fs.unlink("h/x")
            assert fs.stat("h/y").st_nlink == 1
            os.write(fd, b"again\n")
        finally:
            os.close(fd)
        assert fs.read_file("h/y") == b"base\nmore\nagain\n"
        fs.write_file("h/n", b"new\n")
        fs.link("h/n", "h/m")
        fd = os.open(fs.real_path("h/n"), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"appended\n")
            fs.unlink("h/n")
            os.write(fd, b"after\n")
        finally:
            os.close(fd)
        assert fs.read_file("h/m") == b"new\nappended\nafter\n"
        assert sorted(fs.listdir("h")) == ["m", "y"]


@register
class ListingsOfOneDirectoryAgree(Case):
    """Readers of one large directory, one of them reading in small steps while names
    elsewhere change: a later reader gets every name exactly once.  The kernel's
    readdir cache continues one reader's listing with the entries another reader
    fetched from the same offset, so the offsets must mean the same in every listing
    of the directory: offsets that were indexes into each reader's snapshot repeated
    and dropped names whenever two snapshots listed the names in a different order
    (the daemon's cached listing keeps new names at its end; a fresh one does not)."""

    requires_real_path = True

    def setup_base(self, base_dir: str) -> None:
        os.makedirs(os.path.join(base_dir, "big"))
        os.makedirs(os.path.join(base_dir, "elsewhere", "d"))
        for i in range(0, 600):
            with open(os.path.join(base_dir, "big", f"b{i:05d}"), "wb"):
                pass

    def run(self, fs: FsFacade) -> None:
        want = {f"b{i:05d}" for i in range(600)}
        for round_ in range(3):
            fs.listdir("big")
            for i in range(150):
                fs.write_file(f"big/n{round_}-{i:03d}", b"")
                want.add(f"n{round_}-{i:03d}")
            first = os.open(fs.real_path("big"), os.O_RDONLY | os.O_DIRECTORY)
            try:
                got = getdents(first, 2048)  # a few dozen names, the rest later
                fs.rename(f"elsewhere/d{'' if round_ % 2 == 0 else 'x'}",
                          f"elsewhere/d{'x' if round_ % 2 == 0 else ''}")
                listings = [fs.listdir("big")]
                while chunk := getdents(first, 4096):
                    got += chunk
            finally:
                os.close(first)
            listings += [got, fs.listdir("big")]
            for listing in listings:
                counts = Counter(listing)
                assert [n for n, c in counts.items() if c > 1] == []
                assert set(counts) == want
