"""Committing a branch into its parent branch.

The parent's changes since the fork live in its layers above the fork layer; a path
the child changed whose source in the parent's view is no longer the fork's is a
conflict.  Changes are applied through the overlay engine on the parent's view, one
atomic step per path (a new version is written under a temporary name and renamed
over the old one), so a killed commit leaves every path old or new.  The journal row
(state "applying") makes the next command re-run the same plan, which is idempotent,
and then move both branches on: the parent's top (now holding the child's work) is
frozen and the child starts again on it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import select

from agentfs.branches.schema import BranchRow, CommitRow, LayerRow
from agentfs.branches.store import BranchInfo, Store
from agentfs.errors import FsError, UserError
from agentfs.overlay.diff import ADDED, DELETED, RENAMED, Change, Entry, ViewReader, diff_views
from agentfs.overlay.engine import Overlay
from agentfs.overlay.hostio import split
from agentfs.overlay.layers import Layer
from agentfs.overlay.resolve import Loc, Resolver

TMP_PREFIX = ".agentfs-commit-tmp-"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def open_layers(store: Store, ids: list[int]) -> dict[int, Layer]:
    return {lid: Layer.open_store_layer(lid, str(store.layer_dir(lid))) for lid in ids}


def _same_source(a: Loc | None, b: Loc | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.is_dir and b.is_dir:
        return True  # directories: their entries are compared one by one
    return a.host is b.host and a.rel == b.rel


def plan_into_parent(store: Store, child: BranchInfo, parent: BranchInfo,
                     paths: list[str] | None) -> tuple[list[Change], list[str], ViewReader,
                                                        Overlay, list[Layer]]:
    """Changes of *child*, conflicts with *parent*, a reader of the child's view and a
    writable view of the parent (caller closes the layers)."""
    ids = list(dict.fromkeys([*child.layer_stack, *parent.layer_stack]))
    layer_map = open_layers(store, ids)
    base = Layer.open_base(str(store.base))
    child_layers = [layer_map[i] for i in child.layer_stack] + [base]
    parent_layers = [layer_map[i] for i in parent.layer_stack] + [base]
    fork_view = Resolver(child_layers[child.own_layers:])
    changes = diff_views(Resolver(child_layers), fork_view, paths)
    parent_view = Resolver(parent_layers)
    conflicts = sorted({p for c in changes for p in (c.path, c.old_path) if p is not None
                        and not _same_source(parent_view.locate(p), fork_view.locate(p))})
    overlay = Overlay(parent_layers)
    return changes, conflicts, ViewReader(Resolver(child_layers)), overlay, [*layer_map.values(),
                                                                             base]


def apply_into_parent(ov: Overlay, changes: list[Change], reader: ViewReader,
                      progress: Callable[[int, int], None] | None = None,
                      step: Callable[[], None] = lambda: None) -> None:
    """Make the parent's view show what the child shows, one atomic step per path."""
    total = len(changes)
    deletions = sorted((c for c in changes if c.status == DELETED),
                       key=lambda c: c.path.count("/"), reverse=True)
    for c in deletions:
        _remove(ov, c.path)
        step()
    for c in changes:
        if c.status == RENAMED and c.old_path is not None and ov.exists(c.old_path):
            if ov.exists(c.path) and _kind(ov, c.path) == "dir":
                _remove(ov, c.path)
            ov.rename(c.old_path, c.path)
            step()
    for done, c in enumerate(sorted((c for c in changes if c.status != DELETED),
                                    key=lambda c: (c.path.count("/"), c.path)), 1):
        assert c.new is not None
        _put(ov, c.path, c.new, reader, rewrite=c.content_changed or c.status == ADDED)
        step()
        if progress:
            progress(done, total)


def _kind(ov: Overlay, path: str) -> str:
    mode = ov.getattr(path).mode
    return "dir" if stat.S_ISDIR(mode) else "other"


def _remove(ov: Overlay, path: str) -> None:
    if not ov.exists(path):
        return
    if _kind(ov, path) == "dir":
        for name in ov.listdir(path):
            _remove(ov, f"{path}/{name}")
        ov.rmdir(path)
    else:
        ov.unlink(path)


def _put(ov: Overlay, path: str, entry: Entry, reader: ViewReader, rewrite: bool) -> None:
    st = entry.loc.host.lstat(entry.loc.rel)
    if entry.kind == "dir":
        if ov.exists(path) and _kind(ov, path) != "dir":
            ov.unlink(path)
        if not ov.exists(path):
            ov.mkdir(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    elif rewrite or not ov.exists(path):
        parent, name = split(path)
        tmp = f"{parent}/{TMP_PREFIX}{name}" if parent else f"{TMP_PREFIX}{name}"
        with contextlib.suppress(FsError):
            ov.unlink(tmp)
        if entry.kind == "file":
            fh, _ = ov.create(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600,
                              st.st_uid, st.st_gid)
            try:
                data = reader.read(entry)
                for off in range(0, len(data), 1 << 20):
                    ov.write(fh, off, data[off:off + (1 << 20)])
                ov.fsync(fh, False)
            finally:
                ov.release(fh)
        elif entry.kind == "symlink":
            ov.symlink(tmp, reader.readlink(entry), st.st_uid, st.st_gid)
        else:
            ov.mknod(tmp, st.st_mode, st.st_rdev, st.st_uid, st.st_gid)
        if ov.exists(path) and _kind(ov, path) == "dir":
            _remove(ov, path)
        ov.rename(tmp, path)
    if entry.kind != "symlink":
        ov.setattr(path, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    try:
        ov.setattr(path, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)
    except FsError as exc:
        if exc.errno != errno.EPERM:
            raise


def commit_into_parent(store: Store, name: str, *, force: bool, dry_run: bool,
                       paths: list[str] | None, progress: Callable[[int, int], None] | None,
                       step: Callable[[], None], resume: bool = False) -> tuple[
                           list[Change], list[str], int | None]:
    child = store.branch(name)
    assert child.parent is not None
    parent = store.branch(child.parent)
    if any(m.branch == parent.name for m in store.mounts()):
        raise UserError(f"the parent branch {parent.name!r} is mounted; unmount it before "
                        "committing into it")
    changes, conflicts, reader, ov, layers = plan_into_parent(store, child, parent, paths)
    try:
        if conflicts and not (force or resume):
            return changes, conflicts, None
        if dry_run or not changes:
            return changes, conflicts, None
        commit_id = None
        if not resume:
            with store.session() as s:
                row = CommitRow(branch_id=child.id, target=parent.name, state="applying",
                                created=_now(), summary=json.dumps({"whole": not paths,
                                                                    "paths": paths or []}))
                s.add(row)
                s.flush()
                commit_id = row.id
            step()
        apply_into_parent(ov, changes, reader, progress, step)
    finally:
        ov.close()
        for layer in layers:
            layer.close()
    rebase_onto_parent(store, name, commit_id, whole=not paths)
    return changes, conflicts, commit_id


def rebase_onto_parent(store: Store, name: str, commit_id: int | None, whole: bool) -> None:
    """Freeze the parent's top (it holds the child's work now); both move on from it."""
    with store.session() as s:
        child = s.scalar(select(BranchRow).where(BranchRow.name == name))
        assert child is not None and child.parent_branch_id is not None
        parent = s.get(BranchRow, child.parent_branch_id)
        assert parent is not None
        if whole:
            frozen = s.get(LayerRow, parent.top_layer_id)
            assert frozen is not None
            frozen.frozen = True
            new_parent_top = LayerRow(parent_id=frozen.id, created=_now())
            new_child_top = LayerRow(parent_id=frozen.id, created=_now())
            s.add_all([new_parent_top, new_child_top])
            s.flush()
            parent.top_layer_id = new_parent_top.id
            child.top_layer_id = new_child_top.id
            child.fork_layer_id = frozen.id
            for lid in (new_parent_top.id, new_child_top.id):
                store.layer_dir(lid).mkdir(parents=True, exist_ok=True)
        if commit_id is not None:
            row = s.get(CommitRow, commit_id)
            if row is not None:
                row.state, row.finished = "done", _now()
        else:
            for row in s.scalars(select(CommitRow).where(CommitRow.branch_id == child.id,
                                                         CommitRow.state == "applying")):
                row.state, row.finished = "done", _now()


def resume_into_parent(store: Store, commit_id: int) -> None:
    """Recovery: re-run the (idempotent) plan of a killed commit into a branch."""
    with store.session() as s:
        row = s.get(CommitRow, commit_id)
        assert row is not None
        branch = s.get(BranchRow, row.branch_id)
        summary = json.loads(row.summary or "{}")
        name = branch.name if branch is not None else None
    if name is None:
        return
    commit_into_parent(store, name, force=True, dry_run=False,
                       paths=summary.get("paths") or None, progress=None, step=lambda: None,
                       resume=True)
