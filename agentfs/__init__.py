"""agentfs: a copy-on-write overlay filesystem for running agents safely."""

__version__ = "0.1.0"
