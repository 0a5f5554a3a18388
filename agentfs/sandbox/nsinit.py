"""The processes inside `agentfs run`: the namespace relay, the sandbox init, the command.

    agentfs run (host)          waits, forwards SIGTERM/SIGHUP/SIGUSR1/SIGUSR2, cleans up
     └─ relay                   unshare(NEWNS|NEWPID[|NEWNET]); forwards; exits as init does
         └─ init (pid 1)        builds the root, drops privileges, forks CMD, reaps all
             └─ CMD             exec'd with default signal dispositions

The init does not exec CMD itself: pid 1 of a namespace ignores every signal it has
no handler for, so `kill -TERM` would not reach a command that relies on default
actions, and nothing would reap orphans.  It stays in the caller's session (no setsid) but
leads a process group of its own, made the terminal's foreground group when
`agentfs run` had it (see `own_process_group`), so an interactive shell works.

Signals: what the terminal sends (Ctrl-C, Ctrl-\\, SIGWINCH, hangup) goes to the whole
foreground process group, CMD included, so the relay and the init forward only signals
sent by a process (si_code is not SI_KERNEL); forwarding those too would deliver them
twice.  Ctrl-Z does not suspend the sandbox (the caller's shell has no job to resume):
a stopped CMD is continued.  Both wait with sigwaitinfo on blocked signals, so nothing
runs in a signal handler and no SIGCHLD is lost.

Both relay and init die with their parent (PR_SET_PDEATHSIG), so a killed `agentfs run`
takes its sandbox with it: when the init dies the kernel kills everything in the pid
namespace.  The exit status is CMD's, 128+N when a signal N killed it.

Everything the init needs after it dropped privileges is imported here at start:
the interpreter's own files may not be readable by the user it becomes.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from typing import NoReturn

from agentfs.sandbox import linux, rootfs

FORWARDED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                       signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH})
WAITED = FORWARDED | {signal.SIGCHLD}
_SI_KERNEL = 0x80
# what Python or `agentfs run` changed, reset for CMD
_RESET = (*FORWARDED, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTSTP,
          signal.SIGTTIN, signal.SIGTTOU)


@dataclass(frozen=True)
class Identity:
    """The user CMD runs as when `agentfs run` was started through sudo."""
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str
    home: str


@dataclass(frozen=True)
class SandboxPlan:
    root: rootfs.RootSpec
    cwd: str
    network: bool              # share the host's network (False: a new netns with lo only)
    user: Identity | None      # None: stay root, with the dangerous capabilities dropped
    cmd: tuple[str, ...]
    foreground: bool = False   # `agentfs run` owns the terminal's foreground: CMD takes it

    @property
    def unshare_flags(self) -> int:
        flags = linux.CLONE_NEWNS | linux.CLONE_NEWPID
        return flags if self.network else flags | linux.CLONE_NEWNET


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def report(fd: int, line: str) -> None:
    """One line to `agentfs run` over the status pipe (one write: it is atomic)."""
    with contextlib.suppress(OSError):
        os.write(fd, (" ".join(line.split()) + "\n").encode(errors="replace"))


def relay(plan: SandboxPlan, status_fd: int, close_fds: tuple[int, ...] = ()) -> NoReturn:
    """The child of `agentfs run` (never returns): new namespaces, then the init.
    *close_fds* are the parent's locks, which must not outlive it in the sandbox."""
    try:
        for fd in close_fds:
            os.close(fd)
        linux.die_with_parent(signal.SIGKILL)
        linux.unshare(plan.unshare_flags)
        child = os.fork()
        if child == 0:
            init(plan, status_fd)
        os._exit(supervise(child, reap_all=False))
    except BaseException as exc:
        report(status_fd, f"ERR {_describe(exc)}")
        os._exit(1)


def init(plan: SandboxPlan, status_fd: int) -> NoReturn:
    """Pid 1 of the sandbox (never returns): root filesystem, privileges, CMD."""
    try:
        linux.die_with_parent(signal.SIGKILL)
        rootfs.build_root(plan.root)
        if not plan.network:
            linux.bring_up_loopback()
        apply_identity(plan.user)
        _enter(plan.cwd)
        own_process_group(plan.foreground)
        child = os.fork()
        if child == 0:
            _exec(plan.cmd, status_fd)
    except BaseException as exc:
        report(status_fd, f"ERR {_describe(exc)}")
        os._exit(1)
    os._exit(supervise(child, reap_all=True, continue_stopped=plan.foreground))


def apply_identity(user: Identity | None) -> None:
    """Give up what a sandboxed command must not have.

    Root (no sudo): the dangerous capabilities leave the bounding set and this
    process's sets, so neither this init nor anything it execs has them.  Through
    sudo: the invoking user's uid, gid and groups, HOME/USER/LOGNAME.  Both: no new
    privileges on exec.  The credential change clears the parent-death signal, so it
    is set again."""
    linux.drop_capabilities(linux.DANGEROUS_CAPS)
    if user is not None:
        linux.become_user(user.uid, user.gid, list(user.groups))
        os.environ.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    os.environ.pop("XDG_RUNTIME_DIR", None)  # /run/user is masked
    linux.no_new_privs()
    linux.die_with_parent(signal.SIGKILL)


def own_process_group(foreground: bool) -> None:
    """Put the init (and so CMD) in a process group of its own, in the same session,
    and make it the terminal's foreground group when `agentfs run` had it.

    The caller's group cannot be kept: its leader is outside the pid namespace, so
    inside getpgrp() is 0 and an interactive shell fails to hand the terminal back
    when it exits ("Cannot set tty process group"); and `kill 0` inside would signal
    `agentfs run` itself.  SIGTTOU is ignored (as job-control shells do) because a
    background group may only take the terminal that way."""
    os.setpgid(0, 0)
    if foreground:
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            os.tcsetpgrp(0, os.getpgrp())


def _enter(cwd: str) -> None:
    """The caller's working directory (the project's view if it was in the project),
    or / when it does not exist in the sandbox (the store, a masked directory)."""
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")
        os.environ["PWD"] = "/"
    else:
        os.environ["PWD"] = cwd


def _exec(cmd: tuple[str, ...], status_fd: int) -> NoReturn:
    try:
        for sig in _RESET:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execvp(cmd[0], list(cmd))
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        report(status_fd, f"EXEC {code} cannot run {cmd[0]}: {exc.strerror}")
        os._exit(code)
    except BaseException:
        os._exit(126)


def supervise(child: int, reap_all: bool, continue_stopped: bool = False) -> int:
    """Wait for *child*, forwarding the signals processes send; return its exit code.

    The caller has FORWARDED and SIGCHLD blocked.  With *reap_all* (the init) every
    other child is reaped too: orphans of the namespace are re-parented to pid 1.
    With *continue_stopped* a child stopped by Ctrl-Z is continued: the sandbox is
    not a job the caller's shell could resume, so a stop would freeze the terminal."""
    options = os.WNOHANG | (os.WUNTRACED if continue_stopped else 0)
    while True:
        while True:
            try:
                pid, status = os.waitpid(-1 if reap_all else child, options)
            except ChildProcessError:
                return 1  # cannot happen: the child is ours until we reap it
            if pid == 0:
                break
            if pid == child and os.WIFSTOPPED(status):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGCONT)
            elif pid == child:
                return exit_code(status)
        info = signal.sigwaitinfo(WAITED)
        if info.si_signo == signal.SIGCHLD or info.si_code == _SI_KERNEL:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, info.si_signo)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"
