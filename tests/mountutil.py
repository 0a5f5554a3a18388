"""Real mounts for tests: a store, a branch and an `agentfs mount`, torn down in finally.

Every mount is started through the real CLI, waits on its readiness signal (the
CLI returns only when the mount is up), and is unmounted with fusermount3 -u,
then -uz; the daemon we started is killed if it is still alive.  With
AGENTFS_REQUIRE_FUSE=1 an unusable FUSE fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
AGENTFS = str(VENV_BIN / "agentfs")
CMD_TIMEOUT = 60
IMPLS = ("pyfuse3", "mfusepy", "kernel")  # the FUSE front ends every mounted suite runs against
# the front end of pinned mounts a test does not choose itself
DEFAULT_IMPL = os.environ.get("AGENTFS_FUSE_IMPL") or "kernel"  # as agentfs mount chooses


def passes_through(impl: str = DEFAULT_IMPL) -> bool:
    """Whether a mount through *impl* has the kernel read and write the branch's own files
    itself (FUSE passthrough: the kernel front end, Linux 6.9+, CAP_SYS_ADMIN)."""
    from agentfs.mount.kernel import passthrough

    return (impl == "kernel" and passthrough.kernel_release() >= passthrough.SINCE
            and passthrough.wanted())


def opstats_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A CLI environment whose kernel-front-end daemon counts its requests
    (AGENTFS_OPSTATS), and the file it writes them to at unmount."""
    stats = tmp_path / "ops.json"
    return {**cli_env(tmp_path / "home"), "AGENTFS_OPSTATS": str(stats)}, stats


def request_counts(stats: Path) -> dict[str, int]:
    """Requests per opcode name in an AGENTFS_OPSTATS file (after the unmount)."""
    return {op: v["count"] for op, v in json.loads(stats.read_text()).items()}


def fuse_problem() -> str | None:
    """Why FUSE mounts cannot work here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def require_fuse() -> None:
    problem = fuse_problem()
    if problem is None:
        return
    if os.environ.get("AGENTFS_REQUIRE_FUSE") == "1":
        pytest.fail(f"FUSE required but unusable: {problem}")
    pytest.skip(f"FUSE unusable: {problem}")


def run_cli(*args: str, env: dict[str, str], check: bool = True,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([AGENTFS, *args], env=env, capture_output=True, text=True,
                         timeout=CMD_TIMEOUT, cwd=cwd)
    if check and res.returncode != 0:
        raise AssertionError(f"agentfs {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


def cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["AGENTFS_HOME"] = str(home)
    env.pop("AGENTFS_STORE", None)
    return env


def force_unmount(mountpoint: Path, pid: int | None) -> None:
    """Best-effort teardown that never hangs: -u, then lazy -uz, then kill our daemon."""
    mp = str(mountpoint)
    for args in (["-u"], ["-uz"]):
        if not is_mounted(mp):
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["fusermount3", *args, mp], capture_output=True, timeout=20)
    if pid is not None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


@dataclass
class MountedBranch:
    base: Path
    store: Path
    mountpoint: Path
    branch: str
    env: dict[str, str]
    pid: int | None = None
    mount_opts: tuple[str, ...] = ()
    impl: str = DEFAULT_IMPL

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("--store", str(self.store), *args, env=self.env, check=check)

    def mount(self) -> None:
        res = self.cli("mount", str(self.mountpoint), "--branch", self.branch,
                       "--impl", self.impl, *self.mount_opts)
        m = re.search(r"daemon pid (\d+)", res.stdout)
        self.pid = int(m.group(1)) if m else None
        if self.pid is not None:  # a mount reported ready answers control requests at once
            from agentfs.mount import control

            assert control.socket_path(self.store, self.pid).exists(), "no control socket yet"

    def unmount(self) -> None:
        self.cli("umount", str(self.mountpoint))
        self.pid = None


def init_store(base: Path, store: Path, branch: str, home: str) -> None:
    """`agentfs init` + `agentfs branch create`, in-process: the CLI has tests of its
    own, and two interpreter start-ups per mounted test add up."""
    from agentfs.branches.store import Store

    saved = os.environ.get("AGENTFS_HOME")
    os.environ["AGENTFS_HOME"] = home
    try:
        created = Store.create(base, store)
        try:
            created.create_branch(branch)
        finally:
            created.close()
    finally:
        if saved is None:
            os.environ.pop("AGENTFS_HOME", None)
        else:
            os.environ["AGENTFS_HOME"] = saved


@contextlib.contextmanager
def mounted_branch(base: Path, workdir: Path, branch: str = "test", init: bool = True,
                   store: Path | None = None,
                   env: dict[str, str] | None = None,
                   mount_opts: tuple[str, ...] = (),
                   impl: str = DEFAULT_IMPL) -> Iterator[MountedBranch]:
    """Init a store for *base* (unless given), create *branch*, mount it; always clean up."""
    require_fuse()
    mnt = workdir / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    mb = MountedBranch(base=base, store=store or workdir / "store", mountpoint=mnt,
                       branch=branch, env=env or cli_env(workdir / "home"),
                       mount_opts=mount_opts, impl=impl)
    if init:
        init_store(base, mb.store, branch, mb.env["AGENTFS_HOME"])
    try:
        mb.mount()
        yield mb
    finally:
        force_unmount(mnt, mb.pid)
        for log in sorted((mb.store / "run").glob("*.log")):
            text = log.read_text(errors="replace")
            if "ERROR" in text or "Traceback" in text:
                print(f"--- daemon log {log} ---\n{text}", file=sys.stderr)


@dataclass
class PerProcessView:
    store: Path
    mountpoint: Path
    env: dict[str, str]
    pid: int

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("--store", str(self.store), *args, env=self.env, check=check)


@contextlib.contextmanager
def per_process_mount(base: Path, workdir: Path, *mount_opts: str,
                      branch: str = "b", impl: str = "kernel",
                      env: dict[str, str] | None = None) -> Iterator[PerProcessView]:
    """A store for *base* with *branch*, mounted per-process at workdir/mnt with
    *mount_opts* (e.g. --default-branch b, --policy FILE) through front end *impl*
    (*env*: the CLI's environment, with AGENTFS_HOME); always unmounted."""
    require_fuse()
    env = env or cli_env(workdir / "home")
    store, mnt = workdir / "store", workdir / "mnt"
    mnt.mkdir(parents=True)
    init_store(base, store, branch, env["AGENTFS_HOME"])
    pid = None
    try:
        out = run_cli("--store", str(store), "mount", str(mnt), "--per-process",
                      "--impl", impl, *mount_opts, env=env).stdout
        found = re.search(r"pid (\d+)", out)
        assert found is not None, out
        pid = int(found.group(1))
        yield PerProcessView(store, mnt, env, pid)
    finally:
        force_unmount(mnt, pid)
