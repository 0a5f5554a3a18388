"""Bad input to every command: one line on stderr, the documented exit code, never a
traceback.  Store problems (missing, corrupt, not a store, read-only, base gone) are
4, usage 2, unknown names 6, mount problems 5 (agentfs/errors.py, README)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cliutil import Result, invoke, make_store
from mountutil import is_mounted
from test_cli_fuzz import COMMANDS

from agentfs.branches.store import Store
from agentfs.errors import (
    EXIT_CODES,
    EXIT_MOUNT,
    EXIT_NOT_FOUND,
    EXIT_STORE,
    EXIT_USAGE,
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(tmp_path: Path, home: Path) -> Path:
    return make_store(tmp_path, home)


def fails(res: Result, code: int, match: str) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    assert res.code == code, (res.code, res.stderr)
    assert len(res.err_lines) == 1, res.stderr
    assert match in res.err_lines[0], res.err_lines[0]
    return res.err_lines[0]


STORE_COMMANDS = [("status",), ("branch", "list"), ("branch", "create", "x"),
                  ("branch", "diff", "b"), ("branch", "show", "b"), ("branch", "commit", "b"),
                  ("branch", "discard", "b", "--yes"), ("trash", "list"), ("trash", "purge"),
                  ("audit", "query"), ("audit", "retention"), ("prompts", "--once"),
                  ("mount", "MNT", "--branch", "b"), ("exec", "--branch", "b", "--", "true"),
                  ("bind", "--pid", "1", "--branch", "b"),
                  ("run", "--branch", "b", "--", "true")]


def every_store_command(store: Path, tmp_path: Path, home: Path, code: int, match: str
                        ) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    for args in STORE_COMMANDS:
        argv = [str(mnt) if a == "MNT" else a for a in args]
        fails(invoke("--store", str(store), *argv, home=home), code, match)
    assert not is_mounted(str(mnt))


def test_missing_store_and_missing_meta_db(tmp_path: Path, home: Path) -> None:
    every_store_command(tmp_path / "nostore", tmp_path, home, EXIT_STORE,
                        "is not an agentfs store (the directory does not exist)")
    (tmp_path / "empty").mkdir()
    every_store_command(tmp_path / "empty", tmp_path, home, EXIT_STORE,
                        "is not an agentfs store (no meta.db)")
    fails(invoke("status", home=home, cwd=tmp_path), EXIT_STORE, "no agentfs store found")


def test_corrupt_meta_db(tmp_path: Path, store: Path, home: Path) -> None:
    (store / "meta.db").write_bytes(os.urandom(8192))
    for side in ("meta.db-wal", "meta.db-shm"):
        with contextlib.suppress(FileNotFoundError):
            (store / side).unlink()
    every_store_command(store, tmp_path, home, EXIT_STORE, "meta.db is corrupt")
    (store / "meta.db").write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    fails(invoke("--store", str(store), "status", home=home), EXIT_STORE, "meta.db")


def test_meta_db_of_something_else_is_left_alone(tmp_path: Path, home: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.db").write_bytes(b"")  # SQLite would take it as an empty database
    fails(invoke("--store", str(other), "branch", "list", home=home), EXIT_STORE,
          "meta.db is not an agentfs store (no store_info table)")
    assert (other / "meta.db").read_bytes() == b""
    conn = sqlite3.connect(other / "meta.db")
    conn.execute("CREATE TABLE store_info (key, value)")
    conn.commit()
    conn.close()
    fails(invoke("--store", str(other), "status", home=home), EXIT_STORE, "no base_path")


@contextlib.contextmanager
def read_only_view(store: Path, at: Path) -> Iterator[Path]:
    """*store* seen through a read-only bind mount at *at* (EROFS for every write)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root")
    at.mkdir()
    subprocess.run(["mount", "--bind", str(store), str(at)], check=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(at)], check=True, timeout=30)
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], timeout=30)


def test_read_only_store(tmp_path: Path, store: Path, home: Path) -> None:
    with read_only_view(store, tmp_path / "ro") as ro:
        with pytest.raises(OSError, match="Read-only"):
            (ro / "probe").write_text("x")
        every_store_command(ro, tmp_path, home, EXIT_STORE,
                            "meta.db: Read-only file system")
        other = tmp_path / "other-base"
        other.mkdir()
        fails(invoke("init", str(other), "--store", str(ro / "new"), home=home), EXIT_STORE,
              "Read-only file system")
    res = invoke("--store", str(store), "branch", "list", home=home)
    assert (res.code, res.stdout) == (0, "b\t(from base)\n")  # the store itself is fine


def test_immutable_meta_db(tmp_path: Path, store: Path, home: Path) -> None:
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", str(store / "meta.db")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        fails(invoke("--store", str(store), "branch", "create", "x", home=home), EXIT_STORE,
              "meta.db: Operation not permitted")
    finally:
        subprocess.run(["chattr", "-i", str(store / "meta.db")], check=True)
    assert invoke("--store", str(store), "branch", "create", "x", home=home).code == 0


def test_base_directory_gone(tmp_path: Path, store: Path, home: Path) -> None:
    shutil.rmtree(tmp_path / "base")
    s = ("--store", str(store))
    for args in (("branch", "diff", "b"), ("branch", "show", "b"), ("branch", "commit", "b")):
        fails(invoke(*s, *args, home=home), EXIT_STORE, f"the base directory "
              f"{tmp_path / 'base'} of store {store} is missing")
    assert invoke(*s, "branch", "list", home=home).code == 0  # what needs no base works
    fails(invoke("init", str(tmp_path / "base"), home=home), EXIT_NOT_FOUND,
          "does not exist")


def test_unknown_branches(tmp_path: Path, store: Path, home: Path) -> None:
    s = ("--store", str(store))
    (tmp_path / "mnt").mkdir()
    for args in (("branch", "diff", "nope"), ("branch", "show", "nope"),
                 ("branch", "commit", "nope"), ("branch", "discard", "nope", "--yes"),
                 ("branch", "create", "x", "--from", "nope"),
                 ("mount", str(tmp_path / "mnt"), "--branch", "nope"),
                 ("mount", str(tmp_path / "mnt"), "--per-process", "--default-branch", "nope"),
                 ("exec", "--branch", "nope", "--", "true"),
                 ("bind", "--pid", "1", "--branch", "nope"),
                 ("run", "--branch", "nope", "--", "true")):
        fails(invoke(*s, *args, home=home), EXIT_NOT_FOUND,
              "unknown branch 'nope' (branches: b)")
    fails(invoke(*s, "branch", "restore", "nope", home=home), EXIT_NOT_FOUND,
          "no discarded branch 'nope'")
    fails(invoke(*s, "trash", "show", "nope", home=home), EXIT_NOT_FOUND, "no trash entry")
    fails(invoke(*s, "approve", "123-4", home=home), EXIT_NOT_FOUND, "no mount is waiting")
    fails(invoke("policy", "lint", str(tmp_path / "nopolicy.yaml"), home=home),
          EXIT_NOT_FOUND, "does not exist")
    assert not is_mounted(str(tmp_path / "mnt"))


def test_odd_bytes_and_long_names(tmp_path: Path, store: Path, home: Path) -> None:
    s = ("--store", str(store))
    odd = os.fsdecode(b"br\xff\xfe")
    fails(invoke(*s, "branch", "create", odd, home=home), EXIT_USAGE, "not valid UTF-8")
    fails(invoke(*s, "branch", "create", "a\nb", home=home), EXIT_USAGE,
          r"'a\nb' must not contain")
    fails(invoke(*s, "branch", "create", "x" * 101, home=home), EXIT_USAGE, "too long")
    fails(invoke(*s, "branch", "create", "x" * 100_000, home=home), EXIT_USAGE, "too long")
    fails(invoke(*s, "branch", "diff", odd, home=home), EXIT_NOT_FOUND, "unknown branch")
    odd_dir = os.fsencode(tmp_path) + b"/base-\xff"
    os.mkdir(odd_dir)
    fails(invoke("init", os.fsdecode(odd_dir), home=home), EXIT_USAGE,
          "base directory")
    fails(invoke("init", str(tmp_path / "base"), "--store", os.fsdecode(odd_dir + b"/s"),
                 home=home), EXIT_USAGE, "store directory")
    fails(invoke(*s, "mount", os.fsdecode(odd_dir), "--branch", "b", home=home), EXIT_USAGE,
          "mountpoint")
    too_long = str(tmp_path / ("n" * 300))
    fails(invoke("init", too_long, home=home), EXIT_USAGE, "File name too long")
    fails(invoke(*s, "mount", too_long, "--branch", "b", home=home), EXIT_MOUNT,
          "File name too long")
    fails(invoke(*s, "umount", too_long, home=home), EXIT_MOUNT, "is not mounted")
    deep = str(tmp_path / "/".join(["d" * 200] * 30))  # beyond PATH_MAX
    fails(invoke("init", deep, home=home), EXIT_USAGE, "File name too long")
    res = invoke(*s, "branch", "diff", "b", *[odd, "y" * 5000], home=home)
    assert res.code == 0 and res.stderr == ""  # odd paths limit the diff to nothing


def test_usage_errors_of_every_command(store: Path, home: Path) -> None:
    """Every command without its arguments, and with an unknown option: exit 2, one
    line naming the command."""
    for path, spec in sorted(COMMANDS.items()):
        res = invoke("--store", str(store), *path, "--no-such-option", home=home)
        fails(res, EXIT_USAGE, " ".join(("agentfs", *path)))
        required = spec.required or path in (("bind",), ("exec",),
                                                                 ("run",))
        if required or not path:
            res = invoke("--store", str(store), *path, home=home)
            fails(res, EXIT_USAGE, " ".join(("agentfs", *path)))
    fails(invoke("--store", str(store), "audit", "query", "--since", "yesterday-ish",
                 home=home), EXIT_USAGE, "bad time")
    fails(invoke("--store", str(store), "audit", "query", "--limit", "many", home=home),
          EXIT_USAGE, "Invalid value for '--limit'")
    fails(invoke("--store", str(store), "mount", "/", home=home), EXIT_USAGE,
          "give either --branch NAME")
    fails(invoke("--store", str(store), "branch", "discard", "b", home=home), EXIT_USAGE,
          "without --yes")
    fails(invoke("policy", "check", "default", "x", "--op", "frobnicate", home=home),
          EXIT_USAGE, "unknown operation")


def test_busy_mountpoint(tmp_path: Path, store: Path, home: Path) -> None:
    """Something else mounted there (a tmpfs): refused, exit 5, nothing touched."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "busy"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True, timeout=30)
    try:
        fails(invoke("--store", str(store), "mount", str(mnt), "--branch", "b", home=home),
              EXIT_MOUNT, "is busy: something is already mounted there")
        fails(invoke("--store", str(store), "umount", str(mnt), home=home), EXIT_MOUNT,
              "it is not a FUSE mount (tmpfs)")
        assert is_mounted(str(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], timeout=30)


def test_exit_codes_are_documented() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("## Exit codes"):]
    for code in EXIT_CODES:
        assert f"\n| {code} |" in table, code


def test_store_class_errors_are_user_errors(tmp_path: Path) -> None:
    """The same checks guard every opener of a store, not only the CLI."""
    from agentfs.errors import StoreError

    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "none")
