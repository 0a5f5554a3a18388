"""The daemon's control socket: a unix socket in the store, JSON lines.

Requests: {"op": "ping"}; {"op": "fork", "layer_id": N, "layer_dir": PATH} (push a
fresh top layer under the running view, for a fork of a mounted branch); in
per-process mounts {"op": "bind", "pid": P, "branch": B}, {"op": "unbind", "pid": P}
and {"op": "sessions"}.  A process inside a session may not bind or unbind anything.  Only the
daemon's own user (or root) may connect: the peer is checked with SO_PEERCRED and
the socket is mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

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


async def serve(path: Path, handle: Handler) -> None:
    """Answer requests until cancelled; *handle(request, peer_pid)* runs on the trio
    thread (no locking)."""
    if path.exists():
        path.unlink()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with reachable(path) as name:
            await listener.bind(name)
    finally:
        os.umask(old)
    listener.listen(16)

    async def one(conn: trio.socket.SocketType) -> None:
        with conn:
            with trio.move_on_after(30):  # a client that never finishes its line
                await _one(conn, handle)

    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(one, conn)
    finally:
        listener.close()
        if path.exists():
            path.unlink()


async def _one(conn: trio.socket.SocketType, handle: Handler) -> None:
    pid, uid = peer_creds(conn._sock)  # type: ignore[attr-defined]
    if uid not in (0, os.getuid()):
        await conn.send(b'{"ok": false, "error": "permission denied"}\n')
        return
    buf = b""
    while b"\n" not in buf and len(buf) < MAX_REQUEST:
        chunk = await conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    try:
        reply = handle(json.loads(buf.decode()), pid)
    except Exception as exc:
        log.exception("control request failed")
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    await conn.send(json.dumps(reply).encode() + b"\n")


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
