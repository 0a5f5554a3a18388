"""`agentfs policy check | lint | test | default`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
import yaml

from agentfs.cli.common import print_json
from agentfs.cli.daemons import ask_daemon, daemon_at
from agentfs.errors import NotFoundError, UsageError, UserError
from agentfs.policy.engine import DEFAULT_POLICY, PolicyEngine, default_policy
from agentfs.policy.lint import shadowed
from agentfs.policy.loader import load_policy
from agentfs.policy.model import OPS, Caller, Policy
from agentfs.proc import ancestors_of, comm_of, environ_of, exe_of

app = typer.Typer(help="Check, lint and test policy files.", no_args_is_help=True)


def _load(file: str) -> Policy:
    if file == "default":
        return default_policy()
    if not os.path.lexists(file):
        raise NotFoundError(f"policy file {file!r} does not exist")
    return load_policy(file)


@app.command("check")
def check(file: str = typer.Argument(..., help="a policy file, or 'default'"),
          path: str = typer.Argument(..., help="a path inside the view"),
          op: str = typer.Option(..., "--op", help="the operation, e.g. open_read"),
          exe: str = typer.Option("", "--exe"), comm: str = typer.Option("", "--comm"),
          uid: int = typer.Option(-1, "--uid"), branch: str = typer.Option("", "--branch"),
          session: str = typer.Option("", "--session"),
          pid: int = typer.Option(0, "--pid", help="take exe, comm, uid, ancestors and env "
                                                   "from this running process"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the decision for OP on PATH and the rules tried."""
    if op not in OPS:
        raise UsageError(f"unknown operation {op!r} (one of {', '.join(sorted(OPS))})")
    policy = _load(file)
    if pid:
        if not Path(f"/proc/{pid}").exists():
            raise NotFoundError(f"no process {pid}")
        caller = Caller(pid=pid, exe=exe or exe_of(pid), comm=comm or comm_of(pid),
                        uid=uid if uid >= 0 else Path(f"/proc/{pid}").stat().st_uid,
                        ancestors=ancestors_of(pid), env=environ_of(pid), branch=branch,
                        session=session)
    else:
        caller = Caller(exe=exe, comm=comm, uid=uid, branch=branch, session=session)
    d = PolicyEngine(policy).explain(op, path, caller)
    if as_json:
        print_json({"decision": d.decision, "rule": d.rule, "errno": d.errno,
                    "message": d.message, "policy_sha256": d.policy_sha256,
                    "trace": list(d.trace)})
        return
    for line in d.trace:
        typer.echo(f"  {line}")
    typer.echo(f"{d.decision}" + (f" (rule {d.rule})" if d.rule else " (defaults)")
               + (f": {d.message}" if d.message else ""))


@app.command("lint")
def lint(file: str = typer.Argument(..., help="a policy file, or 'default'")) -> None:
    """Load FILE strictly and report rules shadowed by earlier ones (exit 1 if any)."""
    policy = _load(file)
    found = shadowed(policy)
    for rule, by in found:
        typer.echo(f"{policy.source}:{rule.line}: rule {rule.id!r} never decides: "
                   f"rule {by.id!r} (line {by.line}) always matches first")
    if found:
        raise UserError(f"{policy.source}: {len(found)} rule(s) never decide")
    typer.echo(f"{policy.source}: {len(policy.rules)} rules, ok (sha256 {policy.sha256[:12]})")


@app.command("test")
def test(file: str = typer.Argument(..., help="a policy file, or 'default'"),
         cases: Path = typer.Argument(..., help="YAML list of {path, op, expect, who}")) -> None:
    """Check a table of expected decisions; exit 1 on any mismatch."""
    engine = PolicyEngine(_load(file))
    try:
        table = yaml.safe_load(cases.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{cases}: {exc}") from None
    if not isinstance(table, list):
        raise UserError(f"{cases}: expected a list of cases")
    failures = 0
    for i, case in enumerate(table, 1):
        if not isinstance(case, dict) or not {"path", "op", "expect"} <= case.keys():
            raise UserError(f"{cases}: case {i} needs path, op and expect")
        who = case.get("who") or {}
        caller = Caller(exe=str(who.get("exe", "")), comm=str(who.get("comm", "")),
                        uid=int(who.get("uid", -1)), branch=str(who.get("branch", "")),
                        session=str(who.get("session", "")))
        got = engine.decide(str(case["op"]), str(case["path"]), caller)
        if got.decision != case["expect"]:
            failures += 1
            typer.echo(f"FAIL case {i}: {case['op']} {case['path']}: expected "
                       f"{case['expect']}, got {got.decision} (rule {got.rule})")
    typer.echo(f"{len(table) - failures}/{len(table)} cases pass")
    if failures:
        raise UserError(f"{cases}: {failures} of {len(table)} case(s) fail")


@app.command("reload")
def reload(ctx: typer.Context, mountpoint: Path = typer.Argument(...)) -> None:
    """Reload the policy file of the mount at MOUNTPOINT (a bad file is refused and the
    policy in force stays)."""
    root, pid = daemon_at(ctx, mountpoint)
    reply = ask_daemon(root, pid, {"op": "reload"})
    if not reply.get("ok"):
        raise UserError(f"reload refused, policy {str(reply.get('sha256'))[:12]} stays in "
                        f"force: {reply.get('error')}")
    state = "reloaded" if reply.get("changed") else "unchanged"
    typer.echo(f"{state}: policy sha256 {reply.get('sha256')}")


@app.command("show")
def show(ctx: typer.Context, mountpoint: Path = typer.Argument(...),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Which policy the mount at MOUNTPOINT enforces (file, name, sha256, last error)."""
    root, pid = daemon_at(ctx, mountpoint)
    reply = ask_daemon(root, pid, {"op": "policy"})
    if as_json:
        print_json(reply)
        return
    for label, info in [("mount", reply["mount"])] + [
            (f"session {s['pid']}", s) for s in reply.get("sessions", [])]:
        typer.echo(f"{label}: {info['name']} from {info['path']} (sha256 {info['sha256']})")
        if info.get("last_error"):
            typer.echo(f"  last reload refused: {info['last_error']}")


@app.command("default")
def show_default() -> None:
    """Print the built-in default policy."""
    sys.stdout.write(DEFAULT_POLICY)
