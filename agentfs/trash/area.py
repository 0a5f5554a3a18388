"""The store's trash area: one directory per deleted thing, with its data and a record.

    <store>/trash/items/<id>.json   what was deleted, where, by whom, how to restore
    <store>/trash/items/<id>.data   the content the branch held (a file, or for a
                                    deleted tree a directory of what it held)
    <store>/trash/journal/<pid>-<start>-<n>.jsonl
                                    records not yet written as item files, one JSON
                                    line each, of one live writer (a TrashArea object)

(flat, so deleting a file costs a rename, all relative to one cached directory fd)

Content that lived in the branch's own layer is *moved* here (a rename, no copy).
Content that lived below (the base, or a frozen parent layer) was never destroyed, only
hidden by a whiteout: its entry points at it (`source`) and carries its sha256, so a
restore can tell whether it is still the same.

Ids are time-ordered (hex microseconds + a counter), so `ls` and sorting by id is
sorting by deletion time.

The journal.  `rm -rf` deletes files one by one and then folds them into one tree
item when their directory goes, so a record file per deleted file would be created
only to be removed milliseconds later.  A new record is instead appended to the
writer's journal (one write of one line, O_APPEND, no fsync: a killed process loses
nothing, the page cache keeps it) and kept in memory as *pending*.  Pending records
become `<id>.json` files (written to a temporary name and renamed, so a crash leaves
either no file or a whole one) in batches: at the next record once the oldest is
`FLUSH_AGE` seconds old, when there are many, when the mount daemon's timer asks
(`flush`), and at `close`; then the journal is truncated.  Folding a pending child
into a tree writes the tree's record and a `drop` line for the child in the same
write, and never creates or unlinks a file for the child.  Lines are

    {"op": "put", "id": ID, "meta": {...}}    a record (the last one of an id wins)
    {"op": "drop", "id": ID}                  the pending item is gone (folded, removed)

Readers (`items`, `get`) see the journals of every writer: their own pending items,
then the journals of other processes (a torn last line is ignored), then the item
files; while a journal holds an id, its record there wins over the file.  A journal
whose writer is gone (pid not running, or a different process start time) is still
read, and `recover` (called at every mount, from `finalize_stale`) writes its records
as item files and removes it.  Data without a record is an interrupted deletion and
is shown (and purged) as such.

Removing an item (restore, purge) that is pending: in the writer's own process it is
dropped from memory with a `drop` line, so neither a later batch nor a replay brings it
back.  An item pending in a *live other* process cannot be removed from here: `purge`
skips it (it is at most a few seconds old, the mount daemon materializes its batches on
a timer) and `remove` raises `PendingElsewhere` (a restore of a mounted branch runs in
its daemon anyway).  An item pending in a dead writer's journal is recovered into an
item file first and then removed like any other.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agentfs.overlay.hostio import HostDir
from agentfs.proc import running, start_time

log = logging.getLogger(__name__)

META: Final = ".json"
DATA: Final = ".data"
JOURNAL: Final = ".jsonl"
DEFAULT_MAX_AGE: Final = 30 * 86400.0
DEFAULT_MAX_SIZE: Final = 10 << 30
DEFAULT_HASH_LIMIT: Final = 64 << 20
FLUSH_AGE: Final = 1.5          # seconds a record may stay only in the journal
FLUSH_COUNT: Final = 4096       # ... or pending records at most
FLUSH_BYTES: Final = 32 << 20   # ... or journal bytes at most

_seq = itertools.count()
_writers = itertools.count()


def new_id() -> str:
    return f"{time.time_ns() // 1000:013x}{next(_seq) % 4096:03x}"


class PendingElsewhere(Exception):
    """The item is still only in the journal of another live process."""

    def __init__(self, item_id: str, writer: int) -> None:
        super().__init__(f"trash entry {item_id} is still being recorded by process "
                         f"{writer}; try again in a few seconds")
        self.item_id = item_id
        self.writer = writer


@dataclass
class TrashItem:
    id: str
    meta: dict[str, Any]

    @property
    def deleted_at(self) -> float:
        return float(self.meta.get("deleted_at", 0.0))

    @property
    def size(self) -> int:
        return int(self.meta.get("size", 0))

    @property
    def held_bytes(self) -> int:
        return int(self.meta.get("held_bytes", 0))

    @property
    def branch(self) -> str:
        return str(self.meta.get("branch", ""))

    @property
    def path(self) -> str:
        return str(self.meta.get("path", ""))

    def data_rel(self, rel: str = "") -> str:
        """Path of an entry's held data relative to the items directory."""
        return f"{self.id}{DATA}" + (f"/{rel}" if rel else "")

    def public(self) -> dict[str, Any]:
        m = self.meta
        return {"id": self.id, "branch": m.get("branch"), "path": m.get("path"),
                "kind": m.get("kind"), "size": m.get("size"), "entries": len(m.get("entries", [])),
                "deleted_at": m.get("deleted_at"), "reason": m.get("reason"),
                "pid": m.get("pid"), "exe": m.get("exe"), "state": m.get("state"),
                "held_bytes": self.held_bytes, "sha256": (m.get("entries") or [{}])[0].get("sha256")
                if m.get("kind") != "tree" else None}


@dataclass
class _Foreign:
    """What the journals of other writers hold: id -> record, and who wrote it."""

    metas: dict[str, dict[str, Any]]
    writer: dict[str, tuple[int, bool]]  # id -> (pid, alive)


def _writer_of(name: str) -> tuple[int, int] | None:
    """(pid, start time) from a journal's name, None if it is not one."""
    if not name.endswith(JOURNAL):
        return None
    parts = name[:-len(JOURNAL)].split("-")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def _alive(pid: int, start: int) -> bool:
    if not running(pid):
        return False
    now = start_time(pid)
    return start == 0 or now is None or now == start


def never_taken(items: Path, item_id: str, meta: dict[str, Any]) -> bool:
    """A dead writer's record of one held object whose data never got its trash name:
    the writer records first and links or moves second (`TrashSink.take`), so it died
    in between, and the object is still where it was.  Such a record is dropped."""
    entries = meta.get("entries")
    return (isinstance(entries, list) and len(entries) == 1
            and isinstance(entries[0], dict) and bool(entries[0].get("held"))
            and entries[0].get("rel") == ""
            and not os.path.lexists(items / f"{item_id}{DATA}"))


def _parse(raw: bytes) -> dict[str, dict[str, Any] | None]:
    """A journal's records, id -> meta (None: dropped); the last line counts only if
    it is complete."""
    out: dict[str, dict[str, Any] | None] = {}
    lines = raw.split(b"\n")
    for line in lines[:-1]:  # after the last newline: torn (or nothing)
        try:
            rec = json.loads(line)
            op, item_id = rec["op"], str(rec["id"])
        except (ValueError, KeyError, TypeError):
            continue
        if op == "put" and isinstance(rec.get("meta"), dict):
            out[item_id] = rec["meta"]
        elif op == "drop":
            out[item_id] = None
    return out


class TrashArea:
    """The trash directory of one store.  Safe to share between threads.

    *writer* (pid, process start time) names this object's journal; only tests give
    it, to write a journal as a process that is gone would have."""

    def __init__(self, store_root: Path, writer: tuple[int, int] | None = None) -> None:
        self.root = store_root / "trash" / "items"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.journal_dir = store_root / "trash" / "journal"
        self.journal_dir.mkdir(exist_ok=True, mode=0o700)
        self._host: HostDir | None = None
        self._lock = threading.RLock()
        pid = os.getpid() if writer is None else writer[0]
        start = (start_time(pid) or 0) if writer is None else writer[1]
        self.journal_name = f"{pid}-{start}-{next(_writers)}{JOURNAL}"
        self._jfd: int | None = None
        self._jbytes = 0
        self._pending: dict[str, dict[str, Any]] = {}
        # pending id -> its entries as JSON, without their "rel" (see `entry_json`): a
        # tree folds its children's entries in, and `rm -rf` folds every level of a
        # tree into the next, so they are encoded once, not once per level
        self._rests: dict[str, list[str]] = {}
        self._pending_since = 0.0  # time.monotonic() of the oldest pending record
        self._flush_failing = False  # the last flush failed (its warning was given)

    @property
    def host(self) -> HostDir:
        """The items directory as a HostDir, for renames to and from layer trees."""
        if self._host is None:
            self._host = HostDir(str(self.root))
        return self._host

    def close(self) -> None:
        """Write every pending record as an item file and remove the journal."""
        with self._lock:
            self._flush_locked()
            if self._jfd is not None:
                os.close(self._jfd)
                self._jfd = None
                if not self._pending:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.journal_dir / self.journal_name)
        if self._host is not None:
            self._host.close()
            self._host = None

    def create(self) -> str:
        return new_id()

    # -- writing -------------------------------------------------------------------------
    def entry_rests(self, item_id: str) -> list[str] | None:
        """A pending item's entries encoded as `add` was given them (`entry_rest`)."""
        with self._lock:
            return self._rests.get(item_id)

    def add(self, item_id: str, meta: dict[str, Any], folded: Iterable[str] = (),
            rests: list[str] | None = None) -> None:
        """Record a new item, which replaces the *folded* ones (their data is now in
        its data): one journal write, no file (see the module docstring).  *rests*:
        meta["entries"] already encoded, one `entry_rest` each (or None)."""
        folded = list(folded)
        with self._lock:
            if self._pending and time.monotonic() - self._pending_since >= FLUSH_AGE:
                self._flush_locked()
            if rests is not None and len(rests) == len(meta["entries"]):
                line = _put_line(item_id, meta, rests)
            else:
                line, rests = _line("put", item_id, meta), None
            stale = []  # folded items that are already files
            for old in folded:
                self._rests.pop(old, None)
                if self._pending.pop(old, None) is not None:
                    line += _line("drop", old)
                else:
                    stale.append(old)
            try:
                self._append(line)
            except OSError as exc:  # the journal cannot take it: write files now
                log.warning("trash journal %s: %s; writing records directly",
                            self.journal_name, exc)
                try:
                    self._write_file(item_id, meta)
                except OSError as exc:
                    # a full disk must not make the deletion fail (it has happened):
                    # the record waits in memory and a later flush writes it
                    log.warning("trash: cannot record %s (%s); kept in memory until "
                                "it can be written", item_id, exc)
                    if not self._pending:
                        self._pending_since = time.monotonic()
                    self._pending[item_id] = meta
                else:
                    self._flush_locked()
            else:
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending[item_id] = meta
                if rests is not None:
                    self._rests[item_id] = rests
            for old in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / f"{old}{META}")
            if len(self._pending) >= FLUSH_COUNT or self._jbytes >= FLUSH_BYTES:
                self._flush_locked()

    def write(self, item_id: str, meta: dict[str, Any]) -> None:
        """Replace an item's record (in the journal while it is pending)."""
        with self._lock:
            self._rests.pop(item_id, None)
            if item_id in self._pending:
                try:
                    self._append(_line("put", item_id, meta))
                except OSError:
                    self._pending[item_id] = meta
                    self._flush_locked()
                else:
                    self._pending[item_id] = meta
                return
            try:
                self._write_file(item_id, meta)
            except OSError as exc:  # a full disk: written by a later flush
                log.warning("trash: cannot update %s (%s); kept in memory", item_id, exc)
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending[item_id] = meta

    def flush(self, older_than: float | None = None) -> int:
        """Write pending records as item files (all, or only if the oldest is older than
        *older_than* seconds); returns how many were written."""
        with self._lock:
            if not self._pending or (older_than is not None and
                                     time.monotonic() - self._pending_since < older_than):
                return 0
            return self._flush_locked()

    def pending(self) -> list[str]:
        """Ids of this object's records that are only in its journal."""
        with self._lock:
            return list(self._pending)

    def _flush_locked(self) -> int:
        """Pending records to item files, then an empty journal (only it held them)."""
        try:
            for item_id, meta in self._pending.items():
                self._write_file(item_id, meta)
        except OSError as exc:  # all stay pending, the journal keeps them
            # said once per outage: the daemon retries every second while the disk is full
            if not self._flush_failing:
                log.warning("trash: cannot write pending records: %s (retrying quietly)",
                            exc)
                self._flush_failing = True
            return 0
        if self._flush_failing:
            log.warning("trash: pending records written again (%d)", len(self._pending))
            self._flush_failing = False
        n = len(self._pending)
        self._pending.clear()
        self._rests.clear()
        if self._jfd is not None and self._jbytes:
            os.ftruncate(self._jfd, 0)
            self._jbytes = 0
        return n

    def _append(self, line: bytes) -> None:
        if self._jfd is None:
            self._jfd = os.open(self.journal_dir / self.journal_name,
                                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        view = memoryview(line)
        while view:
            n = os.write(self._jfd, view)
            view = view[n:]
        self._jbytes += len(line)

    def _write_file(self, item_id: str, meta: dict[str, Any]) -> None:
        tmp = self.root / f"{item_id}{META}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                data = json.dumps(meta).encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.rename(tmp, self.root / f"{item_id}{META}")
        except OSError:  # a full disk: no half-written temp file left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- other writers' journals -----------------------------------------------------------
    def _journals(self) -> list[tuple[str, int, int]]:
        """(name, pid, start) of every journal but this object's own."""
        try:
            names = os.listdir(self.journal_dir)
        except FileNotFoundError:
            return []
        out = []
        for name in sorted(names):
            writer = _writer_of(name)
            if writer is not None and name != self.journal_name:
                out.append((name, *writer))
        return out

    def _foreign(self) -> _Foreign:
        metas: dict[str, dict[str, Any]] = {}
        writer: dict[str, tuple[int, bool]] = {}
        for name, pid, start in self._journals():
            try:
                raw = (self.journal_dir / name).read_bytes()
            except FileNotFoundError:
                continue  # recovered or closed meanwhile: its records are files now
            alive = None
            for item_id, meta in _parse(raw).items():
                if meta is None:
                    continue
                if alive is None:
                    alive = _alive(pid, start)
                metas[item_id] = meta
                writer[item_id] = (pid, alive)
        return _Foreign(metas, writer)

    def recover(self) -> int:
        """Write the records of journals whose writer is gone as item files and remove
        those journals; returns how many records were written."""
        done = 0
        for name, pid, start in self._journals():
            if _alive(pid, start):
                continue
            path = self.journal_dir / name
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # someone else recovers it
                try:
                    if os.fstat(fd).st_ino != os.stat(path).st_ino:
                        continue
                except FileNotFoundError:
                    continue  # recovered meanwhile
                size = os.fstat(fd).st_size
                raw = os.pread(fd, size, 0) if size else b""
                records = _parse(raw)
                for item_id, meta in records.items():
                    if meta is not None and not never_taken(self.root, item_id, meta):
                        self._write_file(item_id, meta)
                        done += 1
                os.unlink(path)
                if records:
                    log.info("trash: recovered %d records from %s", done, name)
            finally:
                os.close(fd)
        return done

    def pending_elsewhere(self, item_id: str) -> int | None:
        """The pid of the live other process whose journal alone holds *item_id*."""
        with self._lock:
            if item_id in self._pending:
                return None
        pid, alive = self._foreign().writer.get(item_id, (0, False))
        return pid if alive else None

    # -- reading ---------------------------------------------------------------------------
    def _view(self) -> tuple[dict[str, dict[str, Any]], _Foreign]:
        """This object's pending records and other journals' (read before the item
        files: a record leaves a journal only after its file is written)."""
        foreign = self._foreign()
        with self._lock:
            own = {k: dict(v) for k, v in self._pending.items()}
        return own, foreign

    def exists(self, item_id: str) -> bool:
        """Is *item_id* this object's pending item or an item file?"""
        with self._lock:
            if item_id in self._pending:
                return True
        return (self.root / f"{item_id}{META}").exists()

    def record(self, item_id: str) -> dict[str, Any] | None:
        """This object's record of *item_id* (pending or its file), or None: for
        readers that know the id is their own, without looking at other journals."""
        with self._lock:
            meta = self._pending.get(item_id)
            if meta is not None:
                return meta
        try:
            loaded: dict[str, Any] = json.loads((self.root / f"{item_id}{META}").read_text())
        except (OSError, ValueError):
            return None
        return loaded

    def get(self, item_id: str) -> TrashItem:
        """An item by id or unique id prefix (KeyError / ValueError if none / several)."""
        with self._lock:
            meta = self._pending.get(item_id)
            if meta is not None:
                return TrashItem(item_id, dict(meta))
        if not item_id:
            raise KeyError(item_id)
        own, foreign = self._view()
        for view in (own, foreign.metas):
            if item_id in view:
                return TrashItem(item_id, dict(view[item_id]))
        path = self.root / f"{item_id}{META}"
        if path.is_file():
            with contextlib.suppress(FileNotFoundError):
                return TrashItem(item_id, json.loads(path.read_text()))
        matches = sorted({p.split(".")[0] for p in os.listdir(self.root)
                          if p.startswith(item_id) and p.endswith(META)}
                         | {i for v in (own, foreign.metas) for i in v if i.startswith(item_id)})
        if len(matches) > 1:
            raise ValueError(f"{item_id!r} matches {len(matches)} trash entries")
        if not matches:
            raise KeyError(item_id)
        found = matches[0]
        for view in (own, foreign.metas):
            if found in view:
                return TrashItem(found, dict(view[found]))
        try:
            return TrashItem(found, json.loads((self.root / f"{found}{META}").read_text()))
        except FileNotFoundError:
            raise KeyError(item_id) from None

    def items(self) -> Iterator[TrashItem]:
        """Every item, oldest first (data without a record gets a stub record)."""
        own, foreign = self._view()
        yield from self._items(own, foreign)

    def _items(self, own: dict[str, dict[str, Any]], foreign: _Foreign
               ) -> Iterator[TrashItem]:
        names = os.listdir(self.root)
        ids = sorted({n.split(".")[0] for n in names if n.endswith((META, DATA))}
                     | own.keys() | foreign.metas.keys())
        for item_id in ids:
            meta = own.get(item_id) or foreign.metas.get(item_id)
            if meta is None:
                try:
                    meta = json.loads((self.root / f"{item_id}{META}").read_text())
                except (OSError, ValueError):
                    data = self.root / f"{item_id}{DATA}"
                    if not os.path.lexists(data):
                        continue
                    meta = {"id": item_id, "state": "incomplete", "kind": "?", "path": "?",
                            "deleted_at": data.lstat().st_mtime, "size": _du(data),
                            "held_bytes": _du(data), "entries": []}
            yield TrashItem(item_id, meta)

    # -- removing --------------------------------------------------------------------------
    def remove(self, item_id: str) -> None:
        """Delete an item for good (PendingElsewhere: see the module docstring)."""
        self._remove(item_id, None)

    def _remove(self, item_id: str, foreign: _Foreign | None) -> None:
        with self._lock:
            mine = self._pending.pop(item_id, None) is not None
            self._rests.pop(item_id, None)
            if mine:
                try:
                    self._append(_line("drop", item_id))
                except OSError:
                    self._flush_locked()  # the journal's put must not outlive the item
        if not mine:
            foreign = self._foreign() if foreign is None else foreign
            pid, alive = foreign.writer.get(item_id, (0, False))
            if alive:
                raise PendingElsewhere(item_id, pid)
            if pid:
                self.recover()  # its journal would bring it back at the next mount
        data = self.root / f"{item_id}{DATA}"
        if data.is_dir() and not data.is_symlink():
            shutil.rmtree(data, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                data.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{item_id}{META}").unlink()

    def purge(self, older_than: float | None = None, max_size: int | None = None,
              dry_run: bool = False, now: float | None = None) -> list[TrashItem]:
        """Remove items deleted more than *older_than* seconds ago, then the oldest
        until what is held fits *max_size* bytes; return what was (or would be) removed.
        Items whose file is still open somewhere, and items still pending in another
        live process's journal, are kept."""
        now = time.time() if now is None else now
        own, foreign = self._view()
        items = [i for i in self._items(own, foreign) if i.meta.get("state") != "open"
                 and not foreign.writer.get(i.id, (0, False))[1]]
        doomed: list[TrashItem] = []
        if older_than is not None:
            doomed = [i for i in items if now - i.deleted_at > older_than]
        if max_size is not None:
            kept = [i for i in items if i not in doomed]
            total = sum(i.held_bytes for i in kept)
            for item in kept:  # oldest first
                if total <= max_size:
                    break
                doomed.append(item)
                total -= item.held_bytes
        if not dry_run:
            for item in doomed:
                self._remove(item.id, foreign)
        return doomed


def entry_rest(entry: dict[str, Any]) -> str:
    """An entry as JSON without its "rel": `'{"rel": ' + json.dumps(rel) + rest` is the
    entry under any rel (a folded child's entries get their directory's prefix)."""
    body = json.dumps({k: v for k, v in entry.items() if k != "rel"})
    return ", " + body[1:] if len(body) > 2 else "}"


def _put_line(item_id: str, meta: dict[str, Any], rests: list[str]) -> bytes:
    """_line("put", item_id, meta) with the entries from their encoded *rests*: the same
    JSON value, only the other fields are encoded here."""
    head = json.dumps({k: v for k, v in meta.items() if k != "entries"})
    dumps = json.dumps
    entries = ", ".join(['{"rel": ' + dumps(e["rel"]) + rest
                         for e, rest in zip(meta["entries"], rests, strict=True)])
    body = (head[:-1] + ", " if len(head) > 2 else "{") + '"entries": [' + entries + "]}"
    return ('{"op": "put", "id": ' + dumps(item_id) + ', "meta": ' + body + "}\n").encode()


def _line(op: str, item_id: str, meta: dict[str, Any] | None = None) -> bytes:
    rec: dict[str, Any] = {"op": op, "id": item_id}
    if meta is not None:
        rec["meta"] = meta
    return json.dumps(rec).encode() + b"\n"


def _du(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
