"""FUSE passthrough in the kernel front end: the kernel reads and writes the branch's own
files itself, and every view of a file stays the same as through the daemon."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from mountutil import cli_env, mounted_branch, opstats_env, passes_through, request_counts

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not passes_through("kernel"),
                                 reason="no FUSE passthrough here (Linux 6.9+, CAP_SYS_ADMIN)")]


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "lower.txt").write_bytes(b"lower\n")
    return base


def test_reads_and_writes_of_the_branchs_files_bypass_the_daemon(tmp_path: Path) -> None:
    env, stats = opstats_env(tmp_path)
    with mounted_branch(_base(tmp_path), tmp_path, "b", env=env, impl="kernel") as mb:
        m = mb.mountpoint
        block = os.urandom(1 << 20)
        with open(m / "new.bin", "wb") as fh:  # created in the branch: passed through
            for _ in range(4):
                fh.write(block)
        with open(m / "lower.txt", "ab") as fh:  # copied up at open: passed through
            fh.write(b"more\n")
        assert (m / "new.bin").read_bytes() == block * 4
        assert (m / "lower.txt").read_bytes() == b"lower\nmore\n"
        assert (m / "new.bin").stat().st_size == 4 << 20
        mb.unmount()
    counts = request_counts(stats)
    assert "write" not in counts and "read" not in counts, counts
    assert (tmp_path / "base/lower.txt").read_bytes() == b"lower\n"


def test_a_reader_of_a_base_file_sees_a_writer_that_copies_it_up(tmp_path: Path) -> None:
    """The reader's open is kernel-cached (a base file), so the writer's must be too: the
    kernel allows no mix, and both see one file."""
    with mounted_branch(_base(tmp_path), tmp_path, "b", impl="kernel") as mb:
        path = mb.mountpoint / "lower.txt"
        with open(path, "rb", buffering=0) as reader:
            assert reader.read() == b"lower\n"
            with open(path, "r+b", buffering=0) as writer:
                writer.write(b"LOWER")
                assert os.pread(reader.fileno(), 100, 0) == b"LOWER\n"
        # now a top file: both passed through
        with open(path, "r+b", buffering=0) as writer, open(path, "rb", buffering=0) as reader:
            writer.write(b"upper")
            assert os.pread(reader.fileno(), 100, 0) == b"upper\n"
        assert path.read_bytes() == b"upper\n"
    assert (tmp_path / "base/lower.txt").read_bytes() == b"lower\n"


def test_pages_cached_before_a_passthrough_write_are_not_shown(tmp_path: Path) -> None:
    with mounted_branch(_base(tmp_path), tmp_path, "b", impl="kernel") as mb:
        path = mb.mountpoint / "lower.txt"
        assert path.read_bytes() == b"lower\n"  # the base file's pages, kernel-cached
        with open(path, "r+b", buffering=0) as writer:
            writer.write(b"fresh")
        assert path.read_bytes() == b"fresh\n"
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mem:
            assert mem[:] == b"fresh\n"


def test_shared_mappings_truncation_and_unlinked_files(tmp_path: Path) -> None:
    with mounted_branch(_base(tmp_path), tmp_path, "b", impl="kernel") as mb:
        m = mb.mountpoint
        path = m / "mapped.bin"
        path.write_bytes(b"\0" * 8192)
        with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 8192) as mem:
            mem[4096:4101] = b"hello"
            mem.flush()
        assert path.read_bytes()[4096:4101] == b"hello"
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, 4100)
            assert path.stat().st_size == 4100
            assert os.pread(fd, 10, 4096) == b"hell"
            os.unlink(path)
            os.pwrite(fd, b"after", 0)
            assert os.pread(fd, 5, 0) == b"after"
            assert os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)
        assert not path.exists()
        # many handles of one file share its backing; the last close lets it go
        fds = [os.open(m / "lower.txt", os.O_RDWR | os.O_APPEND) for _ in range(3)]
        for i, fd in enumerate(fds):
            os.write(fd, b"%d\n" % i)
            os.close(fd)
        assert (m / "lower.txt").read_bytes() == b"lower\n0\n1\n2\n"


def test_a_fork_keeps_its_snapshot_while_passed_through_files_stay_open(
        tmp_path: Path) -> None:
    """The kernel writes a passed-through file itself, so a live fork cannot re-point its
    handles: the open file moves up into the parent's new top and the fork keeps a copy.
    A reader held open across the fork pins the backing for later writers too."""
    env = cli_env(tmp_path / "home")
    with mounted_branch(_base(tmp_path), tmp_path / "a", "a", env=env, impl="kernel") as ma:
        m = ma.mountpoint
        (m / "top.txt").write_bytes(b"v1\n")
        reader = os.open(m / "top.txt", os.O_RDONLY)
        writer = os.open(m / "lower.txt", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(writer, b"before\n")
            ma.cli("branch", "create", "f", "--from", "a")
            os.write(writer, b"after\n")
            with open(m / "top.txt", "ab") as late:  # the reader's backing, now the parent's
                late.write(b"v2\n")
            assert os.pread(reader, 100, 0) == b"v1\nv2\n"
            assert os.fstat(reader).st_ino == (m / "top.txt").stat().st_ino
        finally:
            os.close(reader)
            os.close(writer)
        assert (m / "lower.txt").read_bytes() == b"lower\nbefore\nafter\n"
        ino = (m / "top.txt").stat().st_ino
        with mounted_branch(tmp_path / "base", tmp_path / "f", "f", init=False,
                            store=ma.store, env=env, impl="kernel") as mf:
            f = mf.mountpoint
            assert (f / "lower.txt").read_bytes() == b"lower\nbefore\n"
            assert (f / "top.txt").read_bytes() == b"v1\n"
            assert (f / "top.txt").stat().st_ino == ino  # the copy keeps the file's number
