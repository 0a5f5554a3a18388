"""Path resolution through a layer stack, with whiteouts, opaque dirs and redirects.

``locate(k, path)`` answers "what does *path* show in the view made of layers
k..n" (n being the base).  For a directory it also returns where the directory's
lower part lives in view k+1 (``lower_path``): normally the same path, but a
renamed directory carries a ``redirect`` so its old lower content follows it.
Recursing on sub-views makes redirects in any layer compose without special cases.

Only layer 0 (the writable top) ever changes, so results for k >= 1 are cached
forever and results for k == 0 are invalidated by the engine on every change.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Final

from agentfs.overlay.hostio import HostDir, join, split
from agentfs.overlay.inodes import ROOT_INO
from agentfs.overlay.layers import STORE_INO_TAG, Layer

_CACHE_LIMIT: Final = 200_000


@dataclass(frozen=True, slots=True)
class Loc:
    """Where the visible object of one path lives."""

    kind: int                 # stat.S_IFMT of the visible object
    layer: int                # stack index holding the topmost object
    host: HostDir             # the layer's tree (or index, for hard-linked copy-ups)
    rel: str                  # path of the object inside *host*
    lower_ino: int = 0        # for lower regular files: the host st_ino (index key)
    lower_nlink: int = 1      # for lower regular files: link count in that layer
    own_rel: str | None = None    # dirs: rel in the view's own top layer, if any
    lower_path: str | None = None  # dirs: path of the lower part in view k+1
    parts: tuple[tuple[int, str], ...] = ()  # dirs: every (layer, rel) merged, top-down

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR


class Resolver:
    """Caches `Loc`s per (view, path)."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self._cache: list[dict[str, Loc | None]] = [{} for _ in layers]
        # the lstat the last computed Loc was made from (see `locate_fresh`)
        self._fresh: tuple[HostDir, str, os.stat_result] | None = None

    def locate_fresh(self, path: str) -> tuple[Loc | None, os.stat_result | None]:
        """`locate`, and the lstat of the visible object if this very call had to make
        one (a cached answer has none): the caller's attributes need no second lstat
        (a lookup used to make two of every new name)."""
        self._fresh = None
        loc = self.locate(path)
        fresh, self._fresh = self._fresh, None
        if loc is None or fresh is None or fresh[0] is not loc.host or fresh[1] != loc.rel:
            return loc, None
        return loc, fresh[2]

    def invalidate(self, path: str, subtree: bool = False) -> None:
        top = self._cache[0]
        top.pop(path, None)
        if subtree:
            prefix = path + "/"
            for key in [k for k in top if k.startswith(prefix)]:
                del top[key]

    def gone(self, path: str) -> None:
        """*path* shows nothing now (the engine just removed it): say so without an lstat."""
        top = self._cache[0]
        if len(top) < _CACHE_LIMIT:
            top[path] = None

    def invalidate_all(self) -> None:
        self._cache[0].clear()

    def locate(self, path: str, k: int = 0) -> Loc | None:
        cache = self._cache[k]
        try:
            return cache[path]
        except KeyError:
            pass
        loc = self._locate(path, k)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[path] = loc
        return loc

    def ino_of(self, path: str, loc: Loc, st: os.stat_result) -> int:
        """The overlay's inode number: base objects keep theirs, copied-up objects their
        origin's, objects born in a layer get the layer file's number, tagged."""
        if not path:
            return ROOT_INO
        layer = self.layers[loc.layer]
        if layer.is_base:
            if st.st_dev == self.layers[-1].tree.dev:
                return st.st_ino
            return ((st.st_dev & 0xFFFF) << 44 | st.st_ino) & ~STORE_INO_TAG or 2
        origin = layer.meta(loc.host, loc.rel, st).get("origin")
        return int(origin) if origin else STORE_INO_TAG | st.st_ino

    def lower_exists(self, path: str) -> bool:
        """Is *path* visible in the view below the top layer?"""
        if len(self.layers) == 1:
            return False
        parent_path, name = split(path)
        parent = self.locate(parent_path)
        if parent is None or parent.lower_path is None:
            return False
        return self.locate(join(parent.lower_path, name), 1) is not None

    def _locate(self, path: str, k: int) -> Loc | None:
        layer = self.layers[k]
        if layer.is_base:
            return self._locate_base(path, k)
        if not path:
            sub = self.locate("", k + 1)
            return Loc(stat.S_IFDIR, k, layer.tree, "", own_rel="", lower_path="",
                       parts=((k, ""),) + (sub.parts if sub else ()))
        parent_path, name = split(path)
        parent = self.locate(parent_path, k)
        if parent is None or not parent.is_dir:
            return None
        own: str | None = None
        st = None
        if parent.own_rel is not None:
            rel = join(parent.own_rel, name)
            st = layer.tree.try_lstat(rel)
            if st is not None:
                if layer.is_whiteout(rel, st):
                    return None
                own = rel
        lower_path = (None if parent.lower_path is None
                      else path if parent.lower_path == parent_path  # no redirect: one string
                      else join(parent.lower_path, name))
        if own is not None and st is not None:
            kind = stat.S_IFMT(st.st_mode)
            if kind != stat.S_IFDIR:
                self._fresh = (layer.tree, own, st)
                return Loc(kind, k, layer.tree, own)
            meta = layer.meta(layer.tree, own, st)
            if meta.get("opaque"):
                lower_path = None
            elif "redirect" in meta:
                lower_path = meta["redirect"]
            sub = self.locate(lower_path, k + 1) if lower_path is not None else None
            if sub is None or not sub.is_dir:
                return Loc(stat.S_IFDIR, k, layer.tree, own, own_rel=own, parts=((k, own),))
            return Loc(stat.S_IFDIR, k, layer.tree, own, own_rel=own, lower_path=lower_path,
                       parts=((k, own), *sub.parts))
        if lower_path is None:
            return None
        sub = self.locate(lower_path, k + 1)
        if sub is None:
            return None
        if sub.is_dir:
            return Loc(stat.S_IFDIR, sub.layer, sub.host, sub.rel, lower_path=lower_path,
                       parts=sub.parts)
        if sub.kind == stat.S_IFREG and sub.lower_nlink > 1 and sub.lower_ino in layer.indexed:
            assert layer.index is not None
            return Loc(stat.S_IFREG, k, layer.index, str(sub.lower_ino))
        return sub

    def _locate_base(self, path: str, k: int) -> Loc | None:
        if self.layers[k].hides(path):
            return None
        host = self.layers[k].tree
        st = host.try_lstat(path)
        if st is None:
            return None
        kind = stat.S_IFMT(st.st_mode)
        self._fresh = (host, path, st)
        if kind == stat.S_IFDIR:
            return Loc(kind, k, host, path, own_rel=path, parts=((k, path),))
        return Loc(kind, k, host, path, lower_ino=st.st_ino, lower_nlink=st.st_nlink)
