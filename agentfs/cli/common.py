"""What every command shares: finding the store, printing, JSON output."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from agentfs.branches.store import Store


def open_store(ctx: typer.Context) -> Store:
    """The store for this command; a commit a killed process left half done is
    finished (or rolled back) first, so every command sees a consistent store."""
    from agentfs.workflow.commit import recover

    explicit = ctx.obj.get("store") if ctx.obj else None
    store = Store.find(explicit)
    recover(store)
    return store


def _default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat() + "Z"
    if isinstance(o, Path):
        return str(o)
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    raise TypeError(type(o).__name__)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=_default)
    sys.stdout.write("\n")
