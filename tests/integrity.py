"""Data-integrity stress: random overlapping pwrite/ftruncate/pread checked against bytearrays.

Several handles per file (read-only ones too, opened before any copy-up) make sure every
handle sees the single current content of the file, whether it started in the base or was
created in the view.  Base files get deterministic content from :func:`integrity_base_content`
so the first reads are checked as well.
"""

from __future__ import annotations

import contextlib
import os
import random

from fsfacade import FsFacade, pread_all, pwrite_all

PAGE = 4096
MAX_OFFSET = 1 << 20
MAX_WRITE = 64 * 1024
NEW_FILES = 3
HANDLES_PER_FILE = 3


def integrity_base_content(path: str, seed: int) -> bytes:
    """Deterministic content for a base file (size varies per path, incl. odd sizes)."""
    rnd = random.Random(f"{seed}:{path}")
    size = rnd.choice([0, 1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 17, rnd.randrange(200_000)])
    return rnd.randbytes(size)


def populate_integrity_base(base_dir: str, base_paths: list[str], seed: int) -> None:
    """Write the base files ``run_integrity_stress`` expects (call before building the view)."""
    for rel in base_paths:
        p = os.path.join(base_dir, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(integrity_base_content(rel, seed))


def _first_diff(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def run_integrity_stress(fs: FsFacade, base_paths: list[str], seed: int, ops: int) -> None:
    """Run ``ops`` random operations and check every read and size against the model.

    ``base_paths`` must already exist in the view with ``integrity_base_content(path, seed)``
    (see :func:`populate_integrity_base`).  New files ``stress-new-<i>`` are created in the root.
    """
    rnd = random.Random(seed)
    model: dict[str, bytearray] = {}
    handles: dict[str, list[tuple[int, bool]]] = {}  # path -> [(handle, writable)]

    for p in base_paths:
        model[p] = bytearray(integrity_base_content(p, seed))
    for i in range(NEW_FILES):
        p = f"stress-new-{i}"
        fs.close(fs.open(p, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644))
        model[p] = bytearray()
    files = sorted(model)

    def open_handle(p: str) -> tuple[int, bool]:
        # Read-only handles first, so they predate the copy-up triggered by writers.
        writable = rnd.random() < 0.6
        return fs.open(p, os.O_RDWR if writable else os.O_RDONLY), writable

    try:
        for p in files:
            handles[p] = [(fs.open(p, os.O_RDONLY), False)]
            handles[p] += [open_handle(p) for _ in range(HANDLES_PER_FILE - 1)]
            if not any(w for _, w in handles[p]):
                handles[p].append((fs.open(p, os.O_RDWR), True))
            # Base content must read back exactly before anything was written.
            h = handles[p][0][0]
            got = pread_all(fs, h, len(model[p]) + 10, 0)
            assert got == bytes(model[p]), f"{p}: initial content differs"

        for step in range(ops):
            p = rnd.choice(files)
            data = model[p]
            h, _ = rnd.choice(handles[p])
            writers = [hh for hh, w in handles[p] if w]
            r = rnd.random()
            where = f"step {step} ({p})"
            if r < 0.40:
                hw = rnd.choice(writers)
                size = rnd.choice([1, 7, PAGE, rnd.randrange(1, MAX_WRITE)])
                if rnd.random() < 0.5 and data:
                    off = rnd.randrange(len(data))  # overlap existing data
                else:
                    off = rnd.randrange(MAX_OFFSET)
                if rnd.random() < 0.3:
                    off -= off % PAGE  # page aligned
                buf = rnd.randbytes(size)
                pwrite_all(fs, hw, buf, off)
                if off > len(data):
                    data.extend(bytes(off - len(data)))
                data[off : off + size] = buf
            elif r < 0.50:
                hw = rnd.choice(writers)
                length = rnd.choice([0, rnd.randrange(len(data) + 1), rnd.randrange(MAX_OFFSET)])
                fs.ftruncate(hw, length)
                if length < len(data):
                    del data[length:]
                else:
                    data.extend(bytes(length - len(data)))
            elif r < 0.85:
                span = max(len(data), 1)
                off = rnd.randrange(span + PAGE)
                size = rnd.choice([1, PAGE, rnd.randrange(1, 2 * MAX_WRITE)])
                got = pread_all(fs, h, size, off)
                want = bytes(data[off : off + size])
                assert got == want, (
                    f"{where}: pread({size}, {off}) mismatch: got {len(got)} bytes, "
                    f"want {len(want)}, first diff at +{_first_diff(got, want)}"
                )
            elif r < 0.93:
                st = fs.fstat(h)
                assert st.st_size == len(data), f"{where}: fstat size {st.st_size} != {len(data)}"
                assert fs.stat(p).st_size == len(data), f"{where}: stat size differs"
            elif r < 0.97:
                # Replace a handle (keeps the mix of pre/post-write opens realistic).
                idx = rnd.randrange(len(handles[p]))
                old, was_writable = handles[p][idx]
                fs.close(old)
                handles[p][idx] = (fs.open(p, os.O_RDWR), True) if was_writable else open_handle(p)
            else:
                got = fs.read_file(p)
                assert got == bytes(data), (
                    f"{where}: full read mismatch (len {len(got)} vs {len(data)}, "
                    f"first diff at {_first_diff(got, bytes(data))})"
                )
            if rnd.random() < 0.02:
                fs.fsync(rnd.choice([hh for hh, w in handles[p] if w]))
    finally:
        for hs in handles.values():
            for h, _ in hs:
                with contextlib.suppress(OSError):
                    fs.close(h)

    for p in files:
        got = fs.read_file(p)
        assert got == bytes(model[p]), f"{p}: final content differs"
        assert fs.stat(p).st_size == len(model[p])
