"""stdio transport through the queue: cold start vs warm calls, beside a bare Celery no-op, in one run.

``python -m bench.stdio_bench [--n 300] [--cold 5]``: starts Redis, a sark worker (sark.stdio queue)
and a bare-Celery worker (:mod:`bench.bare_app`) with :mod:`workers.devstack`, then measures

* cold start: the first ``sark.invoke`` of ``mcp-server-time`` on a fresh server entry (process
  start + launcher + MCP handshake + tools/list + the call), ``--cold`` times on distinct entries;
* warm: ``--n`` sequential ``time.get_current_time`` invocations on the kept session;
* the floor: ``--n`` bare ``no-op`` round trips;

and writes ``bench/results/stdio.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import latency, percentiles, save, table
from workers.devstack import DevStack


def _registry(path: Path, cold: int) -> Path:
    entries = "".join(
        f"  time-{i}:\n    transport: stdio\n    command: \"{{bin}}/mcp-server-time\"\n"
        f"    args: [\"--local-timezone\", \"UTC\"]\n"
        for i in range(cold + 1)
    )
    path.write_text("servers:\n" + entries)
    return path


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table; write bench/results/stdio.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300, help="sequential calls per latency figure")
    parser.add_argument("--cold", type=int, default=5, help="cold starts to measure")
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
            invocation = {"server": server, "tool": "get_current_time", "arguments": {"timezone": "Europe/Paris"}}
            return sark.send_task(TASK_INVOKE, kwargs={"invocation": invocation})

        def send_noop():  # type: ignore[no-untyped-def]
            return bare.noop.apply_async()

        cold_ms = []
        for i in range(1, args.cold + 1):
            started = time.perf_counter()
            send_time(f"time-{i}").get(timeout=60)
            cold_ms.append((time.perf_counter() - started) * 1000)
        cold = percentiles(cold_ms)
        noop = latency(send_noop, args.n)
        warm = latency(lambda: send_time("time-0"), args.n)

    print(table([
        ("bare Celery no-op round trip (ms)", noop, noop),
        ("stdio warm time.get_current_time (ms)", warm, noop),
        ("stdio cold start + first call (ms)", cold, noop),
    ]))
    path = save("stdio", {"cold_ms": cold, "cold_samples_ms": [round(v, 1) for v in cold_ms], "warm_ms": warm,
                          "noop_ms": noop, "n": args.n, "python": sys.version.split()[0]})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
