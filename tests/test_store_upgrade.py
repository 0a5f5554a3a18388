"""Store schema versions: a saved version-1 store (tests/fixtures/store-v1, written by
the first release's code) is upgraded when opened and works; an upgrade is all or
nothing; a store newer than this agentfs is refused with one line and exit 4."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from cliutil import invoke

from agentfs.branches import schema
from agentfs.branches.store import Store
from agentfs.errors import EXIT_STORE, StoreError

FIXTURE = Path(__file__).parent / "fixtures" / "store-v1"


def v1_store(tmp_path: Path) -> tuple[Path, Path]:
    """The fixture store, made real: meta.db from its dump, layers as saved, and a
    base with the files the fixture's branches changed."""
    base, store = tmp_path / "base", tmp_path / "store"
    base.mkdir()
    (base / "hello.txt").write_text("hello from the base\n")
    (base / "gone.txt").write_text("old\n")
    shutil.copytree(FIXTURE / "layers", store / "layers")
    (store / "run").mkdir()
    dump = (FIXTURE / "meta.sql").read_text().replace("@BASE@", str(base))
    conn = sqlite3.connect(store / "meta.db")
    conn.executescript(dump)
    conn.close()
    return base, store


def execute(store: Path, statement: str) -> None:
    """One committed statement on the store's meta.db, behind agentfs' back."""
    conn = sqlite3.connect(store / "meta.db")
    conn.execute(statement)
    conn.commit()
    conn.close()


def layout(db: Path) -> dict[str, object]:
    """Tables (columns with type, NOT NULL, primary key), indexes and the version."""
    conn = sqlite3.connect(db)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {
            "tables": {t: sorted((c[1], c[2], c[3], c[5])
                                 for c in conn.execute(f"PRAGMA table_info({t})"))
                       for t in tables},
            "indexes": sorted(r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='index' AND name NOT LIKE "
                "'sqlite_autoindex%'")),
            "version": conn.execute("SELECT value FROM store_info WHERE "
                                    "key='schema_version'").fetchone(),
        }
    finally:
        conn.close()


def test_fixture_is_an_older_store(tmp_path: Path) -> None:
    _base, store = v1_store(tmp_path)
    old = layout(store / "meta.db")
    assert old["version"] == ("1",)
    tables = old["tables"]
    assert isinstance(tables, dict)
    assert "commits" not in tables and "commit_ops" not in tables
    assert "kind" not in {c[0] for c in tables["layers"]}
    assert ("branch_id", "INTEGER", 1, 0) in tables["mounts"]  # NOT NULL then
    assert schema.SCHEMA_VERSION == 2 and set(schema.UPGRADES) == {1}


def test_v1_store_is_upgraded_and_usable(tmp_path: Path) -> None:
    base, store = v1_store(tmp_path)
    home = tmp_path / "home"
    res = invoke("--store", str(store), "branch", "list", "--json", home=home)
    assert res.code == 0, res.stderr
    assert [(b["name"], b["parent"]) for b in json.loads(res.stdout)] == [
        ("feature", None), ("feature-2", "feature")]
    # the upgraded store has exactly the layout of a store created now
    fresh_base = tmp_path / "fresh-base"
    fresh_base.mkdir()
    res = invoke("init", str(fresh_base), "--store", str(tmp_path / "fresh"), home=home)
    assert res.code == 0, res.stderr
    upgraded, fresh = layout(store / "meta.db"), layout(tmp_path / "fresh" / "meta.db")
    assert upgraded == fresh
    assert upgraded["version"] == ("2",)
    assert "commit_ops_by_commit" in upgraded["indexes"]  # type: ignore[operator]
    conn = sqlite3.connect(store / "meta.db")
    assert conn.execute("SELECT DISTINCT kind FROM layers").fetchall() == [("branch",)]
    assert conn.execute("SELECT key FROM store_info WHERE key LIKE 'upgraded_from_%'"
                        ).fetchall() == [("upgraded_from_1",)]
    conn.close()
    # the branches' data reads as before, and everything a store does works
    res = invoke("--store", str(store), "branch", "diff", "feature", "--name-status",
                 home=home)
    assert (res.code, res.stdout) == (0, "M\thello.txt\n"), res.stderr
    res = invoke("--store", str(store), "branch", "diff", "feature-2", "--name-status",
                 home=home)
    assert (res.code, res.stdout) == (0, "A\tnew.txt\n"), res.stderr
    assert invoke("--store", str(store), "branch", "create", "third", "--from", "feature-2",
                  home=home).code == 0
    res = invoke("--store", str(store), "branch", "commit", "feature-2", home=home)
    assert res.code == 0, res.stderr            # into its parent branch (commits table)
    res = invoke("--store", str(store), "branch", "discard", "third", "--yes", home=home)
    assert res.code == 0, res.stderr
    res = invoke("--store", str(store), "branch", "commit", "feature", home=home)
    assert res.code == 0, res.stderr            # into the base
    assert (base / "hello.txt").read_text() == "hello from feature\n"
    assert (base / "new.txt").read_text() == "new in feature-2\n"
    opened = Store(store)  # a per-process mount row (no branch): NOT NULL is gone
    try:
        opened.add_mount(None, "/nowhere", 2**22 + 1, "per-process", "")
        opened.remove_mount("/nowhere")
    finally:
        opened.close()


def test_store_without_version_row_is_the_oldest(tmp_path: Path) -> None:
    _base, store = v1_store(tmp_path)
    execute(store, "DELETE FROM store_info WHERE key='schema_version'")
    Store(store).close()
    assert layout(store / "meta.db")["version"] == ("2",)


def test_failed_upgrade_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    _base, store = v1_store(tmp_path)
    before = layout(store / "meta.db")

    def half_then_fail(cur: sqlite3.Cursor) -> None:
        schema._v1_to_v2(cur)  # every change made, then the step fails
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setitem(schema.UPGRADES, 1, half_then_fail)
    with pytest.raises(StoreError, match=r"upgrading schema version 1 to 2 failed \(disk "
                       r"I/O error \(simulated\)\); the store is unchanged"):
        Store(store)
    assert layout(store / "meta.db") == before
    monkeypatch.undo()
    Store(store).close()
    assert layout(store / "meta.db")["version"] == ("2",)


def test_newer_store_is_refused(tmp_path: Path) -> None:
    _base, store = v1_store(tmp_path)
    Store(store).close()
    execute(store, "UPDATE store_info SET value='3' WHERE key='schema_version'")
    before = (store / "meta.db").read_bytes()
    for args in (("status",), ("branch", "list"), ("branch", "diff", "feature"),
                 ("mount", str(tmp_path), "--branch", "feature")):
        res = invoke("--store", str(store), *args, home=tmp_path / "home")
        assert res.code == EXIT_STORE, (args, res.stderr)
        assert res.err_lines == [f"agentfs: store {store} has schema version 3, newer than "
                                 "this agentfs knows (2); upgrade agentfs"], res.stderr
    assert (store / "meta.db").read_bytes() == before
    with pytest.raises(StoreError, match="newer"):
        Store(store)


def test_unknown_old_version_is_refused(tmp_path: Path) -> None:
    _base, store = v1_store(tmp_path)
    execute(store, "UPDATE store_info SET value='0' WHERE key='schema_version'")
    res = invoke("--store", str(store), "status", home=tmp_path / "home")
    assert res.code == EXIT_STORE and "cannot upgrade" in res.stderr, res.stderr
    assert layout(store / "meta.db")["version"] == ("0",)
