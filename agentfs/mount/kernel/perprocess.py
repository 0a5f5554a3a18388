"""Per-process views through the kernel front end: one mount, each calling process
sees the branch it is bound to (the rules of agentfs/mount/perprocess.py).

Every branch has its own `KernelOperations` view.  Node ids, which the kernel keys
inodes, dentries, attributes and pages by, come from one table shared by all views
(`GlobalInodes`), so nothing of one branch can be served for another; st_ino stays the
branch's own number (the protocol carries both), so a `git status` in a checkout finds
the numbers its index recorded instead of re-reading every file.  The root (node 1) is
shared: its requests go to the caller's branch, and it and the names right under it
are not cached by the kernel.  Requests on any other node go to the view that owns it;
one from a process of another branch (reached without the root: /proc/<pid>/cwd) is
refused with EACCES, as are unbound callers with --deny-unbound.  Directory handles
carry their view's slot in their high bits, so a listing of the shared root finds its
view whoever reads it.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Final

from agentfs.audit.recorder import Recorder
from agentfs.branches.store import Store
from agentfs.errors import FsError, UserError
from agentfs.mount.kernel import proto as p
from agentfs.mount.kernel.ops import KernelOperations, forget_each
from agentfs.mount.kernel.session import Handler, Reply, RequestBuffer, Session
from agentfs.mount.perprocess import BranchViews, GuardFactory
from agentfs.mount.sessions import SessionTable
from agentfs.overlay.inodes import ROOT_INO

SLOT_SHIFT: Final = 40  # a directory handle's view: fh >> SLOT_SHIFT
# requests on an open handle (it stays on the branch it was opened in, whoever uses it
# now) and the kernel's own bookkeeping: not checked against the caller's branch
UNCHECKED: Final = frozenset({p.FORGET, p.BATCH_FORGET, p.READ, p.WRITE, p.FSYNC,
                              p.FALLOCATE, p.COPY_FILE_RANGE, p.RELEASE, p.READDIR,
                              p.READDIRPLUS, p.RELEASEDIR})
DIR_HANDLE_OPS: Final = frozenset({p.READDIR, p.READDIRPLUS, p.RELEASEDIR})


class KernelPerProcess(BranchViews):
    """The router in front of the branch views of a per-process kernel mount."""

    def __init__(self, store: Store, sessions: SessionTable, default_branch: str | None,
                 deny_unbound: bool, make_guard: GuardFactory | None = None,
                 make_recorder: Callable[[str], Recorder | None] | None = None,
                 holder: str | None = None) -> None:
        super().__init__(store, sessions, default_branch, deny_unbound, make_guard,
                         make_recorder, holder)
        self.engine_lock = threading.RLock()  # one engine lock for every view
        self.views: dict[str, KernelOperations] = {}
        self._slots: list[KernelOperations] = []
        self._slot_of: dict[str, int] = {}
        self._tables: list[list[Handler | None]] = []
        self.session: Session | None = None
        self.buf: RequestBuffer = bytearray()
        self.mv = memoryview(self.buf)
        self._flags = 0

    # -- views ------------------------------------------------------------------------------
    def view(self, branch: str) -> KernelOperations:
        ops = self.views.get(branch)
        if ops is not None:
            return ops
        slot = len(self._slots)
        overlay, guard, recorder = self.open_parts(branch)
        table = self.inodes

        def export(local: int) -> int:
            return table.export(slot, local)

        def local(node: int) -> int:
            """A node id from a request body (a rename's target directory, a link's
            source): this view's own, or EXDEV."""
            if node == ROOT_INO:
                return ROOT_INO
            owner, mine = table.owner(node)
            if owner != slot:
                raise FsError(errno.EXDEV)
            return mine

        ops = KernelOperations(overlay, guard, recorder, export=export, local=local,
                               dir_handles=(slot << SLOT_SHIFT) + 1, shared_root=True,
                               lock=self.engine_lock)
        handlers: list[Handler | None] = [None] * p.MAX_OPCODE
        ops.handlers(handlers)
        if self.session is not None:
            ops.join(self.session)
            ops.init_flags(self._flags)
            ops.use_buffer(self.buf, self.mv)
        self._slots.append(ops)
        self._tables.append(handlers)
        self._slot_of[branch] = slot
        self.views[branch] = ops
        return ops

    def _caller_slot(self, pid: int) -> int:
        branch = self.caller_branch(pid)
        slot = self._slot_of.get(branch)
        if slot is None:
            try:
                self.view(branch)
            except UserError as exc:
                raise self.busy(branch, exc) from None
            slot = self._slot_of[branch]
        return slot

    def _route(self, opcode: int, nodeid: int, pid: int) -> tuple[int, int]:
        """(view slot, the view's own node) for a request."""
        if nodeid == ROOT_INO:
            if opcode in DIR_HANDLE_OPS:  # the handle (first in READ_IN and RELEASE_IN)
                # says whose listing it is
                slot = p.RELEASE_IN.unpack_from(self.buf, 40)[0] >> SLOT_SHIFT
                if slot < len(self._slots):
                    return slot, ROOT_INO
            return self._caller_slot(pid), ROOT_INO
        slot, local = self.inodes.owner(nodeid)
        if pid > 0 and opcode not in UNCHECKED and self._caller_slot(pid) != slot:
            # a way into another branch's tree that does not start at the root: the
            # cwd, root or fds of a process in another session (/proc/<pid>/cwd/...)
            raise FsError(errno.EACCES)
        return slot, local

    # -- wiring -----------------------------------------------------------------------------
    def attach(self, session: Session) -> None:
        """Serve *session*'s requests: every opcode a view handles goes through the
        router, which hands it to the view with the node id translated."""
        self.session = session
        self.buf = session.buf
        self.mv = memoryview(session.buf)
        session.on_interrupt = self._interrupt
        session.on_init = self._init
        session.bind = self._use_buffer
        for opcode in KernelOperations.HANDLERS:
            session.table[opcode] = self._router(opcode)
        session.table[p.FORGET] = self._forget
        session.table[p.BATCH_FORGET] = self._batch_forget
        for ops in self._slots:
            ops.join(session)

    def _router(self, opcode: int) -> Handler:
        tables, route = self._tables, self._route

        def run(n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Reply:
            slot, local = route(opcode, nodeid, pid)
            handler = tables[slot][opcode]
            assert handler is not None
            return handler(n, unique, local, uid, gid, pid)
        return run

    def _forget(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                ) -> None:
        self._forget_node(nodeid, p.FORGET_IN.unpack_from(self.buf, 40)[0])

    def _batch_forget(self, n: int, unique: int, nodeid: int, uid: int, gid: int, pid: int
                      ) -> None:
        forget_each(self.buf, self.mv, self._forget_node)

    def _forget_node(self, node: int, nlookup: int) -> None:
        """The shared root belongs to every view: never forgotten (module docstring)."""
        if node != ROOT_INO:
            slot, local = self.inodes.owner(node)
            self._slots[slot].forget_node(local, nlookup)

    def _init(self, flags: int) -> None:
        self._flags = flags
        for ops in self._slots:
            ops.init_flags(flags)

    def _interrupt(self, unique: int) -> None:
        for ops in self._slots:
            ops.interrupt(unique)

    def _use_buffer(self, buf: RequestBuffer, mv: memoryview) -> None:
        self.buf, self.mv = buf, mv
        for ops in self._slots:
            ops.use_buffer(buf, mv)

    def shutdown(self) -> None:
        for ops in self._slots:
            ops.shutdown()

    def close(self) -> None:
        for ops in self._slots:
            ops.ov.close()
