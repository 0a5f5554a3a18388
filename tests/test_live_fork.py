"""Forking a branch while it is mounted and being written: the fork is the snapshot of
that instant, open files included; later writes through old handles stay in the parent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mountutil import cli_env, mounted_branch, run_cli

pytestmark = pytest.mark.mount


def test_fork_of_mounted_branch_with_open_writer(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "log.txt").write_text("base\n")
    env = cli_env(tmp_path / "home")
    store = tmp_path / "store"
    run_cli("init", str(base), "--store", str(store), env=env)
    run_cli("--store", str(store), "branch", "create", "a", env=env)
    with mounted_branch(base, tmp_path / "a", branch="a", init=False, store=store,
                        env=env) as ma:
        mnt = ma.mountpoint
        fd = os.open(mnt / "log.txt", os.O_WRONLY | os.O_APPEND)
        new_fd = os.open(mnt / "fresh.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"before fork\n")
            os.write(new_fd, b"new before\n")
            (mnt / "closed.txt").write_text("closed before\n")
            for i in range(3):
                run_cli("--store", str(store), "branch", "create", f"b{i}", "--from", "a",
                        env=env)
                os.write(fd, f"after fork {i}\n".encode())
                os.write(new_fd, f"new after {i}\n".encode())
            (mnt / "closed.txt").write_text("changed after\n")
            (mnt / "later.txt").write_text("only in a\n")
        finally:
            os.close(fd)
            os.close(new_fd)
        assert (mnt / "log.txt").read_text() == (
            "base\nbefore fork\nafter fork 0\nafter fork 1\nafter fork 2\n")
        assert (mnt / "fresh.txt").read_text() == (
            "new before\nnew after 0\nnew after 1\nnew after 2\n")
        with mounted_branch(base, tmp_path / "b0", branch="b0", init=False, store=store,
                            env=env) as mb:
            b = mb.mountpoint
            assert (b / "log.txt").read_text() == "base\nbefore fork\n"
            assert (b / "fresh.txt").read_text() == "new before\n"
            assert (b / "closed.txt").read_text() == "closed before\n"
            assert not (b / "later.txt").exists()
            (b / "log.txt").write_text("b0 wrote\n")
        with mounted_branch(base, tmp_path / "b2", branch="b2", init=False, store=store,
                            env=env) as mb2:
            assert (mb2.mountpoint / "log.txt").read_text() == (
                "base\nbefore fork\nafter fork 0\nafter fork 1\n")
        assert (mnt / "log.txt").read_text().endswith("after fork 2\n")  # b0 changed nothing
    assert (base / "log.txt").read_text() == "base\n"
