"""Fork cost does not grow with the branch: time `branch create --from` for a branch
with 10 and with 10,000 changed files.

    .venv/bin/python -m bench.fork [--repeat 5]

Prints the median time of the store operation itself and of the whole CLI command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentfs.branches.store import Store
from agentfs.mount.view import open_branch_view

ROOT = Path("/var/tmp/agentfs-bench")


def make_branch(store: Store, name: str, changed: int) -> None:
    store.create_branch(name)
    ov = open_branch_view(store, name)
    try:
        for i in range(changed):
            d = f"d{i % 100}"
            if not ov.exists(d):
                ov.mkdir(d, 0o755, 0, 0)
            fh, _ = ov.create(f"{d}/f{i}", os.O_WRONLY, 0o644, 0, 0)
            ov.write(fh, 0, b"x" * 100)
            ov.release(fh)
    finally:
        ov.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fork-", dir=ROOT))
    agentfs = str(Path(sys.executable).parent / "agentfs")
    try:
        base = work / "base"
        base.mkdir()
        (base / "README").write_text("base\n")
        store = Store.create(base, work / "store")
        env = dict(os.environ, AGENTFS_HOME=str(work / "home"))
        print(f"{'changed files':>14} | {'store fork (ms)':>15} | {'CLI fork (ms)':>13}")
        for changed in (10, 10_000):
            src = f"src{changed}"
            make_branch(store, src, changed)
            api, cli = [], []
            for r in range(args.repeat):
                t = time.perf_counter()
                store.create_branch(f"api{changed}-{r}", src)
                api.append(time.perf_counter() - t)
                t = time.perf_counter()
                subprocess.run([agentfs, "--store", str(store.root), "branch", "create",
                                f"cli{changed}-{r}", "--from", src], env=env, check=True,
                               capture_output=True, timeout=120)
                cli.append(time.perf_counter() - t)
            print(f"{changed:>14} | {statistics.median(api) * 1000:>15.1f} | "
                  f"{statistics.median(cli) * 1000:>13.1f}")
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
