"""The filesystems under test, each able to build itself fresh and tear itself down.

Every target mounts over a base (lower) directory that already holds a git repo, so reads
of pre-existing files go through the overlay exactly as an agent's would. Teardown always
runs, and escalates from a polite unmount to a lazy detach, because a benchmark that leaves
mounts behind damages the machine it measures.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from bench.system import (
    CommandError,
    abort_mount,
    force_unmount,
    is_mounted,
    run,
    run_quiet,
    wait_for_mount,
)

MOUNT_TIMEOUT = 60.0


class TargetUnavailable(RuntimeError):
    """The target cannot be benchmarked here (tool missing, mount refused); skip it."""


@dataclass(frozen=True)
class Setup:
    """The directories of one fresh instance of a target, all inside one temp dir."""

    dir: Path
    lower: Path
    upper: Path
    work: Path
    mnt: Path
    store: Path
    log: Path

    @classmethod
    def create(cls, parent: Path, name: str) -> Setup:
        """Make a new, empty layout; ``store`` is left absent for tools that create it."""
        parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
        setup = cls(
            dir=root,
            lower=root / "lower",
            upper=root / "upper",
            work=root / "work",
            mnt=root / "mnt",
            store=root / "store",
            log=root / "setup.log",
        )
        for path in (setup.lower, setup.upper, setup.work, setup.mnt):
            path.mkdir()
        return setup


@dataclass
class Mount:
    """A ready target: where workloads run, and how to unblock it if it hangs."""

    root: Path
    abort: Callable[[], None]
    broken: bool = field(default=False)


def _noop() -> None:
    """Abort action for targets that cannot hang in userspace (plain dir, kernel overlay)."""


class Target(ABC):
    """One filesystem configuration to benchmark."""

    name: ClassVar[str]
    description: ClassVar[str]
    fuse: ClassVar[bool] = False
    default: ClassVar[bool] = True  # in the default set (otherwise only with --only)

    def unavailable(self) -> str | None:
        """Why this target cannot run on this machine, or None if it should be tried."""
        return None

    def version(self) -> str | None:
        """Tool version for the JSON metadata, so results can be compared across runs."""
        return None

    @abstractmethod
    def _mount(self, setup: Setup) -> Path:
        """Mount over ``setup.lower`` and return the directory workloads run in."""

    @abstractmethod
    def _unmount(self, setup: Setup) -> None:
        """Polite unmount; failures are tolerated because ``_cleanup`` escalates."""

    def _cleanup(self, setup: Setup) -> None:
        """Guarantee nothing of this setup stays mounted, whatever state it is in."""
        with contextlib.suppress(CommandError):
            self._unmount(setup)
        force_unmount(setup.mnt, fuse=self.fuse)

    @contextlib.contextmanager
    def mounted(self, setup: Setup) -> Iterator[Mount]:
        """Mount for the duration of the block; always unmount, even after a failed mount."""
        try:
            try:
                root = self._mount(setup)
            except CommandError as exc:
                raise TargetUnavailable(f"mount failed: {exc}") from exc
            abort = (lambda: abort_mount(setup.mnt)) if self.fuse else _noop
            yield Mount(root=root, abort=abort)
        finally:
            self._cleanup(setup)


class PlainTarget(Target):
    """The baseline: workloads run straight in the base directory, no overlay at all."""

    name = "plain"
    description = "plain directory (baseline)"

    def _mount(self, setup: Setup) -> Path:
        return setup.lower

    def _unmount(self, setup: Setup) -> None:
        """Nothing was mounted."""


class KernelOverlayTarget(Target):
    """Linux overlayfs: the floor of what a copy-on-write overlay can cost."""

    name = "overlayfs"
    description = "kernel overlayfs"

    def version(self) -> str | None:
        return f"linux {platform.release()}"

    def unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return "mount -t overlay needs root"
        if shutil.which("mount") is None:
            return "mount(8) not found"
        return None

    def _mount(self, setup: Setup) -> Path:
        opts = f"lowerdir={setup.lower},upperdir={setup.upper},workdir={setup.work}"
        run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, setup.mnt],
            timeout=MOUNT_TIMEOUT,
            log=setup.log,
        )
        return setup.mnt

    def _unmount(self, setup: Setup) -> None:
        if is_mounted(setup.mnt):
            run(["umount", setup.mnt], timeout=MOUNT_TIMEOUT, log=setup.log, check=False)


class FuseDaemonTarget(Target):
    """A FUSE overlay we run in the foreground, so we own its pid and can always stop it."""

    fuse = True
    binary: ClassVar[str]
    apt_package: ClassVar[str]

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self.install_failure: str | None = None  # set by install_missing_tools

    @abstractmethod
    def _argv(self, setup: Setup) -> list[str]:
        """Command line, including ``-f`` so the daemon stays our child."""

    def unavailable(self) -> str | None:
        if shutil.which(self.binary) is None:
            why = f" ({self.install_failure})" if self.install_failure else ""
            return f"{self.binary} not installed{why}"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse missing"
        if shutil.which("fusermount3") is None:
            return "fusermount3 not installed"
        return None

    def version(self) -> str | None:
        return run_quiet([self.binary, "--version"], pick=self.binary)

    def _mount(self, setup: Setup) -> Path:
        with open(setup.log, "ab") as log:
            # New session: a Ctrl-C aimed at the harness must not kill the daemon before
            # we unmount; otherwise the mount is left "transport endpoint not connected".
            self._proc = subprocess.Popen(
                self._argv(setup),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        proc = self._proc
        if not wait_for_mount(setup.mnt, timeout=MOUNT_TIMEOUT, alive=lambda: proc.poll() is None):
            tail = setup.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise CommandError(f"{self.binary} did not mount (exit {proc.poll()}): {tail}")
        return setup.mnt

    def _unmount(self, setup: Setup) -> None:
        if is_mounted(setup.mnt):
            run(["fusermount3", "-u", setup.mnt], timeout=MOUNT_TIMEOUT, log=setup.log, check=False)

    def _cleanup(self, setup: Setup) -> None:
        try:
            super()._cleanup(setup)
        finally:
            self._stop_daemon()

    def _stop_daemon(self) -> None:
        """Stop the daemon we started (and only it): it normally exits on unmount."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for action in (None, proc.terminate, proc.kill):
            if action is not None:
                with contextlib.suppress(ProcessLookupError):
                    action()
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue
        print(f"warning: {self.binary} pid {proc.pid} did not exit", file=sys.stderr)


class FuseOverlayfsTarget(FuseDaemonTarget):
    """fuse-overlayfs: the C FUSE implementation of overlayfs semantics (rootless podman)."""

    name = "fuse-overlayfs"
    description = "fuse-overlayfs (C, FUSE)"
    binary = "fuse-overlayfs"
    apt_package = "fuse-overlayfs"

    def _argv(self, setup: Setup) -> list[str]:
        opts = f"lowerdir={setup.lower},upperdir={setup.upper},workdir={setup.work}"
        return [self.binary, "-f", "-o", opts, str(setup.mnt)]


class UnionfsFuseTarget(FuseDaemonTarget):
    """unionfs-fuse in copy-on-write mode: a path-based FUSE union, closer to agentfs' design."""

    name = "unionfs-fuse"
    description = "unionfs-fuse -o cow (C, FUSE)"
    binary = "unionfs-fuse"
    apt_package = "unionfs-fuse"

    def _argv(self, setup: Setup) -> list[str]:
        branches = f"{setup.upper}=RW:{setup.lower}=RO"
        return [self.binary, "-f", "-o", "cow,allow_other", branches, str(setup.mnt)]


class AgentfsTarget(Target):
    """agentfs through its own CLI, exactly as a user would drive it.

    ``agentfs mount`` daemonizes and returns when the mount is ready, so we do not own the
    daemon's pid; teardown is ``agentfs umount`` and then the generic FUSE escalation, which
    makes an orphaned daemon exit on its own (its /dev/fuse connection goes away).

    ``home``, when set, becomes ``$AGENTFS_HOME`` for the CLI: it only decides where the
    registry of stores lives (every store here is given with ``--store``), and keeps the
    hundreds of throwaway stores of a run out of the user's registry.
    """

    name = "agentfs"
    description = "agentfs (Python, kernel front end; built-in default policy)"
    fuse = True
    branch = "bench"
    policy_text: str | None = None  # None: the built-in default policy

    def __init__(self, executable: Path | None = None) -> None:
        self.executable = executable or self.default_executable()
        self.home: Path | None = None

    def _env(self) -> dict[str, str] | None:
        if self.home is None:
            return None
        return {**os.environ, "AGENTFS_HOME": str(self.home)}

    @staticmethod
    def default_executable() -> Path:
        """The console script next to the running interpreter (the project's venv)."""
        local = Path(sys.executable).parent / "agentfs"
        if local.exists():
            return local
        found = shutil.which("agentfs")
        return Path(found) if found else local

    def unavailable(self) -> str | None:
        if not os.access(self.executable, os.X_OK):
            return f"{self.executable} not found (is the package installed in the venv?)"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse missing"
        return None

    def version(self) -> str | None:
        try:
            version = importlib.metadata.version("agentfs")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return f"agentfs {version} ({self.executable})"

    def _cli(self, *args: str | Path, setup: Setup) -> None:
        run([self.executable, *args], timeout=MOUNT_TIMEOUT, log=setup.log, env=self._env())

    def _policy_args(self, setup: Setup) -> list[str | Path]:
        if self.policy_text is None:
            return []
        path = setup.dir / "policy.yaml"
        path.write_text(self.policy_text)
        return ["--policy", path]

    def _mount(self, setup: Setup) -> Path:
        self._cli("init", setup.lower, "--store", setup.store, setup=setup)
        self._cli("branch", "create", self.branch, "--store", setup.store, setup=setup)
        self._cli("mount", setup.mnt, "--branch", self.branch, "--store", setup.store,
                  *self._policy_args(setup), setup=setup)
        # The contract says mount returns once ready; verify rather than trust it.
        if not wait_for_mount(setup.mnt, timeout=10):
            raise CommandError("agentfs mount returned but nothing is mounted")
        return setup.mnt

    def _unmount(self, setup: Setup) -> None:
        if is_mounted(setup.mnt):
            run(
                [self.executable, "umount", setup.mnt],
                timeout=MOUNT_TIMEOUT,
                log=setup.log,
                env=self._env(),
                check=False,
            )


class AgentfsPerProcessTarget(AgentfsTarget):
    """agentfs in per-process mode: the benchmark process is unbound and gets the
    default branch, so it pays exactly what per-process resolution and the uncached
    shared root cost compared with the pinned mount."""

    name = "agentfs-pp"
    description = "agentfs per-process mount (default branch)"

    def _mount(self, setup: Setup) -> Path:
        self._cli("init", setup.lower, "--store", setup.store, setup=setup)
        self._cli("branch", "create", self.branch, "--store", setup.store, setup=setup)
        self._cli("mount", setup.mnt, "--per-process", "--default-branch", self.branch,
                  "--store", setup.store, setup=setup)
        if not wait_for_mount(setup.mnt, timeout=10):
            raise CommandError("agentfs mount returned but nothing is mounted")
        return setup.mnt


class AgentfsNoAuditTarget(AgentfsTarget):
    """agentfs (default policy) with the audit log off: what recording costs."""

    name = "agentfs-noaudit"
    description = "agentfs, audit log off"
    default = False

    def _policy_args(self, setup: Setup) -> list[str | Path]:
        return ["--no-audit"]


class AgentfsAllowAllTarget(AgentfsTarget):
    """agentfs with a policy that allows everything: no check is ever evaluated, the
    baseline for what policy enforcement costs."""

    name = "agentfs-allow"
    description = "agentfs, allow-all policy (no checks)"
    default = False
    policy_text = "version: 1\nname: allow-all\ndefaults: {read: allow, write: allow}\n"


class AgentfsPyfuse3Target(AgentfsTarget):
    """agentfs pinned through the pyfuse3 front end instead of the default (kernel):
    what pyfuse3's trio loop costs next to speaking the FUSE protocol directly."""

    name = "agentfs-pyfuse3"
    description = "agentfs, pyfuse3 front end"
    default = False

    def _policy_args(self, setup: Setup) -> list[str | Path]:
        return ["--impl", "pyfuse3"]


class AgentfsBigPolicyTarget(AgentfsTarget):
    """agentfs with a 200-rule policy (bench.policy.big_policy): every operation is
    checked, none is denied."""

    name = "agentfs-200"
    description = "agentfs, 200-rule policy"

    @property
    def policy_text(self) -> str:  # type: ignore[override]
        from bench.policy import big_policy

        return big_policy(200)


class AgentfsEnvTarget(AgentfsTarget):
    """agentfs pinned with extra environment for its daemon, from $AGENTFS_BENCH_ENV
    (``NAME=VALUE`` pairs separated by spaces, e.g. ``AGENTFS_FUSE_THREADS=1``): a knob
    measured side by side with the default, alternating in one run."""

    name = "agentfs-env"
    description = "agentfs, daemon environment from $AGENTFS_BENCH_ENV"
    default = False

    def _env(self) -> dict[str, str] | None:
        env = super()._env()
        if env is None:
            return None
        for pair in os.environ.get("AGENTFS_BENCH_ENV", "").split():
            key, _, value = pair.partition("=")
            env[key] = value
        return env


def all_targets(agentfs_executable: Path | None = None) -> list[Target]:
    """Targets in report order: baseline first, the system under test last."""
    return [
        PlainTarget(),
        KernelOverlayTarget(),
        FuseOverlayfsTarget(),
        UnionfsFuseTarget(),
        AgentfsTarget(agentfs_executable),
        AgentfsPerProcessTarget(agentfs_executable),
        AgentfsBigPolicyTarget(agentfs_executable),
        AgentfsNoAuditTarget(agentfs_executable),
        AgentfsAllowAllTarget(agentfs_executable),
        AgentfsPyfuse3Target(agentfs_executable),
        AgentfsEnvTarget(agentfs_executable),
    ]


APT_TIMEOUT = 600.0


def install_missing_tools(targets: list[Target], log: Path) -> list[str]:
    """apt-get install the Debian packages of the FUSE targets whose tool is missing.

    Only as root, with a timeout; a failure is not fatal: it is remembered on the target,
    whose ``unavailable()`` then says why it is skipped. Returns what was installed.
    """
    daemons = [t for t in targets if isinstance(t, FuseDaemonTarget)]
    wanted = {t.apt_package for t in daemons if shutil.which(t.binary) is None}
    if wanted and shutil.which("fusermount3") is None:
        wanted.add("fuse3")
    if not wanted:
        return []
    packages = sorted(wanted)
    reason: str | None = None
    if os.geteuid() != 0:
        reason = f"not root, so not installing; apt-get install {' '.join(packages)}"
    elif shutil.which("apt-get") is None:
        reason = "no apt-get to install it with"
    else:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", *packages]
        try:
            if run(install, timeout=APT_TIMEOUT, log=log, env=env, check=False) != 0:
                # A fresh machine may have no package lists yet: fetch them once, retry.
                run(["apt-get", "update", "-q"], timeout=APT_TIMEOUT, log=log, env=env,
                    check=False)
                run(install, timeout=APT_TIMEOUT, log=log, env=env)
        except CommandError as exc:
            reason = f"apt-get install failed: {exc}"
    for t in daemons:
        if shutil.which(t.binary) is None:
            t.install_failure = reason or f"apt-get install {t.apt_package} did not provide it"
    return [p for p in packages if reason is None]
