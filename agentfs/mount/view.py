"""Build an overlay view of one branch from the store."""

from __future__ import annotations

import os

from agentfs.branches.locks import hold_branch
from agentfs.branches.store import Store
from agentfs.errors import StoreError
from agentfs.overlay.engine import Overlay
from agentfs.overlay.layers import Layer


def open_branch_layers(store: Store, branch: str) -> list[Layer]:
    """The branch's stack, top first, base last."""
    info = store.branch(branch)
    if not store.base.is_dir():
        raise StoreError(f"the base directory {store.base} of store {store.root} is missing")
    layers = [Layer.open_store_layer(lid, str(store.layer_dir(lid))) for lid in info.layer_stack]
    layers.append(Layer.open_base(str(store.base), store.hidden_in_base()))
    return layers


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
