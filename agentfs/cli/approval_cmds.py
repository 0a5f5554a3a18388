"""`agentfs prompts | approve | deny`: answering the questions `ask` rules raise.

Question ids are `<daemon pid>-<n>`, so an answer goes straight to the daemon that
asked; `prompts` gathers the open questions of every mount of the store.
"""

from __future__ import annotations

import contextlib
import select
import sys
import termios
import time
import tty
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from agentfs.cli.common import print_json
from agentfs.cli.daemons import ask_daemon, live_daemons, live_stores
from agentfs.errors import NotFoundError, UserError

REMEMBER_HELP = "once (this request), process (the asking process), session (its session)"


def collect_prompts(roots: list[Path]) -> list[dict[str, Any]]:
    prompts = []
    for root, pid, mountpoint in live_daemons(roots):
        with contextlib.suppress(UserError):
            for p in ask_daemon(root, pid, {"op": "prompts"}).get("prompts", []):
                prompts.append({**p, "mountpoint": mountpoint})
    return sorted(prompts, key=lambda p: -p["age"])


def send_answer(roots: list[Path], ticket_id: str, allow: bool, remember: str) -> None:
    daemon_pid = ticket_id.split("-", 1)[0]
    for root, pid, _ in live_daemons(roots):
        if str(pid) == daemon_pid:
            reply = ask_daemon(root, pid, {"op": "answer", "id": ticket_id, "allow": allow,
                                     "remember": remember})
            if not reply.get("ok"):
                raise UserError(str(reply.get("error")))
            return
    raise NotFoundError(f"no mount is waiting on request {ticket_id} "
                    "(see `agentfs prompts --once`)")


def approve(ctx: typer.Context, ticket_id: str = typer.Argument(..., metavar="ID"),
            remember: str = typer.Option("once", "--remember", help=REMEMBER_HELP)) -> None:
    """Let a waiting request go ahead."""
    send_answer(live_stores(ctx), ticket_id, True, remember)
    typer.echo(f"approved {ticket_id} ({remember})")


def deny(ctx: typer.Context, ticket_id: str = typer.Argument(..., metavar="ID"),
         remember: str = typer.Option("once", "--remember", help=REMEMBER_HELP)) -> None:
    """Refuse a waiting request (the caller gets the policy's errno)."""
    send_answer(live_stores(ctx), ticket_id, False, remember)
    typer.echo(f"denied {ticket_id} ({remember})")


def prompts(ctx: typer.Context,
            once: bool = typer.Option(False, "--once", help="print the list and exit"),
            as_json: bool = typer.Option(False, "--json", help="print JSON and exit")) -> None:
    """Show waiting requests live and answer them with a key.

    Keys: up/down (or j/k) choose; y allow once, p allow for the process, s allow for
    the session; n deny once, N deny for the session; q quit."""
    roots = live_stores(ctx)
    if as_json:
        print_json(collect_prompts(roots))
        return
    console = Console()
    if once or not sys.stdin.isatty():
        console.print(_table(collect_prompts(roots), None))
        return
    _interactive(console, roots)


def _table(items: list[dict[str, Any]], selected: int | None) -> Table:
    table = Table(title="agentfs: requests waiting for an answer", expand=True)
    for col in ("id", "op", "path", "process", "rule", "waits", "expires"):
        table.add_column(col)
    for i, p in enumerate(items):
        style = "reverse" if i == selected else ""
        table.add_row(p["id"], p["op"], p["path"] or "/",
                      f"{p['pid']} {p['command'] or p['exe']}"[:60], p["rule"],
                      f"{p['age']:.0f}s", f"{p['expires_in']:.0f}s", style=style)
    if not items:
        table.caption = "nothing is waiting"
    return table


_KEYS = {"y": (True, "once"), "p": (True, "process"), "s": (True, "session"),
         "n": (False, "once"), "N": (False, "session")}


def _interactive(console: Console, roots: list[Path]) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    selected = 0
    status = "y/p/s allow (once/process/session), n/N deny (once/session), q quit"
    try:
        tty.setcbreak(fd)
        with console.screen() as screen:
            while True:
                items = collect_prompts(roots)
                selected = min(selected, max(0, len(items) - 1))
                screen.update(_render(items, selected, status))
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    continue
                key = _read_key(fd)
                if key == "q":
                    return
                if key in ("j", "down"):
                    selected += 1
                elif key in ("k", "up"):
                    selected = max(0, selected - 1)
                elif key in _KEYS and items:
                    allow, scope = _KEYS[key]
                    ticket = items[selected]["id"]
                    try:
                        send_answer(roots, ticket, allow, scope)
                        status = f"{'allowed' if allow else 'denied'} {ticket} ({scope})"
                    except UserError as exc:
                        status = f"could not answer {ticket}: {exc}"
                    time.sleep(0.05)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _render(items: list[dict[str, Any]], selected: int, status: str) -> Any:
    from rich.console import Group
    from rich.text import Text

    return Group(_table(items, selected if items else None), Text(status, style="dim"))


def _read_key(fd: int) -> str:
    import os

    data = os.read(fd, 8)
    if data.startswith(b"\x1b["):
        return {b"A": "up", b"B": "down"}.get(data[2:3], "")
    return data[:1].decode(errors="replace")
