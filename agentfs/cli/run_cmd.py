"""`agentfs run`: run a command in a sandbox that sees the project through a branch."""

from __future__ import annotations

import os
import sys

import typer

from agentfs.cli.common import open_store
from agentfs.policy.approvals import NON_INTERACTIVE_ENV


def run(ctx: typer.Context,
        branch: str = typer.Option(..., "--branch", "-b", help="the branch CMD works on"),
        create: bool = typer.Option(False, "--create", help="create the branch if missing"),
        policy: str | None = typer.Option(None, "--policy",
                                          help="policy file for the branch's mount (refused "
                                               "if the branch is already mounted with "
                                               "another one)"),
        full: bool = typer.Option(False, "--full",
                                  help="the whole root through the overlay: every write "
                                       "in the system goes to a branch (slower)"),
        network: bool = typer.Option(False, "--network/--no-network",
                                     help="share the host's network (default: off, only "
                                          "a private loopback: no egress)"),
        keep_mount: bool = typer.Option(False, "--keep-mount",
                                        help="leave the branch mounted after CMD exits"),
        non_interactive: bool = typer.Option(
            False, "--non-interactive",
            help="the branch's mount denies `ask` rules at once instead of waiting for "
                 "an answer (also with CI=true or AGENTFS_NON_INTERACTIVE=1)"),
        cmd: list[str] = typer.Argument(..., metavar="CMD",
                                        help="the command and its arguments"),
        ) -> None:
    """Run CMD in a sandbox where the project is BRANCH; exits with CMD's status.

    Inside, the project's directory shows the branch (read-write, through
    the overlay; the base is never written), the rest of the system is
    read-only (with --full: writable too, through a root branch of its own
    in <agentfs home>/root-store), /tmp is private, /proc shows only the sandbox's processes
    (a pid namespace: CMD can signal and ptrace only its own), the network is a private
    loopback unless --network, and the store and credentials (~/.ssh, cloud keys, ...)
    are hidden.
    Needs root; started through sudo, CMD runs as the invoking user,
    otherwise as root without the dangerous capabilities.

    One daemon per branch: if the branch is already mounted (by `agentfs
    mount` or by another run), the sandbox uses that mount and its policy,
    so concurrent runs of one branch see each other's writes at once.  A
    mount this command started is unmounted by the last run using it,
    unless --keep-mount.  With --non-interactive a mount this command starts denies
    `ask` rules at once; a mount that already exists keeps its own setting."""
    from agentfs.sandbox import launch

    if non_interactive:  # the sandbox starts the mount; the daemon inherits this
        os.environ[NON_INTERACTIVE_ENV] = "1"

    if sys.platform == "darwin":
        from agentfs.sandbox import macos

        store = open_store(ctx)
        raise typer.Exit(macos.run(store, branch=branch, cmd=list(cmd), create=create,
                                   policy=policy, network=network, keep_mount=keep_mount,
                                   full=full))
    launch.check_root()  # before the store: a user may not even be able to read it
    store = open_store(ctx)
    request = launch.RunRequest(branch=branch, cmd=tuple(cmd), create=create, policy=policy,
                                network=network, keep_mount=keep_mount, full=full)
    code = launch.run_sandbox(store, request)
    sys.stdout.flush()
    raise typer.Exit(code)
