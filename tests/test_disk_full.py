"""A full disk under the store: ENOSPC, never EIO or a crash; nothing written is lost.

The store lives on a small tmpfs made by the test (the base elsewhere); a mounted
branch is filled until writes fail.  Then: every operation either works or fails with
ENOSPC and leaves the view as it was (a failed copy-up or rename shows nothing half
done), the daemon answers, what was written and fsynced before is intact, `branch
diff` and `status` work, and the audit writer counts what it cannot store instead of
failing.  Deleting in the branch keeps the data in the trash (that is what makes a
delete undoable), so what gives the space back is what a user would run next:
`agentfs trash purge` (through the daemon, which also drops trash records it could
not write yet); after it everything works again and the dropped audit events are on
record as `audit_dropped` events.  Also: the audit writer alone, and the metadata
database (a branch created on a full disk fails with one clear line).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mountutil import IMPLS, MountedBranch, cli_env, init_store, mounted_branch, run_cli

pytestmark = pytest.mark.mount

MiB = 1 << 20
STORE_FS = "24m"             # the store's filesystem
BIG = 6 * MiB                # a base file whose copy-up cannot fit once the store is full


@contextlib.contextmanager
def small_fs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of *size* at *path*, unmounted (lazily if something still holds it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "agentfs-test",
                    str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def outcome(fn: Callable[[], object]) -> str:
    """'ok' or the errno's name."""
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def write_file(path: Path, data: bytes, flags: int = os.O_TRUNC) -> None:
    """Write *data* (at the end with O_APPEND), fsync and close; the first error wins
    (with the writeback cache a failed write may only show at fsync or close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fill(path: Path) -> str:
    """Write 1 MiB blocks to *path* until the disk is full: the errno that said so."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    first = ""
    try:
        for _ in range(1024):
            os.write(fd, b"\xa5" * MiB)
        os.fsync(fd)
    except OSError as exc:
        first = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            first = first or errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return first


def ballast(directory: Path) -> Path:
    """Whatever space is left on *directory*'s filesystem, taken by one file."""
    path = directory / "ballast"
    with contextlib.suppress(OSError), open(path, "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def audit_stats(mb: MountedBranch) -> dict[str, Any]:
    """The mount's audit counters, straight from its control socket (what `agentfs
    status` shows; asked often, so without starting the CLI)."""
    from agentfs.mount import control

    assert mb.pid is not None
    reply = control.request(control.socket_path(mb.store, mb.pid), {"op": "audit"})
    stats = reply["audit"]
    assert isinstance(stats, dict), reply
    return stats


def status_audit(mb: MountedBranch) -> dict[str, Any]:
    """The audit counters as `agentfs status --json` shows them."""
    mounts = json.loads(mb.cli("status", "--json").stdout)["mounts"]
    assert len(mounts) == 1, mounts
    stats = mounts[0]["audit"]
    assert isinstance(stats, dict), mounts
    return stats


def recorded_drops(store: Path) -> int:
    conn = sqlite3.connect(f"file:{store / 'audit.db'}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT coalesce(sum(count), 0) FROM events "
                                "WHERE op = 'audit_dropped'").fetchone()[0])
    finally:
        conn.close()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def either_way(src: Path, dst: Path, result: str) -> None:
    """A rename that failed left the source; one that worked, the destination."""
    assert result in ("ok", "ENOSPC"), result
    there, gone = (dst, src) if result == "ok" else (src, dst)
    assert os.path.lexists(there) and not os.path.lexists(gone), (result, src, dst)


# the kernel front end (the default) in every run; the others, a minute each, with -m slow
FRONT_ENDS = [pytest.param(i, marks=() if i == "kernel" else pytest.mark.slow) for i in IMPLS]


@pytest.mark.parametrize("impl", FRONT_ENDS)
def test_full_store_gives_enospc_and_recovers(impl: str, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    big = os.urandom(BIG)
    (base / "big.bin").write_bytes(big)
    (base / "small.txt").write_bytes(b"small base file\n")
    (base / "dir").mkdir()
    (base / "dir" / "inner.txt").write_bytes(b"inner\n")
    with small_fs(tmp_path / "fs", STORE_FS) as fs, \
            mounted_branch(base, tmp_path, store=fs / "store", impl=impl) as mb:
        m = mb.mountpoint
        kept = os.urandom(MiB)
        write_file(m / "keep.bin", kept)
        (m / "keepdir").mkdir()
        write_file(m / "keepdir" / "a.txt", b"a" * 5000)

        # fill the store through the mount, then take any crumb left
        assert fill(m / "fill.bin") == "ENOSPC"
        ballast(fs)
        assert os.statvfs(fs).f_bavail == 0

        # writes fail with ENOSPC (not EIO), and what fails leaves nothing half done
        assert outcome(lambda: write_file(m / "new.bin", b"n" * (256 << 10))) == "ENOSPC"
        assert outcome(lambda: write_file(m / "big.bin", b"!", os.O_APPEND)) == "ENOSPC"
        assert sha(m / "big.bin") == hashlib.sha256(big).hexdigest()
        assert outcome(lambda: write_file(m / "small.txt", b"!", os.O_APPEND)) in (
            "ok", "ENOSPC")
        either_way(m / "small.txt", m / "small2.txt",
                   outcome(lambda: os.rename(m / "small.txt", m / "small2.txt")))
        either_way(m / "dir", m / "dir2", outcome(lambda: os.rename(m / "dir", m / "dir2")))
        made = outcome(lambda: os.mkdir(m / "newdir"))
        assert made in ("ok", "ENOSPC") and (made == "ok") == (m / "newdir").is_dir()
        touched = outcome(lambda: (m / "empty").touch())
        assert touched in ("ok", "ENOSPC") and (touched == "ok") == (m / "empty").exists()

        # the daemon is alive and the mount answers; nothing written before is damaged
        assert mb.pid is not None
        os.kill(mb.pid, 0)
        assert (m / "keep.bin").read_bytes() == kept
        assert (m / "keepdir" / "a.txt").read_bytes() == b"a" * 5000
        assert {"keep.bin", "keepdir", "fill.bin", "big.bin"} <= set(os.listdir(m))
        diff = mb.cli("branch", "diff", "test", "--name-status").stdout
        assert "A\tkeep.bin" in diff and "big.bin" not in diff, diff

        # the audit log cannot grow: its writer counts what it cannot store
        for i in range(60):
            if audit_stats(mb)["dropped"]:
                break
            for j in range(50):
                outcome(lambda p=m / f"e{i}-{j}": p.touch())  # type: ignore[misc]
            time.sleep(0.3)
        stats = status_audit(mb)
        assert stats["dropped"], stats
        os.kill(mb.pid, 0)

        # deleting works on a full disk; the trash holds the data until it is purged
        assert outcome(lambda: os.unlink(m / "fill.bin")) == "ok"
        for name in os.listdir(m):
            if name.startswith("e") and name[1:2].isdigit():
                assert outcome(lambda p=m / name: os.unlink(p)) == "ok"  # type: ignore[misc]
        mb.cli("trash", "purge", "--max-size", "0")
        assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize > 8 * MiB
        assert not (m / "fill.bin").exists()

        # everything works again
        after = os.urandom(2 * MiB)
        write_file(m / "after.bin", after)
        write_file(m / "big.bin", b"!", os.O_APPEND)
        write_file(m / "small.txt" if (m / "small.txt").exists() else m / "small2.txt",
                   b"+", os.O_APPEND)
        (m / "newdir2").mkdir()
        assert (m / "after.bin").read_bytes() == after
        assert (m / "big.bin").read_bytes() == big + b"!"
        assert (m / "keep.bin").read_bytes() == kept
        # the lost audit events are on record, exactly as many as were counted
        wait_for(lambda: bool(audit_stats(mb)["healthy"]), 30, "the audit log to recover")
        wait_for(lambda: recorded_drops(mb.store) == audit_stats(mb)["dropped"], 30,
                 "the dropped events to be recorded")
        mb.unmount()
        diff = mb.cli("branch", "diff", "test", "--name-status").stdout
        assert "A\tkeep.bin" in diff and "A\tafter.bin" in diff and "M\tbig.bin" in diff
        assert "fill.bin" not in diff
        items = json.loads(mb.cli("trash", "list", "--json").stdout)
        assert all(i["state"] in ("final", None) and i["path"] not in (None, "?")
                   for i in items), items


def test_audit_writer_counts_what_a_full_disk_refuses(tmp_path: Path) -> None:
    """The writer thread alone: events it cannot store are counted and, once the disk
    has room, recorded; stored + counted is exactly what was emitted."""
    from agentfs.audit.log import AuditLog

    with small_fs(tmp_path / "fs", "2m") as fs:
        audit = AuditLog(fs, "/test")
        try:
            audit.emit(op="create", path="first")
            wait_for(lambda: audit.written >= 1, 10, "the first event")
            weight = ballast(fs)
            for i in range(20_000):
                audit.emit(op="create", path=f"f{i:05}" + "x" * 200)
            wait_for(lambda: not audit.healthy and audit.dropped_total > 0, 30,
                     "the writer to notice the full disk")
            assert audit._thread.is_alive()
            weight.unlink()
            for i in range(10):
                audit.emit(op="unlink", path=f"g{i}")
            wait_for(lambda: audit.healthy and not audit._pending, 30, "recovery")
        finally:
            audit.close()
        dropped = audit.dropped_total
        conn = sqlite3.connect(fs / "audit.db")
        try:
            stored = conn.execute("SELECT count(*) FROM events "
                                  "WHERE op != 'audit_dropped'").fetchone()[0]
            recorded = conn.execute("SELECT coalesce(sum(count), 0) FROM events "
                                    "WHERE op = 'audit_dropped'").fetchone()[0]
        finally:
            conn.close()
        assert dropped > 0
        assert recorded == dropped
        assert stored + dropped == 1 + 20_000 + 10


def test_branch_create_on_a_full_store_fails_cleanly(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "f").write_text("x")
    env = cli_env(tmp_path / "home")
    with small_fs(tmp_path / "fs", "8m") as fs:
        store = fs / "store"
        init_store(base, store, "main", env["AGENTFS_HOME"])
        weight = ballast(fs)
        made = []
        failure = None
        for i in range(30):  # until the metadata cannot grow (SQLite has some slack)
            res = run_cli("--store", str(store), "branch", "create", f"b{i}", env=env,
                          check=False)
            if res.returncode != 0:
                failure = res
                break
            made.append(f"b{i}")
        assert failure is not None, "30 branches fit on a full disk"
        lines = failure.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("agentfs: "), failure.stderr
        assert "Traceback" not in failure.stderr
        assert failure.returncode in (1, 4), failure
        assert "space" in lines[0] or "full" in lines[0], lines[0]
        weight.unlink()
        run_cli("--store", str(store), "branch", "create", "later", env=env)
        listed = {b["name"] for b in json.loads(
            run_cli("--store", str(store), "branch", "list", "--json", env=env).stdout)}
        assert {"main", "later", *made} <= listed
        run_cli("--store", str(store), "status", env=env)
