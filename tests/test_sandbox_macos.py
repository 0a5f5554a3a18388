"""The macOS sandbox's pure parts, on any platform: the Seatbelt profile against a
golden file, SBPL string escaping of awkward paths, and the command lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentfs.sandbox import macos
from agentfs.sandbox.nsinit import Identity

GOLDEN = Path(__file__).parent / "golden" / "seatbelt_profile.sb"
MOUNT = "/Users/dev/.local/share/agentfs/stores/proj-0123456789ab/run/sandbox-4242-k3x9/view"
TMP = "/private/var/folders/zz/abc123/T/agentfs-run-q1w2e3"

AWKWARD = ['/Users/o\'neil/"quoted" dir', "/Users/dev/back\\slash\\", "/Volumes/My Disk/pro j",
           "/Users/zoë/プロジェクト/🚀", "/tmp/new\nline\tand\rcr", "/tmp/bell\x07del\x7f",
           '/tmp/x")(allow default)(literal "']


def parse_sbpl_string(text: str, start: int = 0) -> tuple[str, int]:
    """Read one TinyScheme string literal at *start* (as the SBPL reader does); return
    its value and the index after the closing quote."""
    assert text[start] == '"'
    out = []
    i = start + 1
    while text[i] != '"':
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1]
            if nxt == "x":
                out.append(chr(int(text[i + 2:i + 4], 16)))
                i += 4
                continue
            out.append({"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}[nxt])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out), i + 1


def forms(profile: str) -> list[str]:
    """The top-level forms' heads (`allow`, `deny`, ...), with strings, comments and
    #"regex" literals skipped: what a profile means, structurally."""
    heads: list[str] = []
    depth = 0
    i = 0
    while i < len(profile):
        ch = profile[i]
        if ch == ";":
            i = profile.index("\n", i)
        elif ch == '"':
            _, i = parse_sbpl_string(profile, i)
            continue
        elif ch == "#" and profile[i + 1] == '"':
            _, i = parse_sbpl_string(profile, i + 1)
            continue
        elif ch == "(":
            if depth == 0:
                heads.append(profile[i + 1:].split(None, 1)[0].rstrip(")"))
            depth += 1
        elif ch == ")":
            depth -= 1
            assert depth >= 0, "unbalanced profile"
        i += 1
    assert depth == 0, "unbalanced profile"
    return heads


def strings_in(profile: str) -> list[str]:
    found = []
    i = 0
    while i < len(profile):
        if profile[i] == ";":
            i = profile.index("\n", i)
        elif profile[i] == '"':
            value, i = parse_sbpl_string(profile, i)
            found.append(value)
            continue
        i += 1
    return found


def test_profile_matches_the_golden_file() -> None:
    profile = macos.seatbelt_profile(MOUNT, MOUNT + "/src", [TMP], network=False)
    assert profile == GOLDEN.read_text(encoding="utf-8")


def test_profile_denies_by_default_and_writes_only_under_the_mount() -> None:
    profile = macos.seatbelt_profile(MOUNT, MOUNT + "/src", [TMP], network=False)
    assert profile.startswith("(version 1)\n")
    assert forms(profile)[:2] == ["version", "deny"]
    writable = profile[profile.index("(allow file-read* file-write*\n  (subpath"):]
    assert strings_in(writable) == [MOUNT, TMP]
    assert "(allow network*)" not in profile


def test_network_adds_only_the_network_section() -> None:
    without = macos.seatbelt_profile(MOUNT, MOUNT, [TMP], network=False)
    with_net = macos.seatbelt_profile(MOUNT, MOUNT, [TMP], network=True)
    assert with_net.startswith(without)
    assert with_net[len(without):] == (
        "\n;; --network\n(allow network*)\n(allow system-socket)\n(allow mach-lookup\n"
        '  (global-name "com.apple.dnssd.service")\n'
        '  (global-name "com.apple.mDNSResponder"))\n')


@pytest.mark.parametrize("path", AWKWARD)
def test_awkward_paths_are_escaped_and_round_trip(path: str) -> None:
    literal = macos.sbpl_string(path)
    value, end = parse_sbpl_string(literal)
    assert (value, end) == (path, len(literal))
    assert "\n" not in literal and "\x07" not in literal  # one line, printable escapes
    profile = macos.seatbelt_profile(path, path, [TMP], network=False)
    plain = macos.seatbelt_profile(MOUNT, MOUNT, [TMP], network=False)
    assert forms(profile) == forms(plain)  # a path can never add or close a rule
    assert path in strings_in(profile)


def test_escapes_exactly() -> None:
    assert macos.sbpl_string('a"b') == '"a\\"b"'
    assert macos.sbpl_string("a\\b") == '"a\\\\b"'
    assert macos.sbpl_string("a b") == '"a b"'
    assert macos.sbpl_string("zoë/🚀") == '"zoë/🚀"'
    assert macos.sbpl_string("a\nb\tc\rd") == '"a\\nb\\tc\\rd"'
    assert macos.sbpl_string("a\x01b\x7f") == '"a\\x01b\\x7f"'
    with pytest.raises(ValueError):
        macos.sbpl_string("a\x00b")


def test_paths_must_be_absolute_and_are_normalised() -> None:
    with pytest.raises(ValueError):
        macos.seatbelt_profile("relative/mount", "/x", [], network=False)
    with pytest.raises(ValueError):
        macos.seatbelt_profile(MOUNT, MOUNT, ["tmp"], network=False)
    profile = macos.seatbelt_profile(MOUNT + "/", MOUNT + "//src/.", [TMP + "/"],
                                     network=False)
    assert profile == macos.seatbelt_profile(MOUNT, MOUNT + "/src", [TMP], network=False)


def test_launch_command_without_root_relies_on_the_profile() -> None:
    argv = macos.launch_command(["make", "-j4", "test"], "(version 1)")
    assert argv == ["/usr/bin/sandbox-exec", "-p", "(version 1)", "--", "make", "-j4", "test"]
    # a chroot asked for without root is skipped, not attempted
    assert macos.launch_command(["make"], "P", chroot_dir="/Volumes/view",
                                is_root=False) == ["/usr/bin/sandbox-exec", "-p", "P", "--",
                                                   "make"]
    with pytest.raises(ValueError):
        macos.launch_command([], "P")


def test_launch_command_as_root_chroots_and_drops_to_the_user() -> None:
    user = Identity(uid=501, gid=20, groups=(20, 12, 61), name="dev", home="/Users/dev")
    argv = macos.launch_command(["sh", "-c", "echo hi"], "P", chroot_dir=Path("/Volumes/view"),
                                is_root=True, user=user)
    assert argv == ["/usr/sbin/chroot", "-u", "501", "-g", "20", "-G", "20,12,61",
                    "/Volumes/view", "/usr/bin/sandbox-exec", "-p", "P", "--",
                    "sh", "-c", "echo hi"]
    assert macos.launch_command(["true"], "P", chroot_dir="/v", is_root=True) == [
        "/usr/sbin/chroot", "/v", "/usr/bin/sandbox-exec", "-p", "P", "--", "true"]


def test_mount_command_uses_the_mfusepy_front_end() -> None:
    assert macos.mount_command("/usr/local/bin/agentfs", Path("/s"), Path("/s/run/v"), "b") == [
        "/usr/local/bin/agentfs", "--store", "/s", "mount", "/s/run/v", "--branch", "b",
        "--impl", "mfusepy"]
    argv = macos.mount_command("agentfs", "/s", "/m", "b", policy="/etc/agentfs/p.yaml")
    assert argv[-2:] == ["--policy", "/etc/agentfs/p.yaml"]


def test_working_directory_maps_into_the_mount() -> None:
    assert macos.map_cwd("/Users/dev/proj", "/Users/dev/proj", "/m") == "/m"
    assert macos.map_cwd("/Users/dev/proj/src/x", "/Users/dev/proj", "/m") == "/m/src/x"
    assert macos.map_cwd("/Users/dev/project2", "/Users/dev/proj", "/m") == "/m"
    assert macos.map_cwd("/", "/Users/dev/proj", "/m") == "/m"
