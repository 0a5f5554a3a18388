"""Concurrency: N = 8 processes doing random create/write/rename/unlink/mkdir/rmdir/
link/symlink/chmod/readdir/stat/read on overlapping trees through one mount, pinned
(every front end) and per-process.

Each worker (tests/stress_worker.py) is seeded and changes only names it owns, in
directories every worker shares (the root, new directories, base directories full of
every worker's base files), while it reads, lists and stats everyone's names.  So
the final tree does not depend on how the workers interleaved: it must be exactly
what their operation logs give when replayed one after the other on a plain copy of
the base (names, types, modes, sizes, link counts, contents, link targets), and every
deterministic result in the logs (errnos, checksums of what a worker read or listed
of its own) must be what the plain directory gives.  No EIO anywhere, no errno a
plain directory could not give to the racy reads, no deadlock (a watchdog kills the
workers and fails), no ERROR or traceback in the daemon log, the daemon alive at the
end, the base untouched.  The daemon's RSS is sampled (VmRSS) at the start, during
and at the end, and printed with the figures.

The default run is bounded (8 x 3,000 operations per mode); the `slow` one does
1,000,000 operations in all and checks that the daemon's memory stays flat.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mountutil import AGENTFS, IMPLS, is_mounted, mounted_branch, per_process_mount
from treehash import tree_fingerprint

pytestmark = pytest.mark.mount

PY = sys.executable
WORKER = str(Path(__file__).with_name("stress_worker.py"))
NWORKERS = 8
BOUNDED_OPS = 3_000            # per worker, default run
SLOW_TOTAL = int(os.environ.get("AGENTFS_STRESS_OPS") or 1_000_000)  # in all, slow run
SAMPLE_EVERY = 2.0             # seconds between RSS samples


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def log_problems(store: Path) -> list[str]:
    bad = []
    for log in sorted((store / "run").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "ERROR" in line or "Traceback" in line or "CRITICAL" in line:
                bad.append(f"{log.name}: {line}")
    return bad


@dataclass
class Target:
    """Where the workers run: the root they see and the command prefix that puts a
    process into the view (nothing for a pinned mount, `agentfs exec` per-process)."""
    mode: str
    root: Path
    prefix: list[str]
    daemon: int
    store: Path


@dataclass
class Figures:
    mode: str
    ops: int = 0
    seconds: float = 0.0
    rss_kib: list[tuple[float, int]] = field(default_factory=list)
    errnos: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        rss = [r for _, r in self.rss_kib]
        path = " -> ".join(f"{rss[min(len(rss) - 1, len(rss) * q // 4)] / 1024:.0f}"
                           for q in range(5))
        return (f"concurrency[{self.mode}]: {NWORKERS} workers, {self.ops} ops in "
                f"{self.seconds:.1f} s ({self.ops / max(self.seconds, 1e-9):.0f} ops/s); "
                f"daemon RSS start {rss[0] / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB, "
                f"end {rss[-1] / 1024:.1f} MiB (quarters: {path} MiB; {len(rss)} samples); "
                f"results {dict(sorted(self.errnos.items()))}")


@contextlib.contextmanager
def target(mode: str, base: Path, work: Path) -> Iterator[Target]:
    if mode == "per-process":
        with per_process_mount(base, work, "--deny-unbound") as pp:
            yield Target(mode, pp.mountpoint, [AGENTFS, "--store", str(pp.store), "exec",
                                               "--branch", "b", "--"], pp.pid, pp.store)
        return
    impl = mode.partition("-")[2]
    with mounted_branch(base, work, "b", impl=impl) as mb:
        assert mb.pid is not None
        yield Target(mode, mb.mountpoint, [], mb.pid, mb.store)


def _kill_group(p: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)


def run_workers(t: Target, logs: Path, ops_per_worker: int, timeout: float,
                figures: Figures) -> list[dict[str, object]]:
    procs = [subprocess.Popen([*t.prefix, PY, WORKER, "run", str(t.root), str(w),
                               str(NWORKERS), "1", str(ops_per_worker),
                               str(logs / f"w{w}.log")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for w in range(NWORKERS)]
    start = time.monotonic()
    deadline = start + timeout
    next_sample = start + SAMPLE_EVERY
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now > deadline:
                stuck = [w for w, p in enumerate(procs) if p.poll() is None]
                raise AssertionError(f"workers {stuck} still running after {timeout:.0f} s "
                                     "(deadlock?)")
            if now >= next_sample:
                figures.rss_kib.append((now - start, rss_kib(t.daemon)))
                next_sample = now + SAMPLE_EVERY
            time.sleep(0.05)
        figures.seconds = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_group(p)
    summaries = []
    for w, p in enumerate(procs):
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, f"worker {w} exited {p.returncode}:\n{err}"
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    return summaries


def _first_differences(got: dict[str, object], want: dict[str, object], n: int = 10
                       ) -> list[str]:
    out = []
    for path in sorted(set(got) | set(want)):
        if got.get(path) != want.get(path):
            out.append(f"{path}: mount {got.get(path)} plain {want.get(path)}")
            if len(out) == n:
                break
    return out


def stress(mode: str, work: Path, ops_per_worker: int, timeout: float) -> Figures:
    base, plain, logs = work / "base", work / "plain", work / "logs"
    logs.mkdir()
    subprocess.run([PY, WORKER, "make-base", str(base), str(NWORKERS)], check=True)
    shutil.copytree(base, plain, symlinks=True)
    base_before = tree_fingerprint(str(base))
    figures = Figures(mode)
    with target(mode, base, work) as t:
        figures.rss_kib.append((0.0, rss_kib(t.daemon)))
        summaries = run_workers(t, logs, ops_per_worker, timeout, figures)
        figures.rss_kib.append((figures.seconds, rss_kib(t.daemon)))
        dumped = subprocess.run([*t.prefix, PY, WORKER, "dump", str(t.root)],
                                capture_output=True, text=True, timeout=300)
        assert dumped.returncode == 0, dumped.stderr
        assert is_mounted(str(t.root)), "the mount went away"
        os.kill(t.daemon, 0)  # still alive
        problems = log_problems(t.store)
    figures.ops = sum(int(s["ops"]) for s in summaries)  # type: ignore[call-overload]
    for s in summaries:
        for res, count in s["results"].items():  # type: ignore[attr-defined]
            figures.errnos[res] = figures.errnos.get(res, 0) + count
    print(figures.line())
    (work / "figures.json").write_text(json.dumps(figures.__dict__))
    unexpected = [u for s in summaries for u in s["unexpected"]]  # type: ignore[attr-defined]
    assert unexpected == [], f"errors a plain directory does not give: {unexpected[:10]}"
    assert "EIO" not in figures.errnos
    assert problems == [], "daemon log:\n" + "\n".join(problems[:20])
    replayed = subprocess.run([PY, WORKER, "replay", str(plain),
                               *(str(logs / f"w{w}.log") for w in range(NWORKERS))],
                              capture_output=True, text=True, timeout=max(600, timeout))
    assert replayed.returncode == 0, replayed.stderr
    report = json.loads(replayed.stdout)
    assert report["ops"] == figures.ops
    mismatches = report["mismatches"]
    if mode == "pinned-kernel" and mismatches and _stale_dentry(mismatches[0]):
        pytest.xfail("known: the kernel front end leaves a stale positive dentry (a name "
                     "removed while another process's READDIRPLUS listed it stays cached "
                     f"as existing): {mismatches[:5]}")
    assert mismatches == [], "results the plain directory does not give " \
        f"(worker, op#, op, args, mount, plain): {mismatches[:10]}"
    want = json.loads(subprocess.run([PY, WORKER, "dump", str(plain)], capture_output=True,
                                     text=True, check=True, timeout=300).stdout)
    got = json.loads(dumped.stdout)
    assert got == want, "final trees differ:\n" + "\n".join(_first_differences(got, want))
    assert tree_fingerprint(str(base)) == base_before, "the base changed"
    return figures


def _stale_dentry(mismatch: list[object]) -> bool:
    """The mount said a name existed where the plain directory had none."""
    _, _, op, _, _, logged, _, plain = mismatch
    return (logged == "EEXIST" and plain == "ok") or (plain == "ENOENT" and logged != plain
                                                      and op in ("stat_own", "read_own"))


MODES = [f"pinned-{impl}" for impl in IMPLS] + ["per-process"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.timeout(600)
def test_concurrent_workers_match_the_replay(mode: str, tmp_path: Path) -> None:
    stress(mode, tmp_path, BOUNDED_OPS, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [f"pinned-{os.environ.get('AGENTFS_FUSE_IMPL') or 'kernel'}",
                                  "per-process"])
@pytest.mark.timeout(4 * 3600)
def test_a_million_operations_memory_stays_flat(mode: str, tmp_path: Path) -> None:
    figures = stress(mode, tmp_path, SLOW_TOTAL // NWORKERS, timeout=3 * 3600)
    # flat: after the first samples (caches filled by the first pass over every name)
    # the daemon grows by no more than a quarter plus 32 MiB however long it runs
    samples = [r for _, r in figures.rss_kib]
    warm = samples[min(len(samples) - 1, max(1, len(samples) // 10))]
    assert samples[-1] <= warm * 1.25 + 32 * 1024, figures.line()
