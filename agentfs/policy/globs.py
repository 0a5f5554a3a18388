"""Path globs compiled to regular expressions.

`*` matches within one path segment, `**` across segments, zero of them included
(`a/**/b` matches `a/b`, and `dir/**` matches `dir` itself), `?` one character,
`[abc]` / `[!abc]` a class, `{a,b}` alternatives.
Patterns match the whole path relative to the view's root; a leading `/` is allowed
and means the same thing.  Matching is case-sensitive, like the filesystems we run on.
"""

from __future__ import annotations

import re
from functools import lru_cache


class GlobError(ValueError):
    pass


def glob_to_regex(pattern: str) -> str:
    """The regex source for *pattern* (anchored at both ends)."""
    pat = pattern.lstrip("/")
    if not pat:
        raise GlobError("empty pattern")
    if pat.endswith("/**") and len(pat) > 3:
        # `dir/**` is the directory and everything below it (`**` may be zero segments)
        return glob_to_regex(pat[:-3]) + "(?:/.*)?"
    out: list[str] = []
    i, n = 0, len(pat)
    depth = 0
    while i < n:
        c = pat[i]
        if c == "*":
            if pat.startswith("**", i):
                before_ok = i == 0 or pat[i - 1] == "/"
                after = pat[i + 2] if i + 2 < n else ""
                if not before_ok or after not in ("", "/"):
                    raise GlobError(f"'**' must be a whole path segment in {pattern!r}")
                if after == "/":
                    out.append("(?:.*/)?")
                    i += 3
                else:
                    out.append(".*")
                    i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pat.find("]", i + 2 if i + 1 < n and pat[i + 1] in "!^" else i + 1)
            if end < 0:
                raise GlobError(f"unclosed '[' in {pattern!r}")
            body = pat[i + 1:end]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            if not body or "/" in body:
                raise GlobError(f"bad character class in {pattern!r}")
            escaped = body.replace("\\", "\\\\").replace("]", "\\]")
            out.append(f"[{'^/' if negate else ''}{escaped}]")
            i = end
        elif c == "{":
            depth += 1
            out.append("(?:")
        elif c == "}":
            if depth == 0:
                raise GlobError(f"unmatched '}}' in {pattern!r}")
            depth -= 1
            out.append(")")
        elif c == "," and depth > 0:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    if depth:
        raise GlobError(f"unclosed '{{' in {pattern!r}")
    return "".join(out)


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern[str]:
    return re.compile(glob_to_regex(pattern), re.DOTALL)


def compile_globs(patterns: list[str]) -> re.Pattern[str]:
    """One regex matching any of *patterns* (the compiled form a rule keeps)."""
    return re.compile("|".join(f"(?:{glob_to_regex(p)})" for p in patterns), re.DOTALL)


def normalize(path: str) -> str:
    """A view path as rules see it: no leading '/', no '.', '..' resolved lexically."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def may_match_below(pattern: str, prefix: str) -> bool:
    """Could *pattern* match some path strictly below directory *prefix*?

    Conservative (True when unsure): used to decide whether moving a directory could
    carry a protected path out of a rule's reach, so a false True only costs a walk.
    """
    if "{" in pattern:
        return True  # alternatives may span segments; not worth being clever
    segs = pattern.lstrip("/").split("/")
    psegs = [p for p in prefix.split("/") if p]
    for i, pseg in enumerate(psegs):
        if i >= len(segs):
            return False
        if segs[i] == "**":
            return True
        if not compile_glob(segs[i]).fullmatch(pseg):
            return False
    return len(segs) > len(psegs)
