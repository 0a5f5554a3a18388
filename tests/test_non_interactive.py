"""`ask` rules when no one can answer: denied at once in non-interactive mode
(--non-interactive, CI=true, AGENTFS_NON_INTERACTIVE=1), after a short grace on an
unattended mount, and still waiting for a person otherwise.  The broker's rules first
(no mount), then real mounts."""

from __future__ import annotations

import contextlib
import errno
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mountutil import (
    AGENTFS,
    DEFAULT_IMPL,
    IMPLS,
    MountedBranch,
    cli_env,
    force_unmount,
    init_store,
    mounted_branch,
    require_fuse,
)

from agentfs.audit.log import query
from agentfs.mount import control
from agentfs.policy.approvals import (
    UNATTENDED_GRACE,
    ApprovalBroker,
    AskMode,
    Ticket,
    ask_mode,
)

TIMEOUT = 20.0  # the policy's approval timeout: a refusal must come well before it
POLICY = f"""\
version: 1
name: non-interactive-test
defaults: {{read: allow, write: allow}}
approval: {{timeout: {TIMEOUT:g}s, on_timeout: deny}}
rules:
  - id: ask-it
    paths: ["ask/**"]
    ops: [open_read]
    decision: ask
"""

READER = """\
import errno, sys, time
t = time.monotonic()
try:
    with open(sys.argv[1]) as f:
        print("OK", f.read().strip(), round(time.monotonic() - t, 3), flush=True)
except OSError as e:
    print("ERR", errno.errorcode[e.errno], round(time.monotonic() - t, 3), flush=True)
"""


# -- the broker ---------------------------------------------------------------------------

def _ask(broker: ApprovalBroker, path: str = "ask/q1.txt", timeout: float = TIMEOUT
         ) -> Ticket:
    return broker.ask("ask-it", "open_read", path, 4242, "/usr/bin/cat", "cat", (4242, 1),
                      "", timeout, "deny", 5, branch="b", policy_sha256="abc",
                      deny_errno=errno.EPERM)


@pytest.mark.parametrize(("flag", "environ", "expected"), [
    (True, {}, "non-interactive"),
    (False, {"CI": "true"}, "non-interactive"),
    (False, {"CI": "1"}, "non-interactive"),
    (False, {"CI": "false"}, "auto"),
    (False, {"CI": ""}, "auto"),
    (False, {"AGENTFS_NON_INTERACTIVE": "1"}, "non-interactive"),
    (False, {"AGENTFS_NON_INTERACTIVE": "0", "CI": "true"}, "interactive"),
    (True, {"AGENTFS_NON_INTERACTIVE": "0"}, "non-interactive"),
])
def test_the_mode_comes_from_the_flag_then_the_environment(
        flag: bool, environ: dict[str, str], expected: str) -> None:
    assert ask_mode(flag, environ).name == expected


def test_a_terminal_at_the_start_means_someone_may_answer() -> None:
    assert ask_mode(False, {}, terminal=True).name == "interactive"
    assert ask_mode(False, {"CI": "true"}, terminal=True).name == "non-interactive"


def test_non_interactive_refuses_at_once_and_says_how_to_allow() -> None:
    refused: list[Ticket] = []
    broker = ApprovalBroker("1", ask_mode(True, {}), on_refused=refused.append)
    ticket = _ask(broker)
    assert ticket.answer == "deny" and broker.pending == {}
    assert "ask rule 'ask-it' denied at once: no one can answer" in ticket.reason
    assert "--non-interactive" in ticket.reason and "agentfs prompts" in ticket.reason
    assert refused == [ticket] and ticket.errno == errno.EPERM and ticket.branch == "b"


def test_an_unattended_question_waits_only_the_grace_then_is_refused() -> None:
    refused: list[Ticket] = []
    broker = ApprovalBroker("1", AskMode(watched=False), on_refused=refused.append)
    before = time.monotonic()
    ticket = _ask(broker)
    assert ticket.answer is None and ticket.unattended
    assert ticket.deadline - before <= UNATTENDED_GRACE + 0.5
    broker.leave(ticket, "timeout")
    assert ticket.answer == "deny" and refused == [ticket]
    assert "no one can answer" in ticket.reason and broker.pending == {}


def test_a_listener_gives_waiting_questions_the_full_timeout() -> None:
    broker = ApprovalBroker("1", AskMode(watched=False))
    ticket = _ask(broker)
    broker.listener_seen()
    assert not ticket.unattended and ticket.deadline - time.monotonic() > TIMEOUT - 1
    later = _ask(broker, "ask/q2.txt")  # someone looked just now: this one waits in full
    assert not later.unattended and later.deadline - time.monotonic() > TIMEOUT - 1
    broker.leave(ticket, "timeout")
    assert ticket.answer == "deny" and ticket.reason == "timeout"


def test_a_watched_mount_waits_as_before() -> None:
    broker = ApprovalBroker("1", AskMode(watched=True))
    ticket = _ask(broker)
    assert ticket.answer is None and not ticket.unattended
    assert broker.answer(ticket.id, True).answer == "allow"


# -- real mounts ----------------------------------------------------------------------------

class AskingMount:
    def __init__(self, mb: MountedBranch) -> None:
        self.mb = mb
        assert mb.pid is not None
        self.sock = control.socket_path(mb.store, mb.pid)

    def reader(self, name: str = "ask/q1.txt") -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", READER, str(self.mb.mountpoint / name)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read(self, name: str = "ask/q1.txt") -> tuple[str, float]:
        """(outcome, seconds the open took), measured in the reading process."""
        proc = self.reader(name)
        out, err = proc.communicate(timeout=TIMEOUT * 2)
        assert proc.returncode == 0, err
        kind, *rest = out.split()
        return (kind if kind == "OK" else rest[0]), float(rest[-1])

    def events(self, want: int, **filters: Any) -> list[dict[str, Any]]:
        """The audit events matching *filters*, once at least *want* are written."""
        deadline = time.monotonic() + 10
        while True:
            found = [e for e in query(self.mb.store)
                     if all(e[k] == v for k, v in filters.items())]
            if len(found) >= want or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def _asking_setup(tmp_path: Path, files: dict[str, str]
                  ) -> tuple[Path, Path, dict[str, str]]:
    """A base with *files*, the ask policy, and an environment that says nothing
    about interactivity (the test decides)."""
    base = tmp_path / "base"
    (base / "ask").mkdir(parents=True)
    for rel, text in files.items():
        (base / rel).write_text(text)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    env = cli_env(tmp_path / "home")
    for key in ("CI", "AGENTFS_NON_INTERACTIVE"):
        env.pop(key, None)
    return base, policy, env


@contextlib.contextmanager
def _mount(tmp_path: Path, impl: str, env_extra: dict[str, str], *opts: str
           ) -> Iterator[AskingMount]:
    base, policy, env = _asking_setup(tmp_path, {"ask/q1.txt": "answer 1\n",
                                                 "free.txt": "free\n"})
    env.update(env_extra)
    with mounted_branch(base, tmp_path, "b", env=env, impl=impl,
                        mount_opts=("--policy", str(policy), *opts)) as mb:
        yield AskingMount(mb)


@pytest.fixture(params=IMPLS)
def non_interactive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AskingMount]:
    with _mount(tmp_path, request.param, {}, "--non-interactive") as m:
        yield m


def _assert_refused_on_record(m: AskingMount, took: float) -> None:
    assert took < TIMEOUT / 4, f"the open took {took:.2f} s: it waited"
    [why] = m.events(1, op="ask_refused")
    assert (why["path"], why["rule"], why["decision"]) == ("ask/q1.txt", "ask-it", "deny")
    assert why["errno"] == errno.EACCES and why["branch"] == "b" and why["pid"] > 0
    assert "denied at once: no one can answer" in why["dst"]
    assert "allow it with a rule in the policy" in why["dst"]
    [request] = m.events(1, path="ask/q1.txt", decision="ask:deny")
    assert request["errno"] == errno.EACCES and request["rule"] == "ask-it"
    logs = "".join(p.read_text() for p in (m.mb.store / "run").glob("*.log"))
    assert "denied at once: no one can answer" in logs


@pytest.mark.mount
def test_non_interactive_mount_denies_an_ask_at_once(non_interactive: AskingMount) -> None:
    m = non_interactive
    outcome, took = m.read()
    assert outcome == "EACCES"
    _assert_refused_on_record(m, took)
    assert (m.mb.mountpoint / "free.txt").read_text() == "free\n"
    assert control.request(m.sock, {"op": "prompts"})["prompts"] == []
    assert control.request(m.sock, {"op": "ping"})["asks"] == "non-interactive"


@pytest.mark.mount
def test_ci_in_the_daemon_environment_denies_at_once(tmp_path: Path) -> None:
    with _mount(tmp_path, DEFAULT_IMPL, {"CI": "true"}) as m:
        outcome, took = m.read()
        assert outcome == "EACCES"
        _assert_refused_on_record(m, took)
        why = m.events(1, op="ask_refused")[0]["dst"]
        assert "CI=true" in why and "AGENTFS_NON_INTERACTIVE=0" in why


@pytest.mark.mount
@pytest.mark.parametrize("impl", IMPLS)
def test_an_interactive_mount_still_waits_for_an_answer(tmp_path: Path, impl: str) -> None:
    # CI is set, but AGENTFS_NON_INTERACTIVE=0 says a person is there: asks wait
    with _mount(tmp_path, impl, {"CI": "true", "AGENTFS_NON_INTERACTIVE": "0"}) as m:
        assert control.request(m.sock, {"op": "ping"})["asks"] == "interactive"
        proc = m.reader()
        deadline = time.monotonic() + 10
        prompts: list[dict[str, Any]] = []
        while not prompts and time.monotonic() < deadline:
            time.sleep(0.05)
            prompts = control.request(m.sock, {"op": "prompts"})["prompts"]
        assert prompts and prompts[0]["rule"] == "ask-it"
        time.sleep(UNATTENDED_GRACE + 0.5)  # past any grace: still waiting for us
        assert proc.poll() is None
        assert control.request(m.sock, {"op": "answer", "id": prompts[0]["id"],
                                        "allow": True})["ok"]
        out, err = proc.communicate(timeout=20)
        assert out.startswith("OK answer 1"), (out, err)
        assert float(out.split()[-1]) > UNATTENDED_GRACE
        assert m.events(1, path="ask/q1.txt", decision="ask:allow")
        assert not m.events(0, op="ask_refused")


@pytest.mark.mount
def test_an_unattended_mount_refuses_after_the_grace_unless_someone_looks(
        tmp_path: Path) -> None:
    """Started without a terminal (a new session: no controlling tty) and with no
    prompts client: a question is refused after the grace; once a client looks, the
    next one waits for its answer."""
    require_fuse()
    base, policy, env = _asking_setup(tmp_path, {"ask/q1.txt": "answer 1\n",
                                                 "ask/q2.txt": "answer 2\n"})
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    init_store(base, store, "b", env["AGENTFS_HOME"])
    pid = None
    try:
        res = subprocess.run([AGENTFS, "--store", str(store), "mount", str(mnt), "--branch",
                              "b", "--policy", str(policy)], env=env, capture_output=True,
                             text=True, timeout=60, start_new_session=True)
        assert res.returncode == 0, res.stderr
        pid = int(res.stdout.rsplit("pid", 1)[1].strip(" )\n"))
        m = AskingMount(MountedBranch(base, store, mnt, "b", env, pid))
        assert control.request(m.sock, {"op": "ping"})["asks"] == "auto"
        outcome, took = m.read()
        assert outcome == "EACCES"
        assert UNATTENDED_GRACE - 0.5 < took < TIMEOUT / 4
        [why] = m.events(1, op="ask_refused")
        assert "no one can answer (no terminal" in why["dst"]
        # a prompts client looks while the next question waits: it gets the full timeout
        proc = m.reader("ask/q2.txt")
        prompts: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not prompts and time.monotonic() < deadline:
            time.sleep(0.05)
            prompts = control.request(m.sock, {"op": "prompts"})["prompts"]
        assert prompts
        time.sleep(UNATTENDED_GRACE + 0.5)
        assert proc.poll() is None
        assert control.request(m.sock, {"op": "answer", "id": prompts[0]["id"],
                                        "allow": True})["ok"]
        out, _ = proc.communicate(timeout=20)
        assert out.startswith("OK answer 2")
    finally:
        force_unmount(mnt, pid)
