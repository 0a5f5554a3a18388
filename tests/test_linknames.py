"""The hard-link index walks only the filesystems a hard link can be on: the base's
own device, the store's, and the device of the file asked about (never /proc, other
mounts or FUSE mounts below the base: `agentfs run --full` views the whole root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentfs.branches.store import Store
from agentfs.mount.view import open_branch_view
from agentfs.overlay.engine import Overlay
from agentfs.overlay.linknames import LinkNames, device_tag


@pytest.fixture
def view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Overlay, Path]]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs inside the base needs root")
    base = tmp_path / "base"
    (base / "here").mkdir(parents=True)
    (base / "here/a").write_text("a\n")
    os.link(base / "here/a", base / "here/b")
    other = base / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True, timeout=30)
    try:
        (other / "deep").mkdir()
        (other / "deep/x").write_text("x\n")
        os.link(other / "deep/x", other / "deep/y")
        monkeypatch.setenv("AGENTFS_HOME", str(tmp_path / "home"))
        store = Store.create(base, tmp_path / "store")
        store.create_branch("b")
        ov = open_branch_view(store, "b")
        try:
            yield ov, base
        finally:
            ov.close()
            store.close()
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False, timeout=30)


def test_the_walk_stays_off_other_filesystems_until_asked(view: tuple[Overlay, Path]
                                                          ) -> None:
    ov, _ = view
    visited: list[str] = []
    readdir = ov.readdir

    def recording(path: str):  # type: ignore[no-untyped-def]
        visited.append(path)
        return readdir(path)

    ov.readdir = recording  # type: ignore[method-assign]
    links = LinkNames(ov)
    a = ov.getattr("here/a")
    assert device_tag(a.ino) == 0
    assert links.names("here/a", a.ino) == {"here/a", "here/b"}
    assert "other" not in visited and "other/deep" not in visited
    # a file on the other filesystem: its device is walked now, and found
    x = ov.getattr("other/deep/x")
    assert device_tag(x.ino) != 0
    visited.clear()
    assert links.names("other/deep/x", x.ino) == {"other/deep/x", "other/deep/y"}
    assert "other/deep" in visited
    visited.clear()
    assert links.names("here/b", a.ino) == {"here/a", "here/b"}
    assert visited == []  # both devices walked once: no more walks
