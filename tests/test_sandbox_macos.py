"""The macOS sandbox's pure parts, on any platform: the Seatbelt profile against a
golden file, SBPL string escaping of awkward paths, and the command lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agentfs.errors import UsageError
from agentfs.sandbox import machlookup, macos
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
            i = profile.index('"', i + 2) + 1  # a regex literal: raw, up to its quote
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
        elif profile[i] == "#" and profile[i + 1] == '"':
            i = profile.index('"', i + 2) + 1
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


# -- mach-lookup lists ------------------------------------------------------------------------
GOLDEN_ALLOW = Path(__file__).parent / "golden" / "seatbelt_profile_allow_default.sb"
ALLOW_MODE = machlookup.MachLookup(
    default_action="allow", allow=("com.apple.windowserver.active",),
    block=("com.apple.authd", "com.apple.coreservices.appleevents"),
    allow_prefixes=("com.example.build",),
    block_prefixes=("com.apple.windowserver", "com.apple.iohid"))


def test_allow_default_profile_matches_its_golden_file() -> None:
    profile = macos.seatbelt_profile(MOUNT, MOUNT + "/src", [TMP], network=True,
                                     mach=ALLOW_MODE)
    assert profile == GOLDEN_ALLOW.read_text(encoding="utf-8")


def mach_rules(profile: str) -> list[tuple[str, list[str]]]:
    """(allow|deny, [filters]) of every mach-lookup rule, in order."""
    out = []
    for m in re.finditer(r"\((allow|deny) mach-lookup((?:\n  \([^\n]*\))*)\)?", profile):
        out.append((m.group(1), re.findall(r'\(global-name(?:-regex)? #?"([^"]*)"\)',
                                           m.group(2))))
    return out


def decide(profile: str, service: str) -> str:
    """What Seatbelt decides for a mach-lookup of *service*: the last matching rule
    (a rule without filters matches everything; (deny default) is the start)."""
    verdict = "deny"
    for action, filters in mach_rules(profile):
        if not filters or any(service == f or (f.startswith("^") and
                                                re.match(f, service)) for f in filters):
            verdict = action
    return verdict


def test_defaults_allow_developer_services_and_block_injection_and_dialogs() -> None:
    profile = macos.seatbelt_profile(MOUNT, MOUNT, [TMP], network=False)
    for service in ("com.apple.system.logger", "com.apple.trustd", "com.apple.cfprefsd.agent",
                    "com.apple.system.opendirectoryd.libinfo"):
        assert decide(profile, service) == "allow", service
    for service in ("com.apple.iohideventsystem", "com.apple.authd",
                    "com.apple.coreservices.appleevents", "com.apple.windowserver.active",
                    "com.apple.SecurityAgent.login", "com.apple.tccd", "com.example.other"):
        assert decide(profile, service) == "deny", service


def test_precedence_exact_beats_prefix_block_beats_allow() -> None:
    profile = macos.seatbelt_profile(MOUNT, MOUNT, [TMP], network=False, mach=ALLOW_MODE)
    assert decide(profile, "com.example.anything") == "allow"           # the default
    assert decide(profile, "com.example.build.cache") == "allow"        # allowed prefix
    assert decide(profile, "com.apple.iohideventsystem") == "deny"      # blocked prefix
    assert decide(profile, "com.apple.windowserver.active") == "allow"  # exact over prefix
    assert decide(profile, "com.apple.windowserver") == "deny"
    assert decide(profile, "com.apple.authd") == "deny"                 # exact block
    both = machlookup.MachLookup(allow_prefixes=("com.x",), block_prefixes=("com.x",))
    assert decide(macos.seatbelt_profile(MOUNT, MOUNT, [TMP], network=False, mach=both),
                  "com.x.y") == "deny"                                  # block over allow


def test_blocked_resolvers_stay_blocked_with_network() -> None:
    m = machlookup.MachLookup(block=("com.apple.mDNSResponder",))
    profile = macos.seatbelt_profile(MOUNT, MOUNT, [TMP], network=True, mach=m)
    assert decide(profile, "com.apple.mDNSResponder") == "deny"
    assert decide(profile, "com.apple.dnssd.service") == "allow"


@pytest.mark.parametrize("data, message", [
    ({"default_action": "maybe"}, "allow or deny"),
    ({"allow": "com.apple.x"}, "list of service names"),
    ({"block": ['com.x")(allow default)']}, "not a Mach service name"),
    ({"allow": ["com.a"], "block": ["com.a"]}, "both allowed and blocked"),
    ({"allowed": []}, "unknown key 'allowed'"),
])
def test_bad_settings_are_refused_clearly(data: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        machlookup.from_mapping(data)
    assert message in str(exc.value)


def test_settings_file(tmp_path: Path) -> None:
    assert machlookup.load(tmp_path / "missing.yaml") == machlookup.MachLookup()
    good = tmp_path / "seatbelt.yaml"
    good.write_text("mach_lookup:\n  default_action: allow\n  block_prefixes: [com.evil]\n")
    m = machlookup.load(good)
    assert m.default_action == "allow" and m.block_prefixes == ("com.evil",)
    assert m.allow == machlookup.DEFAULT_ALLOW  # lists not given keep their defaults
    bad = tmp_path / "bad.yaml"
    bad.write_text("mach_lookup:\n  allow: [a\n  block: b\n")
    with pytest.raises(UsageError) as exc:
        machlookup.load(bad)
    assert str(exc.value).startswith(f"{bad}:") and "YAML" in str(exc.value)
