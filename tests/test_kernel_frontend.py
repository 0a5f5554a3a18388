"""What only the kernel front end (`--impl kernel`) has: cached directory listings that
the daemon invalidates when it changes a directory on its own (trash restore), the
xattr size probe, fallocate and copy_file_range on the handle, SIGTERM unmounting, and
the refusal of per-process views.  Everything else runs in the shared mounted suites."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mountutil import (
    is_mounted,
    mounted_branch,
    opstats_env,
    per_process_mount,
    request_counts,
    run_cli,
)

from agentfs.mount.kernel import proto
from agentfs.proc import running

pytestmark = pytest.mark.mount


def test_message_layouts_match_linux_fuse_h() -> None:
    sizes = {proto.IN_HEADER: 40, proto.OUT_HEADER: 16, proto.SETATTR_IN: 88,
             proto.READ_IN: 40, proto.WRITE_IN: 40, proto.ENTRY_OUT: 16 + 128,
             proto.ATTR_OUT: 16 + 104, proto.CREATE_OUT: 16 + 128 + 16,
             proto.STATFS_OUT: 16 + 80, proto.INIT_OUT: 16 + 64, proto.DIRENT: 24,
             proto.DIRENTPLUS: 128 + 24, proto.COPY_FILE_RANGE_IN: 56}
    assert {s.format: s.size for s in sizes} == {s.format: n for s, n in sizes.items()}


def test_cached_listing_shows_what_a_restore_brings_back(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    (base / "d/a").write_text("a\n")
    (base / "d/b").write_text("b\n")
    with mounted_branch(base, tmp_path, "b", impl="kernel") as mb:
        d = mb.mountpoint / "d"
        assert sorted(os.listdir(d)) == ["a", "b"]
        assert sorted(os.listdir(d)) == ["a", "b"]   # now from the kernel's cache
        (d / "a").unlink()
        assert sorted(os.listdir(d)) == ["b"]        # the kernel dropped it itself
        [item] = json.loads(mb.cli("trash", "list", "--json").stdout)
        mb.cli("trash", "restore", item["id"])       # the daemon changes d on its own
        deadline = time.monotonic() + 2  # the notification is written by another thread
        while sorted(os.listdir(d)) != ["a", "b"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(os.listdir(d)) == ["a", "b"]
        assert (d / "a").read_text() == "a\n"


def test_xattr_probes_fallocate_copy_file_range(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    with mounted_branch(base, tmp_path, "b", impl="kernel") as mb:
        f = str(mb.mountpoint / "f")
        Path(f).write_bytes(b"x")
        os.setxattr(f, "user.v", b"12345")
        os.setxattr(f, "user.w", b"")
        assert os.getxattr(f, "user.v") == b"12345"       # size probe, then the value
        assert os.getxattr(f, "user.w") == b""
        assert sorted(os.listxattr(f)) == ["user.v", "user.w"]
        with pytest.raises(OSError) as info:
            os.getxattr(f, "user.none")
        assert info.value.errno == errno.ENODATA
        fd = os.open(f, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 1 << 20)
            assert os.fstat(fd).st_size == 1 << 20
            os.pwrite(fd, b"hello", 0)
            os.fsync(fd)
            out = os.open(str(mb.mountpoint / "g"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                assert os.copy_file_range(fd, out, 5, 0, 0) == 5
                assert os.pread(out, 5, 0) == b"hello"
            finally:
                os.close(out)
        finally:
            os.close(fd)


def test_sigterm_unmounts(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    with mounted_branch(base, tmp_path, "b", impl="kernel") as mb:
        assert mb.pid is not None
        os.kill(mb.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while is_mounted(str(mb.mountpoint)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(str(mb.mountpoint))
        while running(mb.pid) and time.monotonic() < deadline:  # it logs on its way out
            time.sleep(0.05)
        logs = "".join(p.read_text() for p in (mb.store / "run").glob("mount-*.log"))
        assert "(pinned, kernel)" in logs and "unmounted" in logs


def test_per_process_views_refused_by_mfusepy(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    with per_process_mount(base, tmp_path / "pp", "--default-branch", "b") as pp:
        mnt = tmp_path / "mnt2"
        mnt.mkdir()
        res = run_cli("--store", str(pp.store), "mount", str(mnt), "--per-process",
                      "--impl", "mfusepy", env=pp.env, check=False)
        assert res.returncode == 1
        assert "per-process views need the kernel or pyfuse3 front end" in res.stderr
        assert not is_mounted(str(mnt))


def test_per_process_keeps_the_branch_inode_numbers(tmp_path: Path) -> None:
    """Node ids are the mount's, st_ino the branch's: a checkout's index matches."""
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    (base / "d" / "f").write_text("x")
    with per_process_mount(base, tmp_path / "pp", "--default-branch", "b") as pp:
        for rel in ("d", "d/f"):
            assert os.lstat(pp.mountpoint / rel).st_ino == os.lstat(base / rel).st_ino


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (writes as another user)")
def test_writes_by_other_users_drop_set_uid(tmp_path: Path) -> None:
    """HANDLE_KILLPRIV_V2: the kernel leaves set-uid/set-gid to us on write, truncate and
    O_TRUNC by a caller without CAP_FSETID (set-gid only when group-executable), and
    the mode it caches must follow."""
    world = Path(tempfile.mkdtemp(prefix="agentfs-killpriv-", dir="/dev/shm"
                                  if os.path.isdir("/dev/shm") else None))
    try:
        world.chmod(0o755)
        (world / "base").mkdir()
        with mounted_branch(world / "base", world, "b", impl="kernel") as mb:
            mb.mountpoint.chmod(0o755)
            f = mb.mountpoint / "s"
            f.write_text("x")

            def as_nobody(script: str, mode: int) -> int:
                f.chmod(mode)
                subprocess.run(["sh", "-c", script, "sh", str(f)], user=65534, group=65534,
                               extra_groups=[], check=True, timeout=30)
                return stat.S_IMODE(f.stat().st_mode)

            assert as_nobody('echo more >> "$1"', 0o6777) == 0o777
            assert as_nobody(': > "$1"', 0o6777) == 0o777
            assert as_nobody('truncate -s 1 "$1"', 0o6777) == 0o777
            assert as_nobody('echo more >> "$1"', 0o6767) == 0o2767
            f.chmod(0o6777)
            with open(f, "a") as out:   # root keeps them (CAP_FSETID)
                out.write("root\n")
            assert stat.S_IMODE(f.stat().st_mode) == 0o6777
    finally:
        shutil.rmtree(world, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a mount's readahead needs root")
def test_readahead_window_is_one_mebibyte(tmp_path: Path) -> None:
    """The window is raised after INIT (whose reply would reset it), so a cold
    sequential read arrives in 1 MiB requests instead of 128 KiB ones."""
    from agentfs.mount.tuning import READAHEAD_KIB, mount_device
    base = tmp_path / "base"
    base.mkdir()
    (base / "big").write_bytes(os.urandom(4 << 20))
    with mounted_branch(base, tmp_path, "b", impl="kernel") as mb:
        device = mount_device(str(mb.mountpoint))
        assert device is not None and device.startswith("0:")
        knob = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
        assert int(knob.read_text()) == READAHEAD_KIB
        assert (mb.mountpoint / "big").read_bytes() == (base / "big").read_bytes()


def test_large_reads_outside_the_engine_lock(tmp_path: Path) -> None:
    """READs of 128 KiB and more read without the engine lock, on their own duplicate of
    the handle's fd: data stays right under concurrent readers and a copy-up in the
    middle of a read (which closes the handle's own fd), and the audit counts it all."""
    from concurrent.futures import ThreadPoolExecutor

    from agentfs.audit.log import query

    base = tmp_path / "base"
    base.mkdir()
    data = os.urandom(12 << 20)
    (base / "big.bin").write_bytes(data)
    newer = os.urandom(len(data))
    with mounted_branch(base, tmp_path, "b", impl="kernel") as mb:
        path = mb.mountpoint / "big.bin"

        def read_at(offset: int) -> bool:
            with open(path, "rb", buffering=0) as fh:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # no cached pages
                return os.pread(fh.fileno(), 1 << 20, offset) == data[offset:offset + (1 << 20)]

        assert path.read_bytes() == data
        offsets = [(i * 7919 * 4096) % (len(data) - (1 << 20)) for i in range(48)]
        with ThreadPoolExecutor(6) as pool:
            assert all(pool.map(read_at, offsets))
        with open(path, "rb", buffering=0) as reader:
            os.posix_fadvise(reader.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            half = len(data) // 2
            assert reader.read(half) == data[:half]
            with open(path, "r+b", buffering=0) as writer:  # copies up; re-points reader
                writer.write(newer)
            assert reader.read() == newer[half:]
        assert path.read_bytes() == newer
        mb.unmount()
        reads = [e for e in query(mb.store) if e["op"] == "read" and e["path"] == "big.bin"]
    assert sum(e["bytes"] for e in reads) >= 2 * len(data) + 48 * (1 << 20)
    assert (base / "big.bin").read_bytes() == data


def test_a_listing_after_lookups_keeps_the_kernels_entries(tmp_path: Path) -> None:
    """READDIRPLUS gives names the kernel has looked up already without attributes
    (node id 0): their dentries and attributes stay, so nothing is looked up again."""
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    for i in range(50):
        (base / "d" / f"f{i}").write_text("x" * i)
    env, stats = opstats_env(tmp_path)
    with mounted_branch(base, tmp_path, "b", env=env, impl="kernel") as mb:
        d = mb.mountpoint / "d"
        first = {f"f{i}": os.lstat(d / f"f{i}") for i in range(50)}
        with os.scandir(d) as it:
            listed = {e.name: e.stat(follow_symlinks=False) for e in it}
        again = {name: os.lstat(d / name) for name in first}
        mb.unmount()
    counts = request_counts(stats)
    assert set(listed) == set(first)
    for name, st in first.items():
        assert (listed[name].st_size, listed[name].st_ino) == (st.st_size, st.st_ino)
        assert (again[name].st_size, again[name].st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert counts.get("lookup", 0) <= 51, counts  # d and its 50 files, once each
    assert counts.get("readdirplus", 0) >= 1, counts


def test_small_base_files_reach_the_kernel_at_open(tmp_path: Path) -> None:
    """A small base file's content is stored in the kernel's page cache when it is
    opened for reading: reading it takes no READ request, its bytes are the file's, the
    audit counts them, and a writer opening it afterwards still makes a reader see the
    new data; a file above the limit is read through READs as before."""
    from agentfs.audit.log import query
    from agentfs.mount.kernel.ops import STORE_LIMIT

    base = tmp_path / "base"
    base.mkdir()
    small = {f"s{i}.txt": os.urandom(100 + 997 * i) for i in range(40)}
    for name, data in small.items():
        (base / name).write_bytes(data)
    big = os.urandom(STORE_LIMIT + 4096)
    (base / "big.bin").write_bytes(big)
    (base / "empty").write_bytes(b"")
    env, stats = opstats_env(tmp_path)
    with mounted_branch(base, tmp_path, "b", env=env, impl="kernel") as mb:
        mnt = mb.mountpoint
        for name, data in small.items():
            assert (mnt / name).read_bytes() == data
        assert (mnt / "empty").read_bytes() == b""
        with open(mnt / "s1.txt", "rb", buffering=0) as reader:
            assert reader.read(10) == small["s1.txt"][:10]
            with open(mnt / "s1.txt", "r+b") as writer:  # copy-up while a reader is open
                writer.write(b"NEW")
            assert reader.read() == small["s1.txt"][10:]
            os.lseek(reader.fileno(), 0, os.SEEK_SET)
            assert reader.read(3) == b"NEW"
        assert (mnt / "big.bin").read_bytes() == big
        mb.unmount()
        reads = {e["path"]: e["bytes"] for e in query(mb.store) if e["op"] == "read"}
    counts = request_counts(stats)
    assert 1 <= counts.get("read", 0) <= 4, counts  # big.bin's only
    assert reads["s3.txt"] == len(small["s3.txt"])
    assert (base / "s1.txt").read_bytes() == small["s1.txt"]


def test_small_files_reach_each_per_process_view_at_open(tmp_path: Path) -> None:
    """Per process, the store goes to the view's node as the kernel numbers it
    (`export`; the view's own number named another node or none): the default
    branch's view reads its small files' bytes with no READ request."""
    base = tmp_path / "base"
    base.mkdir()
    names = [f"f{i}.txt" for i in range(30)]
    for i, name in enumerate(names):
        (base / name).write_bytes(os.urandom(200 + 311 * i))
    env, stats = opstats_env(tmp_path)
    with per_process_mount(base, tmp_path / "pp", "--default-branch", "b", env=env) as pp:
        mnt = pp.mountpoint
        for name in names:
            assert (mnt / name).read_bytes() == (base / name).read_bytes()
    counts = request_counts(stats)
    assert counts.get("read", 0) <= 2, counts
