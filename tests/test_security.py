"""Security regression suite: every escape and bypass the mount and the sandbox guard
against, in one place, against every front end (pyfuse3, mfusepy and kernel pinned
mounts, pyfuse3 per-process views) and, where it applies, inside `agentfs run`.

What a process using the view must not manage:
- reach outside the overlay's roots through the daemon: symlinks (relative, absolute,
  `..` chains) are resolved by the kernel in the caller's namespace, never by the
  daemon on the host (not even when a base directory is swapped for a symlink while
  mounted); `..` from the root leaves the view for the mountpoint's parent, never for
  the base's;
- hard-link or rename anything across the view's boundary (EXDEV), or write the base
  through a link made in the view;
- see the store: trash, layers, meta.db, the reserved `user.agentfs` xattr that holds
  whiteouts and redirects (neither readable, listable nor settable), a store inside
  the base (refused at init);
- see another branch from a per-process view bound to one;
- get around a policy denial (`.ssh`, private keys) through a symlink, a hard link made
  before or now, a rename of the file or its parent, /proc/self/fd (reopen, linkat),
  O_PATH fds and openat below them, or another spelling of the path (`//`, `./`, `..`);
- gain privileges from set-uid files or device nodes (nosuid, nodev);
- and inside `agentfs run`: reach the control socket (its path is visible in
  /proc/net/unix, connecting fails), leave the root with `..`, or read what the
  policy denies in the project.

Other suites hold the finer cases: tests/test_policy_mount.py (every checked operation,
renames that would lose a rule, reloads, caller predicates), tests/test_run.py (the
sandbox's masks, capabilities, pid namespace, network), tests/test_hostio.py (the
daemon's host access without FUSE), tests/test_perprocess.py (the control socket
refuses bind/unbind from sessions).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mountutil import (
    AGENTFS,
    IMPLS,
    cli_env,
    init_store,
    mounted_branch,
    per_process_mount,
    require_fuse,
    run_cli,
)
from treehash import tree_fingerprint

pytestmark = pytest.mark.mount

FRONT_ENDS = [f"pinned-{impl}" for impl in IMPLS] + ["per-process"]
SSH_KEY = "home/.ssh/id_ed25519"
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000


def make_base(work: Path) -> Path:
    """work/b/base, with a sibling the daemon could reach (work/b/outside.txt, work/b/
    secret/) that differs from what sits next to the mountpoint (work/outside.txt)."""
    base = work / "b" / "base"
    for d in ("home/.ssh", "app", "pub", "deep/a", "swap", "bin"):
        (base / d).mkdir(parents=True)
    (base / SSH_KEY).write_text("SSH-KEY\n")
    (base / "home/.ssh/config").write_text("Host *\n")
    (base / "app/server.key").write_text("KEY-DATA\n")
    (base / "app/main.py").write_text("print(1)\n")
    (base / "pub/readme").write_text("public\n")
    (base / "swap/f").write_text("INSIDE\n")
    os.link(base / SSH_KEY, base / "pub/hl")                  # hard links made before
    os.link(base / "app/server.key", base / "pub/keylink")
    os.symlink("../home/.ssh/id_ed25519", base / "pub/rel")
    os.symlink("../home/.ssh", base / "pub/dirlink")
    os.symlink("../outside.txt", base / "up")                 # out of the base
    os.symlink("../../../outside.txt", base / "deep/a/b")
    (work / "b" / "outside.txt").write_text("BASE-SIDE\n")
    (work / "b" / "secret").mkdir()
    (work / "b" / "secret" / "f").write_text("SECRET-SIDE\n")
    (work / "b" / "secret" / "only-secret").write_text("SECRET-SIDE\n")
    (work / "outside.txt").write_text("MOUNT-SIDE\n")
    return base


@dataclass
class View:
    kind: str
    work: Path
    base: Path
    mnt: Path
    store: Path
    env: dict[str, str]

    def p(self, rel: str) -> str:
        return os.path.join(str(self.mnt), rel)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("--store", str(self.store), *args, env=self.env, check=check)


@contextlib.contextmanager
def open_view(kind: str, work: Path, base: Path, *opts: str) -> Iterator[View]:
    if kind == "per-process":
        with per_process_mount(base, work, "--default-branch", "b", *opts) as pp:
            yield View(kind, work, base, pp.mountpoint, pp.store, pp.env)
        return
    with mounted_branch(base, work, "b", impl=kind.partition("-")[2],
                        mount_opts=tuple(opts)) as mb:
        yield View(kind, work, base, mb.mountpoint, mb.store, mb.env)


@pytest.fixture(params=FRONT_ENDS)
def view(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[View]:
    """The default policy; the base is checked unchanged afterwards."""
    require_fuse()
    base = make_base(tmp_path)
    before = tree_fingerprint(str(base))
    with open_view(request.param, tmp_path, base) as v:
        yield v
    assert tree_fingerprint(str(base)) == before, "the base was written"


def err(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    return "ok"


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def link_fd(fd: int, dst: str) -> str:
    """linkat(fd, "", AT_FDCWD, dst, AT_EMPTY_PATH): a name for what an fd holds."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", AT_FDCWD, os.fsencode(dst), AT_EMPTY_PATH) == 0:
        return "ok"
    return errno.errorcode[ctypes.get_errno()]


def write(path: str, data: str, mode: str = "w") -> int:
    with open(path, mode) as f:
        return f.write(data)


# -- out of the roots ----------------------------------------------------------------------
def test_symlinks_and_dotdot_resolve_in_the_callers_namespace(view: View) -> None:
    assert os.readlink(view.p("up")) == "../outside.txt"   # the target as stored
    assert read(view.p("up")) == "MOUNT-SIDE\n"             # next to the mountpoint ...
    assert read(view.p("deep/a/b")) == "MOUNT-SIDE\n"       # ... not next to the base
    assert read(view.p("pub/../../outside.txt")) == "MOUNT-SIDE\n"
    assert os.path.samestat(os.stat(view.p("..")), os.stat(view.work))
    assert os.path.samestat(os.stat(view.p("deep/a/../../..")), os.stat(view.work))
    assert "b" in os.listdir(view.p("..")) and "base" not in os.listdir(view.p(".."))
    # links made now, relative and absolute, pointing out
    os.symlink("../../b/secret/f", view.p("pub/new-rel"))
    assert read(view.p("pub/new-rel")) == "SECRET-SIDE\n"   # the host path it names
    os.symlink("../../../../../../../../../../../../../../../../" + str(view.work)[1:]
               + "/outside.txt", view.p("pub/chain"))
    assert read(view.p("pub/chain")) == "MOUNT-SIDE\n"
    assert sorted(os.listdir(view.work / "b" / "secret")) == ["f", "only-secret"]


def test_a_base_directory_swapped_for_a_symlink_is_never_followed(view: View) -> None:
    """The base changes under a running mount: swap/ becomes a symlink to ../secret
    (next to the base).  The daemon must not serve secret/ as swap/."""
    assert read(view.p("swap/f")) == "INSIDE\n"
    swap = view.base / "swap"
    swap.rename(view.base / "swap.orig")
    os.symlink("../secret", swap)
    try:
        seen = []
        for probe in (lambda: read(view.p("swap/f")),
                      lambda: read(view.p("swap/only-secret")),
                      lambda: os.listdir(view.p("swap")),
                      lambda: write(view.p("swap/new"), "x"),
                      lambda: write(view.p("swap/f"), "more", "a"),
                      lambda: os.mkdir(view.p("swap/sub")),
                      lambda: os.rename(view.p("swap/f"), view.p("pub/moved"))):
            try:
                seen.append(repr(probe()))
            except OSError as exc:
                seen.append(errno.errorcode[exc.errno or 0])
        assert not any("SECRET" in s or "only-secret" in s for s in seen), seen
        with contextlib.suppress(OSError):
            assert "SECRET" not in read(view.p("pub/moved"))
        secret = view.work / "b" / "secret"
        assert sorted(os.listdir(secret)) == ["f", "only-secret"]
        assert (secret / "f").read_text() == "SECRET-SIDE\n"
    finally:
        swap.unlink()
        (view.base / "swap.orig").rename(swap)


def test_no_link_or_rename_across_the_boundary(view: View) -> None:
    outside = view.work / "outside.txt"
    assert err(lambda: os.link(outside, view.p("pub/in"))) == "EXDEV"
    assert err(lambda: os.link(view.p("pub/readme"), view.work / "out")) == "EXDEV"
    assert err(lambda: os.rename(outside, view.p("pub/in"))) == "EXDEV"
    assert err(lambda: os.rename(view.p("pub/readme"), view.work / "out")) == "EXDEV"
    assert err(lambda: os.rename(view.p("pub"), view.work / "pubout")) == "EXDEV"
    assert not (view.work / "out").exists() and outside.read_text() == "MOUNT-SIDE\n"
    # a link made in the view is the branch's: writing through it leaves the base alone
    os.link(view.p("pub/readme"), view.p("pub/readme2"))
    with open(view.p("pub/readme2"), "a") as f:
        f.write("changed\n")
    assert read(view.p("pub/readme")) == "public\nchanged\n"
    assert (view.base / "pub/readme").read_text() == "public\n"
    assert os.stat(view.base / "pub/readme").st_nlink == 1


# -- the store -------------------------------------------------------------------------------
def test_trash_layers_and_markers_are_not_reachable(view: View) -> None:
    token = f"TRASHED-{os.getpid()}-{view.kind}"
    os.makedirs(view.p("gone/sub"))
    for rel in ("gone/sub/a", "pub/t1", "pub/t2"):
        with open(view.p(rel), "w") as f:
            f.write(token)
    shutil.rmtree(view.p("gone"))
    os.unlink(view.p("pub/t1"))
    os.rename(view.p("pub/readme"), view.p("pub/t2"))     # t2's old content: trash
    os.unlink(view.p("app/main.py"))                      # a base file: a whiteout
    os.rename(view.p("deep"), view.p("deep2"))            # a base directory: a redirect
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(str(view.mnt)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            names.append(os.path.relpath(full, view.mnt))
            if os.path.isfile(full) and not os.path.islink(full):
                with contextlib.suppress(PermissionError):  # the policy's denials
                    assert token not in read(full), full
    assert not any(part in ("trash", "layers", "meta.db", "run", "index", "work", "tree")
                   for n in names for part in n.split("/")), names
    assert sorted(os.listdir(view.mnt)) == ["app", "bin", "deep2", "home", "pub", "swap",
                                            "up"]
    # the xattr that holds whiteouts, opaque markers and redirects is the daemon's alone
    for rel in ("deep2", "app", "pub/t2", "pub"):
        assert "user.agentfs" not in os.listxattr(view.p(rel))
        assert err(lambda rel=rel: os.getxattr(view.p(rel), "user.agentfs")) in (
            "EPERM", "ENODATA")
    forged = json.dumps({"redirect": "../../b/secret"}).encode()
    for name in ("user.agentfs", "user.agentfs.redirect"):
        assert err(lambda name=name: os.setxattr(view.p("pub"), name, forged)) == "EPERM"
        assert err(lambda name=name: os.removexattr(view.p("deep2"), name)) in (
            "EPERM", "ENODATA")
    assert sorted(os.listdir(view.p("deep2/a"))) == ["b"]


@pytest.mark.parametrize("impl", IMPLS)
def test_agentfs_home_and_other_stores_inside_the_base_are_hidden(impl: str,
                                                                   tmp_path: Path) -> None:
    """A project that contains agentfs' home (a home directory mounted with a store of
    its own elsewhere): the home, with the registry and other projects' stores (their
    branches, trash and databases), is not in the view."""
    base = tmp_path / "proj"
    base.mkdir()
    (base / "a.txt").write_text("a\n")
    env = cli_env(base / ".local/share/agentfs")
    other = tmp_path / "other"
    other.mkdir()
    run_cli("init", str(other), env=env)                  # a store under that home
    stores = base / ".local/share/agentfs/stores"
    [other_store] = list(stores.iterdir())
    init_store(base, tmp_path / "store", "b", env["AGENTFS_HOME"])  # registers it too
    before = tree_fingerprint(str(base))
    with mounted_branch(base, tmp_path / "w", "b", init=False, store=tmp_path / "store",
                        env=env, impl=impl) as mb:
        m = mb.mountpoint
        assert sorted(os.listdir(m / ".local/share")) == []
        rel = other_store.relative_to(base)
        assert err(lambda: os.stat(m / rel / "meta.db")) == "ENOENT"
        assert err(lambda: read(str(m / ".local/share/agentfs/registry.json"))) == "ENOENT"
        assert read(str(m / "a.txt")) == "a\n"
    assert tree_fingerprint(str(base)) == before


def test_a_store_inside_the_base_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    res = run_cli("init", str(base), "--store", str(base / ".agentfs"),
                  env=cli_env(tmp_path / "home"), check=False)
    assert res.returncode == 2 and "must not be inside the base" in res.stderr, res.stderr
    assert not (base / ".agentfs" / "meta.db").exists()


# -- policy bypasses -------------------------------------------------------------------------
def test_a_denied_path_is_denied_however_it_is_reached(view: View) -> None:
    spellings = [SSH_KEY, "home//.ssh//id_ed25519", "home/./.ssh/./id_ed25519",
                 "pub/../home/.ssh/id_ed25519", "app/../home/../home/.ssh/id_ed25519",
                 "pub/rel", "pub/dirlink/id_ed25519", "pub/hl"]
    for rel in spellings:
        assert err(lambda rel=rel: read(view.p(rel))) == "EACCES", rel
    assert err(lambda: os.listdir(view.p("home/.ssh/"))) == "EACCES"
    assert err(lambda: os.stat(view.p("home/.ssh/config"))) == "EACCES"
    assert err(lambda: os.open(view.p(SSH_KEY), os.O_PATH)) == "EACCES"
    os.symlink(view.p(SSH_KEY), view.p("pub/abs"))                 # an absolute link now
    assert err(lambda: read(view.p("pub/abs"))) == "EACCES"
    assert err(lambda: os.link(view.p(SSH_KEY), view.p("pub/new"))) == "EACCES"
    assert err(lambda: os.rename(view.p(SSH_KEY), view.p("pub/moved"))) == "EACCES"
    assert err(lambda: os.rename(view.p("home/.ssh"), view.p("home/ssh"))) == "EACCES"
    os.rename(view.p("home"), view.p("home2"))                     # the parent: allowed,
    assert err(lambda: read(view.p("home2/.ssh/id_ed25519"))) == "EACCES"  # still denied
    os.rename(view.p("home2"), view.p("home"))
    assert not os.path.exists(view.p("pub/new")) and not os.path.exists(view.p("pub/moved"))


def test_fd_tricks_do_not_reopen_a_denied_file(view: View) -> None:
    """server.key may be looked up and written, not read: /proc/self/fd reopens,
    O_PATH fds, openat below a directory fd and linkat through /proc all ask again."""
    key = view.p("app/server.key")
    assert err(lambda: read(key)) == "EACCES"
    assert err(lambda: read(view.p("pub/keylink"))) == "EACCES"   # base hard link
    path_fd = os.open(key, os.O_PATH)
    write_fd = os.open(key, os.O_WRONLY)
    dir_fd = os.open(view.p("app"), os.O_PATH | os.O_DIRECTORY)
    try:
        for fd in (path_fd, write_fd):
            assert err(lambda fd=fd: read(f"/proc/self/fd/{fd}")) == "EACCES"
            assert err(lambda fd=fd: os.open(f"/proc/self/fd/{fd}", os.O_RDWR)) == "EACCES"
            assert link_fd(fd, view.p("pub/k2")) == "EACCES"  # linkat(AT_EMPTY_PATH)
        assert err(lambda: os.read(path_fd, 10)) == "EBADF"
        assert err(lambda: os.read(write_fd, 10)) == "EBADF"
        assert err(lambda: os.open("server.key", os.O_RDONLY, dir_fd=dir_fd)) == "EACCES"
        assert err(lambda: os.rename("server.key", "server.txt", src_dir_fd=dir_fd,
                                     dst_dir_fd=dir_fd)) == "EACCES"
    finally:
        for fd in (path_fd, write_fd, dir_fd):
            os.close(fd)
    assert err(lambda: os.rename(key, view.p("app/server.txt"))) == "EACCES"
    assert not os.path.exists(view.p("pub/k2"))
    # another case is another name (case-sensitive, as the filesystem below)
    assert err(lambda: read(view.p("app/SERVER.KEY"))) == "ENOENT"


# -- privileges ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FRONT_ENDS)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs a file as another user)")
def test_set_uid_files_and_devices_give_nothing(kind: str, world_dir: Path) -> None:
    require_fuse()
    base = world_dir / "base"
    (base / "bin").mkdir(parents=True)
    shutil.copy("/usr/bin/id", base / "bin/suid-id")
    os.chmod(base / "bin/suid-id", 0o4755)
    with open_view(kind, world_dir, base) as v:
        v.mnt.chmod(0o755)
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if ln.split()[4] == str(v.mnt))
        options = set(line.split()[5].split(","))
        assert {"nosuid", "nodev"} <= options, line
        shutil.copy("/usr/bin/id", v.p("made-id"))
        os.chmod(v.p("made-id"), 0o4755)
        for rel in ("bin/suid-id", "made-id"):
            assert stat.S_IMODE(os.stat(v.p(rel)).st_mode) == 0o4755
            out = subprocess.run([v.p(rel), "-u"], user=65534, group=65534, extra_groups=[],
                                 capture_output=True, text=True, timeout=30)
            assert out.stdout.strip() == "65534", (rel, out.stdout, out.stderr)
        os.mknod(v.p("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert err(lambda: os.close(os.open(v.p("null"), os.O_RDONLY))) == "EACCES"  # nodev


# -- branches --------------------------------------------------------------------------------
BRANCH_PROBE = textwrap.dedent("""\
    import errno, json, os, sys
    mnt, other = sys.argv[1:3]   # other: "<pid> <fd>" of a process in branch b
    r = {}
    def attempt(key, fn):
        try:
            r[key] = fn()
        except OSError as exc:
            r[key] = errno.errorcode[exc.errno]
    attempt("read", lambda: open(mnt + "/only-b.txt").read())
    attempt("stat", lambda: os.stat(mnt + "/only-b.txt").st_size)
    attempt("listed", lambda: "only-b.txt" in os.listdir(mnt))
    attempt("shared", lambda: open(mnt + "/pub/readme").read())
    attempt("dir", lambda: os.listdir(mnt + "/b-dir"))
    attempt("o_path", lambda: os.open(mnt + "/b-dir", os.O_PATH) and "opened")
    pid, fd = other.split()
    attempt("proc_cwd", lambda: os.listdir(f"/proc/{pid}/cwd"))
    attempt("proc_cwd_file", lambda: open(f"/proc/{pid}/cwd/inner").read())
    attempt("proc_fd", lambda: open(f"/proc/{pid}/fd/{fd}").read())
    print(json.dumps(r))
    """)


@pytest.mark.timeout(120)
def test_a_per_process_view_cannot_reach_another_branch(tmp_path: Path) -> None:
    require_fuse()
    base = make_base(tmp_path)
    with per_process_mount(base, tmp_path, "--deny-unbound") as pp:
        pp.cli("branch", "create", "a")
        mnt = str(pp.mountpoint)
        write_b = (f"import os; open({mnt!r} + '/only-b.txt', 'w').write('B-DATA');"
                   f"os.mkdir({mnt!r} + '/b-dir');"
                   f"open({mnt!r} + '/pub/readme', 'w').write('B-README')")
        pp.cli("exec", "--branch", "b", "--", sys.executable, "-c", write_b)
        # a process of branch b sitting in b's tree with a file open: its /proc entries
        # lead into b's inodes without passing the root
        holder = subprocess.Popen(
            [AGENTFS, "--store", str(pp.store), "exec", "--branch", "b", "--", sys.executable,
             "-c", f"import os, time; os.chdir({mnt!r} + '/b-dir');"
                   "open('inner', 'w').write('B-INNER'); fd = os.open('inner', os.O_RDONLY);"
                   "print(os.getpid(), fd, flush=True); time.sleep(60)"],
            env=pp.env, stdout=subprocess.PIPE, text=True)
        other = ""
        try:
            assert holder.stdout is not None
            other = holder.stdout.readline().strip()
            res = pp.cli("exec", "--branch", "a", "--", sys.executable, "-c", BRANCH_PROBE,
                         mnt, other)
        finally:
            if other:  # the sleeper itself (the keeper does not pass SIGKILL on)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(other.split()[0]), signal.SIGKILL)
            holder.kill()
            holder.wait(timeout=30)
        r = json.loads(res.stdout)
        assert r == {"read": "ENOENT", "stat": "ENOENT", "listed": False,
                     "shared": "public\n", "dir": "ENOENT", "o_path": "ENOENT",
                     "proc_cwd": "EACCES", "proc_cwd_file": "EACCES", "proc_fd": "EACCES"}, r
        # and an unbound process gets nothing at all
        assert err(lambda: os.listdir(mnt)) == "EACCES"
        assert (base / "pub/readme").read_text() == "public\n"


# -- inside `agentfs run` --------------------------------------------------------------------
RUN_PROBE = textwrap.dedent("""\
    import errno, json, os, socket, sys
    store = sys.argv[1]
    r = {}
    def attempt(fn):
        try:
            return fn()
        except OSError as exc:
            return errno.errorcode[exc.errno]
    paths = []
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and "/ctl-" in parts[7] and parts[7].startswith(store):
                paths.append(parts[7])
    r["ctl_paths"] = len(paths)
    def connect(path):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return "connected"
        finally:
            s.close()
    r["connect"] = sorted({attempt(lambda p=p: connect(p)) for p in paths})
    r["via_proc_root"] = sorted({attempt(lambda p=p: connect("/proc/1/root" + p))
                                 for p in paths})
    os.chdir("/")
    for _ in range(20):
        os.chdir("..")
    r["cwd"] = os.getcwd()
    r["root_is_root"] = os.path.samestat(os.stat("/.."), os.stat("/"))
    r["proc_root"] = os.readlink("/proc/self/root")
    def read(path):
        with open(path) as f:
            return f.read()
    project = sys.argv[2]
    r["denied"] = {rel: attempt(lambda rel=rel: read(os.path.join(project, rel)))
                   for rel in (".ssh/id_rsa", ".ssh//id_rsa", "./.ssh/./id_rsa",
                               "dir/../.ssh/id_rsa", "sshlink/id_rsa")}
    print(json.dumps(r))
    """)


@pytest.mark.timeout(120)
def test_inside_run_the_control_socket_and_secrets_are_out_of_reach() -> None:
    import test_run  # the sandbox fixtures' helpers

    test_run._require_sandbox()
    p = test_run.make_project(Path("/var/lib"))
    try:
        (p.base / ".ssh").mkdir()
        (p.base / ".ssh" / "id_rsa").write_text("PROJECT-KEY\n")
        os.symlink(".ssh", p.base / "sshlink")
        # by default the sandbox has a network namespace of its own: the daemon's unix
        # socket is not even listed
        res = p.run("--branch", "b", "--create", "--", test_run.PY, "-c", RUN_PROBE,
                    str(p.store), str(p.base))
        r = json.loads(test_run._ok(res))
        assert r["ctl_paths"] == 0, r
        res = p.run("--branch", "b", "--network", "--", test_run.PY, "-c", RUN_PROBE,
                    str(p.store), str(p.base))
        r = json.loads(test_run._ok(res))
        assert r["ctl_paths"] >= 1, r  # with the host's network it is listed ...
        assert r["connect"] == ["ENOENT"] and r["via_proc_root"] == ["ENOENT"], r  # ... unreachable
        assert r["cwd"] == "/" and r["root_is_root"] and r["proc_root"] == "/", r
        assert set(r["denied"].values()) == {"EACCES"}, r["denied"]
        assert (p.base / ".ssh" / "id_rsa").read_text() == "PROJECT-KEY\n"
        p.assert_no_residue()
    finally:
        test_run.teardown(p)

