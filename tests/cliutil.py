"""The CLI in-process: `agentfs.cli.main.run` with its own stdout/stderr and environment.

Much faster than a subprocess per call (no interpreter start-up), and exactly what the
console script runs after it sets up its streams: stdout and stderr are UTF-8 with
surrogateescape, as main() makes them.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def err_lines(self) -> list[str]:
        return self.stderr.strip("\n").splitlines() if self.stderr.strip() else []


@contextlib.contextmanager
def environment(values: dict[str, str | None], cwd: Path | None = None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    old_cwd = os.getcwd()
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if cwd is not None:
            os.chdir(cwd)
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stream() -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape",
                            write_through=True)


def invoke(*args: str, home: Path, store: Path | str | None = None,
           cwd: Path | None = None) -> Result:
    """Run `agentfs ARGS` in this process with AGENTFS_HOME=*home* (and HOME too, so
    `~` cannot reach the real home) and AGENTFS_STORE=*store* if given."""
    from agentfs.cli.main import run

    out, err = _stream(), _stream()
    env: dict[str, str | None] = {"AGENTFS_HOME": str(home), "HOME": str(home),
                                  "AGENTFS_STORE": str(store) if store else None,
                                  "AGENTFS_DEBUG": None}
    with environment(env, cwd), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        stdin, sys.stdin = sys.stdin, io.StringIO("")  # never a terminal: nothing asks
        try:
            code = run(list(args))
        finally:
            sys.stdin = stdin
    return Result(code, _text(out), _text(err))


def _text(stream: io.TextIOWrapper) -> str:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8", errors="surrogateescape")


def make_store(tmp_path: Path, home: Path) -> Path:
    """A store (tmp_path/store) for a one-file base (tmp_path/base) with a branch "b",
    made through the CLI."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "file.txt").write_text("hello\n")
    res = invoke("init", str(base), "--store", str(tmp_path / "store"), home=home)
    assert res.code == 0, res.stderr
    assert invoke("--store", str(tmp_path / "store"), "branch", "create", "b",
                  home=home).code == 0
    return tmp_path / "store"
