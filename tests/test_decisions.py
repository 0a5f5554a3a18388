"""Decision queries on the control socket of real mounts: {"type": "file"} and
{"type": "session"} answers, many requests per connection, bad requests, who may ask,
and the audit record of each query."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mountutil import (
    AGENTFS,
    IMPLS,
    MountedBranch,
    PerProcessView,
    mounted_branch,
    per_process_mount,
)

from agentfs.audit.log import query
from agentfs.mount import control
from agentfs.proc import parent_pid

pytestmark = pytest.mark.mount

POLICY = """\
version: 1
name: decisions-test
defaults: {read: allow, write: allow}
rules:
  - id: deny-ssh
    priority: 100
    paths: [".ssh/**", "**/id_rsa*"]
    ops: ["*"]
    decision: deny
    message: "secrets are off limits ({op} {path})"
  - id: ask-env
    priority: 50
    paths: ["**/.env"]
    ops: ["@read"]
    decision: ask
  - id: allow-workspace
    paths: ["src/**"]
    ops: ["*"]
    decision: allow
"""
SESSION_POLICY = """\
version: 1
name: session-policy
defaults: {read: allow, write: allow}
rules:
  - id: deny-src-in-session
    paths: ["src/**"]
    ops: ["*"]
    decision: deny
"""


def _base(tmp: Path) -> tuple[Path, Path]:
    base = tmp / "base"
    (base / "src").mkdir(parents=True)
    (base / "src/a.py").write_text("print(1)\n")
    (base / ".ssh").mkdir()
    (base / ".ssh/id_rsa").write_text("key\n")
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    return base, policy


@pytest.fixture(params=IMPLS)
def pinned(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MountedBranch]:
    base, policy = _base(tmp_path)
    with mounted_branch(base, tmp_path, "b", impl=request.param,
                        mount_opts=("--policy", str(policy))) as mb:
        yield mb


def _sock(store: Path, pid: int | None) -> Path:
    assert pid is not None
    return control.socket_path(store, pid)


def _file(path: str | Path, operation: str, pid: int | None = None) -> dict[str, Any]:
    return {"type": "file", "path": str(path), "operation": operation,
            "pid": pid or os.getpid()}


def _events(store: Path, want: int, **filters: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in query(store) if all(e[k] == v for k, v in filters.items())]
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_allow_deny_ask_and_defaults_with_rule_names(pinned: MountedBranch) -> None:
    mnt = pinned.mountpoint
    with control.Connection(_sock(pinned.store, pinned.pid)) as conn:
        assert conn.request(_file(mnt / "src/a.py", "open_read")) == {
            "allow": True, "rule": "allow-workspace", "decision": "allow", "layer": "session"}
        deny = conn.request(_file(mnt / ".ssh/id_rsa", "open_read"))
        assert (deny["allow"], deny["rule"], deny["decision"]) == (False, "deny-ssh", "deny")
        assert deny["message"] == "secrets are off limits (open_read .ssh/id_rsa)"
        assert conn.request(_file(mnt / "notes.txt", "write")) == {
            "allow": True, "rule": "defaults", "decision": "allow", "layer": "session"}
        # an ask rule is answered at once, never put to a person
        t = time.monotonic()
        ask = conn.request(_file(mnt / "x/.env", "open_read"))
        assert time.monotonic() - t < 2
        assert (ask["allow"], ask["rule"], ask["ask"]) == (False, "ask-env", True)
        assert "ask rules are not decided by queries" in ask["message"]
        assert control.request(_sock(pinned.store, pinned.pid), {"op": "prompts"})[
            "prompts"] == []
        # the path is normalised lexically; the mountpoint itself is the view's root
        assert conn.request(_file(f"{mnt}/src/../.ssh//id_rsa", "stat"))["rule"] == "deny-ssh"
        assert conn.request(_file(mnt, "readdir"))["allow"] is True
        # the older requests still work on the same connection
        assert conn.request({"op": "ping"})["ok"] is True


def test_the_query_command(pinned: MountedBranch) -> None:
    """`agentfs policy query`: the mount is found from the path, exit 0 / 1 / error."""
    mnt = pinned.mountpoint
    ok = pinned.cli("policy", "query", str(mnt / "src/a.py"), "--op", "open_read")
    assert ok.stdout.strip() == "allow (rule allow-workspace from the session layer)"
    denied = pinned.cli("policy", "query", str(mnt / ".ssh/id_rsa"), "--json", check=False)
    assert denied.returncode == 1
    assert json.loads(denied.stdout)["message"] == ("secrets are off limits (open_read "
                                                    ".ssh/id_rsa)")
    outside = pinned.cli("policy", "query", "/etc/passwd", check=False)
    assert outside.returncode == 5 and "is not under an agentfs mount" in outside.stderr
    bad = pinned.cli("policy", "query", str(mnt / "x"), "--op", "frobnicate", check=False)
    assert bad.returncode == 2 and "unknown operation 'frobnicate'" in bad.stderr
    nosuch = pinned.cli("policy", "query", str(mnt / "x"), "--pid", "999999999", check=False)
    assert nosuch.returncode == 1 and "no process 999999999" in nosuch.stderr
    assert len(_events(pinned.store, 2, op="query:open_read")) >= 2


def test_many_requests_on_one_connection_are_answered_in_order(pinned: MountedBranch
                                                               ) -> None:
    mnt = pinned.mountpoint
    names = [(".ssh/id_rsa" if i % 3 == 0 else f"src/f{i}.py") for i in range(300)]
    with control.Connection(_sock(pinned.store, pinned.pid)) as conn:
        conn.send_raw(b"".join(json.dumps(_file(mnt / n, "open_write")).encode() + b"\n"
                               for n in names))  # pipelined: all sent before any is read
        replies = [conn.reply() for _ in names]
    assert [r["rule"] for r in replies] == [
        "deny-ssh" if n.startswith(".ssh") else "allow-workspace" for n in names]


def test_bad_requests_get_an_error_and_the_connection_stays_usable(pinned: MountedBranch
                                                                   ) -> None:
    mnt = pinned.mountpoint
    bad: list[tuple[bytes, str]] = [
        (b"{not json\n", "malformed JSON"),
        (b"[1, 2]\n", "a request is a JSON object"),
        (b'{"type": "weather"}\n', "unknown query type 'weather'"),
        (json.dumps(_file(mnt / "a", "delete")).encode() + b"\n", "unknown operation 'delete'"),
        (json.dumps({"type": "file", "path": str(mnt / "a"), "operation": "read"}).encode()
         + b"\n", '"pid" must be a positive integer'),
        (json.dumps({"type": "file", "operation": "read", "pid": os.getpid()}).encode()
         + b"\n", '"path" must be an absolute path'),
        (json.dumps(_file("src/a.py", "read")).encode() + b"\n", "absolute path"),
        (json.dumps(_file("/etc/passwd", "read")).encode() + b"\n", "outside the mount"),
        (json.dumps(_file(mnt / "a", "read", pid=2**22 + 12345)).encode() + b"\n",
         "no process"),
        (b'{"hello": 1}\n', 'a request needs "op"'),
    ]
    with control.Connection(_sock(pinned.store, pinned.pid)) as conn:
        for line, expected in bad:
            conn.send_raw(line)
            reply = conn.reply()
            assert reply["ok"] is False and expected in reply["error"], (line, reply)
            assert conn.request(_file(mnt / "src/a.py", "read"))["allow"] is True
        # a line over the limit: an error, then the daemon closes the connection
        conn.send_raw(b'{"type": "file", "path": "' + b"a" * (control.MAX_REQUEST + 10))
        reply = conn.reply()
        assert reply["ok"] is False and "longer than" in reply["error"]
        with pytest.raises(ConnectionError):
            conn.reply()
    # a client that hangs up without reading its replies: only its connection ends
    with control.Connection(_sock(pinned.store, pinned.pid)) as conn:
        conn.send_raw(b"".join(json.dumps(_file(mnt / f"src/{i}", "read")).encode()
                               + b"\n" for i in range(2000)))
    with control.Connection(_sock(pinned.store, pinned.pid)) as conn:  # the daemon is fine
        assert conn.request({"type": "session", "pid": os.getpid()})["allow"] is False


def test_queries_are_audited_with_the_peer_and_the_subject(pinned: MountedBranch) -> None:
    mnt = pinned.mountpoint
    subject = subprocess.Popen(["sleep", "30"])
    try:
        with control.Connection(_sock(pinned.store, pinned.pid)) as conn:
            conn.request(_file(mnt / ".ssh/id_rsa", "open_read", subject.pid))
            conn.request(_file(mnt / "src/a.py", "write", subject.pid))
        [denied] = _events(pinned.store, 1, op="query:open_read")
        assert (denied["path"], denied["decision"], denied["rule"]) == (
            ".ssh/id_rsa", "deny", "deny-ssh")
        assert denied["pid"] == subject.pid and denied["exe"].endswith("sleep")
        assert denied["dst"] == f"peer pid {os.getpid()}" and denied["errno"] == 13
        [allowed] = _events(pinned.store, 1, op="query:write")
        assert (allowed["decision"], allowed["rule"], allowed["errno"]) == (
            "allow", "allow-workspace", 0)
    finally:
        subject.kill()
        subject.wait()


def test_a_pinned_mount_has_no_sessions(pinned: MountedBranch) -> None:
    reply = control.request(_sock(pinned.store, pinned.pid),
                            {"type": "session", "pid": os.getpid()})
    assert reply["allow"] is False and "pinned" in reply["message"]


# -- per-process mounts ------------------------------------------------------------------------

@contextlib.contextmanager
def _session(pp: PerProcessView, *exec_opts: str) -> Iterator[tuple[int, int]]:
    """A process in a session of *pp*: (its pid, the session's id)."""
    proc = subprocess.Popen([AGENTFS, "--store", str(pp.store), "exec", "--branch", "b",
                             *exec_opts, "--", sys.executable, "-c",
                             "import os, time; print(os.getpid(), flush=True); "
                             "time.sleep(60)"],
                            env=pp.env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        keeper = parent_pid(pid)  # the session's root (an ended one may still be listed)
        sessions = control.request(control.socket_path(pp.store, pp.pid),
                                   {"op": "sessions"})["sessions"]
        assert keeper is not None and keeper in [s["pid"] for s in sessions], sessions
        yield pid, keeper
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()


def _from_a_session(pp: PerProcessView, requests: list[dict[str, Any]]) -> list[Any]:
    """The replies to *requests* sent by a process inside a session, on one connection."""
    script = textwrap.dedent(f"""
        import json, sys
        from agentfs.mount import control
        with control.Connection(control.socket_path(__import__("pathlib").Path(
                {str(pp.store)!r}), {pp.pid})) as conn:
            print(json.dumps([conn.request(r) for r in json.loads(sys.argv[1])]))
    """)
    res = pp.cli("exec", "--branch", "b", "--", sys.executable, "-c", script,
                 json.dumps(requests))
    return list(json.loads(res.stdout))


def test_session_queries_and_session_policies(tmp_path: Path) -> None:
    base, policy = _base(tmp_path)
    session_policy = tmp_path / "session.yaml"
    session_policy.write_text(SESSION_POLICY)
    with per_process_mount(base, tmp_path, "--policy", str(policy),
                           "--default-branch", "b") as pp:
        sock = control.socket_path(pp.store, pp.pid)
        with _session(pp) as (pid, sid), control.Connection(sock) as conn:
            assert conn.request({"type": "session", "pid": pid}) == {
                "allow": True, "session_id": str(sid), "branch": "b"}
            outside = conn.request({"type": "session", "pid": os.getpid()})
            assert outside["allow"] is False and "not in a session" in outside["message"]
            # the session uses the mount's policy; an unbound pid the default branch's
            assert conn.request(_file(pp.mountpoint / "src/a.py", "read", pid))[
                "rule"] == "allow-workspace"
            assert conn.request(_file(pp.mountpoint / ".ssh/id_rsa", "read"))[
                "rule"] == "deny-ssh"
        with _session(pp, "--policy", str(session_policy)) as (pid, _), \
                control.Connection(sock) as conn:
            reply = conn.request(_file(pp.mountpoint / "src/a.py", "read", pid))
            assert (reply["allow"], reply["rule"]) == (False, "deny-src-in-session")
            assert conn.request(_file(pp.mountpoint / "src/a.py", "read"))["allow"] is True
        [event] = _events(pp.store, 1, op="query:read", rule="deny-src-in-session")
        assert event["session"] and event["branch"] == "b"


@pytest.mark.parametrize("allowed", [False, True])
def test_a_caller_inside_a_session(tmp_path: Path, allowed: bool) -> None:
    base, policy = _base(tmp_path)
    opts = ("--decision-queries-from-sessions",) if allowed else ()
    with per_process_mount(base, tmp_path, "--policy", str(policy), "--default-branch", "b",
                           *opts) as pp:
        bind, query_reply, session = _from_a_session(pp, [
            {"op": "bind", "pid": os.getpid(), "branch": "b"},
            _file(pp.mountpoint / ".ssh/id_rsa", "open_read"),
            {"type": "session", "pid": os.getpid()}])
        assert bind["ok"] is False and "inside a session" in bind["error"]
        if allowed:
            assert (query_reply["allow"], query_reply["rule"]) == (False, "deny-ssh")
            assert session["allow"] is False
        else:
            for reply in (query_reply, session):
                assert reply["ok"] is False and "inside a session" in reply["error"]
                assert "--decision-queries-from-sessions" in reply["error"]
