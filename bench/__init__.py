"""Benchmark harness comparing agentfs with plain directories and other overlay filesystems.

Run it with ``python -m bench`` (or ``make bench``) from the repository root; see
``bench/README.md``.
"""
