"""Which rules can possibly match a path, found without trying each rule's regex.

Almost every glob in a real policy names something literal: a whole segment
(`vault/**`, `**/.ssh/**`, `**/.env`), an extension (`**/*.pem`) or the start of a name
(`**/id_rsa*`).  A path can only match such a glob if one of its segments is that
literal, ends with that extension or starts with that prefix, so rules are filed
under those keys and a path looks up its own segments (a handful of dict lookups and
prefix tests).  Globs with nothing literal to file them under are candidates for
every path.  The candidates are then confirmed with their
regex, in priority order, so the index changes the cost, never the answer.
"""

from __future__ import annotations

import re
from typing import Final

from agentfs.policy.model import Rule

_WILD: Final = re.compile(r"[*?\[{\\]")
_EXT_GLOB: Final = re.compile(r"^\*(\.[^*?\[{}\\/]+)$")
_PREFIX_GLOB: Final = re.compile(r"^([^*?\[{}\\/]+)\*$")


def glob_key(glob: str) -> tuple[str, str] | None:
    """('seg', name), ('ext', '.ext') or ('pre', prefix) that every match must
    contain (a segment that is, ends with, or starts with it), or None."""
    if "{" in glob:
        return None  # alternatives may span segments
    best: tuple[str, str] | None = None
    for seg in glob.lstrip("/").split("/"):
        if seg and seg != "**" and not _WILD.search(seg):
            return ("seg", seg)
        if best is None:
            m = _EXT_GLOB.match(seg)
            if m:
                best = ("ext", m.group(1))
            elif m := _PREFIX_GLOB.match(seg):  # id_rsa*: every private key's name
                best = ("pre", m.group(1))
    return best


class RuleIndex:
    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self._segs: dict[str, list[int]] = {}
        self._exts: dict[str, list[int]] = {}
        pres: dict[str, list[int]] = {}
        by_kind = {"seg": self._segs, "ext": self._exts, "pre": pres}
        always: set[int] = set()
        for i, rule in enumerate(rules):
            keys = [glob_key(g) for g in rule.paths]
            if any(k is None for k in keys):
                always.add(i)
                continue
            for kind, value in {k for k in keys if k is not None}:
                by_kind[kind].setdefault(value, []).append(i)
        self._always = sorted(always)
        self._pres = tuple(pres.items())  # few (id_rsa*, id_ed25519*): tried one by one
        # the keys of rules that can give something other than allow, for
        # `restricts_segment` (allow rules never make a pre-check say "maybe")
        strict = {i for i, rule in enumerate(rules) if rule.decision != "allow"}
        self.strict_always = bool(strict & always)
        self._strict_segs = frozenset(k for k, v in self._segs.items() if strict & set(v))
        self._strict_exts = frozenset(k for k, v in self._exts.items() if strict & set(v))
        self._strict_pres = tuple(k for k, v in self._pres if strict & set(v))

    def restricts_segment(self, seg: str) -> bool:
        """Could a non-allow rule filed under a key be a candidate because of this one
        path segment?  (Rules filed under no key: `strict_always`.)"""
        if seg in self._strict_segs:
            return True
        if self._strict_pres and seg.startswith(self._strict_pres):
            return True
        if self._strict_exts:
            dot = seg.find(".")
            while dot >= 0:
                if seg[dot:] in self._strict_exts:
                    return True
                dot = seg.find(".", dot + 1)
        return False

    def candidates(self, path: str) -> list[int]:
        """Positions (in priority order) of the rules that might match *path*."""
        found = set(self._always)
        segs, exts, pres = self._segs, self._exts, self._pres
        for seg in path.split("/"):
            hit = segs.get(seg)
            if hit:
                found.update(hit)
            for pre, hit in pres:
                if seg.startswith(pre):
                    found.update(hit)
            if exts:
                dot = seg.find(".")
                while dot >= 0:
                    hit = exts.get(seg[dot:])
                    if hit:
                        found.update(hit)
                    dot = seg.find(".", dot + 1)
        return sorted(found)
