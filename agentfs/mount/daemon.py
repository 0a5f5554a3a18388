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
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from agentfs.branches.store import Store
from agentfs.errors import UserError
from agentfs.mount import control
from agentfs.mount.fuse3_ops import AgentfsOperations
from agentfs.mount.view import open_branch_view
from agentfs.overlay.engine import Overlay
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


def control_handler(overlay: Overlay) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def handle(req: dict[str, Any]) -> dict[str, Any]:
        if req.get("op") == "ping":
            return {"ok": True, "pid": os.getpid()}
        if req.get("op") == "fork":
            overlay.push_top(Layer.open_store_layer(int(req["layer_id"]), str(req["layer_dir"])))
            log.info("forked: new top layer %s", req["layer_id"])
            return {"ok": True}
        return {"ok": False, "error": f"unknown request {req.get('op')!r}"}
    return handle


async def _serve(control_path: Path, overlay: Overlay) -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(stop_on_signal)
        nursery.start_soon(control.serve, control_path, control_handler(overlay))
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


def serve(store_root: Path, branch: str, mountpoint: str, debug: bool,
          ready: Callable[[str | None], None], log_path: str = "") -> int:
    """Mount and serve; *ready* is called with None once mounted, or with the reason."""
    try:
        store = Store(store_root)
        overlay = open_branch_view(store, branch)
    except UserError as exc:
        ready(str(exc))
        return 1
    _raise_fd_limit()
    os.umask(0)  # modes arrive already masked by the kernel
    ops = AgentfsOperations(overlay)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(debug))
    except RuntimeError as exc:
        ready(f"could not mount {mountpoint}: {exc}")
        return 1
    try:
        store.add_mount(branch, mountpoint, os.getpid(), "pinned", log_path)
        ready(None)
        log.info("serving branch %s at %s", branch, mountpoint)
        trio.run(_serve, control.socket_path(store_root, os.getpid()), overlay)
    finally:
        pyfuse3.close(unmount=True)
        overlay.close()
        store.remove_mount(mountpoint)
        store.close()
        log.info("unmounted %s", mountpoint)
    return 0


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentfs-daemon")
    parser.add_argument("--store", required=True)
    parser.add_argument("--branch", required=True)
    parser.add_argument("--mountpoint", required=True)
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

    return serve(Path(args.store), args.branch, args.mountpoint, args.debug, ready,
                 args.log_path)


if __name__ == "__main__":
    sys.exit(main())
