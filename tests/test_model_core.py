"""Hypothesis stateful test: random operation sequences on the overlay engine and on
a plain directory must give the same trees and errnos; the base never changes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import pytest
from corefacade import CoreFacade
from fsfacade import FsFacade
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from model_stateful import make_overlay_machine, populate_base

from agentfs.overlay.engine import Overlay
from agentfs.overlay.layers import Layer


def make_core_target() -> tuple[FsFacade, str, Callable[[], None]]:
    tmp = tempfile.mkdtemp(prefix="agentfs-model-core-")
    base = os.path.join(tmp, "base")
    os.mkdir(base)
    populate_base(base)
    ov = Overlay([Layer.open_store_layer(1, os.path.join(tmp, "layer")), Layer.open_base(base)])

    def cleanup() -> None:
        ov.close()
        shutil.rmtree(tmp, ignore_errors=True)

    return CoreFacade(ov), base, cleanup


CoreModelMachine = make_overlay_machine(make_core_target)


def test_model_on_core() -> None:
    old = os.umask(0o022)
    try:
        run_state_machine_as_test(CoreModelMachine, settings=settings(
            max_examples=60, stateful_step_count=40, deadline=None,
            suppress_health_check=[HealthCheck.too_slow]))
    finally:
        os.umask(old)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_model_on_core_long() -> None:
    run_state_machine_as_test(CoreModelMachine, settings=settings(
        max_examples=1000, stateful_step_count=80, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
