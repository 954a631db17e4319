"""Added latency of the fleet-wide breaker, measured against the same invocation with it off, in one run.

Run: ``.venv/bin/python -m bench.breaker_bench [--n 2000] [--e2e 300]``. Starts its own Redis, Gateway
and two workers (breaker on / ``SARK_BREAKER_ENABLED=false``), and measures, interleaved:

* in process: ``HttpTransport.invoke`` bare vs. guarded by the breaker as a worker has it (closed, no
  failures, change feed live: no round trip), vs. guarded without the change feed (one EVALSHA),
  vs. guarded with a failure on record (two EVALSHAs), and the guard around a no-op;
* end to end: ``sark.invoke`` round trip through Celery on the breaker-on vs breaker-off worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import percentiles, save, send_invocation


async def _in_process(redis_url: str, n: int) -> dict[str, dict[str, float]]:
    from config.registry import GatewayServer, Registry
    from config.settings import Settings
    from devkit.gateway import make_token
    from devkit.stack import DEFAULT_JWT_SECRET
    from workers.breaker.board import BreakerBoard
    from workers.errors import ToolError
    from workers.gateway.client import GatewayClient
    from workers.models import parse_invocation
    from workers.transports.base import Call
    from workers.transports.http import HttpTransport

    settings = Settings()
    server = GatewayServer(name="echo", transport="http")
    board = BreakerBoard.from_settings(settings, Registry(servers={"echo": server}))
    await board.start()  # as a worker's runtime does: the change feed is live
    asking = BreakerBoard.from_settings(settings, Registry(servers={"echo": server}))  # never started: no feed
    sick = board.breaker("bench:sick")  # same peer; every call there counts as a failure (never opens)
    sick.fail_max = 10**9
    gateway = GatewayClient(settings)
    transport = HttpTransport(gateway, max_result_bytes=settings.max_result_bytes)
    invocation = parse_invocation({"server": "echo", "tool": "echo", "arguments": {"x": 1}},
                                  max_argument_bytes=settings.max_argument_bytes)
    token = make_token(DEFAULT_JWT_SECRET)
    call = Call(server=server, invocation=invocation, request_id="bench", timeout=10, token=token)

    async def noop() -> None:
        return None

    async def invoke_then_fail() -> None:
        await transport.invoke(call)
        raise ToolError("counted", status_code=503)

    async def sick_call() -> None:
        with contextlib.suppress(ToolError):
            await sick.call(invoke_then_fail, lease=30)

    cases: dict[str, Callable[[], Awaitable[Any]]] = {
        "invoke, breaker off": lambda: transport.invoke(call),
        "invoke, breaker on (closed, feed live: 0 EVALSHA)":
            lambda: board.call(server, lambda: transport.invoke(call), lease=30),
        "invoke, breaker on (closed, no feed: 1 EVALSHA)":
            lambda: asking.call(server, lambda: transport.invoke(call), lease=30),
        "invoke, breaker on (failure recorded, 2 EVALSHA)": sick_call,
        "guard around a no-op (closed, feed live)": lambda: board.call(server, noop, lease=30),
        "guard around a no-op (closed, no feed: 1 EVALSHA)": lambda: asking.call(server, noop, lease=30),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(n + 50):
        for name, fn in cases.items() if i % 2 else reversed(cases.items()):
            started = time.perf_counter()
            await fn()
            if i >= 50:
                samples[name].append((time.perf_counter() - started) * 1000)
    await gateway.close()
    await board.close()
    await asking.close()
    return {name: percentiles(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    """Measure and print; write bench/results/breaker.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="in-process calls per case")
    parser.add_argument("--e2e", type=int, default=300, help="Celery round trips per case")
    args = parser.parse_args(argv)

    from config.settings import Settings
    from devkit.gateway import make_token
    from devkit.stack import DEFAULT_JWT_SECRET, DevStack
    from workers.app import create_app

    with DevStack() as stack:
        stack.start()
        stack.apply_env()
        assert stack.redis is not None
        results: dict[str, dict[str, float]] = asyncio.run(_in_process(stack.redis.url, args.n))

        stack.worker("on", queues="bb.on", concurrency=4)
        stack.worker("off", queues="bb.off", concurrency=4, env={"SARK_BREAKER_ENABLED": "false"})
        app = create_app(Settings())
        token = make_token(DEFAULT_JWT_SECRET)
        invocation = {"server": "echo", "tool": "echo", "arguments": {"x": 1}}
        e2e: dict[str, list[float]] = {"bb.off": [], "bb.on": []}
        for i in range(args.e2e + 30):
            for queue in ("bb.on", "bb.off") if i % 2 else ("bb.off", "bb.on"):
                started = time.perf_counter()
                send_invocation(app, invocation, token, queue=queue).get(timeout=30)
                if i >= 30:
                    e2e[queue].append((time.perf_counter() - started) * 1000)
        app.close()
        results["sark.invoke round trip, breaker off"] = percentiles(e2e["bb.off"])
        results["sark.invoke round trip, breaker on"] = percentiles(e2e["bb.on"])

    def added(on: str, off: str) -> str:
        a, b = results[on], results[off]
        return f"{a['p50'] - b['p50']:+.3f} ms p50, {a['p95'] - b['p95']:+.3f} ms p95"

    width = max(len(k) for k in results)
    for name, p in results.items():
        print(f"{name:{width}}  p50 {p['p50']:7.3f}  p95 {p['p95']:7.3f}  p99 {p['p99']:7.3f}  (ms, n={p['n']})")
    summary = {
        "in process, closed": added("invoke, breaker on (closed, feed live: 0 EVALSHA)", "invoke, breaker off"),
        "in process, closed without the feed": added("invoke, breaker on (closed, no feed: 1 EVALSHA)",
                                                     "invoke, breaker off"),
        "in process, failure recorded": added("invoke, breaker on (failure recorded, 2 EVALSHA)",
                                               "invoke, breaker off"),
        "end to end": added("sark.invoke round trip, breaker on", "sark.invoke round trip, breaker off"),
    }
    for name, text in summary.items():
        print(f"added latency, {name}: {text}")
    save("breaker", {"cases": results, "added": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
