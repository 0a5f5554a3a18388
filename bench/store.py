"""Store operations against their targets: fork, commit, diff, and the daemon's memory.

    .venv/bin/python -m bench.store [--repeat 5] [--rss-repeat 1] [--only fork,commit,diff,rss]

What is timed, and the target of each (from the performance issue):

* fork: `Store.create_branch(name, from_branch)` of a branch with 10 and with 10,000
  changed files, and the whole `agentfs branch create --from` command.  Target: under
  1 ms at 10,000 (O(1)).
* commit: `commit_branch` of a branch with 100 small modified base files into the base,
  and the whole `agentfs branch commit` command.  Target: under 100 ms.
* diff: `diff_views` of a branch with 10,000 changed files (6,000 modified, 3,000
  added, 1,000 deleted), and `agentfs branch diff` with --name-status, --stat, --json
  and as a patch (stdout to /dev/null).  Target: under 1 s.
* rss: a pinned `agentfs mount` of a base with 100,000 files in 1,000 dirs: the
  daemon's VmRSS right after mount, VmRSS and VmHWM after `os.walk` + `lstat` of every
  entry and reading 3,000 files through the mount.  Target: under 150 MB.

Medians over --repeat (the fast rows) and --rss-repeat (the mount).  Scratch space is
`--root` (default /var/tmp/agentfs-bench); the 100,000-file base is built once and kept
there (`store-base-100000/`).  Prints a table and writes `bench/results/store-latest.json`
(every sample, the medians, the targets and the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from bench.machine import repo_state
from bench.system import Watchdog, abort_mount, fs_type, is_mounted, mounts_under

DEFAULT_ROOT = Path("/var/tmp/agentfs-bench")
RESULTS = Path(__file__).resolve().parent / "results" / "store-latest.json"
CLI_TIMEOUT = 300.0
GROUPS = ("fork", "commit", "diff", "rss")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ results
@dataclass
class Row:
    key: str
    label: str
    unit: str                     # "ms" or "MB"
    target: float | None = None   # the row must stay below this
    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def met(self) -> bool | None:
        if self.target is None or self.median is None:
            return None
        return self.median < self.target

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "unit": self.unit, "target": self.target,
                "samples": self.samples, "median": self.median, "met": self.met,
                "error": self.error}


class Results:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def row(self, key: str, label: str, unit: str = "ms", target: float | None = None) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, label, unit, target)
        return self.rows[key]


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MB":
        return f"{value:.1f} MB"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 10:
        return f"{value:.0f} ms"
    return f"{value:.2f} ms"


def table(results: Results) -> str:
    header = ("measurement", "median", "target", "met", "n")
    lines = [tuple(header)]
    for r in results.rows.values():
        met = {True: "yes", False: "MISSED", None: ""}[r.met]
        if r.error:
            met = "error"
        lines.append((r.label, _fmt(r.median, r.unit),
                      f"< {_fmt(r.target, r.unit)}" if r.target is not None else "",
                      met, str(len(r.samples))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        out.append(" | ".join(cells))
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    errors = [f"  {r.label}: {r.error}" for r in results.rows.values() if r.error]
    return "\n".join(out + (["errors:", *errors] if errors else []))


# ------------------------------------------------------------------ machine
def machine(root: Path) -> dict[str, Any]:
    """Where this was measured (bench.machine, as the workload harness records it), plus
    the load average: other work on the machine moves every row of this benchmark."""
    from bench.machine import machine_info

    info = machine_info(root)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **info,
        "cores": info["cpus"],
        "filesystem": info["root_fs"],
        "python": platform.python_version(),
        "repo_start": repo_state(),
        "loadavg_start": os.getloadavg(),
    }


# ------------------------------------------------------------------ helpers
class Env:
    """Scratch directory, agentfs executable and an AGENTFS_HOME of our own."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.work = work
        self.agentfs = str(Path(sys.executable).parent / "agentfs")
        self.home = work / "home"
        os.environ["AGENTFS_HOME"] = str(self.home)  # in-process stores register there too
        self._n = 0

    def fresh(self, prefix: str) -> Path:
        self._n += 1
        path = self.work / f"{prefix}{self._n}"
        path.mkdir(parents=True)
        return path

    def cli(self, store: Path, *args: str, stdout: Any = subprocess.DEVNULL,
            timeout: float = CLI_TIMEOUT) -> float:
        """Run `agentfs --store STORE ARGS...`; its wall time in ms."""
        cmd = [self.agentfs, "--store", str(store), *args]
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=stdout,
                              stderr=subprocess.PIPE, timeout=timeout, check=False)
        elapsed = (time.perf_counter() - t) * 1000
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[2:])} exited {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
        return elapsed


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def make_base(path: Path, files: int, dirs: int, size: int = 100) -> None:
    """*files* small files spread over *dirs* directories: d{j}/f{i}."""
    for j in range(dirs):
        (path / f"d{j}").mkdir(parents=True, exist_ok=True)
    payload = b"b" * (size - 1) + b"\n"
    for i in range(files):
        with open(path / f"d{i % dirs}" / f"f{i}", "wb") as fh:
            fh.write(payload)


def edit_branch(store: Any, name: str, *, modify: Sequence[str] = (),
                add: Sequence[str] = (), delete: Sequence[str] = (), tag: str = "x") -> None:
    """Change branch *name* through the overlay engine, as a mount would."""
    from agentfs.mount.view import open_branch_view

    ov = open_branch_view(store, name)
    try:
        for path in modify:
            fh = ov.open(path, os.O_WRONLY)
            ov.write(fh, 0, tag.encode()[:1])  # same size, different bytes
            ov.release(fh)
        for path in add:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent and not ov.exists(parent):
                ov.mkdir(parent, 0o755, 0, 0)
            fh, _ = ov.create(path, os.O_WRONLY, 0o644, 0, 0)
            ov.write(fh, 0, f"{tag} {path}\n".encode() * 3)
            ov.release(fh)
        for path in delete:
            ov.unlink(path)
    finally:
        ov.close()


def record(row: Row, fn: Callable[[], float]) -> None:
    try:
        row.samples.append(fn())
    except Exception as exc:  # a failed sample is reported, not fatal
        row.error = f"{type(exc).__name__}: {exc}"
        log(f"  {row.label}: {row.error}")


# ------------------------------------------------------------------ (a) fork
def bench_fork(env: Env, results: Results, repeat: int) -> None:
    from agentfs.branches.store import Store

    base = env.fresh("fork-base-")
    make_base(base, 100, 10)
    store = Store.create(base, env.fresh("fork-store-") / "s")
    try:
        for changed in (10, 10_000):
            log(f"fork: preparing a branch with {changed} changed files")
            src = f"src{changed}"
            store.create_branch(src)
            edit_branch(store, src, add=[f"new{i % 100}/f{i}" for i in range(changed)])
            api = results.row(f"fork_{changed}_api",
                              f"fork, {changed:,} changed files: store.create_branch",
                              target=1.0 if changed == 10_000 else None)
            cli = results.row(f"fork_{changed}_cli",
                              f"fork, {changed:,} changed files: `agentfs branch create --from`")
            for r in range(repeat):
                record(api, partial(timed, partial(store.create_branch, f"api{changed}-{r}",
                                                   src)))
                record(cli, partial(env.cli, store.root, "branch", "create",
                                    f"cli{changed}-{r}", "--from", src))
    finally:
        store.close()


# ------------------------------------------------------------------ (b) commit
COMMIT_FILES = 100


def create_cost(directory: Path, files: int = COMMIT_FILES) -> float:
    """ms to create *files* empty files in a fresh directory under *directory*: a commit
    must create one inode per changed file (the staged copy), and what that costs
    depends on the filesystem's state (on the development VM, 0.02 to 0.9 ms per file
    depending on where in the disk the directory lands)."""
    probe = Path(tempfile.mkdtemp(prefix="create-probe-", dir=directory))
    try:
        t = time.perf_counter()
        for i in range(files):
            os.close(os.open(probe / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return (time.perf_counter() - t) * 1000
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def bench_commit(env: Env, results: Results, repeat: int) -> None:
    from agentfs.branches.store import Store
    from agentfs.workflow.commit import commit_branch

    base = env.fresh("commit-base-")
    make_base(base, 2000, 40)
    probe = results.row("commit_create_probe", f"(environment) create {COMMIT_FILES} empty "
                        "files next to the commit's base")
    targets = [f"d{i % 40}/f{i}" for i in range(0, 2000, 20)][:COMMIT_FILES]
    api = results.row("commit_api", f"commit {COMMIT_FILES} changed files: commit_branch",
                      target=100.0)
    cli = results.row("commit_cli", f"commit {COMMIT_FILES} changed files: "
                      "`agentfs branch commit`")
    tags = iter("ACDEFGHIJKLMNOPQRSTUVWXYZ" * (repeat + 1))  # each commit really changes
    for r in range(repeat):
        log(f"commit: repeat {r + 1}/{repeat}")
        for row, how in ((api, "api"), (cli, "cli")):
            store = Store.create(base, env.fresh("commit-store-") / "s")
            try:
                store.create_branch("b")
                edit_branch(store, "b", modify=targets, tag=next(tags))

                def run(store: Store = store, how: str = how) -> float:
                    if how == "cli":
                        return env.cli(store.root, "branch", "commit", "b")
                    t = time.perf_counter()
                    report = commit_branch(store, "b")
                    elapsed = (time.perf_counter() - t) * 1000
                    assert len(report.changes) == COMMIT_FILES, len(report.changes)
                    return elapsed
                record(row, run)
            finally:
                store.close()
        probe.samples.append(create_cost(base.parent))


# ------------------------------------------------------------------ (c) diff
DIFF_CHANGES = (6000, 3000, 1000)  # modified, added, deleted


def bench_diff(env: Env, results: Results, repeat: int) -> None:
    from agentfs.branches.store import Store
    from agentfs.mount.view import open_branch_layers
    from agentfs.overlay.diff import diff_views
    from agentfs.overlay.resolve import Resolver

    modified, added, deleted = DIFF_CHANGES
    total = modified + added + deleted
    base = env.fresh("diff-base-")
    make_base(base, 20_000, 200)
    store = Store.create(base, env.fresh("diff-store-") / "s")
    try:
        log(f"diff: preparing a branch with {total} changed files")
        store.create_branch("b")
        edit_branch(store, "b",
                    modify=[f"d{i % 200}/f{i}" for i in range(0, 2 * modified, 2)],
                    add=[f"d{i % 200}/new{i}" for i in range(added)],
                    delete=[f"d{i % 200}/f{i}" for i in range(1, 2 * deleted, 2)])

        def in_process() -> float:
            info = store.branch("b")
            t = time.perf_counter()
            layers = open_branch_layers(store, "b")
            try:
                changes = diff_views(Resolver(layers), Resolver(layers[info.own_layers:]))
            finally:
                for layer in layers:
                    layer.close()
            elapsed = (time.perf_counter() - t) * 1000
            files = [c for c in changes if c.new is None or c.new.kind != "dir"]
            assert len(files) == total, (len(files), total)
            return elapsed

        rows = [(results.row("diff_api", f"diff, {total:,} changed files: diff_views",
                             target=1000.0), in_process)]
        for flag in ("--name-status", "--stat", "--json", None):
            args = ["branch", "diff", "b", *([flag] if flag else ["--color", "never"])]
            label = f"diff, {total:,} changed files: `agentfs branch diff {flag or '(patch)'}`"
            rows.append((results.row(f"diff_cli_{(flag or 'patch').lstrip('-')}", label),
                         partial(env.cli, store.root, *args)))
        for r in range(repeat):
            log(f"diff: repeat {r + 1}/{repeat}")
            for row, fn in rows:
                record(row, fn)
    finally:
        store.close()


# ------------------------------------------------------------------ (d) rss
RSS_FILES, RSS_DIRS, RSS_READS = 100_000, 1000, 3000


def cached_base(root: Path, files: int, dirs: int) -> Path:
    """The big read-only base, built once (a marker next to it says it is complete)."""
    base = root / f"store-base-{files}"
    done = root / f"store-base-{files}.complete"
    if not done.exists():
        log(f"rss: building a base with {files:,} files in {dirs:,} dirs (once) at {base}")
        shutil.rmtree(base, ignore_errors=True)
        make_base(base, files, dirs)
        done.write_text(f"{files} {dirs}\n")
    return base


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS / VmHWM of *pid*, in MB (10^6 bytes)."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024 / 1e6
    return out


def daemon_pid(store: Any, mountpoint: Path) -> int:
    """The serving daemon: the store's mount row (as `agentfs umount` finds it)."""
    from agentfs.mount.lifecycle import find_mount_pid

    pid = find_mount_pid(str(mountpoint.resolve()), store)
    if pid is None:
        raise RuntimeError(f"no mount row for {mountpoint}")
    return pid


def unmount(env: Env, store_root: Path, mnt: Path) -> None:
    if not is_mounted(mnt):
        return
    with contextlib.suppress(Exception):
        env.cli(store_root, "umount", str(mnt), timeout=120)
    if is_mounted(mnt):
        with contextlib.suppress(Exception):
            subprocess.run(["fusermount3", "-uz", str(mnt)], timeout=60, check=False,
                           capture_output=True)


def walk(mnt: Path, reads: int) -> tuple[int, int]:
    """os.walk + lstat every entry, then read *reads* files spread over the tree."""
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
        files.extend(os.path.join(dirpath, n) for n in filenames)
    step = max(1, len(files) // reads) if reads else 0
    nread = 0
    for path in files[::step][:reads] if reads else []:
        with open(path, "rb") as fh:
            fh.read()
        nread += 1
    return len(files), nread


def bench_rss(env: Env, results: Results, repeat: int, files: int, dirs: int,
              reads: int, impl: str | None, daemons: list[str]) -> None:
    from agentfs.branches.store import Store

    base = cached_base(env.root, files, dirs)
    after_mount = results.row("rss_mount", f"daemon VmRSS right after mount ({files:,} files)",
                              unit="MB")
    after_walk = results.row("rss_walk", f"daemon VmRSS after walk + lstat all + read {reads:,}",
                             unit="MB", target=150.0)
    hwm = results.row("rss_hwm", "daemon VmHWM (peak) after the walk", unit="MB",
                      target=150.0)
    walk_ms = results.row("rss_walk_time", "walk + lstat all + reads through the mount (time)")
    for r in range(repeat):
        log(f"rss: repeat {r + 1}/{repeat}")
        store = Store.create(base, env.fresh("rss-store-") / "s")
        mnt = env.fresh("rss-mnt-")
        try:
            store.create_branch("b")
            env.cli(store.root, "mount", str(mnt), "--branch", "b",
                    *(["--impl", impl] if impl else []), timeout=120)
            pid = daemon_pid(store, mnt)
            with open(f"/proc/{pid}/cmdline", "rb") as fh:  # which front end served it
                daemons.append(fh.read().replace(b"\0", b" ").decode(errors="replace").strip())
            after_mount.samples.append(proc_status(pid)["VmRSS"])
            with Watchdog(1800, partial(abort_mount, mnt)):
                t = time.perf_counter()
                seen, nread = walk(mnt, reads)
                walk_ms.samples.append((time.perf_counter() - t) * 1000)
            if seen != files:
                raise RuntimeError(f"the walk saw {seen} files, expected {files}")
            status = proc_status(pid)
            after_walk.samples.append(status["VmRSS"])
            hwm.samples.append(status["VmHWM"])
            log(f"  pid {pid}: {status} after {seen} files, {nread} reads")
        except Exception as exc:
            after_walk.error = f"{type(exc).__name__}: {exc}"
            log(f"  rss: {after_walk.error}")
        finally:
            unmount(env, store.root, mnt)
            store.close()


# ------------------------------------------------------------------ main
def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def scratch(root: Path) -> Iterator[Path]:
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="store-", dir=root))
    try:
        yield work
    finally:
        left = mounts_under(work)
        if left:
            log(f"warning: still mounted, {work} kept: {left}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="samples of the fast rows")
    parser.add_argument("--rss-repeat", type=int, default=1, help="mounts for the RSS rows")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--rss-files", type=int, default=RSS_FILES)
    parser.add_argument("--rss-reads", type=int, default=RSS_READS)
    parser.add_argument("--impl", default=None,
                        help="FUSE front end of the RSS mount (default: agentfs' own default)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write results")
    args = parser.parse_args(argv)
    only = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = set(only) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)

    results = Results()
    meta = machine(args.root if args.root.exists() else args.root.parent)
    meta.update(repeat=args.repeat, rss_repeat=args.rss_repeat, only=only)
    with scratch(args.root) as work:
        meta["filesystem"] = fs_type(work)
        env = Env(args.root, work)
        if "fork" in only:
            bench_fork(env, results, args.repeat)
        if "commit" in only:
            bench_commit(env, results, args.repeat)
        if "diff" in only:
            bench_diff(env, results, args.repeat)
        if "rss" in only:
            meta["rss_daemons"] = []
            bench_rss(env, results, args.rss_repeat, args.rss_files,
                      max(1, args.rss_files // 100), args.rss_reads, args.impl,
                      meta["rss_daemons"])

    meta["loadavg_end"] = os.getloadavg()
    meta["repo_end"] = repo_state()
    print(table(results))
    print(f"\n{meta['cpu_model']}, {meta['cores']} cores, Linux {meta['kernel']}, "
          f"{meta['filesystem']} at {args.root}; median of {args.repeat} "
          f"({args.rss_repeat} for RSS); load average {meta['loadavg_start'][0]:.1f} at the "
          f"start, {meta['loadavg_end'][0]:.1f} at the end", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": {k: r.as_dict() for k, r in
                                                            results.rows.items()}},
                                    indent=2) + "\n")
    log(f"wrote {args.json}")
    missed = [r for r in results.rows.values() if r.met is False or r.error]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
