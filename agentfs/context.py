"""Who the current request is for, for code far from the FUSE handler (trash, audit).

Front ends set it per request; each trio task (and each thread) has its own value."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Final

CALLER: Final[ContextVar[tuple[int, int]]] = ContextVar("agentfs_caller", default=(0, -1))
