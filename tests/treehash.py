"""A fingerprint of a directory tree, to prove the base never changes."""

from __future__ import annotations

import hashlib
import os
import stat


def tree_fingerprint(root: str) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, size, mtime_ns, content digest or link target, xattrs)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                what: object = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            else:
                what = None
            xattrs: tuple[str, ...] = ()
            if not stat.S_ISLNK(st.st_mode):
                xattrs = tuple(sorted(os.listxattr(path)))
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                        st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                        st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0,
                        what, xattrs, st.st_nlink)
    return out
