"""Entry point: ``python -m bench.run [--quick] [--only a,b] [--repeat N] [--json F] [--markdown]``.

Each repeat of each target gets a brand-new base and mount, so no run inherits caches or
copied-up files from the previous one, and "cold" really means "first access after mount".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from bench.fixtures import create_base_repo, ensure_source_tarball
from bench.report import Results, markdown_table, print_notes, print_table, write_json
from bench.system import (
    CacheDropper,
    CommandError,
    Watchdog,
    WatchdogExpired,
    fs_type,
    mounts_under,
    run_quiet,
)
from bench.targets import Mount, Setup, Target, TargetUnavailable, all_targets
from bench.workloads import FULL, QUICK, WORKLOADS, Context, Sizes, metrics

DEFAULT_ROOT = Path("/var/tmp/agentfs-bench")
# Benchmarks on RAM-backed filesystems measure memcpy, not a disk-backed project.
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the table (pipe-able into a README)."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None, names: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark agentfs against a plain directory and other overlay filesystems.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and 1 repeat: a smoke run"
    )
    parser.add_argument(
        "--only",
        default=",".join(names),
        help=f"comma-separated targets to run (default: all of {','.join(names)})",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per target (default 3, or 1 with --quick)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as GitHub markdown"
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
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown or not only:
        parser.error(f"unknown target(s) {unknown}; choose from {','.join(names)}")
    args.only = only
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM/SIGHUP into an exception so every ``finally`` unmounts on the way out."""
    raise SystemExit(128 + signum)


def run_workloads(target: str, mount: Mount, ctx: Context, results: Results, label: str) -> None:
    """Run every workload once on a fresh mount, keeping whatever each one measured."""
    for workload in WORKLOADS:
        produced: dict[str, float] = {}

        def record(key: str, value: float, produced: dict[str, float] = produced) -> None:
            produced[key] = value
            results.cell(key, target).samples.append(value)

        ctx.record = record
        error: str | None = None
        if mount.broken:
            error = "not run: the mount was aborted by an earlier timeout"
        else:
            budget = ctx.timeout * len(workload.produces)
            try:
                with Watchdog(budget, mount.abort):
                    workload.run(ctx)
            except WatchdogExpired as exc:
                mount.broken = True
                error = str(exc)
            except (OSError, CommandError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            for key in workload.produces:
                if key not in produced:
                    results.cell(key, target).errors.append(error)
        shown = " ".join(f"{k}={v:.3f}" for k, v in produced.items())
        log(f"  {label} {workload.name}: {shown}" + (f"  [{error}]" if error else ""))


def _remove_setup(setup: Setup) -> None:
    """Delete a setup dir, but never through something still mounted."""
    live = mounts_under(setup.dir)
    if live:
        log(f"warning: still mounted, keeping {setup.dir}: {live}")
        return
    shutil.rmtree(setup.dir, ignore_errors=True)


def bench_target(
    target: Target,
    args: argparse.Namespace,
    run_dir: Path,
    tarball: Path,
    sizes: Sizes,
    caches: CacheDropper,
    results: Results,
) -> None:
    """All repeats of one target; a target that cannot even mount is reported as skipped."""
    for rep in range(1, args.repeat + 1):
        label = f"[{target.name} {rep}/{args.repeat}]"
        setup = Setup.create(run_dir, target.name)
        try:
            create_base_repo(setup.lower / "repo", tarball, timeout=args.timeout, log=setup.log)
            with target.mounted(setup) as mount:
                log(f"{label} mounted at {mount.root}")
                ctx = Context(
                    root=mount.root,
                    repo=mount.root / "repo",
                    tarball=tarball,
                    sizes=sizes,
                    caches=caches,
                    timeout=args.timeout,
                    record=lambda _k, _v: None,
                )
                run_workloads(target.name, mount, ctx, results, label)
        except TargetUnavailable as exc:
            if rep == 1:
                results.skipped[target.name] = str(exc)
                log(f"{label} skipped: {exc}")
                return
            for metric in results.metrics:
                results.cell(metric.key, target.name).errors.append(str(exc))
            log(f"{label} failed: {exc}")
        except CommandError as exc:  # base repo creation
            results.skipped[target.name] = f"setup failed: {exc}"
            log(f"{label} setup failed: {exc}")
            return
        finally:
            _remove_setup(setup)


def collect_meta(
    args: argparse.Namespace,
    sizes: Sizes,
    targets: list[Target],
    caches: CacheDropper,
    tree_files: int,
) -> dict[str, object]:
    """Enough context to tell whether two result files are comparable."""
    mem_kib = None
    try:
        with open("/proc/meminfo") as fh:
            mem_kib = int(fh.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "root": str(args.root),
        "root_fs": fs_type(args.root),
        "quick": args.quick,
        "repeat": args.repeat,
        "sizes": dataclasses.asdict(sizes),
        "tree_files": tree_files,
        "caches_dropped": caches.available,
        "versions": {
            "git": run_quiet(["git", "--version"]),
            **{t.name: t.version() for t in targets},
        },
    }


def main(argv: list[str] | None = None) -> int:
    candidates = all_targets()
    args = parse_args(argv, [t.name for t in candidates])
    if args.agentfs is not None:
        candidates = all_targets(args.agentfs)
    targets = [t for t in candidates if t.name in args.only]
    sizes = QUICK if args.quick else FULL

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)

    args.root.mkdir(parents=True, exist_ok=True)
    root_fs = fs_type(args.root)
    if root_fs in RAM_FILESYSTEMS:
        log(f"warning: {args.root} is on {root_fs}; numbers will not reflect a disk")
    caches = CacheDropper()
    if not caches.available:
        log("note: cannot write /proc/sys/vm/drop_caches (not root?); cold rows will be n/a")

    tar_name = "src-quick.tar" if args.quick else "src.tar"
    tarball, tree_files = ensure_source_tarball(args.root, sizes.tree_files, tar_name)
    log(f"source tree: {tarball} ({tree_files} files)")

    results = Results(
        metrics=metrics(sizes, tree_files),
        targets=[],
        meta=collect_meta(args, sizes, targets, caches, tree_files),
    )
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.root))
    try:
        for target in targets:
            reason = target.unavailable()
            if reason:
                results.skipped[target.name] = reason
                log(f"[{target.name}] skipped: {reason}")
                continue
            bench_target(target, args, run_dir, tarball, sizes, caches, results)
            if target.name not in results.skipped:
                results.targets.append(target.name)
    finally:
        leftovers = mounts_under(args.root)
        if leftovers:
            log(f"warning: mounts left under {args.root}: {leftovers}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    if not results.targets:
        log("no target could be benchmarked")
    elif args.markdown:
        print(markdown_table(results))
    else:
        print_table(results, sys.stdout)
    print_notes(results, sys.stderr)
    if args.json is not None:
        write_json(results, args.json)
        log(f"wrote {args.json}")
    if leftovers:
        return 2
    return 0 if results.targets else 1


if __name__ == "__main__":
    sys.exit(main())
