"""The audit log: completeness on a real mount, overflow accounting, strict mode, CLI."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mountutil import AGENTFS, mounted_branch, passes_through

from agentfs.audit.log import AuditLog, query

POLICY = """\
version: 1
name: audit-test
defaults: {read: allow, write: allow}
rules:
  - id: no-secret
    paths: ["secret.txt"]
    ops: [open_read]
    decision: deny
  - id: flag-notes
    paths: ["notes/**"]
    ops: ["@write"]
    decision: audit
"""


@pytest.mark.mount
def test_every_operation_of_a_workload_is_recorded_once(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "a.txt").write_text("a\n")
    (base / "secret.txt").write_text("s\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with mounted_branch(base, tmp_path, "b", mount_opts=("--policy", str(policy))) as mb:
        m = mb.mountpoint
        os.mkdir(m / "notes")
        fd = os.open(m / "notes/n.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"hello ")
        os.write(fd, b"world\n")
        os.close(fd)
        with open(m / "a.txt", "rb") as f:
            assert f.read() == b"a\n"
        os.rename(m / "notes/n.txt", m / "notes/m.txt")
        os.chmod(m / "notes/m.txt", 0o600)
        os.link(m / "a.txt", m / "b.txt")
        os.symlink("a.txt", m / "c.txt")
        os.unlink(m / "b.txt")
        with pytest.raises(PermissionError):
            open(m / "secret.txt").close()
        os.unlink(m / "notes/m.txt")
        os.rmdir(m / "notes")
        mb.unmount()  # a clean unmount flushes every event
        events = [e for e in query(mb.store) if e["op"] not in ("utimens",)]
    got = [(e["op"], e["path"], e["dst"], e["decision"], e["errno"]) for e in events]
    # a handle's I/O is recorded when the kernel releases it, which it does in the
    # background: after the close, not always before the next request
    write_at = got.index(("write", "notes/n.txt", "", "allow", 0))
    assert got.index(("create", "notes/n.txt", "", "audit", 0)) < write_at
    del got[write_at]
    assert got == [
        ("mkdir", "notes", "", "audit", 0),
        ("create", "notes/n.txt", "", "audit", 0),
        ("open", "a.txt", "", "allow", 0),
        ("read", "a.txt", "", "allow", 0),
        ("rename", "notes/n.txt", "notes/m.txt", "audit", 0),
        ("chmod", "notes/m.txt", "", "audit", 0),
        ("link", "a.txt", "b.txt", "allow", 0),
        ("symlink", "c.txt", "", "allow", 0),
        ("unlink", "b.txt", "", "allow", 0),
        ("open", "secret.txt", "", "deny", 13),
        ("unlink", "notes/m.txt", "", "audit", 0),
        ("rmdir", "notes", "", "audit", 0),
    ], got
    write = next(e for e in events if e["op"] == "write")
    if passes_through():  # the kernel wrote the branch's new file itself: not counted
        assert (write["bytes"], write["count"]) == (0, 0)
    else:
        assert write["bytes"] == 12 and write["count"] >= 1  # the page cache may merge writes
    denied = next(e for e in events if e["decision"] == "deny")
    assert denied["rule"] == "no-secret" and len(denied["policy_sha256"]) == 64
    assert all(e["exe"] and e["pid"] > 0 and e["branch"] == "b" for e in events)
    assert all(e["mount"] == str(mb.mountpoint) for e in events)
    seqs = [e["seq"] for e in query(mb.store)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_overflow_is_counted_and_recorded(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "/mnt/x", queue_size=50)
    stop = threading.Event()

    def storm() -> None:
        for i in range(20_000):
            log.emit(op="open", path=f"f{i}")
        stop.set()

    threads = [threading.Thread(target=storm) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    events = list(query(tmp_path))
    stored = sum(1 for e in events if e["op"] == "open")
    dropped = sum(e["count"] for e in events if e["op"] == "audit_dropped")
    assert dropped > 0                       # the storm did overflow the queue ...
    assert stored + dropped == 40_000        # ... and every event is stored or counted


def test_strict_mode_refuses_while_the_log_is_unhealthy(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "/mnt/x", strict=True)
    try:
        assert not log.refuses()
        bad = tmp_path / "not-a-db"
        bad.mkdir()
        log._db, log._conn = str(bad), None  # every write now fails
        log.emit(op="open", path="x")
        for _ in range(100):
            if not log.healthy:
                break
            threading.Event().wait(0.05)
        assert log.refuses()
        (tmp_path / "other").mkdir()
        relaxed = AuditLog(tmp_path / "other", "/m", strict=False)
        relaxed.healthy = False
        assert not relaxed.refuses()
        relaxed.close()
    finally:
        log.close()


@pytest.mark.mount
def test_audit_cli(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / ".ssh").mkdir()
    (base / ".ssh/id_rsa").write_text("k")
    (base / "x.txt").write_text("x")
    with mounted_branch(base, tmp_path, "b") as mb:
        (mb.mountpoint / "y.txt").write_text("y")
        with pytest.raises(PermissionError):
            (mb.mountpoint / ".ssh/id_rsa").read_text()
        mb.unmount()
        tail = mb.cli("audit", "tail", "-n", "50").stdout
        assert "create y.txt allow ok" in tail
        denied = mb.cli("audit", "tail", "--denied").stdout.strip().splitlines()
        assert denied and all("deny" in line and "EACCES" in line for line in denied)
        rows = json.loads(mb.cli("audit", "query", "--path", "y.*", "--op", "create",
                                 "--since", "10m", "--json").stdout)
        assert [r["path"] for r in rows] == ["y.txt"]
        assert json.loads(mb.cli("audit", "query", "--until", "1h", "--json").stdout) == []
        lines = mb.cli("audit", "export", "--format", "jsonl").stdout.splitlines()
        assert len(lines) == len(list(query(mb.store)))
        assert all(json.loads(line)["policy_sha256"] for line in lines if '"op": "create"'
                   in line)
        bad = mb.cli("audit", "query", "--since", "yesterday-ish", check=False)
        assert bad.returncode != 0 and "bad time" in bad.stderr


@pytest.mark.mount
def test_audit_tail_follows(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    with mounted_branch(base, tmp_path, "b") as mb:
        follower = subprocess.Popen([AGENTFS, "--store", str(mb.store), "audit", "tail", "-f",
                                     "-n", "0"], env=mb.env, stdout=subprocess.PIPE, text=True)
        try:
            # the follower starts reading at the end of the log whenever its start-up
            # is over (seconds under load): keep creating files until one shows up
            deadline = time.monotonic() + 30
            seen, n, next_write = "", 0, 0.0
            while "followed" not in seen and time.monotonic() < deadline:
                if time.monotonic() >= next_write:
                    (mb.mountpoint / f"followed{n}.txt").write_text("x")
                    n, next_write = n + 1, time.monotonic() + 1.0
                assert follower.stdout is not None
                if select.select([follower.stdout], [], [], 0.2)[0]:
                    seen += follower.stdout.readline()
            assert re.search(r"create followed\d+\.txt allow ok", seen), seen
        finally:
            follower.kill()
            follower.wait(timeout=10)


def test_request_rows_and_named_rows_land_in_the_same_columns(tmp_path: Path) -> None:
    """emit_request builds its row positionally (no dict per request): every value
    must come back under the column it was meant for."""
    log = AuditLog(tmp_path, "/mnt/x")
    try:
        log.emit_request("s1", "br", 42, "/bin/tar", "tar xf", 1000, "create", "a/b",
                         "c/d", "audit", "rule-1", "f" * 64, 13, 77)
        log.emit(session="s1", branch="br", pid=42, exe="/bin/tar", cmdline="tar xf",
                 uid=1000, op="create", path="a/b", dst="c/d", decision="audit",
                 rule="rule-1", policy_sha256="f" * 64, errno=13, duration_us=77)
    finally:
        log.close()
    first, second = list(query(tmp_path))
    for row in (first, second):
        assert row["mount"] == "/mnt/x" and row["count"] == 1 and row["bytes"] == 0
    ignore = {"id", "ts_us", "seq"}
    assert ({k: v for k, v in first.items() if k not in ignore}
            == {k: v for k, v in second.items() if k not in ignore})
    assert (first["pid"], first["uid"], first["errno"], first["duration_us"]) == (42, 1000, 13, 77)
    assert (first["path"], first["dst"], first["rule"]) == ("a/b", "c/d", "rule-1")
