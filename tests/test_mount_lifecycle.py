"""A mount's life: remount shows exactly the same tree (inode numbers too), a daemon
killed with SIGKILL loses nothing that was fsynced and its store opens cleanly."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from mountutil import (
    cli_env,
    force_unmount,
    init_store,
    mounted_branch,
    per_process_mount,
    run_cli,
)
from treehash import tree_fingerprint

pytestmark = pytest.mark.mount


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a user can observe about a tree, inode numbers included."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what: object = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            else:
                what = None
            nlink = st.st_nlink if not stat.S_ISDIR(st.st_mode) else 0
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_ino, nlink, st.st_uid,
                                             st.st_size, st.st_mtime_ns, what)
    return out


def make_base(base: Path) -> None:
    (base / "src" / "pkg").mkdir(parents=True)
    (base / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (base / "src" / "main.py").write_text("print('hi')\n")
    (base / "docs").mkdir()
    (base / "docs" / "a.md").write_text("# a\n")
    (base / "docs" / "gone.md").write_text("bye\n")
    os.link(base / "docs" / "a.md", base / "docs" / "a-link.md")
    os.symlink("src/main.py", base / "entry")


def agent_changes(mnt: Path) -> None:
    (mnt / "src" / "main.py").write_text("print('changed')\n")
    (mnt / "new.txt").write_text("new\n")
    (mnt / "docs" / "gone.md").unlink()
    os.rename(mnt / "src" / "pkg", mnt / "src" / "package")
    (mnt / "src" / "package" / "extra.py").write_text("y = 2\n")
    os.chmod(mnt / "docs" / "a.md", 0o600)
    with open(mnt / "docs" / "a-link.md", "a") as f:
        f.write("appended through the other name\n")
    os.mkdir(mnt / "empty")
    os.symlink("new.txt", mnt / "new-link")
    os.link(mnt / "new.txt", mnt / "new-hard")


def test_remount_shows_the_same_tree(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    make_base(base)
    before_base = tree_fingerprint(str(base))
    with mounted_branch(base, tmp_path) as mb:
        agent_changes(mb.mountpoint)
        first = snapshot(mb.mountpoint)
        mb.unmount()
        mb.mount()
        assert snapshot(mb.mountpoint) == first
    assert tree_fingerprint(str(base)) == before_base
    assert first["docs/a.md"][2] == 2 and first["docs/a.md"][1] == first["docs/a-link.md"][1]
    assert "docs/gone.md" not in first and "src/package/mod.py" in first
    assert "src/pkg" not in first


def test_sigkill_loses_nothing_fsynced(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    make_base(base)
    with mounted_branch(base, tmp_path) as mb:
        payload = os.urandom(3 << 20)
        fd = os.open(mb.mountpoint / "durable.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        (mb.mountpoint / "src" / "main.py").write_text("edited\n")
        os.sync()
        assert mb.pid is not None
        os.kill(mb.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(mb.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        mb.unmount()  # a dead mount can still be unmounted cleanly
        assert "mounts" in mb.cli("status", "--json").stdout  # the store opens fine
        mb.mount()
        assert (mb.mountpoint / "durable.bin").read_bytes() == payload
        assert (mb.mountpoint / "src" / "main.py").read_text() == "edited\n"


def test_syncfs_after_unlinked_files(tmp_path: Path) -> None:
    """The kernel writes back times of unlinked, closed files on syncfs: not an error."""
    import ctypes

    base = tmp_path / "base"
    base.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    with mounted_branch(base, tmp_path) as mb:
        for i in range(50):
            path = mb.mountpoint / f"tmp{i}"
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            os.write(fd, b"x" * 5000)
            os.unlink(path)
            os.write(fd, b"y")
            os.close(fd)
        dfd = os.open(mb.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert libc.syncfs(dfd) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(dfd)
        assert os.listdir(mb.mountpoint) == []


def test_one_daemon_per_branch(tmp_path: Path) -> None:
    """A branch served by one daemon cannot be served by another, nor committed or
    discarded under it, whichever mode serves it; the lock goes with the daemon."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "f").write_text("x")
    with per_process_mount(base, tmp_path / "pp", "--default-branch", "b") as pp:
        assert (pp.mountpoint / "f").read_text() == "x"
        other = tmp_path / "other"
        other.mkdir()
        res = pp.cli("mount", str(other), "--branch", "b", check=False)
        assert res.returncode == 1, res
        assert res.stderr.startswith("agentfs: branch 'b' is in use by the mount at "
                                     f"{pp.mountpoint}"), res.stderr
        for args in (("branch", "discard", "b", "--yes"), ("branch", "commit", "b")):
            res = pp.cli(*args, check=False)
            assert res.returncode == 1 and "branch 'b' is" in res.stderr, res.stderr
        # a branch the per-process mount opened for a session, not as its default
        pp.cli("branch", "create", "c")
        pp.cli("exec", "--branch", "c", "--", "true")
        for args in (("branch", "discard", "c", "--yes"), ("branch", "commit", "c")):
            res = pp.cli(*args, check=False)
            assert res.returncode == 1 and "in use by the mount" in res.stderr, res.stderr
    store = tmp_path / "pp" / "store"
    with mounted_branch(base, tmp_path / "pinned", "b", init=False, store=store,
                        env=pp.env) as mb:  # the per-process daemon is gone: free again
        assert (mb.mountpoint / "f").read_text() == "x"


def test_front_end_from_the_environment(tmp_path: Path) -> None:
    """AGENTFS_FUSE_IMPL picks the front end when --impl is not given; a wrong one is a
    clear error."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "f").write_text("x")
    env = cli_env(tmp_path / "home")
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    init_store(base, store, "b", env["AGENTFS_HOME"])
    bad = run_cli("--store", str(store), "mount", str(mnt), "--branch", "b",
                  env={**env, "AGENTFS_FUSE_IMPL": "nope"}, check=False)
    assert bad.returncode == 2 and "unknown FUSE front end 'nope'" in bad.stderr
    out = run_cli("--store", str(store), "mount", str(mnt), "--branch", "b",
                  env={**env, "AGENTFS_FUSE_IMPL": "mfusepy"}).stdout
    pid = int(out.rsplit("pid", 1)[1].strip(" )\n"))
    try:
        assert (mnt / "f").read_text() == "x"
        logs = "".join(p.read_text() for p in (store / "run").glob("mount-*.log"))
        assert "(pinned, mfusepy)" in logs
    finally:
        force_unmount(mnt, pid)
