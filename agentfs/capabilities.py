"""What this machine offers agentfs: one probe per piece, each with its consequence and fix.

`agentfs doctor` shows every probe; the commands that need a piece use the same
probes before they start (`require_fuse` for mount and run, `fusermount_message`,
`namespaces_message`), so a missing piece is the same one line everywhere: what is
missing, what that means for agentfs, and how to fix it.

A probe returns a `Check`.  `needed_for` names what fails without the piece:

    mount                `agentfs mount --branch` (the default front end)
    mount --per-process  `agentfs mount --per-process` (the kernel front end on Linux)
    umount               `agentfs umount` (fusermount3 -u)
    run                  `agentfs run` (root, mount/pid/network namespaces on Linux;
                         FUSE-T and sandbox-exec on macOS)

A piece that does not exist on this platform (FUSE-T on Linux, /dev/fuse on macOS)
is "not applicable": never missing.

Test/override knob: AGENTFS_DOCTOR_FUSE_DEVICE names the path the FUSE-device probe
checks instead of /dev/fuse (tests point it at a nonexistent path to see what a
machine without FUSE gets, from doctor and from the check `agentfs mount` makes
before it starts).  It changes only the probe: a mount still opens /dev/fuse.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import importlib.metadata
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agentfs.errors import MountError, UserError

OK = "ok"
MISSING = "missing"
NOT_APPLICABLE = "not applicable"

FUSE_DEVICE_ENV = "AGENTFS_DOCTOR_FUSE_DEVICE"
FUSE_DEVICE = "/dev/fuse"
FUSE_T_PATHS = ("/usr/local/lib/libfuse-t.dylib", "/opt/homebrew/lib/libfuse-t.dylib",
                "/Library/Application Support/fuse-t")
SANDBOX_EXEC = "/usr/bin/sandbox-exec"  # as agentfs.sandbox.macos runs it

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# what `agentfs run` on Linux does without namespaces (launch.check_namespaces): refuse
NAMESPACE_FIX = ("run agentfs run as root on the host; in a container start it with "
                 "--privileged (or CAP_SYS_ADMIN and an unconfined seccomp profile)")
FUSE3_FIX = ("install fuse3: apt-get install fuse3 (Debian/Ubuntu), dnf install fuse3 "
             "(Fedora), pacman -S fuse3 (Arch)")


@dataclass(frozen=True)
class Check:
    """One piece of the machine: whether it is there, what was found, and, when it is
    missing, what that costs agentfs and how to fix it."""

    name: str
    status: str          # OK, MISSING or NOT_APPLICABLE
    detail: str          # what was found (a version, a path, an errno)
    consequence: str = ""
    fix: str = ""
    needed_for: tuple[str, ...] = ()
    title: str = ""      # the start of the one-line error, e.g. "FUSE is unavailable"

    @property
    def ok(self) -> bool:
        return self.status != MISSING

    def message(self) -> str:
        """The one line a command prints when it needs this piece and it is missing."""
        head = f"{self.title}: {self.detail}" if self.title else f"{self.name}: {self.detail}"
        return f"{head}; {self.consequence}; fix: {self.fix} (see `agentfs doctor`)"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "ok": self.ok,
                "detail": self.detail, "consequence": self.consequence, "fix": self.fix,
                "needed_for": list(self.needed_for)}


@dataclass(frozen=True)
class Report:
    """Every probe, and what this agentfs will use here."""

    platform: str
    checks: tuple[Check, ...] = field(default_factory=tuple)

    def missing_for(self, feature: str) -> list[Check]:
        return [c for c in self.checks if not c.ok and feature in c.needed_for]

    @property
    def ok(self) -> bool:
        """Everything a mount needs is here (what `agentfs doctor` exits 0 on)."""
        return not self.missing_for("mount")

    def as_dict(self) -> dict[str, Any]:
        return {"platform": self.platform, "ok": self.ok,
                "checks": [c.as_dict() for c in self.checks]}


def _linux() -> bool:
    return sys.platform.startswith("linux")


def _macos() -> bool:
    return sys.platform == "darwin"


def _not_applicable(name: str, where: str) -> Check:
    return Check(name, NOT_APPLICABLE, f"{where} only")


# -- front end ----------------------------------------------------------------------
def front_ends() -> tuple[str, str]:
    """The FUSE front ends `agentfs mount` picks here: (pinned, per-process); the
    choice made by `lifecycle.choose_impl`, so $AGENTFS_FUSE_IMPL counts."""
    from agentfs.mount.lifecycle import choose_impl

    return choose_impl(None), choose_impl(None, per_process=True)


def _needs(module: str, pinned: str, per_process: str) -> tuple[str, ...]:
    """Which features need the Python binding *module* with these front ends."""
    uses = {"pyfuse3": ("pyfuse3", "trio"), "mfusepy": ("mfusepy",), "kernel": ()}
    wanted = [feature for feature, impl in (("mount", pinned), ("run", pinned),
                                            ("mount --per-process", per_process))
              if module in uses[impl]]
    return tuple(wanted)


def probe_front_end() -> Check:
    try:
        pinned, per_process = front_ends()
    except UserError as exc:  # an unknown $AGENTFS_FUSE_IMPL
        return Check("front end", MISSING, str(exc),
                     consequence="agentfs mount refuses to start",
                     fix="unset AGENTFS_FUSE_IMPL or set it to pyfuse3, mfusepy or kernel",
                     needed_for=("mount", "mount --per-process", "run"))
    env = os.environ.get("AGENTFS_FUSE_IMPL")
    source = f" (from AGENTFS_FUSE_IMPL={env})" if env else ""
    return Check("front end", OK, f"{pinned} (mount --branch), {per_process} "
                                  f"(mount --per-process){source}",
                 needed_for=("mount", "mount --per-process", "run"))


# -- FUSE ---------------------------------------------------------------------------
def probe_fuse_device() -> Check:
    """/dev/fuse exists, is the FUSE character device, and opens read-write (as the
    kernel front end and libfuse open it when mounting as root)."""
    name = "FUSE device"
    if not _linux():
        return _not_applicable(name, "Linux")
    path = os.environ.get(FUSE_DEVICE_ENV) or FUSE_DEVICE
    needed = ("mount", "mount --per-process", "run")
    consequence = "agentfs mount and agentfs run cannot mount a branch"

    def missing(detail: str, fix: str) -> Check:
        return Check(name, MISSING, detail, consequence, fix, needed,
                     title="FUSE is unavailable")

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return missing(f"{path} does not exist",
                       "load the module: modprobe fuse (in a container: run it with "
                       "--device /dev/fuse)")
    except OSError as exc:
        return missing(f"{path} cannot be read: {exc.strerror}", "check /dev's permissions")
    if not stat.S_ISCHR(st.st_mode):
        return missing(f"{path} is not a character device",
                       "recreate it: rm /dev/fuse && mknod -m 666 /dev/fuse c 10 229")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        # not root, agentfs never opens it: a setuid-root fusermount3 does the mount
        helper = _setuid_fusermount()
        if os.geteuid() != 0 and helper:
            return Check(name, OK, f"{path} (character device, not openable by this user: "
                                   f"{exc.strerror}; the setuid {helper} opens it)",
                         needed_for=needed)
        return missing(f"{path} cannot be opened read-write ({exc.strerror})",
                       "run as root, or make it usable: chmod 666 /dev/fuse")
    os.close(fd)
    return Check(name, OK, f"{path} (character device {os.major(st.st_rdev)}:"
                           f"{os.minor(st.st_rdev)}, opens read-write)", needed_for=needed)


def probe_fusermount(version: bool = True) -> Check:
    """fusermount3 on PATH: agentfs mounts through it when not root and always
    unmounts with it (`fusermount3 -u`), so `agentfs mount` insists on it.  The
    version (one more exec) only when asked: a mount's check does without it."""
    name = "fusermount3"
    if not _linux():
        return _not_applicable(name, "Linux")
    tool = shutil.which("fusermount3")
    if tool is None:
        return _fusermount_missing()
    found = _run_version([tool, "--version"]) if version else ""
    return Check(name, OK, f"{tool}" + (f" ({found})" if found else ""),
                 needed_for=_fusermount_missing().needed_for)


def _setuid_fusermount() -> str | None:
    """fusermount3's path if it is setuid root (so it can open /dev/fuse for us)."""
    tool = shutil.which("fusermount3")
    if tool is None:
        return None
    try:
        st = os.stat(tool)
    except OSError:
        return None
    return tool if st.st_uid == 0 and st.st_mode & stat.S_ISUID else None


def _fusermount_missing() -> Check:
    return Check("fusermount3", MISSING, "fusermount3 not found on PATH",
                 "agentfs mount refuses to start and agentfs umount cannot unmount",
                 FUSE3_FIX, ("mount", "mount --per-process", "umount", "run"),
                 title="FUSE is unavailable")


def _run_version(argv: list[str]) -> str:
    """The first line a tool's --version prints (fusermount3 writes it to stderr)."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (res.stdout + res.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def libfuse_version() -> tuple[str, str] | None:
    """(library, version) of the libfuse3 the pyfuse3 and mfusepy front ends load, or
    None if there is none."""
    name = ctypes.util.find_library("fuse3")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    with contextlib.suppress(AttributeError):
        pkgversion = lib.fuse_pkgversion  # libfuse >= 3.0: "3.14.0"
        pkgversion.restype = ctypes.c_char_p
        text = pkgversion()
        if text:
            return name, text.decode(errors="replace")
    number = int(lib.fuse_version())  # major * 100 + minor
    return name, f"{number // 100}.{number % 100}"


def probe_libfuse(pinned: str, per_process: str) -> Check:
    name = "libfuse3"
    if not _linux():
        return _not_applicable(name, "Linux")
    needed = tuple(dict.fromkeys(_needs("pyfuse3", pinned, per_process)
                                 + _needs("mfusepy", pinned, per_process)))
    found = libfuse_version()
    if found is None:
        return Check(name, MISSING, "libfuse3 not found (ldconfig has no libfuse3.so)",
                     "the pyfuse3 and mfusepy front ends cannot load: agentfs mount "
                     "--impl pyfuse3/mfusepy fails (the kernel front end needs no "
                     "libfuse)",
                     "apt-get install libfuse3-3 (Debian/Ubuntu), dnf install fuse3-libs "
                     "(Fedora)", needed, title="libfuse3 is unavailable")
    return Check(name, OK, f"{found[1]} ({found[0]})", needed_for=needed)


# -- Python bindings ----------------------------------------------------------------
def _module_version(module: Any, dist: str) -> str:
    version = getattr(module, "__version__", None)
    if not version:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = importlib.metadata.version(dist)
    return str(version or "unknown version")


def probe_module(module: str, needed: tuple[str, ...], consequence: str, fix: str,
                 linux_only: bool = False) -> Check:
    """The Python module imports (a binding's import also loads its libfuse)."""
    if linux_only and not _linux():
        return _not_applicable(module, "Linux")
    import agentfs.mount  # noqa: F401  - sets FUSE_LIBRARY_NAME, as a mount does

    try:
        imported = importlib.import_module(module)
    except Exception as exc:  # ImportError, or OSError from a missing libfuse
        return Check(module, MISSING, f"cannot import {module}: {_one_line(exc)}",
                     consequence, fix, needed, title=f"{module} is unavailable")
    return Check(module, OK, _module_version(imported, module), needed_for=needed)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


# -- privileges and namespaces ------------------------------------------------------
def probe_root(euid: int | None = None) -> Check:
    name = "root"
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return Check(name, OK, "running as root (euid 0)", needed_for=("run",))
    if _macos():
        return Check(name, OK, f"euid {euid}: agentfs run confines CMD with sandbox-exec "
                               "(started through sudo it runs CMD as you)")
    return Check(name, MISSING, f"not root (euid {euid})",
                 "agentfs run refuses to start (it mounts FUSE, creates namespaces and "
                 "pivots root); agentfs mount still works, through fusermount3",
                 "run it with sudo: sudo agentfs run --branch NAME -- CMD", ("run",),
                 title="agentfs run needs root")


def namespace_problem(flags: int) -> str | None:
    """Why unshare(*flags*) fails here, probed in a throw-away child, or None."""
    from agentfs.sandbox import linux

    return linux.namespace_problem(flags)


def probe_namespace(kind: str) -> Check:
    """Whether a child can unshare(2) into a new namespace of *kind* (what
    `agentfs run`'s relay does: mount and pid always, network unless --network)."""
    flag, consequence = {
        "mount": (CLONE_NEWNS, "agentfs run refuses to start (no fallback: the "
                               "project's path cannot show the branch without it)"),
        "pid": (CLONE_NEWPID, "agentfs run refuses to start (CMD would see and signal "
                              "every process)"),
        "network": (CLONE_NEWNET, "agentfs run refuses to start unless --network (no "
                                  "private loopback)"),
    }[kind]
    name = f"{kind} namespaces"
    if not _linux():
        return _not_applicable(name, "Linux")
    flag_name = {CLONE_NEWNS: "CLONE_NEWNS", CLONE_NEWPID: "CLONE_NEWPID",
                 CLONE_NEWNET: "CLONE_NEWNET"}[flag]
    problem = namespace_problem(flag)
    if problem is None:
        return Check(name, OK, f"unshare({flag_name}) works", needed_for=("run",))
    who = "" if os.geteuid() == 0 else f"; probed as euid {os.geteuid()}, run needs root"
    return Check(name, MISSING, f"unshare({flag_name}) failed: {problem}{who}",
                 consequence, NAMESPACE_FIX, ("run",),
                 title="agentfs run cannot create namespaces here")


def _sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def probe_user_namespaces() -> Check:
    """User namespaces: reported because they decide whether a sandbox could work
    without root; agentfs does not use them today (run needs root), so no feature
    depends on them."""
    name = "user namespaces"
    if not _linux():
        return _not_applicable(name, "Linux")
    knobs = {"user.max_user_namespaces": "/proc/sys/user/max_user_namespaces",
             "kernel.unprivileged_userns_clone": "/proc/sys/kernel/unprivileged_userns_clone",
             "kernel.apparmor_restrict_unprivileged_userns":
                 "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"}
    values = {k: v for k, p in knobs.items() if (v := _sysctl(p)) is not None}
    settings = ", ".join(f"{k}={v}" for k, v in values.items())
    problem = namespace_problem(CLONE_NEWUSER)
    detail = "unshare(CLONE_NEWUSER) " + ("works" if problem is None
                                          else f"failed: {problem}")
    detail += f" ({settings})" if settings else ""
    if problem is None:
        return Check(name, OK, detail)
    fixes = []
    if values.get("user.max_user_namespaces") == "0":
        fixes.append("sysctl -w user.max_user_namespaces=15000")
    if values.get("kernel.unprivileged_userns_clone") == "0":
        fixes.append("sysctl -w kernel.unprivileged_userns_clone=1")
    if values.get("kernel.apparmor_restrict_unprivileged_userns") == "1":
        fixes.append("sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    return Check(name, MISSING, detail,
                 "none for agentfs today: it does not use user namespaces (agentfs run "
                 "needs root instead)",
                 "; ".join(fixes) or "run as root, or allow user namespaces (in a "
                                     "container: an unconfined seccomp profile)")


def probe_passthrough() -> Check:
    """FUSE passthrough (the kernel front end): a speed-up, so no feature needs it; the
    kernel's build option (CONFIG_FUSE_PASSTHROUGH) shows only in a mount's INIT."""
    from agentfs.mount.kernel import passthrough

    name = "FUSE passthrough"
    if not _linux():
        return _not_applicable(name, "Linux")
    release = passthrough.kernel_release()
    consequence = ("the kernel front end reads and writes the branch's own files through "
                   "the daemon (with the writeback cache) instead of straight from them")
    if passthrough.turned_off():
        return Check(name, MISSING, f"turned off ({passthrough.OFF_KNOB}=0)", consequence,
                     f"unset {passthrough.OFF_KNOB}")
    if release < passthrough.SINCE:
        return Check(name, MISSING, f"Linux {release[0]}.{release[1]} has none (6.9 and "
                     "later have it)", consequence, "run a Linux 6.9 or later kernel")
    if not passthrough.may_register():
        return Check(name, MISSING, "no CAP_SYS_ADMIN in the initial user namespace, which "
                     "registering a backing file needs", consequence,
                     "run agentfs mount as root on the host (in a container: --privileged)")
    return Check(name, OK, f"Linux {release[0]}.{release[1]}, CAP_SYS_ADMIN (used when the "
                 "kernel was built with it)")


# -- macOS --------------------------------------------------------------------------
def probe_fuse_t() -> Check:
    name = "FUSE-T"
    if not _macos():
        return _not_applicable(name, "macOS")
    needed = ("mount", "run")
    found = [p for p in FUSE_T_PATHS if os.path.exists(p)]
    if not found:
        return Check(name, MISSING, f"none of {', '.join(FUSE_T_PATHS)} exists",
                     "agentfs mount and agentfs run cannot mount a branch",
                     "brew install macos-fuse-t/homebrew-cask/fuse-t", needed,
                     title="FUSE is unavailable")
    return Check(name, OK, found[0], needed_for=needed)


def probe_sandbox_exec() -> Check:
    name = "sandbox-exec"
    if not _macos():
        return _not_applicable(name, "macOS")
    if not os.access(SANDBOX_EXEC, os.X_OK):
        return Check(name, MISSING, f"{SANDBOX_EXEC} is missing or not executable",
                     "agentfs run refuses to start (it confines CMD with Seatbelt)",
                     "it ships with macOS: restore the system's /usr/bin", ("run",),
                     title="sandbox-exec is unavailable")
    return Check(name, OK, SANDBOX_EXEC, needed_for=("run",))


# -- all of them --------------------------------------------------------------------
def _platform() -> str:
    import platform

    if _macos():
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    return f"{platform.system()} {platform.release()} ({platform.machine()})"


def probes(pinned: str, per_process: str) -> list[Callable[[], Check]]:
    """The probes in the order doctor shows them."""
    binding_fix = "reinstall agentfs: pip install --force-reinstall agentfs"
    return [
        probe_fuse_device,
        probe_fusermount,
        lambda: probe_libfuse(pinned, per_process),
        lambda: probe_module("pyfuse3", _needs("pyfuse3", pinned, per_process),
                             "agentfs mount --impl pyfuse3 fails",
                             "pip install pyfuse3 (needs libfuse3-dev and pkg-config to "
                             "build)", linux_only=True),
        lambda: probe_module("trio", _needs("trio", pinned, per_process),
                             "the pyfuse3 front end cannot run", f"pip install trio; or "
                             f"{binding_fix}"),
        lambda: probe_module("mfusepy", _needs("mfusepy", pinned, per_process),
                             "the mfusepy front end (--impl mfusepy, FUSE-T on macOS) "
                             "cannot run", f"pip install mfusepy; or {binding_fix}"),
        probe_root,
        lambda: probe_namespace("mount"),
        lambda: probe_namespace("pid"),
        lambda: probe_namespace("network"),
        probe_user_namespaces,
        probe_passthrough,
        probe_fuse_t,
        probe_sandbox_exec,
    ]


def report() -> Report:
    """Run every probe (a few forks and one fusermount3 --version: well under a
    second)."""
    front = probe_front_end()
    try:
        pinned, per_process = front_ends()
    except UserError:  # reported by the front-end row; the bindings as by default
        pinned, per_process = ("kernel", "kernel") if _linux() else ("mfusepy", "mfusepy")
    return Report(_platform(), (front, *(probe() for probe in probes(pinned, per_process))))


# -- for the commands ---------------------------------------------------------------
def mount_checks() -> Iterable[Callable[[], Check]]:
    """The probes every mount depends on, cheapest first (the bindings are imported
    by the daemon, which reports its own failure)."""
    if _macos():
        yield probe_fuse_t
        return
    yield probe_fuse_device
    yield lambda: probe_fusermount(version=False)


def require_fuse() -> None:
    """Raise MountError with the probe's one line if this machine cannot mount FUSE
    (what `agentfs mount` and `agentfs run` check before they start)."""
    for probe in mount_checks():
        check = probe()
        if not check.ok:
            raise MountError(check.message())


def fusermount_message() -> str:
    """The line for a missing fusermount3 (for code that finds it missing later)."""
    return _fusermount_missing().message()


def namespaces_message(problem: str) -> str:
    """The line `agentfs run` prints when unshare(2) of its namespaces fails."""
    return (f"agentfs run cannot create namespaces here (unshare failed: {problem}); "
            f"agentfs run refuses to start without them; fix: {NAMESPACE_FIX} "
            "(see `agentfs doctor`)")
