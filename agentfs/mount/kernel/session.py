"""One FUSE connection spoken directly: mount, the request loop, notifications, unmount.

Mounting: as root, /dev/fuse is opened here and mount(2) is called with its fd (what
libfuse does as root); otherwise fusermount3 mounts and passes the fd back over a
socketpair (the _FUSE_COMMFD protocol).  Options as the pyfuse3 front end has them:
fsname and subtype agentfs, default_permissions, allow_other when root, nosuid, nodev.

The loop is plain and blocking: read a request, look its handler up by opcode, run it
under the engine lock, write the reply with one system call.  It runs on THREADS (8)
threads, AGENTFS_FUSE_THREADS=N to change (1: a single thread), each with its own
request buffer (the kernel hands each request to one reader).  The threads read *in
turn*: only the thread holding the reader token waits in read(2); the others wait for
the token.  The holder answers a request itself and reads the next one, so a caller
doing one thing after another (untar, an editor saving, appends, grep) talks to one
thread that never sleeps between requests, as a single-threaded C server would.  Before
a request in HANDS_OVER (reads, writes, fsync, mkdir, unlink, rmdir, renames, links) it
hands the token to the next thread, which reads on meanwhile.  When every thread waited
in read(2) (the kernel wakes the one that waited longest, never the one that just
replied), each request woke a sleeping thread and the GIL and engine lock moved between
threads: 6.4 voluntary context switches per appended file against fuse-overlayfs' 0.1,
which on this VM cost more than the copy-up.  Which requests hand over was measured,
each choice against the others on 3 interleaved fresh mounts (`/tmp` script timing the
command and reading the daemon's context switches from /proc): creates and setattrs
keep the token (create 2,000 files 784 -> 558 ms, untar 3,000 files 2.19 -> 1.23 s,
its voluntary context switches 43,000 -> 5,800), mkdir hands over (keeping it: untar
2.39 s), unlink and rmdir too (keeping them: `rm -rf` 1.13 -> 1.25 s); against every
thread reading always (AGENTFS_FUSE_TURNS=0; the scheme before read in turn only
during a run of 32 lookups, getattrs or listings): untar 1.94 -> 1.23 s, `rm -rf` 1.18
-> 1.13 s, create 802 -> 558 ms, appends to 301 base files 212 -> 94 ms (voluntary
context switches 2,030 -> 140; fuse-overlayfs 105 ms in the same rounds).  Requests
that read the tree's metadata (READS_TREE: lookups, getattrs, opens, listings) hand
over too while the last of them took more than COLD_US (200 us, AGENTFS_FUSE_COLD_US;
0: never): it waited for the disk, and cold lstats from git's threads then overlap.
Side by side (`python -m bench --only fuse-overlayfs,agentfs,agentfs-env --workloads
git,grep,untar,append --repeat 5`, AGENTFS_FUSE_COLD_US=0 for never): cold `git
status` 297 -> 224 ms (fuse-overlayfs 138 ms), grep 393 -> 324 ms, appends 84 -> 80
ms, untar 1.14 -> 1.24 s.  (A first version of
reading in turn let the main thread pick up a buffer another thread had already bound:
requests lost, fsync hung.  Fixed; since then the 8-worker stress, the mounted
behaviour, model, policy and live-fork suites pass with 8.)  A handler
returns the whole reply message (out header included) or None when it replies later
(a request waiting for a person's answer replies from its own thread) or never
(FORGET).  An exception in a handler is answered with its errno (a bug: logged, EIO);
the loop itself only ends when the kernel says the mount is gone (ENODEV).

Notifications (inval_entry, inval_inode) are queued to a thread of their own: the
kernel may make a notification wait for a directory lock that a request holds, and
that request may be waiting for the engine lock of whoever is notifying.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import mmap
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeAlias

from agentfs import capabilities
from agentfs.audit.recorder import finish_pending
from agentfs.mount.boundary import errno_for
from agentfs.mount.kernel import passthrough
from agentfs.mount.kernel import proto as p

log = logging.getLogger(__name__)

MAX_WRITE: Final = 1 << 20          # bytes of data in one WRITE (needs MAX_PAGES)
MAX_PAGES: Final = MAX_WRITE // 4096
BUFFER_SIZE: Final = MAX_WRITE + 4096  # the kernel wants room for a full WRITE request
RequestBuffer = bytearray | mmap.mmap


def request_buffer() -> RequestBuffer:
    """A request buffer whose pages exist only once the kernel writes into them: a
    bytearray is zero-filled, so each request thread cost its full 1 MiB of memory
    even when it only ever saw LOOKUPs (8 threads: 8 MB of the daemon's RSS)."""
    return mmap.mmap(-1, BUFFER_SIZE)
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MNT_DETACH: Final = 2

# What we ask of the kernel (each only if offered).  Writeback cache: the daemon is the
# only writer of a pinned branch, as with pyfuse3's enable_writeback_cache; it costs
# small files two requests (the partial last page read before an append, the times
# at close): off (AGENTFS_FUSE_WRITEBACK=0), side by side on the bench, create 2,000
# files 1.79 -> 1.60 s, appends 245 -> 204 ms, but 1 MiB writes 150 -> 164 ms and
# 4 KiB writes become a request each (dd bs=4k of 64 MiB: 0.11 s with it), so it stays,
# unless FUSE passthrough is agreed (kernel.passthrough), which the kernel allows only
# without it: the branch's own files then take no requests at all.
# Not DONT_MASK: with it the kernel leaves the caller's umask to the filesystem (a file
# made under umask 022 came out 0666); without it modes arrive masked and the daemon
# (umask 0) creates them as they are.  HANDLE_KILLPRIV_V2: the kernel tells us when
# set-uid/set-gid bits must go (write, truncate, O_TRUNC by a caller without
# CAP_FSETID) and stops asking for security.capability before every write.
WANTED: Final = (p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.BIG_WRITES
                 | p.AUTO_INVAL_DATA | p.DO_READDIRPLUS | p.READDIRPLUS_AUTO | p.ASYNC_DIO
                 | p.WRITEBACK_CACHE | p.PARALLEL_DIROPS | p.HANDLE_KILLPRIV_V2
                 | p.MAX_PAGES | p.INIT_EXT)

THREADS: Final = 8  # request threads; AGENTFS_FUSE_THREADS overrides
# requests before which the reader token goes to the next thread (see the module
# docstring): data moved or synced, and directories changed other than by a new file
HANDS_OVER: Final = tuple(op in {p.READ, p.WRITE, p.FSYNC, p.FALLOCATE, p.COPY_FILE_RANGE,
                                 p.MKDIR, p.MKNOD, p.SYMLINK, p.LINK, p.UNLINK, p.RMDIR,
                                 p.RENAME, p.RENAME2}
                          for op in range(p.MAX_OPCODE))
# requests that read the host tree's metadata: while the last of them took over COLD_US
# (mostly: it waited for the disk; also a long copy-up, or the engine lock), the token
# goes on before them too, so cold lstats overlap
READS_TREE: Final = tuple(op in {p.LOOKUP, p.GETATTR, p.OPEN, p.OPENDIR, p.READDIR,
                                 p.READDIRPLUS, p.ACCESS, p.READLINK}
                          for op in range(p.MAX_OPCODE))
COLD_US: Final = 200  # AGENTFS_FUSE_COLD_US overrides; 0: never

Reply: TypeAlias = "bytes | list[Any] | Unlocked | None"
Handler = Callable[[int, int, int, int, int, int], Reply]


class Unlocked:
    """A handler's answer that says: finish me without the engine lock.

    A large READ spends its time in pread(2), waiting for the disk when the file is
    cold; under the lock every other request waited with it.  The handler does under
    the lock what needs it (its own duplicate of the handle's fd) and returns
    *finish*, which the loop calls after releasing the lock; *finish* returns the
    reply (or raises: answered with its errno)."""

    __slots__ = ("finish",)

    def __init__(self, finish: Callable[[], bytes | list[Any]]) -> None:
        self.finish = finish


class MountError(Exception):
    """The mount could not be made (the message says why)."""


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


class Session:
    """The connection to the kernel for one mountpoint."""

    def __init__(self, mountpoint: str, lock: threading.RLock, debug: bool = False) -> None:
        self.mountpoint = mountpoint
        self.lock = lock
        self.debug = debug
        self.fd = -1
        self.buf: RequestBuffer = request_buffer()
        self.table: list[Handler | None] = [None] * p.MAX_OPCODE
        # called under the engine lock before a handler runs on another thread's buffer
        self.bind: Callable[[RequestBuffer, memoryview], None] = lambda buf, mv: None
        self.on_interrupt: Callable[[int], None] = lambda unique: None
        self.on_init: Callable[[int], None] = lambda flags: None
        self.after_init: Callable[[], None] = lambda: None  # once INIT's reply took effect
        self.flags = 0          # the INIT flags agreed on
        self.passthrough = False  # FUSE_PASSTHROUGH agreed on (see kernel.passthrough)
        self.minor = 0
        self.mounted = False
        self.gone = False       # the kernel ended the connection (unmounted)
        self._notes: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._reader = threading.Lock()  # held by the thread reading the next request
        self.cold = False  # the last request reading the tree waited for the disk
        self._notifier: threading.Thread | None = None

    # -- mounting --------------------------------------------------------------------------
    def mount(self) -> None:
        if os.getuid() == 0:
            self._mount_as_root()
        else:
            self._mount_with_fusermount()
        self.mounted = True
        self._notifier = threading.Thread(target=self._notify_loop, name="agentfs-notify",
                                          daemon=True)
        self._notifier.start()

    def _mount_as_root(self) -> None:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        st = os.stat(self.mountpoint)
        data = (f"fd={fd},rootmode={st.st_mode & 0o170000:o},user_id={os.getuid()},"
                f"group_id={os.getgid()},default_permissions,allow_other")
        libc = _libc()
        if libc.mount(b"agentfs", os.fsencode(self.mountpoint), b"fuse.agentfs",
                      MS_NOSUID | MS_NODEV, data.encode()) != 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise MountError(f"mount(2) of {self.mountpoint} failed: {os.strerror(code)}")
        self.fd = fd

    def _mount_with_fusermount(self) -> None:
        tool = shutil.which("fusermount3")
        if tool is None:
            raise MountError(capabilities.fusermount_message())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            res = subprocess.run(
                [tool, "-o", "rw,nosuid,nodev,fsname=agentfs,subtype=agentfs,"
                 "default_permissions", "--", self.mountpoint],
                env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
                pass_fds=(theirs.fileno(),), capture_output=True, text=True, timeout=60,
                check=False)
            theirs.close()
            if res.returncode != 0:
                raise MountError(f"fusermount3 could not mount {self.mountpoint}: "
                                 f"{res.stderr.strip() or res.returncode}")
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        finally:
            theirs.close()
            ours.close()
        if not fds:
            raise MountError("fusermount3 mounted but passed no /dev/fuse descriptor")
        os.set_inheritable(fds[0], False)
        self.fd = fds[0]

    def unmount(self) -> None:
        """Detach the mount (lazily: open files keep it alive until closed); the loop
        then ends with ENODEV.  Never call this on the loop's own thread: the kernel
        may need the loop to answer the last writes first."""
        if not self.mounted or self.gone:
            return
        if os.getuid() == 0:
            if _libc().umount2(os.fsencode(self.mountpoint), MNT_DETACH) != 0:
                code = ctypes.get_errno()
                if code not in (errno.EINVAL, errno.ENOENT):
                    log.warning("umount2 %s: %s", self.mountpoint, os.strerror(code))
            return
        res = subprocess.run(["fusermount3", "-u", "-z", self.mountpoint],
                             capture_output=True, text=True, timeout=60, check=False)
        if res.returncode != 0:
            log.warning("fusermount3 -u %s: %s", self.mountpoint, res.stderr.strip())

    def close(self) -> None:
        """After the loop: stop the notifier, make sure nothing stays mounted, close."""
        self._notes.put(None)
        if self._notifier is not None:
            self._notifier.join(timeout=5)
        if self.mounted and not self.gone:
            self.unmount()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- replies and notifications -----------------------------------------------------------
    def reply(self, message: bytes | list[Any]) -> None:
        """Send a reply (from any thread); a request the kernel gave up on is ignored."""
        try:
            if isinstance(message, bytes):
                os.write(self.fd, message)
            else:
                os.writev(self.fd, message)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.warning("FUSE reply failed: %s", exc)

    def notify_inval_entry(self, parent: int, name: bytes) -> None:
        """The kernel forgets *name* in directory *parent* (positive or negative)."""
        size = p.NOTIFY_INVAL_ENTRY_OUT.size + len(name) + 1
        self._notes.put(p.NOTIFY_INVAL_ENTRY_OUT.pack(size, p.NOTIFY_INVAL_ENTRY, 0, parent,
                                                      len(name), 0) + name + b"\0")

    def notify_inval_inode(self, ino: int, offset: int = 0, length: int = 0) -> None:
        """The kernel forgets *ino*'s attributes and cached pages (a directory's cached
        listing too); length 0: to the end."""
        self._notes.put(p.NOTIFY_INVAL_INODE_OUT.pack(p.NOTIFY_INVAL_INODE_OUT.size,
                                                      p.NOTIFY_INVAL_INODE, 0, ino, offset,
                                                      length))

    def drop_attributes_now(self, ino: int) -> None:
        """The kernel forgets *ino*'s cached attributes before the reply that follows
        (offset -1: no pages, so no lock a pending request could hold is taken; safe
        on the loop's thread)."""
        self._notify_now([p.NOTIFY_INVAL_INODE_OUT.pack(
            p.NOTIFY_INVAL_INODE_OUT.size, p.NOTIFY_INVAL_INODE, 0, ino, -1, 0)])

    def store_now(self, ino: int, data: bytes) -> bool:
        """Put *data* into the kernel's page cache of *ino* from offset 0 (NOTIFY_STORE),
        before the reply that follows; False if the kernel refused.  Only safe while no
        file of *ino* is open: a READ in flight holds the page lock the store waits
        for, and its reply may need the engine lock the caller holds."""
        return self._notify_now([p.NOTIFY_STORE_OUT.pack(
            p.NOTIFY_STORE_OUT.size + len(data), p.NOTIFY_STORE, 0, ino, 0, len(data), 0),
            data])

    def _notify_now(self, parts: list[bytes]) -> bool:
        """Write one notification on this thread; False if the kernel refused it
        (ENOENT: it holds nothing for the node; ENODEV: unmounted; others are logged)."""
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("FUSE notification failed: %s", exc)
            return False
        return True

    def _notify_loop(self) -> None:
        while True:
            message = self._notes.get()
            if message is None or self.fd < 0:
                return
            try:
                os.write(self.fd, message)
            except OSError as exc:
                # ENOENT: the kernel has nothing cached for it; ENODEV: unmounted
                if exc.errno == errno.ENODEV:
                    return
                if exc.errno != errno.ENOENT:
                    log.warning("FUSE notification failed: %s", exc)

    # -- INIT -------------------------------------------------------------------------------
    def _init(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
              ) -> bytes:
        major, minor, max_readahead, offered = p.INIT_IN.unpack_from(self.buf, 40)
        if major != p.KERNEL_VERSION or minor < p.MIN_MINOR:
            log.error("the kernel speaks FUSE %d.%d; this front end needs 7.%d or newer",
                      major, minor, p.MIN_MINOR)
            return p.OUT_HEADER.pack(16, -errno.EPROTO, unique)
        agreed = offered & WANTED
        offered2 = p.INIT_IN_FLAGS2.unpack_from(self.buf, 56)[0] if offered & p.INIT_EXT else 0
        agreed2 = 0
        if offered2 & p.PASSTHROUGH_2 and passthrough.wanted():
            agreed2 = p.PASSTHROUGH_2  # the kernel refuses it with the writeback cache
            agreed &= ~p.WRITEBACK_CACHE
        elif os.environ.get("AGENTFS_FUSE_WRITEBACK", "") == "0":  # measuring, see WANTED
            agreed &= ~p.WRITEBACK_CACHE
        self.passthrough = bool(agreed2)
        if not agreed & p.HANDLE_KILLPRIV_V2:
            agreed |= offered & p.HANDLE_KILLPRIV
        self.flags, self.minor = agreed, min(minor, p.KERNEL_MINOR)
        max_pages = MAX_PAGES if agreed & p.MAX_PAGES else 32
        max_write = min(MAX_WRITE, max_pages * 4096)
        self.on_init(agreed)
        log.debug("FUSE INIT: kernel 7.%d offers %#x/%#x, agreed %#x/%#x (7.%d)", minor,
                  offered, offered2, agreed, agreed2, self.minor)
        return p.INIT_OUT.pack(p.INIT_OUT.size, 0, unique, p.KERNEL_VERSION, self.minor,
                               max_readahead, agreed & 0xFFFFFFFF, 0, 0, max_write, 1,
                               max_pages, 0, agreed2,
                               passthrough.MAX_STACK_DEPTH if agreed2 else 0)

    def _destroy(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                 ) -> bytes:
        return p.OUT_HEADER.pack(16, 0, unique)

    def _interrupt(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                   ) -> None:
        (target,) = p.INTERRUPT_IN.unpack_from(self.buf, 40)
        self.on_interrupt(target)

    # -- the loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        """Answer requests until the kernel ends the connection."""
        table = self.table
        table[p.INIT] = self._init
        table[p.DESTROY] = self._destroy
        table[p.INTERRUPT] = self._interrupt
        if self.debug:
            table[:] = [None if h is None else _logged(op, h) for op, h in enumerate(table)]
        stats_path = os.environ.get("AGENTFS_OPSTATS")
        stats: dict[int, list[float]] = {}
        if stats_path:
            table[:] = [None if h is None else _timed(op, h, stats)
                        for op, h in enumerate(table)]
        threads = _thread_count()
        own = self.buf  # before the other threads start: they rebind self.buf
        others = [threading.Thread(target=self._serve_logged,
                                   args=(table, request_buffer()),
                                   name=f"agentfs-fuse-{i}", daemon=True)
                  for i in range(1, threads)]
        for thread in others:
            thread.start()
        try:
            self._serve(table, own)
        finally:
            for thread in others:
                thread.join(timeout=5)
            if stats_path:
                _write_stats(stats_path, stats)

    def _serve_logged(self, table: list[Handler | None], buf: RequestBuffer) -> None:
        try:
            self._serve(table, buf)
        except Exception:
            log.exception("FUSE request thread %s ended", threading.current_thread().name)

    def _serve(self, table: list[Handler | None], buf: RequestBuffer) -> None:
        fd, lock, bind = self.fd, self.lock, self.bind
        bufs = [buf]
        mv = memoryview(buf)
        readv, write, writev = os.readv, os.write, os.writev
        header = p.IN_HEADER.unpack_from
        err = p.OUT_HEADER.pack
        no_reply = p.NO_REPLY
        limit = p.MAX_OPCODE
        token, hands_over, reads_tree = self._reader, HANDS_OVER, READS_TREE
        in_turn = _in_turn()
        cold_s = _cold_us() / 1e6
        clock = time.perf_counter
        started = 0.0
        held = False
        try:
            while True:
                if in_turn and not held:
                    token.acquire()
                    held = True
                try:
                    n = readv(fd, bufs)
                except OSError as exc:
                    if exc.errno == errno.ENODEV:
                        self.gone = True
                        return
                    if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue
                    if self.gone or self.fd < 0:
                        return
                    raise
                _, opcode, unique, nodeid, uid, gid, pid, _, _ = header(buf)
                timed = cold_s and opcode < limit and reads_tree[opcode]
                if held and (opcode >= limit or hands_over[opcode] or (timed and self.cold)):
                    token.release()  # the next thread reads while this one works
                    held = False
                if timed:
                    started = clock()
                handler = table[opcode] if opcode < limit else None
                if handler is None:
                    if self.debug:
                        log.debug("-> %s #%d node %d: ENOSYS", p.OPCODE_NAMES.get(opcode, opcode),
                                  unique, nodeid)
                    reply: Reply = (None if opcode in no_reply else
                                    err(16, -errno.ENOSYS, unique))
                else:
                    with lock:
                        if self.buf is not buf:
                            self.buf = buf
                            bind(buf, mv)
                        try:
                            reply = handler(n, unique, nodeid, uid, gid, pid)
                        except Exception as exc:
                            code = errno_for(exc, p.OPCODE_NAMES.get(opcode, str(opcode)))
                            finish_pending(code)
                            reply = None if opcode in no_reply else err(16, -code, unique)
                        else:
                            finish_pending(0)
                        if timed:
                            self.cold = clock() - started > cold_s
                    if type(reply) is Unlocked:
                        try:
                            reply = reply.finish()
                        except Exception as exc:
                            reply = err(16, -errno_for(exc, p.OPCODE_NAMES.get(opcode, "")),
                                        unique)
                if reply is not None:
                    try:
                        if type(reply) is bytes:
                            write(fd, reply)
                        else:
                            writev(fd, reply)  # type: ignore[arg-type]
                    except OSError as exc:
                        if exc.errno == errno.ENODEV:
                            self.gone = True
                            return
                        if exc.errno != errno.ENOENT:  # ENOENT: the request was interrupted
                            log.warning("FUSE reply to %s failed: %s",
                                        p.OPCODE_NAMES.get(opcode, opcode), exc)
                    else:
                        if opcode == p.INIT:  # the kernel has applied the reply when write returns
                            self.after_init()
        finally:
            if held:
                token.release()


def _in_turn() -> bool:
    """Whether the threads read in turn (the default); AGENTFS_FUSE_TURNS=0: all read."""
    return os.environ.get("AGENTFS_FUSE_TURNS", "") != "0"


def _cold_us() -> int:
    return _int_knob("AGENTFS_FUSE_COLD_US", COLD_US, 0, None)


def _thread_count() -> int:
    return _int_knob("AGENTFS_FUSE_THREADS", THREADS, 1, 64)


def _int_knob(name: str, default: int, low: int, high: int | None) -> int:
    """The integer in $*name*, clamped to [low, high]; *default* when unset or not a
    number (which is logged)."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = max(low, int(raw))
    except ValueError:
        log.warning("%s=%r is not a number; using %d", name, raw, default)
        return default
    return value if high is None else min(high, value)


def _timed(opcode: int, handler: Handler, stats: dict[int, list[float]]) -> Handler:
    """AGENTFS_OPSTATS=FILE: count each request and its handler's time (engine lock
    included; not the part of a READ done without it), written to FILE as JSON at unmount;
    for profiling, off by default."""
    clock = time.perf_counter
    entry = stats.setdefault(opcode, [0, 0.0])

    def run(n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        started = clock()
        try:
            return handler(n, unique, nodeid, uid, gid, pid)
        finally:
            entry[0] += 1
            entry[1] += clock() - started
    return run


def _write_stats(path: str, stats: dict[int, list[float]]) -> None:
    out = {p.OPCODE_NAMES.get(op, str(op)): {"count": int(n), "seconds": round(t, 6),
                                             "us_each": round(1e6 * t / n, 1) if n else 0}
           for op, (n, t) in sorted(stats.items(), key=lambda kv: -kv[1][1]) if n}
    try:
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)
    except OSError as exc:
        log.warning("could not write request statistics to %s: %s", path, exc)


def _logged(opcode: int, handler: Handler) -> Handler:
    """--debug: every request and its outcome in the log."""
    name = p.OPCODE_NAMES.get(opcode, str(opcode))

    def run(n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
        log.debug("-> %s #%d node %d pid %d (%d bytes)", name, unique, nodeid, pid, n)
        try:
            reply = handler(n, unique, nodeid, uid, gid, pid)
        except Exception as exc:
            log.debug("<- %s #%d: %r", name, unique, exc)
            raise
        if reply is None:
            log.debug("<- %s #%d: no reply now", name, unique)
        elif isinstance(reply, Unlocked):
            log.debug("<- %s #%d: finished without the engine lock", name, unique)
        else:
            first = reply if isinstance(reply, bytes) else reply[0]
            error = p.OUT_HEADER.unpack_from(first)[1]
            log.debug("<- %s #%d: %s", name, unique,
                      errno.errorcode.get(-error, error) if error else "ok")
        return reply
    return run

