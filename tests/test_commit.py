"""branch diff and commit without FUSE: diff is exactly the set of changes, commit makes
the base show what the branch showed, siblings keep their view, and a commit killed
at any point is finished or rolled back by the next command."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from corefacade import CoreFacade
from fsfacade import OsFacade
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mountutil import AGENTFS, cli_env

from agentfs.branches.store import Store
from agentfs.mount.view import open_branch_layers, open_branch_view
from agentfs.overlay.diff import DELETED, RENAMED, TYPE_CHANGED, diff_views
from agentfs.overlay.resolve import Resolver
from agentfs.workflow.commit import CommitConflict, commit_branch


def tree(root: str) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, content or link target) for a real directory."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            if stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    what: object = f.read()
            elif stat.S_ISLNK(s.st_mode):
                what = os.readlink(p)
            else:
                what = None
            out[os.path.relpath(p, root)] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode),
                                             what)
    return out


def populate(base: Path) -> None:
    (base / "src" / "pkg").mkdir(parents=True)
    (base / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (base / "src" / "main.py").write_text("print('hi')\n")
    (base / "docs").mkdir()
    (base / "docs" / "a.md").write_text("# a\n")
    (base / "README").write_text("readme\n")
    os.symlink("README", base / "link")


NAMES = ["src", "docs", "README", "link", "new", "src/pkg", "src/main.py", "docs/a.md",
         "src/pkg/mod.py", "docs/b", "src/c"]
ops = st.lists(st.tuples(st.sampled_from(["write", "unlink", "mkdir", "rmdir", "rename",
                                          "chmod", "symlink"]),
                         st.sampled_from(NAMES), st.sampled_from(NAMES),
                         st.binary(max_size=30)), max_size=12)


def apply(fs: object, op: tuple[str, str, str, bytes]) -> None:
    kind, a, b, data = op
    call: dict[str, Callable[[], object]] = {
        "write": lambda: fs.write_file(a, data),  # type: ignore[attr-defined]
        "unlink": lambda: fs.unlink(a),  # type: ignore[attr-defined]
        "mkdir": lambda: fs.mkdir(a, 0o755),  # type: ignore[attr-defined]
        "rmdir": lambda: fs.rmdir(a),  # type: ignore[attr-defined]
        "rename": lambda: fs.rename(a, b),  # type: ignore[attr-defined]
        "chmod": lambda: fs.chmod(a, 0o700),  # type: ignore[attr-defined]
        "symlink": lambda: fs.symlink(b, a),  # type: ignore[attr-defined]
    }
    call[kind]()


def edit_branch(store: Store, name: str, model_root: str,
                edits: list[tuple[str, str, str, bytes]]) -> None:
    """Apply *edits* to the branch (engine) and to a plain copy; skip what fails on the copy."""
    model = OsFacade(model_root)
    ov = open_branch_view(store, name)
    fs = CoreFacade(ov)
    try:
        for op in edits:
            try:
                apply(model, op)
            except (OSError, ValueError):
                continue
            apply(fs, op)
    finally:
        ov.close()


def expected_changes(old: dict[str, tuple[object, ...]],
                     new: dict[str, tuple[object, ...]]) -> set[tuple[str, str]]:
    out = set()
    for p in old.keys() | new.keys():
        if p not in new:
            out.add((p, "deleted"))
        elif p not in old:
            out.add((p, "added"))
        elif old[p] != new[p]:
            out.add((p, "modified"))
    return out


def reported_changes(store: Store, name: str) -> set[tuple[str, str]]:
    layers = open_branch_layers(store, name)
    try:
        changes = diff_views(Resolver(layers), Resolver(layers[store.branch(name).own_layers:]))
    finally:
        for layer in layers:
            layer.close()
    out = set()
    for c in changes:
        if c.status == RENAMED:
            assert c.old_path is not None
            out.add((c.old_path, "deleted"))
            out.add((c.path, "added"))
        elif c.status == DELETED:
            out.add((c.path, "deleted"))
        elif c.status == TYPE_CHANGED:
            out.add((c.path, "modified"))
        else:
            out.add((c.path, "added" if c.old is None else "modified"))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(edits_a=ops, edits_b=ops)
@example(edits_a=[("unlink", "README", "src", b""), ("rename", "src", "README", b"")],
         edits_b=[])  # a directory renamed onto a deleted base file's name
def test_diff_and_commit_match_a_plain_model(tmp_path_factory: pytest.TempPathFactory,
                                             edits_a: list[tuple[str, str, str, bytes]],
                                             edits_b: list[tuple[str, str, str, bytes]]) -> None:
    root = tmp_path_factory.mktemp("c")
    base = root / "base"
    base.mkdir()
    populate(base)
    original = tree(str(base))
    store = Store.create(base, root / "store")
    try:
        store.create_branch("a")
        store.create_branch("b")
        model_a, model_b = root / "model-a", root / "model-b"
        shutil.copytree(base, model_a, symlinks=True)
        shutil.copytree(base, model_b, symlinks=True)
        edit_branch(store, "a", str(model_a), edits_a)
        edit_branch(store, "b", str(model_b), edits_b)
        want_a = tree(str(model_a))
        assert reported_changes(store, "a") == expected_changes(original, want_a)
        commit_branch(store, "a")
        assert tree(str(base)) == want_a            # the base now shows what a showed
        assert reported_changes(store, "a") == set()  # a's fork point moved
        view_b = open_branch_view(store, "b")         # the sibling is not changed
        try:
            assert tree_of_view(view_b) == tree(str(model_b))
        finally:
            view_b.close()
    finally:
        store.close()


def tree_of_view(ov: object) -> dict[str, tuple[object, ...]]:
    fs = CoreFacade(ov)  # type: ignore[arg-type]
    out: dict[str, tuple[object, ...]] = {}

    def walk(d: str) -> None:
        for name in fs.listdir(d):
            p = f"{d}/{name}" if d else name
            s = fs.lstat(p)
            kind = stat.S_IFMT(s.st_mode)
            what: object = None
            if kind == stat.S_IFREG:
                what = fs.read_file(p)
            elif kind == stat.S_IFLNK:
                what = fs.readlink(p)
            out[p] = (kind, stat.S_IMODE(s.st_mode), what)
            if kind == stat.S_IFDIR:
                walk(p)
    walk("")
    return out


def test_conflict_when_base_changed_since_copy_up(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    populate(base)
    store = Store.create(base, tmp_path / "store")
    store.create_branch("a")
    ov = open_branch_view(store, "a")
    CoreFacade(ov).write_file("README", b"from the branch\n")
    CoreFacade(ov).unlink("docs/a.md")
    ov.close()
    (base / "README").write_text("edited in the project meanwhile\n")
    with pytest.raises(CommitConflict) as exc:
        commit_branch(store, "a")
    assert exc.value.conflicts == ["README"] and exc.value.exit_code == 3
    assert (base / "README").read_text() == "edited in the project meanwhile\n"
    assert (base / "docs" / "a.md").exists()  # nothing applied
    commit_branch(store, "a", force=True)
    assert (base / "README").read_text() == "from the branch\n"
    assert not (base / "docs" / "a.md").exists()


def test_commit_killed_at_every_step_ends_old_or_new(tmp_path: Path) -> None:
    template = tmp_path / "template"
    template.mkdir()
    populate(template / "base" if False else template)
    env = cli_env(tmp_path / "home")
    outcomes = set()
    for kill_after in range(0, 40):
        work = tmp_path / f"run{kill_after}"
        base = work / "base"
        shutil.copytree(template, base, symlinks=True)
        old = tree(str(base))
        store = Store.create(base, work / "store")
        store.create_branch("a")
        model = work / "model"
        shutil.copytree(base, model, symlinks=True)
        edit_branch(store, "a", str(model), [
            ("write", "README", "", b"new readme"), ("unlink", "docs/a.md", "", b""),
            ("rename", "src/pkg", "src/c", b""), ("mkdir", "new", "", b""),
            ("write", "src/main.py", "", b"print(2)"), ("chmod", "docs", "", b""),
            ("symlink", "docs/b", "../README", b"")])
        new = tree(str(model))
        store.close()
        run = subprocess.run([AGENTFS, "--store", str(work / "store"), "branch", "commit", "a"],
                             env=dict(env, AGENTFS_TEST_KILL_AFTER=str(kill_after)),
                             capture_output=True, text=True, timeout=60)
        killed = run.returncode == -signal.SIGKILL
        # each path is fully old or fully new even before recovery
        for path, value in tree(str(base)).items():
            if path.split("/")[-1].startswith(".agentfs-commit-"):
                continue
            assert value in (old.get(path), new.get(path)), (kill_after, path)
        subprocess.run([AGENTFS, "--store", str(work / "store"), "status"], env=env,
                       check=True, capture_output=True, timeout=60)
        final = tree(str(base))
        assert final in (old, new), kill_after
        outcomes.add("new" if final == new else "old")
        if not killed:
            assert run.returncode == 0, run.stderr
            assert final == new
            break
    assert outcomes == {"old", "new"}


def _write(store: Store, branch: str, edits: dict[str, bytes | None]) -> None:
    ov = open_branch_view(store, branch)
    fs = CoreFacade(ov)
    try:
        for path, data in edits.items():
            if data is None:
                fs.unlink(path)
            else:
                fs.write_file(path, data)
    finally:
        ov.close()


def _view(store: Store, branch: str) -> dict[str, tuple[object, ...]]:
    ov = open_branch_view(store, branch)
    try:
        return tree_of_view(ov)
    finally:
        ov.close()


def test_commit_into_parent_branch(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    populate(base)
    before_base = tree(str(base))
    store = Store.create(base, tmp_path / "store")
    store.create_branch("a")
    _write(store, "a", {"README": b"a edits readme\n"})
    store.create_branch("sib", "a")             # an earlier child must not change
    store.create_branch("b", "a")
    sib_before = _view(store, "sib")
    _write(store, "b", {"src/main.py": b"b's main\n", "docs/a.md": None, "b-new": b"b\n"})
    _write(store, "a", {"a-after-fork": b"a\n"})  # the parent moved on meanwhile
    commit_branch(store, "b")
    a_view = _view(store, "a")
    assert a_view["src/main.py"][2] == b"b's main\n" and "docs/a.md" not in a_view
    assert a_view["b-new"][2] == b"b\n" and a_view["a-after-fork"][2] == b"a\n"
    assert a_view["README"][2] == b"a edits readme\n"
    assert reported_changes(store, "b") == set()     # b's fork point moved to the commit
    assert _view(store, "sib") == sib_before
    assert tree(str(base)) == before_base             # the base is only written by commits to it
    # a conflict: both change the same file after the fork
    _write(store, "b", {"README": b"b wants this\n"})
    _write(store, "a", {"README": b"a wants that\n"})
    with pytest.raises(CommitConflict) as exc:
        commit_branch(store, "b")
    assert exc.value.conflicts == ["README"]
    assert _view(store, "a")["README"][2] == b"a wants that\n"
    commit_branch(store, "b", force=True)
    assert _view(store, "a")["README"][2] == b"b wants this\n"


def test_commit_into_parent_killed_at_every_step(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    for kill_after in range(0, 30):
        work = tmp_path / f"run{kill_after}"
        base = work / "base"
        base.mkdir(parents=True)
        populate(base)
        store = Store.create(base, work / "store")
        store.create_branch("a")
        store.create_branch("b", "a")
        old = _view(store, "a")
        _write(store, "b", {"src/main.py": b"new main\n", "docs/a.md": None, "x": b"x\n",
                            "README": b"new readme\n"})
        want = _view(store, "b")
        store.close()
        run = subprocess.run([AGENTFS, "--store", str(work / "store"), "branch", "commit", "b"],
                             env=dict(env, AGENTFS_TEST_KILL_AFTER=str(kill_after)),
                             capture_output=True, text=True, timeout=60)
        store = Store(work / "store")
        subprocess.run([AGENTFS, "--store", str(work / "store"), "status"], env=env,
                       check=True, capture_output=True, timeout=60)
        got = _view(store, "a")
        store.close()
        assert got == want, (kill_after, run.returncode)
        if run.returncode == 0:
            break
    else:
        pytest.fail("the commit never finished")
    assert old != want


def test_both_added_is_a_conflict(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    populate(base)
    store = Store.create(base, tmp_path / "store")
    store.create_branch("a")
    _write(store, "a", {"NEWS": b"from the branch\n", "untouched-new": b"fine\n"})
    (base / "NEWS").write_text("added in the project meanwhile\n")
    with pytest.raises(CommitConflict) as exc:
        commit_branch(store, "a")
    assert exc.value.conflicts == ["NEWS"]
    assert (base / "NEWS").read_text() == "added in the project meanwhile\n"
