"""stdio transport through the queue: cold start vs warm calls, beside their floors, in one run.

``python -m bench.stdio_bench [--n 300] [--cold 5]``: starts Redis, a sark worker (sark.stdio queue)
and a bare-Celery worker (:mod:`bench.bare_app`) with :mod:`devkit.stack`, then measures

* cold start: the first ``sark.invoke`` of ``mcp-server-time`` on a fresh server entry (process
  start + launcher + MCP handshake + tools/list + the call), ``--cold`` times on distinct entries,
  each beside the SDK alone doing the same (``mcp.Client`` start + handshake + first call);
* warm: ``--n`` sequential ``time.get_current_time`` invocations on the kept session;
* the floor: ``--n`` bare ``no-op`` round trips, and ``--n`` direct warm ``call_tool`` of the same
  tool on an ``mcp.Client`` session held by this process (no Celery, no sark); the warm figure is
  compared with their sum (what a bare Celery task holding a warm session could at best achieve).

A fourth figure, for reference: ``bare.mcp_time``, a bare Celery task calling the same tool on a warm
SDK session its worker keeps on a loop of its own (sark's architecture without sark's machinery).

The four kinds of call are interleaved (no-op, direct, sark, bare task, in rotating order), so that the
machine's drift hits the figure and its floor alike, and each starts after ``--gap`` ms of quiet, so
that none pays for the trailing work (events, acks) of the call before it. Writes ``bench/results/stdio.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import interleaved, percentiles, round_trip, save, table, timed
from bench.direct_mcp import ARGUMENTS, DirectSession
from devkit.stack import DevStack


def _registry(path: Path, cold: int) -> Path:
    entries = "".join(
        f"  time-{i}:\n    transport: stdio\n    command: \"{{bin}}/mcp-server-time\"\n"
        f"    args: [\"--local-timezone\", \"UTC\"]\n"
        for i in range(cold + 1)
    )
    path.write_text("servers:\n" + entries)
    return path


def combined(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Percentile-wise sum of two floors (p50+p50, p95+p95, …): the floor of doing both in a row."""
    return {k: round(a[k] + b[k], 3) for k in ("p50", "p95", "p99", "mean")} | {"n": min(a["n"], b["n"])}


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table; write bench/results/stdio.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300, help="sequential calls per latency figure")
    parser.add_argument("--cold", type=int, default=5, help="cold starts to measure")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured rounds first")
    parser.add_argument("--gap", type=float, default=5.0, help="ms of quiet before each measured call")
    parser.add_argument("--concurrency", type=int, default=4, help="threads per worker (both apps)")
    args = parser.parse_args(argv)

    from config.settings import Settings
    from workers.app import create_app
    from workers.contract import TASK_INVOKE

    with tempfile.TemporaryDirectory(prefix="sark-bench-") as tmp, DevStack(
        extra_env={"SARK_REGISTRY_PATH": str(_registry(Path(tmp) / "servers.yaml", args.cold))}
    ) as stack:
        stack.start(gateway=False)
        stack.apply_env()
        stack.worker("sark", queues="sark.stdio", concurrency=args.concurrency)
        stack.worker("bare", app="bench.bare_app", queues="bare", concurrency=args.concurrency)
        import bench.bare_app as bare

        sark = create_app(Settings())

        def send_time(server: str):  # type: ignore[no-untyped-def]
            invocation = {"server": server, "tool": "get_current_time", "arguments": ARGUMENTS}
            return sark.send_task(TASK_INVOKE, kwargs={"invocation": invocation})

        def send_noop():  # type: ignore[no-untyped-def]
            return bare.noop.apply_async()

        direct = DirectSession()
        try:
            cold_ms, direct_cold_ms = [], []
            for i in range(1, args.cold + 1):
                cold_ms.append(timed(lambda i=i: send_time(f"time-{i}").get(timeout=60)))  # type: ignore[misc]
                direct_cold_ms.append(direct.cold_ms())
            # For reference only: the SDK back to back, on a machine kept busy by nothing else.
            back_to_back = percentiles([direct.warm_ms() for _ in range(args.warmup + args.n)][args.warmup:])
            lat = interleaved({
                "noop": round_trip(send_noop),
                "direct": direct.warm_ms,
                "sark": round_trip(lambda: send_time("time-0")),
                "bare_mcp": round_trip(bare.mcp_time.apply_async, timeout=60),
            }, args.n, warmup=args.warmup, gap_ms=args.gap)  # gap: the previous call's events, acks finish first
        finally:
            direct.close()
    cold, direct_cold = percentiles(cold_ms), percentiles(direct_cold_ms)
    noop, warm, direct_warm, bare_mcp = (lat[k] for k in ("noop", "sark", "direct", "bare_mcp"))
    floor = combined(noop, direct_warm)

    print(table([
        ("bare Celery no-op round trip (ms)", noop, noop),
        ("direct warm mcp call_tool, SDK only (ms)", direct_warm, direct_warm),
        ("stdio warm vs no-op + direct warm call (ms)", warm, floor),
        ("stdio warm vs bare task on a warm session (ms)", warm, bare_mcp),
        ("stdio cold start + first call vs SDK's (ms)", cold, direct_cold),
    ]))
    print(f"(reference: direct warm call_tool back to back, nothing interleaved: p50 {back_to_back['p50']:.2f} "
          f"p95 {back_to_back['p95']:.2f} ms)")
    path = save("stdio", {"cold_ms": cold, "cold_samples_ms": [round(v, 1) for v in cold_ms], "warm_ms": warm,
                          "direct_cold_ms": direct_cold, "direct_back_to_back_ms": back_to_back,
                          "gap_ms": args.gap, "noop_ms": noop, "direct_warm_ms": direct_warm,
                          "floor_ms": floor, "bare_task_warm_session_ms": bare_mcp,
                          "p95_ratio": round(warm["p95"] / floor["p95"], 2), "n": args.n,
                          "python": sys.version.split()[0]})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
