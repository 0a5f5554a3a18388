"""The audit log: every checked operation with its decision, in `<store>/audit.db`.

The FUSE thread only puts events on a bounded queue (`emit` never blocks and never
does I/O); a writer thread inserts them in batches (one transaction per batch).  When
the queue is full, or a batch cannot be written (a full disk), the events are
counted, not stored, and the count itself is written as an `audit_dropped` event as
soon as the log takes writes again: losses are on record, never silent, and never
stop the mount (`agentfs status` shows the count of a running mount).  `close`
drains the queue, so a clean unmount loses nothing.  In strict mode the mount
refuses operations while the writer is unhealthy (a failing disk) or the queue is
full.

SQLite in WAL mode lets `agentfs audit` read while mounts write; several mounts of
one store share the file (each event names its mount and carries its own sequence).
"""

from __future__ import annotations

import collections
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    select,
)

from agentfs.branches.store import Store, sqlite_pragmas

log = logging.getLogger(__name__)

QUEUE_SIZE: Final = 50_000
BATCH: Final = 2_000
FLUSH_EVERY: Final = 0.2  # seconds an event may wait in the queue

metadata = MetaData()
events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts_us", BigInteger, nullable=False),     # UTC, microseconds since the epoch
    Column("seq", BigInteger, nullable=False),       # per mount daemon
    Column("mount", String, nullable=False, default=""),
    Column("session", String, nullable=False, default=""),
    Column("branch", String, nullable=False, default=""),
    Column("pid", Integer, nullable=False, default=0),
    Column("exe", String, nullable=False, default=""),
    Column("cmdline", String, nullable=False, default=""),
    Column("uid", Integer, nullable=False, default=-1),
    Column("op", String, nullable=False),
    Column("path", String, nullable=False, default=""),
    Column("dst", String, nullable=False, default=""),
    Column("decision", String, nullable=False, default="allow"),
    Column("rule", String, nullable=False, default=""),
    Column("policy_sha256", String, nullable=False, default=""),
    Column("errno", Integer, nullable=False, default=0),
    Column("count", Integer, nullable=False, default=1),   # calls summarised (read/write)
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("duration_us", BigInteger, nullable=False, default=0),
)
Index("events_ts", events.c.ts_us)
Index("events_path", events.c.path)
COLUMNS: Final = [c.name for c in events.columns if c.name != "id"]
_OP: Final = COLUMNS.index("op")
_COUNT: Final = COLUMNS.index("count")
_DEFAULTS: Final = {c.name: getattr(c.default, "arg", None) for c in events.columns
                    if c.default is not None}


def _row(**fields: Any) -> tuple[Any, ...]:
    """An event row in column order, defaults where *fields* has no value."""
    return tuple(fields.get(c, _DEFAULTS.get(c)) for c in COLUMNS)


def _printable(value: Any) -> Any:
    """A str with bytes that are not UTF-8 (surrogate escapes, as paths arrive) as
    backslash escapes, which SQLite can store; anything else as it is."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def open_db(store_root: Path) -> Engine:
    engine = create_engine(f"sqlite:///{store_root / 'audit.db'}")
    event.listen(engine, "connect", sqlite_pragmas)
    metadata.create_all(engine)
    return engine


class AuditLog:
    """The writer side: owned by one mount daemon."""

    def __init__(self, store_root: Path, mount: str, strict: bool = False,
                 queue_size: int = QUEUE_SIZE) -> None:
        self.engine = open_db(store_root)
        self.mount = mount
        self.strict = strict
        self.capacity = queue_size
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._seq = itertools.count(1)
        self._dropped = 0        # lost events not yet recorded as an audit_dropped event
        self.dropped_total = 0   # every event lost since the mount started
        self._dropped_lock = threading.Lock()
        self._stop = threading.Event()
        self._conn: sqlite3.Connection | None = None
        self.written = 0
        self.healthy = True
        self.last_error = ""
        self._db = str(store_root / "audit.db")
        self._sql = (f"INSERT INTO events ({', '.join(COLUMNS)}) "
                     f"VALUES ({', '.join('?' for _ in COLUMNS)})")
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # -- FUSE side -----------------------------------------------------------------------
    def emit(self, **fields: Any) -> None:
        """Queue one event given by column name (the others take their defaults)."""
        fields.setdefault("ts_us", time.time_ns() // 1000)
        fields["seq"] = next(self._seq)
        fields["mount"] = self.mount
        self._queue(_row(**fields))

    def emit_request(self, session: str, branch: str, pid: int, exe: str, cmdline: str,
                     uid: int, op: str, path: str, dst: str, decision: str, rule: str,
                     policy_sha256: str, errno: int, duration_us: int, count: int = 1,
                     nbytes: int = 0) -> None:
        """Queue one checked request's event (or a handle's reads or writes: *count*
        calls, *nbytes* bytes): the row in column order, built without a dict (this runs
        on the FUSE thread for every request)."""
        self._queue((time.time_ns() // 1000, next(self._seq), self.mount, session, branch,
                     pid, exe, cmdline, uid, op, path, dst, decision, rule, policy_sha256,
                     errno, count, nbytes, duration_us))

    def _queue(self, row: tuple[Any, ...]) -> None:
        """An append to a deque, no lock, no wake-up of the writer (which drains the
        queue every FLUSH_EVERY seconds)."""
        if len(self._pending) >= self.capacity:
            with self._dropped_lock:
                self._dropped += 1
                self.dropped_total += 1
            return
        self._pending.append(row)

    def refuses(self) -> bool:
        """Strict mode: operations must fail while events cannot be recorded."""
        return self.strict and (not self.healthy or len(self._pending) >= self.capacity)

    # -- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        """Drain the queue in batches until stopped, then drain it once more.  Rows go
        in through sqlite3 directly: executemany of plain tuples is several times
        cheaper than building them through SQLAlchemy, and this thread shares the GIL
        with the FUSE loop."""
        while True:
            stopping = self._stop.wait(FLUSH_EVERY)
            while True:
                batch: list[tuple[Any, ...]] = []
                while self._pending and len(batch) < BATCH:
                    batch.append(self._pending.popleft())
                with self._dropped_lock:
                    dropped, self._dropped = self._dropped, 0
                if dropped:
                    batch.append(_row(ts_us=time.time_ns() // 1000, seq=next(self._seq),
                                      mount=self.mount, op="audit_dropped", count=dropped))
                if not batch:
                    break
                if self._conn is None:
                    self._conn = self._connect()
                if not self._write(self._conn, batch):
                    self._conn = None
                    break
                if dropped:
                    log.warning("audit: %d events were dropped (recorded as audit_dropped)",
                                dropped)
            if stopping:
                break
        if self._conn is not None:
            self._conn.close()

    def _connect(self) -> sqlite3.Connection | None:
        try:
            conn = sqlite3.connect(self._db, timeout=10, check_same_thread=False)
            sqlite_pragmas(conn, None)
            return conn
        except sqlite3.Error as exc:
            self.healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
            log.error("audit log unavailable: %s", exc)
            return None

    def _write(self, conn: sqlite3.Connection | None, rows: list[tuple[Any, ...]]) -> bool:
        for attempt in range(3):
            try:
                if conn is None:
                    raise sqlite3.OperationalError("no connection to the audit log")
                try:
                    with conn:
                        conn.executemany(self._sql, rows)
                except UnicodeEncodeError:  # a name that is not UTF-8: stored escaped
                    rows = [tuple(_printable(v) for v in row) for row in rows]
                    with conn:
                        conn.executemany(self._sql, rows)
                self.written += len(rows)
                if not self.healthy:
                    log.info("audit log writable again")
                self.healthy, self.last_error = True, ""
                return True
            except Exception as exc:  # a full disk, a locked database, ...: never fatal
                if not isinstance(exc, sqlite3.Error):
                    log.exception("audit write failed")
                if self.healthy:  # once per outage, not once per batch (the log may
                    log.error("audit write failed: %s", exc)  # be on the full disk too)
                self.healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
                time.sleep(0.2 * (attempt + 1))
                conn = self._connect() if conn is None else conn
        # the batch is lost: counted, and recorded as an audit_dropped event once the
        # log works again (a marker of earlier losses carries their count forward)
        lost = sum(row[_COUNT] if row[_OP] == "audit_dropped" else 1 for row in rows)
        with self._dropped_lock:
            self._dropped += lost
            self.dropped_total += sum(1 for row in rows if row[_OP] != "audit_dropped")
        return False

    def stats(self) -> dict[str, Any]:
        """For `agentfs status`: events written, dropped (queue overflow or a failing
        disk), waiting, and whether the log is writable."""
        return {"written": self.written, "dropped": self.dropped_total,
                "queued": len(self._pending), "healthy": self.healthy,
                "last_error": self.last_error}

    def close(self) -> None:
        """Write everything queued, then stop."""
        self._stop.set()
        self._thread.join(timeout=60)
        self.engine.dispose()


# -- reading ---------------------------------------------------------------------------------
def query(store_root: Path, since_us: int | None = None, until_us: int | None = None,
          after_id: int = 0, ops: list[str] | None = None, pid: int | None = None,
          decisions: list[str] | None = None, branch: str | None = None,
          limit: int | None = None, newest_first: bool = False) -> Iterator[dict[str, Any]]:
    engine = open_db(store_root)
    try:
        stmt = select(events).where(events.c.id > after_id)
        if since_us is not None:
            stmt = stmt.where(events.c.ts_us >= since_us)
        if until_us is not None:
            stmt = stmt.where(events.c.ts_us <= until_us)
        if ops:
            stmt = stmt.where(events.c.op.in_(ops))
        if pid is not None:
            stmt = stmt.where(events.c.pid == pid)
        if decisions:
            stmt = stmt.where(events.c.decision.in_(decisions))
        if branch is not None:
            stmt = stmt.where(events.c.branch == branch)
        stmt = stmt.order_by(events.c.id.desc() if newest_first else events.c.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with engine.connect() as conn:
            for row in conn.execute(stmt):
                yield dict(row._mapping)
    finally:
        engine.dispose()


DEFAULT_MAX_AGE: Final = 90 * 86400.0


def audit_max_age(store: Store) -> float:
    value = store.info("audit.max_age")
    return float(value) if value else DEFAULT_MAX_AGE


def purge_older_than(store_root: Path, cutoff_us: int) -> int:
    engine = open_db(store_root)
    try:
        with engine.begin() as conn:
            return int(conn.execute(delete(events).where(events.c.ts_us < cutoff_us)).rowcount)
    finally:
        engine.dispose()
