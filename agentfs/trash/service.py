"""The trash of one store: retention settings, per-branch sinks, restore, purge."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from agentfs.branches.store import Store
from agentfs.errors import UserError
from agentfs.overlay.engine import Overlay
from agentfs.overlay.hostio import HostDir
from agentfs.trash.area import (
    DEFAULT_HASH_LIMIT,
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_SIZE,
    FLUSH_AGE,
    TrashArea,
    TrashItem,
)
from agentfs.trash.restore import RestoreResult, restore
from agentfs.trash.sink import TrashSink, finalize_stale
from agentfs.units import parse_duration, parse_size


@dataclass(frozen=True)
class Retention:
    max_age: float = DEFAULT_MAX_AGE
    max_size: int = DEFAULT_MAX_SIZE
    hash_limit: int = DEFAULT_HASH_LIMIT


class Trash:
    """Trash operations that need the store (where layers and the base are)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.area = TrashArea(store.root)
        self._hosts: dict[tuple[int | None, str], HostDir] = {}

    def close(self) -> None:
        for host in self._hosts.values():
            host.close()
        self._hosts.clear()
        self.area.close()

    # -- settings -------------------------------------------------------------------
    def retention(self) -> Retention:
        age, size, hashed = (self.store.info("trash.max_age"), self.store.info("trash.max_size"),
                             self.store.info("trash.hash_limit"))
        return Retention(float(age) if age else DEFAULT_MAX_AGE,
                         int(size) if size else DEFAULT_MAX_SIZE,
                         int(hashed) if hashed else DEFAULT_HASH_LIMIT)

    def set_retention(self, max_age: str | None, max_size: str | None,
                      hash_limit: str | None) -> Retention:
        try:
            if max_age is not None:
                self.store.set_info("trash.max_age", str(parse_duration(max_age)))
            if max_size is not None:
                self.store.set_info("trash.max_size", str(parse_size(max_size)))
            if hash_limit is not None:
                self.store.set_info("trash.hash_limit", str(parse_size(hash_limit)))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return self.retention()

    def finalize_stale(self) -> int:
        return finalize_stale(self.area, self.retention().hash_limit)

    def flush_due(self) -> int:
        """Write the records pending in this process's journal that are due as files."""
        return self.area.flush(FLUSH_AGE)

    def sink(self, branch: str) -> TrashSink:
        return TrashSink(self.area, branch, self.retention().hash_limit)

    # -- using it ---------------------------------------------------------------------
    def open_source(self, source: dict[str, Any]) -> tuple[HostDir, str] | None:
        """Where a hidden entry's content lives (the base or a store layer)."""
        layer, where, rel = source.get("layer"), source.get("host", "tree"), source.get("rel")
        if rel is None:
            return None
        key = (layer, where)
        host = self._hosts.get(key)
        if host is None:
            root = self.store.base if layer is None else self.store.layer_dir(int(layer)) / where
            if not os.path.isdir(root):
                return None
            host = self._hosts[key] = HostDir(str(root))
        return host, str(rel)

    def restore_into(self, ov: Overlay, item_id: str, to: str | None, force: bool
                     ) -> RestoreResult:
        return restore(self.area, item_id, ov, self.open_source, to, force)

    def purge(self, older_than: str | None, max_size: str | None, dry_run: bool
              ) -> list[TrashItem]:
        """Purge by the given limits, or by the store's retention when none is given."""
        try:
            age = parse_duration(older_than) if older_than else None
            size = parse_size(max_size) if max_size else None
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if age is None and size is None:
            r = self.retention()
            age, size = r.max_age, r.max_size
        return self.area.purge(age, size, dry_run)
