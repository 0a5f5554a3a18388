"""`agentfs exec` and `agentfs bind`: sessions on a per-process mount."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import typer

from agentfs.branches.store import MountInfo, Store
from agentfs.cli.common import open_store
from agentfs.errors import MountError, UsageError, UserError
from agentfs.mount import control
from agentfs.policy.loader import load_policy

_PR_SET_CHILD_SUBREAPER = 36


def per_process_mount(store: Store, mountpoint: Path | None) -> MountInfo:
    mounts = [m for m in store.mounts() if m.mode == "per-process"]
    if mountpoint is not None:
        want = os.path.abspath(mountpoint)
        mounts = [m for m in mounts if m.mountpoint == want]
        if not mounts:
            raise MountError(f"{want} is not a per-process agentfs mount of this store")
    if not mounts:
        raise MountError("no per-process mount of this store; start one with "
                        "`agentfs mount MOUNTPOINT --per-process`")
    if len(mounts) > 1:
        raise UsageError("several per-process mounts; choose one with --mount")
    return mounts[0]


def bind_pid(store_root: Path, mount: MountInfo, pid: int, branch: str,
             policy: str | None = None) -> None:
    message: dict[str, object] = {"op": "bind", "pid": pid, "branch": branch}
    if policy:
        message["policy"] = os.path.abspath(policy)
    try:
        reply = control.request(control.socket_path(store_root, mount.pid), message)
    except OSError as exc:
        raise MountError(f"cannot reach the daemon of {mount.mountpoint}: {exc}") from None
    if not reply.get("ok"):
        raise UserError(f"bind refused: {reply.get('error')}")


def exec_(ctx: typer.Context,
          branch: str = typer.Option(..., "--branch", "-b", help="the branch CMD sees"),
          mount: Path | None = typer.Option(None, "--mount", help="the per-process mount"),
          policy: str | None = typer.Option(None, "--policy",
                                            help="a policy for this session only "
                                                 "(default: the mount's)"),
          cmd: list[str] = typer.Argument(..., help="the command (after --)"),
          ) -> None:
    """Run CMD (and everything it starts) bound to BRANCH; exits with CMD's status.

    A small keeper process is the session's root: it is a child subreaper, so
    descendants that CMD leaves behind (double fork, setsid) are re-parented to it and
    stay in the session until they are gone, while this command returns as soon as
    CMD itself exits."""
    store = open_store(ctx)
    store.branch(branch)
    if policy:
        load_policy(policy)
    m = per_process_mount(store, mount)
    root = store.root
    store.close()
    r, w = os.pipe()
    keeper = os.fork()
    if keeper == 0:
        os.close(r)
        _keeper(root, m, branch, cmd, w, policy)
    os.close(w)
    child = 0

    def forward(signum: int, _frame: object) -> None:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    with os.fdopen(r) as reports:
        for line in reports:
            kind, _, value = line.strip().partition(" ")
            if kind == "ERR":
                raise UserError(value)
            if kind == "PID":
                child = int(value)
            if kind == "EXIT":
                code = int(value)
                sys.stdout.flush()
                os._exit(code if code >= 0 else 128 - code)
    raise UserError("the session keeper died before CMD finished")


def _keeper(store_root: Path, mount: MountInfo, branch: str, cmd: list[str], w: int,
            policy: str | None) -> None:
    """The session root (never returns): bind, run CMD, report, reap until alone."""
    def report(text: str) -> None:
        os.write(w, (text + "\n").encode())

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        bind_pid(store_root, mount, os.getpid(), branch, policy)
        proc = subprocess.Popen(cmd)
    except UserError as exc:
        report(f"ERR {exc}")
        os._exit(1)
    except OSError as exc:
        report(f"ERR cannot run {cmd[0]}: {exc.strerror}")
        os._exit(1)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)  # the foreground command forwards them
    report(f"PID {proc.pid}")
    report(f"EXIT {proc.wait()}")
    os.close(w)
    with contextlib.suppress(ChildProcessError):
        while True:
            os.wait()
    os._exit(0)


def bind(ctx: typer.Context,
         pid: int = typer.Option(..., "--pid", help="the root of the process tree"),
         branch: str = typer.Option(..., "--branch", "-b"),
         mount: Path | None = typer.Option(None, "--mount", help="the per-process mount"),
         ) -> None:
    """Bind an existing process (and its descendants) to BRANCH."""
    store = open_store(ctx)
    store.branch(branch)
    bind_pid(store.root, per_process_mount(store, mount), pid, branch)
    typer.echo(f"bound pid {pid} to branch {branch}")
