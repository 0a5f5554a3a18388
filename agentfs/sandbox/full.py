"""`agentfs run --full`: the whole root filesystem through the overlay.

Writes outside the project must go to a branch too, so "/" gets a store of its own
(`<agentfs home>/root-store`, created on first use, never registered: every directory
is inside "/").  Its views hide agentfs itself (its home, every registered store, the
root store), so the overlay never shows its own layers or mounts.  Each project
branch gets a root branch of its own in it, named after the project's store and the
branch, so two projects' `--full` runs never share one.  Inside the sandbox the root
branch's view is "/", and the project branch's view is mounted at the project's path
on top of it, so project changes stay in the project branch (ready for
`agentfs branch diff/commit`) and the rest lands in the root branch (inspect it with
`agentfs --store <agentfs home>/root-store branch diff NAME`).
"""

from __future__ import annotations

from pathlib import Path

from agentfs.branches.store import Store, agentfs_home

ROOT_STORE = "root-store"


def root_store_path() -> Path:
    return agentfs_home() / ROOT_STORE


def open_root_store() -> Store:
    path = root_store_path()
    if (path / "meta.db").exists():
        return Store(path)
    return Store.create(Path("/"), path, whole_root=True)


def root_branch_name(project: Store, branch: str) -> str:
    """The root branch that goes with *branch* of the project store *project*."""
    return f"{project.root.name}--{branch}"
