"""The policy check's own cost: a 200-rule policy, decisions per second.

    python -m bench.policy [--rules 200] [--paths 20000]

`uncached` is a fresh decision for every (op, path) (the rules are tried in order);
`cached` is the same lookups again, answered from the decision cache, which is what a
mount pays for a path it has seen.  The mounted overhead of the same policy on the
untar and git workloads is in `python -m bench.run --only agentfs,agentfs-allow,agentfs-200`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from agentfs.policy.engine import PolicyEngine
from agentfs.policy.loader import parse_policy
from agentfs.policy.model import Caller

_OPS = ["open_read", "open_write", "stat", "create", "unlink", "rename", "readdir"]


def big_policy(rules: int = 200) -> str:
    """A policy shaped like a real one, grown to *rules* rules, that never matches the
    benchmark's own files (so workloads run unhindered and pay only for checking)."""
    out = ["version: 1", "name: bench-200", "defaults: {read: allow, write: allow}",
           "rules:"]
    kinds = [
        ('["vault{i}/**", "**/private-{i}/**"]', '["*"]', "deny", ""),
        ('["**/*.secret{i}"]', '["@read"]', "deny", ""),
        ('["**/.cred{i}", "**/.token{i}"]', '["open_read", "read"]', "deny", ""),
        ('["build{i}/**"]', '["@destructive"]', "deny", '    who: {exe: ["!/usr/bin/make"]}'),
        ('["**/ledger-{i}.db"]', '["@write"]', "audit", ""),
        ('["docs{i}/**/*.md"]', '["@write"]', "allow", ""),
    ]
    for i in range(rules):
        paths, ops, decision, who = kinds[i % len(kinds)]
        out += [f"  - id: r{i}", f"    priority: {i % 7}", f"    paths: {paths.format(i=i)}",
                f"    ops: {ops}", f"    decision: {decision}"]
        if who:
            out.append(who)
    return "\n".join(out) + "\n"


def sample_paths(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = ["src", "lib", "pkg", "tests", "docs", "node_modules", "vendor", "a", "b", "c"]
    exts = [".py", ".js", ".c", ".h", ".md", ".json", ".txt", ""]
    return ["/".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            + f"/f{rng.randint(0, 999)}{rng.choice(exts)}" for _ in range(n)]


def measure(rules: int, n: int) -> dict[str, float]:
    engine = PolicyEngine(parse_policy(big_policy(rules), "<bench>"))
    caller = Caller(pid=1, exe="/usr/bin/python3", uid=0)
    checks = [(op, p) for p in sample_paths(n) for op in _OPS[:2]]
    t = time.perf_counter()
    for op, path in checks:
        engine.decide(op, path, caller)
    uncached = len(checks) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(5):
        for op, path in checks:
            engine.decide(op, path, caller)
    cached = 5 * len(checks) / (time.perf_counter() - t)
    return {"rules": rules, "checks": len(checks), "uncached_per_s": uncached,
            "cached_per_s": cached, "uncached_us": 1e6 / uncached, "cached_us": 1e6 / cached}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy")
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--paths", type=int, default=20000)
    args = parser.parse_args(argv)
    r = measure(args.rules, args.paths)
    print(f"{r['rules']} rules, {r['checks']} checks: "
          f"uncached {r['uncached_per_s']:,.0f}/s ({r['uncached_us']:.1f} us each), "
          f"cached {r['cached_per_s']:,.0f}/s ({r['cached_us']:.2f} us each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
