"""Durations and sizes as people write them: `90s`, `15m`, `7d`, `2w`; `512KiB`, `5GiB`."""

from __future__ import annotations

import re
from typing import Final

_DURATION: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?$")
_DURATION_SCALE: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400,
                          "w": 7 * 86400, None: 1}
_SIZE: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|K|M|G|T)?$",
                          re.IGNORECASE)
_SIZE_SCALE: Final = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
                      "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                      "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def parse_duration(text: str) -> float:
    """Seconds in *text*: a number with an optional unit (ms s m h d w; bare = seconds)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r} (e.g. 30s, 15m, 12h, 7d, 2w)")
    return float(m.group(1)) * _DURATION_SCALE[m.group(2)]


def parse_size(text: str) -> int:
    """Bytes in *text*: a number with an optional unit (B KiB MiB GiB TiB, or KB MB GB
    TB in powers of ten; bare = bytes)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (e.g. 512KiB, 100MiB, 5GiB)")
    unit = (m.group(2) or "b").lower()
    return int(float(m.group(1)) * _SIZE_SCALE[unit])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
