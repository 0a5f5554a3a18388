"""The store's SQLite schema (SQLAlchemy).  One table per concept; invariants in comments.

Schema changes bump `SCHEMA_VERSION` and add a step to `UPGRADES`; a store with a
newer version than this code knows is refused rather than guessed at.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 1


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
    id: Mapped[int] = mapped_column(primary_key=True)
    commit_id: Mapped[int] = mapped_column(ForeignKey("commits.id"))
    seq: Mapped[int]
    action: Mapped[str] = mapped_column(String)
    path: Mapped[str] = mapped_column(String)
    tmp: Mapped[str] = mapped_column(String, default="")
    arg: Mapped[str] = mapped_column(String, default="")   # JSON: mode, uid, gid, times
