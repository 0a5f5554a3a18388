"""`agentfs run` on macOS: a FUSE-T mount of the branch and a Seatbelt sandbox.

macOS has no mount namespaces, so the project cannot appear at its own path: the
branch is mounted (through the mfusepy front end, the one that works with FUSE-T) in
the store's run directory, CMD starts in the mount (the caller's directory mapped into
it), and `sandbox-exec` confines it with a generated SBPL profile: everything denied,
then reads of the system's own locations, reads and writes only under the mount and a
private temporary directory (TMPDIR), network only with --network.

chroot: on macOS it needs root, and the new root must hold the whole system
(sandbox-exec, the shell, dyld's shared cache), which the project's mount does not.
So `launch_command` puts `/usr/sbin/chroot` in front only for a view of a whole root
and only as root (when not root it is skipped and the profile alone confines CMD).
`run` never asks for it: --full, the only mode with such a view, is refused as on
Linux, so today the profile is the whole confinement.  Started through sudo, CMD runs
as the invoking user.

The mount is shared like on Linux (one daemon per branch, a lease per run, the last
user unmounts; see `launch`).  This module runs only on macOS; everything that builds
text or command lines is pure, so it is unit-tested on Linux.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from agentfs import capabilities
from agentfs.branches.store import Store, agentfs_home
from agentfs.errors import UserError
from agentfs.sandbox import launch, machlookup
from agentfs.sandbox.machlookup import MachLookup, sbpl_rules
from agentfs.sandbox.nsinit import Identity

SANDBOX_EXEC = "/usr/bin/sandbox-exec"
CHROOT = "/usr/sbin/chroot"
UMOUNT = "/sbin/umount"
DISKUTIL = "/usr/sbin/diskutil"

# Read-only: the system, developer tools, package managers' prefixes.
SYSTEM_READ_SUBPATHS = ("/usr", "/bin", "/sbin", "/System", "/Library", "/opt/homebrew",
                        "/Applications/Xcode.app", "/private/etc", "/private/var/db/timezone",
                        "/private/var/db/dyld")
SYSTEM_READ_LITERALS = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/tty",
                        "/dev/dtracehelper", "/etc", "/tmp", "/var")
# Where executable code is mapped from (dylibs, the dyld cache), besides the mount.
SYSTEM_CODE_SUBPATHS = ("/usr", "/bin", "/sbin", "/System", "/Library", "/opt/homebrew",
                        "/Applications/Xcode.app", "/private/var/db/dyld")
DEVICE_WRITE_LITERALS = ("/dev/null", "/dev/zero", "/dev/tty", "/dev/dtracehelper")
# Mach services: see agentfs.sandbox.machlookup (allow and block lists, prefixes)
NETWORK_MACH_SERVICES = ("com.apple.dnssd.service", "com.apple.mDNSResponder")

_HEX_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def sbpl_string(text: str) -> str:
    """*text* as an SBPL (TinyScheme) string literal: quotes and backslashes escaped,
    \\n \\t \\r for those, \\xHH for other control characters; other characters
    (spaces, unicode) as they are (the profile is UTF-8)."""
    if "\x00" in text:
        raise ValueError("a path in a Seatbelt profile cannot contain NUL")
    out = []
    for ch in text:
        if ch in _HEX_ESCAPES:
            out.append(_HEX_ESCAPES[ch])
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _absolute(path: str | Path) -> str:
    text = os.fspath(path)
    if not text.startswith("/"):
        raise ValueError(f"Seatbelt paths must be absolute: {text!r}")
    return os.path.normpath(text).replace("//", "/")


def _ancestors(paths: Iterable[str]) -> list[str]:
    """Every proper ancestor of *paths*, root first: stat(2) on them is what getcwd,
    realpath and path walks need, and reveals nothing but their existence."""
    out: list[str] = []
    for path in paths:
        parts = path.split("/")[1:-1]
        for i in range(len(parts) + 1):
            ancestor = "/" + "/".join(parts[:i])
            if ancestor not in out:
                out.append(ancestor)
    return out


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _filters(kind: str, paths: Iterable[str]) -> str:
    return "\n".join(f"  ({kind} {sbpl_string(p)})" for p in paths)


def seatbelt_profile(mountpoint: str | Path, cwd: str | Path,
                     writable_extra: Sequence[str | Path], network: bool,
                     mach: MachLookup | None = None) -> str:
    """The SBPL profile for a run: deny by default; the system readable; the mount
    and *writable_extra* (private temporary directories) readable and writable; Mach
    services as *mach* says (the defaults if None); the network only if *network*.
    Paths must be absolute and canonical (Seatbelt matches /private/var/..., not the
    /var symlink)."""
    mach = mach or MachLookup()
    mount = _absolute(mountpoint)
    here = _absolute(cwd)
    extra = [_absolute(p) for p in writable_extra]
    rw = [mount, *[p for p in extra if p != mount]]
    sections = [
        "(version 1)",
        ";; agentfs run: generated; writes only under the branch's mount and the private",
        ";; temporary directories, reads of the system's own locations.",
        "(deny default)",
        "",
        "(allow process-exec)",
        "(allow process-fork)",
        "(allow process-info* (target self))",
        "(allow signal (target self))",
        "(allow signal (target same-sandbox))",
        "(allow sysctl-read)",
        *sbpl_rules(mach),
        '(allow ipc-posix-shm-read-data (ipc-posix-name "apple.shm.notification_center"))',
        "",
        ";; the system, read-only",
        "(allow file-read*",
        _filters("subpath", SYSTEM_READ_SUBPATHS),
        _filters("literal", SYSTEM_READ_LITERALS) + ")",
        "(allow file-map-executable",
        _filters("subpath", [*SYSTEM_CODE_SUBPATHS, *rw]) + ")",
        "(allow file-read-metadata",
        _filters("literal", [a for a in _ancestors([*rw, here])
                             if not any(_within(a, p) for p in rw)]) + ")",
        "(allow file-write-data file-ioctl",
        _filters("literal", DEVICE_WRITE_LITERALS) + ")",
        "(allow pseudo-tty)",
        "(allow file-read* file-write* file-ioctl",
        '  (literal "/dev/ptmx")',
        '  (regex #"^/dev/ttys[0-9]+$"))',
        "",
        ";; the branch's mount and the private temporary directories",
        "(allow file-read* file-write*",
        _filters("subpath", rw) + ")",
    ]
    if network:
        resolvers = [n for n in NETWORK_MACH_SERVICES if n not in mach.block]
        sections += ["", ";; --network",
                     "(allow network*)",
                     "(allow system-socket)"]
        if resolvers:
            sections += ["(allow mach-lookup", _filters("global-name", resolvers) + ")"]
    return "\n".join(sections) + "\n"


def mount_command(agentfs: str, store_root: str | Path, mountpoint: str | Path, branch: str,
                  policy: str | None = None) -> list[str]:
    """`agentfs mount` of the branch through the mfusepy front end (FUSE-T)."""
    argv = [agentfs, "--store", os.fspath(store_root), "mount", os.fspath(mountpoint),
            "--branch", branch, "--impl", "mfusepy"]
    if policy:
        argv += ["--policy", os.path.abspath(policy)]
    return argv


def launch_command(cmd: Sequence[str], profile: str, *, chroot_dir: str | Path | None = None,
                   is_root: bool = False, user: Identity | None = None) -> list[str]:
    """sandbox-exec with *profile* around *cmd*; behind chroot(8) into *chroot_dir*
    (dropping to *user*) when one is given and we are root; without root the chroot
    is skipped and the profile alone confines the command."""
    if not cmd:
        raise ValueError("no command")
    argv = [SANDBOX_EXEC, "-p", profile, "--", *cmd]
    if chroot_dir is None or not is_root:
        return argv
    prefix = [CHROOT]
    if user is not None:
        prefix += ["-u", str(user.uid), "-g", str(user.gid),
                   "-G", ",".join(str(g) for g in user.groups)]
    return [*prefix, os.fspath(chroot_dir), *argv]


def map_cwd(cwd: str, base: str, mountpoint: str) -> str:
    """The caller's directory inside the mount when it is in the project, else the
    mount's root (nothing else is readable in the sandbox)."""
    if not _within(cwd, base):
        return mountpoint
    rel = os.path.relpath(cwd, base)
    return mountpoint if rel == "." else os.path.join(mountpoint, rel)


# -- running it (macOS only) ------------------------------------------------------------
def _agentfs_executable() -> str:
    return shutil.which("agentfs") or os.path.join(os.path.dirname(sys.executable), "agentfs")


def _start_mount(store: Store, branch: str, view: Path, policy: str | None) -> int:
    res = subprocess.run(mount_command(_agentfs_executable(), store.root, view, branch, policy),
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise UserError(res.stderr.strip().removeprefix("agentfs: ") or "mount failed")
    found = re.search(r"daemon pid (\d+)", res.stdout)
    if found is None:
        raise UserError(f"agentfs mount did not report its daemon: {res.stdout.strip()}")
    return int(found.group(1))


def _stop_mount(_store: Store, view: Path, pid: int) -> None:
    for argv in ([UMOUNT, os.fspath(view)], [DISKUTIL, "unmount", "force", os.fspath(view)]):
        if subprocess.run(argv, capture_output=True, timeout=60).returncode == 0:
            break
    else:
        raise UserError(f"could not unmount {view}")
    deadline = time.monotonic() + 30
    while pid > 0 and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


MACOS_VIEW_OPS = launch.ViewOps(start=_start_mount, stop=_stop_mount)


FULL_MESSAGE = ("--full is Linux-only: FUSE-T cannot serve a whole-root overlay the "
                "sandbox could pivot into; without it the project is writable through the "
                "branch and the rest of the system is read-only")


def run(store: Store, *, branch: str, cmd: list[str], create: bool = False,
        policy: str | None = None, network: bool = False, keep_mount: bool = False,
        full: bool = False) -> int:
    """Run *cmd* in the branch's mount under sandbox-exec; return its exit status."""
    if full:
        raise UserError(FULL_MESSAGE)
    if not cmd:
        raise UserError("no command given: agentfs run --branch NAME -- CMD [ARGS...]")
    if not os.access(SANDBOX_EXEC, os.X_OK):
        raise UserError(capabilities.probe_sandbox_exec().message())
    if create:
        launch.ensure_branch(store, branch)
    store.branch(branch)
    user = launch.identity_from_env(os.environ) if os.geteuid() == 0 else None
    cwd = os.getcwd()
    own_dir = Path(tempfile.mkdtemp(prefix=f"sandbox-{os.getpid()}-", dir=store.root / "run"))
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="agentfs-run-"))
    lease = None
    with launch.SignalRelay() as signals:
        try:
            lease = launch.acquire_view(store, branch, policy, keep_mount, own_dir,
                                        MACOS_VIEW_OPS)
            mount = os.path.realpath(lease.mountpoint)
            start = map_cwd(os.path.realpath(cwd), os.path.realpath(store.base), mount)
            mach = machlookup.load(agentfs_home() / "seatbelt.yaml")
            argv = launch_command(cmd, seatbelt_profile(mount, start, [tmp], network, mach))
            env = dict(os.environ, TMPDIR=tmp + "/", PWD=start)
            if user is not None:
                env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
                os.chown(tmp, user.uid, user.gid)
            signals.interruptible = False
            proc = subprocess.Popen(argv, cwd=start, env=env,
                                    user=user.uid if user else None,
                                    group=user.gid if user else None,
                                    extra_groups=list(user.groups) if user else None)
            signals.target = proc.pid
            code = proc.wait()
            signals.target = 0
            return 128 - code if code < 0 else code
        finally:
            signals.interruptible = False  # the cleanup always finishes
            shutil.rmtree(tmp, ignore_errors=True)
            launch.finish(store, lease, own_dir, MACOS_VIEW_OPS)
