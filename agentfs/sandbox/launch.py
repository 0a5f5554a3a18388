"""`agentfs run` on Linux: the branch's view, the sandbox around CMD, the cleanup.

Order: checks (root, namespaces), the branch (`--create` makes it), the view, the
sandbox (`nsinit`: new mount and pid namespaces, optionally a new network namespace,
a read-only root with the view at the project's path, see `rootfs`), then cleanup in
`finally`, also when CMD was killed or the daemon crashed.

One daemon per branch.  Two daemons serving one branch would each cache the branch's
top layer and overwrite each other's changes, so a run joins a running pinned mount of
the branch (started by `agentfs mount` or by another run) instead of starting its own.
The joined mount's policy applies; `--policy` with a different file is refused.

Mount lease.  A mount a run starts lives in `<store>/run/sandbox-<pid>-<x>/view`, next
to `users.lock`; every run using it holds a shared flock on that file.  At the end a
run tries to upgrade to an exclusive lock: if it gets it, it is the last user and
unmounts the view (unless the run that started it passed `--keep-mount`, recorded as a
`keep` file) and removes the directory; otherwise the last run to finish does.  Joining,
starting and releasing happen under the store's `run/sandbox.lock`, so two runs never
start two daemons for one branch and a run never joins a mount being unmounted.  A
mount started with `agentfs mount` is never unmounted by a run.  The mount each
sandbox sees is its own copy in its mount namespace: when the host's copy goes, a
sandbox still running keeps the daemon serving until its namespace ends, so even a
lazy unmount (the fallback when a normal one fails) is safe.

A run killed with SIGKILL cannot clean up: its sandbox dies with it (parent-death
signals), its mount stays.  The next run in the store finds the orphan (owner dead,
nobody holding its lease) and unmounts and removes it.  The directory of a kept mount
goes the same way once the mount is unmounted (`agentfs umount`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from agentfs import capabilities
from agentfs.branches.store import MountInfo, Store, agentfs_home, mounted_paths
from agentfs.errors import UserError
from agentfs.mount import control, lifecycle
from agentfs.policy.source import PolicySource
from agentfs.proc import running
from agentfs.sandbox import full, linux, nsinit, rootfs
from agentfs.sandbox.nsinit import Identity, SandboxPlan

log = logging.getLogger(__name__)

SANDBOX_DIR = re.compile(r"sandbox-(\d+)-[^/]+")
LAZY_EXIT_TIMEOUT = 10.0
STATUS_TIMEOUT = 5.0


@dataclass(frozen=True)
class RunRequest:
    branch: str
    cmd: tuple[str, ...]
    create: bool = False
    policy: str | None = None
    network: bool = False  # egress only when asked for (--network)
    keep_mount: bool = False
    full: bool = False


@dataclass
class ViewLease:
    """The mount a run uses, and its share of it."""
    mountpoint: Path
    daemon_pid: int
    home: Path | None    # the sandbox-* directory of a mount a run started (None: a user's)
    lock_fd: int | None  # shared flock on home/users.lock


# -- checks -------------------------------------------------------------------------
def check_root(euid: int | None = None) -> None:
    check = capabilities.probe_root(euid)
    if not check.ok:
        raise UserError(check.message())  # the line `agentfs doctor` explains it with


def check_namespaces(network: bool) -> None:
    flags = linux.CLONE_NEWNS | linux.CLONE_NEWPID | (0 if network else linux.CLONE_NEWNET)
    problem = linux.namespace_problem(flags)
    if problem:
        raise UserError(capabilities.namespaces_message(problem))


def identity_from_env(environ: Mapping[str, str]) -> Identity | None:
    """The user who ran `sudo agentfs run` (SUDO_UID/SUDO_GID/SUDO_USER), or None when
    started as root directly (CMD stays root, with capabilities dropped)."""
    uid_text = environ.get("SUDO_UID")
    if not uid_text:
        return None
    try:
        uid = int(uid_text)
        gid = int(environ["SUDO_GID"]) if environ.get("SUDO_GID") else None
    except ValueError:
        raise UserError(f"SUDO_UID/SUDO_GID must be numbers (got {uid_text!r}, "
                        f"{environ.get('SUDO_GID')!r})") from None
    if uid == 0:
        return None
    entry = None
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(environ["SUDO_USER"]) if environ.get("SUDO_USER") else None
    if entry is None or entry.pw_uid != uid:
        entry = None
        with contextlib.suppress(KeyError):
            entry = pwd.getpwuid(uid)
    if gid is None:
        gid = entry.pw_gid if entry is not None else uid
    if entry is None:
        return Identity(uid=uid, gid=gid, groups=(gid,), name=str(uid), home="/")
    groups = tuple(dict.fromkeys([gid, *os.getgrouplist(entry.pw_name, gid)]))
    return Identity(uid=uid, gid=gid, groups=groups, name=entry.pw_name, home=entry.pw_dir)


def ensure_branch(store: Store, name: str) -> None:
    """--create: make the branch unless it exists.  Under the store's sandbox lock, so
    two runs starting together do not both create it; one created meanwhile by
    `agentfs branch create` is accepted too."""
    with _store_lock(store):
        if name in {b.name for b in store.branches()}:
            return
        try:
            store.create_branch(name)
        except (UserError, IntegrityError):
            if name not in {b.name for b in store.branches()}:
                raise


# -- the run ------------------------------------------------------------------------
def run_sandbox(store: Store, req: RunRequest) -> int:
    """Run req.cmd in a sandbox on req.branch; return its exit status."""
    check_root()
    if not req.cmd:
        raise UserError("no command given: agentfs run --branch NAME -- CMD [ARGS...]")
    check_namespaces(req.network)
    if req.create:
        ensure_branch(store, req.branch)
    store.branch(req.branch)  # unknown branch: a UserError naming the known ones
    PolicySource.for_mount(str(store.base), req.policy)  # every layer loads, or say why
    user = identity_from_env(os.environ)
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    own_dir = Path(tempfile.mkdtemp(prefix=f"sandbox-{os.getpid()}-", dir=store.root / "run"))
    lease: ViewLease | None = None
    whole: tuple[Store, Path] | None = None
    whole_lease: ViewLease | None = None
    with SignalRelay() as signals:
        try:
            if req.full:
                whole, whole_lease = _whole_root_view(store, req, signals)
            lease = acquire_view(store, req.branch, req.policy, req.keep_mount, own_dir)
            (own_dir / "root").mkdir()
            plan = SandboxPlan(
                root=rootfs.RootSpec(
                    new_root=str(own_dir / "root"), view=str(lease.mountpoint),
                    project=os.path.realpath(store.base),
                    hidden=(os.path.realpath(store.root), os.path.realpath(agentfs_home())),
                    homes=rootfs.home_directories((user.home,) if user else ()),
                    whole_root=str(whole_lease.mountpoint) if whole_lease else None),
                cwd=cwd, network=req.network, user=user, cmd=req.cmd,
                foreground=_in_foreground())
            store.close()  # the forks below must not share its connections
            if whole is not None:
                whole[0].close()
            locks = tuple(fd for fd in (lease.lock_fd,
                                        whole_lease.lock_fd if whole_lease else None)
                          if fd is not None)
            return _run(plan, locks, signals)
        finally:
            signals.interruptible = False  # the cleanup always finishes
            try:
                finish(store, lease, own_dir)
            finally:
                if whole is not None:
                    finish(whole[0], whole_lease, whole[1])
                    whole[0].close()


def _whole_root_view(store: Store, req: RunRequest, signals: SignalRelay
                     ) -> tuple[tuple[Store, Path], ViewLease]:
    """--full: the root store's branch for this project branch, mounted (or joined)."""
    root_store = full.open_root_store()
    branch = full.root_branch_name(store, req.branch)
    ensure_branch(root_store, branch)
    home = Path(tempfile.mkdtemp(prefix=f"sandbox-{os.getpid()}-",
                                 dir=root_store.root / "run"))
    try:
        lease = acquire_view(root_store, branch, req.policy, req.keep_mount, home)
    except BaseException:
        finish(root_store, None, home)
        root_store.close()
        raise
    return (root_store, home), lease


def finish(store: Store, lease: ViewLease | None, own_dir: Path,
           ops: ViewOps | None = None) -> None:
    """The cleanup of a run: its share of the view, then its sandbox directory."""
    try:
        if lease is not None:
            if not running(lease.daemon_pid):
                print(f"agentfs: the daemon of {lease.mountpoint} (pid {lease.daemon_pid}) "
                      f"died during the run; see its log in {store.root / 'run'}",
                      file=sys.stderr)
            note = release_view(store, lease, ops or LINUX_VIEW_OPS)
            if note and lease.home == own_dir:  # only the run that asked to keep it
                print(f"agentfs: {note}", file=sys.stderr)
    finally:
        _remove_sandbox_dir(own_dir, keep_view=lease is not None and lease.home == own_dir
                            and (own_dir / "users.lock").exists())


class SignalRelay:
    """The signals of `agentfs run` itself, from setup to the end of the cleanup.

    Setting up (*interruptible*): SIGINT, SIGQUIT, SIGTERM and SIGHUP interrupt it
    (KeyboardInterrupt, and the cleanup runs).  While CMD runs: Ctrl-C and Ctrl-\\
    reach CMD from the terminal directly, so they are ignored here; SIGTERM, SIGHUP,
    SIGUSR1/2 go on to *target* (the relay, which passes them to CMD).  Afterwards
    (no target) they are ignored, so the cleanup finishes."""

    def __init__(self) -> None:
        self.target = 0
        self.interruptible = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalRelay:
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP,
                    signal.SIGUSR1, signal.SIGUSR2):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.interruptible and signum not in (signal.SIGUSR1, signal.SIGUSR2):
            raise KeyboardInterrupt
        if self.target and signum not in (signal.SIGINT, signal.SIGQUIT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.target, signum)


def _run(plan: SandboxPlan, close_fds: tuple[int, ...], signals: SignalRelay) -> int:
    """Fork the relay, wait for it, and turn what the sandbox reported into a result."""
    r, w = os.pipe()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, nsinit.WAITED)
    signals.interruptible = False
    try:
        pid = os.fork()
        if pid == 0:
            os.close(r)
            nsinit.relay(plan, w, close_fds)
        signals.target = pid
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(w)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        signals.target = 0
        if plan.foreground:
            _take_back_terminal()
    with os.fdopen(r, "rb") as reports:
        lines = _read_reports(reports.fileno())
    code = nsinit.exit_code(status)
    for line in lines:
        kind, _, text = line.partition(" ")
        if kind == "ERR":
            raise UserError(f"cannot set up the sandbox: {text}")
        if kind == "EXEC":
            code_text, _, message = text.partition(" ")
            print(f"agentfs: {message}", file=sys.stderr)
            return int(code_text)
    return code


def _in_foreground() -> bool:
    """Whether stdin is a terminal whose foreground process group is ours."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _take_back_terminal() -> None:
    """The sandbox's init made its group the foreground; give it back to ours, so the
    shell that started `agentfs run` finds the terminal as it left it."""
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(0, os.getpgrp())
    finally:
        signal.signal(signal.SIGTTOU, previous)


def _read_reports(fd: int) -> list[str]:
    """What the relay, the init and CMD's child wrote before they ended (the write
    ends close when the pid namespace is gone, a moment after the relay)."""
    buf = b""
    deadline = time.monotonic() + STATUS_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return [line for line in buf.decode(errors="replace").splitlines() if line]


# -- the view and its lease -------------------------------------------------------------
@contextlib.contextmanager
def _store_lock(store: Store) -> Iterator[None]:
    fd = os.open(store.root / "run" / "sandbox.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _lock_shared(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _run_started(store: Store, mountpoint: str) -> Path | None:
    """The sandbox directory of a mount a run started, or None (a user's mount)."""
    path = Path(mountpoint)
    if path.name == "view" and path.parent.parent == store.root / "run" \
            and SANDBOX_DIR.fullmatch(path.parent.name):
        return path.parent
    return None


@dataclass(frozen=True)
class ViewOps:
    """How a platform starts a pinned mount (returning the daemon's pid) and stops one
    (unmount, then wait for that daemon)."""
    start: Callable[[Store, str, Path, str | None], int]
    stop: Callable[[Store, Path, int], None]


def acquire_view(store: Store, branch: str, policy: str | None, keep: bool,
                 own_dir: Path, ops: ViewOps | None = None) -> ViewLease:
    """Join the branch's pinned mount, or start one in *own_dir*."""
    ops = ops or LINUX_VIEW_OPS
    with _store_lock(store):
        _sweep(store, own_dir, ops)
        for m in store.mounts():
            if m.mode == "pinned" and m.branch == branch:
                return _join(store, m, policy)
        view = own_dir / "view"
        view.mkdir()
        lock_fd = _lock_shared(own_dir / "users.lock")
        if keep:
            (own_dir / "keep").touch()
        try:
            pid = ops.start(store, branch, view, policy)
        except BaseException:
            os.close(lock_fd)
            raise
        return ViewLease(view, pid, own_dir, lock_fd)


def _join(store: Store, m: MountInfo, policy: str | None) -> ViewLease:
    if policy is not None:
        _check_same_policy(store, m, policy)
    home = _run_started(store, m.mountpoint)
    lock_fd = _lock_shared(home / "users.lock") if home is not None else None
    return ViewLease(Path(m.mountpoint), m.pid, home, lock_fd)


def _check_same_policy(store: Store, m: MountInfo, policy: str) -> None:
    try:
        reply = control.request(control.socket_path(store.root, m.pid), {"op": "policy"},
                                timeout=10)
    except OSError as exc:
        raise UserError(f"cannot ask the daemon of {m.mountpoint} which policy it "
                        f"enforces: {exc}") from None
    layers = (reply.get("mount") or {}).get("layers") or []
    in_force = next((str(layer.get("path")) for layer in layers
                     if layer.get("origin") == "session"), "")
    if in_force and os.path.realpath(in_force) == os.path.realpath(policy):
        return
    raise UserError(f"branch {m.branch!r} is already mounted at {m.mountpoint} (daemon pid "
                    f"{m.pid}) with policy {in_force or (reply.get('mount') or {}).get('path')}"
                    "; a run shares that mount "
                    "and its policy, so drop --policy or unmount it first")


def release_view(store: Store, lease: ViewLease, ops: ViewOps | None = None) -> str | None:
    """Give up this run's share; the last user unmounts a run's mount unless kept.
    Returns a note for the user (a kept mount), or None."""
    if lease.lock_fd is None or lease.home is None:
        return None
    with _store_lock(store):
        try:
            fcntl.flock(lease.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            last = True
        except BlockingIOError:
            last = False
        os.close(lease.lock_fd)
        lease.lock_fd = None
        if not last:
            return None
        if (lease.home / "keep").exists():
            return (f"kept the mount at {lease.mountpoint} (daemon pid {lease.daemon_pid}); "
                    f"`agentfs umount {lease.mountpoint}` when done")
        (ops or LINUX_VIEW_OPS).stop(store, lease.mountpoint, lease.daemon_pid)
        _remove_sandbox_dir(lease.home, keep_view=False)
        return None


def _start_mount(store: Store, branch: str, view: Path, policy: str | None) -> int:
    return lifecycle.start_mount(store, branch, view, policy=policy)


def _unmount(store: Store, mountpoint: Path, pid: int) -> None:
    """Unmount and wait for the daemon; if that fails, detach lazily (the daemon then
    exits as soon as no sandbox uses the mount any more)."""
    if str(mountpoint) not in mounted_paths():
        return
    try:
        lifecycle.unmount(mountpoint, store)
        return
    except UserError as exc:
        log.warning("unmount of %s failed (%s); detaching it lazily", mountpoint, exc)
    res = subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                         text=True, timeout=60)
    if res.returncode != 0 and str(mountpoint) in mounted_paths():
        raise UserError(f"could not unmount {mountpoint}: {res.stderr.strip()}")
    deadline = time.monotonic() + LAZY_EXIT_TIMEOUT
    while time.monotonic() < deadline and running(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)



def _remove_sandbox_dir(path: Path, keep_view: bool) -> None:
    """Remove a sandbox directory entry by entry, never recursively: a mount below it
    (a view still in use) must never be walked into.  With *keep_view* only the root
    placeholder goes (the view, its lock and keep marker serve other runs)."""
    with contextlib.suppress(OSError):
        (path / "root").rmdir()
    if keep_view:
        return
    if any(linux.is_within(mp, str(path)) for mp in mounted_paths()):
        log.warning("%s still has a mount below it; left in place", path)
        return
    for name in ("users.lock", "keep"):
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    for sub in (path / "view", path):
        try:
            sub.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", sub, exc.strerror)


LINUX_VIEW_OPS = ViewOps(start=_start_mount, stop=_unmount)


def _sweep(store: Store, own_dir: Path, ops: ViewOps) -> None:
    """Clean up after runs that were killed: a sandbox directory whose run is gone and
    whose lease nobody holds goes, unmounting its view first unless it was kept."""
    live = {m.mountpoint: m.pid for m in store.mounts()}
    for entry in sorted((store.root / "run").glob("sandbox-*")):
        match = SANDBOX_DIR.fullmatch(entry.name)
        if entry == own_dir or match is None or not entry.is_dir() \
                or running(int(match.group(1))):
            continue
        lock = entry / "users.lock"
        if lock.exists():
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # other runs still use this mount
            finally:
                os.close(fd)
        kept = (entry / "keep").exists()
        view = entry / "view"
        if kept and str(view) in live:
            _remove_sandbox_dir(entry, keep_view=True)
            continue
        if str(view) in mounted_paths():
            try:
                ops.stop(store, view, live.get(str(view), 0))
            except UserError as exc:
                log.warning("could not clean up %s: %s", entry, exc)
                continue
        _remove_sandbox_dir(entry, keep_view=False)
