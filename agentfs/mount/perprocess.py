"""Per-process mode: one mount, each calling process sees the branch it is bound to.

Every branch gets its own overlay and its own range of kernel inode numbers, so no
page, attribute or dentry of one branch can ever be served for another: the kernel
keys all of those by inode.  The one thing all branches share is the root directory
(inode 1); its attributes and the names directly under it are therefore never cached
(entry and attribute timeout 0 there), so every path walk asks the daemon again and
gets the caller's branch.  Below the root an inode belongs to exactly one branch, so
its caching stays on.  Requests on inodes and handles go to the branch that owns them
(an open file stays on the branch it was opened in, also for kernel-initiated
requests with pid 0); only requests on the root are resolved by caller.  A request
from a process on an inode of another branch than its own (reached without passing
the root: /proc/<pid>/cwd, /root or /fd of a process in another session) is refused
with EACCES.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

import pyfuse3

from agentfs.audit.recorder import Recorder
from agentfs.branches.store import Store
from agentfs.errors import FsError, UserError
from agentfs.mount.fuse3_ops import AgentfsOperations, InodeSpace, _boundary, _pid
from agentfs.mount.sessions import SessionTable
from agentfs.mount.view import open_branch_view
from agentfs.overlay.engine import Overlay
from agentfs.overlay.inodes import ROOT_INO
from agentfs.policy.guard import Guard

log = logging.getLogger(__name__)
GuardFactory = Callable[[Overlay, str], Guard]


class GlobalInodes:
    """Kernel inode number <-> (branch slot, the branch view's own inode number)."""

    def __init__(self) -> None:
        self._to_local: dict[int, tuple[int, int]] = {}
        self._to_global: dict[tuple[int, int], int] = {}
        self._next = ROOT_INO + 1

    def export(self, slot: int, local: int) -> int:
        if local == ROOT_INO:
            return ROOT_INO
        key = (slot, local)
        g = self._to_global.get(key)
        if g is None:
            g = self._next
            self._next += 1
            self._to_global[key] = g
            self._to_local[g] = key
        return g

    def owner(self, g: int) -> tuple[int, int]:
        try:
            return self._to_local[g]
        except KeyError:
            raise FsError(errno.ESTALE) from None


class BranchSpace(InodeSpace):
    def __init__(self, table: GlobalInodes, slot: int) -> None:
        self.table, self.slot = table, slot

    def export(self, local: int) -> int:
        return self.table.export(self.slot, local)

    def local(self, exported: int) -> int:
        return ROOT_INO if exported == ROOT_INO else self.table.owner(exported)[1]


class BranchViews:
    """What the per-process routers of both front ends share: the branches' views by
    slot, opened on first use, and which branch a caller sees."""

    def __init__(self, store: Store, sessions: SessionTable, default_branch: str | None,
                 deny_unbound: bool, make_guard: GuardFactory | None = None,
                 make_recorder: Callable[[str], Recorder | None] | None = None,
                 holder: str | None = None) -> None:
        self.holder = holder
        self.make_guard = make_guard
        self.make_recorder = make_recorder
        self.store = store
        self.sessions = sessions
        self.default_branch = default_branch
        self.deny_unbound = deny_unbound
        self.inodes = GlobalInodes()

    def open_parts(self, branch: str) -> tuple[Overlay, Guard | None, Recorder | None]:
        """A new view's overlay, policy guard and audit recorder."""
        overlay = open_branch_view(self.store, branch, self.holder)
        guard = self.make_guard(overlay, branch) if self.make_guard else None
        recorder = self.make_recorder(branch) if self.make_recorder else None
        log.info("opened branch %s for per-process mount", branch)
        return overlay, guard, recorder

    def caller_branch(self, pid: int) -> str:
        """The branch process *pid* sees (EACCES: unbound, and none for unbound)."""
        session = self.sessions.session_of(pid)
        if session is not None:
            return session.branch
        if self.deny_unbound or self.default_branch is None:
            raise FsError(errno.EACCES)
        return self.default_branch

    def busy(self, branch: str, exc: UserError) -> FsError:
        """Another daemon (or a commit) holds the branch a caller needs: EBUSY."""
        log.warning("cannot serve branch %s: %s", branch, exc)
        return FsError(errno.EBUSY)


class PerProcessOperations(BranchViews, pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, store: Store, sessions: SessionTable, default_branch: str | None,
                 deny_unbound: bool, make_guard: GuardFactory | None = None,
                 make_recorder: Callable[[str], Recorder | None] | None = None,
                 holder: str | None = None) -> None:
        BranchViews.__init__(self, store, sessions, default_branch, deny_unbound,
                             make_guard, make_recorder, holder)
        pyfuse3.Operations.__init__(self)
        self.views: dict[str, AgentfsOperations] = {}
        self._slots: list[AgentfsOperations] = []
        self._fhs: dict[int, tuple[AgentfsOperations, int]] = {}
        self._next_fh = 1

    # -- routing ---------------------------------------------------------------
    def view(self, branch: str) -> AgentfsOperations:
        ops = self.views.get(branch)
        if ops is None:
            slot = len(self._slots)
            overlay, guard, recorder = self.open_parts(branch)
            ops = AgentfsOperations(overlay, space=BranchSpace(self.inodes, slot),
                                    shared_root=True, guard=guard, recorder=recorder)
            self.views[branch] = ops
            self._slots.append(ops)
        return ops

    def by_inode(self, inode: int, ctx: Any) -> AgentfsOperations:
        if inode == ROOT_INO:
            branch = self.caller_branch(_pid(ctx))
            try:
                return self.view(branch)
            except UserError as exc:
                raise self.busy(branch, exc) from None
        ops = self._slots[self.inodes.owner(inode)[0]]
        pid = _pid(ctx)
        if pid > 0 and self.views.get(self.caller_branch(pid)) is not ops:
            # a way into another branch's tree that does not start at the root: the
            # cwd, root or fds of a process in another session (/proc/<pid>/cwd/...)
            raise FsError(errno.EACCES)
        return ops

    def same(self, a: int, b: int, ctx: Any) -> AgentfsOperations:
        ops = self.by_inode(a, ctx)
        if self.by_inode(b, ctx) is not ops:
            raise pyfuse3.FUSEError(errno.EXDEV)
        return ops

    def _handle(self, ops: AgentfsOperations, local_fh: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._fhs[fh] = (ops, local_fh)
        return fh

    def _by_fh(self, fh: int) -> tuple[AgentfsOperations, int]:
        try:
            return self._fhs[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _wrap(self, ops: AgentfsOperations, info: Any) -> Any:
        return pyfuse3.FileInfo(fh=self._handle(ops, info.fh), keep_cache=info.keep_cache,
                                direct_io=info.direct_io)

    # -- namespace -------------------------------------------------------------
    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return await self.by_inode(parent_inode, ctx).lookup(parent_inode, name, ctx)

    @_boundary
    async def forget(self, inode_list: Any) -> None:
        per: dict[int, list[tuple[int, int]]] = {}
        for ino, count in inode_list:
            if ino != ROOT_INO:
                per.setdefault(self.inodes.owner(ino)[0], []).append((ino, count))
        for slot, items in per.items():
            await self._slots[slot].forget(items)

    @_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return await self.by_inode(inode, ctx).getattr(inode, ctx)

    @_boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        ops = self.by_inode(inode, ctx)
        local_fh = self._by_fh(fh)[1] if fh is not None else None
        return await ops.setattr(inode, attr, fields, local_fh, ctx)

    @_boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.by_inode(inode, ctx).readlink(inode, ctx)

    @_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        return await self.by_inode(parent_inode, ctx).mknod(parent_inode, name, mode, rdev, ctx)

    @_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return await self.by_inode(parent_inode, ctx).mkdir(parent_inode, name, mode, ctx)

    @_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        return await self.by_inode(parent_inode, ctx).symlink(parent_inode, name, target, ctx)

    @_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        ops = self.same(inode, new_parent_inode, ctx)
        return await ops.link(inode, new_parent_inode, new_name, ctx)

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.by_inode(parent_inode, ctx).unlink(parent_inode, name, ctx)

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.by_inode(parent_inode, ctx).rmdir(parent_inode, name, ctx)

    @_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        ops = self.same(parent_inode_old, parent_inode_new, ctx)
        await ops.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)

    # -- files -------------------------------------------------------------------
    @_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        ops = self.by_inode(inode, ctx)
        return self._wrap(ops, await ops.open(inode, flags, ctx))

    @_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        ops = self.by_inode(parent_inode, ctx)
        info, entry = await ops.create(parent_inode, name, mode, flags, ctx)
        return self._wrap(ops, info), entry

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        ops, local = self._by_fh(fh)
        return await ops.read(local, off, size)

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        ops, local = self._by_fh(fh)
        return await ops.write(local, off, buf)

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)  # see AgentfsOperations.flush

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        ops, local = self._by_fh(fh)
        await ops.fsync(local, datasync)

    @_boundary
    async def release(self, fh: int) -> None:
        ops, local = self._fhs.pop(fh, (None, 0))
        if ops is not None:
            await ops.release(local)

    # -- directories ---------------------------------------------------------------
    @_boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        ops = self.by_inode(inode, ctx)
        return self._handle(ops, await ops.opendir(inode, ctx))

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        ops, local = self._by_fh(fh)
        await ops.readdir(local, start_id, token)

    @_boundary
    async def releasedir(self, fh: int) -> None:
        ops, local = self._fhs.pop(fh, (None, 0))
        if ops is not None:
            await ops.releasedir(local)

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # -- misc -------------------------------------------------------------------------
    @_boundary
    async def statfs(self, ctx: Any) -> Any:
        return await self.view(self.caller_branch(_pid(ctx))).statfs(ctx)

    @_boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return await self.by_inode(inode, ctx).access(inode, mode, ctx)

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.by_inode(inode, ctx).getxattr(inode, name, ctx)

    @_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.by_inode(inode, ctx).setxattr(inode, name, value, ctx)

    @_boundary
    async def listxattr(self, inode: int, ctx: Any) -> Any:
        return await self.by_inode(inode, ctx).listxattr(inode, ctx)

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.by_inode(inode, ctx).removexattr(inode, name, ctx)

    def close(self) -> None:
        for ops in self._slots:
            ops.ov.close()
