"""Trash records go through a per-writer journal: no record file per deleted file,
pending records visible to every reader at once, a dead writer's journal recovered
with nothing lost and nothing resurrected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import is_mounted, mounted_branch

from agentfs.branches.store import Store
from agentfs.errors import UserError
from agentfs.mount.view import open_branch_view
from agentfs.overlay.engine import Overlay
from agentfs.proc import running
from agentfs.trash import area as area_mod
from agentfs.trash.area import META, PendingElsewhere, TrashArea
from agentfs.trash.restore import restore
from agentfs.trash.service import Trash
from agentfs.trash.sink import TrashSink, finalize_stale

GONE = 1  # a process start time no live process has: the writer counts as dead


class Store1:
    """A store whose base has proj/d{0,1,2}/f{0..9}.txt, and branch b."""

    def __init__(self, tmp: Path) -> None:
        self.base = tmp / "base"
        for d in range(3):
            (self.base / f"proj/d{d}").mkdir(parents=True)
            for f in range(10):
                (self.base / f"proj/d{d}/f{f}.txt").write_text(f"{d}/{f}\n")
        (self.base / "keep.txt").write_text("keep\n")
        os.environ["AGENTFS_HOME"] = str(tmp / "home")
        self.store = Store.create(self.base, tmp / "store")
        self.store.create_branch("b")
        self.trash = Trash(self.store)
        self.ovs: list[Overlay] = []

    def view(self, area: TrashArea | None = None) -> Overlay:
        ov = open_branch_view(self.store, "b")
        ov.trash = TrashSink(area or self.trash.area, "b", 0)
        self.ovs.append(ov)
        return ov

    def record_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.trash.area.root) if n.endswith(META))

    def journals(self) -> list[Path]:
        return sorted(self.trash.area.journal_dir.iterdir())

    def close(self) -> None:
        for ov in self.ovs:
            ov.close()
        self.trash.close()
        self.store.close()


@pytest.fixture
def st(tmp_path: Path) -> Iterator[Store1]:
    s = Store1(tmp_path)
    try:
        yield s
    finally:
        s.close()


def _writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ids of every record file written from now on."""
    written: list[str] = []
    real = TrashArea._write_file

    def counting(self: TrashArea, item_id: str, meta: dict[str, object]) -> None:
        written.append(item_id)
        real(self, item_id, meta)

    monkeypatch.setattr(TrashArea, "_write_file", counting)
    return written


def test_rm_rf_writes_one_record_file_and_restores(st: Store1,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    written = _writes(monkeypatch)
    ov = st.view()
    for d in range(3):
        for f in range(10):
            ov.unlink(f"proj/d{d}/f{f}.txt")
    assert st.record_files() == []                       # 30 deletions, no record file
    assert len(st.trash.area.pending()) == 30
    for d in range(3):
        ov.rmdir(f"proj/d{d}")
    ov.rmdir("proj")
    assert st.record_files() == [] and len(st.trash.area.pending()) == 1
    st.trash.area.flush()
    [tree_file] = st.record_files()
    assert written == [tree_file[:-len(META)]]           # nothing folded was ever a file
    [item] = list(st.trash.area.items())
    rels = {e["rel"] for e in item.meta["entries"]}
    assert item.meta["kind"] == "tree" and len(rels) == 1 + 3 + 30
    assert "d2/f9.txt" in rels
    assert st.journals()[0].stat().st_size == 0          # written out: truncated
    restore(st.trash.area, item.id, ov, st.trash.open_source)
    assert sorted(ov.listdir("proj/d1")) == sorted(f"f{f}.txt" for f in range(10))
    assert list(st.trash.area.items()) == [] and st.record_files() == []


def test_pending_items_are_visible_to_another_reader(st: Store1) -> None:
    ov = st.view()
    ov.unlink("keep.txt")
    ov.remove_tree("proj/d0")
    [one, tree] = st.trash.area.pending()
    assert st.record_files() == []
    other = TrashArea(st.store.root)                     # e.g. `agentfs trash list`
    seen = {i.id: i.meta for i in other.items()}
    assert set(seen) == {one, tree}
    assert seen[one]["path"] == "keep.txt" and seen[tree]["kind"] == "tree"
    assert other.get(tree[:14]).id == tree               # by prefix too
    assert other.pending_elsewhere(tree) == os.getpid()
    other.close()
    st.trash.area.flush()                                # files now, and still seen once
    again = TrashArea(st.store.root)
    assert sorted(i.id for i in again.items()) == [one, tree]
    again.close()


def _killed_writer(s: Store1, data: bytes, steps: str) -> subprocess.CompletedProcess[str]:
    """Run a real process on *s*'s branch b: it creates own.txt holding *data*, then runs
    *steps* (Python, with os, signal, trash and ov at hand), which end in its SIGKILL;
    *s* gets a fresh Store afterwards."""
    s.store.close()
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from agentfs.branches.store import Store
        from agentfs.mount.view import open_branch_view
        from agentfs.trash.service import Trash
        store = Store(Path({str(s.store.root)!r}))
        trash = Trash(store)
        ov = open_branch_view(store, "b")
        ov.trash = trash.sink("b")
        fh, _ = ov.create("own.txt", os.O_WRONLY, 0o644, 0, 0)
        ov.write(fh, 0, {data!r})
        ov.release(fh)
    """) + textwrap.dedent(steps)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ))
    assert res.returncode == -signal.SIGKILL, res.stderr
    s.store = Store(s.store.root)
    return res


def test_a_dead_writers_journal_is_read_then_recovered(tmp_path: Path) -> None:
    """A real process deletes things and is SIGKILLed before writing any record file."""
    s = Store1(tmp_path)
    try:
        res = _killed_writer(s, b"branch data\n", """
            ov.unlink("own.txt")
            ov.unlink("keep.txt")
            ov.remove_tree("proj/d1")
            ov.unlink("proj/d2/f3.txt")
            print(len(trash.area.pending()), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        assert res.stdout.strip() == "4"
        assert s.record_files() == [] and len(s.journals()) == 1
        reader = TrashArea(s.store.root)
        before = {i.id: i.meta for i in reader.items()}   # visible before any recovery
        reader.close()
        assert sorted(m["path"] for m in before.values()) == [
            "keep.txt", "own.txt", "proj/d1", "proj/d2/f3.txt"]
        assert finalize_stale(s.trash.area, 0) == 0      # what a mount does first
        assert s.journals() == []
        assert len(s.record_files()) == 4
        after = {i.id: i.meta for i in s.trash.area.items()}
        assert after == before
        [own] = [i for i in s.trash.area.items() if i.path == "own.txt"]
        ov = s.view()
        restore(s.trash.area, own.id, ov, s.trash.open_source)
        fh = ov.open("own.txt", os.O_RDONLY)
        assert ov.read(fh, 0, 100) == b"branch data\n"
        ov.release(fh)
    finally:
        s.close()


def test_a_torn_last_line_is_ignored(st: Store1) -> None:
    good = {"id": "a1", "path": "x", "kind": "file", "deleted_at": 1.0, "entries": [],
            "state": "final", "branch": "b"}
    line = json.dumps({"op": "put", "id": "a1", "meta": good}) + "\n"
    torn = json.dumps({"op": "put", "id": "a2", "meta": {**good, "id": "a2"}})[:-7]
    journal = st.trash.area.journal_dir / f"{os.getpid()}-{GONE}-99.jsonl"
    journal.write_text(line + torn)
    assert [i.id for i in st.trash.area.items()] == ["a1"]
    assert st.trash.area.recover() == 1
    assert st.record_files() == ["a1.json"] and not journal.exists()
    assert st.trash.area.get("a1").meta == good


def test_a_folded_child_is_not_resurrected_by_replay(st: Store1) -> None:
    dead = TrashArea(st.store.root, writer=(os.getpid(), GONE))
    ov = st.view(dead)
    for f in range(10):
        ov.unlink(f"proj/d0/f{f}.txt")
    ov.rmdir("proj/d0")
    [tree] = dead.pending()
    journal = dead.journal_dir / dead.journal_name
    ops = [json.loads(line)["op"] for line in journal.read_text().splitlines()]
    assert ops.count("put") == 11 and ops.count("drop") == 10   # the children are in it
    # the writer "dies" here: nothing written out
    assert [i.id for i in st.trash.area.items()] == [tree]
    assert st.trash.finalize_stale() == 0
    assert st.record_files() == [f"{tree}.json"]
    [item] = list(st.trash.area.items())
    assert len(item.meta["entries"]) == 11


def test_removing_a_pending_item_in_its_own_process_sticks(st: Store1) -> None:
    dead = TrashArea(st.store.root, writer=(os.getpid(), GONE))
    ov = st.view(dead)
    ov.unlink("keep.txt")
    ov.unlink("proj/d0/f0.txt")
    keep, f0 = dead.pending()
    restore(dead, keep, ov, st.trash.open_source)        # restore in the writer's process
    assert [i.id for i in dead.purge(-1.0)] == [f0]      # and purge everything else
    assert dead.pending() == [] and ov.exists("keep.txt")
    assert list(st.trash.area.items()) == []             # the journal says dropped
    st.trash.area.recover()                              # the writer "died": replay
    assert list(st.trash.area.items()) == [] and st.record_files() == []


def test_a_pending_item_of_a_live_writer_is_left_to_it(st: Store1) -> None:
    writer = st.trash.area
    ov = st.view()
    ov.unlink("keep.txt")
    [item_id] = writer.pending()
    other = TrashArea(st.store.root)                     # another process, e.g. the CLI
    assert other.purge(-1.0) == []                       # skipped: its writer lives
    with pytest.raises(PendingElsewhere):
        other.remove(item_id)
    with pytest.raises(UserError, match="still being recorded"):
        restore(other, item_id, ov, st.trash.open_source)
    assert other.recover() == 0                          # a live writer is not replayed
    writer.flush()
    assert [i.id for i in other.items()] == [item_id]    # nothing was lost either
    assert [i.id for i in other.purge(-1.0)] == [item_id]
    assert list(writer.items()) == [] and st.record_files() == []
    other.close()


def test_a_pending_item_of_a_dead_writer_is_recovered_then_removed(st: Store1) -> None:
    dead = TrashArea(st.store.root, writer=(os.getpid(), GONE))
    ov = st.view(dead)
    ov.unlink("keep.txt")
    ov.unlink("proj/d0/f0.txt")
    keep, f0 = dead.pending()
    st.trash.area.remove(keep)
    assert [i.id for i in st.trash.area.items()] == [f0]
    assert st.trash.area.recover() == 0 and st.record_files() == [f"{f0}.json"]


def test_batches_by_age_and_by_count(st: Store1, monkeypatch: pytest.MonkeyPatch) -> None:
    ov = st.view()
    area = st.trash.area
    ov.unlink("proj/d0/f0.txt")
    assert area.flush(older_than=60) == 0 and st.record_files() == []
    monkeypatch.setattr(area_mod, "FLUSH_AGE", 0.0)      # due at the next record
    ov.unlink("proj/d0/f1.txt")
    assert len(st.record_files()) == 1 and len(area.pending()) == 1
    monkeypatch.setattr(area_mod, "FLUSH_AGE", 3600.0)
    monkeypatch.setattr(area_mod, "FLUSH_COUNT", 5)
    for f in range(2, 10):
        ov.unlink(f"proj/d0/f{f}.txt")
    assert len(area.pending()) < 5 and len(st.record_files()) + len(area.pending()) == 10
    # a directory folds children that are files already as well as pending ones
    ov.rmdir("proj/d0")
    area.flush()
    [item] = list(area.items())
    assert len(item.meta["entries"]) == 11 and len(st.record_files()) == 1


# -- through a mount -----------------------------------------------------------------------
def _base(tmp_path: Path, dirs: int = 4, files: int = 25) -> Path:
    base = tmp_path / "base"
    for d in range(dirs):
        (base / f"src/d{d}").mkdir(parents=True)
        for f in range(files):
            (base / f"src/d{d}/f{f}.c").write_text(f"int x{d}_{f};\n")
    return base


@pytest.mark.mount
def test_mounted_rm_rf_is_one_tree_item_at_once(tmp_path: Path) -> None:
    base = _base(tmp_path)
    with mounted_branch(base, tmp_path, "b") as mb:
        subprocess.run(["rm", "-rf", str(mb.mountpoint / "src")], check=True)
        items = json.loads(mb.cli("trash", "list", "--json").stdout)  # no waiting
        [tree] = items
        assert tree["kind"] == "tree" and tree["path"] == "src"
        assert tree["entries"] == 1 + 4 + 100
        records = [n for n in os.listdir(mb.store / "trash/items") if n.endswith(META)]
        assert len(records) <= 1                          # no record per deleted file
        mb.cli("trash", "restore", tree["id"])
        assert (mb.mountpoint / "src/d3/f24.c").read_text() == "int x3_24;\n"


@pytest.mark.mount
def test_mounted_sigkill_loses_no_trash_record(tmp_path: Path) -> None:
    base = _base(tmp_path, 2, 10)
    with mounted_branch(base, tmp_path, "b") as mb:
        m = mb.mountpoint
        for f in range(10):
            os.unlink(m / f"src/d0/f{f}.c")
        subprocess.run(["rm", "-rf", str(m / "src/d1")], check=True)
        assert mb.pid is not None
        os.kill(mb.pid, signal.SIGKILL)                   # well before its next batch
        journals = list((mb.store / "trash/journal").iterdir())
        assert len(journals) == 1 and journals[0].stat().st_size > 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and running(mb.pid):
            time.sleep(0.05)
        subprocess.run(["fusermount3", "-uz", str(m)], capture_output=True, timeout=20)
        assert not is_mounted(str(m))
        seen = json.loads(mb.cli("trash", "list", "--json").stdout)   # from the journal
        assert sorted(i["path"] for i in seen) == sorted(
            [f"src/d0/f{f}.c" for f in range(10)] + ["src/d1"])
        mb.mount()                                        # recovers the dead journal
        assert list((mb.store / "trash/journal").iterdir()) == []
        records = [n for n in os.listdir(mb.store / "trash/items") if n.endswith(META)]
        assert len(records) == 11
        after = json.loads(mb.cli("trash", "list", "--json").stdout)
        assert after == seen
        [tree] = [i for i in after if i["path"] == "src/d1"]
        assert tree["entries"] == 11
        mb.cli("trash", "restore", tree["id"])
        assert (m / "src/d1/f9.c").read_text() == "int x1_9;\n"



@pytest.mark.parametrize("dies", ["before", "after"])
def test_a_deletion_killed_at_its_trash_link_loses_nothing(tmp_path: Path, dies: str
                                                           ) -> None:
    """The record goes first, the trash link second.  Killed before the link: the record's
    data never came; recovery drops it (the file never left the view) and a later
    deletion keeps the file.  Killed after it: the item is whole.  (Linked first, a kill
    right after the link left unrecorded data sharing the file's inode: the next
    deletion took that link for a second name of the file and kept nothing.)"""
    s = Store1(tmp_path)
    try:
        _killed_writer(s, b"first\n", f"""
            from agentfs.overlay.hostio import HostDir
            link = HostDir.link_to
            def dying_link(*args, **kwargs):
                if {dies!r} == "after":
                    link(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            HostDir.link_to = dying_link
            ov.unlink("own.txt")
        """)
        finalize_stale(s.trash.area, 0)  # what a mount does first
        assert s.journals() == []
        assert len(s.record_files()) == (dies == "after")
        ov = s.view()
        fh = ov.open("own.txt", os.O_RDONLY)  # the unlink never finished
        assert ov.read(fh, 0, 100) == b"first\n"
        ov.release(fh)
        ov.unlink("own.txt")
        held = {(i.path, (s.trash.area.root / i.data_rel("")).read_bytes())
                for i in s.trash.area.items()}
        assert held == {("own.txt", b"first\n")}
    finally:
        s.close()
