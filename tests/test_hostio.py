"""The single door to host files never follows a symlink on the way."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agentfs.overlay.engine import Overlay
from agentfs.overlay.hostio import HostDir
from agentfs.overlay.layers import Layer


@pytest.fixture
def rooted(tmp_path: Path) -> tuple[HostDir, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "f").write_text("inside")
    os.symlink(str(outside), root / "abs")
    os.symlink("../outside", root / "rel")
    os.symlink("dir", root / "dirlink")
    return HostDir(str(root)), outside


@pytest.mark.parametrize("link", ["abs", "rel", "dirlink"])
def test_no_symlink_followed_mid_path(rooted: tuple[HostDir, Path], link: str) -> None:
    host, outside = rooted
    target = "secret" if link != "dirlink" else "f"
    assert host.try_lstat(f"{link}/{target}") is None
    with pytest.raises(OSError) as exc:
        host.open(f"{link}/{target}", os.O_RDONLY)
    assert exc.value.errno in (errno.ENOTDIR, errno.ELOOP, errno.EXDEV)
    with pytest.raises(OSError):
        host.mkdir(f"{link}/new", 0o755)
    assert not (outside / "new").exists()


def test_final_symlink_is_not_followed(rooted: tuple[HostDir, Path]) -> None:
    host, outside = rooted
    with pytest.raises(OSError) as exc:
        host.open("abs", os.O_RDONLY)
    assert exc.value.errno == errno.ELOOP
    assert host.readlink("abs") == str(outside)
    host.chown("abs", 0, 0)  # lchown: the symlink itself
    assert os.stat(outside).st_uid == os.getuid()


def test_overlay_never_reaches_through_base_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    base = tmp_path / "base"
    base.mkdir()
    os.symlink(str(outside), base / "escape")
    ov = Overlay([Layer.open_store_layer(1, str(tmp_path / "layer")), Layer.open_base(str(base))])
    try:
        assert ov.readlink("escape") == str(outside)
        for op in (lambda: ov.getattr("escape/secret"), lambda: ov.open("escape/secret", 0),
                   lambda: ov.mkdir("escape/x", 0o755, 0, 0),
                   lambda: ov.rename("escape", "escape2/x")):
            with pytest.raises(Exception) as exc:
                op()
            assert getattr(exc.value, "errno", None) in (errno.ENOTDIR, errno.ENOENT)
        assert sorted(os.listdir(outside)) == ["secret"]
    finally:
        ov.close()
