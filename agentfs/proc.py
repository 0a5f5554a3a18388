"""Facts about processes from /proc (Linux): parents, start times, exe, signals."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Final

_MAX_ANCESTORS: Final = 64


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].decode(errors="replace").split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22: starttime


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields and len(fields) > 1 else None  # field 4: ppid


def thread_group(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    return pid


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def exe_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def comm_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode(errors="replace")
    except OSError:
        return ""


def environ_of(pid: int) -> tuple[tuple[str, str], ...]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return ()
    out = []
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out.append((key.decode(errors="replace"), value.decode(errors="replace")))
    return tuple(out)


def ancestors_of(pid: int) -> tuple[str, ...]:
    """exe paths of the parents, nearest first (up to init)."""
    out: list[str] = []
    cur = parent_pid(pid)
    while cur is not None and cur > 0 and len(out) < _MAX_ANCESTORS:
        out.append(exe_of(cur))
        if cur == 1:
            break
        cur = parent_pid(cur)
    return tuple(out)


def interrupted(tid: int) -> bool:
    """Has the thread behind a waiting request got a signal it does not block?

    The kernel keeps such a thread in the FUSE wait and sends FUSE_INTERRUPT, which
    pyfuse3 does not pass on; the pending signal itself is visible in /proc."""
    pending = blocked = 0
    with contextlib.suppress(OSError), open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith((b"SigPnd:", b"ShdPnd:")):
                pending |= int(line.split()[1], 16)
            elif line.startswith(b"SigBlk:"):
                blocked = int(line.split()[1], 16)
        return bool(pending & ~blocked)
    return True  # the thread is gone: nobody is waiting any more


def running(pid: int) -> bool:
    """Is *pid* a live process?  A zombie is not: its parent (often init, which may be
    slow to reap) only has to collect its status.  Without /proc (macOS): kill(0)."""
    if pid <= 0:
        return False
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] not in ("Z", "X")


class ProcNames:
    """exe and command line per pid, kept for *fresh* seconds (audit events name the
    caller of every request; reading /proc for each would cost more than the event),
    at most 4,096 pids at a time."""

    def __init__(self, fresh: float = 2.0) -> None:
        self.fresh = fresh
        self._seen: dict[int, tuple[float, str, str]] = {}

    def get(self, pid: int) -> tuple[str, str]:
        now = time.monotonic()
        hit = self._seen.get(pid)
        if hit is None or now - hit[0] > self.fresh:
            if len(self._seen) > 4096:
                self._seen.clear()
            hit = self._seen[pid] = (now, exe_of(pid), command_line(pid)) if pid > 0 \
                else (now, "", "")
        return hit[1], hit[2]
