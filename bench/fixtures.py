"""Test data put into the base (lower) directory before a mount: a source tree from a
cached tarball, a committed git repo, data files for the read and append workloads, and a
small local Python package for ``pip install``.

The tree is real Python source (the interpreter's stdlib, topped up from the venv's
site-packages) because file-size and directory-fan-out distributions matter for overlay
filesystems, and synthetic trees get them wrong.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tarfile
from collections.abc import Iterator
from pathlib import Path

from bench.system import run

# Directories that are generated, binary, or test data rather than "a source tree".
EXCLUDED_DIRS = frozenset(
    {"__pycache__", "test", "tests", "idle_test", "site-packages", "lib-dynload", ".git"}
)
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".so", ".a", ".o", ".dll", ".dylib", ".exe")
MAX_FILE_BYTES = 1 << 20

# Keep git away from the user's configuration and hooks so timings are comparable.
GIT_ENV_OVERRIDES = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "LC_ALL": "C",
}
GIT_ARGS = [
    "git",
    "-c",
    "safe.directory=*",
    "-c",
    "user.name=agentfs-bench",
    "-c",
    "user.email=bench@example.invalid",
    "-c",
    "init.defaultBranch=main",
    "-c",
    "gc.auto=0",
    "-c",
    "core.fsmonitor=false",
]


def git_env() -> dict[str, str]:
    """Environment for every git invocation of the harness (setup and measurement)."""
    return {**os.environ, **GIT_ENV_OVERRIDES}


def _source_roots() -> list[tuple[str, Path]]:
    """Where to take files from, in order: stdlib first, then third-party packages.

    The stdlib alone, without its tests, is only ~800 files, so site-packages (installed
    libraries, also real source) fills the tree up to the requested size.
    """
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"])), ("site-packages", Path(paths["purelib"]))]
    return [(name, path) for name, path in roots if path.is_dir()]


def _excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith("config-")


def _walk_sources(max_files: int) -> Iterator[tuple[Path, str]]:
    """Yield (path on disk, name in archive) for directories and files, deterministically."""
    count = 0
    for label, root in _source_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not _excluded_dir(d))
            rel = Path(dirpath).relative_to(root)
            arc_dir = Path("src", label, rel)
            yield Path(dirpath), arc_dir.as_posix()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if name.endswith(EXCLUDED_SUFFIXES) or path.is_symlink():
                    continue
                try:
                    if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
                        continue
                except OSError:
                    continue
                yield path, (arc_dir / name).as_posix()
                count += 1
                if count >= max_files:
                    return


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Make ownership identical everywhere so extraction does the same work on each target."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def ensure_source_tarball(cache_dir: Path, max_files: int, name: str) -> tuple[Path, int]:
    """Build the tarball once and reuse it: regenerating would change the workload.

    Returns the path and its number of regular files. Written to a temp name and renamed
    so an interrupted run never leaves a truncated cache behind.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / name
    if not path.exists():
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for src, arcname in _walk_sources(max_files):
                    tar.add(src, arcname=arcname, recursive=False, filter=_normalize)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    with tarfile.open(path) as tar:
        files = sum(1 for member in tar if member.isfile())
    return path, files


def create_base_repo(repo: Path, tarball: Path, *, timeout: float, log: Path) -> None:
    """Populate the base (lower) dir with a committed git repo before anything is mounted.

    ``git status`` through the overlay then has to read a real index and stat every
    tracked file via the filesystem under test, as an agent's first command would.
    """
    repo.mkdir(parents=True)
    env = git_env()
    run(["tar", "xf", tarball, "-C", repo], timeout=timeout, log=log)
    run([*GIT_ARGS, "init", "-q"], cwd=repo, env=env, timeout=timeout, log=log)
    run([*GIT_ARGS, "add", "-A"], cwd=repo, env=env, timeout=timeout, log=log)
    run(
        [*GIT_ARGS, "commit", "-q", "-m", "base"],
        cwd=repo,
        env=env,
        timeout=timeout,
        log=log,
    )


def extract_tree(dest: Path, tarball: Path, *, timeout: float, log: Path) -> None:
    """Unpack the source tree into ``dest`` (the base), untimed."""
    dest.mkdir(parents=True)
    run(["tar", "xf", tarball, "-C", dest], timeout=timeout, log=log)


def write_random_file(path: Path, size: int) -> None:
    """Incompressible data, so no layer can shortcut it (and no sparse files)."""
    chunk = os.urandom(min(size, 1 << 20)) if size else b""
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n


def append_file_sizes(count: int) -> list[int]:
    """Sizes of the small append targets: 64 B, 128 B, ... 512 KiB, round robin, so the
    copy-up cost of both tiny and sizeable files is in the mix (about 75 KiB on average)."""
    return [1 << (6 + i % 14) for i in range(count)]


def write_text_file(path: Path, size: int) -> None:
    """A text-like file of exactly ``size`` bytes ending in a newline."""
    line = b"the quick brown fox jumps over the lazy dog 0123456789\n"
    data = (line * (size // len(line) + 1))[: size - 1] + b"\n"
    path.write_bytes(data)


_PYPROJECT = """\
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]

[project]
name = "benchpkg"
version = "1.0"
"""

PIP_PACKAGE = "benchpkg"  # the name bench/pip_backend.py builds


def write_pip_package(dest: Path, modules: int) -> None:
    """A small pure-Python package with a console script, built by its own backend."""
    pkg = dest / "src" / PIP_PACKAGE
    pkg.mkdir(parents=True)
    (dest / "pyproject.toml").write_text(_PYPROJECT)
    shutil.copyfile(Path(__file__).with_name("pip_backend.py"), dest / "backend.py")
    imports = "\n".join(f"from {PIP_PACKAGE} import mod{i:02d}" for i in range(modules))
    (pkg / "__init__.py").write_text(
        f"{imports}\n\n\ndef main():\n    print(mod00.value(1))\n"
    )
    names = [f"f{j}" for j in range(40)]
    for i in range(modules):
        funcs = "\n\n".join(
            f'def {name}(x):\n    """Step {j}."""\n    return x * {j} + {i}\n'
            for j, name in enumerate(names)
        )
        (pkg / f"mod{i:02d}.py").write_text(
            f'"""Module {i} of the benchmark package."""\n\n\n{funcs}\n\n'
            f"def value(x):\n    return sum(f(x) for f in ({', '.join(names)}))\n"
        )


def python_env() -> dict[str, str]:
    """Environment for the Python workloads: the user's, minus PYTHON* and PIP* settings
    (bytecode suppression, extra paths, find-links, an index) that would change what the
    command does; pip reads no config file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env
