"""The daemon's control socket: a unix socket in the store, JSON lines.

Framing: one JSON object per line, both ways.  A connection carries any number of
requests; each gets exactly one reply line, in order, so a client may pipeline (send
many lines, then read as many replies).  A bad line (not JSON, not an object, an
unknown type or operation, a missing field) gets an error reply and the connection
stays usable; a line longer than `MAX_REQUEST` gets an error reply and the
connection is closed (where that line ends cannot be trusted).  Error replies are
``{"ok": false, "error": "..."}`` ("ok" for the clients of the older requests).
Existing one-request clients (connect, send a line, read a line) work as before.

Control requests, ``{"op": ...}``: ping; fork (push a fresh top layer under the
running view, for a fork of a mounted branch); policy, reload; prompts, answer;
audit; trash_purge, trash_restore; sessions; in per-process mounts bind and unbind.
A process inside a session may not bind, unbind or answer.

Decision queries, ``{"type": ...}`` (`DecisionQueries`), for tools outside the mount
that want the mount's verdict without doing the operation:

* ``{"type": "file", "path": "/abs/path", "operation": "open_read", "pid": 1234}``
  -> ``{"allow": true, "rule": "allow-workspace", "decision": "allow"}`` or
  ``{"allow": false, "rule": "deny-ssh", "decision": "deny", "message": "..."}``;
  ``rule`` is ``"defaults"`` when no rule matched.  *operation* is one of the
  policy's operation names (`agentfs.policy.model.OPS`: open_read, open_write, read,
  write, truncate, create, mkdir, unlink, rmdir, rename, rename_over, link, ...).
* ``{"type": "session", "pid": 1234}`` -> ``{"allow": true, "session_id": "...",
  "branch": "..."}`` when the pid or an ancestor is in one of this mount's sessions,
  else ``{"allow": false, "message": "..."}``.

How a file query is decided, and why:

* *path* must be absolute.  It is normalised lexically (``..``, ``//``), never looked
  up: resolving a name under the mountpoint would send the daemon a request from
  itself while it holds the engine lock.  In the mount the kernel resolves symlinks
  before the policy sees a name, so a query should name the real path.  A path at or
  under the mountpoint becomes the view path rules are written against (POLICY.md:
  "matched against the path inside the view").  The policy language has no rules for
  paths outside the view, so such a path gets an error reply rather than a guess.
* the policy is that of the pid's session (found through its ancestry, like a FUSE
  request's) when it has its own (`exec --policy`), else the mount's; caller
  predicates (``who``) see the pid's exe, ancestors, uid, session and branch.  In a
  per-process mount a pid outside every session is judged on the default branch;
  without one (or with --deny-unbound) the answer is a deny: it could not open
  anything in the mount at all.
* the name given is judged alone: a hard-linked file is not looked up under its other
  names, and rename/link are judged on the one side named.
* an ``ask`` rule is not put to a person (a query must never block, nor raise a
  prompt for an operation that may never happen): ``{"allow": false, "decision":
  "ask", "ask": true, "message": "ask rules are not decided by queries ..."}``.
  Remembered answers are not consulted either: they belong to the asking process.
* each query is audited like an in-mount decision: an event with op
  ``query:<operation>``, the view path, the decision and rule, the subject pid (with
  its exe, command line, session and branch), the deny errno, and
  ``dst = "peer pid N"`` (the querying process).

Permissions: only the daemon's own user (or root) may connect (the peer is checked
with SO_PEERCRED; the socket is mode 0600).  A caller inside a session may make
decision queries only on a mount started with ``--decision-queries-from-sessions``
(default off: a sandboxed agent probing the policy learns where the secrets are).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from agentfs.policy.model import OPS
from agentfs.proc import ProcNames

if TYPE_CHECKING:
    from agentfs.audit.log import AuditLog
    from agentfs.mount.sessions import SessionTable
    from agentfs.policy.callers import CallerResolver
    from agentfs.policy.source import PolicySource

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024


def socket_path(store_root: Path, pid: int) -> Path:
    return store_root / "run" / f"ctl-{pid}.sock"


MAX_SUN_PATH = 100  # sockaddr_un holds 108 bytes; stay clear of the edge


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """A name for *path* short enough for a unix socket address: a store deep in the
    filesystem gets its directory through /proc/self/fd (the kernel resolves it)."""
    if len(os.fsencode(str(path))) <= MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def peer_creds(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


Handler = Callable[[dict[str, Any], int], dict[str, Any]]

IDLE_TIMEOUT: Final = 600.0  # a connection with nothing in flight is closed after this
LINE_TIMEOUT: Final = 30.0   # a line begun but not finished within this is given up


def bind(path: Path) -> socket.socket:
    """The listening control socket at *path* (mode 0600).  Daemons bind it before they
    report the mount ready: a client that connects the moment `agentfs mount` returns
    must find it (it used to appear a little later, from the daemon's task loop)."""
    if path.exists():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        with reachable(path) as name:
            listener.bind(name)
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(old)
    listener.listen(16)
    return listener


async def serve(path: Path, handle: Handler, bound: socket.socket) -> None:
    """Answer requests on *bound* (what `bind(path)` made) until cancelled;
    *handle(request, peer_pid)* runs on the trio thread (no locking)."""
    listener = trio.socket.from_stdlib_socket(bound)

    async def one(conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                await _connection(conn, handle)
            except OSError as exc:  # the client went away mid-reply: its business only
                log.debug("control connection ended: %s", exc)

    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(one, conn)
    finally:
        listener.close()
        if path.exists():
            path.unlink()


def error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _answer(line: bytes, handle: Handler, pid: int) -> bytes:
    """The reply line to one request line."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return _encode(error(f"malformed JSON: {exc}"))
    if not isinstance(req, dict):
        return _encode(error(f"a request is a JSON object, not {type(req).__name__}"))
    try:
        return _encode(handle(req, pid))
    except Exception as exc:
        log.exception("control request failed")
        return _encode(error(f"{type(exc).__name__}: {exc}"))


async def _connection(conn: trio.socket.SocketType, handle: Handler) -> None:
    """Read request lines until EOF; reply to each in order (the replies to the lines
    of one read go out in one send)."""
    pid, uid = peer_creds(conn._sock)  # type: ignore[attr-defined]
    if uid not in (0, os.getuid()):
        await conn.send(b'{"ok": false, "error": "permission denied"}\n')
        return
    buf = b""
    line_deadline = 0.0
    while True:
        deadline = line_deadline if buf else trio.current_time() + IDLE_TIMEOUT
        chunk: bytes | None = None
        with trio.move_on_at(deadline):
            chunk = await conn.recv(65536)
        if chunk is None:
            return  # idle too long, or a line never finished
        if not chunk:
            if buf.strip():  # a last request without its newline, as before
                await _send_all(conn, _answer(buf, handle, pid))
            return
        if not buf:
            line_deadline = trio.current_time() + LINE_TIMEOUT
        buf += chunk
        *lines, buf = buf.split(b"\n")
        replies: list[bytes] = []
        oversized = False
        for line in lines:
            if len(line) > MAX_REQUEST:
                oversized = True
                break
            if line.strip():
                replies.append(_answer(line, handle, pid))
        oversized = oversized or len(buf) > MAX_REQUEST
        if oversized:
            replies.append(_encode(error(f"request line longer than {MAX_REQUEST} bytes; "
                                         "closing the connection")))
        if replies:
            await _send_all(conn, b"".join(replies))
        if oversized:
            return
        if lines:
            line_deadline = trio.current_time() + LINE_TIMEOUT


async def _send_all(conn: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await conn.send(view)
        view = view[sent:]


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


def request(path: Path, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to a daemon and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        with reachable(path) as name:
            sock.connect(name)
        sock.sendall(json.dumps(message).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
    reply: dict[str, Any] = json.loads(buf.decode() or "{}")
    return reply


class Connection:
    """A client connection for many requests: one reply line per request, in order."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            with reachable(path) as name:
                self.sock.connect(name)
        except OSError:
            self.sock.close()
            raise
        self._replies = self.sock.makefile("rb")

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        line = self._replies.readline()
        if not line:
            raise ConnectionError("the daemon closed the connection")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.reply()

    def close(self) -> None:
        self._replies.close()
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- decision queries ---------------------------------------------------------------------

QUERY_TYPES: Final = ("file", "session")
_PROC_FRESH: Final = 2.0


@dataclass
class DecisionQueries:
    """Answers ``{"type": ...}`` requests from the mount's policy (see the module
    docstring for the protocol and its choices).  Runs on the control thread under
    the daemon's engine lock, like every control request."""

    mountpoint: str
    policy: PolicySource
    sessions: SessionTable
    callers: CallerResolver
    audit: AuditLog | None
    branch: str | None               # pinned: the branch; per-process: the default one
    per_process: bool = False
    from_sessions: bool = False      # may a caller inside a session ask?
    _procs: ProcNames = field(default_factory=lambda: ProcNames(_PROC_FRESH))

    def answer(self, req: dict[str, Any], peer_pid: int) -> dict[str, Any]:
        kind = req.get("type")
        if kind not in QUERY_TYPES:
            return error(f"unknown query type {kind!r} (known: {', '.join(QUERY_TYPES)})")
        if not self.from_sessions and self.sessions.session_of(peer_pid) is not None:
            log.warning("refused a %s query from pid %s inside a session", kind, peer_pid)
            return error("permission denied: the caller is inside a session (this mount "
                         "was not started with --decision-queries-from-sessions)")
        pid = req.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            return error('"pid" must be a positive integer')
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return error(f"no process {pid}")
        if kind == "session":
            return self._session(pid)
        return self._file(req, pid, uid, peer_pid)

    def _session(self, pid: int) -> dict[str, Any]:
        if not self.per_process:
            return {"allow": False, "message": f"this mount is pinned to branch "
                                               f"{self.branch}: it has no sessions"}
        session = self.sessions.session_of(pid)
        if session is None:
            return {"allow": False, "message": f"pid {pid} is not in a session of the "
                                               f"mount at {self.mountpoint}"}
        return {"allow": True, "session_id": str(session.pid), "branch": session.branch}

    def view_path(self, path: str) -> str | None:
        """The view path of the absolute *path*, or None when it is outside the mount."""
        norm = posixpath.normpath(path)
        if norm.startswith("//"):
            norm = "/" + norm.lstrip("/")
        if norm == self.mountpoint:
            return ""
        prefix = self.mountpoint.rstrip("/") + "/"
        return norm[len(prefix):] if norm.startswith(prefix) else None

    def _file(self, req: dict[str, Any], pid: int, uid: int, peer_pid: int
              ) -> dict[str, Any]:
        path, operation = req.get("path"), req.get("operation")
        if not isinstance(path, str) or not path.startswith("/"):
            return error('"path" must be an absolute path')
        if not isinstance(operation, str) or operation not in OPS:
            return error(f"unknown operation {operation!r} (known: {', '.join(sorted(OPS))})")
        rel = self.view_path(path)
        if rel is None:
            return error(f"{path} is outside the mount at {self.mountpoint}: the policy "
                         "names only paths inside the view")
        session = self.sessions.session_of(pid) if self.per_process else None
        sid = str(session.pid) if session is not None else ""
        branch = session.branch if session is not None else self.branch
        source = session.policy if session is not None and session.policy else self.policy
        engine = source.engine
        if branch is None:  # per-process, unbound, no default branch: sees nothing
            reply = {"allow": False, "rule": "", "decision": "deny",
                     "message": f"pid {pid} is not bound to a branch of this mount and "
                                "unbound callers are refused"}
            self._record(pid, uid, sid, "", operation, rel, "deny", "",
                         engine.policy.sha256, engine.policy.defaults.deny_errno, peer_pid)
            return reply
        caller = self.callers.resolve(pid, uid, branch, sid, engine.caller_keys)
        d = engine.decide(operation, rel, caller)
        rule = d.rule or "defaults"
        reply = {"allow": d.allowed, "rule": rule, "decision": d.decision}
        if d.origin:
            reply["layer"] = d.origin   # which policy layer decided (organisation, ...)
        if d.decision == "deny":
            reply["message"] = d.message or (f"{operation} {rel or '/'} is denied by "
                                             f"{'rule ' + rule if d.rule else 'the defaults'}")
        elif d.decision == "ask":
            reply["ask"] = True
            reply["message"] = (f"ask rules are not decided by queries: {operation} "
                                f"{rel or '/'} would wait for a person's answer (rule {rule})")
        self._record(pid, uid, sid, branch, operation, rel, d.decision, d.rule or "",
                     d.policy_sha256, 0 if d.allowed else d.errno, peer_pid)
        return reply

    def _record(self, pid: int, uid: int, sid: str, branch: str, operation: str,
                path: str, decision: str, rule: str, sha256: str, errno_value: int,
                peer_pid: int) -> None:
        if self.audit is None:
            return
        exe, cmdline = self._procs.get(pid)
        self.audit.emit_request(sid, branch, pid, exe, cmdline, uid, f"query:{operation}",
                                path, f"peer pid {peer_pid}", decision, rule, sha256,
                                errno_value, 0)

