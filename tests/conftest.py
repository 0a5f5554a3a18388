"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# CI runners set CI=true, which makes a mount refuse `ask` rules at once; the tests
# that want that set it themselves (tests/test_non_interactive.py), the others answer
# their asks, so every daemon the suite starts waits for an answer unless told not to
os.environ["AGENTFS_NON_INTERACTIVE"] = "0"
# the machine's organisation and user policy layers must not change what the suite
# sees; the layer tests point these at files of their own
os.environ["AGENTFS_ORG_POLICY"] = "/nonexistent/agentfs-tests/org-policy.yaml"
os.environ["XDG_CONFIG_HOME"] = "/nonexistent/agentfs-tests/config"


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
