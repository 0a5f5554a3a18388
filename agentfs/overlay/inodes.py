"""The overlay's inode table: inode number -> the names it is known by, and the
kernel's lookup count.

Front ends that speak inodes (pyfuse3) translate through this table; the engine
keeps it current on every rename/unlink, so a renamed directory's children keep
working.  An inode with no names but a live reference (an unlinked file still
open) is kept until the last reference goes, then the engine reaps it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Final

from agentfs.errors import FsError

ROOT_INO: Final = 1


@dataclass(slots=True)
class Node:
    paths: tuple[str, ...] = ()   # a tuple: one name costs 48 bytes, a list 88
    lookups: int = 0
    dead: bool = False  # its last name in the view went while the kernel held it


def _reused(node: Node, ino: int) -> bool:
    """A name is being given to *ino* while the kernel still holds it as a removed
    object: the number now belongs to a new one (the host reused it, or trash restore
    brought the object back).  A node that merely lost the one name the kernel knew
    while another hard link remains is not dead: announcing it anew would make the
    kernel discard its inode, and with it the writeback cache's unwritten data."""
    return node.dead and node.lookups > 0 and ino != ROOT_INO


class InodeTable:
    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_INO: Node(paths=("",), lookups=1)}
        # inode numbers the host reused while the kernel still held the dead object
        # (rmdir, then mkdir gets the freed number): the new object is announced with a
        # higher generation, or the kernel would take it for the dead one (ESTALE)
        self.generations: dict[int, int] = {}

    def path(self, ino: int) -> str:
        node = self.nodes.get(ino)
        if node is None or not node.paths:
            raise FsError(errno.ENOENT if node is None else errno.ESTALE)
        return node.paths[0]

    def paths_or_none(self, ino: int) -> tuple[str, ...] | None:
        """The names of *ino* (freshest first), or None: one dict read, safe without
        the engine lock."""
        node = self.nodes.get(ino)
        return None if node is None else node.paths

    def has_path(self, ino: int) -> bool:
        node = self.nodes.get(ino)
        return node is not None and bool(node.paths)

    def held(self, ino: int, path: str) -> bool:
        """Does the kernel hold *ino* under the name *path* (told of it, not forgotten,
        not removed since)?"""
        node = self.nodes.get(ino)
        return (node is not None and node.lookups > 0 and not node.dead
                and path in node.paths)

    def remember(self, ino: int, path: str, count: int = 1) -> int:
        """The kernel holds *count* more references to *ino*, now known as *path*;
        returns the generation to announce it with."""
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node()
        elif _reused(node, ino):
            self.generations[ino] = self.generations.get(ino, 0) + 1
            node.dead = False
        paths = node.paths
        if not paths or paths[0] != path:  # the freshest name first
            node.paths = (path, *(q for q in paths if q != path))
        node.lookups += count
        return self.generations.get(ino, 0) if self.generations else 0

    def generation(self, ino: int) -> int:
        """The generation *ino* is announced with (after `remember`)."""
        return self.generations.get(ino, 0) if self.generations else 0

    def next_generation(self, ino: int) -> int:
        """The generation `remember(ino, ...)` is about to give (for replies built
        before the reference is counted)."""
        node = self.nodes.get(ino)
        gen = self.generations.get(ino, 0) if self.generations else 0
        return gen + 1 if node is not None and _reused(node, ino) else gen

    def forget(self, ino: int, count: int) -> bool:
        """Drop *count* kernel references; True if the inode is gone from the table."""
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return False
        node.lookups -= count
        if node.lookups <= 0:
            del self.nodes[ino]
            self.generations.pop(ino, None)
            return True
        return False

    def referenced(self, ino: int) -> bool:
        return ino in self.nodes

    def unlinked(self, ino: int, path: str, last: bool = True) -> None:
        """*path* no longer names *ino*; *last*: nor does anything else in the view."""
        node = self.nodes.get(ino)
        if node is not None:
            node.paths = tuple(q for q in node.paths if q != path)
            node.dead = last

    def renamed_object(self, src: str, dst: str, src_ino: int, dst_ino: int,
                       exchange: bool, replaced_last: bool = True) -> None:
        """A non-directory *src_ino* moved from *src* to *dst*, over *dst_ino* (0:
        nothing; *replaced_last*: that was its only name), or exchanged with it: only
        those two nodes change."""
        if src_ino == dst_ino:
            return  # two names of one inode: the names are the same afterwards
        moved = self.nodes.get(src_ino)
        there = self.nodes.get(dst_ino) if dst_ino else None
        if moved is not None:
            moved.paths = tuple(dst if q == src else q for q in moved.paths
                                if exchange or q != dst)
        if there is not None:
            there.paths = (tuple(src if q == dst else q for q in there.paths) if exchange
                           else tuple(q for q in there.paths if q != dst))
            there.dead = not exchange and replaced_last

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
                    node.dead = True  # the replaced target (an empty directory) is gone
                    continue
                out.append(p)
            node.paths = tuple(out)
