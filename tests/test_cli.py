"""The CLI end to end: every bad input gives one clear line and a non-zero exit,
never a traceback; the happy path works through the real console script."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from mountutil import AGENTFS, cli_env, force_unmount, is_mounted, require_fuse, run_cli


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path / "home")


@pytest.fixture
def store(tmp_path: Path, env: dict[str, str]) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "file.txt").write_text("hello\n")
    run_cli("init", str(base), "--store", str(tmp_path / "store"), env=env)
    return tmp_path / "store"


def fails(env: dict[str, str], *args: str, match: str, cwd: str | None = None) -> str:
    res = run_cli(*args, env=env, check=False, cwd=cwd)
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def test_init_errors(tmp_path: Path, env: dict[str, str]) -> None:
    fails(env, "init", str(tmp_path / "missing"), match="does not exist")
    (tmp_path / "plainfile").write_text("x")
    fails(env, "init", str(tmp_path / "plainfile"), match="is not a directory")
    base = tmp_path / "b"
    base.mkdir()
    run_cli("init", str(base), "--store", str(tmp_path / "s"), env=env)
    fails(env, "init", str(base), "--store", str(tmp_path / "s"), match="already exists")
    fails(env, "init", str(base), "--store", str(base / "inside"), match="must not be inside")


def test_store_discovery(tmp_path: Path, env: dict[str, str]) -> None:
    base = tmp_path / "proj"
    (base / "sub").mkdir(parents=True)
    res = run_cli("init", str(base), env=env)  # default location under AGENTFS_HOME
    assert str(tmp_path / "home") in res.stdout
    run_cli("branch", "create", "x", env=env, cwd=str(base / "sub"))
    listed = json.loads(run_cli("branch", "list", "--json", env=env, cwd=str(base)).stdout)
    assert [b["name"] for b in listed] == ["x"]
    fails(env, "branch", "list", match="no agentfs store found", cwd=str(tmp_path))
    env2 = dict(env, AGENTFS_STORE=json.loads(
        run_cli("status", "--json", env=env, cwd=str(base)).stdout)["store"])
    assert "x" in run_cli("branch", "list", env=env2, cwd="/").stdout
    fails(env, "--store", str(tmp_path / "nostore"), "status", match="not an agentfs store")


@pytest.mark.parametrize("name,match", [
    ("", "must not be empty"), ("a/b", "must not contain"), ("a\x01b", "must not contain"),
    ("x" * 101, "too long"), ("dup", "already exists"), ("-x", "not allowed"),
])
def test_branch_name_validation(store: Path, env: dict[str, str], name: str, match: str) -> None:
    run_cli("--store", str(store), "branch", "create", "dup", env=env)
    fails(env, "--store", str(store), "branch", "create", "--", name, match=match)


def test_branch_fork_and_list(store: Path, env: dict[str, str]) -> None:
    s = ["--store", str(store)]
    run_cli(*s, "branch", "create", "a", env=env)
    run_cli(*s, "branch", "create", "b", "--from", "a", env=env)
    fails(env, *s, "branch", "create", "c", "--from", "nope", match="unknown branch")
    rows = {r["name"]: r for r in json.loads(run_cli(*s, "branch", "list", "--json",
                                                     env=env).stdout)}
    assert rows["a"]["parent"] is None and rows["b"]["parent"] == "a"
    status = json.loads(run_cli(*s, "status", "--json", env=env).stdout)
    assert status["store"] == str(store) and status["mounts"] == []


def test_mount_errors(tmp_path: Path, store: Path, env: dict[str, str]) -> None:
    s = ["--store", str(store)]
    run_cli(*s, "branch", "create", "b", env=env)
    fails(env, *s, "mount", str(tmp_path / "nomnt"), "--branch", "b", match="does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    fails(env, *s, "mount", str(full), "--branch", "b", match="not empty")
    fails(env, *s, "mount", str(tmp_path / "base" / "file.txt"), "--branch", "b",
          match="not a directory")
    (tmp_path / "mnt").mkdir()
    fails(env, *s, "mount", str(tmp_path / "mnt"), "--branch", "nope", match="unknown branch")
    fails(env, *s, "umount", str(tmp_path / "mnt"), match="not mounted")
    no_fusermount = dict(env, PATH="/nonexistent")
    fails(no_fusermount, *s, "mount", str(tmp_path / "mnt"), "--branch", "b",
          match="fusermount3 not found")


def test_fuse_device_missing(tmp_path: Path, store: Path, env: dict[str, str]) -> None:
    """In a private mount namespace without /dev/fuse the mount refuses cleanly."""
    if os.geteuid() != 0:
        pytest.skip("needs root for unshare")
    (tmp_path / "mnt").mkdir()
    run_cli("--store", str(store), "branch", "create", "b", env=env)
    script = (f"mount -t tmpfs tmpfs /dev && exec {AGENTFS} --store {store} mount "
              f"{tmp_path / 'mnt'} --branch b")
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "FUSE is unavailable: /dev/fuse does not exist" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.mount
def test_mount_busy_and_umount(tmp_path: Path, store: Path, env: dict[str, str]) -> None:
    require_fuse()
    s = ["--store", str(store)]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli(*s, "branch", "create", "b", env=env)
    res = run_cli(*s, "mount", str(mnt), "--branch", "b", env=env)
    try:
        assert is_mounted(str(mnt))
        assert (mnt / "file.txt").read_text() == "hello\n"
        fails(env, *s, "mount", str(mnt), "--branch", "b", match="is busy")
        status = json.loads(run_cli(*s, "status", "--json", env=env).stdout)
        assert [m["mountpoint"] for m in status["mounts"]] == [str(mnt)]
        assert [m["branch"] for m in status["mounts"]] == ["b"]
        fails(env, *s, "umount", str(mnt), match="is busy", cwd=str(mnt))
        run_cli(*s, "umount", str(mnt), env=env)
        assert not is_mounted(str(mnt))
        status = json.loads(run_cli(*s, "status", "--json", env=env).stdout)
        assert status["mounts"] == []
    finally:
        pid = int(res.stdout.rsplit("pid", 1)[1].strip(" )\n"))
        force_unmount(mnt, pid)


def test_store_option_anywhere_and_usage_errors(store: Path, env: dict[str, str]) -> None:
    run_cli("branch", "create", "late", "--store", str(store), env=env)
    assert "late" in run_cli("branch", "list", f"--store={store}", env=env).stdout
    res = run_cli("nosuchcommand", env=env, check=False)
    assert res.returncode == 2 and "No such command" in res.stderr
    assert "Traceback" not in res.stderr
