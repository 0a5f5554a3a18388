"""The mount daemon: serve one branch at a mountpoint until unmounted.

Started by `agentfs mount` (in the background, reporting readiness over a pipe)
or run in the foreground.  SIGTERM/SIGINT unmount cleanly; the store's mount row
is removed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from agentfs.audit.log import AuditLog, audit_max_age, purge_older_than
from agentfs.audit.recorder import Recorder
from agentfs.branches.store import Store
from agentfs.errors import UserError
from agentfs.mount import control, fastloop
from agentfs.mount.fuse3_ops import AgentfsOperations
from agentfs.mount.kernel.ops import KernelOperations  # the kernel front end (--impl kernel)
from agentfs.mount.kernel.perprocess import KernelPerProcess
from agentfs.mount.mfuse_ops import MfuseOperations
from agentfs.mount.perprocess import PerProcessOperations
from agentfs.mount.sessions import SessionTable
from agentfs.mount.view import open_branch_view
from agentfs.overlay.engine import Overlay
from agentfs.overlay.layers import Layer
from agentfs.policy.approvals import ApprovalBroker, Ticket, ask_mode
from agentfs.policy.callers import CallerResolver
from agentfs.policy.guard import Guard
from agentfs.policy.source import PolicySource
from agentfs.proc import command_line, exe_of, parent_pid, thread_group
from agentfs.trash.service import Trash

log = logging.getLogger(__name__)
PER_PROCESS = (PerProcessOperations, KernelPerProcess)  # the routers of per-process mounts
IMPLS = ("pyfuse3", "mfusepy", "kernel")
POLICY_POLL = 1.0  # seconds between looks at the policy files' mtimes
TRASH_PURGE_EVERY = 600.0  # seconds between applications of the trash retention limits
TRASH_FLUSH_EVERY = 1.0    # seconds between checks for trash records due to become files


def fuse_options(debug: bool) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {"fsname=agentfs", "subtype=agentfs"}
    if os.getuid() == 0:
        options.add("allow_other")  # sandboxed users other than root must see the view
    if debug:
        options.add("debug")
    return options


@dataclass
class MountConfig:
    """What `agentfs mount` asked for."""

    store_root: Path
    mountpoint: str
    branch: str | None = None          # pinned mode
    per_process: bool = False
    default_branch: str | None = None  # per-process: for unbound callers
    deny_unbound: bool = False
    debug: bool = False
    log_path: str = ""
    policy_path: str | None = None     # None: the built-in default policy
    audit: bool = True
    audit_strict: bool = False         # refuse operations while events cannot be recorded
    impl: str = "pyfuse3"              # the FUSE binding: pyfuse3, mfusepy or kernel
    non_interactive: bool = False      # `ask` rules are denied at once (also CI=true, ...)
    terminal: bool = False             # started from a terminal: someone may answer asks
    decision_queries_from_sessions: bool = False  # callers in sessions may ask decisions


class Daemon:
    """One mount: the FUSE operations, the control socket and (per-process) sessions."""

    def __init__(self, config: MountConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.sessions = SessionTable()
        self.policy = PolicySource.for_mount(str(store.base), config.policy_path)
        mode = ask_mode(config.non_interactive, os.environ, config.terminal)
        self.broker = ApprovalBroker(str(os.getpid()), mode, on_refused=self._ask_refused)
        log.info("ask rules: %s%s", self.broker.mode.name,
                 f" ({self.broker.mode.refuse})" if self.broker.mode.refuse else "")
        self.callers = CallerResolver()
        self.trash = Trash(store)
        self.trash.finalize_stale()
        self.audit = (AuditLog(config.store_root, str(config.mountpoint), config.audit_strict)
                      if config.audit else None)
        self.ops: (AgentfsOperations | PerProcessOperations | MfuseOperations
                   | KernelOperations | KernelPerProcess)
        if config.per_process and config.impl == "mfusepy":
            raise UserError("per-process views need the kernel or pyfuse3 front end "
                            "(drop --impl mfusepy)")
        if config.impl in ("kernel", "mfusepy") and not config.per_process:
            assert config.branch is not None
            overlay = open_branch_view(store, config.branch, self.holder)
            front_end = KernelOperations if config.impl == "kernel" else MfuseOperations
            self.ops = front_end(overlay, self._guard(overlay, config.branch),
                                 self._recorder(config.branch))
        elif config.per_process:
            for name in filter(None, [config.default_branch]):
                store.branch(name)
            router = KernelPerProcess if config.impl == "kernel" else PerProcessOperations
            self.ops = router(store, self.sessions, config.default_branch,
                              config.deny_unbound, self._guard, self._recorder, self.holder)
            if config.default_branch:  # its lock now: a busy branch is the user's error
                self.ops.view(config.default_branch)
        else:
            assert config.branch is not None
            overlay = open_branch_view(store, config.branch, self.holder)
            self.ops = AgentfsOperations(overlay, guard=self._guard(overlay, config.branch),
                                         recorder=self._recorder(config.branch))
        self.queries = control.DecisionQueries(
            mountpoint=str(config.mountpoint), policy=self.policy, sessions=self.sessions,
            callers=self.callers, audit=self.audit,
            branch=config.default_branch if config.per_process else config.branch,
            per_process=config.per_process,
            from_sessions=config.decision_queries_from_sessions)
        # bound now, before any front end reports the mount ready
        self.control_path = control.socket_path(config.store_root, os.getpid())
        self.listener = control.bind(self.control_path)

    @property
    def holder(self) -> str:
        """Who holds the branch locks this daemon takes (for the message others get)."""
        return f"the mount at {self.config.mountpoint}"

    def _guard(self, overlay: Overlay, branch: str) -> Guard:
        """Policy and trash for a newly opened branch view."""
        overlay.trash = self.trash.sink(branch)
        sessions = self.sessions if self.config.per_process else None
        return Guard(overlay, self.policy, self.broker, self.callers, branch, sessions)

    def _ask_refused(self, ticket: Ticket) -> None:
        """An `ask` no one can answer was denied: on record with the reason (the
        request's own event says ask:deny; this one says why and how to allow it)."""
        if self.audit is not None:
            self.audit.emit(op="ask_refused", path=ticket.path, dst=ticket.reason,
                            decision="deny", rule=ticket.rule, session=ticket.session,
                            branch=ticket.branch, pid=ticket.pid, exe=ticket.exe,
                            cmdline=ticket.command, policy_sha256=ticket.policy_sha256,
                            errno=ticket.errno)

    def _recorder(self, branch: str) -> Recorder | None:
        return Recorder(self.audit, branch) if self.audit is not None else None

    def _views(self) -> list[AgentfsOperations | MfuseOperations | KernelOperations]:
        if isinstance(self.ops, PER_PROCESS):
            return list(self.ops.views.values())
        return [self.ops]

    def reload_policies(self, only_changed: bool = False) -> dict[str, Any]:
        """Reload the mount's policy file and every session's; a bad file keeps the
        last good policy and the reason is returned (and logged)."""
        sources = [self.policy, *(s.policy for s in self.sessions.sessions.values()
                                  if s.policy is not None)]
        errors, changed = [], False
        for source in sources:
            if only_changed and not source.changed():
                continue
            before = source.sha256
            ok, detail = source.reload()
            if not ok:
                errors.append(detail)
            changed |= source.sha256 != before
        if changed:
            self.broker.forget()
            if any("stat" in src.engine.restricted for src in sources):
                for view in self._views():
                    view.drop_kernel_entries()
        if errors:
            return {"ok": False, "error": "; ".join(errors), "sha256": self.policy.sha256}
        return {"ok": True, "sha256": self.policy.sha256, "changed": changed}

    def apply_retention(self) -> None:
        gone = self.trash.purge(None, None, False)
        if gone:
            log.info("trash retention: purged %d entries", len(gone))
        if self.audit is not None:
            cutoff = int((time.time() - audit_max_age(self.store)) * 1e6)
            n = purge_older_than(self.config.store_root, cutoff)
            if n:
                log.info("audit retention: removed %d events", n)

    def _view_of(self, branch: str
                 ) -> AgentfsOperations | MfuseOperations | KernelOperations | None:
        if isinstance(self.ops, PER_PROCESS):
            self.store.branch(branch)
            return self.ops.view(branch)
        return self.ops if branch == self.config.branch else None

    def _restore(self, branch: str, item_id: str, to: Any, force: bool, peer_pid: int
                 ) -> dict[str, Any]:
        view = self._view_of(branch)
        if view is None:
            return {"ok": False, "error": f"this mount does not show branch {branch}"}
        try:
            result = self.trash.restore_into(view.ov, item_id, None if to is None else str(to),
                                             force)
        except UserError as exc:
            return {"ok": False, "error": str(exc)}
        view.drop_kernel_entry(result.path)
        if self.audit is not None:
            self.audit.emit(op="trash_restore", path=result.path, dst=item_id, branch=branch,
                            pid=peer_pid, exe=exe_of(peer_pid), cmdline=command_line(peer_pid))
        return {"ok": True, **result.__dict__}

    def _may_answer(self, peer_pid: int, ticket_pid: int) -> str:
        """'' if the peer may answer a question asked by *ticket_pid*, else why not."""
        if self.sessions.session_of(peer_pid) is not None:
            return "the caller is inside a session"
        asker = thread_group(ticket_pid)
        cur: int | None = thread_group(peer_pid)
        hops = 0
        while cur is not None and cur > 1 and hops < 4096:
            if cur == asker:
                return "the caller is the asking process or runs under it"
            cur, hops = parent_pid(cur), hops + 1
        return ""

    def handle(self, req: dict[str, Any], peer_pid: int) -> dict[str, Any]:
        """A control request or a decision query (the socket already checked the
        peer's uid)."""
        if "type" in req:
            return self.queries.answer(req, peer_pid)
        op = req.get("op")
        if op is None:
            return {"ok": False, "error": 'a request needs "op" (a control request) or '
                                          '"type" (a decision query)'}
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "asks": self.broker.mode.name}
        if op == "fork" and not isinstance(self.ops, PER_PROCESS):
            layer = Layer.open_store_layer(int(req["layer_id"]), str(req["layer_dir"]))
            live = self.ops.backings.nodes() if isinstance(self.ops, KernelOperations) else ()
            self.ops.ov.push_top(layer, live)
            log.info("forked: new top layer %s", req["layer_id"])
            return {"ok": True}
        if op == "policy":
            return {"ok": True, "mount": self.policy.describe(), "sessions": [
                {"pid": s.pid, **s.policy.describe()}
                for s in self.sessions.sessions.values() if s.policy is not None]}
        if op == "reload":
            return self.reload_policies()
        if op == "prompts":
            if self.sessions.session_of(peer_pid) is None:  # someone who may answer looks
                self.broker.listener_seen()
            return {"ok": True, "prompts": [t.public() for t in self.broker.pending.values()]}
        if op == "answer":
            ticket = self.broker.pending.get(str(req.get("id")))
            if ticket is None:
                return {"ok": False, "error": f"no pending request {req.get('id')}"}
            why = self._may_answer(peer_pid, ticket.pid)
            if why:
                log.warning("refused an answer to %s from pid %s: %s", ticket.id, peer_pid, why)
                return {"ok": False, "error": f"permission denied: {why}"}
            try:
                self.broker.answer(ticket.id, bool(req.get("allow")),
                                   str(req.get("remember") or "once"))
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
            self.broker.listener_seen()
            return {"ok": True, "id": ticket.id}
        if op == "audit":  # for `agentfs status`
            return {"ok": True, "audit": None if self.audit is None else self.audit.stats()}
        if op == "trash_purge":  # items only this daemon's memory holds go too
            gone = self.trash.purge(req.get("older_than"), req.get("max_size"),
                                    bool(req.get("dry_run")))
            return {"ok": True, "purged": [i.public() for i in gone]}
        if op == "trash_restore":
            return self._restore(str(req["branch"]), str(req["id"]), req.get("to"),
                                 bool(req.get("force")), peer_pid)
        if op == "sessions":
            return {"ok": True, "sessions": [
                {"pid": s.pid, "branch": s.branch, "command": s.command,
                 "started": s.created, "members": len(s.members)}
                for s in self.sessions.sessions.values()]}
        if op in ("bind", "unbind"):
            if not isinstance(self.ops, PER_PROCESS):
                return {"ok": False, "error": "this mount is pinned to one branch"}
            if self.sessions.session_of(peer_pid) is not None:
                log.warning("refused %s from pid %s inside a session", op, peer_pid)
                return {"ok": False, "error": "permission denied: the caller is inside a session"}
            pid = int(req["pid"])
            if op == "unbind":
                return {"ok": self.sessions.unbind(pid)}
            branch = str(req["branch"])
            self.store.branch(branch)
            self.ops.view(branch)
            policy = self.policy.for_session(str(req["policy"])) if req.get("policy") else None
            session = self.sessions.bind(pid, branch, policy)
            log.info("bound pid %s (%s) to branch %s", pid, session.command, branch)
            return {"ok": True}
        return {"ok": False, "error": f"unknown request {op!r}"}

    async def run(self) -> None:
        """The pyfuse3 loop plus the daemon's own tasks, all on one trio thread."""
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGHUP) as sigs:
                    async for signum in sigs:
                        if signum == signal.SIGHUP:
                            log.info("SIGHUP: reloading the policy")
                            self.reload_policies()
                            continue
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            self.start_tasks(nursery, _direct)
            fastloop.install()
            # one idle reader is enough: pyfuse3 starts another worker whenever none
            # is left waiting (e.g. while a request waits for a person's answer)
            await pyfuse3.main(min_tasks=1, max_tasks=64)
            nursery.cancel_scope.cancel()

    def start_tasks(self, nursery: trio.Nursery, guarded: Guarded) -> None:
        """Policy file watching, retention, session pruning and the control socket.
        *guarded* runs a call under whatever lock the front end's engine needs."""
        async def keep_trash_in_bounds() -> None:
            while True:
                try:
                    await trio.to_thread.run_sync(self.apply_retention)
                except Exception:
                    log.exception("trash/audit retention failed")
                await trio.sleep(TRASH_PURGE_EVERY)

        async def write_trash_records() -> None:  # pending journal records to item files
            while True:
                await trio.sleep(TRASH_FLUSH_EVERY)
                try:
                    await trio.to_thread.run_sync(self.trash.flush_due)
                except Exception:
                    log.exception("writing trash records failed")

        async def watch_policy_files() -> None:
            while True:
                await trio.sleep(POLICY_POLL)
                guarded(lambda: self.reload_policies(only_changed=True))

        async def end_sessions() -> None:
            while True:
                await trio.sleep(1.0)
                for gone in guarded(self.sessions.prune):
                    log.info("session of pid %s (%s) ended", gone.pid, gone.branch)

        nursery.start_soon(watch_policy_files)
        nursery.start_soon(keep_trash_in_bounds)
        nursery.start_soon(write_trash_records)
        nursery.start_soon(end_sessions)
        nursery.start_soon(control.serve, self.control_path,
                           lambda req, pid: guarded(lambda: self.handle(req, pid)),
                           self.listener)

    def close(self) -> None:
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.control_path)  # serve() removes it too; a failed mount did not
        if isinstance(self.ops, PER_PROCESS):
            self.ops.close()
        else:
            self.ops.ov.close()
        self.trash.close()
        if self.audit is not None:
            self.audit.close()


T = TypeVar("T")
Guarded = Callable[[Callable[[], Any]], Any]


def _direct(call: Callable[[], T]) -> T:
    return call()


def open_daemon(config: MountConfig, ready: Callable[[str | None], None]
                ) -> tuple[Store, Daemon] | None:
    """The store and the daemon for *config*, or None after telling *ready* why not."""
    try:
        store = Store(config.store_root)
        daemon = Daemon(config, store)
    except UserError as exc:
        ready(str(exc))
        return None
    return store, daemon


def serve(config: MountConfig, ready: Callable[[str | None], None]) -> int:
    """Mount and serve; *ready* is called with None once mounted, or with the reason."""
    opened = open_daemon(config, ready)
    if opened is None:
        return 1
    store, daemon = opened
    raise_fd_limit()
    os.umask(0)  # modes arrive already masked by the kernel
    assert not isinstance(daemon.ops, (KernelOperations, KernelPerProcess))  # serve_kernel
    try:
        pyfuse3.init(daemon.ops, config.mountpoint, fuse_options(config.debug))
    except RuntimeError as exc:
        ready(f"could not mount {config.mountpoint}: {exc}")
        daemon.close()
        store.close()
        return 1
    mode = "per-process" if config.per_process else "pinned"
    try:
        store.add_mount(config.branch or config.default_branch, config.mountpoint,
                        os.getpid(), mode, config.log_path)
        ready(None)
        log.info("serving %s at %s (%s)", config.branch or "per-process views",
                 config.mountpoint, mode)
        trio.run(daemon.run)
    finally:
        pyfuse3.close(unmount=True)
        daemon.close()
        store.remove_mount(config.mountpoint)
        store.close()
        log.info("unmounted %s", config.mountpoint)
    return 0


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    # the engine resolves a path one component per call level (twice over, with the
    # layer below): a tree 1,000 levels deep, or a path near PATH_MAX (up to 2,048
    # components), needs more than Python's default 1,000 frames
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
    parser = argparse.ArgumentParser(prog="agentfs-daemon")
    parser.add_argument("--store", required=True)
    parser.add_argument("--branch")
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--per-process", action="store_true")
    parser.add_argument("--default-branch")
    parser.add_argument("--deny-unbound", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--log-path", default="")
    parser.add_argument("--policy")
    parser.add_argument("--impl", choices=IMPLS, default="pyfuse3")
    parser.add_argument("--no-audit", action="store_true")
    parser.add_argument("--audit-strict", action="store_true")
    parser.add_argument("--non-interactive", action="store_true")
    parser.add_argument("--decision-queries-from-sessions", action="store_true")
    parser.add_argument("--terminal", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(error: str | None) -> None:
        if args.ready_fd < 0:
            if error:
                print(f"agentfs: {error}", file=sys.stderr)
            return
        os.write(args.ready_fd, ("OK\n" if error is None else f"ERR {error}\n").encode())
        os.close(args.ready_fd)

    config = MountConfig(store_root=Path(args.store), mountpoint=args.mountpoint,
                         branch=args.branch, per_process=args.per_process,
                         default_branch=args.default_branch, deny_unbound=args.deny_unbound,
                         debug=args.debug, log_path=args.log_path,
                         policy_path=args.policy, audit=not args.no_audit,
                         audit_strict=args.audit_strict, impl=args.impl,
                         non_interactive=args.non_interactive, terminal=args.terminal,
                         decision_queries_from_sessions=args.decision_queries_from_sessions)
    if config.impl == "mfusepy":
        from agentfs.mount.mfuse_daemon import serve_mfusepy

        return serve_mfusepy(config, ready)
    if config.impl == "kernel":
        from agentfs.mount.kernel.daemon import serve_kernel

        return serve_kernel(config, ready)
    return serve(config, ready)


if __name__ == "__main__":
    sys.exit(main())
