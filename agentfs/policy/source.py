"""A policy file in force: loaded once, reloaded on demand, never replaced by a bad one."""

from __future__ import annotations

import logging
import os

from agentfs.policy.engine import PolicyEngine, default_policy
from agentfs.policy.loader import PolicyError, load_policy, parse_policy

log = logging.getLogger(__name__)


class PolicySource:
    """The engine for one policy file (or the built-in default when *path* is None).

    `reload` swaps the engine's policy in place, so everyone holding the engine sees
    the new rules at once; a file that does not load leaves the last good policy in
    force and says why."""

    def __init__(self, path: str | None = None, text: str | None = None) -> None:
        self.path = os.path.abspath(path) if path else None
        self._text = text
        if self.path is not None:
            policy = load_policy(self.path)
        elif text is not None:
            policy = parse_policy(text, "<policy>")
        else:
            policy = default_policy()
        self.engine = PolicyEngine(policy)
        self._signature = self._stat()
        self.last_error = ""

    @property
    def sha256(self) -> str:
        return self.engine.policy.sha256

    def describe(self) -> dict[str, str]:
        return {"path": self.path or "<default policy>", "name": self.engine.policy.name,
                "sha256": self.sha256, "last_error": self.last_error}

    def _stat(self) -> tuple[int, int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        return self.path is not None and self._stat() != self._signature

    def reload(self) -> tuple[bool, str]:
        """(True, sha256) when the file loaded (same or new), (False, reason) if not."""
        if self.path is None:
            return True, self.sha256
        self._signature = self._stat()
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy reload refused, keeping %s: %s", self.sha256[:12], exc)
            return False, str(exc)
        self.last_error = ""
        if policy.sha256 != self.sha256:
            self.engine.replace(policy)
            log.info("policy reloaded from %s: %s", self.path, policy.sha256[:12])
        return True, policy.sha256
