"""A PEP 517 build backend using only the standard library, for the pip workload.

It is copied into the benchmark's small local package (``backend-path = ["."]``), so
``pip install --no-index --no-build-isolation`` works offline with any interpreter: there
is nothing to download and nothing that has to be installed in the target venv.  It
builds a pure-Python wheel of ``src/`` with a console script.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from typing import Any

NAME, VERSION = "benchpkg", "1.0"
DIST = f"{NAME}-{VERSION}"


def _record(arc: str, data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return f"{arc},sha256={b64},{len(data)}"


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    return []


def build_wheel(
    wheel_directory: str, config_settings: Any = None, metadata_directory: Any = None
) -> str:
    files: list[tuple[str, bytes]] = []
    for dirpath, dirnames, filenames in os.walk("src"):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                files.append((os.path.relpath(path, "src"), fh.read()))
    info = f"{DIST}.dist-info"
    files += [
        (f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\n"
         b"Tag: py3-none-any\n"),
        (f"{info}/entry_points.txt", f"[console_scripts]\n{NAME} = {NAME}:main\n".encode()),
    ]
    wheel = f"{DIST}-py3-none-any.whl"
    record = [_record(arc, data) for arc, data in files] + [f"{info}/RECORD,,"]
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as zf:
        for arc, data in files:
            zf.writestr(arc, data)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def build_sdist(sdist_directory: str, config_settings: Any = None) -> str:
    raise NotImplementedError("the benchmark package only builds wheels")
