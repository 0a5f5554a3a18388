"""`agentfs run`: real sandboxes around real commands (root, FUSE and namespaces needed).

Each test makes its own project, store and agentfs home in a fresh directory under
/var/lib (outside /tmp, so the store and the home are hidden by the sandbox's masks,
not just by its private /tmp) and checks after every run that nothing is left: no
mount below that directory, no process whose command line names the store (the
daemon, `agentfs run` and its sandbox all do), no sandbox directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mountutil import AGENTFS, cli_env, require_fuse, run_cli
from treehash import tree_fingerprint

from agentfs import capabilities
from agentfs.errors import UserError
from agentfs.sandbox import launch, linux, nsinit, rootfs

pytestmark = pytest.mark.mount
RUN_TIMEOUT = 60
# the probes run inside the sandbox and need only the standard library: the real
# interpreter, not the venv's link to it (a checkout under /tmp is hidden in there:
# the sandbox's /tmp is private)
PY = os.path.realpath(sys.executable)


def _mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [linux._unescape(line.split()[1]) for line in f]


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry))
    return found


@dataclass
class Project:
    work: Path
    base: Path
    store: Path
    home: Path
    env: dict[str, str]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("--store", str(self.store), *args, env=self.env, check=check)

    def run(self, *args: str, script: str | None = None, env: dict[str, str] | None = None,
            timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """`agentfs run ARGS [-- sh -c SCRIPT]` from inside the project."""
        argv = [AGENTFS, "--store", str(self.store), "run", *args]
        if script is not None:
            argv += ["--", "sh", "-c", script]
        return subprocess.run(argv, env={**self.env, **(env or {})}, cwd=self.base,
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str, script: str) -> subprocess.Popen[str]:
        return subprocess.Popen([AGENTFS, "--store", str(self.store), "run", *args,
                                 "--", "sh", "-c", script],
                                env=self.env, cwd=self.base, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def assert_no_residue(self) -> None:
        deadline = time.monotonic() + 10  # a killed run's processes take a moment to go
        while True:
            left = [m for m in _mounts() if linux.is_within(m, str(self.work))]
            procs = _processes_naming(str(self.store))
            dirs = sorted(p.name for p in (self.store / "run").glob("sandbox-*"))
            if not (left or procs or dirs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert left == [], f"mounts left: {left}"
        assert procs == [], f"processes left: {procs}"
        assert dirs == [], f"sandbox directories left: {dirs}"


def make_project(parent: Path) -> Project:
    work = Path(tempfile.mkdtemp(prefix="agentfs-run-", dir=parent))
    os.chmod(work, 0o755)
    base = work / "base"
    (base / "dir").mkdir(parents=True)
    (base / "a.txt").write_text("alpha\n")
    (base / "dir" / "b.txt").write_text("bravo\n")
    (base / "blob.bin").write_bytes(bytes(range(256)) * 64)
    (base / "shared").mkdir()
    os.chmod(base / "shared", 0o777)
    p = Project(work=work, base=base, store=work / "store", home=work / "home",
                env=cli_env(work / "home"))
    run_cli("init", str(base), "--store", str(p.store), env=p.env)
    return p


def teardown(p: Project) -> None:
    """Never hangs, never deletes through a mount: detach what is mounted below the
    work directory, kill what names our store, then remove the directory."""
    for mp in sorted((m for m in _mounts() if linux.is_within(m, str(p.work))),
                     key=len, reverse=True):
        for args in (["-u"], ["-uz"]):
            with contextlib.suppress(subprocess.TimeoutExpired):
                if subprocess.run(["fusermount3", *args, mp], capture_output=True,
                                  timeout=20).returncode == 0:
                    break
    for pid in _processes_naming(str(p.store)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not any(linux.is_within(m, str(p.work)) for m in _mounts()):
        shutil.rmtree(p.work, ignore_errors=True)


def _require_sandbox() -> None:
    require_fuse()
    if os.geteuid() != 0:
        pytest.skip("agentfs run needs root")
    problem = linux.namespace_problem(linux.CLONE_NEWNS | linux.CLONE_NEWPID
                                      | linux.CLONE_NEWNET)
    if problem:
        pytest.skip(f"namespaces unavailable: {problem}")


@pytest.fixture
def project() -> Iterator[Project]:
    _require_sandbox()
    p = make_project(Path("/var/lib"))
    try:
        yield p
    finally:
        teardown(p)


@pytest.fixture
def tmp_project() -> Iterator[Project]:
    """A project under /tmp: the sandbox's private /tmp must still show it.  (Not in
    pytest's deep tmp_path: the daemon's control socket path would be too long.)"""
    _require_sandbox()
    p = make_project(Path("/tmp"))
    try:
        yield p
    finally:
        teardown(p)


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


# -- what the command changes --------------------------------------------------------------
@pytest.mark.timeout(120)
def test_changes_go_to_the_branch_and_the_base_stays_unchanged(project: Project) -> None:
    before = tree_fingerprint(str(project.base))
    out = _ok(project.run("--branch", "b", "--create", script=textwrap.dedent("""\
        set -e
        echo more >> a.txt
        mkdir sub
        printf 'new\\n' > sub/new.txt
        rm dir/b.txt
        cat a.txt
        """)))
    assert out == "alpha\nmore\n"
    assert tree_fingerprint(str(project.base)) == before
    status = project.cli("branch", "diff", "b", "--name-status").stdout.splitlines()
    assert sorted(status) == ["A\tsub/new.txt", "D\tdir/b.txt", "M\ta.txt"]
    project.assert_no_residue()
    # the branch keeps them: a second run sees them, the base still does not
    out = _ok(project.run("--branch", "b", script="cat a.txt sub/new.txt; ls dir"))
    assert out == "alpha\nmore\nnew\n"
    assert (project.base / "dir" / "b.txt").read_text() == "bravo\n"
    assert tree_fingerprint(str(project.base)) == before
    project.assert_no_residue()


@pytest.mark.timeout(120)
def test_exit_status_is_the_commands(project: Project) -> None:
    project.cli("branch", "create", "b")
    for script, code in (("exit 0", 0), ("exit 1", 1), ("kill -9 $$", 137),
                         ("kill -TERM $$", 143)):
        res = project.run("--branch", "b", script=script)
        assert res.returncode == code, (script, res.stderr)
        assert res.stderr == ""
    res = project.run("--branch", "b", "--", "agentfs-no-such-command")
    assert res.returncode == 127
    assert "cannot run agentfs-no-such-command" in res.stderr
    project.assert_no_residue()


# -- what stays outside -----------------------------------------------------------------------
OUTSIDE_PROBE = textwrap.dedent("""\
    import errno, json, os, sys
    result = {}
    for path in sys.argv[1:]:
        try:
            open(path, "w").close()
            result[path] = "written"
        except OSError as exc:
            result[path] = errno.errorcode[exc.errno]
    with open("/tmp/agentfs-private-probe", "w") as f:
        f.write("inside")
    result["tmp"] = open("/tmp/agentfs-private-probe").read()
    result["mode"] = oct(os.stat("/tmp").st_mode & 0o7777)
    result["cwd"] = os.getcwd()
    print(json.dumps(result))
    """)


@pytest.mark.timeout(60)
def test_outside_the_project_is_read_only_and_tmp_private(tmp_project: Project) -> None:
    p = tmp_project
    Path("/tmp/agentfs-private-probe").unlink(missing_ok=True)
    targets = ["/usr/agentfs-x", "/root/agentfs-x", "/etc/agentfs-x", "/var/agentfs-x",
               str(p.home / "agentfs-x")]
    res = p.run("--branch", "b", "--create", "--", PY, "-c", OUTSIDE_PROBE, *targets,
                "inside-project.txt")
    got = json.loads(_ok(res))
    for target in targets:
        assert got[target] in ("EROFS", "ENOENT"), (target, got[target])
    assert got["/usr/agentfs-x"] == "EROFS"
    assert got["/root/agentfs-x"] == "EROFS"
    assert got["inside-project.txt"] == "written"
    assert got["tmp"] == "inside" and got["mode"] == "0o1777"
    assert got["cwd"] == str(p.base)  # a project under /tmp is still at its own path
    assert not os.path.exists("/tmp/agentfs-private-probe")
    for target in targets:
        assert not os.path.exists(target)
    assert not (p.base / "inside-project.txt").exists()
    p.assert_no_residue()


ESCAPE_PROBE = textwrap.dedent("""\
    import ctypes, errno, json, os, sys
    store, home, secret_home, outer_pid = sys.argv[1:5]
    r = {}

    def listing(path):
        try:
            return sorted(os.listdir(path))
        except OSError as exc:
            return errno.errorcode[exc.errno]

    def read(path):
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError as exc:
            return errno.errorcode[exc.errno]

    def write(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            return "written"
        except OSError as exc:
            return errno.errorcode[exc.errno]

    os.symlink("/", "rootlink")
    r["symlink"] = listing("rootlink" + store)
    r["symlink_db"] = read("rootlink" + store + "/meta.db")
    rel = os.path.relpath(store, os.getcwd())
    r["dotdot"] = listing(rel)
    r["dotdot_deep"] = listing("../" * 12 + store.lstrip("/"))
    r["proc_self_root"] = listing("/proc/self/root" + store)
    r["proc_1_root"] = listing("/proc/1/root" + store)
    r["store_run"] = listing(store + "/run")
    r["store_db"] = read(store + "/meta.db")
    r["home"] = listing(home)
    r["store_write"] = write(store + "/x")
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    r["pids"] = pids
    r["outer_visible"] = os.path.exists("/proc/" + outer_pid)
    r["init_cmdline"] = read("/proc/1/cmdline")
    r["ssh_listing"] = listing(secret_home + "/.ssh")
    r["ssh_key"] = read(secret_home + "/.ssh/id_rsa")
    r["ssh_write"] = write(secret_home + "/.ssh/new_key")
    r["netrc"] = read(secret_home + "/.netrc")
    r["core_pattern"] = write("/proc/sys/kernel/core_pattern")
    r["dev"] = listing("/dev")
    status = dict(line.split(":\\t", 1) for line in read("/proc/self/status").splitlines()
                  if ":\\t" in line)
    r["cap_eff"] = int(status["CapEff"], 16)
    r["cap_bnd"] = int(status["CapBnd"], 16)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None)
    r["mount"] = errno.errorcode[ctypes.get_errno()] if rc else "mounted"
    rc = libc.unshare(0x00020000)
    r["unshare"] = errno.errorcode[ctypes.get_errno()] if rc else "unshared"
    print(json.dumps(r))
    """)


@pytest.fixture
def secret_home() -> Iterator[Path]:
    """A home directory with credentials in it, as /home/<user> would have."""
    home = Path(f"/home/agentfs-test-{secrets.token_hex(4)}")
    try:
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY\n")
        (home / ".netrc").write_text("machine example.org password hunter2\n")
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.timeout(60)
def test_escape_attempts_fail(project: Project, secret_home: Path) -> None:
    res = project.run("--branch", "b", "--create", "--", PY, "-c", ESCAPE_PROBE,
                      str(project.store), str(project.home), str(secret_home),
                      str(os.getpid()))
    r = json.loads(_ok(res))
    for key in ("symlink", "dotdot", "dotdot_deep", "proc_self_root", "proc_1_root", "home"):
        assert r[key] == [], (key, r[key])  # the store and agentfs' home: empty
    assert r["symlink_db"] == "ENOENT" and r["store_db"] == "ENOENT"
    assert r["store_run"] == "ENOENT"  # control sockets, trash, layers: not there
    assert r["store_write"] == "EROFS"
    assert r["pids"][0] == 1 and len(r["pids"]) <= 4, r["pids"]  # init, CMD: nothing else
    assert not r["outer_visible"]
    assert "agentfs" in r["init_cmdline"]
    assert r["ssh_listing"] == [] and r["ssh_key"] == "ENOENT"
    assert r["ssh_write"] == "EROFS"
    assert r["netrc"] == ""
    assert r["core_pattern"] == "EROFS"
    assert set(r["dev"]) == {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx",
                             "shm", "fd", "stdin", "stdout", "stderr"}
    for cap in (linux.CAP_SYS_ADMIN, linux.CAP_SYS_PTRACE, linux.CAP_SYS_MODULE,
                linux.CAP_NET_ADMIN, linux.CAP_MKNOD, linux.CAP_SETPCAP, linux.CAP_BPF):
        assert not r["cap_eff"] & (1 << cap) and not r["cap_bnd"] & (1 << cap), cap
    assert r["mount"] == "EPERM" and r["unshare"] == "EPERM"
    # the symlink is the branch's, not the base's
    assert project.cli("branch", "diff", "b", "--name-status").stdout == "A\trootlink\n"
    assert (secret_home / ".ssh" / "id_rsa").read_text() == "PRIVATE KEY\n"
    assert not (secret_home / ".ssh" / "new_key").exists()
    project.assert_no_residue()


NETWORK_PROBE = textwrap.dedent("""\
    import json, socket
    with open("/proc/net/dev") as f:
        names = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=5)
    conn, _ = server.accept()
    client.sendall(b"ping")
    print(json.dumps({"interfaces": names, "loopback": conn.recv(4).decode()}))
    """)


@pytest.mark.timeout(60)
def test_no_network_by_default_only_loopback(project: Project) -> None:
    project.cli("branch", "create", "b")
    for flag in ((), ("--no-network",)):
        r = json.loads(_ok(project.run("--branch", "b", *flag, "--", PY, "-c",
                                       NETWORK_PROBE)))
        assert r == {"interfaces": ["lo"], "loopback": "ping"}, flag
    shared = json.loads(_ok(project.run("--branch", "b", "--network", "--", PY, "-c",
                                        NETWORK_PROBE)))
    with open("/proc/net/dev") as f:
        host = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    assert shared["interfaces"] == host
    project.assert_no_residue()


COHORT_PROBE = textwrap.dedent("""    import errno, json, os, socket, sys
    port, outside = int(sys.argv[1]), int(sys.argv[2])
    out = {}
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        out["egress"] = "connected"
    except OSError as exc:
        out["egress"] = errno.errorcode.get(exc.errno, str(exc))
    try:
        os.kill(outside, 0)
        out["kill"] = "ok"
    except OSError as exc:
        out["kill"] = errno.errorcode[exc.errno]
    out["outside_in_proc"] = os.path.exists(f"/proc/{outside}")
    out["pids"] = sorted(int(n) for n in os.listdir("/proc") if n.isdigit())
    print(json.dumps(out))
    """)


@pytest.mark.timeout(60)
def test_the_command_reaches_only_its_own_cohort(project: Project) -> None:
    """By default: a service on the host's loopback is out of reach (the sandbox has a
    loopback of its own), and a process outside cannot be signalled or even seen."""
    project.cli("branch", "create", "b")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    outside = subprocess.Popen(["sleep", "60"])
    try:
        port = server.getsockname()[1]
        r = json.loads(_ok(project.run("--branch", "b", "--", PY, "-c", COHORT_PROBE,
                                       str(port), str(outside.pid))))
        assert r["egress"] == "ECONNREFUSED", r
        assert r["kill"] == "ESRCH" and not r["outside_in_proc"], r
        assert r["pids"][0] == 1 and max(r["pids"]) < 100, r["pids"]
        assert outside.poll() is None
        # with --network the same service answers (the test reaches the host at all)
        r = json.loads(_ok(project.run("--branch", "b", "--network", "--", PY, "-c",
                                       COHORT_PROBE, str(port), str(outside.pid))))
        assert r["egress"] == "connected" and r["kill"] == "ESRCH", r
    finally:
        outside.kill()
        outside.wait()
        server.close()
    project.assert_no_residue()


# -- who runs it ------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sudo_user_runs_the_command(project: Project) -> None:
    out = _ok(project.run("--branch", "b", "--create",
                          env={"SUDO_UID": "65534", "SUDO_GID": "65534"},
                          script=textwrap.dedent("""\
        id -u; id -g; echo "$HOME $USER"
        grep -E '^Cap(Eff|Prm)' /proc/self/status | tr -d '\\t'
        touch shared/by-nobody
        touch owned-by-root 2>/dev/null || echo denied
        """)))
    assert out.splitlines() == ["65534", "65534", "/nonexistent nobody",
                                "CapPrm:0000000000000000", "CapEff:0000000000000000",
                                "denied"]
    owner = _ok(project.run("--branch", "b", script="stat -c %u:%g shared/by-nobody"))
    assert owner == "65534:65534\n"
    assert not (project.base / "shared" / "by-nobody").exists()
    project.assert_no_residue()


def _system_python_cli() -> list[str] | None:
    """The CLI through /usr/bin/python3 with our sources and the venv's packages on the
    path (the venv's interpreter may live where other users cannot read it)."""
    system = Path("/usr/bin/python3")
    if not system.exists():
        return None
    version = subprocess.run([str(system), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        return None
    site = next(p for p in sys.path if p.endswith("site-packages"))
    source = str(Path(__file__).resolve().parent.parent)
    boot = (f"import sys; sys.path[:0] = [{source!r}, {site!r}]; "
            "from agentfs.cli.main import main; sys.argv[0] = 'agentfs'; main()")
    return [str(system), "-c", boot]


@pytest.mark.timeout(60)
def test_not_root_is_refused_clearly(project: Project) -> None:
    with pytest.raises(UserError, match="needs root"):
        launch.check_root(euid=1000)
    cli = _system_python_cli()
    if cli is None or shutil.which("setpriv") is None:
        pytest.skip("no setpriv or no system python matching the venv's")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          *cli, "--store", str(project.store), "run", "--branch", "b", "--",
                          "true"], capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd="/")
    assert res.returncode == 1
    # the same line `agentfs doctor` gives for the missing piece
    assert res.stderr.strip() == f"agentfs: {capabilities.probe_root(65534).message()}"


def _read_until(fd: int, out: bytearray, token: bytes, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while token not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side is gone
                return token in out
            if not chunk:
                break
            out += chunk
    return token in out


@pytest.mark.timeout(60)
def test_interactive_shell_on_a_terminal(project: Project) -> None:
    project.cli("branch", "create", "b")
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.chdir(project.base)
            os.execve(AGENTFS, [AGENTFS, "--store", str(project.store), "run", "--branch", "b",
                                "--", "sh", "-i"], project.env)
        finally:
            os._exit(127)
    out = bytearray()
    try:
        assert _read_until(fd, out, b"# "), out
        os.write(fd, b"test -t 0 && echo TTY-$((6*7)); sleep 30\n")
        assert _read_until(fd, out, b"TTY-42"), out
        time.sleep(0.3)
        os.write(fd, b"\x03")  # Ctrl-C stops sleep, the shell stays
        del out[:]
        assert _read_until(fd, out, b"# ", timeout=5), out
        os.write(fd, b"echo still-$((2+3)); exit 5\n")
        assert _read_until(fd, out, b"still-5"), out
        _read_until(fd, out, b"\0", timeout=10)  # until the terminal closes
        _, status = os.waitpid(pid, 0)
    finally:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5
    assert b"Cannot set tty process group" not in out, out
    project.assert_no_residue()


# -- sharing, signals, failures -----------------------------------------------------------------
@pytest.mark.timeout(120)
def test_concurrent_runs_share_one_mount(project: Project) -> None:
    logs_before = len(list((project.store / "run").glob("mount-*.log")))
    first = project.popen("--branch", "b", "--create", script=textwrap.dedent("""\
        touch first-started
        i=0
        while [ ! -f second-wrote ]; do
            sleep 0.05; i=$((i+1)); [ $i -gt 600 ] && exit 9
        done
        echo "first saw: $(cat second-wrote)"
        """))
    try:
        second = project.run("--branch", "b", "--create", script=textwrap.dedent("""\
            i=0
            while [ ! -f first-started ]; do
                sleep 0.05; i=$((i+1)); [ $i -gt 600 ] && exit 9
            done
            echo hello > second-wrote
            """))
        out, err = first.communicate(timeout=RUN_TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=10)
    assert second.returncode == 0, second.stderr
    assert first.returncode == 0, err
    assert out == "first saw: hello\n"
    # one daemon served both
    assert len(list((project.store / "run").glob("mount-*.log"))) == logs_before + 1
    project.assert_no_residue()


@pytest.mark.timeout(60)
def test_sigterm_reaches_the_command(project: Project) -> None:
    proc = project.popen("--branch", "b", "--create", script=textwrap.dedent("""\
        trap 'echo got-term; exit 7' TERM
        echo ready
        while :; do sleep 0.05; done
        """))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)  # ignored: the terminal sends it to CMD directly
        time.sleep(0.3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert (proc.returncode, out) == (7, "got-term\n"), err
    project.assert_no_residue()


@pytest.mark.timeout(90)
def test_killed_run_takes_its_sandbox_and_the_next_run_cleans_up(project: Project) -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}.25"
    proc = project.popen("--branch", "b", "--create", script=f"echo ready; sleep {marker}")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while _processes_naming(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_naming(f"sleep {marker}") == []  # the sandbox died with its run
    orphans = [m for m in _mounts() if linux.is_within(m, str(project.store))]
    assert len(orphans) == 1  # the mount cannot be cleaned by a killed process ...
    _ok(project.run("--branch", "other", "--create", script="true"))
    project.assert_no_residue()  # ... the next run in the store does it


@pytest.mark.timeout(90)
def test_errors_are_one_line(project: Project) -> None:
    res = project.run("--branch", "nope", script="true")
    assert (res.returncode, res.stderr) == (6, "agentfs: unknown branch 'nope' (branches: "
                                               "none)\n")
    res = project.run("--branch", "b")
    assert res.returncode == 2 and "Missing argument" in res.stderr
    # --keep-mount leaves the mount; runs join it with its policy, another one is refused
    policy = project.work / "policy.yaml"
    policy.write_text(project.cli("policy", "default").stdout)
    other = project.work / "other.yaml"
    other.write_text(policy.read_text())
    res = project.run("--branch", "b", "--create", "--keep-mount", "--policy", str(policy),
                      script="echo kept > k")
    _ok(res)
    kept = [m for m in _mounts() if linux.is_within(m, str(project.store))]
    assert len(kept) == 1 and "kept the mount" in res.stderr
    res = project.run("--branch", "b", "--policy", str(other), script="true")
    assert res.returncode == 1 and "already mounted" in res.stderr, res.stderr
    assert _ok(project.run("--branch", "b", "--policy", str(policy), script="cat k")) == "kept\n"
    assert _ok(project.run("--branch", "b", script="cat k")) == "kept\n"
    assert [m for m in _mounts() if linux.is_within(m, str(project.store))] == kept
    project.cli("umount", kept[0])
    # the kept mount's directory goes with the next run in the store
    _ok(project.run("--branch", "b", script="true"))
    project.assert_no_residue()


# -- pieces ---------------------------------------------------------------------------------
def test_identity_from_sudo_environment() -> None:
    assert launch.identity_from_env({}) is None
    assert launch.identity_from_env({"SUDO_UID": "0", "SUDO_GID": "0"}) is None
    nobody = launch.identity_from_env({"SUDO_UID": "65534", "SUDO_GID": "65534"})
    assert nobody is not None
    assert (nobody.uid, nobody.gid, nobody.name, nobody.groups) == (65534, 65534, "nobody",
                                                                     (65534,))
    unknown = launch.identity_from_env({"SUDO_UID": "4242", "SUDO_GID": "4343"})
    assert unknown is not None
    assert (unknown.name, unknown.home, unknown.groups) == ("4242", "/", (4343,))
    with pytest.raises(UserError):
        launch.identity_from_env({"SUDO_UID": "x"})


def _entry(mount_id: int, device: str, root: str, mountpoint: str) -> linux.MountEntry:
    return linux.MountEntry(mount_id, 1, device, root, mountpoint, frozenset({"rw"}), "ext4")


def test_aliases_find_every_place_a_path_is_visible() -> None:
    table = [_entry(1, "8:1", "/", "/"),
             _entry(2, "8:2", "/", "/home"),
             _entry(3, "8:2", "/alice", "/srv/alice"),       # a bind of /home/alice
             _entry(10, "8:1", "/", "/R"),
             _entry(11, "8:2", "/", "/R/home"),
             _entry(12, "8:2", "/alice", "/R/srv/alice"),
             _entry(13, "8:2", "/bob", "/R/srv/bob")]        # does not contain it
    assert rootfs.aliases("/home/alice/.ssh", "/R", table) == ["/R/home/alice/.ssh",
                                                               "/R/srv/alice/.ssh"]
    assert rootfs.aliases("/var/lib/store", "/R", table) == ["/R/var/lib/store"]


def test_mountinfo_options_and_escapes() -> None:
    assert linux._unescape(r"/a\040b\011c\134d") == "/a b\tc\\d"
    flags = linux.option_flags(frozenset({"rw", "nosuid", "nodev", "relatime"}))
    assert flags == linux.MS_NOSUID | linux.MS_NODEV | linux.MS_RELATIME
    assert linux.option_flags(frozenset({"ro"})) == linux.MS_STRICTATIME
    assert any(m.mountpoint == "/" for m in linux.mount_table())


def test_exit_codes_follow_the_shell() -> None:
    for status, code in ((0, 0), (1 << 8, 1), (signal.SIGKILL, 137), (signal.SIGTERM, 143)):
        assert nsinit.exit_code(status) == code


@pytest.mark.timeout(240)
def test_full_puts_the_whole_root_through_a_branch(project: Project) -> None:
    """--full: writes anywhere land in a root branch, the project's in the project
    branch; the host and the base stay as they were, agentfs stays invisible."""
    marker = f"agentfs-full-{os.getpid()}"
    script = (f"echo system > /etc/{marker} && mkdir /usr/{marker} && touch /usr/{marker}/f"
              f" && echo more >> a.txt"
              f" && rm dir/b.txt && cat /etc/{marker} && test -e /usr/{marker}"
              f" && ! ls {project.store} 2>/dev/null | grep -q . && echo hidden"
              f" && ls /proc | grep -c '^[0-9]'")
    out = _ok(project.run("--branch", "b", "--create", "--full", script=script))
    lines = out.split()
    assert lines[:2] == ["system", "hidden"] and int(lines[2]) < 10, out
    assert not os.path.exists(f"/etc/{marker}") and not os.path.exists(f"/usr/{marker}")
    assert (project.base / "a.txt").read_text() == "alpha\n"
    assert (project.base / "dir" / "b.txt").exists()
    changes = project.cli("branch", "diff", "b", "--name-status").stdout
    assert "M\ta.txt" in changes and "D\tdir/b.txt" in changes, changes
    root_store = project.home / "root-store"
    names = run_cli("--store", str(root_store), "branch", "list", env=project.env).stdout
    [root_branch] = [n for n in names.split() if n.endswith("--b")]
    system = run_cli("--store", str(root_store), "branch", "diff", root_branch,
                     "--name-status", env=project.env).stdout
    assert f"A\tetc/{marker}" in system and f"A\tusr/{marker}/f" in system, system
    assert "a.txt" not in system  # the project's changes are the project branch's
    project.assert_no_residue()
    assert not any(linux.is_within(m, str(root_store)) for m in _mounts())
    assert list((root_store / "run").glob("sandbox-*")) == []
