"""`agentfs policy check | lint | test | reload | show | query | default`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
import yaml

from agentfs.cli.common import open_store, print_json
from agentfs.cli.daemons import ask_daemon, daemon_at, live_daemons, live_stores
from agentfs.errors import MountError, NotFoundError, UsageError, UserError
from agentfs.policy.effective import render
from agentfs.policy.engine import DEFAULT_POLICY, PolicyEngine, default_policy
from agentfs.policy.lint import shadowed
from agentfs.policy.loader import load_policy
from agentfs.policy.model import OPS, Caller, Policy
from agentfs.policy.source import PolicySource
from agentfs.proc import ancestors_of, comm_of, environ_of, exe_of

app = typer.Typer(help="Check, lint and test policy files.", no_args_is_help=True)


def _load(file: str) -> Policy:
    if file == "default":
        return default_policy()
    if not os.path.lexists(file):
        raise NotFoundError(f"policy file {file!r} does not exist")
    return load_policy(file)


@app.command("check")
def check(ctx: typer.Context,
          file: str = typer.Argument(..., help="a policy file, or 'default' (with "
                                               "--layers: the session layer, or 'none')"),
          path: str = typer.Argument(..., help="a path inside the view"),
          op: str = typer.Option(..., "--op", help="the operation, e.g. open_read"),
          exe: str = typer.Option("", "--exe"), comm: str = typer.Option("", "--comm"),
          uid: int = typer.Option(-1, "--uid"), branch: str = typer.Option("", "--branch"),
          session: str = typer.Option("", "--session"),
          pid: int = typer.Option(0, "--pid", help="take exe, comm, uid, ancestors and env "
                                                   "from this running process"),
          layers: bool = typer.Option(False, "--layers",
                                      help="decide with the whole stack a mount would "
                                           "load (organisation, project, user, FILE)"),
          base: Path | None = typer.Option(None, "--base",
                                           help="with --layers: the base whose project "
                                                "policy to read (default: the store's)"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the decision for OP on PATH and the rules tried."""
    if op not in OPS:
        raise UsageError(f"unknown operation {op!r} (one of {', '.join(sorted(OPS))})")
    if base is not None and not layers:
        raise UsageError("--base reads a project policy layer: add --layers")
    engine = (_would_load(ctx, base, None if file == "none" else file).engine if layers
              else PolicyEngine(_load(file)))
    if pid:
        if not Path(f"/proc/{pid}").exists():
            raise NotFoundError(f"no process {pid}")
        caller = Caller(pid=pid, exe=exe or exe_of(pid), comm=comm or comm_of(pid),
                        uid=uid if uid >= 0 else Path(f"/proc/{pid}").stat().st_uid,
                        ancestors=ancestors_of(pid), env=environ_of(pid), branch=branch,
                        session=session)
    else:
        caller = Caller(exe=exe, comm=comm, uid=uid, branch=branch, session=session)
    d = engine.explain(op, path, caller)
    if as_json:
        print_json({"decision": d.decision, "rule": d.rule, "origin": d.origin,
                    "errno": d.errno, "message": d.message, "policy_sha256": d.policy_sha256,
                    "trace": list(d.trace)})
        return
    for line in d.trace:
        typer.echo(f"  {line}")
    origin = f" from the {d.origin} layer" if len(engine.layers) > 1 else ""
    typer.echo(f"{d.decision}" + (f" (rule {d.rule}{origin})" if d.rule
                                  else f" (defaults{origin})")
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
def show(ctx: typer.Context,
         mountpoint: Path | None = typer.Argument(None, help="a mount: show what its daemon "
                                                           "enforces (default: what a mount "
                                                           "would load now)"),
         effective_: bool = typer.Option(False, "--effective",
                                         help="print the merged policy: every layer's "
                                              "rules with their origin"),
         policy: str | None = typer.Option(None, "--policy",
                                           help="the session layer a mount would get"),
         base: Path | None = typer.Option(None, "--base",
                                          help="the base whose project policy to read "
                                               "(default: the store's base)"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Which policy layers apply (organisation, project, user, session) and, with
    --effective, the merged rules with the file and line each came from."""
    if mountpoint is not None:
        if policy or base:
            raise UsageError("--policy and --base describe a mount to be; a running "
                             "mount's policy is what its daemon loaded")
        root, pid = daemon_at(ctx, mountpoint)
        reply = ask_daemon(root, pid, {"op": "policy"})
        views = [("mount", reply["mount"])] + [(f"session {s['pid']}", s)
                                                for s in reply.get("sessions", [])]
    else:
        views = [("would load", _would_load(ctx, base, policy).describe())]
    if as_json:
        print_json(views[0][1] if mountpoint is None else reply)
        return
    for label, info in views:
        if effective_ and "effective" in info:
            typer.echo(f"{label}:")
            for line in render(info["effective"]):
                typer.echo(f"  {line}")
        else:
            _print_layers(label, info)
        if info.get("last_error"):
            typer.echo(f"  last reload refused: {info['last_error']}")


def _would_load(ctx: typer.Context, base: Path | None, policy: str | None) -> PolicySource:
    if base is None:
        try:
            base = open_store(ctx).base
        except UserError:
            base = None  # no store: no project layer
    elif not base.is_dir():
        raise NotFoundError(f"base directory {base} does not exist")
    else:
        base = base.resolve()
    if policy and not os.path.lexists(policy):
        raise NotFoundError(f"policy file {policy!r} does not exist")
    return PolicySource.for_mount(str(base) if base else None, policy)


def _print_layers(label: str, info: dict[str, Any]) -> None:
    typer.echo(f"{label}: {info['name']} (sha256 {info['sha256']})")
    loaded = {layer["origin"]: layer for layer in info.get("layers", [])}
    for spec in info.get("looked_for", []):
        layer = loaded.get(spec["origin"])
        state = (f"{layer['name']} (sha256 {layer['sha256'][:12]})" if layer
                 else "not present")
        typer.echo(f"  {spec['origin']:<13} {spec['path']}: {state}")
    if "builtin" in loaded:
        why = ("included by a layer file (include_default: true), every rule "
               "overridable" if len(loaded) > 1 else "no layer file found")
        typer.echo(f"  {'builtin':<13} the built-in default ({why}; see "
                   "`agentfs policy default`)")
    if not info.get("looked_for") and "builtin" not in loaded:
        typer.echo(f"  {info['path']}")


@app.command("query")
def query(ctx: typer.Context,
          path: Path | None = typer.Argument(None, help="a path under an agentfs mount"),
          op: str = typer.Option("open_read", "--op", help="the operation, e.g. unlink"),
          pid: int = typer.Option(0, "--pid", help="decide for this process (default: "
                                                   "this command's parent, the shell)"),
          session_of: int = typer.Option(0, "--session-of",
                                         help="instead: which session PID belongs to"),
          mountpoint: Path | None = typer.Option(None, "--mount",
                                                 help="the mount to ask (default: the one "
                                                      "PATH is under)"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Ask a running mount's decision service what it would decide, without doing the
    operation (exit 0: allowed, 1: not). The question is audited like the mount's own."""
    if session_of:
        if mountpoint is None:
            raise UsageError("--session-of needs --mount MOUNTPOINT")
        message: dict[str, Any] = {"type": "session", "pid": session_of}
        root, daemon = daemon_at(ctx, mountpoint)
    else:
        if path is None:
            raise UsageError("give a PATH under a mount (or --session-of PID --mount MNT)")
        if op not in OPS:
            raise UsageError(f"unknown operation {op!r} (one of {', '.join(sorted(OPS))})")
        target = os.path.abspath(path)
        root, daemon, _ = _mount_of(ctx, target, mountpoint)
        message = {"type": "file", "path": target, "operation": op,
                   "pid": pid or os.getppid()}
    reply = ask_daemon(root, daemon, message)
    if as_json:
        print_json(reply)
    elif "error" in reply:
        raise UserError(str(reply["error"]))
    elif session_of:
        typer.echo(f"pid {session_of}: session {reply['session_id']} on branch "
                   f"{reply['branch']}" if reply.get("allow") else str(reply.get("message")))
    else:
        layer = f" from the {reply['layer']} layer" if reply.get("layer") else ""
        typer.echo(f"{reply.get('decision')} (rule {reply.get('rule')}{layer})"
                   + (f": {reply['message']}" if reply.get("message") else ""))
    if "error" in reply or not reply.get("allow"):
        raise typer.Exit(1)


def _mount_of(ctx: typer.Context, target: str, mountpoint: Path | None
              ) -> tuple[Path, int, str]:
    """(store root, daemon pid, mountpoint) of the mount *target* is under."""
    daemons = live_daemons(live_stores(ctx))
    if mountpoint is not None:
        want = os.path.abspath(mountpoint)
        daemons = [d for d in daemons if d[2] == want]
        if not daemons:
            raise MountError(f"{want} is not an agentfs mount (see `agentfs status`)")
    under = [d for d in daemons if target == d[2] or target.startswith(d[2].rstrip("/") + "/")]
    if not under:
        raise MountError(f"{target} is not under an agentfs mount (see `agentfs status`)")
    return max(under, key=lambda d: len(d[2]))  # the innermost


@app.command("default")
def show_default() -> None:
    """Print the built-in default policy."""
    sys.stdout.write(DEFAULT_POLICY)
