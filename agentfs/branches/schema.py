"""The store's SQLite schema (SQLAlchemy).  One table per concept; invariants in comments.

Schema changes bump `SCHEMA_VERSION` and add a step to `UPGRADES` (version N -> N+1,
plain SQL on the driver's connection); `Store` runs the steps an older store needs in
one transaction when it is opened, and refuses a store newer than this code knows
rather than guess at it.  A store without a schema_version row is of the oldest
version (`OLDEST_VERSION`).

Versions:
  1  the first release (3f67d75) and everything until version 2: stores written then
     differ among themselves, as tables and columns came without a version bump:
     commits/commit_ops (6eea3c1), layers.kind (175e4d8), mounts.branch_id nullable
     (55d4238, per-process mounts)
  2  every version-1 store brought to one layout, plus indexes on the columns that
     are looked up by value: commit_ops(commit_id, seq), commits(branch_id),
     layers(parent_id), branches(parent_branch_id)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 2
OLDEST_VERSION = 1


class Base(DeclarativeBase):
    pass


class StoreInfo(Base):
    """Key/value facts about the store: schema_version, base_path, created."""

    __tablename__ = "store_info"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


class LayerRow(Base):
    """A directory of changes under layers/<id>.  Invariant: a frozen layer never
    changes again; parent_id is the layer directly beneath (NULL = the base)."""

    __tablename__ = "layers"
    __table_args__ = (Index("layers_by_parent", "parent_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("layers.id"))
    frozen: Mapped[bool] = mapped_column(default=False)
    # "branch": changes made in a branch; "snapshot": the base as it was before a commit
    # (kept under the branches that sat on the base, so their view does not change)
    kind: Mapped[str] = mapped_column(String, default="branch")
    created: Mapped[datetime]


class BranchRow(Base):
    """A named, writable view.  Invariant: top_layer_id is unfrozen and owned by
    exactly this branch; fork_layer_id is the frozen layer it was forked on
    (NULL = forked from the base); parent_branch_id is where commit goes (NULL = base)."""

    __tablename__ = "branches"
    __table_args__ = (Index("branches_by_parent", "parent_branch_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    parent_branch_id: Mapped[int | None] = mapped_column(ForeignKey("branches.id"))
    top_layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id"))
    fork_layer_id: Mapped[int | None] = mapped_column(ForeignKey("layers.id"))
    created: Mapped[datetime]
    state: Mapped[str] = mapped_column(String, default="active")


class MountRow(Base):
    """A running daemon.  Rows whose pid is dead or whose mountpoint is no longer
    in /proc/mounts are stale and removed by whoever notices."""

    __tablename__ = "mounts"
    __table_args__ = (UniqueConstraint("mountpoint"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    # NULL: a per-process mount without a default branch
    branch_id: Mapped[int | None] = mapped_column(ForeignKey("branches.id"))
    mountpoint: Mapped[str] = mapped_column(String)
    pid: Mapped[int]
    mode: Mapped[str] = mapped_column(String, default="pinned")
    started: Mapped[datetime]
    log_path: Mapped[str] = mapped_column(String, default="")


class CommitRow(Base):
    """One commit of a branch into its target.  state moves preparing -> removing ->
    placing -> finishing -> done (or rolled_back); every step of a phase is
    idempotent, so recovery re-runs the phase it finds and continues."""

    __tablename__ = "commits"
    __table_args__ = (Index("commits_by_branch", "branch_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    branch_id: Mapped[int] = mapped_column(ForeignKey("branches.id"))
    target: Mapped[str] = mapped_column(String)          # "base" or a branch name
    state: Mapped[str] = mapped_column(String)
    snapshot_layer_id: Mapped[int | None] = mapped_column(ForeignKey("layers.id"))
    created: Mapped[datetime]
    finished: Mapped[datetime | None]
    summary: Mapped[str] = mapped_column(String, default="")


class CommitOpRow(Base):
    """One planned change of a commit, written before anything is touched.
    action: remove | mkdir | place | rmdir | meta; tmp is the staged file's path."""

    __tablename__ = "commit_ops"
    __table_args__ = (Index("commit_ops_by_commit", "commit_id", "seq"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    commit_id: Mapped[int] = mapped_column(ForeignKey("commits.id"))
    seq: Mapped[int]
    action: Mapped[str] = mapped_column(String)
    path: Mapped[str] = mapped_column(String)
    tmp: Mapped[str] = mapped_column(String, default="")
    arg: Mapped[str] = mapped_column(String, default="")   # JSON: mode, uid, gid, times


# -- upgrades -------------------------------------------------------------------------
# Each step takes a cursor inside the upgrade's transaction (BEGIN IMMEDIATE, foreign
# keys off) and brings the store from its version to the next.  Steps are written in
# plain SQL against the layout of their own time, never with the ORM classes above
# (those describe the newest layout only).

def _columns(cur: sqlite3.Cursor, table: str) -> dict[str, bool]:
    """Column name -> NOT NULL, of *table* (empty if it does not exist)."""
    return {row[1]: bool(row[3]) for row in cur.execute(f"PRAGMA table_info({table})")}


def _v1_to_v2(cur: sqlite3.Cursor) -> None:
    if not _columns(cur, "commits"):
        cur.execute("""CREATE TABLE commits (
            id INTEGER NOT NULL, branch_id INTEGER NOT NULL, target VARCHAR NOT NULL,
            state VARCHAR NOT NULL, snapshot_layer_id INTEGER, created DATETIME NOT NULL,
            finished DATETIME, summary VARCHAR NOT NULL, PRIMARY KEY (id),
            FOREIGN KEY(branch_id) REFERENCES branches (id),
            FOREIGN KEY(snapshot_layer_id) REFERENCES layers (id))""")
    if not _columns(cur, "commit_ops"):
        cur.execute("""CREATE TABLE commit_ops (
            id INTEGER NOT NULL, commit_id INTEGER NOT NULL, seq INTEGER NOT NULL,
            action VARCHAR NOT NULL, path VARCHAR NOT NULL, tmp VARCHAR NOT NULL,
            arg VARCHAR NOT NULL, PRIMARY KEY (id),
            FOREIGN KEY(commit_id) REFERENCES commits (id))""")
    if "kind" not in _columns(cur, "layers"):
        cur.execute("ALTER TABLE layers ADD COLUMN kind VARCHAR NOT NULL DEFAULT 'branch'")
    if _columns(cur, "mounts").get("branch_id", False):
        # per-process mounts have no branch: the column became nullable (SQLite cannot
        # ALTER a constraint, so the table is rebuilt; its rows are live daemons)
        cur.execute("""CREATE TABLE mounts_v2 (
            id INTEGER NOT NULL, branch_id INTEGER, mountpoint VARCHAR NOT NULL,
            pid INTEGER NOT NULL, mode VARCHAR NOT NULL, started DATETIME NOT NULL,
            log_path VARCHAR NOT NULL, PRIMARY KEY (id), UNIQUE (mountpoint),
            FOREIGN KEY(branch_id) REFERENCES branches (id))""")
        cur.execute("INSERT INTO mounts_v2 (id, branch_id, mountpoint, pid, mode, started, "
                    "log_path) SELECT id, branch_id, mountpoint, pid, mode, started, "
                    "log_path FROM mounts")
        cur.execute("DROP TABLE mounts")
        cur.execute("ALTER TABLE mounts_v2 RENAME TO mounts")
    cur.execute("CREATE INDEX IF NOT EXISTS layers_by_parent ON layers (parent_id)")
    cur.execute("CREATE INDEX IF NOT EXISTS branches_by_parent ON branches (parent_branch_id)")
    cur.execute("CREATE INDEX IF NOT EXISTS commits_by_branch ON commits (branch_id)")
    cur.execute("CREATE INDEX IF NOT EXISTS commit_ops_by_commit ON commit_ops "
                "(commit_id, seq)")


# version N -> the step that makes it N + 1; every version below SCHEMA_VERSION has one
UPGRADES: dict[int, Callable[[sqlite3.Cursor], None]] = {
    1: _v1_to_v2,
}
