"""Discarding a branch: its rows go, its layer data moves to the store's trash area.

Layers another branch still stands on (a child forked from this one) stay where
they are; only what nobody else uses is moved.  A manifest beside the data says
what the branch was, so it can be restored until the trash is purged.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from agentfs.branches.locks import branch_held
from agentfs.branches.schema import BranchRow, CommitRow, LayerRow
from agentfs.branches.store import BranchInfo, Store
from agentfs.errors import NotFoundError, UserError


def discard_branch(store: Store, name: str, *, purge: bool = False,
                   force: bool = False) -> Path | None:
    """Remove branch *name*; returns the trash directory (None when purged)."""
    info = store.branch(name)
    mounted = [m.mountpoint for m in store.mounts() if m.branch == name]
    if mounted:
        raise UserError(f"branch {name!r} is mounted at {', '.join(mounted)}; unmount it "
                        "first")
    with branch_held(store.root, name, f"the discard of {name!r}"):
        return _discard(store, name, info, purge=purge, force=force)


def _discard(store: Store, name: str, info: BranchInfo, *, purge: bool, force: bool
             ) -> Path | None:
    others = [b for b in store.branches() if b.name != name]
    children = [b.name for b in others if b.parent == name]
    if children and not force:
        raise UserError(f"branch {name!r} has children ({', '.join(children)}); discard "
                        "them first or use --force")
    shared = {lid for b in others for lid in b.layer_stack}
    own = [lid for lid in info.layer_stack[:info.own_layers] if lid not in shared]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    trash = None if purge else store.root / "trash" / f"branch-{stamp}"
    with store.session() as s:
        row = s.scalar(select(BranchRow).where(BranchRow.name == name))
        assert row is not None
        for child in s.scalars(select(BranchRow).where(BranchRow.parent_branch_id == row.id)):
            child.parent_branch_id = row.parent_branch_id  # they now commit where we would
        for commit in s.scalars(select(CommitRow).where(CommitRow.branch_id == row.id)):
            s.delete(commit)
        s.flush()  # no ORM relationships: order the deletes by hand
        s.delete(row)
        s.flush()
        for lid in own:
            layer = s.get(LayerRow, lid)
            if layer is not None:
                s.delete(layer)
    if trash is not None:
        (trash / "layers").mkdir(parents=True)
        manifest = {"kind": "branch", "name": name, "parent": info.parent,
                    "layers": own, "layer_stack": list(info.layer_stack),
                    "created": info.created.isoformat() + "Z",
                    "discarded": datetime.now(UTC).isoformat()}
        (trash / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for lid in own:
        src = store.layer_dir(lid)
        if not src.exists():
            continue
        if trash is None:
            shutil.rmtree(src)
        else:
            src.rename(trash / "layers" / str(lid))
    return trash


def discarded_branches(store: Store) -> list[dict[str, object]]:
    """Branches in the trash that can be restored, newest first."""
    out = []
    for manifest in sorted((store.root / "trash").glob("branch-*/manifest.json"), reverse=True):
        data = json.loads(manifest.read_text())
        data["id"] = manifest.parent.name
        out.append(data)
    return out


def restore_branch(store: Store, trash_id: str, new_name: str | None = None) -> str:
    """Bring a discarded branch back from the trash (under its old name or *new_name*)."""
    from agentfs.branches.store import validate_branch_name

    folder = store.root / "trash" / trash_id
    manifest = folder / "manifest.json"
    if "/" in trash_id or not manifest.is_file():
        raise NotFoundError(f"no discarded branch {trash_id!r} in the trash "
                        "(see `agentfs branch list --discarded`)")
    data = json.loads(manifest.read_text())
    name = new_name or str(data["name"])
    validate_branch_name(name)
    own: list[int] = [int(x) for x in data["layers"]]
    stack: list[int] = [int(x) for x in data["layer_stack"]]
    with store.session() as s:
        if s.scalar(select(BranchRow).where(BranchRow.name == name)) is not None:
            raise UserError(f"branch {name!r} exists; restore it under another name with --as")
        below = stack[len(own)] if len(stack) > len(own) else None
        if below is not None and s.get(LayerRow, below) is None:
            raise UserError(f"the layer branch {name!r} was forked on is gone; cannot restore")
        parent_row = None
        if data.get("parent"):
            parent_row = s.scalar(select(BranchRow).where(BranchRow.name == data["parent"]))
        now = datetime.now(UTC).replace(tzinfo=None)
        parent_id = below
        moves = []
        for old_id in reversed(own):  # bottom first, so each new layer points at the last
            layer = LayerRow(parent_id=parent_id, frozen=old_id != own[0], created=now)
            s.add(layer)
            s.flush()
            moves.append((old_id, layer.id))
            parent_id = layer.id
        assert parent_id is not None
        s.add(BranchRow(name=name, parent_branch_id=parent_row.id if parent_row else None,
                        top_layer_id=parent_id,
                        fork_layer_id=below if parent_row is not None else None, created=now))
    for old_id, new_id in moves:
        src = folder / "layers" / str(old_id)
        if src.exists():
            src.rename(store.layer_dir(new_id))
        else:
            store.layer_dir(new_id).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder)
    return name
