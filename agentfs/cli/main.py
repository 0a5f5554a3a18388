"""The `agentfs` command: one Typer app, one module per command group."""

from __future__ import annotations

import os
import sys

import typer

from agentfs.cli import (
    approval_cmds,
    audit_cmds,
    branch,
    mount_cmds,
    policy_cmds,
    run_cmd,
    session_cmds,
    store_cmds,
    trash_cmds,
)
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
app.command("exec", context_settings={"ignore_unknown_options": True})(session_cmds.exec_)
app.command("bind")(session_cmds.bind)
app.command("run", context_settings={"ignore_unknown_options": True,
                                     "allow_extra_args": True})(run_cmd.run)
app.command("prompts")(approval_cmds.prompts)
app.command("approve")(approval_cmds.approve)
app.command("deny")(approval_cmds.deny)
app.add_typer(branch.app, name="branch")
app.add_typer(policy_cmds.app, name="policy")
app.add_typer(trash_cmds.app, name="trash")
app.add_typer(audit_cmds.app, name="audit")


def hoist_store_option(argv: list[str]) -> list[str]:
    """Let `--store DIR` appear anywhere (`agentfs branch list --store S`), as users expect;
    Typer only knows it before the subcommand.  Nothing after `--` is touched."""
    head, sep, tail = (argv[: argv.index("--")], ["--"], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, [], [])
    hoisted: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(head):
        arg = head[i]
        if arg == "--store" and i + 1 < len(head):
            hoisted = ["--store", head[i + 1]]
            i += 2
            continue
        if arg.startswith("--store="):
            hoisted = ["--store", arg.split("=", 1)[1]]
        else:
            rest.append(arg)
        i += 1
    return hoisted + rest + sep + tail


def main() -> None:
    try:
        app(args=hoist_store_option(sys.argv[1:]), prog_name="agentfs")
    except UserError as exc:
        print(f"agentfs: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("agentfs: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if os.environ.get("AGENTFS_DEBUG"):
            raise
        print(f"agentfs: internal error: {type(exc).__name__}: {exc} "
              "(set AGENTFS_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(70)


if __name__ == "__main__":
    main()
