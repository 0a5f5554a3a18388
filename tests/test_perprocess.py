"""Per-process mounts: one mountpoint, each process tree sees its own branch."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import cli_env, force_unmount, require_fuse, run_cli

from agentfs.mount import sessions as sessions_mod

pytestmark = pytest.mark.mount
PY = sys.executable


class PerProcessMount:
    def __init__(self, tmp: Path, impl: str) -> None:
        self.impl = impl
        self.base = tmp / "base"
        self.base.mkdir()
        (self.base / "shared.txt").write_text("base\n")
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.store = tmp / "store"
        self.env = cli_env(tmp / "home")
        self.pid: int | None = None
        run_cli("init", str(self.base), "--store", str(self.store), env=self.env)
        for b in ("a", "b"):
            self.cli("branch", "create", b)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("--store", str(self.store), *args, env=self.env, check=check)

    def mount(self, *opts: str) -> None:
        out = self.cli("mount", str(self.mnt), "--per-process", "--impl", self.impl,
                       *opts).stdout
        self.pid = int(out.rsplit("pid", 1)[1].strip(" )\n"))

    def exec(self, branch: str, script: str, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(Path(PY).parent / "agentfs"), "--store", str(self.store),
                               "exec", "--branch", branch, "--", PY, "-c",
                               textwrap.dedent(script)],
                              env=self.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=["kernel", "pyfuse3"])
def ppm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PerProcessMount]:
    """A per-process mount through each front end that has per-process views."""
    require_fuse()
    m = PerProcessMount(tmp_path, request.param)
    try:
        yield m
    finally:
        force_unmount(m.mnt, m.pid)


ISOLATION = """
import mmap, os, sys
mnt, me, n = {mnt!r}, {me!r}, {n}
for i in range(n):
    data = f"{{me}} {{i}}\\n".encode()
    with open(f"{{mnt}}/shared.txt", "wb") as f:
        f.write(data)
    fd = os.open(f"{{mnt}}/shared.txt", os.O_RDONLY)
    try:
        got = os.read(fd, 100)
        st = os.fstat(fd)
        m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        mapped = m[:]
        m.close()
    finally:
        os.close(fd)
    assert got == data == mapped, (me, i, got, mapped)
    assert st.st_size == len(data), (me, i, st.st_size)
    open(f"{{mnt}}/only-{{me}}-{{i % 7}}", "w").close()
    names = os.listdir(mnt)
    assert all(not x.startswith("only-") or x.startswith(f"only-{{me}}-") for x in names), names
print("ok")
"""


def test_two_branches_concurrently_isolated(ppm: PerProcessMount) -> None:
    ppm.mount("--deny-unbound")
    procs = [subprocess.Popen([str(Path(PY).parent / "agentfs"), "--store", str(ppm.store),
                               "exec", "--branch", b, "--", PY, "-c",
                               ISOLATION.format(mnt=str(ppm.mnt), me=b, n=300)],
                              env=ppm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for b in ("a", "b")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err
    # each branch kept only its own changes; the base is untouched
    assert ppm.exec("a", f"print(open('{ppm.mnt}/shared.txt').read(), end='')").stdout == "a 299\n"
    assert ppm.exec("b", f"print(open('{ppm.mnt}/shared.txt').read(), end='')").stdout == "b 299\n"
    assert (ppm.base / "shared.txt").read_text() == "base\n"


def test_unbound_callers_denied_or_defaulted(ppm: PerProcessMount, tmp_path: Path) -> None:
    ppm.mount("--deny-unbound")
    with pytest.raises(PermissionError) as exc:
        os.listdir(ppm.mnt)
    assert exc.value.errno == errno.EACCES
    ppm.cli("umount", str(ppm.mnt))
    ppm.mount("--default-branch", "a")
    assert (ppm.mnt / "shared.txt").read_text() == "base\n"
    assert ppm.exec("b", f"open('{ppm.mnt}/shared.txt','w').write('b\\n')").returncode == 0
    assert (ppm.mnt / "shared.txt").read_text() == "base\n"  # unbound: branch a


INHERIT = """
import os, subprocess, sys, threading
mnt = {mnt!r}
def read():
    return open(f"{{mnt}}/shared.txt").read()
results = {{"self": read()}}
t = threading.Thread(target=lambda: results.__setitem__("thread", read()))
t.start(); t.join()
pid = os.fork()
if pid == 0:
    os._exit(0 if read() == results["self"] else 1)
results["fork"] = os.waitpid(pid, 0)[1] == 0
out = subprocess.run([sys.executable, "-c", f"print(open('{{mnt}}/shared.txt').read(), end='')"],
                     capture_output=True, text=True).stdout
results["exec"] = out
# double fork + setsid, reading after the middle process is gone
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        import time; time.sleep(0.3)
        os.write(w, read().encode()); os._exit(0)
    os._exit(0)
os.close(w)
os.wait()
results["double"] = os.read(r, 100).decode()
print(repr(results))
"""


def test_children_threads_double_fork_inherit(ppm: PerProcessMount) -> None:
    ppm.mount("--default-branch", "a")
    assert ppm.exec("b", f"open('{ppm.mnt}/shared.txt','w').write('only b\\n')").returncode == 0
    res = ppm.exec("b", INHERIT.format(mnt=str(ppm.mnt)))
    assert res.returncode == 0, res.stderr
    got = eval(res.stdout)
    assert got == {"self": "only b\n", "thread": "only b\n", "fork": True,
                   "exec": "only b\n", "double": "only b\n"}


def test_open_handle_stays_on_its_branch(ppm: PerProcessMount) -> None:
    ppm.mount("--default-branch", "a")
    assert ppm.exec("b", f"open('{ppm.mnt}/shared.txt','w').write('b!\\n')").returncode == 0
    script = f"""
import os, sys
fd = os.open("{ppm.mnt}/shared.txt", os.O_RDONLY)   # unbound: branch a
sys.stdout.write("opened\\n"); sys.stdout.flush()
sys.stdin.readline()                                  # the test binds us to b now
print(os.pread(fd, 100, 0).decode() + "|" + open("{ppm.mnt}/shared.txt").read(), end="")
"""
    p = subprocess.Popen([PY, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline() == "opened\n"
    ppm.cli("bind", "--pid", str(p.pid), "--branch", "b")
    out, _ = p.communicate("go\n", timeout=60)
    assert out == "base\n|b!\n"
    status = ppm.cli("status", "--json").stdout
    assert '"sessions"' in status


def test_control_socket_refuses_sessions(ppm: PerProcessMount) -> None:
    ppm.mount("--default-branch", "a")
    agentfs = str(Path(PY).parent / "agentfs")
    res = ppm.exec("b", f"""
import subprocess, sys
r = subprocess.run([{agentfs!r}, "--store", {str(ppm.store)!r}, "bind", "--pid", "1",
                    "--branch", "a"], capture_output=True, text=True)
print(r.returncode, r.stderr.strip())
""")
    assert res.stdout.startswith("1 ") and "inside a session" in res.stdout, res.stdout


def test_session_key_includes_start_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recycled pid (same number, other start time) never inherits a binding."""
    monkeypatch.setattr(sessions_mod, "FRESH", 0.0)  # no time-boxed trust: check every call
    table = sessions_mod.SessionTable()
    me = os.getpid()
    table.bind(me, "b")
    assert table.session_of(me) is not None and table.session_of(me).branch == "b"  # type: ignore[union-attr]
    real = sessions_mod.start_time
    monkeypatch.setattr(sessions_mod, "start_time",
                        lambda pid: (real(pid) or 0) + 1 if pid == me else real(pid))
    assert table.session_of(me) is None
    assert table.prune() and not table.sessions


def test_sessions_listed_then_cleaned_up(ppm: PerProcessMount) -> None:
    import json
    import time

    ppm.mount("--default-branch", "a")
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        ppm.cli("bind", "--pid", str(sleeper.pid), "--branch", "b")
        mounts = json.loads(ppm.cli("status", "--json").stdout)["mounts"]
        listed = mounts[0]["sessions"]
        assert [(s["pid"], s["branch"]) for s in listed] == [(sleeper.pid, "b")]
        assert "time.sleep(30)" in listed[0]["command"]
    finally:
        sleeper.kill()
        sleeper.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        mounts = json.loads(ppm.cli("status", "--json").stdout)["mounts"]
        if not mounts[0]["sessions"]:
            break
        time.sleep(0.3)
    assert mounts[0]["sessions"] == []  # ended without a restart
