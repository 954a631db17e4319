"""Scaling out: a 50 ms tool with 1 worker vs 2 worker processes; in-flight capacity and memory per process.

Run: ``.venv/bin/python -m bench.bench_scaling``. Starts its own Redis, Gateway and workers on loopback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

from bench.common import ratio, save, send_invocation, throughput
from devkit.stack import DEFAULT_API_KEY, DEFAULT_JWT_SECRET, DevStack, Proc


def rss_mb(proc: Proc) -> float:
    """Resident memory of a process (MiB)."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main(argv: list[str] | None = None) -> int:
    """Measure and print; write bench/results/scaling.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400, help="invocations per throughput figure")
    parser.add_argument("--per-worker", type=int, default=4, help="threads per worker for the scaling figure")
    parser.add_argument("--in-flight", type=int, default=500, help="invocations held open at once")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each held invocation lasts")
    args = parser.parse_args(argv)

    from config.settings import Settings
    from devkit.gateway import make_token
    from workers.app import create_app

    out: dict[str, float] = {}
    with DevStack() as stack:
        stack.start()
        stack.apply_env()
        assert stack.gateway is not None
        control = httpx.Client(base_url=stack.gateway.url, headers={"X-API-Key": DEFAULT_API_KEY}, timeout=10)
        app = create_app(Settings())
        token = make_token(DEFAULT_JWT_SECRET)

        def send(seconds: float):  # type: ignore[no-untyped-def]
            invocation = {"server": "echo", "tool": "sleep", "arguments": {"seconds": seconds}}
            return send_invocation(app, invocation, token)

        one = stack.worker("scale-1", queues="sark.http", concurrency=args.per_worker)
        out["one_worker_per_s"] = throughput(lambda: send(0.05), args.n, in_flight=4 * args.per_worker)
        two = stack.worker("scale-2", queues="sark.http", concurrency=args.per_worker)
        out["two_workers_per_s"] = throughput(lambda: send(0.05), args.n, in_flight=4 * args.per_worker)
        out["scaling_ratio"] = ratio(out["two_workers_per_s"], out["one_worker_per_s"])
        one.stop()
        two.stop()

        # The HTTP pool, not the worker, caps concurrency at 100 by default: open it for this figure.
        pool = {"SARK_HTTP_MAX_CONNECTIONS": str(args.in_flight + 50), "SARK_HTTP_MAX_KEEPALIVE": "100"}
        big = stack.worker("in-flight", queues="sark.http", concurrency=args.in_flight, ready_timeout=120, env=pool)
        out["idle_rss_mb"] = rss_mb(big)
        control.post("/_control/reset")
        # Each call lasts long enough for all of them to be taken before the first ends: this figure is the
        # capacity of one process, not how fast its consumer takes messages (at 3 s a slow machine measured
        # ~360 of 500 for both the old and the new code: the first calls ended before the last arrived).
        pendings = [send(args.hold) for _ in range(args.in_flight)]
        deadline = time.monotonic() + 60
        peak = 0
        peak_rss = 0.0
        while time.monotonic() < deadline:
            stats = control.get("/_control/stats").json()
            peak = max(peak, int(stats["max_in_flight"]))
            peak_rss = max(peak_rss, rss_mb(big))
            if peak >= args.in_flight:
                break
            time.sleep(0.1)
        done = sum(1 for p in pendings if p.get(timeout=120))
        out.update(in_flight_peak=peak, in_flight_completed=done, busy_rss_mb=peak_rss,
                   rss_per_in_flight_kb=round((peak_rss - out["idle_rss_mb"]) * 1024 / max(peak, 1), 1))
        big.stop()
        app.close()

    print(f"{'50 ms tool, 1 worker (' + str(args.per_worker) + ' threads)':44} {out['one_worker_per_s']:>12}/s")
    print(f"{'50 ms tool, 2 workers (separate processes)':44} {out['two_workers_per_s']:>12}/s  "
          f"ratio {out['scaling_ratio']} (target >= 1.7)")
    print(f"{'in flight at once in ONE worker process':44} {out['in_flight_peak']:>12}  "
          f"(completed {out['in_flight_completed']}/{args.in_flight}, target >= 500)")
    print(f"{'worker RSS idle / busy (MiB)':44} {out['idle_rss_mb']:>12} / {out['busy_rss_mb']}  "
          f"(~{out['rss_per_in_flight_kb']} KiB per in-flight invocation)")
    print(f"written {save('scaling', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
