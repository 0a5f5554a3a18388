"""The commit evidence of a store layer's whiteouts, kept beside its tree.

A whiteout used to be a file of its own carrying its stamp ("bst": the size, mtime
and path of the lower object it hides, as the branch saw it when deleting it) in its
marker.  Making an inode costs more than anything else in a delete (on the bench
machine 110-225 us against 5 us for a link), so whiteouts are now names of one shared
inode per work area, like kernel overlayfs' since Linux 5.8, and a shared inode
cannot carry a stamp per name.  The stamps go here instead: an append-only file of
JSON lines ``[key, stamp or null]`` where *key* is the ``stamp_path`` of the
whiteout's path when it was made; the last line for a key wins and null withdraws
it.  A line is appended before the whiteout is linked, so a whiteout never lacks
the evidence it was made with (a line without a whiteout is evidence nobody asks for).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Final

log = logging.getLogger(__name__)
_encode: Final = json.JSONEncoder(separators=(",", ":")).encode
# a log this many lines longer than twice what it says is rewritten by its writer
_COMPACT_SLACK = 4096


class StampLog:
    """The stamps of one layer, read on first use and appended to by its writer."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamps: dict[str, list[Any]] | None = None
        self._fd: int | None = None
        self._torn = False  # the log ends in a line a crash cut short (no newline)

    def get(self, key: str) -> list[Any] | None:
        return self._load().get(key)

    def record(self, key: str, stamp: list[Any] | None) -> None:
        """Evidence for a whiteout about to be made at the path *key* names (None:
        none, which withdraws what an earlier whiteout there left)."""
        stamps = self._load(compact=True)
        if stamp is None and key not in stamps:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        line = (_encode([key, stamp]) + "\n").encode()
        os.write(self._fd, b"\n" + line if self._torn else line)
        self._torn = False
        if stamp is None:
            del stamps[key]
        else:
            stamps[key] = stamp

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _load(self, compact: bool = False) -> dict[str, list[Any]]:
        if self._stamps is not None:
            return self._stamps
        stamps: dict[str, list[Any]] = {}
        lines = 0
        try:
            with open(self.path, "rb") as f:
                for raw in f:
                    lines += 1
                    self._torn = not raw.endswith(b"\n")
                    try:
                        line = json.loads(raw)
                    except ValueError:
                        continue  # a line torn by a crash: the whiteout after it never came
                    if not (isinstance(line, list) and len(line) == 2
                            and isinstance(line[0], str)):
                        continue
                    key, stamp = line
                    if stamp is None:
                        stamps.pop(key, None)
                    elif isinstance(stamp, list):
                        stamps[key] = stamp
        except FileNotFoundError:
            pass
        self._stamps = stamps
        if compact and lines > 2 * len(stamps) + _COMPACT_SLACK:
            self._compact()
        return stamps

    def _compact(self) -> None:
        """Rewrite the log as what it says (temp file, fsync, rename: a crash leaves
        the old log or the new one)."""
        assert self._stamps is not None
        self.close()  # appends must go to the new log
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.writelines((_encode([k, v]) + "\n").encode() for k, v in self._stamps.items())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._torn = False
        except OSError as exc:  # the long log stays: it says the same
            log.warning("could not compact %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
