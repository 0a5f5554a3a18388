"""The policy stack in force: loaded once, reloaded on demand, never replaced by a bad one."""

from __future__ import annotations

import logging
from typing import Any

from agentfs.policy.effective import effective
from agentfs.policy.engine import PolicyEngine, default_policy, summarize
from agentfs.policy.layers import LayerSpec, discover, load_layers, signature, with_session
from agentfs.policy.loader import PolicyError

log = logging.getLogger(__name__)


class PolicySource:
    """The engine for one stack of policy layers (see agentfs/policy/layers.py).

    `reload` swaps the engine's policy in place, so everyone holding the engine sees
    the new rules at once; when any layer's file does not load, the whole last good
    stack stays in force and the reason is kept."""

    def __init__(self, specs: tuple[LayerSpec, ...] = ()) -> None:
        self.specs = specs
        self.engine = PolicyEngine(load_layers(specs, default_policy()))
        self._signature = self._stat()
        self.last_error = ""

    @classmethod
    def for_mount(cls, base: str | None, session_path: str | None) -> PolicySource:
        """The organisation, project (from *base*), user and session layers."""
        return cls(discover(base, session_path))

    def for_session(self, session_path: str) -> PolicySource:
        """This stack with a session's own `--policy` as its session layer."""
        return PolicySource(with_session(self.specs, session_path))

    @property
    def sha256(self) -> str:
        return self.engine.policy.sha256

    def describe(self) -> dict[str, Any]:
        layers = self.engine.layers
        return {"path": ", ".join(layer.policy.source for layer in layers),
                "name": self.engine.policy.name, "sha256": self.sha256,
                "last_error": self.last_error,
                "layers": [{"origin": layer.origin, "path": layer.policy.source,
                            "name": layer.policy.name, "sha256": layer.policy.sha256}
                           for layer in layers],
                "looked_for": [{"origin": s.origin, "path": s.path} for s in self.specs],
                "effective": effective(self.engine)}

    def _stat(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        return tuple(signature(spec) for spec in self.specs)

    def changed(self) -> bool:
        """Did a layer file change, appear or disappear since the last (re)load?"""
        return bool(self.specs) and self._stat() != self._signature

    def reload(self) -> tuple[bool, str]:
        """(True, sha256) when every layer loaded (same or new), (False, reason) if not."""
        if not self.specs:
            return True, self.sha256
        self._signature = self._stat()
        try:
            layers = load_layers(self.specs, default_policy())
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy reload refused, keeping %s: %s", self.sha256[:12], exc)
            return False, str(exc)
        self.last_error = ""
        if summarize(layers).sha256 != self.sha256:
            self.engine.replace(layers)
            log.info("policy reloaded (%s): %s",
                     ", ".join(f"{layer.origin} {layer.policy.source}" for layer in layers),
                     self.sha256[:12])
        return True, self.sha256
