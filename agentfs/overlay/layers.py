"""Layers: the base directory and the store's copy-on-write layer directories.

A store layer is a directory with these children on one filesystem:

* ``tree/``  a mirror of the paths changed in the layer (real files and dirs);
* ``index/`` copies of hard-linked lower files, named by their overlay inode, so
  every name of a hard-linked file sees the one copied-up inode;
* ``work/``  staging for copy-up and whiteouts (renamed into ``tree`` when
  complete, so a crash never exposes a half-written object) and orphans
  (unlinked files that are still open);
* ``stamps`` the commit evidence of the layer's whiteouts (`agentfs.overlay.stamps`).

What a plain directory cannot say is kept in one xattr per object, ``user.agentfs``
(JSON): ``wh`` (a whiteout: an empty mode-000 file that hides lower names; the
whiteouts of a work area are names of one inode, their commit evidence is in the
layer's ``stamps`` log, see `agentfs.overlay.stamps`),
``opaque`` (a directory that hides everything below it), ``redirect`` (a renamed
directory whose lower content lives at another path), ``origin`` (the overlay
inode the object was copied up from) and ``lower_only`` (index entries: names of
the inode still served from lower layers).  Markers live on the objects, so a
rename(2) moves them atomically with their directory; nothing has to be rewritten.
The base directory is plain user data: it has no markers and is never written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Final

from agentfs.overlay.hostio import HostDir
from agentfs.overlay.stamps import StampLog

MARKER: Final = "user.agentfs"
WHITEOUT_MODE: Final = stat.S_IFREG  # a regular file with no permission bits
STORE_INO_TAG: Final = 1 << 62       # keeps layer-born inode numbers apart from base ones
STAMP_PATH_MAX: Final = 1024  # bytes of a path kept as it is in a stamp
# one encoder for every marker: json.dumps with separators builds a new one per call
# (about a quarter of a marker write's cost, on every copy-up)
encode_marker: Final = json.JSONEncoder(separators=(",", ":")).encode


def stamp_path(path: str) -> str:
    """How a commit-evidence stamp ("bst"/"rst": [size, mtime_ns, path]) names its
    path: a long one by its hash, so the marker xattr fits (ext4 holds one block of
    xattrs; a path near PATH_MAX made every create and copy-up there fail ENOSPC)."""
    raw = os.fsencode(path)
    if len(raw) <= STAMP_PATH_MAX:
        return path
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclass
class Layer:
    """One element of a branch's stack; index 0 is the writable top."""

    layer_id: int
    tree: HostDir
    is_base: bool
    index: HostDir | None = None
    work: HostDir | None = None
    stamps: StampLog | None = None  # the whiteouts' commit evidence (store layers)
    # overlay ino -> index file name, for the (rare) hard-linked copy-ups
    indexed: set[int] = field(default_factory=set)
    _meta: dict[int, dict[str, Any]] = field(default_factory=dict)
    # base only: paths (relative to the base) the view must not show, and the names of
    # their first components, which are all a lookup has to test most of the time
    hidden: frozenset[str] = frozenset()
    _hidden_heads: frozenset[str] = frozenset()

    @classmethod
    def open_base(cls, path: str, hidden: frozenset[str] = frozenset()) -> Layer:
        """*hidden*: for a base that contains agentfs itself (a whole-root view), the
        store and agentfs' home, which the view must never show."""
        return cls(layer_id=0, tree=HostDir(path), is_base=True, hidden=hidden,
                   _hidden_heads=frozenset(h.split("/", 1)[0] for h in hidden))

    def hides(self, path: str) -> bool:
        if not self.hidden or path.split("/", 1)[0] not in self._hidden_heads:
            return False
        return any(path == h or path.startswith(h + "/") for h in self.hidden)

    @classmethod
    def open_store_layer(cls, layer_id: int, path: str) -> Layer:
        for sub in ("tree", "index", "work"):
            os.makedirs(os.path.join(path, sub), mode=0o755, exist_ok=True)
        index = HostDir(os.path.join(path, "index"))
        layer = cls(layer_id=layer_id, tree=HostDir(os.path.join(path, "tree")), is_base=False,
                    index=index, work=HostDir(os.path.join(path, "work")),
                    stamps=StampLog(os.path.join(path, "stamps")))
        layer.indexed = {int(e.name) for e in index.listdir("") if e.name.isdigit()}
        return layer

    def close(self) -> None:
        for host in (self.tree, self.index, self.work):
            if host is not None:
                host.close()
        if self.stamps is not None:
            self.stamps.close()

    # -- markers -------------------------------------------------------
    def meta(self, host: HostDir, rel: str, st: os.stat_result) -> dict[str, Any]:
        """The marker dict of a store object (cached by host inode)."""
        if self.is_base or stat.S_ISLNK(st.st_mode):
            return {}
        cached = self._meta.get(st.st_ino)
        if cached is not None:
            return cached
        raw = host.try_getxattr(rel, MARKER)
        meta: dict[str, Any] = json.loads(raw) if raw else {}
        self._meta[st.st_ino] = meta
        return meta

    def set_meta(self, host: HostDir, rel: str, meta: dict[str, Any]) -> None:
        st = host.lstat(rel)
        if meta:
            host.setxattr(rel, MARKER, encode_marker(meta).encode())
        else:
            try:
                host.removexattr(rel, MARKER)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        self._meta[st.st_ino] = dict(meta)

    def set_meta_fd(self, fd: int, st: os.stat_result, meta: dict[str, Any]) -> None:
        """set_meta through an open fd (no path walk), for freshly created files."""
        os.setxattr(fd, MARKER, encode_marker(meta).encode())
        self._meta[st.st_ino] = dict(meta)

    def drop_meta(self, host_ino: int) -> None:
        self._meta.pop(host_ino, None)

    def whiteout_stamp(self, rel: str, st: os.stat_result) -> list[Any] | None:
        """The commit evidence of the whiteout at tree *rel* (*st*: its lstat): on its
        own marker (whiteouts made before they shared an inode) or in the stamp log."""
        stamp = self.meta(self.tree, rel, st).get("bst")
        if stamp is None and self.stamps is not None:
            stamp = self.stamps.get(stamp_path(rel))
        return stamp

    def record_stamp(self, rel: str, stamp: list[Any] | None) -> None:
        """Keep *stamp* for the whiteout about to be made at tree *rel*."""
        assert self.stamps is not None
        self.stamps.record(stamp_path(rel), stamp)

    def is_whiteout(self, rel: str, st: os.stat_result) -> bool:
        if self.is_base or st.st_mode != WHITEOUT_MODE or st.st_size != 0:
            return False
        return bool(self.meta(self.tree, rel, st).get("wh"))
