"""The `agentfs` command: one Typer app, one module per command group."""

from __future__ import annotations

import sys

import typer

from agentfs.cli import branch, mount_cmds, store_cmds
from agentfs.errors import UserError

app = typer.Typer(name="agentfs", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="Copy-on-write branches of a project for AI agents.")


@app.callback()
def _global(ctx: typer.Context,
            store: str | None = typer.Option(None, "--store", envvar="AGENTFS_STORE",
                                             help="store directory (default: the store "
                                                  "registered for the current project)")
            ) -> None:
    ctx.obj = {"store": store}


app.command("init")(store_cmds.init)
app.command("status")(store_cmds.status)
app.command("mount")(mount_cmds.mount)
app.command("umount")(mount_cmds.umount)
app.add_typer(branch.app, name="branch")


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"agentfs: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("agentfs: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
