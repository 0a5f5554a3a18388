"""Run every behavioural case against a plain directory: the reference the overlay must match.

The base content is written into the very directory the facade points at, so these runs
define (and sanity-check) the expected ext4 outcomes of each case.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from behaviour_cases import CASES, Case, run_case
from fsfacade import OsFacade


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_case_on_plain_dir(
    case: type[Case], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = tmp_path / "view"
    if case.needs_world_access:
        root = request.getfixturevalue("world_dir") / "view"

    def make_fs(setup_base: Callable[[str], None]) -> OsFacade:
        root.mkdir(mode=0o755)
        os.chmod(root, 0o755)
        setup_base(str(root))
        return OsFacade(str(root))

    run_case(case, make_fs)
