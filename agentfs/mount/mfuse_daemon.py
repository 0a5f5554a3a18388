"""Serving a mount through the mfusepy front end (libfuse's high-level API).

libfuse owns the main thread (its loop, and SIGINT/SIGTERM to unmount).  The daemon's
own work (control socket, policy file watching, retention) runs in a trio loop on a
second thread, taking the front end's lock around anything that touches the engine.
SIGHUP means "reload the policy" here as in the pyfuse3 daemon: it is blocked in every
thread and picked up by a thread that waits for it, so libfuse never sees it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from agentfs.mount.background import Background
from agentfs.mount.daemon import Daemon, MountConfig, open_daemon, raise_fd_limit
from agentfs.mount.mfuse_ops import ENTRY_TIMEOUT, AgentfsFUSE, MfuseOperations

log = logging.getLogger(__name__)


def _reload_on_sighup(daemon: Daemon, lock: threading.RLock) -> None:
    while True:
        signal.sigwait({signal.SIGHUP})
        log.info("SIGHUP: reloading the policy")
        with lock:
            daemon.reload_policies()


def serve_mfusepy(config: MountConfig, ready: Callable[[str | None], None]) -> int:
    """Mount and serve through mfusepy; *ready* as for `daemon.serve`."""
    # before any thread exists (the audit writer starts with the daemon): every thread
    # inherits the mask, so only the waiting thread below ever takes SIGHUP
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    opened = open_daemon(config, ready)
    if opened is None:
        return 1
    store, daemon = opened
    ops = daemon.ops
    assert isinstance(ops, MfuseOperations)
    raise_fd_limit()
    os.umask(0)
    background = Background(daemon, ops.engine_lock)
    mounted = threading.Event()

    def on_ready() -> None:
        store.add_mount(config.branch, config.mountpoint, os.getpid(), "pinned",
                        config.log_path)
        mounted.set()
        background.thread.start()
        ready(None)
        log.info("serving %s at %s (pinned, mfusepy)", config.branch, config.mountpoint)

    ops.on_ready = on_ready
    threading.Thread(target=_reload_on_sighup, args=(daemon, ops.engine_lock), daemon=True,
                     name="agentfs-sighup").start()
    options: dict[str, Any] = {
        "foreground": True, "fsname": "agentfs", "subtype": "agentfs",
        "default_permissions": True, "use_ino": True,
        # names are cached briefly; attributes not at all: libfuse gives each name of a
        # hard-linked file its own kernel inode, so a cached nlink or size could be stale
        "attr_timeout": 0, "entry_timeout": ENTRY_TIMEOUT,
        "negative_timeout": 0, "debug": config.debug}
    if os.getuid() == 0:
        options["allow_other"] = True
    try:
        AgentfsFUSE(ops, config.mountpoint, **options)
    except RuntimeError as exc:
        if not mounted.is_set():
            ready(f"could not mount {config.mountpoint}: libfuse error {exc}")
            daemon.close()
            store.close()
            return 1
        log.error("the FUSE loop ended with an error: %s", exc)
    finally:
        if mounted.is_set():
            background.stop()
    daemon.close()
    store.remove_mount(config.mountpoint)
    store.close()
    log.info("unmounted %s", config.mountpoint)
    return 0
