"""The measured workloads, modelled on what a coding agent does to a project checkout.

Every workload runs on a fresh setup: ``prepare`` fills a new base (lower) directory
before anything is mounted, then the target is mounted over it and ``run`` does the timed
part. Neither the preparation, the mount, nor the teardown is timed; inside ``run`` only
the operation itself is. A workload records each metric as soon as it has it, so a
filesystem that fails half-way still contributes what it did produce.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.fixtures import (
    GIT_ARGS,
    PIP_PACKAGE,
    append_file_sizes,
    create_base_repo,
    extract_tree,
    git_env,
    python_env,
    write_pip_package,
    write_random_file,
    write_text_file,
)
from bench.system import CacheDropper, timed_command

MiB = 1 << 20
BLOCK = MiB  # the unit of the streaming reads and writes
APPEND_LINE = b"# appended by the agentfs benchmark\n"
GREP_NEEDLE = "agentfs-bench-needle"  # in no file: grep reads every byte of every file


@dataclass(frozen=True)
class Sizes:
    """Workload sizes; ``QUICK`` keeps the same shape at a fraction of the cost."""

    tree_files: int = 3000
    create_files: int = 2000
    create_dirs: int = 20
    create_bytes: int = 1024
    read_mib: int = 64
    write_mib: int = 128
    append_files: int = 300
    append_big_mib: int = 16
    pip_modules: int = 20


FULL = Sizes()
QUICK = Sizes(
    tree_files=500,
    create_files=200,
    create_dirs=5,
    read_mib=8,
    write_mib=16,
    append_files=50,
    append_big_mib=2,
    pip_modules=5,
)


@dataclass(frozen=True)
class Metric:
    """One row of the report, in seconds (lower is better)."""

    key: str
    label: str


Record = Callable[[str, float], None]


@dataclass
class Fixtures:
    """What ``prepare`` needs to fill a base: the cached source tree and the sizes."""

    tarball: Path
    tree_files: int
    sizes: Sizes
    timeout: float


@dataclass
class Context:
    """What ``run`` needs: where to work, how big, and the shared helpers."""

    root: Path
    sizes: Sizes
    tarball: Path
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


def _timed(ctx: Context, key: str, fn: Callable[[], object]) -> None:
    start = time.perf_counter()
    fn()
    ctx.record(key, time.perf_counter() - start)


# ------------------------------------------------------------------ 1. untar


def prepare_nothing(base: Path, fx: Fixtures, log: Path) -> None:
    """An empty base: the workload only writes new files."""


def untar(ctx: Context) -> None:
    """Unpack a real source tree into the mount: a fresh checkout or an unpacked sdist."""
    dest = ctx.root / "tree"
    dest.mkdir()
    cmd: list[str | Path] = ["tar", "xf", ctx.tarball, "-C", dest]
    ctx.record("untar", timed_command(cmd, timeout=ctx.timeout))


# ------------------------------------------------------------------ 2. create


def create_files(ctx: Context) -> None:
    """Many tiny new files (open, write 1 KiB, close each): the metadata-bound pattern of
    builds, caches and generated code."""
    sizes = ctx.sizes
    top = ctx.root / "small"
    payload = os.urandom(sizes.create_bytes)
    per_dir = -(-sizes.create_files // sizes.create_dirs)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    start = time.perf_counter()
    top.mkdir()
    made = 0
    for d in range(sizes.create_dirs):
        sub = top / f"d{d:03d}"
        sub.mkdir()
        for f in range(min(per_dir, sizes.create_files - made)):
            fd = os.open(sub / f"f{f:05d}.dat", flags, 0o644)
            try:
                _write_all(fd, payload)
            finally:
                os.close(fd)
            made += 1
    ctx.record("create", time.perf_counter() - start)
    seen = sum(len(os.listdir(top / f"d{d:03d}")) for d in range(sizes.create_dirs))
    if seen != sizes.create_files:
        raise OSError(f"created {sizes.create_files} files but {seen} are listed")


# ------------------------------------------------------------------ 3. git status


def prepare_repo(base: Path, fx: Fixtures, log: Path) -> None:
    """A committed git repo of the source tree, made in place so its index matches."""
    create_base_repo(base / "repo", fx.tarball, timeout=fx.timeout, log=log)


def git_status(ctx: Context) -> None:
    """`git status` twice in the repo that lives in the base.

    Typically an agent's first command: it stats every tracked file and reads the index
    through the overlay. Kernel caches are dropped before the first run where possible
    (for every target alike, so the plain baseline is cold too); the second run is
    right after, with whatever the first one left in caches (and the index it may have
    refreshed and copied up).
    """
    env = git_env()
    cmd = [*GIT_ARGS, "status"]
    repo = ctx.root / "repo"
    ctx.caches.drop()
    ctx.record("git_status_1", timed_command(cmd, cwd=repo, env=env, timeout=ctx.timeout))
    ctx.record("git_status_2", timed_command(cmd, cwd=repo, env=env, timeout=ctx.timeout))


# ------------------------------------------------------------------ 4. grep


def prepare_tree(base: Path, fx: Fixtures, log: Path) -> None:
    """The source tree, unpacked in the base (no git repo)."""
    extract_tree(base / "tree", fx.tarball, timeout=fx.timeout, log=log)


def grep_tree(ctx: Context) -> None:
    """`grep -r -c` for a string that is in no file, so every byte of every base file is
    read through the overlay. grep exits 1 when nothing matched: that is a success."""
    cmd = ["grep", "-r", "-c", "-F", GREP_NEEDLE, "."]
    tree = ctx.root / "tree"
    ctx.record("grep", timed_command(cmd, cwd=tree, timeout=ctx.timeout, ok=(0, 1)))


# ------------------------------------------------------------------ 5. read


def prepare_big_file(base: Path, fx: Fixtures, log: Path) -> None:
    write_random_file(base / "big.bin", fx.sizes.read_mib * MiB)


def read_big_file(ctx: Context) -> None:
    """A base file read three times in 1 MiB blocks. Caches are dropped before the first
    read (every target alike), so the 1st read comes from disk; the 2nd and 3rd show
    what caching the filesystem does. Reported: the 1st, and the mean of the other two."""
    path = ctx.root / "big.bin"
    expected = ctx.sizes.read_mib * MiB
    ctx.caches.drop()
    times: list[float] = []
    for _ in range(3):
        start = time.perf_counter()
        got = _read_file(path, BLOCK)
        times.append(time.perf_counter() - start)
        if got != expected:
            raise OSError(f"read {got} bytes of {expected}")
        if len(times) == 1:
            ctx.record("read_1", times[0])
    ctx.record("read_warm", (times[1] + times[2]) / 2)


# ------------------------------------------------------------------ 6. write


def write_big_file(ctx: Context) -> None:
    """A new file written in 1 MiB `write()` calls, then `fsync`: build outputs, logs."""
    path = ctx.root / "out.bin"
    block = os.urandom(BLOCK)  # incompressible, generated outside the timed region
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(ctx.sizes.write_mib):
            _write_all(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    ctx.record("write", time.perf_counter() - start)


# ------------------------------------------------------------------ 7. append (copy-up)


def _append_paths(root: Path, count: int) -> list[Path]:
    return [root / "data" / f"f{i:03d}.txt" for i in range(count)]


def prepare_append(base: Path, fx: Fixtures, log: Path) -> None:
    """Base files of varying sizes (64 B to 512 KiB) and one large one."""
    (base / "data").mkdir()
    sizes = append_file_sizes(fx.sizes.append_files)
    for path, size in zip(_append_paths(base, len(sizes)), sizes, strict=True):
        write_text_file(path, size)
    write_random_file(base / "large.bin", fx.sizes.append_big_mib * MiB)


def append_files(ctx: Context) -> None:
    """Append a line to each small base file, and once to the large one: the first write
    to a base file makes an overlay copy it up, which is what editing a checkout costs."""
    paths = [*_append_paths(ctx.root, ctx.sizes.append_files), ctx.root / "large.bin"]
    start = time.perf_counter()
    for path in paths:
        with open(path, "ab", buffering=0) as fh:
            fh.write(APPEND_LINE)
    ctx.record("append", time.perf_counter() - start)
    want = ctx.sizes.append_big_mib * MiB + len(APPEND_LINE)
    if (got := paths[-1].stat().st_size) != want:
        raise OSError(f"large file is {got} bytes after the append, expected {want}")


# ------------------------------------------------------------------ 8. rm -rf


def rm_tree(ctx: Context) -> None:
    """Delete the base's source tree: every file is a lower file, so an overlay has to
    record each deletion (whiteouts, trash entries) rather than just unlink."""
    tree = ctx.root / "tree"
    ctx.record("rm_rf", timed_command(["rm", "-rf", tree], timeout=ctx.timeout))
    if os.path.lexists(tree):
        raise OSError("rm -rf exited 0 but the tree is still there")


# ------------------------------------------------------------------ 9. python


def compileall(ctx: Context) -> None:
    """`python -m compileall -q` of the base's source tree: reads every .py file and
    writes a __pycache__ next to it (new files in base directories)."""
    cmd: list[str | Path] = [sys.executable, "-m", "compileall", "-q", ctx.root / "tree"]
    ctx.record("compileall", timed_command(cmd, env=python_env(), timeout=ctx.timeout))


def prepare_pip(base: Path, fx: Fixtures, log: Path) -> None:
    write_pip_package(base / "pkg", fx.sizes.pip_modules)


def pip_install(ctx: Context) -> None:
    """A new venv in the mount (`python -m venv --without-pip`), then the interpreter's
    own pip installs the local package (in the base) into it, offline:
    `python -m pip --python VENV/bin/python install --no-index --no-build-isolation`.
    Both steps are timed together; pip builds the wheel in the user's TMPDIR, as usual."""
    venv = ctx.root / "venv"
    env = python_env()
    pip: list[str | Path] = [
        sys.executable, "-m", "pip", "--python", venv / "bin" / "python",
        "--no-cache-dir", "--disable-pip-version-check", "--no-input", "--quiet",
        "install", "--no-index", "--no-build-isolation", "--no-deps", ctx.root / "pkg",
    ]
    elapsed = timed_command(
        [sys.executable, "-m", "venv", "--without-pip", venv], env=env, timeout=ctx.timeout
    )
    elapsed += timed_command(pip, env=env, timeout=ctx.timeout)
    ctx.record("pip_install", elapsed)
    if not (venv / "bin" / PIP_PACKAGE).exists():
        raise OSError(f"pip exited 0 but {PIP_PACKAGE}'s console script is missing")


# ------------------------------------------------------------------ the list


@dataclass(frozen=True)
class Workload:
    """A named step: fill the base, then (mounted) produce some metrics."""

    name: str
    prepare: Callable[[Path, Fixtures, Path], None]
    run: Callable[[Context], None]
    produces: tuple[str, ...]


WORKLOADS: tuple[Workload, ...] = (
    Workload("untar", prepare_nothing, untar, ("untar",)),
    Workload("create", prepare_nothing, create_files, ("create",)),
    Workload("git", prepare_repo, git_status, ("git_status_1", "git_status_2")),
    Workload("grep", prepare_tree, grep_tree, ("grep",)),
    Workload("read", prepare_big_file, read_big_file, ("read_1", "read_warm")),
    Workload("write", prepare_nothing, write_big_file, ("write",)),
    Workload("append", prepare_append, append_files, ("append",)),
    Workload("rm", prepare_tree, rm_tree, ("rm_rf",)),
    Workload("compileall", prepare_tree, compileall, ("compileall",)),
    Workload("pip", prepare_pip, pip_install, ("pip_install",)),
)
WORKLOAD_NAMES = tuple(w.name for w in WORKLOADS)


def metrics(sizes: Sizes, tree_files: int) -> list[Metric]:
    """All report rows in display order, labelled with the sizes actually used."""
    s = sizes
    big = f"{s.append_big_mib} MiB"
    return [
        Metric("untar", f"untar source tree ({tree_files} files)"),
        Metric("create", f"create {s.create_files} x {s.create_bytes // 1024} KiB files"
                         f" ({s.create_dirs} dirs)"),
        Metric("git_status_1", f"git status (1st), {tree_files} files, cold caches"),
        Metric("git_status_2", "git status (2nd)"),
        Metric("grep", f"grep -r over {tree_files} base files"),
        Metric("read_1", f"read {s.read_mib} MiB base file (1st, cold caches)"),
        Metric("read_warm", f"read {s.read_mib} MiB base file (2nd+3rd, mean)"),
        Metric("write", f"write {s.write_mib} MiB (1 MiB writes) + fsync"),
        Metric("append", f"append to {s.append_files} base files + one of {big} (copy-up)"),
        Metric("rm_rf", f"rm -rf base source tree ({tree_files} files)"),
        Metric("compileall", "python -m compileall -q of the base source tree"),
        Metric("pip_install", f"venv + pip install local package ({s.pip_modules} modules)"),
    ]
