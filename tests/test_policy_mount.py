"""Policy enforcement on real mounts, in both mount modes: every checked operation,
every way around a denial we know of, reloads, and nothing changing when denied."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mountutil import mounted_branch, per_process_mount, require_fuse, run_cli

pytestmark = pytest.mark.mount

POLICY = """\
version: 1
name: enforcement-test
defaults: {read: allow, write: allow, deny_errno: EACCES}
rules:
  - id: no-secret-read
    priority: 100
    paths: ["secret/**", "**/*.key"]
    ops: [open_read, read, getxattr, listxattr, readlink]
    decision: deny
  - id: frozen
    priority: 90
    paths: ["frozen/**"]
    ops: ["@write"]
    decision: deny
  - id: hidden
    priority: 80
    paths: ["hidden/**"]
    ops: [stat, readdir]
    decision: deny
  - id: unseen-token
    priority: 70
    paths: ["pub/*.token"]
    ops: [stat]
    decision: deny
"""


def make_base(base: Path) -> None:
    for d in ("secret", "Secret", "frozen/sub", "pub/sub", "hidden"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "secret/data.txt").write_text("s3cret\n")
    (base / "Secret/data.txt").write_text("not a secret\n")
    (base / "frozen/f.txt").write_text("frozen\n")
    (base / "pub/a.txt").write_text("public\n")
    (base / "pub/sub/b.key").write_text("key\n")
    (base / "hidden/h.txt").write_text("hidden\n")
    (base / "pub/t.token").write_text("token\n")
    os.link(base / "secret/data.txt", base / "pub/alias")      # a hard link made earlier
    os.symlink("../secret/data.txt", base / "pub/sl")
    os.symlink("data.txt", base / "secret/ln")
    os.setxattr(base / "secret/data.txt", "user.note", b"x")
    os.setxattr(base / "frozen/f.txt", "user.note", b"x")


class View:
    """A mounted view of the test base with POLICY, pinned or per-process."""

    def __init__(self, root: Path, policy: Path, store: Path, env: dict[str, str],
                 mountpoint: Path, impl: str) -> None:
        self.root, self.policy, self.store, self.env = root, policy, store, env
        self.mountpoint, self.impl = mountpoint, impl

    def p(self, rel: str) -> str:
        return str(self.root / rel)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("--store", str(self.store), *args, env=self.env, check=check)


@pytest.fixture(params=["pinned", "per-process", "pinned-mfusepy", "pinned-kernel"])
def view(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[View]:
    """Both mount modes of the pyfuse3 front end, and the mfusepy and kernel front ends
    (pinned: the only mode they have)."""
    require_fuse()
    base = tmp_path / "base"
    make_base(base)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    if request.param.startswith("pinned"):
        impl = request.param.partition("-")[2] or "pyfuse3"
        with mounted_branch(base, tmp_path, "b", mount_opts=("--policy", str(policy)),
                            impl=impl) as mb:
            yield View(mb.mountpoint, policy, mb.store, mb.env, mb.mountpoint, impl)
        return
    with per_process_mount(base, tmp_path, "--default-branch", "b", "--policy",
                           str(policy)) as pp:
        yield View(pp.mountpoint, policy, pp.store, pp.env, pp.mountpoint, "kernel")


def fails(fn: Callable[[], object], code: int = errno.EACCES) -> None:
    with pytest.raises(OSError) as info:
        fn()
    assert info.value.errno == code, info.value


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


# -- every checked operation ---------------------------------------------------------------
def test_reads_of_denied_files_fail(view: View) -> None:
    fails(lambda: read(view.p("secret/data.txt")))
    fails(lambda: read(view.p("pub/sub/b.key")))
    fails(lambda: os.getxattr(view.p("secret/data.txt"), "user.note"))
    fails(lambda: os.listxattr(view.p("secret/data.txt")))
    fails(lambda: os.readlink(view.p("secret/ln")))
    assert read(view.p("pub/a.txt")) == "public\n"
    # writing is not what the rule forbids: the branch takes it, reading stays denied
    with open(view.p("secret/data.txt"), "w") as f:
        f.write("overwritten\n")
    fails(lambda: read(view.p("secret/data.txt")))


def test_every_write_operation_on_a_frozen_tree_fails_and_changes_nothing(view: View) -> None:
    def snapshot() -> dict[str, object]:
        out: dict[str, object] = {}
        for dirpath, dirnames, filenames in os.walk(view.p("frozen")):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                out[full] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid,
                             sorted(os.listxattr(full, follow_symlinks=False)))
        return out

    before = snapshot()
    f = view.p("frozen/f.txt")
    fails(lambda: os.open(f, os.O_WRONLY | os.O_TRUNC))          # open_write + O_TRUNC
    fails(lambda: os.open(f, os.O_WRONLY | os.O_APPEND))         # open_write
    fails(lambda: os.open(view.p("frozen/new"), os.O_WRONLY | os.O_CREAT))  # create
    fails(lambda: os.mkdir(view.p("frozen/d")))                  # mkdir
    fails(lambda: os.mkfifo(view.p("frozen/p")))                 # mknod
    fails(lambda: os.symlink("x", view.p("frozen/s")))           # symlink
    fails(lambda: os.link(view.p("pub/a.txt"), view.p("frozen/l")))  # link destination
    fails(lambda: os.unlink(f))                                  # unlink
    fails(lambda: os.rmdir(view.p("frozen/sub")))                # rmdir
    fails(lambda: os.rename(f, view.p("pub/moved")))             # rename source
    fails(lambda: os.rename(view.p("pub/a.txt"), f))             # rename over destination
    fails(lambda: os.rename(view.p("frozen"), view.p("thawed")))  # rename of the tree
    fails(lambda: os.chmod(f, 0o600))                            # chmod
    fails(lambda: os.chown(f, 1, 1))                             # chown
    fails(lambda: os.utime(f, (1, 1)))                           # utimens
    fails(lambda: os.truncate(f, 0))                             # truncate
    fails(lambda: os.setxattr(f, "user.other", b"1"))            # setxattr
    fails(lambda: os.removexattr(f, "user.note"))                # removexattr
    assert snapshot() == before
    assert read(f) == "frozen\n"
    assert read(view.p("pub/a.txt")) == "public\n"
    assert not os.path.exists(view.p("pub/moved"))


def test_stat_and_readdir_when_named(view: View) -> None:
    fails(lambda: os.stat(view.p("hidden/h.txt")))
    fails(lambda: os.listdir(view.p("hidden")))
    assert os.stat(view.p("pub/a.txt")).st_size == 7
    assert "a.txt" in os.listdir(view.p("pub"))


def test_a_listing_shows_no_attributes_that_stat_may_not(view: View) -> None:
    """`ls -la`: the names come with the listing, the attributes of a name the policy
    keeps stat from must not (readdirplus used to put them in the kernel's cache)."""
    with os.scandir(view.p("pub")) as it:
        entries = {e.name: e for e in it}
    assert "t.token" in entries and "a.txt" in entries
    if view.impl == "pyfuse3":
        time.sleep(0.05)  # pyfuse3 sends the entry uncached: good after this clock tick
    fails(lambda: entries["t.token"].stat(follow_symlinks=False))
    fails(lambda: os.lstat(view.p("pub/t.token")))
    assert entries["a.txt"].stat(follow_symlinks=False).st_size == 7


# -- no bypass ----------------------------------------------------------------------------------
def test_no_bypass_through_symlinks_dotdot_and_case(view: View) -> None:
    fails(lambda: read(view.p("pub/sl")))
    fails(lambda: read(view.p("pub/../secret/data.txt")))
    fails(lambda: read(view.p("pub/sub/../../secret/./data.txt")))
    os.symlink(view.p("secret/data.txt"), view.p("pub/abs"))   # an absolute link made now
    fails(lambda: read(view.p("pub/abs")))
    # a different name on a case-sensitive filesystem is a different file
    assert read(view.p("Secret/data.txt")) == "not a secret\n"


def test_no_bypass_through_hard_links(view: View) -> None:
    fails(lambda: read(view.p("pub/alias")))                      # made before the mount
    fails(lambda: os.link(view.p("secret/data.txt"), view.p("pub/new")))  # made now
    fails(lambda: os.link(view.p("pub/sub/b.key"), view.p("pub/b.txt")))
    assert not os.path.exists(view.p("pub/new"))
    assert not os.path.exists(view.p("pub/b.txt"))
    # renaming the other name around does not help either
    os.rename(view.p("pub/alias"), view.p("pub/alias2"))
    fails(lambda: read(view.p("pub/alias2")))


def test_no_bypass_through_renames(view: View) -> None:
    fails(lambda: os.rename(view.p("secret/data.txt"), view.p("pub/d.txt")))
    fails(lambda: os.rename(view.p("secret"), view.p("public")))
    fails(lambda: os.rename(view.p("pub/sub/b.key"), view.p("pub/sub/b.txt")))
    assert read(view.p("Secret/data.txt")) == "not a secret\n"
    # moving a directory that holds another name of a secret, or a key, keeps them denied
    os.rename(view.p("pub"), view.p("pub2"))
    fails(lambda: read(view.p("pub2/alias")))
    fails(lambda: read(view.p("pub2/sub/b.key")))
    # a move that keeps everything as protected as before is fine
    os.makedirs(view.p("keys/inner"))
    with open(view.p("keys/inner/k.key"), "w") as f:
        f.write("k")
    os.rename(view.p("keys"), view.p("keys2"))
    fails(lambda: read(view.p("keys2/inner/k.key")))
    os.rename(view.p("keys2/inner/k.key"), view.p("keys2/inner/other.key"))
    fails(lambda: read(view.p("keys2/inner/other.key")))


# -- reloads ------------------------------------------------------------------------------------
def _sha_now(view: View) -> str:
    out = view.cli("policy", "show", str(view.mountpoint), "--json").stdout
    return str(__import__("json").loads(out)["mount"]["sha256"])


def test_reload_denies_the_next_open_not_the_open_fd(view: View) -> None:
    fd = os.open(view.p("pub/a.txt"), os.O_RDONLY)
    try:
        before = _sha_now(view)
        view.policy.write_text(POLICY + """\
  - id: now-pub-too
    priority: 100
    paths: ["pub/a.txt"]
    ops: [open_read]
    decision: deny
""")
        res = view.cli("policy", "reload", str(view.mountpoint))
        assert _sha_now(view) != before
        assert _sha_now(view) in res.stdout
        fails(lambda: read(view.p("pub/a.txt")))
        assert os.pread(fd, 100, 0) == b"public\n"  # the handle keeps its rights
    finally:
        os.close(fd)


def test_bad_policy_is_refused_and_the_last_good_stays(view: View) -> None:
    good = _sha_now(view)
    view.policy.write_text(POLICY + "  - id: broken\n    decison: deny\n")
    res = view.cli("policy", "reload", str(view.mountpoint), check=False)
    assert res.returncode != 0
    assert re.search(r"policy\.yaml:\d+: unknown key 'decison'", res.stderr), res.stderr
    assert _sha_now(view) == good
    fails(lambda: read(view.p("secret/data.txt")))
    assert read(view.p("pub/a.txt")) == "public\n"


def test_reload_when_the_file_changes_and_on_sighup(view: View, tmp_path: Path) -> None:
    before = _sha_now(view)
    view.policy.write_text(POLICY.replace('"secret/**", ', ""))
    deadline = time.monotonic() + 10
    while _sha_now(view) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _sha_now(view) != before  # picked up without being told
    assert read(view.p("secret/data.txt")) == "s3cret\n"
    # SIGHUP: the file was replaced behind the watcher's back with the same mtime
    view.policy.write_text(POLICY)
    pid = int(re.search(r"ctl-(\d+)\.sock", " ".join(  # type: ignore[union-attr]
        str(p) for p in (view.store / "run").glob("ctl-*.sock"))).group(1))
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while _sha_now(view) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _sha_now(view) == before
    fails(lambda: read(view.p("secret/data.txt")))


def test_default_policy_applies_without_a_policy_file(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "home/.ssh").mkdir(parents=True)
    (base / "home/.ssh/id_ed25519").write_text("KEY")
    (base / "app").mkdir()
    (base / "app/.env").write_text("TOKEN=1")
    (base / "app/.env.example").write_text("TOKEN=")
    (base / "app/main.py").write_text("print(1)")
    with mounted_branch(base, tmp_path, "b") as mb:
        m = mb.mountpoint
        fails(lambda: read(str(m / "home/.ssh/id_ed25519")))
        fails(lambda: read(str(m / "app/.env")))
        assert read(str(m / "app/.env.example")) == "TOKEN="
        assert read(str(m / "app/main.py")) == "print(1)"
        with open(m / "app/cert.pem", "w") as f:  # generating a key is fine; reading is not
            f.write("PEM")
        fails(lambda: read(str(m / "app/cert.pem")))


def test_exec_with_a_session_policy(tmp_path: Path) -> None:
    """`agentfs exec --policy` puts one session under its own policy."""
    require_fuse()
    base = tmp_path / "base"
    make_base(base)
    strict = tmp_path / "strict.yaml"
    strict.write_text(POLICY.replace('["frozen/**"]', '["pub/**"]'))
    with per_process_mount(base, tmp_path, "--default-branch", "b") as pp:
        mnt = pp.mountpoint
        script = f"open({str(mnt / 'pub/new.txt')!r}, 'w').write('x')"
        res = pp.cli("exec", "--branch", "b", "--policy", str(strict), "--", sys.executable,
                     "-c", script, check=False)
        assert res.returncode != 0 and "Permission denied" in res.stderr
        assert not (mnt / "pub/new.txt").exists()
        pp.cli("exec", "--branch", "b", "--", sys.executable, "-c", script)
        assert (mnt / "pub/new.txt").read_text() == "x"


WHO_POLICY = """\
version: 1
name: who-test
defaults: {read: allow, write: allow}
rules:
  - id: not-for-cat
    paths: ["pub/a.txt"]
    ops: [open_read]
    who: {comm: ["cat"]}
    decision: deny
  - id: not-for-agents
    paths: ["pub/sub/**"]
    ops: [create]
    who: {env: ["AGENT=1"]}
    decision: deny
  - id: not-under-timeout
    paths: ["Secret/**"]
    ops: [open_read]
    who: {ancestor: ["*/agentfs-test-wrapper"]}
    decision: deny
  - id: branch-b-frozen
    paths: ["frozen/**"]
    ops: [open_read]
    who: {branch: ["b"], uid: ["0", "~[1-9][0-9]*"], exe: ["~.*"]}
    decision: deny
"""


def test_rules_match_the_caller(view: View, tmp_path: Path) -> None:
    wrapper = tmp_path / "agentfs-test-wrapper"  # a parent no test runner has
    shutil.copy("/usr/bin/timeout", wrapper)
    view.policy.write_text(WHO_POLICY)
    view.cli("policy", "reload", str(view.mountpoint))

    def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              env={**os.environ, **(env or {})})

    assert run("cat", view.p("pub/a.txt")).returncode != 0           # comm
    assert read(view.p("pub/a.txt")) == "public\n"                    # python is not cat
    touch = [sys.executable, "-c", f"open({view.p('pub/sub/n.txt')!r}, 'w')"]
    assert run(*touch, env={"AGENT": "1"}).returncode != 0            # env
    assert not os.path.exists(view.p("pub/sub/n.txt"))
    assert run(*touch, env={"AGENT": "0"}).returncode == 0
    assert run(str(wrapper), "10", "cat", view.p("Secret/data.txt")).returncode != 0  # ancestor
    res = run("cat", view.p("Secret/data.txt"))
    assert res.stdout == "not a secret\n", res.stderr
    fails(lambda: read(view.p("frozen/f.txt")))                       # branch, uid, exe
