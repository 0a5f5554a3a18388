"""Collected samples and their presentation: a Markdown report and a JSON file.

Cells show the median time and how many times slower it is than the plain directory and
than fuse-overlayfs (the usual userspace overlay): ``0.52 s (3.1x plain, 1.2x f-o)``.
A factor above 1 is slower, below 1 faster.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.workloads import Metric

BASELINE = "plain"
REFERENCE = "fuse-overlayfs"
REFERENCE_SHORT = "f-o"


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
    runs: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def cell(self, metric: str, target: str) -> Cell:
        return self.cells.setdefault((metric, target), Cell())

    def ratio(self, metric: str, target: str, ref: str) -> float | None:
        """median(target) / median(ref): times slower than ``ref``; None if either is
        missing (or ``ref`` did not run)."""
        if ref not in self.targets or target == ref:
            return None
        value = self.cell(metric, target).median
        base = self.cell(metric, ref).median
        if value is None or base is None or value <= 0 or base <= 0:
            return None
        return value / base

    def geomean_ratio(self, target: str, ref: str) -> tuple[float, int] | None:
        """Geometric mean of the ratios over the rows where both have a median."""
        ratios = [r for m in self.metrics if (r := self.ratio(m.key, target, ref)) is not None]
        if not ratios:
            return None
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios)), len(ratios)

    def errors(self) -> list[str]:
        """Distinct failure messages, for notes under the table."""
        out: list[str] = []
        for (metric, target), cell in self.cells.items():
            for err in dict.fromkeys(cell.errors):
                n = cell.errors.count(err)
                times = f" ({n}x)" if n > 1 else ""
                out.append(f"{target} / {metric}{times}: {err}")
        return out


def format_seconds(value: float) -> str:
    """Three significant digits; milliseconds below a second."""
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 10:
        return f"{value:.1f} s"
    if value >= 1:
        return f"{value:.2f} s"
    ms = value * 1000
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def format_factor(factor: float) -> str:
    if factor >= 100:
        return f"{factor:.0f}x"
    if factor >= 10:
        return f"{factor:.1f}x"
    return f"{factor:.2f}x"


def _factors(target: str, ratio_of: Callable[[str, str], float | None]) -> str:
    parts = []
    for ref, short in ((BASELINE, BASELINE), (REFERENCE, REFERENCE_SHORT)):
        r = ratio_of(target, ref)
        if r is not None:
            parts.append(f"{format_factor(r)} {short}")
    return f" ({', '.join(parts)})" if parts else ""


def cell_text(results: Results, metric: Metric, target: str) -> str:
    cell = results.cell(metric.key, target)
    if cell.median is None:
        return "error" if cell.errors else "n/a"
    text = format_seconds(cell.median)
    text += _factors(target, lambda t, ref: results.ratio(metric.key, t, ref))
    if cell.errors:
        text += f" !{len(cell.errors)}"
    return text


def _geomean_text(results: Results, target: str) -> str:
    def ratio_of(t: str, ref: str) -> float | None:
        got = results.geomean_ratio(t, ref)
        return got[0] if got else None

    text = _factors(target, ratio_of).strip()
    return text.strip("()") if text else "-"


def markdown_table(results: Results) -> str:
    """The table of medians, GitHub-flavoured, with its legend."""
    header = ["workload", *results.targets]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    for m in results.metrics:
        cells = [cell_text(results, m, t) for t in results.targets]
        lines.append("| " + " | ".join([m.label, *cells]) + " |")
    geo = [_geomean_text(results, t) for t in results.targets]
    lines.append("| " + " | ".join(["**geometric mean of the factors**", *geo]) + " |")
    repeat = results.meta.get("repeat", "?")
    lines += [
        "",
        f"_Median of {repeat} run(s), each on a fresh base and a fresh mount. "
        f"(Nx {BASELINE}, Mx {REFERENCE_SHORT}) = times slower than the plain directory "
        f"and than {REFERENCE} (below 1 = faster). n/a = not measured; error = every run "
        "failed; !N = N runs failed (see the notes)._",
    ]
    return "\n".join(lines)


def notes(results: Results) -> list[str]:
    """Skipped targets and failures: a table cell alone cannot say why."""
    out = [f"skipped {name}: {reason}" for name, reason in results.skipped.items()]
    out += [f"error {line}" for line in results.errors()]
    return out


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    m = meta.get("machine", {})
    v = meta.get("versions", {})
    repo = meta.get("repo", {})
    dirty = " (with uncommitted changes)" if repo.get("dirty") else ""
    end = meta.get("repo_end")
    if end and (end.get("commit"), end.get("agentfs_diff_sha256")) != (
        repo.get("commit"), repo.get("agentfs_diff_sha256")
    ):
        dirty += "; **the agentfs code changed during the run** (at the end: "
        dirty += f"{end.get('describe')})"
    load = meta.get("loadavg", {})
    lines = [
        f"- date: {meta.get('date')}, duration {meta.get('duration_s', 0) / 60:.1f} min; "
        f"command: `{meta.get('command')}`",
        f"- commit: {repo.get('describe')}{dirty}",
        f"- machine: {m.get('cpu_model')}, {m.get('cpus')} CPUs, {m.get('mem_gib')} GiB RAM; "
        f"{m.get('distro')}, Linux {m.get('kernel')}",
        f"- --root {m.get('root')} on {m.get('root_fs')} ({m.get('root_device')}"
        + {True: ", journaled", False: ", no journal"}.get(m.get("root_journal"), "") + ")",
        f"- load average (1 min) at start {load.get('start')}, at end {load.get('end')}",
        "- versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
    ]
    return lines


def markdown_report(results: Results) -> str:
    """The whole Markdown file: context, the table, the notes."""
    parts = ["# agentfs benchmark", "", *_meta_lines(results.meta), "", markdown_table(results)]
    extra = notes(results)
    if extra:
        parts += ["", "Notes:", "", *(f"- {line}" for line in extra)]
    return "\n".join(parts) + "\n"


def to_json(results: Results) -> dict[str, Any]:
    """Machine-readable results, with every sample, for later comparison."""
    data: dict[str, Any] = {
        "meta": results.meta,
        "targets": results.targets,
        "skipped": results.skipped,
        "metrics": {},
        "geomean": {},
        "runs": results.runs,
    }
    for m in results.metrics:
        entry: dict[str, Any] = {"label": m.label, "unit": "s", "results": {}}
        for t in results.targets:
            cell = results.cell(m.key, t)
            entry["results"][t] = {
                "median": cell.median,
                "vs_plain": results.ratio(m.key, t, BASELINE),
                "vs_fuse_overlayfs": results.ratio(m.key, t, REFERENCE),
                "samples": cell.samples,
                "errors": cell.errors,
            }
        data["metrics"][m.key] = entry
    for t in results.targets:
        data["geomean"][t] = {
            "vs_plain": results.geomean_ratio(t, BASELINE),
            "vs_fuse_overlayfs": results.geomean_ratio(t, REFERENCE),
        }
    return data


def write_json(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_json(results), indent=2) + "\n")
    tmp.replace(path)


def write_markdown(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(markdown_report(results))
    tmp.replace(path)
