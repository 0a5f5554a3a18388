"""`agentfs fsck`: check a store's invariants and repair what is safe to repair.

A daemon killed mid-write, a commit or discard killed half way, a full disk: each
leaves the store in a state the next mount or command mostly copes with on its own.
fsck says what is there and, with *repair*, finishes the job without guessing:

* repairs that lose nothing are made (finish an interrupted commit, turn a dead
  writer's trash journal into items, remove half-written temporaries, move a layer
  directory no branch knows into ``<store>/lost+found/`` rather than delete it);
* what would need a decision (a broken parent chain, an unreadable marker, a
  corrupt database) is reported and left alone.

Checks of trash and audit are in `agentfs.workflow.fsck_data`.  A repair holds every
branch's lock, so no daemon, commit or discard can start while it runs, and it is
refused while any of them is running.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from agentfs.branches.locks import hold_branch
from agentfs.branches.store import Store, mounted_paths
from agentfs.errors import UserError
from agentfs.overlay.layers import MARKER, WHITEOUT_MODE, encode_marker
from agentfs.proc import running

LOST_FOUND = "lost+found"
_KNOWN_KEYS = frozenset({"wh", "opaque", "redirect", "origin", "lower_only", "bst", "rst"})


@dataclass
class Finding:
    """One thing fsck found.  *safe*: --repair fixes it; a notice is informational
    (it never makes the exit status non-zero)."""

    kind: str
    where: str
    detail: str
    safe: bool = False
    notice: bool = False
    repaired: bool = False
    action: str = ""

    @property
    def open(self) -> bool:
        """Still a problem after this run."""
        return not self.notice and not self.repaired


@dataclass
class Report:
    store: str
    repair: bool
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not any(f.open for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store, "repair": self.repair, "clean": self.clean,
                "checked": self.checked, "skipped": self.skipped,
                "findings": [asdict(f) for f in self.findings]}


class Checker:
    """Shared state of one fsck run: the store, the report, and how to repair."""

    def __init__(self, store: Store, repair: bool) -> None:
        self.store = store
        self.root = store.root
        self.repair = repair
        self.report = Report(str(store.root), repair)
        self._lost: Path | None = None
        # layers a live daemon writes: their work/ is busy, not stale (check-only runs)
        self.busy_layers: set[int] = set()
        self.memo: dict[str, str] = {}  # repairs shared by several findings, run once

    def find(self, kind: str, where: str, detail: str, *, safe: bool = False,
             notice: bool = False, fix: Callable[[], str] | None = None) -> Finding:
        """Record a finding; with --repair and a *fix*, run it (its return value says
        what it did; an OSError leaves the finding open)."""
        f = Finding(kind, where, detail, safe=safe or fix is not None, notice=notice)
        if self.repair and fix is not None:
            try:
                f.action = fix()
                f.repaired = True
            except OSError as exc:
                f.action = f"repair failed: {exc}"
        self.report.findings.append(f)
        return f

    def count(self, what: str, n: int = 1) -> None:
        self.report.checked[what] = self.report.checked.get(what, 0) + n

    def lost_found(self, name: str) -> Path:
        """A fresh place under <store>/lost+found/ for something moved aside."""
        if self._lost is None:
            self._lost = self.root / LOST_FOUND / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            n = 1
            while self._lost.exists():
                n += 1
                self._lost = self._lost.with_name(f"{self._lost.name.split('.')[0]}.{n}")
            self._lost.mkdir(parents=True, mode=0o700)
        dest = self._lost / name
        n = 1
        while os.path.lexists(dest):
            n += 1
            dest = self._lost / f"{name}.{n}"
        return dest

    def move_aside(self, path: Path, name: str) -> str:
        dest = self.lost_found(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, dest)
        return f"moved to {dest}"


# -- running --------------------------------------------------------------------------
def fsck(store: Store, repair: bool = False) -> Report:
    """Check *store* (and repair it).  Raises UserError when a repair is refused
    because something is using the store."""
    chk = Checker(store, repair)
    with _exclusive(store) if repair else contextlib.nullcontext():
        if not repair:
            chk.busy_layers = _busy_layers(store, chk)
        from agentfs.workflow import fsck_data

        check_databases(chk)
        check_commits(chk)     # first: a finished commit changes layers and branches
        check_mounts(chk)
        check_branches(chk)
        fsck_data.check_trash(chk)
        fsck_data.check_audit(chk)
        check_lost_found(chk)
    return chk.report


@contextlib.contextmanager
def _exclusive(store: Store) -> Iterator[None]:
    """Hold every branch's lock for the repair (refused if any is held: a daemon, a
    commit or a discard is at work)."""
    mounts = store.mounts(prune=False)
    if mounts:
        where = ", ".join(f"{m.mountpoint} (pid {m.pid})" for m in mounts)
        raise UserError(f"fsck --repair refused: the store is mounted at {where}; unmount "
                        "it first (fsck without --repair only reads)")
    fds = []
    try:
        for name, _top in _branch_tops(store):
            try:
                fds.append(hold_branch(store.root, name, "agentfs fsck --repair"))
            except UserError as exc:
                raise UserError(f"fsck --repair refused: {exc}") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _busy_layers(store: Store, chk: Checker) -> set[int]:
    busy: set[int] = set()
    mounts = store.mounts(prune=False)
    for m in mounts:
        chk.report.skipped.append(f"work areas of the branches mounted at {m.mountpoint} "
                                  f"(pid {m.pid}, live)")
    live = {m.branch for m in mounts}
    for name, top in _branch_tops(store):
        if name in live or any(m.mode == "per-process" for m in mounts):
            busy.add(top)
    return busy


def _branch_tops(store: Store) -> list[tuple[str, int]]:
    """(name, top layer) of every branch, without walking layer stacks (a damaged
    store may have a cycle in them)."""
    conn = sqlite3.connect(store.root / "meta.db", timeout=10)
    try:
        return list(conn.execute("SELECT name, top_layer_id FROM branches ORDER BY id"))
    finally:
        conn.close()


# -- databases, commits, mounts -------------------------------------------------------------
def check_databases(chk: Checker) -> None:
    for name in ("meta.db", "audit.db"):
        db = chk.root / name
        if not db.exists():
            continue
        chk.count("databases")
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
                if name == "meta.db":
                    dangling = list(conn.execute("PRAGMA foreign_key_check"))
                    if dangling:
                        chk.find("db-dangling-reference", name,
                                 f"{len(dangling)} row(s) refer to rows that do not exist "
                                 f"(first: table {dangling[0][0]}, row {dangling[0][1]})")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            chk.find("db-unreadable", name, f"cannot be checked: {exc}")
            continue
        if rows != ["ok"]:
            chk.find("db-corrupt", name, "PRAGMA integrity_check: " + "; ".join(rows[:5]))


def check_commits(chk: Checker) -> None:
    from agentfs.workflow.commit import recover

    conn = _meta(chk)
    try:
        open_commits = list(conn.execute(
            "SELECT id, target, state FROM commits WHERE state NOT IN ('done', 'rolled_back')"))
        chk.count("commits", conn.execute("SELECT count(*) FROM commits").fetchone()[0])
    finally:
        conn.close()
    if not open_commits:
        return
    done: list[str] = []

    def finish() -> str:
        if not done:
            recover(chk.store)
            conn = _meta(chk)
            try:
                for cid, _t, _s in open_commits:
                    row = conn.execute("SELECT state FROM commits WHERE id = ?",
                                       (cid,)).fetchone()
                    done.append(f"commit {cid}: {row[0] if row else 'gone'}")
            finally:
                conn.close()
        return "recovered (" + ", ".join(done) + ")"

    for cid, target, state in open_commits:
        chk.find("interrupted-commit", f"commit {cid}",
                 f"a commit into {target} stopped in state {state!r}; recovery finishes it "
                 "(or rolls it back if it had not started changing anything)", fix=finish)


def check_mounts(chk: Checker) -> None:
    """Mount records of dead daemons.  A dead FUSE mount still attached is left to
    `agentfs mount` / `agentfs umount`, which detach it."""
    conn = _meta(chk)
    try:
        rows = list(conn.execute("SELECT mountpoint, pid FROM mounts"))
    finally:
        conn.close()
    attached = mounted_paths()
    for mountpoint, pid in rows:
        chk.count("mount records")
        if running(pid) and mountpoint in attached:
            continue
        if mountpoint in attached:
            chk.find("dead-mount", mountpoint, f"daemon {pid} is gone but its mount is "
                     f"still attached; `agentfs umount {mountpoint}` (or mounting there "
                     "again) detaches it", notice=True)
            continue

        def forget(mp: str = mountpoint) -> str:
            chk.store.remove_mount(mp)
            return "record removed"

        chk.find("stale-mount-record", mountpoint, f"daemon {pid} is gone", fix=forget)


# -- branches and layers ------------------------------------------------------------------
def check_branches(chk: Checker) -> None:
    conn = _meta(chk)
    try:
        layers = {lid: (parent, bool(frozen)) for lid, parent, frozen in
                  conn.execute("SELECT id, parent_id, frozen FROM layers")}
        branches = list(conn.execute(
            "SELECT id, name, parent_branch_id, top_layer_id, fork_layer_id FROM branches"))
        snapshots = {r[0] for r in conn.execute(
            "SELECT snapshot_layer_id FROM commits WHERE snapshot_layer_id IS NOT NULL")}
    finally:
        conn.close()
    chk.count("branches", len(branches))
    chk.count("layers", len(layers))
    used: set[int] = set()
    tops: dict[int, str] = {}
    by_id = {bid: (name, parent) for bid, name, parent, _t, _f in branches}
    for bid, name, parent_branch, top, fork in branches:
        stack = _chain(chk, layers, top, f"branch {name!r}")
        used.update(stack)
        if top not in layers:
            continue
        if layers[top][1]:
            chk.find("frozen-top", f"branch {name!r}", f"its top layer {top} is frozen")
        if top in tops:
            chk.find("shared-top", f"branch {name!r}",
                     f"its top layer {top} is also the top of branch {tops[top]!r}")
        tops[top] = name
        if fork is not None and fork not in stack:
            chk.find("fork-not-in-stack", f"branch {name!r}",
                     f"its fork layer {fork} is not below its top layer {top}")
        seen = {bid}
        p = parent_branch
        while p is not None:
            if p not in by_id:
                chk.find("missing-parent-branch", f"branch {name!r}",
                         f"its parent branch (id {p}) does not exist")
                break
            if p in seen:
                chk.find("branch-cycle", f"branch {name!r}", "its parent branches form a cycle")
                break
            seen.add(p)
            p = by_id[p][1]
    for lid in sorted(snapshots):
        used.update(_chain(chk, layers, lid, f"snapshot layer {lid}"))
    for lid in sorted(used & layers.keys()):
        check_layer_dir(chk, lid)
    check_orphan_layer_dirs(chk, set(layers))


def _chain(chk: Checker, layers: dict[int, tuple[int | None, bool]], top: int,
           who: str) -> list[int]:
    """The layer ids from *top* down, each reported problem once."""
    out: list[int] = []
    lid: int | None = top
    while lid is not None:
        if lid not in layers:
            chk.find("missing-layer-row", who, f"layer {lid} in its stack has no row")
            break
        if lid in out:
            chk.find("layer-cycle", who, f"its layer stack loops at layer {lid}")
            break
        out.append(lid)
        lid = layers[lid][0]
    return out


def check_layer_dir(chk: Checker, lid: int) -> None:
    path = chk.store.layer_dir(lid)
    if not path.is_dir():
        def recreate() -> str:
            path.mkdir(parents=True, exist_ok=True)
            return "recreated empty (whatever it held is gone)"

        chk.find("missing-layer-dir", f"layer {lid}",
                 f"{path} does not exist: the changes it held are lost", fix=recreate)
        return
    for sub in ("tree", "index"):
        if (path / sub).is_dir():
            check_markers(chk, lid, path / sub, sub == "index")
    if (path / "work").is_dir():
        if lid in chk.busy_layers:
            return
        check_work(chk, lid, path / "work")


def check_orphan_layer_dirs(chk: Checker, rows: set[int]) -> None:
    layers_dir = chk.root / "layers"
    try:
        names = sorted(os.listdir(layers_dir))
    except FileNotFoundError:
        return
    for name in names:
        if name.isdigit() and int(name) in rows:
            continue
        entry = layers_dir / name

        def aside(p: Path = entry, n: str = name) -> str:
            return chk.move_aside(p, f"layers/{n}")

        chk.find("orphan-layer-dir", str(entry),
                 "no layer row refers to it (a discard or branch creation killed half way?)",
                 fix=aside)


def _walk(top: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every object below *top* (never following symlinks), as (path, lstat)."""
    stack = [str(top)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                yield e.path, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)


def read_marker(path: str) -> bytes | None:
    try:
        return os.getxattr(path, MARKER, follow_symlinks=False)
    except OSError:
        return None


def check_markers(chk: Checker, lid: int, top: Path, is_index: bool) -> None:
    """Whiteouts, opaque directories and redirects: well-formed and on the right kind
    of object.  A mark on an object it cannot apply to is ignored by the engine, so
    dropping it changes nothing in any view."""
    for path, st in _walk(top):
        chk.count("layer objects")
        if stat.S_ISLNK(st.st_mode):
            continue
        raw = read_marker(path)
        if raw is None:
            continue
        where = f"layer {lid}: {os.path.relpath(path, top.parent)}"
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            chk.find("bad-marker", where, f"its {MARKER} xattr is not a JSON object: "
                     f"{raw[:60]!r}")
            continue
        unknown = sorted(set(meta) - _KNOWN_KEYS)
        if unknown:
            chk.find("bad-marker", where, f"unknown marker keys {unknown}")
        redirect = meta.get("redirect")
        if redirect is not None and (not isinstance(redirect, str) or redirect.startswith("/")
                                     or ".." in redirect.split("/")):
            chk.find("bad-marker", where, f"redirect {redirect!r} is not a relative path")
        for key in ("origin", "lower_only"):
            if key in meta and not isinstance(meta[key], int):
                chk.find("bad-marker", where, f"{key} {meta[key]!r} is not a number")
        stray = []
        if meta.get("wh") and (st.st_mode != WHITEOUT_MODE or st.st_size != 0):
            stray.append("wh")
        if not stat.S_ISDIR(st.st_mode):
            stray += [k for k in ("opaque", "redirect") if k in meta]
        if stray and not is_index:
            def drop(p: str = path, m: dict[str, Any] = meta, keys: tuple[str, ...] =
                     tuple(stray)) -> str:
                kept = {k: v for k, v in m.items() if k not in keys}
                if kept:
                    os.setxattr(p, MARKER, encode_marker(kept).encode(),
                                follow_symlinks=False)
                else:
                    os.removexattr(p, MARKER, follow_symlinks=False)
                return f"dropped {', '.join(keys)} (the engine ignored it)"

            chk.find("stray-mark", where, f"{', '.join(stray)} on an object it cannot apply "
                     f"to ({_kind(st.st_mode)}, {st.st_size} bytes)", fix=drop)


def check_work(chk: Checker, lid: int, work: Path) -> None:
    """Staging left by a killed daemon: half-copied files (copy-up writes here and
    renames into place), whiteouts being made, files unlinked while open (also linked
    into the trash).  Nothing here is visible; the next mount empties it too."""
    for name in sorted(os.listdir(work)):
        path = work / name
        if name == "orphans" and path.is_dir() and not path.is_symlink():
            inner = os.listdir(path)
            if not inner:
                continue
            chk.find("leftover-orphans", f"layer {lid}: work/orphans",
                     f"{len(inner)} file(s) unlinked while open by a daemon that is gone "
                     "(the trash holds their content)",
                     fix=partial(_clear_dir, path))
            continue
        st = path.lstat()

        def remove(p: Path = path) -> str:
            _remove(p)
            return "removed"

        chk.find("leftover-temp", f"layer {lid}: work/{name}",
                 f"staging left by a killed daemon ({_kind(st.st_mode)}, {st.st_size} bytes;"
                 " never visible)", fix=remove)


def check_lost_found(chk: Checker) -> None:
    lf = chk.root / LOST_FOUND
    if lf.is_dir() and any(lf.iterdir()):
        chk.find("lost-and-found", str(lf), "holds what earlier repairs moved aside; look "
                 "through it and delete it when done", notice=True)


# -- helpers ------------------------------------------------------------------------------
def _meta(chk: Checker) -> sqlite3.Connection:
    return sqlite3.connect(chk.root / "meta.db", timeout=10)


def _kind(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink"}.get(
        stat.S_IFMT(mode), "special file")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink()


def _clear_dir(path: Path) -> str:
    names = os.listdir(path)
    for name in names:
        _remove(path / name)
    return f"removed {len(names)}"
