"""The behavioural cases against a real mount of a branch, through each FUSE front end."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
from behaviour_cases import CASES, Case, run_case
from fsfacade import OsFacade
from mountutil import IMPLS, cli_env, mounted_branch
from treehash import tree_fingerprint

pytestmark = pytest.mark.mount


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_case_on_mount(case: type[Case], impl: str, world_dir: Path) -> None:
    env = cli_env(world_dir / "home")
    with ExitStack() as stack:
        seen: list[tuple[str, dict[str, tuple[object, ...]]]] = []

        def make_fs(setup_base: Callable[[str], None]) -> OsFacade:
            base = world_dir / "base"
            base.mkdir(mode=0o755)
            setup_base(str(base))
            seen.append((str(base), tree_fingerprint(str(base))))
            mb = stack.enter_context(mounted_branch(base, world_dir, impl=impl, env=env))
            os.chmod(mb.mountpoint, 0o755)
            return OsFacade(str(mb.mountpoint))

        run_case(case, make_fs)
    for base, before in seen:
        assert tree_fingerprint(base) == before, "the base directory changed"
