"""Soft delete: deletes, rename-overs and (under soft_delete) truncations keep the old
content in the store's trash, restorable as it was; purge by age and size."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import mounted_branch

from agentfs.branches.store import Store
from agentfs.errors import UserError
from agentfs.mount.view import open_branch_view
from agentfs.overlay.engine import Overlay
from agentfs.trash.service import Trash
from agentfs.units import parse_duration, parse_size


class Branch:
    def __init__(self, tmp: Path) -> None:
        self.base = tmp / "base"
        (self.base / "proj/sub").mkdir(parents=True)
        (self.base / "proj/a.txt").write_text("base a\n")
        (self.base / "proj/sub/b.txt").write_text("base b\n")
        (self.base / "keep.txt").write_text("keep\n")
        os.environ["AGENTFS_HOME"] = str(tmp / "home")
        self.store = Store.create(self.base, tmp / "store")
        self.store.create_branch("b")
        self.trash = Trash(self.store)
        self.ov = self.open()

    def open(self) -> Overlay:
        ov = open_branch_view(self.store, "b")
        ov.trash = self.trash.sink("b")
        return ov

    def write(self, path: str, data: bytes, flags: int = os.O_WRONLY) -> None:
        if self.ov.exists(path):
            fh = self.ov.open(path, flags)
        else:
            fh, _ = self.ov.create(path, os.O_WRONLY, 0o644, 0, 0)
        self.ov.write(fh, 0, data)
        self.ov.release(fh)

    def read(self, path: str) -> bytes:
        fh = self.ov.open(path, os.O_RDONLY)
        try:
            return self.ov.read(fh, 0, 1 << 20)
        finally:
            self.ov.release(fh)

    def tree(self, path: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for name in self.ov.listdir(path):
            child = f"{path}/{name}" if path else name
            attr = self.ov.getattr(child)
            if stat.S_ISDIR(attr.mode):
                out[child] = ("dir", attr.mode)
                out.update(self.tree(child))
            elif stat.S_ISLNK(attr.mode):
                out[child] = ("link", self.ov.readlink(child))
            else:
                out[child] = (self.read(child), attr.mode, attr.mtime_ns)
        return out

    def items(self) -> list[dict[str, object]]:
        return [i.meta for i in self.trash.area.items()]


@pytest.fixture
def br(tmp_path: Path) -> Iterator[Branch]:
    b = Branch(tmp_path)
    try:
        yield b
    finally:
        b.ov.close()
        b.trash.close()


def test_rm_rf_of_a_mixed_tree_is_one_entry_that_restores_as_it_was(br: Branch) -> None:
    br.write("proj/new.txt", b"branch new\n")
    br.write("proj/sub/deep/n2.txt".replace("/deep", ""), b"branch n2\n")
    br.write("proj/a.txt", b"edited a\n")
    os_link_target = "proj/sub/b.txt"
    br.ov.symlink("proj/link", "sub/b.txt", 0, 0)
    before = br.tree()
    br.ov.remove_tree("proj")
    assert not br.ov.exists("proj")
    [item] = br.items()
    assert item["kind"] == "tree" and item["path"] == "proj" and item["state"] == "final"
    rels = {e["rel"]: e for e in item["entries"]}  # type: ignore[attr-defined]
    assert set(rels) == {"", "a.txt", "new.txt", "link", "sub", "sub/b.txt", "sub/n2.txt"}
    assert rels["a.txt"]["held"] and rels["new.txt"]["held"]       # moved out of the branch
    assert not rels[os_link_target[5:]]["held"]                     # base: only hidden
    assert rels["sub/b.txt"]["source"] == {"layer": None, "host": "tree", "rel": "proj/sub/b.txt"}
    assert all(len(e["stamp"]) in (3, 4) for e in rels.values() if e["kind"] == "file")
    result = br.trash.restore_into(br.ov, str(item["id"]), None, False)
    assert not result.skipped
    assert br.tree() == before
    assert br.items() == []
    assert (br.base / "proj/a.txt").read_text() == "base a\n"      # the base never changes


def test_restore_refuses_to_overwrite_and_checks_hashes(br: Branch) -> None:
    br.write("proj/new.txt", b"one\n")
    br.ov.unlink("proj/new.txt")
    [item] = br.items()
    br.write("proj/new.txt", b"two\n")
    with pytest.raises(UserError, match="exists"):
        br.trash.restore_into(br.ov, str(item["id"]), None, False)
    # elsewhere is fine
    br.trash.restore_into(br.ov, str(item["id"])[:10], "proj/old.txt", False)  # id prefix
    assert br.read("proj/old.txt") == b"one\n"
    # tampered trash content is refused
    br.ov.unlink("proj/old.txt")
    [item] = [i for i in br.items() if i["path"] == "proj/old.txt"]
    data = br.trash.area.root / f"{item['id']}.data"
    data.write_bytes(b"evil\n")
    with pytest.raises(UserError, match="not what was deleted"):
        br.trash.restore_into(br.ov, str(item["id"]), None, False)
    # --force over an existing file: the existing one goes to the trash too
    br.trash.restore_into(br.ov, str(item["id"]), "proj/new.txt", True)
    assert br.read("proj/new.txt") == b"evil\n"
    assert any(i["path"] == "proj/new.txt" for i in br.items())


def test_restore_of_a_base_file_checks_the_base_is_unchanged(br: Branch) -> None:
    br.ov.unlink("keep.txt")
    [item] = br.items()
    assert item["entries"][0]["held"] is False  # type: ignore[index]
    (br.base / "keep.txt").write_text("changed behind our back\n")
    with pytest.raises(UserError, match="changed since the delete"):
        br.trash.restore_into(br.ov, str(item["id"]), None, False)


def test_rename_over_keeps_the_replaced_file(br: Branch) -> None:
    br.write("proj/x.txt", b"x\n")
    br.write("proj/y.txt", b"y\n")
    br.ov.rename("proj/x.txt", "proj/y.txt")          # a branch file replaced
    br.write("proj/z.txt", b"z\n")
    br.ov.rename("proj/z.txt", "proj/a.txt")          # a base file replaced
    reasons = {(i["path"], i["reason"]) for i in br.items()}
    assert reasons == {("proj/y.txt", "rename_over"), ("proj/a.txt", "rename_over")}
    [y] = [i for i in br.items() if i["path"] == "proj/y.txt"]
    br.trash.restore_into(br.ov, str(y["id"]), "proj/y.old", False)
    assert br.read("proj/y.old") == b"y\n" and br.read("proj/y.txt") == b"x\n"


def test_open_deleted_file_stays_usable_and_is_finalized_at_close(br: Branch) -> None:
    br.write("proj/log.txt", b"first\n")
    fh = br.ov.open("proj/log.txt", os.O_RDWR)
    br.ov.unlink("proj/log.txt")
    [item] = br.items()
    assert item["state"] == "open"
    br.ov.write(fh, 6, b"second\n")                    # still writable ...
    assert br.ov.read(fh, 0, 100) == b"first\nsecond\n"  # ... and readable
    with pytest.raises(UserError, match="still open"):
        br.trash.restore_into(br.ov, str(item["id"]), None, False)
    br.ov.release(fh)
    [item] = br.items()
    assert item["state"] == "final" and item["size"] == 13
    br.trash.restore_into(br.ov, str(item["id"]), None, False)
    assert br.read("proj/log.txt") == b"first\nsecond\n"


def test_purge_by_age_and_size(br: Branch) -> None:
    for i in range(4):
        br.write(f"proj/f{i}", b"x" * 1000 * (i + 1))
        br.ov.unlink(f"proj/f{i}")
    items = list(br.trash.area.items())
    assert [i.held_bytes for i in items] == [1000, 2000, 3000, 4000]
    # age: pretend the first two were deleted a week ago
    for item in items[:2]:
        item.meta["deleted_at"] -= 8 * 86400
        br.trash.area.write(item.id, item.meta)
    assert {i.id for i in br.trash.purge("7d", None, dry_run=True)} == {items[0].id, items[1].id}
    assert len(list(br.trash.area.items())) == 4              # dry run kept them
    br.trash.purge("7d", None, dry_run=False)
    assert [i.id for i in br.trash.area.items()] == [items[2].id, items[3].id]
    # size: the oldest go first until the rest fits
    gone = br.trash.purge(None, "5KiB", dry_run=False)
    assert [i.id for i in gone] == [items[2].id]
    # retention settings apply when no limit is given
    br.trash.set_retention("1h", "1KiB", None)
    br.trash.purge(None, None, dry_run=False)
    assert list(br.trash.area.items()) == []


def test_units() -> None:
    assert [parse_duration(t) for t in ("90", "30s", "15m", "2h", "7d", "2w", "1.5h")] == \
        [90, 30, 900, 7200, 604800, 1209600, 5400]
    assert [parse_size(t) for t in ("512", "4KiB", "5MiB", "5GiB", "1.5GiB", "2MB")] == \
        [512, 4096, 5 << 20, 5 << 30, 3 << 29, 2_000_000]
    for bad in ("7x", "", "-1d", "GiB"):
        with pytest.raises(ValueError):
            parse_size(bad) if "B" in bad else parse_duration(bad)


@pytest.mark.mount
def test_mounted_rm_rf_restore_through_the_cli(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "proj/sub").mkdir(parents=True)
    (base / "proj/a.txt").write_text("base a\n")
    (base / "proj/sub/b.txt").write_text("base b\n")
    with mounted_branch(base, tmp_path, "b") as mb:
        m = mb.mountpoint
        (m / "proj/new.txt").write_text("new\n")
        (m / "proj/a.txt").write_text("edited\n")
        with open(m / "proj/sub/open.txt", "w") as f:
            f.write("open ")
            os.system(f"rm -rf {m / 'proj'}")
            f.write("and written after rm\n")
        assert not (m / "proj").exists()
        assert os.listdir(m) == []                              # the trash is not in the view
        time.sleep(0.2)
        items = json.loads(mb.cli("trash", "list", "--json").stdout)
        [tree] = [i for i in items if i["path"] == "proj"]
        assert tree["kind"] == "tree" and tree["exe"].endswith("rm")
        listing = mb.cli("trash", "show", tree["id"]).stdout
        assert "sub/b.txt" in listing and "hidden in the base" in listing
        mb.cli("trash", "restore", tree["id"])              # through the running daemon
        assert (m / "proj/a.txt").read_text() == "edited\n"
        assert (m / "proj/new.txt").read_text() == "new\n"
        assert (m / "proj/sub/b.txt").read_text() == "base b\n"
        assert (m / "proj/sub/open.txt").read_text() == "open and written after rm\n"
        res = mb.cli("trash", "restore", tree["id"], check=False)
        assert res.returncode != 0 and "no trash entry" in res.stderr
    assert (base / "proj/a.txt").read_text() == "base a\n"


@pytest.mark.mount
def test_truncation_under_soft_delete_keeps_the_old_content(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "data.csv").write_text("precious rows\n")
    (base / "scratch.txt").write_text("scratch\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefaults: {read: allow, write: allow}\nrules:\n"
                      "  - id: keep-data\n    paths: ['**/*.csv']\n    ops: [truncate]\n"
                      "    decision: soft_delete\n")
    with mounted_branch(base, tmp_path, "b", mount_opts=("--policy", str(policy))) as mb:
        (mb.mountpoint / "data.csv").write_text("new\n")       # open(O_TRUNC)
        os.truncate(mb.mountpoint / "data.csv", 0)             # setattr(size)
        (mb.mountpoint / "scratch.txt").write_text("other\n")  # not covered: no copy
        items = json.loads(mb.cli("trash", "list", "--json").stdout)
        assert [(i["path"], i["reason"], i["size"]) for i in items] == [
            ("data.csv", "truncate", 14), ("data.csv", "truncate", 4)]
        mb.cli("trash", "restore", items[0]["id"], "--to", "data.old")
        assert (mb.mountpoint / "data.old").read_text() == "precious rows\n"


def test_entries_left_open_by_a_dead_daemon_are_finalized(br: Branch) -> None:
    br.write("proj/log.txt", b"kept\n")
    fh = br.ov.open("proj/log.txt", os.O_RDONLY)
    br.ov.unlink("proj/log.txt")
    [item] = list(br.trash.area.items())
    assert item.meta["state"] == "open"
    assert br.trash.finalize_stale() == 0            # its daemon (this process) lives
    item.meta["daemon_pid"] = 2**22 + 12345          # beyond pid_max: certainly gone
    br.trash.area.write(item.id, item.meta)
    assert br.trash.finalize_stale() == 1
    [item] = list(br.trash.area.items())
    assert item.meta["state"] == "final" and item.meta["entries"][0]["sha256"]
    br.ov.release(fh)
