"""The engine's trash hook: deleted content of one branch view becomes trash items.

Deletions arrive one name at a time (`rm -rf` unlinks every file, then removes the
directories bottom-up), but a person thinks of the tree they deleted.  So each item
is remembered by path while this view is open, and removing a directory folds the
items below it into one tree item (their data moves into the tree's data directory),
which restores as a whole.  Records go through the area's journal (see
`agentfs.trash.area`), so a deleted file folded into its directory's tree before the
next batch never gets a record file of its own.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import stat
import time
from typing import Any

from agentfs.context import CALLER
from agentfs.overlay.hostio import HostDir, join, split
from agentfs.overlay.layers import MARKER, Layer
from agentfs.proc import exe_of, running
from agentfs.trash.area import DATA, DEFAULT_HASH_LIMIT, TrashArea, entry_rest

log = logging.getLogger(__name__)
# deleted items remembered (by id) for folding into trees: `rm -rf` needs only those
# below directories it has not removed yet; deletions in directories that stay are
# forgotten past this many (they stay items of their own), so memory stays bounded
_REMEMBER = 50_000


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special"


def sha256_of(host: HostDir, rel: str, limit: int) -> str | None:
    """The content hash of a regular file up to *limit* bytes long (None beyond)."""
    st = host.lstat(rel)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        return None
    h = hashlib.sha256()
    fd = host.open_quiet(rel, os.O_RDONLY)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def stamp_of(st: os.stat_result, held: bool) -> list[int]:
    """What identifies unchanged content without reading it: held data only ever moves
    inside the trash (a rename changes its ctime), content left in a lower layer stays
    where it is, so its ctime must not change either."""
    return [st.st_ino, st.st_size, st.st_mtime_ns] + ([] if held else [st.st_ctime_ns])


def describe(host: HostDir, rel: str, entry_rel: str, hash_limit: int,
             held: bool = True, st: os.stat_result | None = None) -> dict[str, Any]:
    """Everything needed to put an object back as it was.  Content is identified by
    its stat stamp; it is hashed only up to *hash_limit* bytes (0: never), which
    deletions skip: reading every file `rm -rf` removes cost more than the delete.
    *st*: the object's lstat, if the caller just made one."""
    if st is None:
        st = host.lstat(rel)
    entry: dict[str, Any] = {
        "rel": entry_rel, "kind": kind_of(st.st_mode), "mode": st.st_mode, "uid": st.st_uid,
        "gid": st.st_gid, "size": st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
        "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
        "rdev": st.st_rdev, "xattrs": {}, "sha256": None, "held": held}
    if stat.S_ISREG(st.st_mode):
        entry["stamp"] = stamp_of(st, held)
    if stat.S_ISLNK(st.st_mode):
        entry["target"] = host.readlink(rel)
    else:
        with contextlib.suppress(OSError):
            for name in host.listxattr(rel):
                if name != MARKER:
                    entry["xattrs"][name] = base64.b64encode(host.getxattr(rel, name)).decode()
        if hash_limit:
            entry["sha256"] = sha256_of(host, rel, hash_limit)
    return entry


class TrashSink:
    """Implements `agentfs.overlay.engine.TrashHook` for one branch."""

    def __init__(self, area: TrashArea, branch: str,
                 hash_limit: int = DEFAULT_HASH_LIMIT) -> None:
        self.area = area
        self.branch = branch
        self.hash_limit = hash_limit
        # directory -> {name: item id} of items deleted in it (not yet folded into a
        # tree): removing the directory folds them in without scanning it.  Their
        # records are read back from the area (pending in its journal, or files), not
        # kept here: a long run of deletions grew the daemon by a record per item
        self._children: dict[str, dict[str, str]] = {}
        self._remembered = 0
        self._exes: dict[int, tuple[float, str]] = {}
        self._open: dict[int, tuple[str, str]] = {}  # ino of a still-open file -> (item, rel)

    # -- records ---------------------------------------------------------------------
    def _record(self, item_id: str, path: str, kind: str, reason: str,
                entries: list[dict[str, Any]], state: str = "final",
                folded: list[str] | None = None,
                rests: list[str] | None = None) -> dict[str, Any]:
        """*rests*: the entries' `entry_rest`s where the caller has them (a tree's
        children's, from the area), else they are encoded here."""
        pid, uid = CALLER.get()
        meta = {
            "id": item_id, "branch": self.branch, "path": path, "kind": kind,
            "reason": reason, "state": state, "deleted_at": time.time(),
            "pid": pid, "uid": uid, "exe": self._exe(pid),
            "daemon_pid": os.getpid(), "entries": entries}
        _totals(meta)
        self.area.add(item_id, meta, folded or (),
                      rests if rests is not None else [entry_rest(e) for e in entries])
        if self._remembered >= _REMEMBER:
            self._children.clear()
            self._remembered = 0
        parent, name = split(path)
        siblings = self._children.setdefault(parent, {})
        # an earlier deletion of the same name is replaced: it stays an item of its own
        self._remembered += name not in siblings
        siblings[name] = item_id
        return meta

    def _exe(self, pid: int) -> str:
        if pid <= 0:
            return ""
        now = time.monotonic()
        hit = self._exes.get(pid)
        if hit is None or now - hit[0] > 1.0:
            if len(self._exes) > 1024:
                self._exes.clear()
            hit = self._exes[pid] = (now, exe_of(pid))
        return hit[1]

    def _new(self) -> tuple[str, str]:
        item_id = self.area.create()
        return item_id, f"{item_id}{DATA}"

    # -- the hook ------------------------------------------------------------------------
    def take(self, path: str, host: HostDir, rel: str, st: os.stat_result, reason: str,
             link: bool = False) -> None:
        """Hold the object at *host*/*rel* (lstat *st*) as a new item.  The record is
        written before the data gets its trash name: a daemon killed in between leaves
        a record without data, which the next mount drops (`area.never_taken`: the
        object never left the view), never unrecorded data that shares the inode of
        the file still in the view (a later deletion of that file took the extra link
        for a second name and kept nothing)."""
        item_id, data = self._new()
        entry = describe(host, rel, "", 0, st=st)
        self._record(item_id, path, entry["kind"], reason, [entry])
        if link:
            host.link_to(rel, self.area.host, data)
        else:
            host.rename_to(rel, self.area.host, data)

    def hidden(self, path: str, layer: Layer, host: HostDir, rel: str, reason: str,
               st: os.stat_result | None = None) -> None:
        item_id, _ = self._new()
        entry = describe(host, rel, "", 0, held=False, st=st)
        entry["source"] = _source(layer, host, rel)
        self._record(item_id, path, entry["kind"], reason, [entry])

    def kept_open(self, path: str, ino: int, host: HostDir, rel: str, st: os.stat_result,
                  reason: str) -> None:
        item_id, data = self._new()
        entry = describe(host, rel, "", 0, st=st)  # recorded first, as in `take`
        self._record(item_id, path, entry["kind"], reason, [entry], state="open")
        host.link_to(rel, self.area.host, data)  # survives a crash; writes still land here
        self._open[ino] = (item_id, "")

    def closed(self, ino: int) -> None:
        """The last handle of a deleted file is gone: record its final content."""
        found = self._open.pop(ino, None)
        if found is None:
            return
        item_id, rel = found
        try:
            item = self.area.get(item_id)
        except KeyError:
            return  # purged
        entry = describe(self.area.host, item.data_rel(rel), rel, 0)
        meta = item.meta
        meta["entries"] = [entry if e["rel"] == rel else e for e in meta["entries"]]
        _totals(meta)
        if not any(open_id == item_id for open_id, _ in self._open.values()):
            meta["state"] = "final"
        self.area.write(item_id, meta)

    def dir_removed(self, path: str, layer: Layer, host: HostDir, rel: str,
                    reason: str) -> None:
        item_id, data = self._new()
        own = describe(host, rel, "", 0, held=False)
        own["source"] = _source(layer, host, rel)
        made_data = False  # the tree's data directory, made for the first held child
        entries = [own]
        rests: list[str] | None = [entry_rest(own)]
        state = "final"
        folded = []
        children = self._children.pop(path, {})
        self._remembered -= len(children)
        for sub, child_id in sorted(children.items()):
            child = self.area.record(child_id)
            if child is None:
                continue  # purged meanwhile
            child_rests = self.area.entry_rests(child_id) if rests is not None else None
            if child_rests is None or len(child_rests) != len(child.get("entries", ())):
                rests = None  # encoded as a whole by the area
            else:
                assert rests is not None
                rests.extend(child_rests)
            src = self.area.root / f"{child_id}{DATA}"
            # only held content has data here (a deleted base file's stays in the base)
            if any(e.get("held") for e in child.get("entries", ())) and os.path.lexists(src):
                if not made_data:
                    os.mkdir(self.area.root / data, 0o700)
                    made_data = True
                os.rename(src, self.area.root / data / sub)
            for entry in child.get("entries", []):
                entries.append({**entry, "rel": join(sub, entry["rel"]) if entry["rel"] else sub})
            if child.get("state") == "open":
                state = "open"
                for ino, (open_id, rel) in list(self._open.items()):
                    if open_id == child_id:
                        self._open[ino] = (item_id, join(sub, rel) if rel else sub)
            folded.append(child_id)
        # the tree's record and the end of its children's in one journal write (a
        # child that is only pending never becomes a file)
        self._record(item_id, path, "tree", reason, entries, state, folded,
                     rests if rests is not None else [entry_rest(e) for e in entries])

    def copied(self, path: str, host: HostDir, rel: str, reason: str) -> None:
        """Keep a copy of what is about to be overwritten (truncation under soft_delete)."""
        item_id, data = self._new()
        src = host.open_quiet(rel, os.O_RDONLY)
        try:
            dst = self.area.host.open(data, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _copy_fd(src, dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        st = host.lstat(rel)
        self.area.host.utime(data, st.st_atime_ns, st.st_mtime_ns)
        entry = describe(self.area.host, data, "", self.hash_limit)
        entry.update(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid)
        self._record(item_id, path, "file", reason, [entry])


def finalize_stale(area: TrashArea, hash_limit: int) -> int:
    """Entries left 'open' by a daemon that is gone (killed while a deleted file was
    open): nothing can write to them any more, so record what they hold now.  First
    the journals of writers that are gone become item files (`TrashArea.recover`)."""
    recovered = area.recover()
    if recovered:
        log.info("trash: %d records recovered from journals of dead writers", recovered)
    done = 0
    for item in area.items():
        meta = item.meta
        if meta.get("state") != "open" or running(int(meta.get("daemon_pid", 0))):
            continue
        entries = []
        for e in meta.get("entries", []):
            if e.get("held") and e["kind"] == "file":
                rel = item.data_rel(e["rel"])
                if area.host.try_lstat(rel) is not None:
                    e = describe(area.host, rel, e["rel"], hash_limit)
            entries.append(e)
        meta.update(entries=entries, state="final")
        _totals(meta)
        area.write(item.id, meta)
        done += 1
    return done



def _totals(meta: dict[str, Any]) -> None:
    entries = meta["entries"]
    meta["size"] = sum(e["size"] for e in entries if e["kind"] == "file")
    meta["held_bytes"] = sum(e["size"] for e in entries if e.get("held"))


def _source(layer: Layer, host: HostDir, rel: str) -> dict[str, Any]:
    where = "index" if layer.index is not None and host is layer.index else "tree"
    return {"layer": None if layer.is_base else layer.layer_id, "host": where, "rel": rel}


def _copy_fd(src: int, dst: int) -> None:
    while True:
        try:
            n = os.copy_file_range(src, dst, 1 << 30)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL):
                raise
            while chunk := os.read(src, 1 << 20):
                os.write(dst, chunk)
            return
        if n == 0:
            return
