"""`agentfs trash list | show | restore | purge | retention`."""

from __future__ import annotations

import datetime as dt
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from agentfs.cli.common import open_store, print_json
from agentfs.errors import MountError, NotFoundError, UsageError, UserError
from agentfs.mount import control
from agentfs.mount.view import open_branch_view
from agentfs.trash.service import Trash
from agentfs.units import format_size

app = typer.Typer(help="Deleted files and trees, kept for restoring.", no_args_is_help=True)


def _when(ts: Any) -> str:
    return dt.datetime.fromtimestamp(float(ts or 0), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command("list")
def list_(ctx: typer.Context, branch: str | None = typer.Option(None, "--branch", "-b"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Trash entries, oldest first."""
    store = open_store(ctx)
    trash = Trash(store)
    items = [i for i in trash.area.items() if branch is None or i.branch == branch]
    if as_json:
        print_json([i.public() for i in items])
        return
    table = Table(title=f"trash of {store.base}", expand=False)
    for col in ("id", "deleted (UTC)", "branch", "path", "kind", "size", "by"):
        table.add_column(col)
    for i in items:
        m = i.meta
        kind = m.get("kind", "?")
        if kind == "tree":
            kind = f"tree ({len(m.get('entries', []))})"
        if m.get("state") != "final":
            kind += f" [{m.get('state')}]"
        table.add_row(i.id, _when(m.get("deleted_at")), i.branch, i.path or "/", kind,
                      format_size(i.size), f"{m.get('pid')} {m.get('exe') or ''}".strip())
    Console().print(table)


@app.command("show")
def show(ctx: typer.Context, item_id: str = typer.Argument(..., metavar="ID"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """One entry with everything it holds."""
    item = _get(Trash(open_store(ctx)), item_id)
    if as_json:
        print_json(item.meta)
        return
    m = item.meta
    typer.echo(f"{item.id}  {m.get('kind')}  {item.branch}:{item.path}  deleted "
               f"{_when(m.get('deleted_at'))} UTC by pid {m.get('pid')} {m.get('exe')} "
               f"({m.get('reason')})")
    for e in m.get("entries", []):
        where = "held" if e.get("held") else f"hidden in {_source(e)}"
        typer.echo(f"  {e['rel'] or '.':40} {e['kind']:8} {e['size']:>10}  "
                   f"{(e.get('sha256') or '')[:12]:12}  {where}")


@app.command("restore")
def restore(ctx: typer.Context, item_id: str = typer.Argument(..., metavar="ID"),
            to: str | None = typer.Option(None, "--to", help="path in the branch (default: "
                                                             "where it was)"),
            force: bool = typer.Option(False, "--force",
                                       help="overwrite what is there now (it goes to the "
                                            "trash) and skip hash checks")) -> None:
    """Put an entry back into its branch (through the mount if the branch is mounted)."""
    store = open_store(ctx)
    trash = Trash(store)
    item = _get(trash, item_id)
    for m in store.mounts():
        if m.mode == "per-process" or m.branch == item.branch:
            try:
                reply = control.request(control.socket_path(store.root, m.pid),
                                        {"op": "trash_restore", "branch": item.branch,
                                         "id": item.id, "to": to, "force": force})
            except OSError as exc:
                raise MountError(f"cannot reach the daemon of {m.mountpoint}: {exc}") from None
            if not reply.get("ok"):
                raise UserError(str(reply.get("error")))
            _report(reply)
            return
    ov = open_branch_view(store, item.branch, "a trash restore")
    try:
        ov.trash = trash.sink(item.branch)
        result = trash.restore_into(ov, item.id, to, force)
    finally:
        ov.close()
        trash.close()  # what the restore put in the trash becomes item files
    _report(result.__dict__)


def _report(r: dict[str, Any]) -> None:
    typer.echo(f"restored {r['item']} to {r['path'] or '/'} ({r['restored']} moved back, "
               f"{r['revealed']} shown again, {r['copied']} copied)")
    for problem in r.get("skipped", []):
        typer.echo(f"  not restored: {problem}", err=True)


@app.command("purge")
def purge(ctx: typer.Context,
          older_than: str | None = typer.Option(None, "--older-than", help="e.g. 7d, 12h"),
          max_size: str | None = typer.Option(None, "--max-size", help="e.g. 5GiB"),
          dry_run: bool = typer.Option(False, "--dry-run"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Delete entries for good: by age, then oldest first down to a size (without
    limits: the store's retention settings)."""
    store = open_store(ctx)
    trash = Trash(store)
    trash.purge(older_than, max_size, True)  # the limits are checked before any daemon sees them
    # a running mount's daemon purges: besides the item files it sees what only its
    # memory holds (records it could not write yet, on a full disk), which would look
    # like data without a record from here
    gone: list[dict[str, Any]] = []
    seen: set[Any] = set()
    answered = False
    for m in store.mounts():
        try:
            reply = control.request(control.socket_path(store.root, m.pid),
                                    {"op": "trash_purge", "older_than": older_than,
                                     "max_size": max_size, "dry_run": dry_run}, timeout=60)
        except OSError:
            continue  # gone meanwhile
        if not reply.get("ok"):
            raise UserError(f"the daemon of {m.mountpoint}: {reply.get('error')}")
        answered = True
        for i in reply.get("purged", []):
            if i.get("id") not in seen:
                seen.add(i.get("id"))
                gone.append(i)
    if not answered:
        gone = [i.public() for i in trash.purge(older_than, max_size, dry_run)]
    if as_json:
        print_json({"dry_run": dry_run, "purged": gone})
        return
    verb = "would purge" if dry_run else "purged"
    for i in gone:
        typer.echo(f"{verb} {i['id']} {i.get('branch')}:{i.get('path')} "
                   f"({format_size(i.get('held_bytes') or 0)})")
    typer.echo(f"{verb} {len(gone)} entries, "
               f"{format_size(sum(i.get('held_bytes') or 0 for i in gone))}")


@app.command("retention")
def retention(ctx: typer.Context,
              max_age: str | None = typer.Option(None, "--max-age", help="e.g. 30d"),
              max_size: str | None = typer.Option(None, "--max-size", help="e.g. 10GiB"),
              hash_limit: str | None = typer.Option(None, "--hash-limit",
                                                    help="hash deleted files up to this size")
              ) -> None:
    """Show or set how long and how much the trash keeps (mounts apply it every 10 min)."""
    r = Trash(open_store(ctx)).set_retention(max_age, max_size, hash_limit)
    typer.echo(f"max age {r.max_age / 86400:g} days, max size {format_size(r.max_size)}, "
               f"hash files up to {format_size(r.hash_limit)}")


def _get(trash: Trash, item_id: str) -> Any:
    try:
        return trash.area.get(item_id)
    except KeyError:
        raise NotFoundError(f"no trash entry {item_id!r} (see `agentfs trash list`)") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _source(entry: dict[str, Any]) -> str:
    layer = (entry.get("source") or {}).get("layer")
    return "the base" if layer is None else f"layer {layer}"
