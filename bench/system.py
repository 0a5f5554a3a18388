"""Small OS helpers: bounded subprocesses, the mount table, page-cache dropping, watchdogs.

Everything here exists so that a misbehaving filesystem under test can cost the harness a
timeout, never a hang or a stale mount left behind on the machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


class CommandError(RuntimeError):
    """A subprocess failed; the message carries the tail of its output for the report."""


def _tail(text: str, lines: int = 6) -> str:
    """Keep only the end of a tool's output: that is where the actual error usually is."""
    parts = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(parts[-lines:])


def _short(argv: Sequence[str]) -> str:
    """Tool name and subcommand, for error messages that fit in a table footnote."""
    words = [os.path.basename(argv[0]), *argv[1:2]]
    return " ".join(w for w in words if not w.startswith("/"))


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    check: bool = True,
) -> int:
    """Run a command to completion with a hard timeout and return its exit status.

    Output goes to ``log`` (or a throwaway file) instead of a pipe: a tool that daemonizes
    and keeps our pipe open (a FUSE daemon) would otherwise make us wait on EOF forever.
    On timeout ``subprocess`` kills the child it started, and we raise.
    """
    argv = [os.fspath(c) for c in cmd]
    log_path = log if log is not None else Path(os.devnull)
    with open(log_path, "ab") as out:
        if log is not None:
            out.write(f"\n$ {' '.join(argv)}\n".encode())
            out.flush()
        offset = out.tell()
        try:
            proc = subprocess.run(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
        except OSError as exc:
            raise CommandError(f"cannot run {argv[0]}: {exc}") from exc
    if check and proc.returncode != 0:
        detail = ""
        if log is not None:
            with open(log, "rb") as fh:
                fh.seek(offset)
                detail = _tail(fh.read().decode(errors="replace"))
        raise CommandError(f"{_short(argv)} exited {proc.returncode}: {detail}")
    return proc.returncode


def run_quiet(cmd: Sequence[str], *, timeout: float = 10, pick: str | None = None) -> str | None:
    """Run a short informational command (``--version``) and return one line of it, or None.

    ``pick`` selects the first line containing it: FUSE tools print libfuse's and
    fusermount's versions around their own.
    """
    try:
        proc = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if pick is not None:
        lines = [ln for ln in lines if pick in ln]
    return lines[0] if lines else None


def timed_command(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    ok: Collection[int] = (0,),
) -> float:
    """Time one command whose stdout is discarded; an exit status outside ``ok`` is an
    error, not a sample (``grep`` exits 1 when nothing matched, which is a success)."""
    argv = [os.fspath(c) for c in cmd]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
    elapsed = time.perf_counter() - start
    if proc.returncode not in ok:
        err = _tail(proc.stderr.decode(errors="replace"), 3)
        raise CommandError(f"{_short(argv)} exited {proc.returncode}: {err}")
    return elapsed


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, reduced to what the harness needs."""

    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """Undo the octal escaping (``\\040`` for space) the kernel applies to mount paths."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mounts() -> list[MountEntry]:
    """Parse the mount table; used to detect readiness, fs types and leftovers."""
    entries: list[MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rest = right.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            entries.append(MountEntry(_unescape(fields[4]), rest[0], _unescape(rest[1])))
    return entries


def is_mounted(path: Path) -> bool:
    """Check the mount table rather than stat(): stat on a hung FUSE mount would block."""
    target = os.path.realpath(path)
    return any(m.mountpoint == target for m in mounts())


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (to refuse deleting through a live mount)."""
    base = os.path.realpath(path)
    return [
        m.mountpoint
        for m in mounts()
        if m.mountpoint == base or m.mountpoint.startswith(base.rstrip("/") + "/")
    ]


def fs_type(path: Path) -> str:
    """Filesystem type holding ``path`` (longest matching mount point wins)."""
    target = os.path.realpath(path)
    best, best_len = "unknown", -1
    for m in mounts():
        mp = m.mountpoint.rstrip("/") or "/"
        inside = target == mp or target.startswith(mp + "/") or mp == "/"
        if inside and len(mp) > best_len:
            best, best_len = m.fstype, len(mp)
    return best


def wait_for_mount(path: Path, *, timeout: float, alive: Callable[[], bool] | None = None) -> bool:
    """Poll until ``path`` shows up in the mount table, the daemon dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(path):
            return True
        if alive is not None and not alive():
            return is_mounted(path)
        time.sleep(0.05)
    return is_mounted(path)


def force_unmount(path: Path, *, fuse: bool) -> None:
    """Last-resort unmounting after the polite way failed: lazy detach so nothing stays."""
    if not is_mounted(path):
        return
    cmds: list[list[str]] = []
    if fuse:
        cmds += [["fusermount3", "-u", str(path)], ["fusermount3", "-uz", str(path)]]
    cmds += [["umount", str(path)], ["umount", "-l", str(path)]]
    for cmd in cmds:
        with contextlib.suppress(CommandError):
            run(cmd, timeout=30, check=False)
        if not is_mounted(path):
            return


def abort_mount(path: Path) -> None:
    """Unblock processes stuck on a hung FUSE mount.

    ``umount -f`` on a FUSE mount aborts the connection (fuse_umount_begin), which makes
    every pending request fail with ENOTCONN, so a blocked read() in this very process
    returns. It needs no fusectl mount, unlike writing to /sys/fs/fuse/connections/N/abort.
    """
    with contextlib.suppress(CommandError):
        run(["umount", "-f", str(path)], timeout=15, check=False)


class CacheDropper:
    """Drops the page, dentry and inode caches so a "cold" measurement reads from disk.

    Needs root; when that is not possible the harness reports cold rows as n/a instead of
    passing off warm numbers as cold ones.
    """

    def __init__(self) -> None:
        self.available = self._probe()

    @staticmethod
    def _probe() -> bool:
        try:
            with open(DROP_CACHES, "w") as fh:
                fh.write("3\n")
        except OSError:
            return False
        return True

    def drop(self) -> bool:
        """Sync dirty data first (dirty pages cannot be dropped), then drop; False if unable."""
        if not self.available:
            return False
        os.sync()
        try:
            with open(DROP_CACHES, "w") as fh:
                fh.write("3\n")
        except OSError:
            return False
        return True


class WatchdogExpired(TimeoutError):
    """A workload overran its budget and the mount under it was aborted."""


class Watchdog:
    """Bounds in-process file I/O, which (unlike a subprocess) has no timeout of its own.

    If the block overruns, ``on_expire`` runs from a timer thread (for FUSE targets: abort
    the connection), the blocked syscall fails, and leaving the block raises
    ``WatchdogExpired`` so the run records a timeout rather than a misleading I/O error.
    """

    def __init__(self, timeout: float, on_expire: Callable[[], None]) -> None:
        self.timeout = timeout
        self.on_expire = on_expire
        self.fired = False
        self._timer: threading.Timer | None = None

    def _fire(self) -> None:
        self.fired = True
        self.on_expire()

    def __enter__(self) -> Watchdog:
        self._timer = threading.Timer(self.timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        if self.fired and (exc_type is None or issubclass(exc_type, Exception)):
            raise WatchdogExpired(f"no progress within {self.timeout:.0f}s; mount aborted") from exc
