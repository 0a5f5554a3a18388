"""`agentfs branch ...`."""

from __future__ import annotations

import sys
from typing import Any

import typer

from agentfs.cli.common import open_store, print_json
from agentfs.errors import UsageError

app = typer.Typer(help="Create and list branches.", no_args_is_help=True)


@app.command("create")
def create(ctx: typer.Context, name: str,
           from_branch: str | None = typer.Option(None, "--from",
                                                  help="fork this branch (default: the base)")
           ) -> None:
    """Create branch NAME (an O(1) fork of the base or of another branch)."""
    from agentfs.mount.lifecycle import fork_branch

    s = open_store(ctx)
    fork_branch(s, name, from_branch)
    typer.echo(f"created branch {name} from {from_branch or 'the base'}")


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = typer.Option(False, "--json"),
          discarded: bool = typer.Option(False, "--discarded",
                                         help="list discarded branches in the trash"),
          ) -> None:
    """List branches."""
    s = open_store(ctx)
    if discarded:
        from agentfs.workflow.discard import discarded_branches

        gone = discarded_branches(s)
        if as_json:
            print_json(gone)
        for d in [] if as_json else gone:
            typer.echo(f"{d['id']}\t{d['name']}\tdiscarded {d['discarded']}")
        return
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


@app.command("diff")
def diff(ctx: typer.Context, name: str,
         paths: list[str] | None = typer.Argument(None, help="limit to these paths"),
         stat_: bool = typer.Option(False, "--stat", help="a diffstat, as git diff --stat"),
         name_status: bool = typer.Option(False, "--name-status", help="status letter + path"),
         as_json: bool = typer.Option(False, "--json", help="machine-readable list"),
         color: str = typer.Option("auto", "--color", help="auto, always or never"),
         ) -> None:
    """What branch NAME changed since its fork point (read-only; works while mounted)."""
    from agentfs.cli import diff_output
    from agentfs.mount.view import open_branch_layers
    from agentfs.overlay.diff import ViewReader, diff_views
    from agentfs.overlay.resolve import Resolver

    s = open_store(ctx)
    layers = open_branch_layers(s, name)
    try:
        branch_view = Resolver(layers)
        fork_view = Resolver(layers[s.branch(name).own_layers:])
        changes = diff_views(branch_view, fork_view, paths or None)
        new, old = ViewReader(branch_view), ViewReader(fork_view)
        if as_json:
            rows = []
            for c in changes:
                row = c.as_dict()
                counts = diff_output.line_counts(c, new, old) if c.content_changed else (0, 0)
                row["binary"] = counts is None
                row["insertions"], row["deletions"] = counts or (0, 0)
                rows.append(row)
            print_json({"branch": name, "changes": rows})
        elif name_status:
            sys.stdout.write(diff_output.name_status(changes))
        elif stat_:
            sys.stdout.write(diff_output.diffstat(changes, new, old))
        else:
            use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
            diff_output.patch(changes, new, old, use_color)
    finally:
        for layer in layers:
            layer.close()


@app.command("commit")
def commit(ctx: typer.Context, name: str,
           into: str | None = typer.Option(None, "--into", help="the parent branch, or base"),
           dry_run: bool = typer.Option(False, "--dry-run", help="show what would change"),
           force: bool = typer.Option(False, "--force", help="take the branch's version on "
                                                             "conflicts"),
           paths: list[str] | None = typer.Option(None, "--paths", help="only these paths"),
           as_json: bool = typer.Option(False, "--json"),
           ) -> None:
    """Apply branch NAME's changes to the base (journaled, crash-safe, conflict-checked)."""
    from rich.progress import Progress

    from agentfs.workflow.commit import commit_branch

    s = open_store(ctx)
    show_bar = sys.stderr.isatty() and not as_json
    with Progress(transient=True, disable=not show_bar) as bar:
        task = bar.add_task(f"committing {name}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = commit_branch(s, name, into=into, dry_run=dry_run, force=force,
                               paths=paths or None, progress=progress)
    if as_json:
        print_json(report)
        return
    verb = "would apply" if dry_run else "applied"
    for c in report.changes:
        arrow = f"{c['old_path']} -> " if "old_path" in c else ""
        typer.echo(f"{c['status']}\t{arrow}{c['path']}")
    typer.echo(f"{verb} {len(report.changes)} change(s) from {name} to {report.target}"
               + (f" (commit {report.commit_id})" if report.commit_id else ""))
    _note_policy_change(name, report.target, report.changes, dry_run)


def _note_policy_change(name: str, target: str, changes: list[dict[str, str]],
                        dry_run: bool) -> None:
    """A commit into the base that touches the project policy changes the rules every
    later mount of the base enforces (agentfs/policy/layers.py): say so, once."""
    from agentfs.policy.layers import PROJECT_POLICY

    policy = "/".join(PROJECT_POLICY)
    touched = [c for c in changes if policy in (c.get("path"), c.get("old_path"))]
    if target != "base" or not touched:
        return
    when = "would change" if dry_run else "changed"
    typer.echo(f"note: this {when} the project policy {policy} ({touched[0]['status']}); "
               "mounts of this base enforce it from their next start or `agentfs policy "
               f"reload` (review it: agentfs branch diff {name} {policy})", err=True)


@app.command("discard")
def discard(ctx: typer.Context, name: str,
            yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
            purge: bool = typer.Option(False, "--purge", help="delete the data instead of "
                                                              "moving it to the trash"),
            force: bool = typer.Option(False, "--force", help="even if it has children"),
            ) -> None:
    """Remove branch NAME; its data goes to the store's trash unless --purge."""
    from agentfs.workflow.discard import discard_branch

    s = open_store(ctx)
    s.branch(name)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to discard {name!r} without --yes (no terminal to ask)")
        typer.confirm(f"discard branch {name!r}?", abort=True)
    trash = discard_branch(s, name, purge=purge, force=force)
    typer.echo(f"discarded {name}" + (f"; data kept in {trash}" if trash else "; data purged"))


@app.command("show")
def show(ctx: typer.Context, name: str,
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Parent, fork point, creation time, change counts, size on disk and mounts."""
    from collections import Counter

    from agentfs.mount.view import open_branch_layers
    from agentfs.overlay.diff import diff_views
    from agentfs.overlay.resolve import Resolver

    s = open_store(ctx)
    info = s.branch(name)
    layers = open_branch_layers(s, name)
    try:
        changes = diff_views(Resolver(layers), Resolver(layers[info.own_layers:]))
    finally:
        for layer in layers:
            layer.close()
    counts = Counter(c.status for c in changes
                     if not ((c.new or c.old) and (c.new or c.old).kind == "dir"  # type: ignore[union-attr]
                             and c.status in ("A", "D")))
    size = sum(f.stat().st_size for lid in info.layer_stack[:info.own_layers]
               for f in s.layer_dir(lid).rglob("*") if f.is_file() and not f.is_symlink())
    data = {"name": info.name, "parent": info.parent or None,
            "fork_point": f"layer {info.fork_layer}" if info.fork_layer else "base",
            "created": info.created, "layers": list(info.layer_stack),
            "changes": {"added": counts["A"], "modified": counts["M"], "deleted": counts["D"],
                        "renamed": counts["R"], "type_changed": counts["T"]},
            "size_bytes": size,
            "mounts": [m.mountpoint for m in s.mounts() if m.branch == name]}
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{v} {k}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        typer.echo(f"{key:11} {value}")


@app.command("restore")
def restore(ctx: typer.Context, trash_id: str = typer.Argument(..., help="from `branch list "
                                                                 "--discarded`"),
            as_name: str | None = typer.Option(None, "--as", help="restore under this name"),
            ) -> None:
    """Bring a discarded branch back from the store's trash."""
    from agentfs.workflow.discard import restore_branch

    name = restore_branch(open_store(ctx), trash_id, as_name)
    typer.echo(f"restored branch {name}")
