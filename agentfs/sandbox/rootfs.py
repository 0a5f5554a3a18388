"""The sandbox's root filesystem, built by the sandbox's init in its own mount namespace.

R (the new root) is a recursive bind of the host's / with every mount made read-only,
so a write anywhere outside the project fails with EROFS.  On top of it:

    R/<project>          the branch's FUSE view, read-write, at the project's own path
    R/tmp, R/var/tmp     private tmpfs (mode 1777): nothing shared with the host
    R/proc               proc of the sandbox's pid namespace (only its processes);
                         /proc/sys, sysrq-trigger, irq, bus, fs read-only; kcore,
                         keys, timer_list, ... masked
    R/dev                tmpfs with null zero full random urandom tty (bound from the
                         host), a new devpts instance, shm, fd/stdin/stdout/stderr
    R/sys                the host's, read-only like everything else
    masked               the store (layers, trash, audit db, control sockets), agentfs'
                         home (registry), /run/user, every unix socket under /run (a
                         read-only root cannot stop connect(2): docker, dbus and
                         systemd sockets would reach the host), and common secrets in
                         every home directory (.ssh, .gnupg, cloud credentials, ...)

A masked directory is an empty read-only tmpfs, a masked file (or socket) a read-only
bind of /dev/null.  A path is masked at every place it is visible in R, not only at its
usual name: a bind mount of the same filesystem elsewhere would otherwise show it
(found through the device and root columns of mountinfo).  Paths inside the project
are left to the mount's policy.  Finally pivot_root makes R the root and the old root
is detached, so there is nothing to escape back to.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import stat
from dataclasses import dataclass

from agentfs.sandbox import linux
from agentfs.sandbox.linux import MountEntry, is_within

log = logging.getLogger(__name__)

# Credentials and keys that live outside any project: masked in every home directory.
SECRET_DIRS = (".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".config/gcloud",
               ".config/gh", ".password-store", ".local/share/keyrings")
SECRET_FILES = (".netrc", ".git-credentials", ".pgpass", ".pypirc", ".npmrc",
                ".vault-token", ".cargo/credentials", ".cargo/credentials.toml")

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "acpi", "scsi",
               "asound")
SOCKET_DIRS = ("/run", "/var/run")
SOCKET_WALK_DEPTH = 6

_MASK_FLAGS = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC


@dataclass(frozen=True)
class RootSpec:
    """What the sandbox's root is made of (all host paths, absolute and resolved)."""
    new_root: str            # an empty directory; becomes /
    view: str                # the branch's FUSE mountpoint
    project: str             # the base directory: where the view appears inside
    hidden: tuple[str, ...]  # masked wherever visible: the store, agentfs' home
    homes: tuple[str, ...]   # home directories whose secrets are masked
    whole_root: str | None = None  # --full: the root branch's view, which becomes /


def home_directories(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """/root, every /home/*, and *extra* (the invoking user's home), resolved."""
    found = ["/root", *extra]
    with contextlib.suppress(OSError), os.scandir("/home") as it:
        found += [e.path for e in it if e.is_dir(follow_symlinks=False)]
    out: list[str] = []
    for path in found:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in out:
            out.append(real)
    return tuple(out)


def build_root(spec: RootSpec) -> None:
    """Assemble R and pivot into it (the caller is in fresh mount and pid namespaces)."""
    root = spec.new_root
    linux.make_rprivate("/")
    if spec.whole_root is not None:
        _whole_root(spec.whole_root, root)
    else:
        linux.bind("/", root, recursive=True)
        detached = linux.make_tree_readonly(root)
        if detached:
            log.info("detached mounts that refused read-only: %s", ", ".join(detached))
    _fresh_proc(root)
    _private_dev(root)
    for tmp in dict.fromkeys(os.path.realpath(p) for p in ("/tmp", "/var/tmp")):
        if os.path.isdir(_inside(root, tmp)):
            linux.mount_tmpfs(_inside(root, tmp), linux.MS_NOSUID | linux.MS_NODEV,
                              "mode=1777")
    _place_project(spec)
    for path in spec.hidden:
        _mask_everywhere(root, path, spec.project)
    for home in spec.homes:
        for name in SECRET_DIRS + SECRET_FILES:
            candidate = os.path.join(home, name)
            if os.path.lexists(candidate):
                _mask_everywhere(root, os.path.realpath(candidate), spec.project)
    _mask_everywhere(root, os.path.realpath("/run/user"), spec.project)
    _mask_sockets(root, spec.project)
    linux.pivot_root(root)


def _whole_root(view: str, root: str) -> None:
    """--full: the root branch's view is R, writable (every write lands in the branch);
    the kernel's own filesystems cannot go through an overlay, so /sys is the host's,
    read-only, and /run a private tmpfs (proc, dev and tmp follow as usual)."""
    linux.bind(view, root)
    try:
        os.stat(root)
    except OSError as exc:
        raise OSError(exc.errno, f"the root branch's view is not usable: {exc.strerror}",
                      view) from None
    sys_dir = _inside(root, "/sys")
    if os.path.isdir("/sys") and os.path.isdir(sys_dir):
        linux.bind("/sys", sys_dir, recursive=True)
        linux.make_tree_readonly(sys_dir)
    run_dir = _inside(root, "/run")
    if os.path.isdir(run_dir):
        linux.mount_tmpfs(run_dir, linux.MS_NOSUID | linux.MS_NODEV, "mode=755")


def _inside(root: str, path: str) -> str:
    return root if path == "/" else root + path


def _fresh_proc(root: str) -> None:
    """The host's proc (with every process and its /proc/PID/root) goes; a proc of the
    sandbox's pid namespace comes, with the knobs that reach the host read-only."""
    proc = _inside(root, "/proc")
    with contextlib.suppress(OSError):
        linux.umount(proc)
    linux.mount_proc(proc)
    for name in PROC_READONLY:
        path = f"{proc}/{name}"
        if os.path.exists(path):
            linux.bind_readonly(path, path)
    for name in PROC_MASKED:
        _mask(f"{proc}/{name}")


def _private_dev(root: str) -> None:
    """A /dev with the harmless nodes only (no disks, no /dev/mem, no host ptys)."""
    dev = _inside(root, "/dev")
    with contextlib.suppress(OSError):
        linux.umount(dev)
    options = "mode=755,size=64k"
    linux.mount_tmpfs(dev, linux.MS_NOSUID | linux.MS_NOEXEC | linux.MS_NODEV, options)
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            linux.ensure_file(f"{dev}/{name}", 0o666)
            linux.bind(f"/dev/{name}", f"{dev}/{name}")
    os.mkdir(f"{dev}/pts", 0o755)
    pts_options = "newinstance,ptmxmode=0666,mode=620"
    with contextlib.suppress(KeyError):
        pts_options += f",gid={grp.getgrnam('tty').gr_gid}"
    linux.mount_devpts(f"{dev}/pts", pts_options)
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    os.mkdir(f"{dev}/shm", 0o1777)
    linux.mount_tmpfs(f"{dev}/shm", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777")
    os.symlink("/proc/self/fd", f"{dev}/fd")
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{fd}", f"{dev}/{name}")
    linux.mount(None, dev, None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID
                | linux.MS_NOEXEC | linux.MS_NODEV, options)


def _place_project(spec: RootSpec) -> None:
    """The view at the project's own path.  Missing parents can only be inside a
    private tmpfs (a project under /tmp), where they are created."""
    target = _inside(spec.new_root, spec.project)
    if not os.path.isdir(target):
        os.makedirs(target, 0o755)
    linux.bind(spec.view, target)
    try:
        os.stat(target)
    except OSError as exc:  # a daemon that died after it mounted: fail now, not in CMD
        raise OSError(exc.errno, f"the branch's view is not usable: {exc.strerror}",
                      spec.view) from None


def _mask(path: str) -> None:
    kind = linux.file_kind(path)
    if kind == "dir":
        # mounts below it would be covered anyway; detached, they leave no trace in
        # the sandbox's mount table either (the store's own copy of the view)
        for entry in reversed(linux.mounts_under(path)):
            if entry.mountpoint != path:
                with contextlib.suppress(OSError):
                    linux.umount(entry.mountpoint)
        linux.mount_tmpfs(path, _MASK_FLAGS, "size=4k,mode=755")
    elif kind == "file":
        linux.bind_readonly("/dev/null", path)


def aliases(host_path: str, root: str, table: list[MountEntry]) -> list[str]:
    """Every path under *root* where the object at *host_path* (resolved) is visible:
    its own place, and any other mount (inside *root*) of the same filesystem whose
    mounted directory contains it."""
    host_mounts = [m for m in table if not is_within(m.mountpoint, root)]
    holders = [m for m in host_mounts if is_within(host_path, m.mountpoint)]
    if not holders:
        return []
    depth = max(len(m.mountpoint) for m in holders)
    holder = [m for m in holders if len(m.mountpoint) == depth][-1]  # top of a stack
    rest = host_path[len(holder.mountpoint):].lstrip("/") if holder.mountpoint != "/" \
        else host_path.lstrip("/")
    fs_path = os.path.join(holder.root, rest).rstrip("/") or "/"
    out = []
    for m in table:
        if (is_within(m.mountpoint, root) and m.device == holder.device
                and is_within(fs_path, m.root)):
            below = fs_path[len(m.root):] if m.root != "/" else fs_path
            alias = os.path.join(m.mountpoint, below.lstrip("/")).rstrip("/")
            if alias not in out:
                out.append(alias)
    return out


def _mask_everywhere(root: str, host_path: str, project: str) -> None:
    for alias in aliases(host_path, root, linux.mount_table()):
        inner = alias[len(root):] or "/"
        if is_within(inner, project):
            continue  # inside the project the mount's policy decides
        if is_within(project, inner):
            raise OSError(errno.EPERM, "the project is inside a directory the sandbox "
                          "hides", host_path)
        _mask(alias)


def _mask_sockets(root: str, project: str) -> None:
    """A read-only mount does not stop connect(2), so every unix socket under /run
    (docker, containerd, dbus, systemd, ...) is covered with /dev/null."""
    for top in dict.fromkeys(os.path.realpath(p) for p in SOCKET_DIRS):
        start = _inside(root, top)
        if not os.path.isdir(start) or is_within(top, project):
            continue
        base_depth = start.count("/")
        for dirpath, dirnames, filenames in os.walk(start):
            if dirpath.count("/") - base_depth >= SOCKET_WALK_DEPTH:
                dirnames[:] = []
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    is_socket = stat.S_ISSOCK(os.lstat(path).st_mode)
                except FileNotFoundError:
                    continue
                if is_socket:
                    linux.bind_readonly("/dev/null", path)
