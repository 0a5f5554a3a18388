"""`agentfs doctor [--json]`: what this machine offers agentfs, and what is missing."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

from agentfs import capabilities
from agentfs.capabilities import MISSING, NOT_APPLICABLE, Report
from agentfs.cli.common import print_json
from agentfs.errors import EXIT_MOUNT, EXIT_OK

# what each feature is, for the verdict
FEATURES = (("mount", "agentfs mount --branch"), ("mount --per-process",
                                                  "agentfs mount --per-process"),
            ("umount", "agentfs umount"), ("run", "agentfs run"))


def doctor(as_json: bool = typer.Option(False, "--json", help="the report as JSON")) -> int:
    """What this machine offers agentfs (FUSE, root, namespaces), and how to fix the rest.

    Needs no store.  Exit 0: everything a mount needs is here (a missing piece
    only `agentfs run` needs is reported but does not fail); 5: something a
    mount needs is missing.  AGENTFS_DOCTOR_FUSE_DEVICE makes the FUSE-device
    probe look at another path than /dev/fuse (a test knob)."""
    report = capabilities.report()
    if as_json:
        print_json(report.as_dict())
    else:
        _print(report)
    return EXIT_OK if report.ok else EXIT_MOUNT


def _print(report: Report) -> None:
    """One line a check (name, status, what was found, what needs it), then each
    missing piece's consequence and fix, then the verdict.  Plain lines rather than a
    table: details stay whole (no wrapping, no ellipsis) in a pipe or a log."""
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"agentfs doctor: {report.platform}")
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        style = {MISSING: "bold red", NOT_APPLICABLE: "dim"}.get(c.status, "green")
        line = Text(f"  {c.name:<{width}}  ")
        line.append(f"{c.status:<14}", style=style)
        line.append(f"  {c.detail}")
        if c.needed_for:
            line.append(f"  [{', '.join(c.needed_for)}]", style="dim")
        console.print(line)
    for c in report.checks:
        if c.status == MISSING:
            console.print(Text(f"\n{c.name}: {c.detail}", style="bold"))
            console.print(Text(f"  consequence: {c.consequence}"))
            console.print(Text(f"  fix: {c.fix}"))
    console.print()
    console.print(Text(_verdict(report), style="bold green" if report.ok else "bold red"))


def _verdict(report: Report) -> str:
    """One line: can agentfs mount here, and which features a missing piece stops."""
    blocked = [label for feature, label in FEATURES if report.missing_for(feature)]
    if not report.ok:
        return f"NOT READY: agentfs cannot mount here ({len(report.missing_for('mount'))} " \
               f"missing piece(s)); unavailable: {', '.join(blocked)}"
    if blocked:
        return f"ready to mount; unavailable here: {', '.join(blocked)} (see above)"
    return "ready: everything agentfs uses is here"
