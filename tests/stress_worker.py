"""Concurrency stress: one seeded worker of N, its replay on a plain directory, tree dumps.

Each worker *w* mutates only names it owns (``w<w>_...``), but in directories every
worker shares (the root, ``shared/``, base directories under ``tree/`` that hold base
files of every worker), and it reads, lists and stats everything, other workers' names
included.  Its own mutations therefore do not depend on the order in which the
workers' operations interleave, so the final tree is what the workers' logs give
when replayed one after the other on a plain copy of the base.  Every operation is
logged (one JSON line each) with its result; the results of operations on a
worker's own names (errnos, content checksums, modes, sizes, listings of its own
names) are deterministic too and the replay checks each of them.  Results of
operations on other workers' names are racy by design; only their errno is checked,
against the few a concurrent plain directory can give.

    python stress_worker.py make-base BASE NWORKERS
    python stress_worker.py run ROOT WORKER NWORKERS SEED OPS LOG   (prints a JSON summary)
    python stress_worker.py replay ROOT LOG...                     (prints a JSON report)
    python stress_worker.py dump ROOT                              (prints the tree as JSON)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator

DIRS = ("", "shared", "shared/sub", "tree/d0", "tree/d1", "tree/d2")  # never removed
BASE_DIRS = ("tree/d0", "tree/d1", "tree/d2")
FILES_PER_DIR = 6
OWNED_DIRS = 2
CHILDREN = 3
SIZES = (0, 1, 17, 100, 4096, 5000, 70000)
OFFSETS = (0, 3, 4095, 65539)
MODES = (0o644, 0o600, 0o755, 0o640)
# a racy operation on another worker's names may meet these on any filesystem
RACY_ERRNOS = frozenset({"ENOENT", "ENOTDIR", "EISDIR", "ELOOP"})

WEIGHTS = {
    "create": 12, "write": 9, "append": 6, "truncate": 4, "rename": 12, "unlink": 8,
    "mkdir": 5, "rmdir": 4, "chmod": 3, "symlink": 2, "link": 2,
    "stat_own": 8, "read_own": 8, "list_own": 6,
    "stat_any": 6, "read_any": 5, "list_any": 5,
}
MUTATING = frozenset({"create", "write", "append", "truncate", "rename", "unlink", "mkdir",
                      "rmdir", "chmod", "symlink", "link"})
OWN_READS = frozenset({"stat_own", "read_own", "list_own"})
RACY = frozenset({"stat_any", "read_any", "list_any"})


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def owned_files(w: int) -> list[str]:
    out = [_join(d, f"w{w}_f{k}") for d in DIRS for k in range(FILES_PER_DIR)]
    out += [_join(d, f"w{w}_dir{k}", f"x{j}") for d in DIRS for k in range(OWNED_DIRS)
            for j in range(CHILDREN)]
    return out


def owned_dirs(w: int) -> list[str]:
    return [_join(d, f"w{w}_dir{k}") for d in DIRS for k in range(OWNED_DIRS)]


def data_for(w: int, i: int, n: int) -> bytes:
    unit = f"<{w}.{i}>".encode()
    return (unit * (n // len(unit) + 1))[:n]


def make_base(base: str, nworkers: int) -> None:
    """Shared directories; per worker base files in every base directory, a base
    directory with children, and common files nobody changes."""
    for d in DIRS:
        os.makedirs(os.path.join(base, d), exist_ok=True)
    for d in BASE_DIRS:
        for k in range(3):
            with open(os.path.join(base, d, f"common{k}"), "wb") as f:
                f.write(data_for(-1, k, 1000 * (k + 1)))
        for w in range(nworkers):
            for k in range(3):
                with open(os.path.join(base, d, f"w{w}_f{k}"), "wb") as f:
                    f.write(data_for(w, -k - 1, SIZES[k + 2]))
    for w in range(nworkers):
        d = os.path.join(base, "tree/d0", f"w{w}_dir0")
        os.mkdir(d)
        for j in range(2):
            with open(os.path.join(d, f"x{j}"), "wb") as f:
                f.write(data_for(w, -10 - j, 300))


# -- one operation ----------------------------------------------------------------------
def _err(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, f"E{exc.errno}")


def _crc(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def _describe(st: os.stat_result) -> str:
    kind = stat.S_IFMT(st.st_mode)
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    return f"{kind:o}:{stat.S_IMODE(st.st_mode):o}:{size}"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def do_op(root: str, w: int, i: int, op: str, args: list) -> str:  # type: ignore[type-arg]
    """Apply one logged operation under *root*; its result as a string ("ok", an errno
    name, or a digest of what was read)."""
    p = [os.path.join(root, a) if isinstance(a, str) else a for a in args]
    try:
        if op == "create":
            fd = os.open(p[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                os.write(fd, data_for(w, i, p[1]))
            finally:
                os.close(fd)
        elif op == "write":
            fd = os.open(p[0], os.O_WRONLY)
            try:
                os.pwrite(fd, data_for(w, i, p[1]), p[2])
            finally:
                os.close(fd)
        elif op == "append":
            fd = os.open(p[0], os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data_for(w, i, p[1]))
            finally:
                os.close(fd)
        elif op == "truncate":
            os.truncate(p[0], p[1])
        elif op == "rename":
            os.rename(p[0], p[1])
        elif op == "unlink":
            os.unlink(p[0])
        elif op == "mkdir":
            os.mkdir(p[0], 0o777)
        elif op == "rmdir":
            os.rmdir(p[0])
        elif op == "chmod":
            os.chmod(p[0], p[1])
        elif op == "symlink":
            os.symlink(args[1], p[0])  # a relative target, stored as given
        elif op == "link":
            os.link(p[0], p[1], follow_symlinks=False)
        elif op in ("stat_own", "stat_any"):
            return _describe(os.lstat(p[0]))
        elif op in ("read_own", "read_any"):
            return _crc(_read(p[0]))
        elif op == "list_own":
            names = os.listdir(p[0])
            if args[1]:
                names = [n for n in names if n.startswith(args[1])]
            return _crc("/".join(sorted(names)).encode())
        elif op == "list_any":
            names = os.listdir(p[0])
            for name in names[:8]:  # stat what was listed: gone by now is fine
                try:
                    os.lstat(os.path.join(p[0], name))
                except OSError as exc:
                    if _err(exc) not in RACY_ERRNOS:
                        return _err(exc)
            return "ok"
        else:
            raise ValueError(f"unknown operation {op}")
    except OSError as exc:
        return _err(exc)
    return "ok"


# -- a worker -----------------------------------------------------------------------------
def next_op(rng: random.Random, w: int, nworkers: int, files: list[str],
            dirs: list[str]) -> tuple[str, list]:  # type: ignore[type-arg]
    ops = list(WEIGHTS)
    op = rng.choices(ops, weights=[WEIGHTS[o] for o in ops])[0]
    if op in ("create", "append"):
        return op, [rng.choice(files), rng.choice(SIZES)]
    if op == "write":
        return op, [rng.choice(files), rng.choice(SIZES[:5]), rng.choice(OFFSETS)]
    if op == "truncate":
        return op, [rng.choice(files), rng.choice((0, 5, 4096, 100000))]
    if op == "rename":
        if rng.random() < 0.75:
            return op, [rng.choice(files), rng.choice(files)]
        return op, [rng.choice(dirs), rng.choice(dirs + files[:4])]
    if op in ("unlink", "stat_own", "read_own"):
        return op, [rng.choice(files + dirs[:2])]
    if op in ("mkdir", "rmdir"):
        return op, [rng.choice(dirs)]
    if op == "chmod":
        return op, [rng.choice(files), rng.choice(MODES)]
    if op == "symlink":
        path = rng.choice(files)
        return op, [path, f"w{w}_f{rng.randrange(FILES_PER_DIR)}"]
    if op == "link":
        return op, [rng.choice(files), rng.choice(files)]
    if op == "list_own":
        if rng.random() < 0.6:
            return op, [rng.choice(DIRS), f"w{w}_"]
        return op, [rng.choice(dirs), ""]
    other = rng.randrange(nworkers)
    if op == "list_any":
        return op, [rng.choice(DIRS + tuple(owned_dirs(other)[:3]))]
    if rng.random() < 0.15:
        return op, [_join(rng.choice(BASE_DIRS), f"common{rng.randrange(3)}")]
    return op, [rng.choice(owned_files(other) + owned_dirs(other)[:2])]


def run_worker(root: str, w: int, nworkers: int, seed: int, nops: int, log_path: str) -> dict:  # type: ignore[type-arg]
    os.umask(0o022)
    rng = random.Random(seed * 1000 + w)
    files, dirs = owned_files(w), owned_dirs(w)
    results: Counter[str] = Counter()
    unexpected: list[list] = []  # type: ignore[type-arg]
    start = time.monotonic()
    with open(log_path, "w") as log:
        for i in range(nops):
            op, args = next_op(rng, w, nworkers, files, dirs)
            res = do_op(root, w, i, op, args)
            log.write(json.dumps([i, op, args, res], separators=(",", ":")) + "\n")
            if res.startswith("E"):
                results[res] += 1
                bad = res == "EIO" or (op in RACY and res not in RACY_ERRNOS)
                if bad and len(unexpected) < 50:
                    unexpected.append([i, op, args, res])
            else:
                results["ok"] += 1
    elapsed = time.monotonic() - start
    return {"worker": w, "ops": nops, "seconds": round(elapsed, 3),
            "results": dict(results), "unexpected": unexpected}


# -- replay on a plain directory -----------------------------------------------------------
def replay(root: str, logs: list[str]) -> dict:  # type: ignore[type-arg]
    """Apply each log's mutations in order (one log after the other) and compare every
    deterministic result with the logged one."""
    os.umask(0o022)
    mismatches: list[list] = []  # type: ignore[type-arg]
    ops = checked = 0
    for log_path in logs:
        w = int(os.path.basename(log_path).split(".")[0].lstrip("w"))
        with open(log_path) as log:
            for line in log:
                i, op, args, logged = json.loads(line)
                ops += 1
                if op in RACY:
                    continue
                got = do_op(root, w, i, op, args)
                checked += 1
                if got != logged and len(mismatches) < 50:
                    mismatches.append([w, i, op, args, "mount:", logged, "plain:", got])
    return {"ops": ops, "checked": checked, "mismatches": mismatches}


# -- the final tree -----------------------------------------------------------------------
def walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        for name in sorted(os.listdir(full)):
            child = _join(rel, name)
            st = os.lstat(os.path.join(root, child))
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)


def dump(root: str) -> dict[str, list]:  # type: ignore[type-arg]
    """path -> [type, mode, size, nlink, sha256 of content or link target]."""
    out: dict[str, list] = {}  # type: ignore[type-arg]
    for rel, st in walk(root):
        full = os.path.join(root, rel)
        if stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(_read(full)).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            what = os.readlink(full)
        else:
            what = ""
        out[rel] = [f"{stat.S_IFMT(st.st_mode):o}", f"{stat.S_IMODE(st.st_mode):o}",
                    0 if stat.S_ISDIR(st.st_mode) else st.st_size,
                    0 if stat.S_ISDIR(st.st_mode) else st.st_nlink, what]
    return out


def main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "make-base":
        make_base(argv[1], int(argv[2]))
    elif cmd == "run":
        root, w, n, seed, nops, log = argv[1:7]
        print(json.dumps(run_worker(root, int(w), int(n), int(seed), int(nops), log)))
    elif cmd == "replay":
        print(json.dumps(replay(argv[1], argv[2:])))
    elif cmd == "dump":
        print(json.dumps(dump(argv[1])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
