"""SIGKILL of the daemon in the middle of heavy writes, at many points.

A writer process creates files, appends to base files (copy-up of files of 128 KiB-12 MiB),
replaces files by rename and deletes them, and logs (outside the mount, after each
step returns) what it made durable: fsynced content, and the start and end of each
rename and unlink.  The daemon is killed after a different delay each round (every
third round a few milliseconds into the copy-up of a 12 MiB base file).  Then:
fsck finds only what a kill may leave (staging, a dead writer's trash journal, ...)
and --repair fixes it, or the next mount copes on its own (alternate rounds);
`agentfs umount` / `agentfs mount` handle the dead mount without manual steps; and
through the new mount every fsynced file has exactly its content, every base file
starts with its whole base content (never a truncated copy-up), a rename is old or
new, never neither, and no staging name is visible.  `pytest -s` prints the count.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mountutil import DEFAULT_IMPL, MountedBranch, _alive, is_mounted, mounted_branch

from agentfs.branches.store import Store
from agentfs.trash.area import TrashArea
from agentfs.workflow.fsck import fsck

pytestmark = pytest.mark.mount

# what a killed daemon may leave behind, all repaired by fsck --repair (or the next mount)
AFTER_A_KILL = {"leftover-temp", "leftover-orphans", "trash-journal-unrecovered",
                "trash-open-stale"}
BASE_FILES = 24

WRITER = r'''
import hashlib, json, os, random, sys
mnt, log_path, seed, rnd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base_files = json.loads(sys.argv[5])
rng = random.Random(seed)
log = open(log_path, "a", buffering=1)
def note(**rec):
    log.write(json.dumps(rec) + "\n")
def sha(data):
    return hashlib.sha256(data).hexdigest()
def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
mine = []          # files this run fsynced and may delete
k = 0
try:
    fresh = sorted((p for p in base_files if p.startswith(f"b/r{rnd % 12:02d}")),
                   key=lambda p: os.stat(os.path.join(mnt, p)).st_size)  # copy-ups, big last
    for d in ("n", "r"):
        os.makedirs(os.path.join(mnt, d), exist_ok=True)
    while True:
        k += 1
        op = rng.choice(["create", "create", "append", "append", "rename", "unlink"])
        if op == "create":
            path = f"n/{rnd}-{k}.bin"
            data = rng.randbytes(rng.choice([1, 4096, 70_000, 300_000]))
            fd = os.open(os.path.join(mnt, path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            for i in range(0, len(data), 65536):
                write_all(fd, data[i:i + 65536])
            os.fsync(fd)
            os.close(fd)
            note(op="sync", path=path, sha=sha(data), size=len(data))
            mine.append(path)
        elif op == "append":
            path = fresh.pop() if fresh else rng.choice(base_files)
            note(op="open-append", path=path)  # a copy-up is about to start (the first time)
            fd = os.open(os.path.join(mnt, path), os.O_WRONLY | os.O_APPEND)
            write_all(fd, rng.randbytes(rng.choice([10, 5000, 200_000])))
            if rng.random() < 0.5:
                os.fsync(fd)
                os.close(fd)
                with open(os.path.join(mnt, path), "rb") as f:
                    data = f.read()
                note(op="append-sync", path=path, sha=sha(data), size=len(data))
            else:
                os.close(fd)
        elif op == "rename":
            dst, tmp = f"r/s{rng.randrange(8)}.bin", f"r/tmp-{rnd}-{k}"
            data = rng.randbytes(rng.choice([100, 50_000]))
            fd = os.open(os.path.join(mnt, tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            write_all(fd, data)
            os.fsync(fd)
            os.close(fd)
            note(op="rename-begin", path=dst, sha=sha(data))
            os.rename(os.path.join(mnt, tmp), os.path.join(mnt, dst))
            note(op="rename-done", path=dst)
        elif op == "unlink" and mine:
            path = mine.pop(rng.randrange(len(mine)))
            note(op="unlink-begin", path=path)
            os.unlink(os.path.join(mnt, path))
            note(op="unlink-done", path=path)
except OSError as exc:
    note(op="stopped", errno=exc.errno, after=k)
'''


class Model:
    """What the view must show, from the writers' logs; after each check the
    outcomes a kill left open (a rename or unlink in flight) are settled from what
    the view shows, so the model stays exact from round to round."""

    def __init__(self, base: Path, base_files: list[str]) -> None:
        self.base = base
        self.base_files = base_files
        self.exact: dict[str, str | None] = {}       # path -> sha (None: must not exist)
        self.prefix: dict[str, tuple[int, str]] = {}  # appended base file -> fsynced prefix
        self.either: dict[str, tuple[str | None, str | None]] = {}  # in flight: old or new
        self.touched: set[str] = set()  # base files opened for appending since the last check
        self.trashed: list[tuple[str, str]] = []  # (path, sha) the trash must hold
        self.ops = 0

    def read_log(self, log: Path) -> None:
        if not log.exists():
            return
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            op, path = rec["op"], rec.get("path", "")
            self.ops += op != "stopped"
            if op == "open-append":
                self.touched.add(path)
            elif op == "sync":
                self.exact[path] = rec["sha"]
            elif op == "append-sync":
                self.prefix[path] = (rec["size"], rec["sha"])
            elif op == "rename-begin":
                self.either[path] = (self.exact.get(path), rec["sha"])
            elif op == "rename-done":
                old, self.exact[path] = self.either.pop(path)
                if old is not None:
                    self.trashed.append((path, old))
            elif op == "unlink-begin":
                self.either[path] = (self.exact.get(path), None)
            elif op == "unlink-done":
                old = self.either.pop(path)[0]
                if old is not None:
                    self.trashed.append((path, old))
                self.exact[path] = None

    def check(self, mnt: Path) -> None:
        for path, want in self.exact.items():
            if path in self.either:
                continue  # in flight at the kill: checked below
            got = _sha(mnt / path)
            assert got == want, f"{path}: fsynced content changed ({_describe(mnt / path)})"
        for path, (old, new) in list(self.either.items()):
            got = _sha(mnt / path)
            assert got in (old, new), f"{path}: neither old nor new after a kill"
            if old is not None and got != old:
                self.trashed.append((path, old))
            self.exact[path] = got
            del self.either[path]
        for path in self.base_files:
            if path not in self.touched and path not in self.prefix:
                # untouched: as in the base (a stat, not a read of every file each round)
                assert (mnt / path).stat().st_size >= (self.base / path).stat().st_size, path
                continue
            data = (mnt / path).read_bytes()
            original = (self.base / path).read_bytes()
            assert data[:len(original)] == original, f"{path}: a truncated or torn copy-up"
            if path in self.prefix:
                size, want = self.prefix[path]
                assert hashlib.sha256(data[:size]).hexdigest() == want, \
                    f"{path}: fsynced appends lost"
        self.touched.clear()
        for dirpath, dirs, files in os.walk(mnt):
            for name in dirs + files:
                assert not name.startswith("tmp."), f"staging visible: {dirpath}/{name}"


    def check_trash(self, store: Path) -> None:
        """Every file deleted or replaced by a rename is in the trash, with its content
        (a kill in the middle of the deletion included)."""
        area = TrashArea(store)
        held = set()
        try:
            for item in area.items():
                data = area.root / item.data_rel("")
                if data.is_file():
                    held.add((item.meta.get("path"),
                              hashlib.sha256(data.read_bytes()).hexdigest()))
        finally:
            area.close()
        missing = [t for t in self.trashed if t not in held]
        assert missing == [], f"deleted content not in the trash: {missing[:5]}"


def _describe(path: Path) -> str:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "missing"
    return f"{st.st_size} bytes, mode {st.st_mode:o}"


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def make_base(base: Path, rng: random.Random) -> list[str]:
    files = []
    for i in range(BASE_FILES):
        rel = f"b/r{i % 12:02d}/f{i}.txt"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        size = 12 << 20 if i < 12 else rng.choice([1, 4, 8]) << 17  # one big file a dir
        (base / rel).write_bytes(rng.randbytes(size))
        files.append(rel)
    return files


def wait_for_line(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if text in log.read_text():
                return
        time.sleep(0.002)


def kill_now(mb: MountedBranch, writer: subprocess.Popen[bytes]) -> None:
    assert mb.pid is not None
    os.kill(mb.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(mb.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(mb.pid), "the daemon survived SIGKILL"
    writer.wait(timeout=30)
    with pytest.raises(OSError) as dead:
        os.statvfs(mb.mountpoint)
    assert dead.value.errno == errno.ENOTCONN
    mb.pid = None


def check_store(store: Path, repair: bool, tally: dict[str, int]) -> None:
    """fsck finds only what a kill leaves; --repair fixes it; then it is clean."""
    s = Store(store)
    try:
        report = fsck(s)
        found = {f.kind for f in report.findings if f.open}
        assert found <= AFTER_A_KILL, report.as_dict()
        for f in report.findings:
            tally[f.kind] = tally.get(f.kind, 0) + 1
        if repair and found:
            fixed = fsck(s, repair=True)
            assert fixed.clean, fixed.as_dict()
            assert fsck(s).clean
    finally:
        s.close()


def run_kill_points(tmp_path: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    base = tmp_path / "base"
    base_files = make_base(base, rng)
    model = Model(base, base_files)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    impls = [DEFAULT_IMPL, DEFAULT_IMPL, "pyfuse3"]
    tally: dict[str, int] = {}
    phases: dict[str, float] = {}

    def took(what: str, since: float) -> float:
        now = time.monotonic()
        phases[what] = phases.get(what, 0.0) + now - since
        return now
    survived = 0
    started = time.monotonic()
    with mounted_branch(base, tmp_path) as mb:
        for rnd in range(rounds):
            t = time.monotonic()
            log = tmp_path / f"writer-{rnd}.jsonl"
            writer = subprocess.Popen([sys.executable, str(script), str(mb.mountpoint),
                                       str(log), str(seed * 1000 + rnd), str(rnd),
                                       json.dumps(base_files)])
            try:
                if rnd % 3 == 1:  # aimed: a few ms into the round's first copy-up
                    wait_for_line(log, '"op": "open-append"', 10)
                    time.sleep(rng.uniform(0, 0.015))  # the copy-up takes ~20 ms
                else:
                    time.sleep(0.05 + (rnd * 0.37) % 1.2)  # 0.05 .. 1.25 s, spread out
                kill_now(mb, writer)
            finally:
                if writer.poll() is None:
                    writer.kill()
                    writer.wait()
            t = took("write+kill", t)
            model.read_log(log)
            # even rounds: fsck --repair, then umount + mount; odd: mount on the dead
            # mount straight away and let the daemon clean up (fsck checks at the end)
            check_store(mb.store, repair=rnd % 2 == 0, tally=tally)
            t = took("fsck", t)
            if rnd % 2 == 0:
                res = mb.cli("umount", str(mb.mountpoint))
                assert "detached the dead mount" in res.stdout, res.stdout
                assert not is_mounted(str(mb.mountpoint))
            mb.impl = impls[rnd % len(impls)]
            mb.mount()
            t = took("umount+mount", t)
            model.check(mb.mountpoint)
            model.check_trash(mb.store)
            took("verify", t)
            survived += 1
        mb.unmount()
        res = mb.cli("fsck", "--json")
        final = json.loads(res.stdout)
        assert res.returncode == 0 and final["clean"], final
        assert not [f for f in final["findings"] if not f["notice"]], final
    print(f"\nkill points survived: {survived}/{rounds}; {model.ops} logged writer steps; "
          f"fsck findings over all rounds: {tally or 'none'}; "
          f"{time.monotonic() - started:.1f} s (" +
          ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + ")")


@pytest.mark.timeout(600)  # about 50 s on an idle 2-core VM; several times that under load
def test_kill_points(tmp_path: Path) -> None:
    run_kill_points(tmp_path, rounds=12, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_many_kill_points(tmp_path: Path) -> None:
    run_kill_points(tmp_path, rounds=60, seed=2)
