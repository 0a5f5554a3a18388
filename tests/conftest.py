"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A 0755 directory directly under the system temp dir (pytest's tmp is 0700), so
    other users (the non-root permission cases) can reach what is inside."""
    d = tempfile.mkdtemp(prefix="agentfs-world-")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
