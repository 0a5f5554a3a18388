"""Where the policy layers live and how they are read.

A mount enforces a stack of policy files, top (most authoritative) first:

    organisation  $AGENTFS_ORG_POLICY, else /etc/agentfs/policy.yaml
    project       <base>/.agentfs/policy.yaml, read from the base directory itself
    user          $XDG_CONFIG_HOME/agentfs/policy.yaml (~/.config/...; the invoking
                  user's under sudo)
    session       the file given with --policy

The project file is read from the base, never through a branch, so an agent cannot
edit the rules it runs under: a change it makes there takes effect only once a person
commits it. It is opened without following symlinks (a link planted in the base must
not pull a policy from elsewhere). Missing organisation, project and user files are
simply absent layers; a file that exists but cannot be read or parsed is an error
(failing closed: a broken organisation policy must not silently vanish). When no file
is found at all, the built-in default policy is the one layer; a file with
`include_default: true` keeps it: the default goes in as a layer right above the
(topmost) including one, every rule of it marked overridable, so its protections stay
unless a rule of a layer below relaxes one explicitly. How the layers' answers combine
is the engine's business (agentfs/policy/engine.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace

from agentfs.overlay.hostio import read_all
from agentfs.policy.loader import PolicyError, parse_policy
from agentfs.policy.model import Layer, Policy

ORDER = ("organisation", "project", "user", "session")
ORG_POLICY_ENV = "AGENTFS_ORG_POLICY"
ORG_POLICY_PATH = "/etc/agentfs/policy.yaml"
PROJECT_POLICY = (".agentfs", "policy.yaml")
_MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class LayerSpec:
    """Where one layer's file is looked for."""

    origin: str
    path: str
    base: str | None = None      # project: the base directory it is read from
    required: bool = False       # session: named on the command line, so must exist


def user_policy_path(environ: Mapping[str, str] = os.environ) -> str:
    """The user's own layer; under sudo, the invoking user's, not root's."""
    config = environ.get("XDG_CONFIG_HOME")
    if not config:
        home = environ.get("HOME") or os.path.expanduser("~")
        sudo_user = environ.get("SUDO_USER")
        if os.geteuid() == 0 and sudo_user:
            with contextlib.suppress(KeyError):
                home = pwd.getpwnam(sudo_user).pw_dir
        config = os.path.join(home, ".config")
    return os.path.join(config, "agentfs", "policy.yaml")


def discover(base: str | None, session_path: str | None,
             environ: Mapping[str, str] = os.environ) -> tuple[LayerSpec, ...]:
    """The layers a mount of *base* with `--policy session_path` looks for, top first."""
    specs = [LayerSpec("organisation", environ.get(ORG_POLICY_ENV) or ORG_POLICY_PATH)]
    if base:
        specs.append(LayerSpec("project", os.path.join(base, *PROJECT_POLICY), base=base))
    specs.append(LayerSpec("user", user_policy_path(environ)))
    if session_path:
        specs.append(LayerSpec("session", os.path.abspath(session_path), required=True))
    return tuple(specs)


def with_session(specs: tuple[LayerSpec, ...], session_path: str) -> tuple[LayerSpec, ...]:
    """The same stack with its session layer replaced (a session's own `--policy`)."""
    kept = tuple(s for s in specs if s.origin != "session")
    return (*kept, LayerSpec("session", os.path.abspath(session_path), required=True))


def signature(spec: LayerSpec) -> tuple[int, int, int, int] | None:
    """What changes when the file does (None: absent), for reload-on-change."""
    try:
        st = os.lstat(spec.path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def read_text(spec: LayerSpec) -> str | None:
    """The layer file's text, or None when an optional layer is absent."""
    try:
        if spec.base is not None:
            data = _read_below(spec.base, PROJECT_POLICY)
        else:
            data = _read_fd(os.open(spec.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno == errno.ENOENT and not spec.required:
            return None
        if exc.errno == errno.ENOENT:
            raise PolicyError(f"{spec.path}: the {spec.origin} policy file does not exist"
                              ) from None
        if exc.errno == errno.ELOOP:
            raise PolicyError(f"{spec.path}: the {spec.origin} policy must be a regular "
                              "file, not a symlink") from None
        raise PolicyError(f"{spec.path}: cannot read the {spec.origin} policy: "
                          f"{exc.strerror}") from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise PolicyError(f"{spec.path}:1: the {spec.origin} policy is not UTF-8 text"
                          ) from None


def _read_below(base: str, parts: tuple[str, ...]) -> bytes:
    """Read base/parts... following no symlink on the way (dirfd-relative opens)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nxt
        return _read_fd(os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                | os.O_CLOEXEC, dir_fd=fd))
    finally:
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > _MAX_BYTES:
            raise OSError(errno.EFBIG, f"larger than {_MAX_BYTES >> 20} MiB")
        return read_all(fd, 1 << 16)
    finally:
        os.close(fd)


def load_layers(specs: tuple[LayerSpec, ...], fallback: Policy) -> tuple[Layer, ...]:
    """Every layer that exists, top first, each rule tagged with its origin; the
    *fallback* (the built-in default) alone when none does."""
    layers = []
    for spec in specs:
        text = read_text(spec)
        if text is None:
            continue
        policy = parse_policy(text, spec.path)
        layers.append(tag(spec.origin, policy))
    if not layers:
        return (tag("builtin", fallback),)
    including = [i for i, layer in enumerate(layers) if layer.policy.include_default]
    if including:
        relaxable = replace(fallback, rules=tuple(replace(r, overridable=True)
                                                  for r in fallback.rules),
                            defaults=replace(fallback.defaults, overridable=True))
        layers.insert(including[0], tag("builtin", relaxable))
    return tuple(layers)


def tag(origin: str, policy: Policy) -> Layer:
    return Layer(origin, replace(policy, rules=tuple(replace(r, origin=origin)
                                                     for r in policy.rules)))
