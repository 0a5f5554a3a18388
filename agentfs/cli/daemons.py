"""Finding and talking to the running mount daemons of a store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from agentfs.branches.store import Store, load_registry
from agentfs.cli.common import open_store
from agentfs.errors import MountError, UserError
from agentfs.mount import control


def live_stores(ctx: typer.Context) -> list[Path]:
    """The store of this project, or (outside any project) every registered store."""
    try:
        store = open_store(ctx)
    except UserError:
        if ctx.obj and ctx.obj.get("store"):
            raise
        roots = [Path(r) for r in load_registry().values() if Path(r).is_dir()]
        if not roots:
            raise
        return roots
    root = store.root
    store.close()
    return [root]


def live_daemons(roots: list[Path]) -> list[tuple[Path, int, str]]:
    """(store root, daemon pid, mountpoint) of every live mount."""
    out = []
    for root in roots:
        store = Store(root)
        try:
            out += [(root, m.pid, m.mountpoint) for m in store.mounts()]
        finally:
            store.close()
    return out


def ask_daemon(root: Path, pid: int, message: dict[str, Any]) -> dict[str, Any]:
    try:
        return control.request(control.socket_path(root, pid), message, timeout=10)
    except OSError as exc:
        raise MountError(f"cannot reach the mount daemon (pid {pid}): {exc}") from None


def daemon_at(ctx: typer.Context, mountpoint: Path) -> tuple[Path, int]:
    """(store root, daemon pid) of the agentfs mount at *mountpoint*."""
    want = os.path.abspath(mountpoint)
    for root, pid, where in live_daemons(live_stores(ctx)):
        if where == want:
            return root, pid
    raise MountError(f"{want} is not an agentfs mount (see `agentfs status`)")
