"""Decision queries on the control socket: round-trip latency on one connection.

    python -m bench.decisions [--requests 5000] [--rules 200] [--impl kernel]

Mounts a branch with the 200-rule policy of `bench.policy` (as the agentfs-200 target
does), opens one connection to the daemon's control socket and sends N file queries
one at a time (send, wait for the reply), timing each round trip from the client:
JSON both ways, the unix socket, the daemon's wake-up, the policy decision and the
audit event.  Paths are a mix that rules allow (most) and deny (one in ten); each path
is asked once, so the decision cache helps only as far as the policy's own index
does.  Prints p50/p99/max in microseconds and writes bench/results/decisions.json.
The target is a p99 under 1 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agentfs.mount import control
from agentfs.mount.lifecycle import choose_impl
from bench.machine import repo_state
from bench.policy import big_policy, sample_paths
from bench.targets import AgentfsBigPolicyTarget, Setup

RESULTS = Path(__file__).resolve().parent / "results" / "decisions.json"
OPS = ["open_read", "open_write", "stat", "create", "unlink", "rename", "readdir"]
TARGET_P99_US = 1000.0


def query_mix(mountpoint: Path, n: int, seed: int = 7) -> list[dict[str, Any]]:
    """*n* file queries: nine in ten on paths no rule denies, one in ten on a path one
    of the policy's deny rules covers (vaultN/**, **/*.secretN, **/.credN)."""
    rng = random.Random(seed)
    paths = sample_paths(n, seed)
    denied = ["vault{i}/x/y.txt", "src/a.secret{i}", "home/.cred{i}"]
    out = []
    for i, path in enumerate(paths):
        if i % 10 == 0:
            k = rng.randrange(0, 198, 6)  # rule r<k> is a 'vault' rule; +1, +2 the others
            which = rng.randrange(3)
            path = denied[which].format(i=k + which)
        out.append({"type": "file", "path": str(mountpoint / path),
                    "operation": "open_read" if i % 10 == 0 else rng.choice(OPS),
                    "pid": os.getpid()})
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure(requests: int, rules: int, work: Path) -> dict[str, Any]:
    target = AgentfsBigPolicyTarget()
    target.home = work / "home"
    if rules != 200:
        target.policy_text = big_policy(rules)  # type: ignore[misc]
    setup = Setup.create(work, "decisions")
    with target.mounted(setup) as mount:
        [sock] = (setup.store / "run").glob("ctl-*.sock")
        queries = query_mix(mount.root, requests)
        times: list[float] = []
        denied = 0
        with control.Connection(sock) as conn:
            for q in queries[:200]:  # warm-up: imports, first /proc reads, the index
                conn.request(q)
            for q in queries:
                t = time.perf_counter_ns()
                reply = conn.request(q)
                times.append((time.perf_counter_ns() - t) / 1000)
                if "error" in reply:
                    raise SystemExit(f"query failed: {q} -> {reply}")
                denied += not reply["allow"]
    times.sort()
    return {"requests": requests, "rules": rules, "denied": denied,
            "p50_us": round(percentile(times, 0.50), 1),
            "p90_us": round(percentile(times, 0.90), 1),
            "p99_us": round(percentile(times, 0.99), 1),
            "max_us": round(times[-1], 1),
            "mean_us": round(statistics.fmean(times), 1),
            "target_p99_us": TARGET_P99_US,
            "impl": choose_impl(None)}  # what `agentfs mount` picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decisions")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--impl", choices=["pyfuse3", "mfusepy", "kernel"],
                        help="the mount's FUSE front end (default: as agentfs mount picks)")
    parser.add_argument("--work", type=Path, default=None,
                        help="directory for the store and mount (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.impl:
        os.environ["AGENTFS_FUSE_IMPL"] = args.impl
    with tempfile.TemporaryDirectory(prefix="agentfs-decisions-",
                                     dir=args.work) as tmp:
        result = measure(args.requests, args.rules, Path(tmp))
    result["when"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["load_average"] = os.getloadavg()
    result["repo"] = repo_state()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["p99_us"] < TARGET_P99_US
    print(f"{result['requests']} decision queries, {result['rules']} rules, one connection "
          f"({result['impl']} front end; {result['denied']} denied): "
          f"p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us, "
          f"max {result['max_us']:.0f} us "
          f"({'under' if ok else 'OVER'} the {TARGET_P99_US:.0f} us p99 target)")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
