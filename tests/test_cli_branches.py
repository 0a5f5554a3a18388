"""branch diff / show / commit / discard through the real console script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mountutil import cli_env, mounted_branch, run_cli


@pytest.fixture
def proj(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    base = tmp_path / "base"
    (base / "src").mkdir(parents=True)
    (base / "src" / "app.py").write_text("def f():\n    return 1\n")
    (base / "old.txt").write_text("old\n")
    (base / "blob.bin").write_bytes(b"\0\1\2")
    env = cli_env(tmp_path / "home")
    run_cli("init", str(base), "--store", str(tmp_path / "store"), env=env)
    return base, tmp_path / "store", env


def cli(store: Path, env: dict[str, str], *args: str, check: bool = True) -> str:
    res = run_cli("--store", str(store), *args, env=env, check=check)
    return res.stdout if check else res.stdout + res.stderr


@pytest.mark.mount
def test_diff_commit_show_discard(tmp_path: Path, proj: tuple[Path, Path, dict[str, str]]
                                  ) -> None:
    base, store, env = proj
    cli(store, env, "branch", "create", "agent")
    with mounted_branch(base, tmp_path / "m", branch="agent", init=False, store=store,
                        env=env) as mb:
        mnt = mb.mountpoint
        (mnt / "src" / "app.py").write_text("def f():\n    return 2\n")
        (mnt / "old.txt").unlink()
        (mnt / "new.txt").write_text("new\n")
        (mnt / "blob.bin").write_bytes(b"\0\1\3")
        assert cli(store, env, "branch", "diff", "agent", "--name-status") == (
            "M\tblob.bin\nA\tnew.txt\nD\told.txt\nM\tsrc/app.py\n")
        busy = cli(store, env, "branch", "commit", "agent", check=False)
        assert "is mounted" in busy
        mb.unmount()
    patch = cli(store, env, "branch", "diff", "agent")
    assert "-    return 1\n+    return 2\n" in patch
    assert "Binary files a/blob.bin and b/blob.bin differ" in patch
    assert "deleted file mode 100644" in patch and "new file mode 100644" in patch
    stat_out = cli(store, env, "branch", "diff", "agent", "--stat")
    assert "4 files changed, 2 insertions(+), 2 deletions(-)" in stat_out
    only = json.loads(cli(store, env, "branch", "diff", "agent", "--json", "src"))
    assert [c["path"] for c in only["changes"]] == ["src/app.py"]
    shown = json.loads(cli(store, env, "branch", "show", "agent", "--json"))
    assert shown["changes"]["modified"] == 2 and shown["changes"]["added"] == 1
    assert shown["changes"]["deleted"] == 1 and shown["fork_point"] == "base"
    dry = json.loads(cli(store, env, "branch", "commit", "agent", "--dry-run", "--json"))
    assert dry["dry_run"] is True and (base / "old.txt").exists()
    cli(store, env, "branch", "commit", "agent")
    assert (base / "src" / "app.py").read_text() == "def f():\n    return 2\n"
    assert not (base / "old.txt").exists() and (base / "new.txt").read_text() == "new\n"
    assert cli(store, env, "branch", "diff", "agent", "--name-status") == ""
    out = cli(store, env, "branch", "discard", "agent", "--yes")
    assert "data kept in" in out
    assert json.loads(cli(store, env, "branch", "list", "--json")) == []
    assert "unknown branch" in cli(store, env, "branch", "show", "agent", check=False)


def test_discard_refuses_parent_and_needs_yes(proj: tuple[Path, Path, dict[str, str]]) -> None:
    _base, store, env = proj
    cli(store, env, "branch", "create", "p")
    cli(store, env, "branch", "create", "c", "--from", "p")
    assert "has children (c)" in cli(store, env, "branch", "discard", "p", "--yes", check=False)
    assert "without --yes" in cli(store, env, "branch", "discard", "c", check=False)
    cli(store, env, "branch", "discard", "p", "--yes", "--force")
    rows = json.loads(cli(store, env, "branch", "list", "--json"))
    assert [(r["name"], r["parent"]) for r in rows] == [("c", None)]


def test_discarded_branch_restores(proj: tuple[Path, Path, dict[str, str]]) -> None:
    _base, store, env = proj
    from agentfs.branches.store import Store
    from agentfs.mount.view import open_branch_view

    cli(store, env, "branch", "create", "keep")
    s = Store(store)
    ov = open_branch_view(s, "keep")
    fh, _ = ov.create("work.txt", 1, 0o644, 0, 0)
    ov.write(fh, 0, b"precious")
    ov.release(fh)
    ov.close()
    cli(store, env, "branch", "discard", "keep", "--yes")
    gone = json.loads(cli(store, env, "branch", "list", "--discarded", "--json"))
    assert [g["name"] for g in gone] == ["keep"]
    cli(store, env, "branch", "restore", str(gone[0]["id"]), "--as", "back")
    ov = open_branch_view(s, "back")
    try:
        fh = ov.open("work.txt", 0)
        assert ov.read(fh, 0, 100) == b"precious"
        ov.release(fh)
    finally:
        ov.close()
    assert cli(store, env, "branch", "diff", "back", "--name-status") == "A\twork.txt\n"
    assert json.loads(cli(store, env, "branch", "list", "--discarded", "--json")) == []
    assert "no discarded branch" in cli(store, env, "branch", "restore", "nope", check=False)
