"""Putting a trash item back into a branch view.

Content the branch held is moved back (no copy).  Content that was only hidden is
shown again by dropping its whiteout when it goes back to where it was and the lower
copy still has the recorded hash; otherwise it is copied from where the record points.
Every hash is checked before anything changes; an existing target is refused unless
forced (and then it goes to the trash itself, so nothing is lost either way).
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentfs.errors import FsError, UserError
from agentfs.overlay.engine import Overlay
from agentfs.overlay.hostio import HostDir, join, split
from agentfs.policy.globs import normalize
from agentfs.trash.area import TrashArea, TrashItem
from agentfs.trash.sink import kind_of, sha256_of, stamp_of

SourceOpener = Callable[[dict[str, Any]], tuple[HostDir, str] | None]


@dataclass
class RestoreResult:
    item: str
    path: str
    restored: int = 0
    revealed: int = 0
    copied: int = 0
    skipped: list[str] = field(default_factory=list)


def restore(area: TrashArea, item_id: str, ov: Overlay, open_source: SourceOpener,
            to: str | None = None, force: bool = False) -> RestoreResult:
    try:
        item = area.get(item_id)
    except KeyError:
        raise UserError(f"no trash entry {item_id!r} (see `agentfs trash list`)") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    writer = area.pending_elsewhere(item.id)
    if writer is not None:  # its record would come back with that process's next batch
        raise UserError(f"{item.id} is still being recorded by process {writer}; try "
                        "again in a few seconds")
    if item.meta.get("state") != "final" and not force:
        raise UserError(f"{item.id}: the deleted file is still open somewhere; restore "
                        "after it is closed, or --force to restore what it holds now")
    target = normalize(to) if to is not None else item.path
    entries = sorted(item.meta.get("entries", []), key=lambda e: e["rel"].count("/")
                     + (1 if e["rel"] else 0))
    problems = _verify(area, item, entries, open_source)
    if problems and not force:
        raise UserError(f"{item.id}: refusing to restore, content changed or missing: "
                        + "; ".join(problems) + " (--force restores what is there)")
    parent = split(target)[0]
    if not ov.exists(parent):
        raise UserError(f"cannot restore to {target or '/'}: {parent} does not exist")
    if ov.exists(target):
        if not force:
            raise UserError(f"{target} exists in the branch (--force moves it to the trash "
                            "and restores over it)")
        ov.remove_tree(target)
    result = RestoreResult(item.id, target)
    in_place = target == item.path
    known = {e["rel"] for e in entries}
    revealed_dirs: list[str] = []
    for entry in entries:
        path = join(target, entry["rel"]) if entry["rel"] else target
        try:
            how = _put_back(area, item, entry, path, ov, open_source, in_place)
        except (OSError, FsError) as exc:
            result.skipped.append(f"{entry['rel'] or '.'}: {exc}")
            continue
        if how == "revealed":
            result.revealed += 1
            if entry["kind"] == "dir":
                revealed_dirs.append(entry["rel"])
        elif how == "copied":
            result.copied += 1
        elif how == "skipped":
            result.skipped.append(f"{entry['rel'] or '.'}: its content is gone")
            continue
        else:
            result.restored += 1
    # a revealed directory shows everything below it again: hide what this item did not
    # hold (deleted earlier, and in the trash under its own entry)
    with ov.trash_paused():
        for rel in revealed_dirs:
            base = join(target, rel) if rel else target
            for name in ov.listdir(base):
                if join(rel, name) not in known:
                    ov.remove_tree(join(base, name))
    for entry in reversed(entries):  # directory times last, deepest first
        if entry["kind"] == "dir":
            with contextlib.suppress(FsError):
                ov.setattr(join(target, entry["rel"]) if entry["rel"] else target,
                           atime_ns=entry["atime_ns"], mtime_ns=entry["mtime_ns"])
    area.remove(item.id)
    return result


def _verify(area: TrashArea, item: TrashItem, entries: list[dict[str, Any]],
            open_source: SourceOpener) -> list[str]:
    problems = []
    for entry in entries:
        if entry["kind"] == "dir":
            continue
        name = entry["rel"] or item.path
        if entry.get("held"):
            rel = item.data_rel(entry["rel"])
            if not _unchanged(area.host, rel, entry, True):
                problems.append(f"{name}: held data missing or not what was deleted")
            continue
        src = open_source(entry.get("source") or {})
        if src is None or src[0].try_lstat(src[1]) is None:
            problems.append(f"{name}: the {_where(entry)} no longer has it")
        elif not _unchanged(src[0], src[1], entry, False):
            problems.append(f"{name}: the {_where(entry)} copy changed since the delete")
    return problems


def _unchanged(host: HostDir, rel: str, entry: dict[str, Any], held: bool) -> bool:
    """The content is still what the entry describes: by its stat stamp, or by its
    sha256 for entries that carry one."""
    st = host.try_lstat(rel)
    if st is None:
        return False
    if entry.get("stamp") is not None:
        return stamp_of(st, held) == list(entry["stamp"])
    return not entry.get("sha256") or sha256_of(host, rel, 1 << 62) == entry["sha256"]


def _where(entry: dict[str, Any]) -> str:
    layer = (entry.get("source") or {}).get("layer")
    return "base" if layer is None else f"layer {layer}"


def _put_back(area: TrashArea, item: TrashItem, entry: dict[str, Any], path: str,
              ov: Overlay, open_source: SourceOpener, in_place: bool) -> str:
    kind = entry["kind"]
    if in_place and not entry.get("held") and ov.reveal(path):
        return "revealed"
    if ov.exists(path):
        # shown again with a revealed parent: lower content, which is what was hidden
        current = kind_of(ov.getattr(path).mode)
        if current == kind and (kind == "dir" or (in_place and not entry.get("held"))):
            return "revealed"
        with ov.trash_paused():  # the parent's lower copy of a file the branch had changed
            ov.remove_tree(path)
    if kind == "dir":
        ov.mkdir(path, entry["mode"] & 0o7777, entry["uid"], entry["gid"])
        _set_xattrs(ov, path, entry)
        return "restored"
    if entry.get("held"):
        ov.adopt(path, area.host, item.data_rel(entry["rel"]))
        return "restored"
    src = open_source(entry.get("source") or {})
    if src is None or src[0].try_lstat(src[1]) is None:
        return "skipped"
    host, rel = src
    if kind == "symlink":
        ov.symlink(path, host.readlink(rel), entry["uid"], entry["gid"])
    elif kind == "file":
        fh, _ = ov.create(path, os.O_WRONLY, entry["mode"] & 0o7777, entry["uid"], entry["gid"])
        try:
            fd = host.open_quiet(rel, os.O_RDONLY)
            try:
                offset = 0
                while chunk := os.read(fd, 1 << 20):
                    offset += ov.write(fh, offset, chunk)
            finally:
                os.close(fd)
        finally:
            ov.release(fh)
        _set_xattrs(ov, path, entry)
    else:
        ov.mknod(path, entry["mode"], entry["rdev"], entry["uid"], entry["gid"])
    if kind != "symlink":
        ov.setattr(path, mode=stat.S_IMODE(entry["mode"]), atime_ns=entry["atime_ns"],
                   mtime_ns=entry["mtime_ns"])
    return "copied"


def _set_xattrs(ov: Overlay, path: str, entry: dict[str, Any]) -> None:
    for name, value in (entry.get("xattrs") or {}).items():
        with contextlib.suppress(FsError, OSError):
            ov.setxattr(path, name, base64.b64decode(value))
