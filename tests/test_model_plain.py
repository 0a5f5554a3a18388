"""Sanity check of the stateful model machine: a plain directory must match a plain model.

If this fails the machine itself is wrong, not any overlay.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

from fsfacade import FsFacade, OsFacade
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from model_stateful import copy_tree, make_overlay_machine, populate_base


def make_plain_target() -> tuple[FsFacade, str, Callable[[], None]]:
    """Base dir plus an independent plain copy of it acting as the 'view'."""
    tmp = tempfile.mkdtemp(prefix="agentfs-model-plain-")
    base = os.path.join(tmp, "base")
    os.mkdir(base)
    populate_base(base)
    view = os.path.join(tmp, "view")
    copy_tree(base, view)
    return OsFacade(view), base, lambda: shutil.rmtree(tmp, ignore_errors=True)


PlainModelMachine = make_overlay_machine(make_plain_target)


def test_model_machine_on_plain_dir() -> None:
    run_state_machine_as_test(
        PlainModelMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
