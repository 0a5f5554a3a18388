"""Build an overlay view of one branch from the store."""

from __future__ import annotations

import os
from pathlib import Path

from agentfs.branches.locks import hold_branch
from agentfs.branches.store import Store, agentfs_home, load_registry
from agentfs.errors import StoreError
from agentfs.overlay.engine import Overlay
from agentfs.overlay.layers import Layer


def open_branch_layers(store: Store, branch: str) -> list[Layer]:
    """The branch's stack, top first, base last."""
    info = store.branch(branch)
    if not store.base.is_dir():
        raise StoreError(f"the base directory {store.base} of store {store.root} is missing")
    layers = [Layer.open_store_layer(lid, str(store.layer_dir(lid))) for lid in info.layer_stack]
    layers.append(Layer.open_base(str(store.base), hidden_in_base(store)))
    return layers


def hidden_in_base(store: Store) -> frozenset[str]:
    """What no view of *store* shows of its base: what the store hides itself (a
    whole-root store: agentfs and every store), and agentfs' home and every registered
    store that lie inside the base.  A project that contains the home (a home
    directory given its own --store) would otherwise show other projects' branches,
    trash and databases, inside `agentfs run` too, which leaves the project's paths
    to the mount."""
    out = set(store.hidden_in_base())
    base = store.base.resolve()
    for path in (agentfs_home(), *(Path(r) for r in load_registry().values())):
        try:
            rel = str(path.resolve().relative_to(base))
        except ValueError:
            continue
        if rel != ".":
            out.add(rel)
    return frozenset(out)


def open_branch_view(store: Store, branch: str, holder: str | None = None) -> Overlay:
    """The branch's overlay.  *holder*: take the branch's lock for the overlay's
    lifetime (a daemon serving it), saying who holds it."""
    lock = hold_branch(store.root, branch, holder) if holder is not None else None
    try:
        overlay = Overlay(open_branch_layers(store, branch))
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    overlay.lock_fd = lock
    return overlay
