"""The behavioural cases against the overlay engine itself (no FUSE).

Each case gets a fresh base and a fresh top layer; afterwards the base must be
byte-for-byte what it was before the case ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from behaviour_cases import CASES, Case, run_case
from corefacade import CoreFacade
from treehash import tree_fingerprint

from agentfs.overlay.engine import Overlay
from agentfs.overlay.layers import Layer


@pytest.fixture
def overlay_factory(tmp_path: Path) -> Iterator[Callable[[Callable[[str], None]], CoreFacade]]:
    made: list[tuple[Overlay, str, dict[str, tuple[object, ...]]]] = []

    def make(setup_base: Callable[[str], None]) -> CoreFacade:
        base = tmp_path / "base"
        base.mkdir()
        setup_base(str(base))
        ov = Overlay([Layer.open_store_layer(1, str(tmp_path / "layer")),
                      Layer.open_base(str(base))])
        made.append((ov, str(base), tree_fingerprint(str(base))))
        return CoreFacade(ov)

    yield make
    for ov, base, before in made:
        ov.close()
        assert tree_fingerprint(base) == before, "the base directory changed"


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_case_on_core(case: type[Case], overlay_factory: Callable[..., CoreFacade]) -> None:
    if case.requires_real_path or case.requires_mmap:
        pytest.skip("needs a real path (covered by the mounted run)")
    old = os.umask(0o022)
    try:
        run_case(case, overlay_factory)
    finally:
        os.umask(old)
