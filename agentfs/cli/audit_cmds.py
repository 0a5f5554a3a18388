"""`agentfs audit tail | query | export | retention`: reading the audit log."""

from __future__ import annotations

import datetime as dt
import errno as errno_mod
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import typer

from agentfs.audit.log import audit_max_age, query
from agentfs.cli.common import open_store
from agentfs.errors import UsageError
from agentfs.policy.globs import GlobError, compile_glob
from agentfs.units import parse_duration

app = typer.Typer(help="The record of every operation and its policy decision.",
                  no_args_is_help=True)
DENIED = ["deny", "ask:deny", "ask:none"]


def parse_time(text: str) -> int:
    """Microseconds since the epoch from '15m' (ago), an ISO date/time (UTC unless it
    says otherwise), or 'now'."""
    text = text.strip()
    if text == "now":
        return time.time_ns() // 1000
    try:
        return int((time.time() - parse_duration(text)) * 1e6)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"bad time {text!r} (e.g. 15m, 2h, 2026-11-23T08:00:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1e6)


def _format(e: dict[str, Any]) -> str:
    when = dt.datetime.fromtimestamp(e["ts_us"] / 1e6, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    what = e["path"] or "/"
    if e["dst"]:
        what += f" -> {e['dst']}"
    if e["op"] in ("read", "write"):
        what += (f" ({e['count']} calls, {e['bytes']} bytes)" if e["count"]
                 else " (passed through: calls and bytes not counted)")
    if e["op"] == "audit_dropped":
        what = f"{e['count']} events were dropped (queue full)"
    result = "ok" if not e["errno"] else errno_mod.errorcode.get(e["errno"], str(e["errno"]))
    rule = f" [{e['rule']}]" if e["rule"] else ""
    return (f"{when} {e['branch'] or '-'} pid {e['pid']} {Path(e['exe']).name or '?'}: "
            f"{e['op']} {what} {e['decision']}{rule} {result}")


def _glob_filter(events: Iterable[dict[str, Any]], path: str | None
                 ) -> Iterator[dict[str, Any]]:
    if not path:
        yield from events
        return
    try:
        rx = compile_glob(path)
    except GlobError as exc:
        raise UsageError(str(exc)) from None
    for e in events:
        if rx.fullmatch(e["path"]) or (e["dst"] and rx.fullmatch(e["dst"])):
            yield e


def _emit(events: Iterable[dict[str, Any]], as_json: bool) -> int:
    n = 0
    for e in events:
        n += 1
        sys.stdout.write((json.dumps(e) if as_json else _format(e)) + "\n")
    sys.stdout.flush()
    return n


@app.command("tail")
def tail(ctx: typer.Context, follow: bool = typer.Option(False, "--follow", "-f"),
         lines: int = typer.Option(20, "-n", "--lines"),
         branch: str | None = typer.Option(None, "--branch", "-b"),
         denied: bool = typer.Option(False, "--denied", help="only refused operations"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """The latest events (and, with -f, new ones as they come)."""
    root = open_store(ctx).root
    decisions = DENIED if denied else None
    last = list(query(root, decisions=decisions, branch=branch, limit=lines,
                      newest_first=True))[::-1]
    _emit(last, as_json)
    after = last[-1]["id"] if last else max(
        (e["id"] for e in query(root, limit=1, newest_first=True)), default=0)
    while follow:
        time.sleep(0.5)
        new = list(query(root, after_id=after, decisions=decisions, branch=branch))
        if new:
            _emit(new, as_json)
            after = new[-1]["id"]


@app.command("query")
def query_cmd(ctx: typer.Context,
              since: str | None = typer.Option(None, "--since", help="15m, 2h, or a time"),
              until: str | None = typer.Option(None, "--until"),
              path: str | None = typer.Option(None, "--path", help="glob on path or dst"),
              op: list[str] = typer.Option([], "--op", help="repeatable"),
              pid: int | None = typer.Option(None, "--pid"),
              decision: list[str] = typer.Option([], "--decision",
                                                 help="allow, deny, audit, soft_delete, "
                                                      "ask:allow, ask:deny, ask:none"),
              branch: str | None = typer.Option(None, "--branch", "-b"),
              limit: int | None = typer.Option(None, "--limit"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Events matching every filter given, oldest first."""
    root = open_store(ctx).root
    events = query(root, since_us=parse_time(since) if since else None,
                   until_us=parse_time(until) if until else None, ops=op or None, pid=pid,
                   decisions=decision or None, branch=branch)
    matched = _glob_filter(events, path)
    if limit is not None:
        matched = (e for i, e in enumerate(matched) if i < limit)
    if as_json:
        print(json.dumps(list(matched), indent=2))
        return
    _emit(matched, False)


@app.command("export")
def export(ctx: typer.Context,
           fmt: str = typer.Option("jsonl", "--format", help="jsonl (one event per line)"),
           since: str | None = typer.Option(None, "--since"),
           until: str | None = typer.Option(None, "--until"),
           output: Path | None = typer.Option(None, "--output", "-o")) -> None:
    """Every event (in a time window) as JSON lines, for other tools."""
    if fmt != "jsonl":
        raise UsageError(f"unknown format {fmt!r} (jsonl)")
    root = open_store(ctx).root
    events = query(root, since_us=parse_time(since) if since else None,
                   until_us=parse_time(until) if until else None)
    out = open(output, "w") if output else sys.stdout  # noqa: SIM115
    try:
        n = 0
        for e in events:
            out.write(json.dumps(e) + "\n")
            n += 1
    finally:
        if output:
            out.close()
    if output:
        typer.echo(f"exported {n} events to {output}")


@app.command("retention")
def retention(ctx: typer.Context,
              max_age: str | None = typer.Option(None, "--max-age", help="e.g. 90d")) -> None:
    """Show or set how long events are kept (mounts apply it every 10 minutes)."""
    store = open_store(ctx)
    if max_age is not None:
        try:
            store.set_info("audit.max_age", str(parse_duration(max_age)))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    typer.echo(f"audit events are kept {audit_max_age(store) / 86400:g} days")
