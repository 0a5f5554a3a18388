"""Every name of a hard-linked file in a view, for checks that must not be dodged by
reaching a file through another of its names.

Built on first use by walking the view once (only files with more than one link are
kept), then kept current from the namespace operations the mount performs.  Entries
are hints: each is verified against the view (same inode) before it is returned, so a
stale one costs a lookup, never a wrong answer.

A hard link never crosses a filesystem, so the walk stays on the base's own device
(and the store's) plus the device of the file asked about, which the view's inode
number carries (agentfs/overlay/resolve.py).  Without that, a view of a whole root
(`agentfs run --full`) walked /proc (whose /proc/PID/root leads back to /), every
other mount, and FUSE mounts that may hang; exec of any hard-linked binary waited
on it.
"""

from __future__ import annotations

import logging
import stat
from typing import Final

from agentfs.errors import FsError
from agentfs.overlay.engine import Overlay
from agentfs.overlay.hostio import join

log = logging.getLogger(__name__)

WALK_LIMIT: Final = 2_000_000


def device_tag(ino: int) -> int:
    """Which host device a view inode number says its object is on (0: the base's)."""
    return (ino >> 44) & 0xFFFF


class LinkNames:
    def __init__(self, overlay: Overlay) -> None:
        self.ov = overlay
        self._names: dict[int, set[str]] | None = None
        self._walked: set[int] = set()  # device tags walked

    def names(self, path: str, ino: int) -> set[str]:
        """All current names of the object *ino* that *path* names (*path* included)."""
        tag = device_tag(ino)
        if self._names is None or tag not in self._walked:
            found = self._walk(tag)
            if self._names is None:
                self._names = found
            else:
                for key, names in found.items():
                    self._names.setdefault(key, set()).update(names)
            self._walked |= {0, tag}
        out = {path}
        candidates = self._names.get(ino, set())
        for other in list(candidates):
            if other == path:
                continue
            try:
                if self.ov.getattr(other).ino == ino:
                    out.add(other)
                    continue
            except FsError:
                pass
            candidates.discard(other)
        candidates.add(path)
        self._names[ino] = candidates
        return out

    def _walk(self, tag: int) -> dict[int, set[str]]:
        """Hard-linked files on the base's device and on device *tag*."""
        found: dict[int, set[str]] = {}
        todo = [""]
        seen = 0
        while todo and seen < WALK_LIMIT:
            directory = todo.pop()
            try:
                entries = self.ov.readdir(directory)
            except FsError:
                continue
            for name, attr in entries:
                seen += 1
                child = join(directory, name)
                if stat.S_ISDIR(attr.mode):
                    if device_tag(attr.ino) in (0, tag):
                        todo.append(child)
                elif attr.nlink > 1:
                    found.setdefault(attr.ino, set()).add(child)
        log.info("hard-link index: %d entries walked, %d linked files", seen, len(found))
        return found

    # -- keeping current -----------------------------------------------------------
    def linked(self, ino: int, path: str) -> None:
        if self._names is not None:
            self._names.setdefault(ino, set()).add(path)

    def renamed(self, src: str, dst: str) -> None:
        if self._names is None:
            return
        prefix = src + "/"
        for names in self._names.values():
            moved = {n for n in names if n == src or n.startswith(prefix)}
            if moved:
                names -= moved
                names |= {dst + n[len(src):] for n in moved}
