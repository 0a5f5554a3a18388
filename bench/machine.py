"""What a result file needs to say about where it was measured, so that two of them can
be compared (or not): hardware, kernel, filesystem, distro, tool versions, the commit."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.system import fs_type, mounts, run_quiet

REPO = Path(__file__).resolve().parent.parent


def _first_line_with(path: str, prefix: str) -> str | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip() if ":" in line else line.strip()
    except OSError:
        pass
    return None


def _mem_gib() -> float | None:
    total = _first_line_with("/proc/meminfo", "MemTotal")
    try:
        return round(int(total.split()[0]) / 2**20, 1) if total else None
    except ValueError:
        return None


def _distro() -> str | None:
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _libfuse_version() -> str | None:
    """The libfuse3 pyfuse3 links against: the Debian package, else pkg-config."""
    if shutil.which("dpkg-query"):
        for pkg in ("libfuse3-3", "libfuse3-4"):
            got = run_quiet(["dpkg-query", "-W", "-f", "${Version}", pkg])
            if got:
                return f"{pkg} {got}"
    return run_quiet(["pkg-config", "--modversion", "fuse3"])


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO), *args],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.rstrip() if proc.returncode == 0 else None


def repo_state() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it (agentfs is
    installed editable, so uncommitted changes are part of what was measured)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    changed = [line for line in status.splitlines() if line.strip()] if status else []
    diff = _git("diff", "HEAD", "--", "agentfs") or ""
    return {
        "commit": _git("rev-parse", "HEAD"),
        "describe": _git("log", "-1", "--format=%h %s"),
        "dirty": bool(changed),
        "modified": [line[3:] for line in changed][:50],
        # Identifies the agentfs code that ran, uncommitted edits included: if it differs
        # between the start and the end of a run, the code changed while it was measured.
        "agentfs_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def machine_info(root: Path) -> dict[str, Any]:
    root_fs = fs_type(root)
    device = None
    real = os.path.realpath(root)
    best = -1
    for m in mounts():
        mp = m.mountpoint.rstrip("/") or "/"
        if (real == mp or real.startswith(mp + "/") or mp == "/") and len(mp) > best:
            device, best = m.source, len(mp)
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "hostname": platform.node(),
        "cpu_model": _first_line_with("/proc/cpuinfo", "model name") or platform.processor(),
        "cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "mem_gib": _mem_gib(),
        "kernel": platform.release(),
        "kernel_build": platform.version(),
        "arch": platform.machine(),
        "distro": _distro(),
        "root": str(root),
        "root_fs": root_fs,
        "root_device": device,
        "root_journal": _ext4_journal(device) if root_fs == "ext4" else None,
    }


def _ext4_journal(device: str | None) -> bool | None:
    """Whether the ext4 holding the scratch has a journal (jbd2 lists one per journaled
    device).  Without one, ext4 skips inodes freed in the last minute or more when it
    allocates (`recently_deleted`), so creating files after a mass delete gets slower
    with every freed inode: why the harness keeps finished runs' files to the end."""
    if not device or not device.startswith("/dev/"):
        return None
    try:
        journals = os.listdir("/proc/fs/jbd2")
    except FileNotFoundError:
        return False
    except OSError:
        return None
    name = os.path.basename(os.path.realpath(device))
    return any(entry.rsplit("-", 1)[0] == name for entry in journals)


def tool_versions() -> dict[str, str | None]:
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "pyfuse3": _package_version("pyfuse3"),
        "trio": _package_version("trio"),
        "libfuse": _libfuse_version(),
        "fusermount3": run_quiet(["fusermount3", "--version"]),
        "git": run_quiet(["git", "--version"]),
        "tar": run_quiet(["tar", "--version"]),
        "grep": run_quiet(["grep", "--version"]),
        "pip": _package_version("pip"),
    }


def agentfs_environment() -> dict[str, str]:
    """AGENTFS_* variables of the environment: they are inherited by the daemons."""
    return {k: v for k, v in os.environ.items() if k.startswith("AGENTFS_")}
