"""The mount daemon: serve one branch at a mountpoint until unmounted.

Started by `agentfs mount` (in the background, reporting readiness over a pipe)
or run in the foreground.  SIGTERM/SIGINT unmount cleanly; the store's mount row
is removed on the way out.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from agentfs.branches.store import Store
from agentfs.errors import UserError
from agentfs.mount import control
from agentfs.mount.fuse3_ops import AgentfsOperations
from agentfs.mount.perprocess import PerProcessOperations
from agentfs.mount.sessions import SessionTable
from agentfs.mount.view import open_branch_view
from agentfs.overlay.layers import Layer

log = logging.getLogger(__name__)


def fuse_options(debug: bool) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {"fsname=agentfs", "subtype=agentfs"}
    if os.getuid() == 0:
        options.add("allow_other")  # sandboxed users other than root must see the view
    if debug:
        options.add("debug")
    return options


@dataclass
class MountConfig:
    """What `agentfs mount` asked for."""

    store_root: Path
    mountpoint: str
    branch: str | None = None          # pinned mode
    per_process: bool = False
    default_branch: str | None = None  # per-process: for unbound callers
    deny_unbound: bool = False
    debug: bool = False
    log_path: str = ""


class Daemon:
    """One mount: the FUSE operations, the control socket and (per-process) sessions."""

    def __init__(self, config: MountConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.sessions = SessionTable()
        self.ops: AgentfsOperations | PerProcessOperations
        if config.per_process:
            for name in filter(None, [config.default_branch]):
                store.branch(name)
            self.ops = PerProcessOperations(store, self.sessions, config.default_branch,
                                            config.deny_unbound)
        else:
            assert config.branch is not None
            self.ops = AgentfsOperations(open_branch_view(store, config.branch))

    def handle(self, req: dict[str, Any], peer_pid: int) -> dict[str, Any]:
        """A control request (the socket already checked the peer's uid)."""
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "fork" and isinstance(self.ops, AgentfsOperations):
            layer = Layer.open_store_layer(int(req["layer_id"]), str(req["layer_dir"]))
            self.ops.ov.push_top(layer)
            log.info("forked: new top layer %s", req["layer_id"])
            return {"ok": True}
        if op == "sessions":
            return {"ok": True, "sessions": [
                {"pid": s.pid, "branch": s.branch, "command": s.command,
                 "started": s.created, "members": len(s.members)}
                for s in self.sessions.sessions.values()]}
        if op in ("bind", "unbind"):
            if not isinstance(self.ops, PerProcessOperations):
                return {"ok": False, "error": "this mount is pinned to one branch"}
            if self.sessions.session_of(peer_pid) is not None:
                log.warning("refused %s from pid %s inside a session", op, peer_pid)
                return {"ok": False, "error": "permission denied: the caller is inside a session"}
            pid = int(req["pid"])
            if op == "unbind":
                return {"ok": self.sessions.unbind(pid)}
            branch = str(req["branch"])
            self.store.branch(branch)
            self.ops.view(branch)
            session = self.sessions.bind(pid, branch)
            log.info("bound pid %s (%s) to branch %s", pid, session.command, branch)
            return {"ok": True}
        return {"ok": False, "error": f"unknown request {op!r}"}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGHUP) as sigs:
                    async for _ in sigs:
                        pyfuse3.terminate()
                        return

            async def end_sessions() -> None:
                while True:
                    await trio.sleep(1.0)
                    for gone in self.sessions.prune():
                        log.info("session of pid %s (%s) ended", gone.pid, gone.branch)

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(end_sessions)
            nursery.start_soon(control.serve,
                               control.socket_path(self.config.store_root, os.getpid()),
                               self.handle)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()

    def close(self) -> None:
        if isinstance(self.ops, PerProcessOperations):
            self.ops.close()
        else:
            self.ops.ov.close()


def serve(config: MountConfig, ready: Callable[[str | None], None]) -> int:
    """Mount and serve; *ready* is called with None once mounted, or with the reason."""
    try:
        store = Store(config.store_root)
        daemon = Daemon(config, store)
    except UserError as exc:
        ready(str(exc))
        return 1
    _raise_fd_limit()
    os.umask(0)  # modes arrive already masked by the kernel
    try:
        pyfuse3.init(daemon.ops, config.mountpoint, fuse_options(config.debug))
    except RuntimeError as exc:
        ready(f"could not mount {config.mountpoint}: {exc}")
        return 1
    mode = "per-process" if config.per_process else "pinned"
    try:
        store.add_mount(config.branch or config.default_branch, config.mountpoint,
                        os.getpid(), mode, config.log_path)
        ready(None)
        log.info("serving %s at %s (%s)", config.branch or "per-process views",
                 config.mountpoint, mode)
        trio.run(daemon.run)
    finally:
        pyfuse3.close(unmount=True)
        daemon.close()
        store.remove_mount(config.mountpoint)
        store.close()
        log.info("unmounted %s", config.mountpoint)
    return 0


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentfs-daemon")
    parser.add_argument("--store", required=True)
    parser.add_argument("--branch")
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--per-process", action="store_true")
    parser.add_argument("--default-branch")
    parser.add_argument("--deny-unbound", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--log-path", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(error: str | None) -> None:
        if args.ready_fd < 0:
            if error:
                print(f"agentfs: {error}", file=sys.stderr)
            return
        os.write(args.ready_fd, ("OK\n" if error is None else f"ERR {error}\n").encode())
        os.close(args.ready_fd)

    config = MountConfig(store_root=Path(args.store), mountpoint=args.mountpoint,
                         branch=args.branch, per_process=args.per_process,
                         default_branch=args.default_branch, deny_unbound=args.deny_unbound,
                         debug=args.debug, log_path=args.log_path)
    return serve(config, ready)


if __name__ == "__main__":
    sys.exit(main())
