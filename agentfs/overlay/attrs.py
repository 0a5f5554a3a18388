"""Attributes as the overlay reports them (its own inode numbers, merged nlink)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Attr:
    """A stat result with the overlay's inode number; what front ends reply with."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, ino: int, st: os.stat_result, nlink: int | None = None) -> Attr:
        return cls(ino=ino, mode=st.st_mode, nlink=st.st_nlink if nlink is None else nlink,
                   uid=st.st_uid, gid=st.st_gid, rdev=st.st_rdev, size=st.st_size,
                   blocks=st.st_blocks, blksize=st.st_blksize, atime_ns=st.st_atime_ns,
                   mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)
