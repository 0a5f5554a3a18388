"""`agentfs init` and `agentfs status`."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from agentfs.branches.store import Store
from agentfs.cli.common import open_store, print_json


def init(ctx: typer.Context, base: Path = typer.Argument(..., help="the project directory"),
         ) -> None:
    """Create a store for BASE (where: --store DIR, else under $AGENTFS_HOME/stores)."""
    explicit = Path(ctx.obj["store"]) if ctx.obj.get("store") else None
    s = Store.create(base, explicit)
    typer.echo(f"initialised store {s.root} for base {s.base}")


def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show the store, its branches and live mounts."""
    s = open_store(ctx)
    branches, mounts = s.branches(), s.mounts()
    sessions = {m.mountpoint: _sessions(s, m.pid) for m in mounts if m.mode == "per-process"}
    audit = {m.mountpoint: _audit(s, m.pid) for m in mounts}
    if as_json:
        print_json({"store": str(s.root), "base": str(s.base),
                    "branches": [{"name": b.name, "parent": b.parent, "created": b.created,
                                  "layers": list(b.layer_stack)} for b in branches],
                    "mounts": [{**asdict(m), "sessions": sessions.get(m.mountpoint, []),
                                "audit": audit.get(m.mountpoint)} for m in mounts]})
        return
    console = Console()
    console.print(f"store: {s.root}\nbase:  {s.base}")
    table = Table("branch", "parent", "created", "mounted at")
    for b in branches:
        at = ", ".join(m.mountpoint for m in mounts if m.branch == b.name)
        table.add_row(b.name, b.parent or "(base)", f"{b.created:%Y-%m-%d %H:%M:%S}", at or "-")
    console.print(table)
    for mountpoint, stats in audit.items():  # only when something is wrong
        if stats and (stats.get("dropped") or not stats.get("healthy", True)):
            state = "" if stats.get("healthy", True) else \
                f", not writable now ({stats.get('last_error')})"
            console.print(f"audit log of {mountpoint}: {stats.get('dropped')} events "
                          f"dropped{state}", markup=False)
    for mountpoint, rows in sessions.items():
        console.print(f"sessions on {mountpoint}:" + ("" if rows else " none"))
        for r in rows:
            since = datetime.fromtimestamp(r["started"]).strftime("%Y-%m-%d %H:%M:%S")
            console.print(f"  pid {r['pid']}  {r['branch']}  since {since}  {r['command']}")


def _sessions(store: Store, pid: int) -> list[dict[str, Any]]:
    from agentfs.mount import control

    try:
        reply = control.request(control.socket_path(store.root, pid), {"op": "sessions"},
                                timeout=5)
    except OSError:
        return []
    return list(reply.get("sessions", []))


def _audit(store: Store, pid: int) -> dict[str, Any] | None:
    """A running mount's audit counters (written, dropped, ...), None if unknown."""
    from agentfs.mount import control

    try:
        reply = control.request(control.socket_path(store.root, pid), {"op": "audit"},
                                timeout=5)
    except OSError:
        return None
    stats = reply.get("audit")
    return dict(stats) if isinstance(stats, dict) else None
