"""`agentfs branch ...`."""

from __future__ import annotations

from typing import Any

import typer

from agentfs.cli.common import open_store, print_json

app = typer.Typer(help="Create and list branches.", no_args_is_help=True)


@app.command("create")
def create(ctx: typer.Context, name: str,
           from_branch: str | None = typer.Option(None, "--from",
                                                  help="fork this branch (default: the base)")
           ) -> None:
    """Create branch NAME (an O(1) fork of the base or of another branch)."""
    s = open_store(ctx)
    info = s.create_branch(name, from_branch)
    typer.echo(f"created branch {info.name} from {from_branch or 'the base'}")


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """List branches."""
    s = open_store(ctx)
    mounts = s.mounts()
    rows: list[dict[str, Any]] = [
        {"name": b.name, "parent": b.parent, "created": b.created, "state": b.state,
             "mounts": [m.mountpoint for m in mounts if m.branch == b.name]}
            for b in s.branches()]
    if as_json:
        print_json(rows)
        return
    for r in rows:
        where = f"  mounted at {', '.join(r['mounts'])}" if r["mounts"] else ""
        typer.echo(f"{r['name']}\t(from {r['parent'] or 'base'}){where}")
