"""`agentfs mount` and `agentfs umount`."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import typer

from agentfs.cli.common import open_store
from agentfs.errors import UserError
from agentfs.mount import lifecycle


def mount(ctx: typer.Context, mountpoint: Path,
          branch: str = typer.Option(..., "--branch", "-b", help="the branch to show"),
          foreground: bool = typer.Option(False, "--foreground", "-f",
                                          help="serve in this process until unmounted"),
          debug: bool = typer.Option(False, "--debug", help="log every FUSE request")) -> None:
    """Mount BRANCH at MOUNTPOINT; returns once the mount is ready."""
    store = open_store(ctx)
    if not foreground:
        pid = lifecycle.start_mount(store, branch, mountpoint, debug)
        typer.echo(f"mounted branch {branch} at {mountpoint.resolve()} (daemon pid {pid})")
        return
    from agentfs.mount import daemon

    store.branch(branch)
    lifecycle.check_fuse()
    path = lifecycle.check_mountpoint(mountpoint)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failure: list[str] = []

    def ready(error: str | None) -> None:
        if error:
            failure.append(error)
        else:
            print(f"mounted branch {branch} at {path}; Ctrl-C to unmount", file=sys.stderr)

    code = daemon.serve(store.root, branch, path, debug, ready)
    if failure:
        raise UserError(failure[0])
    raise typer.Exit(code)


def umount(ctx: typer.Context, mountpoint: Path,
           lazy: bool = typer.Option(False, "--lazy", "-z", help="detach even if busy")) -> None:
    """Flush and unmount MOUNTPOINT, waiting for its daemon to exit."""
    store = None
    with contextlib.suppress(UserError):
        store = open_store(ctx)
    lifecycle.unmount(mountpoint, store, lazy)
    typer.echo(f"unmounted {mountpoint}")
