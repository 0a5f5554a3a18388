"""`agentfs mount` and `agentfs umount`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import typer

from agentfs.cli.common import open_store
from agentfs.errors import UserError
from agentfs.mount import lifecycle
from agentfs.policy.approvals import controlling_terminal
from agentfs.policy.source import PolicySource


def mount(ctx: typer.Context, mountpoint: Path,
          branch: str | None = typer.Option(None, "--branch", "-b",
                                            help="show this branch (a pinned, cached mount)"),
          per_process: bool = typer.Option(False, "--per-process",
                                           help="each process sees the branch it is bound to"),
          default_branch: str | None = typer.Option(None, "--default-branch",
                                                    help="per-process: for unbound callers"),
          deny_unbound: bool = typer.Option(False, "--deny-unbound",
                                            help="per-process: EACCES for unbound callers"),
          foreground: bool = typer.Option(False, "--foreground", "-f",
                                          help="serve in this process until unmounted"),
          policy: str | None = typer.Option(None, "--policy",
                                            help="policy file (default: the built-in "
                                                 "policy, see `agentfs policy default`)"),
          audit: bool = typer.Option(True, "--audit/--no-audit",
                                     help="record every operation in the audit log"),
          audit_strict: bool = typer.Option(False, "--audit-strict",
                                            help="refuse operations while the audit log "
                                                 "cannot record them"),
          impl: str | None = typer.Option(None, "--impl",
                                          help="FUSE front end: kernel (FUSE spoken "
                                               "directly, the Linux default), pyfuse3, or "
                                               "mfusepy (macOS FUSE-T, pinned only); or "
                                               "$AGENTFS_FUSE_IMPL"),
          non_interactive: bool = typer.Option(
              False, "--non-interactive",
              help="deny `ask` rules at once instead of waiting for an answer (also "
                   "with CI=true or AGENTFS_NON_INTERACTIVE=1)"),
          queries_from_sessions: bool = typer.Option(
              False, "--decision-queries-from-sessions",
              help="per-process: processes inside sessions may ask the control socket "
                   "for policy decisions (default: refused)"),
          debug: bool = typer.Option(False, "--debug", help="log every FUSE request")) -> None:
    """Mount a branch (or per-process views) at MOUNTPOINT; returns once it is ready."""
    store = open_store(ctx)
    what = f"branch {branch}" if branch else "per-process views"
    if not foreground:
        pid = lifecycle.start_mount(store, branch, mountpoint, debug, per_process,
                                    default_branch, deny_unbound, policy, audit,
                                    audit_strict, impl, non_interactive,
                                    queries_from_sessions)
        typer.echo(f"mounted {what} at {mountpoint.resolve()} (daemon pid {pid})")
        return
    from agentfs.mount import daemon

    lifecycle.check_mode(store, branch, per_process, default_branch, deny_unbound)
    PolicySource.for_mount(str(store.base), policy)  # every layer loads, or say why
    lifecycle.check_fuse()
    path = lifecycle.check_mountpoint(mountpoint, store)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failure: list[str] = []

    def ready(error: str | None) -> None:
        if error:
            failure.append(error)
        else:
            print(f"mounted {what} at {path}; Ctrl-C to unmount", file=sys.stderr)

    config = daemon.MountConfig(store_root=store.root, mountpoint=path, branch=branch,
                                per_process=per_process, default_branch=default_branch,
                                deny_unbound=deny_unbound, debug=debug,
                                policy_path=os.path.abspath(policy) if policy else None,
                                audit=audit, audit_strict=audit_strict,
                                impl=lifecycle.choose_impl(impl, per_process),
                                non_interactive=non_interactive,
                                terminal=controlling_terminal(),
                                decision_queries_from_sessions=queries_from_sessions)
    if config.impl == "mfusepy":
        from agentfs.mount.mfuse_daemon import serve_mfusepy

        code = serve_mfusepy(config, ready)
    elif config.impl == "kernel":
        from agentfs.mount.kernel.daemon import serve_kernel

        code = serve_kernel(config, ready)
    else:
        code = daemon.serve(config, ready)
    if failure:
        raise UserError(failure[0])
    raise typer.Exit(code)


def umount(ctx: typer.Context, mountpoint: Path,
           lazy: bool = typer.Option(False, "--lazy", "-z", help="detach even if busy")) -> None:
    """Flush and unmount MOUNTPOINT, waiting for its daemon to exit."""
    store = None
    with contextlib.suppress(UserError):  # a dead or foreign mount needs no store
        store = open_store(ctx)
    typer.echo(lifecycle.unmount(mountpoint, store, lazy))
