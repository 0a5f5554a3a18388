"""A daemon killed with SIGKILL leaves a dead mount ("Transport endpoint is not
connected"): `agentfs mount` on it and `agentfs umount` of it clean it up without
manual steps, the stale mount record goes, and what was fsynced before the kill is
there after the next mount."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from mountutil import IMPLS, MountedBranch, is_mounted, mounted_branch, run_cli

pytestmark = pytest.mark.mount


def kill_daemon(mb: MountedBranch) -> int:
    """SIGKILL the daemon and wait until it is gone and the mount is dead."""
    assert mb.pid is not None
    pid = mb.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"daemon {pid} survived SIGKILL")
    with pytest.raises(OSError) as dead:
        os.statvfs(mb.mountpoint)  # statfs is never answered from a cache
    assert dead.value.errno == errno.ENOTCONN
    assert is_mounted(str(mb.mountpoint))
    return pid


def mount_rows(store: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(store / "meta.db")
    try:
        return list(conn.execute("SELECT mountpoint, pid FROM mounts"))
    finally:
        conn.close()


def write_durable(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_mount_and_umount_clean_up_a_dead_mount(tmp_path: Path, impl: str) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "keep.txt").write_text("base\n")
    with mounted_branch(base, tmp_path, impl=impl) as mb:
        first = os.urandom(1 << 20)
        write_durable(mb.mountpoint / "first.bin", first)
        dead_pid = kill_daemon(mb)
        assert mount_rows(mb.store) == [(str(mb.mountpoint), dead_pid)]

        # mount straight onto the dead mount: detached, record replaced, served again
        mb.mount()
        assert mb.pid is not None and mb.pid != dead_pid
        assert (mb.mountpoint / "first.bin").read_bytes() == first
        assert (mb.mountpoint / "keep.txt").read_text() == "base\n"
        assert mount_rows(mb.store) == [(str(mb.mountpoint), mb.pid)]

        second = os.urandom(1 << 20)
        write_durable(mb.mountpoint / "second.bin", second)
        kill_daemon(mb)

        # umount of a dead mount: detached and forgotten, exit 0
        res = mb.cli("umount", str(mb.mountpoint))
        assert res.stdout.strip() == (f"detached the dead mount at {mb.mountpoint} "
                                      "(its daemon had died)"), res
        assert res.stderr == ""
        mb.pid = None
        assert not is_mounted(str(mb.mountpoint))
        assert mount_rows(mb.store) == []
        status = mb.cli("status", "--json")  # the store opens cleanly
        assert '"mounts": []' in status.stdout

        mb.mount()
        assert (mb.mountpoint / "first.bin").read_bytes() == first
        assert (mb.mountpoint / "second.bin").read_bytes() == second
        mb.unmount()
        assert not is_mounted(str(mb.mountpoint))
        res = mb.cli("umount", str(mb.mountpoint), check=False)
        assert res.returncode == 5 and "is not mounted" in res.stderr


def test_dead_mount_of_a_forgotten_store(tmp_path: Path) -> None:
    """umount without a store (none registered for the cwd, no --store) still
    detaches a dead mount."""
    base = tmp_path / "base"
    base.mkdir()
    with mounted_branch(base, tmp_path) as mb:
        kill_daemon(mb)
        env = dict(mb.env, AGENTFS_HOME=str(tmp_path / "other-home"))
        res = run_cli("umount", str(mb.mountpoint), env=env, cwd="/")
        assert "detached the dead mount" in res.stdout
        mb.pid = None
        assert not is_mounted(str(mb.mountpoint))
