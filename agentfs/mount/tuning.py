"""Kernel settings of a FUSE mount that no mount option reaches.

Readahead: the kernel sizes a FUSE mount's readahead window by its backing-device
default (128 KiB), whatever max_pages allows, so a sequential read of a large file
arrives as one READ request per 128 KiB.  Root can raise the window in sysfs
(`/sys/class/bdi/MAJ:MIN/read_ahead_kb`); with 1 MiB requests a cold read of a base
file costs an eighth of the round trips.  The device number comes from
/proc/self/mountinfo, because a stat of the mountpoint would itself be a FUSE request
to the daemon that is asking.
"""

from __future__ import annotations

import logging
import os
from typing import Final

log = logging.getLogger(__name__)

READAHEAD_KIB: Final = 1024


def mount_device(mountpoint: str) -> str | None:
    """'MAJ:MIN' of the filesystem mounted at *mountpoint* (the last one mounted there)."""
    head, tail = os.path.split(os.path.abspath(mountpoint))
    target = os.path.join(os.path.realpath(head), tail)  # never stat the mount itself
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    found = fields[2]
    except OSError:
        return None
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def raise_readahead(mountpoint: str, kib: int = READAHEAD_KIB) -> bool:
    """Set the mount's readahead window to *kib* (only ever raised; needs root).
    False, with the reason logged at debug level, where it could not be done."""
    device = mount_device(mountpoint)
    if device is None:
        log.debug("readahead: %s not found in mountinfo", mountpoint)
        return False
    knob = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(knob, "r+", encoding="ascii") as fh:
            if int(fh.read().strip() or 0) >= kib:
                return True
            fh.seek(0)
            fh.write(f"{kib}\n")
    except (OSError, ValueError) as exc:
        log.debug("readahead of %s left as it is: %s", mountpoint, exc)
        return False
    log.debug("readahead of %s (%s) set to %d KiB", mountpoint, device, kib)
    return True


M_ARENA_MAX: Final = -8   # glibc mallopt parameter (malloc.h)
MALLOC_ARENAS: Final = 2


def limit_malloc_arenas() -> None:
    """glibc gives every thread that allocates its own malloc arena (up to 8 per
    core); with the request loop on 8 threads each arena keeps its own free memory,
    which made the daemon 13 MB larger after a 100,000-file walk than on one thread
    (bench.store rss: 160 against 147 MB).  Two arenas are plenty for threads that
    mostly wait on the engine lock.  A no-op without glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        if libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS) != 1:
            log.debug("mallopt(M_ARENA_MAX) refused")
    except (OSError, AttributeError):
        log.debug("no mallopt here")
