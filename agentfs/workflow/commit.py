"""Committing a branch into the base directory: conflict-checked and journaled.

The plan (every remove, mkdir, place and metadata change) is written to SQLite with
synchronous=FULL before the base is touched.  New content is staged next to its
target (temp files, made durable together by one syncfs per filesystem) during
*preparing*; then the phases *removing* (old versions move out of the base into a
snapshot layer), *placing* (rename(2) of the staged files into place) and
*finishing* (directory metadata, whiteouts in the snapshot) run; the last step marks
the commit done and rebases the branches in one transaction.  Every step of a phase
is idempotent, so after a SIGKILL the next command that opens the store re-runs the
phase it finds and completes the commit (or, if it died while preparing, deletes the
staged files): each path ends either fully old or fully new.

Nothing is lost: what the commit replaces or deletes is moved into a snapshot
layer; branches that sat on the base are re-parented onto it, so they keep seeing
the base as it was when they forked.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, text
from sqlalchemy.orm import Session

from agentfs.branches.locks import branch_held
from agentfs.branches.schema import BranchRow, CommitOpRow, CommitRow, LayerRow
from agentfs.branches.store import BranchInfo, Store
from agentfs.errors import UserError
from agentfs.mount.view import open_branch_layers
from agentfs.overlay import copyup
from agentfs.overlay.diff import (
    ADDED,
    DELETED,
    MODIFIED,
    RENAMED,
    TYPE_CHANGED,
    Change,
    Entry,
    ViewReader,
    diff_views,
)
from agentfs.overlay.hostio import HostDir, join, split
from agentfs.overlay.layers import WHITEOUT_MODE, Layer, stamp_path
from agentfs.overlay.resolve import Resolver

CONFLICT_EXIT = 3
_PHASES = ("removing", "placing", "finishing")


class CommitConflict(UserError):
    def __init__(self, conflicts: list[str]) -> None:
        listing = "\n".join(f"  {c}" for c in conflicts)
        super().__init__(f"{len(conflicts)} conflict(s): these paths changed in the target "
                         f"since the branch took them (use --force to take the branch's "
                         f"version):\n{listing}", CONFLICT_EXIT)
        self.conflicts = conflicts


@dataclass
class CommitReport:
    branch: str
    target: str
    dry_run: bool
    commit_id: int | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _crash_point() -> Callable[[], None]:
    """Tests set AGENTFS_TEST_KILL_AFTER=N to SIGKILL this process at the N-th step."""
    budget = int(os.environ.get("AGENTFS_TEST_KILL_AFTER", "-1"))
    counter = [0]

    def step() -> None:
        if budget < 0:
            return
        counter[0] += 1
        if counter[0] > budget:
            os.kill(os.getpid(), signal.SIGKILL)
    return step


# ----------------------------------------------------------------- planning
def _conflicts(changes: list[Change], base: HostDir, branch: Resolver) -> list[str]:
    """Base paths that are no longer the object the branch took over: the stamp the
    branch recorded (copy-up, delete or rename-over) differs from the base now.  Where
    the branch holds no stamp for a path (it never saw a base object there, or the
    object cannot carry one, like a symlink) there is no evidence and no conflict."""
    out = []
    for c in changes:
        checks: list[tuple[str, list[Any] | None]] = []
        if c.new is not None and c.status != DELETED:
            checks.append((c.path, _object_stamp(branch, c.new, c.path)))
        if c.status == RENAMED and c.old_path is not None and c.new is not None:
            checks.append((c.old_path, _object_stamp(branch, c.new, c.old_path)))
        if c.status == DELETED:
            checks.append((c.path, _whiteout_stamp(branch, c.path)))
        for path, stamp in checks:
            st = base.try_lstat(path)
            if st is None or stat.S_ISDIR(st.st_mode) or stamp is None:
                continue
            if stamp[:2] != [st.st_size, st.st_mtime_ns]:
                out.append(path)
    return sorted(set(out))


def _object_stamp(branch: Resolver, entry: Entry, path: str) -> list[Any] | None:
    layer = branch.layers[entry.loc.layer]
    st = entry.loc.host.lstat(entry.loc.rel)
    if layer.is_base:  # the branch shows the base object itself (e.g. a renamed dir)
        return ([st.st_size, st.st_mtime_ns, stamp_path(path)] if entry.loc.rel == path
                else None)
    meta = layer.meta(entry.loc.host, entry.loc.rel, st)
    for key in ("rst", "bst"):
        stamp = meta.get(key)
        if stamp and len(stamp) == 3 and stamp[2] == stamp_path(path):
            return list(stamp)
    return None


def _whiteout_stamp(branch: Resolver, path: str) -> list[Any] | None:
    found = _whiteout_loc(branch, path)
    if found is None:
        return None
    host, rel = found
    stamp = _layer_of(branch.layers, host).whiteout_stamp(rel, host.lstat(rel))
    return (list(stamp) if stamp and len(stamp) == 3 and stamp[2] == stamp_path(path)
            else None)


def _layer_of(layers: list[Layer], host: HostDir) -> Layer:
    return next(layer for layer in layers if host in (layer.tree, layer.index))


def _whiteout_loc(branch: Resolver, path: str) -> tuple[HostDir, str] | None:
    """The whiteout (in the branch's layers) that hides *path*, if any."""
    parts = path.split("/")
    for i in range(len(parts), 0, -1):
        prefix = "/".join(parts[:i])
        for layer in branch.layers:
            if layer.is_base:
                break
            st = layer.tree.try_lstat(prefix)
            if st is not None and layer.is_whiteout(prefix, st):
                return layer.tree, prefix
    return None


def _plan(changes: list[Change]) -> list[tuple[str, str, dict[str, Any]]]:
    removes, mkdirs, places, metas = [], [], [], []
    for c in changes:
        new = c.new
        if c.status in (DELETED, RENAMED, TYPE_CHANGED) or (
                c.status == MODIFIED and new is not None and new.kind != "dir"):
            removes.append(c.old_path if c.status == RENAMED and c.old_path else c.path)
        if new is None or c.status == DELETED:
            continue
        if new.kind == "dir":
            if c.status in (ADDED, TYPE_CHANGED):
                mkdirs.append(c.path)
            metas.append(c.path)
        else:
            places.append(c.path)
    ops: list[tuple[str, str, dict[str, Any]]] = []
    ops += [("remove", p, {}) for p in sorted(set(removes), key=_depth)]
    ops += [("mkdir", p, {}) for p in sorted(mkdirs, key=_depth)]
    ops += [("place", p, {}) for p in sorted(places)]
    ops += [("meta", p, {}) for p in sorted(metas, key=_depth, reverse=True)]
    return ops


def _depth(path: str) -> tuple[int, str]:
    return path.count("/"), path


# ----------------------------------------------------------------- the commit
def commit_branch(store: Store, name: str, *, into: str | None = None, dry_run: bool = False,
                  force: bool = False, paths: list[str] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> CommitReport:
    recover(store)
    info = store.branch(name)
    target = info.parent or "base"
    if into is not None and into != target:
        raise UserError(f"branch {name!r} can only be committed into its parent ({target})")
    if any(m.branch == name for m in store.mounts()):
        raise UserError(f"branch {name!r} is mounted; unmount it before committing")
    with contextlib.ExitStack() as held:  # no daemon may serve what the commit changes
        for branch in filter(None, [name, info.parent]):
            held.enter_context(branch_held(store.root, branch, f"a commit of {name!r}"))
        return _commit(store, name, info, target, dry_run=dry_run, force=force, paths=paths,
                       progress=progress)


def _commit(store: Store, name: str, info: BranchInfo, target: str, *, dry_run: bool,
            force: bool, paths: list[str] | None,
            progress: Callable[[int, int], None] | None) -> CommitReport:
    if info.parent is not None:
        from agentfs.workflow.commit_branch import commit_into_parent

        changes, conflicts, commit_id = commit_into_parent(
            store, name, force=force, dry_run=dry_run, paths=paths, progress=progress,
            step=_crash_point())
        if conflicts and not force:
            raise CommitConflict(conflicts)
        return CommitReport(branch=name, target=target, dry_run=dry_run, commit_id=commit_id,
                            changes=[c.as_dict() for c in changes], conflicts=conflicts)
    layers = open_branch_layers(store, name)
    try:
        branch_view = Resolver(layers)
        fork_view = Resolver(layers[info.own_layers:])
        changes = diff_views(branch_view, fork_view, paths)
        report = CommitReport(branch=name, target=target, dry_run=dry_run,
                              changes=[c.as_dict() for c in changes])
        base = layers[-1].tree
        report.conflicts = _conflicts(changes, base, branch_view)
        if report.conflicts and not force:
            raise CommitConflict(report.conflicts)
        if dry_run or not changes:
            return report
        reader = ViewReader(branch_view)
        report.commit_id = _run(store, info.id, layers, changes, reader, progress,
                                whole=not paths)
        return report
    finally:
        for layer in layers:
            layer.close()


def _run(store: Store, branch_id: int, layers: list[Layer], changes: list[Change],
         reader: ViewReader, progress: Callable[[int, int], None] | None, whole: bool) -> int:
    ops = _plan(changes)
    entries = {c.path: c.new for c in changes if c.new is not None}
    base = layers[-1].tree
    with store.session() as s:
        s.execute(text("PRAGMA synchronous=FULL"))
        snapshot = _new_snapshot_layer(store, s)
        row = CommitRow(branch_id=branch_id, target="base", state="preparing",
                        snapshot_layer_id=snapshot, created=_now(),
                        summary=json.dumps({"whole": whole}))
        s.add(row)
        s.flush()
        commit_id = row.id
        journal: list[dict[str, Any]] = []
        for seq, (action, path, _arg) in enumerate(ops):
            tmp = _staging_name(base, path, commit_id, seq) if action == "place" else ""
            arg = _entry_arg(entries.get(path)) if action in ("place", "mkdir", "meta") else {}
            journal.append({"commit_id": commit_id, "seq": seq, "action": action, "path": path,
                            "tmp": tmp, "arg": json.dumps(arg)})
        if journal:
            s.execute(insert(CommitOpRow), journal)  # one executemany, not an ORM flush
    crash = _crash_point()
    total = len(ops)
    durable = _Durable()
    try:
        for i, op in enumerate(journal):
            if op["action"] == "place":
                entry = entries[op["path"]]
                assert entry is not None
                _stage(base, op["tmp"], entry, reader, durable)
                crash()
            if progress:
                progress(i + 1, total * 2)
        durable.finish()  # every staged file is on disk before anything is renamed
    finally:
        durable.close()
    _set_state(store, commit_id, "removing")
    crash()
    _apply_phases(store, commit_id, crash, progress, total)
    return commit_id


_libc = ctypes.CDLL(None, use_errno=True)
_SYNCFS: Callable[[int], int] | None = getattr(_libc, "syncfs", None)


class _Durable:
    """Makes staged files durable before the commit renames any of them: one syncfs
    per filesystem they are on (one journal commit for all of them, instead of an
    fsync, and so a journal commit, per file; 100 small files: ~25 ms -> ~3 ms), or
    an fsync per file where there is no syncfs."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}  # st_dev -> an fd on that filesystem

    def add(self, fd: int) -> None:
        if _SYNCFS is None:
            os.fsync(fd)
            return
        dev = os.fstat(fd).st_dev
        if dev not in self._fds:
            self._fds[dev] = os.dup(fd)

    def finish(self) -> None:
        for fd in self._fds.values():
            assert _SYNCFS is not None
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs of the staged commit failed: {os.strerror(err)}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _entry_arg(entry: Entry | None) -> dict[str, Any]:
    if entry is None:
        return {}
    st = entry.loc.host.lstat(entry.loc.rel)
    return {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "atime": st.st_atime_ns, "mtime": st.st_mtime_ns}


def _staging_name(base: HostDir, path: str, commit_id: int, seq: int) -> str:
    """A temp name in the target's directory, or its nearest existing ancestor."""
    parent = split(path)[0]
    while parent and not ((st := base.try_lstat(parent)) and stat.S_ISDIR(st.st_mode)):
        parent = split(parent)[0]
    return join(parent, f".agentfs-commit-{commit_id}-{seq}")


def _stage(base: HostDir, tmp: str, entry: Entry, reader: ViewReader,
           durable: _Durable) -> None:
    """Write the branch's version of one object to *tmp* (*durable* makes it durable
    before any rename)."""
    with contextlib.suppress(FileNotFoundError):
        base.unlink(tmp)
    src, st = entry.loc.host, entry.loc.host.lstat(entry.loc.rel)
    if entry.kind == "file":
        fd = base.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            sfd = src.open_quiet(entry.loc.rel, os.O_RDONLY)
            try:
                copyup.copy_data(sfd, fd, st.st_size)
            finally:
                os.close(sfd)
            copyup.copy_metadata(src, entry.loc.rel, st, base, tmp)
            durable.add(fd)
        finally:
            os.close(fd)
    else:
        copyup.clone_object(src, entry.loc.rel, st, base, tmp)
        if _SYNCFS is not None:  # a symlink or a special file: its directory's filesystem
            parent = split(tmp)[0]
            dfd = base.open_quiet(parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                durable.add(dfd)
            finally:
                os.close(dfd)


def _apply_phases(store: Store, commit_id: int, crash: Callable[[], None],
                  progress: Callable[[int, int], None] | None, total: int) -> None:
    with store.session() as s:
        row = s.get(CommitRow, commit_id)
        assert row is not None
        state, snapshot_id = row.state, row.snapshot_layer_id
        ops = [(o.action, o.path, o.tmp, json.loads(o.arg or "{}"))
               for o in s.scalars(select(CommitOpRow).where(CommitOpRow.commit_id == commit_id)
                                  .order_by(CommitOpRow.seq))]
    base = Layer.open_base(str(store.base))
    snap = Layer.open_store_layer(snapshot_id or 0, str(store.layer_dir(snapshot_id or 0)))
    try:
        done = 0
        for phase in _PHASES[_PHASES.index(state):]:
            for action, path, tmp, arg in ops:
                if _phase_of(action) != phase:
                    continue
                _apply_op(base.tree, snap, action, path, tmp, arg)
                crash()
                done += 1
                if progress:
                    progress(total + done, total * 2)
            nxt = _PHASES.index(phase) + 1
            if nxt == len(_PHASES):
                _finish(store, commit_id)
            elif _PHASES[nxt] != "finishing":
                _set_state(store, commit_id, _PHASES[nxt])
            # else: no durable "finishing" (a journal fsync less): placing is a no-op
            # once done (mkdir and whiteout only what is missing, rename only a staged
            # file still there), so recovery from "placing" simply runs both again
            crash()
    finally:
        base.close()
        snap.close()


def _finish(store: Store, commit_id: int) -> None:
    """One transaction: the commit is done, its journal goes, and the branches move on
    (so no crash can leave a done commit whose branches were not rebased)."""
    with store.session() as s:
        s.execute(text("PRAGMA synchronous=FULL"))
        row = s.get(CommitRow, commit_id)
        assert row is not None and row.snapshot_layer_id is not None
        row.state, row.finished = "done", _now()
        s.execute(delete(CommitOpRow).where(CommitOpRow.commit_id == commit_id))
        branch = s.get(BranchRow, row.branch_id)
        if branch is not None:
            whole = bool(json.loads(row.summary or "{}").get("whole", True))
            _rebase_after_commit(store, s, branch, row.snapshot_layer_id, whole)


def _phase_of(action: str) -> str:
    return {"remove": "removing", "mkdir": "placing", "place": "placing",
            "meta": "finishing", "whiteout": "finishing"}[action]


def _apply_op(base: HostDir, snap: Layer, action: str, path: str, tmp: str,
              arg: dict[str, Any]) -> None:
    if action == "remove":
        if base.try_lstat(path) is not None:
            _move_to_snapshot(base, path, snap)
    elif action == "mkdir":
        if base.try_lstat(path) is None:
            base.mkdir(path, arg.get("mode", 0o755))
        _whiteout_in_snapshot(base, snap, path)
    elif action == "place":
        if base.try_lstat(tmp) is not None:
            if base.try_lstat(path) is None:
                _whiteout_in_snapshot(base, snap, path)
            base.rename_to(tmp, base, path)
    elif action == "meta" and (st := base.try_lstat(path)) is not None:
        if snap.tree.try_lstat(path) is None and not _hidden_in_snapshot(snap, path):
            # siblings must keep the directory's old mode/owner/times: record them first
            _ensure_snapshot_parents(base, snap, path)
            snap.tree.mkdir(path, 0o700)
            copyup.copy_metadata(base, path, st, snap.tree, path)
        with contextlib.suppress(PermissionError):
            base.chown(path, arg["uid"], arg["gid"])
        base.chmod(path, arg["mode"])
        base.utime(path, arg["atime"], arg["mtime"])


def _ensure_snapshot_parents(base: HostDir, snap: Layer, path: str) -> None:
    parent = split(path)[0]
    if not parent or snap.tree.try_lstat(parent) is not None:
        return
    _ensure_snapshot_parents(base, snap, parent)
    snap.tree.mkdir(parent, 0o700)
    st = base.try_lstat(parent)
    if st is not None:
        copyup.copy_metadata(base, parent, st, snap.tree, parent)


def _move_to_snapshot(base: HostDir, path: str, snap: Layer) -> None:
    """Move the base's old object out (rename, or copy + delete across filesystems)."""
    _ensure_snapshot_parents(base, snap, path)
    if snap.tree.try_lstat(path) is not None:
        snap.tree.remove_tree(path)  # a partial copy from an interrupted run
    try:
        base.rename_to(path, snap.tree, path)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    _copy_tree(base, path, snap.tree, path)
    base.remove_tree(path)


def _copy_tree(src: HostDir, rel: str, dst: HostDir, dst_rel: str) -> None:
    st = src.lstat(rel)
    if stat.S_ISDIR(st.st_mode):
        dst.mkdir(dst_rel, 0o700)
        for e in src.listdir(rel):
            _copy_tree(src, join(rel, e.name), dst, join(dst_rel, e.name))
        copyup.copy_metadata(src, rel, st, dst, dst_rel)
    else:
        copyup.clone_object(src, rel, st, dst, dst_rel)


def _whiteout_in_snapshot(base: HostDir, snap: Layer, path: str) -> None:
    """A path the commit adds must stay invisible to branches that sit on the snapshot."""
    if snap.tree.try_lstat(path) is not None:
        return
    if _hidden_in_snapshot(snap, path):
        return
    _ensure_snapshot_parents(base, snap, path)
    fd = snap.tree.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0)
    os.close(fd)
    snap.tree.chmod(path, 0)
    snap.set_meta(snap.tree, path, {"wh": 1})
    assert snap.tree.lstat(path).st_mode == WHITEOUT_MODE


def _hidden_in_snapshot(snap: Layer, path: str) -> bool:
    """Is an ancestor of *path* already hidden (or replaced) in the snapshot?"""
    parts = path.split("/")
    for i in range(1, len(parts)):
        st = snap.tree.try_lstat("/".join(parts[:i]))
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return True
    return False


def _set_state(store: Store, commit_id: int, state: str) -> None:
    with store.session() as s:
        s.execute(text("PRAGMA synchronous=FULL"))
        row = s.get(CommitRow, commit_id)
        assert row is not None
        row.state = state


def _new_snapshot_layer(store: Store, s: Session) -> int:
    layer = LayerRow(parent_id=None, frozen=True, kind="snapshot", created=_now())
    s.add(layer)
    s.flush()
    store.layer_dir(layer.id).mkdir(parents=True, exist_ok=True)
    return layer.id


def _rebase_after_commit(store: Store, s: Session, row: BranchRow, snapshot_id: int,
                         whole: bool) -> None:
    """The branch now starts from the committed base; everyone else keeps their view."""
    # branches resting on the base move onto the snapshot of the old base
    others = s.scalars(select(BranchRow).where(BranchRow.id != row.id)).all()
    used = {lid for b in others for lid in store._branch_info(s, b).layer_stack}
    for lid in used:
        layer = s.get(LayerRow, lid)
        if layer is not None and layer.parent_id is None:
            layer.parent_id = snapshot_id
    if whole:
        old_top = row.top_layer_id
        top = LayerRow(parent_id=None, created=_now())
        s.add(top)
        s.flush()
        row.top_layer_id = top.id
        row.fork_layer_id = None
        store.layer_dir(top.id).mkdir(parents=True, exist_ok=True)
        if old_top not in used:
            s.execute(text("UPDATE layers SET frozen = 1 WHERE id = :i"), {"i": old_top})


def recover(store: Store) -> list[int]:
    """Finish (or roll back) commits a killed process left half done."""
    with store.session() as s:
        pending = [(r.id, r.state) for r in s.scalars(
            select(CommitRow).where(CommitRow.state.not_in(("done", "rolled_back"))))]
    for commit_id, state in pending:
        with store.session() as s:
            target = s.get(CommitRow, commit_id).target  # type: ignore[union-attr]
        if target != "base":
            from agentfs.workflow.commit_branch import resume_into_parent

            resume_into_parent(store, commit_id)
            continue
        if state == "preparing":
            with store.session() as s:
                tmps = [o.tmp for o in s.scalars(select(CommitOpRow).where(
                    CommitOpRow.commit_id == commit_id)) if o.tmp]
            base = HostDir(str(store.base))
            try:
                for tmp in tmps:
                    with contextlib.suppress(FileNotFoundError):
                        base.unlink(tmp)
            finally:
                base.close()
            _set_state(store, commit_id, "rolled_back")
        else:
            _apply_phases(store, commit_id, lambda: None, None, 0)  # rebases when done
    return [c for c, _ in pending]


__all__ = ["CONFLICT_EXIT", "CommitConflict", "CommitReport", "commit_branch", "recover"]
