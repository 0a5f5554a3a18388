"""Starting and stopping mounts from the CLI: checks, readiness, clean unmount."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import select
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from agentfs import capabilities
from agentfs.branches.store import Store, load_registry, mounted_paths, require_utf8_path
from agentfs.errors import MountError, NotFoundError, UsageError, UserError
from agentfs.policy.approvals import controlling_terminal
from agentfs.policy.source import PolicySource
from agentfs.proc import running

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
DEAD_PROBE_TIMEOUT = 10.0
EXIT_TIMEOUT = 30.0


IMPLS = ("pyfuse3", "mfusepy", "kernel")  # kernel: FUSE spoken directly (mount/kernel)


PINNED_ONLY = ("mfusepy",)


def choose_impl(impl: str | None, per_process: bool = False) -> str:
    """The FUSE binding: as asked, else $AGENTFS_FUSE_IMPL, else on Linux the kernel
    front end (the fastest: a request costs it a quarter of what pyfuse3's trio loop
    costs, and only it lets the kernel cache directory listings) and mfusepy elsewhere
    (macOS FUSE-T has no low-level API).  Per-process views need inode-level routing,
    which mfusepy lacks, so they take the kernel front end (pyfuse3 when asked)."""
    linux = sys.platform.startswith("linux")
    chosen = impl or os.environ.get("AGENTFS_FUSE_IMPL") or ("kernel" if linux else "mfusepy")
    if per_process and not impl and linux and chosen in PINNED_ONLY:
        chosen = "kernel"
    if chosen not in IMPLS:
        raise UsageError(f"unknown FUSE front end {chosen!r} "
                        f"(choose {', '.join(IMPLS[:-1])} or {IMPLS[-1]})")
    return chosen


def check_fuse() -> None:
    """Fail with one clear line if this machine cannot mount FUSE filesystems (the
    line `agentfs doctor` shows for the missing piece)."""
    capabilities.require_fuse()


def check_mountpoint(mountpoint: Path, store: Store | None = None) -> str:
    """The mountpoint as an absolute path, once it is an empty directory with nothing
    mounted on it.  A dead FUSE mount there (its daemon was killed: every access says
    ENOTCONN) is unmounted and forgotten first."""
    require_utf8_path(mountpoint, "mountpoint")
    given = os.path.abspath(mountpoint)
    if given in mounted_paths() and not clean_dead_mount(given, store):
        raise MountError(f"mountpoint {given} is busy: something is already mounted there")
    try:
        st = os.stat(mountpoint)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        raise MountError(f"mountpoint {_short(given)} cannot be used: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    path = str(mountpoint.resolve())
    require_utf8_path(path, "mountpoint")
    if path in mounted_paths() and not clean_dead_mount(path, store):
        raise MountError(f"mountpoint {path} is busy: something is already mounted there")
    try:
        with os.scandir(path) as it:
            empty = next(it, None) is None
    except OSError as exc:
        raise MountError(f"mountpoint {path} cannot be listed: {exc.strerror}") from None
    if not empty:
        raise MountError(f"mountpoint {path} is not empty")
    return path


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def mount_type(path: str) -> str:
    """The filesystem type of the mount at *path* (the topmost), e.g. fuse.agentfs."""
    found = ""
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2:
                raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]),
                             fields[1])
                if os.fsdecode(raw) == path:
                    found = os.fsdecode(fields[2])
    return found


def is_dead_mount(path: str) -> bool:
    """*path* is mounted, but the filesystem there no longer answers: a FUSE mount
    whose daemon died ("Transport endpoint is not connected").  statfs always goes to
    the daemon (stat may be answered from the kernel's attribute cache); it runs in a
    thread, so a live daemon that is merely slow makes this False, not a hang."""
    if path not in mounted_paths() or not mount_type(path).startswith("fuse"):
        return False
    outcome: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            outcome.append(0)
        except OSError as exc:
            outcome.append(exc.errno or 0)

    thread = threading.Thread(target=probe, name="dead-mount-probe", daemon=True)
    thread.start()
    thread.join(DEAD_PROBE_TIMEOUT)
    return bool(outcome) and outcome[0] in (errno.ENOTCONN, errno.ECONNABORTED)


def clean_dead_mount(path: str, store: Store | None = None) -> bool:
    """If *path* is a dead mount: detach it (fusermount3 -uz, else umount -l), drop the
    mount rows that name it, and return True.  False if *path* is alive."""
    if not is_dead_mount(path):
        return False
    log.info("%s is a dead mount (its daemon is gone); detaching it", path)
    errors = []
    for cmd in (["fusermount3", "-uz", path], ["umount", "-l", path]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            errors.append(f"{cmd[0]} timed out")
            continue
        if path not in mounted_paths():
            break
        errors.append(res.stderr.strip() or f"{cmd[0]} failed")
    if path in mounted_paths():
        raise MountError(f"{path} is a dead mount that could not be detached: "
                         f"{'; '.join(errors) or 'no fusermount3 or umount'}")
    forget_mount(path, store)
    return True


def forget_mount(path: str, store: Store | None) -> None:
    """Remove the rows of a mount that is gone, in *store* and every registered store."""
    roots = {store.root} if store is not None else set()
    roots |= {Path(r) for r in load_registry().values()}
    for root in roots:
        if store is not None and root == store.root:
            store.remove_mount(path)
            continue
        with contextlib.suppress(UserError, OSError, sqlite3.Error, SQLAlchemyError):
            other = Store(root)
            try:
                other.remove_mount(path)
            finally:
                other.close()


def daemon_args(branch: str | None, per_process: bool, default_branch: str | None,
                deny_unbound: bool, debug: bool, policy: str | None = None,
                audit: bool = True, audit_strict: bool = False, impl: str | None = None,
                non_interactive: bool = False, queries_from_sessions: bool = False
                ) -> list[str]:
    args = ["--branch", branch] if branch else []
    if non_interactive:
        args.append("--non-interactive")
    if queries_from_sessions:
        args.append("--decision-queries-from-sessions")
    if controlling_terminal():  # the daemon has none: a person here can answer asks
        args.append("--terminal")
    args += ["--impl", choose_impl(impl, per_process)]
    if not audit:
        args.append("--no-audit")
    if audit_strict:
        args.append("--audit-strict")
    if policy:
        args += ["--policy", os.path.abspath(policy)]
    if per_process:
        args.append("--per-process")
    if default_branch:
        args += ["--default-branch", default_branch]
    if deny_unbound:
        args.append("--deny-unbound")
    if debug:
        args.append("--debug")
    return args


def check_mode(store: Store, branch: str | None, per_process: bool,
               default_branch: str | None, deny_unbound: bool) -> None:
    """The mode options make sense together, and the branches they name exist."""
    if per_process == (branch is not None):
        raise UsageError("give either --branch NAME (one branch) or --per-process")
    if not per_process and (default_branch or deny_unbound):
        raise UsageError("--default-branch and --deny-unbound need --per-process")
    if default_branch and deny_unbound:
        raise UsageError("--default-branch and --deny-unbound exclude each other")
    for name in filter(None, [branch, default_branch]):
        store.branch(name)  # unknown branch -> UserError before anything starts


def start_mount(store: Store, branch: str | None, mountpoint: Path, debug: bool = False,
                per_process: bool = False, default_branch: str | None = None,
                deny_unbound: bool = False, policy: str | None = None, audit: bool = True,
                audit_strict: bool = False, impl: str | None = None,
                non_interactive: bool = False, queries_from_sessions: bool = False) -> int:
    """Start a background daemon and return its pid once the mount is ready."""
    check_mode(store, branch, per_process, default_branch, deny_unbound)
    # a bad policy file (any layer) is the user's error, reported before mounting
    PolicySource.for_mount(str(store.base), policy)
    check_fuse()
    path = check_mountpoint(mountpoint, store)
    prune_logs(store.root / "run")
    log_path = store.root / "run" / f"mount-{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}.log"
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "agentfs.mount.daemon", "--store", str(store.root),
           "--mountpoint", path, "--ready-fd", str(w), "--log-path", str(log_path),
           *daemon_args(branch, per_process, default_branch, deny_unbound, debug, policy,
                         audit, audit_strict, impl, non_interactive, queries_from_sessions)]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, pass_fds=(w,),
                                start_new_session=True)
    os.close(w)
    try:
        message = _read_ready(r, proc)
    finally:
        os.close(r)
    if message != "OK":
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)
        reason = message[4:] if message.startswith("ERR ") else _tail(log_path)
        if message.startswith("ERR ") and not reason.startswith("could not mount"):
            raise UserError(reason)  # the daemon refused: a branch in use, a bad policy
        raise MountError(reason or f"mount failed (see {log_path})")
    return proc.pid


LOG_KEEP_DAYS = 14


def prune_logs(run_dir: Path, keep_days: float = LOG_KEEP_DAYS) -> None:
    """Daemon logs of mounts that ended more than *keep_days* ago go (a running
    daemon keeps writing to its log, so its mtime stays fresh)."""
    cutoff = time.time() - keep_days * 86400
    for log_file in run_dir.glob("mount-*.log"):
        with contextlib.suppress(OSError):
            if log_file.stat().st_mtime < cutoff:
                log_file.unlink()


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                break
        elif proc.poll() is not None:
            break
    else:
        return "ERR the mount did not become ready within 30 s"
    return buf.decode(errors="replace").strip()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syncfs(fd)
    finally:
        os.close(fd)


def find_mount_pid(mountpoint: str, store: Store | None) -> int | None:
    stores = [store] if store is not None else []
    if not stores:
        for root in set(load_registry().values()):
            with contextlib.suppress(UserError):
                stores.append(Store(Path(root)))
    for s in stores:
        for m in s.mounts(prune=False):
            if m.mountpoint == mountpoint:
                return m.pid
    return None


def unmount(mountpoint: Path, store: Store | None = None, lazy: bool = False) -> str:
    """Flush, unmount, and wait for the daemon to exit; a dead mount (its daemon was
    killed) is detached and forgotten.  Returns what was done, for the user."""
    path = os.path.abspath(mountpoint.expanduser())
    with contextlib.suppress(OSError):  # a dead mount cannot be resolved; keep it as given
        path = str(mountpoint.expanduser().resolve(strict=True))
    if path not in mounted_paths():
        forget_mount(path, store)  # a row left by a daemon that died after unmounting
        raise MountError(f"{path} is not mounted")
    fstype = mount_type(path)
    if not fstype.startswith("fuse"):
        raise MountError(f"could not unmount {path}: it is not a FUSE mount ({fstype}); "
                         "agentfs unmounts only FUSE mounts")
    if clean_dead_mount(path, store):
        return f"detached the dead mount at {path} (its daemon had died)"
    pid = find_mount_pid(path, store)
    with contextlib.suppress(OSError):
        _syncfs(path)
    if shutil.which("fusermount3") is None:
        raise MountError(capabilities.fusermount_message())
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        err = res.stderr.strip()
        if "busy" in err.lower():
            raise MountError(f"{path} is busy (a process is using it); close it or use "
                             "--lazy")
        raise MountError(f"could not unmount {path}: {err or 'fusermount3 failed'}")
    if pid is not None:
        _wait_exit(pid)
    return f"unmounted {path}"


def _wait_exit(pid: int) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        if not running(pid):
            return
        time.sleep(0.02)
    raise MountError(f"daemon {pid} did not exit within {EXIT_TIMEOUT:.0f} s after unmount")


def fork_branch(store: Store, name: str, from_branch: str | None) -> None:
    """Create *name*; if *from_branch* is mounted, each of its daemons pushes the parent's
    new top layer at this instant (after a syncfs, so data written before the fork is
    in the snapshot), so the fork is a consistent snapshot even of open files."""
    from agentfs.mount import control

    mounts = [m for m in store.mounts() if from_branch is not None and m.branch == from_branch]
    store.create_branch(name, from_branch, parent_live=bool(mounts))
    if not mounts:
        return
    assert from_branch is not None
    new_top = store.branch(from_branch).top_layer
    for m in mounts:
        with contextlib.suppress(OSError):
            _syncfs(m.mountpoint)
        reply = control.request(control.socket_path(store.root, m.pid),
                                {"op": "fork", "layer_id": new_top,
                                 "layer_dir": str(store.layer_dir(new_top))})
        if not reply.get("ok"):
            raise UserError(f"branch {name!r} was created, but the mount of {from_branch!r} "
                            f"at {m.mountpoint} did not switch layers: {reply.get('error')}; "
                            "remount it before writing more")
