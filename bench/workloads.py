"""The measured workloads, modelled on what a coding agent does to a project checkout.

Each workload records its metrics through a callback as soon as they are measured, so a
filesystem that fails half-way still contributes the numbers it did produce. Only the
operation itself is inside the timed region; setup and cleanup are not.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.fixtures import GIT_ARGS, git_env
from bench.system import CacheDropper, timed_command

MiB = 1 << 20
SEQ_BLOCK = MiB
SMALL_BLOCK = 4096


@dataclass(frozen=True)
class Sizes:
    """Workload sizes; ``QUICK`` keeps the same shape at a fraction of the cost."""

    seq_mib: int = 256
    small_files: int = 5000
    small_dirs: int = 50
    small_file_bytes: int = 1024
    write4k_mib: int = 64
    tree_files: int = 3000


FULL = Sizes()
QUICK = Sizes(seq_mib=32, small_files=500, small_dirs=10, write4k_mib=8, tree_files=500)


@dataclass(frozen=True)
class Metric:
    """One row of the report. ``unit`` is "s" (lower is better) or "MiB/s" (higher is)."""

    key: str
    label: str
    unit: str

    @property
    def higher_is_better(self) -> bool:
        return self.unit == "MiB/s"


def metrics(sizes: Sizes, tree_files: int) -> list[Metric]:
    """All report rows in display order, labelled with the sizes actually used."""
    n = sizes.small_files
    return [
        Metric("git_status_cold", f"git status, {tree_files} files (cold)", "s"),
        Metric("git_status_warm", f"git status, {tree_files} files (warm)", "s"),
        Metric("seq_write", f"seq write {sizes.seq_mib} MiB + fsync", "s"),
        Metric("seq_read_warm", f"seq read {sizes.seq_mib} MiB (warm)", "s"),
        Metric("seq_read_cold", f"seq read {sizes.seq_mib} MiB (cold)", "s"),
        Metric("small_create", f"create {n} x {sizes.small_file_bytes} B files", "s"),
        Metric("small_stat", f"lstat walk {n} files (warm)", "s"),
        Metric("small_ls", f"ls -lR {n} files", "s"),
        Metric("small_stat_cold", f"lstat walk {n} files (cold)", "s"),
        Metric("untar", f"tar xf, {tree_files} files", "s"),
        Metric("rm_rf", f"rm -rf, {tree_files} files", "s"),
        Metric("write_4k", f"4 KiB writes, {sizes.write4k_mib} MiB", "MiB/s"),
    ]


Record = Callable[[str, float], None]


@dataclass
class Context:
    """What a workload needs: where to work, how big, and the shared helpers."""

    root: Path
    repo: Path
    tarball: Path
    sizes: Sizes
    caches: CacheDropper
    timeout: float
    record: Record


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write may write less than asked (FUSE can); loop so every byte counts."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_file(path: Path, block: int) -> int:
    """Read a file to EOF into one reused buffer (no allocation in the timed loop)."""
    buf = bytearray(block)
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            total += n
    return total


def git_status(ctx: Context) -> None:
    """`git status` on the base repo: cold is the first run after mount, warm the second.

    This is typically an agent's first command, and it stats every tracked file and
    reads the index through the overlay; the cold run may also copy up a refreshed index.
    """
    env = git_env()
    cmd = [*GIT_ARGS, "status"]
    # "Cold" is the first run after mount; where possible the kernel caches are dropped
    # too, so that the plain baseline (which has no mount) is cold as well.
    ctx.caches.drop()
    ctx.record("git_status_cold", timed_command(cmd, cwd=ctx.repo, env=env, timeout=ctx.timeout))
    ctx.record("git_status_warm", timed_command(cmd, cwd=ctx.repo, env=env, timeout=ctx.timeout))


def sequential_io(ctx: Context) -> None:
    """Large-file streaming: 1 MiB writes + fsync, then reads from page cache and from disk."""
    path = ctx.root / "seq.bin"
    block = os.urandom(SEQ_BLOCK)  # incompressible, generated outside the timed region
    blocks = ctx.sizes.seq_mib
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(blocks):
            _write_all(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    ctx.record("seq_write", time.perf_counter() - start)

    expected = blocks * SEQ_BLOCK
    for key, cold in (("seq_read_warm", False), ("seq_read_cold", True)):
        if cold and not ctx.caches.drop():
            continue
        start = time.perf_counter()
        got = _read_file(path, SEQ_BLOCK)
        elapsed = time.perf_counter() - start
        if got != expected:
            raise OSError(f"read back {got} bytes of {expected}")
        ctx.record(key, elapsed)
    path.unlink()


def _lstat_walk(top: Path) -> int:
    """Stat every entry explicitly (scandir's cached d_type is not a stat)."""
    count = 0
    stack = [os.fspath(top)]
    while stack:
        current = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                st = os.lstat(entry.path)
                count += 1
                if (st.st_mode & 0o170000) == 0o040000:
                    stack.append(entry.path)
    return count


def small_files(ctx: Context) -> None:
    """Many tiny files: the metadata-bound pattern of checkouts, builds and caches."""
    sizes = ctx.sizes
    top = ctx.root / "small"
    payload = os.urandom(sizes.small_file_bytes)
    per_dir = -(-sizes.small_files // sizes.small_dirs)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    start = time.perf_counter()
    top.mkdir()
    made = 0
    for d in range(sizes.small_dirs):
        sub = top / f"d{d:03d}"
        sub.mkdir()
        for f in range(min(per_dir, sizes.small_files - made)):
            fd = os.open(sub / f"f{f:05d}.dat", flags, 0o644)
            try:
                _write_all(fd, payload)
            finally:
                os.close(fd)
            made += 1
    ctx.record("small_create", time.perf_counter() - start)

    expected = made + sizes.small_dirs
    start = time.perf_counter()
    seen = _lstat_walk(top)
    elapsed = time.perf_counter() - start
    if seen != expected:
        raise OSError(f"lstat walk saw {seen} entries, expected {expected}")
    ctx.record("small_stat", elapsed)

    ctx.record("small_ls", timed_command(["ls", "-lR", top], timeout=ctx.timeout))

    if ctx.caches.drop():
        start = time.perf_counter()
        _lstat_walk(top)
        ctx.record("small_stat_cold", time.perf_counter() - start)


def source_tree(ctx: Context) -> None:
    """Unpack a real source tree, then delete it: a fresh checkout and a `clean`."""
    dest = ctx.root / "tree"
    dest.mkdir()
    ctx.record("untar", timed_command(["tar", "xf", ctx.tarball, "-C", dest], timeout=ctx.timeout))
    ctx.record("rm_rf", timed_command(["rm", "-rf", dest], timeout=ctx.timeout))
    if dest.exists():
        shutil.rmtree(dest)
        raise OSError("rm -rf exited 0 but the tree is still there")


def small_writes(ctx: Context) -> None:
    """4 KiB write() calls: exposes per-request overhead (one FUSE round trip each, unless
    the filesystem enables writeback caching). No fsync, so this is the syscall path."""
    path = ctx.root / "w4k.bin"
    block = os.urandom(SMALL_BLOCK)
    count = ctx.sizes.write4k_mib * MiB // SMALL_BLOCK
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(count):
            _write_all(fd, block)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    ctx.record("write_4k", ctx.sizes.write4k_mib / elapsed)
    path.unlink()


@dataclass(frozen=True)
class Workload:
    """A named step producing some metrics; ``git_status`` must stay first (cold = after mount)."""

    name: str
    run: Callable[[Context], None]
    produces: tuple[str, ...]


WORKLOADS: tuple[Workload, ...] = (
    Workload("git status", git_status, ("git_status_cold", "git_status_warm")),
    Workload("sequential I/O", sequential_io, ("seq_write", "seq_read_warm", "seq_read_cold")),
    Workload(
        "small files", small_files, ("small_create", "small_stat", "small_ls", "small_stat_cold")
    ),
    Workload("source tree", source_tree, ("untar", "rm_rf")),
    Workload("4 KiB writes", small_writes, ("write_4k",)),
)
