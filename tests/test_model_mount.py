"""Hypothesis stateful test against a real mount: each example mounts a fresh branch
over a fresh base, applies random operations to it and to a plain directory, and
compares trees and errnos after every step; the base must never change."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fsfacade import FsFacade, OsFacade
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from model_stateful import make_overlay_machine, populate_base
from mountutil import IMPLS, mounted_branch, require_fuse

pytestmark = pytest.mark.mount


def make_mount_target(impl: str = "pyfuse3") -> tuple[FsFacade, str, Callable[[], None]]:
    tmp = tempfile.mkdtemp(prefix="agentfs-model-mnt-")
    base = os.path.join(tmp, "base")
    os.mkdir(base)
    populate_base(base)
    stack = contextlib.ExitStack()
    try:
        mb = stack.enter_context(mounted_branch(Path(base), Path(tmp), impl=impl))
    except BaseException:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def cleanup() -> None:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)

    return OsFacade(str(mb.mountpoint)), base, cleanup


MountModelMachine = make_overlay_machine(make_mount_target)
MACHINES = {"pyfuse3": MountModelMachine,
            "mfusepy": make_overlay_machine(lambda: make_mount_target("mfusepy")),
            "kernel": make_overlay_machine(lambda: make_mount_target("kernel"))}


@pytest.mark.parametrize("impl", IMPLS)
def test_model_on_mount(impl: str) -> None:
    require_fuse()
    old = os.umask(0o022)
    try:
        run_state_machine_as_test(MACHINES[impl], settings=settings(
            max_examples=25, stateful_step_count=40, deadline=None,
            suppress_health_check=[HealthCheck.too_slow]))
    finally:
        os.umask(old)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_model_on_mount_long() -> None:
    require_fuse()
    run_state_machine_as_test(MountModelMachine, settings=settings(
        max_examples=300, stateful_step_count=80, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
