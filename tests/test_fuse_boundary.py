"""The pyfuse3 front end's error boundary: domain errors keep their errno, a bug
becomes EIO with a logged traceback, and the handler returns normally."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pyfuse3
import pytest

from agentfs.errors import FsError
from agentfs.mount.fuse3_ops import AgentfsOperations
from agentfs.overlay.engine import Overlay
from agentfs.overlay.inodes import ROOT_INO
from agentfs.overlay.layers import Layer


@pytest.fixture
def ops(tmp_path: Path) -> AgentfsOperations:
    base = tmp_path / "base"
    base.mkdir()
    (base / "f").write_text("data")
    ov = Overlay([Layer.open_store_layer(1, str(tmp_path / "layer")), Layer.open_base(str(base))])
    return AgentfsOperations(ov)


async def test_lookup_and_negative_entry(ops: AgentfsOperations) -> None:
    entry = await ops.lookup(ROOT_INO, b"f", None)
    assert entry.st_size == 4 and entry.st_ino not in (0, ROOT_INO)
    missing = await ops.lookup(ROOT_INO, b"nope", None)
    assert missing.st_ino == 0  # cached negative entry


async def test_domain_error_keeps_errno(ops: AgentfsOperations,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(*_a: object, **_k: object) -> None:
        raise FsError(errno.EBUSY)
    monkeypatch.setattr(ops.ov, "getattr_ino", busy)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.getattr(ROOT_INO, None)
    assert exc.value.errno == errno.EBUSY


async def test_bug_becomes_eio_and_is_logged(ops: AgentfsOperations,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    def bug(*_a: object, **_k: object) -> None:
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(ops.ov, "listdir", bug)
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.opendir(ROOT_INO, None)
    assert exc.value.errno == errno.EIO
    assert "ZeroDivisionError" in caplog.text and "opendir" in caplog.text
    # the next request works: nothing was left broken
    entry = await ops.lookup(ROOT_INO, b"f", None)
    assert entry.st_size == 4
