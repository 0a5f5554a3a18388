"""The copy-on-write overlay engine: every filesystem operation, by path.

The engine knows nothing about FUSE.  Front ends call these methods and turn
`FsError` into an errno reply.  Paths are '/'-separated, relative to the view's
root ('' is the root), with names as str (os.fsdecode, so odd bytes survive).

Layers: ``layers[0]`` is the branch's writable top, the last one is the base.
Only the top is ever written.  The top tree mirrors overlay paths one to one
(redirects only change where *lower* content is found), so the top rel of any
path is the path itself.

Concurrency: not thread-safe.  pyfuse3 runs handlers on one trio thread; the
mfusepy front end holds a lock around each call.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from agentfs.errors import FsError
from agentfs.overlay import copyup
from agentfs.overlay.attrs import Attr
from agentfs.overlay.hostio import RENAME_EXCHANGE, RENAME_NOREPLACE, HostDir, join, split
from agentfs.overlay.inodes import InodeTable
from agentfs.overlay.layers import MARKER, STORE_INO_TAG, Layer, stamp_path
from agentfs.overlay.reaper import Reaper
from agentfs.overlay.resolve import Loc, Resolver

log = logging.getLogger(__name__)

NAME_MAX: Final = 255
_ACCMODE: Final = os.O_RDONLY | os.O_WRONLY | os.O_RDWR
_ORPHANS: Final = "orphans"
ABSENT: Final = -1  # a stamp's size and mtime when the base had nothing at the path


@dataclass(slots=True)
class Handle:
    """An open file: a host fd that is re-pointed when its file is copied up."""

    ino: int
    fd: int
    flags: int
    on_top: bool


class TrashHook(Protocol):
    """Where content goes instead of being destroyed (implemented by agentfs.trash).

    *held*: the branch's own copy of *path*, about to be destroyed: `take` moves it
    (or, with link=True, hard-links it, when the name is about to be replaced in one
    atomic rename).  *hidden*: content below the top layer, now covered by a whiteout.
    *kept_open*: a deleted file that is still open lives on as an orphan; it is linked
    into the trash at once and `closed` is told when the last handle goes."""

    def take(self, path: str, host: HostDir, rel: str, st: os.stat_result, reason: str,
             link: bool = False) -> None: ...

    def hidden(self, path: str, layer: Layer, host: HostDir, rel: str, reason: str,
               st: os.stat_result | None = None) -> None: ...

    def kept_open(self, path: str, ino: int, host: HostDir, rel: str, st: os.stat_result,
                  reason: str) -> None: ...

    def closed(self, ino: int) -> None: ...

    def dir_removed(self, path: str, layer: Layer, host: HostDir, rel: str,
                    reason: str) -> None: ...

    def copied(self, path: str, host: HostDir, rel: str, reason: str) -> None: ...


class Overlay:
    """A merged, copy-on-write view of a layer stack."""

    def __init__(self, layers: list[Layer]) -> None:
        if layers[0].is_base or layers[0].work is None:
            raise ValueError("the top layer must be a writable store layer")
        self.layers = layers
        self.top = layers[0]
        self.tree: HostDir = layers[0].tree
        self.work: HostDir = layers[0].work
        self.resolver = Resolver(layers)
        self.inodes = InodeTable()
        self.handles: dict[int, Handle] = {}
        self._by_ino: dict[int, set[int]] = {}
        self._fh = itertools.count(1)
        self._orphans: dict[int, str] = {}
        self._dir_nlink: dict[str, int] = {}
        self._frozen_attrs: dict[str | tuple[str, int, str], bytes] = {}  # Attr.packed()
        self._base_tree = layers[-1].tree
        self._listings: dict[str, dict[str, None]] = {}  # dir path -> visible names
        self.trash: TrashHook | None = None   # None: deleted content is destroyed
        self.lock_fd: int | None = None       # the branch lock of whoever serves it
        self._reason = "unlink"
        self._kept_fd: int | None = None  # see _copy_up(keep=True)
        self._kept_st: os.stat_result | None = None  # the copy's lstat, if _copy_up made one
        self._reapers: list[Reaper] = []  # one per work area this view has had
        self._prepare_work()

    def _prepare_work(self) -> None:
        """Clear staging left by a crash; nothing in work/ is ever visible."""
        for entry in self.work.listdir(""):
            self.work.remove_tree(entry.name)
        self.work.mkdir(_ORPHANS, 0o700)
        self._shared_whiteout: str | None = None  # see _link_whiteout
        self._reapers.append(Reaper(self.work.dirfd(_ORPHANS)))

    def _discard(self, host: HostDir, rel: str) -> None:
        """Remove a directory the view no longer shows (whiteouts at most inside) off
        the request path: moved into work/orphans if it is not there yet, then left
        to the reaper (see agentfs.overlay.reaper)."""
        if host is self.work and rel.startswith(_ORPHANS + "/"):
            name = rel[len(_ORPHANS) + 1:]
        else:
            name = f"gone.{copyup.temp_name()}"
            host.rename_to(rel, self.work, f"{_ORPHANS}/{name}")
        self._reapers[-1].discard(name)

    def close(self) -> None:
        """Release every handle and host fd (the view is unusable afterwards)."""
        for fh in list(self.handles):
            self.release(fh)
        self._drop_shared_whiteout()
        for reaper in self._reapers:
            reaper.close()
        for layer in self.layers:
            layer.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    # ------------------------------------------------------------------ lookup
    def _locate(self, path: str) -> Loc:
        loc = self.resolver.locate(path)
        if loc is None:
            raise FsError(self._missing_errno(path), path)
        return loc

    def _invalidate(self, path: str, subtree: bool = False, dirs: bool = True,
                    exists: bool | None = None) -> None:
        """Forget cached lookups of *path* after a change.  The parent's cached listing
        is brought up to date rather than dropped (`rm -rf` would otherwise list a
        directory again after every unlink, to count its subdirectories); its link
        count is dropped unless the caller knows no directory came or went (*dirs*).
        *exists*: whether *path* shows something now, if the caller knows (no lstat)."""
        self.resolver.invalidate(path, subtree)
        if subtree:
            self._dir_nlink.clear()
            self._listings.clear()
            return
        parent, name = split(path)
        if dirs:
            self._dir_nlink.pop(parent, None)
        listing = self._listings.get(parent)
        if listing is not None:
            if exists if exists is not None else self.resolver.locate(path) is not None:
                listing.setdefault(name, None)
            else:
                listing.pop(name, None)

    def _invalidate_all(self) -> None:
        self.resolver.invalidate_all()
        self._dir_nlink.clear()
        self._listings.clear()

    def _merged_nlink(self, path: str) -> int:
        """2 + subdirectories, as a plain directory reports (find(1) relies on it)."""
        n = self._dir_nlink.get(path)
        if n is None:
            n = 2 + sum(1 for name in self.listdir(path)
                        if (c := self.resolver.locate(join(path, name))) and c.is_dir)
            self._dir_nlink[path] = n
        return n

    def _parent_times_kept(self, path: str) -> contextlib.AbstractContextManager[None]:
        """Copy-up adds an entry to the top copy of the parent; that is not a change
        the user made, so the parent's times must not move."""
        return _dir_times_kept(self.tree, split(path)[0])

    def _missing_errno(self, path: str) -> int:
        """ENOTDIR when a component on the way is not a directory, else ENOENT."""
        parent = split(path)[0]
        while parent:
            ploc = self.resolver.locate(parent)
            if ploc is not None:
                return errno.ENOENT if ploc.is_dir else errno.ENOTDIR
            parent = split(parent)[0]
        return errno.ENOENT

    def _ino(self, path: str, loc: Loc, st: os.stat_result) -> int:
        return self.resolver.ino_of(path, loc, st)

    def _attr(self, path: str, loc: Loc, st: os.stat_result | None = None) -> Attr:
        """Attributes of *path*; objects in frozen layers or the base never change, so
        theirs are remembered (git status stats every file through readdirplus).
        *st*: the object's lstat, taken just now by the caller."""
        if loc.layer == 0:
            return self._attr_uncached(path, loc, st)
        # a base object at its own path is keyed by the path alone (no tuple per key)
        key: str | tuple[str, int, str] = (
            path if loc.host is self._base_tree and loc.rel == path
            else (path, id(loc.host), loc.rel))
        packed = self._frozen_attrs.get(key)
        if packed is not None:
            return Attr.unpacked(packed)
        if len(self._frozen_attrs) > 200_000:
            self._frozen_attrs.clear()
        attr = self._attr_uncached(path, loc, st)
        self._frozen_attrs[key] = attr.packed()
        return attr

    def _attr_uncached(self, path: str, loc: Loc, st: os.stat_result | None = None) -> Attr:
        if st is None:
            st = loc.host.lstat(loc.rel)
        ino = self._ino(path, loc, st)
        nlink = None
        if loc.is_dir and len(loc.parts) > 1:
            nlink = self._merged_nlink(path)
        elif loc.kind == stat.S_IFREG and not self.layers[loc.layer].is_base:
            layer = self.layers[loc.layer]
            if ino in layer.indexed:
                lower_only = int(layer.meta(loc.host, loc.rel, st).get("lower_only", 0))
                nlink = st.st_nlink - 1 + lower_only
        return Attr.from_stat(ino, st, nlink)

    def getattr(self, path: str) -> Attr:
        loc, st = self.resolver.locate_fresh(path)
        if loc is None:
            raise FsError(self._missing_errno(path), path)
        return self._attr(path, loc, st)

    def lookup(self, path: str) -> Attr:
        """getattr that also counts a kernel reference to the inode."""
        attr = self.lookup_or_none(path)
        if attr is None:  # lookup_or_none raised any other errno itself
            raise FsError(errno.ENOENT, path)
        return attr

    def lookup_or_none(self, path: str) -> Attr | None:
        """`lookup`, with None for ENOENT: most lookups of a missing name (every new file
        of an untar) are answered by the parent's cached listing, without a system call
        or an exception."""
        _check_name(path)
        parent, name = split(path)
        listing = self._listings.get(parent)
        if listing is not None and name not in listing:
            return None
        loc, st = self.resolver.locate_fresh(path)
        if loc is None:
            code = self._missing_errno(path)
            if code != errno.ENOENT:
                raise FsError(code, path)
            return None
        attr = self._attr(path, loc, st)
        self.inodes.remember(attr.ino, path)
        return attr

    def forget(self, ino: int, count: int) -> None:
        if self.inodes.forget(ino, count):
            self._reap(ino)

    def getattr_ino(self, ino: int) -> Attr:
        if self.inodes.has_path(ino):
            return self.getattr(self.inodes.path(ino))
        for fh in self._by_ino.get(ino, ()):
            st = os.fstat(self.handles[fh].fd)
            return Attr.from_stat(ino, st, nlink=0)
        orphan = self._orphans.get(ino)  # removed, still held by the kernel (fstat)
        kept = self.work.try_lstat(orphan) if orphan is not None else None
        if kept is not None:
            return Attr.from_stat(ino, kept, nlink=0)
        raise FsError(errno.ENOENT)

    def exists(self, path: str) -> bool:
        return self.resolver.locate(path) is not None

    def readlink(self, path: str) -> str:
        loc = self._locate(path)
        if loc.kind != stat.S_IFLNK:
            raise FsError(errno.EINVAL)
        return loc.host.readlink(loc.rel)

    def listdir(self, path: str) -> list[str]:
        """Names visible in directory *path* (top layer first, then lower layers).
        Cached until something in the directory changes (only this engine writes)."""
        cached = self._listings.get(path)
        if cached is not None:
            return list(cached)
        loc = self._locate(path)
        if not loc.is_dir:
            raise FsError(errno.ENOTDIR)
        names = self._list_uncached(path, loc)
        if len(self._listings) > 10_000:
            self._listings.clear()
        self._listings[path] = dict.fromkeys(names)
        return names

    def _list_uncached(self, path: str, loc: Loc) -> list[str]:
        seen: dict[str, None] = {}
        for layer_idx, rel in loc.parts:
            host = self.layers[layer_idx].tree
            try:
                entries = host.listdir(rel)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                raise
            for entry in entries:
                seen.setdefault(entry.name, None)
        names = []
        locate_fresh = self.resolver.locate_fresh
        for name in seen:
            child = join(path, name)
            cloc, st = locate_fresh(child)
            if cloc is None:
                continue
            names.append(name)
            if st is not None and cloc.layer != 0 and len(cloc.parts) <= 1:
                # a lower object's attributes never change: keep them from the lstat
                # just made (readdir and readdirplus ask for every entry's next; not a
                # merged directory's, whose link count would list it)
                self._attr(child, cloc, st)
        return names

    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        out = []
        for name in self.listdir(path):
            child = join(path, name)
            loc = self.resolver.locate(child)
            if loc is not None:
                out.append((name, self._attr(child, loc)))
        return out

    # ------------------------------------------------------------- copy-up
    def _ensure_dir_on_top(self, path: str) -> None:
        """Make directory *path* exist in the top tree (metadata copy, no children)."""
        loc = self._locate(path)
        if not loc.is_dir:
            raise FsError(errno.ENOTDIR)
        if loc.own_rel is not None:
            return
        parent, _ = split(path)
        self._ensure_dir_on_top(parent)
        st = loc.host.lstat(loc.rel)
        ino = self._ino(path, loc, st)
        with self._parent_times_kept(path):
            self.tree.mkdir(path, 0o700)
            copyup.copy_metadata(loc.host, loc.rel, st, self.tree, path)
            self.top.set_meta(self.tree, path, {"origin": ino})
        self._invalidate(path)

    def _copy_up(self, path: str, with_data: bool = True, keep: bool = False) -> Loc:
        """Bring a non-directory into the top layer; returns its new location.  *keep*:
        a regular file's copy stays open (read-write) as `_kept_fd`, for the caller to
        take over (a copy-up for a writer: the handle needs no open of its own), and
        the copy's lstat after the rename as `_kept_st` (None if it made none)."""
        self._kept_st = None
        loc = self._locate(path)
        if loc.layer == 0:
            return loc
        if loc.is_dir:
            self._ensure_dir_on_top(path)
            return self._locate(path)
        parent, _ = split(path)
        self._ensure_dir_on_top(parent)
        st = loc.host.lstat(loc.rel)
        ino = self._ino(path, loc, st)
        stamp = self.base_stamp(loc, path, st)
        tmp = copyup.temp_name()
        meta: dict[str, Any] = {"origin": ino}
        if stamp:
            meta["bst"] = stamp
        indexed = loc.kind == stat.S_IFREG and loc.lower_nlink > 1
        if indexed:  # every name of a hard-linked lower file must see the one copy
            meta["lower_only"] = loc.lower_nlink
        top = self.top

        def on_fd(fd: int, fst: os.stat_result) -> None:
            top.set_meta_fd(fd, fst, meta)

        fd = None
        if loc.kind == stat.S_IFREG:
            fd = copyup.clone_file(loc.host, loc.rel, st, self.work, tmp, with_data, on_fd)
        else:
            copyup.clone_object(loc.host, loc.rel, st, self.work, tmp, with_data, on_fd)
        try:
            if indexed:
                assert self.top.index is not None
                self.work.rename_to(tmp, self.top.index, str(loc.lower_ino), dirs=False)
                self.top.indexed.add(loc.lower_ino)
                self._invalidate_all()  # other names now resolve to the index
            else:
                with self._parent_times_kept(path):
                    self.work.rename_to(tmp, self.tree, path, dirs=False)
                self._invalidate(path, dirs=False, exists=True)
            new, self._kept_st = self.resolver.locate_fresh(path)
            if new is None:
                raise FsError(self._missing_errno(path), path)
            self._repoint_handles(ino, new)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if keep and fd is not None:
            self._kept_fd = fd
        elif fd is not None:
            os.close(fd)
        return new

    def base_stamp(self, loc: Loc, path: str,
                   st: os.stat_result | None = None) -> list[Any] | None:
        """[size, mtime_ns, path] of the base object *path* showed when the branch took it
        over (copy-up, delete, rename over it); commit compares it with the base to
        find conflicts.  None: the branch holds no evidence about the base at *path*.
        *st*: the object's lstat, when the caller has it."""
        layer = self.layers[loc.layer]
        st = st or loc.host.lstat(loc.rel)
        if layer.is_base:
            return None if loc.is_dir else [st.st_size, st.st_mtime_ns, stamp_path(path)]
        meta = layer.meta(loc.host, loc.rel, st)
        for key in ("rst", "bst"):
            stamp = meta.get(key)
            if stamp and len(stamp) == 3 and stamp[2] == stamp_path(path):
                return list(stamp)
        return None

    def _repoint_handles(self, ino: int, loc: Loc) -> None:
        for fh in self._by_ino.get(ino, ()):
            h = self.handles[fh]
            if h.on_top:
                continue
            fd = loc.host.open(loc.rel, os.O_RDWR if self._writable(h) else os.O_RDONLY)
            os.close(h.fd)
            h.fd, h.on_top = fd, True

    def push_top(self, new_top: Layer, live: Collection[int] = ()) -> None:
        """Fork support: the current top becomes a frozen layer under *new_top*.

        The view does not change.  Files open for writing are copied into the new top
        now and their handles re-pointed, so writes after this instant land in the
        new top only; the frozen layer is the fork's consistent snapshot.  *live*:
        inodes whose open host files the kernel reads and writes itself (FUSE
        passthrough), which no handle re-pointing reaches: those files move up into
        the new top, and the frozen layer gets a copy (`_move_up_live`)."""
        live = set(live)
        writing = {h.ino for h in self.handles.values()
                   if self._writable(h) and h.on_top and h.ino not in live}
        for h in self.handles.values():
            h.on_top = False
        self._drop_shared_whiteout()
        self.layers = [new_top, *self.layers]
        self.top, self.tree = new_top, new_top.tree
        assert new_top.work is not None
        self.work = new_top.work
        self.resolver = Resolver(self.layers)
        self._invalidate_all()
        self._prepare_work()
        for ino in writing:
            if self.inodes.has_path(ino):
                self._copy_up(self.inodes.path(ino))
            else:
                for fh in self._by_ino.get(ino, ()):  # unlinked: nobody else can see it
                    self.handles[fh].on_top = True
        for ino in live:
            if self.inodes.has_path(ino) and not self._move_up_live(self.inodes.path(ino)):
                log.warning("fork: %s is open for the kernel's own I/O and has other "
                            "names; writes through its open handles reach the fork too",
                            self.inodes.path(ino))
                continue
            for fh in self._by_ino.get(ino, ()):  # the handles' host file is the new top's
                self.handles[fh].on_top = True

    def _move_up_live(self, path: str) -> bool:
        """After a fork: the open file at *path*, still in the layer just frozen, becomes
        the new top's (the same host inode, renamed up: the kernel keeps reading and
        writing it), and the frozen layer keeps a copy made now, with the same layer
        metadata and inode number, put in place by one rename so it never lacks the
        name.  False (nothing done) for a file with other names (hard links, an index
        entry): moving one name would split them."""
        loc = self._locate(path)
        frozen = self.layers[1]
        st = loc.host.lstat(loc.rel)
        if (loc.layer != 1 or loc.host is not frozen.tree or loc.kind != stat.S_IFREG
                or st.st_nlink != 1):
            return False
        meta = dict(frozen.meta(loc.host, loc.rel, st))
        meta.setdefault("origin", self._ino(path, loc, st))  # the fork sees the same st_ino
        self._ensure_dir_on_top(split(path)[0])
        tmp = copyup.temp_name()
        copyup.clone_object(loc.host, loc.rel, st, self.work, tmp,
                            on_fd=lambda fd, fst: frozen.set_meta_fd(fd, fst, meta))
        with self._parent_times_kept(path), \
                _dir_times_kept(loc.host, split(loc.rel)[0]):
            loc.host.link_to(loc.rel, self.tree, path)
            self.work.rename_to(tmp, loc.host, loc.rel, dirs=False)
        self._invalidate(path)
        return True

    def _name_on_top(self, path: str, loc: Loc) -> None:
        """Give a copied-up hard-linked file (served from the index) a tree name."""
        if loc.host is self.tree:
            return
        self._drop_lower_name(loc)
        self._place(path, lambda h, r: loc.host.link_to(loc.rel, h, r))

    def _release_lower_name(self, path: str, loc: Loc) -> None:
        """*path* is about to stop naming its file: if the file is hard-linked below,
        index it so its other names keep the one inode and a true link count."""
        if loc.kind == stat.S_IFREG and loc.layer > 0 and loc.lower_nlink > 1:
            loc = self._copy_up(path)
        if loc.layer == 0 and loc.host is not self.tree:
            self._drop_lower_name(loc)

    def _drop_lower_name(self, loc: Loc) -> None:
        """One lower name of an indexed inode is going away (or moving to the tree)."""
        st = loc.host.lstat(loc.rel)
        meta = dict(self.top.meta(loc.host, loc.rel, st))
        meta["lower_only"] = max(0, int(meta.get("lower_only", 1)) - 1)
        self.top.set_meta(loc.host, loc.rel, meta)

    # ------------------------------------------------------------- whiteouts
    def _link_whiteout(self, host: HostDir, rel: str) -> None:
        """Name the work area's shared whiteout inode at *host*/*rel*.  One inode for
        every whiteout (like kernel overlayfs): a link costs a twentieth of making a
        file, which was most of an unlink.  A new one is made for the first
        whiteout after the work area was cleared and when the last is full (EMLINK)."""
        for _ in range(2):
            if self._shared_whiteout is None:
                name = f"whiteout.{copyup.temp_name()}"
                fd = self.work.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0)  # mode 0
                try:
                    self.top.set_meta_fd(fd, os.fstat(fd), {"wh": 1})
                finally:
                    os.close(fd)
                self._shared_whiteout = name
            try:
                self.work.link_to(self._shared_whiteout, host, rel)
                return
            except OSError as exc:
                if exc.errno != errno.EMLINK:
                    raise
                self._drop_shared_whiteout()  # full: its whiteouts keep it, work/ not
        raise FsError(errno.EMLINK)

    def _drop_shared_whiteout(self) -> None:
        """Its name in work/ goes with the view (the whiteouts keep the inode), so a
        stopped view leaves nothing there for fsck to find."""
        if self._shared_whiteout is not None:
            with contextlib.suppress(OSError):
                self.work.unlink(self._shared_whiteout)
            self._shared_whiteout = None

    def _make_whiteout(self, path: str, stamp: list[Any] | None) -> str:
        """A whiteout for *path* in work/, to be renamed into place; *stamp*: what
        commit must find in the base at *path* (see `agentfs.overlay.stamps`)."""
        self.top.record_stamp(path, stamp)
        tmp = copyup.temp_name()
        self._link_whiteout(self.work, tmp)
        return tmp

    def _remove_from_top(self, path: str, whiteout: bool, ino: int,
                         stamp: list[Any] | None = None) -> None:
        """Take *path* out of the top tree, leaving a whiteout if lower content exists."""
        st = self.tree.try_lstat(path)
        if whiteout:
            if st is None:  # the common case (a lower object): straight into place
                self.top.record_stamp(path, stamp)
                self._link_whiteout(self.tree, path)
                return
            tmp = self._make_whiteout(path, stamp)
            if stat.S_ISDIR(st.st_mode):  # only whiteouts inside: nothing to keep
                self.work.rename_to(tmp, self.tree, path, RENAME_EXCHANGE)
                self._drop_dir(self.work, tmp, st, ino)
            else:
                self._keep_then(path, st, ino,
                                lambda: self.work.rename_to(tmp, self.tree, path, dirs=False))
        elif st is not None:
            if stat.S_ISDIR(st.st_mode):
                self._drop_dir(self.tree, path, st, ino)
            else:
                self._keep_then(path, st, ino, lambda: self.tree.unlink(path))

    def _drop_dir(self, host: HostDir, rel: str, st: os.stat_result, ino: int) -> None:
        """Remove a directory that is empty in the view (whiteouts at most).  While the
        kernel still holds it, it waits in work/orphans like an unlinked open file: the
        host must not give its inode number to a new object the kernel would take for
        it (a program in the removed directory saw EIO once the new one was announced)."""
        if self._pinned(ino):
            name = f"{_ORPHANS}/{ino}.{copyup.temp_name()}"
            host.rename_to(rel, self.work, name)
            self._orphans[ino] = name
            return
        self._discard(host, rel)
        self.top.drop_meta(st.st_ino)

    def _keep_then(self, path: str, st: os.stat_result, ino: int,
                   remove: Callable[[], None]) -> None:
        """Give a top-tree non-directory that is being deleted the name that keeps it
        (the trash, or work/orphans while it is still referenced) before *remove*
        takes its name in the view: a daemon killed in between leaves the file where
        it was, never only in work/, which the next mount clears."""
        if self._pinned(ino) and st.st_nlink == 1:
            self._orphan(self.tree, path, ino, path)
            remove()
            return
        if self.trash is not None and st.st_nlink == 1:
            self.trash.take(path, self.tree, path, st, self._reason, link=True)
        remove()
        self.top.drop_meta(st.st_ino)

    def _pinned(self, ino: int) -> bool:
        return self.inodes.referenced(ino) or bool(self._by_ino.get(ino))

    def _orphan(self, host: HostDir, rel: str, ino: int, path: str) -> None:
        """Keep an unlinked-but-referenced non-directory alive (so its host inode isn't
        reused) by a second name; the caller then removes or replaces *rel* (moving it
        away first left a window where a killed daemon lost the file)."""
        name = f"{_ORPHANS}/{ino}.{copyup.temp_name()}"
        host.link_to(rel, self.work, name)
        self._orphans[ino] = name
        if self.trash is not None:
            if self._by_ino.get(ino):  # open: the entry is final only at the last close
                self.trash.kept_open(path, ino, self.work, name, self.work.lstat(name),
                                     self._reason)
            else:  # only the kernel's dentry cache still knows it: nothing can change it
                self.trash.take(path, self.work, name, self.work.lstat(name), self._reason,
                                link=True)

    def _reap(self, ino: int) -> None:
        if self._pinned(ino):
            return
        name = self._orphans.pop(ino, None)
        if name is not None:
            st = self.work.try_lstat(name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                self._discard(self.work, name)
            else:
                self.work.unlink(name)
            if st is not None:
                self.top.drop_meta(st.st_ino)
            if self.trash is not None:
                self.trash.closed(ino)

    # ----------------------------------------------------- creating objects
    def _prepare_new(self, path: str) -> None:
        _check_name(path)
        parent, _ = split(path)
        ploc = self._locate(parent)
        if not ploc.is_dir:
            raise FsError(errno.ENOTDIR)
        if self.resolver.locate(path) is not None:
            raise FsError(errno.EEXIST)
        self._dir_nlink.pop(parent, None)
        self._ensure_dir_on_top(parent)

    def _place(self, path: str, make: Callable[[HostDir, str], None],
               meta: dict[str, Any] | None = None) -> None:
        """Create an object at *path*, atomically replacing a whiteout if there is one."""
        wh = self.tree.try_lstat(path)
        if wh is None and not meta:
            make(self.tree, path)
        else:
            tmp = copyup.temp_name()
            make(self.work, tmp)
            stamp = self.top.whiteout_stamp(path, wh) if wh is not None else None
            if stamp:  # the new object replaces that base object: keep commit's evidence
                meta = {**(meta or {}), "bst": stamp}
            tst = self.work.lstat(tmp)
            if meta and (stat.S_ISREG(tst.st_mode) or stat.S_ISDIR(tst.st_mode)):
                current = self.top.meta(self.work, tmp, tst)  # a hard link shares its inode's
                self.top.set_meta(self.work, tmp, {**current, **meta})
            if wh is None:
                self.work.rename_to(tmp, self.tree, path)
            else:  # exchange: a directory cannot be renamed over the whiteout file
                self.work.rename_to(tmp, self.tree, path, RENAME_EXCHANGE)
                self.work.unlink(tmp)
                self.top.drop_meta(wh.st_ino)
        self._invalidate(path)

    def _parent_stat(self, path: str) -> os.stat_result:
        ploc = self._locate(split(path)[0])
        return ploc.host.lstat(ploc.rel)

    @staticmethod
    def _new_gid(pst: os.stat_result, gid: int) -> int:
        """A new object's group: the parent's if the parent is setgid (BSD semantics)."""
        return pst.st_gid if pst.st_mode & stat.S_ISGID else gid

    def _own(self, path: str, uid: int, gid: int,
             pst: os.stat_result | None = None) -> None:
        pst = pst or self._parent_stat(path)
        with contextlib.suppress(PermissionError):
            self.tree.chown(path, uid, self._new_gid(pst, gid))

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> Attr:
        self._prepare_new(path)
        whiteout_there = self.tree.try_lstat(path) is not None
        self._place(path, lambda h, r: h.mkdir(r, 0o700), {"opaque": 1} if whiteout_there else None)
        pst = self._parent_stat(path)
        self._own(path, uid, gid, pst)
        self.tree.chmod(path, (mode & 0o7777) | (pst.st_mode & stat.S_ISGID))
        loc = self._locate(path)
        if len(loc.parts) == 1:  # nothing below shows through: the listing is known
            self._listings[path] = {}
        return self._attr(path, loc)

    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        self._prepare_new(path)
        if stat.S_ISCHR(mode) and rdev == 0 and mode & 0o7777 == 0:
            raise FsError(errno.EPERM)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind == stat.S_IFREG:
            self._place(path, lambda h, r: os.close(h.open(r, os.O_CREAT | os.O_EXCL, 0o600)))
        else:
            self._place(path, lambda h, r: h.mknod(r, kind | 0o600, rdev))
        self._own(path, uid, gid)
        self.tree.chmod(path, mode & 0o7777)
        return self.getattr(path)

    def symlink(self, path: str, target: str, uid: int, gid: int) -> Attr:
        self._prepare_new(path)
        self._place(path, lambda h, r: h.symlink(target, r))
        self._own(path, uid, gid)
        return self.getattr(path)

    def create(self, path: str, flags: int, mode: int, uid: int, gid: int) -> tuple[int, Attr]:
        """O_CREAT open; O_EXCL semantics are the caller's (EEXIST if it exists)."""
        if self.resolver.locate(path) is not None:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            return self.open(path, flags & ~os.O_CREAT), self.getattr(path)
        self._prepare_new(path)
        if self.tree.try_lstat(path) is None:
            return self._create_fast(path, flags, mode, uid, gid)
        self._place(path, lambda h, r: os.close(h.open(r, os.O_CREAT | os.O_EXCL, 0o600)))
        self._own(path, uid, gid)
        self.tree.chmod(path, mode & 0o7777)
        attr = self.getattr(path)
        return self._open_handle(attr.ino, self._locate(path), flags & ~os.O_TRUNC), attr

    def _create_fast(self, path: str, flags: int, mode: int, uid: int,
                     gid: int) -> tuple[int, Attr]:
        """The common create (no whiteout in the way): one open, fd-based fix-ups, and
        the new fd becomes the handle."""
        gid = self._new_gid(self._parent_stat(path), gid)
        fd = self.tree.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode & 0o7777)
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (uid, gid):
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, uid, gid)
                st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != mode & 0o7777:
                os.fchmod(fd, mode & 0o7777)
                st = os.fstat(fd)
            # evidence for commit: the base had nothing here when the branch created it
            self.top.set_meta_fd(fd, st, {"bst": [ABSENT, ABSENT, stamp_path(path)]})
        except BaseException:
            os.close(fd)
            raise
        self._invalidate(path, dirs=False)
        attr = Attr.from_stat(STORE_INO_TAG | st.st_ino, st)
        fh = next(self._fh)
        self.handles[fh] = Handle(ino=attr.ino, fd=fd, flags=flags & ~os.O_TRUNC, on_top=True)
        self._by_ino.setdefault(attr.ino, set()).add(fh)
        return fh, attr

    def link(self, src: str, dst: str) -> Attr:
        sloc = self._locate(src)
        self._prepare_new(dst)
        if sloc.is_dir:
            raise FsError(errno.EPERM)
        sloc = self._copy_up(src)
        if sloc.host is not self.tree:
            self._name_on_top(src, sloc)  # so both names are real links of one inode
        self._invalidate(src)
        self._place(dst, lambda h, r: self.tree.link_to(src, h, r))
        return self.getattr(dst)

    # --------------------------------------------------------- removing
    def unlink(self, path: str) -> None:
        loc = self._locate(path)
        if loc.is_dir:
            raise FsError(errno.EISDIR)
        attr = self._attr(path, loc)
        # a lower object: one lstat serves the trash record and commit's stamp
        lst = loc.host.lstat(loc.rel) if loc.layer > 0 else None
        if self.trash is not None and loc.layer > 0 and not (
                loc.kind == stat.S_IFREG and loc.lower_nlink > 1):
            self.trash.hidden(path, self.layers[loc.layer], loc.host, loc.rel, "unlink", lst)
        self._release_lower_name(path, loc)
        parent, name = split(path)
        self._ensure_dir_on_top(parent)
        self._reason = "unlink"
        self._remove_from_top(path, self.resolver.lower_exists(path), attr.ino,
                              self.base_stamp(loc, path, lst))
        # the name is gone from the view: no need to resolve it again to know that
        self.resolver.invalidate(path)
        self.resolver.gone(path)
        listing = self._listings.get(parent)
        if listing is not None:
            listing.pop(name, None)
        self.inodes.unlinked(attr.ino, path, last=attr.nlink <= 1)

    def rmdir(self, path: str) -> None:
        if not path:
            raise FsError(errno.EBUSY)
        loc = self._locate(path)
        if not loc.is_dir:
            raise FsError(errno.ENOTDIR)
        if self.listdir(path):
            raise FsError(errno.ENOTEMPTY)
        attr = self._attr(path, loc)
        if self.trash is not None:
            self.trash.dir_removed(path, self.layers[loc.layer], loc.host, loc.rel, "rmdir")
        parent, _ = split(path)
        self._ensure_dir_on_top(parent)
        self._remove_from_top(path, self.resolver.lower_exists(path), attr.ino)
        # it was empty in the view, so every cached lookup below it already says
        # "nothing there": no scan of every cache (rm -rf removes hundreds of dirs)
        self._invalidate(path)
        self._listings.pop(path, None)
        self._dir_nlink.pop(path, None)
        self.inodes.unlinked(attr.ino, path)

    # --------------------------------------------------------- restoring
    @contextlib.contextmanager
    def trash_paused(self) -> Iterator[None]:
        """Removals inside are final (restore hides what another item already holds)."""
        saved, self.trash = self.trash, None
        try:
            yield
        finally:
            self.trash = saved

    def preserve(self, path: str, reason: str = "truncate") -> None:
        """Keep a copy of a file's current content in the trash (before a truncation
        the policy marks soft_delete)."""
        if self.trash is None:
            return
        loc = self._locate(path)
        if loc.kind == stat.S_IFREG and loc.host.lstat(loc.rel).st_size > 0:
            self.trash.copied(path, loc.host, loc.rel, reason)

    def reveal(self, path: str) -> bool:
        """Drop the whiteout at *path* so what lies below shows again (True if done)."""
        st = self.tree.try_lstat(path)
        if st is None or not self.top.is_whiteout(path, st) or not self.resolver.lower_exists(
                path):
            return False
        self.tree.unlink(path)
        self.top.drop_meta(st.st_ino)
        self._invalidate(path, subtree=True)
        return True

    def adopt(self, path: str, host: HostDir, rel: str) -> Attr:
        """Move a host object (a restored trash item) into the view at *path*."""
        self._prepare_new(path)
        self._place(path, lambda h, r: host.rename_to(rel, h, r))
        self._invalidate(path, subtree=True)  # a restored tree: lookups below it change
        return self.getattr(path)

    def remove_tree(self, path: str) -> None:
        """`rm -rf` through the engine (each removal goes where removals go)."""
        loc = self._locate(path)
        if loc.is_dir:
            for name in self.listdir(path):
                self.remove_tree(join(path, name))
            self.rmdir(path)
        else:
            self.unlink(path)

    # --------------------------------------------------------- rename
    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        if flags & ~(RENAME_EXCHANGE | RENAME_NOREPLACE) or flags == (
                RENAME_EXCHANGE | RENAME_NOREPLACE):
            raise FsError(errno.EINVAL)
        _check_name(dst)
        # parents first, like the VFS: a bad destination directory beats a missing source
        for parent_path in (split(src)[0], split(dst)[0]):
            if not self._locate(parent_path).is_dir:
                raise FsError(errno.ENOTDIR)
        sloc = self._locate(src)
        if not src:
            raise FsError(errno.EBUSY)
        dparent, _ = split(dst)
        dloc = self.resolver.locate(dst)
        exchange = bool(flags & RENAME_EXCHANGE)
        # the checks in the order Linux's renameat2 makes them, so errnos match
        if exchange and dloc is None:
            raise FsError(errno.ENOENT)
        if flags & RENAME_NOREPLACE and dloc is not None:
            raise FsError(errno.EEXIST)
        if src == dst:
            return
        if dst.startswith(src + "/"):
            raise FsError(errno.EINVAL)
        if src.startswith(dst + "/"):
            raise FsError(errno.EINVAL if exchange else errno.ENOTEMPTY)
        if dloc is not None and not exchange:
            if not sloc.is_dir and self.getattr(src).ino == self.getattr(dst).ino:
                return  # two names of one inode: POSIX says do nothing
            if sloc.is_dir and not dloc.is_dir:
                raise FsError(errno.ENOTDIR)
            if not sloc.is_dir and dloc.is_dir:
                raise FsError(errno.EISDIR)
            if dloc.is_dir and self.listdir(dst):
                raise FsError(errno.ENOTEMPTY)
        sparent, _ = split(src)
        self._ensure_dir_on_top(sparent)
        self._ensure_dir_on_top(dparent)
        stamp = self.base_stamp(sloc, src)
        replaced_stamp = (self.base_stamp(dloc, dst) if dloc is not None and not exchange
                          else [ABSENT, ABSENT, stamp_path(dst)] if dloc is None else None)
        # a non-directory moving (not over a directory): only two names change
        replaced = self.getattr(dst) if dloc is not None else None
        inos = ((self.getattr(src).ino, replaced.ino if replaced else 0,
                 replaced is None or replaced.nlink <= 1)
                if not sloc.is_dir and (dloc is None or not dloc.is_dir) else None)
        self._prepare_move(src, sloc)
        if exchange:
            assert dloc is not None
            self._prepare_move(dst, dloc)
            self.tree.rename_to(src, self.tree, dst, RENAME_EXCHANGE)
            self._moved(src, dst, True, inos)
            return
        replaced_ino = replaced.ino if replaced is not None else 0
        if self.trash is not None and dloc is not None:
            if dloc.is_dir:
                self.trash.dir_removed(dst, self.layers[dloc.layer], dloc.host, dloc.rel,
                                       "rename_over")
            elif dloc.layer > 0 and not (dloc.kind == stat.S_IFREG and dloc.lower_nlink > 1):
                self.trash.hidden(dst, self.layers[dloc.layer], dloc.host, dloc.rel,
                                  "rename_over")
        if dloc is not None and not dloc.is_dir:
            self._release_lower_name(dst, dloc)
        dst_st = self.tree.try_lstat(dst)
        if dst_st is not None and dloc is None and self.top.is_whiteout(dst, dst_st):
            # the name was deleted earlier: what the base had there is on the whiteout
            replaced_stamp = self.top.whiteout_stamp(dst, dst_st) or replaced_stamp
        if dst_st is not None:
            if stat.S_ISDIR(dst_st.st_mode):
                self._drop_dir(self.tree, dst, dst_st, replaced_ino)  # only whiteouts inside
            elif dst_st.st_nlink == 1 and self._pinned(replaced_ino):
                self._reason = "rename_over"
                self._orphan(self.tree, dst, replaced_ino, dst)
            elif (self.trash is not None and dst_st.st_nlink == 1
                  and not self.top.is_whiteout(dst, dst_st)):
                # linked, not moved: the rename below replaces the name atomically
                self.trash.take(dst, self.tree, dst, dst_st, "rename_over", link=True)
            if not stat.S_ISDIR(dst_st.st_mode):
                self.top.drop_meta(dst_st.st_ino)
        if dst_st is not None and sloc.is_dir and not stat.S_ISDIR(dst_st.st_mode):
            # a directory cannot replace a file (the whiteout): swap, then drop the whiteout
            self.tree.rename_to(src, self.tree, dst, RENAME_EXCHANGE)
            self.tree.unlink(src)
        else:
            self.tree.rename_to(src, self.tree, dst)
        if replaced_stamp:  # commit must know which base object this rename replaced
            mst = self.tree.lstat(dst)
            if stat.S_ISREG(mst.st_mode) or stat.S_ISDIR(mst.st_mode):
                meta = self.top.meta(self.tree, dst, mst)
                self.top.set_meta(self.tree, dst, {**meta, "rst": replaced_stamp})
        if self.resolver.lower_exists(src):
            self.work.rename_to(self._make_whiteout(src, stamp), self.tree, src)
        self._moved(src, dst, False, inos)

    def _prepare_move(self, path: str, loc: Loc) -> None:
        """Make *path* a real top-tree object that can be renamed without losing lower data."""
        if not loc.is_dir:
            loc = self._copy_up(path)
            if loc.host is not self.tree:
                self._name_on_top(path, loc)
            return
        self._ensure_dir_on_top(path)
        st = self.tree.lstat(path)
        meta = dict(self.top.meta(self.tree, path, st))
        if loc.lower_path is not None:
            if meta.get("redirect") != loc.lower_path:
                meta["redirect"] = loc.lower_path
                self.top.set_meta(self.tree, path, meta)
        elif not meta.get("opaque"):
            meta["opaque"] = 1  # pure top dir: must not pick up lower content where it lands
            self.top.set_meta(self.tree, path, meta)

    def _moved(self, src: str, dst: str, exchange: bool,
               inos: tuple[int, int, bool] | None = None) -> None:
        """Caches and inode names after a rename.  *inos*: (moved, replaced or
        exchanged) overlay inodes when no directory was involved, so nothing below
        either name changed: the caches of both names and their directories are
        brought up to date instead of dropped (compileall renames every .pyc into
        place; each rename used to empty every cached listing and walk every inode);
        the third: the replaced object had no other name."""
        if inos is None:
            self._invalidate(src, subtree=True)
            self._invalidate(dst, subtree=True)
            self.inodes.renamed(src, dst, exchange)
            return
        self._invalidate(src, dirs=False)
        self._invalidate(dst, dirs=False)
        self.inodes.renamed_object(src, dst, inos[0], inos[1], exchange, inos[2])

    # --------------------------------------------------------- attributes
    def setattr(self, path: str | None, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, fh: int | None = None,
                ino: int | None = None) -> Attr:
        """chmod/chown/truncate/utimens; *path* None means an unlinked file (reached
        through *fh*, or any handle of *ino* the kernel still writes back to)."""
        handle = self.handles.get(fh) if fh is not None else None
        if handle is None and ino is not None:
            handle = next((self.handles[f] for f in self._by_ino.get(ino, ())), None)
        if path is None or self.resolver.locate(path) is None:
            if handle is None and ino is not None and ino in self._orphans:
                # unlinked and closed, but the kernel still writes back its times (syncfs)
                fd = self.work.open(self._orphans[ino],
                                    os.O_RDWR if size is not None else os.O_RDONLY)
                try:
                    handle = Handle(ino=ino, fd=fd, flags=os.O_RDWR, on_top=True)
                    return self._setattr_fd(handle, mode, uid, gid, size, atime_ns, mtime_ns)
                finally:
                    os.close(fd)
            if handle is None:
                raise FsError(errno.ENOENT)
            return self._setattr_fd(handle, mode, uid, gid, size, atime_ns, mtime_ns)
        if size is not None:
            if handle is not None and handle.on_top and self._writable(handle):
                os.ftruncate(handle.fd, size)
            else:
                loc = self._locate(path)
                if loc.is_dir:
                    raise FsError(errno.EISDIR)
                loc = self._copy_up(path, with_data=size > 0)
                fd = loc.host.open(loc.rel, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if mode is None and uid is None and gid is None and atime_ns is None and mtime_ns is None:
            return self.getattr(path)
        loc = self._copy_up(path)
        if uid is not None or gid is not None:
            loc.host.chown(loc.rel, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            loc.host.chmod(loc.rel, mode & 0o7777, loc.kind)
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                st = loc.host.lstat(loc.rel)
                atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
            loc.host.utime(loc.rel, atime_ns, mtime_ns)
        return self._attr(path, loc)

    def lost(self, ino: int) -> bool:
        """Has *ino* no name, no open handle and no orphan (so `setattr` of it can only
        fail ENOENT)?  The kernel's writeback of a removed file's ctime asks that of
        every file `rm -rf` deleted."""
        return (not self.inodes.has_path(ino) and not self._by_ino.get(ino)
                and ino not in self._orphans)

    def fh_attr(self, fh: int | None) -> Attr:
        """Attributes through an open handle (its file may have no name any more)."""
        if fh is None or fh not in self.handles:
            raise FsError(errno.ENOENT)
        h = self.handles[fh]
        return Attr.from_stat(h.ino, os.fstat(h.fd), nlink=0)

    @staticmethod
    def _setattr_fd(h: Handle, mode: int | None, uid: int | None, gid: int | None,
                    size: int | None, atime_ns: int | None, mtime_ns: int | None) -> Attr:
        if size is not None:
            os.ftruncate(h.fd, size)
        if mode is not None:
            os.chmod(f"/proc/self/fd/{h.fd}", mode & 0o7777)
        if uid is not None or gid is not None:
            os.chown(f"/proc/self/fd/{h.fd}", -1 if uid is None else uid,
                     -1 if gid is None else gid)
        if atime_ns is not None or mtime_ns is not None:
            st = os.fstat(h.fd)
            os.utime(h.fd, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                               st.st_mtime_ns if mtime_ns is None else mtime_ns))
        return Attr.from_stat(h.ino, os.fstat(h.fd), nlink=0)

    # --------------------------------------------------------- file data
    def writable(self, fh: int) -> bool:
        """Is *fh* an open handle that may write?"""
        h = self.handles.get(fh)
        return h is not None and self._writable(h)

    @staticmethod
    def _writable(h: Handle) -> bool:
        return h.flags & _ACCMODE != os.O_RDONLY

    def open(self, path: str, flags: int) -> int:
        loc = self._locate(path)
        if loc.is_dir and flags & _ACCMODE != os.O_RDONLY:
            raise FsError(errno.EISDIR)
        wants_write = flags & _ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if wants_write and loc.layer != 0:
            loc = self._copy_up(path, with_data=not flags & os.O_TRUNC,
                                keep=flags & _ACCMODE != os.O_RDONLY)
            fd, self._kept_fd = self._kept_fd, None
            st, self._kept_st = self._kept_st, None
            if fd is not None:  # the copy's own fd (read-write) becomes the handle's
                try:
                    attr = self._attr(path, loc, st)  # st: taken after the rename
                except BaseException:
                    os.close(fd)
                    raise
                return self._new_handle(attr.ino, fd, flags, loc)
        attr = self._attr(path, loc)
        return self._open_handle(attr.ino, loc, flags)

    def _open_handle(self, ino: int, loc: Loc, flags: int) -> int:
        acc = flags & _ACCMODE
        host_flags = os.O_RDONLY if acc == os.O_RDONLY else os.O_RDWR
        if flags & os.O_TRUNC and acc != os.O_RDONLY:
            host_flags |= os.O_TRUNC
        if loc.is_dir:
            host_flags = os.O_RDONLY | os.O_DIRECTORY
        try:
            fd = loc.host.open(loc.rel, host_flags)
        except PermissionError:
            if acc != os.O_WRONLY:
                raise
            fd = loc.host.open(loc.rel, (host_flags & ~os.O_RDWR) | os.O_WRONLY)
        if flags & os.O_TRUNC and acc == os.O_RDONLY and not loc.is_dir:
            os.ftruncate(fd, 0)
        return self._new_handle(ino, fd, flags, loc)

    def _new_handle(self, ino: int, fd: int, flags: int, loc: Loc) -> int:
        fh = next(self._fh)
        self.handles[fh] = Handle(ino=ino, fd=fd, flags=flags, on_top=loc.layer == 0)
        self._by_ino.setdefault(ino, set()).add(fh)
        return fh

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self.handles[fh].fd, size, offset)

    def read_fd(self, fh: int) -> int:
        """The host fd that reads *fh* now (a copy-up may replace and close it later)."""
        return self.handles[fh].fd

    def write(self, fh: int, offset: int, data: bytes) -> int:
        h = self.handles[fh]
        if not self._writable(h):
            raise FsError(errno.EBADF)
        return os.pwrite(h.fd, data, offset)

    def fsync(self, fh: int, datasync: bool) -> None:
        fd = self.handles[fh].fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        os.close(h.fd)
        fhs = self._by_ino.get(h.ino)
        if fhs is not None:
            fhs.discard(fh)
            if not fhs:
                del self._by_ino[h.ino]
                if not self.inodes.referenced(h.ino):
                    self._reap(h.ino)

    def handle_ino(self, fh: int) -> int:
        return self.handles[fh].ino

    # --------------------------------------------------------- xattrs
    def getxattr(self, path: str, name: str) -> bytes:
        _check_xattr_name(name)
        loc = self._locate(path)
        try:
            return loc.host.getxattr(loc.rel, name)
        except OSError as exc:
            raise FsError.from_os(exc) from None

    def fh_xattrs(self, fh: int) -> list[str]:
        """Extended attribute names of an open file (through its fd: no path walk)."""
        return [n for n in os.listxattr(self.handles[fh].fd) if n != MARKER]

    def listxattr(self, path: str) -> list[str]:
        loc = self._locate(path)
        if loc.kind == stat.S_IFLNK:
            return []
        return [n for n in loc.host.listxattr(loc.rel) if n != MARKER]

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        _check_xattr_name(name)
        loc = self._copy_up(path)
        loc.host.setxattr(loc.rel, name, value, flags)

    def removexattr(self, path: str, name: str) -> None:
        _check_xattr_name(name)
        loc = self._locate(path)
        if name not in loc.host.listxattr(loc.rel):
            raise FsError(errno.ENODATA)
        loc = self._copy_up(path)
        loc.host.removexattr(loc.rel, name)

    # --------------------------------------------------------- misc
    def statfs(self) -> os.statvfs_result:
        return self.tree.statvfs()

    def access(self, path: str, mode: int, uid: int, gids: list[int]) -> bool:
        attr = self.getattr(path)
        if mode == os.F_OK:
            return True
        if uid == 0:
            return not (mode & os.X_OK) or bool(attr.mode & 0o111) or stat.S_ISDIR(attr.mode)
        if attr.uid == uid:
            bits = (attr.mode >> 6) & 7
        elif attr.gid in gids:
            bits = (attr.mode >> 3) & 7
        else:
            bits = attr.mode & 7
        return mode & bits == mode


@contextlib.contextmanager
def _dir_times_kept(host: HostDir, rel: str) -> Iterator[None]:
    """Keep directory *rel*'s times across bookkeeping that adds or replaces its entries."""
    st = host.lstat(rel)
    yield
    host.utime(rel, st.st_atime_ns, st.st_mtime_ns)


def _check_name(path: str) -> None:
    _, name = split(path)
    # a character is at most 4 bytes in UTF-8 (an escaped byte is 1): short names pass
    # without being encoded
    if len(name) * 4 > NAME_MAX and len(os.fsencode(name)) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)


def _check_xattr_name(name: str) -> None:
    if name == MARKER or name.startswith(MARKER + "."):
        raise FsError(errno.EPERM, "reserved attribute")


__all__ = ["Handle", "Overlay"]
