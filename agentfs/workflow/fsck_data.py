"""fsck of the trash (records vs data, journals, temporaries) and of the audit log
(sequence numbers).  See `agentfs.workflow.fsck` for what is repaired and why."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import time
from functools import partial
from pathlib import Path
from typing import Any

from agentfs.proc import running
from agentfs.trash.area import DATA, META, _alive, _parse, _writer_of, never_taken
from agentfs.workflow.fsck import Checker

GAP_OP = "audit_gap"  # an event fsck writes to put a gap in the sequence on record


# -- trash --------------------------------------------------------------------------------
def check_trash(chk: Checker) -> None:
    items = chk.root / "trash" / "items"
    journals = chk.root / "trash" / "journal"
    if not items.is_dir() and not journals.is_dir():
        return
    in_journals, dead = _check_journals(chk, journals)
    names = sorted(os.listdir(items)) if items.is_dir() else []
    records: dict[str, dict[str, Any]] = {}
    data = set()
    for name in names:
        path = items / name
        if name.endswith(META):
            item_id = name[:-len(META)]
            try:
                meta = json.loads(path.read_text())
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                chk.find("bad-trash-record", str(path), f"unreadable ({exc}); its data, if "
                         "any, stays listed as an incomplete entry",
                         fix=partial(chk.move_aside, path, f"trash/{name}"))
                continue
            records[item_id] = meta
        elif name.endswith(DATA):
            data.add(name[:-len(DATA)])
        elif ".tmp" in name:  # <id>.json.<pid>.tmp: a record being written
            pid = name.rsplit(".", 2)[-2]
            if pid.isdigit() and running(int(pid)):
                continue
            chk.find("leftover-temp", str(path), "a trash record half written by a process "
                     "that is gone", fix=partial(_unlink, path))
        else:
            chk.find("unknown-trash-file", str(path), "not a trash record or data",
                     notice=True)
    chk.count("trash records", len(records))
    # records a dead writer's journal holds become files at repair; check them too
    for item_id, meta in dead.items():
        if not never_taken(items, item_id, meta):  # repair (recovery) drops those
            records.setdefault(item_id, meta)
    for item_id, meta in sorted(records.items()):
        held = any(e.get("held") for e in meta.get("entries", ()) if isinstance(e, dict))
        if held and item_id not in data and not meta.get("damaged"):
            path = items / f"{item_id}{META}"
            chk.find("trash-data-missing", f"trash {item_id}",
                     f"its record says the trash holds {meta.get('path')!r} but "
                     f"{item_id}{DATA} is missing; it cannot be restored",
                     fix=partial(_mark_damaged, path, meta))
        if meta.get("state") == "open" and not running(int(meta.get("daemon_pid", 0) or 0)):
            chk.find("trash-open-stale", f"trash {item_id}",
                     "left 'open' by a daemon that is gone (a deleted file open at the kill)",
                     fix=partial(_finalize, chk))
    for item_id in sorted(data - records.keys() - in_journals):
        chk.find("trash-data-unrecorded", f"trash {item_id}",
                 "data without a record (a deletion interrupted before it was recorded); "
                 "`trash list` shows it as incomplete, `trash purge` removes it", notice=True)


def _check_journals(chk: Checker, journals: Path) -> tuple[set[str], dict[str, Any]]:
    """Every id any journal names, and the records of journals whose writer is gone."""
    ids: set[str] = set()
    dead: dict[str, Any] = {}
    try:
        names = sorted(os.listdir(journals))
    except FileNotFoundError:
        return ids, dead
    for name in names:
        path = journals / name
        writer = _writer_of(name)
        if writer is None:
            chk.find("unknown-trash-file", str(path), "not a trash journal", notice=True)
            continue
        chk.count("trash journals")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        parsed = _parse(raw)
        ids.update(parsed)
        if _alive(*writer):
            continue
        puts = {k: v for k, v in parsed.items() if v is not None}
        dead.update(puts)
        torn = " (its torn last line is ignored)" if raw and not raw.endswith(b"\n") else ""
        chk.find("trash-journal-unrecovered", str(path),
                 f"journal of process {writer[0]}, which is gone: {len(puts)} record(s) "
                 f"not yet written as items{torn}", fix=partial(_finalize, chk))
    return ids, dead


def _finalize(chk: Checker) -> str:
    """Recover dead writers' journals and finalize stale 'open' entries, once per run
    (the mount does the same at start-up)."""
    if "trash" not in chk.memo:
        from agentfs.trash.service import Trash

        trash = Trash(chk.store)
        try:
            recovered = trash.area.recover()
            finished = trash.finalize_stale()
        finally:
            trash.close()
        chk.memo["trash"] = (f"journals recovered ({recovered} records); {finished} open "
                             "entries finalized")
    return chk.memo["trash"]


def _mark_damaged(path: Path, meta: dict[str, Any]) -> str:
    meta = {**meta, "damaged": f"data missing (found by agentfs fsck, {time.ctime()})"}
    area_tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    area_tmp.write_text(json.dumps(meta))
    os.rename(area_tmp, path)
    return "record marked damaged"


def _unlink(path: Path) -> str:
    path.unlink()
    return "removed"


# -- audit --------------------------------------------------------------------------------
def check_audit(chk: Checker) -> None:
    """Each daemon run numbers its events 1, 2, ... (per mount; a new run starts at 1
    again).  A kill loses the last fraction of a second, never the middle; a gap in
    the middle not explained by an `audit_dropped` count is reported, and --repair
    writes an `audit_gap` event so the loss is on record."""
    db = chk.root / "audit.db"
    if not db.exists():
        return
    try:
        conn = sqlite3.connect(db, timeout=10)
        try:
            rows = list(conn.execute("SELECT id, mount, seq, op, count, dst FROM events "
                                     "ORDER BY id"))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        chk.find("db-unreadable", "audit.db", f"events cannot be read: {exc}")
        return
    chk.count("audit events", len(rows))
    runs: dict[str, list[list[tuple[int, int, str, int]]]] = {}
    documented: dict[str, int] = {}
    for rid, mount, seq, op, count, dst in rows:
        if op == GAP_OP:
            documented[dst] = documented.get(dst, 0) + int(count)
            continue
        mine = runs.setdefault(mount, [])
        # seq 1 starts the next daemon run, unless it is the current (young) run's own
        # first event, queued a little late by another thread
        if not mine or (seq == 1 and (len(mine[-1]) >= 64
                                      or any(s == 1 for _i, s, _o, _n in mine[-1]))):
            mine.append([])
        mine[-1].append((rid, seq, op, count))
    for mount, mount_runs in runs.items():
        for run in mount_runs:
            _check_run(chk, mount, run, documented.get(f"run:{run[0][0]}", 0))


def _check_run(chk: Checker, mount: str, run: list[tuple[int, int, str, int]],
               documented: int) -> None:
    seqs = sorted(seq for _id, seq, _op, _n in run)
    dupes = sum(1 for a, b in itertools.pairwise(seqs) if a == b)
    where = f"audit run of {mount} from event {run[0][0]}"
    if dupes:
        chk.find("audit-duplicate-seq", where, f"{dupes} sequence number(s) appear twice")
    missing = (seqs[-1] - seqs[0] + 1) - (len(seqs) - dupes)
    dropped = sum(n for _id, _seq, op, n in run if op == "audit_dropped")
    unexplained = missing - dropped - documented
    if unexplained <= 0:
        return
    first_id = run[0][0]

    def document() -> str:
        conn = sqlite3.connect(chk.root / "audit.db", timeout=10)
        try:
            with conn:
                conn.execute("INSERT INTO events (ts_us, seq, mount, session, branch, pid, "
                             "exe, cmdline, uid, op, path, dst, decision, rule, "
                             "policy_sha256, errno, count, bytes, duration_us) VALUES "
                             "(?, 0, ?, '', '', 0, '', '', -1, ?, '', ?, 'allow', '', '', "
                             "0, ?, 0, 0)", (time.time_ns() // 1000, mount, GAP_OP,
                                            f"run:{first_id}", unexplained))
        finally:
            conn.close()
        return f"recorded as an {GAP_OP} event"

    chk.find("audit-gap", where, f"{unexplained} event(s) missing between sequence "
             f"{seqs[0]} and {seqs[-1]} (not counted as dropped)", fix=document)

