"""`ask` rules on a real mount: a request waits for a person, who answers through the
control socket (or the CLI); timeouts, remembered answers, collapsing, the cap,
interrupts, and who may answer."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mountutil import (
    IMPLS,
    MountedBranch,
    mounted_branch,
    per_process_mount,
    require_fuse,
)

from agentfs.mount import control

pytestmark = pytest.mark.mount

# the questions the tests answer get 30 s, so a loaded CI machine (every CLI start a
# second or more) still answers in time; the timeout test has its own 4 s
POLICY = """\
version: 1
name: approvals-test
defaults: {read: allow, write: allow}
approval: {timeout: 30s, on_timeout: deny, max_pending: 2}
rules:
  - id: ask-it
    paths: ["ask/**"]
    ops: [open_read]
    decision: ask
"""

READER = """\
import errno, signal, sys, time
class Interrupted(Exception):
    pass
def on_usr1(signum, frame):
    raise Interrupted()
signal.signal(signal.SIGUSR1, on_usr1)
for path in sys.argv[1:]:
    t = time.monotonic()
    try:
        with open(path) as f:
            print("OK", f.read().strip(), round(time.monotonic() - t, 2), flush=True)
    except Interrupted:
        print("INTERRUPTED", round(time.monotonic() - t, 2), flush=True)
    except OSError as e:
        print("ERR", errno.errorcode[e.errno], round(time.monotonic() - t, 2), flush=True)
"""


class Asking:
    def __init__(self, mb: MountedBranch) -> None:
        self.mb = mb
        assert mb.pid is not None
        self.sock = control.socket_path(mb.store, mb.pid)

    def reader(self, *names: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", READER,
                                 *(str(self.mb.mountpoint / n) for n in names)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def prompts(self) -> list[dict[str, Any]]:
        reply = control.request(self.sock, {"op": "prompts"})
        assert reply["ok"]
        return list(reply["prompts"])

    def wait_prompts(self, n: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.prompts()
            if len(found) >= n:
                return found
            time.sleep(0.05)
        raise AssertionError(f"expected {n} prompts, have {self.prompts()}")

    def answer(self, ticket: str, allow: bool, remember: str = "once") -> dict[str, Any]:
        return control.request(self.sock, {"op": "answer", "id": ticket, "allow": allow,
                                           "remember": remember})


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> list[str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out.splitlines()


@contextlib.contextmanager
def _asking_mount(impl: str, tmp_path: Path, policy_text: str) -> Iterator[Asking]:
    base = tmp_path / "base"
    (base / "ask").mkdir(parents=True)
    for i in range(1, 5):
        (base / f"ask/q{i}.txt").write_text(f"answer {i}\n")
    (base / "free.txt").write_text("free\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    with mounted_branch(base, tmp_path, "b", mount_opts=("--policy", str(policy)),
                        impl=impl) as mb:
        yield Asking(mb)


@pytest.fixture(params=IMPLS)
def asking(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Asking]:
    with _asking_mount(request.param, tmp_path, POLICY) as a:
        yield a


@pytest.fixture(params=IMPLS)
def asking_briefly(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Asking]:
    """Questions time out after 4 s."""
    with _asking_mount(request.param, tmp_path, POLICY.replace("timeout: 30s",
                                                               "timeout: 4s")) as a:
        yield a


def test_approve_through_the_cli_and_others_keep_working(asking: Asking) -> None:
    proc = asking.reader("ask/q1.txt")
    [prompt] = asking.wait_prompts(1)
    assert (prompt["op"], prompt["path"], prompt["rule"]) == ("open_read", "ask/q1.txt",
                                                              "ask-it")
    assert prompt["pid"] > 0 and "python" in prompt["exe"]
    # everyone else goes on while that one request waits
    t = time.monotonic()
    assert (asking.mb.mountpoint / "free.txt").read_text() == "free\n"
    assert time.monotonic() - t < 2
    listed = asking.mb.cli("prompts", "--json").stdout
    assert json.loads(listed)[0]["id"] == prompt["id"]
    asking.mb.cli("approve", prompt["id"])
    [line] = finish(proc)
    assert line.startswith("OK answer 1")
    assert asking.prompts() == []


def test_deny(asking: Asking) -> None:
    proc = asking.reader("ask/q1.txt")
    [prompt] = asking.wait_prompts(1)
    assert asking.answer(prompt["id"], False)["ok"]
    [line] = finish(proc)
    assert line.startswith("ERR EACCES")


def test_timeout_answers_with_the_policy_default(asking_briefly: Asking) -> None:
    proc = asking_briefly.reader("ask/q1.txt")
    asking_briefly.wait_prompts(1)
    [line] = finish(proc)
    kind, code, took = line.split()
    assert (kind, code) == ("ERR", "EACCES")
    assert 3.5 <= float(took) < 15
    assert asking_briefly.prompts() == []


def test_remembered_answers_stop_repeat_prompts(asking: Asking) -> None:
    # remember for the process: its second open goes through without asking
    proc = asking.reader("ask/q1.txt", "ask/q1.txt")
    [prompt] = asking.wait_prompts(1)
    assert asking.answer(prompt["id"], True, "process")["ok"]
    first, second = finish(proc)
    assert first.startswith("OK") and second.startswith("OK")
    assert float(second.split()[-1]) < 1
    # ... but another process is asked again; remembering for the session covers it
    proc = asking.reader("ask/q1.txt")
    [prompt] = asking.wait_prompts(1)
    assert asking.answer(prompt["id"], True, "session")["ok"]
    finish(proc)
    [line] = finish(asking.reader("ask/q1.txt"))
    assert line.startswith("OK") and float(line.split()[-1]) < 1
    # a remembered "no" is remembered too
    proc = asking.reader("ask/q2.txt")
    [prompt] = asking.wait_prompts(1)
    assert asking.answer(prompt["id"], False, "session")["ok"]
    finish(proc)
    [line] = finish(asking.reader("ask/q2.txt"))
    assert line.startswith("ERR EACCES") and float(line.split()[-1]) < 1


def test_duplicate_questions_are_collapsed(asking: Asking) -> None:
    procs = [asking.reader("ask/q1.txt") for _ in range(3)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        prompts = asking.prompts()
        if prompts and prompts[0]["waiters"] == 3:
            break
        time.sleep(0.05)
    assert len(prompts) == 1 and prompts[0]["waiters"] == 3, prompts
    assert asking.answer(prompts[0]["id"], True)["ok"]
    for proc in procs:
        assert finish(proc)[0].startswith("OK answer 1")


def test_pending_questions_are_capped(asking: Asking) -> None:
    first = asking.reader("ask/q1.txt")
    second = asking.reader("ask/q2.txt")
    prompts = asking.wait_prompts(2)
    [line] = finish(asking.reader("ask/q3.txt"))  # a third open question: refused at once
    assert line.startswith("ERR EACCES") and float(line.split()[-1]) < 2
    for p in prompts:
        asking.answer(p["id"], True)
    assert finish(first)[0].startswith("OK") and finish(second)[0].startswith("OK")


def test_a_signal_ends_the_wait(asking: Asking) -> None:
    proc = asking.reader("ask/q1.txt")
    asking.wait_prompts(1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    [line] = finish(proc)
    assert line.startswith("INTERRUPTED") and float(line.split()[-1]) < 3
    assert asking.prompts() == []


def test_a_fatal_signal_ends_the_wait(asking: Asking) -> None:
    proc = asking.reader("ask/q1.txt")
    asking.wait_prompts(1)
    t = time.monotonic()
    proc.kill()
    proc.wait(timeout=10)
    assert time.monotonic() - t < 3
    deadline = time.monotonic() + 5
    while asking.prompts() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert asking.prompts() == []


def test_the_asker_cannot_answer_itself(asking: Asking) -> None:
    script = textwrap.dedent(f"""
        import json, os, socket, sys, threading, time
        def ask():
            try:
                open({str(asking.mb.mountpoint / 'ask/q1.txt')!r}).read()
                print("READ")
            except OSError as e:
                print("ERR", e.errno)
        threading.Thread(target=ask, daemon=True).start()
        time.sleep(1.0)
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(asking.sock)!r})
        s.sendall(json.dumps({{"op": "prompts"}}).encode() + b"\\n")
        tid = json.loads(s.makefile().readline())["prompts"][0]["id"]
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(asking.sock)!r})
        s.sendall(json.dumps({{"op": "answer", "id": tid, "allow": True}}).encode() + b"\\n")
        print(json.loads(s.makefile().readline()))
        sys.stdout.flush()
        os._exit(0)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30)
    assert "permission denied: the caller is the asking process" in res.stdout, res
    assert "READ" not in res.stdout


def test_a_process_in_a_session_cannot_approve(tmp_path: Path) -> None:
    require_fuse()
    base = tmp_path / "base"
    (base / "ask").mkdir(parents=True)
    (base / "ask/q1.txt").write_text("answer 1\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    agentfs = str(Path(sys.executable).parent / "agentfs")
    with per_process_mount(base, tmp_path, "--policy", str(policy)) as pp:
        mnt, store = pp.mountpoint, pp.store
        agent = subprocess.Popen([agentfs, "--store", str(store), "exec", "--branch", "b", "--",
                                  sys.executable, "-c", READER, str(mnt / "ask/q1.txt")],
                                 env=pp.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        sock = control.socket_path(store, pp.pid)
        deadline = time.monotonic() + 10
        prompts: list[dict[str, Any]] = []
        while not prompts and time.monotonic() < deadline:
            prompts = control.request(sock, {"op": "prompts"})["prompts"]
            time.sleep(0.05)
        assert prompts
        res = pp.cli("exec", "--branch", "b", "--", agentfs, "--store", str(store), "approve",
                     prompts[0]["id"], check=False)
        assert res.returncode != 0 and "inside a session" in res.stderr, res
        pp.cli("deny", prompts[0]["id"])
        out, _ = agent.communicate(timeout=20)
        assert out.startswith("ERR EACCES")


def test_interactive_prompts_answer_with_a_key(asking: Asking) -> None:
    """`agentfs prompts` on a terminal: the waiting request is listed, 'y' allows it."""
    import pty
    import select

    proc = asking.reader("ask/q1.txt")
    [prompt] = asking.wait_prompts(1)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a pseudo-terminal
        os.execve(str(Path(sys.executable).parent / "agentfs"),
                  ["agentfs", "--store", str(asking.mb.store), "prompts"], asking.mb.env)
    try:
        screen = b""
        deadline = time.monotonic() + 20
        while prompt["id"].encode() not in screen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                screen += os.read(fd, 65536)
        assert prompt["id"].encode() in screen and b"ask/q1.txt" in screen
        os.write(fd, b"y")
        [line] = finish(proc)
        assert line.startswith("OK answer 1")
        os.write(fd, b"q")
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                break
            with contextlib.suppress(OSError):
                if select.select([fd], [], [], 0.1)[0]:
                    os.read(fd, 65536)
        assert done == pid and os.waitstatus_to_exitcode(status) == 0
        pid = 0
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os.close(fd)
