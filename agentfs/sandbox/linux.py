"""Linux mechanics of the sandbox: the raw syscalls, one small function per job.

Everything goes through libc via ctypes (mount(2), umount2, unshare, pivot_root,
prctl, capget/capset) so the sandbox needs no helper binary; a failing call raises
OSError with the errno and the path involved.  Nothing here knows about stores or
branches: `rootfs` composes these into the sandbox's root, `nsinit` runs the command.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import re
import socket
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
if sys.platform.startswith("linux"):  # importable elsewhere: macOS shares the launcher
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                            ctypes.c_ulong, ctypes.c_char_p]
    _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    _libc.unshare.argtypes = [ctypes.c_int]
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                            ctypes.c_ulong]
    _libc.syscall.restype = ctypes.c_long

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# unshare(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# prctl(2) options
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203,
                   "s390x": 217}
_SYS_CAPGET = {"x86_64": 125, "aarch64": 90, "riscv64": 90, "ppc64le": 183, "s390x": 184}
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91, "ppc64le": 184, "s390x": 185}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# capability numbers (linux/capability.h)
CAP_DAC_READ_SEARCH = 2
CAP_SETPCAP = 8
CAP_LINUX_IMMUTABLE = 9
CAP_NET_ADMIN = 12
CAP_SYS_MODULE = 16
CAP_SYS_RAWIO = 17
CAP_SYS_CHROOT = 18
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_BOOT = 22
CAP_SYS_TIME = 25
CAP_MKNOD = 27
CAP_MAC_OVERRIDE = 32
CAP_MAC_ADMIN = 33
CAP_SYSLOG = 34
CAP_PERFMON = 38
CAP_BPF = 39

# What a root sandbox must not keep: each one reaches outside the sandbox (mount,
# modules, raw devices, other processes, the clock, the kernel log, BPF, ...).
# CAP_SETPCAP is last: dropping the others needs it.
DANGEROUS_CAPS = (CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_PTRACE, CAP_SYS_BOOT,
                  CAP_SYS_TIME, CAP_MKNOD, CAP_SYS_CHROOT, CAP_DAC_READ_SEARCH,
                  CAP_NET_ADMIN, CAP_LINUX_IMMUTABLE, CAP_MAC_ADMIN, CAP_MAC_OVERRIDE,
                  CAP_SYSLOG, CAP_BPF, CAP_PERFMON, CAP_SETPCAP)

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _fail(what: str, path: str | None = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(path: str | Path | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def _syscall_number(table: dict[str, int], name: str) -> int:
    machine = platform.machine()
    if machine not in table:
        raise OSError(errno.ENOSYS, f"{name}: unknown syscall number on {machine}")
    return table[machine]


# -- namespaces ------------------------------------------------------------------
def unshare(flags: int) -> None:
    """Leave the caller's namespaces named by *flags* (CLONE_NEW*)."""
    if _libc.unshare(flags) != 0:
        raise _fail("unshare")


def namespace_problem(flags: int) -> str | None:
    """Why unshare(*flags*) fails here (probed in a throw-away child), or None.

    Checked before anything is mounted, so a kernel or container that forbids new
    namespaces is reported in one line instead of in the middle of the setup."""
    pid = os.fork()
    if pid == 0:
        try:
            unshare(flags)
        except OSError as exc:
            os._exit(exc.errno or 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else os.strerror(code) if code > 0 else f"signal {-code}"


# -- mounts ----------------------------------------------------------------------
def mount(source: str | Path | None, target: str | Path, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    """mount(2), with the target path in the error."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        raise _fail(f"mount {fstype or 'bind'} ({source})", str(target))


def umount(target: str | Path, detach: bool = True) -> None:
    """umount2(2); detached by default: the sandbox never waits on a busy mount."""
    if _libc.umount2(_b(target), MNT_DETACH if detach else 0) != 0:
        raise _fail("umount", str(target))


def make_rprivate(path: str = "/") -> None:
    """Stop mount events propagating between this namespace and the host, both ways:
    nothing the sandbox mounts can appear outside, nothing mounted outside later
    appears inside."""
    mount(None, path, None, MS_REC | MS_PRIVATE)


def bind(source: str | Path, target: str | Path, recursive: bool = False) -> None:
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))


def remount_readonly(target: str | Path, keep_flags: int = 0) -> None:
    """Make one mount read-only (a bind remount: per mount, not per filesystem, so the
    host's copy stays writable); *keep_flags* are its nosuid/nodev/noexec/atime flags."""
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep_flags)


def bind_readonly(source: str | Path, target: str | Path) -> None:
    """A read-only view of *source* at *target* (bind, then remount: the kernel ignores
    MS_RDONLY on the bind itself)."""
    bind(source, target)
    remount_readonly(target, mount_flags_of(target))


def mount_tmpfs(target: str | Path, flags: int, options: str) -> None:
    mount("tmpfs", target, "tmpfs", flags, options)


def mount_proc(target: str | Path) -> None:
    """A proc of the caller's pid namespace: only the sandbox's processes are in it."""
    mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mount_devpts(target: str | Path, options: str) -> None:
    """A private devpts instance: the sandbox's ptys only, not the host's."""
    mount("devpts", target, "devpts", MS_NOSUID | MS_NOEXEC, options)


def pivot_root(new_root: str | Path) -> None:
    """Make *new_root* (a mount point) the root and detach the old root entirely, so
    unlike chroot there is no old root left to escape back to.

    pivot_root(".", ".") stacks the old root on the new one; umount2 of "." then
    takes it away, so no directory for the old root is needed (the new root is
    read-only)."""
    os.chdir(new_root)
    if _libc.syscall(_syscall_number(_SYS_PIVOT_ROOT, "pivot_root"), b".", b".") != 0:
        raise _fail("pivot_root", str(new_root))
    umount(".", detach=True)
    os.chdir("/")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""
    mount_id: int
    parent_id: int
    device: str          # major:minor
    root: str            # the directory of the filesystem that is mounted here
    mountpoint: str
    options: frozenset[str]  # per-mount options (rw/ro, nosuid, ...)
    fstype: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[MountEntry]:
    """This namespace's mounts, in the kernel's order (parents before children)."""
    entries = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = os.fsdecode(line.rstrip(b"\n")).split(" ")
            sep = fields.index("-")
            entries.append(MountEntry(
                mount_id=int(fields[0]), parent_id=int(fields[1]), device=fields[2],
                root=_unescape(fields[3]), mountpoint=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")), fstype=fields[sep + 1]))
    return entries


def is_within(path: str, parent: str) -> bool:
    """Path-component containment (no filesystem access)."""
    return path == parent or parent == "/" or path.startswith(parent.rstrip("/") + "/")


def mounts_under(prefix: str) -> list[MountEntry]:
    return [m for m in mount_table() if is_within(m.mountpoint, prefix)]


_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                 "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
                 "relatime": MS_RELATIME}


def option_flags(options: frozenset[str]) -> int:
    """The flags a bind remount must repeat to keep a mount's nosuid/nodev/noexec and
    atime behaviour (no atime option listed means strictatime)."""
    flags = 0
    for name, flag in _OPTION_FLAGS.items():
        if name in options:
            flags |= flag
    if not options & {"noatime", "relatime"}:
        flags |= MS_STRICTATIME
    return flags


def mount_flags_of(path: str | Path) -> int:
    """option_flags of the topmost mount at exactly *path* (0 if there is none)."""
    target = os.path.abspath(path)
    found = 0
    for m in mount_table():
        if m.mountpoint == target:
            found = option_flags(m.options)
    return found


def is_readonly(path: str | Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def make_tree_readonly(root: str) -> list[str]:
    """Remount every mount at or under *root* read-only, keeping its other flags.

    A mount that refuses is detached instead (its contents disappear rather than stay
    writable), and the one below it is checked again; the list of detached
    mountpoints is returned.  The root itself must become read-only."""
    detached: list[str] = []
    seen: set[str] = set()
    for entry in mounts_under(root):
        if entry.mountpoint in seen:
            continue
        seen.add(entry.mountpoint)
        _readonly_or_detach(entry.mountpoint, root, detached)
    return detached


def _readonly_or_detach(path: str, root: str, detached: list[str]) -> None:
    for _ in range(16):  # mounts stacked on one path: at most a few
        with contextlib.suppress(OSError):
            remount_readonly(path, mount_flags_of(path))
        try:
            if is_readonly(path):
                return
        except OSError:
            return  # unreachable now (it was under a detached mount) or a dead FUSE mount
        if path == root:
            raise OSError(errno.EROFS, "cannot make the sandbox root read-only", path)
        umount(path, detach=True)
        detached.append(path)
    raise OSError(errno.EBUSY, "cannot make a mount read-only", path)


# -- device nodes and files ----------------------------------------------------------
def ensure_file(path: str | Path, mode: int = 0o644) -> None:
    """An empty regular file to bind something over (binds need a target of the same
    kind: file over file, directory over directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    os.close(fd)


def file_kind(path: str) -> str:
    """'dir', 'file' (anything else bindable) or 'missing', without following a final
    symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


# -- network ---------------------------------------------------------------------
def bring_up_loopback() -> None:
    """A new network namespace starts with `lo` down; bring it up so localhost works."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            req = struct.pack("16sh22x", b"lo", 0)
            flags = struct.unpack("16sh22x", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS,
                        struct.pack("16sh22x", b"lo", flags | _IFF_UP))
        return
    except OSError as exc:
        first = exc
    for ip in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if os.access(ip, os.X_OK):
            res = subprocess.run([ip, "link", "set", "lo", "up"], capture_output=True,
                                 timeout=10)
            if res.returncode == 0:
                return
    raise OSError(first.errno, f"cannot bring up the loopback interface: {first.strerror}")


# -- privileges -------------------------------------------------------------------------
def prctl(option: int, arg: int = 0) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        raise _fail(f"prctl({option})")


def die_with_parent(sig: int) -> None:
    """Get *sig* when the parent dies, so a killed `agentfs run` takes its sandbox with
    it (checked against a parent that died before the call)."""
    parent = os.getppid()
    prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def no_new_privs() -> None:
    """execve can never grant privileges again (setuid binaries, file capabilities)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def drop_capabilities(caps: tuple[int, ...]) -> None:
    """Remove *caps* from the bounding set (so no exec can regain them), from the
    effective, permitted and inheritable sets (this process), and clear the ambient
    set.  Capabilities the running kernel does not know (EINVAL) are skipped."""
    for cap in caps:
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            raise _fail(f"prctl(PR_CAPBSET_DROP, {cap})")
    with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two of {effective, permitted, inheritable}
    if _libc.syscall(_syscall_number(_SYS_CAPGET, "capget"), header, data) != 0:
        raise _fail("capget")
    for cap in caps:
        word, bit = divmod(cap, 32)
        for field in range(3):
            data[word * 3 + field] &= ~(1 << bit) & 0xFFFFFFFF
    if _libc.syscall(_syscall_number(_SYS_CAPSET, "capset"), header, data) != 0:
        raise _fail("capset")


def become_user(uid: int, gid: int, groups: list[int]) -> None:
    """Switch to an unprivileged user for good (groups first: that needs root)."""
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
