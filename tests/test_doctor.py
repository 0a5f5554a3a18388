"""`agentfs doctor`: the real findings on this machine, the JSON report, and what a
machine without fusermount3 or /dev/fuse gets, from doctor and from `agentfs mount`
(the same one line: what is missing, the consequence, the fix)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cliutil import Result, environment, invoke, make_store

from agentfs import capabilities
from agentfs.errors import EXIT_MOUNT, EXIT_OK

NAMES = {"front end", "FUSE device", "fusermount3", "libfuse3", "pyfuse3", "trio", "mfusepy",
         "root", "mount namespaces", "pid namespaces", "network namespaces",
         "user namespaces", "FUSE passthrough", "FUSE-T", "sandbox-exec"}
KEYS = {"name", "status", "ok", "detail", "consequence", "fix", "needed_for"}
LINUX = sys.platform.startswith("linux")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def no_tools(tmp_path: Path) -> str:
    """A PATH with nothing on it (no fusermount3)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return str(empty)


def doctor(home: Path, *args: str, env: dict[str, str | None] | None = None) -> Result:
    with environment(env or {}):
        return invoke("doctor", *args, home=home)


def doctor_json(home: Path, env: dict[str, str | None] | None = None
                ) -> tuple[int, dict[str, Any]]:
    res = doctor(home, "--json", env=env)
    assert "Traceback" not in res.stderr, res.stderr
    return res.code, json.loads(res.stdout)


def row(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def fully_equipped() -> None:
    """This machine (the test machine) has FUSE, fusermount3, root and namespaces;
    elsewhere the findings differ and the tests that assert them are skipped."""
    if not LINUX or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs Linux with /dev/fuse and fusermount3")
    if os.geteuid() != 0:
        pytest.skip("needs root")


def test_doctor_on_this_machine(home: Path) -> None:
    fully_equipped()
    res = doctor(home)
    assert res.code == EXIT_OK, res.stdout + res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[0].startswith("agentfs doctor: Linux ")
    found = {line.split("  ")[1].strip(): line for line in lines if line.startswith("  ")}
    assert set(found) == NAMES
    for name in ("FUSE device", "fusermount3", "root", "mount namespaces", "pid namespaces",
                 "network namespaces", "front end", "libfuse3", "pyfuse3", "trio",
                 "mfusepy"):
        assert " ok " in found[name], found[name]
    assert "/dev/fuse (character device 10:229, opens read-write)" in found["FUSE device"]
    assert "fusermount3 version: 3." in found["fusermount3"]
    assert "running as root" in found["root"]
    assert "unshare(CLONE_NEWNS) works" in found["mount namespaces"]
    assert "kernel (mount --branch), kernel (mount --per-process)" in found["front end"]
    for name in ("FUSE-T", "sandbox-exec"):
        assert "not applicable  macOS only" in found[name]
    # nothing missing (passthrough only on Linux 6.9+: a speed-up, reported, not needed)
    assert res.stdout.count("consequence:") == (not capabilities.probe_passthrough().ok)
    assert lines[-1] == "ready: everything agentfs uses is here"


def test_doctor_json_has_every_check(home: Path) -> None:
    fully_equipped()
    code, report = doctor_json(home)
    assert code == EXIT_OK
    assert set(report) == {"platform", "checks", "ok"}
    assert report["ok"] is True
    assert report["platform"].startswith("Linux ")
    assert [c["name"] for c in report["checks"]] == [c.name for c in
                                                     capabilities.report().checks]
    assert {c["name"] for c in report["checks"]} == NAMES
    for c in report["checks"]:
        assert set(c) == KEYS, c
        assert c["status"] in {"ok", "missing", "not applicable"}
        assert c["ok"] is (c["status"] != "missing")
        assert isinstance(c["needed_for"], list)
    assert row(report, "FUSE device")["status"] == "ok"
    assert row(report, "FUSE device")["needed_for"] == ["mount", "mount --per-process", "run"]
    assert row(report, "fusermount3")["status"] == "ok"
    assert "umount" in row(report, "fusermount3")["needed_for"]
    assert row(report, "root")["status"] == "ok"
    assert row(report, "mount namespaces")["status"] == "ok"
    assert row(report, "mount namespaces")["needed_for"] == ["run"]
    assert row(report, "user namespaces")["needed_for"] == []  # agentfs does not use them
    assert row(report, "FUSE passthrough")["needed_for"] == []  # a speed-up
    assert row(report, "FUSE-T")["status"] == "not applicable"
    assert row(report, "sandbox-exec")["status"] == "not applicable"
    # the kernel front end is the default for both: pyfuse3 and trio only serve --impl
    assert row(report, "pyfuse3")["needed_for"] == []


def test_doctor_without_fusermount3(home: Path, no_tools: str) -> None:
    if not LINUX:
        pytest.skip("fusermount3 is Linux-only")
    code, report = doctor_json(home, {"PATH": no_tools})
    assert code == EXIT_MOUNT
    assert report["ok"] is False
    fm = row(report, "fusermount3")
    assert fm["status"] == "missing" and fm["ok"] is False
    assert fm["detail"] == "fusermount3 not found on PATH"
    assert fm["consequence"] == ("agentfs mount refuses to start and agentfs umount "
                                 "cannot unmount")
    assert fm["fix"].startswith("install fuse3: apt-get install fuse3")
    assert "mount" in fm["needed_for"]

    res = doctor(home, env={"PATH": no_tools})
    assert res.code == EXIT_MOUNT
    assert "Traceback" not in res.stdout + res.stderr
    assert "fusermount3: fusermount3 not found on PATH" in res.stdout
    assert f"  consequence: {fm['consequence']}" in res.stdout
    assert f"  fix: {fm['fix']}" in res.stdout
    assert res.stdout.splitlines()[-1].startswith("NOT READY: agentfs cannot mount here")


def test_doctor_without_fuse_device(home: Path, tmp_path: Path) -> None:
    if not LINUX:
        pytest.skip("/dev/fuse is Linux-only")
    gone = tmp_path / "no-such-fuse"
    code, report = doctor_json(home, {capabilities.FUSE_DEVICE_ENV: str(gone)})
    assert code == EXIT_MOUNT and report["ok"] is False
    dev = row(report, "FUSE device")
    assert dev["status"] == "missing"
    assert dev["detail"] == f"{gone} does not exist"
    assert dev["consequence"] == "agentfs mount and agentfs run cannot mount a branch"
    assert "modprobe fuse" in dev["fix"] and "--device /dev/fuse" in dev["fix"]

    plain = tmp_path / "plain-file"
    plain.write_text("")
    code, report = doctor_json(home, {capabilities.FUSE_DEVICE_ENV: str(plain)})
    assert code == EXIT_MOUNT
    assert row(report, "FUSE device")["detail"] == f"{plain} is not a character device"


def test_doctor_unknown_front_end(home: Path) -> None:
    code, report = doctor_json(home, {"AGENTFS_FUSE_IMPL": "nope"})
    assert code == EXIT_MOUNT
    front = row(report, "front end")
    assert front["status"] == "missing" and "unknown FUSE front end 'nope'" in front["detail"]
    assert "AGENTFS_FUSE_IMPL" in front["fix"]


def test_doctor_needs_no_store(home: Path, tmp_path: Path) -> None:
    fully_equipped()
    with environment({"AGENTFS_STORE": str(tmp_path / "no-store")}):
        res = invoke("doctor", "--json", home=home, cwd=tmp_path)
    assert res.code == EXIT_OK, res.stderr


def test_help_lists_doctor(home: Path) -> None:
    res = invoke("--help", home=home)
    assert res.code == 0
    assert any(line.split()[1:2] == ["doctor"] for line in res.stdout.splitlines()
               if line.split()), res.stdout


# -- the commands that need a piece say the same -------------------------------------
@pytest.fixture
def store(tmp_path: Path, home: Path) -> Path:
    return make_store(tmp_path, home)


def one_line_failure(res: Result) -> str:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    assert res.code == EXIT_MOUNT, (res.code, res.stderr)
    assert len(res.err_lines) == 1, res.stderr
    return res.err_lines[0]


def test_mount_without_fusermount3_says_what_doctor_says(home: Path, store: Path,
                                                         tmp_path: Path,
                                                         no_tools: str) -> None:
    if not LINUX:
        pytest.skip("fusermount3 is Linux-only")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for extra in ((), ("--foreground",)):
        with environment({"PATH": no_tools}):
            res = invoke("--store", str(store), "mount", str(mnt), "--branch", "b", *extra,
                         home=home)
        line = one_line_failure(res)
        assert line == f"agentfs: {capabilities.fusermount_message()}"
        _, report = doctor_json(home, {"PATH": no_tools})
        fm = row(report, "fusermount3")
        assert fm["consequence"] in line and fm["fix"] in line
        assert "fusermount3 not found" in line  # what older scripts match on
    assert not os.listdir(mnt)


def test_mount_without_fuse_device_says_what_doctor_says(home: Path, store: Path,
                                                         tmp_path: Path) -> None:
    if not LINUX:
        pytest.skip("/dev/fuse is Linux-only")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env: dict[str, str | None] = {capabilities.FUSE_DEVICE_ENV: str(tmp_path / "gone")}
    with environment(env):
        res = invoke("--store", str(store), "mount", str(mnt), "--branch", "b", home=home)
    line = one_line_failure(res)
    _, report = doctor_json(home, env)
    dev = row(report, "FUSE device")
    assert line == (f"agentfs: FUSE is unavailable: {dev['detail']}; {dev['consequence']}; "
                    f"fix: {dev['fix']} (see `agentfs doctor`)")


def test_not_root_fails_only_run(tmp_path: Path) -> None:
    """As an ordinary user: root and the namespaces are missing, which stops only
    `agentfs run`; with a setuid fusermount3 a mount still works, so exit 0."""
    fully_equipped()
    fusermount = shutil.which("fusermount3")
    assert fusermount is not None
    if shutil.which("setpriv") is None or not os.stat(fusermount).st_mode & 0o4000:
        pytest.skip("needs setpriv and a setuid fusermount3")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-m", "agentfs.cli.main", "doctor", "--json"],
                         capture_output=True, text=True, timeout=60, cwd="/",
                         env=dict(os.environ, HOME=str(tmp_path), AGENTFS_HOME=str(tmp_path)))
    if res.returncode not in (EXIT_OK, EXIT_MOUNT) or not res.stdout:
        pytest.skip(f"cannot run as nobody here: {res.stderr.strip()[-200:]}")
    report = json.loads(res.stdout)
    assert res.returncode == EXIT_OK, res.stdout
    root = row(report, "root")
    assert root["status"] == "missing" and root["needed_for"] == ["run"]
    assert "agentfs run refuses to start" in root["consequence"]
    assert "sudo" in root["fix"]
    ns = row(report, "mount namespaces")
    assert ns["status"] == "missing" and "Operation not permitted" in ns["detail"]
    assert row(report, "FUSE device")["status"] == "ok"  # fusermount3 opens it


def test_messages_are_one_line() -> None:
    for check in (capabilities._fusermount_missing(), capabilities.probe_root()):
        assert "\n" not in check.message()
    line = capabilities.namespaces_message("Operation not permitted")
    assert line.startswith("agentfs run cannot create namespaces here (unshare failed: "
                           "Operation not permitted)")
    assert capabilities.NAMESPACE_FIX in line and "\n" not in line


def test_run_namespace_failure_is_the_doctor_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`agentfs run` where unshare(2) fails refuses with the line doctor's fix names."""
    from agentfs.errors import UserError
    from agentfs.sandbox import launch, linux

    monkeypatch.setattr(linux, "namespace_problem", lambda flags: "Operation not permitted")
    with pytest.raises(UserError) as err:
        launch.check_namespaces(network=False)
    assert str(err.value) == capabilities.namespaces_message("Operation not permitted")
    assert err.value.exit_code == 1  # unchanged: `run` refusing is a failure, not a mount


def test_macos_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On macOS the Linux rows are not applicable and FUSE-T/sandbox-exec are probed
    (pretended here: the probes only look at paths)."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(capabilities, "FUSE_T_PATHS", (str(tmp_path / "libfuse-t.dylib"),))
    monkeypatch.setattr(capabilities, "SANDBOX_EXEC", str(tmp_path / "sandbox-exec"))
    for probe in (capabilities.probe_fuse_device, capabilities.probe_fusermount,
                  lambda: capabilities.probe_namespace("mount")):
        check = probe()
        assert check.status == "not applicable" and check.detail == "Linux only"
    fuse_t = capabilities.probe_fuse_t()
    assert fuse_t.status == "missing" and fuse_t.needed_for == ("mount", "run")
    with pytest.raises(capabilities.MountError) as err:
        capabilities.require_fuse()
    assert str(err.value) == fuse_t.message()
    sbx = capabilities.probe_sandbox_exec()
    assert sbx.status == "missing" and "agentfs run refuses to start" in sbx.consequence
    (tmp_path / "libfuse-t.dylib").write_text("")
    assert capabilities.probe_fuse_t().status == "ok"
    capabilities.require_fuse()


def test_mount_check_passes_here() -> None:
    """What `agentfs mount` checks before it starts passes where doctor says ok."""
    fully_equipped()
    from agentfs.mount import lifecycle

    lifecycle.check_fuse()
    assert capabilities.report().ok


def test_doctor_reports_passthrough_turned_off(home: Path) -> None:
    fully_equipped()
    code, report = doctor_json(home, {"AGENTFS_FUSE_PASSTHROUGH": "0"})
    assert code == EXIT_OK and report["ok"] is True  # a speed-up: mounts work without it
    pt = row(report, "FUSE passthrough")
    assert (pt["status"], pt["detail"]) == ("missing", "turned off (AGENTFS_FUSE_PASSTHROUGH=0)")
    assert "through the daemon" in pt["consequence"] and pt["fix"]
