"""`agentfs fsck [--repair] [--json]`: check the store, repair what is safe."""

from __future__ import annotations

import typer

from agentfs.branches.store import Store
from agentfs.cli.common import print_json
from agentfs.errors import EXIT_DAMAGED, EXIT_OK
from agentfs.workflow.fsck import Finding, Report
from agentfs.workflow.fsck import fsck as run_fsck


def fsck(ctx: typer.Context,
         repair: bool = typer.Option(False, "--repair",
                                     help="fix what is safe to fix (refused while the "
                                          "store is mounted)"),
         as_json: bool = typer.Option(False, "--json", help="the report as JSON"),
         ) -> int:
    """Check the store's invariants: layers, markers, trash, journals, audit log.

    Without --repair nothing is changed.  Exit 0: clean (or everything found was
    repaired); 7: problems remain."""
    # the store as it is: open_store would finish an interrupted commit first, and
    # that is a repair this command reports before it makes it
    store = Store.find(ctx.obj.get("store") if ctx.obj else None)
    try:
        report = run_fsck(store, repair)
    finally:
        store.close()
    if as_json:
        print_json(report.as_dict())
    else:
        _print(report)
    return EXIT_OK if report.clean else EXIT_DAMAGED


def _print(report: Report) -> None:
    checked = ", ".join(f"{n} {what}" for what, n in report.checked.items()) or "nothing"
    typer.echo(f"store {report.store}: checked {checked}")
    for skipped in report.skipped:
        typer.echo(f"  skipped: {skipped}")
    for f in report.findings:
        typer.echo(f"  {_label(f, report.repair):<10} {f.kind}: {f.where}: {f.detail}"
                   + (f" -> {f.action}" if f.action else ""))
    remaining = [f for f in report.findings if f.open]
    if not remaining:
        repaired = sum(f.repaired for f in report.findings)
        typer.echo(f"clean ({repaired} repaired)" if repaired else "clean")
        return
    fixable = sum(f.safe for f in remaining)
    hint = f"; {fixable} can be repaired with --repair" if fixable and not report.repair \
        else ""
    typer.echo(f"{len(remaining)} problem(s) remain{hint}")


def _label(f: Finding, repairing: bool) -> str:
    if f.notice:
        return "notice"
    if f.repaired:
        return "repaired"
    if f.safe and not repairing:
        return "fixable"
    return "problem"
