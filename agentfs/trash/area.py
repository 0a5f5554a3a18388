"""The store's trash area: one directory per deleted thing, with its data and a record.

    <store>/trash/items/<id>.json   what was deleted, where, by whom, how to restore
    <store>/trash/items/<id>.data   the content the branch held (a file, or for a
                                    deleted tree a directory of what it held)

(flat, so deleting a file costs a rename and one small file write, all relative to
one cached directory fd)

Content that lived in the branch's own layer is *moved* here (a rename, no copy).
Content that lived below (the base, or a frozen parent layer) was never destroyed, only
hidden by a whiteout: its entry points at it (`source`) and carries its sha256, so a
restore can tell whether it is still the same.

Ids are time-ordered (hex microseconds + a counter), so `ls` and sorting by id is
sorting by deletion time.  Records are written to a temporary name and renamed, so
a crash leaves either no record or a whole one; data without a record is an
interrupted deletion and is shown (and purged) as such.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agentfs.overlay.hostio import HostDir

META: Final = ".json"
DATA: Final = ".data"
DEFAULT_MAX_AGE: Final = 30 * 86400.0
DEFAULT_MAX_SIZE: Final = 10 << 30
DEFAULT_HASH_LIMIT: Final = 64 << 20

_seq = itertools.count()


def new_id() -> str:
    return f"{time.time_ns() // 1000:013x}{next(_seq) % 4096:03x}"


@dataclass
class TrashItem:
    id: str
    meta: dict[str, Any]

    @property
    def deleted_at(self) -> float:
        return float(self.meta.get("deleted_at", 0.0))

    @property
    def size(self) -> int:
        return int(self.meta.get("size", 0))

    @property
    def held_bytes(self) -> int:
        return int(self.meta.get("held_bytes", 0))

    @property
    def branch(self) -> str:
        return str(self.meta.get("branch", ""))

    @property
    def path(self) -> str:
        return str(self.meta.get("path", ""))

    def data_rel(self, rel: str = "") -> str:
        """Path of an entry's held data relative to the items directory."""
        return f"{self.id}{DATA}" + (f"/{rel}" if rel else "")

    def public(self) -> dict[str, Any]:
        m = self.meta
        return {"id": self.id, "branch": m.get("branch"), "path": m.get("path"),
                "kind": m.get("kind"), "size": m.get("size"), "entries": len(m.get("entries", [])),
                "deleted_at": m.get("deleted_at"), "reason": m.get("reason"),
                "pid": m.get("pid"), "exe": m.get("exe"), "state": m.get("state"),
                "sha256": (m.get("entries") or [{}])[0].get("sha256")
                if m.get("kind") != "tree" else None}


class TrashArea:
    """The trash directory of one store."""

    def __init__(self, store_root: Path) -> None:
        self.root = store_root / "trash" / "items"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._host: HostDir | None = None

    @property
    def host(self) -> HostDir:
        """The items directory as a HostDir, for renames to and from layer trees."""
        if self._host is None:
            self._host = HostDir(str(self.root))
        return self._host

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None

    def create(self) -> str:
        return new_id()

    def write(self, item_id: str, meta: dict[str, Any]) -> None:
        tmp = f"{item_id}{META}.tmp"
        fd = self.host.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(meta).encode())
        finally:
            os.close(fd)
        self.host.rename_to(tmp, self.host, f"{item_id}{META}")

    def get(self, item_id: str) -> TrashItem:
        """An item by id or unique id prefix (KeyError / ValueError if none / several)."""
        path = self.root / f"{item_id}{META}"
        if not item_id or not path.is_file():
            matches = sorted({p.name.split(".")[0] for p in self.root.iterdir()
                              if p.name.startswith(item_id)}) if item_id else []
            if len(matches) > 1:
                raise ValueError(f"{item_id!r} matches {len(matches)} trash entries")
            if not matches or not (self.root / f"{matches[0]}{META}").is_file():
                raise KeyError(item_id)
            item_id = matches[0]
            path = self.root / f"{item_id}{META}"
        return TrashItem(item_id, json.loads(path.read_text()))

    def items(self) -> Iterator[TrashItem]:
        """Every item, oldest first (data without a record gets a stub record)."""
        names = sorted(os.listdir(self.root))
        ids = sorted({n.split(".")[0] for n in names if n.endswith((META, DATA))})
        for item_id in ids:
            try:
                meta = json.loads((self.root / f"{item_id}{META}").read_text())
            except (OSError, ValueError):
                data = self.root / f"{item_id}{DATA}"
                if not os.path.lexists(data):
                    continue
                meta = {"id": item_id, "state": "incomplete", "kind": "?", "path": "?",
                        "deleted_at": data.lstat().st_mtime, "size": _du(data),
                        "held_bytes": _du(data), "entries": []}
            yield TrashItem(item_id, meta)

    def remove(self, item_id: str) -> None:
        data = self.root / f"{item_id}{DATA}"
        if data.is_dir() and not data.is_symlink():
            shutil.rmtree(data, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                data.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{item_id}{META}").unlink()

    def purge(self, older_than: float | None = None, max_size: int | None = None,
              dry_run: bool = False, now: float | None = None) -> list[TrashItem]:
        """Remove items deleted more than *older_than* seconds ago, then the oldest
        until what is held fits *max_size* bytes; return what was (or would be) removed.
        Items whose file is still open somewhere are kept."""
        now = time.time() if now is None else now
        items = [i for i in self.items() if i.meta.get("state") != "open"]
        doomed: list[TrashItem] = []
        if older_than is not None:
            doomed = [i for i in items if now - i.deleted_at > older_than]
        if max_size is not None:
            kept = [i for i in items if i not in doomed]
            total = sum(i.held_bytes for i in kept)
            for item in kept:  # oldest first
                if total <= max_size:
                    break
                doomed.append(item)
                total -= item.held_bytes
        if not dry_run:
            for item in doomed:
                self.remove(item.id)
        return doomed


def _du(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
