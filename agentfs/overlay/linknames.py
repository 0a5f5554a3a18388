"""Every name of a hard-linked file in a view, for checks that must not be dodged by
reaching a file through another of its names.

Built on first use by walking the view once (only files with more than one link are
kept), then kept current from the namespace operations the mount performs.  Entries
are hints: each is verified against the view (same inode) before it is returned, so a
stale one costs a lookup, never a wrong answer.
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


class LinkNames:
    def __init__(self, overlay: Overlay) -> None:
        self.ov = overlay
        self._names: dict[int, set[str]] | None = None

    def names(self, path: str, ino: int) -> set[str]:
        """All current names of the object *ino* that *path* names (*path* included)."""
        if self._names is None:
            self._names = self._walk()
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

    def _walk(self) -> dict[int, set[str]]:
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
