"""Collected samples and their presentation: rich/plain table, GitHub markdown, JSON.

Cells show the median and the slowdown versus the plain directory. The factor is always
"times slower than plain" (>1 is worse), also for throughput rows, so a reader can scan a
column without remembering which rows are times and which are rates.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bench.workloads import Metric

BASELINE = "plain"


@dataclass
class Cell:
    """All samples (and failures) of one metric on one target."""

    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


@dataclass
class Results:
    """Everything one harness run produced, in report order."""

    metrics: list[Metric]
    targets: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def cell(self, metric: str, target: str) -> Cell:
        return self.cells.setdefault((metric, target), Cell())

    def slowdown(self, metric: Metric, target: str) -> float | None:
        """How many times slower than plain; None without a usable baseline."""
        value = self.cell(metric.key, target).median
        base = self.cell(metric.key, BASELINE).median if BASELINE in self.targets else None
        if value is None or base is None or value <= 0 or base <= 0:
            return None
        return base / value if metric.higher_is_better else value / base

    def errors(self) -> list[str]:
        """Distinct failure messages, for a footnote under the table."""
        out: list[str] = []
        for (metric, target), cell in self.cells.items():
            for err in dict.fromkeys(cell.errors):
                out.append(f"{target} / {metric}: {err}")
        return out


def format_value(value: float, unit: str) -> str:
    """Three significant-ish digits: enough to compare, few enough to read."""
    if unit == "MiB/s":
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_factor(factor: float) -> str:
    if factor >= 100:
        return f"{factor:.0f}x"
    if factor >= 10:
        return f"{factor:.1f}x"
    return f"{factor:.2f}x"


def cell_text(results: Results, metric: Metric, target: str) -> str:
    cell = results.cell(metric.key, target)
    if cell.median is None:
        return "error" if cell.errors else "n/a"
    text = format_value(cell.median, metric.unit)
    factor = results.slowdown(metric, target)
    if factor is not None:
        text += f" ({format_factor(factor)})"
    if cell.errors:
        text += " !"
    return text


def _rows(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["workload", *results.targets]
    rows = [
        [f"{m.label} [{m.unit}]", *(cell_text(results, m, t) for t in results.targets)]
        for m in results.metrics
    ]
    return header, rows


def _caption(results: Results) -> str:
    repeat = results.meta.get("repeat", "?")
    return (
        f"median of {repeat} run(s); (Nx) = times slower than {BASELINE}, also for MiB/s; "
        "n/a = not measured; ! = some runs failed"
    )


def markdown_table(results: Results) -> str:
    """GitHub-flavoured markdown, meant to be pasted into bench/README.md."""
    header, rows = _rows(results)
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append(f"_{_caption(results)}_")
    return "\n".join(lines)


def plain_table(results: Results) -> str:
    """Fixed-width text for terminals without rich."""
    header, rows = _rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    lines.append(_caption(results))
    return "\n".join(lines)


def print_table(results: Results, out: TextIO) -> None:
    """Use rich when available (aligned, coloured); fall back to plain text."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(plain_table(results), file=out)
        return
    header, rows = _rows(results)
    table = Table(title="agentfs benchmark")
    table.add_column(header[0])
    for name in header[1:]:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*(escape(c) for c in row))  # "[s]" is not markup
    console = Console(file=out, width=max(120, 40 + 22 * len(results.targets)))
    console.print(table)
    console.print(_caption(results), markup=False, highlight=False)


def print_notes(results: Results, out: TextIO) -> None:
    """Skipped targets and failures: a table cell alone cannot say why."""
    for name, reason in results.skipped.items():
        print(f"skipped {name}: {reason}", file=out)
    for line in results.errors():
        print(f"error {line}", file=out)


def to_json(results: Results) -> dict[str, Any]:
    """Machine-readable results, including every sample, for later comparison."""
    data: dict[str, Any] = {
        "meta": results.meta,
        "targets": results.targets,
        "skipped": results.skipped,
        "metrics": {},
    }
    for m in results.metrics:
        entry: dict[str, Any] = {"label": m.label, "unit": m.unit, "results": {}}
        for t in results.targets:
            cell = results.cell(m.key, t)
            entry["results"][t] = {
                "median": cell.median,
                "slowdown_vs_plain": results.slowdown(m, t),
                "samples": cell.samples,
                "errors": cell.errors,
            }
        data["metrics"][m.key] = entry
    return data


def write_json(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results), indent=2) + "\n")
