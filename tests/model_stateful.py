"""Stateful model test: drive a view and a plain-directory model with identical operations.

``make_overlay_machine(make_target)`` builds a hypothesis ``RuleBasedStateMachine``.
``make_target()`` must return ``(target_fs, base_dir, cleanup)`` where ``base_dir`` was
populated with :func:`populate_base` *before* the view on top of it was created.  The machine
copies ``base_dir`` (hard links and symlinks preserved) into a private plain directory that
serves as the model, applies every rule to both, demands identical errnos, and after every step
compares the two trees and checks the base directory was not modified.

Names come from a four-letter alphabet and at most three levels, so operations collide with
each other (and with base entries) constantly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from fsfacade import RENAME_EXCHANGE, RENAME_NOREPLACE, FsFacade, OsFacade
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

T = TypeVar("T")

NAMES = "abcd"
MODES = [0o644, 0o600, 0o755, 0o700, 0o444, 0o4755]
MAX_HANDLES = 4

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
# Symlink targets never contain '..' so following a link can never leave the view.
link_targets = st.lists(st.sampled_from(NAMES), min_size=1, max_size=2).map("/".join)
payloads = st.binary(min_size=0, max_size=200)
offsets = st.one_of(st.integers(0, 300), st.integers(4090, 4100), st.integers(0, 70_000))

MakeTarget = Callable[[], tuple[FsFacade, str, Callable[[], None]]]


# --------------------------------------------------------------------------- base tree


def populate_base(base_dir: str) -> None:
    """Write the fixed base tree: files, nested dirs, symlinks and a hard-linked pair."""

    def f(rel: str, data: bytes, mode: int = 0o644) -> str:
        p = os.path.join(base_dir, rel)
        with open(p, "wb") as fh:
            fh.write(data)
        os.chmod(p, mode)
        return p

    def d(rel: str, mode: int = 0o755) -> None:
        p = os.path.join(base_dir, rel)
        os.mkdir(p)
        os.chmod(p, mode)

    f("a", b"base a\n" * 3)
    d("b")
    f("b/a", bytes((i * 31) & 0xFF for i in range(5000)))
    d("b/b")
    f("b/b/c", b"only root reads this\n", 0o600)
    f("b/c", b"#!/bin/sh\necho hi\n", 0o755)
    os.symlink("c", os.path.join(base_dir, "b/d"))
    os.symlink("a", os.path.join(base_dir, "c"))
    d("d")
    pair = f("d/a", b"linked twice\n")
    os.link(pair, os.path.join(base_dir, "d/b"))
    d("d/c", 0o700)


def copy_tree(src: str, dst: str) -> None:
    """shutil.copytree keeping symlinks *and* hard links (copytree alone splits them)."""
    seen: dict[tuple[int, int], str] = {}

    def copy(s: str, t: str) -> str:
        st_ = os.lstat(s)
        key = (st_.st_dev, st_.st_ino)
        if st_.st_nlink > 1 and key in seen:
            os.link(seen[key], t)
        else:
            shutil.copy2(s, t)
            seen[key] = t
        return t

    shutil.copytree(src, dst, symlinks=True, copy_function=copy)


def base_checksum(base_dir: str) -> str:
    """Hash of paths, types, permission bits, contents and link targets of a real tree."""
    h = hashlib.sha256()

    def walk(rel: str) -> None:
        p = os.path.join(base_dir, rel) if rel else base_dir
        s = os.lstat(p)
        h.update(f"{rel}\0{stat.S_IFMT(s.st_mode)}\0".encode())
        if stat.S_ISLNK(s.st_mode):
            h.update(os.fsencode(os.readlink(p)))
            return
        h.update(f"{stat.S_IMODE(s.st_mode)}\0".encode())
        if stat.S_ISREG(s.st_mode):
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        elif stat.S_ISDIR(s.st_mode):
            for name in sorted(os.listdir(p)):
                walk(f"{rel}/{name}" if rel else name)

    walk("")
    return h.hexdigest()


# --------------------------------------------------------------------------- snapshots

Entry = tuple[Any, ...]


def snapshot(fs: FsFacade) -> dict[str, Entry]:
    """Describe a view through its facade: type, mode bits, content, link target, nlink."""
    out: dict[str, Entry] = {}

    def walk(rel: str) -> None:
        for name in fs.listdir(rel):
            p = f"{rel}/{name}" if rel else name
            s = fs.lstat(p)
            mode = stat.S_IMODE(s.st_mode)
            if stat.S_ISLNK(s.st_mode):
                out[p] = ("link", fs.readlink(p))
            elif stat.S_ISDIR(s.st_mode):
                out[p] = ("dir", mode)
                walk(p)
            elif stat.S_ISREG(s.st_mode):
                data = fs.read_file(p)
                out[p] = ("file", mode, s.st_nlink, s.st_size, data)
            else:
                out[p] = ("other", stat.S_IFMT(s.st_mode), mode)

    walk("")
    return out


def describe_diff(model: dict[str, Entry], target: dict[str, Entry]) -> str:
    """Human-readable summary of how two snapshots differ."""
    lines = []
    for p in sorted(set(model) | set(target)):
        m, t = model.get(p), target.get(p)
        if m != t:
            lines.append(f"  {p!r}: model={_short(m)} target={_short(t)}")
    return "\n".join(lines[:20])


def _short(e: Entry | None) -> str:
    if e is None:
        return "<missing>"
    return repr(tuple(x[:40] + b"..." if isinstance(x, bytes) and len(x) > 40 else x for x in e))


# --------------------------------------------------------------------------- machine


def _errno_of(fn: Callable[[], T]) -> tuple[T | None, int | None]:
    try:
        return fn(), None
    except OSError as e:
        return None, e.errno


def make_overlay_machine(make_target: MakeTarget) -> type[RuleBasedStateMachine]:
    """Build a state machine class comparing ``make_target()`` views against a plain model."""

    class OverlayModelMachine(RuleBasedStateMachine):
        """Same operations on model and target; same errnos and same resulting tree."""

        def __init__(self) -> None:
            super().__init__()
            self.target, self.base_dir, self._cleanup_target = make_target()
            if not os.listdir(self.base_dir):
                raise AssertionError("make_target() must populate base_dir (populate_base)")
            self.base_sum = base_checksum(self.base_dir)
            self.model_tmp = tempfile.mkdtemp(prefix="agentfs-model-")
            model_root = os.path.join(self.model_tmp, "root")
            copy_tree(self.base_dir, model_root)
            self.model: FsFacade = OsFacade(model_root)
            # (model handle, target handle, path it was opened as)
            self.handles: list[tuple[int, int, str]] = []

        def teardown(self) -> None:
            for hm, ht, _ in self.handles:
                for fs, h in ((self.model, hm), (self.target, ht)):
                    with contextlib.suppress(OSError):
                        fs.close(h)
            self.handles.clear()
            try:
                self._cleanup_target()
            finally:
                shutil.rmtree(self.model_tmp, ignore_errors=True)

        # ----------------------------------------------------------- plumbing

        def both(self, what: str, op: Callable[[FsFacade], T]) -> tuple[T, T] | None:
            """Apply ``op`` to model then target; errnos must match. None if both failed."""
            rm, em = _errno_of(lambda: op(self.model))
            rt, et = _errno_of(lambda: op(self.target))
            assert em == et, f"{what}: model errno={em} target errno={et}"
            if em is not None:
                return None
            return rm, rt  # type: ignore[return-value]

        # ----------------------------------------------------------- path rules

        @rule(path=paths, data=payloads, mode=st.sampled_from(MODES))
        def write_file(self, path: str, data: bytes, mode: int) -> None:
            self.both(f"write_file({path!r})", lambda fs: fs.write_file(path, data, mode))

        @rule(path=paths)
        def create_excl(self, path: str) -> None:
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
            self.both(f"create_excl({path!r})", lambda fs: fs.close(fs.open(path, flags, 0o644)))

        @rule(path=paths, offset=offsets, data=payloads)
        def pwrite_at(self, path: str, offset: int, data: bytes) -> None:
            def op(fs: FsFacade) -> int:
                h = fs.open(path, os.O_WRONLY)
                try:
                    return fs.pwrite(h, data, offset)
                finally:
                    fs.close(h)

            res = self.both(f"pwrite_at({path!r}, {offset})", op)
            if res is not None:
                assert res[0] == res[1], f"pwrite returned {res}"

        @rule(path=paths, length=offsets)
        def truncate(self, path: str, length: int) -> None:
            self.both(f"truncate({path!r}, {length})", lambda fs: fs.truncate(path, length))

        @rule(path=paths)
        def read(self, path: str) -> None:
            res = self.both(f"read({path!r})", lambda fs: fs.read_file(path))
            if res is not None:
                assert res[0] == res[1], f"read({path!r}) differs"

        @rule(path=paths)
        def listdir(self, path: str) -> None:
            res = self.both(f"listdir({path!r})", lambda fs: fs.listdir(path))
            if res is not None:
                assert res[0] == res[1], f"listdir({path!r}): {res[0]} != {res[1]}"

        @rule(src=paths, dst=paths)
        def rename(self, src: str, dst: str) -> None:
            self.both(f"rename({src!r}, {dst!r})", lambda fs: fs.rename(src, dst))

        @rule(src=paths, dst=paths, flags=st.sampled_from([RENAME_NOREPLACE, RENAME_EXCHANGE]))
        def rename2(self, src: str, dst: str, flags: int) -> None:
            self.both(f"rename2({src!r}, {dst!r}, {flags})", lambda fs: fs.rename2(src, dst, flags))

        @rule(path=paths)
        def unlink(self, path: str) -> None:
            self.both(f"unlink({path!r})", lambda fs: fs.unlink(path))

        @rule(path=paths, mode=st.sampled_from([0o755, 0o700, 0o1777]))
        def mkdir(self, path: str, mode: int) -> None:
            def op(fs: FsFacade) -> None:
                fs.mkdir(path, 0o755)
                fs.chmod(path, mode)  # explicit chmod: mode independent of umask

            self.both(f"mkdir({path!r})", op)

        @rule(path=paths)
        def rmdir(self, path: str) -> None:
            self.both(f"rmdir({path!r})", lambda fs: fs.rmdir(path))

        @rule(dest=link_targets, path=paths)
        def symlink(self, dest: str, path: str) -> None:
            self.both(f"symlink({dest!r}, {path!r})", lambda fs: fs.symlink(dest, path))

        @rule(src=paths, dst=paths)
        def link(self, src: str, dst: str) -> None:
            self.both(f"link({src!r}, {dst!r})", lambda fs: fs.link(src, dst))

        @rule(path=paths, mode=st.sampled_from(MODES))
        def chmod(self, path: str, mode: int) -> None:
            self.both(f"chmod({path!r}, {oct(mode)})", lambda fs: fs.chmod(path, mode))

        # ----------------------------------------------------------- handle rules

        @precondition(lambda self: len(self.handles) < MAX_HANDLES)
        @rule(path=paths, flags=st.sampled_from([os.O_RDONLY, os.O_RDWR, os.O_WRONLY]))
        def open_handle(self, path: str, flags: int) -> None:
            res = self.both(f"open({path!r}, {flags})", lambda fs: fs.open(path, flags))
            if res is not None:
                self.handles.append((res[0], res[1], path))

        @precondition(lambda self: bool(self.handles))
        @rule(idx=st.integers(0, MAX_HANDLES - 1), offset=offsets, data=payloads)
        def handle_pwrite(self, idx: int, offset: int, data: bytes) -> None:
            hm, ht, path = self.handles[idx % len(self.handles)]
            res = self.both(
                f"pwrite(<{path}>, {offset})",
                lambda fs: fs.pwrite(hm if fs is self.model else ht, data, offset),
            )
            if res is not None:
                assert res[0] == res[1]

        @precondition(lambda self: bool(self.handles))
        @rule(idx=st.integers(0, MAX_HANDLES - 1), offset=offsets, size=st.integers(0, 5000))
        def handle_pread(self, idx: int, offset: int, size: int) -> None:
            hm, ht, path = self.handles[idx % len(self.handles)]
            res = self.both(
                f"pread(<{path}>, {size}, {offset})",
                lambda fs: fs.pread(hm if fs is self.model else ht, size, offset),
            )
            if res is not None:
                assert res[0] == res[1], f"pread(<{path}>, {size}, {offset}) differs"

        @precondition(lambda self: bool(self.handles))
        @rule(idx=st.integers(0, MAX_HANDLES - 1), length=offsets)
        def handle_ftruncate(self, idx: int, length: int) -> None:
            hm, ht, path = self.handles[idx % len(self.handles)]
            self.both(
                f"ftruncate(<{path}>, {length})",
                lambda fs: fs.ftruncate(hm if fs is self.model else ht, length),
            )

        @precondition(lambda self: bool(self.handles))
        @rule(idx=st.integers(0, MAX_HANDLES - 1))
        def handle_fstat(self, idx: int) -> None:
            hm, ht, path = self.handles[idx % len(self.handles)]
            sm, stt = self.model.fstat(hm), self.target.fstat(ht)
            got = (stt.st_size, stt.st_nlink, stat.S_IFMT(stt.st_mode))
            want = (sm.st_size, sm.st_nlink, stat.S_IFMT(sm.st_mode))
            assert got == want, f"fstat(<{path}>) (size, nlink, type): {got} != {want}"

        @precondition(lambda self: bool(self.handles))
        @rule(idx=st.integers(0, MAX_HANDLES - 1))
        def handle_close(self, idx: int) -> None:
            hm, ht, _ = self.handles.pop(idx % len(self.handles))
            self.model.close(hm)
            self.target.close(ht)

        # ----------------------------------------------------------- invariants

        @invariant()
        def trees_match(self) -> None:
            m, t = snapshot(self.model), snapshot(self.target)
            assert m == t, "model and target trees differ:\n" + describe_diff(m, t)

        @invariant()
        def base_untouched(self) -> None:
            assert base_checksum(self.base_dir) == self.base_sum, "base directory was modified"

    return OverlayModelMachine
