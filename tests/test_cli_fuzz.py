"""Hypothesis drives the CLI with random command lines: random commands, option names
and junk (text, undecodable bytes as surrogate escapes, very long strings).  Whatever it
gets, agentfs answers with an exit status from the documented set, never a traceback
and never an internal error, and a failure says what went wrong in one line.

Runs in-process (tests/cliutil.py), against a real store with two branches, a store
that does not exist, or none at all.  Commands that would really mount, sandbox or
fork (mount, run, exec, bind) only ever get the missing store, so they fail before
they start anything; `audit tail --follow` never ends, so it is not generated.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from cliutil import invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentfs.branches.store import Store
from agentfs.cli.main import app
from agentfs.errors import EXIT_CODES, EXIT_INTERNAL


@dataclass
class Spec:
    """What a command takes: its positional arguments (name, nargs) and options."""

    arguments: list[tuple[str, int]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)     # options without a value
    options: list[str] = field(default_factory=list)   # options that take a value
    required: bool = False                             # some argument must be given

    @property
    def names(self) -> list[str]:
        return self.flags + self.options


def _commands() -> dict[tuple[str, ...], Spec]:
    """Every command of the app (walked from Typer, so new ones are covered)."""
    out: dict[tuple[str, ...], Spec] = {}

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            out[path] = Spec()  # a group alone: "missing command"
            for name, sub in subs.items():
                walk(sub, (*path, name))
            return
        spec = out[path] = Spec()
        for p in getattr(cmd, "params", []):
            names = [o for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]
            if not names:
                spec.arguments.append((p.name, p.nargs))
                spec.required |= bool(p.required)
            elif getattr(p, "is_flag", False):
                spec.flags += names
            else:
                spec.options += names

    walk(typer.main.get_command(app), ())
    return out


COMMANDS = _commands()
NEEDS_MISSING_STORE = {("mount",), ("run",), ("exec",), ("bind",)}
ALL_OPTIONS = sorted({o for spec in COMMANDS.values() for o in spec.names} | {"--help"})

junk_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                    max_size=30)
undecodable = st.binary(min_size=1, max_size=40).map(os.fsdecode)  # surrogate escapes
long_strings = st.sampled_from([255, 256, 1000, 4097, 20000]).flatmap(
    lambda n: st.sampled_from(string.ascii_letters + "/.-").map(lambda c: c * n))


def _safe(token: str) -> str:
    """Junk stays inside the test's directory: no absolute path, no `~`, and never
    `--store` (that is the test's to choose)."""
    if token.startswith(("/", "~")):
        token = "." + token
    if token == "--store" or token.startswith("--store="):
        token = "--stor"
    return token


VALUES = st.one_of(
    st.sampled_from(["main", "feature", "nope", "", "-", "--", ".", "..", "0", "-1", "1",
                     "99999999999999999999", "7d", "15m", "5GiB", "x1", "default", "jsonl",
                     "once", "session", "always", "open_read", "base", "exists-dir",
                     "exists-file", "missing/path", "file.txt", "1-1", "*", "[", "true"]),
    junk_text, undecodable, long_strings)


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[str, list[str]]:
    """Mostly well-formed lines (each argument and option value in place, drawn from
    names that exist, names that do not, and junk), some of them mangled."""
    path = draw(st.sampled_from(sorted(COMMANDS)))
    spec = COMMANDS[path]
    store_kind = draw(st.sampled_from(["real", "real", "real", "missing", "none"]))
    if path in NEEDS_MISSING_STORE:
        store_kind = "missing"
    args: list[str] = []
    for name in draw(st.lists(st.sampled_from(spec.names), max_size=4)) if spec.names else []:
        args.append(name)
        if name in spec.options:
            args.append(draw(VALUES))
    for _name, nargs in spec.arguments:
        count = draw(st.integers(1, 3)) if nargs == -1 else nargs
        args += (["--"] if nargs == -1 else []) + [draw(VALUES) for _ in range(count)]
    mangle = draw(st.sampled_from(["none", "none", "none", "drop", "add", "shuffle"]))
    if mangle == "drop" and args:
        del args[draw(st.integers(0, len(args) - 1))]
    elif mangle == "add":
        extra = st.one_of(st.sampled_from([*ALL_OPTIONS, "--bogus", "-Z", "--json=1"]), VALUES)
        args.insert(draw(st.integers(0, len(args))), draw(extra))
    elif mangle == "shuffle":
        args = draw(st.permutations(args))
    args = [_safe(a) for a in args]
    if path == ("audit", "tail"):
        args = [a for a in args if a not in ("-f", "--follow")]
    return store_kind, [*path, *args]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    base = root / "base"
    base.mkdir()
    (base / "file.txt").write_text("hello\n")
    (root / "cwd" / "exists-dir").mkdir(parents=True)
    (root / "cwd" / "exists-file").write_text("x")
    (root / "home").mkdir()
    os.environ["AGENTFS_HOME"] = str(root / "home")  # Store.create registers the base
    try:
        store = Store.create(base, root / "store")
        store.create_branch("main")
        store.create_branch("feature", from_branch="main")
        store.close()
    finally:
        del os.environ["AGENTFS_HOME"]
    return root


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(line=command_lines())
def test_random_command_lines(world: Path, line: tuple[str, list[str]]) -> None:
    store_kind, argv = line
    store = {"real": world / "store", "missing": world / "no-store", "none": None}[store_kind]
    res = invoke(*argv, home=world / "home", store=store, cwd=world / "cwd")
    context = f"agentfs {argv!r} (store: {store_kind}) -> {res.code}\n{res.stderr}"
    assert "Traceback" not in res.stderr, context
    assert res.code in EXIT_CODES, context
    assert res.code != EXIT_INTERNAL, context
    if res.code != 0:
        assert len(res.err_lines) == 1, context
        assert res.err_lines[0].startswith("agentfs"), context


def test_every_command_is_generated() -> None:
    """The generator reaches every command (so a new one cannot escape the fuzzing)."""
    assert ("branch", "create") in COMMANDS and ("audit", "tail") in COMMANDS
    assert len([p for p in COMMANDS if p]) >= 30
