"""What a branch changed: its view compared with its fork point.

The branch view is the whole layer stack; the fork point is the same stack without
the branch's own top layer.  Only directories that the top layer touches can differ,
so the walk skips every subtree that comes unchanged from below: diff costs what
the branch changed, not what the project holds.

Renames are found by inode: a copied-up or renamed file keeps its overlay inode,
so a deleted path and an added path with the same inode are one rename.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from functools import cached_property

from agentfs.overlay.hostio import join, read_all
from agentfs.overlay.resolve import Loc, Resolver

ADDED, MODIFIED, DELETED, RENAMED, TYPE_CHANGED = "A", "M", "D", "R", "T"
_KIND = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFIFO: "fifo", stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev",
         stat.S_IFSOCK: "socket"}


@dataclass(frozen=True)
class Entry:
    """One side of a change: what a path showed in one view."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    loc: Loc = field(compare=False, repr=False)
    path: str = field(default="", compare=False, repr=False)
    st: os.stat_result | None = field(default=None, compare=False, repr=False)
    resolver: Resolver | None = field(default=None, compare=False, repr=False)

    @cached_property
    def ino(self) -> int:
        """The overlay inode (only rename pairing needs it; for an object in a layer it
        costs a getxattr, so it is looked up when asked for)."""
        assert self.resolver is not None and self.st is not None
        return self.resolver.ino_of(self.path, self.loc, self.st)


@dataclass
class Change:
    status: str                 # A, M, D, R or T (git's letters)
    path: str                   # the path in the branch (the old path for D)
    old_path: str | None = None  # renames: where it came from
    old: Entry | None = None
    new: Entry | None = None
    content_changed: bool = False
    mode_changed: bool = False

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"status": self.status, "path": self.path}
        if self.old_path is not None:
            out["old_path"] = self.old_path
        for side, entry in (("old", self.old), ("new", self.new)):
            if entry is not None:
                out[f"{side}_kind"] = entry.kind
                out[f"{side}_mode"] = f"{stat.S_IMODE(entry.mode):04o}"
                out[f"{side}_size"] = entry.size
        out["content_changed"] = self.content_changed
        out["mode_changed"] = self.mode_changed
        return out


class ViewReader:
    """Read-only access to one view (a Resolver) by path."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    def entry(self, path: str) -> Entry | None:
        loc = self.resolver.locate(path)
        if loc is None:
            return None
        st = loc.host.lstat(loc.rel)
        return Entry(_KIND.get(stat.S_IFMT(st.st_mode), "other"), st.st_mode, st.st_uid,
                     st.st_gid, st.st_size, loc, path, st, self.resolver)

    def names(self, path: str) -> list[str]:
        loc = self.resolver.locate(path)
        if loc is None or not loc.is_dir:
            return []
        seen: dict[str, None] = {}
        for layer_idx, rel in loc.parts:
            try:
                for e in self.resolver.layers[layer_idx].tree.listdir(rel):
                    seen.setdefault(e.name, None)
            except FileNotFoundError:
                continue
        return sorted(n for n in seen if self.resolver.locate(join(path, n)) is not None)

    def read(self, entry: Entry) -> bytes:
        fd = entry.loc.host.open_quiet(entry.loc.rel, os.O_RDONLY)
        try:
            return read_all(fd)
        finally:
            os.close(fd)

    def readlink(self, entry: Entry) -> str:
        return entry.loc.host.readlink(entry.loc.rel)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        if entry.kind == "symlink":
            return {}
        from agentfs.overlay.layers import MARKER

        host, rel = entry.loc.host, entry.loc.rel
        return {n: host.getxattr(rel, n) for n in host.listxattr(rel)
                if n != MARKER and n.startswith("user.")}

    def digest(self, entry: Entry) -> str:
        return hashlib.sha256(self.read(entry)).hexdigest()


def diff_views(branch: Resolver, fork: Resolver, only: list[str] | None = None) -> list[Change]:
    """Changes from *fork* to *branch*, sorted by path; *only* limits to these paths/dirs."""
    new, old = ViewReader(branch), ViewReader(fork)
    changes: list[Change] = []
    _walk_dir(new, old, "", changes)
    changes = _pair_renames(changes, new, old)
    if only:
        prefixes = [p.strip("/") for p in only]
        changes = [c for c in changes if any(_under(c.path, p) or
                                             (c.old_path is not None and _under(c.old_path, p))
                                             for p in prefixes)]
    return sorted(changes, key=lambda c: c.path)


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _unchanged_subtree(new: ViewReader, old: ViewReader, path: str) -> bool:
    """A directory merged from exactly the same layer directories in both views: the
    branch's layers never touched it, so nothing below it can differ."""
    a, b = new.resolver.locate(path), old.resolver.locate(path)
    if a is None or b is None:
        return False
    return _sources(new, a) == _sources(old, b)


def _sources(view: ViewReader, loc: Loc) -> list[tuple[int, str]]:
    return [(id(view.resolver.layers[i].tree), rel) for i, rel in loc.parts]


def _own_layers(new: ViewReader, old: ViewReader) -> int | None:
    """How many layers the branch view has on top of the fork view's (None: the fork
    view is not the branch view's lower part, or a top layer holds hard-linked
    copy-ups, which can change names its tree does not list)."""
    top = len(new.resolver.layers) - len(old.resolver.layers)
    if top < 0 or any(a is not b for a, b in zip(new.resolver.layers[top:],
                                                 old.resolver.layers, strict=True)):
        return None
    if any(layer.indexed for layer in new.resolver.layers[:top]):
        return None
    return top


def _candidates(new: ViewReader, old: ViewReader, path: str) -> set[str] | None:
    """The names of directory *path* that can differ between the views: those the
    branch's own layers list there, when below them the directory is merged from the
    same layer directories as in the fork view (every other name falls through to
    exactly what the fork view shows).  None: compare every name."""
    top = _own_layers(new, old)
    a, b = new.resolver.locate(path), old.resolver.locate(path)
    if top is None or a is None or b is None or not a.is_dir or not b.is_dir:
        return None
    own = [(i, rel) for i, rel in a.parts if i < top]
    if [(id(new.resolver.layers[i].tree), rel) for i, rel in a.parts if i >= top] != \
            _sources(old, b):
        return None
    names: set[str] = set()
    for i, rel in own:
        try:
            names.update(e.name for e in new.resolver.layers[i].tree.listdir(rel))
        except FileNotFoundError:
            continue
    return names


def _walk_dir(new: ViewReader, old: ViewReader, path: str, out: list[Change]) -> None:
    if path and _unchanged_subtree(new, old, path):
        return
    names = _candidates(new, old, path)
    if names is None:
        names = set(new.names(path)) | set(old.names(path))
    for name in sorted(names):
        child = join(path, name)
        if _same_source(new.resolver.locate(child), old.resolver.locate(child)):
            continue  # the very object the fork point shows: nothing to compare
        a, b = old.entry(child), new.entry(child)
        if a is None and b is not None:
            _added(new, child, b, out)
        elif b is None and a is not None:
            _deleted(old, child, a, out)
        elif a is not None and b is not None:
            _compare(new, old, child, a, b, out)


def _added(new: ViewReader, path: str, entry: Entry, out: list[Change]) -> None:
    _whole_tree(new, path, entry, ADDED, out)


def _deleted(old: ViewReader, path: str, entry: Entry, out: list[Change]) -> None:
    _whole_tree(old, path, entry, DELETED, out)


def _whole_tree(view: ViewReader, path: str, entry: Entry, status: str,
                out: list[Change]) -> None:
    """*path* and everything below it appeared (A, read from the branch) or went (D)."""
    added = status == ADDED
    out.append(Change(status, path, old=None if added else entry, new=entry if added else None,
                      content_changed=entry.kind != "dir"))
    if entry.kind == "dir":
        _below(view, path, status, out)


def _below(view: ViewReader, path: str, status: str, out: list[Change]) -> None:
    for name in view.names(path):
        child = join(path, name)
        e = view.entry(child)
        if e is not None:
            _whole_tree(view, child, e, status, out)


def _same_object(a: Entry, b: Entry) -> bool:
    return a.loc.host is b.loc.host and a.loc.rel == b.loc.rel


def _same_source(a: Loc | None, b: Loc | None) -> bool:
    """Both views show one non-directory object (directories are walked instead)."""
    return (a is not None and b is not None and not a.is_dir and not b.is_dir
            and a.host is b.host and a.rel == b.rel)


def _compare(new: ViewReader, old: ViewReader, path: str, a: Entry, b: Entry,
             out: list[Change]) -> None:
    if a.kind != b.kind:
        out.append(Change(TYPE_CHANGED, path, old=a, new=b, content_changed=True))
        if a.kind == "dir":
            _below(old, path, DELETED, out)
        if b.kind == "dir":
            _below(new, path, ADDED, out)
        return
    if a.kind == "dir":
        if _meta_differs(a, b) or new.xattrs(a) != new.xattrs(b):
            out.append(Change(MODIFIED, path, old=a, new=b, mode_changed=True))
        _walk_dir(new, old, path, out)
        return
    if _same_object(a, b):
        return
    content = _content_differs(new, old, a, b)
    meta = _meta_differs(a, b) or new.xattrs(b) != old.xattrs(a)
    if content or meta:
        out.append(Change(MODIFIED, path, old=a, new=b, content_changed=content,
                          mode_changed=meta))


def _meta_differs(a: Entry, b: Entry) -> bool:
    return (stat.S_IMODE(a.mode), a.uid, a.gid) != (stat.S_IMODE(b.mode), b.uid, b.gid)


def _content_differs(new: ViewReader, old: ViewReader, a: Entry, b: Entry) -> bool:
    if a.kind == "symlink":
        return old.readlink(a) != new.readlink(b)
    if a.kind != "file":
        return False
    if a.size != b.size:
        return True
    return old.read(a) != new.read(b)


def _pair_renames(changes: list[Change], new: ViewReader, old: ViewReader) -> list[Change]:
    """A deleted and an added non-directory with one inode are a rename."""
    deleted = {c.old.ino: c for c in changes
               if c.status == DELETED and c.old is not None and c.old.kind != "dir"}
    out: list[Change] = []
    used: set[int] = set()
    for c in changes:
        if (c.status == ADDED and c.new is not None and c.new.kind != "dir"
                and c.new.ino in deleted and c.new.ino not in used):
            gone = deleted[c.new.ino]
            assert gone.old is not None
            used.add(c.new.ino)
            c = Change(RENAMED, c.path, old_path=gone.path, old=gone.old, new=c.new,
                       content_changed=gone.old.kind != c.new.kind
                       or _content_differs(new, old, gone.old, c.new),
                       mode_changed=_meta_differs(gone.old, c.new))
        out.append(c)
    return [c for c in out if not (c.status == DELETED and c.old is not None
                                   and c.old.ino in used and c.old.kind != "dir")]

