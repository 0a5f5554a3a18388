"""Which Mach services a command under `agentfs run` on macOS may look up.

On macOS much of what a process can do goes through Mach services, not files: posting
keyboard and mouse events (the WindowServer, the HID event system), asking for an
administrator's password (authd, the SecurityAgent), driving other applications with
Apple Events, accessibility.  The Seatbelt profile therefore lists the services it
allows, in five settings:

    default_action   allow | deny: what a service matched by no list gets
    allow            exact names allowed (default: what compilers, interpreters and
                     git need: logging, notifications, user lookups, preferences,
                     system configuration, certificate trust)
    block            exact names denied (default: input injection, authorization
                     dialogs, Apple Events, privacy consent, accessibility)
    allow_prefixes   name prefixes allowed
    block_prefixes   name prefixes denied (default: the WindowServer's services)

Precedence, most specific first: an exact name beats a prefix, and at the same
specificity a block beats an allow (a name in both exact lists is refused as
ambiguous).  Seatbelt's last matching rule wins, so the rules are emitted in reverse
order of precedence: the default, allowed prefixes, blocked prefixes, allowed names,
blocked names.

The settings come from `<agentfs home>/seatbelt.yaml` (key `mach_lookup`) when it
exists; a list given there replaces that list's default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from agentfs.errors import UsageError

DEFAULT_ALLOW = ("com.apple.system.logger", "com.apple.system.notification_center",
                 "com.apple.system.opendirectoryd.libinfo",
                 "com.apple.system.opendirectoryd.membership", "com.apple.cfprefsd.daemon",
                 "com.apple.cfprefsd.agent", "com.apple.SystemConfiguration.configd",
                 "com.apple.trustd", "com.apple.trustd.agent", "com.apple.SecurityServer",
                 "com.apple.logd", "com.apple.diagnosticd", "com.apple.lsd.mapdb",
                 "com.apple.coreservices.launchservicesd")
DEFAULT_BLOCK = ("com.apple.iohideventsystem",          # synthetic keyboard/mouse events
                 "com.apple.authd",                      # authorization (password) dialogs
                 "com.apple.security.authhost",
                 "com.apple.coreservices.appleevents",   # Apple Events to other apps
                 "com.apple.tccd", "com.apple.tccd.system",  # privacy consent prompts
                 "com.apple.universalaccessd")           # accessibility control
DEFAULT_BLOCK_PREFIXES = ("com.apple.windowserver",      # CGEventPost and screen capture
                          "com.apple.SecurityAgent")     # the password dialog itself
ACTIONS = ("allow", "deny")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*\Z")


@dataclass(frozen=True)
class MachLookup:
    default_action: str = "deny"
    allow: tuple[str, ...] = DEFAULT_ALLOW
    block: tuple[str, ...] = DEFAULT_BLOCK
    allow_prefixes: tuple[str, ...] = ()
    block_prefixes: tuple[str, ...] = DEFAULT_BLOCK_PREFIXES

    def __post_init__(self) -> None:
        if self.default_action not in ACTIONS:
            raise UsageError(f"mach_lookup default_action must be allow or deny, not "
                             f"{self.default_action!r}")
        for f in fields(self):
            if f.name != "default_action":
                for name in getattr(self, f.name):
                    if not _NAME.match(name):
                        raise UsageError(f"mach_lookup {f.name}: {name!r} is not a Mach "
                                         "service name (letters, digits, . _ @ -)")
        both = sorted(set(self.allow) & set(self.block))
        if both:
            raise UsageError(f"mach_lookup: {', '.join(both)} both allowed and blocked")


def from_mapping(data: Mapping[str, Any], where: str = "mach_lookup") -> MachLookup:
    """Settings from a parsed mapping; lists not given keep their defaults."""
    known = {f.name for f in fields(MachLookup)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: "
                         f"{', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "default_action":
            values[key] = str(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            values[key] = tuple(value)
        else:
            raise UsageError(f"{where}: {key} must be a list of service names")
    return MachLookup(**values)


def load(path: Path) -> MachLookup:
    """`mach_lookup` from a YAML file; the defaults if the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return MachLookup()
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}{line}: not valid YAML") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("mach_lookup", {}), dict):
        raise UsageError(f"{path}: expected a mapping with a mach_lookup mapping")
    return from_mapping(doc.get("mach_lookup", {}), f"{path}: mach_lookup")


def _names(kind: str, names: Iterable[str]) -> str:
    return "\n".join(f'  (global-name "{n}")' for n in names) if kind == "exact" else \
        "\n".join(f'  (global-name-regex #"^{re.escape(n)}")' for n in names)


def sbpl_rules(m: MachLookup) -> list[str]:
    """The profile's mach-lookup rules, lowest precedence first (see the module doc)."""
    out = [f";; mach-lookup: default {m.default_action}; exact names beat prefixes, "
           "blocks beat allows"]
    if m.default_action == "allow":
        out.append("(allow mach-lookup)")
    for action, kind, names in (("allow", "prefix", m.allow_prefixes),
                                ("deny", "prefix", m.block_prefixes),
                                ("allow", "exact", m.allow), ("deny", "exact", m.block)):
        if names:
            out.append(f"({action} mach-lookup\n{_names(kind, names)})")
    return out
