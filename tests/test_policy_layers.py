"""Policy layers: where they are found, how their answers combine (the precedence
table), reloads, `policy show --effective` and `policy check --layers`, and on a real
mount: the project layer is read from the base, so an agent's edit of it in its
branch changes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mountutil import cli_env, mounted_branch, run_cli

from agentfs.policy.engine import STRENGTH, PolicyEngine, default_policy
from agentfs.policy.layers import LayerSpec, discover, load_layers, tag
from agentfs.policy.loader import PolicyError, parse_policy
from agentfs.policy.source import PolicySource


def layer_text(name: str, rule: str | None = None, *, defaults: str = "read: allow, write: allow",
               extra: str = "") -> str:
    """A policy file with at most one rule, on `x/**` for every operation."""
    text = f"version: 1\nname: {name}\ndefaults: {{{defaults}}}\n{extra}"
    if rule:
        decision, _, flag = rule.partition(" ")
        text += (f"rules:\n  - id: {name}-rule\n    paths: ['x/**']\n    ops: ['*']\n"
                 f"    decision: {decision}\n")
        if flag:
            text += "    overridable: true\n"
    return text


def stack(*layers: tuple[str, str]) -> PolicyEngine:
    return PolicyEngine([tag(origin, parse_policy(text, f"{origin}.yaml"))
                         for origin, text in layers])


# Each row: the layers top first as (origin, rule or None, defaults), then the expected
# decision and the layer that decided. "ask overridable" = a rule marked overridable.
ALLOW_ALL = "read: allow, write: allow"
PRECEDENCE = [
    # a lower layer adds restrictions
    ([("organisation", None, ALLOW_ALL), ("project", "deny", ALLOW_ALL)], "deny", "project"),
    ([("organisation", None, ALLOW_ALL), ("user", None, "read: ask, write: ask")],
     "ask", "user"),
    ([("organisation", "audit", ALLOW_ALL), ("session", "ask", ALLOW_ALL)], "ask", "session"),
    # and cannot relax what is not marked overridable
    ([("organisation", "deny", ALLOW_ALL), ("project", "allow", ALLOW_ALL)],
     "deny", "organisation"),
    ([("organisation", "ask", ALLOW_ALL), ("session", "allow", ALLOW_ALL)],
     "ask", "organisation"),
    ([("organisation", None, "read: ask, write: ask"), ("project", "allow", ALLOW_ALL)],
     "ask", "organisation"),
    # where the upper layer allows it, a lower rule relaxes
    ([("organisation", "ask overridable", ALLOW_ALL), ("project", "allow", ALLOW_ALL)],
     "allow", "project"),
    ([("organisation", "deny overridable", ALLOW_ALL), ("user", "ask", ALLOW_ALL)],
     "ask", "user"),
    ([("organisation", None, "read: ask, write: ask, overridable: true"),
      ("session", "allow", ALLOW_ALL)], "allow", "session"),
    # ...but a lower layer's defaults never relax anything
    ([("organisation", "ask overridable", ALLOW_ALL), ("project", None, ALLOW_ALL)],
     "ask", "organisation"),
    # a relaxed answer can be tightened again further down
    ([("organisation", "ask overridable", ALLOW_ALL), ("project", "allow", ALLOW_ALL),
      ("user", "deny", ALLOW_ALL)], "deny", "user"),
    # relaxing further down needs the relaxing layer's consent too
    ([("organisation", "ask overridable", ALLOW_ALL), ("project", "audit", ALLOW_ALL),
      ("session", "allow", ALLOW_ALL)], "audit", "project"),
    ([("organisation", "ask overridable", ALLOW_ALL), ("project", "audit overridable",
                                                       ALLOW_ALL),
      ("session", "allow", ALLOW_ALL)], "allow", "session"),
    # ...and never below a final answer further up (found by the property test below:
    # the middle layer's overridable deny relaxed by a rule below the top's final ask)
    ([("organisation", None, "read: ask, write: ask"),
      ("project", None, "read: deny, write: deny, overridable: true"),
      ("user", "allow", ALLOW_ALL)], "ask", "organisation"),
    # equal strength keeps the upper answer
    ([("organisation", "audit", ALLOW_ALL), ("project", "soft_delete", ALLOW_ALL)],
     "audit", "organisation"),
    # nobody says anything: the defaults of all, the first of the equally strict
    ([("organisation", None, ALLOW_ALL), ("project", None, ALLOW_ALL)],
     "allow", "organisation"),
]


@pytest.mark.parametrize(("layers", "expect", "origin"), PRECEDENCE)
def test_precedence_table(layers: list[tuple[str, str | None, str]], expect: str,
                          origin: str) -> None:
    engine = stack(*[(o, layer_text(o, rule, defaults=d)) for o, rule, d in layers])
    for op in ("open_read", "unlink"):
        got = engine.decide(op, "x/file")
        assert (got.decision, got.origin) == (expect, origin), (op, layers)
        again = engine.explain(op, "x/file")
        assert (again.decision, again.origin) == (expect, origin)
    # outside x/** only the defaults speak, and defaults never relax: the strictest
    outside = engine.decide("open_read", "y/file")
    reads = [d.split("read: ")[1].split(",")[0] for _, _, d in layers]
    assert outside.decision == max(reads, key=lambda r: STRENGTH[r])


def test_trace_says_why_a_relaxation_was_refused() -> None:
    engine = stack(("organisation", layer_text("org", "deny")),
                   ("project", layer_text("proj", "allow")))
    d = engine.explain("open_read", "x/a")
    assert "[organisation] org-rule: matches -> deny" in d.trace
    assert ("[project] allow cannot relax deny: [organisation] did not mark it "
            "overridable") in d.trace
    assert d.rule == "org-rule" and d.decision == "deny"


def test_a_message_and_errno_come_from_the_deciding_layer() -> None:
    org = layer_text("org", defaults="read: allow, write: allow, deny_errno: EPERM")
    proj = ("version: 1\nname: proj\ndefaults: {read: allow, write: allow, deny_errno: "
            "ENOENT}\nrules:\n  - {id: hide, paths: ['x/**'], ops: ['*'], decision: deny,"
            " message: 'hidden {path}'}\n")
    d = stack(("organisation", org), ("project", proj)).decide("stat", "x/a")
    assert (d.decision, d.errno, d.message, d.origin) == ("deny", 2, "hidden x/a", "project")


def test_approval_settings_combine_to_the_strictest() -> None:
    org = layer_text("org", extra="approval: {timeout: 30s, remember: process}\n")
    user = layer_text("user", extra="approval: {timeout: 90s, on_timeout: deny, "
                                    "remember: once, max_pending: 2}\n")
    session = layer_text("session")  # no approval section: no say
    a = stack(("organisation", org), ("user", user), ("session", session)).policy.approval
    assert (a.timeout, a.on_timeout, a.remember, a.max_pending) == (30.0, "deny", "once", 2)


def test_one_layer_keeps_its_own_sha256() -> None:
    """Audit records of a single-file mount name that file's sha256, as before layers."""
    text = layer_text("only", "deny")
    policy = parse_policy(text, "only.yaml")
    assert stack(("session", text)).policy.sha256 == policy.sha256
    two = stack(("organisation", text), ("session", text)).policy.sha256
    assert two != policy.sha256 and len(two) == 64


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    base = tmp_path / "base"
    base.mkdir()
    return {"base": base, "org": tmp_path / "etc/org.yaml",
            "config": tmp_path / "config", "session": tmp_path / "session.yaml"}


def env_for(places: dict[str, Path]) -> dict[str, str]:
    return {"AGENTFS_ORG_POLICY": str(places["org"]), "XDG_CONFIG_HOME": str(places["config"]),
            "HOME": "/nonexistent"}


def test_discovery_finds_each_layer_where_documented(places: dict[str, Path]) -> None:
    specs = discover(str(places["base"]), str(places["session"]), env_for(places))
    assert [(s.origin, s.path) for s in specs] == [
        ("organisation", str(places["org"])),
        ("project", str(places["base"] / ".agentfs/policy.yaml")),
        ("user", str(places["config"] / "agentfs/policy.yaml")),
        ("session", str(places["session"]))]
    no_xdg = discover(None, None, {"HOME": "/home/someone"})
    assert [(s.origin, s.path) for s in no_xdg] == [
        ("organisation", "/etc/agentfs/policy.yaml"),
        ("user", "/home/someone/.config/agentfs/policy.yaml")]


def test_absent_layers_are_skipped_and_none_means_the_builtin(places: dict[str, Path]
                                                              ) -> None:
    specs = discover(str(places["base"]), None, env_for(places))
    layers = load_layers(specs, default_policy())
    assert [layer.origin for layer in layers] == ["builtin"]
    assert layers[0].policy.sha256 == default_policy().sha256
    write(places["config"] / "agentfs/policy.yaml", layer_text("mine", "deny"))
    write(places["base"] / ".agentfs/policy.yaml", layer_text("proj"))
    layers = load_layers(specs, default_policy())
    assert [layer.origin for layer in layers] == ["project", "user"]
    assert all(rule.origin == "user" for rule in layers[1].policy.rules)


def test_a_named_session_file_must_exist(places: dict[str, Path]) -> None:
    specs = discover(None, str(places["session"]), env_for(places))
    with pytest.raises(PolicyError, match="the session policy file does not exist"):
        load_layers(specs, default_policy())


def test_a_broken_layer_is_an_error_not_an_absent_layer(places: dict[str, Path]) -> None:
    write(places["org"], "version: 1\ndefaults: {read: allow, write: allow}\nrules: [\n")
    specs = discover(None, None, env_for(places))
    with pytest.raises(PolicyError, match=rf"^{places['org']}:\d+: not valid YAML"):
        load_layers(specs, default_policy())
    places["org"].unlink()
    places["org"].mkdir()
    with pytest.raises(PolicyError, match="cannot read the organisation policy"):
        load_layers(specs, default_policy())


@pytest.mark.parametrize("planted", ["file", "directory"])
def test_the_project_layer_follows_no_symlink(places: dict[str, Path], tmp_path: Path,
                                              planted: str) -> None:
    elsewhere = write(tmp_path / "elsewhere/policy.yaml", layer_text("elsewhere"))
    agentfs_dir = places["base"] / ".agentfs"
    if planted == "file":
        agentfs_dir.mkdir()
        (agentfs_dir / "policy.yaml").symlink_to(elsewhere)
    else:
        agentfs_dir.symlink_to(elsewhere.parent)
    specs = discover(str(places["base"]), None, env_for(places))
    with pytest.raises(PolicyError, match="project policy"):
        load_layers(specs, default_policy())


def test_reload_sees_a_layer_appear_and_keeps_the_stack_when_one_breaks(
        places: dict[str, Path]) -> None:
    source = PolicySource(discover(str(places["base"]), None, env_for(places)))
    assert [layer.origin for layer in source.engine.layers] == ["builtin"]
    assert not source.changed()
    project = write(places["base"] / ".agentfs/policy.yaml", layer_text("proj", "deny"))
    assert source.changed()
    ok, sha = source.reload()
    assert ok and [layer.origin for layer in source.engine.layers] == ["project"]
    assert source.engine.decide("open_read", "x/a").decision == "deny"
    project.write_text("version: 1\nrules: {}\n")
    ok, reason = source.reload()
    assert not ok and reason.startswith(f"{project}:")
    assert source.sha256 == sha and source.engine.decide("open_read", "x/a").decision == "deny"
    assert source.describe()["last_error"] == reason


def test_a_session_policy_replaces_only_the_session_layer(places: dict[str, Path],
                                                          tmp_path: Path) -> None:
    write(places["org"], layer_text("org", "deny"))
    mount = PolicySource(discover(None, str(write(places["session"], layer_text("s1"))),
                                  env_for(places)))
    other = mount.for_session(str(write(tmp_path / "s2.yaml", layer_text("s2"))))
    assert [layer.policy.name for layer in mount.engine.layers] == ["org", "s1"]
    assert [layer.policy.name for layer in other.engine.layers] == ["org", "s2"]


# -- the CLI --------------------------------------------------------------------------
def cli_places(places: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    env = cli_env(tmp_path / "home")
    env.update(env_for(places))
    return env


def test_policy_show_and_check_with_layers(places: dict[str, Path], tmp_path: Path) -> None:
    env = cli_places(places, tmp_path)
    write(places["org"], layer_text("org", "ask overridable"))
    write(places["base"] / ".agentfs/policy.yaml", layer_text("proj", "allow"))
    base = str(places["base"])
    plain = run_cli("policy", "show", "--base", base, env=env).stdout
    assert f"organisation  {places['org']}: org (sha256 " in plain
    assert f"project       {base}/.agentfs/policy.yaml: proj (sha256 " in plain
    assert f"user          {places['config']}/agentfs/policy.yaml: not present" in plain
    eff = run_cli("policy", "show", "--base", base, "--effective", env=env).stdout
    assert "1. organisation: org from" in eff and "2. project: proj from" in eff
    assert f"org-rule: ask * on x/** (overridable)  <- {places['org']}:5" in eff
    data = json.loads(run_cli("policy", "show", "--base", base, "--json", env=env).stdout)
    rules = [(r["id"], r["origin"]) for layer in data["effective"]["layers"]
             for r in layer["rules"]]
    assert rules == [("org-rule", "organisation"), ("proj-rule", "project")]
    checked = run_cli("policy", "check", "none", "x/a", "--op", "open_read", "--layers",
                      "--base", base, env=env).stdout
    assert "[project] relaxes ask to allow" in checked
    assert checked.strip().endswith("allow (rule proj-rule from the project layer)")
    as_json = json.loads(run_cli("policy", "check", "none", "y/a", "--op", "unlink",
                                 "--layers", "--base", base, "--json", env=env).stdout)
    assert (as_json["decision"], as_json["origin"], as_json["rule"]) == (
        "allow", "organisation", None)


def test_policy_show_reports_a_broken_layer_in_one_line(places: dict[str, Path],
                                                        tmp_path: Path) -> None:
    env = cli_places(places, tmp_path)
    write(places["config"] / "agentfs/policy.yaml", "version: 1\nname: x\n")
    res = run_cli("policy", "show", "--base", str(places["base"]), env=env, check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (f"agentfs: {places['config']}/agentfs/policy.yaml:1: "
                                  "a 'defaults' section is required (read, write, ...)")


# -- on a real mount --------------------------------------------------------------------
PROJECT = """\
version: 1
name: project-rules
defaults: {read: allow, write: allow}
rules:
  - id: no-secret
    paths: ["secret.txt"]
    ops: ["@read"]
    decision: deny
"""
RELAXED = PROJECT.replace("decision: deny", "decision: allow")


@pytest.mark.mount
def test_mount_enforces_the_project_layer_from_the_base_not_the_branch(
        places: dict[str, Path], tmp_path: Path) -> None:
    base = places["base"]
    write(base / ".agentfs/policy.yaml", PROJECT)
    (base / "secret.txt").write_text("s3cret\n")
    write(places["org"], layer_text("org", defaults="read: allow, write: allow"))
    env = cli_places(places, tmp_path)
    with mounted_branch(base, tmp_path / "w", env=env, impl="kernel") as mb:
        mnt = mb.mountpoint
        with pytest.raises(PermissionError):
            (mnt / "secret.txt").read_text()
        # the agent rewrites the project policy in its branch: the view shows its edit...
        (mnt / ".agentfs/policy.yaml").write_text(RELAXED)
        assert (mnt / ".agentfs/policy.yaml").read_text() == RELAXED
        mb.cli("policy", "reload", str(mnt))
        # ...but the rules come from the base, which the branch never writes
        with pytest.raises(PermissionError):
            (mnt / "secret.txt").read_text()
        assert (base / ".agentfs/policy.yaml").read_text() == PROJECT
        shown = json.loads(mb.cli("policy", "show", str(mnt), "--json").stdout)
        assert [layer["origin"] for layer in shown["mount"]["layers"]] == [
            "organisation", "project"]
        eff = mb.cli("policy", "show", str(mnt), "--effective").stdout
        assert f"no-secret: deny @read on secret.txt  <- {base}/.agentfs/policy.yaml:5" in eff
        # a person changing the base's file (what a commit does) changes the rules
        (base / ".agentfs/policy.yaml").write_text(RELAXED)
        mb.cli("policy", "reload", str(mnt))
        assert (mnt / "secret.txt").read_text() == "s3cret\n"


@pytest.mark.mount
def test_mount_refuses_to_start_on_a_broken_layer(places: dict[str, Path],
                                                  tmp_path: Path) -> None:
    write(places["org"], "version: 1\ndefaults: {read: maybe, write: allow}\n")
    env = cli_places(places, tmp_path)
    store = tmp_path / "store"
    run_cli("init", str(places["base"]), "--store", str(store), env=env)
    run_cli("--store", str(store), "branch", "create", "b", env=env)
    (tmp_path / "mnt").mkdir()
    res = run_cli("--store", str(store), "mount", str(tmp_path / "mnt"), "--branch", "b",
                  env=env, check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith(f"agentfs: {places['org']}:2: unknown decision "
                                         "'maybe'")
    assert not os.path.ismount(tmp_path / "mnt")


def test_layer_spec_paths_are_absolute_for_the_session(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    specs = discover(None, "rel.yaml", {})
    assert specs[-1] == LayerSpec("session", str(tmp_path / "rel.yaml"), required=True)


def test_committing_a_project_policy_change_says_so(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from cliutil import invoke

    from agentfs.branches.store import Store
    from agentfs.mount.view import open_branch_view

    base = tmp_path / "base"
    write(base / ".agentfs/policy.yaml", PROJECT)
    (base / "other.txt").write_text("x\n")
    home = tmp_path / "home"
    monkeypatch.setenv("AGENTFS_HOME", str(home))
    store = Store.create(base, tmp_path / "store")
    for name, path in (("edits-policy", ".agentfs/policy.yaml"), ("plain", "other.txt")):
        store.create_branch(name)
        ov = open_branch_view(store, name)
        fh = ov.open(path, os.O_WRONLY | os.O_TRUNC)
        ov.write(fh, 0, RELAXED.encode())
        ov.release(fh)
        ov.close()
    store.close()
    dry = invoke("branch", "commit", "edits-policy", "--dry-run", home=home,
                 store=tmp_path / "store")
    assert dry.code == 0 and (
        "note: this would change the project policy .agentfs/policy.yaml (M); mounts of "
        "this base enforce it from their next start or `agentfs policy reload` (review "
        "it: agentfs branch diff edits-policy .agentfs/policy.yaml)") in dry.stderr
    done = invoke("branch", "commit", "edits-policy", home=home, store=tmp_path / "store")
    assert done.code == 0 and "note: this changed the project policy" in done.stderr
    assert (base / ".agentfs/policy.yaml").read_text() == RELAXED
    other = invoke("branch", "commit", "plain", home=home, store=tmp_path / "store")
    assert other.code == 0 and "project policy" not in other.stderr


# -- properties of the combination, over random stacks ----------------------------------


DECISIONS = ["allow", "deny", "ask", "audit", "soft_delete"]
GLOBS = ["x/**", "x/a", "**/a", "y/**"]
rules_st = st.lists(st.tuples(st.sampled_from(GLOBS), st.sampled_from(DECISIONS),
                              st.booleans(), st.integers(0, 2)), max_size=3)
layer_st = st.tuples(st.sampled_from(DECISIONS), st.sampled_from(DECISIONS), st.booleans(),
                     rules_st)


def random_layer(n: int, spec: tuple[str, str, bool, list[tuple[str, str, bool, int]]]
                 ) -> str:
    read, write, overridable, rules = spec
    text = (f"version: 1\nname: l{n}\ndefaults: {{read: {read}, write: {write}, "
            f"overridable: {str(overridable).lower()}}}\nrules:\n")
    for i, (glob, decision, over, prio) in enumerate(rules):
        text += (f"  - {{id: r{n}-{i}, paths: ['{glob}'], ops: ['*'], decision: {decision},"
                 f" overridable: {str(over).lower()}, priority: {prio}}}\n")
    return text if rules else text.replace("rules:\n", "")


ORIGINS = ["organisation", "project", "user", "session"]


@settings(max_examples=300, deadline=None)
@given(st.lists(layer_st, min_size=1, max_size=4), st.sampled_from(["x/a", "y/b", "z/a"]),
       st.sampled_from(["open_read", "unlink"]))
def test_combination_properties(specs: list[tuple[str, str, bool, list[tuple[str, str,
                                                                               bool, int]]]],
                                path: str, op: str) -> None:
    texts = [(ORIGINS[i], random_layer(i, spec)) for i, spec in enumerate(specs)]
    engine = stack(*texts)
    got = engine.decide(op, path)
    alone = [stack(t).decide(op, path) for t in texts]
    # the answer is one layer's own answer, and explain agrees with decide
    assert (got.decision, got.rule) in {(a.decision, a.rule) for a in alone}
    assert got.origin in ORIGINS[:len(specs)]
    explained = engine.explain(op, path)
    assert (explained.decision, explained.rule, explained.origin) == (
        got.decision, got.rule, got.origin)
    # the hot path's pre-check never calls a restricted request allowed
    if not engine.may_restrict(op, path):
        assert got.decision == "allow"
    # nothing marked overridable: the strictest answer of all layers decides
    if not any(over for _, _, over, rules in specs) and not any(
            r[2] for _, _, _, rules in specs for r in rules):
        assert STRENGTH[got.decision] == max(STRENGTH[a.decision] for a in alone)
    # a layer below can only loosen an answer marked overridable: whatever a layer
    # answered without the mark, the result is at least that strict
    for layer, own in zip(engine.layers, alone, strict=True):
        rule = next((r for r in layer.policy.rules if r.id == own.rule), None)
        final = not (rule.overridable if rule else layer.policy.defaults.overridable)
        if final:
            assert STRENGTH[got.decision] >= STRENGTH[own.decision], (layer.origin, own)
    # a bottom layer of defaults only never loosens anything
    extra = stack(*texts, ("session2", layer_text("tail", defaults="read: allow, write: allow"
                                                   ))).decide(op, path)
    assert STRENGTH[extra.decision] >= STRENGTH[got.decision]


def test_the_pre_check_counts_rules_that_depend_on_the_caller() -> None:
    text = ("version: 1\ndefaults: {read: allow, write: allow}\nrules:\n"
            "  - {id: not-make, paths: ['x/**'], ops: [stat], decision: deny,"
            " who: {exe: ['!/usr/bin/make']}}\n")
    engine = stack(("session", text))
    assert engine.may_restrict("stat", "x/a") and not engine.may_restrict("stat", "y/a")
    assert not engine.may_restrict("unlink", "x/a")  # no rule restricts unlink


def test_include_default_keeps_the_builtin_protections_relaxable(places: dict[str, Path]
                                                                 ) -> None:
    """An organisation file with a rule of its own would otherwise drop the built-in
    secrets protection; `include_default: true` keeps it, above the including layer and
    relaxable by an explicit rule below."""
    write(places["org"], layer_text("org", "deny", extra="include_default: true\n"))
    project = ("version: 1\nname: proj\ndefaults: {read: allow, write: allow}\nrules:\n"
               "  - {id: tests-env, paths: ['tests/.env'], ops: ['@read'], decision: allow}\n")
    write(places["base"] / ".agentfs/policy.yaml", project)
    engine = PolicySource(discover(str(places["base"]), None, env_for(places))).engine
    assert [layer.origin for layer in engine.layers] == ["builtin", "organisation", "project"]
    assert engine.decide("open_read", "home/.ssh/id_ed25519").rule == "deny-ssh-gnupg"
    assert engine.decide("open_read", "src/.env").decision == "deny"
    relaxed = engine.decide("open_read", "tests/.env")
    assert (relaxed.decision, relaxed.rule, relaxed.origin) == ("allow", "tests-env", "project")
    assert engine.decide("open_read", "x/a").rule == "org-rule"  # the org's own rule
    shown = run_cli("policy", "show", "--base", str(places["base"]),
                    env=cli_places(places, places["base"].parent)).stdout
    assert "builtin       the built-in default (included by a layer file" in shown
    write(places["org"], layer_text("org", "deny"))
    plain = PolicySource(discover(str(places["base"]), None, env_for(places))).engine
    assert [layer.origin for layer in plain.layers] == ["organisation", "project"]
    assert plain.decide("open_read", "src/.env").decision == "allow"


_SEGMENTS = ["src", "a.py", ".ssh", "id_rsa", "x.pem", "k.key", ".env", ".env.local", ".aws",
             "credentials", ".config", "gcloud", "vault3", "private-3", "f.secret1", "..",
             ".", "", "build3", "docs5", "n.md", "cacert.pem", "v.pem.bak"]
_BIG_POLICY = (
    "version: 1\ndefaults: {read: allow, write: allow}\nrules:\n"
    "  - {id: v, paths: ['vault3/**', '**/private-3/**'], ops: ['*'], decision: deny}\n"
    "  - {id: s, paths: ['**/*.secret1'], ops: ['@read'], decision: deny}\n"
    "  - {id: b, paths: ['build3/**'], ops: ['@destructive'], decision: deny,"
    " who: {exe: ['!/usr/bin/make']}}\n"
    "  - {id: d, paths: ['docs5/**/*.md'], ops: ['@write'], decision: allow}\n"
    "  - {id: w, paths: ['**/w?ld/*'], ops: ['stat'], decision: audit}\n")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=5),
       st.sampled_from(["stat", "open_read", "unlink", "rename", "read"]),
       st.booleans())
def test_the_pre_check_by_last_segment_agrees_with_the_whole_path(
        segs: list[str], op: str, big: bool) -> None:
    """may_restrict looks only at a path's last segment once its directory is known to
    be quiet: that shortcut must answer as the check of the whole path does."""
    engine = (stack(("project", _BIG_POLICY), ("user", layer_text("u"))) if big
              else PolicyEngine(default_policy()))
    path = "/".join(segs)
    assert engine.may_restrict(op, path) == engine._may_restrict(op, path), path
