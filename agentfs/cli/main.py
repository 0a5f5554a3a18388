"""The `agentfs` command: one Typer app, one module per command group."""

from __future__ import annotations

import errno
import os
import sqlite3
import sys

import typer
from sqlalchemy.exc import SQLAlchemyError
from typer import Abort

try:  # typer >= 0.25 carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[no-redef]

from agentfs.cli import (
    approval_cmds,
    audit_cmds,
    branch,
    doctor_cmd,
    fsck_cmd,
    mount_cmds,
    policy_cmds,
    run_cmd,
    session_cmds,
    store_cmds,
    trash_cmds,
)
from agentfs.errors import (
    EXIT_CONFLICT,
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MOUNT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_STORE,
    EXIT_USAGE,
    UserError,
)

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
app.command("fsck")(fsck_cmd.fsck)
app.command("doctor")(doctor_cmd.doctor)
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


def run(argv: list[str]) -> int:
    """Run the command line *argv* and return its exit status; every failure is one
    line on stderr (a commit's conflict list aside), never a traceback."""
    try:
        result = app(args=hoist_store_option(argv), prog_name="agentfs",
                     standalone_mode=False)
    except UserError as exc:
        # a conflict lists its paths, one a line; anything else is one line
        _say(_printable(str(exc), keep_newlines=exc.exit_code == EXIT_CONFLICT))
        return exc.exit_code
    except NoArgsIsHelpError as exc:  # `agentfs branch`: the help, and why it is shown
        sys.stdout.write(exc.format_message().rstrip("\n") + "\n")
        print(f"{exc.ctx.command_path}: missing command", file=sys.stderr)
        return EXIT_USAGE
    except ClickException as exc:  # usage: wrong or missing arguments and options
        ctx = getattr(exc, "ctx", None)
        if ctx is None:
            _say(_printable(_one_line(exc.format_message())))
        else:
            print(f"{ctx.command_path}: {_printable(_one_line(exc.format_message()))} "
                  f"(see `{ctx.command_path} --help`)", file=sys.stderr)
        return exc.exit_code
    except Abort:
        _say("aborted")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("AGENTFS_DEBUG"):
            raise
        code, message = describe(exc)
        _say(_printable(message))
        return code
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK


def describe(exc: Exception) -> tuple[int, str]:
    """The exit code and line for an exception no command turned into a UserError:
    database errors are the store's, OS errors name the file and the reason, anything
    else is a bug."""
    if isinstance(exc, SQLAlchemyError | sqlite3.Error):
        orig = getattr(exc, "orig", None) or exc
        text = _one_line(str(orig))
        if "readonly" in text or "read-only" in text:
            return EXIT_STORE, f"the store is read-only ({text})"
        if "locked" in text:
            return EXIT_STORE, f"the store's database is busy ({text}); try again"
        return EXIT_STORE, f"the store's database failed: {text}"
    if isinstance(exc, ValueError) and "null byte" in str(exc):
        return EXIT_USAGE, "a name or path contains a NUL byte"
    if isinstance(exc, UnicodeError):
        return EXIT_USAGE, f"a name or path is not valid UTF-8 ({_one_line(str(exc))})"
    if isinstance(exc, OSError):
        name = f"{_short(os.fsdecode(exc.filename))}: " if exc.filename is not None else ""
        reason = exc.strerror or _one_line(str(exc))
        code = {errno.ENOENT: EXIT_NOT_FOUND, errno.ENOTDIR: EXIT_NOT_FOUND,
                errno.ENAMETOOLONG: EXIT_USAGE, errno.EROFS: EXIT_STORE,
                errno.ENOTCONN: EXIT_MOUNT}.get(exc.errno or 0, EXIT_FAILURE)
        return code, f"{name}{reason}"
    return EXIT_INTERNAL, (f"internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                           "(set AGENTFS_DEBUG=1 for the traceback)")


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f)}


def _printable(text: str, keep_newlines: bool = False) -> str:
    """Control characters (from names on the command line) shown escaped, so a message
    stays one line and cannot move the cursor."""
    table = dict(_CONTROL)
    if keep_newlines:
        del table[ord("\n")]
    return text.translate(table)


def _one_line(text: str) -> str:
    return _short(" ".join(text.split()), 400)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _say(message: str) -> None:
    print(f"agentfs: {message}", file=sys.stderr)


def main() -> None:
    # names and paths with bytes that are not UTF-8 print as those bytes, as ls does
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")
    code = run(sys.argv[1:])
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
