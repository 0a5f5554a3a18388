"""Whiteouts are names of one shared inode and their commit evidence lives in the
layer's stamp log: deleting stays cheap, and commit still finds every base file that
changed after the branch deleted it (agentfs.overlay.stamps)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from corefacade import CoreFacade

from agentfs.branches.store import Store
from agentfs.mount.view import open_branch_view
from agentfs.overlay import stamps as stamps_mod
from agentfs.overlay.hostio import HostDir
from agentfs.overlay.stamps import StampLog
from agentfs.workflow.commit import CommitConflict, commit_branch


def _store(tmp_path: Path) -> tuple[Path, Store]:
    base = tmp_path / "base"
    (base / "src").mkdir(parents=True)
    for name in ("a.py", "b.py", "c.py"):
        (base / "src" / name).write_text(f"{name}\n")
    (base / "README").write_text("readme\n")
    store = Store.create(base, tmp_path / "store")
    store.create_branch("b")
    return base, store


def _top(store: Store) -> Path:
    return store.layer_dir(store.branch("b").layer_stack[0])


def test_deleted_base_files_share_one_whiteout_inode(tmp_path: Path) -> None:
    base, store = _store(tmp_path)
    ov = open_branch_view(store, "b")
    fs = CoreFacade(ov)
    for name in ("a.py", "b.py", "c.py"):
        fs.unlink(f"src/{name}")
    fs.rmdir("src")
    fs.unlink("README")
    assert fs.listdir("") == []
    ov.close()
    tree = _top(store) / "tree"
    inos = {os.lstat(tree / name).st_ino for name in ("src", "README")}
    assert len(inos) == 1 and os.lstat(tree / "README").st_nlink >= 2
    # the shared inode's name in work/ went with the view: nothing left for fsck
    assert sorted(os.listdir(_top(store) / "work")) == ["orphans"]
    assert sorted(os.listdir(base / "src")) == ["a.py", "b.py", "c.py"]
    # a new view still sees them deleted and can delete more with a new shared inode
    ov = open_branch_view(store, "b")
    assert CoreFacade(ov).listdir("") == []
    ov.close()


@pytest.mark.parametrize("how", ["unlink", "rename away", "unlink then create",
                                 "rename over a deleted name"])
def test_base_changed_after_the_branch_deleted_it_is_a_conflict(tmp_path: Path,
                                                                how: str) -> None:
    base, store = _store(tmp_path)
    ov = open_branch_view(store, "b")
    fs = CoreFacade(ov)
    if how == "unlink":
        fs.unlink("src/a.py")
    elif how == "rename away":
        fs.rename("src/a.py", "src/moved.py")
    elif how == "unlink then create":
        fs.unlink("src/a.py")
        fs.write_file("src/a.py", b"new from the branch\n")
    else:
        fs.unlink("src/a.py")
        fs.rename("src/b.py", "src/a.py")
    ov.close()
    (base / "src" / "a.py").write_text("edited in the project meanwhile\n")
    with pytest.raises(CommitConflict) as exc:
        commit_branch(store, "b")
    assert exc.value.conflicts == ["src/a.py"]
    assert (base / "src" / "a.py").read_text() == "edited in the project meanwhile\n"


def test_unchanged_base_commits_the_deletions(tmp_path: Path) -> None:
    base, store = _store(tmp_path)
    ov = open_branch_view(store, "b")
    fs = CoreFacade(ov)
    fs.unlink("src/a.py")
    fs.rename("src/b.py", "src/moved.py")
    ov.close()
    commit_branch(store, "b")
    assert sorted(os.listdir(base / "src")) == ["c.py", "moved.py"]


def test_a_full_shared_inode_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """ext4 takes 65,000 names per inode: EMLINK starts a new shared whiteout."""
    _, store = _store(tmp_path)
    ov = open_branch_view(store, "b")
    real = HostDir.link_to
    full: set[str] = set()

    def link_to(self: HostDir, src: str, dst: HostDir, dst_rel: str) -> None:
        if src.startswith("whiteout.") and not full:
            full.add(src)
            raise OSError(errno.EMLINK, "Too many links")
        real(self, src, dst, dst_rel)

    monkeypatch.setattr(HostDir, "link_to", link_to)
    fs = CoreFacade(ov)
    fs.unlink("src/a.py")
    fs.unlink("src/b.py")
    monkeypatch.undo()
    assert fs.listdir("src") == ["c.py"]
    tree = _top(store) / "tree" / "src"
    assert os.lstat(tree / "a.py").st_ino == os.lstat(tree / "b.py").st_ino
    work = sorted(os.listdir(_top(store) / "work"))
    # the full one's name left work/ at once (its whiteouts keep the inode), and only
    # the new one's is there; after close, none
    assert len(full) == 1 and full.pop() not in work
    assert len([w for w in work if w.startswith("whiteout.")]) == 1
    ov.close()
    assert sorted(os.listdir(_top(store) / "work")) == ["orphans"]


def test_stamp_log_last_line_wins_and_torn_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "stamps"
    log = StampLog(str(path))
    log.record("a", [1, 2, "a"])
    log.record("b", [3, 4, "b"])
    log.record("a", [5, 6, "a"])
    log.record("b", None)          # withdrawn
    log.record("c", None)          # nothing to withdraw: no line
    log.close()
    assert len(path.read_bytes().splitlines()) == 4
    with open(path, "ab") as f:
        f.write(b'["d", [7, 8')   # a crash in the middle of a line
    again = StampLog(str(path))
    assert again.get("a") == [5, 6, "a"]
    assert again.get("b") is None and again.get("c") is None and again.get("d") is None
    again.record("e", [9, 9, "e"])  # appended after the torn line, still read back
    again.close()
    assert StampLog(str(path)).get("e") == [9, 9, "e"]


def test_stamp_log_is_compacted_by_its_writer(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stamps_mod, "_COMPACT_SLACK", 2)
    path = tmp_path / "stamps"
    log = StampLog(str(path))
    for i in range(20):
        log.record("same", [i, i, "same"])
    log.close()
    reader = StampLog(str(path))
    assert reader.get("same") == [19, 19, "same"]
    assert len(path.read_bytes().splitlines()) == 20  # a reader never rewrites
    writer = StampLog(str(path))
    writer.record("other", [1, 1, "other"])
    writer.close()
    assert len(path.read_bytes().splitlines()) == 2
    final = StampLog(str(path))
    assert final.get("same") == [19, 19, "same"] and final.get("other") == [1, 1, "other"]
