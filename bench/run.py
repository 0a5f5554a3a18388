"""Entry point: ``python -m bench`` (or ``python -m bench.run``); see bench/README.md.

The loop alternates the systems: for each repetition, for each workload, every target
gets its turn (in an order rotated from one repetition to the next), so a slow spell of
the machine hits all of them alike. Every single measurement gets a brand-new base
directory and a brand-new mount, so no run inherits caches, copied-up files or
whiteouts from another.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench.fixtures import ensure_source_tarball
from bench.machine import agentfs_environment, machine_info, repo_state, tool_versions
from bench.report import Results, markdown_table, notes, write_json, write_markdown
from bench.system import (
    CacheDropper,
    CommandError,
    Watchdog,
    WatchdogExpired,
    fs_type,
    mounts_under,
)
from bench.targets import (
    AgentfsTarget,
    Mount,
    Setup,
    Target,
    TargetUnavailable,
    all_targets,
    install_missing_tools,
)
from bench.workloads import (
    FULL,
    QUICK,
    WORKLOAD_NAMES,
    WORKLOADS,
    Context,
    Fixtures,
    Sizes,
    Workload,
    metrics,
)

DEFAULT_ROOT = Path("/var/tmp/agentfs-bench")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Benchmarks on RAM-backed filesystems measure memcpy, not a disk-backed project.
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
# finished runs' files are kept to the end of the run while more than this is free
KEEP_FREE = 10 << 30


def log(msg: str) -> None:
    """Progress goes to stderr; stdout gets only the final table."""
    print(msg, file=sys.stderr, flush=True)


def _split(value: str, choices: list[str], what: str, parser: argparse.ArgumentParser) -> list[str]:
    picked = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(picked) - set(choices))
    if unknown or not picked:
        parser.error(f"unknown {what} {unknown}; choose from {','.join(choices)}")
    # Report order is the canonical order, whatever order they were given in.
    return [n for n in choices if n in picked]


def parse_args(argv: list[str] | None, targets: list[Target]) -> argparse.Namespace:
    names = [t.name for t in targets]
    defaults = [t.name for t in targets if t.default]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark agentfs against a plain directory and other overlay filesystems.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and 1 repeat: a smoke run"
    )
    parser.add_argument(
        "--only",
        default=",".join(defaults),
        help=f"comma-separated targets, or 'all' (default: {','.join(defaults)}; "
        f"all: {','.join(names)})",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_NAMES),
        help=f"comma-separated workloads (default: all of {','.join(WORKLOAD_NAMES)})",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="repetitions (default 3, or 1 with --quick)"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        help=f"scratch and cache directory, on a real disk (default: {DEFAULT_ROOT})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds allowed per timed operation before it is declared hung (default 900)",
    )
    parser.add_argument(
        "--agentfs", type=Path, default=None, help="agentfs executable (default: the venv's)"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where the JSON and Markdown results go (default: {RESULTS_DIR})",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install missing fuse-overlayfs / unionfs-fuse",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the JSON here")
    parser.add_argument(
        "--markdown", action="store_true", help=argparse.SUPPRESS
    )  # the table is always Markdown now; kept so old command lines work
    args = parser.parse_args(argv)
    only = names if args.only.strip() == "all" else _split(args.only, names, "target(s)", parser)
    args.only = only
    args.workloads = _split(args.workloads, list(WORKLOAD_NAMES), "workload(s)", parser)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM/SIGHUP into an exception so every ``finally`` unmounts on the way out."""
    raise SystemExit(128 + signum)


class Runner:
    """The alternating loop and its bookkeeping."""

    def __init__(
        self,
        args: argparse.Namespace,
        targets: list[Target],
        workloads: list[Workload],
        fixtures: Fixtures,
        caches: CacheDropper,
        results: Results,
        run_dir: Path,
    ) -> None:
        self.args = args
        self.targets = targets
        self.workloads = workloads
        self.fixtures = fixtures
        self.caches = caches
        self.results = results
        self.run_dir = run_dir
        self.mounted_once: set[str] = set()
        self.stopped: dict[str, str] = {}  # target -> why it gets no more turns
        self.done = 0
        self.total = args.repeat * len(workloads) * len(targets)
        self.started = time.monotonic()

    def run(self) -> None:
        for rep in range(1, self.args.repeat + 1):
            shift = (rep - 1) % len(self.targets)
            order = self.targets[shift:] + self.targets[:shift]
            for workload in self.workloads:
                for target in order:
                    if target.name in self.stopped:
                        self.done += 1
                        continue
                    self.run_one(rep, workload, target)
                    self.done += 1

    def _stop(self, target: Target, reason: str) -> None:
        self.stopped[target.name] = reason
        self.results.skipped[target.name] = reason

    def _progress(self) -> str:
        elapsed = time.monotonic() - self.started
        n = self.done + 1
        eta = elapsed / n * (self.total - n)
        return f"[{n}/{self.total}, {elapsed / 60:.1f} min, ~{eta / 60:.0f} min left]"

    def run_one(self, rep: int, workload: Workload, target: Target) -> None:
        label = f"rep {rep} {workload.name:<10} {target.name:<15}"
        entry: dict[str, Any] = {
            "rep": rep, "workload": workload.name, "target": target.name,
            "values": {}, "error": None, "setup_s": None,
        }
        self.results.runs.append(entry)
        setup = Setup.create(self.run_dir, f"{workload.name}-{target.name}")
        t0 = time.perf_counter()
        error: str | None = None
        try:
            try:
                workload.prepare(setup.lower, self.fixtures, setup.log)
            except (OSError, CommandError) as exc:
                raise CommandError(f"preparing the base failed: {exc}") from exc
            with target.mounted(setup) as mount:
                self.mounted_once.add(target.name)
                entry["setup_s"] = round(time.perf_counter() - t0, 3)
                error = self._measure(workload, target, mount, entry["values"])
        except TargetUnavailable as exc:
            if target.name not in self.mounted_once:
                self._stop(target, str(exc))
                log(f"{self._progress()} {label} skipped from now on: {exc}")
                return
            error = str(exc)
        except CommandError as exc:
            error = str(exc)
        finally:
            live = mounts_under(setup.dir)
            if live:
                self._stop(target, f"stopped: a mount was left behind at {live}")
                log(f"warning: still mounted, keeping {setup.dir}: {live}")
            else:
                self._set_aside(setup.dir)
        if error is not None:
            entry["error"] = error
            for key in workload.produces:
                if key not in entry["values"]:
                    self.results.cell(key, target.name).errors.append(error)
        shown = " ".join(f"{k}={v:.3f}" for k, v in entry["values"].items())
        setup_s = f"(setup {entry['setup_s']:.1f} s)" if entry["setup_s"] is not None else ""
        log(f"{self._progress()} {label} {shown} {setup_s}" + (f" [{error}]" if error else ""))

    def _set_aside(self, path: Path) -> None:
        """A finished run's directory moves to the run's ``done/`` and is deleted with the
        run at the end, not now: on an ext4 without a journal, freeing thousands of
        inodes makes every file created in the minutes after slower (the allocator skips
        recently freed inodes, one by one), and the next target would pay for this one's
        files (seen here: creating a file 6 us -> 250 us after a few rm -rf).  When the
        disk runs short, the pile is deleted at once (said in the log)."""
        done = self.run_dir / "done"
        try:
            done.mkdir(exist_ok=True)
            path.rename(done / path.name)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            return
        if shutil.disk_usage(done).free < KEEP_FREE:
            log(f"note: under {KEEP_FREE >> 30} GiB free: deleting the finished runs' files now")
            shutil.rmtree(done, ignore_errors=True)

    def _measure(
        self, workload: Workload, target: Target, mount: Mount, produced: dict[str, float]
    ) -> str | None:
        """Run one workload on a ready mount; returns an error message or None."""

        def record(key: str, value: float) -> None:
            produced[key] = value
            self.results.cell(key, target.name).samples.append(value)

        ctx = Context(
            root=mount.root,
            sizes=self.fixtures.sizes,
            tarball=self.fixtures.tarball,
            caches=self.caches,
            timeout=self.args.timeout,
            record=record,
        )
        budget = self.args.timeout * (len(workload.produces) + 1)
        try:
            with Watchdog(budget, mount.abort):
                # Untimed: write back what preparing the base and mounting left dirty, so
                # it does not land in the middle of the measurement.
                os.sync()
                workload.run(ctx)
        except WatchdogExpired as exc:
            mount.broken = True
            return str(exc)
        except (OSError, CommandError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def collect_meta(
    args: argparse.Namespace,
    argv: list[str],
    sizes: Sizes,
    targets: list[Target],
    caches: CacheDropper,
    tree_files: int,
) -> dict[str, Any]:
    """Enough context to tell whether two result files are comparable."""
    versions: dict[str, str | None] = tool_versions()
    for t in targets:
        v = t.version()
        if v is not None and v not in versions.values():
            versions[t.name] = v
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *argv]),
        "quick": args.quick,
        "repeat": args.repeat,
        "timeout_s": args.timeout,
        "workloads": args.workloads,
        "targets": {t.name: t.description for t in targets},
        "sizes": dataclasses.asdict(sizes),
        "tree_files": tree_files,
        "caches_dropped": caches.available,
        "order": "for each repetition, for each workload, every target in turn "
        "(target order rotated by one each repetition); fresh base + mount per run",
        "machine": machine_info(args.root),
        "versions": versions,
        "repo": repo_state(),
        "agentfs_env": agentfs_environment(),
        "loadavg": {"start": _loadavg()},
    }


def write_results(results: Results, args: argparse.Namespace, final: bool) -> list[Path]:
    """Timestamped JSON + Markdown; also ``latest.*`` when ``final`` (see ``main``)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = "-quick" if args.quick else ""
    out: list[Path] = []
    names = [f"{stamp}{suffix}"]
    if final:
        names.append("latest")
    for name in names:
        json_path = args.results_dir / f"{name}.json"
        md_path = args.results_dir / f"{name}.md"
        write_json(results, json_path)
        write_markdown(results, md_path)
        out += [json_path, md_path]
    if args.json is not None:
        write_json(results, args.json)
        out.append(args.json)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    candidates = all_targets()
    args = parse_args(argv, candidates)
    if args.agentfs is not None:
        candidates = all_targets(args.agentfs)
    targets = [t for t in candidates if t.name in args.only]
    workloads = [w for w in WORKLOADS if w.name in args.workloads]
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)

    args.root.mkdir(parents=True, exist_ok=True)
    root_fs = fs_type(args.root)
    if root_fs in RAM_FILESYSTEMS:
        log(f"warning: {args.root} is on {root_fs}; numbers will not reflect a disk")
    caches = CacheDropper()
    if not caches.available:
        log("note: cannot write /proc/sys/vm/drop_caches (not root?); "
            "the 1st git status and 1st read run with warm caches")

    if not args.no_install:
        installed = install_missing_tools(targets, args.root / "apt-install.log")
        if installed:
            log(f"installed {' '.join(installed)}")

    tar_name = "src-quick.tar" if args.quick else "src.tar"
    tarball, tree_files = ensure_source_tarball(args.root, sizes.tree_files, tar_name)
    log(f"source tree: {tarball} ({tree_files} files)")

    results = Results(
        metrics=[m for m in metrics(sizes, tree_files)
                 if any(m.key in w.produces for w in workloads)],
        targets=[],
        meta=collect_meta(args, argv, sizes, targets, caches, tree_files),
    )
    runnable: list[Target] = []
    for target in targets:
        reason = target.unavailable()
        if reason:
            results.skipped[target.name] = reason
            log(f"[{target.name}] skipped: {reason}")
        else:
            runnable.append(target)

    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.root))
    for target in runnable:
        if isinstance(target, AgentfsTarget):
            target.home = run_dir / "agentfs-home"
    fixtures = Fixtures(tarball=tarball, tree_files=tree_files, sizes=sizes,
                        timeout=args.timeout)
    runner = Runner(args, runnable, workloads, fixtures, caches, results, run_dir)
    interrupted: int | None = None  # the exit status to pass on, when interrupted
    leftovers: list[str] = []
    try:
        if runnable:
            log(f"{runner.total} runs: {args.repeat} x {len(workloads)} workloads x "
                f"{len(runnable)} targets")
            runner.run()
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, SIGTERM, SIGHUP
        code = exc.code if isinstance(exc, SystemExit) else None
        interrupted = code if isinstance(code, int) and code else 130
        log("interrupted: writing what was measured so far (not as latest)")
    finally:
        leftovers = mounts_under(args.root)
        if leftovers:
            log(f"warning: mounts left under {args.root}: {leftovers}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    results.targets = [t.name for t in runnable if t.name in runner.mounted_once]
    results.meta["loadavg"]["end"] = _loadavg()
    results.meta["repo_end"] = repo_state()
    results.meta["duration_s"] = round(time.monotonic() - started, 1)
    results.meta["interrupted"] = interrupted is not None
    # latest.* is the last complete, full-size run of (at least) the default comparison:
    # a smoke run or a run of a few rows must not replace it.
    covers_default = {t.name for t in candidates if t.default} <= set(args.only)
    latest = (
        interrupted is None
        and not leftovers
        and bool(results.targets)
        and not args.quick
        and covers_default
        and len(workloads) == len(WORKLOADS)
    )
    results.meta["latest"] = latest
    if results.targets:
        for path in write_results(results, args, final=latest):
            log(f"wrote {path}")
        print(markdown_table(results))
    else:
        log("no target could be benchmarked")
    for line in notes(results):
        log(line)
    if leftovers:
        return 2
    if interrupted is not None:
        return interrupted
    return 0 if results.targets else 1


if __name__ == "__main__":
    sys.exit(main())
