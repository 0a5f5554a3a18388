"""Serving a mount through the kernel front end (FUSE spoken directly, no libfuse).

The main thread runs the request loop.  The daemon's own work (control socket, policy
file watching, retention, session pruning) runs in a trio loop on a second thread,
taking the engine lock around anything that touches the engine, as in the mfusepy
daemon.  SIGHUP (reload the policy), SIGTERM and SIGINT (unmount) are blocked in every
thread and taken by one thread that waits for them: unmounting from the loop's own
thread could deadlock (the kernel may need the loop to answer the last writes).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from agentfs.mount.background import Background
from agentfs.mount.daemon import Daemon, MountConfig, open_daemon, raise_fd_limit
from agentfs.mount.kernel.ops import KernelOperations
from agentfs.mount.kernel.perprocess import KernelPerProcess
from agentfs.mount.kernel.session import MountError, Session
from agentfs.mount.tuning import limit_malloc_arenas, raise_readahead

log = logging.getLogger(__name__)

SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def _take_signals(daemon: Daemon, session: Session, lock: threading.RLock) -> None:
    while True:
        signum = signal.sigwait(SIGNALS)
        if signum == signal.SIGHUP:
            log.info("SIGHUP: reloading the policy")
            with lock:
                daemon.reload_policies()
            continue
        log.info("%s: unmounting %s", signal.Signals(signum).name, session.mountpoint)
        session.unmount()


def serve_kernel(config: MountConfig, ready: Callable[[str | None], None]) -> int:
    """Mount and serve through the kernel front end; *ready* as for `daemon.serve`."""
    # before any thread exists (the audit writer starts with the daemon): every thread
    # inherits the mask, so only the waiting thread below ever takes these signals
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    limit_malloc_arenas()  # before the request threads start allocating
    opened = open_daemon(config, ready)
    if opened is None:
        return 1
    store, daemon = opened
    ops = daemon.ops
    assert isinstance(ops, (KernelOperations, KernelPerProcess))
    raise_fd_limit()
    os.umask(0)  # modes arrive already masked by the kernel (DONT_MASK or not)
    session = Session(config.mountpoint, ops.engine_lock, config.debug)
    ops.attach(session)
    try:
        session.mount()
    except (MountError, OSError) as exc:
        ready(f"could not mount {config.mountpoint}: {exc}")
        daemon.close()
        store.close()
        return 1

    def tune() -> None:  # after INIT: its reply resets the readahead window
        raise_readahead(config.mountpoint)

    session.after_init = tune
    background = Background(daemon, ops.engine_lock)
    try:
        mode = "per-process" if config.per_process else "pinned"
        store.add_mount(config.branch or config.default_branch, config.mountpoint,
                        os.getpid(), mode, config.log_path)
        threading.Thread(target=_take_signals, args=(daemon, session, ops.engine_lock),
                         daemon=True, name="agentfs-signals").start()
        background.thread.start()
        ready(None)
        log.info("serving %s at %s (%s, kernel)", config.branch or "per-process views",
                 config.mountpoint, mode)
        session.serve()
    finally:
        ops.shutdown()
        background.stop()
        session.close()
        daemon.close()
        store.remove_mount(config.mountpoint)
        store.close()
        log.info("unmounted %s", config.mountpoint)
    return 0
