"""`agentfs fsck`: a clean store passes; every kind of damage it checks for is injected,
found, repaired by --repair where that is safe (and then a second run is clean), or
reported and left alone where it needs a person (exit 7 both times)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from cliutil import Result, invoke
from mountutil import AGENTFS, cli_env

from agentfs.audit.log import COLUMNS, _row, open_db
from agentfs.branches.locks import hold_branch
from agentfs.branches.store import Store
from agentfs.errors import EXIT_DAMAGED, EXIT_FAILURE, EXIT_OK, EXIT_STORE
from agentfs.mount.view import open_branch_view
from agentfs.overlay.layers import MARKER
from agentfs.trash.area import META
from agentfs.trash.service import Trash

DEAD_PID = 4_000_000  # above pid_max: never a running process


class World:
    """A store for a small base, with branch b holding a created file, a copied-up
    base file, a deleted base file (whiteout), a deleted own file (trash data) and a
    deleted tree: every kind of object fsck walks."""

    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "home"
        self.base = tmp / "base"
        (self.base / "src").mkdir(parents=True)
        for i in range(5):
            (self.base / f"src/f{i}.txt").write_text(f"base {i}\n")
        (self.base / "big.bin").write_bytes(os.urandom(1 << 16))
        os.environ["AGENTFS_HOME"] = str(self.home)
        store = Store.create(self.base, tmp / "store")
        self.root = store.root
        store.create_branch("b")
        trash = Trash(store)
        ov = open_branch_view(store, "b")
        ov.trash = trash.sink("b")
        fh, _ = ov.create("new.txt", os.O_WRONLY, 0o644, os.getuid(), os.getgid())
        ov.write(fh, 0, b"new\n")
        ov.release(fh)
        fh = ov.open("src/f0.txt", os.O_WRONLY | os.O_APPEND)
        ov.write(fh, 7, b"more\n")
        ov.release(fh)
        ov.unlink("src/f1.txt")          # a base file: whiteout + hidden record
        fh, _ = ov.create("gone.txt", os.O_WRONLY, 0o644, os.getuid(), os.getgid())
        ov.write(fh, 0, b"own\n")
        ov.release(fh)
        ov.unlink("gone.txt")            # the branch's own file: data into the trash
        ov.mkdir("d", 0o755, os.getuid(), os.getgid())
        fh, _ = ov.create("d/x", os.O_WRONLY, 0o644, os.getuid(), os.getgid())
        ov.write(fh, 0, b"x\n")
        ov.release(fh)
        ov.unlink("d/x")
        ov.rmdir("d")                    # a tree item
        ov.close()
        trash.close()
        self.top = store.branch("b").top_layer
        store.close()

    def store(self) -> Store:
        return Store(self.root)

    def layer(self, sub: str = "") -> Path:
        return self.root / "layers" / str(self.top) / sub

    def fsck(self, *args: str) -> tuple[Result, dict[str, object]]:
        res = invoke("--store", str(self.root), "fsck", "--json", *args, home=self.home)
        assert "Traceback" not in res.stderr
        return res, json.loads(res.stdout) if res.stdout.strip() else {}

    def kinds(self, report: dict[str, object], *, open_only: bool = True) -> list[str]:
        findings = report["findings"]
        assert isinstance(findings, list)
        return sorted(f["kind"] for f in findings
                      if not f["notice"] and (not open_only or not f["repaired"]))

    def meta_db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.root / "meta.db", isolation_level=None)

    def trash_items(self) -> list[str]:
        return sorted(os.listdir(self.root / "trash" / "items"))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    saved = os.environ.get("AGENTFS_HOME")
    yield World(tmp_path)
    if saved is None:
        os.environ.pop("AGENTFS_HOME", None)
    else:
        os.environ["AGENTFS_HOME"] = saved


def test_a_clean_store_passes(world: World) -> None:
    res, report = world.fsck()
    assert res.code == EXIT_OK, res.stdout
    assert report["clean"] is True and report["findings"] == []
    checked = report["checked"]
    assert isinstance(checked, dict)
    assert checked["branches"] == 1 and checked["layer objects"] >= 4
    assert checked["trash records"] >= 3
    text = invoke("--store", str(world.root), "fsck", home=world.home)
    assert text.code == EXIT_OK and text.stdout.strip().endswith("clean"), text.stdout


# -- damage --repair fixes: (inject, the kind found, check what the repair did) ------------
def _orphan_layer(w: World) -> Callable[[], None]:
    d = w.root / "layers" / "777"
    (d / "tree").mkdir(parents=True)
    (d / "tree" / "precious").write_text("keep me\n")

    def after() -> None:
        assert not d.exists()
        moved = list((w.root / "lost+found").glob("*/layers/777/tree/precious"))
        assert [p.read_text() for p in moved] == ["keep me\n"]  # moved aside, not deleted
    return after


def _half_copied(w: World) -> Callable[[], None]:
    tmp = w.layer("work/tmp.12345.0")
    tmp.write_bytes(b"half a cop")

    def after() -> None:
        assert not tmp.exists() and (w.layer("work/orphans")).is_dir()
    return after


def _leftover_orphan(w: World) -> Callable[[], None]:
    orphan = w.layer("work/orphans/99.tmp.1.2")
    orphan.write_text("unlinked while open\n")
    return lambda: (None if not orphan.exists() else pytest.fail("orphan left"))


def _stray_whiteout_mark(w: World) -> Callable[[], None]:
    target = w.layer("tree/new.txt")
    os.setxattr(target, MARKER, json.dumps({"wh": 1, "origin": 5}).encode())

    def after() -> None:
        assert json.loads(os.getxattr(target, MARKER)) == {"origin": 5}
        assert target.read_text() == "new\n"
    return after


def _stray_opaque_mark(w: World) -> Callable[[], None]:
    target = w.layer("tree/new.txt")
    os.setxattr(target, MARKER, b'{"opaque":1}')

    def after() -> None:
        with pytest.raises(OSError):
            os.getxattr(target, MARKER)
    return after


def _missing_layer_dir(w: World) -> Callable[[], None]:
    shutil.rmtree(w.layer())
    return lambda: None if w.layer().is_dir() else pytest.fail("not recreated")


def _trash_data_missing(w: World) -> Callable[[], None]:
    held = [n for n in w.trash_items() if n.endswith(".data")]
    assert held
    victim = w.root / "trash" / "items" / held[0]
    shutil.rmtree(victim) if victim.is_dir() else victim.unlink()
    record = victim.with_name(held[0].replace(".data", META))

    def after() -> None:
        assert "data missing" in json.loads(record.read_text())["damaged"]
    return after


def _trash_temp(w: World) -> Callable[[], None]:
    tmp = w.root / "trash" / "items" / f"0000000000000001{META}.{DEAD_PID}.tmp"
    tmp.write_text('{"id": "0')
    return lambda: None if not tmp.exists() else pytest.fail("temp left")


def _bad_trash_record(w: World) -> Callable[[], None]:
    rec = w.root / "trash" / "items" / f"0000000000000002{META}"
    rec.write_text("{not json")

    def after() -> None:
        assert not rec.exists()
        assert list((w.root / "lost+found").glob(f"*/trash/0000000000000002{META}"))
    return after


def _dead_journal(w: World) -> Callable[[], None]:
    journal = w.root / "trash" / "journal" / f"{DEAD_PID}-1-0.jsonl"
    meta = {"id": "00000000000aa000", "branch": "b", "path": "j.txt", "kind": "file",
            "state": "final", "entries": [], "deleted_at": 1.0}
    journal.write_text(json.dumps({"op": "put", "id": meta["id"], "meta": meta}) + "\n"
                       + '{"op": "put", "id": "torn')

    def after() -> None:
        assert not journal.exists()
        assert json.loads((w.root / "trash/items" / f"00000000000aa000{META}").read_text()
                          )["path"] == "j.txt"
    return after


def _stale_open_entry(w: World) -> Callable[[], None]:
    rec = next(w.root.glob(f"trash/items/*{META}"))
    meta = json.loads(rec.read_text())
    rec.write_text(json.dumps({**meta, "state": "open", "daemon_pid": DEAD_PID}))
    return lambda: None if json.loads(rec.read_text())["state"] == "final" \
        else pytest.fail("still open")


def _stale_mount_record(w: World) -> Callable[[], None]:
    s = w.store()
    s.add_mount("b", str(w.root / "nowhere"), DEAD_PID, "pinned", "")
    s.close()

    def after() -> None:
        with w.meta_db() as conn:
            assert list(conn.execute("SELECT * FROM mounts")) == []
    return after


def _preparing_commit(w: World) -> Callable[[], None]:
    with w.meta_db() as conn:
        conn.execute("INSERT INTO commits (branch_id, target, state, created, summary) "
                     "VALUES (1, 'base', 'preparing', ?, '')", (str(datetime.now()),))

    def after() -> None:
        with w.meta_db() as conn:
            assert [r[0] for r in conn.execute("SELECT state FROM commits")] == ["rolled_back"]
    return after


def add_events(w: World, rows: list[dict[str, object]]) -> None:
    open_db(w.root).dispose()
    conn = sqlite3.connect(w.root / "audit.db")
    with conn:
        conn.executemany(f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES "
                         f"({', '.join('?' for _ in COLUMNS)})",
                         [_row(**{"ts_us": 1, "mount": "/m", "op": "open", **r}) for r in rows])
    conn.close()


def _audit_gap(w: World) -> Callable[[], None]:
    # a gap of 2 in the first run, one explained by a drop in the second, then a third
    add_events(w, [{"seq": s} for s in (1, 2, 3, 6, 7, 1, 3)]
               + [{"seq": 4, "op": "audit_dropped", "count": 1}, {"seq": 1}])

    def after() -> None:
        conn = sqlite3.connect(w.root / "audit.db")
        assert list(conn.execute("SELECT count FROM events WHERE op = 'audit_gap'")) == [(2,)]
        conn.close()
    return after


REPAIRABLE: dict[str, tuple[Callable[[World], Callable[[], None]], str]] = {
    "orphan layer directory": (_orphan_layer, "orphan-layer-dir"),
    "half-copied temp file": (_half_copied, "leftover-temp"),
    "orphan of an unlinked open file": (_leftover_orphan, "leftover-orphans"),
    "whiteout mark on a file with data": (_stray_whiteout_mark, "stray-mark"),
    "opaque mark on a file": (_stray_opaque_mark, "stray-mark"),
    "missing layer directory": (_missing_layer_dir, "missing-layer-dir"),
    "trash record whose data is gone": (_trash_data_missing, "trash-data-missing"),
    "half-written trash record": (_trash_temp, "leftover-temp"),
    "unreadable trash record": (_bad_trash_record, "bad-trash-record"),
    "journal of a dead writer": (_dead_journal, "trash-journal-unrecovered"),
    "entry left open by a dead daemon": (_stale_open_entry, "trash-open-stale"),
    "mount record of a dead daemon": (_stale_mount_record, "stale-mount-record"),
    "commit killed while preparing": (_preparing_commit, "interrupted-commit"),
    "audit sequence gap": (_audit_gap, "audit-gap"),
}


@pytest.mark.parametrize("case", sorted(REPAIRABLE))
def test_damage_is_found_and_repaired(world: World, case: str) -> None:
    inject, kind = REPAIRABLE[case]
    check_after = inject(world)
    res, report = world.fsck()
    assert res.code == EXIT_DAMAGED, res.stdout
    assert kind in world.kinds(report), report
    assert all(f["safe"] for f in report["findings"] if not f["notice"]), report  # type: ignore[attr-defined]
    assert "fixable" in invoke("--store", str(world.root), "fsck", home=world.home).stdout

    res, report = world.fsck("--repair")
    assert res.code == EXIT_OK, res.stdout
    assert kind in world.kinds(report, open_only=False)
    assert all(f["repaired"] and f["action"] for f in report["findings"]  # type: ignore[attr-defined]
               if not f["notice"]), report
    check_after()

    res, report = world.fsck()
    assert res.code == EXIT_OK and world.kinds(report) == [], report


def test_a_commit_killed_half_way_is_reported_then_finished(world: World) -> None:
    env = {**cli_env(world.home), "AGENTFS_TEST_KILL_AFTER": "3"}
    res = subprocess.run([AGENTFS, "--store", str(world.root), "branch", "commit", "b"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == -9, res.stderr
    _, report = world.fsck()
    assert world.kinds(report) == ["interrupted-commit"], report
    res2, report = world.fsck("--repair")
    assert res2.code == EXIT_OK, res2.stdout
    assert (world.base / "new.txt").read_text() == "new\n"
    assert (world.base / "src/f0.txt").read_text() == "base 0\nmore\n"
    assert not (world.base / "src/f1.txt").exists()
    res3, report = world.fsck()
    assert res3.code == EXIT_OK, report


# -- damage that needs a person: reported, left alone, exit 7 after --repair too -----------
def _bad_marker(w: World) -> None:
    os.setxattr(w.layer("tree/new.txt"), MARKER, b"\xff not json")


def _frozen_top(w: World) -> None:
    with w.meta_db() as conn:
        conn.execute("UPDATE layers SET frozen = 1 WHERE id = ?", (w.top,))


def _layer_cycle(w: World) -> None:
    s = w.store()
    s.create_branch("c", "b")  # b's old top is frozen under both new tops
    info = s.branch("b")
    s.close()
    with w.meta_db() as conn:
        conn.execute("UPDATE layers SET parent_id = ? WHERE id = ?",
                     (info.top_layer, info.layer_stack[1]))


def _corrupt_audit_db(w: World) -> None:
    add_events(w, [{"ts_us": i, "seq": i + 1, "path": "p" * 200} for i in range(3000)])
    with open(w.root / "audit.db", "r+b") as f:  # garbage over pages in the middle
        f.seek(40 * 4096)
        f.write(os.urandom(8 * 4096))


NEEDS_A_PERSON: dict[str, tuple[Callable[[World], None], set[str]]] = {
    "marker that is not JSON": (_bad_marker, {"bad-marker"}),
    "frozen top layer": (_frozen_top, {"frozen-top"}),
    "layer parent cycle": (_layer_cycle, {"layer-cycle"}),
    "corrupt audit.db": (_corrupt_audit_db, {"db-corrupt", "db-unreadable"}),
}


@pytest.mark.parametrize("case", sorted(NEEDS_A_PERSON))
def test_damage_that_needs_a_person_is_reported_and_left(world: World, case: str) -> None:
    inject, kinds = NEEDS_A_PERSON[case]
    inject(world)
    for args in ((), ("--repair",)):
        res, report = world.fsck(*args)
        assert res.code == EXIT_DAMAGED, res.stdout
        found = set(world.kinds(report))
        assert found & kinds, report
        assert not any(f["safe"] for f in report["findings"]  # type: ignore[attr-defined]
                       if f["kind"] in kinds)
    text = invoke("--store", str(world.root), "fsck", home=world.home)
    assert "problem" in text.stdout and "remain" in text.stdout, text.stdout


def test_a_layer_cycle_is_a_clear_error_for_other_commands(world: World) -> None:
    """A loop in the layer table used to hang every command that walked a stack."""
    _layer_cycle(world)
    for args in (("branch", "list"), ("branch", "diff", "b"), ("branch", "show", "c")):
        res = invoke("--store", str(world.root), *args, home=world.home)
        assert res.code == EXIT_STORE and len(res.err_lines) == 1, (args, res.stderr)
        assert "loops" in res.stderr and "fsck" in res.stderr, res.stderr


def test_unrecorded_trash_data_is_a_notice(world: World) -> None:
    (world.root / "trash" / "items" / "00000000000bb000.data").write_text("interrupted\n")
    res, report = world.fsck()
    assert res.code == EXIT_OK
    notices = [f for f in report["findings"] if f["notice"]]  # type: ignore[attr-defined]
    assert [f["kind"] for f in notices] == ["trash-data-unrecorded"]


# -- refusing --repair while the store is in use ------------------------------------------
def test_repair_is_refused_while_a_branch_is_held(world: World) -> None:
    _half_copied(world)
    fd = hold_branch(world.root, "b", "a test daemon")
    try:
        res = invoke("--store", str(world.root), "fsck", "--repair", home=world.home)
        assert res.code == EXIT_FAILURE
        assert len(res.err_lines) == 1 and "refused" in res.stderr \
            and "a test daemon" in res.stderr, res.stderr
        # a check only reads: it still runs, and leaves the work area alone
        res, report = world.fsck()
        assert res.code == EXIT_DAMAGED and world.kinds(report) == ["leftover-temp"]
    finally:
        os.close(fd)
    assert world.layer("work/tmp.12345.0").exists()


def test_repair_is_refused_while_mounted(world: World) -> None:
    s = world.store()
    s.add_mount("b", "/", os.getpid(), "pinned", "")  # "/" is mounted, we are alive
    s.close()
    _half_copied(world)
    res = invoke("--store", str(world.root), "fsck", "--repair", home=world.home)
    assert res.code == EXIT_FAILURE and "mounted at /" in res.stderr, res.stderr
    res, report = world.fsck()  # the mounted branch's staging is in use: not reported
    assert res.code == EXIT_OK, report
    assert report["skipped"]


def test_bad_arguments(world: World) -> None:
    res = invoke("--store", str(world.root), "fsck", "--bogus", home=world.home)
    assert res.code == 2 and len(res.err_lines) == 1
    res = invoke("--store", str(world.root / "nope"), "fsck", home=world.home)
    assert res.code == 4 and len(res.err_lines) == 1
