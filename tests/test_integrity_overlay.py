"""Data-integrity stress on the overlay: random overlapping writes, truncates and
reads through several handles on files that start in the base, checked against an
in-memory model; the base must be untouched afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from corefacade import CoreFacade
from fsfacade import OsFacade
from integrity import populate_integrity_base, run_integrity_stress
from mountutil import mounted_branch
from treehash import tree_fingerprint

from agentfs.overlay.engine import Overlay
from agentfs.overlay.layers import Layer

BASE_PATHS = ["base-small", "base-empty", "dir/base-big", "dir/sub/base-odd"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integrity_core(tmp_path: Path, seed: int) -> None:
    base = tmp_path / "base"
    base.mkdir()
    populate_integrity_base(str(base), BASE_PATHS, seed)
    before = tree_fingerprint(str(base))
    ov = Overlay([Layer.open_store_layer(1, str(tmp_path / "layer")), Layer.open_base(str(base))])
    try:
        run_integrity_stress(CoreFacade(ov), BASE_PATHS, seed=seed, ops=1500)
    finally:
        ov.close()
    assert tree_fingerprint(str(base)) == before


def _mounted_run(tmp_path: Path, seed: int, ops: int) -> None:
    base = tmp_path / "base"
    base.mkdir()
    populate_integrity_base(str(base), BASE_PATHS, seed)
    before = tree_fingerprint(str(base))
    with mounted_branch(base, tmp_path) as mb:
        run_integrity_stress(OsFacade(str(mb.mountpoint)), BASE_PATHS, seed=seed, ops=ops)
        # and again after a remount: what was written must still be there
        mb.unmount()
        mb.mount()
        run_integrity_stress(OsFacade(str(mb.mountpoint)), [], seed=seed + 100, ops=ops // 4)
    assert tree_fingerprint(str(base)) == before
    assert os.listdir(base) is not None


@pytest.mark.mount
@pytest.mark.parametrize("seed", [0, 1])
def test_integrity_mount(tmp_path: Path, seed: int) -> None:
    _mounted_run(tmp_path, seed, ops=1500)


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", range(10, 16))
def test_integrity_mount_long(tmp_path: Path, seed: int) -> None:
    _mounted_run(tmp_path, seed, ops=20_000)
