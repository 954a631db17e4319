"""Every benchmark in one command: ``.venv/bin/python -m bench.run_all`` (``bash scripts/bench.sh``).

Each part starts its own Redis, Gateway, workers and servers on loopback, runs a bounded load and prints
its figures beside the floor measured in the same run; the summary is written to bench/results/all.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench.common import RESULTS

PARTS = ["bench_http", "stdio_bench", "stream_bench", "breaker_bench", "bench_scaling"]


def _load(name: str) -> Any:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    """Run every part in turn, then print and save the summary."""
    started = time.perf_counter()
    failed = []
    for part in PARTS:
        print(f"\n##### {part}", flush=True)
        # One process per part: each starts its own stack and reads its own SARK_* settings.
        done = subprocess.run([sys.executable, "-m", f"bench.{part}", *(argv or [])], check=False)
        if done.returncode != 0:  # one broken part must not hide the others' figures
            failed.append(f"{part}: exit {done.returncode}")
            print(f"!! {part} failed (exit {done.returncode})", flush=True)
    summary = {name: _load(name) for name in ("http", "stdio", "stream_bench", "breaker", "scaling")}
    summary["failed"] = failed
    summary["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "all.json").write_text(json.dumps(summary, indent=2))
    print(f"\nall figures written to {RESULTS / 'all.json'} in {summary['seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
