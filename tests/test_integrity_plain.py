"""Integrity stress on a plain directory (validates the stress harness and its model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fsfacade import OsFacade
from integrity import populate_integrity_base, run_integrity_stress

BASE_PATHS = ["base-small", "base-empty", "dir/base-big", "dir/sub/base-odd"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_integrity_plain(tmp_path: Path, seed: int) -> None:
    populate_integrity_base(str(tmp_path), BASE_PATHS, seed)
    run_integrity_stress(OsFacade(str(tmp_path)), BASE_PATHS, seed=seed, ops=1500)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", range(10, 20))
def test_integrity_plain_long(tmp_path: Path, seed: int) -> None:
    populate_integrity_base(str(tmp_path), BASE_PATHS, seed)
    run_integrity_stress(OsFacade(str(tmp_path)), BASE_PATHS, seed=seed, ops=20_000)
