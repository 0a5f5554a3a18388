"""Printing a branch diff the way `git diff` does (--name-status, --stat, patches)."""

from __future__ import annotations

import difflib
import stat
import sys
from collections.abc import Callable

from agentfs.overlay.diff import ADDED, DELETED, RENAMED, Change, Entry, ViewReader

MAX_TEXT = 8 << 20  # larger files are summarised, like binaries


class Painter:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text


def name_status(changes: list[Change]) -> str:
    lines = []
    for c in changes:
        side = c.new or c.old
        if c.status in (ADDED, DELETED) and side is not None and side.kind == "dir":
            continue  # like git: directories appear through their files
        if c.status == RENAMED:
            score = 100 if not c.content_changed else 50
            lines.append(f"R{score:03d}\t{c.old_path}\t{c.path}")
        else:
            lines.append(f"{c.status}\t{c.path}")
    return "".join(line + "\n" for line in lines)


def _text(data: bytes) -> list[str] | None:
    if b"\0" in data[:8192] or len(data) > MAX_TEXT:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _lines(reader: ViewReader, entry: Entry | None) -> list[str] | None:
    if entry is None:
        return []
    if entry.kind == "symlink":
        return [reader.readlink(entry)]
    if entry.kind != "file":
        return []
    return _text(reader.read(entry))


def line_counts(change: Change, new: ViewReader, old: ViewReader) -> tuple[int, int] | None:
    """(insertions, deletions), or None for binary content."""
    a, b = _lines(old, change.old), _lines(new, change.new)
    if a is None or b is None:
        return None
    plus = minus = 0
    for line in difflib.unified_diff(a, b, n=0):
        if line.startswith("+") and not line.startswith("+++"):
            plus += 1
        elif line.startswith("-") and not line.startswith("---"):
            minus += 1
    return plus, minus


def diffstat(changes: list[Change], new: ViewReader, old: ViewReader) -> str:
    rows = []
    total_plus = total_minus = 0
    for c in changes:
        if c.status != DELETED and c.new is not None and c.new.kind == "dir":
            continue
        if c.status == DELETED and c.old is not None and c.old.kind == "dir":
            continue
        name = f"{c.old_path} => {c.path}" if c.status == RENAMED else c.path
        counts = line_counts(c, new, old)
        if counts is None:
            rows.append((name, "Bin"))
            continue
        plus, minus = counts
        total_plus += plus
        total_minus += minus
        rows.append((name, f"{plus + minus} {'+' * min(plus, 40)}{'-' * min(minus, 40)}"))
    width = max((len(n) for n, _ in rows), default=0)
    out = [f" {n.ljust(width)} | {s}" for n, s in rows]
    out.append(f" {len(rows)} file{'s' if len(rows) != 1 else ''} changed, "
               f"{total_plus} insertions(+), {total_minus} deletions(-)")
    return "\n".join(out) + "\n"


def _mode(entry: Entry) -> str:
    kind = {"file": 0o100000, "symlink": 0o120000, "dir": 0o040000}.get(entry.kind, 0)
    return f"{kind | stat.S_IMODE(entry.mode):06o}"


def patch(changes: list[Change], new: ViewReader, old: ViewReader, color: bool,
          write: Callable[[str], object] = sys.stdout.write) -> None:
    paint = Painter(color)
    for c in changes:
        if (c.new is not None and c.new.kind == "dir") or (
                c.new is None and c.old is not None and c.old.kind == "dir"):
            if c.mode_changed and c.old and c.new:
                write(paint("1", f"diff --git a/{c.path}/ b/{c.path}/\n"))
                write(f"old mode {_mode(c.old)}\nnew mode {_mode(c.new)}\n")
            continue
        a_path = c.old_path or c.path
        write(paint("1", f"diff --git a/{a_path} b/{c.path}\n"))
        if c.status == ADDED and c.new:
            write(paint("1", f"new file mode {_mode(c.new)}\n"))
        elif c.status == DELETED and c.old:
            write(paint("1", f"deleted file mode {_mode(c.old)}\n"))
        elif c.old and c.new and (c.mode_changed or c.old.kind != c.new.kind):
            write(paint("1", f"old mode {_mode(c.old)}\nnew mode {_mode(c.new)}\n"))
        if c.status == RENAMED:
            write(paint("1", f"rename from {c.old_path}\nrename to {c.path}\n"))
        if not c.content_changed:
            continue
        a, b = _lines(old, c.old), _lines(new, c.new)
        src = "/dev/null" if c.status == ADDED else f"a/{a_path}"
        dst = "/dev/null" if c.status == DELETED else f"b/{c.path}"
        if a is None or b is None:
            write(f"Binary files {src} and {dst} differ\n")
            continue
        for line in difflib.unified_diff(a, b, src, dst):
            if not line.endswith("\n"):
                line += "\n\\ No newline at end of file\n"
            if line.startswith(("---", "+++")):
                write(paint("1", line))
            elif line.startswith("@@"):
                write(paint("36", line))
            elif line.startswith("+"):
                write(paint("32", line))
            elif line.startswith("-"):
                write(paint("31", line))
            else:
                write(line)
