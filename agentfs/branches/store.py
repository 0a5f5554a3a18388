"""The branch store: one directory per base, holding meta.db and the layer data.

    <store>/meta.db          SQLite (WAL) through SQLAlchemy: layers, branches, mounts
    <store>/layers/<id>/     copy-on-write layer data (see overlay/layers.py)
    <store>/run/             daemon logs

A registry under ``$AGENTFS_HOME`` maps base directories to their stores so that
commands run inside a project find its store without flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agentfs.branches.schema import (
    OLDEST_VERSION,
    SCHEMA_VERSION,
    UPGRADES,
    Base,
    BranchRow,
    MountRow,
    StoreInfo,
)
from agentfs.errors import NotFoundError, StoreError, UsageError, UserError
from agentfs.proc import running

BRANCH_NAME_MAX = 100
_BAD_NAME = re.compile(r"[/\x00-\x1f\x7f]")


def agentfs_home() -> Path:
    home = os.environ.get("AGENTFS_HOME")
    return Path(home) if home else Path.home() / ".local" / "share" / "agentfs"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _sql_datetime(value: datetime) -> str:
    """A DateTime column's value as SQLAlchemy stores it in SQLite."""
    return value.isoformat(sep=" ", timespec="microseconds")


# a branch's layers, top first: follow parent_id down to the base.  Bounded: in a
# damaged store whose parent links form a cycle the recursion would never end (every
# command hung); a stack this deep is reported as damage instead
STACK_LIMIT = 100_000
_STACK_SQL = f"""
WITH RECURSIVE stack(id, parent_id, kind, depth) AS (
    SELECT id, parent_id, kind, 0 FROM layers WHERE id = ?
    UNION ALL
    SELECT l.id, l.parent_id, l.kind, stack.depth + 1
    FROM layers AS l JOIN stack ON l.id = stack.parent_id
    WHERE stack.depth < {STACK_LIMIT}
)
SELECT id, kind FROM stack ORDER BY depth
"""


def sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def validate_branch_name(name: str) -> None:
    if not name or not name.strip():
        raise UsageError("branch name must not be empty")
    if len(name) > BRANCH_NAME_MAX:
        raise UsageError(f"branch name is too long ({len(name)} > {BRANCH_NAME_MAX} "
                         "characters)")
    if _BAD_NAME.search(name):
        raise UsageError(f"branch name {name!r} must not contain '/' or control characters")
    if not is_utf8(name):
        raise UsageError(f"branch name {name!r} is not valid UTF-8")
    if name in (".", "..") or name.startswith("-"):
        raise UsageError(f"branch name {name!r} is not allowed")


def is_utf8(text: str) -> bool:
    """False for a str holding undecodable bytes (surrogate escapes from the command
    line or a file name): SQLite, JSON and the terminal take UTF-8 only."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def require_utf8_path(path: Path | str, what: str) -> None:
    """Paths the store records (base, store, mountpoints) must be valid UTF-8."""
    if not is_utf8(str(path)):
        raise UsageError(f"{what} {str(path)!r} is not valid UTF-8; agentfs records it in "
                         "its store, choose a path without undecodable bytes")


@dataclass(frozen=True)
class BranchInfo:
    id: int
    name: str
    parent: str | None
    top_layer: int
    layer_stack: tuple[int, ...]  # top first, excluding the base
    fork_layer: int | None        # the frozen layer it was forked on (None: the base)
    created: datetime
    state: str

    base_layers: int = 0          # snapshot layers at the bottom (the base as it was)

    @property
    def own_layers(self) -> int:
        """How many layers at the top of the stack hold this branch's own changes."""
        if self.fork_layer is None:
            return len(self.layer_stack) - self.base_layers
        return self.layer_stack.index(self.fork_layer)


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    branch: str
    pid: int
    mode: str
    started: datetime
    log_path: str


class Store:
    """An opened store.  Short transactions only; safe for several processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        db = root / "meta.db"
        if not db.is_file():
            if not root.exists():
                raise StoreError(f"{root} is not an agentfs store (the directory does not "
                                 "exist); run `agentfs init`")
            raise StoreError(f"{root} is not an agentfs store (no meta.db); "
                             "run `agentfs init`")
        _check_writable(root, db)
        base = open_schema(root, db)
        self.engine: Engine = _make_engine(db)
        self.base = Path(base)

    # -- creation and discovery ------------------------------------------
    @classmethod
    def create(cls, base: Path, root: Path | None = None, whole_root: bool = False
               ) -> Store:
        """*whole_root*: a store of "/" itself (`agentfs run --full`): it lives inside its
        base, so its views hide it and every other agentfs path, and it is not
        registered (every directory is inside "/")."""
        base = base.expanduser()
        require_utf8_path(base, "base directory")
        if not _exists(base):
            raise NotFoundError(f"base directory {base} does not exist")
        if not base.is_dir():
            raise UsageError(f"base {base} is not a directory")
        base = base.resolve()
        if root is None:
            root = agentfs_home() / "stores" / _store_dir_name(base)
        root = root.expanduser().absolute()
        require_utf8_path(root, "store directory")
        if _exists(root / "meta.db"):
            raise UserError(f"a store already exists at {root}")
        if _is_within(root, base) and not whole_root:
            raise UsageError(f"the store ({root}) must not be inside the base ({base})")
        for sub in ("layers", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        _check_xattrs(root)
        engine = _make_engine(root / "meta.db")
        Base.metadata.create_all(engine)
        with Session(engine) as s, s.begin():
            s.add_all([StoreInfo(key="schema_version", value=str(SCHEMA_VERSION)),
                       StoreInfo(key="base_path", value=str(base)),
                       StoreInfo(key="created", value=_now().isoformat())])
            if whole_root:
                s.add(StoreInfo(key="whole_root", value="1"))
        engine.dispose()
        if not whole_root:
            register(base, root)
        return cls(root)

    @classmethod
    def find(cls, explicit: str | None = None, cwd: Path | None = None) -> Store:
        """--store, then $AGENTFS_STORE, then the store registered for a base containing cwd."""
        chosen = explicit or os.environ.get("AGENTFS_STORE")
        if chosen:
            return cls(Path(chosen).expanduser().absolute())
        here = (cwd or Path.cwd()).resolve()
        best: tuple[int, str] | None = None
        for base, root in load_registry().items():
            if _is_within(here, Path(base)) and (best is None or len(base) > best[0]):
                best = (len(base), root)
        if best is None:
            raise StoreError("no agentfs store found for this directory; pass --store DIR, "
                            "set AGENTFS_STORE, or run `agentfs init BASE`")
        return cls(Path(best[1]))

    # -- metadata -----------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine) as s, s.begin():
            yield s

    def info(self, key: str) -> str | None:
        with Session(self.engine) as s:
            row = s.get(StoreInfo, key)
            return row.value if row else None

    def hidden_in_base(self) -> frozenset[str]:
        """What the views of this store must not show of the base: nothing, except for
        a whole-root store, which hides agentfs' home, every registered store and
        itself (relative to the base)."""
        if self.info("whole_root") != "1":
            return frozenset()
        paths = {self.root, agentfs_home(), *(Path(r) for r in load_registry().values())}
        out = set()
        for p in paths:
            resolved = p.resolve()
            if _is_within(resolved, self.base):
                out.add(str(resolved.relative_to(self.base.resolve())))
        return frozenset(p for p in out if p and p != ".")

    def set_info(self, key: str, value: str) -> None:
        with self.session() as s:
            s.merge(StoreInfo(key=key, value=value))

    def layer_dir(self, layer_id: int) -> Path:
        return self.root / "layers" / str(layer_id)

    # -- branches -------------------------------------------------------------
    def create_branch(self, name: str, from_branch: str | None = None,
                      parent_live: bool = False) -> BranchInfo:
        """Fork *from_branch* (or the base) in O(1): the parent's top is frozen and both
        get a fresh top on it.  If the parent's top holds nothing and no daemon is
        writing it (*parent_live* False), the fork rests on the layer below instead, so
        repeated forks do not pile up empty layers."""
        validate_branch_name(name)
        try:
            return self._create_branch(name, from_branch, parent_live)
        except (IntegrityError, sqlite3.IntegrityError):
            # another process created it between our check and insert
            raise UserError(f"branch {name!r} already exists") from None

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[sqlite3.Cursor]:
        """A short write transaction straight on the driver (BEGIN IMMEDIATE: the write
        lock is taken up front, so the reads in it cannot go stale).  Used where the ORM's
        per-statement overhead would be most of the cost (a fork is a handful of rows)."""
        pooled = self.engine.raw_connection()
        try:
            conn = pooled.driver_connection
            assert isinstance(conn, sqlite3.Connection)
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
            cur.close()
        finally:
            pooled.close()  # back to the pool

    def _create_branch(self, name: str, from_branch: str | None, parent_live: bool
                       ) -> BranchInfo:
        # Plain SQL on purpose: the same rows as the ORM would write (created is stored
        # in SQLAlchemy's format), about ten times faster; see bench/store.py.
        now = _now()
        created = _sql_datetime(now)
        with self._write_tx() as cur:
            if cur.execute("SELECT 1 FROM branches WHERE name = ?", (name,)).fetchone():
                raise UserError(f"branch {name!r} already exists")
            parent_id = fork_layer = fork_parent = None
            parent_top = None
            if from_branch is not None:
                found = cur.execute("SELECT id, top_layer_id FROM branches WHERE name = ?",
                                    (from_branch,)).fetchone() \
                    if is_utf8(from_branch) else None
                if found is None:
                    self._unknown_branch(cur, from_branch)
                parent_id, old_top = found
                if not parent_live and self._layer_is_empty(old_top):
                    below = cur.execute("SELECT parent_id FROM layers WHERE id = ?",
                                        (old_top,)).fetchone()[0]
                    kind = cur.execute("SELECT kind FROM layers WHERE id = ?",
                                       (below,)).fetchone() if below is not None else None
                    fork_parent = below
                    # a parent without changes on a snapshot: fork the base view
                    fork_layer = None if kind is not None and kind[0] == "snapshot" else below
                else:
                    # freeze the parent's top; parent and child each get a fresh top on it
                    cur.execute("UPDATE layers SET frozen = 1 WHERE id = ?", (old_top,))
                    parent_top = self._insert_layer(cur, old_top, created)
                    cur.execute("UPDATE branches SET top_layer_id = ? WHERE id = ?",
                                (parent_top, parent_id))
                    fork_layer = fork_parent = old_top
            top = self._insert_layer(cur, fork_parent, created)
            cur.execute("INSERT INTO branches (name, parent_branch_id, top_layer_id, "
                        "fork_layer_id, created, state) VALUES (?, ?, ?, ?, ?, 'active')",
                        (name, parent_id, top, fork_layer, created))
            branch_id = cur.lastrowid
            assert branch_id is not None
            stack, snapshots = self._stack(cur.execute, top)
            self.layer_dir(top).mkdir(parents=True, exist_ok=True)
            if parent_top is not None:
                self.layer_dir(parent_top).mkdir(parents=True, exist_ok=True)
        return BranchInfo(id=branch_id, name=name, parent=from_branch, top_layer=top,
                          layer_stack=stack, fork_layer=fork_layer, created=now,
                          state="active", base_layers=snapshots)

    @staticmethod
    def _insert_layer(cur: sqlite3.Cursor, parent: int | None, created: str) -> int:
        cur.execute("INSERT INTO layers (parent_id, frozen, kind, created) "
                    "VALUES (?, 0, 'branch', ?)", (parent, created))
        assert cur.lastrowid is not None
        return cur.lastrowid

    @staticmethod
    def _stack(execute: Callable[..., Any], top: int) -> tuple[tuple[int, ...], int]:
        """The layer ids from *top* down to the base, and how many snapshot layers
        are at the bottom of them (one query, however deep the stack).  *execute*: a
        cursor's or a connection's (exec_driver_sql)."""
        rows = execute(_STACK_SQL, (top,)).fetchall()
        if len(rows) > STACK_LIMIT:
            raise StoreError(f"the layer table of this store is damaged: the stack of "
                             f"layer {top} loops (run `agentfs fsck`)")
        snapshots = 0
        for _lid, kind in rows:
            snapshots = snapshots + 1 if kind == "snapshot" else 0
        return tuple(lid for lid, _kind in rows), snapshots

    @staticmethod
    def _unknown_branch(cur: sqlite3.Cursor, name: str) -> NoReturn:
        known = ", ".join(r[0] for r in cur.execute("SELECT name FROM branches ORDER BY id"))
        raise NotFoundError(f"unknown branch {name!r} (branches: {known or 'none'})")

    def _layer_is_empty(self, layer_id: int) -> bool:
        path = str(self.layer_dir(layer_id))
        for sub in ("tree", "index"):
            try:
                with os.scandir(os.path.join(path, sub)) as it:
                    if next(it, None) is not None:
                        return False
            except (FileNotFoundError, NotADirectoryError):
                continue
        return True

    def branch(self, name: str) -> BranchInfo:
        with Session(self.engine) as s:
            return self._branch_info(s, self._branch_row(s, name))

    def branches(self) -> list[BranchInfo]:
        with Session(self.engine) as s:
            rows = s.scalars(select(BranchRow).order_by(BranchRow.id)).all()
            return [self._branch_info(s, r) for r in rows]

    def _branch_row(self, s: Session, name: str) -> BranchRow:
        # a name that is not UTF-8 cannot be a branch (nor be looked up in SQLite)
        row = s.scalar(select(BranchRow).where(BranchRow.name == name)) \
            if is_utf8(name) else None
        if row is None:
            known = ", ".join(s.scalars(select(BranchRow.name)).all()) or "none"
            raise NotFoundError(f"unknown branch {name!r} (branches: {known})")
        return row

    def _branch_info(self, s: Session, row: BranchRow) -> BranchInfo:
        s.flush()  # the query below bypasses the ORM: it must see pending layer changes
        stack, snapshots = self._stack(s.connection().exec_driver_sql, row.top_layer_id)
        parent = s.get(BranchRow, row.parent_branch_id) if row.parent_branch_id else None
        return BranchInfo(id=row.id, name=row.name, parent=parent.name if parent else None,
                          top_layer=row.top_layer_id, layer_stack=stack,
                          fork_layer=row.fork_layer_id, created=row.created, state=row.state,
                          base_layers=snapshots)

    # -- mounts ---------------------------------------------------------------
    def add_mount(self, branch: str | None, mountpoint: str, pid: int, mode: str,
                  log_path: str) -> None:
        with self.session() as s:
            row = self._branch_row(s, branch) if branch is not None else None
            for old in s.scalars(select(MountRow).where(MountRow.mountpoint == mountpoint)):
                s.delete(old)
            s.flush()
            s.add(MountRow(branch_id=row.id if row else None, mountpoint=mountpoint, pid=pid,
                           mode=mode,
                           started=_now(), log_path=log_path))

    def remove_mount(self, mountpoint: str) -> None:
        with self.session() as s:
            for row in s.scalars(select(MountRow).where(MountRow.mountpoint == mountpoint)):
                s.delete(row)

    def mounts(self, prune: bool = True) -> list[MountInfo]:
        """Live mounts; stale rows (dead daemon or not mounted) are pruned."""
        mounted = mounted_paths()
        out, stale = [], []
        with Session(self.engine) as s:
            for row in s.scalars(select(MountRow).order_by(MountRow.id)):
                if running(row.pid) and row.mountpoint in mounted:
                    b = s.get(BranchRow, row.branch_id) if row.branch_id else None
                    out.append(MountInfo(row.mountpoint, b.name if b else "", row.pid,
                                         row.mode, row.started, row.log_path))
                else:
                    stale.append(row.mountpoint)
        if prune:
            for mp in stale:
                self.remove_mount(mp)
        return out

    def close(self) -> None:
        self.engine.dispose()


def _exists(path: Path) -> bool:
    """Path.exists, but a name too long (or otherwise unusable) is a usage error."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise UsageError(f"{_short(str(path))}: {exc.strerror}") from None
    return True


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_writable(root: Path, db: Path) -> None:
    """Every command may write meta.db (pruning stale mounts, finishing a commit, WAL
    bookkeeping), so a store that cannot be written is refused up front."""
    try:
        fd = os.open(db, os.O_RDWR)
    except OSError as exc:
        raise StoreError(f"store {root} is not writable: {db.name}: {exc.strerror} "
                         "(agentfs must write its store; remount it read-write or fix "
                         "its permissions)") from None
    os.close(fd)
    if not os.access(root, os.W_OK):
        raise StoreError(f"store {root} is not writable (agentfs must write its store; "
                         "remount it read-write or fix its permissions)")


def open_schema(root: Path, db: Path) -> str:
    """Check meta.db is an agentfs store this code can use, upgrade it if it is older
    (all steps in one transaction: a store is either upgraded or left as it was), and
    return its base path."""
    try:
        conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    except sqlite3.Error as exc:
        raise StoreError(f"store {root}: cannot open meta.db ({exc})") from None
    try:
        version, base = _read_version(root, conn)
        if version > SCHEMA_VERSION:
            raise StoreError(f"store {root} has schema version {version}, newer than this "
                             f"agentfs knows ({SCHEMA_VERSION}); upgrade agentfs")
        if version < SCHEMA_VERSION:
            try:
                _upgrade(root, conn)
            except sqlite3.Error as exc:
                raise StoreError(f"store {root}: upgrading schema version {version} to "
                                 f"{SCHEMA_VERSION} failed ({exc}); the store is "
                                 "unchanged") from None
        return base
    except sqlite3.DatabaseError as exc:
        if _no_space(root):  # SQLite says "disk I/O error" when it cannot grow its -shm
            raise StoreError(f"store {root}: no space left on its filesystem ({exc}); "
                             "free some (what was deleted in a branch is kept until "
                             "`agentfs trash purge`)") from None
        raise StoreError(f"store {root}: meta.db is unreadable ({exc})") from None
    finally:
        conn.close()


def _no_space(root: Path) -> bool:
    try:
        st = os.statvfs(root)
    except OSError:
        return False
    return st.f_bavail == 0 or (st.f_files > 0 and st.f_favail == 0)


def _read_version(root: Path, conn: sqlite3.Connection) -> tuple[int, str]:
    try:
        rows = dict(conn.execute("SELECT key, value FROM store_info"))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise StoreError(f"store {root}: meta.db is not an agentfs store "
                             "(no store_info table)") from None
        raise
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"store {root}: meta.db is corrupt ({exc})") from None
    base = rows.get("base_path")
    if not base:
        raise StoreError(f"store {root}: meta.db is not an agentfs store (no base_path)")
    raw = rows.get("schema_version")
    try:
        version = OLDEST_VERSION if raw is None else int(raw)
    except ValueError:
        raise StoreError(f"store {root}: schema version {raw!r} is not a number") from None
    return version, str(base)


def _upgrade(root: Path, conn: sqlite3.Connection) -> None:
    """Run the steps from the store's version to SCHEMA_VERSION in one transaction; a
    second process opening the same old store waits for the first and then finds it
    upgraded."""
    conn.execute("PRAGMA foreign_keys=OFF")  # table rebuilds; must be set outside a tx
    conn.execute("PRAGMA busy_timeout=10000")
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        version, _base = _read_version(root, conn)
        start = version
        while version < SCHEMA_VERSION:
            step = UPGRADES.get(version)
            if step is None:
                raise StoreError(f"store {root} has schema version {version}, which this "
                                 f"agentfs cannot upgrade (it knows {sorted(UPGRADES)})")
            step(cur)
            version += 1
        if start < SCHEMA_VERSION:
            cur.execute("INSERT OR REPLACE INTO store_info (key, value) VALUES "
                        "('schema_version', ?)", (str(version),))
            cur.execute("INSERT OR REPLACE INTO store_info (key, value) VALUES "
                        "(?, ?)", (f"upgraded_from_{start}", _now().isoformat()))
            problems = list(cur.execute("PRAGMA foreign_key_check"))
            if problems:
                raise StoreError(f"store {root}: upgrade to schema version {version} found "
                                 f"{len(problems)} dangling reference(s); left unchanged")
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def _make_engine(db: Path) -> Engine:
    engine = create_engine(f"sqlite:///{db}")
    event.listen(engine, "connect", sqlite_pragmas)
    return engine


def _store_dir_name(base: Path) -> str:
    import hashlib

    digest = hashlib.sha256(str(base).encode()).hexdigest()[:12]
    return f"{base.name or 'root'}-{digest}"


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _check_xattrs(root: Path) -> None:
    probe = root / "run" / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.agentfs.probe", b"1")
    except OSError as exc:
        raise StoreError(f"the store filesystem at {root} does not support user xattrs "
                        f"({exc.strerror}); choose another --store location") from None
    finally:
        probe.unlink()



def mounted_paths() -> set[str]:
    """Mountpoints currently in the kernel's table (octal escapes decoded)."""
    out = set()
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1:
                raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[1])
                out.add(os.fsdecode(raw))
    return out


# -- registry -------------------------------------------------------------------
def _registry_path() -> Path:
    return agentfs_home() / "registry.json"


def load_registry() -> dict[str, str]:
    try:
        data = json.loads(_registry_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def register(base: Path, root: Path) -> None:
    reg = load_registry()
    reg[str(base)] = str(root)
    path = _registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(reg, indent=2, sort_keys=True))
    os.replace(tmp, path)
