"""Policy: the glob compiler against a reference matcher, strict loading with file:line
errors, priority/order/caller predicates, lint, and the CLI tools."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mountutil import cli_env, run_cli

from agentfs.policy.engine import PolicyEngine, default_policy
from agentfs.policy.globs import GlobError, compile_glob, normalize
from agentfs.policy.lint import shadowed
from agentfs.policy.loader import PolicyError, parse_policy
from agentfs.policy.model import Caller

TABLE = [
    ("**", "a", True), ("**", "a/b/c", True), ("*", "a", True), ("*", "a/b", False),
    ("**/*.pem", "k.pem", True), ("**/*.pem", "x/y/k.pem", True), ("**/*.pem", "k.pem/x", False),
    (".git/**", ".git/objects/ab", True), (".git/**", ".git", True), (".git/**", ".gitx/a", False),
    ("src/*.py", "src/a.py", True), ("src/*.py", "src/x/a.py", False),
    ("/etc/**", "etc/passwd", True),
    ("a/**/b", "a/b", True), ("a/**/b", "a/x/y/b", True), ("a/**/b", "a/xb", False),
    ("f?o", "foo", True), ("f?o", "fo", False), ("f[ab]o", "fao", True), ("f[!ab]o", "fao", False),
    ("{src,lib}/*", "lib/x", True), ("{src,lib}/*", "doc/x", False), ("*.{c,h}", "m.h", True),
    ("Secret", "secret", False), ("**/.env.*", "deep/.env.local", True),
    ("**/.env.*", ".env", False),
]


@pytest.mark.parametrize("pattern,path,want", TABLE)
def test_glob_table(pattern: str, path: str, want: bool) -> None:
    assert bool(compile_glob(pattern).fullmatch(path)) is want


@pytest.mark.parametrize("bad", ["a/**b", "**x", "[abc", "{a,b", "a}", ""])
def test_bad_globs(bad: str) -> None:
    with pytest.raises(GlobError):
        compile_glob(bad)


def test_normalize_defeats_dot_dot() -> None:
    assert normalize("/a/./b/../.ssh//id_rsa") == "a/.ssh/id_rsa"
    engine = PolicyEngine(default_policy())
    assert engine.decide("open_read", "src/../.ssh/id_rsa").decision == "deny"


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",")
            for x in _expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]


def _reference(pattern: str, path: str) -> bool:
    """Segment-by-segment matcher: the obviously-correct, slow definition."""
    def match(psegs: list[str], segs: list[str]) -> bool:
        if not psegs:
            return not segs
        if psegs[0] == "**":
            return any(match(psegs[1:], segs[i:]) for i in range(len(segs) + 1))
        return bool(segs) and fnmatch.fnmatchcase(segs[0], psegs[0]) and match(psegs[1:],
                                                                                 segs[1:])
    return any(match(p.lstrip("/").split("/"), path.split("/")) for p in _expand_braces(pattern))


segments = st.sampled_from(["a", "b", "ab", ".x", "a.c"])
paths = st.lists(segments, min_size=1, max_size=4).map("/".join)
pattern_segments = st.sampled_from(["a", "b", "*", "**", "?", "a*", "*.c", "[ab]", "{a,b}",
                                    ".x", "[!a]*"])
patterns = st.lists(pattern_segments, min_size=1, max_size=4).map("/".join)


@settings(max_examples=500, deadline=None)
@given(pattern=patterns, path=paths)
def test_compiled_glob_agrees_with_reference(pattern: str, path: str) -> None:
    assert bool(compile_glob(pattern).fullmatch(path)) == _reference(pattern, path)


def _policy_text(rules: list[tuple[list[str], str, str]]) -> str:
    lines = ["version: 1", "defaults: {read: allow, write: allow}", "rules:"]
    for i, (globs, decision, who) in enumerate(rules):
        lines += [f"  - id: r{i}", f"    priority: {i % 3}",
                  f"    paths: {globs!r}".replace("'", '"'), "    ops: [open_read, unlink]",
                  f"    decision: {decision}"]
        if who:
            lines.append(f"    who: {{exe: [{who!r}]}}".replace("'", '"'))
    return "\n".join(lines) + "\n"


rule_sets = st.lists(st.tuples(st.lists(patterns, min_size=1, max_size=3),
                               st.sampled_from(["deny", "allow", "ask", "audit"]),
                               st.sampled_from(["", "/bin/*", "!/bin/sh"])),
                     min_size=1, max_size=8)


@settings(max_examples=1000, deadline=None)
@given(rules=rule_sets, path=paths, exe=st.sampled_from(["/bin/sh", "/bin/git", "/x"]))
@example(rules=[(["**/*.c"], "deny", "")], path="b/a.c", exe="/x")
@example(rules=[(["a/**"], "allow", ""), (["**/.x"], "deny", "/bin/*")], path="a/.x",
         exe="/bin/sh")
def test_indexed_decisions_agree_with_trying_every_rule(
        rules: list[tuple[list[str], str, str]], path: str, exe: str) -> None:
    """The rule index and decision cache never change an answer: compare with the
    rule-by-rule reference (`explain`) on random policies, paths and callers."""
    engine = PolicyEngine(parse_policy(_policy_text(rules), "<random>"))
    caller = Caller(exe=exe)
    for op in ("open_read", "unlink"):
        fast, slow = engine.decide(op, path, caller), engine.explain(op, path, caller)
        assert (fast.decision, fast.rule) == (slow.decision, slow.rule)
        again = engine.decide(op, path, caller)
        assert (again.decision, again.rule) == (slow.decision, slow.rule)
        # the hot path's pre-check never skips a check that could restrict
        if not engine.may_restrict(op, path):
            assert slow.decision == "allow", (op, path)


POLICY = """\
version: 1
name: t
vars:
  KEYS: keys
defaults:
  read: allow
  write: allow
  deny_errno: EPERM
rules:
  - id: low
    paths: ["**"]
    ops: ["@destructive"]
    decision: soft_delete
  - id: high
    priority: 10
    paths: ["${KEYS}/**"]
    ops: ["*"]
    decision: deny
    message: "no {op} on {path}"
  - id: git-only
    priority: 5
    paths: [".git/**"]
    ops: ["@write"]
    who: {exe: ["!/usr/bin/git"]}
    decision: deny
  - id: ask-env
    priority: 5
    paths: ["**/.env"]
    ops: [open_read]
    who: {branch: ["agent-*"], uid: ["~10[0-9]{2}"]}
    decision: ask
"""


def test_priority_order_and_callers() -> None:
    e = PolicyEngine(parse_policy(POLICY, "p.yaml", env={}))
    d = e.decide("unlink", "keys/a")
    assert (d.decision, d.rule, d.message) == ("deny", "high", "no unlink on keys/a")
    assert d.errno == 1 and len(d.policy_sha256) == 64
    assert e.decide("unlink", "src/a").decision == "soft_delete"
    assert e.decide("open_read", "src/a").rule is None
    assert e.decide("write", ".git/config", Caller(exe="/usr/bin/python3")).decision == "deny"
    assert e.decide("write", ".git/config", Caller(exe="/usr/bin/git")).decision == "allow"
    assert e.decide("open_read", "x/.env", Caller(branch="agent-1", uid=1001)).decision == "ask"
    assert e.decide("open_read", "x/.env", Caller(branch="agent-1", uid=0)).decision == "allow"
    assert e.decide("open_read", "x/.env", Caller(branch="main", uid=1001)).decision == "allow"


@pytest.mark.parametrize("text,line,reason", [
    ("version: 1\n", 1, "'defaults' section is required"),
    ("version: 2\ndefaults: {read: allow, write: allow}\n", 1, "version: 1 is required"),
    ("version: 1\ndefaults:\n  read: allow\n  write: maybe\n", 4, "unknown decision 'maybe'"),
    ("version: 1\ndefaults: {read: allow, write: allow}\nrules:\n  - id: a\n    paths: [x]\n"
     "    ops: [frobnicate]\n    decision: deny\n", 6, "unknown operation 'frobnicate'"),
    ("version: 1\ndefaults: {read: allow, write: allow}\nrules:\n  - id: a\n    paths: [x]\n"
     "    ops: [stat]\n    decision: deny\n  - id: a\n    paths: [y]\n    ops: [stat]\n"
     "    decision: deny\n", 8, "duplicate rule id 'a'"),
    ("version: 1\ndefaults: {read: allow, write: allow}\nrules:\n  - id: a\n    pathz: [x]\n",
     5, "unknown key 'pathz'"),
    ("version: 1\ndefaults: {read: allow, write: allow}\nrules:\n  - id: a\n    paths: [x]\n"
     "    ops: [stat]\n    decision: deny\n    who: {exe: ['~(']}\n", 8, "bad pattern"),
])
def test_strict_loading_errors(text: str, line: int, reason: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.yaml", env={})
    assert str(exc.value).startswith(f"p.yaml:{line}: ") and reason in str(exc.value)


def test_lint_reports_shadowed_rules() -> None:
    text = """version: 1
defaults: {read: allow, write: allow}
rules:
  - id: broad
    priority: 5
    paths: ["**/*.pem"]
    ops: ["@read"]
    decision: deny
  - id: narrow
    paths: ["keys/*.pem"]
    ops: [open_read]
    decision: ask
  - id: other
    paths: ["keys/*.txt"]
    ops: [open_read]
    decision: ask
"""
    found = shadowed(parse_policy(text, "p.yaml", env={}))
    assert [(b.id, a.id) for b, a in found] == [("narrow", "broad")]
    assert shadowed(default_policy()) == []


def test_default_policy_decisions() -> None:
    e = PolicyEngine(default_policy())
    cases = {("open_read", "home/u/.ssh/id_rsa"): "deny", ("readdir", ".gnupg"): "deny",
             ("open_read", ".aws/credentials"): "deny", ("open_read", "certs/site.pem"): "deny",
             ("rename", "certs/site.pem"): "deny", ("create", "certs/new.pem"): "allow",
             ("open_read", "venv/lib/certifi/cacert.pem"): "allow",
             ("open_read", ".env.example"): "allow",
             ("open_read", ".env"): "deny", ("open_read", "app/.env.production"): "deny",
             ("stat", ".env"): "allow", ("open_read", "src/main.py"): "allow",
             ("unlink", "src/old.py"): "allow"}
    for (op, path), want in cases.items():
        assert e.decide(op, path).decision == want, (op, path)


def test_policy_cli(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    out = run_cli("policy", "check", str(pol), "keys/x", "--op", "open_read", env=env).stdout
    assert "high: matches -> deny" in out and out.strip().endswith("no open_read on keys/x")
    cases = tmp_path / "cases.yaml"
    cases.write_text("- {path: keys/a, op: unlink, expect: deny}\n"
                     "- {path: src/a, op: unlink, expect: soft_delete}\n"
                     "- {path: .git/x, op: write, expect: allow, who: {exe: /usr/bin/git}}\n")
    assert "3/3 cases pass" in run_cli("policy", "test", str(pol), str(cases), env=env).stdout
    cases.write_text("- {path: keys/a, op: unlink, expect: allow}\n")
    res = run_cli("policy", "test", str(pol), str(cases), env=env, check=False)
    assert res.returncode == 1 and "FAIL case 1" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults:\n  read: allow\n  write: allow\n  colour: red\n")
    res = run_cli("policy", "lint", str(bad), env=env, check=False)
    assert res.returncode == 1 and res.stderr.strip() == (
        f"agentfs: {bad}:5: unknown key 'colour' in defaults (known: deny_errno, on_error, "
        "overridable, read, write)")
    assert "version: 1" in run_cli("policy", "default", env=env).stdout
