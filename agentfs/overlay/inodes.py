"""The overlay's inode table: inode number -> the names it is known by, and the
kernel's lookup count.

Front ends that speak inodes (pyfuse3) translate through this table; the engine
keeps it current on every rename/unlink, so a renamed directory's children keep
working.  An inode with no names but a live reference (an unlinked file still
open) is kept until the last reference goes, then the engine reaps it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Final

from agentfs.errors import FsError

ROOT_INO: Final = 1


@dataclass(slots=True)
class Node:
    paths: list[str] = field(default_factory=list)
    lookups: int = 0


class InodeTable:
    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_INO: Node(paths=[""], lookups=1)}

    def path(self, ino: int) -> str:
        node = self.nodes.get(ino)
        if node is None or not node.paths:
            raise FsError(errno.ENOENT if node is None else errno.ESTALE)
        return node.paths[0]

    def has_path(self, ino: int) -> bool:
        node = self.nodes.get(ino)
        return node is not None and bool(node.paths)

    def remember(self, ino: int, path: str, count: int = 1) -> None:
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node()
        if path in node.paths:
            node.paths.remove(path)
        node.paths.insert(0, path)  # the freshest name first
        node.lookups += count

    def forget(self, ino: int, count: int) -> bool:
        """Drop *count* kernel references; True if the inode is gone from the table."""
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return False
        node.lookups -= count
        if node.lookups <= 0:
            del self.nodes[ino]
            return True
        return False

    def referenced(self, ino: int) -> bool:
        return ino in self.nodes

    def unlinked(self, ino: int, path: str) -> None:
        node = self.nodes.get(ino)
        if node is not None and path in node.paths:
            node.paths.remove(path)

    def renamed(self, src: str, dst: str, exchange: bool = False) -> None:
        """Rewrite every known name under *src* to live under *dst* (and back, for exchange)."""
        src_pre, dst_pre = src + "/", dst + "/"
        for node in self.nodes.values():
            out = []
            for p in node.paths:
                if p == src:
                    p = dst
                elif p.startswith(src_pre):
                    p = dst_pre + p[len(src_pre):]
                elif exchange and p == dst:
                    p = src
                elif exchange and p.startswith(dst_pre):
                    p = src_pre + p[len(dst_pre):]
                elif not exchange and (p == dst or p.startswith(dst_pre)):
                    continue  # the replaced target lost this name
                out.append(p)
            node.paths = out
